//! `infonce bench` (see spec/cli.md and spec/performance.md): the fused kernels against the
//! unfused pipeline users write by hand, on the presets, with the card's measured peaks.
//!
//! Every preset is first checked against the CPU reference on a small shape of the same mode (a
//! fast wrong kernel is not a result); then the fused op (`cuda::evaluate_device`, kernel path
//! Auto) and the unfused baseline (`cuda::paths::unfused`) are timed with CUDA events: 3 warm-up calls,
//! the median of `--repeat` (default 20) calls, input buffers rotated when they fit in L2.
//! Without a GPU it says so on one line and times the CPU reference on a small shape.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use fused_infonce::cuda::bench::{
    measure_peaks, parse_torch_timings, pool_peak, preset_fits, time_device, Peaks, Preset,
    PresetInputs, Timing, TorchTiming, MIN_REPEAT, PRESETS,
};
use fused_infonce::cuda::paths::unfused::{scratch_bytes, Unfused};
use fused_infonce::cuda::{
    self, DeviceElement, DeviceGrad, DeviceMatrix, DeviceOptions, DeviceOutput, Gpu,
};
use fused_infonce::{bf16, cpu, Element, LossInputs, LossOutput, MatRef, Mode, Result, Upstream};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Which presets to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PresetArg {
    /// MoCo: queue mode, N=256, K=65536, D=128.
    Moco,
    /// MoCo at scale: N=4096, K=2^20, D=128.
    MocoXl,
    /// SimCLR: in-batch, 2N=8192, D=128.
    Simclr,
    /// CLIP: symmetric, N=32768, D=768, learnable τ.
    Clip,
    /// CLIP at scale: N=131072, D=1024 (the memory test).
    ClipXl,
    /// Every preset.
    #[default]
    All,
}

impl PresetArg {
    fn presets(self) -> Vec<Preset> {
        let name = match self {
            PresetArg::All => return PRESETS.to_vec(),
            PresetArg::Moco => "moco",
            PresetArg::MocoXl => "moco-xl",
            PresetArg::Simclr => "simclr",
            PresetArg::Clip => "clip",
            PresetArg::ClipXl => "clip-xl",
        };
        Preset::by_name(name).into_iter().collect()
    }
}

/// Arguments of `infonce bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The preset to run (spec/performance.md).
    #[arg(long, value_enum, default_value_t = PresetArg::All)]
    pub preset: PresetArg,
    /// Timed repetitions per measurement (the median is reported; at least 20 for a figure).
    #[arg(long, default_value_t = MIN_REPEAT, value_parser = parse_repeat)]
    pub repeat: usize,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Merge PyTorch timings (the JSON bench/torch_reference.py prints: `torch_ms`,
    /// `torch_compile_ms`, `torch_note` per preset).
    #[arg(long, value_name = "FILE")]
    pub torch: Option<PathBuf>,
}

fn parse_repeat(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a positive integer")),
    }
}

impl Default for Args {
    fn default() -> Self {
        Self {
            preset: PresetArg::All,
            repeat: MIN_REPEAT,
            json: None,
            torch: None,
        }
    }
}

/// One preset's result (the `--json` row; `null` where not measured).
#[derive(Debug, Clone, Default, Serialize)]
struct Row {
    preset: String,
    fused_ms: Option<f64>,
    unfused_ms: Option<f64>,
    torch_ms: Option<f64>,
    torch_compile_ms: Option<f64>,
    torch_note: Option<String>,
    speedup_vs_unfused: Option<f64>,
    tflops: Option<f64>,
    pct_matrix_floor: Option<f64>,
    extra_mem_bytes: Option<u64>,
    /// Spread of the fused timing (min, max).
    fused_min_max_ms: Option<(f64, f64)>,
    /// Spread of the unfused timing (min, max).
    unfused_min_max_ms: Option<(f64, f64)>,
    unfused_extra_mem_bytes: Option<u64>,
    /// The tensor-core kernels called directly (`cuda::paths::tensor_core::evaluate`).
    tc_ms: Option<f64>,
    tc_min_max_ms: Option<(f64, f64)>,
    tc_speedup_vs_unfused: Option<f64>,
    tc_tflops: Option<f64>,
    tc_pct_matrix_floor: Option<f64>,
    tc_extra_mem_bytes: Option<u64>,
    tc_note: Option<String>,
    /// Why the fused figure is missing.
    fused_note: Option<String>,
    /// Why the unfused figure is missing.
    unfused_note: Option<String>,
    /// The small-shape check against the CPU reference.
    check: String,
    /// CPU reference milliseconds (no-GPU runs only).
    cpu_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    device: Option<String>,
    driver: Option<String>,
    commit: String,
    unix_time: u64,
    repeat: usize,
    peaks: Option<Peaks>,
    rows: Vec<Row>,
}

/// Runs `infonce bench`.
pub fn run(args: &Args) -> Result<()> {
    run_presets(args, args.preset.presets())
}

/// The benchmarks that fit this machine (no-argument run): every preset whose inputs and
/// gradients fit in device memory, or the CPU reference alone without a GPU.
pub fn run_default() -> Result<()> {
    run_presets(&Args::default(), PRESETS.to_vec())
}

fn run_presets(args: &Args, presets: Vec<Preset>) -> Result<()> {
    if args.repeat < MIN_REPEAT {
        println!(
            "note: --repeat {} is below {MIN_REPEAT}; medians over so few runs are not benchmark figures",
            args.repeat
        );
    }
    let torch = match &args.torch {
        Some(p) => read_torch(p)?,
        None => Vec::new(),
    };
    let report = match Gpu::first() {
        Err(e) => {
            println!("bench: no usable GPU ({e}); timing the CPU reference on small shapes only");
            cpu_only(args.repeat)?
        }
        Ok(gpu) => gpu_run(&gpu, args.repeat, &presets, &torch)?,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| fused_infonce::Error::Input(format!("json: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n")?;
        std::fs::rename(&tmp, path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn read_torch(path: &PathBuf) -> Result<Vec<TorchTiming>> {
    let text = std::fs::read_to_string(path)?;
    parse_torch_timings(&text, &format!("--torch {}", path.display()))
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

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Without a GPU: the CPU reference on small shapes.

fn host_rows<T: Element>(seed: u64, rows: usize, d: usize) -> Vec<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(rows * d);
    for _ in 0..rows {
        let r: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let n = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        out.extend(r.iter().map(|x| T::from_f64(x / n)));
    }
    out
}

/// Host inputs of a preset's shape (small shapes only: the data is generated on the host).
struct HostCase {
    a: Vec<bf16>,
    b: Vec<bf16>,
    c: Vec<bf16>,
    p: Preset,
}

impl HostCase {
    fn new(p: Preset) -> Self {
        let (ra, rb, rc) = PresetInputs::rows(&p);
        Self {
            a: host_rows(1, ra, p.dim),
            b: host_rows(2, rb, p.dim),
            c: host_rows(3, rc, p.dim),
            p,
        }
    }

    fn inputs(&self) -> LossInputs<'_, bf16> {
        let d = self.p.dim;
        fn m<'a>(name: &'static str, v: &'a [bf16], d: usize) -> Result<MatRef<'a, bf16>> {
            MatRef::new(name, v, v.len() / d, d)
        }
        // The shapes are consistent by construction.
        let q = m("query", &self.a, d).expect("shape");
        match self.p.mode {
            Mode::Queue => LossInputs::Queue {
                query: q,
                positive: m("positive", &self.b, d).expect("shape"),
                queue: m("queue", &self.c, d).expect("shape"),
            },
            Mode::InBatch => LossInputs::InBatch {
                embeddings: m("embeddings", &self.a, d).expect("shape"),
            },
            Mode::Cross => LossInputs::Cross {
                query: q,
                key: m("key", &self.b, d).expect("shape"),
                targets: None,
            },
            Mode::Symmetric => LossInputs::Symmetric {
                query: q,
                key: m("key", &self.b, d).expect("shape"),
            },
        }
    }
}

fn cpu_only(repeat: usize) -> Result<Report> {
    let shapes = [
        (
            "cpu-ref moco-small",
            Preset {
                anchors: 32,
                keys: 512,
                dim: 64,
                ..PRESETS[0]
            },
        ),
        (
            "cpu-ref simclr-small",
            Preset {
                anchors: 128,
                keys: 128,
                dim: 64,
                ..PRESETS[2]
            },
        ),
        (
            "cpu-ref clip-small",
            Preset {
                anchors: 64,
                keys: 64,
                dim: 128,
                ..PRESETS[3]
            },
        ),
    ];
    // Up to `repeat` runs (at most 20), stopping after about a second per shape (at least 3).
    let reps = repeat.clamp(1, MIN_REPEAT);
    let pb = progress(shapes.len() as u64);
    let mut rows = Vec::new();
    for (name, p) in shapes {
        pb.set_message(name.to_string());
        let case = HostCase::new(p);
        let spec = p.spec()?;
        let inputs = case.inputs();
        let mut samples = Vec::with_capacity(reps);
        cpu::evaluate(&spec, &inputs, &Upstream::One)?;
        let started = Instant::now();
        for i in 0..reps {
            if i >= 3 && started.elapsed().as_secs_f64() > 1.0 {
                break;
            }
            let t = Instant::now();
            std::hint::black_box(cpu::evaluate(&spec, &inputs, &Upstream::One)?);
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let t = Timing::from_samples(samples);
        rows.push(Row {
            preset: format!("{name} ({}×{}×{})", p.anchors, p.keys, p.dim),
            cpu_ms: Some(t.median_ms),
            fused_note: Some("no GPU".into()),
            unfused_note: Some("no GPU".into()),
            check: format!("reference, median of {}", t.samples.len()),
            ..Default::default()
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(Report {
        device: None,
        driver: None,
        commit: commit(),
        unix_time: unix_time(),
        repeat: reps,
        peaks: None,
        rows,
    })
}

fn progress(len: u64) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} bench [{bar:30}] {pos}/{len} {elapsed} {msg}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

// ---------------------------------------------------------------------------------------------
// On the GPU.

/// Uploads a host case into preset buffers (`a`, `b`, `c` as [`PresetInputs`]).
fn upload(gpu: &Gpu, h: &HostCase) -> Result<PresetInputs> {
    let d = h.p.dim;
    let up = |v: &[bf16], name| -> Result<DeviceMatrix<bf16>> {
        if v.is_empty() {
            return DeviceMatrix::zeros(gpu, 0, d);
        }
        DeviceMatrix::upload(gpu, &MatRef::new(name, v, v.len() / d, d)?)
    };
    Ok(PresetInputs {
        a: up(&h.a, "a")?,
        b: up(&h.b, "b")?,
        c: up(&h.c, "c")?,
    })
}

fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// The largest relative error of a device output against the reference (loss, gradients, dτ).
fn max_error<T: DeviceElement>(gpu: &Gpu, o: &DeviceOutput<T>, want: &LossOutput) -> Result<f64> {
    let dl = |s: &cudarc::driver::CudaSlice<f32>| -> Result<Vec<f64>> {
        Ok(gpu
            .stream()
            .clone_dtoh(s)?
            .into_iter()
            .map(f64::from)
            .collect())
    };
    let wl = want.loss.values();
    let mut got_loss = dl(&o.loss)?;
    got_loss.truncate(wl.len());
    let mut err = rel_l2(&got_loss, &wl);
    for (name, g) in &o.grads {
        let v: Vec<f64> = match g {
            DeviceGrad::F32(m) => m.download(gpu)?.into_iter().map(f64::from).collect(),
            DeviceGrad::Input(m) => m.download(gpu)?.into_iter().map(|x| x.to_f64()).collect(),
        };
        err = err.max(match want.grad(name) {
            Some(w) => rel_l2(&v, &w.data),
            None => f64::INFINITY,
        });
    }
    if want.grads.len() != o.grads.len() {
        err = f64::INFINITY;
    }
    if let (Some(g), Some(w)) = (&o.grad_temperature, want.grad_temperature) {
        let g = dl(g)?[0];
        err = err.max((g - w).abs() / w.abs().max(1e-6) / 5.0);
    }
    Ok(err)
}

/// The tolerance of the bf16 check (relative L2).
const CHECK_TOL: f64 = 2e-2;

enum Which<'a> {
    Fused,
    /// The tensor-core kernels called directly (`cuda::paths::tensor_core`), whatever Auto picks.
    Tc,
    Unfused(&'a Unfused),
}

fn eval(
    gpu: &Gpu,
    which: &Which<'_>,
    p: &Preset,
    set: &PresetInputs,
) -> Result<DeviceOutput<bf16>> {
    let spec = p.spec()?;
    let inputs = set.inputs(p.mode);
    match which {
        Which::Fused => cuda::evaluate_device(
            gpu,
            &spec,
            &inputs,
            &Upstream::One,
            &DeviceOptions::default(),
        ),
        Which::Tc => fused_infonce::cuda::paths::tensor_core::evaluate(
            gpu,
            &spec,
            &inputs,
            &Upstream::One,
            &DeviceOptions::default(),
        ),
        Which::Unfused(u) => u.evaluate(
            gpu,
            &spec,
            &inputs,
            &Upstream::One,
            &DeviceOptions::default(),
        ),
    }
}

/// Checks one implementation on the small shape; `Ok(None)` when correct, `Ok(Some(why))` not.
fn check(
    gpu: &Gpu,
    which: &Which<'_>,
    small: &Preset,
    host: &HostCase,
    want: &LossOutput,
) -> Option<String> {
    let r = upload(gpu, host).and_then(|set| {
        let out = eval(gpu, which, small, &set)?;
        max_error(gpu, &out, want)
    });
    match r {
        Ok(e) if e <= CHECK_TOL => None,
        Ok(e) => Some(format!(
            "wrong result: relative error {e:.2e} > {CHECK_TOL:.0e} on {}×{}×{}",
            small.anchors, small.keys, small.dim
        )),
        Err(e) => Some(e.to_string()),
    }
}

struct Measured {
    timing: Timing,
    extra: Option<u64>,
}

fn measure(
    gpu: &Gpu,
    which: &Which<'_>,
    p: &Preset,
    sets: &[PresetInputs],
    repeat: usize,
) -> Result<Measured> {
    // One run under the pool's high watermark: the peak extra memory, outputs included.
    let (_, extra) = pool_peak(gpu, || eval(gpu, which, p, &sets[0]).map(drop))?;
    let timing = time_device(gpu, 3, repeat, |i| {
        eval(gpu, which, p, &sets[i % sets.len()]).map(drop)
    })?;
    Ok(Measured { timing, extra })
}

fn gpu_run(gpu: &Gpu, repeat: usize, presets: &[Preset], torch: &[TorchTiming]) -> Result<Report> {
    let props = gpu.properties().clone();
    // The emulated device runs the kernels' host builds: each preset's implementations are
    // checked on the small shape, and nothing is timed (the figures would mean nothing).
    let emulated = props.emulated;
    let pb = progress(1 + 5 * presets.len() as u64);
    pb.set_message("measuring peaks (bf16 GEMM, device copy)");
    let peaks = if emulated {
        None
    } else {
        match measure_peaks(gpu, repeat) {
            Ok(p) => Some(p),
            Err(e) => {
                pb.println(format!("peaks not measured: {e}"));
                None
            }
        }
    };
    pb.inc(1);
    let unfused = Unfused::new(gpu);
    let mut rows = Vec::new();
    for p in presets {
        let t = torch.iter().find(|t| t.preset == p.name);
        let mut row = Row {
            preset: p.name.to_string(),
            torch_ms: t.and_then(|t| t.torch_ms),
            torch_compile_ms: t.and_then(|t| t.torch_compile_ms),
            torch_note: t.and_then(|t| t.torch_note.clone()),
            ..Default::default()
        };
        if let (false, Err(e)) = (emulated, preset_fits(gpu, p)) {
            row.fused_note = Some(e.to_string());
            row.unfused_note = Some(e.to_string());
            row.check = "not run".into();
            pb.inc(5);
            rows.push(row);
            continue;
        }
        // 1. Correctness on a small shape of the same mode.
        pb.set_message(format!("{}: checking against the CPU reference", p.name));
        let small = p.small();
        let host = HostCase::new(small);
        let want = cpu::evaluate(&small.spec()?, &host.inputs(), &Upstream::One)?;
        let fused_bad = check(gpu, &Which::Fused, &small, &host, &want);
        let tc_bad = check(gpu, &Which::Tc, &small, &host, &want);
        let unfused_bad = match &unfused {
            Ok(u) => check(gpu, &Which::Unfused(u), &small, &host, &want),
            Err(e) => Some(e.to_string()),
        };
        let ok: Vec<&str> = [
            ("fused", &fused_bad),
            ("tc", &tc_bad),
            ("unfused", &unfused_bad),
        ]
        .iter()
        .filter(|(_, bad)| bad.is_none())
        .map(|(n, _)| *n)
        .collect();
        row.check = if ok.is_empty() {
            "none ok".into()
        } else {
            format!("{} ok", ok.join(", "))
        };
        pb.inc(1);
        if emulated {
            let note = |bad: Option<String>| {
                Some(bad.unwrap_or_else(|| "emulated device: checked, not timed".into()))
            };
            row.fused_note = note(fused_bad);
            row.tc_note = note(tc_bad);
            row.unfused_note = note(unfused_bad);
            pb.inc(4);
            rows.push(row);
            continue;
        }

        // 2. Inputs, rotated when one set fits in L2 (50 MB on an H100).
        pb.set_message(format!("{}: generating inputs", p.name));
        let copies = if p.input_bytes() < (128 << 20) {
            ((128u64 << 20) / p.input_bytes().max(1)).clamp(1, 8) as usize
        } else {
            1
        };
        let sets: Vec<PresetInputs> = (0..copies)
            .map(|i| PresetInputs::random(gpu, p, 17 + i as u64))
            .collect::<Result<_>>()?;
        pb.inc(1);

        // 3. Fused.
        pb.set_message(format!("{}: fused", p.name));
        match fused_bad {
            Some(why) => row.fused_note = Some(why),
            None => match measure(gpu, &Which::Fused, p, &sets, repeat) {
                Ok(m) => {
                    row.fused_ms = Some(m.timing.median_ms);
                    row.fused_min_max_ms = Some((m.timing.min_ms, m.timing.max_ms));
                    row.extra_mem_bytes = m.extra.map(|x| x.saturating_sub(p.grad_bytes()));
                    row.tflops = Some(p.matrix_flops() / (m.timing.median_ms * 1e-3) / 1e12);
                    row.pct_matrix_floor = peaks.map(|pk| {
                        100.0 * p.matrix_floor_ms(pk.bf16_gemm_tflops) / m.timing.median_ms
                    });
                }
                Err(e) => row.fused_note = Some(e.to_string()),
            },
        }
        pb.inc(1);

        // 3b. The tensor-core kernels directly.
        pb.set_message(format!("{}: tensor-core kernels", p.name));
        match tc_bad {
            Some(why) => row.tc_note = Some(why),
            None => match measure(gpu, &Which::Tc, p, &sets, repeat) {
                Ok(m) => {
                    row.tc_ms = Some(m.timing.median_ms);
                    row.tc_min_max_ms = Some((m.timing.min_ms, m.timing.max_ms));
                    row.tc_extra_mem_bytes = m.extra.map(|x| x.saturating_sub(p.grad_bytes()));
                    row.tc_tflops = Some(p.matrix_flops() / (m.timing.median_ms * 1e-3) / 1e12);
                    row.tc_pct_matrix_floor = peaks.map(|pk| {
                        100.0 * p.matrix_floor_ms(pk.bf16_gemm_tflops) / m.timing.median_ms
                    });
                }
                Err(e) => row.tc_note = Some(e.to_string()),
            },
        }
        pb.inc(1);

        // 4. Unfused (its own memory check says "does not fit" for clip-xl).
        pb.set_message(format!("{}: unfused", p.name));
        match (&unfused, unfused_bad) {
            (_, Some(why)) => row.unfused_note = Some(why),
            (Err(e), None) => row.unfused_note = Some(e.to_string()),
            (Ok(u), None) => match measure(gpu, &Which::Unfused(u), p, &sets, repeat) {
                Ok(m) => {
                    row.unfused_ms = Some(m.timing.median_ms);
                    row.unfused_min_max_ms = Some((m.timing.min_ms, m.timing.max_ms));
                    row.unfused_extra_mem_bytes = m.extra.map(|x| x.saturating_sub(p.grad_bytes()));
                }
                Err(e) => {
                    let need = scratch_bytes(p.mode, p.anchors, p.keys, bf16::DTYPE, true);
                    row.unfused_note = Some(format!("{e} (scratch {:.1} GB)", need as f64 / 1e9));
                }
            },
        }
        pb.inc(1);
        if let (Some(f), Some(u)) = (row.fused_ms, row.unfused_ms) {
            row.speedup_vs_unfused = Some(u / f);
        }
        if let (Some(f), Some(u)) = (row.tc_ms, row.unfused_ms) {
            row.tc_speedup_vs_unfused = Some(u / f);
        }
        rows.push(row);
    }
    pb.finish_and_clear();
    let driver = cuda::driver_version()
        .ok()
        .map(|(a, b)| format!("CUDA {a}.{b}"));
    Ok(Report {
        device: Some(format!(
            "{} (sm_{}{}, {} SMs, {:.0} GB)",
            props.name,
            props.compute_capability.0,
            props.compute_capability.1,
            props.sm_count,
            props.total_memory as f64 / 1e9
        )),
        driver,
        commit: commit(),
        unix_time: unix_time(),
        repeat,
        peaks,
        rows,
    })
}

// ---------------------------------------------------------------------------------------------
// The table.

fn ms(x: Option<f64>) -> String {
    x.map_or("—".into(), |v| {
        if v < 1.0 {
            format!("{:.1} µs", v * 1e3)
        } else {
            format!("{v:.3} ms")
        }
    })
}

/// `fused` formatted, else `tc` formatted with a "(tc)" mark, else a dash.
fn pick(fused: Option<f64>, tc: Option<f64>, f: impl Fn(f64) -> String) -> String {
    match (fused, tc) {
        (Some(v), _) => f(v),
        (None, Some(v)) => format!("{} (tc)", f(v)),
        (None, None) => "—".into(),
    }
}

fn print_table(r: &Report) {
    let mut out = std::io::stdout().lock();
    if let Some(d) = &r.device {
        let _ = writeln!(
            out,
            "device: {d}; driver {}; commit {}; medians of {} runs",
            r.driver.as_deref().unwrap_or("?"),
            r.commit,
            r.repeat
        );
    }
    if let Some(p) = &r.peaks {
        let _ = writeln!(
            out,
            "measured peaks: bf16 GEMM {:.0} TFLOP/s, device copy {:.2} TB/s",
            p.bf16_gemm_tflops, p.copy_tbps
        );
    }
    let header = [
        "preset",
        "fused",
        "tc",
        "unfused",
        "torch",
        "speedup",
        "TFLOP/s",
        "% floor",
        "extra mem",
        "cpu ref",
        "check",
    ];
    let cells: Vec<[String; 11]> = r
        .rows
        .iter()
        .map(|row| {
            [
                row.preset.clone(),
                ms(row.fused_ms),
                ms(row.tc_ms),
                ms(row.unfused_ms),
                ms(row.torch_ms),
                // The fused figures, or the tensor-core kernels' (marked) where Auto has none.
                pick(row.speedup_vs_unfused, row.tc_speedup_vs_unfused, |s| {
                    format!("{s:.2}×")
                }),
                pick(row.tflops, row.tc_tflops, |t| format!("{t:.0}")),
                pick(row.pct_matrix_floor, row.tc_pct_matrix_floor, |t| {
                    format!("{t:.0} %")
                }),
                pick(
                    row.extra_mem_bytes.map(|b| b as f64),
                    row.tc_extra_mem_bytes.map(|b| b as f64),
                    |b| format!("{:.1} MB", b / 1e6),
                ),
                ms(row.cpu_ms),
                row.check.clone(),
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |cols: Vec<&str>| -> String {
        cols.iter()
            .zip(width)
            .map(|(s, w)| format!("{s}{}", " ".repeat(w - s.chars().count())))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for c in &cells {
        let _ = writeln!(out, "{}", line(c.iter().map(String::as_str).collect()));
    }
    for row in &r.rows {
        if let Some(n) = &row.fused_note {
            if r.device.is_some() {
                let _ = writeln!(out, "  {}: fused not measured: {n}", row.preset);
            }
        }
        if let Some(n) = &row.tc_note {
            if r.device.is_some() {
                let _ = writeln!(out, "  {}: tc not measured: {n}", row.preset);
            }
        }
        if let Some(n) = &row.unfused_note {
            if r.device.is_some() {
                let _ = writeln!(out, "  {}: unfused not measured: {n}", row.preset);
            }
        }
    }
}
