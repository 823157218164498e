//! # fused-infonce
//!
//! Fused CUDA kernels for the contrastive (InfoNCE) loss family — MoCo's queue loss, SimCLR's
//! NT-Xent, CLIP's symmetric loss — with every temperature scheme (fixed, learnable, DySTreSS) and
//! variant (standard, decoupled, hard negatives, simple), and an f64 CPU reference that is the oracle
//! for every kernel.
//!
//! The fused kernels compute the similarities, the temperature, the log-sum-exp and the gradients
//! tile by tile, so the N×K logit matrix is never written to device memory.
//!
//! ```
//! use fused_infonce::{reference, LossInputs, LossSpec, MatRef, Upstream};
//! // Two anchors, D = 2, a queue of three negatives.
//! let q = [1.0f32, 0.0, 0.0, 1.0];
//! let p = [0.9f32, 0.1, 0.1, 0.9];
//! let m = [0.0f32, 1.0, 1.0, 0.0, -1.0, 0.0];
//! let spec = LossSpec::queue().temperature(0.1).normalize(true).build()?;
//! let inputs = LossInputs::Queue {
//!     query: MatRef::new("query", &q, 2, 2)?,
//!     positive: MatRef::new("positive", &p, 2, 2)?,
//!     queue: MatRef::new("queue", &m, 3, 2)?,
//! };
//! let out = reference::evaluate(&spec, &inputs, &Upstream::One)?;
//! assert!(out.loss.scalar().unwrap() > 0.0);
//! # Ok::<(), fused_infonce::Error>(())
//! ```

#![warn(missing_docs)]

pub mod bench;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod error;
pub mod io;
pub mod loss;
pub mod metrics;
pub mod progress;
pub mod queue;
pub mod reference;
pub mod spec;
pub mod sweep;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use loss::{
    check_shapes, Gradient, InputDims, LossInputs, LossOutput, LossValue, ProblemDims, Shape,
    Upstream,
};
pub use spec::{DystressGrad, LossSpec, LossSpecBuilder, Mode, Reduction, Temperature, Variant};
pub use tensor::{DType, Element, MatRef, Matrix};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Re-exported so callers can name the half-precision types without depending on `half`.
pub use half::{bf16, f16};
