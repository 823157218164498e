//! Shared helpers of the reference tests: seeded random problems, an independent naive f64 forward
//! pass written straight from spec/losses.md (no chunking, no online softmax, no shared code with
//! `src/cpu`), the reduced objective `Σ w_i L_i`, and central finite differences.
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use fused_infonce::{
    reference, LossInputs, LossOutput, LossSpec, Mode, Reduction, Temperature, Upstream, Variant,
};
use fused_infonce::{Element, MatRef};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::f64::consts::PI;

/// A seeded RNG.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A random value in ±[0.2, 1.5]: never zero, never tiny (so a normalised D = 1 row never flips).
pub fn value(rng: &mut StdRng) -> f64 {
    let m = rng.random_range(0.2..1.5);
    if rng.random_bool(0.5) {
        m
    } else {
        -m
    }
}

/// One input matrix, owned, in f64.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn random(rng: &mut StdRng, name: &'static str, rows: usize, cols: usize) -> Self {
        Tensor {
            name,
            rows,
            cols,
            data: (0..rows * cols).map(|_| value(rng)).collect(),
        }
    }
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// A problem: the input matrices in input order (the order of `LossOutput::grads`) and targets.
#[derive(Debug, Clone)]
pub struct Case {
    pub mode: Mode,
    pub mats: Vec<Tensor>,
    pub targets: Option<Vec<i64>>,
    /// A short description for assert messages.
    pub label: String,
}

impl Case {
    pub fn queue(rng: &mut StdRng, n: usize, k: usize, d: usize) -> Self {
        Case {
            mode: Mode::Queue,
            mats: vec![
                Tensor::random(rng, "query", n, d),
                Tensor::random(rng, "positive", n, d),
                Tensor::random(rng, "queue", k, d),
            ],
            targets: None,
            label: format!("queue N={n} K={k} D={d}"),
        }
    }
    /// `2n` rows.
    pub fn inbatch(rng: &mut StdRng, n: usize, d: usize) -> Self {
        Case {
            mode: Mode::InBatch,
            mats: vec![Tensor::random(rng, "embeddings", 2 * n, d)],
            targets: None,
            label: format!("inbatch N={n} (2N rows) D={d}"),
        }
    }
    /// Default targets (`y_i = i`) when `explicit` is false, else random targets in `[0, m)`.
    pub fn cross(rng: &mut StdRng, n: usize, m: usize, d: usize, explicit: bool) -> Self {
        let targets = explicit.then(|| (0..n).map(|_| rng.random_range(0..m as i64)).collect());
        Case {
            mode: Mode::Cross,
            mats: vec![
                Tensor::random(rng, "query", n, d),
                Tensor::random(rng, "key", m, d),
            ],
            label: format!("cross N={n} M={m} D={d} targets={targets:?}"),
            targets,
        }
    }
    pub fn symmetric(rng: &mut StdRng, n: usize, d: usize) -> Self {
        Case {
            mode: Mode::Symmetric,
            mats: vec![
                Tensor::random(rng, "query", n, d),
                Tensor::random(rng, "key", n, d),
            ],
            targets: None,
            label: format!("symmetric N={n} D={d}"),
        }
    }

    /// The inputs as f64 views of this case's data.
    pub fn inputs(&self) -> LossInputs<'_, f64> {
        let data: Vec<&[f64]> = self.mats.iter().map(|m| m.data.as_slice()).collect();
        self.inputs_of(&data)
    }

    /// The inputs with this case's shapes over other storage (one slice per matrix, input order).
    pub fn inputs_of<'a, T: Element>(&'a self, data: &[&'a [T]]) -> LossInputs<'a, T> {
        let m = |i: usize| {
            let t = &self.mats[i];
            MatRef::new(t.name, data[i], t.rows, t.cols).expect("consistent test matrix")
        };
        match self.mode {
            Mode::Queue => LossInputs::Queue {
                query: m(0),
                positive: m(1),
                queue: m(2),
            },
            Mode::InBatch => LossInputs::InBatch { embeddings: m(0) },
            Mode::Cross => LossInputs::Cross {
                query: m(0),
                key: m(1),
                targets: self.targets.as_deref(),
            },
            Mode::Symmetric => LossInputs::Symmetric {
                query: m(0),
                key: m(1),
            },
        }
    }

    /// Number of anchor losses: N (queue, cross), 2N (inbatch; symmetric rows then columns).
    pub fn losses(&self) -> usize {
        match self.mode {
            Mode::Queue | Mode::Cross => self.mats[0].rows,
            Mode::InBatch => self.mats[0].rows,
            Mode::Symmetric => 2 * self.mats[0].rows,
        }
    }

    /// Number of negatives per anchor (before any hard-k selection).
    pub fn negatives(&self) -> usize {
        match self.mode {
            Mode::Queue => self.mats[2].rows,
            Mode::InBatch => self.mats[0].rows - 2,
            Mode::Cross => self.mats[1].rows - 1,
            Mode::Symmetric => self.mats[0].rows - 1,
        }
    }

    /// The CPU reference on this case.
    pub fn evaluate(&self, spec: &LossSpec, up: &Upstream) -> fused_infonce::Result<LossOutput> {
        reference::evaluate(spec, &self.inputs(), up)
    }
}

/// The parameters of a spec, so a test can rebuild it with one thing changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub mode: Mode,
    pub temp: Temperature,
    pub variant: Variant,
    pub reduction: Reduction,
    pub normalize: bool,
    pub grad_queue: bool,
}

impl Params {
    pub fn spec(&self) -> LossSpec {
        LossSpec::builder(self.mode)
            .temperature_scheme(self.temp)
            .variant(self.variant)
            .reduction(self.reduction)
            .normalize(self.normalize)
            .grad_queue(self.grad_queue)
            .build()
            .unwrap_or_else(|e| panic!("{self:?}: {e}"))
    }
}

/// `u = x / max(‖x‖, 1e-12)` (spec: Normalisation).
fn normalized(x: &[f64]) -> Vec<f64> {
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let den = if norm > 1e-12 { norm } else { 1e-12 };
    x.iter().map(|v| v / den).collect()
}

/// `τ(s)`. DySTreSS is written as `τ_min + (τ_max − τ_min) sin²(πs/2)`, which equals the spec's
/// `τ_min + ½(τ_max − τ_min)(1 + cos(π(1 + s)))` (as `1 + cos(π + x) = 1 − cos x = 2 sin²(x/2)`)
/// without sharing the implementation's expression.
pub fn tau_of(t: &Temperature, s: f64) -> f64 {
    match *t {
        Temperature::Fixed(x) | Temperature::Learnable(x) => x,
        Temperature::Dystress {
            tau_min, tau_max, ..
        } => tau_min + (tau_max - tau_min) * (0.5 * PI * s).sin().powi(2),
    }
}

/// `log Σ exp(x)`, two-pass with the max (naive but stable); `−∞` for none.
pub fn lse2(xs: &[f64]) -> f64 {
    let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// One anchor: (matrix, row) of the anchor, its positive, its negatives in increasing row order.
#[derive(Debug, Clone)]
pub struct AnchorRows {
    pub anchor: (usize, usize),
    pub positive: (usize, usize),
    pub negatives: Vec<(usize, usize)>,
}

/// The anchors of `case` straight from the spec's mode table (symmetric: rows, then columns).
pub fn anchors(case: &Case) -> Vec<AnchorRows> {
    let rows = |m: usize, skip: &[usize]| -> Vec<(usize, usize)> {
        (0..case.mats[m].rows)
            .filter(|r| !skip.contains(r))
            .map(|r| (m, r))
            .collect()
    };
    match case.mode {
        Mode::Queue => (0..case.mats[0].rows)
            .map(|i| AnchorRows {
                anchor: (0, i),
                positive: (1, i),
                negatives: rows(2, &[]),
            })
            .collect(),
        Mode::InBatch => {
            let r = case.mats[0].rows;
            (0..r)
                .map(|a| {
                    let p = (a + r / 2) % r;
                    AnchorRows {
                        anchor: (0, a),
                        positive: (0, p),
                        negatives: rows(0, &[a, p]),
                    }
                })
                .collect()
        }
        Mode::Cross => (0..case.mats[0].rows)
            .map(|i| {
                let y = case.targets.as_ref().map_or(i, |t| t[i] as usize);
                AnchorRows {
                    anchor: (0, i),
                    positive: (1, y),
                    negatives: rows(1, &[y]),
                }
            })
            .collect(),
        Mode::Symmetric => {
            let n = case.mats[0].rows;
            let r = (0..n).map(|i| AnchorRows {
                anchor: (0, i),
                positive: (1, i),
                negatives: rows(1, &[i]),
            });
            let c = (0..n).map(|j| AnchorRows {
                anchor: (1, j),
                positive: (0, j),
                negatives: rows(0, &[j]),
            });
            r.chain(c).collect()
        }
    }
}

/// The naive forward pass: per-anchor losses, LSEs (NaN for simple) and the temperature of every
/// pair (`[τ(s+), τ(s_1), …]` per anchor).
#[derive(Debug, Clone)]
pub struct Naive {
    pub losses: Vec<f64>,
    pub lse: Vec<f64>,
    pub taus: Vec<Vec<f64>>,
    /// `[s+, s_1, …]` per anchor.
    pub sims: Vec<Vec<f64>>,
}

/// The loss family of spec/losses.md computed the obvious way. `frozen`: use these per-pair
/// temperatures instead of `τ(s)` (the DySTreSS `detach` gradient is the derivative of this loss
/// with the temperatures frozen at their unperturbed values).
pub fn naive(p: &Params, case: &Case, frozen: Option<&[Vec<f64>]>) -> Naive {
    let rows: Vec<Vec<Vec<f64>>> = case
        .mats
        .iter()
        .map(|m| {
            (0..m.rows)
                .map(|r| {
                    if p.normalize {
                        normalized(m.row(r))
                    } else {
                        m.row(r).to_vec()
                    }
                })
                .collect()
        })
        .collect();
    let dot = |a: (usize, usize), b: (usize, usize)| -> f64 {
        rows[a.0][a.1]
            .iter()
            .zip(&rows[b.0][b.1])
            .map(|(x, y)| x * y)
            .sum()
    };
    let mut out = Naive {
        losses: vec![],
        lse: vec![],
        taus: vec![],
        sims: vec![],
    };
    for (i, a) in anchors(case).iter().enumerate() {
        let s_pos = dot(a.anchor, a.positive);
        let s_neg: Vec<f64> = a.negatives.iter().map(|&b| dot(a.anchor, b)).collect();
        let taus: Vec<f64> = match frozen {
            Some(f) => f[i].clone(),
            None => std::iter::once(s_pos)
                .chain(s_neg.iter().copied())
                .map(|s| tau_of(&p.temp, s))
                .collect(),
        };
        // Hard selection: keep s_j ≥ s_(k), the k-th largest negative similarity.
        let keep: Vec<bool> = match p.variant.hard_k() {
            Some(k) if k < s_neg.len() => {
                let mut sorted = s_neg.clone();
                sorted.sort_by(|x, y| y.partial_cmp(x).expect("no NaN in the FD grid"));
                let thr = sorted[k - 1];
                s_neg.iter().map(|&s| s >= thr).collect()
            }
            _ => vec![true; s_neg.len()],
        };
        let z_pos = s_pos / taus[0];
        let z_sel: Vec<f64> = s_neg
            .iter()
            .zip(&taus[1..])
            .zip(&keep)
            .filter(|(_, &k)| k)
            .map(|((s, t), _)| s / t)
            .collect();
        let (loss, lse) = match p.variant {
            Variant::Standard | Variant::Hard { .. } => {
                let mut all = vec![z_pos];
                all.extend(&z_sel);
                let l = lse2(&all);
                (l - z_pos, l)
            }
            Variant::Decoupled => {
                let l = lse2(&z_sel);
                (l - z_pos, l)
            }
            Variant::Simple { lambda, .. } => {
                let sel: Vec<f64> = s_neg
                    .iter()
                    .zip(&keep)
                    .filter(|(_, &k)| k)
                    .map(|(s, _)| *s)
                    .collect();
                let lambda = lambda.unwrap_or(1.0 / sel.len().max(1) as f64);
                (-s_pos + lambda * sel.iter().sum::<f64>(), f64::NAN)
            }
        };
        out.losses.push(loss);
        out.lse.push(lse);
        out.taus.push(taus);
        out.sims.push(std::iter::once(s_pos).chain(s_neg).collect());
    }
    out
}

/// The upstream's per-anchor weights written out from the spec's reductions, and the objective
/// `Σ_i w_i L_i` whose gradient `evaluate` returns.
pub fn objective(p: &Params, up: &Upstream, losses: &[f64]) -> f64 {
    let g = match up {
        Upstream::One => 1.0,
        Upstream::Scalar(g) => *g,
        Upstream::PerAnchor(w) => {
            assert_eq!(w.len(), losses.len());
            return w.iter().zip(losses).map(|(w, l)| w * l).sum();
        }
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let reduced = if p.mode == Mode::Symmetric {
        let (r, c) = losses.split_at(losses.len() / 2);
        match p.reduction {
            Reduction::Mean => 0.5 * (mean(r) + mean(c)),
            Reduction::Sum => 0.5 * (sum(r) + sum(c)),
            Reduction::None => unreachable!("none takes per-anchor weights"),
        }
    } else {
        match p.reduction {
            Reduction::Mean => mean(losses),
            Reduction::Sum => sum(losses),
            Reduction::None => unreachable!("none takes per-anchor weights"),
        }
    };
    g * reduced
}

/// Central differences of `f` with respect to every element of matrix `m` of `case`.
pub fn fd_matrix(case: &Case, m: usize, h: f64, f: impl Fn(&Case) -> f64) -> Vec<f64> {
    let mut c = case.clone();
    (0..case.mats[m].data.len())
        .map(|e| {
            let x = case.mats[m].data[e];
            c.mats[m].data[e] = x + h;
            let fp = f(&c);
            c.mats[m].data[e] = x - h;
            let fm = f(&c);
            c.mats[m].data[e] = x;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// The largest `|got − want|` over the largest `|want|` (normwise relative error), with `floor`
/// as the smallest denominator.
pub fn rel_err(got: &[f64], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let num = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let den = want.iter().map(|b| b.abs()).fold(floor, f64::max);
    num / den
}

/// Relative difference of two scalars (`floor` as the smallest denominator).
pub fn rel(a: f64, b: f64, floor: f64) -> f64 {
    (a - b).abs() / b.abs().max(floor)
}
