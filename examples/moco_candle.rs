//! MoCo v2 in miniature with candle and this crate's fused loss (`fused_infonce::candle`).
//!
//! The data: the crate's clustered set (`fused_infonce::data::Clustered`: 10 classes × 60 unit
//! vectors in D = 32) with, for every sample, 32 more "background" coordinates (a fixed random
//! vector per sample, larger than the signal) that carry no class information. An augmented view
//! keeps the signal up to noise (`data::augment`) and draws a new background, as crops and colour
//! jitter change what a photo's class does not depend on. A random encoder sees mostly the
//! background, so its k-NN accuracy is low; the contrastive loss teaches it to ignore what the
//! augmentations change.
//!
//! MoCo: a query encoder (an MLP, trained by candle's AdamW), its momentum copy (an exponential
//! moving average of the query encoder's weights, never trained) that encodes the keys, a
//! queue of past keys as negatives (`fused_infonce::candle::Queue`, enqueued after each step), and
//! the queue loss (`InfoNce::queue`, τ fixed, rows normalised inside the fused op).
//!
//! `--clip` trains a symmetric (CLIP-style) loss instead: two encoders for two "modalities" (the
//! sample as above, and a fixed random linear map of its signal with its own background), in-batch
//! negatives, and a learnable temperature (a candle `Var` holding log τ, trained with the rest).
//!
//! One line per epoch: `epoch E loss L knn A` (with `--clip`, `… tau T`), A the leave-one-out
//! 5-NN accuracy of the query encoder's normalised embedding of the whole data set; epoch 0 is
//! before any step (its loss is evaluated, not trained on).
//!
//! ```text
//! cargo run --release --example moco_candle --features candle
//! cargo run --release --example moco_candle --features candle -- --clip
//! cargo run --release --example moco_candle --features candle-cuda -- --device cuda
//! ```

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{linear, Linear, Optimizer, VarBuilder, VarMap};
use clap::Parser;
use fused_infonce::candle::{InfoNce, Queue};
use fused_infonce::data::{augment, gaussian, normalize_in_place, Clustered, Dataset};
use fused_infonce::{metrics, LossSpec, Matrix};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "MoCo v2 (or, with --clip, a CLIP-style loss) in miniature with candle")]
struct Args {
    /// `cpu`, or `cuda` (needs the `candle-cuda` feature and a GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Optimiser steps.
    #[arg(long, default_value_t = 150)]
    steps: usize,
    /// Queue capacity (MoCo's K).
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// Temperature τ of the MoCo loss; with --clip, the initial value of the learnable τ.
    #[arg(long, default_value_t = 0.2)]
    temperature: f64,
    /// Samples per step.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Momentum of the key encoder's moving average.
    #[arg(long, default_value_t = 0.95)]
    momentum: f64,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Train the symmetric (CLIP-style) loss with a learnable temperature instead of MoCo.
    #[arg(long)]
    clip: bool,
    /// Seed of the data, the views and the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Signal dimension (the clustered data), background dimension, hidden and embedding widths.
const SIGNAL: usize = 32;
const BACKGROUND: usize = 32;
const HIDDEN: usize = 128;
const EMBED: usize = 32;
/// Standard deviation of a background coordinate (the signal is a unit vector: its coordinates
/// have RMS 1/√32 ≈ 0.18).
const BACKGROUND_STD: f64 = 0.5;
/// Augmentation noise on the signal (`data::augment`).
const NOISE: f64 = 0.5;

/// An MLP encoder: Linear → ReLU → Linear.
struct Mlp {
    l1: Linear,
    l2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder, d_in: usize) -> Result<Self> {
        Ok(Self {
            l1: linear(d_in, HIDDEN, vb.pp("l1"))?,
            l2: linear(HIDDEN, EMBED, vb.pp("l2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.l2.forward(&self.l1.forward(x)?.relu()?)
    }
}

/// The samples' rows `idx` of `signal` (after `map`, if any) with a background: `fixed` rows, or
/// fresh ones.
fn with_background(
    signal: &Matrix,
    idx: &[usize],
    background: Option<&Matrix>,
    rng: &mut StdRng,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * (SIGNAL + BACKGROUND));
    for &i in idx {
        out.extend(signal.row(i).iter().map(|&x| x as f32));
        match background {
            Some(b) => out.extend(b.row(i).iter().map(|&x| x as f32)),
            None => out.extend((0..BACKGROUND).map(|_| (BACKGROUND_STD * gaussian(rng)) as f32)),
        }
    }
    out
}

/// `x R` for the second modality (`R`: D × D, entries N(0, 1/D)), normalised.
fn second_modality(x: &Matrix, r: &Matrix) -> Matrix {
    let mut y = Matrix::zeros(x.rows, r.cols);
    for i in 0..x.rows {
        for (k, &xik) in x.row(i).iter().enumerate() {
            for (o, &rk) in y.row_mut(i).iter_mut().zip(r.row(k)) {
                *o += xik * rk;
            }
        }
    }
    normalize_in_place(&mut y);
    y
}

/// Leave-one-out 5-NN accuracy of `normalize(enc(x))` over the whole set.
fn knn(enc: &Mlp, x: &Tensor, set: &Dataset) -> Result<f64> {
    let u = enc.forward(x)?.to_dtype(DType::F64)?;
    let (n, d) = u.dims2()?;
    let mut m = Matrix {
        rows: n,
        cols: d,
        data: u.flatten_all()?.to_vec1::<f64>()?,
    };
    normalize_in_place(&mut m);
    metrics::knn_accuracy(&m, &set.labels, 5).map_err(candle_core::Error::wrap)
}

/// Sets every weight of `vm` from `rng` (candle's CPU device cannot be seeded): matrices
/// uniform in ±1/√fan_in as PyTorch's `Linear`, biases 0; in name order, so a seed is a run.
fn seed_weights(vm: &VarMap, rng: &mut StdRng) -> Result<()> {
    let data = vm.data().lock().expect("var map");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let v = &data[name];
        let values: Vec<f32> = match v.dims() {
            [rows, cols] => {
                let b = 1.0 / (*cols as f64).sqrt();
                (0..rows * cols)
                    .map(|_| rng.random_range(-b..b) as f32)
                    .collect()
            }
            _ => vec![0.0; v.elem_count()],
        };
        v.set(&Tensor::from_vec(values, v.shape(), v.device())?)?;
    }
    Ok(())
}

/// `n` random unit rows of dimension `d` (MoCo's initial queue).
fn random_unit_rows(n: usize, d: usize, rng: &mut StdRng, dev: &Device) -> Result<Tensor> {
    let mut m = Matrix::zeros(n, d);
    m.data.iter_mut().for_each(|x| *x = gaussian(rng));
    normalize_in_place(&mut m);
    Tensor::from_vec(
        m.data.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        (n, d),
        dev,
    )
}

/// `to ← m·to + (1−m)·from` for every weight (the momentum encoder).
fn momentum_update(to: &VarMap, from: &VarMap, m: f64) -> Result<()> {
    let to = to.data().lock().expect("var map");
    let from = from.data().lock().expect("var map");
    for (name, t) in to.iter() {
        let f = &from[name];
        t.set(&((t.as_tensor() * m)? + (f.as_tensor() * (1.0 - m))?)?)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if !cfg!(feature = "candle-cuda") => candle_core::bail!(
            "--device cuda: this example was built without CUDA; build it with --features candle-cuda"
        ),
        "cuda" => Device::new_cuda(0)?,
        other => candle_core::bail!("--device {other}: expected cpu or cuda"),
    };
    let set = Clustered {
        seed: args.seed,
        ..Clustered::default()
    }
    .generate()
    .map_err(candle_core::Error::wrap)?;
    let n = set.x.rows;
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0xc0de);
    // Every sample's own background (what the evaluation sees).
    let mut background = Matrix::zeros(n, BACKGROUND);
    for v in background.data.iter_mut() {
        *v = BACKGROUND_STD * gaussian(&mut rng);
    }
    let all: Vec<usize> = (0..n).collect();
    let x_eval = Tensor::from_vec(
        with_background(&set.x, &all, Some(&background), &mut rng),
        (n, SIGNAL + BACKGROUND),
        &dev,
    )?;
    if args.clip {
        clip(&args, &dev, &set, &x_eval, &mut rng)
    } else {
        moco(&args, &dev, &set, &x_eval, &mut rng)
    }
}

/// Batches of `batch` sample indices, reshuffled every epoch (a last partial batch is dropped).
fn epochs(n: usize, batch: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(rng);
    idx.chunks_exact(batch.min(n))
        .map(<[usize]>::to_vec)
        .collect()
}

/// An augmented view of the samples `idx` (signal noise, a fresh background) on `dev`.
fn view(set: &Matrix, idx: &[usize], rng: &mut StdRng, dev: &Device) -> Result<Tensor> {
    let rows = Matrix {
        rows: idx.len(),
        cols: set.cols,
        data: idx.iter().flat_map(|&i| set.row(i).to_vec()).collect(),
    };
    let signal = augment(&rows, NOISE, rng);
    let local: Vec<usize> = (0..idx.len()).collect();
    Tensor::from_vec(
        with_background(&signal, &local, None, rng),
        (idx.len(), SIGNAL + BACKGROUND),
        dev,
    )
}

/// candle's AdamW over `vars` at learning rate `lr`, without weight decay.
fn adamw(vars: Vec<Var>, lr: f64) -> Result<candle_nn::AdamW> {
    candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
}

fn moco(args: &Args, dev: &Device, set: &Dataset, x_eval: &Tensor, rng: &mut StdRng) -> Result<()> {
    let d_in = SIGNAL + BACKGROUND;
    let vm_q = VarMap::new();
    let enc_q = Mlp::new(VarBuilder::from_varmap(&vm_q, DType::F32, dev), d_in)?;
    let vm_k = VarMap::new();
    let enc_k = Mlp::new(VarBuilder::from_varmap(&vm_k, DType::F32, dev), d_in)?;
    seed_weights(&vm_q, rng)?;
    momentum_update(&vm_k, &vm_q, 0.0)?;
    let mut opt = adamw(vm_q.all_vars(), args.lr)?;
    let spec = LossSpec::queue()
        .temperature(args.temperature)
        .normalize(true)
        .build()
        .map_err(candle_core::Error::wrap)?;
    let loss_op = InfoNce::new(spec);
    // MoCo starts from a queue of random unit keys.
    let mut queue = Queue::new(args.queue, EMBED, DType::F32, dev)?;
    queue.enqueue(&random_unit_rows(args.queue, EMBED, rng, dev)?)?;

    let mut step = 0;
    let mut epoch = 0;
    while epoch == 0 || step < args.steps {
        let mut total = 0.0;
        let batches = epochs(set.x.rows, args.batch, rng);
        let count = batches.len();
        for idx in batches {
            let (xa, xb) = (view(&set.x, &idx, rng, dev)?, view(&set.x, &idx, rng, dev)?);
            if epoch == 0 {
                // Before any step: the loss of the untrained encoder (untracked: forward only).
                let q = enc_q.forward(&xa)?.detach();
                let k = enc_k.forward(&xb)?.detach();
                total += loss_op.queue(&q, &k, &queue.keys()?)?.to_scalar::<f32>()? as f64;
                continue;
            }
            let q = enc_q.forward(&xa)?;
            let k = enc_k.forward(&xb)?.detach();
            let loss = loss_op.queue(&q, &k, &queue.keys()?)?;
            total += loss.to_scalar::<f32>()? as f64;
            // The two lines a candle training loop adds: the loss op, then the optimiser step.
            opt.backward_step(&loss)?;
            momentum_update(&vm_k, &vm_q, args.momentum)?;
            queue.enqueue(&k.broadcast_div(&k.sqr()?.sum_keepdim(1)?.sqrt()?)?)?;
            step += 1;
        }
        println!(
            "epoch {epoch} loss {:.4} knn {:.3}",
            total / count as f64,
            knn(&enc_q, x_eval, set)?
        );
        epoch += 1;
    }
    Ok(())
}

fn clip(args: &Args, dev: &Device, set: &Dataset, x_eval: &Tensor, rng: &mut StdRng) -> Result<()> {
    let d_in = SIGNAL + BACKGROUND;
    let mut r = Matrix::zeros(SIGNAL, SIGNAL);
    for v in r.data.iter_mut() {
        *v = gaussian(rng) / (SIGNAL as f64).sqrt();
    }
    let other = second_modality(&set.x, &r);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let enc_a = Mlp::new(vb.pp("a"), d_in)?;
    let enc_b = Mlp::new(vb.pp("b"), d_in)?;
    seed_weights(&vm, rng)?;
    let log_tau = Var::new(args.temperature.ln() as f32, dev)?;
    let mut vars = vm.all_vars();
    vars.push(log_tau.clone());
    let mut opt = adamw(vars, args.lr)?;
    let spec = LossSpec::symmetric()
        .learnable_temperature(args.temperature)
        .normalize(true)
        .build()
        .map_err(candle_core::Error::wrap)?;
    // Built once: τ = exp(log τ) is read from the Var at every call.
    let op = InfoNce::new(spec.clone()).with_log_temperature(&log_tau)?;

    let mut step = 0;
    let mut epoch = 0;
    while epoch == 0 || step < args.steps {
        let mut total = 0.0;
        let batches = epochs(set.x.rows, args.batch, rng);
        let count = batches.len();
        for idx in batches {
            let xa = view(&set.x, &idx, rng, dev)?;
            let xb = view(&other, &idx, rng, dev)?;
            if epoch == 0 {
                // Before any step: untracked inputs and τ, forward only.
                let op = InfoNce::new(spec.clone()).with_temperature(&log_tau.exp()?.detach())?;
                let (a, b) = (enc_a.forward(&xa)?.detach(), enc_b.forward(&xb)?.detach());
                total += op.symmetric(&a, &b)?.to_scalar::<f32>()? as f64;
                continue;
            }
            // τ = exp(log τ), read at every call: candle carries dL/dτ on to log τ.
            let loss = op.symmetric(&enc_a.forward(&xa)?, &enc_b.forward(&xb)?)?;
            total += loss.to_scalar::<f32>()? as f64;
            opt.backward_step(&loss)?;
            step += 1;
        }
        println!(
            "epoch {epoch} loss {:.4} knn {:.3} tau {:.4}",
            total / count as f64,
            knn(&enc_a, x_eval, set)?,
            log_tau.as_tensor().exp()?.to_scalar::<f32>()?
        );
        epoch += 1;
    }
    Ok(())
}
