//! Parity of the fused CPU backend (`cpu::evaluate`) with the f64 reference (`reference::evaluate`)
//! over the grid of tests/gpu_parity.rs: every mode × temperature × variant × reduction ×
//! normalisation, for f32, f16, bf16 (and f64 inputs), on shapes that are not block multiples
//! (D ∈ {1, 7, 64, 128, 129, 768}, N = 1, K = 0, a queue of several key blocks), with the default
//! blocks and with tiny blocks that make every shape many tiles and key chunks. `hard:k` (ties
//! included), the normalisation's clamped branch, NaN inputs, errors, the unfused baseline, and
//! bitwise determinism across thread counts.
//!
//! Tolerance: relative L2 1e-5 over each output, against `max(‖want‖, floor)` with the floor of
//! `support::Scales` (the natural size of the output's terms, for outputs whose reference is 0 or
//! tiny). f16/bf16 inputs are compared with the reference on the same stored values, so what
//! remains is f32 arithmetic for every dtype. NaN never passes.

#[path = "support/problem.rs"]
mod problem;
mod support;

use fused_infonce::cpu::{self, Blocking};
use fused_infonce::{
    bf16, f16, reference, DystressGrad, Element, Error, LossInputs, LossOutput, LossSpec, MatRef,
    Mode, Reduction, Temperature, Upstream, Variant,
};
use problem::{hard_k_cases, loss_count, temperatures, upstream, Data, Dims};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{assert_outputs_close, Scales};

const TOL: f64 = 1e-5;

/// Random rows of norm about 1 (uniform entries scaled by sqrt(3/D)), rounded to T; never zero.
fn rows<T: Element>(rng: &mut StdRng, r: usize, d: usize) -> Vec<T> {
    let s = (3.0 / d as f64).sqrt();
    (0..r * d)
        .map(|_| {
            let v: f64 = rng.random_range(0.05..1.0);
            let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
            T::from_f64(sign * v * s)
        })
        .collect()
}

/// The fast backend against the reference on the same inputs; errors must agree.
fn check<T: Element>(
    what: &str,
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    up: &Upstream,
    blocking: Option<Blocking>,
) -> Option<LossOutput> {
    let want = reference::evaluate(spec, inputs, up);
    let got = match blocking {
        Some(b) => cpu::evaluate_blocked(spec, inputs, up, b),
        None => cpu::evaluate(spec, inputs, up),
    };
    match (got, want) {
        (Ok(g), Ok(w)) => {
            assert_outputs_close(what, &(&g).into(), &w, TOL, &Scales::of(spec, inputs, up));
            Some(g)
        }
        (Err(g), Err(w)) => {
            assert_eq!(
                std::mem::discriminant(&g),
                std::mem::discriminant(&w),
                "{what}: different errors: {g} / {w}"
            );
            None
        }
        (g, w) => panic!(
            "{what}: one backend failed: fast {:?} reference {:?}",
            g.err(),
            w.err()
        ),
    }
}

/// One spec on one shape in dtype T, with the default blocks and with `blocking`.
fn parity<T: Element>(spec: &LossSpec, dims: Dims, seed: u64, blocking: Option<Blocking>) {
    let mode = spec.mode();
    let data = Data::<T>::new(mode, dims, seed, seed.is_multiple_of(2), rows::<T>);
    let inputs = data.inputs(mode);
    let up = upstream(spec, loss_count(mode, dims), seed + 1);
    let what = format!("{} {dims:?} {spec:?} {blocking:?}", T::DTYPE);
    check(&what, spec, &inputs, &up, blocking);
}

fn variants() -> Vec<Variant> {
    vec![
        Variant::Standard,
        Variant::Decoupled,
        Variant::Hard { k: 5 },
        Variant::Simple {
            lambda: None,
            hard_k: None,
        },
        Variant::Simple {
            lambda: Some(0.5),
            hard_k: Some(3),
        },
    ]
}

fn spec_grid(mode: Mode) -> Vec<LossSpec> {
    let mut out = Vec::new();
    for t in temperatures() {
        for v in variants() {
            for r in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                for norm in [false, true] {
                    let mut b = LossSpec::builder(mode)
                        .temperature_scheme(t)
                        .variant(v)
                        .reduction(r)
                        .normalize(norm);
                    if mode == Mode::Queue {
                        b = b.grad_queue(norm); // both, without doubling the grid
                    }
                    out.push(b.build().expect("valid spec"));
                }
            }
        }
    }
    out
}

fn shapes(mode: Mode) -> Vec<Dims> {
    let s = |n, k, d| Dims { n, k, d };
    match mode {
        Mode::Queue => vec![
            s(1, 0, 7),
            s(3, 5, 1),
            s(17, 100, 64),
            s(5, 1300, 129), // several key blocks
            s(33, 70, 128),
            s(2, 40, 768),
            s(130, 600, 3), // several anchor blocks
        ],
        Mode::InBatch => vec![
            s(1, 0, 7),
            s(3, 0, 1),
            s(17, 0, 64),
            s(20, 0, 129),
            s(5, 0, 768),
            s(150, 0, 5),
        ],
        Mode::Cross => vec![
            s(1, 1, 7),
            s(5, 9, 64),
            s(17, 17, 129),
            s(3, 40, 768),
            s(4, 4, 1),
            s(140, 300, 9),
        ],
        Mode::Symmetric => vec![
            s(1, 0, 7),
            s(5, 0, 1),
            s(17, 0, 64),
            s(33, 0, 129),
            s(6, 0, 768),
            s(300, 0, 6),
        ],
    }
}

/// Tiny blocks: every shape becomes many tiles, key chunks and partial merges.
const TINY: Blocking = Blocking {
    anchors: 3,
    keys: 5,
};

/// Every spec of the grid on one small shape (default and tiny blocks), then a few specs on every
/// shape, for dtype T.
fn grid<T: Element>(mode: Mode, seed: u64) {
    let small = shapes(mode)[2];
    for (i, spec) in spec_grid(mode).iter().enumerate() {
        parity::<T>(spec, small, seed + i as u64, None);
        parity::<T>(spec, small, seed + i as u64, Some(TINY));
    }
    let few = [
        LossSpec::builder(mode).temperature(0.1).build(),
        LossSpec::builder(mode)
            .learnable_temperature(0.07)
            .normalize(true)
            .reduction(Reduction::None)
            .build(),
        LossSpec::builder(mode)
            .dystress(0.1, 0.2, DystressGrad::Full)
            .variant(Variant::Decoupled)
            .normalize(true)
            .build(),
        LossSpec::builder(mode)
            .variant(Variant::Simple {
                lambda: None,
                hard_k: None,
            })
            .reduction(Reduction::Sum)
            .build(),
        LossSpec::builder(mode)
            .learnable_temperature(0.1)
            .variant(Variant::Hard { k: 7 })
            .grad_queue(mode == Mode::Queue)
            .build(),
    ];
    for (i, dims) in shapes(mode).into_iter().enumerate() {
        for (j, spec) in few.iter().enumerate() {
            let spec = spec.as_ref().expect("valid spec");
            let seed = seed + 1000 + 10 * i as u64 + j as u64;
            parity::<T>(spec, dims, seed, None);
            parity::<T>(
                spec,
                dims,
                seed,
                Some(Blocking {
                    anchors: 16,
                    keys: 32,
                }),
            );
        }
    }
}

macro_rules! parity_tests {
    ($($name:ident: $mode:expr, $t:ty;)*) => {$(
        #[test]
        fn $name() {
            grid::<$t>($mode, 100);
        }
    )*};
}

parity_tests! {
    parity_queue_f32: Mode::Queue, f32;
    parity_queue_f16: Mode::Queue, f16;
    parity_queue_bf16: Mode::Queue, bf16;
    parity_inbatch_f32: Mode::InBatch, f32;
    parity_inbatch_f16: Mode::InBatch, f16;
    parity_inbatch_bf16: Mode::InBatch, bf16;
    parity_cross_f32: Mode::Cross, f32;
    parity_cross_f16: Mode::Cross, f16;
    parity_cross_bf16: Mode::Cross, bf16;
    parity_symmetric_f32: Mode::Symmetric, f32;
    parity_symmetric_f16: Mode::Symmetric, f16;
    parity_symmetric_bf16: Mode::Symmetric, bf16;
}

/// f64 inputs are accepted, as by the reference, and computed in f32.
#[test]
fn parity_f64_inputs() {
    for mode in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric] {
        for spec in [
            LossSpec::builder(mode).temperature(0.1).build(),
            LossSpec::builder(mode)
                .learnable_temperature(0.2)
                .normalize(true)
                .grad_queue(mode == Mode::Queue)
                .build(),
        ] {
            let spec = spec.expect("valid spec");
            parity::<f64>(&spec, shapes(mode)[2], 7, None);
            parity::<f64>(&spec, shapes(mode)[2], 7, Some(TINY));
        }
    }
}

/// hard:k and HardSimple in every mode (symmetric rows and columns select separately), for
/// k = 1, a middle k and k ≥ #negatives (the standard loss).
#[test]
fn parity_hard_k() {
    for (spec, dims, seed) in hard_k_cases(true) {
        for blocking in [None, Some(TINY)] {
            parity::<f32>(&spec, dims, seed, blocking);
            parity::<bf16>(&spec, dims, seed, blocking);
        }
    }
}

/// Ties at the threshold are all kept: a queue whose rows repeat gives exactly tied similarities
/// (each appears four times per anchor), on both backends, and the tied rows sit in different
/// tiles with tiny blocks.
#[test]
fn parity_hard_k_ties() {
    let (n, k, d) = (5, 24, 7);
    let mut rng = StdRng::seed_from_u64(77);
    let q: Vec<f32> = rows(&mut rng, n, d);
    let p: Vec<f32> = rows(&mut rng, n, d);
    let distinct: Vec<f32> = rows(&mut rng, 6, d);
    let m: Vec<f32> = (0..k)
        .flat_map(|j| distinct[(j % 6) * d..(j % 6 + 1) * d].to_vec())
        .collect();
    let inputs = LossInputs::Queue {
        query: MatRef::new("query", &q, n, d).unwrap(),
        positive: MatRef::new("positive", &p, n, d).unwrap(),
        queue: MatRef::new("queue", &m, k, d).unwrap(),
    };
    for hk in [1, 3, 4, 5, 9] {
        let spec = LossSpec::queue()
            .temperature(0.2)
            .variant(Variant::Hard { k: hk })
            .grad_queue(true)
            .build()
            .unwrap();
        for blocking in [None, Some(TINY)] {
            check(
                &format!("ties hard:{hk} {blocking:?}"),
                &spec,
                &inputs,
                &Upstream::One,
                blocking,
            );
        }
    }
}

/// Rows with ‖x‖ ≤ ε = 1e-12 (a zero row and a tiny one) take the normalisation's clamped branch
/// (`u = x/ε`, `dx = du/ε`) exactly as the reference.
#[test]
fn normalisation_clamped_branch() {
    let (n, d) = (6, 5);
    let mut rng = StdRng::seed_from_u64(5);
    let mut a: Vec<f32> = rows(&mut rng, n, d);
    let b: Vec<f32> = rows(&mut rng, n, d);
    a[..d].fill(0.0);
    for (j, v) in a[2 * d..3 * d].iter_mut().enumerate() {
        *v = (j as f32 - 2.0) * 1e-14;
    }
    let inputs = LossInputs::Symmetric {
        query: MatRef::new("query", &a, n, d).unwrap(),
        key: MatRef::new("key", &b, n, d).unwrap(),
    };
    for t in temperatures() {
        let spec = LossSpec::symmetric()
            .temperature_scheme(t)
            .normalize(true)
            .build()
            .unwrap();
        let got = check("clamped", &spec, &inputs, &Upstream::One, None).expect("both succeed");
        // The zero row's gradient is du/ε: finite and not zero.
        let g = got.grad("query").unwrap();
        assert!(g.row(0).iter().all(|x| x.is_finite()));
        assert!(g.row(0).iter().any(|&x| x != 0.0));
    }
}

/// NaN inputs propagate into the loss and the gradients as in the reference, and nothing panics.
#[test]
fn nan_inputs_propagate() {
    let (n, k, d) = (4, 9, 3);
    let mut rng = StdRng::seed_from_u64(3);
    let q: Vec<f32> = rows(&mut rng, n, d);
    let p: Vec<f32> = rows(&mut rng, n, d);
    let mut m: Vec<f32> = rows(&mut rng, k, d);
    m[4] = f32::NAN;
    let inputs = LossInputs::Queue {
        query: MatRef::new("query", &q, n, d).unwrap(),
        positive: MatRef::new("positive", &p, n, d).unwrap(),
        queue: MatRef::new("queue", &m, k, d).unwrap(),
    };
    for variant in [Variant::Standard, Variant::Hard { k: 2 }] {
        let spec = LossSpec::queue()
            .temperature(0.1)
            .variant(variant)
            .build()
            .unwrap();
        let fast = cpu::evaluate(&spec, &inputs, &Upstream::One).unwrap();
        let reference = reference::evaluate(&spec, &inputs, &Upstream::One).unwrap();
        assert!(reference.loss.scalar().unwrap().is_nan());
        assert!(fast.loss.scalar().unwrap().is_nan(), "{variant:?}");
        assert!(fast.lse.iter().all(|x| x.is_nan()));
        assert!(fast.grad("query").unwrap().data.iter().all(|x| x.is_nan()));
    }
}

/// Shape and parameter errors are the reference's (the same validation).
#[test]
fn errors_match_the_reference() {
    let q = vec![0.5f32; 6];
    let p = vec![0.5f32; 4];
    let inputs = LossInputs::Queue {
        query: MatRef::new("query", &q, 3, 2).unwrap(),
        positive: MatRef::new("positive", &p, 2, 2).unwrap(),
        queue: MatRef::new("queue", &p, 2, 2).unwrap(),
    };
    let spec = LossSpec::queue().build().unwrap();
    let e = cpu::evaluate(&spec, &inputs, &Upstream::One).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // Decoupled with an empty queue, a scalar upstream with reduction none, bad targets.
    let empty: Vec<f32> = Vec::new();
    let ok = LossInputs::Queue {
        query: MatRef::new("query", &p, 2, 2).unwrap(),
        positive: MatRef::new("positive", &p, 2, 2).unwrap(),
        queue: MatRef::new("queue", &empty, 0, 2).unwrap(),
    };
    let dcl = LossSpec::queue()
        .variant(Variant::Decoupled)
        .build()
        .unwrap();
    let none = LossSpec::queue()
        .reduction(Reduction::None)
        .build()
        .unwrap();
    for (spec, up) in [
        (&dcl, Upstream::One),
        (&none, Upstream::Scalar(1.0)),
        (&spec, Upstream::PerAnchor(vec![1.0, 1.0])),
        (&spec, Upstream::Scalar(f64::NAN)),
    ] {
        let g = cpu::evaluate(spec, &ok, &up).unwrap_err();
        let w = reference::evaluate(spec, &ok, &up).unwrap_err();
        assert_eq!(g.to_string(), w.to_string());
    }
    let t = [0i64, 5];
    let cross = LossInputs::Cross {
        query: MatRef::new("query", &p, 2, 2).unwrap(),
        key: MatRef::new("key", &q, 3, 2).unwrap(),
        targets: Some(&t),
    };
    let spec = LossSpec::cross().build().unwrap();
    let g = cpu::evaluate(&spec, &cross, &Upstream::One).unwrap_err();
    let w = reference::evaluate(&spec, &cross, &Upstream::One).unwrap_err();
    assert_eq!(g.to_string(), w.to_string());
    let bad = Blocking {
        anchors: 0,
        keys: 4,
    };
    assert!(matches!(
        cpu::evaluate_blocked(&spec, &cross, &Upstream::One, bad),
        Err(Error::Parameter { .. })
    ));
}

/// Every output as raw bits.
fn bits(o: &LossOutput) -> Vec<u64> {
    let mut v: Vec<u64> = o.loss.values().iter().map(|x| x.to_bits()).collect();
    v.extend(o.lse.iter().map(|x| x.to_bits()));
    v.extend(o.lse_cols.iter().flatten().map(|x| x.to_bits()));
    v.extend(o.grad_temperature.iter().map(|x| x.to_bits()));
    for g in &o.grads {
        v.extend(g.value.data.iter().map(|x| x.to_bits()));
    }
    v
}

/// Bitwise the same result with 1, 2 and 3 threads, on shapes with several anchor blocks, key
/// chunks (queue: few anchor blocks, many key blocks) and rounds (symmetric).
#[test]
fn bitwise_identical_for_any_thread_count() {
    let cases = [
        (
            Mode::Queue,
            Dims {
                n: 300,
                k: 5000,
                d: 64,
            },
        ),
        (
            Mode::InBatch,
            Dims {
                n: 300,
                k: 0,
                d: 33,
            },
        ),
        (
            Mode::Cross,
            Dims {
                n: 70,
                k: 900,
                d: 20,
            },
        ),
        (
            Mode::Symmetric,
            Dims {
                n: 400,
                k: 0,
                d: 48,
            },
        ),
    ];
    for (mode, dims) in cases {
        for variant in [Variant::Standard, Variant::Hard { k: 50 }] {
            let spec = LossSpec::builder(mode)
                .learnable_temperature(0.1)
                .variant(variant)
                .normalize(true)
                .grad_queue(mode == Mode::Queue)
                .build()
                .unwrap();
            let data = Data::<f32>::new(mode, dims, 77, true, rows::<f32>);
            let inputs = data.inputs(mode);
            for blocking in [
                None,
                Some(Blocking {
                    anchors: 32,
                    keys: 48,
                }),
            ] {
                let run = |t: usize| -> Vec<u64> {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(t)
                        .build()
                        .expect("a thread pool");
                    let out = pool
                        .install(|| match blocking {
                            Some(b) => cpu::evaluate_blocked(&spec, &inputs, &Upstream::One, b),
                            None => cpu::evaluate(&spec, &inputs, &Upstream::One),
                        })
                        .expect("evaluates");
                    bits(&out)
                };
                let one = run(1);
                let what = format!("{mode:?} {variant:?} {blocking:?}");
                assert_eq!(one, run(2), "{what}: 1 vs 2 threads");
                assert_eq!(one, run(3), "{what}: 1 vs 3 threads");
            }
        }
    }
}

/// The unfused baseline against the reference: every mode, fixed and learnable τ, every
/// reduction, f32 and bf16 inputs (converted once); and what it does not support is refused.
#[test]
fn unfused_baseline_matches_the_reference() {
    for mode in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric] {
        for (ti, t) in [Temperature::Fixed(0.1), Temperature::Learnable(0.07)]
            .into_iter()
            .enumerate()
        {
            for r in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let spec = LossSpec::builder(mode)
                    .temperature_scheme(t)
                    .reduction(r)
                    .grad_queue(mode == Mode::Queue && ti == 1)
                    .build()
                    .unwrap();
                for (si, dims) in shapes(mode).into_iter().enumerate() {
                    let seed = 3000 + si as u64;
                    let data =
                        Data::<f32>::new(mode, dims, seed, seed.is_multiple_of(2), rows::<f32>);
                    let inputs = data.inputs(mode);
                    let up = upstream(&spec, loss_count(mode, dims), seed + 1);
                    let want = reference::evaluate(&spec, &inputs, &up).unwrap();
                    let got = cpu::unfused::evaluate(&spec, &inputs, &up).unwrap();
                    let what = format!("unfused f32 {dims:?} {spec:?}");
                    let sc = Scales::of(&spec, &inputs, &up);
                    assert_outputs_close(&what, &(&got).into(), &want, TOL, &sc);
                    let data =
                        Data::<bf16>::new(mode, dims, seed, seed.is_multiple_of(2), rows::<bf16>);
                    let inputs = data.inputs(mode);
                    let want = reference::evaluate(&spec, &inputs, &up).unwrap();
                    let got = cpu::unfused::evaluate(&spec, &inputs, &up).unwrap();
                    let what = format!("unfused bf16 {dims:?} {spec:?}");
                    let sc = Scales::of(&spec, &inputs, &up);
                    assert_outputs_close(&what, &(&got).into(), &want, TOL, &sc);
                }
            }
        }
    }
    let data = Data::<f32>::new(
        Mode::Cross,
        Dims { n: 3, k: 5, d: 4 },
        1,
        false,
        rows::<f32>,
    );
    let inputs = data.inputs(Mode::Cross);
    for spec in [
        LossSpec::cross().normalize(true).build(),
        LossSpec::cross().variant(Variant::Decoupled).build(),
        LossSpec::cross()
            .dystress(0.1, 0.2, DystressGrad::Detach)
            .build(),
    ] {
        let e = cpu::unfused::evaluate(&spec.unwrap(), &inputs, &Upstream::One).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
    }
}
