//! CPU–GPU parity of the fused loss (`cuda::evaluate_on` against `reference::evaluate`) over a grid of
//! specs (modes × temperatures × variants × reductions × normalisation) and shapes that are not
//! tile multiples (D ∈ {1, 7, 64, 128, 129, 768}, N = 1, K = 0), for f32, f16 and bf16. Every
//! device output is poisoned (NaN) before the kernels run; NaN never passes. Tolerances (relative
//! L2 over each output): f32 1e-5, f16/bf16 1e-2. Inputs are random rows of norm about 1 (so
//! logits stay moderate and an f32 loss is not a small difference of large numbers).
//! Without a GPU each test prints `skipped: no CUDA device` and returns.

#[path = "support/problem.rs"]
mod problem;
mod support;

use problem::{hard_k_cases, loss_count, temperatures, upstream, Data, Dims};
use support::{assert_outputs_close, Scales};

use fused_infonce::cuda::{
    evaluate_device, evaluate_device_poisoned, evaluate_on, DeviceElement, DeviceInputs,
    DeviceMatrix, DeviceOptions, Gpu, GradDType, QueueView,
};
use fused_infonce::{
    bf16, f16, reference, DType, DystressGrad, Element, Error, LossInputs, LossSpec, MatRef, Mode,
    Reduction, Upstream, Variant,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The v1 kernels read the stored values and compute in f32 whatever the storage dtype, and the
/// reference ([`support::reference_as_stored`]) sees the same stored values (and, when normalising,
/// the same normalised copy rounded to the dtype): what is left is f32 arithmetic, held to 1e-5
/// for every dtype.
const TOL: f64 = 1e-5;

/// Gradients returned in the input dtype carry one rounding to it: at most one unit in the last
/// place of each element, 2^-7 relative for bf16 (8 significant bits) and 2^-10 for f16.
fn output_rounding(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-7),
        DType::F16 => 2f64.powi(-10),
        _ => TOL,
    }
}

/// Random rows of norm about 1 (uniform entries scaled by sqrt(3/D)), rounded to T.
fn rows<T: Element>(rng: &mut StdRng, r: usize, d: usize) -> Vec<T> {
    let s = (3.0 / d as f64).sqrt();
    (0..r * d)
        .map(|_| T::from_f64(rng.random_range(-1.0..1.0) * s))
        .collect()
}

/// Runs one spec on one shape in dtype T on both backends and compares.
fn parity<T: Element + DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    dims: Dims,
    seed: u64,
    opts: &DeviceOptions,
) {
    let mode = spec.mode();
    let data = Data::<T>::new(mode, dims, seed, seed.is_multiple_of(2), rows::<T>);
    let inputs = data.inputs(mode);
    let up = upstream(spec, loss_count(mode, dims), seed + 1);
    let what = format!("{} {:?} {dims:?} {spec:?} {opts:?}", T::DTYPE, mode);
    let want = support::reference_as_stored(gpu, spec, &inputs, &up);
    let got = evaluate_on(gpu, spec, &inputs, &up, opts, true);
    match (got, want) {
        (Ok(g), Ok(mut w)) => {
            let tol = if opts.grad_dtype == GradDType::Input && T::DTYPE != DType::F32 {
                // Both sides rounded to the dtype: they differ by at most one ulp per element.
                for grad in &mut w.grads {
                    for v in &mut grad.value.data {
                        *v = T::from_f64(*v).to_f64();
                    }
                }
                output_rounding(T::DTYPE)
            } else {
                TOL
            };
            assert_outputs_close(
                &what,
                &(&g).into(),
                &w,
                tol,
                &Scales::of(spec, &inputs, &up),
            )
        }
        (Err(g), Err(w)) => assert_eq!(
            std::mem::discriminant(&g),
            std::mem::discriminant(&w),
            "{what}: different errors: {g} / {w}"
        ),
        (g, w) => panic!(
            "{what}: one backend failed: gpu {:?} cpu {:?}",
            g.err(),
            w.err()
        ),
    }
}

fn variants() -> Vec<Variant> {
    vec![
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
                    out.push(b.build().unwrap());
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
            s(5, 1300, 129), // several key chunks
            s(33, 70, 128),
            s(2, 40, 768),
        ],
        Mode::InBatch => vec![
            s(1, 0, 7),
            s(3, 0, 1),
            s(17, 0, 64),
            s(20, 0, 129),
            s(5, 0, 768),
        ],
        Mode::Cross => vec![
            s(1, 1, 7),
            s(5, 9, 64),
            s(17, 17, 129),
            s(3, 40, 768),
            s(4, 4, 1),
        ],
        Mode::Symmetric => vec![
            s(1, 0, 7),
            s(5, 0, 1),
            s(17, 0, 64),
            s(33, 0, 129),
            s(6, 0, 768),
        ],
    }
}

/// Every spec of the grid on one small shape, then a few specs on every shape, for dtype T.
fn grid<T: Element + DeviceElement>(gpu: &Gpu, mode: Mode, seed: u64) {
    let opts = DeviceOptions::default();
    let small = shapes(mode)[2];
    for (i, spec) in spec_grid(mode).iter().enumerate() {
        parity::<T>(gpu, spec, small, seed + i as u64, &opts);
    }
    let few = [
        LossSpec::builder(mode).temperature(0.1).build().unwrap(),
        LossSpec::builder(mode)
            .learnable_temperature(0.07)
            .normalize(true)
            .reduction(Reduction::None)
            .build()
            .unwrap(),
        LossSpec::builder(mode)
            .dystress(0.1, 0.2, DystressGrad::Full)
            .variant(Variant::Decoupled)
            .normalize(true)
            .build()
            .unwrap(),
        LossSpec::builder(mode)
            .variant(Variant::Simple {
                lambda: None,
                hard_k: None,
            })
            .reduction(Reduction::Sum)
            .build()
            .unwrap(),
    ];
    for (i, dims) in shapes(mode).into_iter().enumerate() {
        for (j, spec) in few.iter().enumerate() {
            parity::<T>(
                gpu,
                spec,
                dims,
                seed + 1000 + 10 * i as u64 + j as u64,
                &opts,
            );
        }
    }
    // Gradients in the input dtype.
    let opts = DeviceOptions {
        grad_dtype: GradDType::Input,
        ..DeviceOptions::default()
    };
    parity::<T>(gpu, &few[1], small, seed + 5000, &opts);
}

macro_rules! parity_tests {
    ($($name:ident: $mode:expr, $t:ty;)*) => {$(
        #[test]
        fn $name() {
            let Some(gpu) = support::gpu(stringify!($name)) else {
                return;
            };
            grid::<$t>(&gpu, $mode, 100);
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

/// Downloads every output of a device evaluation as raw bits.
fn bits<T: DeviceElement>(gpu: &Gpu, out: &fused_infonce::cuda::DeviceOutput<T>) -> Vec<u32> {
    let mut v: Vec<u32> = Vec::new();
    let f = |s: &cudarc::driver::CudaSlice<f32>| -> Vec<u32> {
        gpu.stream()
            .clone_dtoh(s)
            .unwrap()
            .iter()
            .map(|x: &f32| x.to_bits())
            .collect()
    };
    v.extend(f(&out.loss));
    v.extend(f(&out.lse));
    if let Some(c) = &out.lse_cols {
        v.extend(f(c));
    }
    if let Some(t) = &out.grad_temperature {
        v.extend(f(t));
    }
    for (_, g) in &out.grads {
        match g {
            fused_infonce::cuda::DeviceGrad::F32(m) => {
                v.extend(m.download(gpu).unwrap().iter().map(|x| x.to_bits()))
            }
            fused_infonce::cuda::DeviceGrad::Input(m) => v.extend(
                m.download(gpu)
                    .unwrap()
                    .iter()
                    .map(|x| (x.to_f64() as f32).to_bits()),
            ),
        }
    }
    v
}

#[test]
fn fused_loss_is_deterministic() {
    let Some(gpu) = support::gpu("fused_loss_is_deterministic") else {
        return;
    };
    // Queue mode with several key chunks (merged in a fixed order) and symmetric mode with both
    // passes adding into each gradient.
    for (mode, dims) in [
        (
            Mode::Queue,
            Dims {
                n: 9,
                k: 5000,
                d: 129,
            },
        ),
        (Mode::Symmetric, Dims { n: 70, k: 0, d: 64 }),
        (Mode::InBatch, Dims { n: 40, k: 0, d: 33 }),
    ] {
        let spec = LossSpec::builder(mode)
            .learnable_temperature(0.1)
            .normalize(true)
            .grad_queue(mode == Mode::Queue)
            .build()
            .unwrap();
        let data = Data::<f32>::new(mode, dims, 77, false, rows::<f32>);
        let inputs = data.inputs(mode);
        let mats: Vec<DeviceMatrix<f32>> = inputs
            .matrices()
            .iter()
            .map(|m| DeviceMatrix::upload(&gpu, m).unwrap())
            .collect();
        let dev = match mode {
            Mode::Queue => DeviceInputs::Queue {
                query: &mats[0],
                positive: &mats[1],
                queue: QueueView::whole(&mats[2]),
            },
            Mode::InBatch => DeviceInputs::InBatch {
                embeddings: &mats[0],
            },
            _ => DeviceInputs::Symmetric {
                query: &mats[0],
                key: &mats[1],
            },
        };
        let opts = DeviceOptions::default();
        let a = evaluate_device(&gpu, &spec, &dev, &Upstream::One, &opts).unwrap();
        let b = evaluate_device_poisoned(&gpu, &spec, &dev, &Upstream::One, &opts).unwrap();
        assert_eq!(bits(&gpu, &a), bits(&gpu, &b), "{mode:?}: two runs differ");
    }
}

/// hard:k and HardSimple on the GPU (thresholds from `cuda::steps::select`, then the fused kernels with
/// the threshold hook) against the reference, in every mode (symmetric rows and columns select
/// separately), for k = 1, a middle k and k ≥ #negatives (the standard loss).
#[test]
fn parity_hard_k() {
    let Some(gpu) = support::gpu("parity_hard_k") else {
        return;
    };
    let opts = DeviceOptions::default();
    for (spec, dims, seed) in hard_k_cases(false) {
        parity::<f32>(&gpu, &spec, dims, seed, &opts);
        parity::<bf16>(&gpu, &spec, dims, seed, &opts);
    }
}

/// Ties at the threshold are all kept (spec): a queue whose rows repeat gives exactly tied
/// similarities on both backends.
#[test]
fn parity_hard_k_ties() {
    let Some(gpu) = support::gpu("parity_hard_k_ties") else {
        return;
    };
    let (n, k, d) = (5, 24, 7);
    let mut rng = StdRng::seed_from_u64(77);
    let q: Vec<f32> = rows(&mut rng, n, d);
    let p: Vec<f32> = rows(&mut rng, n, d);
    let distinct: Vec<f32> = rows(&mut rng, 6, d);
    // Every distinct row four times: each similarity value appears four times per anchor.
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
        let want = reference::evaluate(&spec, &inputs, &Upstream::One).unwrap();
        let got = evaluate_on(
            &gpu,
            &spec,
            &inputs,
            &Upstream::One,
            &DeviceOptions::default(),
            true,
        )
        .unwrap();
        assert_outputs_close(
            &format!("ties hard:{hk}"),
            &(&got).into(),
            &want,
            1e-5,
            &Scales::of(&spec, &inputs, &Upstream::One),
        );
    }
}

#[test]
fn large_queue_beyond_2_pow_31_logits() {
    let Some(gpu) = support::gpu("large_queue_beyond_2_pow_31_logits") else {
        return;
    };
    if gpu.properties().emulated {
        // 2^31 logits through the host emulator would take hours; the 64-bit index arithmetic
        // is checked on a real GPU (scripts/gpu-bundle's runner).
        eprintln!("large_queue_beyond_2_pow_31_logits: real GPU only (not on the emulated device)");
        return;
    }
    // N·K = 32769 · 65536 > 2^31, forward only; the LSE of a few anchors (the last ones included)
    // is checked against an f64 computation on the host.
    let dims = Dims {
        n: 32769,
        k: 65536,
        d: 4,
    };
    let data = Data::<bf16>::new(Mode::Queue, dims, 11, false, rows::<bf16>);
    let inputs = data.inputs(Mode::Queue);
    let mats: Vec<DeviceMatrix<bf16>> = inputs
        .matrices()
        .iter()
        .map(|m| DeviceMatrix::upload(&gpu, m).unwrap())
        .collect();
    let dev = DeviceInputs::Queue {
        query: &mats[0],
        positive: &mats[1],
        queue: QueueView::whole(&mats[2]),
    };
    let tau = 0.2;
    let spec = LossSpec::queue()
        .temperature(tau)
        .reduction(Reduction::None)
        .build()
        .unwrap();
    let up = Upstream::PerAnchor(vec![1.0; dims.n]);
    let opts = DeviceOptions {
        forward_only: true,
        ..DeviceOptions::default()
    };
    let out = evaluate_device_poisoned(&gpu, &spec, &dev, &up, &opts).unwrap();
    assert!(out.grads.is_empty());
    let loss = gpu.stream().clone_dtoh(&out.loss).unwrap();
    let lse = gpu.stream().clone_dtoh(&out.lse).unwrap();
    assert_eq!(loss.len(), dims.n);
    assert!(loss.iter().chain(&lse).all(|x| x.is_finite()));
    let d = dims.d;
    let row = |v: &[bf16], i: usize| -> Vec<f64> {
        v[i * d..(i + 1) * d].iter().map(|x| x.to_f64()).collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    for i in [0, 1, 16383, 32767, 32768] {
        let q = row(&data.a, i);
        let zp = dot(&q, &row(&data.b, i)) / tau;
        let z: Vec<f64> = (0..dims.k)
            .map(|j| dot(&q, &row(&data.c, j)) / tau)
            .collect();
        let m = z.iter().copied().fold(zp, f64::max);
        let want = m + ((zp - m).exp() + z.iter().map(|x| (x - m).exp()).sum::<f64>()).ln();
        let e = (lse[i] as f64 - want).abs() / want.abs().max(1.0);
        assert!(e < 1e-4, "anchor {i}: lse {} want {want}", lse[i]);
        let el = (loss[i] as f64 - (want - zp)).abs() / (want - zp).abs().max(1.0);
        assert!(el < 1e-4, "anchor {i}: loss {} want {}", loss[i], want - zp);
    }
}

#[test]
fn shape_errors_match_the_cpu_backend() {
    let Some(gpu) = support::gpu("shape_errors_match_the_cpu_backend") else {
        return;
    };
    let q = vec![0.5f32; 6];
    let p = vec![0.5f32; 4];
    let inputs = LossInputs::Queue {
        query: MatRef::new("query", &q, 3, 2).unwrap(),
        positive: MatRef::new("positive", &p, 2, 2).unwrap(),
        queue: MatRef::new("queue", &p, 2, 2).unwrap(),
    };
    let spec = LossSpec::queue().build().unwrap();
    let e = evaluate_on(
        &gpu,
        &spec,
        &inputs,
        &Upstream::One,
        &DeviceOptions::default(),
        false,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
}

/// A queue read in place from a ring buffer that wraps (start near the end), every dtype, with
/// the queue's gradient (returned in queue order).
fn wrapped_ring<T: Element + DeviceElement>(gpu: &Gpu, seed: u64) {
    let (n, k, d, cap, start) = (6usize, 700usize, 65usize, 730usize, 690usize);
    let mut rng = StdRng::seed_from_u64(seed);
    let (q, p, m) = (
        rows::<T>(&mut rng, n, d),
        rows::<T>(&mut rng, n, d),
        rows::<T>(&mut rng, k, d),
    );
    let mut ring = rows::<T>(&mut rng, cap, d); // rows outside the queue hold other keys
    for j in 0..k {
        let r = (start + j) % cap;
        ring[r * d..(r + 1) * d].copy_from_slice(&m[j * d..(j + 1) * d]);
    }
    let spec = LossSpec::queue()
        .learnable_temperature(0.1)
        .normalize(true)
        .grad_queue(true)
        .build()
        .unwrap();
    let inputs = LossInputs::Queue {
        query: MatRef::new("query", &q, n, d).unwrap(),
        positive: MatRef::new("positive", &p, n, d).unwrap(),
        queue: MatRef::new("queue", &m, k, d).unwrap(),
    };
    let want = support::reference_as_stored(gpu, &spec, &inputs, &Upstream::One).unwrap();
    let up = |v: &[T], r| DeviceMatrix::upload(gpu, &MatRef::new("x", v, r, d).unwrap()).unwrap();
    let (qd, pd, rd) = (up(&q, n), up(&p, n), up(&ring, cap));
    let dev = DeviceInputs::Queue {
        query: &qd,
        positive: &pd,
        queue: QueueView {
            keys: &rd,
            start,
            len: k,
        },
    };
    let out = evaluate_device_poisoned(gpu, &spec, &dev, &Upstream::One, &DeviceOptions::default())
        .unwrap();
    support::assert_close(
        &format!("{} wrapped ring", T::DTYPE),
        &support::download(gpu, &out),
        &want,
        TOL,
        &spec,
        &inputs,
        &Upstream::One,
    );
}

#[test]
fn parity_wrapped_queue() {
    let Some(gpu) = support::gpu("parity_wrapped_queue") else {
        return;
    };
    wrapped_ring::<f32>(&gpu, 41);
    wrapped_ring::<f16>(&gpu, 42);
    wrapped_ring::<bf16>(&gpu, 43);
}
