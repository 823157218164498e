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

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::device::Gpu;
use super::fused::{
    DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradDType, GradFilter, KernelPath,
    QueueView,
};
use super::kernels_v1::device_shape;
use super::launch::{self, launch, Args};
use super::matrix::{DeviceElement, DeviceMatrix};
use super::normalize::{normalize_rows, normalize_rows_backward};
use super::unfused::{cast_grad, reduce_losses, sum_scaled};
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

/// The power of two the pair kernels scale the weights by before packing `g = w (P − onehot)`
/// into f16/bf16 for the gradient product (and divide the sums by after; exact): about
/// `1/max|w|`, so that `|g| ≤ 2` and mean weights (`w = 1/N`) times `P ≈ 1/N` stay in f16's
/// normal range instead of flushing to zero at large N.
pub fn weight_scale(w: &[f32]) -> f32 {
    let m = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    if !(m.is_finite() && m > 0.0) {
        return 1.0;
    }
    2f32.powi((-m.log2().floor() as i32).clamp(-100, 100))
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
    let mut part_m = alloc(splits * n)?;
    let mut part_l = alloc(splits * n)?;
    let mut part_t = alloc(if learnable { splits * n } else { 0 })?;
    let mut part_o = alloc(splits * n * d)?;
    let alpha = (1.0 / tau) as f32;
    let scale_log2 = (std::f64::consts::LOG2_E / tau) as f32;

    if splits > 0 {
        let name = format!(
            "infonce_mma_queue_fwd_{}_d{d}{}",
            T::DTYPE.name(),
            if learnable { "_learn" } else { "" }
        );
        const K: &str = "infonce_mma_queue_fwd";
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
            .f32(scale_log2)
            .f32(theta)
            .write(&mut part_m)
            .write(&mut part_l)
            .write_opt(learnable.then_some(&mut part_t))
            .write(&mut part_o);
        // SAFETY: infonce_mma_queue_fwd_<dtype>_d<D>[_learn](const T* q, int64_t n, const T* keys,
        // int64_t cap, int64_t qstart, int64_t qlen, int64_t keys_per_split, float scale_log2,
        // float filter_thr, float* part_m, float* part_l, float* part_t, float* part_o). query
        // holds n×D, keys cap×D with start < cap and len <= cap (checked), the partials splits×n
        // (×D) floats; part_t is null unless learnable. STAGES tiles of 64×D elements of dynamic
        // shared memory, THREADS threads.
        unsafe { launch(gpu, K, MODULE, &name, cfg, a) }?;
    }

    let grads_on = !opts.forward_only;
    let mut loss_row = alloc(n)?;
    let mut lse = alloc(n)?;
    let mut dq = DeviceMatrix::<f32>::zeros(gpu, n, d)?;
    let mut dp = DeviceMatrix::<f32>::zeros(gpu, n, d)?;
    let mut dtau_row = if learnable && grads_on {
        Some(alloc(n)?)
    } else {
        None
    };
    {
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
            .i64(splits as i64)
            .read(&part_m)
            .read(&part_l)
            .read_opt(learnable.then_some(&part_t))
            .read(&part_o)
            .f32(alpha)
            .read(&weights)
            .write(&mut loss_row)
            .write(&mut lse)
            .write(dq.slice_mut())
            .write(dp.slice_mut())
            .write_opt(dtau_row.as_mut())
            .i32(i32::from(grads_on));
        // SAFETY: infonce_mma_queue_combine_<dtype>(const T* q, const T* p, int64_t n, int d,
        // int64_t splits, const float* part_m, const float* part_l, const float* part_t,
        // const float* part_o, float alpha, const float* weights, float* loss_row, float* lse,
        // float* dq, float* dp, float* dtau_row, int write_grad); q and p hold n×D, the partials
        // splits×n (×D), the outputs n (×D) floats; part_t and dtau_row are null unless
        // learnable. One block of COMBINE_THREADS per row (its shared arrays: ≤ MAX_SPLITS).
        unsafe { launch(gpu, K, MODULE, &format!("{K}_{}", T::DTYPE.name()), cfg, a) }?;
    }

    let loss = reduce_losses(gpu, spec, loss_row, n)?;
    let grad_temperature = match &dtau_row {
        Some(rows) => {
            let mut out = alloc(1)?;
            sum_scaled(gpu, rows, n, -alpha, &mut out)?;
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
    let plain = spec.without_normalize();
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
        for (i, (_, m)) in mats.iter().enumerate() {
            let n = m.rows() * m.cols();
            if n == 0 {
                continue;
            }
            let mut a = Args::new(gpu);
            a.read(m.slice()).i64(n as i64).write_at(&mut mx, i)?;
            // SAFETY: unfused_max_abs_f32(const float* x, int64_t n, unsigned* out); T is f32
            // here, so x holds n floats; the slot is one zeroed u32 (an atomicMax of the bits).
            unsafe {
                launch(
                    gpu,
                    "unfused_max_abs",
                    "unfused",
                    "unfused_max_abs_f32",
                    cfg(n),
                    a,
                )
            }?;
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
        let mut a = Args::new(gpu);
        a.read(m.slice()).write(out.slice_mut()).i64(n as i64);
        // SAFETY: unfused_cast_f16(const float* x, f16* y, int64_t n); x holds n f32 (T is f32
        // here), out n f16.
        unsafe {
            launch(
                gpu,
                "unfused_cast",
                "unfused",
                "unfused_cast_f16",
                cfg(n),
                a,
            )
        }?;
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
struct Side<'a, T: DeviceElement> {
    x: &'a CudaSlice<T>,
    rows: usize,
    y: &'a CudaSlice<T>,
    cols: usize,
    tgt_kind: i32,
    tgt: Option<&'a CudaSlice<i64>>,
    half: i64,
    mask_self: bool,
}

impl<T: DeviceElement> Side<'_, T> {
    /// The same problem with rows and columns swapped (the second gradient's).
    fn swapped(&self) -> Self {
        Side {
            x: self.y,
            rows: self.cols,
            y: self.x,
            cols: self.rows,
            ..*self
        }
    }
}

impl<T: DeviceElement> Clone for Side<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: DeviceElement> Copy for Side<'_, T> {}

/// What the row and column terms of a gradient pass read: each an LSE array and a weight array
/// (with the element its anchors start at); `None` leaves the term out.
#[derive(Clone, Copy)]
struct Terms<'a> {
    row: Option<(&'a CudaSlice<f32>, &'a CudaSlice<f32>, usize)>,
    col: Option<(&'a CudaSlice<f32>, &'a CudaSlice<f32>, usize)>,
}

/// What one launch of the pair kernels computes: pass 1's per-split (max, sum), or pass 2's
/// gradient (and Σ g·s for dτ on `dtau_terms` of the terms).
enum Pass<'a> {
    Lse {
        part_m: &'a mut CudaSlice<f32>,
        part_l: &'a mut CudaSlice<f32>,
    },
    Grad {
        terms: Terms<'a>,
        dx: &'a mut CudaSlice<f32>,
        dtau: Option<(&'a mut CudaSlice<f32>, i32)>,
        w_scale: f32,
        theta: f32,
    },
}

/// Launches pass 1 or pass 2 of the pair kernels over `side`.
#[allow(clippy::too_many_arguments)]
fn pair_launch<T: DeviceElement>(
    gpu: &Gpu,
    side: &Side<'_, T>,
    d: usize,
    splits: usize,
    per: usize,
    scale_log2: f32,
    alpha: f32,
    pass: Pass<'_>,
) -> Result<()> {
    if splits == 0 {
        return Ok(());
    }
    const K: &str = "infonce_mma_pair";
    let grad = matches!(pass, Pass::Grad { .. });
    let name = format!(
        "infonce_mma_pair_{}_{}_d{d}",
        if grad { "grad" } else { "lse" },
        T::DTYPE.name()
    );
    let cfg = LaunchConfig {
        grid_dim: (
            launch::grid_dim(K, side.rows, BLOCK_ROWS)?,
            u32::try_from(splits).map_err(|_| unsupported("too many splits"))?,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: (STAGES * BLOCK_KEYS * d * 2) as u32,
    };
    let mut a = Args::new(gpu);
    a.read(side.x)
        .i64(side.rows as i64)
        .read(side.y)
        .i64(side.cols as i64)
        .i64(per as i64)
        .f32(scale_log2)
        .i32(i32::from(side.mask_self))
        .i32(side.tgt_kind)
        .read_opt(side.tgt)
        .i64(side.half);
    match pass {
        Pass::Lse { part_m, part_l } => {
            a.write(part_m).write(part_l);
            a.null()
                .null()
                .null()
                .null()
                .f32(0.0)
                .f32(1.0)
                .null()
                .null()
                .i32(0)
                .f32(0.0);
        }
        Pass::Grad {
            terms,
            dx,
            dtau,
            w_scale,
            theta,
        } => {
            a.null().null();
            for term in [terms.row, terms.col] {
                match term {
                    Some((lse, w, at)) => {
                        a.read(lse).read_at(w, at)?;
                    }
                    None => {
                        a.null().null();
                    }
                }
            }
            a.f32(alpha).f32(w_scale).write(dx);
            match dtau {
                Some((acc, n)) => a.write(acc).i32(n),
                None => a.null().i32(0),
            };
            a.f32(theta);
        }
    }
    // SAFETY: infonce_mma_pair_{lse,grad}_<dtype>_d<D>(const T* x, int64_t rows, const T* y,
    // int64_t cols, int64_t cols_per_split, float scale_log2, int mask_self, int tgt_kind,
    // const int64_t* tgt, int64_t half, float* part_m, float* part_l, const float* lse_row,
    // const float* w_row, const float* lse_col, const float* w_col, float alpha, float w_scale,
    // float* dx, float* dtau_acc, int dtau_terms, float filter_thr). x holds rows×D, y cols×D,
    // targets (kind ARRAY) rows indices < cols; pass 1 writes splits×rows partials; pass 2 reads
    // the row terms (rows floats) and column terms (cols floats) when given and adds into dx
    // (rows×D f32) and dtau (one f32, only when dtau_terms > 0). STAGES tiles of 64×D elements
    // of dynamic shared memory, THREADS threads.
    unsafe { launch(gpu, K, MODULE, &name, cfg, a) }
}

/// The row LSE and per-row loss of one side (pass 1 and its merge): `lse` gets `side.rows`
/// values, `loss` gets them from element `loss_at` on.
#[allow(clippy::too_many_arguments)]
fn pair_lse<T: DeviceElement>(
    gpu: &Gpu,
    side: &Side<'_, T>,
    d: usize,
    scale_log2: f32,
    alpha: f32,
    lse: &mut CudaSlice<f32>,
    loss: &mut CudaSlice<f32>,
    loss_at: usize,
) -> Result<()> {
    let stream = gpu.stream();
    let (splits, per) = queue_split(gpu.properties().sm_count, side.rows, side.cols);
    let mut part_m = stream.alloc_zeros::<f32>((splits * side.rows).max(1))?;
    let mut part_l = stream.alloc_zeros::<f32>((splits * side.rows).max(1))?;
    let pass = Pass::Lse {
        part_m: &mut part_m,
        part_l: &mut part_l,
    };
    pair_launch::<T>(gpu, side, d, splits, per, scale_log2, alpha, pass)?;
    const K: &str = "infonce_mma_pair_combine";
    let cfg = LaunchConfig {
        grid_dim: (launch::grid_dim(K, side.rows, 8)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = Args::new(gpu);
    a.read(side.x)
        .read(side.y)
        .i64(side.rows as i64)
        .i32(d as i32)
        .i64(splits as i64)
        .read(&part_m)
        .read(&part_l)
        .f32(alpha)
        .i32(side.tgt_kind)
        .read_opt(side.tgt)
        .i64(side.half)
        .write(lse)
        .write_at(loss, loss_at)?;
    // SAFETY: infonce_mma_pair_combine_<dtype>(const T* x, const T* y, int64_t rows, int d,
    // int64_t splits, const float* part_m, const float* part_l, float alpha, int tgt_kind,
    // const int64_t* tgt, int64_t half, float* lse_out, float* loss_out); x holds rows×D,
    // y cols×D, the partials splits×rows, lse rows floats and loss rows floats from `loss_at`;
    // targets (kind ARRAY) rows indices < cols; one warp per row, 8 per block.
    unsafe { launch(gpu, K, MODULE, &format!("{K}_{}", T::DTYPE.name()), cfg, a) }
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

    // The forward side, and the swapped side with the second input's name and rows.
    type Second<'s, T> = Option<(Side<'s, T>, &'static str, usize)>;
    let (fwd, d, second): (Side<'_, T>, usize, Second<'_, T>) = match *inputs {
        DeviceInputs::InBatch { embeddings } => {
            let r = embeddings.rows();
            let side = Side {
                x: embeddings.slice(),
                rows: r,
                y: embeddings.slice(),
                cols: r,
                tgt_kind: TGT_HALF_SHIFT,
                tgt: None,
                half: (r / 2) as i64,
                mask_self: true,
            };
            (side, embeddings.cols(), None)
        }
        DeviceInputs::Cross {
            query,
            key,
            targets,
        } => {
            let fwd = Side {
                x: query.slice(),
                rows: query.rows(),
                y: key.slice(),
                cols: key.rows(),
                tgt_kind: if targets.is_some() {
                    TGT_ARRAY
                } else {
                    TGT_IDENTITY
                },
                tgt: targets,
                half: 0,
                mask_self: false,
            };
            (fwd, query.cols(), Some((fwd.swapped(), "key", key.rows())))
        }
        DeviceInputs::Symmetric { query, key } => {
            let fwd = Side {
                x: query.slice(),
                rows: query.rows(),
                y: key.slice(),
                cols: key.rows(),
                tgt_kind: TGT_IDENTITY,
                tgt: None,
                half: 0,
                mask_self: false,
            };
            (fwd, query.cols(), Some((fwd.swapped(), "key", key.rows())))
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
    let w_scale = weight_scale(&w);
    let mut loss_each = alloc(losses)?;
    let mut lse = alloc(n)?;
    pair_lse::<T>(gpu, &fwd, d, scale_log2, alpha, &mut lse, &mut loss_each, 0)?;
    let lse_cols = if symmetric {
        let mut lc = alloc(n)?;
        let (swapped, _, _) = second.expect("symmetric has a second side");
        pair_lse::<T>(
            gpu,
            &swapped,
            d,
            scale_log2,
            alpha,
            &mut lc,
            &mut loss_each,
            n,
        )?;
        Some(lc)
    } else {
        None
    };

    let mut grads: Vec<(&'static str, DeviceGrad<T>)> = Vec::new();
    let mut dtau_acc = if learnable && grads_on {
        Some(alloc(1)?)
    } else {
        None
    };
    if grads_on {
        let first_name = if spec.mode() == Mode::InBatch {
            "embeddings"
        } else {
            "query"
        };
        // dX of the first side: inbatch (G + Gᵀ)·E with one weight/LSE array for both terms;
        // cross G·B; symmetric (G_row + G_col)·B. The column loss's weights start at element n.
        let row = Some((&lse, &weights, 0));
        let (terms, dterms) = match spec.mode() {
            Mode::InBatch => (Terms { row, col: row }, 1),
            Mode::Symmetric => (
                Terms {
                    row,
                    col: lse_cols.as_ref().map(|c| (c, &weights, n)),
                },
                2,
            ),
            _ => (Terms { row, col: None }, 2),
        };
        let mut dx = DeviceMatrix::<f32>::zeros(gpu, n, d)?;
        let (splits, per) = queue_split(gpu.properties().sm_count, fwd.rows, fwd.cols);
        let pass = Pass::Grad {
            terms,
            dx: dx.slice_mut(),
            dtau: dtau_acc.as_mut().map(|acc| (acc, dterms)),
            w_scale,
            theta,
        };
        pair_launch::<T>(gpu, &fwd, d, splits, per, scale_log2, alpha, pass)?;
        grads.push((first_name, cast_grad(gpu, dx, opts.grad_dtype)?));
        if let Some((swapped, name, rows)) = second {
            // dY: the swapped problem; its "row" anchors are the column loss's (symmetric) and its
            // "column" anchors are the first side's rows.
            let terms = Terms {
                row: if symmetric {
                    lse_cols.as_ref().map(|c| (c, &weights, n))
                } else {
                    None
                },
                col: row,
            };
            let mut dy = DeviceMatrix::<f32>::zeros(gpu, rows, d)?;
            let (splits, per) = queue_split(gpu.properties().sm_count, swapped.rows, swapped.cols);
            let pass = Pass::Grad {
                terms,
                dx: dy.slice_mut(),
                dtau: None,
                w_scale,
                theta,
            };
            pair_launch::<T>(gpu, &swapped, d, splits, per, scale_log2, alpha, pass)?;
            grads.push((name, cast_grad(gpu, dy, opts.grad_dtype)?));
        }
    }

    let loss = reduce_losses(gpu, spec, loss_each, losses)?;
    let grad_temperature = match &dtau_acc {
        Some(acc) => {
            let mut out = alloc(1)?;
            // dL/dτ = −α² Σ g·s.
            sum_scaled(gpu, acc, 1, -alpha * alpha, &mut out)?;
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
    fn weight_scale_is_a_power_of_two_near_the_inverse_maximum() {
        assert_eq!(weight_scale(&[1.0 / 8192.0; 3]), 8192.0);
        assert_eq!(weight_scale(&[0.3, -0.75]), 2.0);
        assert_eq!(weight_scale(&[1.0]), 1.0);
        assert_eq!(weight_scale(&[3.0]), 0.5);
        assert_eq!(weight_scale(&[0.0, 0.0]), 1.0);
        assert_eq!(weight_scale(&[]), 1.0);
        let s = weight_scale(&[1e-30]);
        assert!(s.is_finite() && s == 2f32.powi(100), "{s}");
    }

    #[test]
    fn filter_bound_scales() {
        assert_eq!(filter_bound(1.0, 0.0, 100, 1.0, 0.1), 0.0);
        assert!((filter_bound(0.5, 1e-6, 1000, 1.0, 0.2) - 2.5e-3).abs() < 1e-12);
    }
}
