//! Training lowers the loss, and `infonce sweep` writes a valid PNG/SVG, parseable JSON and
//! one-line errors (small step counts keep this quick).

use fused_infonce::data::Clustered;
use fused_infonce::train::{train, TrainConfig, TrainMode};
use fused_infonce::{DystressGrad, Temperature};
use std::path::Path;
use std::process::{Command, Output};

fn small_config() -> TrainConfig {
    TrainConfig {
        data: Clustered {
            per_class: 20,
            ..Clustered::default()
        },
        batch: 64,
        steps: 40,
        ..TrainConfig::default()
    }
}

#[test]
fn training_lowers_the_loss_inbatch() {
    let cfg = small_config();
    for t in [
        Temperature::Fixed(0.1),
        Temperature::Fixed(0.5),
        Temperature::Dystress {
            tau_min: 0.1,
            tau_max: 0.2,
            grad: DystressGrad::Detach,
        },
    ] {
        let mut steps = 0;
        let r = train(&cfg, t, &mut |_| steps += 1).unwrap();
        assert_eq!(steps, cfg.steps);
        assert_eq!(r.curve.len(), cfg.steps);
        assert!(
            r.loss_after < r.loss_before - 0.05,
            "{t:?}: {} -> {}",
            r.loss_before,
            r.loss_after
        );
        // The trained embedding separates the classes at least as well as the initial one.
        assert!(r.after.knn_accuracy >= r.before.knn_accuracy - 0.02);
    }
}

#[test]
fn training_lowers_the_loss_queue() {
    let cfg = TrainConfig {
        mode: TrainMode::Queue { size: 256 },
        ..small_config()
    };
    let r = train(&cfg, Temperature::Fixed(0.2), &mut |_| {}).unwrap();
    assert!(
        r.loss_after < r.loss_before - 0.05,
        "{} -> {}",
        r.loss_before,
        r.loss_after
    );
}

#[test]
fn training_is_deterministic_and_checks_its_config() {
    let cfg = TrainConfig {
        steps: 3,
        ..small_config()
    };
    let a = train(&cfg, Temperature::Fixed(0.3), &mut |_| {}).unwrap();
    let b = train(&cfg, Temperature::Fixed(0.3), &mut |_| {}).unwrap();
    assert_eq!(a, b);
    let bad = TrainConfig {
        lr: -1.0,
        ..cfg.clone()
    };
    assert!(train(&bad, Temperature::Fixed(0.3), &mut |_| {}).is_err());
    assert!(train(&cfg, Temperature::Fixed(0.0), &mut |_| {}).is_err());
}

/// The program without the emulated CUDA device (as a user without a GPU runs it).
fn infonce(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infonce"))
        .env_remove(fused_infonce::cuda::emulated::ENV_DIR)
        .args(args)
        .output()
        .expect("run infonce")
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn sweep_train_writes_a_png_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("sweep.png");
    let json = dir.path().join("sweep.json");
    let out = infonce(&[
        "sweep",
        "--train",
        "--steps",
        "5",
        "--temperatures",
        "0.1,0.5",
        "--dystress",
        "0.1,0.2",
        "--plot",
        png.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() > 1000);
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("uniformity") && stdout.contains("dystress 0.1-0.2"));

    let v = read_json(&json);
    let temps = v["temperatures"].as_array().unwrap();
    assert_eq!(temps.len(), 3);
    assert_eq!(temps[2]["kind"], "dystress");
    let bins = v["bin_edges"].as_array().unwrap().len();
    for t in temps {
        let h = t["histogram"].as_array().unwrap();
        assert_eq!(h.len() + 1, bins);
        let total: f64 = h.iter().map(|x| x.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
    // Lower τ: fewer effective negatives, more of the gradient on hard negatives.
    let eff = |i: usize| temps[i]["effective_negatives"].as_f64().unwrap();
    let share = |i: usize| temps[i]["share_above_threshold"].as_f64().unwrap();
    assert!(eff(0) < eff(1) && share(0) > share(1));
    assert!(v["tolerance"].as_f64().is_some());
    let results = v["train"]["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        assert!(r["loss_after"].as_f64().unwrap() < r["loss_before"].as_f64().unwrap());
        let acc = r["after"]["knn_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
}

#[test]
fn sweep_train_with_a_queue() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("queue.json");
    let out = infonce(&[
        "sweep",
        "--train",
        "--queue",
        "128",
        "--steps",
        "5",
        "--temperatures",
        "0.2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let v = read_json(&json);
    assert_eq!(v["train"]["mode"], "queue 128");
    let r = &v["train"]["results"][0];
    assert!(r["loss_after"].as_f64().unwrap() < r["loss_before"].as_f64().unwrap());
}

#[test]
fn sweep_svg_plot_without_training() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("picture.svg");
    let out = infonce(&[
        "sweep",
        "--temperatures",
        "0.07,1.0",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("penalty histogram"));
}

fn write_safetensors(path: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::tensor::serialize(views, &None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn sweep_reads_input_embeddings_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let json = dir.path().join("out.json");
    // N = 6 pairs in D = 3: three pairs near e1 (label 0), three near e2 (label 1).
    let mut e = Vec::new();
    for view in 0..2 {
        for i in 0..6 {
            let j = 0.05 * (i + view) as f32;
            e.extend_from_slice(&if i < 3 { [1.0, j, 0.1] } else { [j, 1.0, -0.1] });
        }
    }
    let labels: Vec<i64> = vec![0, 0, 0, 1, 1, 1];
    write_safetensors(
        &input,
        &[
            (
                "embeddings",
                safetensors::Dtype::F32,
                vec![12, 3],
                e.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            (
                "labels",
                safetensors::Dtype::I64,
                vec![6],
                labels.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        ],
    );
    let out = infonce(&[
        "sweep",
        "--input",
        input.to_str().unwrap(),
        "--labels",
        "--temperatures",
        "0.1,1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let v = read_json(&json);
    assert_eq!(v["mode"], "inbatch");
    assert!(v["tolerance"].as_f64().unwrap() > 0.9);
    assert!(v["train"].is_null());

    // --labels with no labels tensor: a one-line error.
    let nolabels = dir.path().join("nolabels.safetensors");
    write_safetensors(
        &nolabels,
        &[(
            "embeddings",
            safetensors::Dtype::F32,
            vec![12, 3],
            e.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )],
    );
    let out = infonce(&["sweep", "--input", nolabels.to_str().unwrap(), "--labels"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("labels") && err.trim().lines().count() == 1,
        "{err}"
    );
}

#[test]
fn sweep_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<Vec<String>> = vec![
        vec![
            "--plot".into(),
            dir.path().join("x.jpg").display().to_string(),
        ],
        vec!["--temperatures".into(), "0.1,-2".into()],
        vec!["--dystress".into(), "0.2,0.1".into()],
        vec!["--dystress".into(), "0.2".into()],
        vec![
            "--input".into(),
            dir.path().join("missing.safetensors").display().to_string(),
        ],
    ];
    for case in cases {
        let mut args = vec!["sweep"];
        args.extend(case.iter().map(|s| s.as_str()));
        let out = infonce(&args);
        assert!(!out.status.success(), "{case:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("infonce: error: ") && err.trim().lines().count() == 1,
            "{case:?}: {err}"
        );
    }
    assert!(!dir.path().join("x.jpg").exists());
}

#[test]
fn sweep_cuda_backend_without_a_gpu_is_a_clear_error() {
    if fused_infonce::cuda::driver_present() {
        eprintln!(
            "sweep_cuda_backend_without_a_gpu_is_a_clear_error: a CUDA driver is present here"
        );
        return;
    }
    let out = infonce(&["sweep", "--backend", "cuda", "--temperatures", "0.1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("infonce: error: ") && err.trim().lines().count() == 1,
        "{err}"
    );
}
