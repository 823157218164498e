//! A small training loop driven by this crate's loss: a linear encoder `u = normalize(x W)`
//! (W: D_in × D_out) trained on the built-in clustered data ([`crate::data`]) with the contrastive
//! loss and its gradients, for one temperature scheme at a time. Used by `infonce sweep --train` to
//! show the uniformity–tolerance dilemma (Wang & Liu, CVPR 2021) on a trained embedding.
//!
//! One step: draw a batch of samples, two fresh augmented views `x_a`, `x_b`, encode `y = x W`,
//! evaluate the loss on `y` with the spec's fused normalisation (so `∂L/∂y` comes back through the
//! normalisation), backpropagate by hand through the linear map, `dW = Σ_i x_i ⊗ ∂L/∂y_i`, and
//! take a momentum-SGD step. Everything is seeded: the same config gives the same numbers.
//!
//! ```
//! use fused_infonce::train::{train, TrainConfig};
//! use fused_infonce::Temperature;
//! let cfg = TrainConfig { steps: 5, ..TrainConfig::default() };
//! let r = train(&cfg, Temperature::Fixed(0.2), &mut |_| {})?;
//! assert!(r.loss_after.is_finite());
//! # Ok::<(), fused_infonce::Error>(())
//! ```

use crate::cpu;
use crate::cuda;
use crate::data::{augment, gaussian, normalize_in_place, stack, unstack, Clustered, Dataset};
use crate::error::{Error, Result};
use crate::loss::{LossInputs, LossOutput, Upstream};
use crate::metrics;
use crate::queue::HostQueue;
use crate::reference;
use crate::spec::{LossSpec, Temperature};
use crate::tensor::{MatRef, Matrix};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Which implementation evaluates the loss and its gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// [`reference::evaluate`], the f64 oracle (exact, slow by design).
    Reference,
    /// [`cpu::evaluate`], the fast fused CPU backend (f32 arithmetic, multi-threaded).
    #[default]
    Cpu,
    /// [`cuda::evaluate`] on the first GPU (inputs sent as f32); an error without a usable GPU.
    Cuda,
}

impl Backend {
    /// Evaluates `spec` on f64 inputs with this backend.
    pub fn evaluate(
        self,
        spec: &LossSpec,
        inputs: &LossInputs<'_, f64>,
        upstream: &Upstream,
    ) -> Result<LossOutput> {
        match self {
            Backend::Reference => reference::evaluate(spec, inputs, upstream),
            Backend::Cpu => cpu::evaluate(spec, inputs, upstream),
            Backend::Cuda => {
                let conv = |m: &MatRef<'_, f64>| -> Vec<f32> {
                    m.data().iter().map(|&x| x as f32).collect()
                };
                match *inputs {
                    LossInputs::InBatch { embeddings } => {
                        let e = conv(&embeddings);
                        let inputs = LossInputs::InBatch {
                            embeddings: MatRef::new(
                                "embeddings",
                                &e,
                                embeddings.rows(),
                                embeddings.cols(),
                            )?,
                        };
                        cuda::evaluate(spec, &inputs, upstream)
                    }
                    LossInputs::Queue {
                        query,
                        positive,
                        queue,
                    } => {
                        let (q, p, m) = (conv(&query), conv(&positive), conv(&queue));
                        let inputs = LossInputs::Queue {
                            query: MatRef::new("query", &q, query.rows(), query.cols())?,
                            positive: MatRef::new(
                                "positive",
                                &p,
                                positive.rows(),
                                positive.cols(),
                            )?,
                            queue: MatRef::new("queue", &m, queue.rows(), queue.cols())?,
                        };
                        cuda::evaluate(spec, &inputs, upstream)
                    }
                    LossInputs::Cross {
                        query,
                        key,
                        targets,
                    } => {
                        let (q, k) = (conv(&query), conv(&key));
                        let inputs = LossInputs::Cross {
                            query: MatRef::new("query", &q, query.rows(), query.cols())?,
                            key: MatRef::new("key", &k, key.rows(), key.cols())?,
                            targets,
                        };
                        cuda::evaluate(spec, &inputs, upstream)
                    }
                    LossInputs::Symmetric { query, key } => {
                        let (q, k) = (conv(&query), conv(&key));
                        let inputs = LossInputs::Symmetric {
                            query: MatRef::new("query", &q, query.rows(), query.cols())?,
                            key: MatRef::new("key", &k, key.rows(), key.cols())?,
                        };
                        cuda::evaluate(spec, &inputs, upstream)
                    }
                }
            }
        }
    }

    /// The name `--backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Reference => "reference",
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }

    /// Fails early, with the backend's own error, when this backend cannot run here
    /// (the CUDA backend without a driver or device).
    pub fn check_available(self) -> Result<()> {
        match self {
            Backend::Reference | Backend::Cpu => Ok(()),
            Backend::Cuda => cuda::default_gpu().map(|_| ()),
        }
    }
}

/// Where the negatives come from during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainMode {
    /// SimCLR NT-Xent on the two views of the batch (2B rows, 2B − 2 negatives per anchor).
    InBatch,
    /// MoCo-style: query = view a, positive = view b, negatives from a FIFO queue of `size` past
    /// positives (detached; no momentum encoder, both views share W). The queue starts filled
    /// with encoded views of random samples.
    Queue {
        /// K, the queue length (≥ 1).
        size: usize,
    },
}

/// The training setup (data, encoder, optimiser, evaluation).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// The built-in data set.
    pub data: Clustered,
    /// Output dimension of the encoder.
    pub out_dim: usize,
    /// Samples per step (B).
    pub batch: usize,
    /// Number of optimiser steps.
    pub steps: usize,
    /// Learning rate.
    pub lr: f64,
    /// Momentum (0 for plain SGD).
    pub momentum: f64,
    /// Augmentation noise (see [`crate::data::augment`]).
    pub noise: f64,
    /// In-batch or queue negatives.
    pub mode: TrainMode,
    /// Which backend evaluates the loss.
    pub backend: Backend,
    /// k of the k-NN accuracy.
    pub knn_k: usize,
    /// Seed of the initial W, the batches and the augmentations.
    pub seed: u64,
}

impl Default for TrainConfig {
    /// The built-in data ([`Clustered::default`]), D_out = 16, B = 128, 300 steps, lr 0.5,
    /// momentum 0.9, noise 0.5, in-batch, CPU, k = 5, seed 1.
    fn default() -> Self {
        Self {
            data: Clustered::default(),
            out_dim: 16,
            batch: 128,
            steps: 300,
            lr: 0.5,
            momentum: 0.9,
            noise: 0.5,
            mode: TrainMode::InBatch,
            backend: Backend::Cpu,
            knn_k: 5,
            seed: 1,
        }
    }
}

/// Metrics of an embedding of the whole data set (clean samples, no augmentation).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EmbeddingMetrics {
    /// [`metrics::uniformity`] with t = 2 (lower is more uniform).
    pub uniformity: f64,
    /// [`metrics::tolerance`] with the class labels (higher: classes kept together).
    pub tolerance: f64,
    /// [`metrics::alignment`] between two augmented views of every sample (lower is better).
    pub alignment: f64,
    /// Leave-one-out k-NN accuracy by cosine ([`metrics::knn_accuracy`]).
    pub knn_accuracy: f64,
}

/// The outcome of training at one temperature.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainResult {
    /// The in-batch NT-Xent loss at this temperature on fixed evaluation views of the whole data
    /// set, with the initial W.
    pub loss_before: f64,
    /// The same loss with the trained W.
    pub loss_after: f64,
    /// Metrics of the initial encoder.
    pub before: EmbeddingMetrics,
    /// Metrics of the trained encoder.
    pub after: EmbeddingMetrics,
    /// The training loss of every step (the batch loss before that step's update).
    pub curve: Vec<f64>,
}

impl TrainConfig {
    fn check(&self) -> Result<()> {
        for (name, v) in [
            ("out_dim", self.out_dim),
            ("batch", self.batch),
            ("knn_k", self.knn_k),
        ] {
            if v == 0 {
                return Err(Error::parameter(name, v, "must be >= 1"));
            }
        }
        if self.batch < 2 {
            return Err(Error::parameter(
                "batch",
                self.batch,
                "must be >= 2 (in-batch negatives)",
            ));
        }
        if let TrainMode::Queue { size: 0 } = self.mode {
            return Err(Error::parameter("queue size", 0, "must be >= 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::parameter("lr", self.lr, "must be finite and > 0"));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(Error::parameter(
                "momentum",
                self.momentum,
                "must be in [0, 1)",
            ));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(Error::parameter(
                "noise",
                self.noise,
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }
}

/// `y = x W` for the rows of `x` (N × D_in), W (D_in × D_out).
pub fn encode(x: &Matrix, w: &Matrix) -> Matrix {
    let mut y = Matrix::zeros(x.rows, w.cols);
    for i in 0..x.rows {
        let yi = y.row_mut(i);
        for (k, &xik) in x.row(i).iter().enumerate() {
            if xik != 0.0 {
                for (o, &wk) in yi.iter_mut().zip(w.row(k)) {
                    *o += xik * wk;
                }
            }
        }
    }
    y
}

/// `normalize(x W)`.
pub fn embed(x: &Matrix, w: &Matrix) -> Matrix {
    let mut y = encode(x, w);
    normalize_in_place(&mut y);
    y
}

/// Adds `Σ_i x_i ⊗ dy_i` (= `xᵀ dy`, D_in × D_out) to `dw`.
fn accumulate_dw(dw: &mut Matrix, x: &Matrix, dy: &Matrix) {
    for i in 0..x.rows {
        let g = dy.row(i);
        for (k, &xik) in x.row(i).iter().enumerate() {
            for (d, &gi) in dw.row_mut(k).iter_mut().zip(g) {
                *d += xik * gi;
            }
        }
    }
}

fn select(x: &Matrix, idx: &[usize]) -> Matrix {
    let mut data = Vec::with_capacity(idx.len() * x.cols);
    for &i in idx {
        data.extend_from_slice(x.row(i));
    }
    Matrix {
        rows: idx.len(),
        cols: x.cols,
        data,
    }
}

/// The metrics of `normalize(x W)` on the data set (alignment on the given evaluation views).
pub fn embedding_metrics(
    set: &Dataset,
    views: (&Matrix, &Matrix),
    w: &Matrix,
    knn_k: usize,
) -> Result<EmbeddingMetrics> {
    let u = embed(&set.x, w);
    Ok(EmbeddingMetrics {
        uniformity: metrics::uniformity(&u, metrics::UNIFORMITY_T)?,
        tolerance: metrics::tolerance(&u, &set.labels)?,
        alignment: metrics::alignment(&embed(views.0, w), &embed(views.1, w))?,
        knn_accuracy: metrics::knn_accuracy(&u, &set.labels, knn_k.min(u.rows - 1))?,
    })
}

fn inbatch_loss(
    backend: Backend,
    spec: &LossSpec,
    a: &Matrix,
    b: &Matrix,
    w: &Matrix,
) -> Result<f64> {
    let e = stack(&encode(a, w), &encode(b, w))?;
    let inputs = LossInputs::InBatch {
        embeddings: MatRef::new("embeddings", &e.data, e.rows, e.cols)?,
    };
    let out = backend.evaluate(spec, &inputs, &Upstream::One)?;
    out.loss
        .scalar()
        .ok_or_else(|| Error::Unsupported("training needs a reduced (mean) loss".into()))
}

/// The initial encoder W (D_in × D_out), entries `N(0, 1/D_in)`, from `seed`.
pub fn initial_weights(d_in: usize, d_out: usize, seed: u64) -> Matrix {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_0f3e_1c00);
    let mut w = Matrix::zeros(d_in, d_out);
    let s = 1.0 / (d_in.max(1) as f64).sqrt();
    w.data.iter_mut().for_each(|x| *x = s * gaussian(&mut rng));
    w
}

/// Trains the encoder at temperature `temp` (fixed or DySTreSS; the standard loss with mean
/// reduction) and reports the loss and the embedding metrics before and after. `on_step(i)` is
/// called after every step (for a progress bar).
///
/// The initial W, the batches and the augmentations depend only on `config.seed`, so different
/// temperatures start from the same encoder and see the same data.
pub fn train(
    config: &TrainConfig,
    temp: Temperature,
    on_step: &mut dyn FnMut(usize),
) -> Result<TrainResult> {
    config.check()?;
    let spec = LossSpec::inbatch()
        .temperature_scheme(temp)
        .normalize(true)
        .build()?;
    let queue_spec = LossSpec::queue()
        .temperature_scheme(temp)
        .normalize(true)
        .build()?;
    config.backend.check_available()?;
    let set = config.data.generate()?;
    let n = set.x.rows;
    let batch = config.batch.min(n);
    if batch < 2 {
        return Err(Error::parameter(
            "batch",
            batch,
            "the data set needs at least 2 samples",
        ));
    }
    let mut w = initial_weights(set.x.cols, config.out_dim, config.seed);
    let mut vel = Matrix::zeros(w.rows, w.cols);

    // Fixed evaluation views (independent of the training stream).
    let mut eval_rng = StdRng::seed_from_u64(config.seed.wrapping_add(1_000_003));
    let eval_a = augment(&set.x, config.noise, &mut eval_rng);
    let eval_b = augment(&set.x, config.noise, &mut eval_rng);

    let loss_before = inbatch_loss(config.backend, &spec, &eval_a, &eval_b, &w)?;
    let before = embedding_metrics(&set, (&eval_a, &eval_b), &w, config.knn_k)?;

    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..n).collect();

    // Queue mode: a FIFO of detached, normalised positives, filled from random samples.
    let mut queue = match config.mode {
        TrainMode::Queue { size } => {
            let idx: Vec<usize> = (0..size).map(|i| i % n).collect();
            let v = augment(&select(&set.x, &idx), config.noise, &mut rng);
            let fill = embed(&v, &w);
            let mut q = HostQueue::new(size, config.out_dim)?;
            q.enqueue(&MatRef::new("queue", &fill.data, fill.rows, fill.cols)?)?;
            Some(q)
        }
        TrainMode::InBatch => None,
    };

    let mut curve = Vec::with_capacity(config.steps);
    for step in 0..config.steps {
        order.shuffle(&mut rng);
        let idx = &order[..batch];
        let xb = select(&set.x, idx);
        let xa = augment(&xb, config.noise, &mut rng);
        let xp = augment(&xb, config.noise, &mut rng);
        let ya = encode(&xa, &w);
        let yp = encode(&xp, &w);
        let mut dw = Matrix::zeros(w.rows, w.cols);
        let loss = match config.mode {
            TrainMode::InBatch => {
                let e = stack(&ya, &yp)?;
                let inputs = LossInputs::InBatch {
                    embeddings: MatRef::new("embeddings", &e.data, e.rows, e.cols)?,
                };
                let out = config.backend.evaluate(&spec, &inputs, &Upstream::One)?;
                let g = out
                    .grad("embeddings")
                    .ok_or_else(|| Error::Unsupported("no embeddings gradient".into()))?;
                // The gradient has the rows of `e`: the anchors' over the positives'.
                let (ga, gp) = unstack(g);
                accumulate_dw(&mut dw, &xa, &ga);
                accumulate_dw(&mut dw, &xp, &gp);
                out.loss.scalar().unwrap_or(f64::NAN)
            }
            TrainMode::Queue { .. } => {
                let queue = queue
                    .as_mut()
                    .ok_or_else(|| Error::Unsupported("queue mode without a queue".into()))?;
                let inputs = LossInputs::Queue {
                    query: MatRef::new("query", &ya.data, ya.rows, ya.cols)?,
                    positive: MatRef::new("positive", &yp.data, yp.rows, yp.cols)?,
                    queue: queue.keys(),
                };
                let out = config
                    .backend
                    .evaluate(&queue_spec, &inputs, &Upstream::One)?;
                for (name, x) in [("query", &xa), ("positive", &xp)] {
                    let g = out
                        .grad(name)
                        .ok_or_else(|| Error::Unsupported(format!("no {name} gradient")))?;
                    accumulate_dw(&mut dw, x, g);
                }
                // Enqueue this batch's positives (detached), dropping the oldest.
                let mut up = yp.clone();
                normalize_in_place(&mut up);
                queue.enqueue(&MatRef::new("positive", &up.data, up.rows, up.cols)?)?;
                out.loss.scalar().unwrap_or(f64::NAN)
            }
        };
        if !loss.is_finite() {
            return Err(Error::Input(format!(
                "training diverged at step {step} (loss {loss}); lower the learning rate"
            )));
        }
        curve.push(loss);
        for ((v, p), g) in vel.data.iter_mut().zip(w.data.iter_mut()).zip(&dw.data) {
            *v = config.momentum * *v + g;
            *p -= config.lr * *v;
        }
        on_step(step);
    }

    let loss_after = inbatch_loss(config.backend, &spec, &eval_a, &eval_b, &w)?;
    let after = embedding_metrics(&set, (&eval_a, &eval_b), &w, config.knn_k)?;
    Ok(TrainResult {
        loss_before,
        loss_after,
        before,
        after,
        curve,
    })
}

/// A short name for a temperature scheme: `0.1`, or `dystress 0.1-0.2`.
pub fn temperature_label(t: &Temperature) -> String {
    match *t {
        Temperature::Fixed(x) | Temperature::Learnable(x) => format!("{x}"),
        Temperature::Dystress {
            tau_min, tau_max, ..
        } => format!("dystress {tau_min}-{tau_max}"),
    }
}
