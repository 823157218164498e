//! The candle op on candle's CUDA device (feature `candle-cuda`, a real GPU): for every mode, the
//! loss and candle's backward on CUDA tensors (f32, f16, bf16; fixed and learnable τ; reductions
//! mean and none) against the same op on candle's CPU device, whose parity with the f64 reference
//! tests/candle_op.rs checks; the gradients stay on the device, in the input dtype; a queue on the
//! device; and the mixed-device error.
//!
//! candle's CUDA device cannot be created on the emulated CUDA device (candle loads its own PTX
//! kernels and cuRAND, which the emulated device does not provide, and a `candle-cuda` build links
//! the real CUDA libraries): without a GPU these tests skip with `skipped: no CUDA device` (the
//! build itself needs the CUDA libraries, see scripts/check-candle-cuda). The shared borrowed
//! raw-pointer path is tested on the emulated device by tests/gpu_raw.rs.
#![cfg(feature = "candle-cuda")]

mod support;

use candle_core::{DType, Device, Tensor, Var};
use fused_infonce::candle::{InfoNce, Queue};
use fused_infonce::{LossSpec, Mode, Reduction};
use support::{rel_l2_floor, unit_rows};

/// candle's CUDA device 0, or `None` (the test prints `skipped: no CUDA device`) where none can
/// be created; with `FUSED_INFONCE_REQUIRE_GPU=1` (a GPU machine) that is a failure instead.
fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("FUSED_INFONCE_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("FUSED_INFONCE_REQUIRE_GPU=1 but candle's CUDA device 0 fails: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// The op on `dev` with inputs in `dtype`: (loss, each input's gradient, dτ), after a backward
/// of `Σ w·loss` (w = 1.7 for a reduced loss, per-anchor weights for none).
fn run(
    dev: &Device,
    mode: Mode,
    spec: &LossSpec,
    learnable: bool,
    dtype: DType,
) -> (Vec<f64>, Vec<Vec<f64>>, Option<f64>) {
    let (n, k, d) = (24, 40, 32);
    let shapes: Vec<usize> = match mode {
        Mode::Queue => vec![n, n, k],
        Mode::InBatch => vec![2 * n],
        Mode::Cross => vec![n, k],
        Mode::Symmetric => vec![n, n],
    };
    let vars: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, &rows)| {
            let t = Tensor::from_vec(unit_rows::<f32>(i as u64 + 1, rows, d), (rows, d), dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect();
    let tau = Var::new(0.1f32, dev).unwrap();
    let mut op = InfoNce::new(spec.clone());
    if learnable {
        op = op.with_temperature(tau.as_tensor()).unwrap();
    }
    let targets = Tensor::new(
        (0..n as i64)
            .map(|i| (i * 5) % k as i64)
            .collect::<Vec<_>>(),
        dev,
    )
    .unwrap();
    let loss = match mode {
        Mode::Queue => op.queue(&vars[0], &vars[1], &vars[2]),
        Mode::InBatch => op.inbatch(&vars[0]),
        Mode::Cross => op.cross(&vars[0], &vars[1], Some(&targets)),
        Mode::Symmetric => op.symmetric(&vars[0], &vars[1]),
    }
    .unwrap();
    let total = match spec.reduction() {
        Reduction::None => {
            let m = loss.dims1().unwrap();
            let w: Vec<f32> = (0..m).map(|i| 0.5 + (i % 3) as f32 * 0.5).collect();
            (&loss * Tensor::from_vec(w, m, dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
        }
        _ => (&loss * 1.7).unwrap(),
    };
    let grads = total.backward().unwrap();
    let g: Vec<Vec<f64>> = vars
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()))
        .map(|g| {
            assert!(g.device().same_device(dev), "the gradient left the device");
            assert_eq!(g.dtype(), dtype, "gradient dtype");
            host(g)
        })
        .collect();
    let dtau = learnable.then(|| host(grads.get(tau.as_tensor()).unwrap())[0]);
    (host(&loss), g, dtau)
}

#[test]
fn cuda_matches_cpu_for_every_mode() {
    let Some(gpu) = cuda() else { return };
    for mode in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric] {
        for reduction in [Reduction::Mean, Reduction::None] {
            for learnable in [false, true] {
                for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 1e-2), (DType::BF16, 2e-2)] {
                    let spec = LossSpec::builder(mode)
                        .temperature(0.1)
                        .reduction(reduction)
                        .normalize(true)
                        .build()
                        .unwrap();
                    let what = format!("{mode:?} {reduction:?} learnable={learnable} {dtype:?}");
                    let (l1, g1, t1) = run(&gpu, mode, &spec, learnable, dtype);
                    let (l2, g2, t2) = run(&Device::Cpu, mode, &spec, learnable, dtype);
                    let e = rel_l2_floor(&l1, &l2, 1e-3);
                    assert!(e <= tol, "{what}: loss {e:.2e}");
                    assert_eq!(g1.len(), g2.len(), "{what}: gradients");
                    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
                        let e = rel_l2_floor(a, b, 1e-3);
                        assert!(e <= tol, "{what}: grad {i} {e:.2e}");
                    }
                    if let (Some(a), Some(b)) = (t1, t2) {
                        assert!(
                            (a - b).abs() <= tol * b.abs().max(1e-3),
                            "{what}: dτ {a} {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn queue_on_the_device() {
    let Some(gpu) = cuda() else { return };
    let d = 16;
    let mut q = Queue::new(10, d, DType::F32, &gpu).unwrap();
    for s in 0..3 {
        let b = Tensor::from_vec(unit_rows::<f32>(s, 4, d), (4, d), &gpu).unwrap();
        q.enqueue(&b).unwrap();
    }
    assert_eq!((q.len(), q.start()), (10, 2));
    let query =
        Var::from_tensor(&Tensor::from_vec(unit_rows::<f32>(7, 5, d), (5, d), &gpu).unwrap())
            .unwrap();
    let pos = Tensor::from_vec(unit_rows::<f32>(8, 5, d), (5, d), &gpu).unwrap();
    let op = InfoNce::new(LossSpec::queue().temperature(0.2).build().unwrap());
    let on_gpu = op.queue(&query, &pos, &q.keys().unwrap()).unwrap();
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let on_cpu = op
        .queue(
            &cpu(query.as_tensor()),
            &cpu(&pos),
            &cpu(&q.keys().unwrap()),
        )
        .unwrap();
    let (a, b) = (host(&on_gpu)[0], host(&on_cpu)[0]);
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    assert!(on_gpu.backward().unwrap().get(&query).is_some());
}

#[test]
fn mixed_devices_are_an_error() {
    let Some(gpu) = cuda() else { return };
    let a = Tensor::zeros((4, 8), DType::F32, &gpu).unwrap();
    let b = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
    let op = InfoNce::new(LossSpec::symmetric().build().unwrap());
    let e = op.symmetric(&a, &b).unwrap_err().to_string();
    assert!(
        e.contains("every input of the loss must be on one device"),
        "{e}"
    );
}
