//! Criterion benchmarks of the presets of spec/performance.md: the fused op
//! (`cuda::evaluate_device`, path Auto), the tensor-core kernels (`cuda::paths::tensor_core`) and the unfused
//! baseline on the GPU, timed with CUDA
//! events (`iter_custom`), and the CPU reference on a small shape, which always runs.
//!
//! Without a GPU the GPU benchmarks print `skipped: no CUDA device` and only the CPU reference
//! runs; on the emulated CUDA device they are not timed. `cargo test --all-targets` runs each benchmark once (criterion's test mode); the `-xl`
//! presets run only under `cargo bench` (they take seconds to set up).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cudarc::driver::sys::CUevent_flags;
use fused_infonce::bench::PRESETS;
use fused_infonce::cuda::bench::{preset_fits, PresetInputs};
use fused_infonce::cuda::paths::unfused::Unfused;
use fused_infonce::cuda::{self, gpu_or_skip, DeviceOptions, Gpu};
use fused_infonce::{reference, Element, LossInputs, MatRef, Upstream};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn full_bench_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Device time of `iters` calls, measured with CUDA events; a failing call ends the benchmark
/// with a message (the time so far is returned, so criterion does not panic).
fn device_time(
    gpu: &Gpu,
    iters: u64,
    mut f: impl FnMut() -> fused_infonce::Result<()>,
) -> Duration {
    let s = gpu.stream();
    let start = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    for _ in 0..iters {
        if let Err(e) = f() {
            eprintln!("error: {e}");
            break;
        }
    }
    let end = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    match (start, end) {
        (Ok(a), Ok(b)) => {
            let _ = b.synchronize();
            let ms = a.elapsed_ms(&b).unwrap_or(0.0) as f64;
            Duration::from_secs_f64(ms.max(1e-6) * 1e-3)
        }
        _ => Duration::from_nanos(1),
    }
}

fn gpu_presets(c: &mut Criterion) {
    let Some(gpu) = gpu_or_skip("benches/presets (GPU presets)") else {
        return;
    };
    if gpu.properties().emulated {
        // Host builds of the kernels: their times mean nothing (`infonce bench` checks them).
        eprintln!("benches/presets: GPU presets not timed on the emulated CUDA device");
        return;
    }
    let unfused = Unfused::new(&gpu);
    let mut group = c.benchmark_group("preset");
    group.sample_size(20);
    for p in PRESETS {
        if p.name.ends_with("-xl") && !full_bench_run() {
            continue;
        }
        if let Err(e) = preset_fits(&gpu, &p) {
            eprintln!("{}: skipped: {e}", p.name);
            continue;
        }
        let inputs = match PresetInputs::random(&gpu, &p, 0) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("{}: skipped: {e}", p.name);
                continue;
            }
        };
        let spec = p.spec().expect("preset specs are valid");
        let view = inputs.inputs(p.mode);
        let opts = DeviceOptions::default();
        // Probe once: an unavailable implementation is reported, not benchmarked.
        match cuda::evaluate_device(&gpu, &spec, &view, &Upstream::One, &opts) {
            Ok(_) => {
                group.bench_function(BenchmarkId::new("fused", p.name), |b| {
                    b.iter_custom(|iters| {
                        device_time(&gpu, iters, || {
                            cuda::evaluate_device(&gpu, &spec, &view, &Upstream::One, &opts)
                                .map(drop)
                        })
                    })
                });
            }
            Err(e) => eprintln!("{} fused: skipped: {e}", p.name),
        }
        match fused_infonce::cuda::paths::tensor_core::evaluate(
            &gpu,
            &spec,
            &view,
            &Upstream::One,
            &opts,
        ) {
            Ok(_) => {
                group.bench_function(BenchmarkId::new("tc", p.name), |b| {
                    b.iter_custom(|iters| {
                        device_time(&gpu, iters, || {
                            fused_infonce::cuda::paths::tensor_core::evaluate(
                                &gpu,
                                &spec,
                                &view,
                                &Upstream::One,
                                &opts,
                            )
                            .map(drop)
                        })
                    })
                });
            }
            Err(e) => eprintln!("{} tc: skipped: {e}", p.name),
        }
        match &unfused {
            Ok(u) => match u.evaluate(&gpu, &spec, &view, &Upstream::One, &opts) {
                Ok(_) => {
                    group.bench_function(BenchmarkId::new("unfused", p.name), |b| {
                        b.iter_custom(|iters| {
                            device_time(&gpu, iters, || {
                                u.evaluate(&gpu, &spec, &view, &Upstream::One, &opts)
                                    .map(drop)
                            })
                        })
                    });
                }
                Err(e) => eprintln!("{} unfused: skipped: {e}", p.name),
            },
            Err(e) => eprintln!("{} unfused: skipped: {e}", p.name),
        }
    }
    group.finish();
}

fn unit_rows(seed: u64, rows: usize, d: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(rows * d);
    for _ in 0..rows {
        let r: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.extend(r.iter().map(|x| f32::from_f64(x / n)));
    }
    v
}

/// The CPU reference on a small queue-mode shape (always runs).
fn cpu_reference(c: &mut Criterion) {
    let (n, k, d) = (32, 512, 64);
    let q = unit_rows(1, n, d);
    let p = unit_rows(2, n, d);
    let m = unit_rows(3, k, d);
    let spec = PRESETS[0].spec().expect("valid");
    let inputs = LossInputs::Queue {
        query: MatRef::new("query", &q, n, d).expect("shape"),
        positive: MatRef::new("positive", &p, n, d).expect("shape"),
        queue: MatRef::new("queue", &m, k, d).expect("shape"),
    };
    let mut group = c.benchmark_group("cpu_reference");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(2));
    group.bench_function(BenchmarkId::new("queue", format!("{n}x{k}x{d}")), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(reference::evaluate(&spec, &inputs, &Upstream::One).ok());
            }
            t.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, cpu_reference, gpu_presets);
criterion_main!(benches);
