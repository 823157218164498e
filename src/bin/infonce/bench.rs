//! `infonce bench` (see spec/cli.md and spec/performance.md): flags, the progress bar and the
//! table. The runs are the library's: [`fused_infonce::cuda::bench::run`] on a GPU (or the
//! emulated device, which checks and does not time), [`fused_infonce::cpu::bench::run`] for the
//! CPU backends (the fused CPU path against the unfused CPU pipeline and numpy, then the f64
//! reference on small shapes), [`fused_infonce::bench::reference_small_shapes`] alone in the
//! no-argument run without a GPU.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use fused_infonce::bench::{
    parse_numpy_timings, parse_torch_timings, reference_small_shapes, NumpyTiming, Preset, Report,
    TorchTiming, CPU_PRESETS, MIN_REPEAT, PRESETS,
};
use fused_infonce::cpu::bench::CPU_MIN_REPEAT;
use fused_infonce::cuda::{self, Gpu};
use fused_infonce::{Error, Result};

use crate::bar::Bar;

/// Which presets to run (spec/performance.md): the GPU presets, the CPU presets (`moco` is both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PresetArg {
    /// MoCo: queue mode, N=256, K=65536, D=128 (GPU and CPU).
    Moco,
    /// MoCo at scale: N=4096, K=2^20, D=128 (GPU).
    MocoXl,
    /// SimCLR: in-batch, 2N=8192, D=128 (GPU).
    Simclr,
    /// CLIP: symmetric, N=32768, D=768, learnable τ (GPU).
    Clip,
    /// CLIP at scale: N=131072, D=1024, the memory test (GPU).
    ClipXl,
    /// SimCLR on the CPU: in-batch, 2N=4096, D=128.
    SimclrCpu,
    /// CLIP on the CPU: symmetric, N=4096, D=768, learnable τ.
    ClipCpu,
    /// Every preset of the backend.
    #[default]
    All,
}

impl PresetArg {
    fn name(self) -> &'static str {
        match self {
            PresetArg::All => "all",
            PresetArg::Moco => "moco",
            PresetArg::MocoXl => "moco-xl",
            PresetArg::Simclr => "simclr",
            PresetArg::Clip => "clip",
            PresetArg::ClipXl => "clip-xl",
            PresetArg::SimclrCpu => "simclr-cpu",
            PresetArg::ClipCpu => "clip-cpu",
        }
    }

    fn gpu_presets(self) -> Result<Vec<Preset>> {
        if self == PresetArg::All {
            return Ok(PRESETS.to_vec());
        }
        Preset::by_name(self.name())
            .map(|p| vec![p])
            .ok_or_else(|| {
                Error::parameter(
                    "--preset",
                    self.name(),
                    "a CPU preset: run it with --backend cpu (GPU presets: moco, moco-xl, simclr, \
                 clip, clip-xl)",
                )
            })
    }

    fn cpu_presets(self) -> Result<Vec<Preset>> {
        if self == PresetArg::All {
            return Ok(CPU_PRESETS.to_vec());
        }
        Preset::cpu_by_name(self.name())
            .map(|p| vec![p])
            .ok_or_else(|| {
                Error::parameter(
                    "--preset",
                    self.name(),
                    "a GPU preset: run it with --backend cuda (CPU presets: moco, simclr-cpu, \
                 clip-cpu)",
                )
            })
    }
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchBackend {
    /// The fused kernels against the unfused cuBLAS pipeline (and PyTorch) on the GPU presets.
    Cuda,
    /// The fused CPU path against the unfused CPU pipeline and numpy on the CPU presets, then
    /// the f64 reference on small shapes.
    Cpu,
}

/// Arguments of `infonce bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to benchmark (default: cuda when a GPU is usable, else cpu).
    #[arg(long, value_enum)]
    pub backend: Option<BenchBackend>,
    /// The preset to run (spec/performance.md).
    #[arg(long, value_enum, default_value_t = PresetArg::All)]
    pub preset: PresetArg,
    /// Timed repetitions per measurement (the median is reported; at least 20 for a GPU figure,
    /// at least 10 on the CPU).
    #[arg(long, default_value_t = MIN_REPEAT, value_parser = parse_repeat)]
    pub repeat: usize,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Merge PyTorch timings (the JSON bench/torch_reference.py prints: `torch_ms`,
    /// `torch_compile_ms`, `torch_note` per preset).
    #[arg(long, value_name = "FILE")]
    pub torch: Option<PathBuf>,
    /// CPU: merge numpy timings from FILE (the JSON bench/numpy_reference.py prints) instead of
    /// running bench/numpy_reference.py in the same run.
    #[arg(long, value_name = "FILE")]
    pub numpy: Option<PathBuf>,
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
            backend: None,
            preset: PresetArg::All,
            repeat: MIN_REPEAT,
            json: None,
            torch: None,
            numpy: None,
        }
    }
}

/// The progress bar's look.
const BAR: &str = "{spinner} bench [{bar:30}] {pos}/{len} {elapsed} {msg}";

/// Runs `infonce bench`.
pub fn run(args: &Args) -> Result<()> {
    // Timing files first: a malformed one is an error whichever backend runs.
    let torch = match &args.torch {
        Some(p) => read_torch(p)?,
        None => Vec::new(),
    };
    let numpy = match &args.numpy {
        Some(p) => Some(read_numpy(p)?),
        None => None,
    };
    // The device, opened once: `--backend cuda` needs it, no `--backend` uses it when it opens.
    let gpu = match args.backend {
        Some(BenchBackend::Cpu) => None,
        Some(BenchBackend::Cuda) => Some(Gpu::first()?),
        None => match Gpu::first() {
            Ok(gpu) => Some(gpu),
            Err(e) => {
                println!("bench: no usable GPU ({e}); benchmarking the CPU backends");
                None
            }
        },
    };
    let report = match gpu {
        Some(gpu) => {
            let presets = args.preset.gpu_presets()?;
            note_repeat(args.repeat, MIN_REPEAT);
            if numpy.is_some() {
                println!("note: --numpy times the CPU presets; not merged into a GPU run");
            }
            let bar = Bar::new(BAR, 1 + 5 * presets.len() as u64);
            let r = cuda::bench::run(&gpu, args.repeat, &presets, &torch, &bar);
            bar.finish();
            r?
        }
        None => {
            let presets = args.preset.cpu_presets()?;
            note_repeat(args.repeat, CPU_MIN_REPEAT);
            if args.torch.is_some() {
                println!("note: --torch times the GPU presets; not merged into a CPU run");
            }
            let numpy = numpy.unwrap_or_else(|| run_numpy(&presets, args.repeat));
            let bar = Bar::new(BAR, presets.len() as u64 + 3);
            let r = fused_infonce::cpu::bench::run(args.repeat, &presets, &numpy, &bar);
            bar.finish();
            r?
        }
    };
    finish(args, &report)
}

/// The no-argument run: every GPU preset that fits, or the f64 reference alone on small shapes
/// where no GPU is (spec/cli.md).
pub fn run_default() -> Result<()> {
    let args = Args::default();
    let report = match Gpu::first() {
        Ok(gpu) => {
            let bar = Bar::new(BAR, 1 + 5 * PRESETS.len() as u64);
            let r = cuda::bench::run(&gpu, args.repeat, &PRESETS, &[], &bar);
            bar.finish();
            r?
        }
        Err(e) => {
            println!("bench: no usable GPU ({e}); timing the CPU reference on small shapes only");
            let bar = Bar::new(BAR, 3);
            let r = reference_small_shapes(args.repeat, &bar);
            bar.finish();
            r?
        }
    };
    finish(&args, &report)
}

/// One line where `repeat` is below the backend's minimum for a figure.
fn note_repeat(repeat: usize, min: usize) {
    if repeat < min {
        println!("note: --repeat {repeat} is below {min}; medians over so few runs are not benchmark figures");
    }
}

fn finish(args: &Args, report: &Report) -> Result<()> {
    print_table(report);
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn read_torch(path: &Path) -> Result<Vec<TorchTiming>> {
    let text = std::fs::read_to_string(path)?;
    parse_torch_timings(&text, &format!("--torch {}", path.display()))
}

fn read_numpy(path: &Path) -> Result<Vec<NumpyTiming>> {
    let text = std::fs::read_to_string(path)?;
    parse_numpy_timings(&text, &format!("--numpy {}", path.display()))
}

/// Runs bench/numpy_reference.py on `presets` in this run (numpy's unfused pipeline, as users
/// write it). OpenBLAS's `OPENBLAS_CORETYPE` / `OPENBLAS_L2_SIZE` are unset for it (some machines
/// set them for old builds; they slow a current numpy), so numpy runs its best kernels. Where the
/// script, Python or numpy is missing, says so on one line and returns no timings.
fn run_numpy(presets: &[Preset], repeat: usize) -> Vec<NumpyTiming> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/numpy_reference.py");
    if !script.is_file() {
        println!("bench: numpy not run ({} not found)", script.display());
        return Vec::new();
    }
    let names: Vec<&str> = if presets.len() == CPU_PRESETS.len() {
        vec!["all"]
    } else {
        presets.iter().map(|p| p.name).collect()
    };
    let mut out = Vec::new();
    for name in names {
        let o = std::process::Command::new("python3")
            .arg(&script)
            .args(["--preset", name, "--repeat", &repeat.to_string()])
            .env_remove("OPENBLAS_CORETYPE")
            .env_remove("OPENBLAS_L2_SIZE")
            .output();
        match o {
            Ok(o) if o.status.success() => {
                match parse_numpy_timings(&String::from_utf8_lossy(&o.stdout), "numpy_reference.py")
                {
                    Ok(t) => out.extend(t),
                    Err(e) => println!("bench: numpy not merged: {e}"),
                }
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let last = err.lines().last().unwrap_or("no message");
                println!("bench: numpy not run ({}: {last})", o.status);
                return out;
            }
            Err(e) => {
                println!("bench: numpy not run (python3: {e})");
                return out;
            }
        }
    }
    out
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

/// Prints rows of cells under a header, each column as wide as its widest cell.
fn table(out: &mut impl std::io::Write, header: &[&str], cells: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for c in cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let line = |cols: Vec<&str>| -> String {
        cols.iter()
            .zip(&width)
            .map(|(s, w)| format!("{s}{}", " ".repeat(w - s.chars().count())))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for c in cells {
        let _ = writeln!(out, "{}", line(c.iter().map(String::as_str).collect()));
    }
}

fn print_table(r: &Report) {
    if r.backend == "cpu" {
        return print_cpu_table(r);
    }
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
    let cells: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|row| {
            vec![
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
    table(&mut out, &header, &cells);
    for row in &r.rows {
        if r.device.is_none() {
            continue;
        }
        for (what, note) in [
            ("fused", &row.fused_note),
            ("tc", &row.tc_note),
            ("unfused", &row.unfused_note),
        ] {
            if let Some(n) = note {
                let _ = writeln!(out, "  {}: {what} not measured: {n}", row.preset);
            }
        }
    }
}

/// The CPU backends' table: the fused CPU path against the unfused CPU pipeline and numpy, with
/// the block products' rate against the sgemm rate measured in the same run, then the reference.
fn print_cpu_table(r: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "cpu: {} threads; commit {}; medians of {} runs; sgemm (faer, same run) {}",
        r.threads.map_or("?".into(), |t| t.to_string()),
        r.commit,
        r.repeat,
        r.sgemm_gflops
            .map_or("not measured".into(), |g| format!("{g:.0} GFLOP/s"))
    );
    let times = |x: Option<f64>| x.map_or("—".into(), |s| format!("{s:.2}×"));
    let header = [
        "preset",
        "fused",
        "unfused",
        "numpy",
        "vs unfused",
        "vs numpy",
        "GFLOP/s",
        "% sgemm",
        "extra mem",
        "unfused mem",
        "reference",
        "check",
    ];
    let mb = |b: Option<u64>| b.map_or("—".into(), |b| format!("{:.1} MB", b as f64 / 1e6));
    let cells: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|row| {
            vec![
                row.preset.clone(),
                ms(row.fused_ms),
                ms(row.unfused_ms),
                ms(row.numpy_ms),
                times(row.speedup_vs_unfused),
                times(row.speedup_vs_numpy),
                row.gflops.map_or("—".into(), |g| format!("{g:.0}")),
                row.pct_of_sgemm.map_or("—".into(), |p| format!("{p:.0} %")),
                mb(row.extra_mem_bytes),
                mb(row.unfused_extra_mem_bytes),
                ms(row.cpu_ms),
                row.check.clone(),
            ]
        })
        .collect();
    table(&mut out, &header, &cells);
    for row in &r.rows {
        if let Some(n) = &row.fused_note {
            if row.cpu_ms.is_none() {
                let _ = writeln!(out, "  {}: not timed: {n}", row.preset);
            }
        }
        if let Some(n) = &row.numpy_note {
            let _ = writeln!(out, "  {}: numpy {n}", row.preset);
        }
    }
}
