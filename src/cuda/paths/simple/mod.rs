//! The simple path: the v1 fused kernels of `kernels/infonce.cu` on CUDA cores, f32 accumulation,
//! every mode, temperature, variant and reduction. The baseline every faster path is checked
//! against (and [`KernelPath::Auto`](crate::cuda::KernelPath::Auto)'s choice today).
//!
//! [`evaluate`] runs these passes, in this order:
//! 1. `prepare`: with normalisation, `normalize_fwd_<dtype>` (kernels/normalize.cu) into a
//!    copy of every input (steps::normalize); the loss kernels read the copies.
//! 2. `thresholds`: for `hard:k`, `select_kth_<dtype>` (kernels/select.cu) per side
//!    (steps::select): each anchor's `s_(k)`, over the same f32 similarities as the loss kernels.
//! 3. `Work::new`: the per-anchor weights, losses, LSE, dτ terms and f32 gradient
//!    accumulators shared by the problems.
//! 4. Per problem (anchors X against the keys of the ring Y; symmetric mode runs two, rows then
//!    columns), `run_problem`: `infonce_rows_<dtype>` (per key chunk: the online LSE and the
//!    anchor-side gradient accumulator) → `infonce_merge_<dtype>` (chunks merged in order: LSE,
//!    loss, `w ∂L/∂s+`, anchor gradient) → `infonce_cols_<dtype>` (the key-side gradient,
//!    recomputing the similarities from the stored LSE).
//! 5. `reduce`: `infonce_reduce_f32` for the mean/sum loss and `dL/dτ` (f64, fixed order).
//! 6. `finish`: `infonce_finish_<dtype>` per gradient (through the optional normalisation,
//!    cast to the requested dtype).
//!
//! No float atomics: every output element has one owner that sums in a fixed order, so results
//! are bitwise reproducible.

mod params;

pub use params::{
    cols_config, finish_config, merge_config, plan_rows, reduce_config, rows_config, RowsPlan,
    BLOCKS_PER_SM, FINISH_ROWS, MERGE_ROWS, MIN_CHUNK_KEYS, MODULE, REDUCE_THREADS, THREADS,
    TILE_A, TILE_K,
};

use cudarc::driver::CudaSlice;
use params::{loss_params, InfonceParams, POS_NONE, POS_PAIR, POS_TARGET, VARIANT_SIMPLE};

use crate::cuda::op::{
    device_shape, DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradDType,
};
use crate::cuda::runtime::launch::Ptr;
use crate::cuda::runtime::{launch, Args, DeviceElement, DeviceMatrix, Gpu};
use crate::cuda::steps::normalize::{normalize_inputs, NormalizedInputs};
use crate::cuda::steps::select::hard_thresholds;
use crate::error::{Error, Result};
use crate::loss::Upstream;
use crate::spec::{LossSpec, Mode, Reduction};

/// Evaluates `spec` with the v1 kernels, the passes in the module docs' order. `poison` fills
/// every output buffer with NaN before the kernels run (a test hook: an element the kernels forget
/// stays NaN).
pub fn evaluate<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
    poison: bool,
) -> Result<DeviceOutput<T>> {
    let base = loss_params(spec)?;
    let shape = device_shape(spec, inputs)?;
    dim_i32(shape.dim)?;
    let with_grad = !opts.forward_only;

    let normalized = prepare(gpu, spec, inputs)?;
    let read = match &normalized {
        Some(n) => n.inputs(inputs)?,
        None => *inputs,
    };
    let thresholds = thresholds(gpu, spec, &read)?;
    let mut work = Work::new(gpu, spec, &read, upstream, with_grad, poison)?;
    for (k, prob) in problems(spec, &read, &thresholds).iter().enumerate() {
        run_problem(gpu, &base, prob, &mut work, k, shape.dim, with_grad)?;
    }
    let (loss, grad_temperature) = reduce(gpu, spec, &work, poison)?;
    let grads = if with_grad {
        finish(
            gpu,
            spec,
            inputs,
            normalized.as_ref(),
            &work,
            shape.dim,
            opts,
            poison,
        )?
    } else {
        Vec::new()
    };
    let mut lse = work.lse.into_iter();
    Ok(DeviceOutput {
        loss,
        lse: match lse.next() {
            Some(l) => l,
            None => alloc_f32(gpu, 1)?,
        },
        lse_cols: lse.next(),
        grads,
        grad_temperature,
    })
}

fn dim_i32(dim: usize) -> Result<i32> {
    i32::try_from(dim).map_err(|_| Error::shape("inputs", format!("D = {dim}"), "D < 2^31"))
}

fn alloc_f32(gpu: &Gpu, len: usize) -> Result<CudaSlice<f32>> {
    Ok(gpu.stream().alloc_zeros::<f32>(len.max(1))?)
}

fn fill_nan<T: DeviceElement>(gpu: &Gpu, s: &mut CudaSlice<T>) -> Result<()> {
    let v = vec![T::from_f64(f64::NAN); s.len()];
    Ok(gpu.stream().memcpy_htod(&v, s)?)
}

/// Pass 1: the normalised copies the loss kernels read (`None` without normalisation).
fn prepare<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
) -> Result<Option<NormalizedInputs<T>>> {
    spec.normalize()
        .then(|| normalize_inputs(gpu, inputs))
        .transpose()
}

/// Pass 2: `hard:k` (Wang & Liu eq. 9) thresholds `s_(k)` per anchor over the rows the loss
/// kernels read, from the radix select with the same f32 similarities; symmetric rows and columns
/// select separately. Empty for the other variants.
fn thresholds<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    read: &DeviceInputs<'_, T>,
) -> Result<Vec<CudaSlice<f32>>> {
    let Some(k) = spec.variant().hard_k() else {
        return Ok(Vec::new());
    };
    let mut t = vec![hard_thresholds(gpu, read, false, k, false)?];
    if spec.mode() == Mode::Symmetric {
        t.push(hard_thresholds(gpu, read, false, k, true)?);
    }
    Ok(t)
}

/// Buffers shared by the problems of one evaluation.
struct Work {
    /// `w_i` per anchor loss.
    weights: CudaSlice<f32>,
    /// The per-anchor losses (queue/cross N, inbatch 2N, symmetric N rows then N columns).
    losses: CudaSlice<f32>,
    /// Per-anchor `dL_i/dτ` terms (learnable τ with gradients).
    dtau: Option<CudaSlice<f32>>,
    /// LSE per problem (rows; symmetric: rows then columns).
    lse: Vec<CudaSlice<f32>>,
    /// One f32 accumulator per input, in [`DeviceInputs::matrices`] order (empty for the queue
    /// unless its gradient is asked for; none at all without gradients).
    grads: Vec<CudaSlice<f32>>,
    /// How many per-anchor losses there are.
    count: usize,
}

impl Work {
    /// Pass 3: allocates (and with `poison`, NaN-fills) the shared buffers.
    fn new<T: DeviceElement>(
        gpu: &Gpu,
        spec: &LossSpec,
        read: &DeviceInputs<'_, T>,
        upstream: &Upstream,
        with_grad: bool,
        poison: bool,
    ) -> Result<Self> {
        let shape = device_shape(spec, read)?;
        let mode = spec.mode();
        let count = shape.losses(mode);
        let weights: Vec<f32> = upstream
            .weights(spec, count)?
            .iter()
            .map(|&w| w as f32)
            .collect();
        let grads = if with_grad {
            gradient_rows(spec, read)
                .into_iter()
                .map(|rows| alloc_f32(gpu, rows * shape.dim))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let lse_count = if mode == Mode::Symmetric { 2 } else { 1 };
        let mut work = Work {
            weights: gpu.stream().clone_htod(&weights)?,
            losses: alloc_f32(gpu, count)?,
            dtau: if spec.temperature().is_learnable() && with_grad {
                Some(alloc_f32(gpu, count)?)
            } else {
                None
            },
            lse: (0..lse_count)
                .map(|_| alloc_f32(gpu, shape.anchors))
                .collect::<Result<_>>()?,
            grads,
            count,
        };
        if poison {
            fill_nan(gpu, &mut work.losses)?;
            for l in &mut work.lse {
                fill_nan(gpu, l)?;
            }
        }
        Ok(work)
    }
}

/// The rows of each input's gradient, in [`DeviceInputs::matrices`] order: the queue's is its
/// `len` rows in queue order when the spec asks for it, else 0 (MoCo detaches the queue).
fn gradient_rows<T: DeviceElement>(spec: &LossSpec, inputs: &DeviceInputs<'_, T>) -> Vec<usize> {
    let mut rows: Vec<usize> = inputs.matrices().iter().map(|(_, m)| m.rows()).collect();
    if let DeviceInputs::Queue { queue, .. } = inputs {
        rows[2] = if spec.grad_queue() { queue.len } else { 0 };
    }
    rows
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
    /// Per-anchor similarity thresholds (`hard:k`): negatives with `s < threshold[anchor]` are
    /// excluded; `None` keeps every negative.
    s_threshold: Option<&'a CudaSlice<f32>>,
    /// Offset of this problem's anchors in the per-anchor arrays (weights, losses, dτ).
    offset: usize,
    /// Indices into the gradient accumulators.
    grad_x: Option<usize>,
    grad_y: Option<usize>,
    grad_pos: Option<usize>,
}

/// The problems of `spec` over the matrices the kernels read: one, or symmetric's two (rows, then
/// columns with X = B, Y = A).
fn problems<'a, T: DeviceElement>(
    spec: &LossSpec,
    read: &DeviceInputs<'a, T>,
    thresholds: &'a [CudaSlice<f32>],
) -> Vec<Problem<'a, T>> {
    let one = |x: &'a DeviceMatrix<T>, y: &'a DeviceMatrix<T>| Problem {
        x: x.slice(),
        n_anchors: x.rows(),
        y: y.slice(),
        n_keys: y.rows(),
        y_start: 0,
        y_cap: y.rows(),
        pos: None,
        targets: None,
        pos_kind: POS_TARGET,
        self_skip: false,
        s_threshold: thresholds.first(),
        offset: 0,
        grad_x: Some(0),
        grad_y: Some(1),
        grad_pos: None,
    };
    match *read {
        DeviceInputs::Queue {
            query,
            positive,
            queue,
        } => vec![Problem {
            n_keys: queue.len,
            y_start: queue.start,
            pos: Some(positive.slice()),
            pos_kind: POS_NONE,
            grad_y: spec.grad_queue().then_some(2),
            grad_pos: Some(1),
            ..one(query, queue.keys)
        }],
        DeviceInputs::InBatch { embeddings } => vec![Problem {
            pos_kind: POS_PAIR,
            self_skip: true,
            grad_y: Some(0),
            ..one(embeddings, embeddings)
        }],
        DeviceInputs::Cross {
            query,
            key,
            targets,
        } => vec![Problem {
            targets,
            ..one(query, key)
        }],
        DeviceInputs::Symmetric { query, key } => vec![
            one(query, key),
            Problem {
                s_threshold: thresholds.get(1),
                offset: query.rows(),
                grad_x: Some(1),
                grad_y: Some(0),
                ..one(key, query)
            },
        ],
    }
}

/// Pass 4, one problem: the row pass, the merge and (with a key-side gradient) the column pass,
/// writing into `work` (the LSE into `work.lse[lse_index]`).
fn run_problem<T: DeviceElement>(
    gpu: &Gpu,
    base: &InfonceParams,
    prob: &Problem<'_, T>,
    work: &mut Work,
    lse_index: usize,
    dim: usize,
    with_grad: bool,
) -> Result<()> {
    let plan = plan_rows(prob.n_anchors, prob.n_keys, gpu.properties().sm_count)?;
    let mut parts = Partials::new(gpu, &plan, prob.n_anchors, dim, with_grad)?;
    // The struct's device pointers, with their guards: held until the three launches are queued.
    let mut bufs = Args::new(gpu);
    let mut p = *base;
    let ptrs = Pointers {
        lse: (base.variant != VARIANT_SIMPLE).then_some(lse_index),
        with_grad,
    };
    ptrs.fill(&mut p, &mut bufs, prob, work, &mut parts)?;
    p.n_anchors = prob.n_anchors as i64;
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
    // the struct laid out as in params.rs. Every pointer is a live buffer of this evaluation
    // guarded by `bufs` until the launches are queued: x, pos hold n_anchors × dim elements, y
    // holds y_cap × dim with y_start < y_cap and n_keys ≤ y_cap, targets n_anchors indices in
    // [0, n_keys), weights, losses, dτ (from `offset`), lse, dpos, scale and s_threshold
    // n_anchors floats, the partials chunks × n_anchors (× dim for part_acc) floats,
    // grad_x/grad_pos n_anchors × dim and grad_y n_keys × dim floats (checked by device_shape and
    // the allocations of `Work::new` and `Partials::new`); THREADS-thread blocks as the kernels
    // assume.
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
            merge_config(prob.n_anchors)?,
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

/// One problem's scratch: the row pass's per-chunk partials (max, sum, the positive's term and,
/// with gradients, the anchor-side accumulator) and the merge's per-anchor `dpos` and scale.
struct Partials {
    max: CudaSlice<f32>,
    sum: CudaSlice<f32>,
    pz: CudaSlice<f32>,
    acc: Option<CudaSlice<f32>>,
    dpos: CudaSlice<f32>,
    scale: CudaSlice<f32>,
}

impl Partials {
    fn new(gpu: &Gpu, plan: &RowsPlan, n: usize, dim: usize, with_grad: bool) -> Result<Self> {
        let parts = plan.chunks as usize * n;
        Ok(Partials {
            max: alloc_f32(gpu, parts)?,
            sum: alloc_f32(gpu, parts)?,
            pz: alloc_f32(gpu, parts)?,
            acc: with_grad.then(|| alloc_f32(gpu, parts * dim)).transpose()?,
            dpos: alloc_f32(gpu, n)?,
            scale: alloc_f32(gpu, n)?,
        })
    }
}

/// Which of the shared buffers a problem's kernels write: its LSE slot (none for the simple
/// variant) and whether gradients are on.
struct Pointers {
    lse: Option<usize>,
    with_grad: bool,
}

impl Pointers {
    /// Sets every pointer field of `p` from `bufs`, which keeps the buffers' guards.
    fn fill<'a, T: DeviceElement>(
        &self,
        p: &mut InfonceParams,
        bufs: &mut Args<'a>,
        prob: &'a Problem<'a, T>,
        work: &'a mut Work,
        parts: &'a mut Partials,
    ) -> Result<()> {
        let opt = |r: Option<Result<Ptr>>| r.unwrap_or(Ok(Ptr::NULL));
        p.x = bufs.read_ptr(prob.x, 0)?;
        p.y = bufs.read_ptr(prob.y, 0)?;
        p.pos = opt(prob.pos.map(|s| bufs.read_ptr(s, 0)))?;
        p.targets = opt(prob.targets.map(|s| bufs.read_ptr(s, 0)))?;
        p.s_threshold = opt(prob.s_threshold.map(|s| bufs.read_ptr(s, 0)))?;
        p.weights = bufs.read_ptr(&work.weights, prob.offset)?;
        p.part_max = bufs.write_ptr(&mut parts.max, 0)?;
        p.part_sum = bufs.write_ptr(&mut parts.sum, 0)?;
        p.part_pz = bufs.write_ptr(&mut parts.pz, 0)?;
        p.part_acc = opt(parts.acc.as_mut().map(|s| bufs.write_ptr(s, 0)))?;
        p.dpos = bufs.write_ptr(&mut parts.dpos, 0)?;
        p.scale = bufs.write_ptr(&mut parts.scale, 0)?;
        p.loss = bufs.write_ptr(&mut work.losses, prob.offset)?;
        p.lse = match self.lse {
            Some(i) => bufs.write_ptr(&mut work.lse[i], 0)?,
            None => Ptr::NULL,
        };
        p.dtau = opt(work.dtau.as_mut().map(|s| bufs.write_ptr(s, prob.offset)))?;
        if self.with_grad {
            let g: Vec<Ptr> = work
                .grads
                .iter_mut()
                .map(|s| bufs.write_ptr(s, 0))
                .collect::<Result<_>>()?;
            let at = |i: Option<usize>| i.map_or(Ptr::NULL, |i| g[i]);
            p.grad_x = at(prob.grad_x);
            p.grad_y = at(prob.grad_y);
            p.grad_pos = at(prob.grad_pos);
        }
        Ok(())
    }
}

/// Pass 5: the loss (the per-anchor losses themselves for `none`, else their mean or sum) and
/// `dL/dτ` for a learnable τ.
fn reduce(
    gpu: &Gpu,
    spec: &LossSpec,
    work: &Work,
    poison: bool,
) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
    let count = work.count;
    let sum = |x: &CudaSlice<f32>, factor: f64| -> Result<CudaSlice<f32>> {
        let mut out = alloc_f32(gpu, 1)?;
        if poison {
            fill_nan(gpu, &mut out)?;
        }
        let mut a = Args::new(gpu);
        a.read(x)
            .i64(count as i64)
            .f32(factor as f32)
            .write(&mut out);
        // SAFETY: infonce_reduce_f32(const float* x, int64_t n, float factor, float* out); x
        // holds ≥ count floats, out one; one block of REDUCE_THREADS (its shared array).
        unsafe {
            launch(
                gpu,
                "infonce_reduce",
                MODULE,
                "infonce_reduce_f32",
                reduce_config(),
                a,
            )
        }?;
        Ok(out)
    };
    let loss = match spec.reduction() {
        Reduction::None => work.losses.clone(),
        Reduction::Mean => sum(&work.losses, 1.0 / count as f64)?,
        Reduction::Sum if spec.mode() == Mode::Symmetric => sum(&work.losses, 0.5)?,
        Reduction::Sum => sum(&work.losses, 1.0)?,
    };
    let grad_temperature = work.dtau.as_ref().map(|d| sum(d, 1.0)).transpose()?;
    Ok((loss, grad_temperature))
}

/// Pass 6: each input's gradient from its f32 accumulator, through the normalisation (the raw
/// rows and the copy's inverse norms) when there is one, in the requested dtype; in input order,
/// the queue's only when the spec asks for it.
#[allow(clippy::too_many_arguments)]
fn finish<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    raw: &DeviceInputs<'_, T>,
    normalized: Option<&NormalizedInputs<T>>,
    work: &Work,
    dim: usize,
    opts: &DeviceOptions,
    poison: bool,
) -> Result<Vec<(&'static str, DeviceGrad<T>)>> {
    let rows = gradient_rows(spec, raw);
    let start = match *raw {
        DeviceInputs::Queue { queue, .. } => queue.start,
        _ => 0,
    };
    let mut out = Vec::new();
    for (i, (name, x)) in raw.matrices().into_iter().enumerate() {
        let is_queue = raw.mode() == Mode::Queue && i == 2;
        if is_queue && !spec.grad_queue() {
            continue;
        }
        let job = FinishJob {
            raw: x,
            inv_norm: normalized.map(|n| &n.inv_norms[i]),
            rows: rows[i],
            start: if is_queue { start } else { 0 },
        };
        out.push((
            name,
            finish_one(gpu, &job, &work.grads[i], dim, opts.grad_dtype, poison)?,
        ));
    }
    Ok(out)
}

/// One input gradient to finish: the raw rows (a ring for the queue), their normalisation.
struct FinishJob<'a, T: DeviceElement> {
    raw: &'a DeviceMatrix<T>,
    inv_norm: Option<&'a CudaSlice<f32>>,
    rows: usize,
    start: usize,
}

fn finish_one<T: DeviceElement>(
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
            DeviceGrad::F32(m) => fill_nan(gpu, m.slice_mut())?,
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
