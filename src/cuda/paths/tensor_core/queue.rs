//! Queue mode (MoCo) on the tensor-core kernels (kernels/infonce_mma.cu): loss, LSE, `dq` and
//! `dp` from one read of the queue, the flash-attention-2 forward with V = K.
//!
//! `evaluate` runs, in this order:
//! 1. `forward`: `infonce_mma_queue_fwd_<dtype>_d<D>[_learn]`, a grid of query tiles × queue
//!    splits: per split the online (max, sum) of the logits, the softmax-weighted key sum
//!    (Σ p·m) and, for a learnable τ, Σ p·s — with optional gradient filtering;
//! 2. `combine`: `infonce_mma_queue_combine_<dtype>`, one block per query: the splits merged
//!    in order with the positive, giving the loss, LSE, `dq`, `dp` and the dτ terms;
//! 3. the reduction and dτ (steps::reduce), the gradients' dtype (steps::convert).
//!
//! Bitwise reproducible: every sum runs in a fixed order.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{queue_split, unsupported, Checked, BLOCK_KEYS, BLOCK_ROWS, COMBINE_THREADS, MODULE};
use super::{STAGES, THREADS};
use crate::cuda::op::{DeviceGrad, DeviceOptions, DeviceOutput, QueueView};
use crate::cuda::runtime::launch::{self, launch, Args};
use crate::cuda::runtime::{DeviceElement, DeviceMatrix, Gpu};
use crate::cuda::steps::convert::cast_grad;
use crate::cuda::steps::reduce::{reduce_losses, sum_scaled};
use crate::error::Result;
use crate::loss::Upstream;
use crate::spec::LossSpec;

/// The per-split partials of the forward pass.
struct Partials {
    splits: usize,
    m: CudaSlice<f32>,
    l: CudaSlice<f32>,
    /// Σ p·s (learnable τ; a placeholder otherwise).
    t: CudaSlice<f32>,
    /// Σ p·m, `splits × n × D`.
    o: CudaSlice<f32>,
}

/// What the combine leaves per query.
struct Combined {
    loss_row: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    dq: DeviceMatrix<f32>,
    dp: DeviceMatrix<f32>,
    dtau_row: Option<CudaSlice<f32>>,
}

/// Queue mode (the caller checked the spec, the shapes and D).
#[allow(clippy::too_many_arguments)]
pub(super) fn evaluate<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    query: &DeviceMatrix<T>,
    positive: &DeviceMatrix<T>,
    queue: QueueView<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
    c: &Checked,
) -> Result<DeviceOutput<T>> {
    let n = query.rows();
    let w: Vec<f32> = upstream
        .weights(spec, n)?
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let weights = gpu.stream().clone_htod(&w)?;
    let parts = forward(gpu, query, queue, c)?;
    let out = combine(
        gpu,
        query,
        positive,
        &parts,
        &weights,
        c,
        !opts.forward_only,
    )?;

    let loss = reduce_losses(gpu, spec, out.loss_row, n)?;
    let grad_temperature = match &out.dtau_row {
        Some(rows) => {
            let mut g = gpu.stream().alloc_zeros::<f32>(1)?;
            sum_scaled(gpu, rows, n, -c.alpha(), &mut g)?;
            Some(g)
        }
        None => None,
    };
    let grads: Vec<(&'static str, DeviceGrad<T>)> = if opts.forward_only {
        Vec::new()
    } else {
        vec![
            ("query", cast_grad(gpu, out.dq, opts.grad_dtype)?),
            ("positive", cast_grad(gpu, out.dp, opts.grad_dtype)?),
        ]
    };
    Ok(DeviceOutput {
        loss,
        lse: out.lse,
        lse_cols: None,
        grads,
        grad_temperature,
    })
}

/// Pass 1: the per-split partials over the queue (none for an empty queue).
fn forward<T: DeviceElement>(
    gpu: &Gpu,
    query: &DeviceMatrix<T>,
    queue: QueueView<'_, T>,
    c: &Checked,
) -> Result<Partials> {
    let (n, d) = (query.rows(), query.cols());
    let (cap, k) = (queue.keys.rows(), queue.len);
    let (splits, per) = queue_split(gpu.properties().sm_count, n, k);
    let alloc = |len: usize| gpu.stream().alloc_zeros::<f32>(len.max(1));
    let mut p = Partials {
        splits,
        m: alloc(splits * n)?,
        l: alloc(splits * n)?,
        t: alloc(if c.learnable { splits * n } else { 0 })?,
        o: alloc(splits * n * d)?,
    };
    if splits == 0 {
        return Ok(p);
    }
    const K: &str = "infonce_mma_queue_fwd";
    let name = format!(
        "{K}_{}_d{d}{}",
        T::DTYPE.name(),
        if c.learnable { "_learn" } else { "" }
    );
    let cfg = LaunchConfig {
        grid_dim: (
            launch::grid_dim(K, n, BLOCK_ROWS)?,
            u32::try_from(splits).map_err(|_| unsupported("too many splits"))?,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: (STAGES * BLOCK_KEYS * d * 2) as u32,
    };
    let mut a = Args::new(gpu);
    a.read(query.slice())
        .i64(n as i64)
        .read(queue.keys.slice())
        .i64(cap as i64)
        .i64(queue.start as i64)
        .i64(k as i64)
        .i64(per as i64)
        .f32(c.scale_log2())
        .f32(c.theta)
        .write(&mut p.m)
        .write(&mut p.l)
        .write_opt(c.learnable.then_some(&mut p.t))
        .write(&mut p.o);
    // SAFETY: infonce_mma_queue_fwd_<dtype>_d<D>[_learn](const T* q, int64_t n, const T* keys,
    // int64_t cap, int64_t qstart, int64_t qlen, int64_t keys_per_split, float scale_log2,
    // float filter_thr, float* part_m, float* part_l, float* part_t, float* part_o). query
    // holds n×D, keys cap×D with start < cap and len <= cap (checked), the partials splits×n
    // (×D) floats; part_t is null unless learnable. STAGES tiles of 64×D elements of dynamic
    // shared memory, THREADS threads.
    unsafe { launch(gpu, K, MODULE, &name, cfg, a) }?;
    Ok(p)
}

/// Pass 2: the splits merged per query with its positive.
fn combine<T: DeviceElement>(
    gpu: &Gpu,
    query: &DeviceMatrix<T>,
    positive: &DeviceMatrix<T>,
    p: &Partials,
    weights: &CudaSlice<f32>,
    c: &Checked,
    grads_on: bool,
) -> Result<Combined> {
    let (n, d) = (query.rows(), query.cols());
    let alloc = |len: usize| gpu.stream().alloc_zeros::<f32>(len.max(1));
    let mut out = Combined {
        loss_row: alloc(n)?,
        lse: alloc(n)?,
        dq: DeviceMatrix::<f32>::zeros(gpu, n, d)?,
        dp: DeviceMatrix::<f32>::zeros(gpu, n, d)?,
        dtau_row: (c.learnable && grads_on).then(|| alloc(n)).transpose()?,
    };
    const K: &str = "infonce_mma_queue_combine";
    let cfg = LaunchConfig {
        grid_dim: (launch::grid_dim(K, n, 1)?, 1, 1),
        block_dim: (COMBINE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = Args::new(gpu);
    a.read(query.slice())
        .read(positive.slice())
        .i64(n as i64)
        .i32(d as i32)
        .i64(p.splits as i64)
        .read(&p.m)
        .read(&p.l)
        .read_opt(c.learnable.then_some(&p.t))
        .read(&p.o)
        .f32(c.alpha())
        .read(weights)
        .write(&mut out.loss_row)
        .write(&mut out.lse)
        .write(out.dq.slice_mut())
        .write(out.dp.slice_mut())
        .write_opt(out.dtau_row.as_mut())
        .i32(i32::from(grads_on));
    // SAFETY: infonce_mma_queue_combine_<dtype>(const T* q, const T* p, int64_t n, int d,
    // int64_t splits, const float* part_m, const float* part_l, const float* part_t,
    // const float* part_o, float alpha, const float* weights, float* loss_row, float* lse,
    // float* dq, float* dp, float* dtau_row, int write_grad); q and p hold n×D, the partials
    // splits×n (×D), the outputs n (×D) floats; part_t and dtau_row are null unless
    // learnable. One block of COMBINE_THREADS per row (its shared arrays: ≤ MAX_SPLITS).
    unsafe { launch(gpu, K, MODULE, &format!("{K}_{}", T::DTYPE.name()), cfg, a) }?;
    Ok(out)
}
