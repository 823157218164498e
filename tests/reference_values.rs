//! The CPU reference against known values and limits of spec/losses.md, and its invariances:
//! queue permutation, symmetric = mean of two cross losses, hard:k with k ≥ #negatives, DySTreSS
//! with τ_min = τ_max, chunked evaluation, and one generic path for every dtype.

mod common;

use common::{rel, rel_err, Case, Params, Tensor};
use fused_infonce::{
    bf16, f16, reference, DystressGrad, Element, LossOutput, LossSpec, LossValue, MatRef, Mode,
    Reduction, Temperature, Upstream, Variant,
};
use fused_infonce::{LossInputs, Matrix};
use rand::seq::SliceRandom;

/// Cross mode with D = 1: query [[1]], key [[1], [2], [3]], target 2, so the logits are
/// [1, 2, 3] / τ and the loss is the cross-entropy with target index 2.
fn cross_entropy_123(tau: f64) -> f64 {
    let spec = LossSpec::cross().temperature(tau).build().expect("spec");
    let (q, k) = ([1.0f64], [1.0f64, 2.0, 3.0]);
    let inputs = LossInputs::Cross {
        query: MatRef::new("query", &q, 1, 1).expect("query"),
        key: MatRef::new("key", &k, 3, 1).expect("key"),
        targets: Some(&[2]),
    };
    let out = reference::evaluate(&spec, &inputs, &Upstream::One).expect("evaluate");
    out.loss.scalar().expect("scalar")
}

#[test]
fn cross_entropy_of_logits_1_2_3() {
    // The spec's printed values (5 significant digits).
    for (tau, printed, half_ulp) in [(1.0, 0.40761, 5e-6), (0.5, 0.14293, 5e-6)] {
        let l = cross_entropy_123(tau);
        assert!(
            (l - printed).abs() <= half_ulp,
            "τ = {tau}: {l} vs {printed}"
        );
        // Exactly: log(1 + e^(−1/τ) + e^(−2/τ)).
        let exact = ((-1.0 / tau).exp() + (-2.0 / tau).exp()).ln_1p();
        assert!(rel(l, exact, 0.0) < 1e-12, "τ = {tau}: {l} vs {exact}");
    }
    let l = cross_entropy_123(0.1);
    // The spec prints 4.5400e-05: the exact value 4.540096e-05 truncated, not rounded, to five
    // digits, so the check against the printed value allows one unit in its last digit.
    assert!((l - 4.5400e-05).abs() <= 1e-9, "τ = 0.1: {l}");
    // log(1 + e^-10 + e^-20) to 1e-12 relative: f64 accumulation and no cancellation in lse − z+.
    let exact = ((-10f64).exp() + (-20f64).exp()).ln_1p();
    assert!(
        rel(l, exact, 0.0) < 1e-12,
        "τ = 0.1: {l:e} vs {exact:e} ({:e} relative)",
        rel(l, exact, 0.0)
    );
    // Not the float32 log-softmax's 4.5418e-05.
    assert!(
        (l - 4.5418e-05).abs() > 1e-8,
        "τ = 0.1: {l:e} is the f32 value"
    );
    // A correct prediction's loss falls as τ falls; at τ = 0.01 it is e^-100 (≈ 3.7e-44), not 0.
    let tiny = cross_entropy_123(0.01);
    let exact = ((-100f64).exp() + (-200f64).exp()).ln_1p();
    assert!(
        rel(tiny, exact, 0.0) < 1e-12,
        "τ = 0.01: {tiny:e} vs {exact:e}"
    );
    // A wrong one's rises: target 0 has loss log(1 + e^(1/τ) + e^(2/τ)) ≈ 2/τ.
    let spec = LossSpec::cross().temperature(0.1).build().expect("spec");
    let (q, k) = ([1.0f64], [1.0f64, 2.0, 3.0]);
    let inputs = LossInputs::Cross {
        query: MatRef::new("query", &q, 1, 1).expect("query"),
        key: MatRef::new("key", &k, 3, 1).expect("key"),
        targets: Some(&[0]),
    };
    let wrong = reference::evaluate(&spec, &inputs, &Upstream::One).expect("evaluate");
    let want = 20.0 + (1.0 + (-10f64).exp() + (-20f64).exp()).ln();
    assert!(rel(wrong.loss.scalar().expect("scalar"), want, 0.0) < 1e-14);
}

/// Per-anchor similarities `[s+, s_1, …, s_K]` of a queue case (raw rows), computed here.
fn queue_sims(case: &Case) -> Vec<Vec<f64>> {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (q, p, m) = (&case.mats[0], &case.mats[1], &case.mats[2]);
    (0..q.rows)
        .map(|i| {
            std::iter::once(dot(q.row(i), p.row(i)))
                .chain((0..m.rows).map(|j| dot(q.row(i), m.row(j))))
                .collect()
        })
        .collect()
}

fn per_anchor_losses(case: &Case, tau: f64, normalize: bool) -> Vec<f64> {
    let spec = LossSpec::queue()
        .temperature(tau)
        .normalize(normalize)
        .reduction(Reduction::None)
        .build()
        .expect("spec");
    let w = Upstream::PerAnchor(vec![1.0; case.mats[0].rows]);
    match case.evaluate(&spec, &w).expect("evaluate").loss {
        LossValue::PerAnchor(v) => v,
        v => panic!("reduction none gave {v:?}"),
    }
}

#[test]
fn tau_to_zero_is_a_zero_margin_triplet_loss_on_the_hardest_negative() {
    let mut r = common::rng(10);
    let mut case = Case::queue(&mut r, 5, 6, 4);
    // Anchor 0 beats every negative (limit 0), anchor 1 loses to one (limit s_max − s+ > 0).
    let q0: Vec<f64> = case.mats[0].row(0).to_vec();
    let q1: Vec<f64> = case.mats[0].row(1).to_vec();
    case.mats[1].data[..4].copy_from_slice(&q0.iter().map(|x| 5.0 * x).collect::<Vec<_>>());
    case.mats[1].data[4..8].copy_from_slice(&q1.iter().map(|x| -x).collect::<Vec<_>>());
    let sims = queue_sims(&case);
    let limit: Vec<f64> = sims
        .iter()
        .map(|s| {
            let s_max = s[1..].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            (s_max - s[0]).max(0.0)
        })
        .collect();
    assert!(limit[0] == 0.0 && limit[1] > 0.1, "both regimes: {limit:?}");
    let k = case.mats[2].rows as f64;
    let mut last = f64::INFINITY;
    for tau in [1e-1, 1e-2, 1e-3, 1e-4, 1e-6] {
        let l = per_anchor_losses(&case, tau, false);
        let mut worst: f64 = 0.0;
        for (i, (&li, &lim)) in l.iter().zip(&limit).enumerate() {
            // τ L − limit = τ LSE(z) − max(s+, s_max) ∈ [0, τ log(K + 1)].
            let gap = tau * li - lim;
            assert!(
                gap >= -1e-12 && gap <= tau * (k + 1.0).ln() + 1e-12,
                "τ = {tau}, anchor {i}: τL = {} vs limit {lim}",
                tau * li
            );
            worst = worst.max(gap);
        }
        last = worst;
    }
    // The bound above goes to 0 with τ; at τ = 1e-6 (logits ~1e6) nothing over- or underflows.
    assert!(last < 1e-5, "at τ = 1e-6 the gap is {last}");
}

#[test]
fn tau_to_infinity_first_order_and_second_order_term() {
    let mut r = common::rng(11);
    let case = Case::queue(&mut r, 4, 5, 3);
    // Normalised rows: the similarities are cosines; compute them here.
    let mut unit = case.clone();
    for m in &mut unit.mats {
        for row in m.data.chunks_mut(m.cols) {
            let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            row.iter_mut().for_each(|x| *x /= n);
        }
    }
    let sims = queue_sims(&unit);
    let k = case.mats[2].rows as f64;
    let first_order = |s: &[f64], tau: f64| {
        -(k / ((k + 1.0) * tau)) * s[0] + s[1..].iter().sum::<f64>() / ((k + 1.0) * tau)
    };
    // The next term of the expansion: ½ Var(s)/τ² (population variance over the K + 1 candidates).
    let half_var = |s: &[f64]| {
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        0.5 * s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / s.len() as f64
    };
    let err = |tau: f64| -> Vec<f64> {
        per_anchor_losses(&case, tau, true)
            .iter()
            .zip(&sims)
            .map(|(l, s)| l - (k + 1.0).ln() - first_order(s, tau))
            .collect()
    };
    let (e10, e100, e1000) = (err(10.0), err(100.0), err(1000.0));
    for (i, s) in sims.iter().enumerate() {
        // The error of the first-order formula shrinks like 1/τ².
        for (a, b, tau) in [(e10[i], e100[i], 10.0), (e100[i], e1000[i], 100.0)] {
            let ratio = a / b;
            assert!(
                (70.0..140.0).contains(&ratio),
                "anchor {i}: err({tau}) / err({}) = {ratio}, expected ≈ 100",
                10.0 * tau
            );
        }
        let c = e1000[i] * 1e6;
        assert!(
            rel(c, half_var(s), 0.0) < 1e-2,
            "anchor {i}: τ² err = {c} vs ½ Var(s) = {}",
            half_var(s)
        );
    }
}

/// Eq. 5: for the standard loss the negatives' gradient magnitudes sum to the positive's, and the
/// share of negative j is the relative penalty `r_i(s_ij) = exp(s_ij/τ) / Σ_k exp(s_ik/τ)`.
///
/// ∂L/∂s is recovered from the embedding gradients with a one-hot construction: query row i is
/// the unit vector e_i (D = N, no normalisation), so `s_ij = m_j[i]`, and in
/// `dm_j = Σ_i w_i (∂L_i/∂s_ij) q_i` component i holds anchor i's term alone:
/// `dm_j[i] = w_i ∂L_i/∂s_ij`; likewise `dp_i = w_i (∂L_i/∂s_i+) q_i` gives `dp_i[i]`.
#[test]
fn negatives_gradient_magnitudes_sum_to_the_positives() {
    let mut r = common::rng(12);
    let (n, k, tau) = (4, 7, 0.3);
    let mut case = Case::queue(&mut r, n, k, n);
    case.mats[0].data = (0..n * n)
        .map(|e| if e / n == e % n { 1.0 } else { 0.0 })
        .collect();
    let w = vec![0.5, 1.0, 2.0, -1.5];
    let spec = LossSpec::queue()
        .temperature(tau)
        .reduction(Reduction::None)
        .grad_queue(true)
        .build()
        .expect("spec");
    let out = case
        .evaluate(&spec, &Upstream::PerAnchor(w.clone()))
        .expect("evaluate");
    let (dp, dm) = (
        out.grad("positive").expect("dp"),
        out.grad("queue").expect("dm"),
    );
    let sims = queue_sims(&case);
    for i in 0..n {
        let d_pos = dp.row(i)[i] / w[i];
        let d_neg: Vec<f64> = (0..k).map(|j| dm.row(j)[i] / w[i]).collect();
        assert!(
            d_pos < 0.0 && d_neg.iter().all(|&d| d > 0.0),
            "signs, anchor {i}"
        );
        let sum: f64 = d_neg.iter().map(|d| d.abs()).sum();
        assert!(
            rel(sum, d_pos.abs(), 0.0) < 1e-12,
            "anchor {i}: Σ|∂L/∂s_ij| = {sum} vs |∂L/∂s+| = {}",
            d_pos.abs()
        );
        // ∂L/∂s+ = (P+ − 1)/τ with P+ computed here.
        let z: Vec<f64> = sims[i].iter().map(|s| s / tau).collect();
        let p_pos = 1.0 / z.iter().map(|x| (x - z[0]).exp()).sum::<f64>();
        assert!(
            rel(d_pos, (p_pos - 1.0) / tau, 0.0) < 1e-12,
            "anchor {i}: ∂L/∂s+"
        );
        // The relative penalty.
        let den: f64 = z[1..].iter().map(|x| x.exp()).sum();
        for j in 0..k {
            let r_ij = z[1 + j].exp() / den;
            assert!(
                rel(d_neg[j] / sum, r_ij, 0.0) < 1e-12,
                "anchor {i}, negative {j}: r"
            );
        }
    }
}

/// `a` and `b` agree to `tol` (normwise relative) in every output.
fn assert_close(a: &LossOutput, b: &LossOutput, tol: f64, who: &str) {
    let e = rel_err(&a.loss.values(), &b.loss.values(), 1e-300);
    assert!(e <= tol, "{who}: loss {:?} vs {:?}", a.loss, b.loss);
    assert_eq!(
        std::mem::discriminant(&a.loss),
        std::mem::discriminant(&b.loss),
        "{who}: loss kind"
    );
    assert!(
        rel_err(&a.lse, &b.lse, 1e-300) <= tol,
        "{who}: lse {:?} vs {:?}",
        a.lse,
        b.lse
    );
    match (&a.lse_cols, &b.lse_cols) {
        (Some(x), Some(y)) => assert!(rel_err(x, y, 1e-300) <= tol, "{who}: lse_cols"),
        (None, None) => {}
        (x, y) => panic!("{who}: lse_cols {x:?} vs {y:?}"),
    }
    assert_eq!(a.grads.len(), b.grads.len(), "{who}: number of gradients");
    for (x, y) in a.grads.iter().zip(&b.grads) {
        assert_eq!(x.name, y.name, "{who}");
        assert_eq!(
            (x.value.rows, x.value.cols),
            (y.value.rows, y.value.cols),
            "{who}"
        );
        let e = rel_err(&x.value.data, &y.value.data, 1e-300);
        assert!(e <= tol, "{who}: grad_{} off by {e:e}", x.name);
    }
    match (a.grad_temperature, b.grad_temperature) {
        (Some(x), Some(y)) => assert!(rel(x, y, 1e-300) <= tol, "{who}: dτ {x} vs {y}"),
        (None, None) => {}
        (x, y) => panic!("{who}: grad_temperature {x:?} vs {y:?}"),
    }
}

fn some_variants(k: usize) -> Vec<Variant> {
    vec![
        Variant::Standard,
        Variant::Decoupled,
        Variant::Hard { k },
        Variant::Simple {
            lambda: None,
            hard_k: None,
        },
        Variant::Simple {
            lambda: Some(0.3),
            hard_k: Some(k),
        },
    ]
}

fn some_temperatures() -> Vec<Temperature> {
    vec![
        Temperature::Fixed(0.1),
        Temperature::Learnable(0.3),
        Temperature::Dystress {
            tau_min: 0.07,
            tau_max: 0.2,
            grad: DystressGrad::Full,
        },
        Temperature::Dystress {
            tau_min: 0.1,
            tau_max: 0.2,
            grad: DystressGrad::Detach,
        },
    ]
}

#[test]
fn permuting_the_queue_permutes_grad_queue_only() {
    let mut r = common::rng(13);
    let case = Case::queue(&mut r, 3, 9, 4);
    let mut perm: Vec<usize> = (0..9).collect();
    perm.shuffle(&mut r);
    let mut permuted = case.clone();
    let m = &case.mats[2];
    permuted.mats[2].data = perm.iter().flat_map(|&j| m.row(j).to_vec()).collect();
    for temp in some_temperatures() {
        for variant in some_variants(3) {
            let p = Params {
                mode: Mode::Queue,
                temp,
                variant,
                reduction: Reduction::Mean,
                normalize: true,
                grad_queue: true,
            };
            let who = format!("{p:?}");
            let a = case.evaluate(&p.spec(), &Upstream::One).expect("evaluate");
            let mut b = permuted
                .evaluate(&p.spec(), &Upstream::One)
                .expect("evaluate");
            // Un-permute grad_queue: row j of the permuted gradient belongs to row perm[j].
            let gq = b.grads.iter_mut().find(|g| g.name == "queue").expect("dm");
            let mut back = Matrix::zeros(gq.value.rows, gq.value.cols);
            for (j, &src) in perm.iter().enumerate() {
                back.row_mut(src).copy_from_slice(gq.value.row(j));
            }
            gq.value = back;
            assert_close(&a, &b, 1e-12, &who);
        }
    }
}

/// A cross case from two tensors (default targets).
fn cross_of(query: &Tensor, key: &Tensor) -> Case {
    Case {
        mode: Mode::Cross,
        mats: vec![
            Tensor {
                name: "query",
                ..query.clone()
            },
            Tensor {
                name: "key",
                ..key.clone()
            },
        ],
        targets: None,
        label: "cross".into(),
    }
}

#[test]
fn symmetric_is_the_mean_of_the_two_cross_losses() {
    let mut r = common::rng(14);
    let n = 5;
    let sym = Case::symmetric(&mut r, n, 3);
    let ab = cross_of(&sym.mats[0], &sym.mats[1]);
    let ba = cross_of(&sym.mats[1], &sym.mats[0]);
    let wr: Vec<f64> = (0..n).map(|_| common::value(&mut r)).collect();
    let wc: Vec<f64> = (0..n).map(|_| common::value(&mut r)).collect();
    for temp in some_temperatures() {
        for variant in some_variants(2) {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let p = Params {
                    mode: Mode::Symmetric,
                    temp,
                    variant,
                    reduction,
                    normalize: true,
                    grad_queue: false,
                };
                let q = Params {
                    mode: Mode::Cross,
                    ..p
                };
                let who = format!("{p:?}");
                let (up_s, up_r, up_c, half) = match reduction {
                    Reduction::None => (
                        Upstream::PerAnchor(wr.iter().chain(&wc).copied().collect()),
                        Upstream::PerAnchor(wr.clone()),
                        Upstream::PerAnchor(wc.clone()),
                        1.0,
                    ),
                    _ => (Upstream::One, Upstream::One, Upstream::One, 0.5),
                };
                let s = sym.evaluate(&p.spec(), &up_s).expect("symmetric");
                let x = ab.evaluate(&q.spec(), &up_r).expect("cross A→B");
                let y = ba.evaluate(&q.spec(), &up_c).expect("cross B→A");
                // The expected output, assembled from the two cross losses.
                let loss = match (&x.loss, &y.loss) {
                    (LossValue::Scalar(a), LossValue::Scalar(b)) => {
                        LossValue::Scalar(0.5 * (a + b))
                    }
                    (LossValue::PerAnchor(a), LossValue::PerAnchor(b)) => LossValue::Symmetric {
                        rows: a.clone(),
                        cols: b.clone(),
                    },
                    v => panic!("{who}: {v:?}"),
                };
                let comb = |a: &Matrix, b: &Matrix| Matrix {
                    rows: a.rows,
                    cols: a.cols,
                    data: a
                        .data
                        .iter()
                        .zip(&b.data)
                        .map(|(u, v)| half * (u + v))
                        .collect(),
                };
                let g = |o: &LossOutput, name: &str| o.grad(name).expect("grad").clone();
                let mut want = s.clone();
                want.loss = loss;
                want.lse = x.lse.clone();
                want.lse_cols = Some(y.lse.clone());
                want.grads[0].value = comb(&g(&x, "query"), &g(&y, "key"));
                want.grads[1].value = comb(&g(&x, "key"), &g(&y, "query"));
                want.grad_temperature = match (x.grad_temperature, y.grad_temperature) {
                    (Some(a), Some(b)) => Some(half * (a + b)),
                    _ => None,
                };
                assert_eq!(
                    s.grads.iter().map(|g| g.name).collect::<Vec<_>>(),
                    ["query", "key"],
                    "{who}"
                );
                assert_close(&s, &want, 1e-12, &who);
            }
        }
    }
}

fn grid_cases(seed: u64) -> Vec<Case> {
    let mut r = common::rng(seed);
    vec![
        Case::queue(&mut r, 3, 8, 4),
        Case::queue(&mut r, 2, 0, 3),
        Case::inbatch(&mut r, 3, 5),
        Case::cross(&mut r, 3, 6, 2, false),
        Case::cross(&mut r, 4, 5, 3, true),
        Case::symmetric(&mut r, 4, 3),
    ]
}

#[test]
fn hard_k_with_k_at_least_the_negatives_is_the_standard_loss() {
    for case in grid_cases(15) {
        let neg = case.negatives();
        for k in [neg.max(1), neg + 3] {
            for (hard, plain) in [
                (Variant::Hard { k }, Variant::Standard),
                (
                    Variant::Simple {
                        lambda: None,
                        hard_k: Some(k),
                    },
                    Variant::Simple {
                        lambda: None,
                        hard_k: None,
                    },
                ),
            ] {
                let p = Params {
                    mode: case.mode,
                    temp: Temperature::Learnable(0.2),
                    variant: hard,
                    reduction: Reduction::Sum,
                    normalize: true,
                    grad_queue: case.mode == Mode::Queue,
                };
                let q = Params {
                    variant: plain,
                    ..p
                };
                let who = format!("{} {p:?}", case.label);
                let a = case
                    .evaluate(&p.spec(), &Upstream::Scalar(0.7))
                    .expect("hard");
                let b = case
                    .evaluate(&q.spec(), &Upstream::Scalar(0.7))
                    .expect("plain");
                assert_close(&a, &b, 1e-15, &who);
            }
        }
    }
}

/// Ties at the threshold are all kept: with exact duplicate negatives, hard:1 keeps both copies of
/// the hardest one. D = 1, raw rows, so every similarity is exact.
#[test]
fn hard_k_keeps_every_tie_at_the_threshold() {
    let tau = 0.25;
    let (q, p) = ([1.0f64], [0.2f64]);
    let m = [0.5f64, 0.9, -0.3, 0.9, 0.1];
    for (k, kept) in [
        (1, vec![0.9, 0.9]),
        (2, vec![0.9, 0.9]),
        (3, vec![0.9, 0.9, 0.5]),
    ] {
        let spec = LossSpec::queue()
            .temperature(tau)
            .variant(Variant::Hard { k })
            .grad_queue(true)
            .build()
            .expect("spec");
        let inputs = LossInputs::Queue {
            query: MatRef::new("query", &q, 1, 1).expect("q"),
            positive: MatRef::new("positive", &p, 1, 1).expect("p"),
            queue: MatRef::new("queue", &m, 5, 1).expect("m"),
        };
        let out = reference::evaluate(&spec, &inputs, &Upstream::One).expect("evaluate");
        let z: Vec<f64> = std::iter::once(0.2)
            .chain(kept.iter().copied())
            .map(|s| s / tau)
            .collect();
        let den: f64 = z.iter().map(|x| x.exp()).sum();
        let want = den.ln() - z[0];
        let got = out.loss.scalar().expect("scalar");
        assert!(rel(got, want, 0.0) < 1e-14, "k = {k}: {got} vs {want}");
        // Unselected negatives get exactly zero gradient; selected ones P_j/τ · q.
        let dm = &out.grad("queue").expect("dm").data;
        for (j, &s) in m.iter().enumerate() {
            let want = if kept.contains(&s) {
                (s / tau).exp() / den / tau
            } else {
                0.0
            };
            assert!(
                rel(dm[j], want, 1e-300) < 1e-12,
                "k = {k}, row {j}: {} vs {want}",
                dm[j]
            );
        }
    }
}

#[test]
fn dystress_with_equal_bounds_is_the_fixed_temperature() {
    for case in grid_cases(16) {
        for grad in [DystressGrad::Detach, DystressGrad::Full] {
            for variant in some_variants(2) {
                if variant == Variant::Decoupled && case.negatives() == 0 {
                    continue;
                }
                let p = Params {
                    mode: case.mode,
                    temp: Temperature::Dystress {
                        tau_min: 0.15,
                        tau_max: 0.15,
                        grad,
                    },
                    variant,
                    reduction: Reduction::Mean,
                    normalize: true,
                    grad_queue: case.mode == Mode::Queue,
                };
                let q = Params {
                    temp: Temperature::Fixed(0.15),
                    ..p
                };
                let who = format!("{} {p:?}", case.label);
                let a = case.evaluate(&p.spec(), &Upstream::One).expect("dystress");
                let b = case.evaluate(&q.spec(), &Upstream::One).expect("fixed");
                assert_close(&a, &b, 1e-12, &who);
            }
        }
    }
}

#[test]
fn chunked_evaluation_equals_unchunked() {
    let mut r = common::rng(17);
    for case in grid_cases(18) {
        let k = case.negatives();
        for temp in some_temperatures() {
            for variant in some_variants(3) {
                if variant == Variant::Decoupled && k == 0 {
                    continue;
                }
                for reduction in [Reduction::Mean, Reduction::None] {
                    let p = Params {
                        mode: case.mode,
                        temp,
                        variant,
                        reduction,
                        normalize: true,
                        grad_queue: case.mode == Mode::Queue,
                    };
                    let up = match reduction {
                        Reduction::None => Upstream::PerAnchor(
                            (0..case.losses()).map(|_| common::value(&mut r)).collect(),
                        ),
                        _ => Upstream::Scalar(1.3),
                    };
                    let spec = p.spec();
                    let whole = case.evaluate(&spec, &up).expect("evaluate");
                    for chunk in [1, 2, 3, 7, k.max(1)] {
                        let who = format!("{} {p:?} chunk {chunk}", case.label);
                        let c = reference::evaluate_chunked(&spec, &case.inputs(), &up, chunk)
                            .expect("chunked");
                        assert_close(&c, &whole, 1e-12, &who);
                    }
                }
            }
        }
    }
}

/// f16, bf16 and f32 inputs give exactly the f64 result on the values rounded to that dtype.
fn same_as_f64_of_rounded<T: Element>(case: &Case, spec: &LossSpec, up: &Upstream) {
    let low: Vec<Vec<T>> = case
        .mats
        .iter()
        .map(|m| m.data.iter().map(|&x| T::from_f64(x)).collect())
        .collect();
    let mut rounded = case.clone();
    for (m, l) in rounded.mats.iter_mut().zip(&low) {
        m.data = l.iter().map(|x| x.to_f64()).collect();
    }
    // The rounding really changed the data (else the test would prove nothing for f16/bf16/f32).
    assert_ne!(rounded.mats[0].data, case.mats[0].data, "{}", T::DTYPE);
    let slices: Vec<&[T]> = low.iter().map(|v| v.as_slice()).collect();
    let got = reference::evaluate(spec, &case.inputs_of(&slices), up).expect("low precision");
    let want = rounded.evaluate(spec, up).expect("f64");
    assert_eq!(got, want, "{} {} {spec:?}", T::DTYPE, case.label);
}

#[test]
fn every_dtype_takes_the_one_f64_path() {
    for case in grid_cases(19) {
        for (temp, variant) in [
            (Temperature::Fixed(0.07), Variant::Standard),
            (Temperature::Learnable(0.2), Variant::Hard { k: 2 }),
            (
                Temperature::Dystress {
                    tau_min: 0.1,
                    tau_max: 0.2,
                    grad: DystressGrad::Full,
                },
                Variant::Simple {
                    lambda: None,
                    hard_k: None,
                },
            ),
        ] {
            let p = Params {
                mode: case.mode,
                temp,
                variant,
                reduction: Reduction::Mean,
                normalize: true,
                grad_queue: case.mode == Mode::Queue,
            };
            let spec = p.spec();
            same_as_f64_of_rounded::<f32>(&case, &spec, &Upstream::One);
            same_as_f64_of_rounded::<f16>(&case, &spec, &Upstream::One);
            same_as_f64_of_rounded::<bf16>(&case, &spec, &Upstream::One);
        }
    }
}
