//! `infonce sweep --backend cuda` against `--backend cpu` on the built-in data: the GPU metric
//! kernels (uniformity, tolerance, penalty histogram, effective negatives) and the fused loss
//! agree with the f64 CPU metrics to f32 accuracy, for fixed and DySTreSS temperatures.
//! Without a GPU the test prints `skipped: no CUDA device` and returns.

use std::process::Command;

fn sweep_json(backend: &str, dir: &std::path::Path) -> serde_json::Value {
    let path = dir.join(format!("{backend}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_infonce"))
        .args([
            "sweep",
            "--backend",
            backend,
            "--temperatures",
            "0.05,0.2,1.0",
        ])
        .args(["--dystress", "0.1,0.2", "--json"])
        .arg(&path)
        .output()
        .expect("run infonce");
    assert!(
        out.status.success(),
        "{backend}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(&path).expect("read json")).expect("parse json")
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        got.is_finite() && (got - want).abs() <= tol * want.abs().max(1.0),
        "{what}: cuda {got} vs cpu {want}"
    );
}

#[test]
fn sweep_cuda_metrics_match_the_cpu_metrics() {
    let Some(_gpu) = fused_infonce::cuda::gpu_or_skip("sweep_cuda_metrics_match_the_cpu_metrics")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (cpu, gpu) = (
        sweep_json("cpu", dir.path()),
        sweep_json("cuda", dir.path()),
    );
    assert_eq!(gpu["backend"].as_str(), Some("cuda"));
    for key in ["uniformity", "alignment", "tolerance"] {
        close(
            key,
            gpu[key].as_f64().expect(key),
            cpu[key].as_f64().expect(key),
            1e-4,
        );
    }
    let (rc, rg) = (
        cpu["temperatures"].as_array().expect("rows"),
        gpu["temperatures"].as_array().expect("rows"),
    );
    assert_eq!(rc.len(), rg.len());
    assert!(rc.len() >= 4);
    for (c, g) in rc.iter().zip(rg) {
        let label = c["label"].as_str().unwrap_or("?").to_string();
        for key in ["loss", "effective_negatives", "gradient_norm"] {
            close(
                &format!("{label} {key}"),
                g[key].as_f64().expect(key),
                c[key].as_f64().expect(key),
                1e-3,
            );
        }
        let (hc, hg) = (
            c["histogram"].as_array().expect("histogram"),
            g["histogram"].as_array().expect("histogram"),
        );
        assert_eq!(hc.len(), hg.len());
        let num: f64 = hc
            .iter()
            .zip(hg)
            .map(|(a, b)| (a.as_f64().unwrap() - b.as_f64().unwrap()).powi(2))
            .sum();
        let den: f64 = hc.iter().map(|a| a.as_f64().unwrap().powi(2)).sum();
        let e = (num / den).sqrt();
        assert!(e < 1e-3, "{label}: histogram relative L2 error {e:e}");
    }
}
