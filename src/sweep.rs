//! `infonce sweep`'s computations (spec/cli.md): the temperature's effect, shown two ways.
//!
//! Part 1, [`gradient_picture`] on fixed embeddings ([`SweepData::load`] a file, or
//! [`SweepData::builtin`] the clustered data): per temperature the loss, the effective number of
//! negatives, the gradient norm, the share of the negatives' gradient on hard negatives and the
//! penalty histogram (Wang & Liu eq. 5); uniformity, alignment and tolerance of the embeddings
//! once.
//!
//! Part 2, [`train_sweep`]: a linear encoder trained on the built-in data at every temperature
//! ([`crate::train`]); uniformity, tolerance, alignment, k-NN accuracy and the loss before and
//! after (the uniformity–tolerance dilemma). The `infonce` program parses the flags and prints;
//! [`Report`] is its `--json`.

use std::path::Path;

use crate::cuda;
use crate::data::{stack, two_views, unstack, Clustered};
use crate::error::{Error, Result};
use crate::io::TensorFile;
use crate::loss::{LossInputs, Upstream};
use crate::metrics::{self, NegativeSimilarities, Negatives, PenaltyHistogram};
use crate::progress::Progress;
use crate::spec::{LossSpec, Mode, Temperature};
use crate::tensor::{MatRef, Matrix};
use crate::train::{self, temperature_label, Backend, TrainConfig, TrainMode, TrainResult};

/// The embeddings of part 1 in one of the loss's modes (inbatch, queue or cross).
#[derive(Debug, Clone)]
pub struct SweepData {
    /// What the data is, for the table and the plot title.
    pub description: String,
    /// The loss mode used for it.
    pub mode: Mode,
    /// The raw rows as given, by input name (the loss normalises them itself).
    pub raw: Vec<(&'static str, Matrix)>,
    /// Labels of the anchor rows (for tolerance), if any.
    pub labels: Option<Vec<i64>>,
}

/// Which temperature a row is for: the JSON fields `label`, `kind` (`fixed` or `dystress`) and
/// `tau` (fixed) or `tau_min` and `tau_max` (DySTreSS), the others null.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TemperatureFields {
    /// As the tables print it (`0.07`, `dystress 0.1–0.2`).
    pub label: String,
    /// `fixed` or `dystress`.
    pub kind: &'static str,
    /// A fixed τ.
    pub tau: Option<f64>,
    /// DySTreSS's τ_min.
    pub tau_min: Option<f64>,
    /// DySTreSS's τ_max.
    pub tau_max: Option<f64>,
}

impl TemperatureFields {
    /// The fields of `t`.
    pub fn of(t: &Temperature) -> Self {
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
pub struct PictureRow {
    /// The temperature.
    #[serde(flatten)]
    pub temperature: TemperatureFields,
    /// The loss (mean).
    pub loss: f64,
    /// The effective number of negatives (exp of the entropy of the negatives' softmax).
    pub effective_negatives: f64,
    /// The norm of the loss's gradient.
    pub gradient_norm: f64,
    /// The share of the negatives' gradient on negatives with `s ≥ threshold`.
    pub share_above_threshold: f64,
    /// The penalty histogram's mass per similarity bin.
    pub histogram: Vec<f64>,
}

/// Part 1: the embeddings' metrics and one row per temperature.
#[derive(Debug, Clone)]
pub struct Picture {
    /// Uniformity (Wang & Isola, t = 2) of the anchors.
    pub uniformity: f64,
    /// Alignment of the positive pairs.
    pub alignment: f64,
    /// Tolerance (with labels).
    pub tolerance: Option<f64>,
    /// One row per temperature, in the order given.
    pub rows: Vec<PictureRow>,
    /// The histogram's bin edges over [-1, 1].
    pub edges: Vec<f64>,
}

/// One temperature's training result (part 2).
#[derive(Debug, serde::Serialize)]
pub struct TrainRow {
    /// The temperature.
    #[serde(flatten)]
    pub temperature: TemperatureFields,
    /// Before and after training.
    #[serde(flatten)]
    pub result: TrainResult,
}

/// Part 2: the training setup and one row per temperature.
#[derive(Debug, serde::Serialize)]
pub struct TrainReport {
    /// The data set.
    pub data: String,
    /// `inbatch` or `queue K`.
    pub mode: String,
    /// Steps per temperature.
    pub steps: usize,
    /// Batch size.
    pub batch: usize,
    /// The encoder's output dimension.
    pub out_dim: usize,
    /// Learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Augmentation noise.
    pub noise: f64,
    /// k of the k-NN accuracy.
    pub knn_k: usize,
    /// One row per temperature.
    pub results: Vec<TrainRow>,
}

/// Everything `infonce sweep` computes (its `--json`).
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The data of part 1.
    pub data: String,
    /// Its loss mode.
    pub mode: &'static str,
    /// `reference`, `cpu` or `cuda`.
    pub backend: &'static str,
    /// Part 1's uniformity.
    pub uniformity: f64,
    /// Part 1's alignment.
    pub alignment: f64,
    /// Part 1's tolerance (with labels).
    pub tolerance: Option<f64>,
    /// The hard-negative threshold of `share_above_threshold`.
    pub threshold: f64,
    /// The histogram's bin edges.
    pub bin_edges: Vec<f64>,
    /// Part 1's rows.
    pub temperatures: Vec<PictureRow>,
    /// Part 2, with `--train`.
    pub train: Option<TrainReport>,
}

impl Report {
    /// The report of part 1 on `data` (and part 2's, when trained).
    pub fn new(
        data: &SweepData,
        pic: &Picture,
        backend: Backend,
        threshold: f64,
        train: Option<TrainReport>,
    ) -> Self {
        Report {
            data: data.description.clone(),
            mode: data.mode.name(),
            backend: backend.name(),
            uniformity: pic.uniformity,
            alignment: pic.alignment,
            tolerance: pic.tolerance,
            threshold,
            bin_edges: pic.edges.clone(),
            temperatures: pic.rows.clone(),
            train,
        }
    }
}

impl SweepData {
    /// Reads `embeddings` (2N×D, inbatch) or `query` and `positive` (N×D) with an optional
    /// `queue` (K×D, queue mode; cross without it) from a safetensors file, with the integer
    /// `labels` tensor when `want_labels` (one per sample, or per row).
    pub fn load(path: &Path, want_labels: bool) -> Result<SweepData> {
        load_input(path, want_labels)
    }

    /// The built-in data: two noisy views of the clustered set (seeded), in-batch layout, with
    /// labels.
    pub fn builtin(seed: u64) -> Result<SweepData> {
        builtin_data(seed)
    }

    /// The number of negatives per anchor.
    pub fn negatives(&self) -> usize {
        match (self.mode, self.raw.as_slice()) {
            (Mode::InBatch, [(_, e)]) => e.rows.saturating_sub(2),
            (Mode::Queue, [_, _, (_, m)]) => m.rows,
            (_, [_, (_, k)]) => k.rows.saturating_sub(1),
            _ => 0,
        }
    }
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

fn load_input(path: &Path, want_labels: bool) -> Result<SweepData> {
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
        return Ok(SweepData {
            description: format!("{name}: embeddings {}×{}", e.rows, e.cols),
            mode: Mode::InBatch,
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
        Some(m) => Ok(SweepData {
            description: format!(
                "{name}: query {}×{}, queue {}×{}",
                q.rows, q.cols, m.rows, m.cols
            ),
            mode: Mode::Queue,
            raw: vec![("query", q), ("positive", p), ("queue", m)],
            labels,
        }),
        None => Ok(SweepData {
            description: format!("{name}: query/positive {}×{}", q.rows, q.cols),
            mode: Mode::Cross,
            raw: vec![("query", q), ("positive", p)],
            labels,
        }),
    }
}

fn builtin_data(seed: u64) -> Result<SweepData> {
    let cfg = Clustered {
        seed,
        ..Clustered::default()
    };
    let set = cfg.generate()?;
    let (a, b) = two_views(&set.x, TrainConfig::default().noise, seed.wrapping_add(17));
    let e = stack(&a, &b)?;
    let labels = set.labels.iter().chain(&set.labels).copied().collect();
    Ok(SweepData {
        description: format!(
            "built-in clustered data ({} classes, 2N = {}, D = {})",
            cfg.classes, e.rows, e.cols
        ),
        mode: Mode::InBatch,
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

/// Part 1 on `fixed`: per temperature the loss (evaluated by `backend`, mean reduction, rows
/// normalised by the spec), the effective negatives, the gradient norm, the share of the
/// negatives' gradient on `s ≥ threshold` and the penalty histogram in `bins` bins; the
/// embeddings' uniformity, alignment and tolerance once. With [`Backend::Cuda`] the uniformity,
/// tolerance, histogram and effective negatives come from the GPU metric kernels
/// ([`crate::cuda::metrics`]). One unit of progress per temperature.
pub fn gradient_picture(
    fixed: &SweepData,
    temps: &[Temperature],
    bins: usize,
    threshold: f64,
    backend: Backend,
    progress: &dyn Progress,
) -> Result<Picture> {
    if bins == 0 {
        return Err(Error::parameter("bins", 0, "must be >= 1"));
    }
    if !threshold.is_finite() {
        return Err(Error::parameter("threshold", threshold, "must be finite"));
    }
    let norm: Vec<Matrix> = fixed
        .raw
        .iter()
        .map(|(_, m)| normalized(m))
        .collect::<Result<_>>()?;
    let (anchors, pairs_u, pairs_v, neg) = match fixed.mode {
        Mode::InBatch => {
            let e = &norm[0];
            let (u, v) = unstack(e);
            let neg = NegativeSimilarities::new(Negatives::InBatch { embeddings: e })?;
            (e.clone(), u, v, neg)
        }
        Mode::Queue => {
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
        Backend::Reference | Backend::Cpu => None,
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
        let spec = LossSpec::builder(fixed.mode)
            .temperature_scheme(*t)
            .normalize(true)
            .build()?;
        let m = &fixed.raw;
        let inputs = match fixed.mode {
            Mode::InBatch => LossInputs::InBatch {
                embeddings: matref("embeddings", &m[0].1)?,
            },
            Mode::Queue => LossInputs::Queue {
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
        let hist: PenaltyHistogram = metrics::penalty_histogram(&neg, t, bins)?;
        let (mass, effective_negatives) = match &gpu {
            Some(g) => g.penalty(t, bins)?,
            None => (hist.mass, metrics::effective_negatives(&neg, t)?),
        };
        rows.push(PictureRow {
            temperature: TemperatureFields::of(t),
            loss: out.loss.scalar().unwrap_or(f64::NAN),
            effective_negatives,
            gradient_norm: metrics::gradient_norm(&out),
            share_above_threshold: metrics::penalty_share_above(&neg, t, threshold)?,
            histogram: mass,
        });
        edges = hist.edges;
        progress.advance(1);
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
/// kernels of [`crate::cuda::metrics`] per call, results downloaded as f64. Edge cases map
/// to the CPU metrics' errors (the kernels return NaN or 0 there).
struct GpuMetrics {
    gpu: std::sync::Arc<cuda::Gpu>,
    mode: Mode,
    mats: Vec<cuda::DeviceMatrix<f32>>,
}

impl GpuMetrics {
    fn new(mode: Mode, norm: &[Matrix]) -> Result<Self> {
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
            Mode::InBatch => cuda::DeviceInputs::InBatch { embeddings: &m[0] },
            Mode::Queue => cuda::DeviceInputs::Queue {
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

/// Part 2: the linear encoder of [`crate::train`] trained with `cfg` at every temperature of
/// `temps`, before and after. One unit of progress per step.
pub fn train_sweep(
    cfg: &TrainConfig,
    temps: &[Temperature],
    progress: &dyn Progress,
) -> Result<TrainReport> {
    if let TrainMode::Queue { size: 0 } = cfg.mode {
        return Err(Error::parameter("queue", 0, "must be >= 1"));
    }
    let mut results = Vec::new();
    for t in temps {
        let temperature = TemperatureFields::of(t);
        progress.message(&format!("train τ = {}", temperature.label));
        let result = train::train(cfg, *t, &mut |_| progress.advance(1))?;
        results.push(TrainRow {
            temperature,
            result,
        });
    }
    Ok(TrainReport {
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
}
