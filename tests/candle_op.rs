//! The candle op (`fused_infonce::candle`, feature `candle`) on candle's CPU device against the
//! f64 reference (`reference::evaluate`): the loss and candle's backward (every input's gradient
//! and a learnable temperature's) for every mode — queue (a partially filled and a wrapped
//! [`Queue`], and a queue with its own gradient), inbatch, cross with and without targets,
//! symmetric — fixed, learnable (a candle `Var`, and `exp` of a log-temperature `Var`) and
//! DySTreSS temperatures, reductions mean, sum and none (with an upstream that is not 1), f32, f64,
//! f16 and bf16; the errors; and a few optimiser steps in which the loss falls.
//!
//! Tolerance: relative L2 1e-5 for f32 (against `max(‖want‖, 1e-3)` where the reference is 0 or
//! tiny), 1e-2 for f16 and bf16, whose inputs the reference reads as stored (what remains is
//! the rounding of the gradients to the input dtype).
#![cfg(feature = "candle")]

mod support;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, Optimizer, VarBuilder, VarMap};
use fused_infonce::candle::{InfoNce, Queue};
use fused_infonce::{
    reference, DystressGrad, LossInputs, LossSpec, MatRef, Mode, Reduction, Temperature, Upstream,
};
use support::{rel_l2_floor, unit_rows};

const FLOOR: f64 = 1e-3;

/// Which temperature a case uses.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tau {
    /// The spec's fixed τ.
    Fixed,
    /// A `Var` holding τ.
    Var,
    /// `exp(log_tau)` of a `Var` holding log τ (the gradient reaches log τ through candle).
    Log,
    /// DySTreSS from the spec.
    Dystress,
}

/// One case: the mode's inputs (host f64, already rounded to the dtype), built from seeded rows.
struct Case {
    mode: Mode,
    /// (name, rows) of each input, D columns.
    shapes: Vec<(&'static str, usize)>,
    d: usize,
    targets: Option<Vec<i64>>,
}

impl Case {
    fn new(mode: Mode, n: usize, k: usize, d: usize, targets: bool) -> Self {
        let shapes = match mode {
            Mode::Queue => vec![("query", n), ("positive", n), ("queue", k)],
            Mode::InBatch => vec![("embeddings", 2 * n)],
            Mode::Cross => vec![("query", n), ("key", k)],
            Mode::Symmetric => vec![("query", n), ("key", n)],
        };
        let targets = targets.then(|| (0..n).map(|i| ((i * 7 + 3) % k) as i64).collect());
        Self {
            mode,
            shapes,
            d,
            targets,
        }
    }
}

fn spec(mode: Mode, tau: Tau, reduction: Reduction, normalize: bool, grad_queue: bool) -> LossSpec {
    let b = LossSpec::builder(mode)
        .reduction(reduction)
        .normalize(normalize)
        .grad_queue(grad_queue);
    match tau {
        Tau::Fixed => b.temperature(0.2),
        Tau::Var | Tau::Log => b.learnable_temperature(0.2),
        Tau::Dystress => b.dystress(0.1, 0.3, DystressGrad::Full),
    }
    .build()
    .unwrap()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_l2_floor(got, want, FLOOR);
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} > {tol:.0e}");
}

/// Runs one case through the candle op and candle's backward, and through the reference, and
/// compares the loss, every gradient and dL/dτ (or dL/d log τ).
fn check(c: &Case, spec: &LossSpec, tau: Tau, dtype: DType, seed: u64, tol: f64) {
    let dev = Device::Cpu;
    let what = format!(
        "{:?} {:?} {:?} normalize={} grad_queue={} {:?} targets={}",
        c.mode,
        tau,
        spec.reduction(),
        spec.normalize(),
        spec.grad_queue(),
        dtype,
        c.targets.is_some()
    );
    // Rows of norm ~1.3 (so normalisation matters), in the dtype; the reference reads them back.
    let vars: Vec<Var> = c
        .shapes
        .iter()
        .enumerate()
        .map(|(i, &(_, rows))| {
            let v: Vec<f32> = unit_rows::<f32>(seed + i as u64, rows, c.d)
                .iter()
                .map(|x| x * 1.3)
                .collect();
            let t = Tensor::from_vec(v, (rows, c.d), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect();
    let tau_var = match tau {
        Tau::Var => Some(Var::new(0.15f32, &dev).unwrap()),
        Tau::Log => Some(Var::new(0.15f32.ln(), &dev).unwrap()),
        _ => None,
    };
    let tau_value = match tau {
        Tau::Var | Tau::Log => 0.15f32 as f64,
        _ => 0.0,
    };
    let mut op = InfoNce::new(spec.clone());
    if let Some(v) = &tau_var {
        op = match tau {
            Tau::Log => op.with_log_temperature(v.as_tensor()).unwrap(),
            _ => op.with_temperature(v.as_tensor()).unwrap(),
        };
    }
    let targets = c
        .targets
        .as_ref()
        .map(|t| Tensor::new(t.as_slice(), &dev).unwrap());
    let loss = match c.mode {
        Mode::Queue => op.queue(&vars[0], &vars[1], &vars[2]),
        Mode::InBatch => op.inbatch(&vars[0]),
        Mode::Cross => op.cross(&vars[0], &vars[1], targets.as_ref()),
        Mode::Symmetric => op.symmetric(&vars[0], &vars[1]),
    }
    .unwrap();
    assert_eq!(loss.dtype(), DType::F32, "{what}: loss dtype");
    // An upstream that is not 1: 1.7 for mean and sum, per-anchor weights for none.
    let (total, upstream) = match spec.reduction() {
        Reduction::None => {
            let n = loss.dims1().unwrap();
            let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 5) as f32 * 0.3).collect();
            let wt = Tensor::from_vec(w.clone(), n, &dev).unwrap();
            (
                (&loss * &wt).unwrap().sum_all().unwrap(),
                Upstream::PerAnchor(w.iter().map(|&x| x as f64).collect()),
            )
        }
        _ => {
            assert_eq!(loss.rank(), 0, "{what}: a reduced loss is 0-d");
            ((&loss * 1.7).unwrap(), Upstream::Scalar(1.7))
        }
    };
    let grads = total.backward().unwrap();

    // The reference on the same stored values, τ as the op read it.
    let data: Vec<Vec<f64>> = vars.iter().map(|v| host(v.as_tensor())).collect();
    let mats: Vec<MatRef<'_, f64>> = c
        .shapes
        .iter()
        .zip(&data)
        .map(|(&(name, rows), d)| MatRef::new(name, d, rows, c.d).unwrap())
        .collect();
    let ref_spec = match tau {
        Tau::Var | Tau::Log => LossSpec::builder(c.mode)
            .temperature_scheme(Temperature::Learnable(tau_value))
            .reduction(spec.reduction())
            .normalize(spec.normalize())
            .grad_queue(spec.grad_queue())
            .build()
            .unwrap(),
        _ => spec.clone(),
    };
    let inputs = LossInputs::from_matrices(c.mode, &mats, c.targets.as_deref()).unwrap();
    let want = reference::evaluate(&ref_spec, &inputs, &upstream).unwrap();

    close(
        &format!("{what}: loss"),
        &host(&loss),
        &want.loss.values(),
        tol,
    );
    for (v, &(name, _)) in vars.iter().zip(&c.shapes) {
        let got = grads.get(v.as_tensor());
        match want.grad(name) {
            Some(w) => {
                let g = got.unwrap_or_else(|| panic!("{what}: no gradient for `{name}`"));
                assert_eq!(g.dtype(), dtype, "{what}: grad {name} dtype");
                assert_eq!(g.dims(), v.dims(), "{what}: grad {name} shape");
                close(&format!("{what}: grad {name}"), &host(g), &w.data, tol);
            }
            None => assert!(got.is_none(), "{what}: `{name}` got a gradient"),
        }
    }
    if let Some(v) = &tau_var {
        let g = host(grads.get(v.as_tensor()).expect("a temperature gradient"))[0];
        let dtau = want.grad_temperature.expect("reference dL/dτ");
        // d/d log τ = τ · d/dτ.
        let want_g = if tau == Tau::Log {
            tau_value * dtau
        } else {
            dtau
        };
        let e = (g - want_g).abs() / want_g.abs().max(FLOOR);
        assert!(e <= tol, "{what}: dτ {g} vs {want_g} ({e:.2e})");
    }
}

const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

#[test]
fn every_mode_matches_the_reference_f32() {
    let cases = [
        Case::new(Mode::Queue, 6, 11, 9, false),
        Case::new(Mode::Queue, 5, 0, 8, false),
        Case::new(Mode::InBatch, 5, 0, 7, false),
        Case::new(Mode::Cross, 6, 9, 8, false),
        Case::new(Mode::Cross, 6, 4, 8, true),
        Case::new(Mode::Symmetric, 7, 0, 6, false),
    ];
    let mut seed = 10;
    for c in &cases {
        for tau in [Tau::Fixed, Tau::Var, Tau::Log] {
            for r in REDUCTIONS {
                for normalize in [false, true] {
                    seed += 10;
                    check(
                        c,
                        &spec(c.mode, tau, r, normalize, false),
                        tau,
                        DType::F32,
                        seed,
                        1e-5,
                    );
                }
            }
        }
    }
}

#[test]
fn queue_gradient_when_asked() {
    let c = Case::new(Mode::Queue, 6, 13, 8, false);
    for r in REDUCTIONS {
        for tau in [Tau::Fixed, Tau::Var] {
            check(
                &c,
                &spec(Mode::Queue, tau, r, true, true),
                tau,
                DType::F32,
                3,
                1e-5,
            );
        }
    }
}

#[test]
fn dystress_temperature() {
    for c in [
        Case::new(Mode::InBatch, 5, 0, 8, false),
        Case::new(Mode::Symmetric, 5, 0, 8, false),
    ] {
        for r in REDUCTIONS {
            let s = spec(c.mode, Tau::Dystress, r, true, false);
            check(&c, &s, Tau::Dystress, DType::F32, 7, 1e-5);
        }
    }
}

#[test]
fn other_dtypes() {
    let cases = [
        Case::new(Mode::Queue, 6, 10, 16, false),
        Case::new(Mode::InBatch, 5, 0, 16, false),
        Case::new(Mode::Cross, 6, 9, 16, true),
        Case::new(Mode::Symmetric, 6, 0, 16, false),
    ];
    for c in &cases {
        for (dtype, tol) in [(DType::F64, 1e-5), (DType::F16, 1e-2), (DType::BF16, 1e-2)] {
            for r in [Reduction::Mean, Reduction::None] {
                check(
                    c,
                    &spec(c.mode, Tau::Var, r, true, false),
                    Tau::Var,
                    dtype,
                    5,
                    tol,
                );
            }
        }
    }
}

/// The loss against a [`Queue`] partially filled and one that has wrapped: the op reads the held
/// keys in storage order, as the reference does with the same rows.
#[test]
fn queue_type_partial_and_wrapped() {
    let dev = Device::Cpu;
    let d = 8;
    let batch = |seed: u64, rows: usize| {
        Tensor::from_vec(unit_rows::<f32>(seed, rows, d), (rows, d), &dev).unwrap()
    };
    let mut partial = Queue::new(16, d, DType::F32, &dev).unwrap();
    partial.enqueue(&batch(1, 5)).unwrap();
    partial.enqueue(&batch(2, 4)).unwrap();
    assert_eq!((partial.len(), partial.start()), (9, 0));
    let mut wrapped = Queue::new(7, d, DType::F32, &dev).unwrap();
    for s in 0..4 {
        wrapped.enqueue(&batch(10 + s, 3)).unwrap();
    }
    assert_eq!((wrapped.len(), wrapped.start()), (7, 5));
    // The newest 7 rows oldest first: the last row of batch 11, then batches 12 and 13.
    let all = Tensor::cat(&[batch(11, 3), batch(12, 3), batch(13, 3)], 0).unwrap();
    assert_eq!(
        wrapped.oldest_first().unwrap().to_vec2::<f32>().unwrap(),
        all.narrow(0, 2, 7).unwrap().to_vec2::<f32>().unwrap()
    );
    // A copy is independent: the original's enqueues do not reach it.
    let mut scratch = wrapped.copy().unwrap();
    let before = wrapped.oldest_first().unwrap().to_vec2::<f32>().unwrap();
    scratch.enqueue(&batch(30, 2)).unwrap();
    assert_eq!(
        wrapped.oldest_first().unwrap().to_vec2::<f32>().unwrap(),
        before
    );
    assert_ne!(
        scratch.oldest_first().unwrap().to_vec2::<f32>().unwrap(),
        before
    );

    let s = spec(Mode::Queue, Tau::Var, Reduction::Mean, true, false);
    for q in [&partial, &wrapped] {
        let query = Var::from_tensor(&batch(20, 6)).unwrap();
        let positive = Var::from_tensor(&batch(21, 6)).unwrap();
        let tau = Var::new(0.1f32, &dev).unwrap();
        let keys = q.keys().unwrap();
        let op = InfoNce::new(s.clone()).with_temperature(&tau).unwrap();
        let loss = op.queue(&query, &positive, &keys).unwrap();
        let grads = loss.backward().unwrap();
        let (qv, pv, kv) = (host(&query), host(&positive), host(&keys));
        let inputs = LossInputs::Queue {
            query: MatRef::new("query", &qv, 6, d).unwrap(),
            positive: MatRef::new("positive", &pv, 6, d).unwrap(),
            queue: MatRef::new("queue", &kv, q.len(), d).unwrap(),
        };
        let rs = LossSpec::queue()
            .learnable_temperature(0.1f32 as f64)
            .normalize(true)
            .build()
            .unwrap();
        let want = reference::evaluate(&rs, &inputs, &Upstream::One).unwrap();
        close("loss", &host(&loss), &want.loss.values(), 1e-5);
        close(
            "grad query",
            &host(grads.get(&query).unwrap()),
            &want.grad("query").unwrap().data,
            1e-5,
        );
        let dtau = host(grads.get(&tau).unwrap())[0];
        let w = want.grad_temperature.unwrap();
        assert!(
            (dtau - w).abs() <= 1e-5 * w.abs().max(FLOOR),
            "{dtau} vs {w}"
        );
    }
}

/// Untracked inputs (evaluation) give a plain loss; the same value as with tracking.
#[test]
fn untracked_inputs_give_a_plain_loss() {
    let dev = Device::Cpu;
    let e = Tensor::from_vec(unit_rows::<f32>(4, 8, 6), (8, 6), &dev).unwrap();
    let op = InfoNce::new(LossSpec::inbatch().temperature(0.3).build().unwrap());
    let plain = op.inbatch(&e).unwrap();
    assert!(!plain.track_op());
    let v = Var::from_tensor(&e).unwrap();
    let tracked = op.inbatch(&v).unwrap();
    assert!(tracked.track_op());
    assert_eq!(
        plain.to_scalar::<f32>().unwrap(),
        tracked.to_scalar::<f32>().unwrap()
    );
}

fn err_text(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn errors_are_candle_errors_with_the_crate_message() {
    let dev = Device::Cpu;
    let t = |rows: usize, d: usize| Tensor::zeros((rows, d), DType::F32, &dev).unwrap();
    let q = LossSpec::queue().build().unwrap();
    let op = InfoNce::new(q.clone());
    // Shapes: the crate's shape check.
    let e = err_text(op.queue(&t(4, 8), &t(4, 7), &t(3, 8)));
    assert!(
        e.contains("shape error: tensor `positive` has shape [4, 7]"),
        "{e}"
    );
    let e = err_text(op.queue(&t(4, 8), &t(3, 8), &t(3, 8)));
    assert!(e.contains("one positive per query"), "{e}");
    let e = err_text(op.queue(
        &Tensor::zeros(8, DType::F32, &dev).unwrap(),
        &t(1, 8),
        &t(3, 8),
    ));
    assert!(e.contains("tensor `query` has shape [8]"), "{e}");
    let e = err_text(InfoNce::new(LossSpec::inbatch().build().unwrap()).inbatch(&t(5, 4)));
    assert!(e.contains("even number of rows"), "{e}");
    // The mode.
    let e = err_text(op.inbatch(&t(4, 8)));
    assert!(e.contains("invalid parameter `mode` = queue"), "{e}");
    // Targets out of range.
    let cross = InfoNce::new(LossSpec::cross().build().unwrap());
    let y = Tensor::new(&[0i64, 5], &dev).unwrap();
    let e = err_text(cross.cross(&t(2, 4), &t(3, 4), Some(&y)));
    assert!(e.contains("invalid parameter `targets[1]` = 5"), "{e}");
    let y = Tensor::new(&[0i64, 1, 2], &dev).unwrap();
    let e = err_text(cross.cross(&t(2, 4), &t(3, 4), Some(&y)));
    assert!(e.contains("tensor `targets` has shape [3]"), "{e}");
    let y = Tensor::new(&[0.5f32, 1.0], &dev).unwrap();
    let e = err_text(cross.cross(&t(2, 4), &t(3, 4), Some(&y)));
    assert!(e.contains("targets are integer indices"), "{e}");
    // Dtypes: mixed, and unsupported.
    let h = Tensor::zeros((4, 8), DType::F16, &dev).unwrap();
    let e = err_text(op.queue(&t(4, 8), &h, &t(3, 8)));
    assert!(
        e.contains("every input of the loss must have one dtype"),
        "{e}"
    );
    let u = |r: usize| Tensor::zeros((r, 8), DType::U32, &dev).unwrap();
    let e = err_text(op.queue(&u(4), &u(4), &u(3)));
    assert!(
        e.contains("not supported: the loss takes f32, f16, bf16 or f64"),
        "{e}"
    );
    // The temperature.
    let bad = Var::new(-1f32, &dev).unwrap();
    let e = err_text(
        InfoNce::new(q.clone())
            .with_temperature(&bad)
            .unwrap()
            .queue(&t(4, 8), &t(4, 8), &t(3, 8)),
    );
    assert!(e.contains("invalid parameter `temperature` = -1"), "{e}");
    let two = Tensor::new(&[0.1f32, 0.2], &dev).unwrap();
    let e = InfoNce::new(q)
        .with_temperature(&two)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tensor `temperature` has shape [2]"), "{e}");
    // The queue type.
    let mut queue = Queue::new(4, 8, DType::F32, &dev).unwrap();
    let e = queue.enqueue(&t(2, 7)).unwrap_err().to_string();
    assert!(e.contains("tensor `batch` has shape [2, 7]"), "{e}");
}

/// A few AdamW steps of a linear encoder and a learnable temperature on two views of the
/// clustered data: the loss falls and τ moves.
#[test]
fn training_steps_lower_the_loss() {
    let dev = Device::Cpu;
    let set = fused_infonce::data::Clustered::default()
        .generate()
        .unwrap();
    let (a, b) = fused_infonce::data::two_views(&set.x, 0.5, 3);
    let n = 128;
    let f32s = |m: &fused_infonce::Matrix| -> Tensor {
        let v: Vec<f32> = m.data[..n * m.cols].iter().map(|&x| x as f32).collect();
        Tensor::from_vec(v, (n, m.cols), &dev).unwrap()
    };
    let (xa, xb) = (f32s(&a), f32s(&b));
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let enc = candle_nn::linear(set.x.cols, 16, vb.pp("enc")).unwrap();
    let log_tau = vm
        .get(
            (),
            "log_tau",
            candle_nn::Init::Const(0.5f64.ln()),
            DType::F32,
            &dev,
        )
        .unwrap();
    let mut opt = candle_nn::AdamW::new(
        vm.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 0.02,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let spec = LossSpec::symmetric().normalize(true).build().unwrap();
    let mut losses = Vec::new();
    // One op for every step: τ = exp(log τ) must be read from the Var at each call.
    let op = InfoNce::new(spec.clone())
        .with_log_temperature(&log_tau)
        .unwrap();
    for _ in 0..20 {
        let loss = op
            .symmetric(&enc.forward(&xa).unwrap(), &enc.forward(&xb).unwrap())
            .unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.8 * first, "the loss did not fall: {losses:?}");
    let tau = log_tau.exp().unwrap().to_scalar::<f32>().unwrap();
    assert!((tau - 0.5).abs() > 1e-3, "τ did not move: {tau}");
    // The reused op evaluates with the trained τ, as an op built now with that value does.
    let (a, b) = (
        enc.forward(&xa).unwrap().detach(),
        enc.forward(&xb).unwrap().detach(),
    );
    let reused = op.symmetric(&a, &b).unwrap().to_scalar::<f32>().unwrap();
    let now = InfoNce::new(spec)
        .with_temperature(&Tensor::new(tau, &dev).unwrap())
        .unwrap()
        .symmetric(&a, &b)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (reused - now).abs() <= 1e-5 * now.abs(),
        "the op built before training used a stale τ: {reused} vs {now} (τ = {tau})"
    );
}
