//! The fast CPU backend: fused, blocked, multi-threaded, f32 arithmetic.
//!
//! [`evaluate`] has exactly the contract of the f64 reference [`crate::reference::evaluate`]: the same
//! spec, inputs and upstream, the same validation ([`LossInputs::validate`],
//! [`Upstream::weights`]) and errors, the same [`LossOutput`] layout and conventions (read the
//! reference's module docs: anchor order, symmetric rows then columns, reductions, `lse` /
//! `lse_cols`, `hard:k` ties, `simple:λ`, DySTreSS, the empty queue, NaN). Only the arithmetic
//! differs: f32 tiles, f64 per-anchor scalars.
//!
//! # How
//! Anchors are cut into blocks of [`Blocking::anchors`] rows and keys into blocks of
//! [`Blocking::keys`] rows ([`Blocking::for_dim`], tuned on the presets). For each tile the
//! similarity block `S = A_I·B_Jᵀ` comes from faer's single-threaded matrix product (`gemm.rs`;
//! why faer: bench/NOTES.md), then the temperature, the mask (positive, self, hard
//! negatives), the online log-sum-exp and the gradient weights are computed while the tile is in
//! cache, with a vectorised `exp`. Nothing N×K is ever stored:
//! - `queue`, `cross`: one forward sweep per anchor block over the key blocks computes the LSE
//!   and, beside it, the softmax-weighted key sum (rescaled when the running max moves, as
//!   flash-attention does), so the loss, `lse` and the anchor gradient cost two block products
//!   per tile and one read of the keys (`queue` is done in this one pass); the key gradients
//!   (`cross`, `grad_queue`) come from a second sweep per key block that recomputes `S` from the
//!   stored per-anchor LSE (two more products). See `pair.rs`.
//! - `inbatch`: `S = E·Eᵀ` is symmetric, so each unordered pair of blocks is one tile serving the
//!   anchors of both (its rows and its columns): a forward pass (LSEs) and a backward pass
//!   (`dE += H·E` both ways), half the products of a row-by-row schedule. See `inbatch.rs`.
//! - `symmetric`: a forward pass (row and column LSEs from the same tiles) and a backward pass
//!   (`dA += G·B`, `dB += Gᵀ·A`), each in conflict-free rounds of tiles. See `symmetric.rs`.
//! - `hard:k`: an exact radix select of each anchor's k-th largest negative similarity (four 8-bit
//!   digits, four extra sweeps of `S`) on the very similarities the loss passes compute, so the
//!   reference's tie rule (every `s ≥ s_(k)` kept) holds bit for bit.
//!
//! # Threads and determinism
//! Work is split into tasks by the shape alone (blocks, and a fixed number of key chunks where
//! anchor blocks are few, as MoCo's N = 256), run with rayon in the current pool, and every
//! reduction across tasks is merged in a fixed order. The result is bitwise identical for any
//! number of threads on one machine (the vectorised kernels and faer pick their code by CPU
//! features, so two machines may differ in the last bits).
//!
//! # Memory
//! Nothing N×K. Beyond the inputs and the f64 gradients: per thread a few tiles and blocks
//! (`O(block × (block + D))` floats), per anchor a handful of scalars, and in `queue` and `cross`
//! mode the forward's softmax-weighted key sums, which are the anchor gradient's f32 accumulators
//! (N × D; where anchors are few the key chunks each keep their own, at most 16 blocks of
//! `block × D` more). The tile passes (`inbatch`, `symmetric`) accumulate in f32 inside the f64
//! gradients' own memory and widen in place. f32 inputs that are not normalised are read in
//! place; f16, bf16, f64 and normalised inputs are converted (and normalised) block by block into
//! each task's buffer, never copied whole.
//!
//! # Precision and dtypes
//! f32, f16 and bf16 inputs are computed exactly as stored, in f32. f64 inputs are accepted (as
//! the reference) and rounded to f32 when a block is read: this backend's precision is f32's
//! whatever the input type. Tiles, products and the gradients' accumulation within a pass are
//! f32; per-anchor scalars (the LSE merge, loss, `∂L/∂τ`) and the merge of key chunks' partials
//! are f64. Agreement with the reference: 1e-6 relative L2 or better over the test grid.

mod anchor;
pub mod bench;
mod gemm;
mod inbatch;
mod kernels;
mod pair;
mod simd;
mod source;
mod symmetric;
pub mod unfused;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::loss::{Gradient, LossInputs, LossOutput, LossValue, Upstream};
use crate::reference::normalize::normalize_row_backward;
use crate::spec::{LossSpec, Reduction, Temperature, Variant};
use crate::tensor::{Element, Matrix};
use anchor::{Fin, LossCtx};
use inbatch::InBatchProblem;
use kernels::{Kind, Pos, RowLoss};
use pair::PairProblem;
use source::Source;
use symmetric::SymProblem;

/// Block sizes of the tile grid: anchors (tile rows) and keys (tile columns) per block.
///
/// [`Blocking::for_dim`] is the tuned default; other sizes give the same result up to f32
/// rounding (tests use small blocks to exercise many tiles on small shapes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// Anchor rows per block.
    pub anchors: usize,
    /// Key rows per block.
    pub keys: usize,
}

impl Blocking {
    /// The default for embedding dimension `d`, tuned on the CPU presets (bench/NOTES.md):
    /// 256 × 256 up to D = 256 (a tile and its weights 0.5 MB, a key block 0.25 MB at D = 128),
    /// 512 × 512 beyond (at D = 768 the products dominate and larger tiles run them faster).
    pub fn for_dim(d: usize) -> Blocking {
        let b = if d <= 256 { 256 } else { 512 };
        Blocking {
            anchors: b,
            keys: b,
        }
    }
}

/// Evaluates `spec` on `inputs` with the fused CPU kernels: the loss, per-anchor LSEs and every
/// gradient, as [`crate::reference::evaluate`] (same contract and conventions; f32 arithmetic, see the
/// [module docs](self)). Runs on the current rayon pool.
///
/// Errors: every shape and parameter error of [`LossInputs::validate`] and
/// [`Upstream::weights`]; nothing here panics on bad input.
///
/// ```
/// use fused_infonce::{reference, cpu, LossInputs, LossSpec, MatRef, Upstream};
/// let q = [1.0f32, 0.0, 0.0, 1.0];
/// let p = [0.9f32, 0.1, 0.1, 0.9];
/// let m = [0.0f32, 1.0, 1.0, 0.0, -1.0, 0.0];
/// let spec = LossSpec::queue().temperature(0.1).normalize(true).build()?;
/// let inputs = LossInputs::Queue {
///     query: MatRef::new("query", &q, 2, 2)?,
///     positive: MatRef::new("positive", &p, 2, 2)?,
///     queue: MatRef::new("queue", &m, 3, 2)?,
/// };
/// let fast = cpu::evaluate(&spec, &inputs, &Upstream::One)?;
/// let reference = reference::evaluate(&spec, &inputs, &Upstream::One)?;
/// let (a, b) = (fast.loss.scalar().unwrap(), reference.loss.scalar().unwrap());
/// assert!((a - b).abs() <= 1e-5 * b.abs());
/// # Ok::<(), fused_infonce::Error>(())
/// ```
pub fn evaluate<T: Element>(
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
) -> Result<LossOutput> {
    let d = inputs.matrices().first().map_or(1, |m| m.cols());
    evaluate_blocked(spec, inputs, upstream, Blocking::for_dim(d))
}

/// As [`evaluate`] on the tile grid of `blocking`.
///
/// Errors as [`evaluate`], and [`Error::Parameter`] for a block size of 0.
pub fn evaluate_blocked<T: Element>(
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
    blocking: Blocking,
) -> Result<LossOutput> {
    if blocking.anchors == 0 || blocking.keys == 0 {
        return Err(Error::parameter(
            "blocking",
            format!("{}×{}", blocking.anchors, blocking.keys),
            "block sizes must be >= 1",
        ));
    }
    let shape = inputs.validate(spec)?;
    let weights = upstream.weights(spec, shape.losses(spec.mode()))?;
    let ctx = LossCtx {
        temp: spec.temperature(),
        variant: spec.variant(),
        kind: kind_of(spec),
    };
    let norm = spec.normalize();
    let hard_k = spec.variant().hard_k();
    let d = shape.dim;
    // The gradients in input order (the queue's only when asked).
    let mut grads: Vec<Vec<f64>> = Vec::new();
    let (fin, fin_cols) = match *inputs {
        LossInputs::Queue {
            query,
            positive,
            queue,
        } => {
            let (q, p, m) = (
                Source::new(query, norm),
                Source::new(positive, norm),
                Source::new(queue, norm),
            );
            let s_pos: Vec<f32> = (0..q.rows())
                .into_par_iter()
                .map(|i| dot(&q.row_f32(i), &p.row_f32(i)))
                .collect();
            let loss = RowLoss {
                pos: Pos::External,
                self_excluded: false,
                thr: None,
            };
            let mut prob = PairProblem::new(&q, &m, loss, ctx, blocking);
            if let Some(k) = hard_k {
                prob.loss.thr = Some(pair::thresholds(&prob, k, shape.negatives));
            }
            let fwd = pair::forward(&prob, Some(&s_pos));
            let fin = pair::finalize_all(&fwd.merged, &weights, &ctx);
            let dq = anchor_grads(fwd.u, &fin, d, |i| p.row_f32(i));
            let dp: Vec<f64> = per_row(q.rows(), d, |i, out| {
                let qi = q.row_f32(i);
                for (o, &x) in out.iter_mut().zip(&qi) {
                    *o = fin[i].dpos * x as f64;
                }
            });
            grads.push(chain(&q, dq));
            grads.push(chain(&p, dp));
            if spec.grad_queue() {
                let mut dm = vec![0.0; m.rows() * d];
                pair::key_gradients(&prob, &fin, &mut dm);
                grads.push(chain(&m, dm));
            }
            (fin, None)
        }
        LossInputs::InBatch { embeddings } => {
            let e = Source::new(embeddings, norm);
            let n2 = e.rows();
            let half = n2 / 2;
            let loss = RowLoss {
                pos: Pos::Cols((0..n2).map(|a| (a + half) % n2).collect()),
                self_excluded: true,
                thr: None,
            };
            let mut prob = InBatchProblem::new(&e, loss, ctx, blocking.anchors);
            if let Some(k) = hard_k {
                prob.loss.thr = Some(prob.thresholds(k, shape.negatives));
            }
            let merged = prob.forward();
            let fin = pair::finalize_all(&merged, &weights, &ctx);
            let mut de = vec![0.0; n2 * d];
            prob.backward(&fin, &mut de);
            grads.push(chain(&e, de));
            (fin, None)
        }
        LossInputs::Cross {
            query,
            key,
            targets,
        } => {
            let (a, b) = (Source::new(query, norm), Source::new(key, norm));
            // validate() checked every target is in [0, M).
            let pos: Vec<usize> = match targets {
                Some(t) => t.iter().map(|&y| y as usize).collect(),
                None => (0..a.rows()).collect(),
            };
            let loss = RowLoss {
                pos: Pos::Cols(pos.clone()),
                self_excluded: false,
                thr: None,
            };
            let mut prob = PairProblem::new(&a, &b, loss, ctx, blocking);
            if let Some(k) = hard_k {
                prob.loss.thr = Some(pair::thresholds(&prob, k, shape.negatives));
            }
            let fwd = pair::forward(&prob, None);
            let fin = pair::finalize_all(&fwd.merged, &weights, &ctx);
            let da = anchor_grads(fwd.u, &fin, d, |i| b.row_f32(pos[i]));
            let mut db = vec![0.0; b.rows() * d];
            pair::key_gradients(&prob, &fin, &mut db);
            grads.push(chain(&a, da));
            grads.push(chain(&b, db));
            (fin, None)
        }
        LossInputs::Symmetric { query, key } => {
            let (a, b) = (Source::new(query, norm), Source::new(key, norm));
            let n = a.rows();
            let side = || RowLoss {
                pos: Pos::Cols((0..n).collect()),
                self_excluded: false,
                thr: None,
            };
            let mut prob = SymProblem::new(&a, &b, side(), side(), ctx, blocking);
            if let Some(k) = hard_k {
                let (tr, tc) = prob.thresholds(k, shape.negatives);
                prob.rows.thr = Some(tr);
                prob.cols.thr = Some(tc);
            }
            let fwd = prob.forward();
            let (fr, fc) = symmetric::finalize_sym(&fwd, &weights, &ctx);
            let mut da = vec![0.0; n * d];
            let mut db = vec![0.0; n * d];
            prob.backward(&fr, &fc, &mut da, &mut db);
            grads.push(chain(&a, da));
            grads.push(chain(&b, db));
            (fr, Some(fc))
        }
    };
    Ok(output(spec, fin, fin_cols, grads, inputs))
}

/// The logit and weight scheme of `spec`.
fn kind_of(spec: &LossSpec) -> Kind {
    match (spec.variant(), spec.temperature()) {
        (Variant::Simple { .. }, _) => Kind::Simple,
        (_, Temperature::Fixed(t)) => Kind::Scaled {
            alpha: (1.0 / t) as f32,
            learnable: false,
        },
        (_, Temperature::Learnable(t)) => Kind::Scaled {
            alpha: (1.0 / t) as f32,
            learnable: true,
        },
        (_, t @ Temperature::Dystress { .. }) => Kind::Dystress(t),
    }
}

/// `a · b` accumulated in f64, rounded to f32.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum::<f64>() as f32
}

/// A `rows × d` f64 matrix filled row by row in parallel.
fn per_row(rows: usize, d: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let mut out = vec![0.0; rows * d];
    if d > 0 {
        out.par_chunks_mut(d)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    }
    out
}

/// The anchors' own gradients, in place of the forward's key sums: `ucoef_i U_i + dpos_i ·
/// (positive row)`.
fn anchor_grads(
    mut u: Vec<f64>,
    fin: &[Fin],
    d: usize,
    pos_row: impl Fn(usize) -> Vec<f32> + Sync,
) -> Vec<f64> {
    if d > 0 {
        u.par_chunks_mut(d).enumerate().for_each(|(i, out)| {
            let f = &fin[i];
            let pr = pos_row(i);
            for (o, &y) in out.iter_mut().zip(&pr) {
                *o = f.ucoef * *o + f.dpos * y as f64;
            }
        });
    }
    u
}

/// The gradient with respect to the rows as given: through the normalisation when applied
/// (the reference's `normalize_row_backward`, clamped branch included).
fn chain<T: Element>(src: &Source<'_, T>, mut du: Vec<f64>) -> Vec<f64> {
    let d = src.cols();
    let Some(inv) = src.inv_norms() else {
        return du;
    };
    if d == 0 {
        return du;
    }
    let m = src.matrix();
    du.par_chunks_mut(d).enumerate().for_each(|(i, g)| {
        let u: Vec<f64> = m.row(i).iter().map(|x| x.to_f64() * inv[i]).collect();
        let dx = normalize_row_backward(&u, inv[i], g);
        g.copy_from_slice(&dx);
    });
    du
}

/// Assembles the output as the reference does (reductions, lse / lse_cols, dτ).
fn output<T: Element>(
    spec: &LossSpec,
    fin: Vec<Fin>,
    fin_cols: Option<Vec<Fin>>,
    grads: Vec<Vec<f64>>,
    inputs: &LossInputs<'_, T>,
) -> LossOutput {
    let simple = matches!(spec.variant(), Variant::Simple { .. });
    let lse_of = |f: &[Fin]| -> Vec<f64> {
        if simple {
            Vec::new()
        } else {
            f.iter().map(|x| x.lse).collect()
        }
    };
    let losses = |f: &[Fin]| -> Vec<f64> { f.iter().map(|x| x.loss).collect() };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let rows = losses(&fin);
    let loss = match (&fin_cols, spec.reduction()) {
        (Some(fc), r) => {
            let cols = losses(fc);
            match r {
                Reduction::Mean => LossValue::Scalar(0.5 * (mean(&rows) + mean(&cols))),
                Reduction::Sum => LossValue::Scalar(0.5 * (sum(&rows) + sum(&cols))),
                Reduction::None => LossValue::Symmetric { rows, cols },
            }
        }
        (None, Reduction::Mean) => LossValue::Scalar(mean(&rows)),
        (None, Reduction::Sum) => LossValue::Scalar(sum(&rows)),
        (None, Reduction::None) => LossValue::PerAnchor(rows),
    };
    let grad_temperature = spec.temperature().is_learnable().then(|| {
        fin.iter()
            .chain(fin_cols.iter().flatten())
            .map(|f| f.dtau)
            .sum()
    });
    let grads = inputs
        .matrices()
        .iter()
        .zip(grads)
        .map(|(m, data)| Gradient {
            name: m.name(),
            value: Matrix {
                rows: m.rows(),
                cols: m.cols(),
                data,
            },
        })
        .collect();
    LossOutput {
        loss,
        lse: lse_of(&fin),
        lse_cols: fin_cols.as_deref().map(lse_of),
        grads,
        grad_temperature,
    }
}
