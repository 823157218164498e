//! The CUDA backend: device handle, embedded kernels, device matrices and kernel launches.
//!
//! Nothing here panics on a machine without CUDA: [`Gpu::new`] checks for the driver library first
//! and returns [`Error::NoCudaDriver`]; a build without nvcc returns [`Error::KernelsNotBuilt`].

pub mod device;
pub mod fused;
pub mod launch;
pub mod matrix;
pub mod metrics;
pub mod module;
pub mod normalize;
pub mod select;

pub use device::{
    device_count, driver_present, driver_version, gpu_or_skip, list_devices, DeviceProperties, Gpu,
};
pub use fused::{
    evaluate_device, DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, GradDType, GradFilter,
    KernelPath, QueueView,
};
pub use matrix::{DeviceElement, DeviceMatrix};

use crate::error::{Error, Result};
use crate::loss::{LossInputs, LossOutput, Upstream};
use crate::spec::LossSpec;
use crate::tensor::Element;

/// Evaluates `spec` on `inputs` on the first CUDA device: the same [`LossOutput`] as
/// [`crate::cpu::evaluate`], computed by the fused kernels.
pub fn evaluate<T: Element>(
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
) -> Result<LossOutput> {
    let _gpu = Gpu::new(0)?;
    let _ = (spec, inputs, upstream);
    Err(Error::Unsupported("cuda::evaluate: not written yet".into()))
}
