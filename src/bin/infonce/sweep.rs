//! `infonce sweep` (see spec/cli.md): flags, the progress bar, the tables, the plot and the JSON
//! file. What it computes is [`fused_infonce::sweep`]'s: part 1, the gradient picture on fixed
//! embeddings; part 2 (`--train`), a linear encoder trained at every temperature.

mod plot;

use fused_infonce::data::Clustered;
use fused_infonce::io::write_atomic;
use fused_infonce::progress::Progress;
use fused_infonce::sweep::{
    gradient_picture, train_sweep, Picture, Report, SweepData, TrainReport,
};
use fused_infonce::train::{Backend, TrainConfig, TrainMode};
use fused_infonce::{DystressGrad, Error, Result, Temperature};
use std::path::PathBuf;

use crate::bar::Bar;

/// The backend that evaluates the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendArg {
    /// The f64 oracle (exact, slow by design).
    Reference,
    /// The fast fused CPU path (f32 arithmetic, multi-threaded).
    #[default]
    Cpu,
    /// The fused CUDA kernels (an error without a usable GPU).
    Cuda,
}

/// Arguments of `infonce sweep`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Embeddings to analyse (safetensors): `embeddings` (2N×D, rows a and a+N a pair) or
    /// `query` and `positive` (N×D) with an optional `queue` (K×D). Default: the built-in
    /// clustered data (two noisy views of 600 unit vectors in 10 classes, D = 32).
    #[arg(long, value_name = "IN.safetensors")]
    input: Option<PathBuf>,
    /// Read class labels from the input's integer `labels` tensor (one per sample, or one per
    /// row) to report the tolerance. The built-in data always has labels.
    #[arg(long)]
    labels: bool,
    /// The fixed temperatures to sweep, comma-separated.
    #[arg(
        long,
        value_name = "T1,T2,...",
        value_delimiter = ',',
        default_value = "0.05,0.07,0.1,0.2,0.3,0.5,1.0"
    )]
    temperatures: Vec<f64>,
    /// Add a DySTreSS temperature τ(s) between TMIN and TMAX (repeatable: `--dystress 0.1,0.2
    /// --dystress 0.07,0.2`).
    #[arg(long, value_name = "TMIN,TMAX", num_args = 1.., action = clap::ArgAction::Append)]
    dystress: Vec<String>,
    /// Also train a linear encoder on the built-in data at every temperature (part 2).
    #[arg(long)]
    train: bool,
    /// Training steps per temperature (with --train).
    #[arg(long, default_value_t = 300, value_name = "N")]
    steps: usize,
    /// With --train: MoCo-style training, negatives from a FIFO queue of K past positives
    /// (default: in-batch NT-Xent on the two views).
    #[arg(long, value_name = "K")]
    queue: Option<usize>,
    /// Seed of the built-in data and of training.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of similarity bins of the penalty histogram over [-1, 1].
    #[arg(long, default_value_t = 20, value_name = "B")]
    bins: usize,
    /// Hard-negative threshold: the table's `share` column is the share of the negatives'
    /// gradient on negatives with similarity >= this.
    #[arg(long, default_value_t = 0.5, value_name = "S")]
    threshold: f64,
    /// Write every number as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the figure (penalty histogram per temperature; with --train, uniformity, tolerance and
    /// k-NN accuracy against τ) to a .png or .svg file.
    #[arg(long, value_name = "OUT.png|OUT.svg")]
    plot: Option<PathBuf>,
    /// Which backend evaluates the loss.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    backend: BackendArg,
}

fn parse_dystress(s: &str) -> Result<Temperature> {
    let bad = || {
        Error::parameter(
            "--dystress",
            s,
            "expected TMIN,TMAX with finite 0 < TMIN <= TMAX, e.g. 0.1,0.2",
        )
    };
    let (a, b) = s.split_once(',').ok_or_else(bad)?;
    let tmin: f64 = a.trim().parse().map_err(|_| bad())?;
    let tmax: f64 = b.trim().parse().map_err(|_| bad())?;
    if !(tmin.is_finite() && tmax.is_finite() && tmin > 0.0 && tmax >= tmin) {
        return Err(bad());
    }
    Ok(Temperature::Dystress {
        tau_min: tmin,
        tau_max: tmax,
        grad: DystressGrad::Detach,
    })
}

fn schemes(args: &Args) -> Result<Vec<Temperature>> {
    let mut out = Vec::new();
    for &t in &args.temperatures {
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::parameter(
                "--temperatures",
                t,
                "each must be finite and > 0",
            ));
        }
        out.push(Temperature::Fixed(t));
    }
    for s in &args.dystress {
        out.push(parse_dystress(s)?);
    }
    if out.is_empty() {
        return Err(Error::parameter(
            "--temperatures",
            "(none)",
            "give at least one temperature or --dystress pair",
        ));
    }
    Ok(out)
}

/// The fixed-temperature rows `(τ, row)` sorted from the highest τ to the lowest.
fn fixed_by_falling_tau<R>(rows: &[R], tau: impl Fn(&R) -> Option<f64>) -> Vec<(f64, &R)> {
    let mut v: Vec<(f64, &R)> = rows.iter().filter_map(|r| tau(r).map(|t| (t, r))).collect();
    v.sort_by(|a, b| b.0.total_cmp(&a.0));
    v
}

/// How a metric moves as τ falls: "falls at every step", "rises at every step" or "not monotone".
fn trend(values: &[f64]) -> &'static str {
    if values.windows(2).all(|w| w[1] < w[0]) {
        "falls at every step"
    } else if values.windows(2).all(|w| w[1] > w[0]) {
        "rises at every step"
    } else {
        "not monotone"
    }
}

fn print_picture(fixed: &SweepData, pic: &Picture, threshold: f64, negatives: usize) {
    println!(
        "sweep: gradient picture on {} ({} mode, {} negatives per anchor)",
        fixed.description,
        fixed.mode.name(),
        negatives
    );
    let tol = pic
        .tolerance
        .map(|t| format!("{t:.4}"))
        .unwrap_or_else(|| "n/a (no labels)".into());
    println!(
        "  uniformity {:.4}   alignment {:.4}   tolerance {tol}",
        pic.uniformity, pic.alignment
    );
    println!(
        "  {:<18} {:>9} {:>10} {:>10} {:>11} {:>12}",
        "temperature",
        "loss",
        "eff. neg",
        "grad norm",
        format!("share s≥{threshold}"),
        "peak bin s"
    );
    for r in &pic.rows {
        let peak = r
            .histogram
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(b, _)| 0.5 * (pic.edges[b] + pic.edges[b + 1]))
            .unwrap_or(f64::NAN);
        println!(
            "  {:<18} {:>9.4} {:>10.1} {:>10.4} {:>11.3} {:>12.2}",
            r.temperature.label,
            r.loss,
            r.effective_negatives,
            r.gradient_norm,
            r.share_above_threshold,
            peak
        );
    }
    let f = fixed_by_falling_tau(&pic.rows, |r| r.temperature.tau);
    if let (Some(hi), Some(lo)) = (f.first(), f.last()) {
        if f.len() > 1 {
            println!(
                "  as τ falls {} → {}: effective negatives {:.0} → {:.0}, the negatives' gradient on s ≥ {threshold} {:.0}% → {:.0}%",
                hi.0,
                lo.0,
                hi.1.effective_negatives,
                lo.1.effective_negatives,
                100.0 * hi.1.share_above_threshold,
                100.0 * lo.1.share_above_threshold
            );
        }
    }
}

fn print_train(report: &TrainReport) {
    println!();
    println!(
        "sweep --train: linear encoder {}→{} on {}, {} negatives, {} steps × batch {}, lr {}, momentum {}",
        TrainConfig::default().data.dim,
        report.out_dim,
        report.data,
        report.mode,
        report.steps,
        report.batch,
        report.lr,
        report.momentum
    );
    println!(
        "  {:<18} {:>11} {:>10} {:>11} {:>10} {:>10} {:>9}",
        "temperature",
        "loss before",
        "loss after",
        "uniformity",
        "tolerance",
        "alignment",
        "kNN acc"
    );
    if let Some(r) = report.results.first() {
        let b = &r.result.before;
        println!(
            "  {:<18} {:>11} {:>10} {:>11.4} {:>10.4} {:>10.4} {:>9.3}",
            "(initial encoder)", "", "", b.uniformity, b.tolerance, b.alignment, b.knn_accuracy
        );
    }
    for r in &report.results {
        let a = &r.result.after;
        println!(
            "  {:<18} {:>11.4} {:>10.4} {:>11.4} {:>10.4} {:>10.4} {:>9.3}",
            r.temperature.label,
            r.result.loss_before,
            r.result.loss_after,
            a.uniformity,
            a.tolerance,
            a.alignment,
            a.knn_accuracy
        );
    }
    let f = fixed_by_falling_tau(&report.results, |r| r.temperature.tau);
    if let (Some(hi), Some(lo)) = (f.first(), f.last()) {
        if f.len() > 1 {
            let tol: Vec<f64> = f.iter().map(|r| r.1.result.after.tolerance).collect();
            let uni: Vec<f64> = f.iter().map(|r| r.1.result.after.uniformity).collect();
            println!(
                "  as τ falls {} → {}: tolerance {:.3} → {:.3} ({}), uniformity {:.3} → {:.3} ({}; lower is more uniform)",
                hi.0,
                lo.0,
                tol[0],
                tol[tol.len() - 1],
                trend(&tol),
                uni[0],
                uni[uni.len() - 1],
                trend(&uni)
            );
        }
    }
}

struct Sweep<'a> {
    args: &'a Args,
    train_config: TrainConfig,
}

impl Sweep<'_> {
    fn run(&self) -> Result<()> {
        let args = self.args;
        let temps = schemes(args)?;
        let plot_format = match &args.plot {
            Some(p) => Some(plot::Format::from_path(p)?),
            None => None,
        };
        if args.bins == 0 {
            return Err(Error::parameter("--bins", 0, "must be >= 1"));
        }
        if !args.threshold.is_finite() {
            return Err(Error::parameter(
                "--threshold",
                args.threshold,
                "must be finite",
            ));
        }
        let backend = match args.backend {
            BackendArg::Reference => Backend::Reference,
            BackendArg::Cpu => Backend::Cpu,
            BackendArg::Cuda => Backend::Cuda,
        };
        backend.check_available()?;
        let fixed = match &args.input {
            Some(p) => SweepData::load(p, args.labels)?,
            None => SweepData::builtin(args.seed)?,
        };

        let total = temps.len() as u64
            + if args.train {
                (temps.len() * args.steps) as u64
            } else {
                0
            };
        let bar = Bar::new(
            "{msg:>22} [{bar:40}] {pos}/{len} {elapsed_precise} (eta {eta})",
            total,
        );
        bar.message("gradient picture");
        let pic = gradient_picture(&fixed, &temps, args.bins, args.threshold, backend, &bar)?;
        let train = if args.train {
            let train_mode = match args.queue {
                Some(0) => return Err(Error::parameter("--queue", 0, "must be >= 1")),
                Some(size) => TrainMode::Queue { size },
                None => TrainMode::InBatch,
            };
            let cfg = TrainConfig {
                steps: args.steps,
                backend,
                mode: train_mode,
                ..self.train_config.clone()
            };
            Some(train_sweep(&cfg, &temps, &bar)?)
        } else {
            None
        };
        bar.finish();

        print_picture(&fixed, &pic, args.threshold, fixed.negatives());
        if let Some(t) = &train {
            print_train(t);
        }
        let report = Report::new(&fixed, &pic, backend, args.threshold, train);
        if let (Some(path), Some(format)) = (&args.plot, plot_format) {
            let fig = plot::Figure::from_report(&report, &temps);
            plot::draw(&fig, path, format)?;
            println!("\nplot written to {}", path.display());
        }
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&report)
                .map_err(|e| Error::Input(format!("cannot serialise the report: {e}")))?;
            write_atomic(path, text.as_bytes())?;
            println!("json written to {}", path.display());
        }
        Ok(())
    }
}

/// Runs `infonce sweep`.
pub fn run(args: &Args) -> Result<()> {
    Sweep {
        args,
        train_config: TrainConfig {
            seed: args.seed.wrapping_add(1),
            data: Clustered {
                seed: args.seed,
                ..Clustered::default()
            },
            ..TrainConfig::default()
        },
    }
    .run()
}

/// A short sweep on the built-in data (no-argument run): the gradient picture at the default
/// temperatures and one DySTreSS pair, then a short training sweep; tables only, no files.
pub fn run_default() -> Result<()> {
    let args = Args {
        input: None,
        labels: false,
        temperatures: vec![0.05, 0.07, 0.1, 0.2, 0.3, 0.5, 1.0],
        dystress: vec!["0.1,0.2".into()],
        train: true,
        steps: 100,
        queue: None,
        seed: 0,
        bins: 20,
        threshold: 0.5,
        json: None,
        plot: None,
        backend: BackendArg::Cpu,
    };
    run(&args)
}
