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
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::device::Gpu;
use super::fused::{
    DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradDType, KernelPath, QueueView,
};
use super::kernels_v1::device_shape;
use super::launch;
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

/// The raw device address of a buffer (for cuBLAS and pointer-offset launches).
///
/// Every op of this module runs on the one stream of the [`Gpu`], in order, so the event the
/// guard records is not needed for ordering; the buffer must outlive the queued work, which the
/// callers ensure by holding it until they return (outputs) or until the stream is synchronised
/// by the caller (temporaries are freed stream-ordered).
pub(crate) fn addr<T>(s: &CudaSlice<T>, gpu: &Gpu) -> u64 {
    let (p, _guard) = s.device_ptr(gpu.stream());
    p
}

/// One row-major GEMM call in cuBLAS's column-major terms (see the callers for the mapping).
#[allow(clippy::too_many_arguments)]
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
    /// Runs the call on `handle` (alpha = 1).
    ///
    /// # Safety
    /// The pointers must address buffers of at least the sizes the call's shapes and leading
    /// dimensions imply, alive until the stream has run the call.
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

/// A contiguous run of key rows: `rows` rows at device address `ptr`, occupying columns
/// `col..col + rows` of the logit matrix.
#[derive(Debug, Clone, Copy)]
struct Segment {
    ptr: u64,
    rows: usize,
    col: usize,
}

fn queue_segments<T: DeviceElement>(q: &QueueView<'_, T>, gpu: &Gpu) -> Result<Vec<Segment>> {
    let cap = q.keys.rows();
    let d = q.keys.cols();
    if q.len > cap || (cap > 0 && q.start >= cap) || (cap == 0 && q.len > 0) {
        return Err(Error::shape(
            "queue",
            format!("view start {} len {} of {cap} rows", q.start, q.len),
            "start < capacity and len <= capacity",
        ));
    }
    let base = addr(q.keys.slice(), gpu);
    let es = std::mem::size_of::<T>() as u64;
    let first = q.len.min(cap - q.start.min(cap));
    let mut segs = vec![Segment {
        ptr: base + (q.start * d) as u64 * es,
        rows: first,
        col: 0,
    }];
    if first < q.len {
        segs.push(Segment {
            ptr: base,
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

struct Ctx {
    handle: cublasHandle_t,
    dtype: cudaDataType,
    compute: cublasComputeType_t,
}

impl Ctx {
    /// `S[r×ld] (cols seg.col..) = X[r×d] · Yseg[rows×d]ᵀ` for each segment: in column-major terms
    /// `Sᵀ = Yseg · Xᵀ` (op(A) = T on the row-major Y buffer, op(B) = N on X).
    fn logits(
        &self,
        x: u64,
        r: usize,
        segs: &[Segment],
        d: usize,
        s: u64,
        ld: usize,
    ) -> Result<()> {
        for seg in segs {
            let call = GemmCall {
                ta: cublasOperation_t::CUBLAS_OP_T,
                tb: cublasOperation_t::CUBLAS_OP_N,
                m: seg.rows,
                n: r,
                k: d,
                a: seg.ptr,
                a_type: self.dtype,
                lda: d,
                b: x,
                b_type: self.dtype,
                ldb: d,
                beta: 0.0,
                c: s + 4 * seg.col as u64,
                c_type: cudaDataType::CUDA_R_32F,
                ldc: ld,
                compute: self.compute,
            };
            // SAFETY: S holds r×ld f32, X r×d and each segment rows×d elements (built by the
            // caller from live buffers of those sizes).
            unsafe { call.run(self.handle) }?;
        }
        Ok(())
    }

    /// `out[r×d] (+)= G[r×ld] · Y[ld×d]` over the segments: column-major `outᵀ = Yᵀ · Gᵀ`.
    #[allow(clippy::too_many_arguments)]
    fn grad_anchor(
        &self,
        g: u64,
        g_type: cudaDataType,
        g_es: u64,
        r: usize,
        ld: usize,
        segs: &[Segment],
        d: usize,
        out: u64,
        beta: f32,
    ) -> Result<()> {
        for (i, seg) in segs.iter().enumerate() {
            let call = GemmCall {
                ta: cublasOperation_t::CUBLAS_OP_N,
                tb: cublasOperation_t::CUBLAS_OP_N,
                m: d,
                n: r,
                k: seg.rows,
                a: seg.ptr,
                a_type: self.dtype,
                lda: d,
                b: g + g_es * seg.col as u64,
                b_type: g_type,
                ldb: ld,
                beta: if i == 0 { beta } else { 1.0 },
                c: out,
                c_type: cudaDataType::CUDA_R_32F,
                ldc: d,
                compute: self.compute,
            };
            // SAFETY: G holds r×ld elements of g_type, out r×d f32, segments as in `logits`.
            unsafe { call.run(self.handle) }?;
        }
        Ok(())
    }

    /// `out[seg rows×d] (+)= G[:, seg cols]ᵀ · X[r×d]` for each segment (out rows in logit-column
    /// order): column-major `outᵀ = Xᵀ · G[:, seg]`.
    #[allow(clippy::too_many_arguments)]
    fn grad_key(
        &self,
        g: u64,
        g_type: cudaDataType,
        g_es: u64,
        r: usize,
        ld: usize,
        cols: &[(usize, usize)],
        x: u64,
        d: usize,
        out: u64,
        beta: f32,
    ) -> Result<()> {
        for &(col, rows) in cols {
            let call = GemmCall {
                ta: cublasOperation_t::CUBLAS_OP_N,
                tb: cublasOperation_t::CUBLAS_OP_T,
                m: d,
                n: rows,
                k: r,
                a: x,
                a_type: self.dtype,
                lda: d,
                b: g + g_es * col as u64,
                b_type: g_type,
                ldb: ld,
                beta,
                c: out + 4 * (col * d) as u64,
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

/// One softmax cross-entropy launch over a logit matrix.
struct CeLaunch {
    s: u64,
    g_lowp: u64,
    rows: usize,
    cols: usize,
    pos_s: u64,
    targets: u64,
    pos_kind: i32,
    alpha: f32,
    weights: u64,
    loss: u64,
    lse: u64,
    dpos: u64,
    dtau: u64,
    inv_tau: f32,
    write_grad: bool,
}

fn ce_rows<T: DeviceElement>(gpu: &Gpu, c: &CeLaunch) -> Result<()> {
    const K: &str = "unfused_ce_rows";
    let f = gpu.function(MODULE, &format!("unfused_ce_rows_{}", T::DTYPE.name()))?;
    let cfg = launch::checked(
        gpu,
        K,
        LaunchConfig {
            grid_dim: (launch::grid_dim(K, c.rows, 1)?, 1, 1),
            block_dim: (CE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
    )?;
    let (rows, cols, ld) = (c.rows as i64, c.cols as i64, c.cols as i64);
    let wg = i32::from(c.write_grad);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&c.s)
        .arg(&c.g_lowp)
        .arg(&rows)
        .arg(&cols)
        .arg(&ld)
        .arg(&c.pos_s)
        .arg(&c.targets)
        .arg(&c.pos_kind)
        .arg(&c.alpha)
        .arg(&c.weights)
        .arg(&c.loss)
        .arg(&c.lse)
        .arg(&c.dpos)
        .arg(&c.dtau)
        .arg(&c.inv_tau)
        .arg(&wg);
    // SAFETY: signature (float*, T*, i64, i64, i64, const float*, const i64*, int, float,
    // const float*, float*, float*, float*, float*, float, int). S holds rows×cols f32, g_lowp
    // rows×cols T (or 0 when T is f32 / no gradient), weights/loss/lse/dpos rows f32 (dpos and
    // pos_s only read in POS_EXTRA mode), targets rows i64 in [0, cols) in POS_TARGETS mode.
    unsafe { b.launch(cfg) }?;
    gpu.check_launch(K)
}

fn elementwise_cfg(gpu: &Gpu, kernel: &'static str, n: usize) -> Result<LaunchConfig> {
    let blocks = n
        .div_ceil(256)
        .clamp(1, gpu.properties().sm_count.max(1) as usize * 16);
    launch::checked(
        gpu,
        kernel,
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
    )
}

/// `out_i = beta·out_i + coef_i · x_i` over rows×d.
#[allow(clippy::too_many_arguments)]
fn row_axpy<T: DeviceElement>(
    gpu: &Gpu,
    out: u64,
    x: u64,
    coef: u64,
    beta: f32,
    rows: usize,
    d: usize,
) -> Result<()> {
    const K: &str = "unfused_row_axpy";
    if rows * d == 0 {
        return Ok(());
    }
    let f = gpu.function(MODULE, &format!("unfused_row_axpy_{}", T::DTYPE.name()))?;
    let cfg = elementwise_cfg(gpu, K, rows * d)?;
    let (r, c) = (rows as i64, d as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&out).arg(&x).arg(&coef).arg(&beta).arg(&r).arg(&c);
    // SAFETY: (float*, const T*, const float*, float, i64, int); out and x hold rows×d, coef rows.
    unsafe { b.launch(cfg) }?;
    gpu.check_launch(K)
}

fn pos_dot<T: DeviceElement>(
    gpu: &Gpu,
    x: u64,
    y: u64,
    out: u64,
    rows: usize,
    d: usize,
) -> Result<()> {
    const K: &str = "unfused_pos_dot";
    let f = gpu.function(MODULE, &format!("unfused_pos_dot_{}", T::DTYPE.name()))?;
    let cfg = launch::checked(
        gpu,
        K,
        LaunchConfig {
            grid_dim: (launch::grid_dim(K, rows, 8)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
    )?;
    let (r, c) = (rows as i64, d as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&x).arg(&y).arg(&out).arg(&r).arg(&c);
    // SAFETY: (const T*, const T*, float*, i64, int); x and y hold rows×d, out rows.
    unsafe { b.launch(cfg) }?;
    gpu.check_launch(K)
}

pub(crate) fn sum_scaled(gpu: &Gpu, x: u64, n: usize, c: f32, out: u64) -> Result<()> {
    const K: &str = "unfused_sum_scaled";
    let f = gpu.function(MODULE, K)?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (CE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let n = n as i64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&x).arg(&n).arg(&c).arg(&out);
    // SAFETY: (const float*, i64, float, float*); x holds n floats, out one.
    unsafe { b.launch(cfg) }?;
    gpu.check_launch(K)
}

/// The loss `spec` asks for from `count` per-anchor losses at the device address `per_anchor`:
/// `None` keeps them (the caller's buffer), `Mean`/`Sum` sum them scaled by the reduction's
/// weight (`Upstream::One`: 1/count for mean, ½ for symmetric) into one f32.
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
    let out = gpu.stream().alloc_zeros::<f32>(1)?;
    sum_scaled(
        gpu,
        addr(&per_anchor, gpu),
        count,
        c as f32,
        addr(&out, gpu),
    )?;
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
        let f = gpu.function(MODULE, &format!("unfused_cast_{}", T::DTYPE.name()))?;
        let cfg = elementwise_cfg(gpu, K, n)?;
        let nn = n as i64;
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(g.slice()).arg(out.slice_mut()).arg(&nn);
        // SAFETY: (const float*, T*, i64); both hold n elements.
        unsafe { b.launch(cfg) }?;
        gpu.check_launch(K)?;
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
        let compute = if T::DTYPE == DType::F32 && !opts.tf32 {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        } else if T::DTYPE == DType::F32 {
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let ctx = Ctx {
            handle: *self.blas.handle(),
            dtype,
            compute,
        };
        let grads_on = !opts.forward_only;
        let es = std::mem::size_of::<T>() as u64;
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
        let loss_each = f32_slice(gpu, losses)?;
        let lse = f32_slice(gpu, anchors)?;
        let lse_cols = if mode == Mode::Symmetric {
            Some(f32_slice(gpu, anchors)?)
        } else {
            None
        };
        let dtau = if learnable && grads_on {
            Some(f32_slice(gpu, 1)?)
        } else {
            None
        };
        let dtau_ptr = dtau.as_ref().map_or(0, |s| addr(s, gpu));
        let tau = 1.0 / alpha;
        let mut grads: Vec<(&'static str, DeviceGrad<T>)> = Vec::new();

        let ld = keys_rows;
        let cells = anchors * ld;
        let s_mat = scratch::<f32>(gpu, cells)?;
        let s_ptr = addr(&s_mat, gpu);
        let g_lowp = if lowp {
            Some(scratch::<T>(gpu, cells)?)
        } else {
            None
        };
        let g_lowp_ptr = g_lowp.as_ref().map_or(0, |s| addr(s, gpu));
        // The gradient operand of the backward GEMMs: the low-precision copy, or S itself.
        let (g_ptr, g_type, g_es) = if lowp {
            (g_lowp_ptr, dtype, es)
        } else {
            (s_ptr, cudaDataType::CUDA_R_32F, 4)
        };
        let w_ptr = addr(&weights, gpu);
        let loss_ptr = addr(&loss_each, gpu);
        let ce = |s: u64,
                  gl: u64,
                  pos_s: u64,
                  targets: u64,
                  pos_kind: i32,
                  off: usize,
                  lse_p: u64,
                  dpos: u64| {
            ce_rows::<T>(
                gpu,
                &CeLaunch {
                    s,
                    g_lowp: gl,
                    rows: anchors,
                    cols: ld,
                    pos_s,
                    targets,
                    pos_kind,
                    alpha: alpha as f32,
                    weights: w_ptr + 4 * off as u64,
                    loss: loss_ptr + 4 * off as u64,
                    lse: lse_p,
                    dpos,
                    dtau: dtau_ptr,
                    inv_tau: (1.0 / tau) as f32,
                    write_grad: grads_on,
                },
            )
        };
        let new_grad = |rows: usize| DeviceMatrix::<f32>::zeros(gpu, rows, d);

        match *inputs {
            DeviceInputs::Queue {
                query,
                positive,
                queue,
            } => {
                let segs = queue_segments(&queue, gpu)?;
                let (q, p) = (addr(query.slice(), gpu), addr(positive.slice(), gpu));
                let pos_s = f32_slice(gpu, anchors)?;
                let dpos = f32_slice(gpu, anchors)?;
                pos_dot::<T>(gpu, q, p, addr(&pos_s, gpu), anchors, d)?;
                ctx.logits(q, anchors, &segs, d, s_ptr, ld)?;
                ce(
                    s_ptr,
                    g_lowp_ptr,
                    addr(&pos_s, gpu),
                    0,
                    POS_EXTRA,
                    0,
                    addr(&lse, gpu),
                    addr(&dpos, gpu),
                )?;
                if grads_on {
                    let dq = new_grad(anchors)?;
                    let dp = new_grad(anchors)?;
                    let (dq_p, dp_p, dpos_p) = (
                        addr(dq.slice(), gpu),
                        addr(dp.slice(), gpu),
                        addr(&dpos, gpu),
                    );
                    ctx.grad_anchor(g_ptr, g_type, g_es, anchors, ld, &segs, d, dq_p, 0.0)?;
                    // dq_i += dpos_i p_i (beta 1 keeps the GEMM's result; zeros when K = 0).
                    row_axpy::<T>(gpu, dq_p, p, dpos_p, 1.0, anchors, d)?;
                    row_axpy::<T>(gpu, dp_p, q, dpos_p, 0.0, anchors, d)?;
                    grads.push(("query", cast_grad(gpu, dq, opts.grad_dtype)?));
                    grads.push(("positive", cast_grad(gpu, dp, opts.grad_dtype)?));
                    if spec.grad_queue() {
                        let dm = new_grad(queue.len)?;
                        let cols: Vec<(usize, usize)> =
                            segs.iter().map(|s| (s.col, s.rows)).collect();
                        ctx.grad_key(
                            g_ptr,
                            g_type,
                            g_es,
                            anchors,
                            ld,
                            &cols,
                            q,
                            d,
                            addr(dm.slice(), gpu),
                            0.0,
                        )?;
                        grads.push(("queue", cast_grad(gpu, dm, opts.grad_dtype)?));
                    }
                }
            }
            DeviceInputs::InBatch { embeddings } => {
                let e = addr(embeddings.slice(), gpu);
                let segs = [Segment {
                    ptr: e,
                    rows: anchors,
                    col: 0,
                }];
                ctx.logits(e, anchors, &segs, d, s_ptr, ld)?;
                ce(s_ptr, g_lowp_ptr, 0, 0, POS_INBATCH, 0, addr(&lse, gpu), 0)?;
                if grads_on {
                    let de = new_grad(anchors)?;
                    let de_p = addr(de.slice(), gpu);
                    ctx.grad_anchor(g_ptr, g_type, g_es, anchors, ld, &segs, d, de_p, 0.0)?;
                    ctx.grad_key(
                        g_ptr,
                        g_type,
                        g_es,
                        anchors,
                        ld,
                        &[(0, anchors)],
                        e,
                        d,
                        de_p,
                        1.0,
                    )?;
                    grads.push(("embeddings", cast_grad(gpu, de, opts.grad_dtype)?));
                }
            }
            DeviceInputs::Cross {
                query,
                key,
                targets,
            } => {
                let (a, b) = (addr(query.slice(), gpu), addr(key.slice(), gpu));
                let segs = [Segment {
                    ptr: b,
                    rows: keys_rows,
                    col: 0,
                }];
                ctx.logits(a, anchors, &segs, d, s_ptr, ld)?;
                let (t_ptr, kind) = match targets {
                    Some(t) => (addr(t, gpu), POS_TARGETS),
                    None => (0, POS_IDENTITY),
                };
                ce(s_ptr, g_lowp_ptr, 0, t_ptr, kind, 0, addr(&lse, gpu), 0)?;
                if grads_on {
                    let da = new_grad(anchors)?;
                    let db = new_grad(keys_rows)?;
                    ctx.grad_anchor(
                        g_ptr,
                        g_type,
                        g_es,
                        anchors,
                        ld,
                        &segs,
                        d,
                        addr(da.slice(), gpu),
                        0.0,
                    )?;
                    ctx.grad_key(
                        g_ptr,
                        g_type,
                        g_es,
                        anchors,
                        ld,
                        &[(0, keys_rows)],
                        a,
                        d,
                        addr(db.slice(), gpu),
                        0.0,
                    )?;
                    grads.push(("query", cast_grad(gpu, da, opts.grad_dtype)?));
                    grads.push(("key", cast_grad(gpu, db, opts.grad_dtype)?));
                }
            }
            DeviceInputs::Symmetric { query, key } => {
                let (a, b) = (addr(query.slice(), gpu), addr(key.slice(), gpu));
                // The column logits as users get them: a second matrix Sᵀ = B·Aᵀ.
                let st_mat = scratch::<f32>(gpu, cells)?;
                let st_ptr = addr(&st_mat, gpu);
                let gt_lowp = if lowp {
                    Some(scratch::<T>(gpu, cells)?)
                } else {
                    None
                };
                let gt_lowp_ptr = gt_lowp.as_ref().map_or(0, |s| addr(s, gpu));
                let gt_ptr = if lowp { gt_lowp_ptr } else { st_ptr };
                let seg_b = [Segment {
                    ptr: b,
                    rows: anchors,
                    col: 0,
                }];
                let seg_a = [Segment {
                    ptr: a,
                    rows: anchors,
                    col: 0,
                }];
                ctx.logits(a, anchors, &seg_b, d, s_ptr, ld)?;
                ctx.logits(b, anchors, &seg_a, d, st_ptr, ld)?;
                ce(s_ptr, g_lowp_ptr, 0, 0, POS_IDENTITY, 0, addr(&lse, gpu), 0)?;
                let lse_c = lse_cols.as_ref().map_or(0, |s| addr(s, gpu));
                ce(st_ptr, gt_lowp_ptr, 0, 0, POS_IDENTITY, anchors, lse_c, 0)?;
                if grads_on {
                    let da = new_grad(anchors)?;
                    let db = new_grad(anchors)?;
                    let (da_p, db_p) = (addr(da.slice(), gpu), addr(db.slice(), gpu));
                    let all = [(0, anchors)];
                    // da = G_row·B + G_colᵀ·B,  db = G_col·A + G_rowᵀ·A.
                    ctx.grad_anchor(g_ptr, g_type, g_es, anchors, ld, &seg_b, d, da_p, 0.0)?;
                    ctx.grad_key(gt_ptr, g_type, g_es, anchors, ld, &all, b, d, da_p, 1.0)?;
                    ctx.grad_anchor(gt_ptr, g_type, g_es, anchors, ld, &seg_a, d, db_p, 0.0)?;
                    ctx.grad_key(g_ptr, g_type, g_es, anchors, ld, &all, a, d, db_p, 1.0)?;
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
