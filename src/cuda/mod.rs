//! The CUDA backend: device handle, embedded kernels, device matrices and kernel launches.
//!
//! Nothing here panics on a machine without CUDA: [`Gpu::new`] checks for the driver library first
//! and returns [`Error::NoCudaDriver`]; a build without nvcc returns [`Error::KernelsNotBuilt`].

pub mod bench;
pub mod device;
pub mod emulated;
pub mod fast;
pub mod fused;
pub mod kernels_v1;
pub mod launch;
pub mod matrix;
pub mod metrics;
pub mod module;
pub mod normalize;
pub mod queue;
pub mod select;
pub mod unfused;

pub use device::{
    default_gpu, device_count, driver_present, driver_version, gpu_or_skip, list_devices,
    DeviceProperties, Gpu,
};
pub use fused::{
    evaluate_device, evaluate_device_poisoned, DeviceGrad, DeviceInputs, DeviceOptions,
    DeviceOutput, GradDType, GradFilter, KernelPath, QueueView,
};
pub use matrix::{DeviceElement, DeviceMatrix};
pub use queue::NegativeQueue;

use crate::error::{Error, Result};
use crate::loss::{Gradient, LossInputs, LossOutput, LossValue, Upstream};
use crate::spec::{LossSpec, Mode, Reduction, Variant};
use crate::tensor::{DType, Element, MatRef, Matrix};

/// Evaluates `spec` on `inputs` on the first CUDA device: the same [`LossOutput`] as
/// [`crate::cpu::evaluate`], computed by the fused kernels (f32 accumulation; inputs f32, f16 or
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
    let out = fused::dispatch(gpu, spec, &dev, upstream, &opts, poison)?;
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
