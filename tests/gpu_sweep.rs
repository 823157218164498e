//! `infonce sweep --backend cuda` against `--backend cpu` on the built-in data: the GPU metric
//! kernels (uniformity, tolerance, penalty histogram, effective negatives) and the fused loss
//! agree with the f64 CPU metrics to f32 accuracy, for fixed and DySTreSS temperatures.
//! Without a GPU the test prints `skipped: no CUDA device` and returns.

mod support;

use std::process::Command;

fn sweep_json(
    backend: &str,
    dir: &std::path::Path,
    input: Option<&std::path::Path>,
) -> serde_json::Value {
    let path = dir.join(format!("{backend}.json"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infonce"));
    if let Some(dir) = support::emulated_device() {
        cmd.env(fused_infonce::cuda::emulated::ENV_DIR, dir);
    }
    let out = cmd
        .args([
            "sweep",
            "--backend",
            backend,
            "--temperatures",
            "0.05,0.2,1.0",
        ])
        .args(["--dystress", "0.1,0.2", "--json"])
        .arg(&path)
        .args(
            input
                .map(|p| {
                    vec![
                        "--labels".into(),
                        "--input".into(),
                        p.as_os_str().to_owned(),
                    ]
                })
                .unwrap_or_default(),
        )
        .output()
        .expect("run infonce");
    assert!(
        out.status.success(),
        "{backend}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(&path).expect("read json")).expect("parse json")
}

/// Clustered unit rows with labels in the in-batch layout of the built-in data, written as the
/// `embeddings` (f32) and `labels` (i64) tensors `--input --labels` reads.
fn small_input(dir: &std::path::Path) -> std::path::PathBuf {
    use fused_infonce::data::{stack, two_views, Clustered};
    let set = Clustered {
        classes: 6,
        per_class: 10,
        seed: 3,
        ..Clustered::default()
    }
    .generate()
    .unwrap();
    let noise = fused_infonce::train::TrainConfig::default().noise;
    let (a, b) = two_views(&set.x, noise, 5);
    let e = stack(&a, &b).unwrap();
    let labels: Vec<i64> = set.labels.iter().chain(&set.labels).copied().collect();
    let emb: Vec<u8> = e
        .data
        .iter()
        .flat_map(|&x| (x as f32).to_le_bytes())
        .collect();
    let lab: Vec<u8> = labels.iter().flat_map(|x| x.to_le_bytes()).collect();
    let tensors = vec![
        (
            "embeddings",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![e.rows, e.cols],
                &emb,
            )
            .unwrap(),
        ),
        (
            "labels",
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![labels.len()], &lab)
                .unwrap(),
        ),
    ];
    let path = dir.join("small.safetensors");
    safetensors::serialize_to_file(tensors, &None, &path).unwrap();
    path
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        got.is_finite() && (got - want).abs() <= tol * want.abs().max(1.0),
        "{what}: cuda {got} vs cpu {want}"
    );
}

#[test]
fn sweep_cuda_metrics_match_the_cpu_metrics() {
    let Some(_gpu) = support::gpu("sweep_cuda_metrics_match_the_cpu_metrics") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // The emulated device runs the built-in data's 2400 × 2400 pairs per metric pass in minutes;
    // it gets the same kind of data, smaller (6 classes × 10 samples, two views).
    let input = _gpu.properties().emulated.then(|| small_input(dir.path()));
    let (cpu, gpu) = (
        sweep_json("cpu", dir.path(), input.as_deref()),
        sweep_json("cuda", dir.path(), input.as_deref()),
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
