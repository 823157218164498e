//! The CPU reference: plain, f64-accumulating, obviously correct. Every kernel is judged by it.

pub mod normalize;

use crate::error::Result;
use crate::loss::{LossInputs, LossOutput, Upstream};
use crate::spec::LossSpec;
use crate::tensor::Element;

/// Evaluates `spec` on `inputs` in f64: the loss, per-anchor LSEs and every gradient
/// (spec/losses.md, symbol by symbol).
pub fn evaluate<T: Element>(
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
) -> Result<LossOutput> {
    let _ = (spec, inputs, upstream);
    Err(crate::Error::Unsupported(
        "cpu::evaluate: not written yet".into(),
    ))
}
