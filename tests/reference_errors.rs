//! Bad input never panics and never yields a silent wrong number: every shape and parameter error
//! is an `Err` whose message names the tensor or parameter, and NaN in an input propagates into
//! the loss (as in PyTorch; the command line rejects non-finite input unless told otherwise).

mod common;

use common::{Case, Params};
use fused_infonce::{
    reference, DystressGrad, Error, LossInputs, LossSpec, MatRef, Mode, Reduction, Temperature,
    Upstream, Variant,
};

/// The message of an expected error; fails (with `who`) when `r` is `Ok`.
fn message<T: std::fmt::Debug>(r: fused_infonce::Result<T>, who: &str) -> String {
    match r {
        Ok(v) => panic!("{who}: expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// `r` is an error whose message contains every one of `parts`.
fn expect_err<T: std::fmt::Debug>(r: fused_infonce::Result<T>, parts: &[&str], who: &str) {
    let m = message(r, who);
    for p in parts {
        assert!(m.contains(p), "{who}: message {m:?} does not mention {p:?}");
    }
}

fn data(len: usize) -> Vec<f64> {
    (0..len).map(|i| 0.3 + 0.17 * i as f64).collect()
}

/// `reference::evaluate` of a queue problem with the given shapes (data of the right length).
fn queue(
    spec: &LossSpec,
    (n, d): (usize, usize),
    (np, dp): (usize, usize),
    (k, dk): (usize, usize),
) -> fused_infonce::Result<fused_infonce::LossOutput> {
    let (q, p, m) = (data(n * d), data(np * dp), data(k * dk));
    let inputs = LossInputs::Queue {
        query: MatRef::new("query", &q, n, d)?,
        positive: MatRef::new("positive", &p, np, dp)?,
        queue: MatRef::new("queue", &m, k, dk)?,
    };
    reference::evaluate(spec, &inputs, &Upstream::One)
}

fn two(
    spec: &LossSpec,
    (n, d): (usize, usize),
    (m, dk): (usize, usize),
    targets: Option<&[i64]>,
) -> fused_infonce::Result<fused_infonce::LossOutput> {
    let (a, b) = (data(n * d), data(m * dk));
    let query = MatRef::new("query", &a, n, d)?;
    let key = MatRef::new("key", &b, m, dk)?;
    let inputs = match spec.mode() {
        Mode::Cross => LossInputs::Cross {
            query,
            key,
            targets,
        },
        _ => LossInputs::Symmetric { query, key },
    };
    reference::evaluate(spec, &inputs, &Upstream::One)
}

fn inbatch(
    spec: &LossSpec,
    rows: usize,
    d: usize,
) -> fused_infonce::Result<fused_infonce::LossOutput> {
    let e = data(rows * d);
    let inputs = LossInputs::InBatch {
        embeddings: MatRef::new("embeddings", &e, rows, d)?,
    };
    reference::evaluate(spec, &inputs, &Upstream::One)
}

#[test]
fn shape_errors_name_the_tensor() {
    let q = LossSpec::queue().build().expect("spec");
    assert!(
        queue(&q, (2, 3), (2, 3), (4, 3)).is_ok(),
        "the well-formed case"
    );
    expect_err(
        queue(&q, (2, 3), (2, 4), (4, 3)),
        &["positive", "[2, 4]", "D = 3"],
        "positive D",
    );
    expect_err(
        queue(&q, (2, 3), (2, 3), (4, 2)),
        &["queue", "[4, 2]"],
        "queue D",
    );
    expect_err(
        queue(&q, (2, 3), (3, 3), (4, 3)),
        &["positive", "[3, 3]", "[2, 3]"],
        "positive rows",
    );
    expect_err(
        queue(&q, (0, 3), (0, 3), (4, 3)),
        &["query", "N >= 1"],
        "N = 0",
    );
    expect_err(
        queue(&q, (2, 3), (2, 3), (0, 5)),
        &["queue", "[0, 5]", "[0, 3]"],
        "empty queue of the wrong width",
    );
    expect_err(
        queue(&q, (2, 0), (2, 0), (4, 0)),
        &["query", "D >= 1"],
        "D = 0",
    );

    let ib = LossSpec::inbatch().build().expect("spec");
    assert!(inbatch(&ib, 4, 3).is_ok());
    expect_err(
        inbatch(&ib, 3, 2),
        &["embeddings", "[3, 2]", "even"],
        "odd rows",
    );
    expect_err(inbatch(&ib, 0, 2), &["embeddings"], "no rows");

    let cr = LossSpec::cross().build().expect("spec");
    assert!(two(&cr, (2, 3), (4, 3), None).is_ok());
    expect_err(
        two(&cr, (2, 3), (4, 2), None),
        &["key", "[4, 2]"],
        "cross key D",
    );
    expect_err(two(&cr, (0, 3), (4, 3), None), &["query"], "cross N = 0");

    let sy = LossSpec::symmetric().build().expect("spec");
    assert!(two(&sy, (3, 2), (3, 2), None).is_ok());
    expect_err(
        two(&sy, (3, 2), (4, 2), None),
        &["key", "[4, 2]", "[3, 2]"],
        "symmetric rows",
    );
    expect_err(
        two(&sy, (3, 2), (3, 5), None),
        &["key", "[3, 5]"],
        "symmetric D",
    );
    expect_err(
        two(&sy, (0, 2), (0, 2), None),
        &["query"],
        "symmetric N = 0",
    );

    // Inputs for another mode than the spec's.
    expect_err(
        inbatch(&q, 4, 3),
        &["mode", "queue", "inbatch"],
        "mode mismatch",
    );
    // A view whose data does not fit its shape.
    let d = data(5);
    expect_err(
        MatRef::new("queue", &d, 2, 3),
        &["queue", "5 elements", "[2, 3]"],
        "MatRef",
    );
}

#[test]
fn bad_targets_are_rejected() {
    let cr = LossSpec::cross().build().expect("spec");
    assert!(two(&cr, (3, 2), (4, 2), Some(&[3, 0, 1])).is_ok());
    expect_err(
        two(&cr, (3, 2), (4, 2), Some(&[0, 4, 1])),
        &["targets[1]", "4", "[0, 4)"],
        "too large",
    );
    expect_err(
        two(&cr, (3, 2), (4, 2), Some(&[-1, 0, 1])),
        &["targets[0]", "-1"],
        "negative",
    );
    expect_err(
        two(&cr, (3, 2), (4, 2), Some(&[0, 1])),
        &["targets", "[2]", "[3]"],
        "short",
    );
    expect_err(
        two(&cr, (3, 2), (4, 2), Some(&[0, 1, 2, 3])),
        &["targets", "[4]"],
        "long",
    );
    // Default targets y_i = i need M ≥ N; explicit ones do not.
    expect_err(two(&cr, (3, 2), (2, 2), None), &["key", "M >= N"], "M < N");
    assert!(two(&cr, (3, 2), (2, 2), Some(&[1, 1, 0])).is_ok());
}

#[test]
fn decoupled_without_negatives_is_rejected() {
    let spec =
        |b: fused_infonce::LossSpecBuilder| b.variant(Variant::Decoupled).build().expect("spec");
    let parts = ["variant", "decoupled", "negative"];
    expect_err(
        queue(&spec(LossSpec::queue()), (2, 3), (2, 3), (0, 3)),
        &parts,
        "empty queue",
    );
    expect_err(
        two(&spec(LossSpec::symmetric()), (1, 3), (1, 3), None),
        &parts,
        "N = 1 symmetric",
    );
    expect_err(
        inbatch(&spec(LossSpec::inbatch()), 2, 3),
        &parts,
        "N = 1 inbatch",
    );
    expect_err(
        two(&spec(LossSpec::cross()), (1, 3), (1, 3), None),
        &parts,
        "M = 1 cross",
    );
    // With one negative it is fine.
    assert!(queue(&spec(LossSpec::queue()), (2, 3), (2, 3), (1, 3)).is_ok());
}

#[test]
fn build_rejects_bad_parameters() {
    let simple = |lambda, hard_k| Variant::Simple { lambda, hard_k };
    expect_err(
        LossSpec::queue().variant(Variant::Hard { k: 0 }).build(),
        &["hard:k", "0"],
        "hard:0",
    );
    expect_err(
        LossSpec::queue().variant(simple(None, Some(0))).build(),
        &["hard:k"],
        "simple hard:0",
    );
    for l in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        expect_err(
            LossSpec::queue().variant(simple(Some(l), None)).build(),
            &["simple:lambda"],
            &format!("λ = {l}"),
        );
    }
    for t in [0.0, -0.1, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        expect_err(
            LossSpec::queue().temperature(t).build(),
            &["temperature"],
            &format!("τ = {t}"),
        );
        expect_err(
            LossSpec::inbatch().learnable_temperature(t).build(),
            &["temperature"],
            &format!("learnable τ = {t}"),
        );
    }
    for (lo, hi, name) in [
        (0.2, 0.1, "tau_max"),
        (0.1, f64::NAN, "tau_max"),
        (0.1, f64::INFINITY, "tau_max"),
        (0.0, 0.2, "tau_min"),
        (-0.1, 0.2, "tau_min"),
        (f64::NAN, 0.2, "tau_min"),
    ] {
        for g in [DystressGrad::Detach, DystressGrad::Full] {
            expect_err(
                LossSpec::symmetric().dystress(lo, hi, g).build(),
                &[name],
                &format!("dystress({lo}, {hi})"),
            );
        }
    }
    assert!(LossSpec::queue()
        .dystress(0.1, 0.1, DystressGrad::Full)
        .build()
        .is_ok());
    for b in [
        LossSpec::inbatch(),
        LossSpec::cross(),
        LossSpec::symmetric(),
    ] {
        expect_err(
            b.grad_queue(true).build(),
            &["grad_queue"],
            "grad_queue outside queue mode",
        );
    }
}

#[test]
fn bad_upstreams_are_rejected() {
    let mut r = common::rng(30);
    for case in [
        Case::queue(&mut r, 3, 4, 2),
        Case::inbatch(&mut r, 2, 3),
        Case::cross(&mut r, 3, 4, 2, true),
        Case::symmetric(&mut r, 3, 2),
    ] {
        let count = case.losses();
        let spec = |reduction| {
            Params {
                mode: case.mode,
                temp: Temperature::Fixed(0.1),
                variant: Variant::Standard,
                reduction,
                normalize: true,
                grad_queue: false,
            }
            .spec()
        };
        let who = |w: &str| format!("{}: {w}", case.label);
        let none = spec(Reduction::None);
        assert!(case
            .evaluate(&none, &Upstream::PerAnchor(vec![0.5; count]))
            .is_ok());
        for len in [count - 1, count + 1, 0] {
            expect_err(
                case.evaluate(&none, &Upstream::PerAnchor(vec![1.0; len])),
                &["upstream", &format!("[{len}]"), &format!("[{count}]")],
                &who("length"),
            );
        }
        expect_err(
            case.evaluate(&none, &Upstream::Scalar(2.0)),
            &["upstream", "none"],
            &who("scalar with none"),
        );
        for red in [Reduction::Mean, Reduction::Sum] {
            expect_err(
                case.evaluate(&spec(red), &Upstream::PerAnchor(vec![1.0; count])),
                &["upstream", "reduction none"],
                &who("per-anchor with mean/sum"),
            );
            for g in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                expect_err(
                    case.evaluate(&spec(red), &Upstream::Scalar(g)),
                    &["upstream", "finite"],
                    &who("non-finite scalar"),
                );
            }
        }
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut w = vec![1.0; count];
            w[count - 1] = bad;
            expect_err(
                case.evaluate(&none, &Upstream::PerAnchor(w)),
                &["upstream", "finite"],
                &who("non-finite weight"),
            );
        }
        expect_err(
            reference::evaluate_chunked(&spec(Reduction::Mean), &case.inputs(), &Upstream::One, 0),
            &["chunk"],
            &who("chunk 0"),
        );
    }
}

/// Where a NaN goes in each mode: an element of a row that is a negative of every anchor that has
/// negatives (the queue's row 0; otherwise the key's or the embeddings' row 0).
fn poison(case: &mut Case, nan: f64) {
    let m = case.mats.len() - 1;
    case.mats[m].data[0] = nan;
}

#[test]
fn nan_input_propagates_into_the_loss_without_panic() {
    let mut r = common::rng(31);
    let cases = [
        Case::queue(&mut r, 3, 5, 3),
        Case::inbatch(&mut r, 3, 2),
        Case::cross(&mut r, 3, 4, 3, false),
        Case::cross(&mut r, 3, 4, 3, true),
        Case::symmetric(&mut r, 3, 3),
    ];
    // Both signs: a NaN made by arithmetic (0/0, inf − inf) has its sign bit set on x86.
    for nan in [f64::NAN, -f64::NAN] {
        for case in &cases {
            let mut bad = case.clone();
            poison(&mut bad, nan);
            for normalize in [false, true] {
                for variant in [
                    Variant::Standard,
                    Variant::Decoupled,
                    Variant::Hard { k: 1 },
                    Variant::Hard { k: 2 },
                    Variant::Simple {
                        lambda: None,
                        hard_k: None,
                    },
                    Variant::Simple {
                        lambda: Some(0.5),
                        hard_k: Some(1),
                    },
                ] {
                    for temp in [
                        Temperature::Fixed(0.1),
                        Temperature::Learnable(0.2),
                        Temperature::Dystress {
                            tau_min: 0.1,
                            tau_max: 0.2,
                            grad: DystressGrad::Full,
                        },
                    ] {
                        let p = Params {
                            mode: case.mode,
                            temp,
                            variant,
                            reduction: Reduction::Mean,
                            normalize,
                            grad_queue: case.mode == Mode::Queue,
                        };
                        let who =
                            format!("{} NaN sign {} {p:?}", case.label, nan.is_sign_negative());
                        let out = bad
                            .evaluate(&p.spec(), &Upstream::One)
                            .unwrap_or_else(|e| panic!("{who}: {e}"));
                        let loss = out.loss.scalar().expect("scalar");
                        assert!(loss.is_nan(), "{who}: loss {loss}");
                        // (The simple loss does not depend on τ: its dτ is exactly 0.)
                        let simple = matches!(variant, Variant::Simple { .. });
                        if let Some(g) = out.grad_temperature.filter(|_| !simple) {
                            assert!(g.is_nan(), "{who}: dτ {g}");
                        }
                        // The NaN row's own gradient is NaN, not a finite number (except
                        // where it does not depend on the row: the simple loss is linear in s,
                        // so without normalisation ∂L/∂m_j = λ Σ_i w_i q_i is finite).
                        let m = &out.grads.last().expect("grad").value;
                        let linear = matches!(variant, Variant::Simple { .. }) && !normalize;
                        assert!(
                            linear || m.row(0).iter().any(|x| x.is_nan()),
                            "{who}: grad {:?}",
                            m.row(0)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn infinite_input_does_not_panic() {
    let mut r = common::rng(32);
    let mut case = Case::queue(&mut r, 4, 3, 2);
    // Queries with a first component of each sign, so the poisoned queue row [inf, x] has
    // similarity +inf with some anchors and −inf with others.
    case.mats[0].data[0] = 0.7;
    case.mats[0].data[2] = -0.4;
    case.mats[0].data[4] = 0.1;
    case.mats[0].data[6] = -0.9;
    let clean_rest = {
        let mut c = case.clone();
        c.mats[2].data.drain(0..2);
        c.mats[2].rows -= 1;
        c
    };
    poison(&mut case, f64::INFINITY);
    let signs: Vec<f64> = (0..4).map(|i| case.mats[0].data[2 * i]).collect();
    let per_anchor = |out: &fused_infonce::LossOutput| match &out.loss {
        fused_infonce::LossValue::PerAnchor(v) => v.clone(),
        other => panic!("per-anchor losses expected, got {other:?}"),
    };
    for variant in [
        Variant::Standard,
        Variant::Hard { k: 1 },
        Variant::Simple {
            lambda: None,
            hard_k: None,
        },
    ] {
        // Normalised, the row [inf, x] is not a direction: every loss reading it is NaN.
        let spec = |normalize: bool| {
            LossSpec::queue()
                .temperature(0.1)
                .normalize(normalize)
                .variant(variant)
                .reduction(Reduction::None)
                .grad_queue(true)
                .build()
                .expect("spec")
        };
        let out = case
            .evaluate(&spec(true), &Upstream::PerAnchor(vec![1.0; 4]))
            .expect("evaluate");
        assert!(
            per_anchor(&out).iter().all(|l| l.is_nan()),
            "{variant:?} normalised: {:?}",
            per_anchor(&out)
        );
        // Raw: the row's similarity is sign(q_i0)·inf. A +inf negative makes the standard and
        // hard:1 losses +inf; a −inf one weighs exp(−inf) = 0, so the loss is the loss without
        // that row. The simple loss adds λ·s: ±inf.
        let out = case
            .evaluate(&spec(false), &Upstream::PerAnchor(vec![1.0; 4]))
            .expect("evaluate");
        let got = per_anchor(&out);
        let rest = per_anchor(
            &clean_rest
                .evaluate(&spec(false), &Upstream::PerAnchor(vec![1.0; 4]))
                .expect("evaluate"),
        );
        for (i, (&l, &sign)) in got.iter().zip(&signs).enumerate() {
            let want = match (variant, sign > 0.0) {
                (Variant::Simple { .. }, true) => f64::INFINITY,
                (Variant::Simple { .. }, false) => f64::NEG_INFINITY,
                (_, true) => f64::INFINITY,
                (_, false) => rest[i],
            };
            let ok = if want.is_finite() {
                (l - want).abs() <= 1e-12 * want.abs().max(1.0)
            } else {
                l == want
            };
            assert!(
                ok,
                "{variant:?} raw, anchor {i} (q_i0 = {sign}): loss {l}, want {want}"
            );
        }
    }
}

#[test]
fn errors_are_the_documented_kinds() {
    let q = LossSpec::queue().build().expect("spec");
    assert!(matches!(
        queue(&q, (2, 3), (2, 4), (4, 3)),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        LossSpec::queue().temperature(0.0).build(),
        Err(Error::Parameter { .. })
    ));
}

#[test]
fn inputs_from_matrices_round_trip_and_count_check() {
    let (a, b) = (data(6), data(9));
    let q = MatRef::new("query", &a, 2, 3).unwrap();
    let k = MatRef::new("key", &b, 3, 3).unwrap();
    let t = [2i64, 0];
    let cross = LossInputs::from_matrices(Mode::Cross, &[q, k], Some(&t)).unwrap();
    assert_eq!(cross.mode(), Mode::Cross);
    assert_eq!(cross.matrices().len(), 2);
    assert!(matches!(cross, LossInputs::Cross { targets: Some(x), .. } if x == t));
    expect_err(
        LossInputs::from_matrices(Mode::Queue, &[q, k], None),
        &["2 matrices", "3 for queue"],
        "two matrices for queue mode",
    );
    expect_err(
        LossInputs::from_matrices(Mode::Symmetric, &[q, k], Some(&t)),
        &["targets", "cross"],
        "targets outside cross mode",
    );
}
