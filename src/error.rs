//! The crate's one error type.

use std::borrow::Cow;

/// Everything that can go wrong in this crate, from a missing driver to a tensor of the wrong shape.
///
/// Messages are one line, name the tensor or parameter at fault and say what was expected, so the
/// command-line program can print them as they are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CUDA driver library (`libcuda.so`) could not be found on this machine.
    #[error("no CUDA driver: libcuda could not be loaded on this machine (install the NVIDIA driver, or use the CPU backend)")]
    NoCudaDriver,

    /// The driver is present but reports no device (or not the one asked for).
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// The crate was built without nvcc, so no kernels are embedded.
    #[error("kernels not built: this build of fused-infonce embeds no CUDA kernels (nvcc was not found at build time; run scripts/install-nvcc and rebuild, or set NVCC)")]
    KernelsNotBuilt,

    /// The embedded kernels have no code the present device can run.
    #[error("no kernel image for this device: {0}")]
    NoKernelImage(String),

    /// A tensor has the wrong shape.
    #[error("shape error: tensor `{tensor}` has shape {got}, expected {expected}")]
    Shape {
        /// The tensor's name, as the user knows it (e.g. `query`).
        tensor: Cow<'static, str>,
        /// The shape that was given, e.g. `[4, 7]`.
        got: String,
        /// The shape that was expected, e.g. `[4, 128] (N x D, D as in query)`.
        expected: String,
    },

    /// A parameter is outside its allowed range.
    #[error("invalid parameter `{name}` = {value}: {allowed}")]
    Parameter {
        /// The parameter's name, e.g. `temperature`.
        name: Cow<'static, str>,
        /// The value that was given.
        value: String,
        /// The allowed range, in words, e.g. `must be finite and > 0`.
        allowed: String,
    },

    /// A non-finite value in an input tensor.
    #[error("non-finite value {value} in tensor `{tensor}` at row {row}, column {col} (pass --allow-nonfinite to let it propagate)")]
    NonFinite {
        /// The tensor's name.
        tensor: Cow<'static, str>,
        /// Row index.
        row: usize,
        /// Column index.
        col: usize,
        /// The value found (NaN, inf or -inf).
        value: f64,
    },

    /// A combination of options this backend does not support.
    #[error("not supported: {0}")]
    Unsupported(String),

    /// An invalid input file or tensor (missing tensor, unreadable dtype, bad safetensors).
    #[error("{0}")]
    Input(String),

    /// An error from the CUDA driver API.
    #[error("CUDA driver error: {}", driver_message(.0))]
    Driver(#[from] cudarc::driver::DriverError),

    /// An error from cuBLAS.
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),

    /// A launch configuration that exceeds the device's limits.
    #[error("launch configuration error for `{kernel}`: {reason}")]
    Launch {
        /// The kernel family.
        kernel: &'static str,
        /// What limit was exceeded.
        reason: String,
    },

    /// An I/O error (reading or writing a file).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A shape error for `tensor`.
    pub fn shape(
        tensor: impl Into<Cow<'static, str>>,
        got: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Error::Shape {
            tensor: tensor.into(),
            got: got.into(),
            expected: expected.into(),
        }
    }

    /// A parameter error for `name`.
    pub fn parameter(
        name: impl Into<Cow<'static, str>>,
        value: impl std::fmt::Display,
        allowed: impl Into<String>,
    ) -> Self {
        Error::Parameter {
            name: name.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

/// `CUDA_ERROR_X: the driver's description` (cudarc's own Display is its Debug form); out of
/// memory says what to do about it.
fn driver_message(e: &cudarc::driver::DriverError) -> String {
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "no description".into());
    let hint = if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        " (the inputs, gradients and scratch buffers do not fit in the device's free memory: use \
         a smaller batch or queue)"
    } else {
        ""
    };
    format!("{:?}: {text}{hint}", e.0)
}
