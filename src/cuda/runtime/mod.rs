//! What every kernel path runs on: the device and its context ([`device`]), the kernels embedded
//! at build time ([`module`]), device matrices ([`matrix`]), the one launch layer every kernel and
//! cuBLAS call goes through ([`mod@launch`]), cuBLAS ([`cublas`]), and the emulated CUDA device that
//! stands in for the driver where no GPU is ([`emulated`]).

pub mod cublas;
pub mod device;
pub mod emulated;
pub mod launch;
pub mod matrix;
pub mod module;

pub use device::{
    default_gpu, device_count, driver_present, driver_version, gpu_or_skip, list_devices,
    DeviceProperties, Gpu,
};
pub use launch::{launch, Args, Ptr};
pub use matrix::{DeviceElement, DeviceMatrix};
