//! The rows of one input matrix as f32 blocks: borrowed in place (f32 input, no normalisation) or
//! converted block by block into a task's buffer (f16, bf16, f64, or normalised rows
//! `u = x / max(‖x‖₂, ε)`), so no f32 copy of a whole input is ever made.

use rayon::prelude::*;

use crate::reference::normalize::NORM_EPS;
use crate::tensor::{DType, Element, MatRef};

/// A growable f32 buffer whose contents start on a 64-byte boundary (a cache line), so a converted
/// block sits at the same alignment whichever task converts it.
#[derive(Debug, Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<f32>,
}

impl AlignedBuf {
    /// A mutable slice of `len` elements, 64-byte aligned (contents unspecified).
    pub fn get(&mut self, len: usize) -> &mut [f32] {
        if self.raw.len() < len + 16 {
            self.raw = vec![0.0; len + 16];
        }
        let off = self.raw.as_ptr().align_offset(64).min(16);
        &mut self.raw[off..off + len]
    }
}

/// One input matrix, read as f32 rows.
#[derive(Debug, Clone)]
pub(crate) struct Source<'a, T> {
    m: MatRef<'a, T>,
    /// The data itself when it can be used in place (f32, not normalised).
    direct: Option<&'a [f32]>,
    /// `1 / max(‖x‖, ε)` per row (f64, as the reference) when normalising.
    inv: Option<Vec<f64>>,
}

impl<'a, T: Element> Source<'a, T> {
    /// The rows of `m`, normalised when `normalize`.
    pub fn new(m: MatRef<'a, T>, normalize: bool) -> Self {
        let inv = normalize.then(|| {
            (0..m.rows())
                .into_par_iter()
                .map(|i| {
                    let norm = m
                        .row(i)
                        .iter()
                        .map(|v| {
                            let x = v.to_f64();
                            x * x
                        })
                        .sum::<f64>()
                        .sqrt();
                    // As the reference (reference::normalize): a NaN norm stays NaN.
                    1.0 / if norm.is_nan() {
                        norm
                    } else {
                        norm.max(NORM_EPS)
                    }
                })
                .collect()
        });
        let direct = (T::DTYPE == DType::F32 && !normalize)
            .then(|| bytemuck::try_cast_slice::<T, f32>(m.data()).ok())
            .flatten();
        Self { m, direct, inv }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.m.rows()
    }
    /// D.
    pub fn cols(&self) -> usize {
        self.m.cols()
    }
    /// The input matrix.
    pub fn matrix(&self) -> MatRef<'a, T> {
        self.m
    }
    /// `1/max(‖x‖, ε)` per row when normalising.
    pub fn inv_norms(&self) -> Option<&[f64]> {
        self.inv.as_deref()
    }

    /// Rows `r0..r1` as a row-major f32 block: in place, or converted into `buf`.
    pub fn block<'b>(&'b self, r0: usize, r1: usize, buf: &'b mut AlignedBuf) -> &'b [f32] {
        let d = self.cols();
        if let Some(x) = self.direct {
            return &x[r0 * d..r1 * d];
        }
        let out = buf.get((r1 - r0) * d);
        for (r, dst) in (r0..r1).zip(out.chunks_exact_mut(d.max(1))) {
            self.convert_row(r, dst);
        }
        out
    }

    /// Row `r` converted to f32 (and normalised) into `dst` (D elements).
    pub fn convert_row(&self, r: usize, dst: &mut [f32]) {
        let src = self.m.row(r);
        match &self.inv {
            Some(inv) => {
                let s = inv[r];
                for (o, v) in dst.iter_mut().zip(src) {
                    *o = (v.to_f64() * s) as f32;
                }
            }
            None => {
                for (o, v) in dst.iter_mut().zip(src) {
                    *o = v.to_f32();
                }
            }
        }
    }

    /// Row `r` in f32 as the loss sees it (`u` when normalising).
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        let mut v = vec![0.0; self.cols()];
        self.convert_row(r, &mut v);
        v
    }
}
