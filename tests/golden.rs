//! The CPU reference against the golden cases in `../shared/testdata/golden` (computed by an
//! independent float64 implementation: numpy forward, autodiff gradients).

use fused_infonce::{cpu, DystressGrad, LossInputs, LossSpec, MatRef, Mode, Reduction, Variant};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    // A vendored copy of `../shared/testdata/golden` lives in tests/data/golden so a bare checkout
    // is self-contained; FUSED_INFONCE_GOLDEN_DIR points the test at another copy.
    let dir = std::env::var_os("FUSED_INFONCE_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden"));
    assert!(
        dir.join("manifest.json").is_file(),
        "golden test data missing: expected {}/manifest.json",
        dir.display()
    );
    dir
}

/// A tensor's values as f64 and its shape as (rows, cols) (a scalar is 1×1, a vector N×1).
fn read(st: &SafeTensors<'_>, name: &str) -> (Vec<f64>, usize, usize) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
    let data: Vec<f64> = match t.dtype() {
        Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect(),
        Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        d => panic!("tensor {name}: unexpected dtype {d:?}"),
    };
    let shape = t.shape();
    let (r, c) = match shape.len() {
        0 => (1, 1),
        1 => (shape[0], 1),
        _ => (shape[0], shape[1..].iter().product()),
    };
    (data, r, c)
}

/// The `infonce eval` flags of the manifest, mapped onto a spec (queue mode with `grad_queue`).
fn spec_from_args(args: &[String]) -> LossSpec {
    let mut mode = Mode::Queue;
    let mut tau = 0.07;
    let mut learnable = false;
    let mut dystress: Option<(f64, f64)> = None;
    let mut dgrad = DystressGrad::Detach;
    let mut variant = Variant::Standard;
    let mut reduction = Reduction::Mean;
    let mut normalize = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().expect("flag value").clone();
        match flag.as_str() {
            "--mode" => {
                mode = match value().as_str() {
                    "queue" => Mode::Queue,
                    "inbatch" => Mode::InBatch,
                    "cross" => Mode::Cross,
                    "symmetric" => Mode::Symmetric,
                    m => panic!("mode {m}"),
                }
            }
            "--temperature" => tau = value().parse().expect("temperature"),
            "--learnable-temperature" => learnable = true,
            "--dystress" => {
                let v = value();
                let (a, b) = v.split_once(',').expect("TMIN,TMAX");
                dystress = Some((a.parse().expect("tmin"), b.parse().expect("tmax")));
            }
            "--dystress-grad" => {
                dgrad = match value().as_str() {
                    "detach" => DystressGrad::Detach,
                    "full" => DystressGrad::Full,
                    g => panic!("dystress-grad {g}"),
                }
            }
            "--variant" => {
                let v = value();
                variant = match v.split_once(':') {
                    None if v == "standard" => Variant::Standard,
                    None if v == "decoupled" => Variant::Decoupled,
                    None if v == "simple" => Variant::Simple {
                        lambda: None,
                        hard_k: None,
                    },
                    Some(("hard", k)) => Variant::Hard {
                        k: k.parse().expect("k"),
                    },
                    Some(("simple", l)) => Variant::Simple {
                        lambda: Some(l.parse().expect("lambda")),
                        hard_k: None,
                    },
                    _ => panic!("variant {v}"),
                }
            }
            "--reduction" => {
                reduction = match value().as_str() {
                    "mean" => Reduction::Mean,
                    "sum" => Reduction::Sum,
                    "none" => Reduction::None,
                    r => panic!("reduction {r}"),
                }
            }
            "--normalize" => normalize = true,
            f => panic!("unknown flag {f}"),
        }
    }
    let mut b = LossSpec::builder(mode)
        .variant(variant)
        .reduction(reduction)
        .normalize(normalize)
        .grad_queue(mode == Mode::Queue);
    b = match (dystress, learnable) {
        (Some((lo, hi)), _) => b.dystress(lo, hi, dgrad),
        (None, true) => b.learnable_temperature(tau),
        (None, false) => b.temperature(tau),
    };
    b.build().expect("valid spec")
}

fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn golden_cases_agree_to_1e9() {
    let dir = golden_dir();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("manifest.json")).expect("read manifest.json"),
    )
    .expect("parse manifest.json");
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8, "expected at least 8 golden cases");
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let args: Vec<String> = case["eval_args"]
            .as_array()
            .expect("eval_args")
            .iter()
            .map(|a| a.as_str().expect("arg").to_string())
            .collect();
        let spec = spec_from_args(&args);
        let bytes = std::fs::read(dir.join(file)).expect("read case");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let names: Vec<&'static str> = match spec.mode() {
            Mode::Queue => vec!["query", "positive", "queue"],
            Mode::InBatch => vec!["embeddings"],
            Mode::Cross | Mode::Symmetric => vec!["query", "key"],
        };
        let tensors: Vec<(Vec<f64>, usize, usize)> = names.iter().map(|n| read(&st, n)).collect();
        let mats: Vec<MatRef<'_, f64>> = names
            .iter()
            .zip(&tensors)
            .map(|(n, (d, r, c))| MatRef::new(n, d, *r, *c).expect("matrix"))
            .collect();
        let inputs = match spec.mode() {
            Mode::Queue => LossInputs::Queue {
                query: mats[0],
                positive: mats[1],
                queue: mats[2],
            },
            Mode::InBatch => LossInputs::InBatch {
                embeddings: mats[0],
            },
            Mode::Cross => LossInputs::Cross {
                query: mats[0],
                key: mats[1],
                targets: None,
            },
            Mode::Symmetric => LossInputs::Symmetric {
                query: mats[0],
                key: mats[1],
            },
        };
        let out = cpu::evaluate(&spec, &inputs, &Default::default()).expect("evaluate");
        let (want_loss, _, _) = read(&st, "expected_loss");
        let loss = out.loss.scalar().expect("scalar loss");
        assert!(
            ((loss - want_loss[0]) / want_loss[0]).abs() < 1e-9,
            "{file}: loss {loss} vs {}",
            want_loss[0]
        );
        let mut checked = 0;
        for n in &names {
            let key = format!("expected_grad_{n}");
            if st.tensor(&key).is_err() {
                continue;
            }
            let (want, _, _) = read(&st, &key);
            let got = out.grad(n).unwrap_or_else(|| panic!("{file}: no grad {n}"));
            let e = rel_l2(&got.data, &want);
            assert!(e < 1e-9, "{file}: grad_{n} rel L2 error {e:e}");
            checked += 1;
        }
        assert_eq!(
            checked,
            names.len(),
            "{file}: every input has an expected gradient"
        );
        match st.tensor("expected_grad_temperature") {
            Ok(_) => {
                let (want, _, _) = read(&st, "expected_grad_temperature");
                let got = out.grad_temperature.expect("grad_temperature");
                assert!(
                    ((got - want[0]) / want[0]).abs() < 1e-9,
                    "{file}: dτ {got} vs {}",
                    want[0]
                );
            }
            Err(_) => assert!(out.grad_temperature.is_none(), "{file}: unexpected dτ"),
        }
    }
}
