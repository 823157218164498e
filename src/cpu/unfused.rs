//! The unfused CPU baseline: the pipeline users write by hand (numpy, PyTorch eager), kept as
//! the yardstick the fused backend is timed against (spec/performance.md), on the same matrix
//! crate (faer), the same threads (the current rayon pool; products split into one row panel per
//! thread, faster here than faer's own parallel product) and the same vectorised `exp`:
//!
//! 1. one product to a full f32 logit matrix (`S = X·Yᵀ`, N×K; queue mode then concatenates the
//!    positive logits in front, `torch.cat([l_pos, l_neg]) / τ`, a second N×(K+1) matrix);
//! 2. a softmax cross-entropy over it (row LSE, loss, `dZ = w(P − onehot)/τ` written in place;
//!    symmetric mode also the column softmax, read column-wise without a transposed copy);
//! 3. products for the gradients: `dX = dZ·Y`, `dY = dZᵀ·X` (inbatch `dE = dZ·E + dZᵀ·E`).
//!
//! It materialises O(N·K) floats: 17 MB of logits for `moco`, 67 MB for `simclr-cpu` and
//! `clip-cpu`. Supported: every mode, fixed and learnable temperature, the standard variant, every
//! reduction, every input dtype (converted to f32 once, as users' `.float()`), no normalisation;
//! anything else returns [`Error::Unsupported`].

use faer::{MatMut, MatRef};
use rayon::prelude::*;

use super::gemm::par_matmul;
use super::simd;
use crate::error::{Error, Result};
use crate::loss::{Gradient, LossInputs, LossOutput, Upstream};
use crate::spec::{LossSpec, Mode, Temperature, Variant};
use crate::tensor::{DType, Element, MatRef as InputRef, Matrix};

/// Evaluates `spec` on `inputs` the unfused way (module docs); the same output as
/// [`crate::reference::evaluate`] for the supported specs.
///
/// Errors: [`Error::Unsupported`] for normalisation, DySTreSS or a variant other than standard;
/// otherwise the errors of [`LossInputs::validate`] and [`Upstream::weights`].
pub fn evaluate<T: Element>(
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    upstream: &Upstream,
) -> Result<LossOutput> {
    if spec.normalize() {
        return Err(Error::Unsupported(
            "the unfused baseline takes rows already normalised (normalize = false)".into(),
        ));
    }
    if spec.variant() != Variant::Standard {
        return Err(Error::Unsupported(format!(
            "the unfused baseline computes the standard variant only, not {:?}",
            spec.variant()
        )));
    }
    let (tau, learnable) = match spec.temperature() {
        Temperature::Fixed(t) => (t, false),
        Temperature::Learnable(t) => (t, true),
        Temperature::Dystress { .. } => {
            return Err(Error::Unsupported(
                "the unfused baseline has no DySTreSS temperature".into(),
            ))
        }
    };
    let shape = inputs.validate(spec)?;
    let w = upstream.weights(spec, shape.losses(spec.mode()))?;
    let d = shape.dim;
    let mats = inputs.matrices();
    let f32s: Vec<std::borrow::Cow<'_, [f32]>> = mats.iter().map(as_f32).collect();
    let view = |k: usize, rows: usize| MatRef::from_row_major_slice(&f32s[k][..rows * d], rows, d);
    let alpha = (1.0 / tau) as f32;
    let mut dtau_terms = 0.0f64;
    let mut out_grads: Vec<Vec<f32>> = Vec::new();
    let (losses, lse, lse_cols) = match *inputs {
        LossInputs::Queue {
            query, queue: mq, ..
        } => {
            let (n, k) = (query.rows(), mq.rows());
            let (q, m) = (view(0, n), view(2, k));
            // l_neg = q·Mᵀ, then logits = cat([l_pos, l_neg]) (/ τ in the cross-entropy).
            let mut l_neg = vec![0.0f32; n * k];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut l_neg, n, k),
                q,
                m.transpose(),
                false,
            );
            let kk = k + 1;
            let mut logits = vec![0.0f32; n * kk];
            logits.par_chunks_mut(kk).enumerate().for_each(|(i, row)| {
                let neg = &l_neg[i * k..(i + 1) * k];
                let qi = &f32s[0][i * d..(i + 1) * d];
                let pi = &f32s[1][i * d..(i + 1) * d];
                row[0] = qi.iter().zip(pi).map(|(a, b)| a * b).sum::<f32>();
                row[1..].copy_from_slice(neg);
            });
            drop(l_neg);
            let targets: Vec<usize> = vec![0; n];
            let ce = cross_entropy(&mut logits, n, kk, &targets, false, &w, alpha, learnable);
            dtau_terms += ce.dtau;
            // dq = dz₊ p + dZ_neg·M, dp = dz₊ q, dM = dZ_negᵀ·q.
            let dz = MatRef::from_row_major_slice(&logits, n, kk);
            let dz_neg = dz.subcols(1, k);
            let mut dq = vec![0.0f32; n * d];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut dq, n, d),
                dz_neg,
                m,
                false,
            );
            let mut dp = vec![0.0f32; n * d];
            for i in 0..n {
                let g = logits[i * kk];
                let (qi, pi) = (&f32s[0][i * d..(i + 1) * d], &f32s[1][i * d..(i + 1) * d]);
                for c in 0..d {
                    dq[i * d + c] += g * pi[c];
                    dp[i * d + c] = g * qi[c];
                }
            }
            out_grads.push(dq);
            out_grads.push(dp);
            if spec.grad_queue() {
                let mut dm = vec![0.0f32; k * d];
                par_matmul(
                    MatMut::from_row_major_slice_mut(&mut dm, k, d),
                    dz_neg.transpose(),
                    q,
                    false,
                );
                out_grads.push(dm);
            }
            (ce.loss, ce.lse, None)
        }
        LossInputs::InBatch { embeddings } => {
            let n2 = embeddings.rows();
            let half = n2 / 2;
            let e = view(0, n2);
            let mut z = vec![0.0f32; n2 * n2];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut z, n2, n2),
                e,
                e.transpose(),
                false,
            );
            let targets: Vec<usize> = (0..n2).map(|a| (a + half) % n2).collect();
            // The diagonal is masked (users' `logits.masked_fill(eye, -inf)`).
            let ce = cross_entropy(&mut z, n2, n2, &targets, true, &w, alpha, learnable);
            dtau_terms += ce.dtau;
            let dz = MatRef::from_row_major_slice(&z, n2, n2);
            let mut de = vec![0.0f32; n2 * d];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut de, n2, d),
                dz,
                e,
                false,
            );
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut de, n2, d),
                dz.transpose(),
                e,
                true,
            );
            out_grads.push(de);
            (ce.loss, ce.lse, None)
        }
        LossInputs::Cross {
            query,
            key,
            targets,
        } => {
            let (n, mk) = (query.rows(), key.rows());
            let (a, b) = (view(0, n), view(1, mk));
            let mut z = vec![0.0f32; n * mk];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut z, n, mk),
                a,
                b.transpose(),
                false,
            );
            let t: Vec<usize> = match targets {
                Some(t) => t.iter().map(|&y| y as usize).collect(),
                None => (0..n).collect(),
            };
            let ce = cross_entropy(&mut z, n, mk, &t, false, &w, alpha, learnable);
            dtau_terms += ce.dtau;
            let dz = MatRef::from_row_major_slice(&z, n, mk);
            let mut da = vec![0.0f32; n * d];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut da, n, d),
                dz,
                b,
                false,
            );
            let mut db = vec![0.0f32; mk * d];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut db, mk, d),
                dz.transpose(),
                a,
                false,
            );
            out_grads.push(da);
            out_grads.push(db);
            (ce.loss, ce.lse, None)
        }
        LossInputs::Symmetric { query, .. } => {
            let n = query.rows();
            let (a, b) = (view(0, n), view(1, n));
            let mut z = vec![0.0f32; n * n];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut z, n, n),
                a,
                b.transpose(),
                false,
            );
            let (wr, wc) = w.split_at(n);
            let ce = symmetric_ce(&mut z, n, wr, wc, alpha, learnable);
            dtau_terms += ce.dtau;
            let dz = MatRef::from_row_major_slice(&z, n, n);
            let mut da = vec![0.0f32; n * d];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut da, n, d),
                dz,
                b,
                false,
            );
            let mut db = vec![0.0f32; n * d];
            par_matmul(
                MatMut::from_row_major_slice_mut(&mut db, n, d),
                dz.transpose(),
                a,
                false,
            );
            out_grads.push(da);
            out_grads.push(db);
            (ce.loss, ce.lse, Some(ce.lse_cols))
        }
    };
    let symmetric = spec.mode() == Mode::Symmetric;
    let loss = crate::reference::reduce(&losses, spec.reduction(), symmetric);
    let grads = mats
        .iter()
        .zip(out_grads)
        .map(|(m, g)| Gradient {
            name: m.name(),
            value: Matrix {
                rows: m.rows(),
                cols: m.cols(),
                data: g.into_iter().map(f64::from).collect(),
            },
        })
        .collect();
    Ok(LossOutput {
        loss,
        lse,
        lse_cols,
        grads,
        grad_temperature: learnable.then_some(dtau_terms),
    })
}

/// The input as f32: borrowed when it is f32, else converted once.
fn as_f32<'a, T: Element>(m: &InputRef<'a, T>) -> std::borrow::Cow<'a, [f32]> {
    if T::DTYPE == DType::F32 {
        if let Ok(x) = bytemuck::try_cast_slice::<T, f32>(m.data()) {
            return std::borrow::Cow::Borrowed(x);
        }
    }
    std::borrow::Cow::Owned(m.data().iter().map(|v| v.to_f32()).collect())
}

/// Per-anchor losses and LSEs, and `Σ_i w_i ∂L_i/∂τ`.
struct Ce {
    loss: Vec<f64>,
    lse: Vec<f64>,
    lse_cols: Vec<f64>,
    dtau: f64,
}

/// Softmax cross-entropy over the rows of the `n × k` similarity matrix `z` (divided by τ here)
/// with one target per row; `mask_diagonal`: column `i` of row `i` is not a candidate. Overwrites
/// `z` with `∂(Σ w L)/∂s = w (P − onehot) α`.
#[allow(clippy::too_many_arguments)]
fn cross_entropy(
    z: &mut [f32],
    n: usize,
    k: usize,
    targets: &[usize],
    mask_diagonal: bool,
    w: &[f64],
    alpha: f32,
    learnable: bool,
) -> Ce {
    let rows: Vec<(f64, f64, f64)> = z
        .par_chunks_mut(k.max(1))
        .take(n)
        .enumerate()
        .map(|(i, row)| {
            // logits / τ.
            simd::scale(row, alpha);
            if mask_diagonal {
                row[i] = f32::NEG_INFINITY;
            }
            let m = simd::max(row);
            let mut e = vec![0.0f32; row.len()];
            let sum = simd::exp_sum(row, 1.0, m, &mut e);
            let lse = m as f64 + (sum as f64).ln();
            let zt = row[targets[i]] as f64;
            // ∂L/∂z = P − onehot; ∂τ term Σ (∂L/∂z) z; then to ∂s by α.
            let mut dtau = 0.0f64;
            if learnable {
                for (c, &x) in row.iter().enumerate() {
                    if x != f32::NEG_INFINITY {
                        let g = (x as f64 - lse).exp() - if c == targets[i] { 1.0 } else { 0.0 };
                        dtau += g * x as f64;
                    }
                }
            }
            let scale = (w[i] as f32) * alpha;
            simd::exp_scale(row, 1.0, lse as f32, scale, &mut e);
            row.copy_from_slice(&e);
            row[targets[i]] -= scale;
            (lse - zt, lse, -w[i] * dtau * alpha as f64)
        })
        .collect();
    Ce {
        loss: rows.iter().map(|r| r.0).collect(),
        lse: rows.iter().map(|r| r.1).collect(),
        lse_cols: Vec::new(),
        dtau: rows.iter().map(|r| r.2).sum(),
    }
}

/// CLIP: row and column softmax cross-entropies of `z = S` (scaled here by α), targets on the
/// diagonal, weights `wr` (rows) and `wc` (columns); overwrites `z` with `∂(Σ w L)/∂s`.
fn symmetric_ce(
    z: &mut [f32],
    n: usize,
    wr: &[f64],
    wc: &[f64],
    alpha: f32,
    learnable: bool,
) -> Ce {
    simd::scale(z, alpha);
    // Row LSEs.
    let lse_r: Vec<f32> = z
        .par_chunks(n)
        .map(|row| {
            let m = simd::max(row);
            let mut e = vec![0.0f32; n];
            m + simd::exp_sum(row, 1.0, m, &mut e).ln()
        })
        .collect();
    // Column LSEs, reading rows (no transposed copy): max, then sums, in column panels.
    const PANEL: usize = 256;
    let lse_c: Vec<f32> = (0..n.div_ceil(PANEL))
        .into_par_iter()
        .flat_map_iter(|p| {
            let cols = p * PANEL..((p + 1) * PANEL).min(n);
            let mut m = vec![f32::NEG_INFINITY; cols.len()];
            for row in z.chunks(n) {
                simd::col_max(&row[cols.clone()], &mut m);
            }
            let mut s = vec![0.0f32; cols.len()];
            let mut unused = vec![0.0f32; cols.len()];
            for row in z.chunks(n) {
                simd::exp_acc_cols(&row[cols.clone()], 1.0, &m, &mut s, &mut unused, false);
            }
            m.into_iter()
                .zip(s)
                .map(|(m, s)| m + s.ln())
                .collect::<Vec<_>>()
        })
        .collect();
    let loss_r: Vec<f64> = (0..n)
        .map(|i| lse_r[i] as f64 - z[i * n + i] as f64)
        .collect();
    let loss_c: Vec<f64> = (0..n)
        .map(|j| lse_c[j] as f64 - z[j * n + j] as f64)
        .collect();
    // dZ = wr (P^row − δ) + wc (P^col − δ), then ·α; the τ term before scaling.
    let wc32: Vec<f32> = wc.iter().map(|&x| x as f32).collect();
    let dtau: f64 = z
        .par_chunks_mut(n)
        .enumerate()
        .map_init(
            || vec![0.0f32; n],
            |g, (i, row)| {
                simd::exp_scale(row, 1.0, lse_r[i], wr[i] as f32, g);
                simd::exp_scale_cols_add(row, 1.0, &lse_c, &wc32, g);
                g[i] -= wr[i] as f32 + wc32[i];
                let t: f64 = if learnable {
                    g.iter()
                        .zip(row.iter())
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum()
                } else {
                    0.0
                };
                for (x, &v) in row.iter_mut().zip(g.iter()) {
                    *x = v * alpha;
                }
                -t * alpha as f64
            },
        )
        .sum();
    let mut loss = loss_r;
    loss.extend(loss_c);
    Ce {
        loss,
        lse: lse_r.into_iter().map(f64::from).collect(),
        lse_cols: lse_c.into_iter().map(f64::from).collect(),
        dtau,
    }
}
