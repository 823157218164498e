//! The benchmarks' shared parts, whatever the backend (spec/performance.md): the presets, a
//! timing's median and spread, PyTorch's timings to merge, the report and its rows (the
//! `infonce bench --json` format), and the f64 reference timed on small shapes where no GPU is.
//! The GPU runs are [`crate::cuda::bench`]'s.

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::loss::{LossInputs, Upstream};
use crate::progress::Progress;
use crate::spec::{LossSpec, Mode};
use crate::tensor::{Element, MatRef};
use half::bf16;

/// PyTorch's timings of one preset, as `bench/torch_reference.py` prints them (a JSON array of
/// these); `null` timings with a note where a preset did not run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TorchTiming {
    /// The preset's name.
    pub preset: String,
    /// PyTorch eager, milliseconds.
    #[serde(default)]
    pub torch_ms: Option<f64>,
    /// `torch.compile`, milliseconds.
    #[serde(default)]
    pub torch_compile_ms: Option<f64>,
    /// Why a timing is missing.
    #[serde(default)]
    pub torch_note: Option<String>,
}

/// Parses `bench/torch_reference.py`'s output (named `source` in messages). A row that is not
/// an object with a string `preset` and numbers or nulls for the timings, a timing that is not a
/// positive finite number, or a preset given twice is an error naming the row: a malformed file
/// is reported, not silently merged in part.
pub fn parse_torch_timings(text: &str, source: &str) -> Result<Vec<TorchTiming>> {
    parse_timings(text, source, |t: &TorchTiming| {
        (
            &t.preset,
            vec![
                ("torch_ms", t.torch_ms),
                ("torch_compile_ms", t.torch_compile_ms),
            ],
        )
    })
}

/// The rows of a timing file (a JSON array of `T`), each checked: `fields` gives a row's preset
/// and its timings (`None`: not measured), each of which must be a positive finite number; a
/// preset may appear once.
fn parse_timings<T: serde::de::DeserializeOwned>(
    text: &str,
    source: &str,
    fields: impl Fn(&T) -> (&String, Vec<(&'static str, Option<f64>)>),
) -> Result<Vec<T>> {
    let bad = |what: String| Error::Input(format!("{source}: {what}"));
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| bad(format!("not a JSON array of rows (not JSON: {e})")))?;
    let rows = v
        .as_array()
        .ok_or_else(|| bad("not a JSON array of rows".into()))?;
    let mut out: Vec<T> = Vec::with_capacity(rows.len());
    let mut seen: Vec<String> = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let t: T = serde_json::from_value(row.clone())
            .map_err(|e| bad(format!("row {i} ({row}): {e}")))?;
        let (preset, times) = fields(&t);
        for (name, ms) in times {
            if let Some(x) = ms.filter(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(bad(format!(
                    "row {i} (preset {preset}): {name} = {x} is not a time"
                )));
            }
        }
        if seen.contains(preset) {
            return Err(bad(format!("row {i}: preset {preset} appears twice")));
        }
        seen.push(preset.clone());
        out.push(t);
    }
    Ok(out)
}

/// numpy's timing of one CPU preset, as `bench/numpy_reference.py` prints it (a JSON array of
/// these): the unfused pipeline users write in numpy, on the same preset.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NumpyTiming {
    /// The preset's name.
    pub preset: String,
    /// Median milliseconds.
    pub numpy_ms: f64,
    /// Fastest call.
    #[serde(default)]
    pub numpy_min_ms: Option<f64>,
    /// Calls timed.
    #[serde(default)]
    pub repeat: Option<usize>,
    /// The BLAS numpy ran on (as threadpoolctl reports it).
    #[serde(default)]
    pub blas: Option<String>,
}

/// Parses `bench/numpy_reference.py`'s output (named `source` in messages); a malformed row, a
/// timing that is not a positive finite number or a preset given twice is an error naming it.
pub fn parse_numpy_timings(text: &str, source: &str) -> Result<Vec<NumpyTiming>> {
    parse_timings(text, source, |t: &NumpyTiming| {
        (
            &t.preset,
            vec![
                ("numpy_ms", Some(t.numpy_ms)),
                ("numpy_min_ms", t.numpy_min_ms),
            ],
        )
    })
}

/// Repetitions below which a median is not reported as a benchmark figure.
pub const MIN_REPEAT: usize = 20;

/// One timed region: the median and spread of `samples` CUDA-event measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Median milliseconds.
    pub median_ms: f64,
    /// Fastest repetition.
    pub min_ms: f64,
    /// Slowest repetition.
    pub max_ms: f64,
    /// Every repetition, in run order.
    pub samples: Vec<f64>,
}

impl Timing {
    /// From raw samples (at least one).
    pub fn from_samples(samples: Vec<f64>) -> Self {
        let mut s = samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        let median_ms = if s.is_empty() {
            f64::NAN
        } else if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            0.5 * (s[s.len() / 2 - 1] + s[s.len() / 2])
        };
        Self {
            median_ms,
            min_ms: s.first().copied().unwrap_or(f64::NAN),
            max_ms: s.last().copied().unwrap_or(f64::NAN),
            samples,
        }
    }
}

/// A benchmark shape of spec/performance.md.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// `moco`, `moco-xl`, `simclr`, `clip`, `clip-xl`; on the CPU `moco`, `simclr-cpu`, `clip-cpu`.
    pub name: &'static str,
    /// The mode.
    pub mode: Mode,
    /// Anchors: N (queue, symmetric) or 2N (inbatch).
    pub anchors: usize,
    /// Keys: K (queue), 2N (inbatch), N (symmetric).
    pub keys: usize,
    /// D.
    pub dim: usize,
    /// τ.
    pub tau: f64,
    /// Whether τ is learnable (dτ is part of the work).
    pub learnable: bool,
}

/// Every GPU preset, in the order of spec/performance.md (all bf16).
pub const PRESETS: [Preset; 5] = [
    Preset {
        name: "moco",
        mode: Mode::Queue,
        anchors: 256,
        keys: 65_536,
        dim: 128,
        tau: 0.2,
        learnable: false,
    },
    Preset {
        name: "moco-xl",
        mode: Mode::Queue,
        anchors: 4096,
        keys: 1 << 20,
        dim: 128,
        tau: 0.2,
        learnable: false,
    },
    Preset {
        name: "simclr",
        mode: Mode::InBatch,
        anchors: 8192,
        keys: 8192,
        dim: 128,
        tau: 0.1,
        learnable: false,
    },
    Preset {
        name: "clip",
        mode: Mode::Symmetric,
        anchors: 32_768,
        keys: 32_768,
        dim: 768,
        tau: 0.07,
        learnable: true,
    },
    Preset {
        name: "clip-xl",
        mode: Mode::Symmetric,
        anchors: 131_072,
        keys: 131_072,
        dim: 1024,
        tau: 0.07,
        learnable: true,
    },
];

/// The CPU presets (spec/performance.md, *The CPU backend*; f32): `moco` at its real shape,
/// `simclr-cpu`, `clip-cpu`. Work: loss + dq + dp, loss + dE, loss + dA + dB + dτ.
pub const CPU_PRESETS: [Preset; 3] = [
    PRESETS[0],
    Preset {
        name: "simclr-cpu",
        mode: Mode::InBatch,
        anchors: 4096,
        keys: 4096,
        dim: 128,
        tau: 0.1,
        learnable: false,
    },
    Preset {
        name: "clip-cpu",
        mode: Mode::Symmetric,
        anchors: 4096,
        keys: 4096,
        dim: 768,
        tau: 0.07,
        learnable: true,
    },
];

impl Preset {
    /// The GPU preset called `name`.
    pub fn by_name(name: &str) -> Option<Preset> {
        PRESETS.iter().copied().find(|p| p.name == name)
    }

    /// The CPU preset called `name`.
    pub fn cpu_by_name(name: &str) -> Option<Preset> {
        CPU_PRESETS.iter().copied().find(|p| p.name == name)
    }

    /// The preset's loss spec (mean reduction; the queue's gradient is not asked for, as MoCo).
    pub fn spec(&self) -> Result<LossSpec> {
        let b = LossSpec::builder(self.mode);
        if self.learnable {
            b.learnable_temperature(self.tau).build()
        } else {
            b.temperature(self.tau).build()
        }
    }

    /// The rows of its three inputs `a`, `b`, `c`: query / positive / queue (queue mode), the
    /// embeddings (inbatch), query / key (cross, symmetric); 0 for the ones a mode does not use.
    pub fn rows(&self) -> (usize, usize, usize) {
        match self.mode {
            Mode::Queue => (self.anchors, self.anchors, self.keys),
            Mode::InBatch => (self.anchors, 0, 0),
            _ => (self.anchors, self.keys, 0),
        }
    }

    /// The same spec on a small shape of the same mode (for the correctness check before timing).
    pub fn small(&self) -> Preset {
        Preset {
            anchors: if self.mode == Mode::InBatch { 256 } else { 128 },
            keys: match self.mode {
                Mode::Queue => 2048,
                Mode::InBatch => 256,
                _ => 128,
            },
            dim: self.dim.min(256),
            ..*self
        }
    }

    /// Matrix FLOPs of the fused schedule (spec/performance.md): `2·anchors·keys·D` per product;
    /// two products in queue mode (S and Σ P·m, one pass), four otherwise (S, the recompute in
    /// the backward, two gradient products).
    pub fn matrix_flops(&self) -> f64 {
        let products = if self.mode == Mode::Queue { 2.0 } else { 4.0 };
        2.0 * self.anchors as f64 * self.keys as f64 * self.dim as f64 * products
    }

    /// One exponential per logit per pass.
    pub fn exps(&self) -> f64 {
        let passes = if self.mode == Mode::Queue { 1.0 } else { 2.0 };
        self.anchors as f64 * self.keys as f64 * passes
    }

    /// Bytes of the inputs (bf16).
    pub fn input_bytes(&self) -> u64 {
        let rows = match self.mode {
            Mode::Queue => 2 * self.anchors + self.keys,
            Mode::InBatch => self.anchors,
            _ => 2 * self.anchors,
        };
        (rows * self.dim * 2) as u64
    }

    /// Bytes of the gradients (f32, every input except the queue).
    pub fn grad_bytes(&self) -> u64 {
        let rows = match self.mode {
            Mode::Queue => 2 * self.anchors,
            Mode::InBatch => self.anchors,
            _ => 2 * self.anchors,
        };
        (rows * self.dim * 4) as u64
    }

    /// The matrix floor in milliseconds at `tflops`.
    pub fn matrix_floor_ms(&self, tflops: f64) -> f64 {
        self.matrix_flops() / (tflops * 1e12) * 1e3
    }
}

/// One preset's result (the `--json` row; `null` where not measured).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// The preset's name (and shape, for the reference's small shapes).
    pub preset: String,
    /// The fused op, median milliseconds.
    pub fused_ms: Option<f64>,
    /// The unfused pipeline, median milliseconds.
    pub unfused_ms: Option<f64>,
    /// PyTorch eager (merged from `bench/torch_reference.py`).
    pub torch_ms: Option<f64>,
    /// `torch.compile`.
    pub torch_compile_ms: Option<f64>,
    /// Why a PyTorch timing is missing.
    pub torch_note: Option<String>,
    /// `unfused_ms / fused_ms`.
    pub speedup_vs_unfused: Option<f64>,
    /// The fused op's matrix TFLOP/s.
    pub tflops: Option<f64>,
    /// The matrix floor (measured peak) as a percentage of the fused time.
    pub pct_matrix_floor: Option<f64>,
    /// Device memory the fused op allocates beyond its inputs and gradients (bytes).
    pub extra_mem_bytes: Option<u64>,
    /// Spread of the fused timing (min, max).
    pub fused_min_max_ms: Option<(f64, f64)>,
    /// Spread of the unfused timing (min, max).
    pub unfused_min_max_ms: Option<(f64, f64)>,
    /// Extra device memory of the unfused pipeline (bytes).
    pub unfused_extra_mem_bytes: Option<u64>,
    /// The tensor-core kernels called directly (`cuda::paths::tensor_core::evaluate`).
    pub tc_ms: Option<f64>,
    /// Spread of the tensor-core timing.
    pub tc_min_max_ms: Option<(f64, f64)>,
    /// `unfused_ms / tc_ms`.
    pub tc_speedup_vs_unfused: Option<f64>,
    /// The tensor-core kernels' TFLOP/s.
    pub tc_tflops: Option<f64>,
    /// Their percentage of the matrix floor.
    pub tc_pct_matrix_floor: Option<f64>,
    /// Their extra device memory (bytes).
    pub tc_extra_mem_bytes: Option<u64>,
    /// Why the tensor-core figure is missing.
    pub tc_note: Option<String>,
    /// Why the fused figure is missing.
    pub fused_note: Option<String>,
    /// Why the unfused figure is missing.
    pub unfused_note: Option<String>,
    /// numpy's unfused pipeline on the same preset (CPU presets), median milliseconds.
    pub numpy_ms: Option<f64>,
    /// Why numpy's figure is missing, or the BLAS it ran on.
    pub numpy_note: Option<String>,
    /// `numpy_ms / fused_ms`.
    pub speedup_vs_numpy: Option<f64>,
    /// CPU presets: the fused schedule's block-product GFLOP/s (every other step counted as
    /// product time).
    pub gflops: Option<f64>,
    /// CPU presets: the unfused pipeline's product GFLOP/s.
    pub unfused_gflops: Option<f64>,
    /// CPU presets: `gflops` as a percentage of the matrix crate's sgemm rate measured in the
    /// same run.
    pub pct_of_sgemm: Option<f64>,
    /// The small-shape check against the reference.
    pub check: String,
    /// The f64 reference, milliseconds (no-GPU runs only).
    pub cpu_ms: Option<f64>,
}

/// The machine's measured peaks (spec/performance.md, "Floors"), where measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Peaks {
    /// Dense bf16 GEMM through cuBLAS (bf16 in and out, f32 accumulation), TFLOP/s.
    pub bf16_gemm_tflops: f64,
    /// Device-to-device copy, bytes read + written per second, TB/s.
    pub copy_tbps: f64,
}

/// A benchmark run: where it ran and every preset's row (`infonce bench --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The device (`None`: no GPU).
    pub device: Option<String>,
    /// The driver.
    pub driver: Option<String>,
    /// The commit benchmarked (`git rev-parse --short HEAD`, or `unknown`).
    pub commit: String,
    /// When (seconds since the Unix epoch).
    pub unix_time: u64,
    /// Timed repetitions per measurement.
    pub repeat: usize,
    /// `cuda`, or `cpu` (the CPU presets; the reference's small shapes where no GPU is).
    pub backend: String,
    /// The peaks measured in the same run (GPU).
    pub peaks: Option<Peaks>,
    /// The matrix crate's sgemm rate measured in the same run (CPU), GFLOP/s.
    pub sgemm_gflops: Option<f64>,
    /// Threads the CPU runs used.
    pub threads: Option<usize>,
    /// One row per preset.
    pub rows: Vec<Row>,
}

impl Report {
    /// A report of `backend`'s rows measured here and now.
    pub fn new(
        backend: &str,
        device: Option<String>,
        driver: Option<String>,
        repeat: usize,
    ) -> Self {
        Report {
            backend: backend.to_string(),
            device,
            driver,
            commit: commit(),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            repeat,
            peaks: None,
            sgemm_gflops: None,
            threads: None,
            rows: Vec::new(),
        }
    }

    /// Writes the report as pretty JSON to `path`, atomically (a temporary file renamed).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::Input(format!("json: {e}")))?;
        crate::io::write_atomic(path, (text + "\n").as_bytes())
    }
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// `‖got − want‖ / ‖want‖`; infinite where the lengths differ or `got` is not finite (a wrong
/// result is never a small error).
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// `rows × d` random rows of unit L2 norm, seeded (never zeros), rounded to `T`.
pub fn unit_rows<T: Element>(seed: u64, rows: usize, d: usize) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(rows * d);
    for _ in 0..rows {
        let r: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let n = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        out.extend(r.iter().map(|x| T::from_f64(x / n)));
    }
    out
}

/// Host inputs of a preset's shape in bf16 (small shapes: the data is generated on the host):
/// `a`, `b`, `c` as [`Preset::rows`] lays them out.
#[derive(Debug, Clone)]
pub struct HostCase {
    /// The first input.
    pub a: Vec<bf16>,
    /// The second (empty in inbatch mode).
    pub b: Vec<bf16>,
    /// The queue (empty outside queue mode).
    pub c: Vec<bf16>,
    /// The shape.
    pub preset: Preset,
}

impl HostCase {
    /// Random unit rows of `p`'s shape (seeds 1, 2, 3).
    pub fn new(p: Preset) -> Self {
        let (ra, rb, rc) = p.rows();
        Self {
            a: unit_rows(1, ra, p.dim),
            b: unit_rows(2, rb, p.dim),
            c: unit_rows(3, rc, p.dim),
            preset: p,
        }
    }

    /// The loss inputs of the preset's mode over these rows.
    pub fn inputs(&self) -> Result<LossInputs<'_, bf16>> {
        let d = self.preset.dim;
        fn m<'a>(name: &'static str, v: &'a [bf16], d: usize) -> Result<MatRef<'a, bf16>> {
            MatRef::new(name, v, v.len() / d.max(1), d)
        }
        Ok(match self.preset.mode {
            Mode::Queue => LossInputs::Queue {
                query: m("query", &self.a, d)?,
                positive: m("positive", &self.b, d)?,
                queue: m("queue", &self.c, d)?,
            },
            Mode::InBatch => LossInputs::InBatch {
                embeddings: m("embeddings", &self.a, d)?,
            },
            Mode::Cross => LossInputs::Cross {
                query: m("query", &self.a, d)?,
                key: m("key", &self.b, d)?,
                targets: None,
            },
            Mode::Symmetric => LossInputs::Symmetric {
                query: m("query", &self.a, d)?,
                key: m("key", &self.b, d)?,
            },
        })
    }
}

/// The f64 reference timed on small shapes of the moco, simclr and clip presets (what `infonce
/// bench` reports where no GPU is): up to `repeat` runs per shape (at most [`MIN_REPEAT`]),
/// stopping after about a second per shape once three have run.
pub fn reference_small_shapes(repeat: usize, progress: &dyn Progress) -> Result<Report> {
    let shapes = [
        ("cpu-ref moco-small", PRESETS[0], 32, 512, 64),
        ("cpu-ref simclr-small", PRESETS[2], 128, 128, 64),
        ("cpu-ref clip-small", PRESETS[3], 64, 64, 128),
    ];
    let reps = repeat.clamp(1, MIN_REPEAT);
    let mut report = Report::new("cpu", None, None, reps);
    for (name, base, anchors, keys, dim) in shapes {
        progress.message(name);
        let p = Preset {
            anchors,
            keys,
            dim,
            ..base
        };
        let case = HostCase::new(p);
        let spec = p.spec()?;
        let inputs = case.inputs()?;
        crate::reference::evaluate(&spec, &inputs, &Upstream::One)?;
        let mut samples = Vec::with_capacity(reps);
        let started = Instant::now();
        for i in 0..reps {
            if i >= 3 && started.elapsed().as_secs_f64() > 1.0 {
                break;
            }
            let t = Instant::now();
            std::hint::black_box(crate::reference::evaluate(&spec, &inputs, &Upstream::One)?);
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let t = Timing::from_samples(samples);
        report.rows.push(Row {
            preset: format!("{name} ({anchors}×{keys}×{dim})"),
            cpu_ms: Some(t.median_ms),
            fused_note: Some("no GPU".into()),
            unfused_note: Some("no GPU".into()),
            check: format!("reference, median of {}", t.samples.len()),
            ..Default::default()
        });
        progress.advance(1);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_timings_parse_and_refuse_malformed_rows() {
        let ok = parse_torch_timings(
            r#"[{"preset":"moco","torch_ms":1.5,"torch_compile_ms":1.2},
                {"preset":"clip-xl","torch_ms":null,"torch_compile_ms":null,"torch_note":"OOM"},
                {"preset":"simclr","torch_ms":2}]"#,
            "t.json",
        )
        .unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[0].torch_ms, Some(1.5));
        assert_eq!(ok[0].torch_compile_ms, Some(1.2));
        assert_eq!(ok[1].torch_ms, None);
        assert_eq!(ok[1].torch_note.as_deref(), Some("OOM"));
        assert_eq!(ok[2].torch_ms, Some(2.0));
        for (bad, says) in [
            ("not json", "not JSON"),
            (r#"{"preset":"moco"}"#, "array"),
            (r#"[{"torch_ms":1.0}]"#, "row 0"),
            (r#"[{"preset":"moco","torch_ms":"fast"}]"#, "row 0"),
            (r#"[3]"#, "row 0"),
            (r#"[{"preset":"moco","torch_ms":-1}]"#, "not a time"),
            (r#"[{"preset":"a"},{"preset":"a"}]"#, "twice"),
        ] {
            let e = parse_torch_timings(bad, "t.json").unwrap_err().to_string();
            assert!(e.contains("t.json") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn numpy_timings_parse_and_refuse_malformed_rows() {
        let ok = parse_numpy_timings(
            r#"[{"preset":"moco","numpy_ms":70.5,"numpy_min_ms":68.0,"repeat":10,"blas":"x"},
                {"preset":"clip-cpu","numpy_ms":300}]"#,
            "n.json",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].numpy_ms, 70.5);
        assert_eq!(ok[0].numpy_min_ms, Some(68.0));
        assert_eq!(ok[0].blas.as_deref(), Some("x"));
        assert_eq!((ok[1].numpy_ms, ok[1].repeat), (300.0, None));
        for (bad, says) in [
            ("[", "not a JSON array"),
            (r#"[{"preset":"moco"}]"#, "row 0"),
            (r#"[{"preset":"moco","numpy_ms":0}]"#, "not a time"),
            (
                r#"[{"preset":"moco","numpy_ms":1},{"preset":"moco","numpy_ms":2}]"#,
                "twice",
            ),
        ] {
            let e = parse_numpy_timings(bad, "n.json").unwrap_err().to_string();
            assert!(e.contains("n.json") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn median_and_spread() {
        let t = Timing::from_samples(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!(t.median_ms, 2.5);
        assert_eq!((t.min_ms, t.max_ms), (1.0, 10.0));
        assert_eq!(Timing::from_samples(vec![5.0, 1.0, 3.0]).median_ms, 3.0);
    }

    #[test]
    fn host_case_inputs_have_the_preset_shape() {
        for p in PRESETS {
            let small = p.small();
            let case = HostCase::new(small);
            let inputs = case.inputs().unwrap();
            let spec = small.spec().unwrap();
            inputs.validate(&spec).unwrap();
        }
    }

    #[test]
    fn preset_flops_match_the_spec_table() {
        let g = |n: &str| Preset::by_name(n).unwrap().matrix_flops() / 1e9;
        assert!((g("moco") - 8.6).abs() < 0.05, "{}", g("moco"));
        assert!((g("simclr") - 68.7).abs() < 0.5, "{}", g("simclr"));
        assert!((g("clip") / 1e3 - 6.6).abs() < 0.05, "{}", g("clip"));
        // clip-xl's f32 logit matrix is 68.7 GB.
        let p = Preset::by_name("clip-xl").unwrap();
        assert!(((p.anchors * p.keys * 4) as f64 / 1e9 - 68.7).abs() < 0.1);
    }
}
