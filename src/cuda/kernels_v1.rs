//! The simple (v1) fused kernels of `kernels/infonce.cu`: launch configurations (one function per
//! pass, checked against the device), the parameter block they share, and the evaluation that
//! chains them for every mode.
//!
//! Per problem (anchors X against keys Y; symmetric mode runs two, rows then columns):
//! `infonce_rows` (online LSE and the anchor-side gradient accumulator per key chunk) →
//! `infonce_merge` (chunks merged in order; LSE, loss, `w ∂L/∂s+`, anchor gradient) →
//! `infonce_cols` (key-side gradient, recomputing the similarities from the stored LSE). Then
//! `infonce_reduce_f32` (loss and `dL/dτ`) and `infonce_finish` (gradient through the optional
//! normalisation, cast to the requested dtype). No float atomics: every output element has one
//! owner that sums in a fixed order, so results are bitwise reproducible.
//!
//! Normalisation is a pre-pass (kernels/normalize.cu) into a normalised copy of each input; the
//! gradients are chained back to the raw rows by `infonce_finish`.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

use super::device::Gpu;
use super::fused::{DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradDType, QueueView};
use super::launch::{self, launch, Args};
use super::matrix::{DeviceElement, DeviceMatrix};
use super::normalize::normalize_rows;
use crate::error::{Error, Result};
use crate::loss::{check_shapes, InputDims, ProblemDims, Shape, Upstream};
use crate::spec::{DystressGrad, LossSpec, Mode, Reduction, Temperature, Variant};

/// The kernel module (`kernels/infonce.cu`).
pub const MODULE: &str = "infonce";
/// Anchors per tile (`TILE_A` in the kernels).
pub const TILE_A: usize = 16;
/// Keys per tile (`TILE_K`).
pub const TILE_K: usize = 32;
/// Threads of the tile kernels (`THREADS`; the kernels assume exactly this block size).
pub const THREADS: u32 = 128;
/// Anchors per block of the merge (one warp each).
pub const MERGE_ROWS: usize = THREADS as usize / 32;
/// Rows per block of the finish kernel (one warp each, 256 threads).
pub const FINISH_ROWS: usize = 8;
/// Threads of the reduce kernel (`REDUCE_THREADS`).
pub const REDUCE_THREADS: u32 = 256;
/// The fewest keys worth a chunk (a block) of their own in the row pass.
pub const MIN_CHUNK_KEYS: usize = 512;
/// The row pass aims at this many blocks per SM before it stops splitting the keys.
pub const BLOCKS_PER_SM: usize = 4;

/// How the row pass splits its work: a grid of anchor tiles × key chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsPlan {
    /// `ceil(n_anchors / TILE_A)`.
    pub anchor_tiles: u32,
    /// Number of key chunks (grid.y), ≥ 1.
    pub chunks: u32,
    /// Keys per chunk, a multiple of `TILE_K` (the last chunk may be shorter).
    pub chunk_len: usize,
}

/// Plans the row pass for `n_anchors` anchors and `n_keys` keys on a device with `sm_count` SMs.
///
/// Few anchors (MoCo's queue with a small batch) split the keys into chunks so that the grid
/// fills the device (spec: *Chunking*); chunks hold at least [`MIN_CHUNK_KEYS`] keys and at most
/// 65535 chunks are made. Every key lies in exactly one chunk.
pub fn plan_rows(n_anchors: usize, n_keys: usize, sm_count: u32) -> Result<RowsPlan> {
    const KERNEL: &str = "infonce_rows";
    let anchor_tiles = launch::grid_dim(KERNEL, n_anchors, TILE_A)?;
    let target = (sm_count.max(1) as usize) * BLOCKS_PER_SM;
    let want = target.div_ceil(anchor_tiles as usize).max(1);
    let by_keys = n_keys.div_ceil(MIN_CHUNK_KEYS).max(1);
    let chunks = want.min(by_keys).min(65535);
    let chunk_len = n_keys.div_ceil(chunks).div_ceil(TILE_K).max(1) * TILE_K;
    let chunks = n_keys.div_ceil(chunk_len).max(1);
    Ok(RowsPlan {
        anchor_tiles,
        chunks: chunks as u32,
        chunk_len,
    })
}

fn block(threads: u32) -> (u32, u32, u32) {
    (threads, 1, 1)
}

/// The row pass's launch configuration (static shared memory only).
pub fn rows_config(plan: &RowsPlan) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (plan.anchor_tiles, plan.chunks, 1),
        block_dim: block(THREADS),
        shared_mem_bytes: 0,
    }
}

/// The merge's launch configuration: one warp per anchor.
pub fn merge_config(n_anchors: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            launch::grid_dim("infonce_merge", n_anchors, MERGE_ROWS)?,
            1,
            1,
        ),
        block_dim: block(THREADS),
        shared_mem_bytes: 0,
    })
}

/// The column pass's launch configuration: one block per `TILE_K` keys.
pub fn cols_config(n_keys: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (launch::grid_dim("infonce_cols", n_keys, TILE_K)?, 1, 1),
        block_dim: block(THREADS),
        shared_mem_bytes: 0,
    })
}

/// The finish kernel's launch configuration: one warp per row.
pub fn finish_config(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (launch::grid_dim("infonce_finish", rows, FINISH_ROWS)?, 1, 1),
        block_dim: block(32 * FINISH_ROWS as u32),
        shared_mem_bytes: 0,
    })
}

/// The reduce kernel's launch configuration: one block.
pub fn reduce_config() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: block(REDUCE_THREADS),
        shared_mem_bytes: 0,
    }
}

/// `POS_*`, `VARIANT_*`, `TEMP_*` of kernels/infonce.cuh.
const POS_NONE: i32 = 0;
const POS_PAIR: i32 = 1;
const POS_TARGET: i32 = 2;
const VARIANT_STANDARD: i32 = 0;
const VARIANT_DECOUPLED: i32 = 1;
const VARIANT_SIMPLE: i32 = 2;
const TEMP_CONST: i32 = 0;
const TEMP_DYSTRESS_DETACH: i32 = 1;
const TEMP_DYSTRESS_FULL: i32 = 2;

/// The parameter block of the tile kernels: `InfonceParams` of kernels/infonce.cuh, field by
/// field (pointers as raw device addresses, 0 = null). The size is asserted on both sides.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct InfonceParams {
    x: u64,
    y: u64,
    pos: u64,
    targets: u64,
    s_threshold: u64,
    weights: u64,
    part_max: u64,
    part_sum: u64,
    part_pz: u64,
    part_acc: u64,
    lse: u64,
    loss: u64,
    dpos: u64,
    scale: u64,
    dtau: u64,
    grad_x: u64,
    grad_y: u64,
    grad_pos: u64,
    n_anchors: i64,
    n_keys: i64,
    y_start: i64,
    y_cap: i64,
    chunk_len: i64,
    dim: i32,
    n_chunks: i32,
    pos_kind: i32,
    self_skip: i32,
    variant: i32,
    temp_kind: i32,
    inv_tau: f32,
    tau: f32,
    tau_min: f32,
    tau_max: f32,
    lambda: f32,
    has_lambda: i32,
}
const _: () = assert!(std::mem::size_of::<InfonceParams>() == 232);
// Field offsets, asserted identically in kernels/infonce.cuh (offsetof).
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(InfonceParams, x) == 0);
    assert!(offset_of!(InfonceParams, y) == 8);
    assert!(offset_of!(InfonceParams, pos) == 16);
    assert!(offset_of!(InfonceParams, targets) == 24);
    assert!(offset_of!(InfonceParams, s_threshold) == 32);
    assert!(offset_of!(InfonceParams, weights) == 40);
    assert!(offset_of!(InfonceParams, part_max) == 48);
    assert!(offset_of!(InfonceParams, part_sum) == 56);
    assert!(offset_of!(InfonceParams, part_pz) == 64);
    assert!(offset_of!(InfonceParams, part_acc) == 72);
    assert!(offset_of!(InfonceParams, lse) == 80);
    assert!(offset_of!(InfonceParams, loss) == 88);
    assert!(offset_of!(InfonceParams, dpos) == 96);
    assert!(offset_of!(InfonceParams, scale) == 104);
    assert!(offset_of!(InfonceParams, dtau) == 112);
    assert!(offset_of!(InfonceParams, grad_x) == 120);
    assert!(offset_of!(InfonceParams, grad_y) == 128);
    assert!(offset_of!(InfonceParams, grad_pos) == 136);
    assert!(offset_of!(InfonceParams, n_anchors) == 144);
    assert!(offset_of!(InfonceParams, n_keys) == 152);
    assert!(offset_of!(InfonceParams, y_start) == 160);
    assert!(offset_of!(InfonceParams, y_cap) == 168);
    assert!(offset_of!(InfonceParams, chunk_len) == 176);
    assert!(offset_of!(InfonceParams, dim) == 184);
    assert!(offset_of!(InfonceParams, n_chunks) == 188);
    assert!(offset_of!(InfonceParams, pos_kind) == 192);
    assert!(offset_of!(InfonceParams, self_skip) == 196);
    assert!(offset_of!(InfonceParams, variant) == 200);
    assert!(offset_of!(InfonceParams, temp_kind) == 204);
    assert!(offset_of!(InfonceParams, inv_tau) == 208);
    assert!(offset_of!(InfonceParams, tau) == 212);
    assert!(offset_of!(InfonceParams, tau_min) == 216);
    assert!(offset_of!(InfonceParams, tau_max) == 220);
    assert!(offset_of!(InfonceParams, lambda) == 224);
    assert!(offset_of!(InfonceParams, has_lambda) == 228);
};

// SAFETY: a #[repr(C)] struct of plain integers and floats laid out exactly as the CUDA struct
// (same field order and types; sizes asserted on both sides), passed by value as a kernel argument.
unsafe impl DeviceRepr for InfonceParams {}

fn dim_i32(dim: usize) -> Result<i32> {
    i32::try_from(dim).map_err(|_| Error::shape("inputs", format!("D = {dim}"), "D < 2^31"))
}

fn alloc_f32(gpu: &Gpu, len: usize) -> Result<CudaSlice<f32>> {
    Ok(gpu.stream().alloc_zeros::<f32>(len.max(1))?)
}

fn fill_nan_f32(gpu: &Gpu, s: &mut CudaSlice<f32>) -> Result<()> {
    let v = vec![f32::NAN; s.len()];
    Ok(gpu.stream().memcpy_htod(&v, s)?)
}

fn fill_nan<T: DeviceElement>(gpu: &Gpu, s: &mut CudaSlice<T>) -> Result<()> {
    let v = vec![T::from_f64(f64::NAN); s.len()];
    Ok(gpu.stream().memcpy_htod(&v, s)?)
}

/// Checks device inputs against `spec` with the crate's one shape check
/// ([`crate::loss::check_shapes`]; a queue counts its `len` keys in use, and its buffer must be D
/// wide even when empty) after what only a ring view has: `start < capacity`, `len <= capacity`.
/// Device targets are the caller's to keep in range (reading them back would cost a copy).
pub fn device_shape<T: DeviceElement>(
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
) -> Result<Shape> {
    let dims = |name: &'static str, m: &DeviceMatrix<T>| InputDims {
        name,
        rows: m.rows(),
        cols: m.cols(),
    };
    let problem = match *inputs {
        DeviceInputs::Queue {
            query,
            positive,
            queue,
        } => {
            let cap = queue.keys.rows();
            if queue.len > cap || (cap > 0 && queue.start >= cap) || (cap == 0 && queue.start != 0)
            {
                return Err(Error::shape(
                    "queue",
                    format!(
                        "ring start {} len {} in a buffer of {cap} rows",
                        queue.start, queue.len
                    ),
                    "start < capacity and len <= capacity",
                ));
            }
            ProblemDims::Queue {
                query: dims("query", query),
                positive: dims("positive", positive),
                queue: InputDims {
                    rows: queue.len,
                    ..dims("queue", queue.keys)
                },
            }
        }
        DeviceInputs::InBatch { embeddings } => ProblemDims::InBatch {
            embeddings: dims("embeddings", embeddings),
        },
        DeviceInputs::Cross {
            query,
            key,
            targets,
        } => ProblemDims::Cross {
            query: dims("query", query),
            key: dims("key", key),
            targets: targets.map(|t| t.len()),
        },
        DeviceInputs::Symmetric { query, key } => ProblemDims::Symmetric {
            query: dims("query", query),
            key: dims("key", key),
        },
    };
    check_shapes(spec, &problem)
}

/// The spec's temperature and variant as kernel parameters.
fn loss_params(spec: &LossSpec) -> Result<InfonceParams> {
    let mut p = InfonceParams::default();
    match spec.temperature() {
        Temperature::Fixed(t) | Temperature::Learnable(t) => {
            p.temp_kind = TEMP_CONST;
            p.tau = t as f32;
            p.inv_tau = (1.0 / t) as f32;
        }
        Temperature::Dystress {
            tau_min,
            tau_max,
            grad,
        } => {
            p.temp_kind = match grad {
                DystressGrad::Detach => TEMP_DYSTRESS_DETACH,
                DystressGrad::Full => TEMP_DYSTRESS_FULL,
            };
            p.tau_min = tau_min as f32;
            p.tau_max = tau_max as f32;
            p.tau = tau_min as f32; // only dL/dτ reads it, and DySTreSS has none
            p.inv_tau = (1.0 / tau_min) as f32;
        }
    }
    // hard:k and HardSimple run the standard and simple kernels with per-anchor similarity
    // thresholds from `select::hard_thresholds` (see `evaluate`).
    match spec.variant() {
        Variant::Standard | Variant::Hard { .. } => p.variant = VARIANT_STANDARD,
        Variant::Decoupled => p.variant = VARIANT_DECOUPLED,
        Variant::Simple { lambda, .. } => {
            p.variant = VARIANT_SIMPLE;
            if let Some(l) = lambda {
                p.has_lambda = 1;
                p.lambda = l as f32;
            }
        }
    }
    Ok(p)
}

/// One problem: anchors `x` against the keys of the ring `y`.
struct Problem<'a, T: DeviceElement> {
    x: &'a CudaSlice<T>,
    n_anchors: usize,
    y: &'a CudaSlice<T>,
    n_keys: usize,
    y_start: usize,
    y_cap: usize,
    /// Queue mode: the positives.
    pos: Option<&'a CudaSlice<T>>,
    targets: Option<&'a CudaSlice<i64>>,
    pos_kind: i32,
    self_skip: bool,
    /// Per-anchor similarity thresholds (hard-negative selection hook): negatives with
    /// `s < threshold[anchor]` are excluded. `None` (the only value until a selection kernel
    /// provides hard:k) keeps every negative.
    s_threshold: Option<&'a CudaSlice<f32>>,
    /// Offset of this problem's anchors in the per-anchor-loss arrays (weights, losses, dτ).
    offset: usize,
    /// Indices into the gradient accumulators.
    grad_x: Option<usize>,
    grad_y: Option<usize>,
    grad_pos: Option<usize>,
}

/// Buffers shared by the problems of one evaluation.
struct Work {
    weights: CudaSlice<f32>,
    losses: CudaSlice<f32>,
    dtau: Option<CudaSlice<f32>>,
    /// LSE per problem (rows; symmetric: rows then columns), `None` for simple.
    lse: Vec<CudaSlice<f32>>,
    grads: Vec<CudaSlice<f32>>,
}

fn run_problem<T: DeviceElement>(
    gpu: &Gpu,
    base: &InfonceParams,
    prob: &Problem<'_, T>,
    work: &mut Work,
    lse_index: usize,
    dim: usize,
    with_grad: bool,
) -> Result<()> {
    let n = prob.n_anchors;
    let plan = plan_rows(n, prob.n_keys, gpu.properties().sm_count)?;
    let chunks = plan.chunks as usize;
    let parts = chunks * n;
    let mut part_max = alloc_f32(gpu, parts)?;
    let mut part_sum = alloc_f32(gpu, parts)?;
    let mut part_pz = alloc_f32(gpu, parts)?;
    let mut part_acc = if with_grad {
        Some(alloc_f32(gpu, parts * dim)?)
    } else {
        None
    };
    let mut dpos = alloc_f32(gpu, n)?;
    let mut scale = alloc_f32(gpu, n)?;
    let simple = base.variant == VARIANT_SIMPLE;

    // The struct's device pointers, with their guards: held until the three launches are queued.
    let mut bufs = Args::new(gpu);
    let mut p = *base;
    p.x = bufs.read_ptr(prob.x, 0)?;
    p.y = bufs.read_ptr(prob.y, 0)?;
    p.pos = prob.pos.map_or(Ok(0), |s| bufs.read_ptr(s, 0))?;
    p.targets = prob.targets.map_or(Ok(0), |s| bufs.read_ptr(s, 0))?;
    p.s_threshold = prob.s_threshold.map_or(Ok(0), |s| bufs.read_ptr(s, 0))?;
    p.weights = bufs.read_ptr(&work.weights, prob.offset)?;
    p.part_max = bufs.write_ptr(&mut part_max, 0)?;
    p.part_sum = bufs.write_ptr(&mut part_sum, 0)?;
    p.part_pz = bufs.write_ptr(&mut part_pz, 0)?;
    p.part_acc = part_acc.as_mut().map_or(Ok(0), |s| bufs.write_ptr(s, 0))?;
    p.loss = bufs.write_ptr(&mut work.losses, prob.offset)?;
    p.lse = if simple {
        0
    } else {
        bufs.write_ptr(&mut work.lse[lse_index], 0)?
    };
    p.dtau = work
        .dtau
        .as_mut()
        .map_or(Ok(0), |s| bufs.write_ptr(s, prob.offset))?;
    p.dpos = bufs.write_ptr(&mut dpos, 0)?;
    p.scale = bufs.write_ptr(&mut scale, 0)?;
    if with_grad {
        let g: Vec<u64> = work
            .grads
            .iter_mut()
            .map(|s| bufs.write_ptr(s, 0))
            .collect::<Result<_>>()?;
        p.grad_x = prob.grad_x.map_or(0, |i| g[i]);
        p.grad_y = prob.grad_y.map_or(0, |i| g[i]);
        p.grad_pos = prob.grad_pos.map_or(0, |i| g[i]);
    }
    p.n_anchors = n as i64;
    p.n_keys = prob.n_keys as i64;
    p.y_start = prob.y_start as i64;
    p.y_cap = prob.y_cap as i64;
    p.chunk_len = plan.chunk_len as i64;
    p.dim = dim_i32(dim)?;
    p.n_chunks = plan.chunks as i32;
    p.pos_kind = prob.pos_kind;
    p.self_skip = prob.self_skip as i32;

    let dt = T::DTYPE.name();
    let params = |p: InfonceParams| {
        let mut a = Args::new(gpu);
        a.value(p);
        a
    };
    // SAFETY (all three launches): `extern "C" void infonce_<pass>_<dtype>(const InfonceParams p)`,
    // the struct laid out as above. Every pointer is a live buffer of this evaluation guarded by
    // `bufs` until the launches are queued: x, pos hold n_anchors × dim elements, y holds
    // y_cap × dim with y_start < y_cap and n_keys ≤ y_cap, targets n_anchors indices in
    // [0, n_keys), weights, losses, dτ (from `offset`), lse, dpos, scale and s_threshold
    // n_anchors floats, the partials chunks × n_anchors (× dim for part_acc) floats,
    // grad_x/grad_pos n_anchors × dim and grad_y n_keys × dim floats (checked by device_shape and
    // the allocations in `evaluate`); THREADS-thread blocks as the kernels assume.
    unsafe {
        launch(
            gpu,
            "infonce_rows",
            MODULE,
            &format!("infonce_rows_{dt}"),
            rows_config(&plan),
            params(p),
        )?;
        launch(
            gpu,
            "infonce_merge",
            MODULE,
            &format!("infonce_merge_{dt}"),
            merge_config(n)?,
            params(p),
        )?;
        if with_grad && prob.grad_y.is_some() && prob.n_keys > 0 {
            launch(
                gpu,
                "infonce_cols",
                MODULE,
                &format!("infonce_cols_{dt}"),
                cols_config(prob.n_keys)?,
                params(p),
            )?;
        }
    }
    drop(bufs);
    Ok(())
}

/// `out[0] = factor · Σ x[..n]`.
fn reduce(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    factor: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let mut a = Args::new(gpu);
    a.read(x).i64(n as i64).f32(factor).write(out);
    // SAFETY: infonce_reduce_f32(const float* x, int64_t n, float factor, float* out); x holds
    // ≥ n floats, out ≥ 1; one block of REDUCE_THREADS (its shared array).
    unsafe {
        launch(
            gpu,
            "infonce_reduce",
            MODULE,
            "infonce_reduce_f32",
            reduce_config(),
            a,
        )
    }
}

/// One input gradient to finish: the raw rows, their normalisation, the f32 accumulator.
struct FinishJob<'a, T: DeviceElement> {
    name: &'static str,
    raw: &'a DeviceMatrix<T>,
    inv_norm: Option<&'a CudaSlice<f32>>,
    grad: usize,
    rows: usize,
    start: usize,
}

fn finish<T: DeviceElement>(
    gpu: &Gpu,
    job: &FinishJob<'_, T>,
    g: &CudaSlice<f32>,
    dim: usize,
    grad_dtype: GradDType,
    poison: bool,
) -> Result<DeviceGrad<T>> {
    let mut out = match grad_dtype {
        GradDType::F32 => DeviceGrad::F32(DeviceMatrix::zeros(gpu, job.rows, dim)?),
        GradDType::Input => DeviceGrad::Input(DeviceMatrix::zeros(gpu, job.rows, dim)?),
    };
    if poison {
        match &mut out {
            DeviceGrad::F32(m) => fill_nan_f32(gpu, m.slice_mut())?,
            DeviceGrad::Input(m) => fill_nan(gpu, m.slice_mut())?,
        }
    }
    if job.rows == 0 {
        return Ok(out);
    }
    let (rows, d, start, cap) = (
        job.rows as i64,
        dim_i32(dim)?,
        job.start as i64,
        job.raw.rows().max(1) as i64,
    );
    let mut a = Args::new(gpu);
    a.read(job.raw.slice()).read_opt(job.inv_norm).read(g);
    match &mut out {
        DeviceGrad::F32(m) => a.write(m.slice_mut()).null(),
        DeviceGrad::Input(m) => a.null().write(m.slice_mut()),
    };
    a.i64(rows).i32(d).i64(start).i64(cap);
    // SAFETY: infonce_finish_<dtype>(const T* x, const float* inv_norm, const float* g,
    // float* out_f32, T* out_t, int64_t rows, int dim, int64_t x_start, int64_t x_cap). x holds
    // cap × dim elements (the raw input; a ring for the queue), inv_norm cap floats (or null), g
    // and the output rows × dim; row r reads x row (start + r) mod cap, and start < cap,
    // rows ≤ cap; one warp per row (FINISH_ROWS warps per block).
    unsafe {
        launch(
            gpu,
            "infonce_finish",
            MODULE,
            &format!("infonce_finish_{}", T::DTYPE.name()),
            finish_config(job.rows)?,
            a,
        )
    }?;
    Ok(out)
}

/// Evaluates `spec` with the v1 kernels (see the module docs). `poison` fills every output buffer
/// with NaN before the kernels run (a test hook: an element the kernels forget stays NaN).
pub(crate) fn evaluate<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
    poison: bool,
) -> Result<DeviceOutput<T>> {
    let base = loss_params(spec)?;
    let shape = device_shape(spec, inputs)?;
    let mode = spec.mode();
    let count = shape.losses(mode);
    let weights: Vec<f32> = upstream
        .weights(spec, count)?
        .iter()
        .map(|&w| w as f32)
        .collect();
    let with_grad = !opts.forward_only;
    let dim = shape.dim;
    dim_i32(dim)?;
    let stream = gpu.stream();

    // The input matrices in gradient order, and the rows the kernels read (normalised copies).
    let raws: Vec<&DeviceMatrix<T>> = match *inputs {
        DeviceInputs::Queue {
            query,
            positive,
            queue,
        } => vec![query, positive, queue.keys],
        DeviceInputs::InBatch { embeddings } => vec![embeddings],
        DeviceInputs::Cross { query, key, .. } | DeviceInputs::Symmetric { query, key } => {
            vec![query, key]
        }
    };
    let normed: Vec<Option<(DeviceMatrix<T>, CudaSlice<f32>)>> = raws
        .iter()
        .map(|m| {
            if spec.normalize() && m.rows() > 0 {
                normalize_rows(gpu, m).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Result<_>>()?;
    let used: Vec<&CudaSlice<T>> = raws
        .iter()
        .zip(&normed)
        .map(|(r, n)| n.as_ref().map_or(r.slice(), |(u, _)| u.slice()))
        .collect();

    // hard:k (Wang & Liu eq. 9): per-anchor thresholds s_(k) over the rows the kernels read (the
    // normalised copies when normalising), computed by the radix select with the same f32
    // similarities as the fused kernels; symmetric rows and columns select separately.
    let thresholds: Vec<CudaSlice<f32>> = match spec.variant().hard_k() {
        None => Vec::new(),
        Some(k) => {
            let m =
                |i: usize| -> &DeviceMatrix<T> { normed[i].as_ref().map_or(raws[i], |(u, _)| u) };
            let sel = match *inputs {
                DeviceInputs::Queue { queue, .. } => DeviceInputs::Queue {
                    query: m(0),
                    positive: m(1),
                    queue: QueueView {
                        keys: m(2),
                        start: queue.start,
                        len: queue.len,
                    },
                },
                DeviceInputs::InBatch { .. } => DeviceInputs::InBatch { embeddings: m(0) },
                DeviceInputs::Cross { targets, .. } => DeviceInputs::Cross {
                    query: m(0),
                    key: m(1),
                    targets,
                },
                DeviceInputs::Symmetric { .. } => DeviceInputs::Symmetric {
                    query: m(0),
                    key: m(1),
                },
            };
            let mut t = vec![super::select::hard_thresholds(gpu, &sel, false, k, false)?];
            if mode == Mode::Symmetric {
                t.push(super::select::hard_thresholds(gpu, &sel, false, k, true)?);
            }
            t
        }
    };

    // Gradient accumulators (f32, zeroed) and what becomes of them.
    let names: Vec<&'static str> = match mode {
        Mode::Queue => vec!["query", "positive", "queue"],
        Mode::InBatch => vec!["embeddings"],
        Mode::Cross | Mode::Symmetric => vec!["query", "key"],
    };
    let (queue_start, queue_len) = match *inputs {
        DeviceInputs::Queue { queue, .. } => (queue.start, queue.len),
        _ => (0, 0),
    };
    let mut jobs: Vec<FinishJob<'_, T>> = Vec::new();
    if with_grad {
        for (i, (&raw, name)) in raws.iter().zip(&names).enumerate() {
            let is_queue = mode == Mode::Queue && i == 2;
            if is_queue && !spec.grad_queue() {
                continue;
            }
            jobs.push(FinishJob {
                name,
                raw,
                inv_norm: normed[i].as_ref().map(|(_, inv)| inv),
                grad: i,
                rows: if is_queue { queue_len } else { raw.rows() },
                start: if is_queue { queue_start } else { 0 },
            });
        }
    }
    let grads: Vec<CudaSlice<f32>> = if with_grad {
        raws.iter()
            .enumerate()
            .map(|(i, m)| {
                let rows = if mode == Mode::Queue && i == 2 {
                    // MoCo detaches the queue: no accumulator unless its gradient is asked for.
                    if spec.grad_queue() {
                        queue_len
                    } else {
                        0
                    }
                } else {
                    m.rows()
                };
                alloc_f32(gpu, rows * dim)
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };

    let n = shape.anchors;
    let lse_count = if mode == Mode::Symmetric { 2 } else { 1 };
    let mut work = Work {
        weights: stream.clone_htod(&weights)?,
        losses: alloc_f32(gpu, count)?,
        dtau: if spec.temperature().is_learnable() && with_grad {
            Some(alloc_f32(gpu, count)?)
        } else {
            None
        },
        lse: (0..lse_count)
            .map(|_| alloc_f32(gpu, n))
            .collect::<Result<_>>()?,
        grads,
    };
    if poison {
        fill_nan_f32(gpu, &mut work.losses)?;
        for l in &mut work.lse {
            fill_nan_f32(gpu, l)?;
        }
    }

    let problems: Vec<Problem<'_, T>> = match *inputs {
        DeviceInputs::Queue { queue, .. } => vec![Problem {
            x: used[0],
            n_anchors: n,
            y: used[2],
            n_keys: queue.len,
            y_start: queue.start,
            y_cap: queue.keys.rows(),
            pos: Some(used[1]),
            targets: None,
            pos_kind: POS_NONE,
            self_skip: false,
            s_threshold: thresholds.first(),
            offset: 0,
            grad_x: Some(0),
            grad_y: spec.grad_queue().then_some(2),
            grad_pos: Some(1),
        }],
        DeviceInputs::InBatch { .. } => vec![Problem {
            x: used[0],
            n_anchors: n,
            y: used[0],
            n_keys: n,
            y_start: 0,
            y_cap: n,
            pos: None,
            targets: None,
            pos_kind: POS_PAIR,
            self_skip: true,
            s_threshold: thresholds.first(),
            offset: 0,
            grad_x: Some(0),
            grad_y: Some(0),
            grad_pos: None,
        }],
        DeviceInputs::Cross { key, targets, .. } => vec![Problem {
            x: used[0],
            n_anchors: n,
            y: used[1],
            n_keys: key.rows(),
            y_start: 0,
            y_cap: key.rows(),
            pos: None,
            targets,
            pos_kind: POS_TARGET,
            self_skip: false,
            s_threshold: thresholds.first(),
            offset: 0,
            grad_x: Some(0),
            grad_y: Some(1),
            grad_pos: None,
        }],
        DeviceInputs::Symmetric { .. } => {
            let side = |x: usize, y: usize, offset: usize| Problem {
                x: used[x],
                n_anchors: n,
                y: used[y],
                n_keys: n,
                y_start: 0,
                y_cap: n,
                pos: None,
                targets: None,
                pos_kind: POS_TARGET,
                self_skip: false,
                s_threshold: thresholds.get(usize::from(offset != 0)),
                offset,
                grad_x: Some(x),
                grad_y: Some(y),
                grad_pos: None,
            };
            vec![side(0, 1, 0), side(1, 0, n)]
        }
    };
    for (k, prob) in problems.iter().enumerate() {
        run_problem(gpu, &base, prob, &mut work, k, dim, with_grad)?;
    }

    // The loss: the per-anchor losses themselves (none) or their reduction.
    let loss = match spec.reduction() {
        Reduction::None => work.losses.clone(),
        r => {
            let half = if mode == Mode::Symmetric { 0.5 } else { 1.0 };
            let factor = match r {
                Reduction::Mean => 1.0 / count as f64,
                _ => half,
            };
            let mut out = alloc_f32(gpu, 1)?;
            if poison {
                fill_nan_f32(gpu, &mut out)?;
            }
            reduce(gpu, &work.losses, count, factor as f32, &mut out)?;
            out
        }
    };
    let grad_temperature = match &work.dtau {
        Some(d) => {
            let mut out = alloc_f32(gpu, 1)?;
            if poison {
                fill_nan_f32(gpu, &mut out)?;
            }
            reduce(gpu, d, count, 1.0, &mut out)?;
            Some(out)
        }
        None => None,
    };
    let mut out_grads = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let g = finish(
            gpu,
            job,
            &work.grads[job.grad],
            dim,
            opts.grad_dtype,
            poison,
        )?;
        out_grads.push((job.name, g));
    }
    let mut lse_iter = work.lse.into_iter();
    let lse = match lse_iter.next() {
        Some(l) => l,
        None => alloc_f32(gpu, 1)?,
    };
    let lse_cols = lse_iter.next();
    Ok(DeviceOutput {
        loss,
        lse,
        lse_cols,
        grads: out_grads,
        grad_temperature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_plan_covers_every_key_once() {
        for &(n, k, sms) in &[
            (1usize, 0usize, 132u32),
            (1, 1, 132),
            (256, 65536, 132),
            (4096, 1 << 20, 132),
            (32769, 65536, 132),
            (17, 1000, 1),
            (33, 31, 8),
            (1, 65537, 132),
            (1, 100_000_000, 132),
        ] {
            let p = plan_rows(n, k, sms).unwrap();
            assert_eq!(p.anchor_tiles as usize, n.div_ceil(TILE_A).max(1));
            assert!(p.chunks >= 1 && p.chunks <= 65535);
            assert_eq!(p.chunk_len % TILE_K, 0, "{n} {k}");
            assert!(p.chunk_len >= TILE_K);
            // Every key is in exactly one chunk, and no chunk is empty unless K = 0.
            assert!(p.chunks as usize * p.chunk_len >= k, "{n} {k}: {p:?}");
            if k > 0 {
                assert!((p.chunks as usize - 1) * p.chunk_len < k, "{n} {k}: {p:?}");
            } else {
                assert_eq!(p.chunks, 1);
            }
        }
    }

    #[test]
    fn rows_plan_splits_keys_only_for_few_anchors() {
        // MoCo: 256 queries = 16 tiles, a 65536-key queue: split until ~4 blocks per SM.
        let p = plan_rows(256, 65536, 132).unwrap();
        assert_eq!(p.anchor_tiles, 16);
        assert_eq!(p.chunks, 33);
        assert!(p.chunk_len >= MIN_CHUNK_KEYS);
        // CLIP-sized: enough anchor tiles already, one chunk.
        let p = plan_rows(32768, 32768, 132).unwrap();
        assert_eq!(p.chunks, 1);
        assert_eq!(p.chunk_len, 32768);
        // Few keys: never a chunk below MIN_CHUNK_KEYS keys.
        let p = plan_rows(1, 1000, 132).unwrap();
        assert_eq!(p.chunks, 2);
    }

    #[test]
    fn launch_configs_are_in_range() {
        let c = rows_config(&plan_rows(33, 100, 4).unwrap());
        assert_eq!(c.block_dim, (THREADS, 1, 1));
        assert_eq!(c.grid_dim.0, 3);
        let c = merge_config(9).unwrap();
        assert_eq!(c.grid_dim, (3, 1, 1));
        let c = cols_config(65).unwrap();
        assert_eq!(c.grid_dim, (3, 1, 1));
        let c = finish_config(17).unwrap();
        assert_eq!(c.grid_dim, (3, 1, 1));
        assert_eq!(c.block_dim, (256, 1, 1));
        assert_eq!(reduce_config().block_dim, (REDUCE_THREADS, 1, 1));
        // 2^31 anchors is still a grid.x of 2^27 merge blocks.
        assert_eq!(merge_config(1 << 31).unwrap().grid_dim.0, 1 << 29);
        assert!(merge_config(usize::MAX).is_err());
    }

    #[test]
    fn hard_k_runs_the_standard_and_simple_kernels_with_thresholds() {
        let spec = LossSpec::queue()
            .variant(Variant::Hard { k: 4 })
            .build()
            .unwrap();
        assert_eq!(loss_params(&spec).unwrap().variant, VARIANT_STANDARD);
        let spec = LossSpec::queue()
            .variant(Variant::Simple {
                lambda: None,
                hard_k: Some(3),
            })
            .build()
            .unwrap();
        let p = loss_params(&spec).unwrap();
        assert_eq!((p.variant, p.has_lambda), (VARIANT_SIMPLE, 0));
    }

    #[test]
    fn loss_params_encode_the_temperature() {
        let spec = LossSpec::queue().temperature(0.5).build().unwrap();
        let p = loss_params(&spec).unwrap();
        assert_eq!((p.temp_kind, p.tau, p.inv_tau), (TEMP_CONST, 0.5, 2.0));
        let spec = LossSpec::queue()
            .dystress(0.1, 0.2, DystressGrad::Full)
            .variant(Variant::Simple {
                lambda: Some(0.25),
                hard_k: None,
            })
            .build()
            .unwrap();
        let p = loss_params(&spec).unwrap();
        assert_eq!(p.temp_kind, TEMP_DYSTRESS_FULL);
        assert_eq!(
            (p.variant, p.has_lambda, p.lambda),
            (VARIANT_SIMPLE, 1, 0.25)
        );
    }
}
