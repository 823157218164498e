//! The passes of the row losses (`queue`, `cross`, `inbatch`): anchors `A` against keys `B` on a
//! fixed grid of blocks.
//!
//! - [`forward`]: per anchor block, one sweep over the key blocks: `S = A_I·B_Jᵀ` (the matrix
//!   crate), the mask, the online log-sum-exp and, beside it, the softmax-weighted key sum
//!   `U_i = Σ_j exp(z_ij − m_i) b_j` rescaled when the running max moves (flash-attention's
//!   forward with V = K), so loss, LSE and the anchor gradient cost one read of the keys.
//! - [`key_gradients`]: per key block, one sweep over the anchor blocks recomputing `S` and the
//!   weights `∂L/∂s_ij` from each anchor's LSE, accumulating `dB_J += Gᵀ·A_I`: each key block is
//!   owned by one task, so there are no atomics.
//!
//! Where the owning side has few blocks (MoCo's N = 256), the other side is split into a fixed
//! number of chunks ([`chunks`]) that run as separate tasks, and their partial results are merged
//! in chunk order. The split depends on the shape only, never on the thread count, so the result
//! is bitwise the same for any number of threads.

use std::ops::Range;

use rayon::prelude::*;

use super::anchor::{finalize, merge_chunks, Fin, LossCtx, Merged};
use super::gemm;
use super::kernels::{backward_row, forward_row, hist_row, mask_row, Kind, Online, RowLoss};
use super::simd;
use super::source::Source;
use super::symmetric::{buf, Scratch};
use super::Blocking;
use crate::tensor::Element;

/// Tasks a sweep aims for (a property of the shape, not of the machine: results must not depend on
/// the thread count).
const TASKS: usize = 16;

/// Row ranges of `n` rows in blocks of `b`.
pub(crate) fn blocks(n: usize, b: usize) -> Vec<Range<usize>> {
    (0..n.div_ceil(b))
        .map(|k| k * b..((k + 1) * b).min(n))
        .collect()
}

/// The chunks the `others` blocks are split into when `owners` blocks own the results.
pub(crate) fn chunks(owners: usize, others: usize) -> Vec<Range<usize>> {
    let c = if owners == 0 || others == 0 {
        1
    } else {
        TASKS.div_ceil(owners).clamp(1, others)
    };
    (0..c)
        .map(|k| k * others / c..(k + 1) * others / c)
        .collect()
}

/// Runs `f(scratch, owner, chunk)` for every owner block and chunk of the other side, in parallel
/// (scratch reused per thread), and returns the results grouped by owner, chunks in order.
pub(crate) fn sweep<R: Send>(
    owners: usize,
    others: usize,
    f: impl Fn(&mut Scratch, usize, Range<usize>) -> R + Sync,
) -> Vec<Vec<R>> {
    let ch = chunks(owners, others);
    let tasks: Vec<(usize, Range<usize>)> = (0..owners)
        .flat_map(|o| ch.iter().map(move |c| (o, c.clone())))
        .collect();
    let mut flat = tasks
        .into_par_iter()
        .map_init(Scratch::default, |sc, (o, c)| f(sc, o, c))
        .collect::<Vec<R>>()
        .into_iter();
    (0..owners)
        .map(|_| flat.by_ref().take(ch.len()).collect())
        .collect()
}

/// One row loss: anchors, keys, which keys are not negatives, the loss constants and the grid.
pub(crate) struct PairProblem<'s, 'a, T> {
    pub anchors: &'s Source<'a, T>,
    pub keys: &'s Source<'a, T>,
    pub loss: RowLoss,
    pub ctx: LossCtx,
    pub a_blocks: Vec<Range<usize>>,
    pub b_blocks: Vec<Range<usize>>,
}

impl<'s, 'a, T: Element> PairProblem<'s, 'a, T> {
    /// The problem on the grid of `blocking`.
    pub fn new(
        anchors: &'s Source<'a, T>,
        keys: &'s Source<'a, T>,
        loss: RowLoss,
        ctx: LossCtx,
        blocking: Blocking,
    ) -> Self {
        Self {
            anchors,
            keys,
            loss,
            ctx,
            a_blocks: blocks(anchors.rows(), blocking.anchors),
            b_blocks: blocks(keys.rows(), blocking.keys),
        }
    }

    fn dim(&self) -> usize {
        self.anchors.cols()
    }

    /// Computes tile `(I, J)` into `s` (the rows of block I × the keys of block J, whose f32 rows
    /// are `b_blk`) and masks its rows; records positives' similarities into `s_pos` (indexed
    /// within block I) when given.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        a_blk: &[f32],
        b_blk: &[f32],
        rows: &Range<usize>,
        cols: &Range<usize>,
        s: &mut [f32],
        mut s_pos: Option<&mut [Option<f32>]>,
    ) {
        let (na, nb) = (rows.len(), cols.len());
        gemm::a_bt(s, a_blk, b_blk, na, nb, self.dim());
        for (r, row) in s[..na * nb].chunks_exact_mut(nb.max(1)).enumerate() {
            if let Some(sp) = mask_row(row, rows.start + r, cols.start, &self.loss) {
                if let Some(v) = s_pos.as_deref_mut() {
                    v[r] = Some(sp);
                }
            }
        }
    }
}

/// Per anchor: the merged online state and `U_i` (f64, D values per anchor).
pub(crate) struct Forward {
    pub merged: Vec<Merged>,
    pub u: Vec<f64>,
}

/// The forward sweep (module docs): every anchor's merged online state and its softmax-weighted
/// key sum.
/// Queue mode's positives are outside the keys: their similarities come in `external_pos`.
pub(crate) fn forward<T: Element>(
    p: &PairProblem<'_, '_, T>,
    external_pos: Option<&[f32]>,
) -> Forward {
    let d = p.dim();
    let simple = matches!(p.ctx.kind, Kind::Simple);
    let bb = p.b_blocks.iter().map(|r| r.len()).max().unwrap_or(0);
    let parts = sweep(p.a_blocks.len(), p.b_blocks.len(), |sc, ib, js| {
        let rows = p.a_blocks[ib].clone();
        let na = rows.len();
        let Scratch {
            abuf, bbuf, s, w, ..
        } = sc;
        let a_blk = p.anchors.block(rows.start, rows.end, abuf);
        let mut st = Online::new(na, simple);
        let mut u = vec![0.0f32; na * d];
        let (s, w) = (buf(s, na * bb), buf(w, na * bb));
        for j in js {
            let cols = &p.b_blocks[j];
            let nb = cols.len();
            let b_blk = p.keys.block(cols.start, cols.end, bbuf);
            p.tile(a_blk, b_blk, &rows, cols, s, Some(&mut st.s_pos));
            for r in 0..na {
                let row = &s[r * nb..(r + 1) * nb];
                let c = forward_row(row, &mut w[r * nb..(r + 1) * nb], &p.ctx.kind, &mut st, r);
                if c != 1.0 {
                    simd::scale(&mut u[r * d..(r + 1) * d], c);
                }
            }
            gemm::a_b(&mut u, &w[..na * nb], b_blk, na, d, nb, true);
        }
        (st, u)
    });
    let n = p.anchors.rows();
    let mut merged = Vec::with_capacity(n);
    let mut u_all = vec![0.0f64; n * d];
    for (ib, chunks) in parts.iter().enumerate() {
        let rows = &p.a_blocks[ib];
        for r in 0..rows.len() {
            let i = rows.start + r;
            let (m, sum, zsum, factors) = merge_chunks(
                chunks
                    .iter()
                    .map(|(st, _)| (st.m[r], st.sum[r], st.zsum[r])),
            );
            let s_pos = match external_pos {
                Some(e) => e[i],
                None => chunks
                    .iter()
                    .find_map(|(st, _)| st.s_pos[r])
                    .unwrap_or(f32::NAN),
            };
            merged.push(Merged {
                m: if simple { 0.0 } else { m },
                sum,
                zsum,
                s_pos,
            });
            let dst = &mut u_all[i * d..(i + 1) * d];
            for ((_, u), &f) in chunks.iter().zip(&factors) {
                let f = if simple { 1.0 } else { f };
                simd::axpy64(dst, f, &u[r * d..(r + 1) * d]);
            }
        }
    }
    Forward { merged, u: u_all }
}

/// Finalises every anchor (weights `w`).
pub(crate) fn finalize_all(merged: &[Merged], w: &[f64], ctx: &LossCtx) -> Vec<Fin> {
    merged
        .par_iter()
        .zip(w.par_iter())
        .map(|(m, &w)| finalize(*m, w, ctx))
        .collect()
}

/// The key gradients `dB_j = Σ_i (∂(wL)/∂s_ij) a_i` (module docs), added into `grad` (rows of B,
/// f64). The positive's weight is `fin[i].dpos`.
pub(crate) fn key_gradients<T: Element>(p: &PairProblem<'_, '_, T>, fin: &[Fin], grad: &mut [f64]) {
    let d = p.dim();
    let ba = p.a_blocks.iter().map(|r| r.len()).max().unwrap_or(0);
    let lse: Vec<f32> = fin.iter().map(|f| f.lse as f32).collect();
    let gcoef: Vec<f32> = fin.iter().map(|f| f.gcoef as f32).collect();
    let parts = sweep(p.b_blocks.len(), p.a_blocks.len(), |sc, jb, is| {
        let cols = p.b_blocks[jb].clone();
        let nb = cols.len();
        let Scratch {
            abuf, bbuf, s, g, ..
        } = sc;
        let b_blk = p.keys.block(cols.start, cols.end, bbuf);
        let mut acc = vec![0.0f32; nb * d];
        let (s, g) = (buf(s, ba * nb), buf(g, ba * nb));
        for ib in is {
            let rows = p.a_blocks[ib].clone();
            let na = rows.len();
            let a_blk = p.anchors.block(rows.start, rows.end, abuf);
            p.tile(a_blk, b_blk, &rows, &cols, s, None);
            for r in 0..na {
                let i = rows.start + r;
                let g_row = &mut g[r * nb..(r + 1) * nb];
                backward_row(
                    &s[r * nb..(r + 1) * nb],
                    g_row,
                    &p.ctx.kind,
                    lse[i],
                    gcoef[i],
                );
                if let Some(pc) = p.loss.pos_col(i) {
                    if cols.contains(&pc) {
                        g_row[pc - cols.start] = fin[i].dpos as f32;
                    }
                }
            }
            gemm::at_b(&mut acc, &g[..na * nb], a_blk, nb, d, na, true);
        }
        acc
    });
    for (jb, chunks) in parts.iter().enumerate() {
        let cols = &p.b_blocks[jb];
        let dst = &mut grad[cols.start * d..cols.end * d];
        for acc in chunks {
            simd::axpy64(dst, 1.0, acc);
        }
    }
}

/// `hard:k` thresholds of a row loss: per anchor the order key of the k-th largest negative
/// similarity, by a radix select over four 8-bit digits, each pass recomputing the tiles
/// (nothing N×K is stored). `negatives` per anchor; `k ≥ negatives` keeps all (key 0).
pub(crate) fn thresholds<T: Element>(
    p: &PairProblem<'_, '_, T>,
    k: usize,
    negatives: usize,
) -> Vec<u32> {
    let n = p.anchors.rows();
    if k >= negatives {
        return vec![0; n];
    }
    let bb = p.b_blocks.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut sel = Select::new(n, k);
    for shift in [24u32, 16, 8, 0] {
        let prefix = &sel.prefix;
        let parts = sweep(p.a_blocks.len(), p.b_blocks.len(), |sc, ib, js| {
            let rows = p.a_blocks[ib].clone();
            let na = rows.len();
            let Scratch { abuf, bbuf, s, .. } = sc;
            let a_blk = p.anchors.block(rows.start, rows.end, abuf);
            let mut hist = vec![0u32; na * 256];
            let s = buf(s, na * bb);
            for j in js {
                let cols = &p.b_blocks[j];
                let nb = cols.len();
                let b_blk = p.keys.block(cols.start, cols.end, bbuf);
                gemm::a_bt(s, a_blk, b_blk, na, nb, p.dim());
                for r in 0..na {
                    let i = rows.start + r;
                    hist_row(
                        &s[r * nb..(r + 1) * nb],
                        i,
                        cols.start,
                        &p.loss,
                        prefix[i],
                        shift,
                        &mut hist[r * 256..(r + 1) * 256],
                    );
                }
            }
            hist
        });
        for (ib, chunks) in parts.iter().enumerate() {
            for (r, i) in p.a_blocks[ib].clone().enumerate() {
                let mut h = [0u32; 256];
                for c in chunks {
                    for (x, y) in h.iter_mut().zip(&c[r * 256..(r + 1) * 256]) {
                        *x += y;
                    }
                }
                sel.digit(i, shift, &h);
            }
        }
    }
    sel.prefix
}

/// The state of a radix select per anchor: the order-key bits fixed so far and the rank still
/// sought among the values that share them.
pub(crate) struct Select {
    pub prefix: Vec<u32>,
    pub rank: Vec<usize>,
}

impl Select {
    /// Seeks the `k`-th largest (k ≥ 1) of each of `n` anchors.
    pub fn new(n: usize, k: usize) -> Self {
        Select {
            prefix: vec![0; n],
            rank: vec![k; n],
        }
    }

    /// Fixes the digit at `shift` of anchor `i` from its histogram.
    pub fn digit(&mut self, i: usize, shift: u32, hist: &[u32; 256]) {
        let mut above = 0usize;
        for dgt in (0..256usize).rev() {
            let h = hist[dgt] as usize;
            if above + h >= self.rank[i] {
                self.prefix[i] |= (dgt as u32) << shift;
                self.rank[i] -= above;
                return;
            }
            above += h;
        }
        // Unreachable while k ≤ #negatives: every pass sees the rank-k value's bucket.
    }
}
