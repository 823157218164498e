//! The tensor-core (`mma.sync`) kernels of kernels/infonce_mma.cu, behind
//! [`evaluate_device_tc`] (the same signature as [`super::fused::evaluate_device`]).
//!
//! Written so far: queue mode (MoCo), f16/bf16, D = 64 or 128, the standard variant, fixed or
//! learnable τ, every reduction: loss, LSE, `dq` and `dp` from one read of the queue (the
//! flash-attention-2 forward with V = K; split over the queue, merged by a second small kernel),
//! with optional gradient filtering ([`GradFilter::Threshold`]). Everything else returns
//! [`Error::Unsupported`] naming what is missing, so callers (KernelPath::Auto) can fall back.
//!
//! Gradient filtering: with `Threshold(θ)` a warp skips the `P·M` product of a 64-key tile where
//! every weight (relative to the running maximum, an upper bound of the final `P_ij`) is below θ.
//! Loss and LSE stay exact; `dq_i` changes by at most `w_i·α·θ·Σ_(j skipped) ‖m_j‖`, i.e.
//! `‖Δdq_i‖ ≤ w_i · θ · K / τ` for unit-norm queue rows ([`filter_bound`]).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::Gpu;
use super::fused::{DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradFilter, KernelPath};
use super::launch;
use super::matrix::{DeviceElement, DeviceMatrix};
use super::unfused::{addr, cast_grad, sum_scaled};
use crate::error::{Error, Result};
use crate::loss::Upstream;
use crate::spec::{LossSpec, Mode, Reduction, Temperature, Variant};
use crate::tensor::DType;

const MODULE: &str = "infonce_mma";
/// Queries per block (4 warps × 16 rows), keys per tile, pipeline stages (kernels/infonce_mma.cu).
const BLOCK_ROWS: usize = 64;
const BLOCK_KEYS: usize = 64;
const STAGES: usize = 3;
const THREADS: u32 = 128;
/// The merge kernel: one block per query row; at most `MAX_SPLITS` splits (its shared memory).
const COMBINE_THREADS: u32 = 128;
const MAX_SPLITS: usize = 1024;

/// The bound on the change of one anchor's `dq` that [`GradFilter::Threshold`] can cause, for
/// upstream weight `w`, threshold `theta`, `keys` queue rows of norm at most `max_key_norm`, and
/// temperature `tau`: `w · θ · K · max‖m‖ / τ`.
pub fn filter_bound(w: f64, theta: f64, keys: usize, max_key_norm: f64, tau: f64) -> f64 {
    w * theta * keys as f64 * max_key_norm / tau
}

/// How the queue is split across blocks: `(splits, keys_per_split)`, about two blocks per SM.
pub fn queue_split(sm_count: u32, anchors: usize, keys: usize) -> (usize, usize) {
    if keys == 0 {
        return (0, 0);
    }
    let row_tiles = anchors.div_ceil(BLOCK_ROWS).max(1);
    let tiles = keys.div_ceil(BLOCK_KEYS);
    let want = (2 * sm_count.max(1) as usize)
        .div_ceil(row_tiles)
        .clamp(1, tiles.min(MAX_SPLITS));
    let per = tiles.div_ceil(want) * BLOCK_KEYS;
    (keys.div_ceil(per), per)
}

fn unsupported(what: impl Into<String>) -> Error {
    Error::Unsupported(format!("tensor-core kernels: {}", what.into()))
}

/// Evaluates `spec` with the tensor-core kernels; [`Error::Unsupported`] where they do not apply
/// (see the module documentation for what is written).
pub fn evaluate_device_tc<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
) -> Result<DeviceOutput<T>> {
    if !matches!(opts.path, KernelPath::Auto | KernelPath::TensorCore) {
        return Err(unsupported(format!("asked for the {:?} path", opts.path)));
    }
    match T::DTYPE {
        DType::F16 | DType::BF16 => {}
        DType::F32 if opts.tf32 => {
            return Err(unsupported("the TF32 path for f32 is not written yet"))
        }
        d => {
            return Err(unsupported(format!(
                "{d} inputs (f16 or bf16; f32 with tf32 opt-in)"
            )))
        }
    }
    let (cc_major, _) = gpu.properties().compute_capability;
    if cc_major < 8 {
        return Err(unsupported(
            "mma.sync bf16/f16 needs compute capability 8.0 or newer",
        ));
    }
    if spec.variant() != Variant::Standard {
        return Err(unsupported(format!("the {:?} variant", spec.variant())));
    }
    if spec.normalize() {
        return Err(unsupported("fused normalisation"));
    }
    let (tau, learnable) = match spec.temperature() {
        Temperature::Fixed(t) => (t, false),
        Temperature::Learnable(t) => (t, true),
        other => return Err(unsupported(format!("temperature {other:?}"))),
    };
    let theta = match opts.filter {
        GradFilter::Exact => 0.0f32,
        GradFilter::Threshold(t) if t.is_finite() && t >= 0.0 => t,
        GradFilter::Threshold(t) => {
            return Err(Error::parameter(
                "filter threshold",
                t,
                "must be finite and >= 0",
            ))
        }
    };
    let DeviceInputs::Queue {
        query,
        positive,
        queue,
    } = *inputs
    else {
        return Err(unsupported(format!(
            "{} mode (only queue mode is written)",
            spec.mode().name()
        )));
    };
    if spec.mode() != Mode::Queue {
        return Err(Error::parameter(
            "mode",
            spec.mode().name(),
            "the inputs are for queue mode",
        ));
    }
    if spec.grad_queue() {
        return Err(unsupported(
            "the queue's gradient (the backward pass is not written)",
        ));
    }
    let (n, d) = (query.rows(), query.cols());
    if n == 0 || (positive.rows(), positive.cols()) != (n, d) {
        return Err(Error::shape(
            "positive",
            format!("[{}, {}]", positive.rows(), positive.cols()),
            format!("[{n}, {d}] (as query, N >= 1)"),
        ));
    }
    if d != 64 && d != 128 {
        return Err(unsupported(format!("D = {d} (64 or 128)")));
    }
    let cap = queue.keys.rows();
    let k = queue.len;
    if k > 0 && (queue.keys.cols() != d || queue.start >= cap || k > cap) {
        return Err(Error::shape(
            "queue",
            format!(
                "[{cap}, {}] view start {} len {k}",
                queue.keys.cols(),
                queue.start
            ),
            format!("D = {d}, start < capacity, len <= capacity"),
        ));
    }

    let stream = gpu.stream();
    let w: Vec<f32> = upstream
        .weights(spec, n)?
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let weights = stream.clone_htod(&w)?;
    let (splits, per) = queue_split(gpu.properties().sm_count, n, k);
    let alloc = |len: usize| stream.alloc_zeros::<f32>(len.max(1));
    let part_m = alloc(splits * n)?;
    let part_l = alloc(splits * n)?;
    let part_t = alloc(if learnable { splits * n } else { 0 })?;
    let part_o = alloc(splits * n * d)?;
    let alpha = (1.0 / tau) as f32;
    let scale_log2 = (std::f64::consts::LOG2_E / tau) as f32;

    if splits > 0 {
        let name = format!(
            "infonce_mma_queue_fwd_{}_d{d}{}",
            T::DTYPE.name(),
            if learnable { "_learn" } else { "" }
        );
        const K: &str = "infonce_mma_queue_fwd";
        let f = gpu.function(MODULE, &name)?;
        let cfg = launch::checked(
            gpu,
            K,
            LaunchConfig {
                grid_dim: (
                    launch::grid_dim(K, n, BLOCK_ROWS)?,
                    u32::try_from(splits).map_err(|_| unsupported("too many splits"))?,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: (STAGES * BLOCK_KEYS * d * 2) as u32,
            },
        )?;
        let (nn, cap64, start64, len64, per64) = (
            n as i64,
            cap as i64,
            queue.start as i64,
            k as i64,
            per as i64,
        );
        let pt = if learnable { addr(&part_t, gpu) } else { 0u64 };
        let mut b = stream.launch_builder(&f);
        b.arg(query.slice())
            .arg(&nn)
            .arg(queue.keys.slice())
            .arg(&cap64)
            .arg(&start64)
            .arg(&len64)
            .arg(&per64)
            .arg(&scale_log2)
            .arg(&theta)
            .arg(&part_m)
            .arg(&part_l)
            .arg(&pt)
            .arg(&part_o);
        // SAFETY: signature (const T*, i64, const T*, i64, i64, i64, i64, float, float, float*,
        // float*, float*, float*). query holds n×D, keys cap×D with start < cap and len <= cap
        // (checked), the partials splits×n (×D) floats; part_t is only written when learnable.
        // Shared memory: STAGES tiles of 64×D elements (≤ 48 KiB, no opt-in needed).
        unsafe { b.launch(cfg) }?;
        gpu.check_launch(K)?;
    }

    let grads_on = !opts.forward_only;
    let loss_row = alloc(n)?;
    let lse = alloc(n)?;
    let dq = DeviceMatrix::<f32>::zeros(gpu, n, d)?;
    let dp = DeviceMatrix::<f32>::zeros(gpu, n, d)?;
    let dtau_row = if learnable && grads_on {
        Some(alloc(n)?)
    } else {
        None
    };
    {
        const K: &str = "infonce_mma_queue_combine";
        let f = gpu.function(MODULE, &format!("{K}_{}", T::DTYPE.name()))?;
        let cfg = launch::checked(
            gpu,
            K,
            LaunchConfig {
                grid_dim: (launch::grid_dim(K, n, 1)?, 1, 1),
                block_dim: (COMBINE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        )?;
        let (nn, dd, ss) = (n as i64, d as i32, splits as i64);
        let pt = if learnable { addr(&part_t, gpu) } else { 0u64 };
        let dt = dtau_row.as_ref().map_or(0u64, |s| addr(s, gpu));
        let wg = i32::from(grads_on);
        let mut b = stream.launch_builder(&f);
        b.arg(query.slice())
            .arg(positive.slice())
            .arg(&nn)
            .arg(&dd)
            .arg(&ss)
            .arg(&part_m)
            .arg(&part_l)
            .arg(&pt)
            .arg(&part_o)
            .arg(&alpha)
            .arg(&weights)
            .arg(&loss_row)
            .arg(&lse)
            .arg(dq.slice())
            .arg(dp.slice())
            .arg(&dt)
            .arg(&wg);
        // SAFETY: signature (const T*, const T*, i64, int, i64, const float*, const float*,
        // const float*, const float*, float, const float*, float*, float*, float*, float*,
        // float*, int); q and p hold n×D, partials splits×n (×D), outputs n (×D) floats;
        // part_t / dtau_row are 0 (null) unless learnable, and then only read / written.
        unsafe { b.launch(cfg) }?;
        gpu.check_launch(K)?;
    }

    let loss = match spec.reduction() {
        Reduction::None => loss_row,
        Reduction::Mean | Reduction::Sum => {
            let c = Upstream::One
                .weights(spec, n)?
                .first()
                .copied()
                .unwrap_or(0.0);
            let out = alloc(1)?;
            sum_scaled(gpu, addr(&loss_row, gpu), n, c as f32, addr(&out, gpu))?;
            out
        }
    };
    let grad_temperature = match &dtau_row {
        Some(rows) => {
            let out = alloc(1)?;
            sum_scaled(gpu, addr(rows, gpu), n, -alpha, addr(&out, gpu))?;
            Some(out)
        }
        None => None,
    };
    let grads: Vec<(&'static str, DeviceGrad<T>)> = if grads_on {
        vec![
            ("query", cast_grad(gpu, dq, opts.grad_dtype)?),
            ("positive", cast_grad(gpu, dp, opts.grad_dtype)?),
        ]
    } else {
        Vec::new()
    };
    Ok(DeviceOutput {
        loss,
        lse,
        lse_cols: None,
        grads,
        grad_temperature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_queue_in_tiles() {
        for &(sm, n, k) in &[
            (132, 256, 65_536),
            (132, 4096, 1 << 20),
            (132, 7, 1),
            (80, 100, 1000),
        ] {
            let (s, per) = queue_split(sm, n, k);
            assert_eq!(per % BLOCK_KEYS, 0);
            assert!(
                s * per >= k && (s - 1) * per < k,
                "{sm} {n} {k}: {s} × {per}"
            );
        }
        assert_eq!(queue_split(132, 256, 0), (0, 0));
        // moco: 4 row tiles → about 66 splits of 1024 keys.
        assert_eq!(queue_split(132, 256, 65_536), (64, 1024));
    }

    #[test]
    fn filter_bound_scales() {
        assert_eq!(filter_bound(1.0, 0.0, 100, 1.0, 0.1), 0.0);
        assert!((filter_bound(0.5, 1e-6, 1000, 1.0, 0.2) - 2.5e-3).abs() < 1e-12);
    }
}
