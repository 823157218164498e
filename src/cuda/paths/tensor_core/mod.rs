//! The tensor-core path: the `mma.sync` kernels of kernels/infonce_mma.cu, behind [`evaluate`]
//! (the same inputs and outputs as [`crate::cuda::evaluate_device`]).
//!
//! [`evaluate`] checks what the kernels support, then runs one of
//! - with normalisation, `normalized`: `normalize_fwd_<dtype>` into copies (steps::normalize),
//!   the loss on them, `normalize_bwd_<dtype>` per gradient;
//! - f32 with the tf32 opt-in, `tf32_via_f16`: `steps_max_abs_f32` (the f16 range check) and
//!   `steps_cast_f16` per input (steps::convert), then the f16 kernels;
//! - queue mode, `queue`'s passes (`infonce_mma_queue_fwd` → `infonce_mma_queue_combine`);
//! - inbatch, cross and symmetric, `pair`'s passes (`infonce_mma_pair_lse` →
//!   `infonce_mma_pair_combine` per side, then `infonce_mma_pair_grad` per input);
//!
//! then the reduction (`steps_sum_scaled`) and the gradients' dtype (`steps_cast_<dtype>`).
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

mod pair;
mod queue;

use half::f16;

use crate::cuda::op::{
    device_shape, DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradDType, GradFilter,
    KernelPath,
};
use crate::cuda::runtime::{DeviceElement, DeviceMatrix, Gpu};
use crate::cuda::steps::convert::{cast, cast_grad, max_abs};
use crate::cuda::steps::normalize::{normalize_inputs, normalize_rows_backward};
use crate::error::{Error, Result};
use crate::loss::Upstream;
use crate::spec::{LossSpec, Temperature, Variant};
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

/// What [`evaluate`]'s checks found: the temperature, whether it is learnable, the filter
/// threshold (0: exact), and whether f32 inputs go through f16.
#[derive(Debug, Clone, Copy)]
struct Checked {
    tau: f64,
    learnable: bool,
    theta: f32,
    via_tf32: bool,
}

impl Checked {
    /// `1/τ`.
    fn alpha(&self) -> f32 {
        (1.0 / self.tau) as f32
    }
    /// `log2(e)/τ`, the scale the kernels fold into one FMA before `exp2`.
    fn scale_log2(&self) -> f32 {
        (std::f64::consts::LOG2_E / self.tau) as f32
    }

    /// Everything the kernels need before any work: the path, dtype, device, variant,
    /// temperature, filter, shapes (the crate's one check), the queue's gradient and D.
    fn new<T: DeviceElement>(
        gpu: &Gpu,
        spec: &LossSpec,
        inputs: &DeviceInputs<'_, T>,
        opts: &DeviceOptions,
    ) -> Result<Self> {
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
        if gpu.properties().compute_capability.0 < 8 {
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
        let shape = device_shape(spec, inputs)?;
        if spec.grad_queue() {
            return Err(unsupported(
                "the queue's gradient (the backward pass is not written)",
            ));
        }
        if shape.dim != 64 && shape.dim != 128 {
            return Err(unsupported(format!("D = {} (64 or 128)", shape.dim)));
        }
        Ok(Checked {
            tau,
            learnable,
            theta,
            via_tf32,
        })
    }
}

/// Evaluates `spec` with the tensor-core kernels; [`Error::Unsupported`] where they do not apply
/// (see the module documentation for what is written).
pub fn evaluate<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
) -> Result<DeviceOutput<T>> {
    let c = Checked::new(gpu, spec, inputs, opts)?;
    // Normalisation first (in the input dtype; for f32 before the tf32 path's rounding to f16,
    // so small or large rows are normalised exactly and then rounded as unit rows).
    if spec.normalize() {
        return normalized(gpu, spec, inputs, upstream, opts);
    }
    if c.via_tf32 {
        return tf32_via_f16(gpu, spec, inputs, upstream, opts);
    }
    match *inputs {
        DeviceInputs::Queue {
            query,
            positive,
            queue,
        } => queue::evaluate(gpu, spec, query, positive, queue, upstream, opts, &c),
        _ => pair::evaluate(gpu, spec, inputs, upstream, opts, &c),
    }
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
    let copies = normalize_inputs(gpu, inputs)?;
    let inner = DeviceOptions {
        grad_dtype: GradDType::F32,
        ..*opts
    };
    let out = evaluate(
        gpu,
        &spec.without_normalize(),
        &copies.inputs(inputs)?,
        upstream,
        &inner,
    )?;
    let raws = inputs.matrices();
    let grads =
        out.grads
            .into_iter()
            .map(|(name, g)| {
                let DeviceGrad::F32(du) = g else {
                    return Err(unsupported(
                        "normalisation: an input-dtype gradient was returned",
                    ));
                };
                let i = raws.iter().position(|(n, _)| *n == name).ok_or_else(|| {
                    unsupported(format!("normalisation: unexpected gradient {name}"))
                })?;
                let x = raws[i].1;
                let dx = normalize_rows_backward(gpu, x, &copies.inv_norms[i], du.slice())?;
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
    let mats = inputs.matrices();
    let maxima = max_abs(gpu, &mats.iter().map(|(_, m)| *m).collect::<Vec<_>>())?;
    for ((name, _), max) in mats.iter().zip(maxima) {
        if max.is_nan() || max > 65504.0 {
            return Err(unsupported(format!(
                "tf32 path: `{name}` has |x| up to {max}, outside the f16 range this path rounds \
                 through (normalise the rows, or use the exact f32 path)"
            )));
        }
    }
    let copies = mats
        .iter()
        .map(|(_, m)| cast::<T, f16>(gpu, m))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&DeviceMatrix<f16>> = copies.iter().collect();
    let inner = DeviceOptions {
        tf32: false,
        grad_dtype: GradDType::F32,
        ..*opts
    };
    let out = evaluate::<f16>(gpu, spec, &inputs.with_matrices(&refs)?, upstream, &inner)?;
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
