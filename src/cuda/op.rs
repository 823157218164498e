//! The device op's types: what a call takes ([`DeviceInputs`], [`QueueView`], [`DeviceOptions`],
//! [`KernelPath`]) and what it leaves in device memory ([`DeviceOutput`], [`DeviceGrad`]), and the
//! one device shape check ([`device_shape`]). Every kernel path (`paths/`) evaluates over these
//! types; this module imports none of them.
//!
//! This is the API a training engine links against (through [`Gpu::from_stream`] it runs on the
//! engine's stream, in order with its other work) and the one the benchmarks time;
//! [`crate::cuda::evaluate`] is a host convenience on top of it (upload, run, download).
//!
//! [`Gpu::from_stream`]: super::runtime::Gpu::from_stream

use cudarc::driver::CudaSlice;

use super::runtime::{DeviceElement, DeviceMatrix};
use crate::error::{Error, Result};
use crate::loss::{check_shapes, InputDims, ProblemDims, Shape};
use crate::spec::{LossSpec, Mode};

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

impl<'a, T: DeviceElement> DeviceInputs<'a, T> {
    /// The loss mode these inputs are for.
    pub fn mode(&self) -> Mode {
        match self {
            DeviceInputs::Queue { .. } => Mode::Queue,
            DeviceInputs::InBatch { .. } => Mode::InBatch,
            DeviceInputs::Cross { .. } => Mode::Cross,
            DeviceInputs::Symmetric { .. } => Mode::Symmetric,
        }
    }

    /// The input matrices in gradient order, each with its gradient's name (as in
    /// [`crate::Gradient`]); the queue is its whole ring buffer.
    pub fn matrices(&self) -> Vec<(&'static str, &'a DeviceMatrix<T>)> {
        match *self {
            DeviceInputs::Queue {
                query,
                positive,
                queue,
            } => vec![
                ("query", query),
                ("positive", positive),
                ("queue", queue.keys),
            ],
            DeviceInputs::InBatch { embeddings } => vec![("embeddings", embeddings)],
            DeviceInputs::Cross { query, key, .. } | DeviceInputs::Symmetric { query, key } => {
                vec![("query", query), ("key", key)]
            }
        }
    }

    /// The same problem over other matrices (`mats` in [`Self::matrices`] order, each of the
    /// same shape: normalised copies, or copies in another dtype), keeping the queue's ring view
    /// and the targets.
    pub fn with_matrices<'b, U: DeviceElement>(
        &self,
        mats: &[&'b DeviceMatrix<U>],
    ) -> Result<DeviceInputs<'b, U>>
    where
        'a: 'b,
    {
        let want = self.matrices();
        if mats.len() != want.len()
            || mats
                .iter()
                .zip(&want)
                .any(|(m, (_, w))| (m.rows(), m.cols()) != (w.rows(), w.cols()))
        {
            return Err(Error::Input(format!(
                "with_matrices: {} matrices of shapes {:?} for inputs of shapes {:?}",
                mats.len(),
                mats.iter()
                    .map(|m| (m.rows(), m.cols()))
                    .collect::<Vec<_>>(),
                want.iter()
                    .map(|(_, m)| (m.rows(), m.cols()))
                    .collect::<Vec<_>>()
            )));
        }
        Ok(match *self {
            DeviceInputs::Queue { queue, .. } => DeviceInputs::Queue {
                query: mats[0],
                positive: mats[1],
                queue: QueueView {
                    keys: mats[2],
                    start: queue.start,
                    len: queue.len,
                },
            },
            DeviceInputs::InBatch { .. } => DeviceInputs::InBatch {
                embeddings: mats[0],
            },
            DeviceInputs::Cross { targets, .. } => DeviceInputs::Cross {
                query: mats[0],
                key: mats[1],
                targets,
            },
            DeviceInputs::Symmetric { .. } => DeviceInputs::Symmetric {
                query: mats[0],
                key: mats[1],
            },
        })
    }
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

/// Checks device inputs against `spec` with the crate's one shape check
/// ([`crate::loss::check_shapes`]; a queue counts its `len` keys in use, and its buffer must be D
/// wide even when empty) after what only a ring view has: `start < capacity`, `len <= capacity`.
/// Device targets are the caller's to keep in range (reading them back would cost a copy).
pub fn device_shape<T: DeviceElement>(
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
) -> Result<Shape> {
    let dims = |name: &'static str, m: &DeviceMatrix<T>| InputDims {
        name,
        rows: m.rows(),
        cols: m.cols(),
    };
    let problem = match *inputs {
        DeviceInputs::Queue {
            query,
            positive,
            queue,
        } => {
            let cap = queue.keys.rows();
            if queue.len > cap || (cap > 0 && queue.start >= cap) || (cap == 0 && queue.start != 0)
            {
                return Err(Error::shape(
                    "queue",
                    format!(
                        "ring start {} len {} in a buffer of {cap} rows",
                        queue.start, queue.len
                    ),
                    "start < capacity and len <= capacity",
                ));
            }
            ProblemDims::Queue {
                query: dims("query", query),
                positive: dims("positive", positive),
                queue: InputDims {
                    rows: queue.len,
                    ..dims("queue", queue.keys)
                },
            }
        }
        DeviceInputs::InBatch { embeddings } => ProblemDims::InBatch {
            embeddings: dims("embeddings", embeddings),
        },
        DeviceInputs::Cross {
            query,
            key,
            targets,
        } => ProblemDims::Cross {
            query: dims("query", query),
            key: dims("key", key),
            targets: targets.map(|t| t.len()),
        },
        DeviceInputs::Symmetric { query, key } => ProblemDims::Symmetric {
            query: dims("query", query),
            key: dims("key", key),
        },
    };
    check_shapes(spec, &problem)
}
