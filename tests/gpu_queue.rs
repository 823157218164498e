//! The device negative queue ([`NegativeQueue`]): enqueue as MoCo does after each step, read in
//! place across the wrap-around by the fused kernels. Checked against a host FIFO model and the
//! CPU reference on the logical (oldest-first) queue. Without a GPU each test prints
//! `skipped: no CUDA device` and returns.

mod support;

use fused_infonce::cuda::{
    evaluate_device_poisoned, DeviceGrad, DeviceInputs, DeviceMatrix, DeviceOptions, Gpu,
    NegativeQueue,
};
use fused_infonce::{reference, LossInputs, LossSpec, MatRef, Upstream};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rows(rng: &mut StdRng, r: usize, d: usize) -> Vec<f32> {
    let s = (3.0 / d as f32).sqrt();
    (0..r * d)
        .map(|_| rng.random_range(-1.0..1.0) * s)
        .collect()
}

fn upload(gpu: &Gpu, v: &[f32], r: usize, d: usize) -> DeviceMatrix<f32> {
    if r == 0 {
        return DeviceMatrix::zeros(gpu, 0, d).unwrap();
    }
    DeviceMatrix::upload(gpu, &MatRef::new("x", v, r, d).unwrap()).unwrap()
}

/// Relative L2 with ‖want‖ floored at 1e-6.
fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    support::rel_l2_floor(got, want, 1e-6)
}

#[test]
fn enqueue_keeps_the_newest_keys_in_fifo_order() {
    let Some(gpu) = support::gpu("enqueue_keeps_the_newest_keys_in_fifo_order") else {
        return;
    };
    let (cap, d) = (10, 3);
    let mut q = NegativeQueue::<f32>::new(&gpu, cap, d).unwrap();
    let mut model: Vec<f32> = Vec::new();
    let mut next = 0.0f32;
    for b in [4usize, 4, 4, 1, 13, 0, 6] {
        let batch: Vec<f32> = (0..b * d).map(|i| next + i as f32).collect();
        next += (b * d) as f32;
        q.enqueue(&upload(&gpu, &batch, b, d)).unwrap();
        model.extend(&batch);
        let keep = model.len().saturating_sub(cap * d);
        model.drain(..keep);
        let ring = q.storage().download(&gpu).unwrap();
        let v = q.view();
        assert_eq!(v.len * d, model.len());
        let got: Vec<f32> = (0..v.len)
            .flat_map(|j| {
                let r = (v.start + j) % cap;
                ring[r * d..(r + 1) * d].to_vec()
            })
            .collect();
        assert_eq!(got, model);
    }
    assert_eq!(q.len(), cap);
    assert!(q.start() != 0, "the test should end with a wrapped ring");
}

#[test]
fn wrapped_queue_matches_the_cpu_reference() {
    let Some(gpu) = support::gpu("wrapped_queue_matches_the_cpu_reference") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(5);
    let (n, cap, d) = (7usize, 1500usize, 65usize);
    let mut q = NegativeQueue::<f32>::new(&gpu, cap, d).unwrap();
    let mut logical: Vec<f32> = Vec::new();
    for b in [600usize, 600, 600, 250] {
        let batch = rows(&mut rng, b, d);
        q.enqueue(&upload(&gpu, &batch, b, d)).unwrap();
        logical.extend(&batch);
        let keep = logical.len().saturating_sub(cap * d);
        logical.drain(..keep);
    }
    let view = q.view();
    assert!(
        view.start + view.len > cap,
        "the ring must wrap for this test"
    );
    let query = rows(&mut rng, n, d);
    let positive = rows(&mut rng, n, d);
    let k = view.len;
    for spec in [
        LossSpec::queue()
            .temperature(0.1)
            .grad_queue(true)
            .build()
            .unwrap(),
        LossSpec::queue()
            .learnable_temperature(0.2)
            .normalize(true)
            .grad_queue(true)
            .build()
            .unwrap(),
    ] {
        let inputs = LossInputs::Queue {
            query: MatRef::new("query", &query, n, d).unwrap(),
            positive: MatRef::new("positive", &positive, n, d).unwrap(),
            queue: MatRef::new("queue", &logical, k, d).unwrap(),
        };
        let want = reference::evaluate(&spec, &inputs, &Upstream::One).unwrap();
        let (qd, pd) = (upload(&gpu, &query, n, d), upload(&gpu, &positive, n, d));
        let dev = DeviceInputs::Queue {
            query: &qd,
            positive: &pd,
            queue: view,
        };
        let out =
            evaluate_device_poisoned(&gpu, &spec, &dev, &Upstream::One, &DeviceOptions::default())
                .unwrap();
        let loss = gpu.stream().clone_dtoh(&out.loss).unwrap()[0] as f64;
        let wl = want.loss.scalar().unwrap();
        assert!(
            (loss - wl).abs() <= 1e-5 * wl.abs().max(1.0),
            "loss {loss} want {wl}"
        );
        let lse: Vec<f64> = gpu
            .stream()
            .clone_dtoh(&out.lse)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        assert!(rel_l2(&lse, &want.lse) < 1e-5);
        assert_eq!(out.grads.len(), 3);
        for ((name, g), w) in out.grads.iter().zip(&want.grads) {
            assert_eq!(*name, w.name);
            let DeviceGrad::F32(m) = g else {
                panic!("f32 gradients by default")
            };
            let got: Vec<f64> = m
                .download(&gpu)
                .unwrap()
                .iter()
                .map(|&x| x as f64)
                .collect();
            let e = rel_l2(&got, &w.value.data);
            assert!(e < 1e-5, "{spec:?} grad_{name}: rel L2 {e}");
        }
        if let Some(t) = &out.grad_temperature {
            let g = gpu.stream().clone_dtoh(t).unwrap()[0] as f64;
            let w = want.grad_temperature.unwrap();
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1e-3), "dτ {g} want {w}");
        }
    }
}

/// `cuda::evaluate` runs on one process-wide device handle, opened once: a training loop calling
/// it every step does not open and close a context each time.
#[test]
fn evaluate_reuses_the_default_device() {
    let Some(_gpu) = support::gpu("evaluate_reuses_the_default_device") else {
        return;
    };
    let first = fused_infonce::cuda::default_gpu().unwrap();
    let (q, p, m) = ([0.6f32, 0.8], [0.8f32, 0.6], [1.0f32, 0.0, 0.0, 1.0]);
    let inputs = fused_infonce::LossInputs::Queue {
        query: support::mat("query", &q, 1, 2),
        positive: support::mat("positive", &p, 1, 2),
        queue: support::mat("queue", &m, 2, 2),
    };
    let spec = fused_infonce::LossSpec::queue().build().unwrap();
    for _ in 0..3 {
        fused_infonce::cuda::evaluate(&spec, &inputs, &fused_infonce::Upstream::One).unwrap();
    }
    let again = fused_infonce::cuda::default_gpu().unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again));
}
