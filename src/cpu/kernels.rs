//! What happens to one row of a similarity tile (spec/losses.md symbol by symbol): the mask
//! (positive, self, hard-negative selection), the online log-sum-exp update and the weights of the
//! softmax-weighted key sum (forward), the gradient weights `∂L/∂s` (backward), and the radix
//! histogram of the hard-negative selection.
//!
//! A tile row holds `s_ij = a_i · b_j` for one anchor `i` and the keys `j0..j0+len`. Masked
//! entries (the positive, the anchor itself in inbatch mode, unselected hard negatives) are set to
//! −∞, which every later step reads as "not a negative": its `exp` is 0.

use super::simd;
use crate::spec::Temperature;

/// How similarities become logits and the loss's weights.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// `z = α s`, `α = 1/τ` (fixed or learnable τ).
    Scaled {
        /// α in f32 (the tile arithmetic).
        alpha: f32,
        /// Whether `Σ P z` is accumulated (learnable τ's `dL/dτ`).
        learnable: bool,
    },
    /// DySTreSS: `z = s / τ(s)` element by element (in f64, the formula of [`Temperature::tau`]).
    Dystress(Temperature),
    /// The simple variant: weights 1 for selected negatives, no exponentials.
    Simple,
}

/// Where an anchor's positive is.
#[derive(Debug, Clone)]
pub(crate) enum Pos {
    /// Not among the keys (queue mode: the `positive` matrix).
    External,
    /// Key column `cols[i]` of anchor `i`.
    Cols(Vec<usize>),
}

/// One loss's anchors as tile rows: which key columns are not negatives, and the hard-negative
/// thresholds.
#[derive(Debug, Clone)]
pub(crate) struct RowLoss {
    /// The positive of each anchor.
    pub pos: Pos,
    /// Inbatch: key `i` is anchor `i` itself.
    pub self_excluded: bool,
    /// `hard:k`: per anchor the order key of `s_(k)` ([`order_key`]), 0 to keep every negative.
    pub thr: Option<Vec<u32>>,
}

impl RowLoss {
    /// The positive's column of anchor `i`, if among the keys.
    #[inline]
    pub fn pos_col(&self, i: usize) -> Option<usize> {
        match &self.pos {
            Pos::External => None,
            Pos::Cols(c) => Some(c[i]),
        }
    }
}

/// An order-preserving u32 key of an f32 similarity: `a < b ⇔ key(a) < key(b)` with −0 < +0, and
/// every NaN the largest value (as the reference's selection, which ranks a NaN of either sign
/// above +∞).
#[inline]
pub(crate) fn order_key(s: f32) -> u32 {
    if s.is_nan() {
        return u32::MAX;
    }
    let b = s.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The f32 whose [`order_key`] is `k` (NaN for `u32::MAX`).
#[inline]
pub(crate) fn from_order_key(k: u32) -> f32 {
    if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7FFF_FFFF)
    } else {
        f32::from_bits(!k)
    }
}

/// Row `i` of a tile whose columns start at key `j0`: returns the positive's similarity when it is
/// in this tile, and sets the positive, the anchor itself and unselected negatives to −∞.
///
/// Selection (reference `reference::anchor::select`): a negative is kept when `s ≥ s_(k)` or
/// `key(s) ≥ key(s_(k))`, so ties at the threshold are all kept and a NaN is always kept.
#[inline]
pub(crate) fn mask_row(row: &mut [f32], i: usize, j0: usize, loss: &RowLoss) -> Option<f32> {
    let len = row.len();
    let in_tile = |j: usize| (j >= j0 && j < j0 + len).then(|| j - j0);
    let mut s_pos = None;
    if let Some(c) = loss.pos_col(i).and_then(in_tile) {
        s_pos = Some(row[c]);
        row[c] = f32::NEG_INFINITY;
    }
    if loss.self_excluded {
        if let Some(c) = in_tile(i) {
            row[c] = f32::NEG_INFINITY;
        }
    }
    if let Some(thr) = &loss.thr {
        let key = thr[i];
        if key != 0 {
            let t = from_order_key(key);
            for s in row.iter_mut() {
                let keep = *s >= t || order_key(*s) >= key;
                if !keep {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }
    s_pos
}

/// A block of anchors' online state over the negatives seen so far: running max `m` of the logits,
/// `Σ exp(z − m)` and `Σ exp(z − m) z` (learnable τ), each in f32. The simple variant keeps `m = 0`
/// and counts in `sum`, `Σ s` in `zsum`.
#[derive(Debug, Clone)]
pub(crate) struct Online {
    /// Running max per anchor (−∞ before any negative).
    pub m: Vec<f32>,
    /// `Σ exp(z − m)` per anchor.
    pub sum: Vec<f32>,
    /// `Σ exp(z − m) z` per anchor.
    pub zsum: Vec<f32>,
    /// The positive's similarity, once its tile has been seen.
    pub s_pos: Vec<Option<f32>>,
}

impl Online {
    /// The state of `n` anchors before any key.
    pub fn new(n: usize, simple: bool) -> Self {
        Online {
            m: vec![if simple { 0.0 } else { f32::NEG_INFINITY }; n],
            sum: vec![0.0; n],
            zsum: vec![0.0; n],
            s_pos: vec![None; n],
        }
    }
}

/// The forward step of row `r` of a block (masked tile row `s`): updates the online state and
/// writes into `w` the weights of the softmax-weighted key sum `U = Σ_j w_j b_j` (`exp(z − m)` for
/// a fixed or learnable τ, times `∂z/∂s` for DySTreSS, 1 for a selected negative of the simple
/// variant). Returns the factor by which the row's earlier `U` must be rescaled (the max moved).
#[inline]
pub(crate) fn forward_row(s: &[f32], w: &mut [f32], kind: &Kind, st: &mut Online, r: usize) -> f32 {
    match *kind {
        Kind::Scaled { alpha, learnable } => {
            let smax = simd::max(s);
            if smax == f32::NEG_INFINITY {
                // No negative here. A NaN (ignored by the max) must still poison the sum.
                w.fill(0.0);
                if s.iter().any(|x| x.is_nan()) {
                    st.sum[r] = f32::NAN;
                }
                return 1.0;
            }
            let m_old = st.m[r];
            let m_new = if alpha * smax > m_old {
                alpha * smax
            } else {
                m_old
            };
            let c = if m_old == f32::NEG_INFINITY {
                0.0
            } else {
                simd::exp(m_old - m_new)
            };
            if learnable {
                let (sum, dot) = simd::exp_sum_dot(s, alpha, m_new, w);
                st.sum[r] = st.sum[r] * c + sum;
                st.zsum[r] = st.zsum[r] * c + dot;
            } else {
                st.sum[r] = st.sum[r] * c + simd::exp_sum(s, alpha, m_new, w);
            }
            st.m[r] = m_new;
            c
        }
        Kind::Dystress(temp) => {
            // z into w first, then exp(z − m) · ∂z/∂s.
            let mut zmax = f32::NEG_INFINITY;
            for (o, &v) in w.iter_mut().zip(s) {
                let z = if v == f32::NEG_INFINITY {
                    f32::NEG_INFINITY
                } else {
                    let v = v as f64;
                    (v / temp.tau(v)) as f32
                };
                *o = z;
                zmax = if z > zmax { z } else { zmax };
            }
            let has_nan = w.iter().any(|z| z.is_nan());
            if zmax == f32::NEG_INFINITY {
                w.fill(0.0);
                if has_nan {
                    st.sum[r] = f32::NAN;
                }
                return 1.0;
            }
            let m_old = st.m[r];
            let m_new = if zmax > m_old { zmax } else { m_old };
            let c = if m_old == f32::NEG_INFINITY {
                0.0
            } else {
                simd::exp(m_old - m_new)
            };
            let mut sum = 0.0f32;
            for (o, &v) in w.iter_mut().zip(s) {
                let e = simd::exp(*o - m_new);
                sum += e;
                // A masked or underflowed entry is 0; NaN stays NaN.
                *o = if e == 0.0 {
                    0.0
                } else {
                    e * temp.dz_ds(v as f64) as f32
                };
            }
            st.sum[r] = st.sum[r] * c + sum;
            st.m[r] = m_new;
            c
        }
        Kind::Simple => {
            let (mut count, mut sum) = (0.0f32, 0.0f32);
            for (o, &v) in w.iter_mut().zip(s) {
                let keep = v != f32::NEG_INFINITY;
                *o = if keep { 1.0 } else { 0.0 };
                if keep {
                    count += 1.0;
                    sum += v;
                }
            }
            st.sum[r] += count;
            st.zsum[r] += sum;
            1.0
        }
    }
}

/// The backward weights of one masked tile row: `g_j = ∂(w L)/∂s_j` for every negative, from the
/// anchor's final LSE: `w α exp(α s_j − lse)` (fixed/learnable τ; `gcoef = w α`),
/// `w exp(z_j − lse) ∂z/∂s_j` (DySTreSS; `gcoef = w`), `w λ` (simple; `gcoef = w λ`); 0 where
/// masked. The caller writes the positive's entry.
#[inline]
pub(crate) fn backward_row(s: &[f32], g: &mut [f32], kind: &Kind, lse: f32, gcoef: f32) {
    match *kind {
        Kind::Scaled { alpha, .. } => simd::exp_scale(s, alpha, lse, gcoef, g),
        Kind::Dystress(temp) => {
            for (o, &v) in g.iter_mut().zip(s) {
                *o = if v == f32::NEG_INFINITY {
                    0.0
                } else {
                    let v64 = v as f64;
                    let z = (v64 / temp.tau(v64)) as f32;
                    gcoef * simd::exp(z - lse) * temp.dz_ds(v64) as f32
                };
            }
        }
        Kind::Simple => {
            for (o, &v) in g.iter_mut().zip(s) {
                *o = if v == f32::NEG_INFINITY { 0.0 } else { gcoef };
            }
        }
    }
}

/// One digit of the radix selection: counts, among the negatives of row `i` (columns from `j0`)
/// whose order key matches `prefix` above bit `shift + 8`, each value of bits `shift..shift+8`.
#[inline]
pub(crate) fn hist_row(
    s: &[f32],
    i: usize,
    j0: usize,
    loss: &RowLoss,
    prefix: u32,
    shift: u32,
    hist: &mut [u32],
) {
    let high = if shift + 8 >= 32 {
        0
    } else {
        u32::MAX << (shift + 8)
    };
    let pos = loss.pos_col(i);
    let me = loss.self_excluded.then_some(i);
    for (c, &v) in s.iter().enumerate() {
        let j = j0 + c;
        if Some(j) == pos || Some(j) == me {
            continue;
        }
        let k = order_key(v);
        if k & high == prefix & high {
            hist[((k >> shift) & 0xFF) as usize] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_key_orders_like_total_cmp_with_nan_largest() {
        let v = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            2.0,
            f32::INFINITY,
        ];
        for w in v.windows(2) {
            assert!(order_key(w[0]) < order_key(w[1]), "{w:?}");
        }
        assert_eq!(order_key(f32::NAN), u32::MAX);
        assert_eq!(order_key(-f32::NAN), u32::MAX);
        for x in v {
            assert_eq!(from_order_key(order_key(x)).to_bits(), x.to_bits());
        }
        assert!(from_order_key(u32::MAX).is_nan());
    }

    #[test]
    fn mask_keeps_ties_and_drops_the_positive_and_self() {
        let loss = RowLoss {
            pos: Pos::Cols(vec![4, 0]),
            self_excluded: true,
            thr: Some(vec![order_key(0.5), 0]),
        };
        let mut row = [0.1f32, 0.5, 0.3, 0.5, 0.9, 0.7];
        let s_pos = mask_row(&mut row, 0, 0, &loss);
        assert_eq!(s_pos, Some(0.9));
        let ninf = f32::NEG_INFINITY;
        assert_eq!(row, [ninf, 0.5, ninf, 0.5, ninf, 0.7]);
        // Threshold key 0 keeps everything; the positive (column 0) is in this tile at offset 0.
        let mut row = [0.2f32, 0.1, -0.4];
        assert_eq!(mask_row(&mut row, 1, 0, &loss), Some(0.2));
        assert_eq!(row, [ninf, ninf, -0.4]); // column 1 is anchor 1 itself
    }
}
