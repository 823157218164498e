//! The tensor-core (`mma.sync`) kernels: kernels/infonce_mma.cu.

use super::device::Gpu;
use super::fused::{DeviceInputs, DeviceOptions, DeviceOutput};
use super::matrix::DeviceElement;
use crate::error::{Error, Result};
use crate::loss::Upstream;
use crate::spec::LossSpec;

/// Evaluates `spec` with the tensor-core kernels (same signature as
/// [`super::fused::evaluate_device`]).
pub fn evaluate_device_tc<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
) -> Result<DeviceOutput<T>> {
    let _ = (gpu, spec, inputs, upstream, opts);
    Err(Error::Unsupported(
        "tensor-core kernels: not written yet".into(),
    ))
}
