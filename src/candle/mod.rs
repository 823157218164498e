//! The loss as a [candle](https://github.com/huggingface/candle) op (feature `candle`): a training
//! engine that holds candle tensors calls [`InfoNce::queue`], [`InfoNce::inbatch`],
//! [`InfoNce::cross`] or [`InfoNce::symmetric`] and gets the loss as a candle [`Tensor`] that
//! backpropagates (candle's `backward`) into every input and into a learnable temperature held as a
//! candle tensor (a [`candle_core::Var`] holding τ, or `ln τ` with [`InfoNce::with_log_temperature`]).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use fused_infonce::candle::InfoNce;
//! use fused_infonce::LossSpec;
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 16), &dev)?)?;
//! let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 16), &dev)?)?;
//! let tau = Var::new(0.07f32, &dev)?;
//! let spec = LossSpec::symmetric().normalize(true).build().map_err(candle_core::Error::wrap)?;
//! let loss = InfoNce::new(spec).with_temperature(tau.as_tensor())?.symmetric(&a, &b)?;
//! let grads = loss.backward()?;
//! assert!(grads.get(&a).is_some() && grads.get(&b).is_some() && grads.get(&tau).is_some());
//! # Ok(())
//! # }
//! ```
//!
//! # Devices and dtypes
//! - **CPU tensors** run the fast fused CPU backend ([`crate::cpu::evaluate`]) on the tensors' own
//!   memory (made contiguous first; no other copy), in f32, f16, bf16 or f64.
//! - **CUDA tensors** (feature `candle-cuda`) run the fused kernels ([`crate::cuda::evaluate_device`])
//!   on candle's own buffers and on candle's stream (`CudaDevice::cuda_stream`):
//!   each input's `CudaSlice` is borrowed in place ([`crate::cuda::DeviceMatrix::borrowed`], the
//!   same borrowed-matrix path as the raw-pointer entry point [`crate::cuda::raw::evaluate_raw`]),
//!   the results are wrapped as candle tensors without a copy, in f32, f16 or bf16; gradients stay
//!   on the device. The [`crate::cuda::Gpu`] of each candle device and stream (with its loaded
//!   kernel modules) is kept for the life of the process: a program that creates many candle CUDA
//!   devices keeps each one's context alive.
//!
//! The loss is always an f32 tensor: a 0-d scalar for reductions `mean` and `sum`, and for
//! `none` a vector of the per-anchor losses (N; inbatch 2N; symmetric the N row losses then the N
//! column losses). Each gradient comes back in its input's dtype and shape.
//!
//! # Forward and backward: eager for `mean`/`sum`, recompute for `none`
//! candle's custom ops return one tensor and give the backward no state from the forward, and a
//! custom op has at most three inputs (queue mode has three matrices and a temperature). So the
//! op is built in two parts:
//! 1. **One fused call** computes the loss and, when some input tracks gradients
//!    ([`Tensor::track_op`]), every gradient with upstream `g = 1` in the same pass (the fused
//!    kernels compute the loss and `∂L/∂q` in one sweep of the queue; computing them later would
//!    cost the similarities again). Untracked inputs (evaluation, a detached momentum encoder)
//!    make it forward only on CUDA.
//! 2. **An "attach" op per tracked input** (a `CustomOp2`, identity on the loss) chains the loss to
//!    that input; its backward hands the loss's upstream on and returns `g · ∂L/∂x`. For `mean` and
//!    `sum` the gradient is linear in the scalar upstream `g`, so scaling the eager gradient is
//!    exact, whatever candle does with the loss afterwards (a weight, a sum with other losses).
//!
//! With reduction `none` the upstream is one weight per anchor loss, and `Σ_i w_i ∂L_i/∂x` cannot
//! be had from the `g = 1` gradients. There the forward computes the loss only (on CUDA; the CPU
//! backend has no forward-only mode and its `g = 1` gradients are dropped), and the backward
//! **recomputes**: the first attach op's backward runs the fused evaluation once with
//! [`Upstream::PerAnchor`] (the upstream read back to the host) and every attach op of the loss
//! shares its result. The kernels' backward recomputes the similarities from the LSE anyway, so
//! this costs one forward sweep more than `mean`; keeping the LSE in the op would save only the
//! LSE pass and need a second entry point per path. The recomputation reads the inputs as they
//! are when the backward runs: write nothing in place into an input of a `none` loss (a
//! [`Queue::enqueue`], an optimiser step on a `Var` given directly to the loss) between its forward
//! and its backward. `mean` and `sum` losses, whose gradients are computed in the forward, do not
//! have this constraint.
//!
//! # Temperature
//! [`InfoNce::with_temperature`] takes a candle tensor of one element, typically a `Var` holding τ;
//! [`InfoNce::with_log_temperature`] a `Var` holding `ln τ` (τ = `exp` of it, always positive, the
//! parametrisation CLIP trains). Each call reads τ (on CUDA a 4-byte device-to-host copy, because
//! the kernels take τ as a launch argument) and evaluates the spec with a learnable temperature of
//! that value; `dL/dτ = −(1/τ) Σ (∂L/∂z) z` (`spec/losses.md`) flows into the tensor, and through
//! candle's `exp` into the log-temperature. The optimiser updates a `Var` in place, so an op built
//! once sees each step's value. A tensor *computed* from a `Var` (`log_tau.exp()?`) is a value
//! fixed when it was computed: given to `with_temperature` it would be used at every call while
//! the optimiser moved the `Var` behind it, so such an op must be rebuilt every step; use
//! `with_log_temperature` instead. Without a temperature tensor, the spec's own temperature is used
//! as it is (fixed, learnable without a tensor to update, or DySTreSS).
//!
//! # Gradients of the queue
//! MoCo detaches the queue: its gradient is computed only when the spec asks
//! ([`LossSpec::grad_queue`]); otherwise a queue that tracks gradients gets none from this op.
//!
//! # Errors
//! Every error is a candle error: this crate's [`crate::Error`] (shapes, parameters, the mode),
//! wrapped with [`candle_core::Error::wrap`] so its message is the crate's, and the op's own
//! checks (rank-2 inputs, one device, one dtype) phrased the same way.

#[cfg(feature = "candle-cuda")]
mod cuda;
mod queue;

pub use queue::Queue;

use std::sync::{Arc, Mutex};

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor};

use crate::error::Error;
use crate::loss::{check_targets, LossInputs, LossOutput, Upstream};
use crate::spec::{LossSpec, Mode, Reduction, Temperature};
use crate::tensor::{Element, MatRef};

/// This crate's error as a candle error (the message is the crate's).
pub(crate) fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The contrastive loss of a [`LossSpec`] as a candle op, with an optional learnable temperature
/// (a `Var` holding τ or `ln τ`). Cheap to clone; build it once and call it every step.
#[derive(Debug, Clone)]
pub struct InfoNce {
    spec: LossSpec,
    temperature: Option<Tau>,
}

/// Where a call's τ comes from.
#[derive(Debug, Clone)]
enum Tau {
    /// This tensor's value.
    Value(Tensor),
    /// `exp` of this tensor's value, recomputed at every call.
    Log(Tensor),
}

impl Tau {
    /// τ as a tensor of this call (a new `exp` node for [`Tau::Log`]).
    fn tensor(&self) -> candle_core::Result<Tensor> {
        match self {
            Tau::Value(t) => Ok(t.clone()),
            Tau::Log(t) => t.exp(),
        }
    }
}

impl InfoNce {
    /// The loss of `spec` (its mode fixes which of the four methods applies).
    pub fn new(spec: LossSpec) -> Self {
        Self {
            spec,
            temperature: None,
        }
    }

    /// Takes τ from `tau` (one element, any float dtype, on the inputs' device) at every call, and
    /// backpropagates `dL/dτ` into it. The spec's temperature must be fixed or learnable (its value
    /// is then ignored); DySTreSS has no single τ and is an error. `tau` is read at each call: a
    /// `Var` the optimiser updates in place is the intended argument; a tensor computed from one
    /// is fixed (module docs, *Temperature*): for `exp(ln τ)` use [`Self::with_log_temperature`].
    pub fn with_temperature(self, tau: &Tensor) -> candle_core::Result<Self> {
        self.with_tau(Tau::Value(tau.clone()))
    }

    /// Takes τ = `exp(log_tau)` at every call (`log_tau` one element, e.g. a `Var` holding `ln τ`,
    /// which keeps τ positive whatever the optimiser does), and backpropagates into `log_tau`
    /// (`dL/d ln τ = τ · dL/dτ`). The same conditions as [`Self::with_temperature`].
    pub fn with_log_temperature(self, log_tau: &Tensor) -> candle_core::Result<Self> {
        self.with_tau(Tau::Log(log_tau.clone()))
    }

    fn with_tau(mut self, t: Tau) -> candle_core::Result<Self> {
        let tau = match &t {
            Tau::Value(x) | Tau::Log(x) => x,
        };
        if let Temperature::Dystress { .. } = self.spec.temperature() {
            return Err(wrap(Error::parameter(
                "temperature",
                "a tensor",
                "a temperature tensor needs a fixed or learnable temperature in the spec, not \
                 DySTreSS",
            )));
        }
        if tau.elem_count() != 1 {
            return Err(wrap(Error::shape(
                "temperature",
                format!("{:?}", tau.dims()),
                "one element (a 0-d tensor or [1])",
            )));
        }
        self.temperature = Some(t);
        Ok(self)
    }

    /// The spec.
    pub fn spec(&self) -> &LossSpec {
        &self.spec
    }

    /// The temperature tensor given, if any (τ, or `ln τ` for [`Self::with_log_temperature`]).
    pub fn temperature(&self) -> Option<&Tensor> {
        self.temperature.as_ref().map(|t| match t {
            Tau::Value(x) | Tau::Log(x) => x,
        })
    }

    /// MoCo's queue loss: `query` Q (N×D), `positive` P (N×D), the negatives `queue` M (K×D,
    /// K ≥ 0; e.g. [`Queue::keys`]).
    pub fn queue(
        &self,
        query: &Tensor,
        positive: &Tensor,
        queue: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.apply(
            Mode::Queue,
            &[("query", query), ("positive", positive), ("queue", queue)],
            None,
        )
    }

    /// SimCLR's NT-Xent: `embeddings` E (2N×D), rows `a` and `a+N` a positive pair.
    pub fn inbatch(&self, embeddings: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(Mode::InBatch, &[("embeddings", embeddings)], None)
    }

    /// The one-directional loss of `query` A (N×D) against `key` B (M×D), with `targets` (N
    /// integer indices in `[0, M)`, any integer dtype, any device) or the default `y_i = i`.
    pub fn cross(
        &self,
        query: &Tensor,
        key: &Tensor,
        targets: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.apply(Mode::Cross, &[("query", query), ("key", key)], targets)
    }

    /// CLIP's symmetric loss of `query` A (N×D) and `key` B (N×D).
    pub fn symmetric(&self, query: &Tensor, key: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(Mode::Symmetric, &[("query", query), ("key", key)], None)
    }

    fn apply(
        &self,
        mode: Mode,
        given: &[(&'static str, &Tensor)],
        targets: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if mode != self.spec.mode() {
            return Err(wrap(Error::parameter(
                "mode",
                self.spec.mode().name(),
                format!("the inputs are for {} mode", mode.name()),
            )));
        }
        let (first_name, first) = given[0];
        let device = first.device().clone();
        let dtype = first.dtype();
        for &(name, t) in given {
            if t.rank() != 2 {
                return Err(wrap(Error::shape(
                    name,
                    format!("{:?}", t.dims()),
                    "[rows, D] (a matrix)",
                )));
            }
            if !t.device().same_device(&device) {
                return Err(wrap(Error::Input(format!(
                    "tensor `{name}` is on {:?} and `{first_name}` on {:?}: every input of the \
                     loss must be on one device",
                    t.device().location(),
                    device.location()
                ))));
            }
            if t.dtype() != dtype {
                return Err(wrap(Error::Input(format!(
                    "tensor `{name}` is {:?} and `{first_name}` {:?}: every input of the loss \
                     must have one dtype",
                    t.dtype(),
                    dtype
                ))));
            }
        }
        // The spec of this call: τ from the temperature tensor, if any.
        let tau = self.temperature.as_ref().map(Tau::tensor).transpose()?;
        let spec = match &tau {
            Some(tau) => {
                if !tau.device().same_device(&device) {
                    return Err(wrap(Error::Input(format!(
                        "the temperature is on {:?} and `{first_name}` on {:?}: every input of \
                         the loss must be on one device",
                        tau.device().location(),
                        device.location()
                    ))));
                }
                let v = tau.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
                self.spec
                    .with_temperature(Temperature::Learnable(v))
                    .map_err(wrap)?
            }
            None => self.spec.clone(),
        };
        let targets = match targets {
            Some(t) => {
                if t.rank() != 1 {
                    return Err(wrap(Error::shape(
                        "targets",
                        format!("{:?}", t.dims()),
                        "[N] (one target per query row)",
                    )));
                }
                if t.dtype().is_float() {
                    return Err(wrap(Error::Input(format!(
                        "tensor `targets` is {:?}: targets are integer indices",
                        t.dtype()
                    ))));
                }
                let t = t.to_dtype(DType::I64)?.to_vec1::<i64>()?;
                // On the host for every device: the device path does not check targets.
                check_targets(&t, given[0].1.dims()[0], given[1].1.dims()[0]).map_err(wrap)?;
                Some(t)
            }
            None => None,
        };
        let inputs = given
            .iter()
            .map(|(_, t)| t.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let call = Call {
            spec,
            names: given.iter().map(|(n, _)| *n).collect(),
            inputs,
            targets,
        };
        // Which inputs get a gradient from this op.
        let tracked: Vec<bool> = given
            .iter()
            .map(|(name, t)| t.track_op() && (*name != "queue" || call.spec.grad_queue()))
            .collect();
        let tau_tracked = tau.as_ref().is_some_and(Tensor::track_op);
        let any = tracked.iter().any(|&b| b) || tau_tracked;
        let eager = call.spec.reduction() != Reduction::None;
        let out = evaluate(&call, &Upstream::One, any && eager)?;
        if !any {
            return Ok(out.loss);
        }
        let mut loss = out.loss.clone();
        let lazy = (!eager).then(|| {
            Arc::new(Lazy {
                call,
                cache: Mutex::new(None),
            })
        });
        let grad = |which: usize, eager_grad: Option<&Tensor>| -> candle_core::Result<Grad> {
            match &lazy {
                Some(l) => Ok(Grad::Lazy(l.clone(), which)),
                None => eager_grad
                    .cloned()
                    .map(Grad::Eager)
                    .ok_or_else(|| wrap(Error::Input("a gradient was not computed".into()))),
            }
        };
        for (i, &(_, t)) in given.iter().enumerate() {
            if tracked[i] {
                let g = grad(i, out.grads.get(i).and_then(Option::as_ref))?;
                loss = loss.apply_op2(t, Attach { grad: g })?;
            }
        }
        if let (true, Some(tau)) = (tau_tracked, &tau) {
            let g = grad(given.len(), out.grad_temperature.as_ref())?;
            loss = loss.apply_op2(tau, Attach { grad: g })?;
        }
        Ok(loss)
    }
}

/// One evaluation's inputs, kept by a `none`-reduction loss for its backward.
struct Call {
    spec: LossSpec,
    names: Vec<&'static str>,
    /// Contiguous, in input order.
    inputs: Vec<Tensor>,
    targets: Option<Vec<i64>>,
}

/// What [`evaluate`] returns, as candle tensors on the inputs' device.
struct Evaluated {
    /// f32: 0-d (mean, sum) or one per anchor loss (none).
    loss: Tensor,
    /// f32, one per input in order (`None`: not computed, e.g. the queue without `grad_queue`).
    grads: Vec<Option<Tensor>>,
    /// f32, 0-d.
    grad_temperature: Option<Tensor>,
}

/// Runs the fused evaluation on the inputs' device; gradients only with `want_grads`.
fn evaluate(call: &Call, upstream: &Upstream, want_grads: bool) -> candle_core::Result<Evaluated> {
    match call.inputs[0].device() {
        Device::Cpu => cpu_evaluate(call, upstream),
        #[cfg(feature = "candle-cuda")]
        Device::Cuda(dev) => cuda::evaluate(dev, call, upstream, want_grads),
        other => {
            let _ = want_grads;
            Err(wrap(Error::Unsupported(format!(
                "the candle op runs on candle's CPU device{}, not on {:?}",
                if cfg!(feature = "candle-cuda") {
                    " and CUDA devices"
                } else {
                    " (CUDA tensors need the `candle-cuda` feature)"
                },
                other.location()
            ))))
        }
    }
}

/// The CPU path: [`crate::cpu::evaluate`] on the tensors' memory.
fn cpu_evaluate(call: &Call, upstream: &Upstream) -> candle_core::Result<Evaluated> {
    match call.inputs[0].dtype() {
        DType::F32 => cpu_typed::<f32>(call, upstream),
        DType::F64 => cpu_typed::<f64>(call, upstream),
        DType::F16 => cpu_typed::<half::f16>(call, upstream),
        DType::BF16 => cpu_typed::<half::bf16>(call, upstream),
        other => Err(unsupported_dtype(other, "f32, f16, bf16 or f64")),
    }
}

pub(crate) fn unsupported_dtype(d: DType, allowed: &str) -> candle_core::Error {
    wrap(Error::Unsupported(format!(
        "the loss takes {allowed} tensors, not {d:?}"
    )))
}

fn cpu_typed<T: Element + candle_core::WithDType>(
    call: &Call,
    upstream: &Upstream,
) -> candle_core::Result<Evaluated> {
    let guards: Vec<_> = call.inputs.iter().map(|t| t.storage_and_layout()).collect();
    let mut mats = Vec::with_capacity(guards.len());
    for ((storage, layout), name) in guards.iter().zip(&call.names) {
        let Storage::Cpu(s) = &**storage else {
            return Err(wrap(Error::Input(format!(
                "tensor `{name}` is not on the CPU"
            ))));
        };
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| wrap(Error::Input(format!("tensor `{name}` is not contiguous"))))?;
        let (rows, cols) = layout.shape().dims2()?;
        mats.push(MatRef::new(name, &s.as_slice::<T>()?[a..b], rows, cols).map_err(wrap)?);
    }
    let inputs = LossInputs::from_matrices(call.spec.mode(), &mats, call.targets.as_deref())
        .map_err(wrap)?;
    let out = crate::cpu::evaluate(&call.spec, &inputs, upstream).map_err(wrap)?;
    host_outputs(call, out, &Device::Cpu)
}

/// A [`LossOutput`] as f32 candle tensors on `device`.
fn host_outputs(call: &Call, out: LossOutput, device: &Device) -> candle_core::Result<Evaluated> {
    let values: Vec<f32> = out.loss.values().iter().map(|&x| x as f32).collect();
    let loss = match out.loss.scalar() {
        Some(_) => Tensor::new(values[0], device)?,
        None => {
            let n = values.len();
            Tensor::from_vec(values, n, device)?
        }
    };
    let grads = call
        .names
        .iter()
        .map(|name| {
            out.grad(name)
                .map(|m| {
                    let v: Vec<f32> = m.data.iter().map(|&x| x as f32).collect();
                    Tensor::from_vec(v, (m.rows, m.cols), device)
                })
                .transpose()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let grad_temperature = out
        .grad_temperature
        .map(|g| Tensor::new(g as f32, device))
        .transpose()?;
    Ok(Evaluated {
        loss,
        grads,
        grad_temperature,
    })
}

/// The backward of a `none`-reduction loss: one recomputation with the per-anchor upstream,
/// shared by the loss's attach ops (cached for the last upstream seen).
struct Lazy {
    call: Call,
    cache: Mutex<Option<(Vec<f64>, Evaluated)>>,
}

impl Lazy {
    /// The gradient of input `which` (`inputs.len()`: the temperature) for upstream `grad_res`.
    fn grad(&self, grad_res: &Tensor, which: usize) -> candle_core::Result<Tensor> {
        let w: Vec<f64> = grad_res
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.as_ref().is_none_or(|(seen, _)| *seen != w) {
            let out = evaluate(&self.call, &Upstream::PerAnchor(w.clone()), true)?;
            *cache = Some((w, out));
        }
        let (_, out) = cache.as_ref().expect("filled above");
        let g = if which == self.call.inputs.len() {
            out.grad_temperature.as_ref()
        } else {
            out.grads.get(which).and_then(Option::as_ref)
        };
        g.cloned()
            .ok_or_else(|| wrap(Error::Input("a gradient was not computed".into())))
    }
}

/// Where an attach op's gradient comes from.
enum Grad {
    /// Computed with the forward for upstream 1 (mean, sum): scaled by the scalar upstream.
    Eager(Tensor),
    /// Recomputed in the backward with the per-anchor upstream (none): input `.1` of `.0`.
    Lazy(Arc<Lazy>, usize),
}

/// Identity on the loss (its first argument); its backward passes the upstream on to the loss and
/// gives the second argument (an input of the loss, or the temperature) its gradient.
struct Attach {
    grad: Grad,
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        "fused-infonce"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = l1
            .contiguous_offsets()
            .ok_or_else(|| wrap(Error::Input("the loss is not contiguous".into())))?;
        Ok((
            CpuStorage::F32(s1.as_slice::<f32>()?[a..b].to_vec()),
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::identity(s1, l1)
    }

    fn bwd(
        &self,
        _loss: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = match &self.grad {
            Grad::Eager(g) => g.broadcast_mul(&grad_res.to_dtype(g.dtype())?)?,
            Grad::Lazy(lazy, which) => lazy.grad(grad_res, *which)?,
        };
        let g = g.reshape(x.shape())?.to_dtype(x.dtype())?;
        Ok((Some(grad_res.clone()), Some(g)))
    }
}

/// A tensor over a storage this module produced (no history).
#[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
pub(crate) fn from_storage(storage: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}
