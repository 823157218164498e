//! One anchor's loss and gradient coefficients from its merged online state, in f64 and in the
//! reference's own formulas (`reference::anchor::anchor_loss`): the standard loss as `ln(1 + r)` when the
//! positive is the largest logit, the decoupled and simple variants, `∂L/∂τ`.

use super::kernels::Kind;
use crate::reference::anchor::positive_terms;
use crate::reference::LsePartial;
use crate::spec::{Temperature, Variant};

/// An anchor's merged online state over its (selected) negatives: logits' max `m`, `Σ exp(z − m)`,
/// `Σ exp(z − m) z` (the simple variant: `m = 0`, the count and `Σ s`), and `s₊`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Merged {
    pub m: f64,
    pub sum: f64,
    pub zsum: f64,
    pub s_pos: f32,
}

/// What the gradient passes need of one anchor.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Fin {
    /// `L_i` (unweighted).
    pub loss: f64,
    /// The LSE of the loss's denominator (NaN for the simple variant, which has none).
    pub lse: f64,
    /// `w ∂L/∂s₊`.
    pub dpos: f64,
    /// The coefficient of the forward's `U = Σ_j u_j b_j` in the anchor's gradient
    /// (`w e^(m−lse)/τ`, DySTreSS `w e^(m−lse)`, simple `w λ`).
    pub ucoef: f64,
    /// The coefficient of a negative's backward weight ([`super::kernels::backward_row`]).
    pub gcoef: f64,
    /// `w ∂L/∂τ` (learnable τ).
    pub dtau: f64,
}

/// The loss's constants.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LossCtx {
    pub temp: Temperature,
    pub variant: Variant,
    pub kind: Kind,
}

/// Finalises one anchor with weight `w` (spec: *The standard loss*, *Variants*, *Temperature*).
pub(crate) fn finalize(st: Merged, w: f64, ctx: &LossCtx) -> Fin {
    let s_pos = st.s_pos as f64;
    if let Variant::Simple { lambda, .. } = ctx.variant {
        let count = st.sum;
        let lambda = lambda.unwrap_or(if count > 0.0 { 1.0 / count } else { 0.0 });
        return Fin {
            loss: -s_pos + lambda * st.zsum,
            lse: f64::NAN,
            dpos: -w,
            ucoef: w * lambda,
            gcoef: w * lambda,
            dtau: 0.0,
        };
    }
    let temp = ctx.temp;
    let z_pos = s_pos / temp.tau(s_pos);
    let neg = LsePartial {
        max: st.m,
        sum: st.sum,
    };
    let (lse, loss, dz_pos) = positive_terms(z_pos, neg, ctx.variant == Variant::Decoupled, w);
    // P_j = exp(z_j − m) · c.
    let c = if st.sum == 0.0 {
        0.0
    } else {
        (st.m - lse).exp()
    };
    let tau = temp.tau(0.0);
    let dtau = if temp.is_learnable() {
        -(dz_pos * z_pos + w * c * st.zsum) / tau
    } else {
        0.0
    };
    let (ucoef, gcoef) = match ctx.kind {
        Kind::Scaled { .. } => (w * c / tau, w / tau),
        _ => (w * c, w),
    };
    Fin {
        loss,
        lse,
        dpos: dz_pos * temp.dz_ds(s_pos),
        ucoef,
        gcoef,
        dtau,
    }
}

/// Merges chunk states of one anchor in the given (fixed) order: `(m, sum, zsum)` rescaled to the
/// common max. The simple variant's states all have `m = 0` and simply add.
pub(crate) fn merge_chunks(
    parts: impl Iterator<Item = (f32, f32, f32)>,
) -> (f64, f64, f64, Vec<f64>) {
    let parts: Vec<(f64, f64, f64)> = parts
        .map(|(m, s, z)| (m as f64, s as f64, z as f64))
        .collect();
    let m = parts
        .iter()
        .fold(f64::NEG_INFINITY, |a, p| if p.0 > a { p.0 } else { a });
    let factors: Vec<f64> = parts
        .iter()
        .map(|p| {
            if p.0 == f64::NEG_INFINITY {
                0.0
            } else {
                (p.0 - m).exp()
            }
        })
        .collect();
    let sum = parts.iter().zip(&factors).map(|(p, f)| p.1 * f).sum();
    let zsum = parts.iter().zip(&factors).map(|(p, f)| p.2 * f).sum();
    (m, sum, zsum, factors)
}
