//! Inbatch (SimCLR NT-Xent) mode on the symmetry of `S = E·Eᵀ`: each unordered pair of blocks
//! `{p, q}` is one tile `S_pq = E_p·E_qᵀ` (p ≤ q), whose rows serve the anchors of block p and
//! whose columns (its transpose) serve the anchors of block q. Every similarity is computed once
//! per pass (and `s_ab = s_ba` exactly), so the work is half of a row-by-row schedule:
//!
//! 1. forward: `S_pq`, each row's and each column's online LSE (one product per tile);
//! 2. backward: `S_pq` again, `H = G + G'ᵀ` with `G_ab = ∂(w_a L_a)/∂s_ab` from the rows and
//!    `G'_ba = ∂(w_b L_b)/∂s_ba` from the columns, then `dE_p += H·E_q` and `dE_q += Hᵀ·E_p`
//!    (`dE_a = Σ_b (G_ab + G_ba) e_b`, spec: *inbatch*); a diagonal tile adds `(G + Gᵀ)·E_p`.
//!
//! Tiles run in the rounds of a round-robin tournament (circle method): no two tasks of a round
//! share a block, so each block's state is owned by one task at a time, and each block meets the
//! others in an order fixed by the shape (bitwise the same for any thread count).

use std::ops::Range;

use rayon::prelude::*;

use super::anchor::{Fin, LossCtx, Merged};
use super::gemm;
use super::kernels::{backward_row, forward_row, hist_row, mask_row, Kind, Online, RowLoss};
use super::pair::{blocks, Select};
use super::simd;
use super::source::Source;
use super::symmetric::{buf, forward_cols, merged, transpose, Scratch};
use crate::tensor::Element;

/// The rounds: first every diagonal tile `(p, p)`, then the `P − 1` (P even) rounds of the circle
/// method over unordered pairs `(p, q)`, `p < q`.
fn rounds(p: usize) -> Vec<Vec<(usize, usize)>> {
    let mut out = vec![(0..p).map(|i| (i, i)).collect::<Vec<_>>()];
    let n = p + p % 2; // a dummy player when P is odd
    let m = n.saturating_sub(1);
    for r in 0..m {
        let mut round = Vec::with_capacity(n / 2);
        let mut push = |a: usize, b: usize| {
            if a < p && b < p {
                round.push((a.min(b), a.max(b)));
            }
        };
        push(r, n - 1);
        for i in 1..n / 2 {
            push((r + i) % m, (r + m - i) % m);
        }
        out.push(round);
    }
    out
}

/// Runs `f(scratch, p, q, state_p, state_q)` for every tile, round by round (`state_q` is `None`
/// on the diagonal), each round in parallel.
fn tournament<S: Send>(
    states: &mut [Option<S>],
    f: impl Fn(&mut Scratch, usize, usize, &mut S, Option<&mut S>) + Sync,
) {
    for round in rounds(states.len()) {
        let tasks: Vec<(usize, usize, S, Option<S>)> = round
            .iter()
            .map(|&(p, q)| {
                let a = states[p].take().expect("a block is in one task per round");
                let b =
                    (q != p).then(|| states[q].take().expect("a block is in one task per round"));
                (p, q, a, b)
            })
            .collect();
        let done: Vec<(usize, usize, S, Option<S>)> = tasks
            .into_par_iter()
            .map_init(Scratch::default, |sc, (p, q, mut a, mut b)| {
                f(sc, p, q, &mut a, b.as_mut());
                (p, q, a, b)
            })
            .collect();
        for (p, q, a, b) in done {
            states[p] = Some(a);
            if let Some(b) = b {
                states[q] = Some(b);
            }
        }
    }
}

/// The inbatch problem on its grid of blocks.
pub(crate) struct InBatchProblem<'s, 'a, T> {
    pub e: &'s Source<'a, T>,
    pub loss: RowLoss,
    pub ctx: LossCtx,
    pub blocks: Vec<Range<usize>>,
}

impl<'s, 'a, T: Element> InBatchProblem<'s, 'a, T> {
    /// The problem in blocks of `b` rows.
    pub fn new(e: &'s Source<'a, T>, loss: RowLoss, ctx: LossCtx, b: usize) -> Self {
        Self {
            e,
            loss,
            ctx,
            blocks: blocks(e.rows(), b),
        }
    }

    /// The column side of an off-diagonal tile can be reduced along its rows: fixed or learnable
    /// τ and no hard-negative thresholds (off the diagonal a row's and a column's positive are
    /// the same entries, `pos` being an involution, and no anchor meets itself).
    fn columns_in_place(&self) -> Option<(f32, bool)> {
        match self.ctx.kind {
            Kind::Scaled { alpha, learnable } if self.loss.thr.is_none() => {
                Some((alpha, learnable))
            }
            _ => None,
        }
    }

    /// Tile `(p, q)` into `sc.s` and, off the diagonal when `transposed`, its transpose into
    /// `sc.t` (unmasked).
    fn tile(&self, p: usize, q: usize, sc: &mut Scratch, transposed: bool) -> (usize, usize) {
        let (rp, rq) = (&self.blocks[p], &self.blocks[q]);
        let (na, nb) = (rp.len(), rq.len());
        let a_blk = self.e.block(rp.start, rp.end, &mut sc.abuf);
        let b_blk = self.e.block(rq.start, rq.end, &mut sc.bbuf);
        gemm::a_bt(buf(&mut sc.s, na * nb), a_blk, b_blk, na, nb, self.e.cols());
        if p != q && transposed {
            transpose(&sc.s[..na * nb], na, nb, buf(&mut sc.t, na * nb));
        }
        (na, nb)
    }

    /// `hard:k` thresholds (radix select on the tiles of the loss passes).
    pub fn thresholds(&self, k: usize, negatives: usize) -> Vec<u32> {
        let n = self.e.rows();
        if k >= negatives {
            return vec![0; n];
        }
        let mut sel = Select::new(n, k);
        for shift in [24u32, 16, 8, 0] {
            let mut hist: Vec<Option<Vec<u32>>> = self
                .blocks
                .iter()
                .map(|r| Some(vec![0; r.len() * 256]))
                .collect();
            let prefix = &sel.prefix;
            tournament(&mut hist, |sc, p, q, hp, hq| {
                let (na, nb) = self.tile(p, q, sc, true);
                let (rp, rq) = (&self.blocks[p], &self.blocks[q]);
                for r in 0..na {
                    let a = rp.start + r;
                    let h = &mut hp[r * 256..(r + 1) * 256];
                    hist_row(
                        &sc.s[r * nb..(r + 1) * nb],
                        a,
                        rq.start,
                        &self.loss,
                        prefix[a],
                        shift,
                        h,
                    );
                }
                if let Some(hq) = hq {
                    for c in 0..nb {
                        let b = rq.start + c;
                        let h = &mut hq[c * 256..(c + 1) * 256];
                        hist_row(
                            &sc.t[c * na..(c + 1) * na],
                            b,
                            rp.start,
                            &self.loss,
                            prefix[b],
                            shift,
                            h,
                        );
                    }
                }
            });
            for (range, h) in self.blocks.iter().zip(&hist) {
                let h = h.as_ref().expect("every block returned");
                for (r, i) in range.clone().enumerate() {
                    let mut one = [0u32; 256];
                    one.copy_from_slice(&h[r * 256..(r + 1) * 256]);
                    sel.digit(i, shift, &one);
                }
            }
        }
        sel.prefix
    }

    /// Pass 1: every anchor's merged online state.
    pub fn forward(&self) -> Vec<Merged> {
        let simple = matches!(self.ctx.kind, super::kernels::Kind::Simple);
        let mut states: Vec<Option<Online>> = self
            .blocks
            .iter()
            .map(|r| Some(Online::new(r.len(), simple)))
            .collect();
        let kind = &self.ctx.kind;
        let in_place = self.columns_in_place();
        tournament(&mut states, |sc, p, q, op, oq| {
            let (na, nb) = self.tile(p, q, sc, in_place.is_none());
            let (rp, rq) = (&self.blocks[p], &self.blocks[q]);
            let w = buf(&mut sc.w, na.max(nb));
            let mut oq = oq;
            for r in 0..na {
                let a = rp.start + r;
                let row = &mut sc.s[r * nb..(r + 1) * nb];
                if let (Some(_), Some(oq)) = (in_place, oq.as_deref_mut()) {
                    // Column pos(a)'s positive is this same entry.
                    if let Some(c) = self.loss.pos_col(a).filter(|c| rq.contains(c)) {
                        oq.s_pos[c - rq.start] = Some(row[c - rq.start]);
                    }
                }
                if let Some(v) = mask_row(row, a, rq.start, &self.loss) {
                    op.s_pos[r] = Some(v);
                }
                forward_row(row, &mut w[..nb], kind, op, r);
            }
            if let Some(oq) = oq {
                match in_place {
                    Some((alpha, learnable)) => {
                        forward_cols(&sc.s[..na * nb], na, nb, alpha, learnable, oq, &mut sc.cols)
                    }
                    None => {
                        for c in 0..nb {
                            let row = &mut sc.t[c * na..(c + 1) * na];
                            if let Some(v) = mask_row(row, rq.start + c, rp.start, &self.loss) {
                                oq.s_pos[c] = Some(v);
                            }
                            forward_row(row, &mut w[..na], kind, oq, c);
                        }
                    }
                }
            }
        });
        merged(states)
    }

    /// Pass 2: `dE` (of the rows as used) added into `de` (f64).
    pub fn backward(&self, fin: &[Fin], de: &mut [f64]) {
        let d = self.e.cols();
        if d == 0 {
            return;
        }
        let lse: Vec<f32> = fin.iter().map(|f| f.lse as f32).collect();
        let gcoef: Vec<f32> = fin.iter().map(|f| f.gcoef as f32).collect();
        let dpos: Vec<f32> = fin.iter().map(|f| f.dpos as f32).collect();
        let b = self.blocks.first().map_or(1, |r| r.len()).max(1);
        let n = self.e.rows();
        let acc = &mut bytemuck::cast_slice_mut::<f64, f32>(de)[..n * d];
        let mut states: Vec<Option<&mut [f32]>> = acc.chunks_mut(b * d).map(Some).collect();
        let kind = &self.ctx.kind;
        let loss = &self.loss;
        let in_place = self.columns_in_place();
        // The weights of one masked row: backward_row, then the positive's entry.
        let weights = |row: &mut [f32], a: usize, k0: usize, g: &mut [f32]| {
            mask_row(row, a, k0, loss);
            backward_row(row, g, kind, lse[a], gcoef[a]);
            if let Some(pc) = loss.pos_col(a) {
                if pc >= k0 && pc < k0 + g.len() {
                    g[pc - k0] = dpos[a];
                }
            }
        };
        tournament(&mut states, |sc, p, q, gp, gq| {
            let (na, nb) = self.tile(p, q, sc, in_place.is_none());
            let (rp, rq) = (&self.blocks[p], &self.blocks[q]);
            let h = buf(&mut sc.g, na * nb);
            for r in 0..na {
                let a = rp.start + r;
                let row = &mut sc.s[r * nb..(r + 1) * nb];
                let hr = &mut h[r * nb..(r + 1) * nb];
                weights(row, a, rq.start, hr);
                if let (Some((alpha, _)), Some(_)) = (in_place, gq.as_ref()) {
                    // Columns' weights added along the row; the shared positive gets both.
                    let cs = rq.clone();
                    simd::exp_scale_cols_add(row, alpha, &lse[cs.clone()], &gcoef[cs], hr);
                    if let Some(c) = loss.pos_col(a).filter(|c| rq.contains(c)) {
                        hr[c - rq.start] = dpos[a] + dpos[c];
                    }
                }
            }
            match (&gq, in_place) {
                (None, _) => {
                    // Diagonal: H = G + Gᵀ, dE_p += H·E_p.
                    let g2 = buf(&mut sc.g2, na * nb);
                    transpose(h, na, na, g2);
                    simd::add_assign(h, g2);
                }
                (Some(_), Some(_)) => {}
                (Some(_), None) => {
                    let g2 = buf(&mut sc.g2, na * nb);
                    for c in 0..nb {
                        let row = &mut sc.t[c * na..(c + 1) * na];
                        weights(row, rq.start + c, rp.start, &mut g2[c * na..(c + 1) * na]);
                    }
                    let t = buf(&mut sc.w, na * nb);
                    transpose(g2, nb, na, t);
                    simd::add_assign(h, t);
                }
            }
            let ep = self.e.block(rp.start, rp.end, &mut sc.abuf);
            let eq = self.e.block(rq.start, rq.end, &mut sc.bbuf);
            gemm::a_b(gp, h, eq, na, d, nb, true);
            if let Some(gq) = gq {
                gemm::at_b(gq, h, ep, nb, d, na, true);
            }
        });
        simd::widen_in_place(de);
    }
}
