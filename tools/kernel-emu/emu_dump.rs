// Developer tool (tools/kernel-emu): dumps loss cases (inputs + f64 CPU reference) for the emulator.
// Copy to examples/ to build: cargo run --release --example emu_dump -- DIR [full]
use fused_infonce::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;

fn rows(rng: &mut StdRng, r: usize, d: usize) -> Vec<f32> {
    let s = (3.0 / d as f64).sqrt();
    (0..r * d)
        .map(|_| (rng.random_range(-1.0..1.0) * s) as f32)
        .collect()
}

fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let mut idx = 0;
    let temps = [
        Temperature::Fixed(0.1),
        Temperature::Learnable(0.2),
        Temperature::Dystress {
            tau_min: 0.1,
            tau_max: 0.2,
            grad: DystressGrad::Detach,
        },
        Temperature::Dystress {
            tau_min: 0.07,
            tau_max: 0.2,
            grad: DystressGrad::Full,
        },
    ];
    let variants = [
        Variant::Standard,
        Variant::Decoupled,
        Variant::Simple {
            lambda: None,
            hard_k: None,
        },
        Variant::Simple {
            lambda: Some(0.5),
            hard_k: None,
        },
    ];
    let full = std::env::args().nth(2).is_some();
    for (mi, mode) in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric]
        .into_iter()
        .enumerate()
    {
        let shapes: Vec<(usize, usize, usize)> = match mode {
            Mode::Queue => vec![(5, 37, 33), (3, 1100, 7), (1, 0, 3)],
            Mode::InBatch => vec![(5, 0, 33), (17, 0, 40), (1, 0, 2)],
            Mode::Cross => vec![(5, 9, 33), (17, 40, 3), (1, 1, 5)],
            Mode::Symmetric => vec![(5, 0, 33), (20, 0, 35), (1, 0, 4)],
        };
        for (si, &(n, k, d)) in shapes.iter().enumerate() {
            for (ti, t) in temps.iter().enumerate() {
                for (vi, v) in variants.iter().enumerate() {
                    for (ri, r) in [Reduction::Mean, Reduction::Sum, Reduction::None]
                        .into_iter()
                        .enumerate()
                    {
                        for norm in [false, true] {
                            if si > 0 && !full && (ri != 2 || (ti + vi) % 2 == 1) {
                                continue;
                            }
                            let spec = LossSpec::builder(mode)
                                .temperature_scheme(*t)
                                .variant(*v)
                                .reduction(r)
                                .normalize(norm)
                                .grad_queue(mode == Mode::Queue && norm)
                                .build()
                                .unwrap();
                            let mut rng = StdRng::seed_from_u64(idx as u64);
                            let (a, b, c) = match mode {
                                Mode::Queue => (
                                    rows(&mut rng, n, d),
                                    rows(&mut rng, n, d),
                                    rows(&mut rng, k, d),
                                ),
                                Mode::InBatch => (rows(&mut rng, 2 * n, d), vec![], vec![]),
                                Mode::Cross => (rows(&mut rng, n, d), rows(&mut rng, k, d), vec![]),
                                Mode::Symmetric => {
                                    (rows(&mut rng, n, d), rows(&mut rng, n, d), vec![])
                                }
                            };
                            let targets: Option<Vec<i64>> = (mode == Mode::Cross && idx % 2 == 0)
                                .then(|| (0..n).map(|_| rng.random_range(0..k as i64)).collect());
                            let inputs = match mode {
                                Mode::Queue => LossInputs::Queue {
                                    query: MatRef::new("query", &a, n, d).unwrap(),
                                    positive: MatRef::new("positive", &b, n, d).unwrap(),
                                    queue: MatRef::new("queue", &c, k, d).unwrap(),
                                },
                                Mode::InBatch => LossInputs::InBatch {
                                    embeddings: MatRef::new("embeddings", &a, 2 * n, d).unwrap(),
                                },
                                Mode::Cross => LossInputs::Cross {
                                    query: MatRef::new("query", &a, n, d).unwrap(),
                                    key: MatRef::new("key", &b, k, d).unwrap(),
                                    targets: targets.as_deref(),
                                },
                                Mode::Symmetric => LossInputs::Symmetric {
                                    query: MatRef::new("query", &a, n, d).unwrap(),
                                    key: MatRef::new("key", &b, n, d).unwrap(),
                                },
                            };
                            let count = match mode {
                                Mode::InBatch | Mode::Symmetric => 2 * n,
                                _ => n,
                            };
                            let up = match r {
                                Reduction::None => Upstream::PerAnchor(
                                    (0..count).map(|_| rng.random_range(0.1..1.0)).collect(),
                                ),
                                _ => Upstream::Scalar(0.75),
                            };
                            let Ok(out) = cpu::evaluate(&spec, &inputs, &up) else {
                                continue;
                            };
                            let w = up.weights(&spec, count).unwrap();
                            let mut s = String::new();
                            let (tk, tau, tmin, tmax, learn) = match *t {
                                Temperature::Fixed(x) => (0, x, 0.0, 0.0, 0),
                                Temperature::Learnable(x) => (0, x, 0.0, 0.0, 1),
                                Temperature::Dystress {
                                    tau_min,
                                    tau_max,
                                    grad,
                                } => (
                                    if grad == DystressGrad::Detach { 1 } else { 2 },
                                    tau_min,
                                    tau_min,
                                    tau_max,
                                    0,
                                ),
                            };
                            let (var, hl, lam) = match *v {
                                Variant::Standard => (0, 0, 0.0),
                                Variant::Decoupled => (1, 0, 0.0),
                                Variant::Simple { lambda, .. } => {
                                    (2, lambda.is_some() as i32, lambda.unwrap_or(0.0))
                                }
                                _ => unreachable!(),
                            };
                            writeln!(
                                s,
                                "{mi} {var} {hl} {lam} {tk} {tau} {tmin} {tmax} {learn} {ri} {} {}",
                                norm as i32,
                                spec.grad_queue() as i32
                            )
                            .unwrap();
                            let mats = inputs.matrices();
                            writeln!(s, "{}", mats.len()).unwrap();
                            for m in &mats {
                                write!(s, "{} {}", m.rows(), m.cols()).unwrap();
                                for x in m.data() {
                                    write!(s, " {:e}", x).unwrap();
                                }
                                writeln!(s).unwrap();
                            }
                            let tv = targets.clone().unwrap_or_default();
                            write!(s, "{}", tv.len()).unwrap();
                            for x in &tv {
                                write!(s, " {x}").unwrap();
                            }
                            writeln!(s).unwrap();
                            let vecw = |s: &mut String, v: &[f64]| {
                                write!(s, "{}", v.len()).unwrap();
                                for x in v {
                                    write!(s, " {:e}", x).unwrap();
                                }
                                writeln!(s).unwrap();
                            };
                            vecw(&mut s, &w);
                            vecw(&mut s, &out.loss.values());
                            vecw(&mut s, &out.lse);
                            match &out.lse_cols {
                                Some(c) => {
                                    write!(s, "1 ").unwrap();
                                    vecw(&mut s, c)
                                }
                                None => writeln!(s, "0").unwrap(),
                            }
                            writeln!(s, "{}", out.grads.len()).unwrap();
                            for g in &out.grads {
                                write!(s, "{} {} ", g.value.rows, g.value.cols).unwrap();
                                vecw(&mut s, &g.value.data);
                            }
                            match out.grad_temperature {
                                Some(x) => writeln!(s, "1 {:e}", x).unwrap(),
                                None => writeln!(s, "0").unwrap(),
                            }
                            writeln!(s, "# {mode:?} {n} {k} {d} {spec:?}").unwrap();
                            std::fs::write(format!("{dir}/case{idx:04}.txt"), s).unwrap();
                            idx += 1;
                        }
                    }
                }
            }
        }
    }
    eprintln!("{idx} cases");
}
