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

use std::ffi::c_void;

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cudaDataType,
};
use cudarc::cublas::{result as blas, CudaBlas};
use cudarc::driver::{CudaSlice, LaunchConfig};

use super::device::Gpu;
use super::fused::{
    DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradDType, KernelPath, QueueView,
};
use super::kernels_v1::device_shape;
use super::launch::{self, launch, Args};
use super::matrix::{DeviceElement, DeviceMatrix};
use crate::error::{Error, Result};
use crate::loss::Upstream;
use crate::spec::{LossSpec, Mode, Reduction, Temperature, Variant};
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

/// The cuBLAS element type of a storage dtype.
pub(crate) fn cuda_type(d: DType) -> Result<cudaDataType> {
    Ok(match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::F16 => cudaDataType::CUDA_R_16F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        DType::F64 => {
            return Err(Error::Unsupported(
                "the CUDA backend takes f32, f16 or bf16 (not f64)".into(),
            ))
        }
    })
}

/// Whether the cuBLAS library can be loaded (never panics).
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen libcublas by its usual names.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// A cuBLAS handle on `gpu`'s stream, or a clear error when cuBLAS is missing.
pub fn cublas_handle(gpu: &Gpu) -> Result<CudaBlas> {
    if !cublas_present() {
        return Err(Error::Unsupported(
            "the unfused baseline needs cuBLAS, and libcublas could not be loaded on this machine \
             (install the CUDA toolkit's cuBLAS, or put it on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    gpu.context().bind_to_thread()?;
    Ok(CudaBlas::new(gpu.stream().clone())?)
}

/// One row-major GEMM call in cuBLAS's column-major terms (see the callers for the mapping): the
/// operands' device addresses come from an [`Args`] that guards them for the call.
pub(crate) struct GemmCall {
    pub ta: cublasOperation_t,
    pub tb: cublasOperation_t,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub a_type: cudaDataType,
    pub lda: usize,
    pub b: u64,
    pub b_type: cudaDataType,
    pub ldb: usize,
    pub beta: f32,
    pub c: u64,
    pub c_type: cudaDataType,
    pub ldc: usize,
    pub compute: cublasComputeType_t,
}

fn c_int(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Launch {
        kernel: "cublas gemm",
        reason: format!("{what} = {v} does not fit in a 32-bit int"),
    })
}

impl GemmCall {
    /// Runs the call on `handle` (alpha = 1), on the handle's stream (the `Gpu`'s).
    ///
    /// # Safety
    /// The addresses must come from an [`Args`] of the handle's `Gpu` that is still alive (its
    /// guards order the call against other streams), over buffers of at least the sizes the
    /// call's shapes and leading dimensions imply.
    pub(crate) unsafe fn run(&self, handle: cublasHandle_t) -> Result<()> {
        if self.m == 0 || self.n == 0 {
            return Ok(());
        }
        let alpha = 1.0f32;
        let beta = self.beta;
        blas::gemm_ex(
            handle,
            self.ta,
            self.tb,
            c_int("m", self.m)?,
            c_int("n", self.n)?,
            c_int("k", self.k)?,
            &alpha as *const f32 as *const c_void,
            self.a as *const c_void,
            self.a_type,
            c_int("lda", self.lda.max(1))?,
            self.b as *const c_void,
            self.b_type,
            c_int("ldb", self.ldb.max(1))?,
            &beta as *const f32 as *const c_void,
            self.c as *mut c_void,
            self.c_type,
            c_int("ldc", self.ldc.max(1))?,
            self.compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
        Ok(())
    }
}

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
    fn ptr(self, args: &mut Args<'a>, offset: usize) -> Result<(u64, cudaDataType)> {
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

/// One softmax cross-entropy launch over a `rows × cols` logit matrix `s`.
struct CeLaunch<'a, T: DeviceElement> {
    rows: usize,
    cols: usize,
    positive: Positive<'a>,
    alpha: f32,
    /// The weights and per-anchor losses of this matrix's anchors start at this element.
    offset: usize,
    write_grad: bool,
    _dtype: std::marker::PhantomData<T>,
}

impl<'a, T: DeviceElement> CeLaunch<'a, T> {
    fn new(
        rows: usize,
        cols: usize,
        positive: Positive<'a>,
        alpha: f32,
        offset: usize,
        write_grad: bool,
    ) -> Self {
        Self {
            rows,
            cols,
            positive,
            alpha,
            offset,
            write_grad,
            _dtype: std::marker::PhantomData,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn ce_rows<T: DeviceElement>(
    gpu: &Gpu,
    c: &CeLaunch<'_, T>,
    s: &mut CudaSlice<f32>,
    g_lowp: Option<&mut CudaSlice<T>>,
    weights: &CudaSlice<f32>,
    loss: &mut CudaSlice<f32>,
    lse: &mut CudaSlice<f32>,
    dpos: Option<&mut CudaSlice<f32>>,
    dtau: Option<&mut CudaSlice<f32>>,
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
        .read_at(weights, c.offset)?
        .write_at(loss, c.offset)?
        .write(lse)
        .write_opt(dpos)
        .write_opt(dtau)
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

fn elementwise_cfg(gpu: &Gpu, n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(256)
        .clamp(1, gpu.properties().sm_count.max(1) as usize * 16);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
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
            elementwise_cfg(gpu, rows * d),
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

/// `out[0] = c · Σ x[..n]` in a fixed order.
pub(crate) fn sum_scaled(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    c: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    const K: &str = "unfused_sum_scaled";
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (CE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = Args::new(gpu);
    a.read(x).i64(n as i64).f32(c).write(out);
    // SAFETY: unfused_sum_scaled(const float* x, int64_t n, float c, float* out); x holds n
    // floats, out one; one block of CE_THREADS (its shared array).
    unsafe { launch(gpu, K, MODULE, K, cfg, a) }
}

/// The loss `spec` asks for from `count` per-anchor losses: `None` keeps them (the caller's
/// buffer), `Mean`/`Sum` sum them scaled by the reduction's weight (`Upstream::One`: 1/count for
/// mean, ½ for symmetric) into one f32.
pub(crate) fn reduce_losses(
    gpu: &Gpu,
    spec: &LossSpec,
    per_anchor: CudaSlice<f32>,
    count: usize,
) -> Result<CudaSlice<f32>> {
    if spec.reduction() == Reduction::None {
        return Ok(per_anchor);
    }
    let c = Upstream::One
        .weights(spec, count)?
        .first()
        .copied()
        .unwrap_or(0.0);
    let mut out = gpu.stream().alloc_zeros::<f32>(1)?;
    sum_scaled(gpu, &per_anchor, count, c as f32, &mut out)?;
    Ok(out)
}

/// Converts an f32 gradient to the input dtype.
pub(crate) fn cast_grad<T: DeviceElement>(
    gpu: &Gpu,
    g: DeviceMatrix<f32>,
    want: GradDType,
) -> Result<DeviceGrad<T>> {
    if want == GradDType::F32 || T::DTYPE == DType::F32 {
        return Ok(DeviceGrad::F32(g));
    }
    const K: &str = "unfused_cast";
    let n = g.rows() * g.cols();
    let mut out = DeviceMatrix::<T>::zeros(gpu, g.rows(), g.cols())?;
    if n > 0 {
        let mut a = Args::new(gpu);
        a.read(g.slice()).write(out.slice_mut()).i64(n as i64);
        // SAFETY: unfused_cast_<dtype>(const float* x, T* y, int64_t n); both hold n elements;
        // grid-stride.
        unsafe {
            launch(
                gpu,
                K,
                MODULE,
                &format!("{K}_{}", T::DTYPE.name()),
                elementwise_cfg(gpu, n),
                a,
            )
        }?;
    }
    Ok(DeviceGrad::Input(out))
}

/// Checks what the unfused baseline supports, returning `1/τ` and whether τ is learnable.
fn supported(spec: &LossSpec, opts: &DeviceOptions) -> Result<(f64, bool)> {
    if !matches!(opts.path, KernelPath::Unfused | KernelPath::Auto) {
        return Err(Error::Unsupported(format!(
            "evaluate_device_unfused runs the unfused path, not {:?}",
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
    /// [`super::fused::evaluate_device`].
    pub fn evaluate<T: DeviceElement>(
        &self,
        gpu: &Gpu,
        spec: &LossSpec,
        inputs: &DeviceInputs<'_, T>,
        upstream: &Upstream,
        opts: &DeviceOptions,
    ) -> Result<DeviceOutput<T>> {
        let (alpha, learnable) = supported(spec, opts)?;
        let dtype = cuda_type(T::DTYPE)?;
        let compute = if T::DTYPE == DType::F32 && opts.tf32 {
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let ctx = Ctx {
            gpu,
            handle: *self.blas.handle(),
            dtype,
            compute,
        };
        let grads_on = !opts.forward_only;
        let lowp = grads_on && T::DTYPE != DType::F32;

        // Shapes (the crate's one check) and the key rows.
        let shape = device_shape(spec, inputs)?;
        let (mode, anchors, d, keys_rows) = (spec.mode(), shape.anchors, shape.dim, shape.keys);

        // Does the O(N·K) scratch fit?
        let need = scratch_bytes(mode, anchors, keys_rows, T::DTYPE, grads_on);
        let (free, total) = gpu.context().mem_get_info()?;
        if need + MARGIN_BYTES > free as u64 {
            return Err(Error::Unsupported(format!(
                "unfused baseline: the {anchors}×{keys_rows} f32 logit matrix{} and its gradient \
                 need {:.1} GB of device memory and {:.1} GB of {:.1} GB is free: does not fit \
                 (the fused kernels need O(N + K) scratch)",
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

        let losses = spec_losses(mode, anchors);
        let w: Vec<f32> = upstream
            .weights(spec, losses)?
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let weights = gpu.stream().clone_htod(&w)?;
        let mut loss_each = f32_slice(gpu, losses)?;
        let mut lse = f32_slice(gpu, anchors)?;
        let mut lse_cols = if mode == Mode::Symmetric {
            Some(f32_slice(gpu, anchors)?)
        } else {
            None
        };
        let mut dtau = if learnable && grads_on {
            Some(f32_slice(gpu, 1)?)
        } else {
            None
        };
        let mut grads: Vec<(&'static str, DeviceGrad<T>)> = Vec::new();

        let ld = keys_rows;
        let cells = anchors * ld;
        let mut s_mat = scratch::<f32>(gpu, cells)?;
        let mut g_lowp = if lowp {
            Some(scratch::<T>(gpu, cells)?)
        } else {
            None
        };
        let ce = |positive, offset| {
            CeLaunch::<T>::new(anchors, ld, positive, alpha as f32, offset, grads_on)
        };
        let new_grad = |rows: usize| DeviceMatrix::<f32>::zeros(gpu, rows, d);
        // The gradient operand of the backward GEMMs: the low-precision copy, or S itself.
        macro_rules! g_op {
            ($lowp:expr, $s:expr) => {
                match $lowp.as_ref() {
                    Some(l) => GradOperand::Low(l),
                    None => GradOperand::F32($s),
                }
            };
        }

        match *inputs {
            DeviceInputs::Queue {
                query,
                positive,
                queue,
            } => {
                let segs = queue_segments(&queue)?;
                let (q, p) = (query.slice(), positive.slice());
                let mut pos_s = f32_slice(gpu, anchors)?;
                let mut dpos = f32_slice(gpu, anchors)?;
                pos_dot::<T>(gpu, q, p, &mut pos_s, anchors, d)?;
                ctx.logits(q, anchors, queue.keys.slice(), &segs, d, &mut s_mat, ld)?;
                ce_rows(
                    gpu,
                    &ce(Positive::Extra(&pos_s), 0),
                    &mut s_mat,
                    g_lowp.as_mut(),
                    &weights,
                    &mut loss_each,
                    &mut lse,
                    Some(&mut dpos),
                    dtau.as_mut(),
                )?;
                if grads_on {
                    let mut dq = new_grad(anchors)?;
                    let mut dp = new_grad(anchors)?;
                    let g = g_op!(g_lowp, &s_mat);
                    let keys = queue.keys.slice();
                    ctx.grad_anchor(g, anchors, ld, keys, &segs, d, dq.slice_mut(), 0.0)?;
                    // dq_i += dpos_i p_i (beta 1 keeps the GEMM's result; zeros when K = 0).
                    row_axpy::<T>(gpu, dq.slice_mut(), p, &dpos, 1.0, anchors, d)?;
                    row_axpy::<T>(gpu, dp.slice_mut(), q, &dpos, 0.0, anchors, d)?;
                    grads.push(("query", cast_grad(gpu, dq, opts.grad_dtype)?));
                    grads.push(("positive", cast_grad(gpu, dp, opts.grad_dtype)?));
                    if spec.grad_queue() {
                        let mut dm = new_grad(queue.len)?;
                        let cols: Vec<(usize, usize)> =
                            segs.iter().map(|s| (s.col, s.rows)).collect();
                        ctx.grad_key(g, anchors, ld, &cols, q, d, dm.slice_mut(), 0.0)?;
                        grads.push(("queue", cast_grad(gpu, dm, opts.grad_dtype)?));
                    }
                }
            }
            DeviceInputs::InBatch { embeddings } => {
                let e = embeddings.slice();
                let segs = [Segment {
                    start: 0,
                    rows: anchors,
                    col: 0,
                }];
                ctx.logits(e, anchors, e, &segs, d, &mut s_mat, ld)?;
                ce_rows(
                    gpu,
                    &ce(Positive::InBatch, 0),
                    &mut s_mat,
                    g_lowp.as_mut(),
                    &weights,
                    &mut loss_each,
                    &mut lse,
                    None,
                    dtau.as_mut(),
                )?;
                if grads_on {
                    let mut de = new_grad(anchors)?;
                    let g = g_op!(g_lowp, &s_mat);
                    ctx.grad_anchor(g, anchors, ld, e, &segs, d, de.slice_mut(), 0.0)?;
                    let all = [(0, anchors)];
                    ctx.grad_key(g, anchors, ld, &all, e, d, de.slice_mut(), 1.0)?;
                    grads.push(("embeddings", cast_grad(gpu, de, opts.grad_dtype)?));
                }
            }
            DeviceInputs::Cross {
                query,
                key,
                targets,
            } => {
                let (a, b) = (query.slice(), key.slice());
                let segs = [Segment {
                    start: 0,
                    rows: keys_rows,
                    col: 0,
                }];
                ctx.logits(a, anchors, b, &segs, d, &mut s_mat, ld)?;
                let positive = match targets {
                    Some(t) => Positive::Targets(t),
                    None => Positive::Identity,
                };
                ce_rows(
                    gpu,
                    &ce(positive, 0),
                    &mut s_mat,
                    g_lowp.as_mut(),
                    &weights,
                    &mut loss_each,
                    &mut lse,
                    None,
                    dtau.as_mut(),
                )?;
                if grads_on {
                    let mut da = new_grad(anchors)?;
                    let mut db = new_grad(keys_rows)?;
                    let g = g_op!(g_lowp, &s_mat);
                    ctx.grad_anchor(g, anchors, ld, b, &segs, d, da.slice_mut(), 0.0)?;
                    let all = [(0, keys_rows)];
                    ctx.grad_key(g, anchors, ld, &all, a, d, db.slice_mut(), 0.0)?;
                    grads.push(("query", cast_grad(gpu, da, opts.grad_dtype)?));
                    grads.push(("key", cast_grad(gpu, db, opts.grad_dtype)?));
                }
            }
            DeviceInputs::Symmetric { query, key } => {
                let (a, b) = (query.slice(), key.slice());
                // The column logits as users get them: a second matrix Sᵀ = B·Aᵀ.
                let mut st_mat = scratch::<f32>(gpu, cells)?;
                let mut gt_lowp = if lowp {
                    Some(scratch::<T>(gpu, cells)?)
                } else {
                    None
                };
                let all_rows = [Segment {
                    start: 0,
                    rows: anchors,
                    col: 0,
                }];
                ctx.logits(a, anchors, b, &all_rows, d, &mut s_mat, ld)?;
                ctx.logits(b, anchors, a, &all_rows, d, &mut st_mat, ld)?;
                ce_rows(
                    gpu,
                    &ce(Positive::Identity, 0),
                    &mut s_mat,
                    g_lowp.as_mut(),
                    &weights,
                    &mut loss_each,
                    &mut lse,
                    None,
                    dtau.as_mut(),
                )?;
                let lse_c = lse_cols.as_mut().expect("symmetric mode has column LSEs");
                ce_rows(
                    gpu,
                    &ce(Positive::Identity, anchors),
                    &mut st_mat,
                    gt_lowp.as_mut(),
                    &weights,
                    &mut loss_each,
                    lse_c,
                    None,
                    dtau.as_mut(),
                )?;
                if grads_on {
                    let mut da = new_grad(anchors)?;
                    let mut db = new_grad(anchors)?;
                    let (g, gt) = (g_op!(g_lowp, &s_mat), g_op!(gt_lowp, &st_mat));
                    let all = [(0, anchors)];
                    // da = G_row·B + G_colᵀ·B,  db = G_col·A + G_rowᵀ·A.
                    ctx.grad_anchor(g, anchors, ld, b, &all_rows, d, da.slice_mut(), 0.0)?;
                    ctx.grad_key(gt, anchors, ld, &all, b, d, da.slice_mut(), 1.0)?;
                    ctx.grad_anchor(gt, anchors, ld, a, &all_rows, d, db.slice_mut(), 0.0)?;
                    ctx.grad_key(g, anchors, ld, &all, a, d, db.slice_mut(), 1.0)?;
                    grads.push(("query", cast_grad(gpu, da, opts.grad_dtype)?));
                    grads.push(("key", cast_grad(gpu, db, opts.grad_dtype)?));
                }
                // Freed stream-ordered after the queued work.
                drop((st_mat, gt_lowp));
            }
        }
        drop((s_mat, g_lowp));

        let loss = reduce_losses(gpu, spec, loss_each, losses)?;
        Ok(DeviceOutput {
            loss,
            lse,
            lse_cols,
            grads,
            grad_temperature: dtau,
        })
    }
}

/// Per-anchor loss count: N, 2N (inbatch: the rows; symmetric: rows then columns).
fn spec_losses(mode: Mode, anchors: usize) -> usize {
    if mode == Mode::Symmetric {
        2 * anchors
    } else {
        anchors
    }
}

/// Evaluates `spec` with the unfused baseline (cuBLAS GEMM → f32 logits → softmax cross-entropy
/// → cuBLAS GEMMs), with the same inputs and outputs as [`super::fused::evaluate_device`].
///
/// Creates a cuBLAS handle per call; to time it, create an [`Unfused`] once instead.
pub fn evaluate_device_unfused<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
) -> Result<DeviceOutput<T>> {
    Unfused::new(gpu)?.evaluate(gpu, spec, inputs, upstream, opts)
}
