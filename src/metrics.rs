//! Embedding metrics on the CPU, in f64: alignment, uniformity, tolerance, the penalty histogram,
//! effective negatives, the gradient norm and k-NN accuracy (spec/losses.md, *Metrics*; Wang & Liu,
//! CVPR 2021, eqs. 5, 10 and 11; Wang & Isola for alignment).
//!
//! Every metric takes **L2-normalised** rows (build them with [`normalized`]), stored in an owned
//! f64 [`Matrix`]. Shapes are checked and empty inputs are rejected with a clear [`Error`]; nothing
//! here panics on bad input.
//!
//! ```
//! use fused_infonce::{metrics, Matrix};
//! let u = Matrix { rows: 3, cols: 2, data: vec![1.0, 0.0, 0.0, 1.0, -1.0, 0.0] };
//! // Same class: rows 0 and 2 (opposite directions), so the tolerance is −1.
//! assert!((metrics::tolerance(&u, &[0, 1, 0])? + 1.0).abs() < 1e-12);
//! # Ok::<(), fused_infonce::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::loss::LossOutput;
use crate::reference::normalize::normalize_rows;
use crate::spec::Temperature;
use crate::tensor::{Element, MatRef, Matrix};

/// The `t` of the uniformity metric (eq. 10), as Wang & Isola and Wang & Liu use it.
pub const UNIFORMITY_T: f64 = 2.0;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn shape_of(m: &Matrix) -> String {
    format!("[{}, {}]", m.rows, m.cols)
}

/// Errors unless there is one label per row of `u`.
fn check_labels(u: &Matrix, labels: &[i64]) -> Result<()> {
    if labels.len() != u.rows {
        return Err(Error::shape(
            "labels",
            format!("[{}]", labels.len()),
            format!("[{}] (one label per row)", u.rows),
        ));
    }
    Ok(())
}

fn check_matrix(name: &'static str, m: &Matrix, min_rows: usize) -> Result<()> {
    if m.data.len() != m.rows * m.cols {
        return Err(Error::shape(
            name,
            format!("{} elements", m.data.len()),
            format!("[{}, {}] = {} elements", m.rows, m.cols, m.rows * m.cols),
        ));
    }
    if m.rows < min_rows {
        return Err(Error::shape(
            name,
            shape_of(m),
            format!("at least {min_rows} row(s)"),
        ));
    }
    if m.cols == 0 {
        return Err(Error::shape(
            name,
            shape_of(m),
            "at least one column (D >= 1)",
        ));
    }
    Ok(())
}

/// The rows of `x` L2-normalised in f64 (`u = x / max(‖x‖, 1e-12)`, as the loss's normalisation).
pub fn normalized<T: Element>(x: &MatRef<'_, T>) -> Matrix {
    let raw: Vec<f64> = x.data().iter().map(|v| v.to_f64()).collect();
    let (u, _) = normalize_rows(&raw, x.cols());
    Matrix {
        rows: x.rows(),
        cols: x.cols(),
        data: if x.cols() == 0 { Vec::new() } else { u },
    }
}

/// Alignment (Wang & Isola): `mean_i ‖u_i − v_i‖²` over the positive pairs `(u_i, v_i)`.
///
/// `u` and `v` are N×D with the same shape, N ≥ 1. Lower is better aligned (0: every pair equal;
/// 4: every pair opposite, for unit rows).
pub fn alignment(u: &Matrix, v: &Matrix) -> Result<f64> {
    check_matrix("u", u, 1)?;
    check_matrix("v", v, 1)?;
    if u.rows != v.rows || u.cols != v.cols {
        return Err(Error::shape(
            "v",
            shape_of(v),
            format!("{} (one positive per row of u)", shape_of(u)),
        ));
    }
    let total: f64 = (0..u.rows)
        .map(|i| {
            u.row(i)
                .iter()
                .zip(v.row(i))
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
        })
        .sum();
    Ok(total / u.rows as f64)
}

/// Uniformity (eq. 10): `log mean_(i≠j) exp(−t ‖u_i − u_j‖²)` over all ordered pairs of distinct
/// rows of the N×D matrix `u` (N ≥ 2); `t` is usually [`UNIFORMITY_T`].
///
/// Computed as a log-sum-exp with a running max, never forming an unshifted exponential: for unit
/// rows `−t ‖u_i − u_j‖² = 2t (s_ij − 1)`, so this is the loss's LSE with scale `2t` (the general
/// form `−t (‖u_i‖² + ‖u_j‖² − 2 s_ij)` is used, exact for rows that are not quite unit). The pair
/// `(i, j)` and `(j, i)` are equal, so each unordered pair is visited once. Lower (more negative)
/// is more uniform; the minimum for N points on a sphere is about `−2t` for large N (at most 0).
pub fn uniformity(u: &Matrix, t: f64) -> Result<f64> {
    check_matrix("embeddings", u, 2)?;
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::parameter("t", t, "must be finite and > 0"));
    }
    let sq: Vec<f64> = (0..u.rows).map(|i| dot(u.row(i), u.row(i))).collect();
    // Running (max, Σ exp(x − max)).
    let mut m = f64::NEG_INFINITY;
    let mut sum = 0.0f64;
    for i in 0..u.rows {
        let ui = u.row(i);
        for j in (i + 1)..u.rows {
            let x = -t * (sq[i] + sq[j] - 2.0 * dot(ui, u.row(j)));
            if x > m {
                sum = if m == f64::NEG_INFINITY {
                    0.0
                } else {
                    sum * (m - x).exp()
                };
                m = x;
            }
            sum += (x - m).exp();
        }
    }
    let pairs = (u.rows * (u.rows - 1) / 2) as f64;
    Ok(m + sum.ln() - pairs.ln())
}

/// Tolerance (eq. 11): the mean similarity `s_ij = u_i · u_j` over ordered pairs `i ≠ j` with equal
/// labels.
///
/// Uses `Σ_(i≠j, same class) s_ij = Σ_c (‖Σ_(i∈c) u_i‖² − Σ_(i∈c) ‖u_i‖²)`: one pass over the rows,
/// no pairwise loop. `labels` has one integer per row; errors when the lengths differ, when `u` is
/// empty, or when no class has two members (no same-class pair).
pub fn tolerance(u: &Matrix, labels: &[i64]) -> Result<f64> {
    check_matrix("embeddings", u, 1)?;
    check_labels(u, labels)?;
    let mut classes: std::collections::BTreeMap<i64, (Vec<f64>, f64, usize)> =
        std::collections::BTreeMap::new();
    for (i, &y) in labels.iter().enumerate() {
        let e = classes
            .entry(y)
            .or_insert_with(|| (vec![0.0; u.cols], 0.0, 0));
        for (s, x) in e.0.iter_mut().zip(u.row(i)) {
            *s += x;
        }
        e.1 += dot(u.row(i), u.row(i));
        e.2 += 1;
    }
    let mut total = 0.0;
    let mut pairs = 0usize;
    for (sum, sq, n) in classes.values() {
        total += dot(sum, sum) - sq;
        pairs += n * (n - 1);
    }
    if pairs == 0 {
        return Err(Error::Input(
            "tolerance needs at least one pair of rows with the same label (every class has one member)"
                .into(),
        ));
    }
    Ok(total / pairs as f64)
}

/// Leave-one-out k-nearest-neighbour accuracy by cosine similarity: each row is classified by a
/// majority vote of the labels of its `k` most similar other rows (ties broken by the summed
/// similarity, then by the smaller label) and the share of correct votes is returned, in [0, 1].
///
/// Errors when `k = 0`, `k ≥ N`, or the label count differs from the row count.
pub fn knn_accuracy(u: &Matrix, labels: &[i64], k: usize) -> Result<f64> {
    check_matrix("embeddings", u, 2)?;
    check_labels(u, labels)?;
    if k == 0 || k >= u.rows {
        return Err(Error::parameter(
            "k",
            k,
            format!("must be in [1, {}) (N = {} rows)", u.rows, u.rows),
        ));
    }
    let mut correct = 0usize;
    let mut sims: Vec<(f64, usize)> = Vec::with_capacity(u.rows);
    for i in 0..u.rows {
        sims.clear();
        sims.extend(
            (0..u.rows)
                .filter(|&j| j != i)
                .map(|j| (dot(u.row(i), u.row(j)), j)),
        );
        sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        let mut votes: Vec<(i64, usize, f64)> = Vec::new();
        for &(s, j) in &sims[..k] {
            match votes.iter_mut().find(|v| v.0 == labels[j]) {
                Some(v) => {
                    v.1 += 1;
                    v.2 += s;
                }
                None => votes.push((labels[j], 1, s)),
            }
        }
        let best = votes
            .iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(a.2.total_cmp(&b.2)).then(b.0.cmp(&a.0)));
        if best.map(|v| v.0) == Some(labels[i]) {
            correct += 1;
        }
    }
    Ok(correct as f64 / u.rows as f64)
}

/// Which rows are each anchor's negatives, on normalised rows (the loss's modes, spec/losses.md).
#[derive(Debug, Clone, Copy)]
pub enum Negatives<'a> {
    /// `inbatch`: 2N rows, anchor `a`'s positive is `(a+N) mod 2N`, every other row a negative.
    InBatch {
        /// E (2N×D).
        embeddings: &'a Matrix,
    },
    /// `queue`: anchor `q_i`'s negatives are every queue row (K ≥ 1).
    Queue {
        /// Q (N×D).
        query: &'a Matrix,
        /// M (K×D).
        queue: &'a Matrix,
    },
    /// `cross` with identity targets: anchor `a_i`'s negatives are the rows `b_j`, `j ≠ i`.
    Cross {
        /// A (N×D).
        query: &'a Matrix,
        /// B (M×D, M ≥ N).
        key: &'a Matrix,
    },
}

/// Every anchor's negative similarities `s_ij`, anchor-major (`anchors × per_anchor`).
#[derive(Debug, Clone, PartialEq)]
pub struct NegativeSimilarities {
    /// Number of anchors.
    pub anchors: usize,
    /// Negatives per anchor (≥ 1).
    pub per_anchor: usize,
    /// `s_ij`, row `i` = anchor `i`.
    pub data: Vec<f64>,
}

impl NegativeSimilarities {
    /// Computes `s_ij = u_i · n_j` for every anchor and each of its negatives.
    ///
    /// Errors on empty inputs, mismatched dimensions, an odd in-batch row count, an empty queue, or
    /// a cross key with fewer rows than the query or fewer than two rows.
    pub fn new(neg: Negatives<'_>) -> Result<Self> {
        match neg {
            Negatives::InBatch { embeddings: e } => {
                check_matrix("embeddings", e, 2)?;
                if e.rows % 2 != 0 {
                    return Err(Error::shape(
                        "embeddings",
                        shape_of(e),
                        "[2N, D] with an even number of rows (rows a and a+N are a pair)",
                    ));
                }
                if e.rows < 4 {
                    return Err(Error::shape(
                        "embeddings",
                        shape_of(e),
                        "at least 4 rows (N >= 2, so every anchor has a negative)",
                    ));
                }
                let n = e.rows / 2;
                let mut data = Vec::with_capacity(e.rows * (e.rows - 2));
                for a in 0..e.rows {
                    let pos = (a + n) % e.rows;
                    for b in (0..e.rows).filter(|&b| b != a && b != pos) {
                        data.push(dot(e.row(a), e.row(b)));
                    }
                }
                Ok(Self {
                    anchors: e.rows,
                    per_anchor: e.rows - 2,
                    data,
                })
            }
            Negatives::Queue { query, queue } => {
                check_matrix("query", query, 1)?;
                check_matrix("queue", queue, 1)?;
                if queue.cols != query.cols {
                    return Err(Error::shape(
                        "queue",
                        shape_of(queue),
                        format!("[{}, {}] (D as in query)", queue.rows, query.cols),
                    ));
                }
                let mut data = Vec::with_capacity(query.rows * queue.rows);
                for i in 0..query.rows {
                    for j in 0..queue.rows {
                        data.push(dot(query.row(i), queue.row(j)));
                    }
                }
                Ok(Self {
                    anchors: query.rows,
                    per_anchor: queue.rows,
                    data,
                })
            }
            Negatives::Cross { query, key } => {
                check_matrix("query", query, 1)?;
                check_matrix("key", key, 2)?;
                if key.cols != query.cols || key.rows < query.rows {
                    return Err(Error::shape(
                        "key",
                        shape_of(key),
                        format!(
                            "[M, {}] with M >= {} (D as in query, identity targets)",
                            query.cols, query.rows
                        ),
                    ));
                }
                let mut data = Vec::with_capacity(query.rows * (key.rows - 1));
                for i in 0..query.rows {
                    for j in (0..key.rows).filter(|&j| j != i) {
                        data.push(dot(query.row(i), key.row(j)));
                    }
                }
                Ok(Self {
                    anchors: query.rows,
                    per_anchor: key.rows - 1,
                    data,
                })
            }
        }
    }

    /// Anchor `i`'s negative similarities.
    ///
    /// # Panics
    /// When `i >= anchors`.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.per_anchor..(i + 1) * self.per_anchor]
    }
}

/// The relative penalty (eq. 5) of one anchor: `r(s_j) = softmax_j(z_j)` over its negatives, with
/// `z_j = s_j / τ(s_j)` (a fixed τ, or DySTreSS's `τ(s)`). Computed with the max subtracted; sums
/// to 1 for a non-empty input.
pub fn relative_penalty(sims: &[f64], temp: &Temperature) -> Vec<f64> {
    let z: Vec<f64> = sims.iter().map(|&s| s / temp.tau(s)).collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|&x| (x - m).exp()).collect();
    let total: f64 = e.iter().sum();
    e.into_iter().map(|x| x / total).collect()
}

/// The penalty histogram (spec/losses.md, *Metrics*): where the negatives' gradient goes, as a
/// function of their similarity.
#[derive(Debug, Clone, PartialEq)]
pub struct PenaltyHistogram {
    /// Bin edges over [−1, 1], `bins + 1` values; bin `b` is `[edges[b], edges[b+1])`, the last
    /// closed (similarities outside [−1, 1], from rounding, go to the end bins).
    pub edges: Vec<f64>,
    /// `H_b = (1/N) Σ_i Σ_(j neg, s_ij ∈ b) r_i(s_ij)`; sums to 1.
    pub mass: Vec<f64>,
}

impl PenaltyHistogram {
    /// The centre of bin `b`.
    ///
    /// # Panics
    /// When `b` is not a bin index (`b + 1 >= edges.len()`).
    pub fn center(&self, b: usize) -> f64 {
        0.5 * (self.edges[b] + self.edges[b + 1])
    }
}

/// The bin of similarity `s` among `bins` equal bins over [−1, 1] (values outside, and NaN, go to
/// the end bins; 0 when `bins` is 0).
pub fn bin_of(s: f64, bins: usize) -> usize {
    let x = ((s + 1.0) * 0.5 * bins as f64).floor();
    if x.is_nan() || x < 0.0 {
        0
    } else {
        (x as usize).min(bins.saturating_sub(1))
    }
}

/// The penalty histogram `H_b` over `bins` equal similarity bins in [−1, 1] (eq. 5 per anchor,
/// averaged over anchors). Errors when `bins = 0` or the temperature is invalid.
pub fn penalty_histogram(
    neg: &NegativeSimilarities,
    temp: &Temperature,
    bins: usize,
) -> Result<PenaltyHistogram> {
    if bins == 0 {
        return Err(Error::parameter("bins", 0, "must be >= 1"));
    }
    temp.check()?;
    let mut mass = vec![0.0; bins];
    for i in 0..neg.anchors {
        let s = neg.row(i);
        for (&sij, r) in s.iter().zip(relative_penalty(s, temp)) {
            mass[bin_of(sij, bins)] += r;
        }
    }
    let n = neg.anchors.max(1) as f64;
    mass.iter_mut().for_each(|m| *m /= n);
    let edges = (0..=bins)
        .map(|b| -1.0 + 2.0 * b as f64 / bins as f64)
        .collect();
    Ok(PenaltyHistogram { edges, mass })
}

/// The share of the negatives' gradient on negatives with similarity `s_ij ≥ threshold`:
/// `(1/N) Σ_i Σ_(j neg, s_ij ≥ threshold) r_i(s_ij)`, in [0, 1]. For a fixed τ it rises
/// monotonically as τ falls (the loss's hardness-awareness).
pub fn penalty_share_above(
    neg: &NegativeSimilarities,
    temp: &Temperature,
    threshold: f64,
) -> Result<f64> {
    temp.check()?;
    let mut total = 0.0;
    for i in 0..neg.anchors {
        let s = neg.row(i);
        total += s
            .iter()
            .zip(relative_penalty(s, temp))
            .filter(|(&sij, _)| sij >= threshold)
            .map(|(_, r)| r)
            .sum::<f64>();
    }
    Ok(total / neg.anchors.max(1) as f64)
}

/// Effective negatives: `mean_i exp(entropy(r_i))`, how many negatives carry the gradient
/// (between 1, all on one negative, and the number of negatives, spread evenly).
pub fn effective_negatives(neg: &NegativeSimilarities, temp: &Temperature) -> Result<f64> {
    temp.check()?;
    let mut total = 0.0;
    for i in 0..neg.anchors {
        let h: f64 = relative_penalty(neg.row(i), temp)
            .into_iter()
            .filter(|&r| r > 0.0)
            .map(|r| -r * r.ln())
            .sum();
        total += h.exp();
    }
    Ok(total / neg.anchors.max(1) as f64)
}

/// The Frobenius norm of every input gradient of a loss evaluation together:
/// `sqrt(Σ_tensors Σ_elements g²)`.
pub fn gradient_norm(out: &LossOutput) -> f64 {
    out.grads
        .iter()
        .flat_map(|g| g.value.data.iter())
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
}
