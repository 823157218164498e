//! The unfused baseline (cuBLAS GEMM → f32 logits → softmax cross-entropy → cuBLAS GEMMs) against
//! the CPU reference, for every mode it supports, f32 and bf16, every reduction, fixed and learnable
//! temperature, a wrapped queue ring, and its clear errors. Without a GPU each test prints
//! `skipped: no CUDA device` and returns.

mod support;

use fused_infonce::cuda::paths::unfused::{self, scratch_bytes};
use fused_infonce::cuda::{DeviceElement, DeviceInputs, DeviceOptions, GradDType, QueueView};
use fused_infonce::reference;
use fused_infonce::{bf16, DType, Error, LossInputs, LossSpec, Mode, Reduction, Upstream, Variant};
use support::*;

fn tol<T: DeviceElement>() -> f64 {
    if T::DTYPE == DType::F32 {
        1e-4
    } else {
        1e-2
    }
}

fn queue_case<T: DeviceElement>(spec: &LossSpec, n: usize, k: usize, d: usize, up_: Upstream) {
    let Some(gpu) = support::gpu("gpu_unfused queue") else {
        return;
    };
    let c = Case::<T>::new(11, n, k, d);
    let dc = DevCase::new(&gpu, &c);
    let pos = up(&gpu, "positive", &c.b[..n * d], n, d);
    let (hi, di) = queue_inputs(&c, &dc, &pos);
    let want = reference::evaluate(spec, &hi, &up_).unwrap();
    let got = unfused::evaluate(&gpu, spec, &di, &up_, &DeviceOptions::default()).unwrap();
    assert_close(
        &format!("queue {:?}", T::DTYPE),
        &download(&gpu, &got),
        &want,
        tol::<T>(),
        spec,
        &hi,
        &up_,
    );
}

#[test]
fn queue_f32_mean_learnable_with_queue_grad() {
    let spec = LossSpec::queue()
        .learnable_temperature(0.2)
        .grad_queue(true)
        .build()
        .unwrap();
    queue_case::<f32>(&spec, 37, 300, 64, Upstream::One);
}

#[test]
fn queue_bf16_sum() {
    let spec = LossSpec::queue()
        .temperature(0.07)
        .reduction(Reduction::Sum)
        .build()
        .unwrap();
    queue_case::<bf16>(&spec, 64, 1000, 128, Upstream::Scalar(0.5));
}

#[test]
fn queue_f32_none_per_anchor_upstream() {
    let spec = LossSpec::queue()
        .temperature(0.1)
        .reduction(Reduction::None)
        .build()
        .unwrap();
    let w: Vec<f64> = (0..19).map(|i| 0.1 + 0.05 * i as f64).collect();
    queue_case::<f32>(&spec, 19, 77, 32, Upstream::PerAnchor(w));
}

#[test]
fn queue_wrapped_ring() {
    let Some(gpu) = support::gpu("gpu_unfused queue_wrapped_ring") else {
        return;
    };
    let (n, cap, d, start, len) = (16, 300, 64, 100, 250);
    let c = Case::<f32>::new(5, n, cap, d);
    let dc = DevCase::new(&gpu, &c);
    let pos = up(&gpu, "positive", &c.b[..n * d], n, d);
    let mut ordered: Vec<f32> = c.c[start * d..].to_vec();
    ordered.extend_from_slice(&c.c[..(len - (cap - start)) * d]);
    let spec = LossSpec::queue()
        .temperature(0.2)
        .grad_queue(true)
        .build()
        .unwrap();
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
    let got =
        unfused::evaluate(&gpu, &spec, &di, &Upstream::One, &DeviceOptions::default()).unwrap();
    assert_close(
        "wrapped queue",
        &download(&gpu, &got),
        &want,
        1e-4,
        &spec,
        &hi,
        &Upstream::One,
    );
}

fn inbatch_case<T: DeviceElement>(reduction: Reduction) {
    let Some(gpu) = support::gpu("gpu_unfused inbatch") else {
        return;
    };
    let (n2, d) = (2 * 45, 96);
    let e = unit_rows::<T>(3, n2, d);
    let de = up(&gpu, "embeddings", &e, n2, d);
    let spec = LossSpec::inbatch()
        .temperature(0.1)
        .reduction(reduction)
        .build()
        .unwrap();
    let up_ = if reduction == Reduction::None {
        Upstream::PerAnchor(vec![1.0; n2])
    } else {
        Upstream::One
    };
    let hi = LossInputs::InBatch {
        embeddings: mat("embeddings", &e, n2, d),
    };
    let want = reference::evaluate(&spec, &hi, &up_).unwrap();
    let got = unfused::evaluate(
        &gpu,
        &spec,
        &DeviceInputs::InBatch { embeddings: &de },
        &up_,
        &DeviceOptions::default(),
    )
    .unwrap();
    assert_close(
        "inbatch",
        &download(&gpu, &got),
        &want,
        tol::<T>(),
        &spec,
        &hi,
        &up_,
    );
}

#[test]
fn inbatch_f32_mean() {
    inbatch_case::<f32>(Reduction::Mean);
}

#[test]
fn inbatch_bf16_none() {
    inbatch_case::<bf16>(Reduction::None);
}

#[test]
fn cross_f32_targets() {
    let Some(gpu) = support::gpu("gpu_unfused cross_f32_targets") else {
        return;
    };
    let (n, m, d) = (33, 70, 48);
    let a = unit_rows::<f32>(7, n, d);
    let b = unit_rows::<f32>(8, m, d);
    let t: Vec<i64> = (0..n as i64).map(|i| (i * 7 + 3) % m as i64).collect();
    let (da, db) = (up(&gpu, "query", &a, n, d), up(&gpu, "key", &b, m, d));
    let dt = gpu.stream().clone_htod(&t).unwrap();
    let spec = LossSpec::cross().temperature(0.3).build().unwrap();
    let hi = LossInputs::Cross {
        query: mat("query", &a, n, d),
        key: mat("key", &b, m, d),
        targets: Some(&t),
    };
    let want = reference::evaluate(&spec, &hi, &Upstream::One).unwrap();
    let got = unfused::evaluate(
        &gpu,
        &spec,
        &DeviceInputs::Cross {
            query: &da,
            key: &db,
            targets: Some(&dt),
        },
        &Upstream::One,
        &DeviceOptions::default(),
    )
    .unwrap();
    assert_close(
        "cross targets",
        &download(&gpu, &got),
        &want,
        1e-4,
        &spec,
        &hi,
        &Upstream::One,
    );
}

fn symmetric_case<T: DeviceElement>(grad_dtype: GradDType) {
    let Some(gpu) = support::gpu("gpu_unfused symmetric") else {
        return;
    };
    let (n, d) = (81, 64);
    let a = unit_rows::<T>(21, n, d);
    let b = unit_rows::<T>(22, n, d);
    let (da, db) = (up(&gpu, "query", &a, n, d), up(&gpu, "key", &b, n, d));
    let spec = LossSpec::symmetric()
        .learnable_temperature(0.07)
        .build()
        .unwrap();
    let hi = LossInputs::Symmetric {
        query: mat("query", &a, n, d),
        key: mat("key", &b, n, d),
    };
    let want = reference::evaluate(&spec, &hi, &Upstream::One).unwrap();
    let opts = DeviceOptions {
        grad_dtype,
        ..Default::default()
    };
    let got = unfused::evaluate(
        &gpu,
        &spec,
        &DeviceInputs::Symmetric {
            query: &da,
            key: &db,
        },
        &Upstream::One,
        &opts,
    )
    .unwrap();
    assert_close(
        "symmetric",
        &download(&gpu, &got),
        &want,
        tol::<T>(),
        &spec,
        &hi,
        &Upstream::One,
    );
}

#[test]
fn symmetric_f32_learnable() {
    symmetric_case::<f32>(GradDType::F32);
}

#[test]
fn symmetric_bf16_learnable_grads_in_bf16() {
    symmetric_case::<bf16>(GradDType::Input);
}

#[test]
fn forward_only_returns_no_gradients() {
    let Some(gpu) = support::gpu("gpu_unfused forward_only") else {
        return;
    };
    let c = Case::<f32>::new(1, 8, 40, 16);
    let dc = DevCase::new(&gpu, &c);
    let pos = up(&gpu, "positive", &c.b[..8 * 16], 8, 16);
    let (hi, di) = queue_inputs(&c, &dc, &pos);
    let spec = LossSpec::queue().temperature(0.2).build().unwrap();
    let opts = DeviceOptions {
        forward_only: true,
        ..Default::default()
    };
    let got = download(
        &gpu,
        &unfused::evaluate(&gpu, &spec, &di, &Upstream::One, &opts).unwrap(),
    );
    let want = reference::evaluate(&spec, &hi, &Upstream::One).unwrap();
    assert!(got.grads.is_empty());
    assert!(
        (got.loss[0] - want.loss.scalar().unwrap()).abs()
            < 1e-4 * want.loss.scalar().unwrap().abs()
    );
}

#[test]
fn other_variants_are_unsupported() {
    let Some(gpu) = support::gpu("gpu_unfused unsupported") else {
        return;
    };
    let c = Case::<f32>::new(1, 8, 40, 16);
    let dc = DevCase::new(&gpu, &c);
    let pos = up(&gpu, "positive", &c.b[..8 * 16], 8, 16);
    let (_, di) = queue_inputs(&c, &dc, &pos);
    let spec = LossSpec::queue()
        .variant(Variant::Decoupled)
        .build()
        .unwrap();
    let r = unfused::evaluate(&gpu, &spec, &di, &Upstream::One, &DeviceOptions::default());
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
}

#[test]
fn clip_xl_scratch_does_not_fit_80gb() {
    // Host-only arithmetic: runs everywhere.
    let b = scratch_bytes(Mode::Symmetric, 131_072, 131_072, DType::BF16, true);
    assert!(b > 80 * (1u64 << 30), "{b}");
    assert_eq!(scratch_bytes(Mode::Queue, 2, 3, DType::F32, true), 24);
    assert_eq!(scratch_bytes(Mode::Queue, 2, 3, DType::BF16, false), 24);
    assert_eq!(scratch_bytes(Mode::Queue, 2, 3, DType::BF16, true), 36);
}

#[test]
fn a_logit_matrix_larger_than_the_card_is_a_clear_error() {
    let Some(gpu) = support::gpu("gpu_unfused does_not_fit") else {
        return;
    };
    // 300k × 300k f32 logits = 360 GB: more than any single card; the inputs are tiny (D = 2).
    let (n, d) = (300_000, 2);
    let a = unit_rows::<bf16>(1, n, d);
    let (da, db) = (up(&gpu, "query", &a, n, d), up(&gpu, "key", &a, n, d));
    let spec = LossSpec::cross().temperature(0.1).build().unwrap();
    let r = unfused::evaluate(
        &gpu,
        &spec,
        &DeviceInputs::Cross {
            query: &da,
            key: &db,
            targets: None,
        },
        &Upstream::One,
        &DeviceOptions::default(),
    );
    match r {
        Err(Error::Unsupported(msg)) => assert!(msg.contains("does not fit"), "{msg}"),
        other => panic!("expected a 'does not fit' error, got {other:?}"),
    }
}
