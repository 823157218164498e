//! The CPU reference: plain, f64-accumulating, obviously correct. Every kernel is judged by it.
//!
//! [`evaluate`] follows spec/losses.md symbol by symbol:
//!
//! 1. [`LossInputs::validate`] (the one shape check) and [`Upstream::weights`] (the per-anchor
//!    weights `w_i`, the mean's `1/N` and symmetric's ½ included);
//! 2. every input row is read into f64 (via [`Element::to_f64`], one generic path for every dtype)
//!    and L2-normalised when the spec asks;
//! 3. per anchor (in parallel with rayon): the similarities `s = a · b`, the logits
//!    `z = s / τ(s)`, the LSE by running max (negatives in chunks merged with [`LsePartial`]),
//!    the loss and `w_i ∂L_i/∂s` for the positive and every negative;
//! 4. the embedding gradients from `∂s/∂a = b`, `∂s/∂b = a`, chained through the normalisation.
//!
//! Conventions:
//! - Anchor losses: `queue` and `cross` have N, `inbatch` 2N (row `a`'s positive is row
//!   `(a+N) mod 2N`), `symmetric` 2N: the row losses `i = 0..N` (anchor `a_i`, positive `b_i`),
//!   then the column losses `j = 0..N` (anchor `b_j`, positive `a_j`). Rows and columns select
//!   their hard negatives separately.
//! - Reductions: `mean` is the mean over anchors, `sum` the sum; in `symmetric` mode `sum` is
//!   ½(Σ rows + Σ cols) and `mean` is ½(mean rows + mean cols). `none` returns the per-anchor losses
//!   ([`LossValue::PerAnchor`]; symmetric: the unhalved row and column losses in
//!   [`LossValue::Symmetric`]) and takes one upstream weight per anchor loss (2N in symmetric mode:
//!   rows then columns).
//! - `lse`: per anchor, the LSE of the loss's denominator: positive and (selected) negatives for
//!   standard and `hard:k`, the negatives only for `decoupled`; symmetric adds `lse_cols`
//!   (`Some` exactly in symmetric mode). The simple variant has no exponentials: `lse` is empty
//!   (and `lse_cols` is `Some` of an empty vector in symmetric mode).
//! - An empty queue (K = 0) gives the standard loss 0, LSE = `z+`, zero gradients.
//! - `hard:k`: `s_(k)` is the k-th largest negative *similarity* of the anchor; every negative with
//!   `s ≥ s_(k)` is kept (ties all kept, so more than k may be); `k ≥ #negatives` is the standard
//!   loss. Ordering uses `f64::total_cmp`, so NaN never panics.
//! - `simple:λ`: `−s+ + λ Σ_(selected) s_j`, no temperature; the default λ is
//!   `1/#(selected negatives)`, and with no negatives the loss is `−s+`. `grad_temperature` is
//!   `Some(0.0)` when the temperature is learnable.
//! - DySTreSS applies `τ(s)` to every logit, the positive included; the gradient through `τ(s)`
//!   follows [`crate::Temperature::dz_ds`] (`detach` or `full`).
//! - `grad_temperature` is `dL/dτ` for a learnable τ, `None` otherwise.
//! - Gradients are with respect to the tensors as given (through the optional normalisation), in
//!   input order; the queue's only when [`LossSpec::grad_queue`].
//! - Non-finite inputs are not rejected here (the command line checks them unless told not to):
//!   NaN propagates into the loss and gradients as in PyTorch, and nothing panics.

pub(crate) mod anchor;
pub mod lse;
pub mod normalize;
pub(crate) mod problem;

pub use lse::LsePartial;

use crate::error::{Error, Result};
use crate::loss::{Gradient, LossInputs, LossOutput, LossValue, Upstream};
use crate::spec::{LossSpec, Mode, Reduction};
use crate::tensor::{Element, Matrix};
use anchor::{anchor_loss, AnchorOut};
use normalize::normalize_rows_backward;
use problem::{Problem, Rows};
use rayon::prelude::*;

/// Evaluates `spec` on `inputs` in f64: the loss, per-anchor LSEs and every gradient
/// (spec/losses.md, symbol by symbol; conventions in the [module docs](self)).
///
/// `upstream` is the gradient of the reduced loss (a scalar for `mean`/`sum`, one weight per
/// anchor loss for `none`). Errors: every shape and parameter error of [`LossInputs::validate`]
/// and [`Upstream::weights`]; nothing here panics on bad input.
pub fn evaluate<T: Element>(
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
) -> Result<LossOutput> {
    evaluate_impl(spec, inputs, upstream, usize::MAX)
}

/// As [`evaluate`], with each anchor's negatives split into chunks of `chunk` whose LSE partials
/// ([`LsePartial`]) are merged: the structure of the GPU kernels and of streamed or sharded queues.
/// Equal to [`evaluate`] up to floating-point reassociation (about 1e-15 relative).
///
/// Errors as [`evaluate`], and [`Error::Parameter`] for `chunk = 0`.
pub fn evaluate_chunked<T: Element>(
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
    chunk: usize,
) -> Result<LossOutput> {
    if chunk == 0 {
        return Err(Error::parameter("chunk", 0, "must be >= 1"));
    }
    evaluate_impl(spec, inputs, upstream, chunk)
}

fn evaluate_impl<T: Element>(
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
    chunk: usize,
) -> Result<LossOutput> {
    let problem = Problem::build(spec, inputs, spec.normalize())?;
    let count = problem.anchors.len();
    let weights = upstream.weights(spec, count)?;
    let temp = spec.temperature();
    let variant = spec.variant();

    // Per anchor: the loss, the LSE, w ∂L/∂s, and the anchor row's own gradient Σ_c (w ∂L/∂s_c) key_c.
    let per_anchor: Vec<(AnchorOut, Vec<f64>)> = problem
        .anchors
        .par_iter()
        .zip(weights.par_iter())
        .map(|(def, &w)| {
            let a = problem.row(def.anchor);
            let keys = &problem.mats[def.negatives.mat];
            let s_pos = problem.sim(def.anchor, def.positive);
            let s_neg: Vec<f64> = def
                .negatives
                .rows()
                .map(|r| problem::dot(a, keys.row(r)))
                .collect();
            let out = anchor_loss(s_pos, &s_neg, &temp, &variant, w, chunk);
            let mut da: Vec<f64> = problem
                .row(def.positive)
                .iter()
                .map(|p| out.d_pos * p)
                .collect();
            for (r, &d) in def.negatives.rows().zip(&out.d_neg) {
                if d != 0.0 {
                    for (g, k) in da.iter_mut().zip(keys.row(r)) {
                        *g += d * k;
                    }
                }
            }
            (out, da)
        })
        .collect();

    // Scatter into the gradients of the (normalised) rows.
    let wanted: Vec<bool> = problem
        .mats
        .iter()
        .enumerate()
        .map(|(m, _)| !(spec.mode() == Mode::Queue && m == 2 && !spec.grad_queue()))
        .collect();
    let mut du: Vec<Matrix> = problem
        .mats
        .iter()
        .map(|m| Matrix::zeros(m.rows, m.cols))
        .collect();
    for (def, (out, da)) in problem.anchors.iter().zip(&per_anchor) {
        add(&mut du[def.anchor.mat], def.anchor.row, 1.0, da);
        let a = problem.row(def.anchor);
        if wanted[def.positive.mat] {
            add(&mut du[def.positive.mat], def.positive.row, out.d_pos, a);
        }
        if wanted[def.negatives.mat] {
            for (r, &d) in def.negatives.rows().zip(&out.d_neg) {
                if d != 0.0 {
                    add(&mut du[def.negatives.mat], r, d, a);
                }
            }
        }
    }
    let grads: Vec<Gradient> = problem
        .mats
        .iter()
        .zip(du)
        .zip(&wanted)
        .filter(|(_, &w)| w)
        .map(|((m, g), _)| Gradient {
            name: m.name,
            value: chain_normalize(m, g),
        })
        .collect();

    let losses: Vec<f64> = per_anchor.iter().map(|(o, _)| o.loss).collect();
    let simple = matches!(variant, crate::Variant::Simple { .. });
    let lses: Vec<f64> = if simple {
        Vec::new()
    } else {
        per_anchor
            .iter()
            .map(|(o, _)| o.lse.unwrap_or(f64::NAN))
            .collect()
    };
    let symmetric = spec.mode() == Mode::Symmetric;
    let n = problem.shape.anchors;
    let (lse, lse_cols) = if symmetric {
        let (r, c) = lses.split_at(lses.len().min(n));
        (r.to_vec(), Some(c.to_vec()))
    } else {
        (lses, None)
    };
    let loss = reduce(&losses, spec.reduction(), symmetric);
    let grad_temperature = temp
        .is_learnable()
        .then(|| per_anchor.iter().map(|(o, _)| o.d_tau).sum());
    Ok(LossOutput {
        loss,
        lse,
        lse_cols,
        grads,
        grad_temperature,
    })
}

/// `g[row] += scale * v`.
fn add(g: &mut Matrix, row: usize, scale: f64, v: &[f64]) {
    for (x, y) in g.row_mut(row).iter_mut().zip(v) {
        *x += scale * y;
    }
}

/// The gradient with respect to the rows as given: through the normalisation when it was applied.
fn chain_normalize(m: &Rows, du: Matrix) -> Matrix {
    match &m.inv_norm {
        Some(inv) => Matrix {
            rows: du.rows,
            cols: du.cols,
            data: normalize_rows_backward(&m.data, inv, &du.data, m.cols),
        },
        None => du,
    }
}

/// The reduction of the per-anchor losses (symmetric: rows then columns, see the module docs).
pub(crate) fn reduce(losses: &[f64], reduction: Reduction, symmetric: bool) -> LossValue {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    if symmetric {
        let (rows, cols) = losses.split_at(losses.len() / 2);
        match reduction {
            Reduction::Mean => LossValue::Scalar(0.5 * (mean(rows) + mean(cols))),
            Reduction::Sum => LossValue::Scalar(0.5 * (sum(rows) + sum(cols))),
            Reduction::None => LossValue::Symmetric {
                rows: rows.to_vec(),
                cols: cols.to_vec(),
            },
        }
    } else {
        match reduction {
            Reduction::Mean => LossValue::Scalar(mean(losses)),
            Reduction::Sum => LossValue::Scalar(sum(losses)),
            Reduction::None => LossValue::PerAnchor(losses.to_vec()),
        }
    }
}
