//! The tensor-core (`mma.sync`) kernels of kernels/infonce_mma.cu, behind
//! [`evaluate_device_tc`] (the same signature as [`super::fused::evaluate_device`]).
//!
//! Written: f16/bf16 inputs, D = 64 or 128, the standard variant, fixed or learnable τ, every
//! reduction, in
//! - queue mode (MoCo): loss, LSE, `dq` and `dp` from one read of the queue (the
//!   flash-attention-2 forward with V = K; split over the queue, merged by a second small kernel),
//!   with optional gradient filtering ([`GradFilter::Threshold`]);
//! - inbatch, cross and symmetric modes: a row-LSE pass (and a column-LSE pass for symmetric),
//!   then a gradient pass per input that recomputes the logits and forms `g = ∂L/∂z` in registers
//!   before the tensor-core product into the gradient (f32 atomics across splits). Three (inbatch),
//!   five (cross) or six (symmetric) matrix products of N·K·D against the fused schedule's four; O(N)
//!   scratch.
//!
//! f32 inputs with [`DeviceOptions::tf32`] run on the f16 kernels after one rounding of the
//! inputs to f16 (TF32's 10-bit mantissa; the f16 range is checked), gradients in f32.
//!
//! Normalisation is composed rather than fused: kernels/normalize.cu normalises the inputs into
//! scratch copies, the loss runs on them, and the gradients go through its backward (one extra
//! read and write of the inputs).
//!
//! Everything else (exact f32, D ∉ {64, 128}, other variants, DySTreSS, the queue's gradient)
//! returns [`Error::Unsupported`] naming what is missing.
//!
//! Gradient filtering (queue mode): with `Threshold(θ)` a warp skips the `P·M` product of a 64-key
//! tile where every weight (relative to the running maximum, an upper bound of the final `P_ij`)
//! is below θ. Loss and LSE stay exact; `dq_i` changes by at most `w_i·α·θ·Σ_(j skipped) ‖m_j‖`,
//! i.e. `‖Δdq_i‖ ≤ w_i · θ · K / τ` for unit-norm queue rows ([`filter_bound`]). In the pair
//! modes' gradient pass a warp skips a tile holding no positive where every weight (`P`, and the
//! column loss's `P'`) is below θ: `‖Δdx_r‖ ≤ α·θ·Σ_(c skipped) (w_r + w_c)‖y_c‖`
//! ([`pair_filter_bound`]); the loss, LSE and dτ stay exact.
//!
//! Determinism: queue mode is bitwise reproducible (every sum runs in a fixed order). The pair
//! modes' gradients and dτ add f32 partials across column splits and warps with atomics, so they
//! can differ in the last bits from run to run (loss and LSE do not); the v1 kernels
//! ([`KernelPath::Simple`], and today [`KernelPath::Auto`]) are deterministic.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::Gpu;
use super::fused::{
    DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradDType, GradFilter, KernelPath,
    QueueView,
};
use super::kernels_v1::device_shape;
use super::launch;
use super::matrix::{DeviceElement, DeviceMatrix};
use super::normalize::{normalize_rows, normalize_rows_backward};
use super::unfused::{addr, cast_grad, reduce_losses, sum_scaled};
use crate::error::{Error, Result};
use crate::loss::Upstream;
use crate::spec::{LossSpec, Mode, Temperature, Variant};
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

/// The bound on the change of one row's gradient that [`GradFilter::Threshold`] can cause in the
/// pair modes: `θ · (w_row + w_col) · C · max‖y‖ / τ` for `cols` columns (`w_col` = 0 where there
/// is no column term).
pub fn pair_filter_bound(
    w_row: f64,
    w_col: f64,
    theta: f64,
    cols: usize,
    max_norm: f64,
    tau: f64,
) -> f64 {
    theta * (w_row + w_col) * cols as f64 * max_norm / tau
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
    let via_tf32 = match T::DTYPE {
        DType::F16 | DType::BF16 => false,
        DType::F32 if opts.tf32 => true,
        d => {
            return Err(unsupported(format!(
                "{d} inputs (f16 or bf16; f32 with tf32 opt-in)"
            )))
        }
    };
    let (cc_major, _) = gpu.properties().compute_capability;
    if cc_major < 8 {
        return Err(unsupported(
            "mma.sync bf16/f16 needs compute capability 8.0 or newer",
        ));
    }
    if spec.variant() != Variant::Standard {
        return Err(unsupported(format!("the {:?} variant", spec.variant())));
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
    // The shapes (the crate's one check) and what the tensor-core kernels support, before any
    // work (normalisation and the tf32 path's f16 rounding both launch kernels).
    let shape = device_shape(spec, inputs)?;
    if spec.grad_queue() {
        return Err(unsupported(
            "the queue's gradient (the backward pass is not written)",
        ));
    }
    if shape.dim != 64 && shape.dim != 128 {
        return Err(unsupported(format!("D = {} (64 or 128)", shape.dim)));
    }
    // Normalisation first (in the input dtype; for f32 before the tf32 path's rounding to f16,
    // so small or large rows are normalised exactly and then rounded as unit rows).
    if spec.normalize() {
        return normalized(gpu, spec, inputs, upstream, opts);
    }
    if via_tf32 {
        return tf32_via_f16(gpu, spec, inputs, upstream, opts);
    }
    let DeviceInputs::Queue {
        query,
        positive,
        queue,
    } = *inputs
    else {
        return pair_eval(gpu, spec, inputs, upstream, opts, tau, learnable, theta);
    };
    let (n, d) = (query.rows(), query.cols());
    let (cap, k) = (queue.keys.rows(), queue.len);

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

    let loss = reduce_losses(gpu, spec, loss_row, n)?;
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

/// Normalisation on the tensor-core path, composed rather than fused: the rows of every input
/// are normalised by kernels/normalize.cu into scratch copies (input dtype, so `u` is rounded once
/// to it), the loss runs on those, and each gradient is chained through the normalisation's
/// backward in f32 before the cast to the requested dtype. Costs one extra read and write of
/// the inputs (for queue mode the whole ring) and O((N + K)·D) scratch.
fn normalized<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
) -> Result<DeviceOutput<T>> {
    let plain = LossSpec::builder(spec.mode())
        .temperature_scheme(spec.temperature())
        .variant(spec.variant())
        .reduction(spec.reduction())
        .grad_queue(spec.grad_queue())
        .build()?;
    let inner = DeviceOptions {
        grad_dtype: GradDType::F32,
        ..*opts
    };
    let norm = |m: &DeviceMatrix<T>| normalize_rows(gpu, m);
    // (the original input, its inverse norms) per gradient name.
    let (out, sources) = match *inputs {
        DeviceInputs::Queue {
            query,
            positive,
            queue,
        } => {
            let ((uq, iq), (up, ip), (uk, _)) = (norm(query)?, norm(positive)?, norm(queue.keys)?);
            let view = QueueView {
                keys: &uk,
                start: queue.start,
                len: queue.len,
            };
            let i = DeviceInputs::Queue {
                query: &uq,
                positive: &up,
                queue: view,
            };
            let out = evaluate_device_tc::<T>(gpu, &plain, &i, upstream, &inner)?;
            (out, vec![("query", query, iq), ("positive", positive, ip)])
        }
        DeviceInputs::InBatch { embeddings } => {
            let (ue, ie) = norm(embeddings)?;
            let i = DeviceInputs::InBatch { embeddings: &ue };
            let out = evaluate_device_tc::<T>(gpu, &plain, &i, upstream, &inner)?;
            (out, vec![("embeddings", embeddings, ie)])
        }
        DeviceInputs::Cross {
            query,
            key,
            targets,
        } => {
            let ((ua, ia), (ub, ib)) = (norm(query)?, norm(key)?);
            let i = DeviceInputs::Cross {
                query: &ua,
                key: &ub,
                targets,
            };
            let out = evaluate_device_tc::<T>(gpu, &plain, &i, upstream, &inner)?;
            (out, vec![("query", query, ia), ("key", key, ib)])
        }
        DeviceInputs::Symmetric { query, key } => {
            let ((ua, ia), (ub, ib)) = (norm(query)?, norm(key)?);
            let i = DeviceInputs::Symmetric {
                query: &ua,
                key: &ub,
            };
            let out = evaluate_device_tc::<T>(gpu, &plain, &i, upstream, &inner)?;
            (out, vec![("query", query, ia), ("key", key, ib)])
        }
    };
    let grads = out
        .grads
        .into_iter()
        .map(|(name, g)| {
            let DeviceGrad::F32(du) = g else {
                return Err(unsupported(
                    "normalisation: an input-dtype gradient was returned",
                ));
            };
            let Some((_, x, inv)) = sources.iter().find(|(n, _, _)| *n == name) else {
                return Err(unsupported(format!(
                    "normalisation: unexpected gradient {name}"
                )));
            };
            let dx = normalize_rows_backward(gpu, x, inv, du.slice())?;
            let dx = DeviceMatrix::from_slice(dx, x.rows(), x.cols())?;
            Ok((name, cast_grad(gpu, dx, opts.grad_dtype)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DeviceOutput { grads, ..out })
}

/// f32 inputs with the TF32 opt-in: the inputs are rounded once to f16 (a 10-bit mantissa, TF32's
/// precision; unit-norm embeddings are far inside f16's range, which is checked) and run on the
/// f16 tensor-core kernels; gradients come back in f32. Costs one O((N + K)·D) conversion.
fn tf32_via_f16<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
) -> Result<DeviceOutput<T>> {
    use half::f16;
    debug_assert_eq!(T::DTYPE, DType::F32);
    let cfg = |n: usize| LaunchConfig {
        grid_dim: (
            n.div_ceil(256)
                .clamp(1, gpu.properties().sm_count.max(1) as usize * 8) as u32,
            1,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // Range check (f16 overflows above 65504): every input's max |x| into one buffer, one read.
    let check_range = |mats: &[(&'static str, &DeviceMatrix<T>)]| -> Result<()> {
        let stream = gpu.stream();
        let mut mx = stream.alloc_zeros::<u32>(mats.len())?;
        let f = gpu.function("unfused", "unfused_max_abs_f32")?;
        for (i, (_, m)) in mats.iter().enumerate() {
            let n = m.rows() * m.cols();
            if n == 0 {
                continue;
            }
            let (x, nn) = (addr(m.slice(), gpu), n as i64);
            let mut slot = mx.slice_mut(i..i + 1);
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&nn).arg(&mut slot);
            // SAFETY: (const float*, i64, unsigned*); T is f32 here, so x holds n floats; the
            // slot is one u32.
            unsafe { b.launch(cfg(n)) }?;
        }
        for ((name, _), bits) in mats.iter().zip(stream.clone_dtoh(&mx)?) {
            let max_abs = f32::from_bits(bits);
            if max_abs.is_nan() || max_abs > 65504.0 {
                return Err(unsupported(format!(
                    "tf32 path: `{name}` has |x| up to {max_abs}, outside the f16 range this \
                     path rounds through (normalise the rows, or use the exact f32 path)"
                )));
            }
        }
        Ok(())
    };
    let to_f16 = |m: &DeviceMatrix<T>| -> Result<DeviceMatrix<f16>> {
        let n = m.rows() * m.cols();
        let mut out = DeviceMatrix::<f16>::zeros(gpu, m.rows(), m.cols())?;
        if n == 0 {
            return Ok(out);
        }
        let (x, nn) = (addr(m.slice(), gpu), n as i64);
        let f = gpu.function("unfused", "unfused_cast_f16")?;
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(&x).arg(out.slice_mut()).arg(&nn);
        // SAFETY: (const float*, f16*, i64); x holds n f32, out n f16.
        unsafe { b.launch(cfg(n)) }?;
        gpu.check_launch("unfused_cast")?;
        Ok(out)
    };
    let inner = DeviceOptions {
        tf32: false,
        grad_dtype: super::fused::GradDType::F32,
        ..*opts
    };
    let out = match *inputs {
        DeviceInputs::Queue {
            query,
            positive,
            queue,
        } => {
            check_range(&[
                ("query", query),
                ("positive", positive),
                ("queue", queue.keys),
            ])?;
            let (q, p, m) = (to_f16(query)?, to_f16(positive)?, to_f16(queue.keys)?);
            let view = super::fused::QueueView {
                keys: &m,
                start: queue.start,
                len: queue.len,
            };
            let i = DeviceInputs::Queue {
                query: &q,
                positive: &p,
                queue: view,
            };
            evaluate_device_tc::<f16>(gpu, spec, &i, upstream, &inner)?
        }
        DeviceInputs::InBatch { embeddings } => {
            check_range(&[("embeddings", embeddings)])?;
            let e = to_f16(embeddings)?;
            let i = DeviceInputs::InBatch { embeddings: &e };
            evaluate_device_tc::<f16>(gpu, spec, &i, upstream, &inner)?
        }
        DeviceInputs::Cross {
            query,
            key,
            targets,
        } => {
            check_range(&[("query", query), ("key", key)])?;
            let (a, b) = (to_f16(query)?, to_f16(key)?);
            let i = DeviceInputs::Cross {
                query: &a,
                key: &b,
                targets,
            };
            evaluate_device_tc::<f16>(gpu, spec, &i, upstream, &inner)?
        }
        DeviceInputs::Symmetric { query, key } => {
            check_range(&[("query", query), ("key", key)])?;
            let (a, b) = (to_f16(query)?, to_f16(key)?);
            let i = DeviceInputs::Symmetric { query: &a, key: &b };
            evaluate_device_tc::<f16>(gpu, spec, &i, upstream, &inner)?
        }
    };
    let grads = out
        .grads
        .into_iter()
        .map(|(name, g)| match g {
            DeviceGrad::F32(m) => Ok((name, DeviceGrad::F32(m))),
            DeviceGrad::Input(_) => Err(unsupported("tf32 path: an f16 gradient was returned")),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DeviceOutput {
        loss: out.loss,
        lse: out.lse,
        lse_cols: out.lse_cols,
        grads,
        grad_temperature: out.grad_temperature,
    })
}

// kernels/infonce_mma.cu TargetKind.
const TGT_IDENTITY: i32 = 0;
const TGT_ARRAY: i32 = 1;
const TGT_HALF_SHIFT: i32 = 2;

/// One side of a pair problem: rows X against columns Y, with how row r's positive column is
/// found.
#[derive(Clone, Copy)]
struct Side {
    x: u64,
    rows: usize,
    y: u64,
    cols: usize,
    tgt_kind: i32,
    tgt: u64,
    half: i64,
    mask_self: bool,
}

/// The row LSE and per-row loss of one side (pass 1 and its merge).
fn pair_lse<T: DeviceElement>(
    gpu: &Gpu,
    side: &Side,
    d: usize,
    scale_log2: f32,
    alpha: f32,
    lse: u64,
    loss: u64,
) -> Result<()> {
    let stream = gpu.stream();
    let (splits, per) = queue_split(gpu.properties().sm_count, side.rows, side.cols);
    let part_m = stream.alloc_zeros::<f32>((splits * side.rows).max(1))?;
    let part_l = stream.alloc_zeros::<f32>((splits * side.rows).max(1))?;
    let (pm, pl) = (addr(&part_m, gpu), addr(&part_l, gpu));
    pair_launch::<T>(
        gpu, false, side, d, splits, per, scale_log2, pm, pl, [0; 4], 0.0, 0, 0, 0, 0.0,
    )?;
    const K: &str = "infonce_mma_pair_combine";
    let f = gpu.function(MODULE, &format!("{K}_{}", T::DTYPE.name()))?;
    let cfg = launch::checked(
        gpu,
        K,
        LaunchConfig {
            grid_dim: (launch::grid_dim(K, side.rows, 8)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
    )?;
    let (rows, dd, ss) = (side.rows as i64, d as i32, splits as i64);
    let mut b = stream.launch_builder(&f);
    b.arg(&side.x)
        .arg(&side.y)
        .arg(&rows)
        .arg(&dd)
        .arg(&ss)
        .arg(&pm)
        .arg(&pl)
        .arg(&alpha)
        .arg(&side.tgt_kind)
        .arg(&side.tgt)
        .arg(&side.half)
        .arg(&lse)
        .arg(&loss);
    // SAFETY: signature (const T*, const T*, i64, int, i64, const float*, const float*, float,
    // int, const i64*, i64, float*, float*); x holds rows×D, y cols×D, the partials
    // splits×rows, lse/loss rows floats; targets (kind ARRAY) rows indices < cols.
    unsafe { b.launch(cfg) }?;
    gpu.check_launch(K)?;
    drop((part_m, part_l));
    Ok(())
}

/// Launches pass 1 (`grad = false`) or pass 2 of the pair kernels. `terms` = (lse_row, w_row,
/// lse_col, w_col) device addresses (0 = term absent).
#[allow(clippy::too_many_arguments)]
fn pair_launch<T: DeviceElement>(
    gpu: &Gpu,
    grad: bool,
    side: &Side,
    d: usize,
    splits: usize,
    per: usize,
    scale_log2: f32,
    part_m: u64,
    part_l: u64,
    terms: [u64; 4],
    alpha: f32,
    dx: u64,
    dtau: u64,
    dtau_terms: i32,
    theta: f32,
) -> Result<()> {
    if splits == 0 {
        return Ok(());
    }
    const K: &str = "infonce_mma_pair";
    let name = format!(
        "infonce_mma_pair_{}_{}_d{d}",
        if grad { "grad" } else { "lse" },
        T::DTYPE.name()
    );
    let f = gpu.function(MODULE, &name)?;
    let cfg = launch::checked(
        gpu,
        K,
        LaunchConfig {
            grid_dim: (
                launch::grid_dim(K, side.rows, BLOCK_ROWS)?,
                u32::try_from(splits).map_err(|_| unsupported("too many splits"))?,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (STAGES * BLOCK_KEYS * d * 2) as u32,
        },
    )?;
    let (rows, cols, per64) = (side.rows as i64, side.cols as i64, per as i64);
    let mask = i32::from(side.mask_self);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&side.x)
        .arg(&rows)
        .arg(&side.y)
        .arg(&cols)
        .arg(&per64)
        .arg(&scale_log2)
        .arg(&mask)
        .arg(&side.tgt_kind)
        .arg(&side.tgt)
        .arg(&side.half)
        .arg(&part_m)
        .arg(&part_l)
        .arg(&terms[0])
        .arg(&terms[1])
        .arg(&terms[2])
        .arg(&terms[3])
        .arg(&alpha)
        .arg(&dx)
        .arg(&dtau)
        .arg(&dtau_terms)
        .arg(&theta);
    // SAFETY: signature (const T*, i64, const T*, i64, i64, float, int, int, const i64*, i64,
    // float*, float*, const float*, const float*, const float*, const float*, float, float*,
    // float*, int, float). x holds rows×D, y cols×D; pass 1 writes splits×rows partials; pass 2 reads
    // the row terms (rows floats) and column terms (cols floats) when non-null and adds into dx
    // (rows×D f32) and dtau (one f32, only when dtau_terms > 0). Shared memory ≤ 48 KiB.
    unsafe { b.launch(cfg) }?;
    gpu.check_launch(K)
}

/// Inbatch, cross and symmetric modes on the pair kernels (the caller checked the shapes and
/// D = 64 or 128).
#[allow(clippy::too_many_arguments)]
fn pair_eval<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
    tau: f64,
    learnable: bool,
    theta: f32,
) -> Result<DeviceOutput<T>> {
    let stream = gpu.stream();
    let alpha = (1.0 / tau) as f32;
    let scale_log2 = (std::f64::consts::LOG2_E / tau) as f32;
    let grads_on = !opts.forward_only;
    let alloc = |len: usize| stream.alloc_zeros::<f32>(len.max(1));

    // (forward side, the swapped side for the second gradient, the inputs' names and shapes).
    let (fwd, d, second): (Side, usize, Option<(Side, &'static str, usize)>) = match *inputs {
        DeviceInputs::InBatch { embeddings } => {
            let (r, d) = (embeddings.rows(), embeddings.cols());
            let e = addr(embeddings.slice(), gpu);
            let side = Side {
                x: e,
                rows: r,
                y: e,
                cols: r,
                tgt_kind: TGT_HALF_SHIFT,
                tgt: 0,
                half: (r / 2) as i64,
                mask_self: true,
            };
            (side, d, None)
        }
        DeviceInputs::Cross {
            query,
            key,
            targets,
        } => {
            let (n, d, m) = (query.rows(), query.cols(), key.rows());
            let (a, b) = (addr(query.slice(), gpu), addr(key.slice(), gpu));
            let (kind, t) = match targets {
                Some(t) => (TGT_ARRAY, addr(t, gpu)),
                None => (TGT_IDENTITY, 0),
            };
            let fwd = Side {
                x: a,
                rows: n,
                y: b,
                cols: m,
                tgt_kind: kind,
                tgt: t,
                half: 0,
                mask_self: false,
            };
            let swapped = Side {
                x: b,
                rows: m,
                y: a,
                cols: n,
                ..fwd
            };
            (fwd, d, Some((swapped, "key", m)))
        }
        DeviceInputs::Symmetric { query, key } => {
            let (n, d) = (query.rows(), query.cols());
            let (a, b) = (addr(query.slice(), gpu), addr(key.slice(), gpu));
            let fwd = Side {
                x: a,
                rows: n,
                y: b,
                cols: n,
                tgt_kind: TGT_IDENTITY,
                tgt: 0,
                half: 0,
                mask_self: false,
            };
            let swapped = Side { x: b, y: a, ..fwd };
            (fwd, d, Some((swapped, "key", n)))
        }
        DeviceInputs::Queue { .. } => unreachable!("queue mode is handled by the caller"),
    };
    let n = fwd.rows;
    let symmetric = spec.mode() == Mode::Symmetric;
    let losses = if symmetric { 2 * n } else { n };
    let w: Vec<f32> = upstream
        .weights(spec, losses)?
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let weights = stream.clone_htod(&w)?;
    let loss_each = alloc(losses)?;
    let lse = alloc(n)?;
    let (wp, lp) = (addr(&weights, gpu), addr(&loss_each, gpu));
    pair_lse::<T>(gpu, &fwd, d, scale_log2, alpha, addr(&lse, gpu), lp)?;
    let lse_cols = if symmetric {
        let lc = alloc(n)?;
        let (swapped, _, _) = second.expect("symmetric has a second side");
        pair_lse::<T>(
            gpu,
            &swapped,
            d,
            scale_log2,
            alpha,
            addr(&lc, gpu),
            lp + 4 * n as u64,
        )?;
        Some(lc)
    } else {
        None
    };

    let mut grads: Vec<(&'static str, DeviceGrad<T>)> = Vec::new();
    let dtau_acc = if learnable && grads_on {
        Some(alloc(1)?)
    } else {
        None
    };
    let dt = dtau_acc.as_ref().map_or(0, |s| addr(s, gpu));
    if grads_on {
        let lse_r = addr(&lse, gpu);
        let lse_c = lse_cols.as_ref().map_or(0, |s| addr(s, gpu));
        let w_c = wp + 4 * n as u64;
        let first_name = if spec.mode() == Mode::InBatch {
            "embeddings"
        } else {
            "query"
        };
        // dX of the first side: inbatch (G + Gᵀ)·E with one weight/LSE array for both terms;
        // cross G·B; symmetric (G_row + G_col)·B.
        let (terms, dterms) = match spec.mode() {
            Mode::InBatch => ([lse_r, wp, lse_r, wp], 1),
            Mode::Symmetric => ([lse_r, wp, lse_c, w_c], 2),
            _ => ([lse_r, wp, 0, 0], 2),
        };
        let dx = DeviceMatrix::<f32>::zeros(gpu, n, d)?;
        let (splits, per) = queue_split(gpu.properties().sm_count, fwd.rows, fwd.cols);
        let dtt = if learnable { dterms } else { 0 };
        pair_launch::<T>(
            gpu,
            true,
            &fwd,
            d,
            splits,
            per,
            scale_log2,
            0,
            0,
            terms,
            alpha,
            addr(dx.slice(), gpu),
            dt,
            dtt,
            theta,
        )?;
        grads.push((first_name, cast_grad(gpu, dx, opts.grad_dtype)?));
        if let Some((swapped, name, rows)) = second {
            // dY: the swapped problem; its "row" anchors are the column loss's (symmetric) and its
            // "column" anchors are the first side's rows.
            let terms = if symmetric {
                [lse_c, w_c, lse_r, wp]
            } else {
                [0, 0, lse_r, wp]
            };
            let dy = DeviceMatrix::<f32>::zeros(gpu, rows, d)?;
            let (splits, per) = queue_split(gpu.properties().sm_count, swapped.rows, swapped.cols);
            pair_launch::<T>(
                gpu,
                true,
                &swapped,
                d,
                splits,
                per,
                scale_log2,
                0,
                0,
                terms,
                alpha,
                addr(dy.slice(), gpu),
                0,
                0,
                theta,
            )?;
            grads.push((name, cast_grad(gpu, dy, opts.grad_dtype)?));
        }
    }

    let loss = reduce_losses(gpu, spec, loss_each, losses)?;
    let grad_temperature = match &dtau_acc {
        Some(acc) => {
            let out = alloc(1)?;
            // dL/dτ = −α² Σ g·s.
            sum_scaled(gpu, addr(acc, gpu), 1, -alpha * alpha, addr(&out, gpu))?;
            Some(out)
        }
        None => None,
    };
    Ok(DeviceOutput {
        loss,
        lse,
        lse_cols,
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
