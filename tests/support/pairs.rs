//! Shared by tests/gpu_select.rs and tests/gpu_metrics.rs: device fixtures for every mode, the
//! host layout of anchors and negatives (spec/losses.md, Modes), f64 similarities (the oracle) and
//! the kernels' f32 similarities emulated bit for bit.
#![allow(dead_code)]

use fused_infonce::cuda::{DeviceElement, DeviceInputs, DeviceMatrix, Gpu, QueueView};
use fused_infonce::MatRef;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The shape of one problem.
#[derive(Debug, Clone, Copy)]
pub enum Layout {
    /// N queries, a ring of `cap` rows read from `start` for `len` rows.
    Queue {
        n: usize,
        cap: usize,
        start: usize,
        len: usize,
    },
    /// 2N embeddings (`rows` = 2N).
    InBatch { rows: usize },
    /// N queries against M keys, with random targets or identity targets.
    Cross { n: usize, m: usize, targets: bool },
    /// N × N.
    Symmetric { n: usize },
}

/// Host and device copies of one problem's matrices (in input order).
pub struct Fixture<T: DeviceElement> {
    pub layout: Layout,
    pub cols: usize,
    /// The dtype-rounded values, as f64, row-major, per matrix.
    pub host: Vec<Vec<f64>>,
    pub dev: Vec<DeviceMatrix<T>>,
    pub targets: Option<Vec<i64>>,
    pub targets_dev: Option<cudarc::driver::CudaSlice<i64>>,
}

/// Row `r` of a row-major matrix.
pub fn row(m: &[f64], cols: usize, r: usize) -> &[f64] {
    &m[r * cols..(r + 1) * cols]
}

impl<T: DeviceElement> Fixture<T> {
    /// Random rows in [−1, 1), uploaded. With `dups`, key rows 1, 2, 3 (and query rows 1, 2, 3 in
    /// symmetric mode, the column anchors' keys) copy row 0, so similarities tie exactly.
    pub fn new(gpu: &Gpu, layout: Layout, cols: usize, seed: u64, dups: bool) -> Self {
        Self::host(layout, cols, seed, dups).upload(gpu)
    }

    /// As [`Fixture::new`], host side only (no device: `inputs` must not be called).
    pub fn host(layout: Layout, cols: usize, seed: u64, dups: bool) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let shapes: Vec<usize> = match layout {
            Layout::Queue { n, cap, .. } => vec![n, n, cap],
            Layout::InBatch { rows } => vec![rows],
            Layout::Cross { n, m, .. } => vec![n, m],
            Layout::Symmetric { n } => vec![n, n],
        };
        let key_mats: Vec<usize> = match layout {
            Layout::Queue { .. } => vec![2],
            Layout::InBatch { .. } => vec![0],
            Layout::Cross { .. } => vec![1],
            Layout::Symmetric { .. } => vec![0, 1],
        };
        let mut host = Vec::new();
        for (mi, &rows) in shapes.iter().enumerate() {
            let mut data: Vec<T> = (0..rows * cols)
                .map(|_| T::from_f64(rng.random_range(-1.0..1.0)))
                .collect();
            if dups && key_mats.contains(&mi) && rows >= 6 {
                for r in 1..4 {
                    for c in 0..cols {
                        data[r * cols + c] = data[c];
                    }
                }
            }
            host.push(data.iter().map(|v| v.to_f64()).collect());
        }
        let targets = match layout {
            Layout::Cross {
                n,
                m,
                targets: true,
                ..
            } => Some(
                (0..n)
                    .map(|_| rng.random_range(0..m as i64))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        };
        Self {
            layout,
            cols,
            host,
            dev: Vec::new(),
            targets,
            targets_dev: None,
        }
    }

    /// Uploads the host matrices (and targets).
    pub fn upload(mut self, gpu: &Gpu) -> Self {
        self.dev = self
            .host
            .iter()
            .map(|h| {
                let data: Vec<T> = h.iter().map(|&v| T::from_f64(v)).collect();
                let rows = data.len() / self.cols.max(1);
                let m = MatRef::new("m", &data, rows, self.cols).unwrap();
                DeviceMatrix::upload(gpu, &m).unwrap()
            })
            .collect();
        self.targets_dev = self
            .targets
            .as_ref()
            .map(|t| gpu.stream().clone_htod(t).unwrap());
        self
    }

    /// The number of anchors of one side.
    pub fn anchors(&self) -> usize {
        match self.layout {
            Layout::Queue { n, .. } | Layout::Cross { n, .. } | Layout::Symmetric { n } => n,
            Layout::InBatch { rows } => rows,
        }
    }

    /// The device inputs of this problem.
    pub fn inputs(&self) -> DeviceInputs<'_, T> {
        match self.layout {
            Layout::Queue { start, len, .. } => DeviceInputs::Queue {
                query: &self.dev[0],
                positive: &self.dev[1],
                queue: QueueView {
                    keys: &self.dev[2],
                    start,
                    len,
                },
            },
            Layout::InBatch { .. } => DeviceInputs::InBatch {
                embeddings: &self.dev[0],
            },
            Layout::Cross { .. } => DeviceInputs::Cross {
                query: &self.dev[0],
                key: &self.dev[1],
                targets: self.targets_dev.as_ref(),
            },
            Layout::Symmetric { .. } => DeviceInputs::Symmetric {
                query: &self.dev[0],
                key: &self.dev[1],
            },
        }
    }

    /// Per anchor of one side: the anchor row and its negative rows, in the spec's order.
    pub fn pairs(&self, columns: bool) -> Vec<(Vec<f64>, Vec<Vec<f64>>)> {
        let d = self.cols;
        let take = |m: usize, r: usize| row(&self.host[m], d, r).to_vec();
        match self.layout {
            Layout::Queue {
                n, cap, start, len, ..
            } => (0..n)
                .map(|i| {
                    let negs = (0..len).map(|j| take(2, (start + j) % cap)).collect();
                    (take(0, i), negs)
                })
                .collect(),
            Layout::InBatch { rows } => (0..rows)
                .map(|a| {
                    let pos = (a + rows / 2) % rows;
                    let negs = (0..rows)
                        .filter(|&r| r != a && r != pos)
                        .map(|r| take(0, r))
                        .collect();
                    (take(0, a), negs)
                })
                .collect(),
            Layout::Cross { n, m, .. } => (0..n)
                .map(|i| {
                    let y = self.targets.as_ref().map_or(i, |t| t[i] as usize);
                    let negs = (0..m).filter(|&r| r != y).map(|r| take(1, r)).collect();
                    (take(0, i), negs)
                })
                .collect(),
            Layout::Symmetric { n } => {
                let (am, km) = if columns { (1, 0) } else { (0, 1) };
                (0..n)
                    .map(|i| {
                        let negs = (0..n).filter(|&r| r != i).map(|r| take(km, r)).collect();
                        (take(am, i), negs)
                    })
                    .collect()
            }
        }
    }
}

/// `x / max(‖x‖, 1e-12)` in f64.
pub fn unit(x: &[f64]) -> Vec<f64> {
    let n = x.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    x.iter().map(|v| v / n).collect()
}

/// The f64 similarity (of the normalised rows with `normalize`).
pub fn sim64(a: &[f64], b: &[f64], normalize: bool) -> f64 {
    if normalize {
        unit(a).iter().zip(unit(b)).map(|(x, y)| x * y).sum()
    } else {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
}

/// The sequential dot product of kernels/select.cu's `lane_dot` (and of kernels/infonce.cu v1's
/// `sim_tile`): one fmaf chain in d order from +0, zero-padded to a multiple of 32 columns.
pub fn seq_dot(a: &[f32], b: &[f32]) -> f32 {
    let padded = a.len().div_ceil(32) * 32;
    (0..padded).fold(0f32, |acc, d| {
        let x = a.get(d).copied().unwrap_or(0.0);
        let y = b.get(d).copied().unwrap_or(0.0);
        x.mul_add(y, acc)
    })
}

/// The selection kernel's f32 similarity, bit for bit: [`seq_dot`], times `inv_a · inv_b`
/// (`1/max(√(seq_dot(x, x)), 1e-12)`) with `normalize`.
pub fn sim_select(a: &[f64], b: &[f64], normalize: bool) -> f32 {
    let a: Vec<f32> = a.iter().map(|&v| v as f32).collect();
    let b: Vec<f32> = b.iter().map(|&v| v as f32).collect();
    let dot = seq_dot(&a, &b);
    if !normalize {
        return dot;
    }
    let inv = |x: &[f32]| 1.0f32 / seq_dot(x, x).sqrt().max(1e-12);
    dot * inv(&a) * inv(&b)
}
