//! The device-level loss op: inputs already in device memory, outputs left there.
//!
//! This is the API a training engine links against (through [`Gpu::from_stream`] it runs on the
//! engine's stream, in order with its other work) and the one the benchmarks time.
//! [`crate::cuda::evaluate`] is a host convenience on top of it (upload, run, download).
//!
//! Which kernels run is chosen by [`DeviceOptions::path`]: the simple v1 kernels (the baseline
//! every faster kernel is checked against), the tensor-core kernels, or the unfused
//! GEMM + softmax + GEMM baseline.

use cudarc::driver::CudaSlice;

use super::device::Gpu;
use super::matrix::{DeviceElement, DeviceMatrix};
use crate::error::Result;
use crate::loss::Upstream;
use crate::spec::LossSpec;

/// A queue of keys in device memory read in place: `len` rows starting at row `start` of the
/// `capacity × D` buffer `keys`, wrapping around its end (so a ring buffer that has wrapped is two
/// segments, and no copy is made).
#[derive(Debug, Clone, Copy)]
pub struct QueueView<'a, T: DeviceElement> {
    /// The ring's storage, `capacity × D`.
    pub keys: &'a DeviceMatrix<T>,
    /// The first (oldest) row of the queue.
    pub start: usize,
    /// How many rows the queue holds (`≤ capacity`; 0 is an empty queue).
    pub len: usize,
}

impl<'a, T: DeviceElement> QueueView<'a, T> {
    /// The whole matrix as a queue (start 0, every row).
    pub fn whole(keys: &'a DeviceMatrix<T>) -> Self {
        Self {
            keys,
            start: 0,
            len: keys.rows(),
        }
    }
}

/// Device inputs of one evaluation; the variant must match the spec's mode (shapes as
/// [`crate::LossInputs`]).
#[derive(Debug, Clone, Copy)]
pub enum DeviceInputs<'a, T: DeviceElement> {
    /// `query` (N×D), `positive` (N×D), `queue` (K×D, possibly a wrapped ring).
    Queue {
        /// Q.
        query: &'a DeviceMatrix<T>,
        /// P.
        positive: &'a DeviceMatrix<T>,
        /// M.
        queue: QueueView<'a, T>,
    },
    /// `embeddings` (2N×D).
    InBatch {
        /// E.
        embeddings: &'a DeviceMatrix<T>,
    },
    /// `query` (N×D), `key` (M×D), optional `targets` (N indices in `[0, M)`).
    Cross {
        /// A.
        query: &'a DeviceMatrix<T>,
        /// B.
        key: &'a DeviceMatrix<T>,
        /// y (checked on the host before upload by [`crate::cuda::evaluate`]; device callers
        /// must pass valid targets).
        targets: Option<&'a CudaSlice<i64>>,
    },
    /// `query` (N×D), `key` (N×D).
    Symmetric {
        /// A.
        query: &'a DeviceMatrix<T>,
        /// B.
        key: &'a DeviceMatrix<T>,
    },
}

/// Which kernels compute the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelPath {
    /// The kernels this crate recommends for the dtype and device. Today that is the v1 kernels
    /// for every input: the tensor-core kernels become Auto's choice for f16/bf16 once a GPU
    /// report shows them passing the parity grid (README, "Status"); ask for them with
    /// [`KernelPath::TensorCore`].
    #[default]
    Auto,
    /// The simple v1 kernels (CUDA cores, f32 accumulation): the baseline.
    Simple,
    /// The tensor-core (`mma.sync`) kernels; an error where they do not apply.
    TensorCore,
    /// The unfused baseline: cuBLAS GEMM to an f32 logit matrix, a softmax cross-entropy kernel,
    /// cuBLAS GEMMs for the gradients (what users write by hand; materialises N×K).
    Unfused,
}

/// The dtype gradients are returned in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradDType {
    /// f32 (default).
    #[default]
    F32,
    /// The inputs' dtype.
    Input,
}

/// How the backward treats tiles whose softmax weights are all tiny (Cut Cross-Entropy style).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum GradFilter {
    /// Never skip (exact; default).
    #[default]
    Exact,
    /// Skip the gradient products of a tile whose weights are all below the threshold.
    Threshold(f32),
}

/// Options of a device evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DeviceOptions {
    /// Which kernels run.
    pub path: KernelPath,
    /// The dtype of the returned gradients.
    pub grad_dtype: GradDType,
    /// Allow TF32 tensor cores for f32 inputs (opt-in; exact f32 is the default).
    pub tf32: bool,
    /// Gradient filtering in the backward (tensor-core path; the exact v1 kernels ignore it).
    pub filter: GradFilter,
    /// Compute only the forward (loss and LSE), no gradients.
    pub forward_only: bool,
}

/// A device gradient, in f32 or the input dtype.
#[derive(Debug)]
pub enum DeviceGrad<T: DeviceElement> {
    /// f32 gradient.
    F32(DeviceMatrix<f32>),
    /// Gradient in the input dtype.
    Input(DeviceMatrix<T>),
}

/// What a device evaluation leaves in device memory.
#[derive(Debug)]
pub struct DeviceOutput<T: DeviceElement> {
    /// The loss: one value (mean, sum), or one per anchor loss (none; symmetric: N rows then N
    /// columns).
    pub loss: CudaSlice<f32>,
    /// Per-anchor LSE of the row logits. The simple variant has none: the buffer is then a
    /// one-element placeholder without meaning (the driver cannot allocate zero bytes).
    pub lse: CudaSlice<f32>,
    /// Symmetric mode: per-column LSE.
    pub lse_cols: Option<CudaSlice<f32>>,
    /// One gradient per input, named as in [`crate::Gradient`], in input order (the queue's only
    /// when the spec asks); empty with [`DeviceOptions::forward_only`].
    pub grads: Vec<(&'static str, DeviceGrad<T>)>,
    /// `dL/dτ` (one f32) for a learnable temperature.
    pub grad_temperature: Option<CudaSlice<f32>>,
}

/// Evaluates `spec` on device inputs, leaving the results in device memory (queued on `gpu`'s
/// stream; nothing is synchronised except where an error must be reported, and in debug builds
/// after each launch).
///
/// Shapes are checked first (the rules of [`crate::LossInputs::validate`]; device `targets` are
/// not read back and must be in range). [`KernelPath::Auto`] and [`KernelPath::Simple`] run the
/// v1 kernels ([`super::kernels_v1`]); [`KernelPath::TensorCore`] runs
/// [`super::fast::evaluate_device_tc`] and [`KernelPath::Unfused`] the cuBLAS baseline
/// [`super::unfused::evaluate_device_unfused`] (each an [`crate::Error::Unsupported`] for the specs it
/// does not cover; the poisoning hook applies to the v1 kernels). `hard:k` (and HardSimple) first computes each anchor's threshold
/// `s_(k)` with [`super::select::hard_thresholds`] (an exact radix select over the same f32
/// similarities the loss kernels compute), then runs the standard (simple) kernels with it.
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

pub(crate) fn dispatch<T: DeviceElement>(
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
            super::kernels_v1::evaluate(gpu, spec, inputs, upstream, opts, poison)
        }
        KernelPath::TensorCore => {
            super::fast::evaluate_device_tc(gpu, spec, inputs, upstream, opts)
        }
        KernelPath::Unfused => {
            super::unfused::evaluate_device_unfused(gpu, spec, inputs, upstream, opts)
        }
    }
}
