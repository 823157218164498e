//! The metrics against their direct pairwise definitions and hand-computed small cases
//! (spec/losses.md, Metrics), and the hardness-awareness of the penalty histogram.

use approx::assert_relative_eq;
use fused_infonce::data::{stack, two_views, Clustered};
use fused_infonce::metrics::{self, NegativeSimilarities, Negatives, UNIFORMITY_T};
use fused_infonce::{
    reference, DystressGrad, LossInputs, LossSpec, MatRef, Matrix, Temperature, Upstream,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random_unit(rows: usize, cols: usize, seed: u64) -> Matrix {
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<f64> = (0..rows * cols)
        .map(|_| rng.random::<f64>() * 2.0 - 1.0)
        .collect();
    metrics::normalized(&MatRef::new("x", &data, rows, cols).unwrap())
}

fn m(rows: usize, cols: usize, data: &[f64]) -> Matrix {
    Matrix {
        rows,
        cols,
        data: data.to_vec(),
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

#[test]
fn uniformity_equals_the_direct_pairwise_definition() {
    for (n, d, seed) in [(2, 3, 1), (7, 4, 2), (40, 8, 3)] {
        let u = random_unit(n, d, seed);
        let mut total = 0.0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    total += (-UNIFORMITY_T * sq_dist(u.row(i), u.row(j))).exp();
                }
            }
        }
        let direct = (total / (n * (n - 1)) as f64).ln();
        assert_relative_eq!(
            metrics::uniformity(&u, UNIFORMITY_T).unwrap(),
            direct,
            max_relative = 1e-12
        );
    }
}

#[test]
fn uniformity_hand_cases() {
    // Two orthogonal unit rows: ‖u − v‖² = 2, so log exp(−2·2) = −4.
    let u = m(2, 2, &[1.0, 0.0, 0.0, 1.0]);
    assert_relative_eq!(metrics::uniformity(&u, 2.0).unwrap(), -4.0, epsilon = 1e-12);
    // Two equal rows: 0. Two opposite rows: −2·4 = −8.
    let u = m(2, 2, &[1.0, 0.0, 1.0, 0.0]);
    assert_relative_eq!(metrics::uniformity(&u, 2.0).unwrap(), 0.0, epsilon = 1e-12);
    let u = m(2, 2, &[1.0, 0.0, -1.0, 0.0]);
    assert_relative_eq!(metrics::uniformity(&u, 2.0).unwrap(), -8.0, epsilon = 1e-12);
    // Three rows: e1, e1, −e1: pairs (0,1) d²=0, (0,2) 4, (1,2) 4: log((1 + 2e^-8)/3).
    let u = m(3, 1, &[1.0, 1.0, -1.0]);
    let expect = ((1.0 + 2.0 * (-8.0f64).exp()) / 3.0).ln();
    assert_relative_eq!(
        metrics::uniformity(&u, 2.0).unwrap(),
        expect,
        epsilon = 1e-12
    );
}

#[test]
fn uniformity_is_stable_for_a_large_t() {
    // With t = 500 a direct exp underflows to 0 (log 0 = −inf); the LSE form stays finite.
    let u = random_unit(10, 3, 9);
    let v = metrics::uniformity(&u, 500.0).unwrap();
    assert!(v.is_finite() && v < -1.0, "{v}");
}

#[test]
fn tolerance_equals_the_pairwise_definition() {
    let u = random_unit(50, 6, 4);
    let mut rng = StdRng::seed_from_u64(5);
    let labels: Vec<i64> = (0..50).map(|_| rng.random_range(0..4)).collect();
    let (mut total, mut count) = (0.0, 0usize);
    for i in 0..50 {
        for j in 0..50 {
            if i != j && labels[i] == labels[j] {
                total += dot(u.row(i), u.row(j));
                count += 1;
            }
        }
    }
    assert_relative_eq!(
        metrics::tolerance(&u, &labels).unwrap(),
        total / count as f64,
        max_relative = 1e-12
    );
}

#[test]
fn tolerance_hand_case() {
    // Class 0: e1, e2 (s = 0) and class 1: e1, (e1+e2)/√2 (s = 1/√2); 2 ordered pairs each.
    let r = std::f64::consts::FRAC_1_SQRT_2;
    let u = m(4, 2, &[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, r, r]);
    let t = metrics::tolerance(&u, &[0, 0, 1, 1]).unwrap();
    assert_relative_eq!(t, (0.0 + r) / 2.0, epsilon = 1e-12);
}

#[test]
fn alignment_hand_case() {
    // Pair 0 equal (0), pair 1 orthogonal (2): mean 1.
    let u = m(2, 2, &[1.0, 0.0, 1.0, 0.0]);
    let v = m(2, 2, &[1.0, 0.0, 0.0, 1.0]);
    assert_relative_eq!(metrics::alignment(&u, &v).unwrap(), 1.0, epsilon = 1e-12);
}

#[test]
fn knn_accuracy_separable_and_mixed() {
    // Two tight, opposite clusters: every neighbour is of the same class.
    let u = m(
        6,
        2,
        &[
            1.0, 0.0, 0.99, 0.14, 0.99, -0.14, -1.0, 0.0, -0.99, 0.14, -0.99, -0.14,
        ],
    );
    assert_relative_eq!(
        metrics::knn_accuracy(&u, &[0, 0, 0, 1, 1, 1], 2).unwrap(),
        1.0
    );
    // Relabel row 0 as class 1, k = 1: row 0's nearest (rows 1, 2) say 0, and rows 1 and 2's
    // nearest is row 0 (s = 0.99 against 0.96 between them), so all three are wrong: 3 of 6.
    let acc = metrics::knn_accuracy(&u, &[1, 0, 0, 1, 1, 1], 1).unwrap();
    assert_relative_eq!(acc, 0.5);
}

#[test]
fn penalty_histogram_hand_case() {
    // One anchor (queue mode), negatives with s = 0 and s = 0.5, τ = 0.5: z = 0 and 1,
    // r = (1, e) / (1 + e). Four bins over [−1, 1]: s = 0 is in bin 2, s = 0.5 in bin 3.
    let q = m(1, 2, &[1.0, 0.0]);
    let root3 = 3.0f64.sqrt() / 2.0;
    let queue = m(2, 2, &[0.0, 1.0, 0.5, root3]);
    let neg = NegativeSimilarities::new(Negatives::Queue {
        query: &q,
        queue: &queue,
    })
    .unwrap();
    let h = metrics::penalty_histogram(&neg, &Temperature::Fixed(0.5), 4).unwrap();
    let e = std::f64::consts::E;
    assert_eq!(h.edges, vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
    assert_relative_eq!(h.mass[0], 0.0);
    assert_relative_eq!(h.mass[1], 0.0);
    assert_relative_eq!(h.mass[2], 1.0 / (1.0 + e), epsilon = 1e-12);
    assert_relative_eq!(h.mass[3], e / (1.0 + e), epsilon = 1e-12);
    // Effective negatives: exp(entropy) of (1, e)/(1+e).
    let (p, r) = (1.0 / (1.0 + e), e / (1.0 + e));
    let expect = (-(p * p.ln()) - r * r.ln()).exp();
    assert_relative_eq!(
        metrics::effective_negatives(&neg, &Temperature::Fixed(0.5)).unwrap(),
        expect,
        epsilon = 1e-12
    );
    // Share above s = 0.25: the s = 0.5 negative's weight.
    assert_relative_eq!(
        metrics::penalty_share_above(&neg, &Temperature::Fixed(0.5), 0.25).unwrap(),
        r,
        epsilon = 1e-12
    );
}

#[test]
fn dystress_penalty_uses_the_similarity_dependent_temperature() {
    // τ(0) = τ_min, τ(±1) = τ_max: negatives at s = 0 and s = 1 have z = 0 and 1/τ_max.
    let t = Temperature::Dystress {
        tau_min: 0.1,
        tau_max: 0.2,
        grad: DystressGrad::Detach,
    };
    let r = metrics::relative_penalty(&[0.0, 1.0], &t);
    let w = (1.0f64 / 0.2).exp();
    assert_relative_eq!(r[0], 1.0 / (1.0 + w), epsilon = 1e-12);
    assert_relative_eq!(r[1], w / (1.0 + w), epsilon = 1e-12);
}

#[test]
fn histogram_sums_to_one_and_effective_negatives_are_bounded() {
    let e = random_unit(20, 5, 6);
    let neg = NegativeSimilarities::new(Negatives::InBatch { embeddings: &e }).unwrap();
    assert_eq!((neg.anchors, neg.per_anchor), (20, 18));
    for t in [0.05, 0.2, 1.0, 100.0] {
        let temp = Temperature::Fixed(t);
        let h = metrics::penalty_histogram(&neg, &temp, 16).unwrap();
        assert_relative_eq!(h.mass.iter().sum::<f64>(), 1.0, epsilon = 1e-12);
        let eff = metrics::effective_negatives(&neg, &temp).unwrap();
        assert!((1.0..=18.0 + 1e-9).contains(&eff), "{eff}");
    }
    // τ → ∞: every negative carries the same weight.
    let eff = metrics::effective_negatives(&neg, &Temperature::Fixed(1e9)).unwrap();
    assert_relative_eq!(eff, 18.0, max_relative = 1e-6);
}

/// The relative penalty is the loss's own weighting of the negatives (eq. 5): for queue mode
/// without normalisation, `dq = ((1 − P+)/τ) (Σ_j r_j m_j − p)` with `P+ = exp(z+ − LSE)`.
#[test]
fn relative_penalty_matches_the_loss_gradient() {
    let q = random_unit(1, 6, 10);
    let p = random_unit(1, 6, 11);
    let queue = random_unit(9, 6, 12);
    let tau = 0.15;
    let spec = LossSpec::queue().temperature(tau).build().unwrap();
    let inputs = LossInputs::Queue {
        query: MatRef::new("query", &q.data, 1, 6).unwrap(),
        positive: MatRef::new("positive", &p.data, 1, 6).unwrap(),
        queue: MatRef::new("queue", &queue.data, 9, 6).unwrap(),
    };
    let out = reference::evaluate(&spec, &inputs, &Upstream::One).unwrap();
    let neg = NegativeSimilarities::new(Negatives::Queue {
        query: &q,
        queue: &queue,
    })
    .unwrap();
    let r = metrics::relative_penalty(neg.row(0), &Temperature::Fixed(tau));
    let p_pos = (dot(q.row(0), p.row(0)) / tau - out.lse[0]).exp();
    let dq = out.grad("query").unwrap();
    for k in 0..6 {
        let mix: f64 = (0..9).map(|j| r[j] * queue.row(j)[k]).sum();
        let expect = (1.0 - p_pos) / tau * (mix - p.row(0)[k]);
        assert_relative_eq!(dq.row(0)[k], expect, max_relative = 1e-10, epsilon = 1e-14);
    }
    // The gradient norm is the Frobenius norm over the returned gradients.
    let direct: f64 = out
        .grads
        .iter()
        .flat_map(|g| g.value.data.iter())
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    assert_relative_eq!(metrics::gradient_norm(&out), direct);
    assert!(direct > 0.0);
}

fn assert_share_rises_as_tau_falls(neg: &NegativeSimilarities, threshold: f64) {
    let taus = [2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.07, 0.05];
    let shares: Vec<f64> = taus
        .iter()
        .map(|&t| metrics::penalty_share_above(neg, &Temperature::Fixed(t), threshold).unwrap())
        .collect();
    for w in shares.windows(2) {
        assert!(w[1] > w[0], "share not rising as τ falls: {shares:?}");
    }
    assert!(
        shares[0] < 0.5 && shares[taus.len() - 1] > 0.5,
        "{shares:?}"
    );
}

#[test]
fn hard_negative_share_rises_monotonically_as_tau_falls_random() {
    let e = random_unit(60, 4, 13);
    let neg = NegativeSimilarities::new(Negatives::InBatch { embeddings: &e }).unwrap();
    assert_share_rises_as_tau_falls(&neg, 0.5);
}

#[test]
fn hard_negative_share_rises_monotonically_as_tau_falls_builtin() {
    let set = Clustered {
        per_class: 20,
        ..Clustered::default()
    }
    .generate()
    .unwrap();
    let (a, b) = two_views(&set.x, 0.5, 3);
    let e = stack(&a, &b).unwrap();
    let neg = NegativeSimilarities::new(Negatives::InBatch { embeddings: &e }).unwrap();
    assert_share_rises_as_tau_falls(&neg, 0.5);
}

#[test]
fn bins_cover_minus_one_to_one() {
    assert_eq!(metrics::bin_of(-1.0, 4), 0);
    assert_eq!(metrics::bin_of(-0.51, 4), 0);
    assert_eq!(metrics::bin_of(-0.5, 4), 1);
    assert_eq!(metrics::bin_of(0.999, 4), 3);
    assert_eq!(metrics::bin_of(1.0, 4), 3);
    assert_eq!(metrics::bin_of(1.0 + 1e-12, 4), 3);
    assert_eq!(metrics::bin_of(-1.5, 4), 0);
    assert_eq!(metrics::bin_of(f64::NAN, 4), 0);
    assert_eq!(metrics::bin_of(0.3, 0), 0);
}

#[test]
fn bad_shapes_and_empty_inputs_are_errors() {
    let empty = m(0, 3, &[]);
    let one = m(1, 2, &[1.0, 0.0]);
    let two = m(2, 2, &[1.0, 0.0, 0.0, 1.0]);
    assert!(metrics::uniformity(&empty, 2.0).is_err());
    assert!(metrics::uniformity(&one, 2.0).is_err());
    assert!(metrics::uniformity(&two, 0.0).is_err());
    assert!(metrics::uniformity(&m(2, 2, &[1.0]), 2.0).is_err());
    assert!(metrics::alignment(&one, &two).is_err());
    assert!(metrics::alignment(&empty, &empty).is_err());
    assert!(metrics::tolerance(&two, &[0]).is_err());
    let msg = metrics::tolerance(&two, &[0, 1]).unwrap_err().to_string();
    assert!(msg.contains("same label"), "{msg}");
    assert!(metrics::knn_accuracy(&two, &[0, 1], 0).is_err());
    assert!(metrics::knn_accuracy(&two, &[0, 1], 2).is_err());
    assert!(NegativeSimilarities::new(Negatives::InBatch { embeddings: &two }).is_err());
    assert!(NegativeSimilarities::new(Negatives::InBatch {
        embeddings: &m(3, 1, &[1.0, 1.0, 1.0])
    })
    .is_err());
    assert!(NegativeSimilarities::new(Negatives::Queue {
        query: &one,
        queue: &empty
    })
    .is_err());
    assert!(NegativeSimilarities::new(Negatives::Cross {
        query: &two,
        key: &one
    })
    .is_err());
    let e = random_unit(4, 2, 1);
    let neg = NegativeSimilarities::new(Negatives::InBatch { embeddings: &e }).unwrap();
    assert!(metrics::penalty_histogram(&neg, &Temperature::Fixed(0.1), 0).is_err());
    assert!(metrics::penalty_histogram(&neg, &Temperature::Fixed(-1.0), 4).is_err());
    assert!(metrics::effective_negatives(&neg, &Temperature::Fixed(f64::NAN)).is_err());
}
