//! `infonce bench` (see spec/cli.md and spec/performance.md): flags, the progress bar and the
//! table. The runs are the library's: [`fused_infonce::cuda::bench::run`] on a GPU (or the
//! emulated device, which checks and does not time), [`fused_infonce::bench::reference_small_shapes`]
//! without one.

use std::io::Write as _;
use std::path::PathBuf;

use fused_infonce::bench::{
    parse_torch_timings, reference_small_shapes, Preset, Report, TorchTiming, MIN_REPEAT, PRESETS,
};
use fused_infonce::cuda::{self, Gpu};
use fused_infonce::progress::Progress;
use fused_infonce::Result;
use indicatif::{ProgressBar, ProgressStyle};

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
            let bar = Bar::new(3);
            let r = reference_small_shapes(args.repeat, &bar);
            bar.0.finish_and_clear();
            r?
        }
        Ok(gpu) => {
            let bar = Bar::new(1 + 5 * presets.len() as u64);
            let r = cuda::bench::run(&gpu, args.repeat, &presets, &torch, &bar);
            bar.0.finish_and_clear();
            r?
        }
    };
    print_table(&report);
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn read_torch(path: &PathBuf) -> Result<Vec<TorchTiming>> {
    let text = std::fs::read_to_string(path)?;
    parse_torch_timings(&text, &format!("--torch {}", path.display()))
}

/// The progress bar the runs report to.
struct Bar(ProgressBar);

impl Bar {
    fn new(len: u64) -> Self {
        let pb = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} bench [{bar:30}] {pos}/{len} {elapsed} {msg}")
        {
            pb.set_style(style.progress_chars("=> "));
        }
        Bar(pb)
    }
}

impl Progress for Bar {
    fn message(&self, what: &str) {
        self.0.set_message(what.to_string());
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn note(&self, line: &str) {
        self.0.println(line);
    }
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
