// Developer tool (tools/kernel-emu): hard:k cases (Hard{k}, Simple{hard_k}; every mode, with and
// without normalisation) for the emulator. The .thr files hold midpoint thresholds of the raw
// (un-normalised) inputs: run these cases with EMU_SELECT=1 (thresholds from select_kth_f32).
// Copy to examples/ to build: cargo run --release --example emu_hard -- DIR
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
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn thr(a: &[f32], keys: &[f32], d: usize, negs: &[usize], k: usize) -> f32 {
    let mut s: Vec<f64> = negs
        .iter()
        .map(|&j| dot(a, &keys[j * d..(j + 1) * d]))
        .collect();
    s.sort_by(|x, y| y.total_cmp(x));
    if k >= s.len() {
        return f32::NEG_INFINITY;
    }
    (0.5 * (s[k - 1] + s[k])) as f32
}

fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let mut idx = 0;
    for (mi, mode) in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric]
        .into_iter()
        .enumerate()
    {
        let (n, kk, d) = match mode {
            Mode::Queue => (5, 40, 9),
            Mode::InBatch => (9, 0, 9),
            Mode::Cross => (18, 30, 9),
            Mode::Symmetric => (18, 0, 9),
        };
        for norm in [false, true] {
            for (vi, v) in [
                Variant::Hard { k: 3 },
                Variant::Simple {
                    lambda: None,
                    hard_k: Some(4),
                },
                Variant::Hard { k: 7 },
                Variant::Hard { k: 1 },
                Variant::Hard { k: 200 },
            ]
            .into_iter()
            .enumerate()
            {
                for r in [Reduction::Mean, Reduction::None] {
                    let spec = LossSpec::builder(mode)
                        .learnable_temperature(0.2)
                        .variant(v)
                        .reduction(r)
                        .grad_queue(mode == Mode::Queue)
                        .normalize(norm)
                        .build()
                        .unwrap();
                    let mut rng = StdRng::seed_from_u64(1000 + idx as u64);
                    let (a, b, c) = match mode {
                        Mode::Queue => (
                            rows(&mut rng, n, d),
                            rows(&mut rng, n, d),
                            rows(&mut rng, kk, d),
                        ),
                        Mode::InBatch => (rows(&mut rng, 2 * n, d), vec![], vec![]),
                        Mode::Cross => (rows(&mut rng, n, d), rows(&mut rng, kk, d), vec![]),
                        Mode::Symmetric => (rows(&mut rng, n, d), rows(&mut rng, n, d), vec![]),
                    };
                    let targets: Option<Vec<i64>> = (mode == Mode::Cross)
                        .then(|| (0..n).map(|_| rng.random_range(0..kk as i64)).collect());
                    let inputs = match mode {
                        Mode::Queue => LossInputs::Queue {
                            query: MatRef::new("query", &a, n, d).unwrap(),
                            positive: MatRef::new("positive", &b, n, d).unwrap(),
                            queue: MatRef::new("queue", &c, kk, d).unwrap(),
                        },
                        Mode::InBatch => LossInputs::InBatch {
                            embeddings: MatRef::new("embeddings", &a, 2 * n, d).unwrap(),
                        },
                        Mode::Cross => LossInputs::Cross {
                            query: MatRef::new("query", &a, n, d).unwrap(),
                            key: MatRef::new("key", &b, kk, d).unwrap(),
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
                    let out = cpu::evaluate(&spec, &inputs, &up).unwrap();
                    let w = up.weights(&spec, count).unwrap();
                    let k = v.hard_k().unwrap();
                    // thresholds per problem
                    let mut thrs: Vec<Vec<f32>> = Vec::new();
                    match mode {
                        Mode::Queue => thrs.push(
                            (0..n)
                                .map(|i| {
                                    thr(
                                        &a[i * d..(i + 1) * d],
                                        &c,
                                        d,
                                        &(0..kk).collect::<Vec<_>>(),
                                        k,
                                    )
                                })
                                .collect(),
                        ),
                        Mode::InBatch => {
                            let m = 2 * n;
                            thrs.push(
                                (0..m)
                                    .map(|i| {
                                        let p = (i + n) % m;
                                        thr(
                                            &a[i * d..(i + 1) * d],
                                            &a,
                                            d,
                                            &(0..m)
                                                .filter(|&j| j != i && j != p)
                                                .collect::<Vec<_>>(),
                                            k,
                                        )
                                    })
                                    .collect(),
                            )
                        }
                        Mode::Cross => {
                            let t = targets.as_ref().unwrap();
                            thrs.push(
                                (0..n)
                                    .map(|i| {
                                        thr(
                                            &a[i * d..(i + 1) * d],
                                            &b,
                                            d,
                                            &(0..kk)
                                                .filter(|&j| j as i64 != t[i])
                                                .collect::<Vec<_>>(),
                                            k,
                                        )
                                    })
                                    .collect(),
                            )
                        }
                        Mode::Symmetric => {
                            thrs.push(
                                (0..n)
                                    .map(|i| {
                                        thr(
                                            &a[i * d..(i + 1) * d],
                                            &b,
                                            d,
                                            &(0..n).filter(|&j| j != i).collect::<Vec<_>>(),
                                            k,
                                        )
                                    })
                                    .collect(),
                            );
                            thrs.push(
                                (0..n)
                                    .map(|j| {
                                        thr(
                                            &b[j * d..(j + 1) * d],
                                            &a,
                                            d,
                                            &(0..n).filter(|&i| i != j).collect::<Vec<_>>(),
                                            k,
                                        )
                                    })
                                    .collect(),
                            );
                        }
                    }
                    let mut s = String::new();
                    let (var, hl) = if vi == 1 { (2, 0) } else { (0, 0) };
                    writeln!(
                        s,
                        "{mi} {var} {hl} 0 0 0.2 0 0 1 {} {} {}",
                        if r == Reduction::None { 2 } else { 0 },
                        norm as i32,
                        (mode == Mode::Queue) as i32
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
                    writeln!(s, "# {mode:?} {n} {kk} {d} {spec:?}").unwrap();
                    std::fs::write(format!("{dir}/case{idx:04}.txt"), s).unwrap();
                    let mut t = String::new();
                    for th in &thrs {
                        write!(t, "{}", th.len()).unwrap();
                        for x in th {
                            write!(t, " {:e}", x).unwrap();
                        }
                        writeln!(t).unwrap();
                    }
                    std::fs::write(format!("{dir}/case{idx:04}.thr"), t).unwrap();
                    idx += 1;
                }
            }
        }
    }
    eprintln!("{idx} cases");
}
