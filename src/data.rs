//! Built-in synthetic data: seeded clustered unit vectors with class labels, and noisy augmented
//! views of them for training. Everything is deterministic given the seed.
//!
//! ```
//! use fused_infonce::data::{Clustered, two_views};
//! let set = Clustered::default().generate()?;
//! assert_eq!(set.x.rows, 10 * 60);
//! let (a, b) = two_views(&set.x, 0.3, 7);
//! assert_eq!((a.rows, b.cols), (set.x.rows, set.x.cols));
//! # Ok::<(), fused_infonce::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::tensor::Matrix;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A standard normal sample (Box–Muller), so the crate needs no distribution crate.
pub fn gaussian(rng: &mut impl Rng) -> f64 {
    // u1 in (0, 1], so ln(u1) is finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// L2-normalises each row in place (rows of norm 0 stay 0).
pub fn normalize_in_place(m: &mut Matrix) {
    if m.cols == 0 {
        return;
    }
    for row in m.data.chunks_exact_mut(m.cols) {
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 1e-12 {
            row.iter_mut().for_each(|x| *x /= n);
        }
    }
}

/// Parameters of the built-in clustered data set.
///
/// Each class `c` has a random unit centre `μ_c`; a sample is
/// `x = normalize(μ_c + spread · g / √D)` with `g` standard normal in D dimensions, so `spread`
/// is the ratio of the within-class noise norm to the centre norm (about 1 gives classes that
/// overlap a little: same-class cosine ≈ 0.5, different-class ≈ 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Clustered {
    /// Number of classes.
    pub classes: usize,
    /// Samples per class.
    pub per_class: usize,
    /// Dimension D.
    pub dim: usize,
    /// Within-class noise relative to the centre (see above).
    pub spread: f64,
    /// RNG seed.
    pub seed: u64,
}

impl Default for Clustered {
    /// 10 classes × 60 samples in D = 32, spread 1.0, seed 0.
    fn default() -> Self {
        Self {
            classes: 10,
            per_class: 60,
            dim: 32,
            spread: 1.0,
            seed: 0,
        }
    }
}

/// A labelled set of unit vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The samples, one unit row each (`classes · per_class` × D), class-major.
    pub x: Matrix,
    /// The class of each row, in `[0, classes)`.
    pub labels: Vec<i64>,
    /// Number of classes.
    pub classes: usize,
}

impl Clustered {
    /// Generates the data set. Errors when a size is 0 or `spread` is negative or not finite.
    pub fn generate(&self) -> Result<Dataset> {
        for (name, v) in [
            ("classes", self.classes),
            ("per_class", self.per_class),
            ("dim", self.dim),
        ] {
            if v == 0 {
                return Err(Error::parameter(name, v, "must be >= 1"));
            }
        }
        if !(self.spread.is_finite() && self.spread >= 0.0) {
            return Err(Error::parameter(
                "spread",
                self.spread,
                "must be finite and >= 0",
            ));
        }
        let mut rng = StdRng::seed_from_u64(self.seed);
        let d = self.dim;
        let mut centres = Matrix::zeros(self.classes, d);
        centres
            .data
            .iter_mut()
            .for_each(|x| *x = gaussian(&mut rng));
        normalize_in_place(&mut centres);
        let n = self.classes * self.per_class;
        let mut x = Matrix::zeros(n, d);
        let mut labels = Vec::with_capacity(n);
        let scale = self.spread / (d as f64).sqrt();
        for c in 0..self.classes {
            for k in 0..self.per_class {
                let row = x.row_mut(c * self.per_class + k);
                for (v, mu) in row.iter_mut().zip(centres.row(c)) {
                    *v = mu + scale * gaussian(&mut rng);
                }
                labels.push(c as i64);
            }
        }
        normalize_in_place(&mut x);
        Ok(Dataset {
            x,
            labels,
            classes: self.classes,
        })
    }
}

/// One augmented view: `normalize(x + noise · g / √D)` per row, `g` standard normal.
pub fn augment(x: &Matrix, noise: f64, rng: &mut impl Rng) -> Matrix {
    let scale = noise / (x.cols.max(1) as f64).sqrt();
    let mut v = x.clone();
    v.data.iter_mut().for_each(|e| *e += scale * gaussian(rng));
    normalize_in_place(&mut v);
    v
}

/// Two independent augmented views of every row of `x` (see [`augment`]), deterministic by `seed`.
pub fn two_views(x: &Matrix, noise: f64, seed: u64) -> (Matrix, Matrix) {
    let mut rng = StdRng::seed_from_u64(seed);
    let a = augment(x, noise, &mut rng);
    let b = augment(x, noise, &mut rng);
    (a, b)
}

/// Stacks `a` (N×D) over `b` (N×D) into the 2N×D in-batch layout (rows `i` and `i+N` a pair).
///
/// Errors when the shapes differ.
pub fn stack(a: &Matrix, b: &Matrix) -> Result<Matrix> {
    if a.rows != b.rows || a.cols != b.cols {
        return Err(Error::shape(
            "b",
            format!("[{}, {}]", b.rows, b.cols),
            format!("[{}, {}] (as a)", a.rows, a.cols),
        ));
    }
    let mut data = a.data.clone();
    data.extend_from_slice(&b.data);
    Ok(Matrix {
        rows: 2 * a.rows,
        cols: a.cols,
        data,
    })
}

/// The inverse of [`stack`]: the top and bottom halves (N×D each) of a 2N×D in-batch matrix.
/// With an odd number of rows the last row is in neither half (callers check the in-batch layout).
pub fn unstack(e: &Matrix) -> (Matrix, Matrix) {
    let n = e.rows / 2;
    let half = |rows: std::ops::Range<usize>| Matrix {
        rows: n,
        cols: e.cols,
        data: e.data[rows.start * e.cols..rows.end * e.cols].to_vec(),
    };
    (half(0..n), half(n..2 * n))
}
