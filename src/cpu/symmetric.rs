//! Symmetric (CLIP) mode: row losses (anchors `a_i` against keys `b_j`) and column losses
//! (anchors `b_j` against `a_i`) from the same tiles `S_pq = A_p·B_qᵀ`, in four block products per
//! tile over two passes:
//!
//! 1. forward: `S`, then each row's online LSE along the tile's rows and each column's down its
//!    columns (masked separately: hard negatives are selected per row and per column);
//! 2. backward: `S` again, `G = ∂(wL)/∂S` from both LSEs (`w_row(P^row − δ) + w_col(P^col − δ)`
//!    with the temperature's `∂z/∂s`), then `dA_p += G·B_q` and `dB_q += Gᵀ·A_p`, accumulated in
//!    f32 in the gradients' own memory ([`simd::widen_in_place`] makes them f64 at the end).
//!
//! With a fixed or learnable τ and no hard-negative selection the columns are reduced along the
//! tile's rows (vectorised across columns, no transpose); otherwise the column side runs the row
//! kernels on the tile's transpose.
//!
//! Each pass runs in rounds: in round `r`, block `p` of A meets block `q = (p + r) mod R` of B, so
//! no two tasks of a round share a block of A or of B, each block's state (online LSEs, gradient
//! rows) is owned by one task at a time without atomics, and every block sees the other side's
//! blocks in an order fixed by the shape: bitwise the same result for any thread count.

use std::ops::Range;

use rayon::prelude::*;

use super::anchor::{finalize, Fin, LossCtx, Merged};
use super::gemm;
use super::kernels::{backward_row, forward_row, hist_row, mask_row, Kind, Online, RowLoss};
use super::pair::{blocks, Select};
use super::simd;
use super::source::{AlignedBuf, Source};
use super::Blocking;
use crate::tensor::Element;

/// A task's buffers, reused across the tasks a thread runs (contents are always written before
/// they are read).
#[derive(Default)]
pub(crate) struct Scratch {
    pub abuf: AlignedBuf,
    pub bbuf: AlignedBuf,
    pub s: Vec<f32>,
    pub t: Vec<f32>,
    pub g: Vec<f32>,
    pub g2: Vec<f32>,
    pub w: Vec<f32>,
    pub cols: Vec<f32>,
}

/// `v` grown to at least `n` elements, as a slice of `n`.
pub(crate) fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// The rounds of the conflict-free schedule: round `r` pairs A block `p` with B block
/// `(p + r) mod max(P, Q)` (skipped past Q).
fn rounds(p: usize, q: usize) -> Vec<Vec<(usize, usize)>> {
    let r = p.max(q);
    (0..r)
        .map(|k| {
            (0..p)
                .filter_map(|pi| {
                    let qi = (pi + k) % r;
                    (qi < q).then_some((pi, qi))
                })
                .collect()
        })
        .collect()
}

/// Runs `f(scratch, p, q, state_of_p, state_of_q)` for every pair, round by round, each round in
/// parallel.
fn wave<SA: Send, SB: Send>(
    sa: &mut [Option<SA>],
    sb: &mut [Option<SB>],
    f: impl Fn(&mut Scratch, usize, usize, &mut SA, &mut SB) + Sync,
) {
    for round in rounds(sa.len(), sb.len()) {
        let tasks: Vec<(usize, usize, SA, SB)> = round
            .iter()
            .map(|&(p, q)| {
                let a = sa[p].take().expect("a block is in one task per round");
                let b = sb[q].take().expect("a block is in one task per round");
                (p, q, a, b)
            })
            .collect();
        let done: Vec<(usize, usize, SA, SB)> = tasks
            .into_par_iter()
            .map_init(Scratch::default, |sc, (p, q, mut a, mut b)| {
                f(sc, p, q, &mut a, &mut b);
                (p, q, a, b)
            })
            .collect();
        for (p, q, a, b) in done {
            sa[p] = Some(a);
            sb[q] = Some(b);
        }
    }
}

/// `t (cols × rows) = sᵀ` for a row-major `rows × cols` tile.
pub(crate) fn transpose(s: &[f32], rows: usize, cols: usize, t: &mut [f32]) {
    const B: usize = 16;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    t[c * rows + r] = s[r * cols + c];
                }
            }
        }
    }
}

/// The column-wise online step of a masked tile (rows × cols) for column anchors with a fixed or
/// learnable τ (`alpha`): the forward of [`forward_row`] down every column at once.
pub(crate) fn forward_cols(
    s: &[f32],
    rows: usize,
    cols: usize,
    alpha: f32,
    learnable: bool,
    st: &mut Online,
    shift: &mut Vec<f32>,
) {
    let mut mx = vec![f32::NEG_INFINITY; cols];
    for r in 0..rows {
        simd::col_max(&s[r * cols..(r + 1) * cols], &mut mx);
    }
    let shift = buf(shift, cols);
    for j in 0..cols {
        let m_old = st.m[j];
        let cand = alpha * mx[j];
        let m_new = if cand > m_old { cand } else { m_old };
        if m_old != f32::NEG_INFINITY && m_new != m_old {
            let c = simd::exp(m_old - m_new);
            st.sum[j] *= c;
            st.zsum[j] *= c;
        }
        st.m[j] = m_new;
        // A column with no negative yet: every entry is −∞ (or NaN, which must still poison).
        shift[j] = if m_new == f32::NEG_INFINITY {
            f32::INFINITY
        } else {
            m_new
        };
    }
    for r in 0..rows {
        simd::exp_acc_cols(
            &s[r * cols..(r + 1) * cols],
            alpha,
            shift,
            &mut st.sum[..cols],
            &mut st.zsum[..cols],
            learnable,
        );
    }
}

impl<'s, 'a, T: Element> SymProblem<'s, 'a, T> {
    /// The problem on the grid of `blocking`.
    pub fn new(
        a: &'s Source<'a, T>,
        b: &'s Source<'a, T>,
        rows: RowLoss,
        cols: RowLoss,
        ctx: LossCtx,
        blocking: Blocking,
    ) -> Self {
        Self {
            a,
            b,
            rows,
            cols,
            ctx,
            a_blocks: blocks(a.rows(), blocking.anchors),
            b_blocks: blocks(b.rows(), blocking.keys),
        }
    }

    /// The column side can be reduced along the tile's rows: fixed or learnable τ and the same
    /// mask for rows and columns (no hard-negative thresholds; both positives are the diagonal).
    fn columns_in_place(&self) -> Option<(f32, bool)> {
        match self.ctx.kind {
            Kind::Scaled { alpha, learnable } if self.rows.thr.is_none() => {
                Some((alpha, learnable))
            }
            _ => None,
        }
    }

    /// Tile `(p, q)` into `sc.s` (rows × cols), and its transpose into `sc.t` when `transposed`;
    /// unmasked. Returns the two blocks' sizes.
    fn tile(&self, p: usize, q: usize, sc: &mut Scratch, transposed: bool) -> (usize, usize) {
        let (rows, cols) = (&self.a_blocks[p], &self.b_blocks[q]);
        let (na, nb) = (rows.len(), cols.len());
        let a_blk = self.a.block(rows.start, rows.end, &mut sc.abuf);
        let b_blk = self.b.block(cols.start, cols.end, &mut sc.bbuf);
        gemm::a_bt(buf(&mut sc.s, na * nb), a_blk, b_blk, na, nb, self.a.cols());
        if transposed {
            transpose(&sc.s[..na * nb], na, nb, buf(&mut sc.t, na * nb));
        }
        (na, nb)
    }

    /// `hard:k` thresholds of the row and the column losses (radix select, as
    /// [`super::pair::thresholds`]), from the same tiles as the loss passes.
    pub fn thresholds(&self, k: usize, negatives: usize) -> (Vec<u32>, Vec<u32>) {
        let (n, m) = (self.a.rows(), self.b.rows());
        if k >= negatives {
            return (vec![0; n], vec![0; m]);
        }
        let mut sel_r = Select::new(n, k);
        let mut sel_c = Select::new(m, k);
        for shift in [24u32, 16, 8, 0] {
            let hists = |b: &[Range<usize>]| -> Vec<Option<Vec<u32>>> {
                b.iter().map(|r| Some(vec![0; r.len() * 256])).collect()
            };
            let (mut ha, mut hb) = (hists(&self.a_blocks), hists(&self.b_blocks));
            let (pr, pc) = (&sel_r.prefix, &sel_c.prefix);
            wave(&mut ha, &mut hb, |sc, p, q, ha, hb| {
                let (na, nb) = self.tile(p, q, sc, true);
                let (rows, cols) = (&self.a_blocks[p], &self.b_blocks[q]);
                for r in 0..na {
                    let i = rows.start + r;
                    let h = &mut ha[r * 256..(r + 1) * 256];
                    hist_row(
                        &sc.s[r * nb..(r + 1) * nb],
                        i,
                        cols.start,
                        &self.rows,
                        pr[i],
                        shift,
                        h,
                    );
                }
                for c in 0..nb {
                    let j = cols.start + c;
                    let h = &mut hb[c * 256..(c + 1) * 256];
                    hist_row(
                        &sc.t[c * na..(c + 1) * na],
                        j,
                        rows.start,
                        &self.cols,
                        pc[j],
                        shift,
                        h,
                    );
                }
            });
            for (blocks, hists, sel) in [
                (&self.a_blocks, &ha, &mut sel_r),
                (&self.b_blocks, &hb, &mut sel_c),
            ] {
                for (range, h) in blocks.iter().zip(hists) {
                    let h = h.as_ref().expect("every block returned");
                    for (r, i) in range.clone().enumerate() {
                        let mut one = [0u32; 256];
                        one.copy_from_slice(&h[r * 256..(r + 1) * 256]);
                        sel.digit(i, shift, &one);
                    }
                }
            }
        }
        (sel_r.prefix, sel_c.prefix)
    }

    /// Pass 1 (module docs).
    pub fn forward(&self) -> SymForward {
        let simple = matches!(self.ctx.kind, Kind::Simple);
        let online = |b: &[Range<usize>]| -> Vec<Option<Online>> {
            b.iter()
                .map(|r| Some(Online::new(r.len(), simple)))
                .collect()
        };
        let (mut sa, mut sb) = (online(&self.a_blocks), online(&self.b_blocks));
        let kind = &self.ctx.kind;
        let in_place = self.columns_in_place();
        wave(&mut sa, &mut sb, |sc, p, q, oa, ob| {
            let (na, nb) = self.tile(p, q, sc, in_place.is_none());
            let (rows, cols) = (&self.a_blocks[p], &self.b_blocks[q]);
            let w = buf(&mut sc.w, na.max(nb));
            for r in 0..na {
                let i = rows.start + r;
                let row = &mut sc.s[r * nb..(r + 1) * nb];
                if let (Some(_), true) = (in_place, cols.contains(&i)) {
                    // The column anchor i's positive is this same entry.
                    ob.s_pos[i - cols.start] = Some(row[i - cols.start]);
                }
                if let Some(v) = mask_row(row, i, cols.start, &self.rows) {
                    oa.s_pos[r] = Some(v);
                }
                forward_row(row, &mut w[..nb], kind, oa, r);
            }
            match in_place {
                Some((alpha, learnable)) => {
                    forward_cols(&sc.s[..na * nb], na, nb, alpha, learnable, ob, &mut sc.cols)
                }
                None => {
                    for c in 0..nb {
                        let row = &mut sc.t[c * na..(c + 1) * na];
                        if let Some(v) = mask_row(row, cols.start + c, rows.start, &self.cols) {
                            ob.s_pos[c] = Some(v);
                        }
                        forward_row(row, &mut w[..na], kind, ob, c);
                    }
                }
            }
        });
        SymForward {
            rows: merged(sa),
            cols: merged(sb),
        }
    }

    /// Pass 2 (module docs): the gradients of the rows as used (`u` when normalising), f64.
    pub fn backward(&self, fin_rows: &[Fin], fin_cols: &[Fin], da: &mut [f64], db: &mut [f64]) {
        let d = self.a.cols();
        if d == 0 {
            return;
        }
        let coef = |f: &[Fin]| -> (Vec<f32>, Vec<f32>, Vec<f32>) {
            (
                f.iter().map(|x| x.lse as f32).collect(),
                f.iter().map(|x| x.gcoef as f32).collect(),
                f.iter().map(|x| x.dpos as f32).collect(),
            )
        };
        let (lse_r, gc_r, dp_r) = coef(fin_rows);
        let (lse_c, gc_c, dp_c) = coef(fin_cols);
        let ba = self.a_blocks.first().map_or(1, |r| r.len()).max(1);
        let bb = self.b_blocks.first().map_or(1, |r| r.len()).max(1);
        let (n, m) = (self.a.rows(), self.b.rows());
        let acc_a = &mut bytemuck::cast_slice_mut::<f64, f32>(da)[..n * d];
        let acc_b = &mut bytemuck::cast_slice_mut::<f64, f32>(db)[..m * d];
        let mut sa: Vec<Option<&mut [f32]>> = acc_a.chunks_mut(ba * d).map(Some).collect();
        let mut sb: Vec<Option<&mut [f32]>> = acc_b.chunks_mut(bb * d).map(Some).collect();
        let kind = &self.ctx.kind;
        let in_place = self.columns_in_place();
        wave(&mut sa, &mut sb, |sc, p, q, ga, gb| {
            let (na, nb) = self.tile(p, q, sc, in_place.is_none());
            let (rows, cols) = (&self.a_blocks[p], &self.b_blocks[q]);
            let g = buf(&mut sc.g, na * nb);
            for r in 0..na {
                let i = rows.start + r;
                let row = &mut sc.s[r * nb..(r + 1) * nb];
                mask_row(row, i, cols.start, &self.rows);
                let gr = &mut g[r * nb..(r + 1) * nb];
                backward_row(row, gr, kind, lse_r[i], gc_r[i]);
                if let Some((alpha, _)) = in_place {
                    let cs = cols.clone();
                    simd::exp_scale_cols_add(row, alpha, &lse_c[cs.clone()], &gc_c[cs], gr);
                    if cols.contains(&i) {
                        gr[i - cols.start] = dp_r[i] + dp_c[i];
                    }
                } else if cols.contains(&i) {
                    gr[i - cols.start] = dp_r[i];
                }
            }
            if in_place.is_none() {
                let g2 = buf(&mut sc.g2, na * nb);
                for c in 0..nb {
                    let j = cols.start + c;
                    let row = &mut sc.t[c * na..(c + 1) * na];
                    mask_row(row, j, rows.start, &self.cols);
                    let gc = &mut g2[c * na..(c + 1) * na];
                    backward_row(row, gc, kind, lse_c[j], gc_c[j]);
                    if rows.contains(&j) {
                        gc[j - rows.start] = dp_c[j];
                    }
                }
                // G += G2ᵀ.
                transpose(g2, nb, na, buf(&mut sc.t, na * nb));
                simd::add_assign(g, &sc.t[..na * nb]);
            }
            let a_blk = self.a.block(rows.start, rows.end, &mut sc.abuf);
            let b_blk = self.b.block(cols.start, cols.end, &mut sc.bbuf);
            gemm::a_b(ga, g, b_blk, na, d, nb, true);
            gemm::at_b(gb, g, a_blk, nb, d, na, true);
        });
        simd::widen_in_place(da);
        simd::widen_in_place(db);
    }
}

/// Per-anchor merged states of a pass's blocks, in block order.
pub(crate) fn merged(states: Vec<Option<Online>>) -> Vec<Merged> {
    states
        .into_iter()
        .flatten()
        .flat_map(|o| {
            (0..o.m.len())
                .map(|r| Merged {
                    m: o.m[r] as f64,
                    sum: o.sum[r] as f64,
                    zsum: o.zsum[r] as f64,
                    s_pos: o.s_pos[r].unwrap_or(f32::NAN),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The symmetric problem on its grid.
pub(crate) struct SymProblem<'s, 'a, T> {
    pub a: &'s Source<'a, T>,
    pub b: &'s Source<'a, T>,
    /// Anchors `a_i` (tile rows), positive column `i`.
    pub rows: RowLoss,
    /// Anchors `b_j` (tile columns), positive row `j`.
    pub cols: RowLoss,
    pub ctx: LossCtx,
    pub a_blocks: Vec<Range<usize>>,
    pub b_blocks: Vec<Range<usize>>,
}

/// Results of the symmetric forward: per row anchor, then per column anchor.
pub(crate) struct SymForward {
    pub rows: Vec<Merged>,
    pub cols: Vec<Merged>,
}

/// Finalises rows (weights `w[..N]`) and columns (`w[N..]`).
pub(crate) fn finalize_sym(fwd: &SymForward, w: &[f64], ctx: &LossCtx) -> (Vec<Fin>, Vec<Fin>) {
    let n = fwd.rows.len();
    let fin = |m: &[Merged], w: &[f64]| -> Vec<Fin> {
        m.par_iter()
            .zip(w.par_iter())
            .map(|(m, &w)| finalize(*m, w, ctx))
            .collect()
    };
    (fin(&fwd.rows, &w[..n]), fin(&fwd.cols, &w[n..]))
}
