//! `infonce sweep` (see spec/cli.md): the temperature's effect, shown two ways.
//!
//! Part 1, the gradient picture on fixed embeddings (`--input`, or the built-in clustered data):
//! per temperature the loss, the effective number of negatives, the gradient norm, the share of the
//! negatives' gradient on hard negatives and the penalty histogram (Wang & Liu eq. 5); uniformity,
//! alignment and tolerance of the embeddings once.
//!
//! Part 2 (`--train`): a linear encoder trained on the built-in data at every temperature
//! ([`fused_infonce::train`]); uniformity, tolerance, alignment, k-NN accuracy and the loss before
//! and after (the uniformity–tolerance dilemma).

mod plot;

use fused_infonce::cuda;
use fused_infonce::data::{stack, two_views, unstack, Clustered};
use fused_infonce::io::{write_atomic, TensorFile};
use fused_infonce::metrics::{self, NegativeSimilarities, Negatives, PenaltyHistogram};
use fused_infonce::train::{self, temperature_label, Backend, TrainConfig, TrainMode, TrainResult};
use fused_infonce::{
    DystressGrad, Error, LossInputs, LossSpec, MatRef, Matrix, Result, Temperature, Upstream,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// The backend that evaluates the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendArg {
    /// The f64 CPU reference.
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

/// The embeddings of part 1, normalised, in one of the loss's modes.
struct Fixed {
    /// What the data is, for the table and the plot title.
    description: String,
    /// The loss mode used for it.
    mode: &'static str,
    /// The raw rows as given (the loss normalises them itself).
    raw: Vec<(&'static str, Matrix)>,
    /// Labels of the anchor rows (for tolerance), if any.
    labels: Option<Vec<i64>>,
}

/// Which temperature a row is for: the JSON fields `label`, `kind` (`fixed` or `dystress`) and
/// `tau` (fixed) or `tau_min` and `tau_max` (DySTreSS), the others null.
#[derive(Debug, Clone, serde::Serialize)]
struct TemperatureFields {
    label: String,
    kind: &'static str,
    tau: Option<f64>,
    tau_min: Option<f64>,
    tau_max: Option<f64>,
}

impl TemperatureFields {
    fn of(t: &Temperature) -> Self {
        let (kind, tau, tau_min, tau_max) = match *t {
            Temperature::Fixed(x) | Temperature::Learnable(x) => ("fixed", Some(x), None, None),
            Temperature::Dystress {
                tau_min, tau_max, ..
            } => ("dystress", None, Some(tau_min), Some(tau_max)),
        };
        Self {
            label: temperature_label(t),
            kind,
            tau,
            tau_min,
            tau_max,
        }
    }
}

/// One temperature's gradient picture (part 1).
#[derive(Debug, Clone, serde::Serialize)]
struct PictureRow {
    #[serde(flatten)]
    temperature: TemperatureFields,
    loss: f64,
    effective_negatives: f64,
    gradient_norm: f64,
    share_above_threshold: f64,
    histogram: Vec<f64>,
}

#[derive(Debug, serde::Serialize)]
struct TrainRow {
    #[serde(flatten)]
    temperature: TemperatureFields,
    #[serde(flatten)]
    result: TrainResult,
}

#[derive(Debug, serde::Serialize)]
struct TrainReport {
    data: String,
    mode: String,
    steps: usize,
    batch: usize,
    out_dim: usize,
    lr: f64,
    momentum: f64,
    noise: f64,
    knn_k: usize,
    results: Vec<TrainRow>,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    data: String,
    mode: &'static str,
    backend: &'static str,
    uniformity: f64,
    alignment: f64,
    tolerance: Option<f64>,
    threshold: f64,
    bin_edges: Vec<f64>,
    temperatures: Vec<PictureRow>,
    train: Option<TrainReport>,
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

/// The tensor `name` as an f64 matrix (2-D; stored as f32, f16, bf16 or f64), `None` when the
/// file has no such tensor; its values must be finite.
fn read_matrix(file: &TensorFile, name: &'static str) -> Result<Option<Matrix>> {
    if !file.contains(name) {
        return Ok(None);
    }
    let m = file.matrix_f64(name)?;
    m.view()?.check_finite()?;
    Ok(Some(m.into()))
}

/// The integer `labels` tensor (i64, i32 or u8; 1-D) that `--labels` asks for.
fn read_labels(file: &TensorFile) -> Result<Vec<i64>> {
    if !file.contains("labels") {
        return Err(Error::Input(format!(
            "{}: --labels given but the file has no `labels` tensor",
            file.source()
        )));
    }
    file.integers("labels")
}

fn load_input(path: &Path, want_labels: bool) -> Result<Fixed> {
    let file = TensorFile::read(path)?;
    let labels = if want_labels {
        Some(read_labels(&file)?)
    } else {
        None
    };
    let name = file.source();
    if let Some(e) = read_matrix(&file, "embeddings")? {
        let labels = match labels {
            Some(l) if l.len() * 2 == e.rows => Some(l.iter().chain(&l).copied().collect()),
            Some(l) if l.len() == e.rows => Some(l),
            Some(l) => {
                return Err(Error::shape(
                    "labels",
                    format!("[{}]", l.len()),
                    format!(
                        "[{}] or [{}] (one per sample or per row)",
                        e.rows / 2,
                        e.rows
                    ),
                ))
            }
            None => None,
        };
        return Ok(Fixed {
            description: format!("{name}: embeddings {}×{}", e.rows, e.cols),
            mode: "inbatch",
            raw: vec![("embeddings", e)],
            labels,
        });
    }
    let q = read_matrix(&file, "query")?;
    let p = read_matrix(&file, "positive")?;
    let (q, p) = match (q, p) {
        (Some(q), Some(p)) => (q, p),
        _ => {
            return Err(Error::Input(format!(
                "{}: expected a tensor `embeddings` (2N×D) or `query` and `positive` (N×D)",
                path.display()
            )))
        }
    };
    if let Some(l) = &labels {
        if l.len() != q.rows {
            return Err(Error::shape(
                "labels",
                format!("[{}]", l.len()),
                format!("[{}] (one per query row)", q.rows),
            ));
        }
    }
    match read_matrix(&file, "queue")? {
        Some(m) => Ok(Fixed {
            description: format!(
                "{name}: query {}×{}, queue {}×{}",
                q.rows, q.cols, m.rows, m.cols
            ),
            mode: "queue",
            raw: vec![("query", q), ("positive", p), ("queue", m)],
            labels,
        }),
        None => Ok(Fixed {
            description: format!("{name}: query/positive {}×{}", q.rows, q.cols),
            mode: "cross",
            raw: vec![("query", q), ("positive", p)],
            labels,
        }),
    }
}

/// The built-in data for part 1: two noisy views of the clustered set, in-batch layout.
fn builtin(seed: u64) -> Result<Fixed> {
    let cfg = Clustered {
        seed,
        ..Clustered::default()
    };
    let set = cfg.generate()?;
    let (a, b) = two_views(&set.x, TrainConfig::default().noise, seed.wrapping_add(17));
    let e = stack(&a, &b)?;
    let labels = set.labels.iter().chain(&set.labels).copied().collect();
    Ok(Fixed {
        description: format!(
            "built-in clustered data ({} classes, 2N = {}, D = {})",
            cfg.classes, e.rows, e.cols
        ),
        mode: "inbatch",
        raw: vec![("embeddings", e)],
        labels: Some(labels),
    })
}

fn matref<'a>(name: &'static str, m: &'a Matrix) -> Result<MatRef<'a, f64>> {
    MatRef::new(name, &m.data, m.rows, m.cols)
}

fn normalized(m: &Matrix) -> Result<Matrix> {
    Ok(metrics::normalized(&matref("rows", m)?))
}

struct Picture {
    uniformity: f64,
    alignment: f64,
    tolerance: Option<f64>,
    rows: Vec<PictureRow>,
    edges: Vec<f64>,
}

fn gradient_picture(
    fixed: &Fixed,
    temps: &[Temperature],
    args: &Args,
    backend: Backend,
    bar: &ProgressBar,
) -> Result<Picture> {
    let norm: Vec<Matrix> = fixed
        .raw
        .iter()
        .map(|(_, m)| normalized(m))
        .collect::<Result<_>>()?;
    let (anchors, pairs_u, pairs_v, neg) = match fixed.mode {
        "inbatch" => {
            let e = &norm[0];
            let (u, v) = unstack(e);
            let neg = NegativeSimilarities::new(Negatives::InBatch { embeddings: e })?;
            (e.clone(), u, v, neg)
        }
        "queue" => {
            let neg = NegativeSimilarities::new(Negatives::Queue {
                query: &norm[0],
                queue: &norm[2],
            })?;
            (norm[0].clone(), norm[0].clone(), norm[1].clone(), neg)
        }
        _ => {
            let neg = NegativeSimilarities::new(Negatives::Cross {
                query: &norm[0],
                key: &norm[1],
            })?;
            (norm[0].clone(), norm[0].clone(), norm[1].clone(), neg)
        }
    };
    let alignment = metrics::alignment(&pairs_u, &pairs_v)?;
    // With --backend cuda, uniformity, tolerance, the penalty histogram and the effective
    // negatives come from the GPU metric kernels (cuda::metrics); alignment, the gradient norm and
    // the hard-negative share stay on the host.
    let gpu = match backend {
        Backend::Cuda => Some(GpuMetrics::new(fixed.mode, &norm)?),
        Backend::Cpu => None,
    };
    let (uniformity, tolerance) = match &gpu {
        Some(g) => (
            g.uniformity()?,
            match &fixed.labels {
                Some(l) => Some(g.tolerance(l)?),
                None => None,
            },
        ),
        None => (
            metrics::uniformity(&anchors, metrics::UNIFORMITY_T)?,
            match &fixed.labels {
                Some(l) => Some(metrics::tolerance(&anchors, l)?),
                None => None,
            },
        ),
    };

    let mut rows = Vec::new();
    let mut edges = Vec::new();
    for t in temps {
        let builder = match fixed.mode {
            "inbatch" => LossSpec::inbatch(),
            "queue" => LossSpec::queue(),
            _ => LossSpec::cross(),
        };
        let spec = builder.temperature_scheme(*t).normalize(true).build()?;
        let m = &fixed.raw;
        let inputs = match fixed.mode {
            "inbatch" => LossInputs::InBatch {
                embeddings: matref("embeddings", &m[0].1)?,
            },
            "queue" => LossInputs::Queue {
                query: matref("query", &m[0].1)?,
                positive: matref("positive", &m[1].1)?,
                queue: matref("queue", &m[2].1)?,
            },
            _ => LossInputs::Cross {
                query: matref("query", &m[0].1)?,
                key: matref("key", &m[1].1)?,
                targets: None,
            },
        };
        let out = backend.evaluate(&spec, &inputs, &Upstream::One)?;
        let hist: PenaltyHistogram = metrics::penalty_histogram(&neg, t, args.bins)?;
        let (mass, effective_negatives) = match &gpu {
            Some(g) => g.penalty(t, args.bins)?,
            None => (hist.mass, metrics::effective_negatives(&neg, t)?),
        };
        rows.push(PictureRow {
            temperature: TemperatureFields::of(t),
            loss: out.loss.scalar().unwrap_or(f64::NAN),
            effective_negatives,
            gradient_norm: metrics::gradient_norm(&out),
            share_above_threshold: metrics::penalty_share_above(&neg, t, args.threshold)?,
            histogram: mass,
        });
        edges = hist.edges;
        bar.inc(1);
    }
    Ok(Picture {
        uniformity,
        alignment,
        tolerance,
        rows,
        edges,
    })
}

/// The sweep's metrics on the GPU: the (normalised) matrices uploaded once as f32, the metric
/// kernels of [`fused_infonce::cuda::metrics`] per call, results downloaded as f64. Edge cases map
/// to the CPU metrics' errors (the kernels return NaN or 0 there).
struct GpuMetrics {
    gpu: std::sync::Arc<cuda::Gpu>,
    mode: &'static str,
    mats: Vec<cuda::DeviceMatrix<f32>>,
}

impl GpuMetrics {
    fn new(mode: &'static str, norm: &[Matrix]) -> Result<Self> {
        let gpu = cuda::default_gpu()?;
        let mats = norm
            .iter()
            .map(|m| {
                let v: Vec<f32> = m.data.iter().map(|&x| x as f32).collect();
                cuda::DeviceMatrix::upload(&gpu, &MatRef::new("rows", &v, m.rows, m.cols)?)
            })
            .collect::<Result<_>>()?;
        Ok(Self { gpu, mode, mats })
    }

    fn one(&self, s: &cudarc::driver::CudaSlice<f32>) -> Result<f64> {
        Ok(self.gpu.stream().clone_dtoh(s)?[0] as f64)
    }

    fn uniformity(&self) -> Result<f64> {
        let u = cuda::metrics::uniformity(&self.gpu, &self.mats[0], metrics::UNIFORMITY_T)?;
        self.one(&u)
    }

    fn tolerance(&self, labels: &[i64]) -> Result<f64> {
        let (ids, classes) = cuda::metrics::dense_labels(labels);
        let dev = self.gpu.stream().clone_htod(&ids)?;
        let t = cuda::metrics::tolerance(&self.gpu, &self.mats[0], &dev, classes)?;
        let t = self.one(&t)?;
        if t.is_nan() {
            return Err(Error::Input(
                "tolerance: no class has two samples (no same-class pairs)".into(),
            ));
        }
        Ok(t)
    }

    /// The penalty histogram's mass per bin and the effective number of negatives.
    fn penalty(&self, t: &Temperature, bins: usize) -> Result<(Vec<f64>, f64)> {
        let m = &self.mats;
        let inputs = match self.mode {
            "inbatch" => cuda::DeviceInputs::InBatch { embeddings: &m[0] },
            "queue" => cuda::DeviceInputs::Queue {
                query: &m[0],
                positive: &m[1],
                queue: cuda::QueueView::whole(&m[2]),
            },
            _ => cuda::DeviceInputs::Cross {
                query: &m[0],
                key: &m[1],
                targets: None,
            },
        };
        let p = cuda::metrics::penalty(&self.gpu, &inputs, false, t, bins)?;
        let mass = self.gpu.stream().clone_dtoh(&p.histogram)?;
        let eff = self.one(&p.effective_negatives)?;
        Ok((mass.iter().take(bins).map(|&x| x as f64).collect(), eff))
    }
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>22} [{bar:40}] {pos}/{len} {elapsed_precise} (eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
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

fn print_picture(fixed: &Fixed, pic: &Picture, threshold: f64, negatives: usize) {
    println!(
        "sweep: gradient picture on {} ({} mode, {} negatives per anchor)",
        fixed.description, fixed.mode, negatives
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
            BackendArg::Cpu => Backend::Cpu,
            BackendArg::Cuda => Backend::Cuda,
        };
        backend.check_available()?;
        let fixed = match &args.input {
            Some(p) => load_input(p, args.labels)?,
            None => builtin(args.seed)?,
        };

        let total = temps.len() as u64
            + if args.train {
                (temps.len() * args.steps) as u64
            } else {
                0
            };
        let bar = progress_bar(total);
        bar.set_message("gradient picture");
        let pic = gradient_picture(&fixed, &temps, args, backend, &bar)?;

        let train = if args.train {
            let mode = match args.queue {
                Some(0) => return Err(Error::parameter("--queue", 0, "must be >= 1")),
                Some(size) => TrainMode::Queue { size },
                None => TrainMode::InBatch,
            };
            let cfg = TrainConfig {
                steps: args.steps,
                backend,
                mode,
                ..self.train_config.clone()
            };
            let mut results = Vec::new();
            for t in &temps {
                let temperature = TemperatureFields::of(t);
                bar.set_message(format!("train τ = {}", temperature.label));
                let r = train::train(&cfg, *t, &mut |_| bar.inc(1))?;
                results.push(TrainRow {
                    temperature,
                    result: r,
                });
            }
            Some(TrainReport {
                data: format!(
                    "built-in clustered data ({} classes × {}, D = {})",
                    cfg.data.classes, cfg.data.per_class, cfg.data.dim
                ),
                mode: match cfg.mode {
                    TrainMode::InBatch => "inbatch".into(),
                    TrainMode::Queue { size } => format!("queue {size}"),
                },
                steps: cfg.steps,
                batch: cfg.batch,
                out_dim: cfg.out_dim,
                lr: cfg.lr,
                momentum: cfg.momentum,
                noise: cfg.noise,
                knn_k: cfg.knn_k,
                results,
            })
        } else {
            None
        };
        bar.finish_and_clear();

        let negatives = match fixed.raw.as_slice() {
            [(_, e)] if fixed.mode == "inbatch" => e.rows.saturating_sub(2),
            [_, _, (_, m)] => m.rows,
            [_, (_, k)] => k.rows.saturating_sub(1),
            _ => 0,
        };
        print_picture(&fixed, &pic, args.threshold, negatives);
        if let Some(t) = &train {
            print_train(t);
        }

        let report = Report {
            data: fixed.description.clone(),
            mode: fixed.mode,
            backend: match backend {
                Backend::Cpu => "cpu",
                Backend::Cuda => "cuda",
            },
            uniformity: pic.uniformity,
            alignment: pic.alignment,
            tolerance: pic.tolerance,
            threshold: args.threshold,
            bin_edges: pic.edges.clone(),
            temperatures: pic.rows.clone(),
            train,
        };
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
