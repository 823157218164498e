//! One anchor's loss and its gradient with respect to the similarities (spec: *The standard loss*,
//! *Temperature*, *Variants*).

use super::lse::LsePartial;
use crate::spec::{Temperature, Variant};
use std::cmp::Ordering;

/// What one anchor contributes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AnchorOut {
    /// `L_i` (not weighted).
    pub loss: f64,
    /// The LSE of the variant's denominator (`None` for simple).
    pub lse: Option<f64>,
    /// `w_i ∂L_i/∂s_i+`.
    pub d_pos: f64,
    /// `w_i ∂L_i/∂s_ij` per negative (0 for negatives a hard-k selection drops).
    pub d_neg: Vec<f64>,
    /// `w_i ∂L_i/∂τ` for a constant τ (`−(1/τ) Σ_c (∂L/∂z_c) z_c`); 0 for simple.
    pub d_tau: f64,
}

/// The hard-negative selection (Wang & Liu eq. 9): `s_j ≥ s_(k)`, ties at the threshold kept.
/// `k ≥ #negatives` (or no k) keeps every negative. Ordering by `f64::total_cmp`, so NaN never
/// panics; a NaN of either sign counts as the largest value, so it is selected and propagates
/// (`total_cmp` alone would rank a negative NaN, what x86 makes of 0/0 or ∞·0, below −∞ and drop
/// it silently).
pub(crate) fn select(s_neg: &[f64], k: Option<usize>) -> Vec<bool> {
    let Some(k) = k.filter(|&k| k < s_neg.len()) else {
        return vec![true; s_neg.len()];
    };
    let key = |x: f64| if x.is_nan() { f64::NAN } else { x };
    let mut sorted: Vec<f64> = s_neg.iter().map(|&s| key(s)).collect();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let thr = sorted[k - 1];
    s_neg
        .iter()
        .map(|&s| s >= thr || key(s).total_cmp(&thr) != Ordering::Less)
        .collect()
}

/// The loss of one anchor with positive similarity `s_pos` and negative similarities `s_neg`,
/// weighted by `w` in the gradients. The negatives' LSE is accumulated in chunks of `chunk`
/// negatives whose partials are merged (`chunk ≥ s_neg.len()` is one pass).
pub(crate) fn anchor_loss(
    s_pos: f64,
    s_neg: &[f64],
    temp: &Temperature,
    variant: &Variant,
    w: f64,
    chunk: usize,
) -> AnchorOut {
    let keep = select(s_neg, variant.hard_k());
    if let Variant::Simple { lambda, .. } = *variant {
        // Eq. 3: −s+ + λ Σ_sel s_j, no temperature.
        let count = keep.iter().filter(|&&k| k).count();
        let lambda = lambda.unwrap_or(if count > 0 { 1.0 / count as f64 } else { 0.0 });
        let sum: f64 = s_neg
            .iter()
            .zip(&keep)
            .filter(|(_, &k)| k)
            .map(|(s, _)| s)
            .sum();
        return AnchorOut {
            loss: -s_pos + lambda * sum,
            lse: None,
            d_pos: -w,
            d_neg: keep
                .iter()
                .map(|&k| if k { w * lambda } else { 0.0 })
                .collect(),
            d_tau: 0.0,
        };
    }
    let logit = |s: f64| s / temp.tau(s);
    let z_pos = logit(s_pos);
    let z_neg: Vec<f64> = s_neg.iter().map(|&s| logit(s)).collect();
    // The negatives' partials, chunk by chunk, merged.
    let chunk = chunk.max(1);
    let neg = z_neg
        .chunks(chunk)
        .zip(keep.chunks(chunk))
        .map(|(zc, kc)| {
            let mut p = LsePartial::EMPTY;
            for (&z, &k) in zc.iter().zip(kc) {
                if k {
                    p.push(z);
                }
            }
            p
        })
        .fold(LsePartial::EMPTY, LsePartial::merge);
    let (lse, loss, dz_pos) = positive_terms(z_pos, neg, *variant == Variant::Decoupled, w);
    let dz_neg: Vec<f64> = z_neg
        .iter()
        .zip(&keep)
        .map(|(&z, &k)| if k { w * (z - lse).exp() } else { 0.0 })
        .collect();
    let tau = temp.tau(0.0);
    let d_tau = -(dz_pos * z_pos
        + dz_neg
            .iter()
            .zip(&z_neg)
            .filter(|(d, _)| **d != 0.0)
            .map(|(d, z)| d * z)
            .sum::<f64>())
        / tau;
    AnchorOut {
        loss,
        lse: Some(lse),
        d_pos: dz_pos * temp.dz_ds(s_pos),
        d_neg: dz_neg
            .iter()
            .zip(s_neg)
            .map(|(&d, &s)| if d == 0.0 { 0.0 } else { d * temp.dz_ds(s) })
            .collect(),
        d_tau,
    }
}

/// An anchor's log-sum-exp, loss and `∂L/∂z₊` from its positive logit `z_pos` and the merged
/// partial `neg` of its kept negatives, with upstream weight `w` (the fast CPU backend shares it).
///
/// Standard: `L = ln(1 + r)`, `r = Σ_j exp(z_j − z₊)`. When the positive is the largest logit
/// `r ≤ #negatives` cannot overflow, and `ln_1p` keeps L's relative precision as L → 0, where
/// `lse − z₊` rounds L to a multiple of ulp(z₊) (3e-11 relative for the logits [10, 20, 30] of
/// spec/losses.md's limits, exactly 0 for [100, 200, 300]). `∂L/∂z₊ = P₊ − 1 = −r/(1 + r)`.
/// Decoupled: the positive is out of the LSE, `∂L/∂z₊ = −1` (times `w`).
pub(crate) fn positive_terms(
    z_pos: f64,
    neg: LsePartial,
    decoupled: bool,
    w: f64,
) -> (f64, f64, f64) {
    let lse = if decoupled {
        neg.lse()
    } else {
        LsePartial::of(&[z_pos]).merge(neg).lse()
    };
    let r = (!decoupled && z_pos.is_finite() && neg.max <= z_pos)
        .then(|| neg.sum * (neg.max - z_pos).exp());
    let loss = match r {
        Some(r) => r.ln_1p(),
        None => lse - z_pos,
    };
    let dz_pos = match r {
        _ if decoupled => -w,
        Some(r) => -w * (r / (1.0 + r)),
        None => w * ((z_pos - lse).exp() - 1.0),
    };
    (lse, loss, dz_pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_keeps_ties_and_survives_nan() {
        let s = [0.1, 0.5, 0.3, 0.5, -0.2];
        assert_eq!(select(&s, Some(1)), vec![false, true, false, true, false]);
        assert_eq!(select(&s, Some(3)), vec![false, true, true, true, false]);
        assert_eq!(select(&s, Some(5)), vec![true; 5]);
        assert_eq!(select(&s, Some(9)), vec![true; 5]);
        let with_nan = [0.1, f64::NAN, 0.3];
        assert_eq!(select(&with_nan, Some(2)), vec![false, true, true]);
        let with_negative_nan = [0.1, -f64::NAN, 0.3];
        assert_eq!(
            select(&with_negative_nan, Some(1)),
            vec![false, true, false]
        );
    }

    #[test]
    fn empty_queue_is_zero_loss_zero_gradient() {
        let out = anchor_loss(
            0.7,
            &[],
            &Temperature::Fixed(0.1),
            &Variant::Standard,
            1.0,
            4,
        );
        assert_eq!(out.loss, 0.0);
        assert_eq!(out.lse, Some(0.7 / 0.1));
        assert_eq!(out.d_pos, 0.0);
    }
}
