//! The CPU reference's gradients against central finite differences, over a grid of every mode
//! (queue with and without `grad_queue`, inbatch, cross with default and explicit targets,
//! symmetric) × temperature (fixed, learnable, DySTreSS `full` and `detach`) × variant (standard,
//! decoupled, hard:k, simple with default and explicit λ, HardSimple) × reduction (mean, sum, none
//! with random weights; scalar upstreams ≠ 1) × normalisation, on small shapes (D = 1, odd D,
//! N = 1, K = 0).
//!
//! The finite differences are taken of the independent naive loss in `common` (whose value is
//! first checked against the reference's loss and LSE to 1e-12), so a gradient that is the exact
//! derivative of a wrong loss fails too. DySTreSS `detach` is not the derivative of the loss: it is
//! checked against the derivative of the loss with every pair's `τ(s)` frozen at its unperturbed
//! value.

mod common;

use common::{fd_matrix, naive, objective, rel, Case, Naive, Params};
use fused_infonce::{DystressGrad, LossValue, Mode, Reduction, Temperature, Upstream, Variant};

/// Central-difference step (inputs are O(1)).
const H: f64 = 1e-6;
/// Normwise relative tolerance of a gradient against its finite differences.
const FD_RTOL: f64 = 1e-6;

fn cases() -> Vec<(Case, bool)> {
    let mut r = common::rng(0x1fd);
    let mut v = Vec::new();
    for (n, k, d) in [(1, 3, 1), (3, 4, 3), (2, 0, 2), (4, 6, 5), (2, 1, 2)] {
        let c = Case::queue(&mut r, n, k, d);
        v.push((c.clone(), false));
        v.push((c, true));
    }
    for (n, d) in [(1, 2), (2, 1), (3, 3)] {
        v.push((Case::inbatch(&mut r, n, d), false));
    }
    for (n, m, d) in [(1, 1, 1), (2, 3, 3), (3, 3, 1), (3, 5, 2)] {
        v.push((Case::cross(&mut r, n, m, d, false), false));
    }
    for (n, m, d) in [(4, 3, 3), (2, 5, 2), (1, 4, 1), (5, 2, 3)] {
        v.push((Case::cross(&mut r, n, m, d, true), false));
    }
    for (n, d) in [(1, 3), (2, 1), (4, 3), (3, 2)] {
        v.push((Case::symmetric(&mut r, n, d), false));
    }
    v
}

fn temperatures(normalize: bool) -> Vec<Temperature> {
    let mut t = vec![Temperature::Fixed(0.2), Temperature::Learnable(0.45)];
    if normalize {
        // DySTreSS assumes |s| ≤ 1: normalised rows only.
        t.push(Temperature::Dystress {
            tau_min: 0.1,
            tau_max: 0.2,
            grad: DystressGrad::Full,
        });
        t.push(Temperature::Dystress {
            tau_min: 0.07,
            tau_max: 0.3,
            grad: DystressGrad::Detach,
        });
    }
    t
}

fn variants(negatives: usize) -> Vec<Variant> {
    // k < #negatives where possible (with fewer than 2 negatives hard:1 is the standard loss).
    let k = (negatives / 2).max(1);
    vec![
        Variant::Standard,
        Variant::Decoupled,
        Variant::Hard { k },
        Variant::Simple {
            lambda: None,
            hard_k: None,
        },
        Variant::Simple {
            lambda: Some(0.37),
            hard_k: None,
        },
        Variant::Simple {
            lambda: None,
            hard_k: Some(k),
        },
        Variant::Simple {
            lambda: Some(-0.6),
            hard_k: Some(k),
        },
    ]
}

fn reductions(count: usize, rng: &mut rand::rngs::StdRng) -> Vec<(Reduction, Upstream)> {
    let w: Vec<f64> = (0..count).map(|_| common::value(rng)).collect();
    vec![
        (Reduction::Mean, Upstream::One),
        (Reduction::Mean, Upstream::Scalar(-0.75)),
        (Reduction::Sum, Upstream::Scalar(1.9)),
        (Reduction::None, Upstream::PerAnchor(w)),
    ]
}

/// `Σ w_i L_i` of the naive loss (temperatures frozen at `frozen` when given).
fn naive_objective(p: &Params, up: &Upstream, case: &Case, frozen: Option<&[Vec<f64>]>) -> f64 {
    objective(p, up, &naive(p, case, frozen).losses)
}

/// Checks one grid point; pushes a message per failed check. Returns the number of checks.
fn check(p: &Params, up: &Upstream, case: &Case, fails: &mut Vec<String>) -> usize {
    let who = format!("{} | {p:?} | upstream {up:?}", case.label);
    let spec = p.spec();
    let mut fail = |m: String| fails.push(format!("{who}: {m}"));
    let out = match case.evaluate(&spec, up) {
        Ok(o) => o,
        Err(e) => {
            if p.variant == Variant::Decoupled && case.negatives() == 0 {
                return 1; // decoupled needs a negative: rejected, as it must be (reference_errors).
            }
            fail(format!("evaluate failed: {e}"));
            return 1;
        }
    };
    if p.variant == Variant::Decoupled && case.negatives() == 0 {
        fail("decoupled without negatives was accepted".into());
        return 1;
    }
    let mut checks = 0;
    let base: Naive = naive(p, case, None);

    // The loss value and the LSEs against the naive forward.
    let scale = base.losses.iter().map(|l| l.abs()).fold(1.0, f64::max);
    match (&out.loss, p.reduction) {
        (LossValue::Scalar(x), Reduction::Mean | Reduction::Sum) => {
            let want = objective(p, &Upstream::One, &base.losses);
            if rel(*x, want, scale) > 1e-12 {
                fail(format!("loss {x} vs naive {want}"));
            }
        }
        (LossValue::PerAnchor(v), Reduction::None) if p.mode != Mode::Symmetric => {
            if common::rel_err(v, &base.losses, 1.0) > 1e-12 {
                fail(format!("losses {v:?} vs naive {:?}", base.losses));
            }
        }
        (LossValue::Symmetric { rows, cols }, Reduction::None) if p.mode == Mode::Symmetric => {
            let n = rows.len();
            if cols.len() != n
                || common::rel_err(rows, &base.losses[..n], 1.0) > 1e-12
                || common::rel_err(cols, &base.losses[n..], 1.0) > 1e-12
            {
                fail(format!(
                    "losses {rows:?} {cols:?} vs naive {:?}",
                    base.losses
                ));
            }
        }
        (v, r) => fail(format!("loss value {v:?} does not fit reduction {r:?}")),
    }
    checks += 1;
    let simple = matches!(p.variant, Variant::Simple { .. });
    let mut lse = out.lse.clone();
    match (&out.lse_cols, p.mode == Mode::Symmetric) {
        (Some(c), true) => lse.extend(c),
        (None, false) => {}
        (c, _) => fail(format!("lse_cols {c:?} in {:?} mode", p.mode)),
    }
    if simple {
        if !lse.is_empty() {
            fail(format!("simple variant has an lse {lse:?}"));
        }
    } else if lse.len() != base.lse.len() || common::rel_err(&lse, &base.lse, 1.0) > 1e-12 {
        fail(format!("lse {lse:?} vs naive {:?}", base.lse));
    }
    checks += 1;

    // Which gradients must be there.
    let wanted: Vec<usize> = (0..case.mats.len())
        .filter(|&m| !(p.mode == Mode::Queue && m == 2 && !p.grad_queue))
        .collect();
    let names: Vec<&str> = out.grads.iter().map(|g| g.name).collect();
    let want_names: Vec<&str> = wanted.iter().map(|&m| case.mats[m].name).collect();
    if names != want_names {
        fail(format!("gradients {names:?}, expected {want_names:?}"));
        return checks + 1;
    }

    // The function whose derivative the gradient must be.
    let detach = matches!(
        p.temp,
        Temperature::Dystress {
            grad: DystressGrad::Detach,
            ..
        }
    );
    let frozen = detach.then_some(base.taus.as_slice());
    let f = |c: &Case| naive_objective(p, up, c, frozen);
    let f_scale = {
        // The size of the terms summed into the objective, for the round-off floor.
        let w = match up {
            Upstream::PerAnchor(w) => w.iter().map(|x| x.abs()).fold(0.0, f64::max),
            Upstream::Scalar(g) => g.abs(),
            Upstream::One => 1.0,
        };
        1.0 + w * base.losses.iter().map(|l| l.abs()).sum::<f64>()
    };
    for &m in &wanted {
        let got = &out
            .grad(case.mats[m].name)
            .expect("checked names above")
            .data;
        let fd = fd_matrix(case, m, H, f);
        let gmax = fd.iter().map(|x| x.abs()).fold(0.0, f64::max);
        let tol = FD_RTOL * gmax + 1e-8 * f_scale;
        let worst = got
            .iter()
            .zip(&fd)
            .enumerate()
            .map(|(e, (a, b))| (e, (a - b).abs()))
            .fold((0, 0.0), |x, y| if y.1 > x.1 { y } else { x });
        if got.len() != fd.len() || worst.1 > tol {
            fail(format!(
                "grad_{}: element {} off by {:e} (tol {tol:e}): got {got:?}, fd {fd:?}",
                case.mats[m].name, worst.0, worst.1
            ));
        }
        checks += 1;
    }

    // dL/dτ for a learnable temperature, by finite differences on τ.
    match (p.temp, out.grad_temperature) {
        (Temperature::Learnable(t), Some(got)) => {
            let at = |tau: f64| {
                let q = Params {
                    temp: Temperature::Learnable(tau),
                    ..*p
                };
                naive_objective(&q, up, case, None)
            };
            let fd = (at(t + H) - at(t - H)) / (2.0 * H);
            if (got - fd).abs() > FD_RTOL * fd.abs() + 1e-8 * f_scale {
                fail(format!("grad_temperature {got} vs fd {fd}"));
            }
            checks += 1;
        }
        (Temperature::Learnable(_), None) => fail("no grad_temperature".into()),
        (_, Some(g)) => fail(format!("grad_temperature {g} for a non-learnable τ")),
        (_, None) => {}
    }

    // K = 0: the standard loss is exactly 0 with zero gradients.
    if p.mode == Mode::Queue
        && case.negatives() == 0
        && matches!(p.variant, Variant::Standard | Variant::Hard { .. })
    {
        let zero_loss = out.loss.values().iter().all(|&l| l == 0.0);
        let zero_grads = out
            .grads
            .iter()
            .all(|g| g.value.data.iter().all(|&x| x == 0.0));
        if !(zero_loss && zero_grads) {
            fail(format!(
                "empty queue: loss {:?}, grads {:?}",
                out.loss, out.grads
            ));
        }
        checks += 1;
    }
    checks
}

#[test]
fn gradients_match_finite_differences_over_the_grid() {
    let mut rng = common::rng(0x5eed);
    let mut fails = Vec::new();
    let mut checks = 0;
    let mut points = 0;
    for (case, grad_queue) in cases() {
        for normalize in [false, true] {
            for temp in temperatures(normalize) {
                for variant in variants(case.negatives()) {
                    if normalize && case.mats[0].cols == 1 && variant.hard_k().is_some() {
                        // Normalised D = 1 rows are ±1: every negative ties, and whether
                        // x·(1/|x|) rounds to exactly 1 decides the selection. Ties are tested
                        // with exact duplicates in reference_values.
                        continue;
                    }
                    for (reduction, up) in reductions(case.losses(), &mut rng) {
                        let p = Params {
                            mode: case.mode,
                            temp,
                            variant,
                            reduction,
                            normalize,
                            grad_queue,
                        };
                        checks += check(&p, &up, &case, &mut fails);
                        points += 1;
                    }
                }
            }
        }
    }
    assert!(
        fails.is_empty(),
        "{} of {checks} checks failed ({points} grid points); first ones:\n{}",
        fails.len(),
        fails
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The grid really ran (a refactor that empties it must not pass silently).
    assert!(points > 3500, "only {points} grid points");
    assert!(checks > 14000, "only {checks} checks");
}

/// DySTreSS `detach` and `full` differ (so the frozen-τ check above really tells them apart), and
/// `full − detach` is exactly the τ′ term: `w ∂L/∂z · (−s τ′(s)/τ(s)²)` per pair, here checked
/// through the loss's finite differences in both forms on one problem.
#[test]
fn dystress_detach_is_full_minus_the_tau_prime_term() {
    let mut r = common::rng(77);
    let case = Case::queue(&mut r, 3, 5, 4);
    let base = Params {
        mode: Mode::Queue,
        temp: Temperature::Dystress {
            tau_min: 0.1,
            tau_max: 0.2,
            grad: DystressGrad::Full,
        },
        variant: Variant::Standard,
        reduction: Reduction::Mean,
        normalize: true,
        grad_queue: true,
    };
    let detach = Params {
        temp: Temperature::Dystress {
            tau_min: 0.1,
            tau_max: 0.2,
            grad: DystressGrad::Detach,
        },
        ..base
    };
    let full_out = case.evaluate(&base.spec(), &Upstream::One).expect("full");
    let det_out = case
        .evaluate(&detach.spec(), &Upstream::One)
        .expect("detach");
    assert_eq!(
        full_out.loss, det_out.loss,
        "the forward does not depend on the gradient mode"
    );
    let taus = naive(&base, &case, None).taus;
    for (m, t) in case.mats.iter().enumerate() {
        let full = &full_out.grad(t.name).expect("grad").data;
        let det = &det_out.grad(t.name).expect("grad").data;
        let fd_true = fd_matrix(&case, m, H, |c| {
            naive_objective(&base, &Upstream::One, c, None)
        });
        let fd_frozen = fd_matrix(&case, m, H, |c| {
            naive_objective(&base, &Upstream::One, c, Some(&taus))
        });
        // full − detach is the derivative of (true loss − frozen loss); it is not negligible.
        let diff: Vec<f64> = full.iter().zip(det).map(|(a, b)| a - b).collect();
        let fd_diff: Vec<f64> = fd_true.iter().zip(&fd_frozen).map(|(a, b)| a - b).collect();
        let dmax = fd_diff.iter().map(|x| x.abs()).fold(0.0, f64::max);
        let gmax = fd_true.iter().map(|x| x.abs()).fold(0.0, f64::max);
        assert!(
            dmax > 1e-3 * gmax,
            "{}: the τ′ term is negligible here",
            t.name
        );
        let e = common::rel_err(&diff, &fd_diff, 1e-300);
        assert!(e < 1e-5, "{}: full − detach off by {e:e}", t.name);
    }
}

/// The normalisation's clamped branch (‖x‖ ≤ ε, where `u = x/ε` is linear and the gradient is
/// `du/ε`, as PyTorch's): a query row and a queue row of norm 5e-13 < ε = 1e-12, the loss's
/// gradients with respect to them against central differences of the loss itself (steps of
/// 1e-15 stay inside the clamped region).
#[test]
fn clamped_normalisation_gradient_matches_finite_differences() {
    let mut r = common::rng(77);
    let mut case = Case::queue(&mut r, 3, 4, 5);
    for (m, row) in [(0usize, 1usize), (2, 2)] {
        let d = case.mats[m].cols;
        let x = &mut case.mats[m].data[row * d..(row + 1) * d];
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        x.iter_mut().for_each(|v| *v *= 5e-13 / norm);
    }
    let spec = fused_infonce::LossSpec::queue()
        .temperature(0.2)
        .normalize(true)
        .grad_queue(true)
        .build()
        .expect("spec");
    let out = case.evaluate(&spec, &Upstream::One).expect("evaluate");
    let loss = |c: &Case| {
        c.evaluate(&spec, &Upstream::One)
            .expect("evaluate")
            .loss
            .scalar()
            .expect("scalar")
    };
    let h = 1e-15;
    for (m, row, name) in [(0usize, 1usize, "query"), (2, 2, "queue")] {
        let d = case.mats[m].cols;
        let got = &out.grad(name).expect("gradient").data[row * d..(row + 1) * d];
        // The clamped gradient is du/ε: about 1e12 times an ordinary row's.
        assert!(
            got.iter().map(|g| g.abs()).fold(0.0, f64::max) > 1e9,
            "{name} row {row}: {got:?} is not the clamped branch's du/ε"
        );
        for (k, &g) in got.iter().enumerate() {
            let (mut plus, mut minus) = (case.clone(), case.clone());
            plus.mats[m].data[row * d + k] += h;
            minus.mats[m].data[row * d + k] -= h;
            let fd = (loss(&plus) - loss(&minus)) / (2.0 * h);
            let e = (fd - g).abs() / g.abs().max(1e6);
            assert!(e < 1e-5, "{name} row {row} col {k}: fd {fd:e} vs {g:e}");
        }
    }
}
