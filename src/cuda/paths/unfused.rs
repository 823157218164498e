//! The unfused baseline: the pipeline users write by hand, kept as the yardstick the fused kernels
//! are timed against (spec/performance.md).
//!
//! 1. cuBLAS GEMM to an f32 logit matrix `S = X·Yᵀ` (N×K; symmetric mode also `Sᵀ`, as
//!    `logits.T` is a copy in user code),
//! 2. a softmax cross-entropy kernel (kernels/unfused.cu: row LSE, loss, `dS = w(P − onehot)/τ`
//!    written over S, plus a copy in the input dtype for f16/bf16),
//! 3. cuBLAS GEMMs for the gradients (`dX = dS·Y`, `dY = dSᵀ·X`), f32 accumulation and output.
//!
//! It materialises O(N·K) floats, so before allocating it checks that the logit matrices fit in
//! free device memory and says clearly when they do not (`clip-xl`). cuBLAS is loaded at run
//! time: without it every call returns [`Error::Unsupported`] naming the library.
//!
//! Supported: every mode, fixed and learnable temperature, the standard variant, every reduction,
//! no normalisation; the rest returns [`Error::Unsupported`].
//!
//! [`Unfused::evaluate`] checks the spec and that the O(N·K) scratch fits, then per mode
//! (`queue`, `inbatch`, `cross`, `symmetric`): (queue: `unfused_pos_dot_<dtype>`, the
//! positives' similarities) → cuBLAS `GemmEx` for the logits → `unfused_ce_rows_<dtype>` → cuBLAS
//! `GemmEx` per gradient (queue: `unfused_row_axpy_<dtype>` adds the positive's terms); then the
//! reduction (`steps_sum_scaled`) and the gradients' dtype (`steps_cast_<dtype>`).

use cudarc::cublas::sys::{cublasComputeType_t, cublasHandle_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, LaunchConfig};

use crate::cuda::op::{
    device_shape, DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, KernelPath, QueueView,
};
use crate::cuda::runtime::cublas::{cublas_handle, cuda_type, GemmCall};
use crate::cuda::runtime::launch::{self, grid_stride, launch, Args, Ptr};
use crate::cuda::runtime::{DeviceElement, DeviceMatrix, Gpu};
use crate::cuda::steps::convert::cast_grad;
use crate::cuda::steps::reduce::reduce_losses;
use crate::error::{Error, Result};
use crate::loss::{Shape, Upstream};
use crate::spec::{LossSpec, Mode, Temperature, Variant};
use crate::tensor::DType;

const MODULE: &str = "unfused";
const CE_THREADS: u32 = 256;
/// Device memory kept free beyond the estimate (cuBLAS workspace, allocator slack).
const MARGIN_BYTES: u64 = 256 << 20;

// kernels/unfused.cu PositiveKind.
const POS_EXTRA: i32 = 0;
const POS_TARGETS: i32 = 1;
const POS_IDENTITY: i32 = 2;
const POS_INBATCH: i32 = 3;

/// A contiguous run of key rows: `rows` rows from row `start` of the keys' buffer, occupying
/// columns `col..col + rows` of the logit matrix.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: usize,
    rows: usize,
    col: usize,
}

/// The queue view's rows as at most two contiguous segments of its ring.
fn queue_segments<T: DeviceElement>(q: &QueueView<'_, T>) -> Result<Vec<Segment>> {
    let cap = q.keys.rows();
    if q.len > cap || (cap > 0 && q.start >= cap) || (cap == 0 && q.len > 0) {
        return Err(Error::shape(
            "queue",
            format!("view start {} len {} of {cap} rows", q.start, q.len),
            "start < capacity and len <= capacity",
        ));
    }
    let first = q.len.min(cap - q.start.min(cap));
    let mut segs = vec![Segment {
        start: q.start,
        rows: first,
        col: 0,
    }];
    if first < q.len {
        segs.push(Segment {
            start: 0,
            rows: q.len - first,
            col: first,
        });
    }
    segs.retain(|s| s.rows > 0);
    Ok(segs)
}

/// The bytes of O(N·K) scratch the unfused pipeline allocates for `mode` with `anchors` rows and
/// `keys` columns (f32 logits, plus a copy of the gradient in the input dtype when it is not
/// f32 and gradients are asked for).
pub fn scratch_bytes(mode: Mode, anchors: usize, keys: usize, dtype: DType, grads: bool) -> u64 {
    let mats: u64 = if mode == Mode::Symmetric { 2 } else { 1 };
    let cells = anchors as u64 * keys as u64 * mats;
    let lowp = if grads && dtype != DType::F32 {
        dtype.size() as u64
    } else {
        0
    };
    cells * (4 + lowp)
}

/// The unfused pipeline with its cuBLAS handle (create once, evaluate many times: the handle's
/// creation is not part of what the benchmark times).
pub struct Unfused {
    blas: CudaBlas,
}

impl std::fmt::Debug for Unfused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unfused").finish_non_exhaustive()
    }
}

/// The gradient operand of the backward GEMMs: the low-precision copy of dS, or S itself (f32).
#[derive(Clone, Copy)]
enum GradOperand<'a, T: DeviceElement> {
    F32(&'a CudaSlice<f32>),
    Low(&'a CudaSlice<T>),
}

impl<'a, T: DeviceElement> GradOperand<'a, T> {
    /// The address of element `offset` and the cuBLAS type.
    fn ptr(self, args: &mut Args<'a>, offset: usize) -> Result<(Ptr, cudaDataType)> {
        Ok(match self {
            GradOperand::F32(s) => (args.read_ptr(s, offset)?, cudaDataType::CUDA_R_32F),
            GradOperand::Low(s) => (args.read_ptr(s, offset)?, cuda_type(T::DTYPE)?),
        })
    }
}

struct Ctx<'g> {
    gpu: &'g Gpu,
    handle: cublasHandle_t,
    dtype: cudaDataType,
    compute: cublasComputeType_t,
}

impl Ctx<'_> {
    /// `S[r×ld] (cols seg.col..) = X[r×d] · Yseg[rows×d]ᵀ` for each segment of `keys`: in
    /// column-major terms `Sᵀ = Yseg · Xᵀ` (op(A) = T on the row-major Y buffer, op(B) = N on X).
    #[allow(clippy::too_many_arguments)]
    fn logits<T: DeviceElement>(
        &self,
        x: &CudaSlice<T>,
        r: usize,
        keys: &CudaSlice<T>,
        segs: &[Segment],
        d: usize,
        s: &mut CudaSlice<f32>,
        ld: usize,
    ) -> Result<()> {
        for seg in segs {
            let mut g = Args::new(self.gpu);
            let call = GemmCall {
                ta: cublasOperation_t::CUBLAS_OP_T,
                tb: cublasOperation_t::CUBLAS_OP_N,
                m: seg.rows,
                n: r,
                k: d,
                a: g.read_ptr(keys, seg.start * d)?,
                a_type: self.dtype,
                lda: d,
                b: g.read_ptr(x, 0)?,
                b_type: self.dtype,
                ldb: d,
                beta: 0.0,
                c: g.write_ptr(s, seg.col)?,
                c_type: cudaDataType::CUDA_R_32F,
                ldc: ld,
                compute: self.compute,
            };
            // SAFETY: S holds r×ld f32, X r×d and each segment rows×d elements; `g` guards them.
            unsafe { call.run(self.handle) }?;
        }
        Ok(())
    }

    /// `out[r×d] (+)= G[r×ld] · Y[ld×d]` over the segments of `keys`: column-major
    /// `outᵀ = Yᵀ · Gᵀ`.
    #[allow(clippy::too_many_arguments)]
    fn grad_anchor<T: DeviceElement>(
        &self,
        g_op: GradOperand<'_, T>,
        r: usize,
        ld: usize,
        keys: &CudaSlice<T>,
        segs: &[Segment],
        d: usize,
        out: &mut CudaSlice<f32>,
        beta: f32,
    ) -> Result<()> {
        for (i, seg) in segs.iter().enumerate() {
            let mut g = Args::new(self.gpu);
            let (gp, g_type) = g_op.ptr(&mut g, seg.col)?;
            let call = GemmCall {
                ta: cublasOperation_t::CUBLAS_OP_N,
                tb: cublasOperation_t::CUBLAS_OP_N,
                m: d,
                n: r,
                k: seg.rows,
                a: g.read_ptr(keys, seg.start * d)?,
                a_type: self.dtype,
                lda: d,
                b: gp,
                b_type: g_type,
                ldb: ld,
                beta: if i == 0 { beta } else { 1.0 },
                c: g.write_ptr(out, 0)?,
                c_type: cudaDataType::CUDA_R_32F,
                ldc: d,
                compute: self.compute,
            };
            // SAFETY: G holds r×ld elements of its type, out r×d f32, segments as in `logits`.
            unsafe { call.run(self.handle) }?;
        }
        Ok(())
    }

    /// `out[seg rows×d] (+)= G[:, seg cols]ᵀ · X[r×d]` for each `(col, rows)` of `cols` (out rows
    /// in logit-column order): column-major `outᵀ = Xᵀ · G[:, seg]`.
    #[allow(clippy::too_many_arguments)]
    fn grad_key<T: DeviceElement>(
        &self,
        g_op: GradOperand<'_, T>,
        r: usize,
        ld: usize,
        cols: &[(usize, usize)],
        x: &CudaSlice<T>,
        d: usize,
        out: &mut CudaSlice<f32>,
        beta: f32,
    ) -> Result<()> {
        for &(col, rows) in cols {
            let mut g = Args::new(self.gpu);
            let (gp, g_type) = g_op.ptr(&mut g, col)?;
            let call = GemmCall {
                ta: cublasOperation_t::CUBLAS_OP_N,
                tb: cublasOperation_t::CUBLAS_OP_T,
                m: d,
                n: rows,
                k: r,
                a: g.read_ptr(x, 0)?,
                a_type: self.dtype,
                lda: d,
                b: gp,
                b_type: g_type,
                ldb: ld,
                beta,
                c: g.write_ptr(out, col * d)?,
                c_type: cudaDataType::CUDA_R_32F,
                ldc: d,
                compute: self.compute,
            };
            // SAFETY: as `grad_anchor`; out holds ld×d f32.
            unsafe { call.run(self.handle) }?;
        }
        Ok(())
    }
}

/// Where row i's positive is, for the cross-entropy kernel.
enum Positive<'a> {
    /// Not in the row: its similarity, one per row (queue mode).
    Extra(&'a CudaSlice<f32>),
    /// Column `targets[i]`.
    Targets(&'a CudaSlice<i64>),
    /// Column i.
    Identity,
    /// Column (i + rows/2) mod rows, and column i masked out (inbatch).
    InBatch,
}

/// The outputs every mode fills: the weights it reads, the per-anchor losses, the row (and
/// column) LSE and the dτ accumulator.
struct Outputs {
    weights: CudaSlice<f32>,
    losses: CudaSlice<f32>,
    count: usize,
    lse: CudaSlice<f32>,
    lse_cols: Option<CudaSlice<f32>>,
    dtau: Option<CudaSlice<f32>>,
}

impl Outputs {
    fn new(
        gpu: &Gpu,
        spec: &LossSpec,
        upstream: &Upstream,
        anchors: usize,
        dtau: bool,
    ) -> Result<Self> {
        let symmetric = spec.mode() == Mode::Symmetric;
        let count = if symmetric { 2 * anchors } else { anchors };
        let w: Vec<f32> = upstream
            .weights(spec, count)?
            .into_iter()
            .map(|x| x as f32)
            .collect();
        Ok(Outputs {
            weights: gpu.stream().clone_htod(&w)?,
            losses: f32_slice(gpu, count)?,
            count,
            lse: f32_slice(gpu, anchors)?,
            lse_cols: symmetric.then(|| f32_slice(gpu, anchors)).transpose()?,
            dtau: dtau.then(|| f32_slice(gpu, 1)).transpose()?,
        })
    }
}

/// One row-wise softmax cross-entropy over a `rows × cols` logit matrix: where each row's
/// positive is, `1/τ`, and where this matrix's anchors start in the per-anchor arrays.
struct Ce<'a> {
    rows: usize,
    cols: usize,
    positive: Positive<'a>,
    alpha: f32,
    offset: usize,
    write_grad: bool,
    /// Symmetric mode's column matrix: its LSE goes to `lse_cols`.
    columns: bool,
}

/// `unfused_ce_rows_<dtype>` over `s` (in place: the logits become `dS`), with the
/// low-precision copy of `dS` when `g_lowp` is given.
fn ce_rows<T: DeviceElement>(
    gpu: &Gpu,
    c: &Ce<'_>,
    s: &mut CudaSlice<f32>,
    g_lowp: Option<&mut CudaSlice<T>>,
    out: &mut Outputs,
    dpos: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    const K: &str = "unfused_ce_rows";
    let cfg = LaunchConfig {
        grid_dim: (launch::grid_dim(K, c.rows, 1)?, 1, 1),
        block_dim: (CE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (pos_s, targets, kind) = match c.positive {
        Positive::Extra(p) => (Some(p), None, POS_EXTRA),
        Positive::Targets(t) => (None, Some(t), POS_TARGETS),
        Positive::Identity => (None, None, POS_IDENTITY),
        Positive::InBatch => (None, None, POS_INBATCH),
    };
    let lse = match (c.columns, out.lse_cols.as_mut()) {
        (true, Some(l)) => l,
        (true, None) => {
            return Err(Error::Unsupported(
                "unfused baseline: column logits outside symmetric mode".into(),
            ))
        }
        (false, _) => &mut out.lse,
    };
    let mut a = Args::new(gpu);
    a.write(s)
        .write_opt(g_lowp)
        .i64(c.rows as i64)
        .i64(c.cols as i64)
        .i64(c.cols as i64)
        .read_opt(pos_s)
        .read_opt(targets)
        .i32(kind)
        .f32(c.alpha)
        .read_at(&out.weights, c.offset)?
        .write_at(&mut out.losses, c.offset)?
        .write(lse)
        .write_opt(dpos)
        .write_opt(out.dtau.as_mut())
        .f32(c.alpha)
        .i32(i32::from(c.write_grad));
    // SAFETY: unfused_ce_rows_<dtype>(float* S, T* G_lowp, int64_t rows, int64_t cols, int64_t ld,
    // const float* pos_s, const int64_t* targets, int pos_kind, float alpha,
    // const float* weights, float* loss_out, float* lse_out, float* dpos_out, float* dtau_acc,
    // float inv_tau, int write_grad). S holds rows×cols f32, G_lowp rows×cols T (or null), weights
    // and the losses rows f32 from `offset`, lse and dpos rows f32; pos_s (POS_EXTRA) rows f32,
    // targets (POS_TARGETS) rows i64 in [0, cols). One block of CE_THREADS per row.
    unsafe { launch(gpu, K, MODULE, &format!("{K}_{}", T::DTYPE.name()), cfg, a) }
}

/// `out_i = beta·out_i + coef_i · x_i` over rows×d.
#[allow(clippy::too_many_arguments)]
fn row_axpy<T: DeviceElement>(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    x: &CudaSlice<T>,
    coef: &CudaSlice<f32>,
    beta: f32,
    rows: usize,
    d: usize,
) -> Result<()> {
    const K: &str = "unfused_row_axpy";
    if rows * d == 0 {
        return Ok(());
    }
    let mut a = Args::new(gpu);
    a.write(out)
        .read(x)
        .read(coef)
        .f32(beta)
        .i64(rows as i64)
        .i32(d as i32);
    // SAFETY: unfused_row_axpy_<dtype>(float* out, const T* x, const float* coef, float beta,
    // int64_t rows, int cols); out and x hold rows×d, coef rows; grid-stride.
    unsafe {
        launch(
            gpu,
            K,
            MODULE,
            &format!("{K}_{}", T::DTYPE.name()),
            grid_stride(gpu, rows * d),
            a,
        )
    }
}

/// `out_i = x_i · y_i` (f32 accumulation) over rows of length d.
fn pos_dot<T: DeviceElement>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    y: &CudaSlice<T>,
    out: &mut CudaSlice<f32>,
    rows: usize,
    d: usize,
) -> Result<()> {
    const K: &str = "unfused_pos_dot";
    let cfg = LaunchConfig {
        grid_dim: (launch::grid_dim(K, rows, 8)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = Args::new(gpu);
    a.read(x).read(y).write(out).i64(rows as i64).i32(d as i32);
    // SAFETY: unfused_pos_dot_<dtype>(const T* x, const T* y, float* out, int64_t rows,
    // int cols); x and y hold rows×d, out rows; one warp per row.
    unsafe { launch(gpu, K, MODULE, &format!("{K}_{}", T::DTYPE.name()), cfg, a) }
}

/// Checks what the unfused baseline supports, returning `1/τ` and whether τ is learnable.
fn supported(spec: &LossSpec, opts: &DeviceOptions) -> Result<(f64, bool)> {
    if !matches!(opts.path, KernelPath::Unfused | KernelPath::Auto) {
        return Err(Error::Unsupported(format!(
            "the unfused baseline runs for KernelPath::Unfused (or Auto), not {:?}",
            opts.path
        )));
    }
    if spec.variant() != Variant::Standard {
        return Err(Error::Unsupported(format!(
            "the unfused baseline computes the standard variant only (got {:?})",
            spec.variant()
        )));
    }
    if spec.normalize() {
        return Err(Error::Unsupported(
            "the unfused baseline takes normalised inputs (normalize = false)".into(),
        ));
    }
    match spec.temperature() {
        Temperature::Fixed(t) => Ok((1.0 / t, false)),
        Temperature::Learnable(t) => Ok((1.0 / t, true)),
        other => Err(Error::Unsupported(format!(
            "the unfused baseline takes a fixed or learnable temperature (got {other:?})"
        ))),
    }
}

/// Uninitialised O(N·K) scratch, as `torch.empty` (zero-filling gigabytes would charge the
/// baseline for work users do not do). Every element is written before it is read: the logit
/// GEMMs (beta = 0) cover all `rows × cols` cells, and the cross-entropy kernel writes every cell
/// of the low-precision copy.
fn scratch<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: see above; the buffer is never read before being fully written.
    Ok(unsafe { gpu.stream().alloc::<T>(n.max(1)) }?)
}

fn f32_slice(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    Ok(gpu.stream().alloc_zeros::<f32>(n.max(1))?)
}

impl Unfused {
    /// Creates the cuBLAS handle on `gpu`'s stream (an error, never a panic, without cuBLAS).
    pub fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Self {
            blas: cublas_handle(gpu)?,
        })
    }

    /// Evaluates `spec` the unfused way; same inputs and outputs as
    /// [`crate::cuda::evaluate_device`].
    pub fn evaluate<T: DeviceElement>(
        &self,
        gpu: &Gpu,
        spec: &LossSpec,
        inputs: &DeviceInputs<'_, T>,
        upstream: &Upstream,
        opts: &DeviceOptions,
    ) -> Result<DeviceOutput<T>> {
        let (alpha, learnable) = supported(spec, opts)?;
        let shape = device_shape(spec, inputs)?;
        let grads_on = !opts.forward_only;
        check_fits::<T>(gpu, spec.mode(), &shape, grads_on)?;
        let run = Run {
            ctx: Ctx {
                gpu,
                handle: *self.blas.handle(),
                dtype: cuda_type(T::DTYPE)?,
                compute: if T::DTYPE == DType::F32 && opts.tf32 {
                    cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
                } else {
                    cublasComputeType_t::CUBLAS_COMPUTE_32F
                },
            },
            spec,
            opts,
            anchors: shape.anchors,
            keys: shape.keys,
            d: shape.dim,
            alpha: alpha as f32,
            grads_on,
        };
        let mut out = Outputs::new(gpu, spec, upstream, shape.anchors, learnable && grads_on)?;
        let grads = match *inputs {
            DeviceInputs::Queue {
                query,
                positive,
                queue: q,
            } => queue(&run, query, positive, q, &mut out)?,
            DeviceInputs::InBatch { embeddings } => inbatch(&run, embeddings, &mut out)?,
            DeviceInputs::Cross {
                query,
                key,
                targets,
            } => cross(&run, query, key, targets, &mut out)?,
            DeviceInputs::Symmetric { query, key } => symmetric(&run, query, key, &mut out)?,
        };
        let loss = reduce_losses(gpu, spec, out.losses, out.count)?;
        Ok(DeviceOutput {
            loss,
            lse: out.lse,
            lse_cols: out.lse_cols,
            grads,
            grad_temperature: out.dtau,
        })
    }
}

/// Checks that the O(N·K) scratch fits in free device memory, with a clear error when it does not
/// (the fused kernels need O(N + K)).
fn check_fits<T: DeviceElement>(gpu: &Gpu, mode: Mode, shape: &Shape, grads: bool) -> Result<()> {
    let (anchors, keys) = (shape.anchors, shape.keys);
    let need = scratch_bytes(mode, anchors, keys, T::DTYPE, grads);
    let (free, total) = gpu.context().mem_get_info()?;
    if need + MARGIN_BYTES > free as u64 {
        return Err(Error::Unsupported(format!(
            "unfused baseline: the {anchors}×{keys} f32 logit matrix{} and its gradient need \
             {:.1} GB of device memory and {:.1} GB of {:.1} GB is free: does not fit (the fused \
             kernels need O(N + K) scratch)",
            if mode == Mode::Symmetric {
                " (and its transpose)"
            } else {
                ""
            },
            need as f64 / 1e9,
            free as f64 / 1e9,
            total as f64 / 1e9
        )));
    }
    Ok(())
}

/// What one evaluation's modes share: the cuBLAS context, the spec and options, the problem's
/// sizes (anchors × keys logits of dimension d) and `1/τ`.
struct Run<'a> {
    ctx: Ctx<'a>,
    spec: &'a LossSpec,
    opts: &'a DeviceOptions,
    anchors: usize,
    keys: usize,
    d: usize,
    alpha: f32,
    grads_on: bool,
}

/// One logit matrix (anchors × keys, f32) and, for f16/bf16 with gradients, the copy of its
/// gradient in the input dtype the backward GEMMs read.
struct Logits<T: DeviceElement> {
    s: CudaSlice<f32>,
    lowp: Option<CudaSlice<T>>,
}

impl<T: DeviceElement> Logits<T> {
    fn new(run: &Run<'_>) -> Result<Self> {
        let cells = run.anchors * run.keys;
        let lowp = run.grads_on && T::DTYPE != DType::F32;
        Ok(Logits {
            s: scratch::<f32>(run.ctx.gpu, cells)?,
            lowp: lowp.then(|| scratch::<T>(run.ctx.gpu, cells)).transpose()?,
        })
    }

    /// The softmax cross-entropy over these logits.
    fn ce(
        &mut self,
        run: &Run<'_>,
        positive: Positive<'_>,
        offset: usize,
        columns: bool,
        out: &mut Outputs,
        dpos: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let c = Ce {
            rows: run.anchors,
            cols: run.keys,
            positive,
            alpha: run.alpha,
            offset,
            write_grad: run.grads_on,
            columns,
        };
        ce_rows::<T>(run.ctx.gpu, &c, &mut self.s, self.lowp.as_mut(), out, dpos)
    }

    /// The gradient operand of the backward GEMMs: the low-precision copy, or S itself.
    fn grad(&self) -> GradOperand<'_, T> {
        match self.lowp.as_ref() {
            Some(l) => GradOperand::Low(l),
            None => GradOperand::F32(&self.s),
        }
    }
}

impl Run<'_> {
    fn new_grad(&self, rows: usize) -> Result<DeviceMatrix<f32>> {
        DeviceMatrix::<f32>::zeros(self.ctx.gpu, rows, self.d)
    }
    fn cast<T: DeviceElement>(&self, g: DeviceMatrix<f32>) -> Result<DeviceGrad<T>> {
        cast_grad(self.ctx.gpu, g, self.opts.grad_dtype)
    }
}

type Grads<T> = Vec<(&'static str, DeviceGrad<T>)>;

/// Queue mode: `s+ = q·p` per row, `S = Q·Mᵀ` over the ring's segments, the cross-entropy with
/// the positive outside the row, `dq = dS·M + dpos·p`, `dp = dpos·q` (and `dM = dSᵀ·Q`).
fn queue<T: DeviceElement>(
    run: &Run<'_>,
    query: &DeviceMatrix<T>,
    positive: &DeviceMatrix<T>,
    q: QueueView<'_, T>,
    out: &mut Outputs,
) -> Result<Grads<T>> {
    let (gpu, n, d, ld) = (run.ctx.gpu, run.anchors, run.d, run.keys);
    let segs = queue_segments(&q)?;
    let (qs, ps, keys) = (query.slice(), positive.slice(), q.keys.slice());
    let mut pos_s = f32_slice(gpu, n)?;
    let mut dpos = f32_slice(gpu, n)?;
    pos_dot::<T>(gpu, qs, ps, &mut pos_s, n, d)?;
    let mut l = Logits::<T>::new(run)?;
    run.ctx.logits(qs, n, keys, &segs, d, &mut l.s, ld)?;
    l.ce(run, Positive::Extra(&pos_s), 0, false, out, Some(&mut dpos))?;
    if !run.grads_on {
        return Ok(Vec::new());
    }
    let (mut dq, mut dp) = (run.new_grad(n)?, run.new_grad(n)?);
    let g = l.grad();
    run.ctx
        .grad_anchor(g, n, ld, keys, &segs, d, dq.slice_mut(), 0.0)?;
    // dq_i += dpos_i p_i (beta 1 keeps the GEMM's result; zeros when K = 0).
    row_axpy::<T>(gpu, dq.slice_mut(), ps, &dpos, 1.0, n, d)?;
    row_axpy::<T>(gpu, dp.slice_mut(), qs, &dpos, 0.0, n, d)?;
    let mut grads = vec![("query", run.cast(dq)?), ("positive", run.cast(dp)?)];
    if run.spec.grad_queue() {
        let mut dm = run.new_grad(q.len)?;
        let cols: Vec<(usize, usize)> = segs.iter().map(|s| (s.col, s.rows)).collect();
        run.ctx
            .grad_key(g, n, ld, &cols, qs, d, dm.slice_mut(), 0.0)?;
        grads.push(("queue", run.cast(dm)?));
    }
    Ok(grads)
}

/// Inbatch: `S = E·Eᵀ`, the cross-entropy with the positive half a batch away and the diagonal
/// masked, `dE = dS·E + dSᵀ·E`.
fn inbatch<T: DeviceElement>(
    run: &Run<'_>,
    embeddings: &DeviceMatrix<T>,
    out: &mut Outputs,
) -> Result<Grads<T>> {
    let (n, d, ld) = (run.anchors, run.d, run.keys);
    let e = embeddings.slice();
    let all = [Segment {
        start: 0,
        rows: n,
        col: 0,
    }];
    let mut l = Logits::<T>::new(run)?;
    run.ctx.logits(e, n, e, &all, d, &mut l.s, ld)?;
    l.ce(run, Positive::InBatch, 0, false, out, None)?;
    if !run.grads_on {
        return Ok(Vec::new());
    }
    let mut de = run.new_grad(n)?;
    let g = l.grad();
    run.ctx
        .grad_anchor(g, n, ld, e, &all, d, de.slice_mut(), 0.0)?;
    run.ctx
        .grad_key(g, n, ld, &[(0, n)], e, d, de.slice_mut(), 1.0)?;
    Ok(vec![("embeddings", run.cast(de)?)])
}

/// Cross: `S = A·Bᵀ`, the cross-entropy with targets (or the identity), `dA = dS·B`,
/// `dB = dSᵀ·A`.
fn cross<T: DeviceElement>(
    run: &Run<'_>,
    query: &DeviceMatrix<T>,
    key: &DeviceMatrix<T>,
    targets: Option<&CudaSlice<i64>>,
    out: &mut Outputs,
) -> Result<Grads<T>> {
    let (n, m, d, ld) = (run.anchors, run.keys, run.d, run.keys);
    let (a, b) = (query.slice(), key.slice());
    let all = [Segment {
        start: 0,
        rows: m,
        col: 0,
    }];
    let mut l = Logits::<T>::new(run)?;
    run.ctx.logits(a, n, b, &all, d, &mut l.s, ld)?;
    let positive = match targets {
        Some(t) => Positive::Targets(t),
        None => Positive::Identity,
    };
    l.ce(run, positive, 0, false, out, None)?;
    if !run.grads_on {
        return Ok(Vec::new());
    }
    let (mut da, mut db) = (run.new_grad(n)?, run.new_grad(m)?);
    let g = l.grad();
    run.ctx
        .grad_anchor(g, n, ld, b, &all, d, da.slice_mut(), 0.0)?;
    run.ctx
        .grad_key(g, n, ld, &[(0, m)], a, d, db.slice_mut(), 0.0)?;
    Ok(vec![("query", run.cast(da)?), ("key", run.cast(db)?)])
}

/// Symmetric: `S = A·Bᵀ` and, as users get the column logits, a second matrix `Sᵀ = B·Aᵀ`; the
/// row and column cross-entropies; `dA = G_row·B + G_colᵀ·B`, `dB = G_col·A + G_rowᵀ·A`.
fn symmetric<T: DeviceElement>(
    run: &Run<'_>,
    query: &DeviceMatrix<T>,
    key: &DeviceMatrix<T>,
    out: &mut Outputs,
) -> Result<Grads<T>> {
    let (n, d, ld) = (run.anchors, run.d, run.keys);
    let (a, b) = (query.slice(), key.slice());
    let all = [Segment {
        start: 0,
        rows: n,
        col: 0,
    }];
    let mut rows = Logits::<T>::new(run)?;
    let mut cols = Logits::<T>::new(run)?;
    run.ctx.logits(a, n, b, &all, d, &mut rows.s, ld)?;
    run.ctx.logits(b, n, a, &all, d, &mut cols.s, ld)?;
    rows.ce(run, Positive::Identity, 0, false, out, None)?;
    cols.ce(run, Positive::Identity, n, true, out, None)?;
    if !run.grads_on {
        return Ok(Vec::new());
    }
    let (mut da, mut db) = (run.new_grad(n)?, run.new_grad(n)?);
    let (g, gt) = (rows.grad(), cols.grad());
    let whole = [(0, n)];
    run.ctx
        .grad_anchor(g, n, ld, b, &all, d, da.slice_mut(), 0.0)?;
    run.ctx
        .grad_key(gt, n, ld, &whole, b, d, da.slice_mut(), 1.0)?;
    run.ctx
        .grad_anchor(gt, n, ld, a, &all, d, db.slice_mut(), 0.0)?;
    run.ctx
        .grad_key(g, n, ld, &whole, a, d, db.slice_mut(), 1.0)?;
    Ok(vec![("query", run.cast(da)?), ("key", run.cast(db)?)])
}
/// Evaluates `spec` with the unfused baseline (cuBLAS GEMM → f32 logits → softmax cross-entropy
/// → cuBLAS GEMMs), with the same inputs and outputs as [`crate::cuda::evaluate_device`].
///
/// Creates a cuBLAS handle per call; to time it, create an [`Unfused`] once instead.
pub fn evaluate<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
) -> Result<DeviceOutput<T>> {
    Unfused::new(gpu)?.evaluate(gpu, spec, inputs, upstream, opts)
}
