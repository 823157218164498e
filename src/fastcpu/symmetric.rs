//! Symmetric (CLIP) mode: row losses (anchors `a_i` against keys `b_j`) and column losses
//! (anchors `b_j` against `a_i`) from the same tiles `S_pq = A_p·B_qᵀ`, in four block products per
//! tile over two passes:
//!
//! 1. forward: `S`, then each row's online LSE from the tile's rows and each column's from its
//!    transpose (both masked separately: hard negatives are selected per row and per column);
//! 2. backward: `S` again, `G = ∂(wL)/∂S` from both LSEs (`w_row(P^row − δ) + w_col(P^col − δ)`
//!    with the temperature's `∂z/∂s`), then `dA_p += G·B_q` and `dB_q += Gᵀ·A_p`.
//!
//! Each pass runs in rounds: in round `r`, block `p` of A meets block `q = (p + r) mod R` of B, so
//! no two tasks of a round share a block of A or of B, each block's state (online LSEs, gradient
//! rows) is owned by one task at a time without atomics, and every block sees the other side's
//! blocks in an order fixed by the shape: bitwise the same result for any thread count.

use std::ops::Range;

use rayon::prelude::*;

use super::anchor::{finalize, Fin, LossCtx, Merged};
use super::gemm;
use super::kernels::{backward_row, forward_row, hist_row, mask_row, Online, RowLoss};
use super::pair::{blocks, Select};
use super::simd;
use super::source::{AlignedBuf, Source};
use super::Blocking;
use crate::tensor::Element;

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

/// Runs `f(p, q, state_of_p, state_of_q)` for every pair, round by round, each round in parallel.
fn wave<SA: Send, SB: Send>(
    sa: &mut [Option<SA>],
    sb: &mut [Option<SB>],
    f: impl Fn(usize, usize, &mut SA, &mut SB) + Sync,
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
            .map(|(p, q, mut a, mut b)| {
                f(p, q, &mut a, &mut b);
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

/// A task's buffers.
#[derive(Default)]
struct Scratch {
    abuf: AlignedBuf,
    bbuf: AlignedBuf,
    s: Vec<f32>,
    t: Vec<f32>,
    g: Vec<f32>,
    g2: Vec<f32>,
    tmp: Vec<f32>,
}

impl Scratch {
    fn sized(n: usize) -> Vec<f32> {
        vec![0.0; n]
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

    /// Tile `(p, q)` into `sc.s` (rows × cols) and its transpose into `sc.t`, unmasked; returns
    /// the two blocks' sizes.
    fn tile(&self, p: usize, q: usize, sc: &mut Scratch) -> (usize, usize) {
        let (rows, cols) = (&self.a_blocks[p], &self.b_blocks[q]);
        let (na, nb) = (rows.len(), cols.len());
        let a_blk = self.a.block(rows.start, rows.end, &mut sc.abuf);
        let b_blk = self.b.block(cols.start, cols.end, &mut sc.bbuf);
        if sc.s.len() < na * nb {
            sc.s = Scratch::sized(na * nb);
            sc.t = Scratch::sized(na * nb);
        }
        gemm::a_bt(&mut sc.s, a_blk, b_blk, na, nb, self.a.cols());
        transpose(&sc.s[..na * nb], na, nb, &mut sc.t);
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
            let mut ha: Vec<Option<Vec<u32>>> = self
                .a_blocks
                .iter()
                .map(|r| Some(vec![0; r.len() * 256]))
                .collect();
            let mut hb: Vec<Option<Vec<u32>>> = self
                .b_blocks
                .iter()
                .map(|r| Some(vec![0; r.len() * 256]))
                .collect();
            let (pr, pc) = (&sel_r.prefix, &sel_c.prefix);
            wave(&mut ha, &mut hb, |p, q, ha, hb| {
                let mut sc = Scratch::default();
                let (na, nb) = self.tile(p, q, &mut sc);
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
        let simple = matches!(self.ctx.kind, super::kernels::Kind::Simple);
        let mut sa: Vec<Option<Online>> = self
            .a_blocks
            .iter()
            .map(|r| Some(Online::new(r.len(), simple)))
            .collect();
        let mut sb: Vec<Option<Online>> = self
            .b_blocks
            .iter()
            .map(|r| Some(Online::new(r.len(), simple)))
            .collect();
        let kind = &self.ctx.kind;
        wave(&mut sa, &mut sb, |p, q, oa, ob| {
            let mut sc = Scratch::default();
            let (na, nb) = self.tile(p, q, &mut sc);
            let (rows, cols) = (&self.a_blocks[p], &self.b_blocks[q]);
            let mut w = vec![0.0f32; na.max(nb)];
            for r in 0..na {
                let row = &mut sc.s[r * nb..(r + 1) * nb];
                if let Some(v) = mask_row(row, rows.start + r, cols.start, &self.rows) {
                    oa.s_pos[r] = Some(v);
                }
                forward_row(row, &mut w[..nb], kind, oa, r);
            }
            for c in 0..nb {
                let row = &mut sc.t[c * na..(c + 1) * na];
                if let Some(v) = mask_row(row, cols.start + c, rows.start, &self.cols) {
                    ob.s_pos[c] = Some(v);
                }
                forward_row(row, &mut w[..na], kind, ob, c);
            }
        });
        let merge = |states: Vec<Option<Online>>| -> Vec<Merged> {
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
        };
        SymForward {
            rows: merge(sa),
            cols: merge(sb),
        }
    }

    /// Pass 2 (module docs): the gradients of the rows as used (`u` when normalising), f64.
    pub fn backward(&self, fin_rows: &[Fin], fin_cols: &[Fin], da: &mut [f64], db: &mut [f64]) {
        let d = self.a.cols();
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
        let mut sa: Vec<Option<&mut [f64]>> = da.chunks_mut(ba * d.max(1)).map(Some).collect();
        let mut sb: Vec<Option<&mut [f64]>> = db.chunks_mut(bb * d.max(1)).map(Some).collect();
        if d == 0 {
            return;
        }
        let kind = &self.ctx.kind;
        wave(&mut sa, &mut sb, |p, q, ga, gb| {
            let mut sc = Scratch::default();
            let (na, nb) = self.tile(p, q, &mut sc);
            let (rows, cols) = (&self.a_blocks[p], &self.b_blocks[q]);
            sc.g = Scratch::sized(na * nb);
            sc.g2 = Scratch::sized(na * nb);
            for r in 0..na {
                let i = rows.start + r;
                let row = &mut sc.s[r * nb..(r + 1) * nb];
                mask_row(row, i, cols.start, &self.rows);
                let g = &mut sc.g[r * nb..(r + 1) * nb];
                backward_row(row, g, kind, lse_r[i], gc_r[i]);
                if cols.contains(&i) {
                    g[i - cols.start] = dp_r[i];
                }
            }
            for c in 0..nb {
                let j = cols.start + c;
                let row = &mut sc.t[c * na..(c + 1) * na];
                mask_row(row, j, rows.start, &self.cols);
                let g = &mut sc.g2[c * na..(c + 1) * na];
                backward_row(row, g, kind, lse_c[j], gc_c[j]);
                if rows.contains(&j) {
                    g[j - rows.start] = dp_c[j];
                }
            }
            // G += G2ᵀ (reusing t for the transpose).
            transpose(&sc.g2, nb, na, &mut sc.t);
            simd::add_assign(&mut sc.g[..na * nb], &sc.t[..na * nb]);
            let a_blk = self.a.block(rows.start, rows.end, &mut sc.abuf);
            let b_blk = self.b.block(cols.start, cols.end, &mut sc.bbuf);
            sc.tmp = Scratch::sized(na.max(nb) * d);
            gemm::a_b(&mut sc.tmp, &sc.g, b_blk, na, d, nb, false);
            simd::axpy64(ga, 1.0, &sc.tmp[..na * d]);
            gemm::at_b(&mut sc.tmp, &sc.g, a_blk, nb, d, na, false);
            simd::axpy64(gb, 1.0, &sc.tmp[..nb * d]);
        });
    }
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
