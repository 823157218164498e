//! The tensor-core kernels (`cuda::paths::tensor_core::evaluate`) against the CPU reference and the
//! v1 kernels (KernelPath::Simple): f16/bf16 within 1e-2 relative L2, shapes that are not
//! multiples of the tiles, a wrapped queue ring, an empty queue, reductions, learnable τ, device
//! memory poisoned with NaN before each run, and the gradient filter (Exact equals the reference;
//! a threshold changes dq by less than its documented bound and leaves the loss unchanged).
//! Without a GPU each test prints `skipped: no CUDA device` and returns.

mod support;

use fused_infonce::cuda::paths::tensor_core::{self, filter_bound};
use fused_infonce::cuda::{
    evaluate_device, DeviceElement, DeviceInputs, DeviceOptions, Gpu, GradFilter, KernelPath,
    QueueView,
};
use fused_infonce::reference;
use fused_infonce::{bf16, f16, Error, LossInputs, LossSpec, Reduction, Upstream};
use support::*;

const TOL: f64 = 1e-2;

/// Fills 256 MiB of device memory with NaN and frees it, so a kernel that reads memory it did not
/// write (from the allocator's reused blocks) produces NaN.
fn poison(gpu: &Gpu) {
    let nan = vec![f32::NAN; 64 << 20];
    let buf = gpu.stream().clone_htod(&nan).unwrap();
    drop(buf);
}

fn run_tc<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    di: &DeviceInputs<'_, T>,
    up_: &Upstream,
    opts: &DeviceOptions,
) -> HostOut {
    poison(gpu);
    let out = tensor_core::evaluate(gpu, spec, di, up_, opts).unwrap();
    download(gpu, &out)
}

fn queue_parity<T: DeviceElement>(n: usize, k: usize, d: usize, spec: LossSpec, up_: Upstream) {
    let Some(gpu) = support::gpu("gpu_fast queue_parity") else {
        return;
    };
    let c = Case::<T>::new(41, n, k, d);
    let dc = DevCase::new(&gpu, &c);
    let pos = up(&gpu, "positive", &c.b[..n * d], n, d);
    let (hi, di) = queue_inputs(&c, &dc, &pos);
    let want = reference::evaluate(&spec, &hi, &up_).unwrap();
    let got = run_tc(&gpu, &spec, &di, &up_, &DeviceOptions::default());
    assert_close(
        &format!("tc queue {:?} {n}×{k}×{d}", T::DTYPE),
        &got,
        &want,
        TOL,
        &spec,
        &hi,
        &up_,
    );

    // Against the v1 kernels where they exist.
    let simple = DeviceOptions {
        path: KernelPath::Simple,
        ..Default::default()
    };
    match evaluate_device(&gpu, &spec, &di, &up_, &simple) {
        Ok(o) => {
            // The v1 kernels as the reference, with the same floors (the loss of an empty queue
            // is exactly 0 in both).
            let v1 = download(&gpu, &o);
            let sc = Scales::of(&spec, &hi, &up_);
            let floor = (v1.loss.len() as f64).sqrt() * sc.logit;
            let e = rel_l2_floor(&got.loss, &v1.loss, floor);
            assert!(e <= TOL, "loss vs v1: {e:e}");
            for ((na, a), (nb, b)) in got.grads.iter().zip(&v1.grads) {
                assert_eq!(na, nb);
                let e = rel_l2_floor(a, b, sc.grad);
                assert!(e <= TOL, "grad_{na} vs v1: {e:e}");
            }
        }
        Err(Error::Unsupported(why)) => eprintln!("v1 comparison skipped: {why}"),
        Err(e) => panic!("v1 kernels failed: {e}"),
    }
}

#[test]
fn bf16_d128_moco_like() {
    let spec = LossSpec::queue().temperature(0.2).build().unwrap();
    queue_parity::<bf16>(100, 1000, 128, spec, Upstream::One);
}

#[test]
fn f16_d64_learnable_sum() {
    let spec = LossSpec::queue()
        .learnable_temperature(0.07)
        .reduction(Reduction::Sum)
        .build()
        .unwrap();
    queue_parity::<f16>(130, 777, 64, spec, Upstream::Scalar(2.0));
}

#[test]
fn bf16_d128_none_per_anchor_weights() {
    let spec = LossSpec::queue()
        .temperature(0.1)
        .reduction(Reduction::None)
        .build()
        .unwrap();
    let w: Vec<f64> = (0..70).map(|i| 0.5 + (i % 7) as f64 * 0.25).collect();
    queue_parity::<bf16>(70, 4096 + 13, 128, spec, Upstream::PerAnchor(w));
}

#[test]
fn bf16_many_splits() {
    // 8 queries, 20k keys: every block is one of many splits; merges are exercised.
    let spec = LossSpec::queue().temperature(0.05).build().unwrap();
    queue_parity::<bf16>(8, 20_000, 128, spec, Upstream::One);
}

#[test]
fn empty_queue_is_the_positive_only() {
    let spec = LossSpec::queue().temperature(0.2).build().unwrap();
    queue_parity::<bf16>(33, 0, 64, spec, Upstream::One);
}

#[test]
fn wrapped_ring() {
    let Some(gpu) = support::gpu("gpu_fast wrapped_ring") else {
        return;
    };
    let (n, cap, d, start, len) = (50, 900, 128, 700, 600);
    let c = Case::<bf16>::new(9, n, cap, d);
    let dc = DevCase::new(&gpu, &c);
    let pos = up(&gpu, "positive", &c.b[..n * d], n, d);
    let mut ordered = c.c[start * d..].to_vec();
    ordered.extend_from_slice(&c.c[..(len - (cap - start)) * d]);
    let spec = LossSpec::queue().temperature(0.2).build().unwrap();
    let hi = LossInputs::Queue {
        query: mat("query", &c.a, n, d),
        positive: mat("positive", &c.b[..n * d], n, d),
        queue: mat("queue", &ordered, len, d),
    };
    let di = DeviceInputs::Queue {
        query: &dc.a,
        positive: &pos,
        queue: QueueView {
            keys: &dc.c,
            start,
            len,
        },
    };
    let want = reference::evaluate(&spec, &hi, &Upstream::One).unwrap();
    let got = run_tc(&gpu, &spec, &di, &Upstream::One, &DeviceOptions::default());
    assert_close(
        "tc wrapped ring",
        &got,
        &want,
        TOL,
        &spec,
        &hi,
        &Upstream::One,
    );
}

#[test]
fn gradient_filter_exact_and_bounded() {
    let Some(gpu) = support::gpu("gpu_fast gradient_filter") else {
        return;
    };
    let (n, k, d, tau) = (64, 8192, 128, 0.05);
    let c = Case::<bf16>::new(3, n, k, d);
    let dc = DevCase::new(&gpu, &c);
    let pos = up(&gpu, "positive", &c.b[..n * d], n, d);
    let (hi, di) = queue_inputs(&c, &dc, &pos);
    let spec = LossSpec::queue().temperature(tau).build().unwrap();
    let want = reference::evaluate(&spec, &hi, &Upstream::One).unwrap();
    let exact = run_tc(&gpu, &spec, &di, &Upstream::One, &DeviceOptions::default());
    assert_close(
        "exact filter",
        &exact,
        &want,
        TOL,
        &spec,
        &hi,
        &Upstream::One,
    );
    let zero = run_tc(
        &gpu,
        &spec,
        &di,
        &Upstream::One,
        &DeviceOptions {
            filter: GradFilter::Threshold(0.0),
            ..Default::default()
        },
    );
    assert_eq!(zero.grads, exact.grads, "threshold 0 never skips");
    let theta = 1e-4;
    let filt = run_tc(
        &gpu,
        &spec,
        &di,
        &Upstream::One,
        &DeviceOptions {
            filter: GradFilter::Threshold(theta as f32),
            ..Default::default()
        },
    );
    assert_eq!(filt.loss, exact.loss, "the filter leaves the loss exact");
    // Per-row bound: w = 1/N, unit-norm queue rows (bf16 rounding: 1.01).
    let bound = filter_bound(1.0 / n as f64, theta, k, 1.01, tau);
    let (dq_f, dq_e) = (&filt.grads[0].1, &exact.grads[0].1);
    for i in 0..n {
        let diff: f64 = (0..d)
            .map(|j| (dq_f[i * d + j] - dq_e[i * d + j]).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff <= bound * 1.05 + 1e-6,
            "row {i}: |Δdq| = {diff:e} > bound {bound:e}"
        );
    }
}

#[test]
fn unsupported_cases_say_so() {
    let Some(gpu) = support::gpu("gpu_fast unsupported") else {
        return;
    };
    let c = Case::<f32>::new(1, 16, 64, 64);
    let dc = DevCase::new(&gpu, &c);
    let pos = up(&gpu, "positive", &c.b[..16 * 64], 16, 64);
    let (_, di) = queue_inputs(&c, &dc, &pos);
    let spec = LossSpec::queue().build().unwrap();
    let r = tensor_core::evaluate(&gpu, &spec, &di, &Upstream::One, &DeviceOptions::default());
    assert!(
        matches!(r, Err(Error::Unsupported(_))),
        "f32 without tf32: {r:?}"
    );
    let cb = Case::<bf16>::new(1, 16, 64, 96);
    let dcb = DevCase::new(&gpu, &cb);
    let posb = up(&gpu, "positive", &cb.b[..16 * 96], 16, 96);
    let (_, dib) = queue_inputs(&cb, &dcb, &posb);
    let r = tensor_core::evaluate(&gpu, &spec, &dib, &Upstream::One, &DeviceOptions::default());
    assert!(matches!(r, Err(Error::Unsupported(_))), "D = 96: {r:?}");
}

fn pair_parity<T: DeviceElement>(spec: LossSpec, n: usize, m: usize, d: usize, targets: bool) {
    pair_parity_weighted::<T>(spec, n, m, d, targets, Upstream::One);
}

fn pair_parity_weighted<T: DeviceElement>(
    spec: LossSpec,
    n: usize,
    m: usize,
    d: usize,
    targets: bool,
    up_: Upstream,
) {
    let Some(gpu) = support::gpu("gpu_fast pair_parity") else {
        return;
    };
    let a = unit_rows::<T>(51, n, d);
    let b = unit_rows::<T>(52, m, d);
    let t: Vec<i64> = (0..n as i64).map(|i| (i * 5 + 1) % m as i64).collect();
    let (da, db) = (up(&gpu, "query", &a, n, d), up(&gpu, "key", &b, m, d));
    let dt = gpu.stream().clone_htod(&t).unwrap();
    let (hi, di) = match spec.mode() {
        fused_infonce::Mode::InBatch => (
            LossInputs::InBatch {
                embeddings: mat("embeddings", &a, n, d),
            },
            DeviceInputs::InBatch { embeddings: &da },
        ),
        fused_infonce::Mode::Cross => (
            LossInputs::Cross {
                query: mat("query", &a, n, d),
                key: mat("key", &b, m, d),
                targets: targets.then_some(&t[..]),
            },
            DeviceInputs::Cross {
                query: &da,
                key: &db,
                targets: targets.then_some(&dt),
            },
        ),
        _ => (
            LossInputs::Symmetric {
                query: mat("query", &a, n, d),
                key: mat("key", &b, m, d),
            },
            DeviceInputs::Symmetric {
                query: &da,
                key: &db,
            },
        ),
    };
    let want = reference::evaluate(&spec, &hi, &up_).unwrap();
    let got = run_tc(&gpu, &spec, &di, &up_, &DeviceOptions::default());
    assert_close(
        &format!("tc {:?} {:?} {n}×{m}×{d} {up_:?}", spec.mode(), T::DTYPE),
        &got,
        &want,
        TOL,
        &spec,
        &hi,
        &up_,
    );
}

#[test]
fn inbatch_bf16_d128() {
    pair_parity::<bf16>(
        LossSpec::inbatch().temperature(0.1).build().unwrap(),
        2 * 75,
        2 * 75,
        128,
        false,
    );
}

#[test]
fn cross_f16_d64_with_targets() {
    pair_parity::<f16>(
        LossSpec::cross().temperature(0.2).build().unwrap(),
        90,
        130,
        64,
        true,
    );
}

/// f16 gradients with tiny weights: the pair kernels pack g = w(P − onehot) into f16 for the
/// gradient product, and f16 is normal only from 6.1e-5 (subnormal spacing 6e-8, values below
/// 3e-8 flush to zero). Mean weights at N = 8192 with P ≈ 1/N give g ≈ 1.5e-8: most negatives'
/// terms would vanish. Here a 1e-3 upstream weight on a mean over 256 anchors (w ≈ 3.9e-6) with
/// P ≈ 1/512 gives g ≈ 8e-9, the same flush, in a problem the emulated device runs in seconds.
/// The kernels scale the weights by a power of two before packing (`tensor_core::weight_scale`), so the
/// gradients keep f16's relative precision whatever the weights.
#[test]
fn f16_pair_gradients_with_tiny_weights_do_not_underflow() {
    pair_parity_weighted::<f16>(
        LossSpec::cross().temperature(0.2).build().unwrap(),
        256,
        512,
        64,
        true,
        Upstream::Scalar(1e-3),
    );
}

/// The same at the size where it bites in training: in-batch SimCLR with 2N = 8192 f16
/// embeddings and mean weights. Real GPU only (the emulated device would take many minutes; the
/// test above covers the numerics there).
#[test]
fn f16_inbatch_8192_mean_gradients() {
    let Some(gpu) = support::gpu("f16_inbatch_8192_mean_gradients") else {
        return;
    };
    if gpu.properties().emulated {
        eprintln!("f16_inbatch_8192_mean_gradients: real GPU only (not on the emulated device)");
        return;
    }
    pair_parity::<f16>(
        LossSpec::inbatch().temperature(0.1).build().unwrap(),
        8192,
        8192,
        64,
        false,
    );
}

#[test]
fn cross_bf16_d128_identity_sum() {
    let spec = LossSpec::cross()
        .temperature(0.3)
        .reduction(Reduction::Sum)
        .build()
        .unwrap();
    pair_parity::<bf16>(spec, 70, 100, 128, false);
}

#[test]
fn symmetric_bf16_d128_learnable() {
    pair_parity::<bf16>(
        LossSpec::symmetric()
            .learnable_temperature(0.07)
            .build()
            .unwrap(),
        200,
        200,
        128,
        false,
    );
}

#[test]
fn pair_gradient_filter_bounded() {
    let Some(gpu) = support::gpu("gpu_fast pair_gradient_filter") else {
        return;
    };
    let (n, d, tau, theta) = (256, 128, 0.05, 1e-4);
    let a = unit_rows::<bf16>(61, n, d);
    let b = unit_rows::<bf16>(62, n, d);
    let (da, db) = (up(&gpu, "query", &a, n, d), up(&gpu, "key", &b, n, d));
    let di = DeviceInputs::Symmetric {
        query: &da,
        key: &db,
    };
    let spec = LossSpec::symmetric().temperature(tau).build().unwrap();
    let exact = run_tc(&gpu, &spec, &di, &Upstream::One, &DeviceOptions::default());
    let filt = run_tc(
        &gpu,
        &spec,
        &di,
        &Upstream::One,
        &DeviceOptions {
            filter: GradFilter::Threshold(theta as f32),
            ..Default::default()
        },
    );
    assert_eq!(filt.loss, exact.loss, "the filter leaves the loss exact");
    let w = 0.5 / n as f64;
    let bound =
        fused_infonce::cuda::paths::tensor_core::pair_filter_bound(w, w, theta, n, 1.01, tau);
    for ((name, f), (_, e)) in filt.grads.iter().zip(&exact.grads) {
        for i in 0..n {
            let diff: f64 = (0..d)
                .map(|j| (f[i * d + j] - e[i * d + j]).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                diff <= bound * 1.05 + 1e-6,
                "grad_{name} row {i}: {diff:e} > {bound:e}"
            );
        }
    }
}

#[test]
fn f32_with_tf32_opt_in_runs_on_tensor_cores() {
    let Some(gpu) = support::gpu("gpu_fast tf32") else {
        return;
    };
    let (n, k, d) = (40, 700, 64);
    let c = Case::<f32>::new(71, n, k, d);
    let dc = DevCase::new(&gpu, &c);
    let pos = up(&gpu, "positive", &c.b[..n * d], n, d);
    let (hi, di) = queue_inputs(&c, &dc, &pos);
    let spec = LossSpec::queue()
        .learnable_temperature(0.1)
        .build()
        .unwrap();
    let want = reference::evaluate(&spec, &hi, &Upstream::One).unwrap();
    let got = run_tc(
        &gpu,
        &spec,
        &di,
        &Upstream::One,
        &DeviceOptions {
            tf32: true,
            ..Default::default()
        },
    );
    assert_close("tf32 queue", &got, &want, TOL, &spec, &hi, &Upstream::One);
    // Rows far outside the f16 range are refused, not silently overflowed.
    let big: Vec<f32> = c.a.iter().map(|x| x * 1e6).collect();
    let db = up(&gpu, "query", &big, n, d);
    let di = DeviceInputs::Queue {
        query: &db,
        positive: &pos,
        queue: QueueView::whole(&dc.c),
    };
    let r = tensor_core::evaluate(
        &gpu,
        &spec,
        &di,
        &Upstream::One,
        &DeviceOptions {
            tf32: true,
            ..Default::default()
        },
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    // With normalisation the rows are normalised in f32 first: rows of norm 1e6 (outside f16)
    // and 1e-9 (f16 would flush them to zero) are fine.
    let spec_n = LossSpec::queue()
        .learnable_temperature(0.1)
        .normalize(true)
        .build()
        .unwrap();
    let tiny: Vec<f32> = c.b[..n * d].iter().map(|x| x * 1e-9).collect();
    let dt = up(&gpu, "positive", &tiny, n, d);
    let hi = LossInputs::Queue {
        query: mat("query", &big, n, d),
        positive: mat("positive", &tiny, n, d),
        queue: mat("queue", &c.c, k, d),
    };
    let di = DeviceInputs::Queue {
        query: &db,
        positive: &dt,
        queue: QueueView::whole(&dc.c),
    };
    let want = reference::evaluate(&spec_n, &hi, &Upstream::One).unwrap();
    let got = run_tc(
        &gpu,
        &spec_n,
        &di,
        &Upstream::One,
        &DeviceOptions {
            tf32: true,
            ..Default::default()
        },
    );
    assert_close(
        "tf32 queue, normalised huge/tiny rows",
        &got,
        &want,
        TOL,
        &spec_n,
        &hi,
        &Upstream::One,
    );
}

/// The embedded tensor-core module's SASS holds HMMA instructions (checked where `cuobjdump` is on
/// PATH, as on the GPU machine; the pip nvcc package has no cuobjdump, so elsewhere it skips).
#[test]
fn sass_contains_hmma() {
    let Some(bytes) = fused_infonce::cuda::module::fatbin("infonce_mma") else {
        eprintln!("sass_contains_hmma: skipped: kernels not built");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("infonce_mma.fatbin");
    std::fs::write(&path, bytes).unwrap();
    let out = match std::process::Command::new("cuobjdump")
        .arg("-sass")
        .arg(&path)
        .output()
    {
        Ok(o) if o.status.success() => o,
        _ => {
            eprintln!("sass_contains_hmma: skipped: no working cuobjdump on PATH");
            return;
        }
    };
    let sass = String::from_utf8_lossy(&out.stdout);
    let hmma = sass.matches("HMMA").count();
    let ldsm = sass.matches("LDSM").count();
    let ldgsts = sass.matches("LDGSTS").count();
    eprintln!("infonce_mma SASS: {hmma} HMMA, {ldsm} LDSM, {ldgsts} LDGSTS");
    assert!(hmma > 0, "no HMMA in the tensor-core module's SASS");
    assert!(ldsm > 0 && ldgsts > 0, "no ldmatrix / cp.async in the SASS");
}

/// Normalisation on the tensor-core path (kernels/normalize.cu composed with the loss kernels):
/// rows with norms from 0.3 to 3 in queue, inbatch, cross (targets) and symmetric (learnable τ)
/// modes, against the reference with `normalize` on.
#[test]
fn normalized_inputs_on_tensor_cores() {
    let Some(gpu) = support::gpu("gpu_fast normalized_inputs") else {
        return;
    };
    let rows = |seed: u64, r: usize, d: usize| -> Vec<bf16> {
        let u = unit_rows::<f32>(seed, r, d);
        (0..r * d)
            .map(|i| {
                let h = ((i / d) as u64 * 7919 + seed * 104_729) % 101;
                bf16::from_f32(u[i] * (0.3 + 2.7 * h as f32 / 100.0))
            })
            .collect()
    };
    let check =
        |what: &str, spec: LossSpec, hi: LossInputs<'_, bf16>, di: DeviceInputs<'_, bf16>| {
            let want = reference::evaluate(&spec, &hi, &Upstream::One).unwrap();
            let got = run_tc(&gpu, &spec, &di, &Upstream::One, &DeviceOptions::default());
            assert_close(what, &got, &want, TOL, &spec, &hi, &Upstream::One);
        };

    // The queue as a wrapped ring (capacity k + 7, starting 3 rows before the end) with junk rows
    // of norm ~100 outside the view.
    let (n, k, d) = (70, 300, 64);
    let (q, p, m) = (rows(61, n, d), rows(62, n, d), rows(63, k, d));
    let (cap, start) = (k + 7, k + 4);
    let mut ring = vec![bf16::from_f32(100.0 / (d as f32).sqrt()); cap * d];
    for j in 0..k {
        let at = (start + j) % cap;
        ring[at * d..(at + 1) * d].copy_from_slice(&m[j * d..(j + 1) * d]);
    }
    let (dq, dp, dm) = (
        up(&gpu, "query", &q, n, d),
        up(&gpu, "positive", &p, n, d),
        up(&gpu, "queue", &ring, cap, d),
    );
    check(
        "normalized queue (wrapped ring)",
        LossSpec::queue()
            .temperature(0.1)
            .normalize(true)
            .build()
            .unwrap(),
        LossInputs::Queue {
            query: mat("query", &q, n, d),
            positive: mat("positive", &p, n, d),
            queue: mat("queue", &m, k, d),
        },
        DeviceInputs::Queue {
            query: &dq,
            positive: &dp,
            queue: QueueView {
                keys: &dm,
                start,
                len: k,
            },
        },
    );

    let (r, d) = (80, 128);
    let e = rows(64, r, d);
    let de = up(&gpu, "embeddings", &e, r, d);
    check(
        "normalized inbatch",
        LossSpec::inbatch()
            .temperature(0.1)
            .normalize(true)
            .build()
            .unwrap(),
        LossInputs::InBatch {
            embeddings: mat("embeddings", &e, r, d),
        },
        DeviceInputs::InBatch { embeddings: &de },
    );

    let (n, m, d) = (33, 90, 64);
    let (a, b) = (rows(65, n, d), rows(66, m, d));
    let (da, db) = (up(&gpu, "query", &a, n, d), up(&gpu, "key", &b, m, d));
    let t: Vec<i64> = (0..n as i64).map(|i| (i * 7 + 3) % m as i64).collect();
    let dt = gpu.stream().clone_htod(&t).unwrap();
    check(
        "normalized cross",
        LossSpec::cross()
            .temperature(0.2)
            .normalize(true)
            .build()
            .unwrap(),
        LossInputs::Cross {
            query: mat("query", &a, n, d),
            key: mat("key", &b, m, d),
            targets: Some(&t),
        },
        DeviceInputs::Cross {
            query: &da,
            key: &db,
            targets: Some(&dt),
        },
    );

    let (n, d) = (70, 128);
    let (a, b) = (rows(67, n, d), rows(68, n, d));
    let (da, db) = (up(&gpu, "query", &a, n, d), up(&gpu, "key", &b, n, d));
    check(
        "normalized symmetric",
        LossSpec::symmetric()
            .learnable_temperature(0.07)
            .normalize(true)
            .build()
            .unwrap(),
        LossInputs::Symmetric {
            query: mat("query", &a, n, d),
            key: mat("key", &b, n, d),
        },
        DeviceInputs::Symmetric {
            query: &da,
            key: &db,
        },
    );
}
