//! Hard-k thresholds on the GPU (kernels/select.cu) against the host, for every mode (symmetric
//! rows and columns separately), every dtype, with and without normalisation, k from 1 to past
//! #negatives, and exact ties (duplicated key rows; an all-equal key set).
//!
//! Two checks per anchor and k:
//! - the threshold equals, bit for bit, the k-th largest of the kernel's f32 similarities emulated
//!   on the host (`support::pairs::sim_select`, the sequential dot product that kernels/infonce.cu
//!   v1 computes too), or −inf when k ≥ #negatives;
//! - the negatives it selects (`s ≥ threshold`) are the f64 reference's (`s ≥ s_(k)`, ties kept),
//!   except for similarities within f32 rounding of `s_(k)`.
//!
//! Outputs are poisoned (NaN) before each launch. Without a GPU every test prints
//! `skipped: no CUDA device` and returns.

mod support;

#[path = "support/pairs.rs"]
mod pairs;

use fused_infonce::cuda::steps::select::{
    hard_thresholds, hard_thresholds_into, radix_select_host, threshold_len,
};
use fused_infonce::cuda::{DeviceElement, Gpu};
use fused_infonce::{bf16, f16};
use pairs::{sim64, sim_select, Fixture, Layout};

/// The f64 reference's selection (reference::anchor::select): `s ≥ s_(k)`, all kept when k ≥ #neg.
fn select64(s: &[f64], k: usize) -> (Vec<bool>, Option<f64>) {
    if k >= s.len() {
        return (vec![true; s.len()], None);
    }
    let mut sorted = s.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let thr = sorted[k - 1];
    (s.iter().map(|&v| v >= thr).collect(), Some(thr))
}

fn kth32(s: &[f32], k: usize) -> f32 {
    if k >= s.len() {
        return f32::NEG_INFINITY;
    }
    let mut sorted = s.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[k - 1]
}

/// Checks the thresholds `thresholds(k)` of one side of `fx` for every k in `ks`.
fn check<T: DeviceElement>(
    fx: &Fixture<T>,
    columns: bool,
    normalize: bool,
    ks: &[usize],
    thresholds: &mut dyn FnMut(usize) -> Vec<f32>,
) {
    let n = fx.anchors();
    let pairs = fx.pairs(columns);
    assert_eq!(pairs.len(), n);
    let s64: Vec<Vec<f64>> = pairs
        .iter()
        .map(|(a, negs)| negs.iter().map(|b| sim64(a, b, normalize)).collect())
        .collect();
    let s32: Vec<Vec<f32>> = pairs
        .iter()
        .map(|(a, negs)| negs.iter().map(|b| sim_select(a, b, normalize)).collect())
        .collect();
    // f32 rounding of a dot product of D terms, relative to ‖a‖‖b‖.
    let scale: Vec<f64> = pairs
        .iter()
        .map(|(a, negs)| {
            let na = a.iter().map(|v| v * v).sum::<f64>().sqrt();
            let nb = negs
                .iter()
                .map(|b| b.iter().map(|v| v * v).sum::<f64>().sqrt())
                .fold(0.0, f64::max);
            if normalize {
                1.0
            } else {
                (na * nb).max(1e-30)
            }
        })
        .collect();
    let what = format!(
        "{} {:?} columns={columns} normalize={normalize}",
        T::DTYPE,
        fx.layout
    );
    for &k in ks {
        let thr = thresholds(k);
        assert_eq!(thr.len(), n, "{what} k={k}");
        for i in 0..n {
            let want = kth32(&s32[i], k);
            assert_eq!(
                thr[i].to_bits(),
                want.to_bits(),
                "{what} k={k} anchor {i}: threshold {} want {want} (#neg {})",
                thr[i],
                s32[i].len()
            );
            let (sel64, thr64) = select64(&s64[i], k);
            let tol = 1e-5 * scale[i];
            let mut kept = 0;
            for (j, (&a, &b)) in s32[i].iter().zip(&s64[i]).enumerate() {
                let gpu_sel = a >= thr[i];
                kept += gpu_sel as usize;
                let near = thr64.is_some_and(|t| (b - t).abs() <= tol);
                assert!(
                    near || gpu_sel == sel64[j],
                    "{what} k={k} anchor {i} negative {j}: s64 {b} s32 {a} thr {} thr64 {thr64:?}",
                    thr[i]
                );
            }
            assert!(
                kept >= k.min(s32[i].len()),
                "{what} k={k} anchor {i}: {kept} kept"
            );
        }
    }
}

/// Checks the GPU thresholds (outputs poisoned with NaN before each launch).
fn run<T: DeviceElement>(gpu: &Gpu, fx: &Fixture<T>, columns: bool, normalize: bool, ks: &[usize]) {
    let inputs = fx.inputs();
    let n = threshold_len(&inputs);
    assert_eq!(n, fx.anchors());
    check(fx, columns, normalize, ks, &mut |k| {
        let mut out = gpu.stream().clone_htod(&vec![f32::NAN; n]).unwrap();
        hard_thresholds_into(gpu, &inputs, normalize, k, columns, &mut out).unwrap();
        gpu.stream().clone_dtoh(&out).unwrap()
    });
}

/// The kernel's result computed on the host: [`radix_select_host`] over the emulated f32
/// similarities.
fn host_thresholds<T: DeviceElement>(
    fx: &Fixture<T>,
    columns: bool,
    normalize: bool,
    k: usize,
) -> Vec<f32> {
    fx.pairs(columns)
        .iter()
        .map(|(a, negs)| {
            let s: Vec<f32> = negs.iter().map(|b| sim_select(a, b, normalize)).collect();
            if k >= s.len() {
                f32::NEG_INFINITY
            } else {
                radix_select_host(&s, k).unwrap()
            }
        })
        .collect()
}

/// Every k from 1 to two past the largest #negatives.
fn all_k<T: DeviceElement>(fx: &Fixture<T>, columns: bool) -> Vec<usize> {
    let most = fx
        .pairs(columns)
        .iter()
        .map(|p| p.1.len())
        .max()
        .unwrap_or(0);
    (1..=most + 2).collect()
}

fn layouts() -> Vec<Layout> {
    vec![
        // A wrapped ring: rows 30..40 then 0..15.
        Layout::Queue {
            n: 9,
            cap: 40,
            start: 30,
            len: 25,
        },
        Layout::Queue {
            n: 5,
            cap: 12,
            start: 0,
            len: 12,
        },
        Layout::InBatch { rows: 22 },
        Layout::Cross {
            n: 7,
            m: 19,
            targets: true,
        },
        Layout::Cross {
            n: 7,
            m: 11,
            targets: false,
        },
        Layout::Symmetric { n: 13 },
    ]
}

fn modes<T: DeviceElement>(gpu: &Gpu, seed: u64) {
    for (li, layout) in layouts().into_iter().enumerate() {
        for cols in [1usize, 24, 70] {
            let fx =
                Fixture::<T>::new(gpu, layout, cols, seed + 17 * li as u64 + cols as u64, true);
            let sides: &[bool] = if matches!(layout, Layout::Symmetric { .. }) {
                &[false, true]
            } else {
                &[false]
            };
            for &columns in sides {
                for normalize in [true, false] {
                    run(gpu, &fx, columns, normalize, &all_k(&fx, columns));
                }
            }
        }
    }
}

/// Runs everywhere: the harness itself (layouts, f64 parity with its near-tie allowance) with the
/// kernel replaced by its host mirror on the emulated similarities.
#[test]
fn select_harness_on_host() {
    for (li, layout) in layouts().into_iter().enumerate() {
        for cols in [1usize, 24, 70] {
            let seed = 900 + 17 * li as u64 + cols as u64;
            let f = Fixture::<f32>::host(layout, cols, seed, true);
            let b = Fixture::<bf16>::host(layout, cols, seed, true);
            let sides: &[bool] = if matches!(layout, Layout::Symmetric { .. }) {
                &[false, true]
            } else {
                &[false]
            };
            for &columns in sides {
                for normalize in [true, false] {
                    let ks = all_k(&f, columns);
                    check(&f, columns, normalize, &ks, &mut |k| {
                        host_thresholds(&f, columns, normalize, k)
                    });
                    check(&b, columns, normalize, &ks, &mut |k| {
                        host_thresholds(&b, columns, normalize, k)
                    });
                }
            }
        }
    }
}

#[test]
fn select_modes_f32() {
    let Some(gpu) = support::gpu("select_modes_f32") else {
        return;
    };
    modes::<f32>(&gpu, 100);
}

#[test]
fn select_modes_f16() {
    let Some(gpu) = support::gpu("select_modes_f16") else {
        return;
    };
    modes::<f16>(&gpu, 200);
}

#[test]
fn select_modes_bf16() {
    let Some(gpu) = support::gpu("select_modes_bf16") else {
        return;
    };
    modes::<bf16>(&gpu, 300);
}

/// A long queue (many digits populated in every pass) and a wide D.
#[test]
fn select_large_queue() {
    let Some(gpu) = support::gpu("select_large_queue") else {
        return;
    };
    let layout = Layout::Queue {
        n: 6,
        cap: 5000,
        start: 4321,
        len: 4999,
    };
    let fx = Fixture::<bf16>::new(&gpu, layout, 96, 5, true);
    run(
        &gpu,
        &fx,
        false,
        true,
        &[1, 2, 3, 4, 5, 100, 2500, 4095, 4997, 4998, 4999],
    );
    let fx = Fixture::<f32>::new(&gpu, layout, 200, 6, false);
    run(&gpu, &fx, false, false, &[1, 77, 4096, 4998]);
}

/// Every key identical: every threshold is that one similarity, every negative kept.
#[test]
fn select_all_ties() {
    let Some(gpu) = support::gpu("select_all_ties") else {
        return;
    };
    let mut fx = Fixture::<f32>::new(
        &gpu,
        Layout::Queue {
            n: 4,
            cap: 50,
            start: 7,
            len: 50,
        },
        33,
        9,
        false,
    );
    let d = fx.cols;
    let first: Vec<f64> = fx.host[2][..d].to_vec();
    let same: Vec<f32> = (0..50)
        .flat_map(|_| first.iter().map(|&v| v as f32))
        .collect();
    fx.host[2] = same.iter().map(|&v| v as f64).collect();
    fx.dev[2] = fused_infonce::cuda::DeviceMatrix::upload(
        &gpu,
        &fused_infonce::MatRef::new("queue", &same, 50, d).unwrap(),
    )
    .unwrap();
    run(&gpu, &fx, false, true, &[1, 2, 25, 49, 50, 51]);
}

/// Shape and parameter errors come back as errors, not launches.
#[test]
fn select_errors() {
    let Some(gpu) = support::gpu("select_errors") else {
        return;
    };
    let fx = Fixture::<f32>::new(&gpu, Layout::InBatch { rows: 8 }, 4, 1, false);
    assert!(hard_thresholds(&gpu, &fx.inputs(), true, 0, false).is_err());
    assert!(hard_thresholds(&gpu, &fx.inputs(), true, 3, true).is_err());
    let mut short = gpu.stream().clone_htod(&[f32::NAN; 3]).unwrap();
    assert!(hard_thresholds_into(&gpu, &fx.inputs(), true, 3, false, &mut short).is_err());
    let odd = Fixture::<f32>::new(&gpu, Layout::InBatch { rows: 7 }, 4, 1, false);
    assert!(hard_thresholds(&gpu, &odd.inputs(), true, 3, false).is_err());
    let ok = hard_thresholds(&gpu, &fx.inputs(), true, 3, false).unwrap();
    assert_eq!(ok.len(), 8);
}
