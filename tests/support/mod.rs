//! Helpers shared by the GPU tests: the device they run on ([`gpu`]: a real GPU, else the emulated
//! CUDA device), seeded random unit rows, upload, download of a [`DeviceOutput`], relative-L2
//! comparison against the CPU reference.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use fused_infonce::cuda::emulated::{self, Driver};
use fused_infonce::cuda::{
    gpu_or_skip, DeviceElement, DeviceGrad, DeviceInputs, DeviceMatrix, DeviceOutput, Gpu,
};
use fused_infonce::{
    Element, LossInputs, LossOutput, LossSpec, MatRef, Temperature, Upstream, Variant,
};

/// Device 0 for the GPU test `what`: the GPU when a real driver is present, else the emulated CUDA
/// device (tools/emulated-cuda), loaded from `FUSED_INFONCE_EMULATED_CUDA` or built by
/// `scripts/emulated-cuda`. An emulated device that cannot be built or loaded fails the test,
/// unless `FUSED_INFONCE_ALLOW_SKIP=1` says this machine may skip GPU tests (then they print
/// `skipped: no CUDA device`). Under the emulated device nothing skips ([`gpu_or_skip`]).
pub fn gpu(what: &str) -> Option<Gpu> {
    emulated_device();
    gpu_or_skip(what)
}

/// The emulated device's directory when this process uses it (a real driver wins); load it first.
/// Programs the test spawns get it through `FUSED_INFONCE_EMULATED_CUDA` ([`emulated::ENV_DIR`]).
pub fn emulated_device() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        // A real driver wins: on a GPU machine nothing is built (the source tree may not be there).
        let named = std::env::var_os(emulated::ENV_DIR).is_some_and(|d| !d.is_empty());
        if !named && fused_infonce::cuda::driver_present() {
            return None;
        }
        let may_skip = std::env::var("FUSED_INFONCE_ALLOW_SKIP").is_ok_and(|v| v == "1");
        let dir = match std::env::var_os(emulated::ENV_DIR) {
            Some(d) if !d.is_empty() => Ok(PathBuf::from(d)),
            _ => build_emulated_device(),
        };
        let outcome = dir.and_then(|d| {
            emulated::load(&d)
                .map(|driver| (d, driver))
                .map_err(|e| e.to_string())
        });
        match outcome {
            Ok((_, Driver::Real)) => None,
            Ok((d, Driver::Emulated(_))) => Some(d),
            Err(why) if !may_skip => panic!(
                "the emulated CUDA device could not be built or loaded: {why} (set \
                 FUSED_INFONCE_ALLOW_SKIP=1 to let GPU tests skip on this machine)"
            ),
            Err(why) => {
                eprintln!("no emulated CUDA device ({why})");
                None
            }
        }
    })
    .clone()
}

/// Runs scripts/emulated-cuda (cached: a second run only prints the directory).
fn build_emulated_device() -> Result<PathBuf, String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/emulated-cuda");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", script.display(), out.status));
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(dir))
}

/// `rows × d` random rows of unit L2 norm (rounded to `T`), seeded: the benchmarks' own.
pub use fused_infonce::bench::unit_rows;

/// Uploads a host matrix.
pub fn up<T: DeviceElement>(
    gpu: &Gpu,
    name: &'static str,
    data: &[T],
    rows: usize,
    d: usize,
) -> DeviceMatrix<T> {
    DeviceMatrix::upload(gpu, &MatRef::new(name, data, rows, d).unwrap()).unwrap()
}

/// A host view.
pub fn mat<'a, T: Element>(
    name: &'static str,
    data: &'a [T],
    rows: usize,
    d: usize,
) -> MatRef<'a, T> {
    MatRef::new(name, data, rows, d).unwrap()
}

/// A device output brought back to the host, in f64.
#[derive(Debug)]
pub struct HostOut {
    pub loss: Vec<f64>,
    pub lse: Vec<f64>,
    pub lse_cols: Option<Vec<f64>>,
    pub grads: Vec<(&'static str, Vec<f64>)>,
    pub grad_temperature: Option<f64>,
}

/// Downloads every output of a device evaluation (on the loss's own stream).
pub fn download<T: DeviceElement>(gpu: &Gpu, o: &DeviceOutput<T>) -> HostOut {
    download_on(gpu.stream(), o)
}

/// Downloads every output of a device evaluation on `stream` (an engine's stream, say: cudarc's
/// events then order the copies after the loss's writes).
pub fn download_on<T: DeviceElement>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    o: &DeviceOutput<T>,
) -> HostOut {
    let dl = |s: &cudarc::driver::CudaSlice<f32>| -> Vec<f64> {
        let v = stream.clone_dtoh(s).unwrap();
        v.into_iter().map(f64::from).collect()
    };
    HostOut {
        loss: dl(&o.loss),
        lse: dl(&o.lse),
        lse_cols: o.lse_cols.as_ref().map(dl),
        grads: o
            .grads
            .iter()
            .map(|(n, g)| {
                let v = match g {
                    DeviceGrad::F32(m) => dl(m.slice()),
                    DeviceGrad::Input(m) => {
                        let v = stream.clone_dtoh(m.slice()).unwrap();
                        v.into_iter().map(|x| x.to_f64()).collect()
                    }
                };
                (*n, v)
            })
            .collect(),
        grad_temperature: o.grad_temperature.as_ref().map(|s| dl(s)[0]),
    }
}

/// Relative L2 distance `‖got − want‖ / max(‖want‖, floor)`; a non-finite value in `got` (a
/// poisoned element no kernel wrote) never passes.
pub fn rel_l2_floor(got: &[f64], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    num.sqrt() / den.sqrt().max(floor).max(1e-300)
}

/// Relative L2 distance (no floor beyond 1e-300); a non-finite value never passes.
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    rel_l2_floor(got, want, 0.0)
}

/// Either backend's outputs in f64, for comparison.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub loss: Vec<f64>,
    pub lse: Vec<f64>,
    pub lse_cols: Option<Vec<f64>>,
    pub grads: Vec<(String, Vec<f64>)>,
    pub grad_temperature: Option<f64>,
}

impl From<&LossOutput> for Outputs {
    fn from(o: &LossOutput) -> Self {
        Outputs {
            loss: o.loss.values(),
            lse: o.lse.clone(),
            lse_cols: o.lse_cols.clone(),
            grads: o
                .grads
                .iter()
                .map(|g| (g.name.to_string(), g.value.data.clone()))
                .collect(),
            grad_temperature: o.grad_temperature,
        }
    }
}

impl From<&HostOut> for Outputs {
    fn from(o: &HostOut) -> Self {
        Outputs {
            loss: o.loss.clone(),
            lse: o.lse.clone(),
            lse_cols: o.lse_cols.clone(),
            grads: o
                .grads
                .iter()
                .map(|(n, g)| (n.to_string(), g.clone()))
                .collect(),
            grad_temperature: o.grad_temperature,
        }
    }
}

/// The natural size of each output's terms, the floor of its relative error: rounding error in
/// a sum is proportional to the size of what is summed, not to the (possibly cancelled) result,
/// so an output whose reference is 0 or tiny (the gradient through a D = 1 normalisation, the
/// loss of an empty queue) is compared against the typical size of its terms instead. From the
/// problem: `α` the largest `|∂z/∂s|` (1/τ; DySTreSS `1/τ_min + ½π(τ_max − τ_min)/τ_min²`),
/// `s_max` and `s_rms` the largest and the root-mean-square similarity over (sampled) anchor–key
/// pairs (cosines when normalising), `r` the largest row norm (1 when normalising), `r_min` the
/// smallest, `w_i` the anchors' weights:
/// - loss, LSE: `√len · (α s_max + ln(1 + #negatives))` (the logits' size; the simple variant's
///   `s₊ − λ Σ s` has `(1 + λ√#negatives) s_max`);
/// - each gradient: `√(Σ w_i²) · a · r / r_min`, one anchor's gradient (`a = α`, or
///   `1 + λ√#negatives` for the simple variant) added over anchors whose contributions fall in
///   different rows; the normalisation's backward divides by ‖x‖;
/// - `dL/dτ = −(1/τ) Σ_i w_i Σ_c g_ic z_ic`: `√(Σ w_i²) · α² · s_rms` (anchors' terms of either
///   sign).
#[derive(Debug, Clone, Copy)]
pub struct Scales {
    pub logit: f64,
    pub grad: f64,
    pub dtau: f64,
}

/// Similarities of (at most 256 × 1024, evenly sampled) anchor–key pairs: (max |s|, RMS s).
fn similarity_stats(anchors: &[Vec<f64>], keys: &[Vec<f64>]) -> (f64, f64) {
    let pick =
        |n: usize, most: usize| -> Vec<usize> { (0..n).step_by(n.div_ceil(most).max(1)).collect() };
    let (mut max, mut sq, mut count) = (0.0f64, 0.0f64, 0usize);
    for &i in &pick(anchors.len(), 256) {
        for &j in &pick(keys.len(), 1024) {
            let s: f64 = anchors[i].iter().zip(&keys[j]).map(|(a, b)| a * b).sum();
            max = max.max(s.abs());
            sq += s * s;
            count += 1;
        }
    }
    (max, (sq / count.max(1) as f64).sqrt())
}

impl Scales {
    pub fn of<T: Element>(spec: &LossSpec, inputs: &LossInputs<'_, T>, up: &Upstream) -> Scales {
        let rows_of = |m: &MatRef<'_, T>| -> Vec<Vec<f64>> {
            (0..m.rows())
                .map(|i| {
                    let r: Vec<f64> = m.data()[i * m.cols()..(i + 1) * m.cols()]
                        .iter()
                        .map(|x| x.to_f64())
                        .collect();
                    if spec.normalize() {
                        let n = r.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                        r.iter().map(|x| x / n).collect()
                    } else {
                        r
                    }
                })
                .collect()
        };
        let mats = inputs.matrices();
        let norms: Vec<f64> = mats
            .iter()
            .flat_map(|m| {
                (0..m.rows()).map(move |i| {
                    m.data()[i * m.cols()..(i + 1) * m.cols()]
                        .iter()
                        .map(|x| x.to_f64() * x.to_f64())
                        .sum::<f64>()
                        .sqrt()
                })
            })
            .collect();
        let r = norms.iter().copied().fold(0.0, f64::max).max(1e-30);
        let r_min = norms
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .max(1e-12);
        let (n, negatives, (s_max, s_rms)) = match inputs {
            LossInputs::Queue {
                query,
                positive,
                queue,
            } => {
                let q = rows_of(query);
                let mut keys = rows_of(queue);
                keys.extend(rows_of(positive));
                (query.rows(), queue.rows(), similarity_stats(&q, &keys))
            }
            LossInputs::InBatch { embeddings } => {
                let e = rows_of(embeddings);
                (
                    embeddings.rows(),
                    embeddings.rows().saturating_sub(2),
                    similarity_stats(&e, &e),
                )
            }
            LossInputs::Cross { query, key, .. } => (
                query.rows(),
                key.rows().saturating_sub(1),
                similarity_stats(&rows_of(query), &rows_of(key)),
            ),
            LossInputs::Symmetric { query, key } => (
                2 * query.rows(),
                query.rows().saturating_sub(1),
                similarity_stats(&rows_of(query), &rows_of(key)),
            ),
        };
        let w = up.weights(spec, n).unwrap_or_else(|_| vec![1.0; n]);
        let w_rss: f64 = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        let alpha = match spec.temperature() {
            Temperature::Fixed(t) | Temperature::Learnable(t) => 1.0 / t,
            Temperature::Dystress {
                tau_min, tau_max, ..
            } => {
                1.0 / tau_min
                    + 0.5 * std::f64::consts::PI * (tau_max - tau_min) / (tau_min * tau_min)
            }
        };
        let r_used = if spec.normalize() { 1.0 } else { r };
        let norm_div = if spec.normalize() { r_min } else { 1.0 };
        let a = match spec.variant() {
            Variant::Simple { lambda, .. } => {
                let lam = lambda.unwrap_or(1.0 / negatives.max(1) as f64);
                1.0 + lam * (negatives as f64).sqrt()
            }
            _ => alpha,
        };
        Scales {
            logit: a * s_max + (1.0 + negatives as f64).ln(),
            grad: w_rss * a * r_used / norm_div,
            dtau: w_rss * alpha * alpha * s_rms,
        }
    }
}

/// The f64 reference with the device's own roundings, so that what remains between the two is the
/// kernels' f32 arithmetic: the inputs are already in the storage dtype `T` (both backends read
/// the same values), and with `normalize` the device stores its normalised copy `u` in `T` (as
/// `torch.nn.functional.normalize` returns a tensor of the input's dtype). Here the loss is
/// evaluated at the device's own normalised copy (kernels/normalize.cu, which tests/gpu_normalize.rs
/// checks against f64: recomputing it on the host would round a value lying within an f32 error of
/// a bf16 rounding boundary the other way, one ulp in a few elements), and each gradient is chained
/// back through the normalisation at the exact `u` (as the device's backward recomputes it in f32
/// from `x` and `1/‖x‖`). For f32 inputs, or without normalisation, this is `reference::evaluate`.
pub fn reference_as_stored<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    up: &Upstream,
) -> fused_infonce::Result<LossOutput> {
    use fused_infonce::reference::normalize::{normalize_rows, normalize_rows_backward};
    if !spec.normalize() || T::DTYPE == fused_infonce::DType::F32 {
        return fused_infonce::reference::evaluate(spec, inputs, up);
    }
    let mats = inputs.matrices();
    let mut exact = Vec::new(); // (name, u, 1/‖x‖, cols) per input
    let mut stored: Vec<Vec<f64>> = Vec::new();
    for m in &mats {
        let x: Vec<f64> = m.data().iter().map(|v| v.to_f64()).collect();
        let (u, inv) = normalize_rows(&x, m.cols());
        let on_device = if m.rows() == 0 {
            Vec::new()
        } else {
            let (ud, _) = fused_infonce::cuda::steps::normalize::normalize_rows(
                gpu,
                &DeviceMatrix::upload(gpu, m)?,
            )?;
            ud.download(gpu)?.iter().map(|v| v.to_f64()).collect()
        };
        stored.push(on_device);
        exact.push((m.name(), u, inv, m.cols()));
    }
    let views: Vec<MatRef<'_, f64>> = mats
        .iter()
        .zip(&stored)
        .map(|(m, u)| MatRef::new(m.name(), u, m.rows(), m.cols()))
        .collect::<fused_infonce::Result<_>>()?;
    let targets = match inputs {
        LossInputs::Cross { targets, .. } => *targets,
        _ => None,
    };
    let plain = spec.without_normalize();
    let mut out = fused_infonce::reference::evaluate(
        &plain,
        &LossInputs::from_matrices(spec.mode(), &views, targets)?,
        up,
    )?;
    for g in &mut out.grads {
        let (_, u, inv, cols) = exact
            .iter()
            .find(|e| e.0 == g.name)
            .expect("a gradient per input");
        g.value.data = normalize_rows_backward(u, inv, &g.value.data, *cols);
    }
    Ok(out)
}

/// Asserts every output of `got` equals the reference `want` to relative L2 `tol`, each against
/// `max(‖want‖, floor)` with the floor of [`Scales`], naming what differs. NaN never passes.
pub fn assert_outputs_close(what: &str, got: &Outputs, want: &LossOutput, tol: f64, sc: &Scales) {
    let want = Outputs::from(want);
    let check = |part: &str, g: &[f64], w: &[f64], floor: f64| {
        assert!(
            g.len() >= w.len(),
            "{what}: {part}: {} values, want {}",
            g.len(),
            w.len()
        );
        let e = rel_l2_floor(&g[..w.len()], w, floor);
        if std::env::var_os("FUSED_INFONCE_PRINT_ERRORS").is_some() {
            // For tolerance analyses: every comparison's error, passing or not.
            eprintln!("{what}: {part}: relative L2 error {e:.3e} (floor {floor:.2e})");
        }
        assert!(
            e <= tol,
            "{what}: {part}: relative L2 error {e:.3e} > {tol:.0e} (floor {floor:.2e})\n got  {:?}\n want {:?}",
            &g[..g.len().min(6)],
            &w[..w.len().min(6)]
        );
    };
    let sqrt_len = |v: &[f64]| (v.len() as f64).sqrt();
    check(
        "loss",
        &got.loss,
        &want.loss,
        sqrt_len(&want.loss) * sc.logit,
    );
    if !want.lse.is_empty() {
        check("lse", &got.lse, &want.lse, sqrt_len(&want.lse) * sc.logit);
    }
    match (&got.lse_cols, &want.lse_cols) {
        (_, Some(w)) if w.is_empty() => {}
        (Some(g), Some(w)) => check("lse_cols", g, w, sqrt_len(w) * sc.logit),
        (None, Some(_)) => panic!("{what}: no lse_cols from the device"),
        _ => {}
    }
    let names = |o: &Outputs| o.grads.iter().map(|g| g.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(&want), "{what}: gradient names");
    for ((name, g), (_, w)) in got.grads.iter().zip(&want.grads) {
        check(&format!("grad_{name}"), g, w, sc.grad);
    }
    match (got.grad_temperature, want.grad_temperature) {
        (Some(g), Some(w)) => check("grad_temperature", &[g], &[w], sc.dtau),
        (None, None) => {}
        (g, w) => panic!("{what}: grad_temperature {g:?} vs {w:?}"),
    }
}

/// [`assert_outputs_close`] for a device result against the reference of `inputs`.
#[allow(clippy::too_many_arguments)]
pub fn assert_close<T: Element>(
    what: &str,
    got: &HostOut,
    want: &LossOutput,
    tol: f64,
    spec: &LossSpec,
    inputs: &LossInputs<'_, T>,
    up: &Upstream,
) {
    assert_outputs_close(what, &got.into(), want, tol, &Scales::of(spec, inputs, up));
}

/// Host and device inputs of one case (owning the data).
pub struct Case<T: DeviceElement> {
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub c: Vec<T>,
    pub n: usize,
    pub k: usize,
    pub d: usize,
}

impl<T: DeviceElement> Case<T> {
    pub fn new(seed: u64, n: usize, k: usize, d: usize) -> Self {
        Self {
            a: unit_rows(seed, n, d),
            b: unit_rows(seed + 1, n.max(k), d),
            c: unit_rows(seed + 2, k, d),
            n,
            k,
            d,
        }
    }
}

/// Device matrices for a case, by mode.
pub struct DevCase<T: DeviceElement> {
    pub a: DeviceMatrix<T>,
    pub b: DeviceMatrix<T>,
    pub c: DeviceMatrix<T>,
}

impl<T: DeviceElement> DevCase<T> {
    pub fn new(gpu: &Gpu, c: &Case<T>) -> Self {
        Self {
            a: up(gpu, "a", &c.a, c.n, c.d),
            b: up(gpu, "b", &c.b, c.n.max(c.k), c.d),
            c: up(gpu, "c", &c.c, c.k, c.d),
        }
    }
}

/// Queue mode: host and device inputs (query a, positive b[..n], queue c).
pub fn queue_inputs<'a, T: DeviceElement>(
    c: &'a Case<T>,
    dc: &'a DevCase<T>,
    pos: &'a DeviceMatrix<T>,
) -> (LossInputs<'a, T>, DeviceInputs<'a, T>) {
    (
        LossInputs::Queue {
            query: mat("query", &c.a, c.n, c.d),
            positive: mat("positive", &c.b[..c.n * c.d], c.n, c.d),
            queue: mat("queue", &c.c, c.k, c.d),
        },
        DeviceInputs::Queue {
            query: &dc.a,
            positive: pos,
            queue: fused_infonce::cuda::QueueView::whole(&dc.c),
        },
    )
}
