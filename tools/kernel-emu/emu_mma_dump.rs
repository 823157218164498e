// Developer tool (tools/kernel-emu): dumps cases for the tensor-core kernels (`mma_f16`,
// `mma_bf16`): the standard variant, fixed and learnable τ, D = 64 and 128, shapes that are not
// tile multiples, with inputs rounded to the dtype first so the f64 reference sees exactly what
// the kernels read. Copy to examples/ to build:
//   cargo run --release --example emu_mma_dump -- DIR f16|bf16
use fused_infonce::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;

fn rows(rng: &mut StdRng, r: usize, d: usize, dt: &str) -> Vec<f32> {
    let s = (3.0 / d as f64).sqrt();
    (0..r * d)
        .map(|_| {
            let x = (rng.random_range(-1.0..1.0) * s) as f32;
            match dt {
                "f16" => f16::from_f32(x).to_f32(),
                _ => bf16::from_f32(x).to_f32(),
            }
        })
        .collect()
}

fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let dt = std::env::args().nth(2).unwrap_or_else(|| "bf16".into());
    let mut idx = 0;
    let (var, hl, lam) = (0, 0, 0.0);
    let v = Variant::Standard;
    for (mi, mode) in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric]
        .into_iter()
        .enumerate()
    {
        // (N, K, D): N, K not multiples of the 64-row tiles, one that is, N = 1, K = 0.
        let shapes: Vec<(usize, usize, usize)> = match mode {
            Mode::Queue => vec![(5, 37, 64), (70, 1100, 128), (1, 0, 64), (64, 128, 128), (130, 200, 64)],
            Mode::InBatch => vec![(5, 0, 64), (40, 0, 128), (1, 0, 64), (33, 0, 64)],
            Mode::Cross => vec![(5, 9, 64), (70, 130, 128), (1, 1, 64), (3, 70, 64), (65, 64, 128)],
            Mode::Symmetric => vec![(5, 0, 64), (70, 0, 128), (1, 0, 64), (65, 0, 64)],
        };
        for &(n, k, d) in &shapes {
            for (ti, t) in [Temperature::Fixed(0.1), Temperature::Learnable(0.07)]
                .iter()
                .enumerate()
            {
                for (ri, r) in [Reduction::Mean, Reduction::Sum, Reduction::None]
                    .into_iter()
                    .enumerate()
                {
                    if ri == 1 && ti == 0 {
                        continue;
                    }
                    let norm = false;
                    let spec = LossSpec::builder(mode)
                        .temperature_scheme(*t)
                        .variant(v)
                        .reduction(r)
                        .build()
                        .unwrap();
                    let mut rng = StdRng::seed_from_u64(1000 + idx as u64);
                    let (a, b, c) = match mode {
                        Mode::Queue => (
                            rows(&mut rng, n, d, &dt),
                            rows(&mut rng, n, d, &dt),
                            rows(&mut rng, k, d, &dt),
                        ),
                        Mode::InBatch => (rows(&mut rng, 2 * n, d, &dt), vec![], vec![]),
                        Mode::Cross => (rows(&mut rng, n, d, &dt), rows(&mut rng, k, d, &dt), vec![]),
                        Mode::Symmetric => (rows(&mut rng, n, d, &dt), rows(&mut rng, n, d, &dt), vec![]),
                    };
                    let targets: Option<Vec<i64>> = (mode == Mode::Cross && (idx % 2 == 0 || k < n))
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
                    let (_var, _hl, _lam) = match v {
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
    eprintln!("{idx} cases ({dt})");
}
