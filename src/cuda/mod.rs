//! The CUDA backend. The folder reads like the call:
//!
//! - this module: [`evaluate_device`] (the device op: which path runs, nothing else) and
//!   [`evaluate`] / [`evaluate_on`], the host convenience on top of it (upload, run, download);
//! - [`op`]: the op's types ([`DeviceInputs`], [`DeviceOptions`], [`DeviceOutput`], …) and the
//!   one device shape check;
//! - [`paths`]: the kernel paths, each one `evaluate` (simple, tensor_core, unfused);
//! - [`steps`]: what the paths share (normalisation, hard-negative thresholds, the loss's
//!   reduction, dtype conversions);
//! - [`runtime`]: the device, embedded modules, device matrices, the launch layer, cuBLAS and the
//!   emulated device;
//! - [`raw`]: the op over raw device pointers and a raw `CUstream` (engines on another cudarc or
//!   in another language);
//! - [`queue`] (MoCo's ring buffer), [`metrics`] (the GPU metric kernels), [`mod@bench`] (presets and
//!   timing).
//!
//! Nothing here panics on a machine without CUDA: [`Gpu::new`] checks for the driver library first
//! and returns [`Error::NoCudaDriver`]; a build without nvcc returns [`Error::KernelsNotBuilt`].

pub mod bench;
pub mod metrics;
pub mod op;
pub mod paths;
pub mod queue;
pub mod raw;
pub mod runtime;
pub mod steps;

pub use op::{
    device_shape, DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradDType, GradFilter,
    KernelPath, QueueView,
};
pub use queue::NegativeQueue;
pub use runtime::{
    default_gpu, device_count, driver_present, driver_version, emulated, gpu_or_skip, list_devices,
    module, DeviceElement, DeviceMatrix, DeviceProperties, Gpu,
};

use crate::error::{Error, Result};
use crate::loss::{Gradient, LossInputs, LossOutput, LossValue, Upstream};
use crate::spec::{LossSpec, Mode, Reduction, Variant};
use crate::tensor::{DType, Element, MatRef, Matrix};

/// Evaluates `spec` on `inputs` on the first CUDA device: the same [`LossOutput`] as
/// [`crate::reference::evaluate`], computed by the fused kernels (f32 accumulation; inputs f32, f16 or
/// bf16 — f64 is [`Error::Unsupported`] here). Runs on the process's [`default_gpu`] (opened on
/// the first call and kept).
///
/// The inputs are checked with [`LossInputs::validate`] before the device is opened, so shape
/// errors are the CPU backend's, with or without a GPU.
pub fn evaluate<T: Element>(
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
) -> Result<LossOutput> {
    inputs.validate(spec)?;
    let gpu = default_gpu()?;
    evaluate_on(
        &gpu,
        spec,
        inputs,
        upstream,
        &DeviceOptions::default(),
        false,
    )
}

/// As [`evaluate`] on `gpu` with `opts` (gradients are always computed; `forward_only` is
/// ignored). `poison` fills every device output with NaN before the kernels run (a test hook, see
/// [`evaluate_device_poisoned`]).
pub fn evaluate_on<T: Element>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
    poison: bool,
) -> Result<LossOutput> {
    inputs.validate(spec)?;
    match T::DTYPE {
        DType::F32 => run::<T, f32>(gpu, spec, inputs, upstream, opts, poison),
        DType::F16 => run::<T, half::f16>(gpu, spec, inputs, upstream, opts, poison),
        DType::BF16 => run::<T, half::bf16>(gpu, spec, inputs, upstream, opts, poison),
        DType::F64 => Err(Error::Unsupported(
            "the cuda backend takes f32, f16 or bf16 inputs, not f64".into(),
        )),
    }
}

/// The same matrix viewed as `U` (`T` and `U` are the same type, checked by the caller's dtype
/// match; `cast_slice` checks the sizes).
fn recast<'a, T: Element, U: Element>(m: &MatRef<'a, T>) -> Result<MatRef<'a, U>> {
    let data: &'a [U] = bytemuck::try_cast_slice(m.data())
        .map_err(|e| Error::Input(format!("tensor `{}`: {e}", m.name())))?;
    MatRef::new(m.name(), data, m.rows(), m.cols())
}

fn run<T: Element, U: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
    poison: bool,
) -> Result<LossOutput> {
    let mats: Vec<DeviceMatrix<U>> = inputs
        .matrices()
        .iter()
        .map(|m| DeviceMatrix::upload(gpu, &recast::<T, U>(m)?))
        .collect::<Result<_>>()?;
    let targets = match inputs {
        LossInputs::Cross {
            targets: Some(t), ..
        } => Some(gpu.stream().clone_htod(*t)?),
        _ => None,
    };
    let dev = match inputs {
        LossInputs::Queue { .. } => DeviceInputs::Queue {
            query: &mats[0],
            positive: &mats[1],
            queue: QueueView::whole(&mats[2]),
        },
        LossInputs::InBatch { .. } => DeviceInputs::InBatch {
            embeddings: &mats[0],
        },
        LossInputs::Cross { .. } => DeviceInputs::Cross {
            query: &mats[0],
            key: &mats[1],
            targets: targets.as_ref(),
        },
        LossInputs::Symmetric { .. } => DeviceInputs::Symmetric {
            query: &mats[0],
            key: &mats[1],
        },
    };
    let opts = DeviceOptions {
        forward_only: false,
        ..*opts
    };
    let out = dispatch(gpu, spec, &dev, upstream, &opts, poison)?;
    download_output(gpu, spec, &out)
}

fn download_f32(gpu: &Gpu, s: &cudarc::driver::CudaSlice<f32>, len: usize) -> Result<Vec<f64>> {
    let v = gpu.stream().clone_dtoh(s)?;
    Ok(v.iter().take(len).map(|&x| x as f64).collect())
}

/// Copies a device result back into the CPU reference's [`LossOutput`] layout.
fn download_output<U: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    out: &DeviceOutput<U>,
) -> Result<LossOutput> {
    let symmetric = spec.mode() == Mode::Symmetric;
    let simple = matches!(spec.variant(), Variant::Simple { .. });
    let loss_all = download_f32(gpu, &out.loss, out.loss.len())?;
    let loss = match spec.reduction() {
        Reduction::Mean | Reduction::Sum => LossValue::Scalar(loss_all[0]),
        Reduction::None => {
            if symmetric {
                let n = loss_all.len() / 2;
                LossValue::Symmetric {
                    rows: loss_all[..n].to_vec(),
                    cols: loss_all[n..].to_vec(),
                }
            } else {
                LossValue::PerAnchor(loss_all)
            }
        }
    };
    let (lse, lse_cols) = if simple {
        (Vec::new(), symmetric.then(Vec::new))
    } else {
        let lse = download_f32(gpu, &out.lse, out.lse.len())?;
        let cols = match &out.lse_cols {
            Some(c) => Some(download_f32(gpu, c, c.len())?),
            None => None,
        };
        (lse, cols)
    };
    let mut grads = Vec::with_capacity(out.grads.len());
    for (name, g) in &out.grads {
        let (rows, cols, data) = match g {
            DeviceGrad::F32(m) => (
                m.rows(),
                m.cols(),
                m.download(gpu)?.iter().map(|&x| x as f64).collect(),
            ),
            DeviceGrad::Input(m) => (
                m.rows(),
                m.cols(),
                m.download(gpu)?.iter().map(|x| x.to_f64()).collect(),
            ),
        };
        grads.push(Gradient {
            name,
            value: Matrix { rows, cols, data },
        });
    }
    let grad_temperature = match &out.grad_temperature {
        Some(t) => Some(download_f32(gpu, t, 1)?[0]),
        None => None,
    };
    Ok(LossOutput {
        loss,
        lse,
        lse_cols,
        grads,
        grad_temperature,
    })
}

/// Evaluates `spec` on device inputs, leaving the results in device memory (queued on `gpu`'s
/// stream; nothing is synchronised except where an error must be reported, and in debug builds
/// after each launch).
///
/// Shapes are checked first (the rules of [`crate::LossInputs::validate`]; device `targets` are
/// not read back and must be in range). [`KernelPath::Auto`] and [`KernelPath::Simple`] run
/// [`paths::simple`] (every spec; `hard:k` first computes each anchor's threshold `s_(k)` with
/// [`steps::select::hard_thresholds`], an exact radix select over the same f32 similarities the
/// loss kernels compute); [`KernelPath::TensorCore`] runs [`paths::tensor_core`] and
/// [`KernelPath::Unfused`] the cuBLAS baseline [`paths::unfused`] (each an
/// [`Error::Unsupported`] for the specs it does not cover; the poisoning hook applies to the
/// simple path).
/// Conventions of the outputs:
/// - `loss`: one value (mean, sum) or the per-anchor losses (none; symmetric: N rows then N
///   columns, unhalved).
/// - `lse`: N values (2N for inbatch); for the simple variant a one-element placeholder with no
///   meaning (the driver cannot allocate zero bytes). `lse_cols`: symmetric mode only.
/// - `grads`: f32 or the input dtype ([`DeviceOptions::grad_dtype`]); the queue's gradient
///   (when [`LossSpec::grad_queue`]) has `len` rows in queue order (row j is ring row
///   `(start + j) mod capacity`).
/// - Bitwise reproducible: no float atomics; every sum runs in a fixed order.
pub fn evaluate_device<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
) -> Result<DeviceOutput<T>> {
    dispatch(gpu, spec, inputs, upstream, opts, false)
}

/// As [`evaluate_device`], with every output buffer filled with NaN before the kernels run: a test
/// hook that makes an output element no kernel writes show up as NaN.
pub fn evaluate_device_poisoned<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
) -> Result<DeviceOutput<T>> {
    dispatch(gpu, spec, inputs, upstream, opts, true)
}

fn dispatch<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
    poison: bool,
) -> Result<DeviceOutput<T>> {
    match opts.path {
        // Auto runs the v1 kernels: the tensor-core kernels become the default only once a GPU
        // report shows them passing the parity grid (they have not run on a device yet).
        KernelPath::Auto | KernelPath::Simple => {
            paths::simple::evaluate(gpu, spec, inputs, upstream, opts, poison)
        }
        KernelPath::TensorCore => paths::tensor_core::evaluate(gpu, spec, inputs, upstream, opts),
        KernelPath::Unfused => paths::unfused::evaluate(gpu, spec, inputs, upstream, opts),
    }
}
