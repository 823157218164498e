//! `infonce bench` as a program (spec/cli.md): it runs with or without a GPU, prints a table,
//! writes the JSON rows with the documented keys, and rejects bad arguments with a clear error.

mod support;

use std::process::Command;

fn infonce() -> Command {
    Command::new(env!("CARGO_BIN_EXE_infonce"))
}

#[test]
fn bench_runs_and_writes_json_rows() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = infonce()
        .args(["bench", "--preset", "moco", "--repeat", "3", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("preset"), "no table header:\n{stdout}");
    assert!(
        stdout.contains("--repeat 3 is below"),
        "no note about --repeat 3:\n{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().expect("rows");
    assert!(!rows.is_empty());
    for key in [
        "preset",
        "fused_ms",
        "unfused_ms",
        "torch_ms",
        "speedup_vs_unfused",
        "tflops",
        "pct_matrix_floor",
        "extra_mem_bytes",
    ] {
        assert!(rows[0].get(key).is_some(), "row lacks `{key}`: {}", rows[0]);
    }
    assert!(v.get("peaks").is_some(), "no peaks key");
    let device = v["device"].as_str();
    if device.is_none() {
        // No GPU: one line says so, and the CPU backends were benchmarked (the CPU `moco`
        // preset, then the reference on small shapes).
        assert!(stdout.contains("no usable GPU"), "{stdout}");
        assert_eq!(v["backend"], "cpu");
        assert_eq!(rows[0]["preset"], "moco");
        assert!(rows[0]["fused_ms"].as_f64().unwrap() > 0.0, "{}", rows[0]);
        assert!(rows
            .iter()
            .any(|r| r["cpu_ms"].as_f64().is_some_and(|t| t > 0.0)));
    } else if device.is_some_and(|d| d.contains("emulated device")) {
        // The emulated device: every implementation checked against the reference, none timed
        // (host builds of the kernels: a time would mean nothing), no peaks.
        assert_eq!(rows[0]["preset"], "moco");
        assert_eq!(rows[0]["check"], "fused, tc, unfused ok", "{}", rows[0]);
        for key in ["fused", "tc", "unfused"] {
            assert!(rows[0][format!("{key}_ms")].is_null(), "{}", rows[0]);
            assert_eq!(
                rows[0][format!("{key}_note")],
                "emulated device: checked, not timed"
            );
        }
        assert!(v["peaks"].is_null(), "{}", v["peaks"]);
    } else {
        assert_eq!(rows[0]["preset"], "moco");
        assert!(rows[0]["fused_ms"].as_f64().unwrap() > 0.0, "{}", rows[0]);
        assert!(v["peaks"]["bf16_gemm_tflops"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bench_rejects_unknown_preset_and_zero_repeat() {
    let out = infonce()
        .args(["bench", "--preset", "imagenet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
    let out = infonce().args(["bench", "--repeat", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("positive integer"));
}

/// The PyTorch timings merge into the rows of the device run (the parser's own cases are unit
/// tests of `cuda::bench::parse_torch_timings`); on the emulated device the run checks every
/// implementation on the small shape and times nothing.
#[test]
fn bench_merges_torch_timings() {
    let gpu = support::gpu("bench_merges_torch_timings");
    let dir = tempfile::tempdir().unwrap();
    let torch = dir.path().join("torch.json");
    std::fs::write(
        &torch,
        r#"[{"preset":"moco","torch_ms":1.5,"torch_compile_ms":1.2},
            {"preset":"clip","torch_ms":null,"torch_compile_ms":null,"torch_note":"no GPU"}]"#,
    )
    .unwrap();
    let json = dir.path().join("bench.json");
    let mut cmd = infonce();
    if let Some(d) = support::emulated_device() {
        cmd.env(fused_infonce::cuda::emulated::ENV_DIR, d);
    }
    let out = cmd
        .args(["bench", "--preset", "moco", "--repeat", "2", "--torch"])
        .arg(&torch)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let Some(gpu) = gpu else {
        // No driver at all: the CPU reference rows, without PyTorch's GPU timings.
        assert!(v["device"].is_null());
        return;
    };
    let row = &v["rows"][0];
    assert_eq!(row["preset"].as_str(), Some("moco"));
    assert_eq!(row["torch_ms"].as_f64(), Some(1.5));
    assert_eq!(row["torch_compile_ms"].as_f64(), Some(1.2));
    assert_eq!(
        row["check"].as_str(),
        Some("fused, tc, unfused ok"),
        "{row}"
    );
    if gpu.properties().emulated {
        assert!(
            row["fused_ms"].is_null() && row["unfused_ms"].is_null(),
            "{row}"
        );
        assert!(
            row["fused_note"]
                .as_str()
                .unwrap_or("")
                .contains("not timed"),
            "{row}"
        );
    }
    // A malformed file is an error naming the row, not a silent partial merge.
    std::fs::write(&torch, r#"[{"preset":"moco","torch_ms":"fast"}]"#).unwrap();
    let out = infonce()
        .args(["bench", "--preset", "moco", "--torch"])
        .arg(&torch)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("row 0"));
}

/// `--backend cpu` on every machine: the fused CPU path checked and timed against the unfused
/// CPU pipeline, numpy's timings merged from `--numpy` (so this test does not depend on numpy
/// being installed), the sgemm rate of the same run, then the reference on small shapes; a
/// GPU-only preset is refused with the way to run it.
#[test]
fn bench_cpu_backend_rows_and_numpy_merge() {
    let dir = tempfile::tempdir().unwrap();
    let numpy = dir.path().join("numpy.json");
    std::fs::write(
        &numpy,
        r#"[{"preset":"simclr-cpu","numpy_ms":900.0,"repeat":3,"blas":"openblas 0.3 (Haswell)"}]"#,
    )
    .unwrap();
    let json = dir.path().join("bench.json");
    let out = infonce()
        .args(["bench", "--backend", "cpu", "--preset", "simclr-cpu"])
        .args(["--repeat", "2", "--numpy"])
        .arg(&numpy)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for col in [
        "fused",
        "unfused",
        "numpy",
        "vs numpy",
        "% sgemm",
        "extra mem",
    ] {
        assert!(stdout.contains(col), "no column {col}:\n{stdout}");
    }
    assert!(stdout.contains("below 10"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["backend"], "cpu");
    assert!(v["sgemm_gflops"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["threads"].as_u64().unwrap() >= 1);
    let row = &v["rows"][0];
    assert_eq!(row["preset"], "simclr-cpu");
    let fused = row["fused_ms"].as_f64().unwrap();
    assert!(
        fused > 0.0 && row["unfused_ms"].as_f64().unwrap() > 0.0,
        "{row}"
    );
    assert_eq!(row["numpy_ms"].as_f64(), Some(900.0));
    let vs = row["speedup_vs_numpy"].as_f64().unwrap();
    assert!((vs - 900.0 / fused).abs() < 1e-9 * vs, "{row}");
    assert!(row["pct_of_sgemm"].as_f64().unwrap() > 0.0, "{row}");
    assert!(row["extra_mem_bytes"].as_u64().unwrap() > 0, "{row}");
    assert!(row["check"].as_str().unwrap().starts_with("ok"), "{row}");
    let rows = v["rows"].as_array().unwrap();
    assert!(
        rows.len() > 1
            && rows[1..]
                .iter()
                .all(|r| r["cpu_ms"].as_f64().unwrap() > 0.0)
    );

    let out = infonce()
        .args(["bench", "--backend", "cpu", "--preset", "clip-xl"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--backend cuda"), "{err}");
}
