//! Benchmarks of the CPU presets of spec/performance.md: the fused backend
//! ([`super::evaluate`]) against the unfused baseline ([`super::unfused::evaluate`]) and the
//! matrix crate's own sgemm rate, measured in the same run on the same rayon pool.
//!
//! Method: random unit rows (seeded, never zero); both implementations are checked against the
//! f64 reference on a reduced shape of the preset's mode, and against each other on the full
//! shape, before anything is timed; one warm-up call, then the median (and min, max) of
//! `repeat` calls. The sgemm rate is faer's own parallel 2048³ product on the same pool, median
//! of 5.

use std::time::Instant;

use serde::Serialize;

use super::pair::chunks;
use crate::bench::{rel_l2, unit_rows, Preset};
use crate::error::{Error, Result};
use crate::loss::{LossInputs, LossOutput, Upstream};
use crate::spec::Mode;
use crate::tensor::MatRef;

/// Repetitions below which a CPU median is not reported as a benchmark figure (the issue's
/// "median of ≥ 10 runs"; the CPU presets take 20–300 ms a call).
pub const CPU_MIN_REPEAT: usize = 10;

/// The CPU presets: [`crate::bench::CPU_PRESETS`]; what the fused CPU schedule and the unfused
/// pipeline do on one of them.
impl Preset {
    /// The same preset with every size divided by `by` (at least 2 rows, 8 columns): the shape
    /// the reference checks.
    pub fn reduced(&self, by: usize) -> Preset {
        let even = |x: usize| (x / by).max(2) & !1;
        Preset {
            anchors: even(self.anchors),
            keys: even(self.keys),
            dim: (self.dim / by).max(8),
            ..*self
        }
    }

    /// FLOPs of the block products of the fused schedule: queue `S` and `P·M` (4NKD); inbatch,
    /// over the tiles of block pairs, `S` twice, `H·E_q` and `Hᵀ·E_p` (`4R²D + 2RbD` for blocks
    /// of b rows: the diagonal tiles have one gradient product); symmetric two `S`, `G·B`, `Gᵀ·A`
    /// (8N²D); cross `S`, `P·B`, `S`, `Gᵀ·A` (8NMD).
    pub fn cpu_product_flops(&self) -> f64 {
        let (n, k, d) = (self.anchors as f64, self.keys as f64, self.dim as f64);
        let b = super::Blocking::for_dim(self.dim).anchors as f64;
        match self.mode {
            Mode::Queue => 4.0 * n * k * d,
            Mode::InBatch => 4.0 * n * n * d + 2.0 * n * b.min(n) * d,
            _ => 8.0 * n * k * d,
        }
    }

    /// FLOPs of the unfused pipeline's products: queue `S`, `dZ·M` (4NKD); the others `S`, `dZ·Y`,
    /// `dZᵀ·X` (6NKD).
    pub fn cpu_unfused_product_flops(&self) -> f64 {
        let (n, k, d) = (self.anchors as f64, self.keys as f64, self.dim as f64);
        match self.mode {
            Mode::Queue => 4.0 * n * k * d,
            _ => 6.0 * n * k * d,
        }
    }

    /// Bytes the fused backend allocates beyond inputs and gradients with `threads` tasks in
    /// flight (tiles and blocks per task, per-anchor scalars, key-chunk partials), from the
    /// allocations of `pair.rs` / `symmetric.rs` at the default blocking.
    pub fn cpu_extra_bytes(&self, threads: usize) -> usize {
        let bl = super::Blocking::for_dim(self.dim);
        let (ba, bb, d) = (bl.anchors, bl.keys, self.dim);
        let f = std::mem::size_of::<f32>();
        let per_anchor = 6 * std::mem::size_of::<f64>() + 4 * f;
        match self.mode {
            Mode::Symmetric | Mode::InBatch => {
                // Per task at most: S, Sᵀ, G, G2 tiles and two converted blocks (f32 inputs are
                // read in place); per anchor the online state and the f64 results. The
                // gradients accumulate in their own memory.
                let task = (4 * ba * bb + (ba + bb) * d) * f;
                threads * task + 2 * self.anchors * per_anchor
            }
            _ => {
                let owners = self.anchors.div_ceil(ba);
                let c = chunks(owners, self.keys.div_ceil(bb)).len();
                // S and weight tiles, U (ba × D) and two converted blocks per task; the U
                // partials of every chunk; the merged U in f64.
                let task = (2 * ba * bb + ba * d + (ba + bb) * d) * f;
                threads * task
                    + owners * c * ba * d * f
                    + self.anchors * d * std::mem::size_of::<f64>()
                    + self.anchors * per_anchor
            }
        }
    }

    /// Bytes of the unfused pipeline's logit matrices and f32 gradients.
    pub fn cpu_unfused_extra_bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        let logits = self.anchors * self.keys * f;
        match self.mode {
            // l_neg and the concatenated logits.
            Mode::Queue => 2 * logits + 2 * self.anchors * self.dim * f,
            _ => logits + (self.anchors + self.keys) * self.dim * f,
        }
    }
}

/// A preset's inputs, owned.
#[derive(Debug, Clone)]
pub struct PresetData {
    preset: Preset,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl PresetData {
    /// Random unit rows for `preset` (seed `seed`).
    pub fn random(preset: &Preset, seed: u64) -> PresetData {
        let (n, k, d) = (preset.anchors, preset.keys, preset.dim);
        let (a, b, c) = match preset.mode {
            Mode::Queue => (
                unit_rows(seed, n, d),
                unit_rows(seed + 1, n, d),
                unit_rows(seed + 2, k, d),
            ),
            Mode::InBatch => (unit_rows(seed, n, d), Vec::new(), Vec::new()),
            Mode::Cross | Mode::Symmetric => {
                (unit_rows(seed, n, d), unit_rows(seed + 1, k, d), Vec::new())
            }
        };
        PresetData {
            preset: *preset,
            a,
            b,
            c,
        }
    }

    /// The loss inputs.
    pub fn inputs(&self) -> Result<LossInputs<'_, f32>> {
        let p = &self.preset;
        let (n, k, d) = (p.anchors, p.keys, p.dim);
        Ok(match p.mode {
            Mode::Queue => LossInputs::Queue {
                query: MatRef::new("query", &self.a, n, d)?,
                positive: MatRef::new("positive", &self.b, n, d)?,
                queue: MatRef::new("queue", &self.c, k, d)?,
            },
            Mode::InBatch => LossInputs::InBatch {
                embeddings: MatRef::new("embeddings", &self.a, n, d)?,
            },
            Mode::Cross => LossInputs::Cross {
                query: MatRef::new("query", &self.a, n, d)?,
                key: MatRef::new("key", &self.b, k, d)?,
                targets: None,
            },
            Mode::Symmetric => LossInputs::Symmetric {
                query: MatRef::new("query", &self.a, n, d)?,
                key: MatRef::new("key", &self.b, k, d)?,
            },
        })
    }
}

/// One preset's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// The preset.
    pub preset: String,
    /// rayon threads used.
    pub threads: usize,
    /// Calls timed per implementation.
    pub repeat: usize,
    /// Fused: median, min, max (ms).
    pub fused_ms: f64,
    /// Fastest fused call (ms).
    pub fused_min_ms: f64,
    /// Slowest fused call (ms).
    pub fused_max_ms: f64,
    /// Unfused baseline: median (ms).
    pub unfused_ms: f64,
    /// Fastest unfused call (ms).
    pub unfused_min_ms: f64,
    /// `unfused_ms / fused_ms`.
    pub speedup: f64,
    /// The fused schedule's block-product FLOPs over the fused median time (GFLOP/s): the rate of
    /// the products with everything else (exp, masks, merges) counted as product time.
    pub fused_gflops: f64,
    /// The unfused products' FLOPs over its median time (GFLOP/s).
    pub unfused_gflops: f64,
    /// The matrix crate's parallel 2048³ sgemm on the same pool, this run (GFLOP/s).
    pub sgemm_gflops: f64,
    /// `fused_gflops / sgemm_gflops` (%).
    pub pct_of_sgemm: f64,
    /// Extra memory of the fused backend (bytes; an upper bound computed from its allocations,
    /// [`Preset::cpu_extra_bytes`]).
    pub fused_extra_bytes: usize,
    /// Extra memory of the unfused baseline (logits and f32 gradients, bytes).
    pub unfused_extra_bytes: usize,
    /// Largest relative L2 difference, over outputs, of fused and unfused against the reference
    /// on the reduced shape, and of fused against unfused on the full shape.
    pub max_rel_err: f64,
}

/// Relative L2 distance of two outputs' every part (loss, lse, gradients, dτ), the largest
/// ([`crate::bench::rel_l2`]).
pub fn max_rel_l2(a: &LossOutput, b: &LossOutput) -> f64 {
    let mut worst = rel_l2(&a.loss.values(), &b.loss.values()).max(rel_l2(&a.lse, &b.lse));
    for (g, h) in a.grads.iter().zip(&b.grads) {
        worst = worst.max(rel_l2(&g.value.data, &h.value.data));
    }
    if let (Some(x), Some(y)) = (a.grad_temperature, b.grad_temperature) {
        worst = worst.max(rel_l2(&[x], &[y]));
    }
    worst
}

/// Times `f` `repeat` times after one warm-up: (median, min, max) in ms.
fn time_ms(repeat: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    f()?;
    let mut t = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok((t[t.len() / 2], t[0], t[t.len() - 1]))
}

/// The matrix crate's sgemm rate on the current rayon pool: faer's parallel 2048³ f32 product,
/// median of 5 (GFLOP/s).
pub fn sgemm_gflops() -> f64 {
    let n = 2048;
    let a = unit_rows(11, n, n);
    let b = unit_rows(12, n, n);
    let mut c = vec![0.0f32; n * n];
    let run = |c: &mut [f32]| {
        super::gemm::faer_parallel(
            faer::MatMut::from_row_major_slice_mut(c, n, n),
            faer::MatRef::from_row_major_slice(&a, n, n),
            faer::MatRef::from_row_major_slice(&b, n, n),
        );
    };
    let (med, _, _) = time_ms(5, || {
        run(&mut c);
        Ok(())
    })
    .unwrap_or((f64::INFINITY, 0.0, 0.0));
    2.0 * (n as f64).powi(3) / (med * 1e-3) / 1e9
}

/// Runs one preset (module docs): checks, then times fused and unfused (`repeat` calls each;
/// figures want at least [`CPU_MIN_REPEAT`]), with the sgemm rate measured in the same run.
///
/// Errors: the preset's own evaluation errors, and [`Error::Unsupported`] when a check against
/// the reference fails (a wrong result is reported, not timed).
pub fn run_preset(preset: &Preset, repeat: usize) -> Result<BenchRow> {
    let repeat = repeat.max(1);
    let spec = preset.spec()?;
    // Correctness first: the reference on a reduced shape, then fused against unfused in full.
    let small = PresetData::random(&preset.reduced(16), 1);
    let si = small.inputs()?;
    let want = crate::reference::evaluate(&spec, &si, &Upstream::One)?;
    let mut err = max_rel_l2(&super::evaluate(&spec, &si, &Upstream::One)?, &want);
    err = err.max(max_rel_l2(
        &super::unfused::evaluate(&spec, &si, &Upstream::One)?,
        &want,
    ));
    let data = PresetData::random(preset, 0);
    let inputs = data.inputs()?;
    let fused = super::evaluate(&spec, &inputs, &Upstream::One)?;
    let unfused = super::unfused::evaluate(&spec, &inputs, &Upstream::One)?;
    err = err.max(max_rel_l2(&fused, &unfused));
    if err.is_nan() || err >= 1e-4 {
        return Err(Error::Unsupported(format!(
            "{}: results disagree (relative L2 {err:.2e}); not timed",
            preset.name
        )));
    }
    drop((fused, unfused));
    let sgemm = sgemm_gflops();
    let (f_med, f_min, f_max) = time_ms(repeat, || {
        super::evaluate(&spec, &inputs, &Upstream::One).map(|_| ())
    })?;
    let (u_med, u_min, _) = time_ms(repeat, || {
        super::unfused::evaluate(&spec, &inputs, &Upstream::One).map(|_| ())
    })?;
    let threads = rayon::current_num_threads();
    let fused_gflops = preset.cpu_product_flops() / (f_med * 1e-3) / 1e9;
    Ok(BenchRow {
        preset: preset.name.to_string(),
        threads,
        repeat,
        fused_ms: f_med,
        fused_min_ms: f_min,
        fused_max_ms: f_max,
        unfused_ms: u_med,
        unfused_min_ms: u_min,
        speedup: u_med / f_med,
        fused_gflops,
        unfused_gflops: preset.cpu_unfused_product_flops() / (u_med * 1e-3) / 1e9,
        sgemm_gflops: sgemm,
        pct_of_sgemm: 100.0 * fused_gflops / sgemm,
        fused_extra_bytes: preset.cpu_extra_bytes(threads),
        unfused_extra_bytes: preset.cpu_unfused_extra_bytes(),
        max_rel_err: err,
    })
}

/// `infonce bench --backend cpu`: each preset of `presets` checked and timed ([`run_preset`]),
/// numpy's timings of the same presets merged in (`numpy`, as `bench/numpy_reference.py` prints
/// them), then the f64 reference timed on the small shapes
/// ([`crate::bench::reference_small_shapes`]). A preset that fails its check or its run keeps
/// its row with the reason. Progress: one unit per preset, three for the reference.
pub fn run(
    repeat: usize,
    presets: &[Preset],
    numpy: &[crate::bench::NumpyTiming],
    progress: &dyn crate::progress::Progress,
) -> Result<crate::bench::Report> {
    use crate::bench::{reference_small_shapes, Report, Row};
    let repeat = repeat.max(1);
    let mut report = Report::new("cpu", None, None, repeat);
    report.threads = Some(rayon::current_num_threads());
    for p in presets {
        progress.message(&format!("{}: check, then fused, unfused", p.name));
        let np = numpy.iter().find(|t| t.preset == p.name);
        let mut row = Row {
            preset: p.name.to_string(),
            numpy_ms: np.map(|t| t.numpy_ms),
            numpy_note: np.and_then(|t| t.blas.as_ref().map(|b| format!("BLAS: {b}"))),
            ..Default::default()
        };
        match run_preset(p, repeat) {
            Ok(r) => {
                report.sgemm_gflops = Some(r.sgemm_gflops);
                row.fused_ms = Some(r.fused_ms);
                row.fused_min_max_ms = Some((r.fused_min_ms, r.fused_max_ms));
                row.unfused_ms = Some(r.unfused_ms);
                row.speedup_vs_unfused = Some(r.speedup);
                row.speedup_vs_numpy = row.numpy_ms.map(|n| n / r.fused_ms);
                row.gflops = Some(r.fused_gflops);
                row.unfused_gflops = Some(r.unfused_gflops);
                row.pct_of_sgemm = Some(r.pct_of_sgemm);
                row.extra_mem_bytes = Some(r.fused_extra_bytes as u64);
                row.unfused_extra_mem_bytes = Some(r.unfused_extra_bytes as u64);
                row.check = format!("ok (rel L2 {:.1e})", r.max_rel_err);
            }
            Err(e) => {
                row.fused_note = Some(e.to_string());
                row.check = "not timed".into();
            }
        }
        report.rows.push(row);
        progress.advance(1);
    }
    let reference = reference_small_shapes(repeat, progress)?;
    report.rows.extend(reference.rows);
    Ok(report)
}
