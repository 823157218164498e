//! `infonce bench` on a GPU: every preset checked on a small shape against the f64 reference
//! (a fast wrong kernel is not a result), then the fused op (`evaluate_device`, path Auto), the
//! tensor-core kernels called directly and the unfused baseline timed with CUDA events (3 warm-up
//! calls, the median of `repeat`), input buffers rotated when they fit in L2, the card's peaks
//! measured in the same run. On the emulated device every implementation is checked and nothing
//! is timed (its timings would mean nothing).

use super::{measure_peaks, pool_peak, preset_fits, time_device, PresetInputs};
use crate::bench::{rel_l2, HostCase, Peaks, Preset, Report, Row, Timing, TorchTiming};
use crate::cuda::op::{DeviceGrad, DeviceOptions, DeviceOutput};
use crate::cuda::paths::tensor_core;
use crate::cuda::paths::unfused::{scratch_bytes, Unfused};
use crate::cuda::runtime::{driver_version, DeviceElement, DeviceMatrix, Gpu};
use crate::error::Result;
use crate::loss::{LossOutput, Upstream};
use crate::progress::Progress;
use crate::tensor::{Element, MatRef};
use half::bf16;

/// The tolerance of the bf16 check (relative L2; the tensor-core kernels round the softmax
/// weights to bf16 for their second product).
const CHECK_TOL: f64 = 2e-2;

/// The implementations a row measures.
enum Which<'a> {
    /// `evaluate_device` with the default options (path Auto).
    Fused,
    /// The tensor-core kernels called directly, whatever Auto picks.
    Tc,
    /// The unfused baseline, its cuBLAS handle created once.
    Unfused(&'a Unfused),
}

/// Runs `presets` on `gpu` (see the module docs), merging PyTorch's timings of the same presets.
/// Progress: one unit for the peaks, five per preset.
pub fn run(
    gpu: &Gpu,
    repeat: usize,
    presets: &[Preset],
    torch: &[TorchTiming],
    progress: &dyn Progress,
) -> Result<Report> {
    let props = gpu.properties().clone();
    let emulated = props.emulated;
    progress.message("measuring peaks (bf16 GEMM, device copy)");
    let peaks = if emulated {
        None
    } else {
        match measure_peaks(gpu, repeat) {
            Ok(p) => Some(p),
            Err(e) => {
                progress.note(&format!("peaks not measured: {e}"));
                None
            }
        }
    };
    progress.advance(1);
    let unfused = Unfused::new(gpu);
    let device = format!(
        "{} (sm_{}{}, {} SMs, {:.0} GB)",
        props.name,
        props.compute_capability.0,
        props.compute_capability.1,
        props.sm_count,
        props.total_memory as f64 / 1e9
    );
    let driver = driver_version().ok().map(|(a, b)| format!("CUDA {a}.{b}"));
    let mut report = Report::new("cuda", Some(device), driver, repeat);
    report.peaks = peaks;
    for p in presets {
        let row = preset_row(gpu, p, torch, repeat, peaks, &unfused, progress)?;
        report.rows.push(row);
    }
    Ok(report)
}

/// One preset's row: the check, then (on a GPU) the three timings.
fn preset_row(
    gpu: &Gpu,
    p: &Preset,
    torch: &[TorchTiming],
    repeat: usize,
    peaks: Option<Peaks>,
    unfused: &Result<Unfused>,
    progress: &dyn Progress,
) -> Result<Row> {
    let t = torch.iter().find(|t| t.preset == p.name);
    let mut row = Row {
        preset: p.name.to_string(),
        torch_ms: t.and_then(|t| t.torch_ms),
        torch_compile_ms: t.and_then(|t| t.torch_compile_ms),
        torch_note: t.and_then(|t| t.torch_note.clone()),
        ..Default::default()
    };
    let emulated = gpu.properties().emulated;
    if let (false, Err(e)) = (emulated, preset_fits(gpu, p)) {
        row.fused_note = Some(e.to_string());
        row.unfused_note = Some(e.to_string());
        row.check = "not run".into();
        progress.advance(5);
        return Ok(row);
    }

    // 1. Correctness on a small shape of the same mode.
    progress.message(&format!("{}: checking against the reference", p.name));
    let checks = check_all(gpu, p, unfused)?;
    row.check = checks.summary();
    progress.advance(1);
    if emulated {
        let note = |bad: &Option<String>| {
            Some(
                bad.clone()
                    .unwrap_or_else(|| "emulated device: checked, not timed".into()),
            )
        };
        row.fused_note = note(&checks.fused);
        row.tc_note = note(&checks.tc);
        row.unfused_note = note(&checks.unfused);
        progress.advance(4);
        return Ok(row);
    }

    // 2. Inputs, rotated when one set fits in L2 (50 MB on an H100).
    progress.message(&format!("{}: generating inputs", p.name));
    let copies = if p.input_bytes() < (128 << 20) {
        ((128u64 << 20) / p.input_bytes().max(1)).clamp(1, 8) as usize
    } else {
        1
    };
    let sets: Vec<PresetInputs> = (0..copies)
        .map(|i| PresetInputs::random(gpu, p, 17 + i as u64))
        .collect::<Result<_>>()?;
    progress.advance(1);

    // 3. The fused op and the tensor-core kernels.
    let floor = |ms: f64| peaks.map(|pk| 100.0 * p.matrix_floor_ms(pk.bf16_gemm_tflops) / ms);
    progress.message(&format!("{}: fused", p.name));
    match timed(gpu, &Which::Fused, p, &sets, repeat, &checks.fused) {
        Ok(m) => {
            row.fused_ms = Some(m.timing.median_ms);
            row.fused_min_max_ms = Some((m.timing.min_ms, m.timing.max_ms));
            row.extra_mem_bytes = m.extra.map(|x| x.saturating_sub(p.grad_bytes()));
            row.tflops = Some(p.matrix_flops() / (m.timing.median_ms * 1e-3) / 1e12);
            row.pct_matrix_floor = floor(m.timing.median_ms);
        }
        Err(why) => row.fused_note = Some(why),
    }
    progress.advance(1);
    progress.message(&format!("{}: tensor-core kernels", p.name));
    match timed(gpu, &Which::Tc, p, &sets, repeat, &checks.tc) {
        Ok(m) => {
            row.tc_ms = Some(m.timing.median_ms);
            row.tc_min_max_ms = Some((m.timing.min_ms, m.timing.max_ms));
            row.tc_extra_mem_bytes = m.extra.map(|x| x.saturating_sub(p.grad_bytes()));
            row.tc_tflops = Some(p.matrix_flops() / (m.timing.median_ms * 1e-3) / 1e12);
            row.tc_pct_matrix_floor = floor(m.timing.median_ms);
        }
        Err(why) => row.tc_note = Some(why),
    }
    progress.advance(1);

    // 4. Unfused (its own memory check says "does not fit" for clip-xl).
    progress.message(&format!("{}: unfused", p.name));
    match unfused {
        Err(e) => row.unfused_note = Some(e.to_string()),
        Ok(u) => match timed(gpu, &Which::Unfused(u), p, &sets, repeat, &checks.unfused) {
            Ok(m) => {
                row.unfused_ms = Some(m.timing.median_ms);
                row.unfused_min_max_ms = Some((m.timing.min_ms, m.timing.max_ms));
                row.unfused_extra_mem_bytes = m.extra.map(|x| x.saturating_sub(p.grad_bytes()));
            }
            Err(why) => {
                let need = scratch_bytes(p.mode, p.anchors, p.keys, bf16::DTYPE, true);
                row.unfused_note = Some(format!("{why} (scratch {:.1} GB)", need as f64 / 1e9));
            }
        },
    }
    progress.advance(1);
    if let (Some(f), Some(u)) = (row.fused_ms, row.unfused_ms) {
        row.speedup_vs_unfused = Some(u / f);
    }
    if let (Some(f), Some(u)) = (row.tc_ms, row.unfused_ms) {
        row.tc_speedup_vs_unfused = Some(u / f);
    }
    Ok(row)
}

/// Each implementation's small-shape check: `None` when correct, else why not.
struct Checks {
    fused: Option<String>,
    tc: Option<String>,
    unfused: Option<String>,
}

impl Checks {
    /// `fused, tc ok`, or `none ok`.
    fn summary(&self) -> String {
        let ok: Vec<&str> = [
            ("fused", &self.fused),
            ("tc", &self.tc),
            ("unfused", &self.unfused),
        ]
        .iter()
        .filter(|(_, bad)| bad.is_none())
        .map(|(n, _)| *n)
        .collect();
        if ok.is_empty() {
            "none ok".into()
        } else {
            format!("{} ok", ok.join(", "))
        }
    }
}

/// Checks the three implementations on `p`'s small shape against the f64 reference.
fn check_all(gpu: &Gpu, p: &Preset, unfused: &Result<Unfused>) -> Result<Checks> {
    let small = p.small();
    let host = HostCase::new(small);
    let want = crate::reference::evaluate(&small.spec()?, &host.inputs()?, &Upstream::One)?;
    Ok(Checks {
        fused: check(gpu, &Which::Fused, &host, &want),
        tc: check(gpu, &Which::Tc, &host, &want),
        unfused: match unfused {
            Ok(u) => check(gpu, &Which::Unfused(u), &host, &want),
            Err(e) => Some(e.to_string()),
        },
    })
}

/// Checks one implementation on a host case; `None` when correct, else why not.
fn check(gpu: &Gpu, which: &Which<'_>, host: &HostCase, want: &LossOutput) -> Option<String> {
    let small = &host.preset;
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

/// A host case's rows uploaded as a preset's device inputs.
fn upload(gpu: &Gpu, h: &HostCase) -> Result<PresetInputs> {
    let d = h.preset.dim;
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

fn eval(
    gpu: &Gpu,
    which: &Which<'_>,
    p: &Preset,
    set: &PresetInputs,
) -> Result<DeviceOutput<bf16>> {
    let spec = p.spec()?;
    let inputs = set.inputs(p.mode);
    let opts = DeviceOptions::default();
    match which {
        Which::Fused => crate::cuda::evaluate_device(gpu, &spec, &inputs, &Upstream::One, &opts),
        Which::Tc => tensor_core::evaluate(gpu, &spec, &inputs, &Upstream::One, &opts),
        Which::Unfused(u) => u.evaluate(gpu, &spec, &inputs, &Upstream::One, &opts),
    }
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

/// A timing and the peak extra device memory of one run.
struct Measured {
    timing: Timing,
    extra: Option<u64>,
}

/// Times an implementation that passed its check (`Err(why)` when it did not, or failed).
fn timed(
    gpu: &Gpu,
    which: &Which<'_>,
    p: &Preset,
    sets: &[PresetInputs],
    repeat: usize,
    bad: &Option<String>,
) -> std::result::Result<Measured, String> {
    if let Some(why) = bad {
        return Err(why.clone());
    }
    let m = || -> Result<Measured> {
        // One run under the pool's high watermark: the peak extra memory, outputs included.
        let (_, extra) = pool_peak(gpu, || eval(gpu, which, p, &sets[0]).map(drop))?;
        let timing = time_device(gpu, 3, repeat, |i| {
            eval(gpu, which, p, &sets[i % sets.len()]).map(drop)
        })?;
        Ok(Measured { timing, extra })
    };
    m().map_err(|e| e.to_string())
}
