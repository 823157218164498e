//! The anchors of a problem: for every anchor loss, which row is the anchor, which row is its
//! positive and which rows are its negatives. Shared by the loss and the metrics.

use super::normalize::normalize_rows;
use crate::error::Result;
use crate::loss::{LossInputs, Shape};
use crate::spec::LossSpec;
use crate::tensor::Element;

/// A row of one of the input matrices (`mat` indexes the inputs in input order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    pub mat: usize,
    pub row: usize,
}

/// One input matrix read into f64 (normalised when asked), with what the backward needs.
#[derive(Debug, Clone)]
pub(crate) struct Rows {
    pub name: &'static str,
    pub rows: usize,
    pub cols: usize,
    /// The rows used in the similarities: `u` (normalised) or `x` (as given), row-major.
    pub data: Vec<f64>,
    /// `1 / max(‖x‖, ε)` per row when normalised.
    pub inv_norm: Option<Vec<f64>>,
}

impl Rows {
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// The negatives of one anchor: every row of matrix `mat` except up to two (`usize::MAX` = none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Negatives {
    pub mat: usize,
    pub rows: usize,
    pub skip: [usize; 2],
}

impl Negatives {
    /// The negative rows, in increasing order.
    pub fn rows(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.rows).filter(move |r| !self.skip.contains(r))
    }
}

/// One anchor loss: anchor row, positive row, negatives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AnchorDef {
    pub anchor: Key,
    pub positive: Key,
    pub negatives: Negatives,
}

/// A validated problem: the input rows and every anchor loss (symmetric: rows, then columns).
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub mats: Vec<Rows>,
    pub anchors: Vec<AnchorDef>,
    pub shape: Shape,
}

impl Problem {
    /// Validates `inputs` against `spec` and lays out the anchors. `normalize` decides whether the
    /// rows are L2-normalised (the loss follows the spec; the metrics always normalise).
    pub fn build<T: Element>(
        spec: &LossSpec,
        inputs: &LossInputs<'_, T>,
        normalize: bool,
    ) -> Result<Problem> {
        let shape = inputs.validate(spec)?;
        let mats: Vec<Rows> = inputs
            .matrices()
            .iter()
            .map(|m| {
                let x: Vec<f64> = m.data().iter().map(|v| v.to_f64()).collect();
                let (data, inv_norm) = if normalize {
                    let (u, inv) = normalize_rows(&x, m.cols());
                    (u, Some(inv))
                } else {
                    (x, None)
                };
                Rows {
                    name: m.name(),
                    rows: m.rows(),
                    cols: m.cols(),
                    data,
                    inv_norm,
                }
            })
            .collect();
        const NONE: usize = usize::MAX;
        let key = |mat, row| Key { mat, row };
        let n = shape.anchors;
        let anchors: Vec<AnchorDef> = match *inputs {
            LossInputs::Queue { queue, .. } => (0..n)
                .map(|i| AnchorDef {
                    anchor: key(0, i),
                    positive: key(1, i),
                    negatives: Negatives {
                        mat: 2,
                        rows: queue.rows(),
                        skip: [NONE; 2],
                    },
                })
                .collect(),
            LossInputs::InBatch { .. } => {
                let half = n / 2;
                (0..n)
                    .map(|a| {
                        let pos = (a + half) % n;
                        AnchorDef {
                            anchor: key(0, a),
                            positive: key(0, pos),
                            negatives: Negatives {
                                mat: 0,
                                rows: n,
                                skip: [a, pos],
                            },
                        }
                    })
                    .collect()
            }
            LossInputs::Cross {
                key: b, targets, ..
            } => (0..n)
                .map(|i| {
                    // validate() checked every target is in [0, M).
                    let y = targets.map_or(i, |t| t[i] as usize);
                    AnchorDef {
                        anchor: key(0, i),
                        positive: key(1, y),
                        negatives: Negatives {
                            mat: 1,
                            rows: b.rows(),
                            skip: [y, NONE],
                        },
                    }
                })
                .collect(),
            LossInputs::Symmetric { .. } => {
                let rows = (0..n).map(|i| AnchorDef {
                    anchor: key(0, i),
                    positive: key(1, i),
                    negatives: Negatives {
                        mat: 1,
                        rows: n,
                        skip: [i, NONE],
                    },
                });
                // Column j: anchor b_j against every a_i; b_j · a_i is exactly s_ij.
                let cols = (0..n).map(|j| AnchorDef {
                    anchor: key(1, j),
                    positive: key(0, j),
                    negatives: Negatives {
                        mat: 0,
                        rows: n,
                        skip: [j, NONE],
                    },
                });
                rows.chain(cols).collect()
            }
        };
        Ok(Problem {
            mats,
            anchors,
            shape,
        })
    }

    /// The row behind `k`.
    pub fn row(&self, k: Key) -> &[f64] {
        self.mats[k.mat].row(k.row)
    }

    /// `s(anchor, key)`: the dot product of the (normalised) rows.
    pub fn sim(&self, a: Key, b: Key) -> f64 {
        dot(self.row(a), self.row(b))
    }
}

/// `a · b`, summed in order.
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
