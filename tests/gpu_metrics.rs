//! Device metrics (kernels/metrics.cu) against f64 host computations of the spec's definitions
//! (spec/losses.md, Metrics), to f32 tolerance, for every dtype: uniformity, tolerance, the penalty
//! histogram and the effective number of negatives (every mode, symmetric rows and columns).
//!
//! Outputs are poisoned (NaN) before each launch where the API writes into a caller's buffer.
//! Without a GPU every test prints `skipped: no CUDA device` and returns.

mod support;

#[path = "support/pairs.rs"]
mod pairs;

use fused_infonce::cuda::metrics::{
    dense_labels, penalty, tolerance, tolerance_into, uniformity, uniformity_into, UNIFORMITY_T,
};
use fused_infonce::cuda::{DeviceElement, DeviceMatrix, Gpu};
use fused_infonce::{bf16, f16, DystressGrad, MatRef, Temperature};
use pairs::{sim64, unit, Fixture, Layout};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random<T: DeviceElement>(rows: usize, cols: usize, seed: u64) -> (Vec<T>, Vec<Vec<f64>>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<T> = (0..rows * cols)
        .map(|_| T::from_f64(rng.random_range(-1.0..1.0)))
        .collect();
    let rows64 = data
        .chunks(cols.max(1))
        .take(rows)
        .map(|r| unit(&r.iter().map(|v| v.to_f64()).collect::<Vec<_>>()))
        .collect();
    (data, rows64)
}

fn download1(gpu: &Gpu, s: &cudarc::driver::CudaSlice<f32>) -> f64 {
    gpu.stream().clone_dtoh(s).unwrap()[0] as f64
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---- uniformity ---------------------------------------------------------------------------------

fn uniformity64(u: &[Vec<f64>], t: f64) -> f64 {
    let n = u.len();
    let mut terms = Vec::new();
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let d2: f64 = u[i].iter().zip(&u[j]).map(|(a, b)| (a - b) * (a - b)).sum();
                terms.push(-t * d2);
            }
        }
    }
    let m = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + (terms.iter().map(|z| (z - m).exp()).sum::<f64>() / terms.len() as f64).ln()
}

fn check_uniformity<T: DeviceElement>(gpu: &Gpu, seed: u64) {
    for (rows, cols) in [(2usize, 1usize), (3, 5), (37, 24), (300, 70), (9, 129)] {
        let (mut data, mut u) = random::<T>(rows, cols, seed + rows as u64);
        if rows == 37 {
            // An all-zero row: u = 0, ‖u_i − u_j‖² = 1 (the general form, not 2 − 2s).
            for v in &mut data[cols..2 * cols] {
                *v = T::from_f64(0.0);
            }
            u[1] = vec![0.0; cols];
        }
        let x = DeviceMatrix::upload(gpu, &MatRef::new("x", &data, rows, cols).unwrap()).unwrap();
        for t in [UNIFORMITY_T, 0.5] {
            let mut out = gpu.stream().clone_htod(&[f32::NAN]).unwrap();
            uniformity_into(gpu, &x, t, &mut out).unwrap();
            let got = download1(gpu, &out);
            let want = uniformity64(&u, t);
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{} uniformity rows={rows} cols={cols} t={t}: {got} vs {want}",
                T::DTYPE
            );
        }
    }
    let (data, _) = random::<T>(1, 4, seed);
    let x = DeviceMatrix::upload(gpu, &MatRef::new("x", &data, 1, 4).unwrap()).unwrap();
    assert!(uniformity(gpu, &x, 2.0).is_err(), "one row has no pairs");
}

#[test]
fn uniformity_f32() {
    let Some(gpu) = support::gpu("uniformity_f32") else {
        return;
    };
    check_uniformity::<f32>(&gpu, 1);
}

#[test]
fn uniformity_f16() {
    let Some(gpu) = support::gpu("uniformity_f16") else {
        return;
    };
    check_uniformity::<f16>(&gpu, 2);
}

#[test]
fn uniformity_bf16() {
    let Some(gpu) = support::gpu("uniformity_bf16") else {
        return;
    };
    check_uniformity::<bf16>(&gpu, 3);
}

// ---- tolerance ----------------------------------------------------------------------------------

fn tolerance64(u: &[Vec<f64>], labels: &[i64]) -> f64 {
    let (mut sum, mut count) = (0.0, 0usize);
    for i in 0..u.len() {
        for j in 0..u.len() {
            if i != j && labels[i] == labels[j] {
                sum += dot(&u[i], &u[j]);
                count += 1;
            }
        }
    }
    sum / count as f64
}

fn check_tolerance<T: DeviceElement>(gpu: &Gpu, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (rows, cols, classes) in [
        (2usize, 3usize, 1usize),
        (40, 24, 5),
        (333, 130, 17),
        (64, 1, 3),
    ] {
        let (data, u) = random::<T>(rows, cols, seed + rows as u64);
        // Sparse, arbitrary label values (some classes may be singletons).
        let raw: Vec<i64> = (0..rows)
            .map(|_| 1000 - 7 * rng.random_range(0..classes as i64))
            .collect();
        let (ids, c) = dense_labels(&raw);
        let x = DeviceMatrix::upload(gpu, &MatRef::new("x", &data, rows, cols).unwrap()).unwrap();
        let labels = gpu.stream().clone_htod(&ids).unwrap();
        let mut out = gpu.stream().clone_htod(&[f32::NAN]).unwrap();
        tolerance_into(gpu, &x, &labels, c, &mut out).unwrap();
        let got = download1(gpu, &out);
        let want = tolerance64(&u, &raw);
        assert!(
            (got - want).abs() <= 1e-4,
            "{} tolerance rows={rows} cols={cols} classes={c}: {got} vs {want}",
            T::DTYPE
        );
    }
    // Only singletons: no pair, NaN.
    let (data, _) = random::<T>(4, 8, seed);
    let x = DeviceMatrix::upload(gpu, &MatRef::new("x", &data, 4, 8).unwrap()).unwrap();
    let labels = gpu.stream().clone_htod(&[0i64, 1, 2, 3]).unwrap();
    let got = download1(gpu, &tolerance(gpu, &x, &labels, 4).unwrap());
    assert!(got.is_nan(), "no pairs gives NaN, got {got}");
    let short = gpu.stream().clone_htod(&[0i64, 1]).unwrap();
    assert!(tolerance(gpu, &x, &short, 4).is_err());
    assert!(tolerance(gpu, &x, &labels, 0).is_err());
}

#[test]
fn tolerance_f32() {
    let Some(gpu) = support::gpu("tolerance_f32") else {
        return;
    };
    check_tolerance::<f32>(&gpu, 11);
}

#[test]
fn tolerance_f16() {
    let Some(gpu) = support::gpu("tolerance_f16") else {
        return;
    };
    check_tolerance::<f16>(&gpu, 12);
}

#[test]
fn tolerance_bf16() {
    let Some(gpu) = support::gpu("tolerance_bf16") else {
        return;
    };
    check_tolerance::<bf16>(&gpu, 13);
}

// ---- penalty histogram and effective negatives --------------------------------------------------

/// The f64 histogram, effective negatives, and per bin edge the r-mass within `tol` of it (what
/// a rounding-level bin flip may move).
fn penalty64(
    pairs: &[(Vec<f64>, Vec<Vec<f64>>)],
    temp: &Temperature,
    bins: usize,
    tol: f64,
) -> (Vec<f64>, f64, f64) {
    let n = pairs.len() as f64;
    let mut hist = vec![0.0; bins];
    let (mut eff, mut flip) = (0.0, 0.0);
    for (a, negs) in pairs {
        if negs.is_empty() {
            continue;
        }
        let s: Vec<f64> = negs.iter().map(|b| sim64(a, b, true)).collect();
        let z: Vec<f64> = s.iter().map(|&v| v / temp.tau(v)).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let mut ent = 0.0;
        for (&sv, &zv) in s.iter().zip(&z) {
            let r = (zv - lse).exp();
            let f = (sv + 1.0) * 0.5 * bins as f64;
            let b = if f >= 0.0 {
                (f as usize).min(bins - 1)
            } else {
                0
            };
            hist[b] += r / n;
            ent += r * (lse - zv);
            if (f - f.round()).abs() <= tol * bins as f64 {
                flip += r / n;
            }
        }
        eff += ent.exp() / n;
    }
    (hist, eff, flip)
}

fn check_penalty<T: DeviceElement>(gpu: &Gpu, seed: u64) {
    let layouts = [
        Layout::Queue {
            n: 11,
            cap: 40,
            start: 33,
            len: 29,
        },
        Layout::Queue {
            n: 3,
            cap: 5,
            start: 0,
            len: 0,
        },
        Layout::InBatch { rows: 26 },
        Layout::Cross {
            n: 9,
            m: 23,
            targets: true,
        },
        Layout::Symmetric { n: 15 },
    ];
    for (li, layout) in layouts.into_iter().enumerate() {
        for cols in [3usize, 40] {
            let fx =
                Fixture::<T>::new(gpu, layout, cols, seed + 31 * li as u64 + cols as u64, true);
            let sides: &[bool] = if matches!(layout, Layout::Symmetric { .. }) {
                &[false, true]
            } else {
                &[false]
            };
            for &columns in sides {
                let dystress = Temperature::Dystress {
                    tau_min: 0.1,
                    tau_max: 0.2,
                    grad: DystressGrad::Detach,
                };
                for (tau, bins) in [
                    (Temperature::Fixed(0.2), 20usize),
                    (Temperature::Learnable(1.0), 7),
                    (Temperature::Fixed(0.07), 1024),
                    (Temperature::Fixed(0.5), 1),
                    (dystress, 16),
                ] {
                    let got = penalty(gpu, &fx.inputs(), columns, &tau, bins).unwrap();
                    let hist: Vec<f64> = gpu
                        .stream()
                        .clone_dtoh(&got.histogram)
                        .unwrap()
                        .iter()
                        .map(|&v| v as f64)
                        .collect();
                    let eff = download1(gpu, &got.effective_negatives);
                    let (want_hist, want_eff, flip) =
                        penalty64(&fx.pairs(columns), &tau, bins, 1e-5);
                    let what = format!(
                        "{} {layout:?} cols={cols} columns={columns} {tau:?} bins={bins}",
                        T::DTYPE
                    );
                    assert_eq!(hist.len(), bins, "{what}");
                    assert!(
                        (eff - want_eff).abs() <= 1e-4 * (1.0 + want_eff),
                        "{what}: effective negatives {eff} vs {want_eff}"
                    );
                    // Cumulative sums: a bin flip at an edge moves mass by at most `flip`.
                    let (mut cg, mut cw) = (0.0, 0.0);
                    for b in 0..bins {
                        cg += hist[b];
                        cw += want_hist[b];
                        assert!(
                            (cg - cw).abs() <= 1e-5 + flip,
                            "{what}: cumulative bin {b}: {cg} vs {cw} (flip allowance {flip})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn penalty_f32() {
    let Some(gpu) = support::gpu("penalty_f32") else {
        return;
    };
    check_penalty::<f32>(&gpu, 21);
}

#[test]
fn penalty_f16() {
    let Some(gpu) = support::gpu("penalty_f16") else {
        return;
    };
    check_penalty::<f16>(&gpu, 22);
}

#[test]
fn penalty_bf16() {
    let Some(gpu) = support::gpu("penalty_bf16") else {
        return;
    };
    check_penalty::<bf16>(&gpu, 23);
}

/// More anchors than penalty blocks (1024): blocks loop over anchors.
#[test]
fn penalty_many_anchors() {
    let Some(gpu) = support::gpu("penalty_many_anchors") else {
        return;
    };
    let fx = Fixture::<f32>::new(
        &gpu,
        Layout::Queue {
            n: 2500,
            cap: 64,
            start: 10,
            len: 64,
        },
        16,
        4,
        false,
    );
    let tau = Temperature::Fixed(0.1);
    let got = penalty(&gpu, &fx.inputs(), false, &tau, 50).unwrap();
    let eff = download1(&gpu, &got.effective_negatives);
    let (_, want_eff, _) = penalty64(&fx.pairs(false), &tau, 50, 0.0);
    assert!(
        (eff - want_eff).abs() <= 1e-4 * (1.0 + want_eff),
        "{eff} vs {want_eff}"
    );
    assert!(penalty(&gpu, &fx.inputs(), false, &Temperature::Fixed(0.0), 50).is_err());
    assert!(penalty(&gpu, &fx.inputs(), false, &tau, 0).is_err());
    assert!(penalty(&gpu, &fx.inputs(), true, &tau, 10).is_err());
}
