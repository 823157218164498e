//! The block products, through faer's matrix product (`faer::linalg::matmul::matmul`):
//! single-threaded (`Par::Seq`, the backend parallelises over blocks itself), f32, with faer's
//! run-time dispatch to its AVX2/FMA or AVX-512 micro-kernels. Why faer: bench/NOTES.md.
//!
//! Every operand is a row-major block given as a slice with its shape; the three shapes the
//! backend needs are `C = A·Bᵀ` (similarities), `C += A·B` (softmax-weighted key sums) and
//! `C += Aᵀ·B` (key gradients). A product is a pure function of its operands' values and shapes,
//! so a block computed twice from the same rows is bitwise the same (the passes rely on it).

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// `c (m×n) = a (m×k) · bᵀ` with `b` given as n×k rows. `k = 0` gives zeros.
pub(crate) fn a_bt(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize) {
    let c = &mut c[..m * n];
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let cm = MatMut::from_row_major_slice_mut(c, m, n);
    let am = MatRef::from_row_major_slice(&a[..m * k], m, k);
    let bm = MatRef::from_row_major_slice(&b[..n * k], n, k);
    matmul(cm, Accum::Replace, am, bm.transpose(), 1.0f32, Par::Seq);
}

/// `c (m×n) (+)= a (m×k) · b (k×n)`: accumulates when `add`, else overwrites.
pub(crate) fn a_b(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, add: bool) {
    let c = &mut c[..m * n];
    if k == 0 {
        if !add {
            c.fill(0.0);
        }
        return;
    }
    let cm = MatMut::from_row_major_slice_mut(c, m, n);
    let am = MatRef::from_row_major_slice(&a[..m * k], m, k);
    let bm = MatRef::from_row_major_slice(&b[..k * n], k, n);
    let accum = if add { Accum::Add } else { Accum::Replace };
    matmul(cm, accum, am, bm, 1.0f32, Par::Seq);
}

/// `c (m×n) (+)= aᵀ · b` with `a` given as k×m rows and `b` as k×n rows.
pub(crate) fn at_b(c: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, add: bool) {
    let c = &mut c[..m * n];
    if k == 0 {
        if !add {
            c.fill(0.0);
        }
        return;
    }
    let cm = MatMut::from_row_major_slice_mut(c, m, n);
    let am = MatRef::from_row_major_slice(&a[..k * m], k, m);
    let bm = MatRef::from_row_major_slice(&b[..k * n], k, n);
    let accum = if add { Accum::Add } else { Accum::Replace };
    matmul(cm, accum, am.transpose(), bm, 1.0f32, Par::Seq);
}

/// `c (=|+=) a · b` for whole matrices (the unfused baseline's products), split over the rayon
/// pool into one row panel of `c` per thread, each a single-threaded faer product (each thread
/// packs `b` once). On the presets' shapes this is 13–20 % faster than faer's own parallel product
/// (`Par::rayon`) for moco and simclr-cpu and level for clip-cpu, so the baseline uses it.
pub(crate) fn par_matmul(c: MatMut<'_, f32>, a: MatRef<'_, f32>, b: MatRef<'_, f32>, add: bool) {
    let parts = rayon::current_num_threads().clamp(1, c.nrows().div_ceil(64).max(1));
    panels(c, a, b, add, parts);
}

/// [`par_matmul`] over `parts` panels of nearly equal height.
fn panels(c: MatMut<'_, f32>, a: MatRef<'_, f32>, b: MatRef<'_, f32>, add: bool, parts: usize) {
    if parts <= 1 || a.ncols() == 0 {
        if a.ncols() == 0 {
            if !add {
                let mut c = c;
                c.fill(0.0);
            }
            return;
        }
        let accum = if add { Accum::Add } else { Accum::Replace };
        matmul(c, accum, a, b, 1.0f32, Par::Seq);
        return;
    }
    let left = parts / 2;
    let h = c.nrows() * left / parts;
    let (c0, c1) = c.split_at_row_mut(h);
    let (a0, a1) = a.split_at_row(h);
    rayon::join(
        || panels(c0, a0, b, add, left),
        || panels(c1, a1, b, add, parts - left),
    );
}

/// The matrix crate's best rate for a plain product: faer's own parallel `c = a · b`
/// (`Par::rayon`, the current pool), what the benchmarks divide by.
pub(crate) fn faer_parallel(c: MatMut<'_, f32>, a: MatRef<'_, f32>, b: MatRef<'_, f32>) {
    matmul(c, Accum::Replace, a, b, 1.0f32, Par::rayon(0));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, bt: bool, at: bool) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for l in 0..k {
                    let x = if at { a[l * m + i] } else { a[i * k + l] };
                    let y = if bt { b[j * k + l] } else { b[l * n + j] };
                    s += x as f64 * y as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn three_shapes_match_a_naive_product() {
        let (m, n, k) = (13, 7, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut c = vec![1.0; m * n];
        a_bt(&mut c, &a, &b, m, n, k);
        let w = naive(&a, &b, m, n, k, true, false);
        assert!(c.iter().zip(&w).all(|(x, y)| (x - y).abs() < 1e-5));
        // a_b: (m×k)(k×n) with b as k×n.
        let b2: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.5).cos()).collect();
        let mut c2 = vec![0.5; m * n];
        a_b(&mut c2, &a, &b2, m, n, k, true);
        let w2 = naive(&a, &b2, m, n, k, false, false);
        assert!(c2.iter().zip(&w2).all(|(x, y)| (x - 0.5 - y).abs() < 1e-5));
        // at_b: a as k×m.
        let a3: Vec<f32> = (0..k * m).map(|i| (i as f32 * 0.21).sin()).collect();
        let mut c3 = vec![0.0; m * n];
        at_b(&mut c3, &a3, &b2, m, n, k, false);
        let w3 = naive(&a3, &b2, m, n, k, false, true);
        assert!(c3.iter().zip(&w3).all(|(x, y)| (x - y).abs() < 1e-5));
        // k = 0: a product of nothing.
        a_bt(&mut c, &[], &[], m, n, 0);
        assert!(c.iter().all(|&x| x == 0.0));
    }
}
