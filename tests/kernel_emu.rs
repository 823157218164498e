//! The tensor-core kernels (kernels/infonce_mma.cu) on the host emulator of tools/kernel-emu,
//! against the f64 CPU reference, with no GPU: every entry point (queue forward ± learnable τ,
//! queue combine, pair LSE, pair combine, pair gradient) in f16 and bf16, D = 64 and 128, in
//! queue (wrapped ring, K = 0), inbatch, cross (with and without targets) and symmetric modes,
//! N and K not multiples of the 64-row tiles, N = 1, every reduction. `mma.sync` and `ldmatrix`
//! are emulated by the PTX ISA fragment layouts, `cp.async` by its wait-group semantics over
//! shared memory poisoned with NaN (tools/kernel-emu/README.md).
//!
//! Each case runs with the device's queue split (132 SMs); every third case also with one split
//! (the whole 3-stage pipeline over many tiles), and every third with the gradient filter at
//! θ = 0.99 (tiles really skipped), where each gradient row must stay within the documented bound.
//! `FUSED_INFONCE_EMU_FULL=1` runs every configuration on every case.
//!
//! Needs bash and g++ with `_Float16` (GCC 12 or newer on x86-64); without them the test fails,
//! or with `FUSED_INFONCE_ALLOW_SKIP=1` prints `skipped: …` and returns. The inputs are rounded to the dtype before the reference sees them, so
//! the tolerance (1e-2 relative L2, as for f16/bf16 on a GPU) measures the kernels alone.

use fused_infonce::{
    bf16, f16, reference, DystressGrad, LossInputs, LossOutput, LossSpec, MatRef, Mode, Reduction,
    Temperature, Upstream, Variant,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Why the emulator cannot be built here, if it cannot.
fn missing_toolchain(dir: &Path) -> Option<String> {
    for (tool, arg) in [("bash", "--version"), ("g++", "--version")] {
        if Command::new(tool).arg(arg).output().is_err() {
            return Some(format!("{tool} not found"));
        }
    }
    let probe = dir.join("probe.cpp");
    std::fs::write(
        &probe,
        "_Float16 h = (_Float16)1.5f; int main() { return (int)h - 1; }\n",
    )
    .unwrap();
    let ok = Command::new("g++")
        .args(["-std=c++17", "-o"])
        .arg(dir.join("probe"))
        .arg(&probe)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    (!ok).then(|| "g++ has no _Float16 (GCC 12 or newer on x86-64 needed)".to_string())
}

/// Rows uniform in ±sqrt(3/d) (norm ≈ 1), rounded to `dt` ("f16", "bf16"; "f32" keeps them).
fn rows(rng: &mut StdRng, r: usize, d: usize, dt: &str) -> Vec<f32> {
    let s = (3.0 / d as f64).sqrt();
    (0..r * d)
        .map(|_| {
            let x = (rng.random_range(-1.0..1.0) * s) as f32;
            match dt {
                "f16" => f16::from_f32(x).to_f32(),
                "bf16" => bf16::from_f32(x).to_f32(),
                _ => x,
            }
        })
        .collect()
}

/// A case's matrices: queue (query, positive, queue), inbatch (2N embeddings), cross (query,
/// key), symmetric (query, key).
type Data = (Vec<f32>, Vec<f32>, Vec<f32>);

fn draw(rng: &mut StdRng, mode: Mode, n: usize, k: usize, d: usize, dt: &str) -> Data {
    match mode {
        Mode::Queue => (
            rows(rng, n, d, dt),
            rows(rng, n, d, dt),
            rows(rng, k, d, dt),
        ),
        Mode::InBatch => (rows(rng, 2 * n, d, dt), vec![], vec![]),
        Mode::Cross => (rows(rng, n, d, dt), rows(rng, k, d, dt), vec![]),
        Mode::Symmetric => (rows(rng, n, d, dt), rows(rng, n, d, dt), vec![]),
    }
}

fn case_inputs<'a>(
    mode: Mode,
    (a, b, c): &'a Data,
    n: usize,
    k: usize,
    d: usize,
    targets: Option<&'a [i64]>,
) -> LossInputs<'a, f32> {
    let m = |name, v: &'a [f32], rows| MatRef::new(name, v, rows, d).unwrap();
    let mats = match mode {
        Mode::Queue => vec![m("query", a, n), m("positive", b, n), m("queue", c, k)],
        Mode::InBatch => vec![m("embeddings", a, 2 * n)],
        Mode::Cross => vec![m("query", a, n), m("key", b, k)],
        Mode::Symmetric => vec![m("query", a, n), m("key", b, n)],
    };
    LossInputs::from_matrices(mode, &mats, targets).unwrap()
}

/// The upstream gradient (per-anchor weights in 0.1…1 for `none`, 0.75 otherwise) and the number
/// of anchor losses.
fn upstream(rng: &mut StdRng, mode: Mode, n: usize, r: Reduction) -> (Upstream, usize) {
    let count = match mode {
        Mode::InBatch | Mode::Symmetric => 2 * n,
        _ => n,
    };
    let up = match r {
        Reduction::None => {
            Upstream::PerAnchor((0..count).map(|_| rng.random_range(0.1..1.0)).collect())
        }
        _ => Upstream::Scalar(0.75),
    };
    (up, count)
}

fn vec_line(s: &mut String, v: &[f64]) {
    write!(s, "{}", v.len()).unwrap();
    for x in v {
        write!(s, " {x:e}").unwrap();
    }
    writeln!(s).unwrap();
}

/// One case in the format of tools/kernel-emu's harnesses: `head` (mode, variant, has_lambda,
/// lambda, temperature kind, τ, τ_min, τ_max, learnable, reduction, normalize, grad_queue), the
/// input matrices, targets, per-anchor weights, then the reference's loss, LSE, column LSE,
/// gradients and dτ, and a comment naming the case.
fn case_text(
    head: &str,
    inputs: &LossInputs<'_, f32>,
    targets: Option<&[i64]>,
    w: &[f64],
    out: &LossOutput,
    spec: &LossSpec,
    (n, k, d): (usize, usize, usize),
) -> String {
    let mut s = String::new();
    writeln!(s, "{head}").unwrap();
    let mats = inputs.matrices();
    writeln!(s, "{}", mats.len()).unwrap();
    for m in &mats {
        write!(s, "{} {}", m.rows(), m.cols()).unwrap();
        for x in m.data() {
            write!(s, " {x:e}").unwrap();
        }
        writeln!(s).unwrap();
    }
    let tv = targets.unwrap_or_default();
    write!(s, "{}", tv.len()).unwrap();
    for x in tv {
        write!(s, " {x}").unwrap();
    }
    writeln!(s).unwrap();
    vec_line(&mut s, w);
    vec_line(&mut s, &out.loss.values());
    vec_line(&mut s, &out.lse);
    match &out.lse_cols {
        Some(c) => {
            write!(s, "1 ").unwrap();
            vec_line(&mut s, c)
        }
        None => writeln!(s, "0").unwrap(),
    }
    writeln!(s, "{}", out.grads.len()).unwrap();
    for g in &out.grads {
        write!(s, "{} {} ", g.value.rows, g.value.cols).unwrap();
        vec_line(&mut s, &g.value.data);
    }
    match out.grad_temperature {
        Some(x) => writeln!(s, "1 {x:e}").unwrap(),
        None => writeln!(s, "0").unwrap(),
    }
    writeln!(s, "# {:?} {n} {k} {d} {spec:?}", spec.mode()).unwrap();
    s
}

/// Writes the cases (the format tools/kernel-emu/mma.cpp reads: spec line, matrices, targets,
/// weights, then the reference's loss, LSE, column LSE, gradients and dτ) into `dir`.
fn write_cases(dir: &Path, dt: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut idx = 0u64;
    for (mi, mode) in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric]
        .into_iter()
        .enumerate()
    {
        let shapes: &[(usize, usize, usize)] = match mode {
            Mode::Queue => &[
                (5, 37, 64),
                (70, 1100, 128),
                (1, 0, 64),
                (64, 128, 128),
                (130, 200, 64),
            ],
            Mode::InBatch => &[(5, 0, 64), (40, 0, 128), (1, 0, 64), (33, 0, 64)],
            Mode::Cross => &[
                (5, 9, 64),
                (70, 130, 128),
                (1, 1, 64),
                (3, 70, 64),
                (65, 64, 128),
            ],
            Mode::Symmetric => &[(5, 0, 64), (70, 0, 128), (1, 0, 64), (65, 0, 64)],
        };
        for &(n, k, d) in shapes {
            for (ti, t) in [Temperature::Fixed(0.1), Temperature::Learnable(0.07)]
                .into_iter()
                .enumerate()
            {
                for (ri, r) in [Reduction::Mean, Reduction::Sum, Reduction::None]
                    .into_iter()
                    .enumerate()
                {
                    if ri == 1 && ti == 0 {
                        continue;
                    }
                    let spec = LossSpec::builder(mode)
                        .temperature_scheme(t)
                        .reduction(r)
                        .build()
                        .unwrap();
                    let mut rng = StdRng::seed_from_u64(1000 + idx);
                    let data = draw(&mut rng, mode, n, k, d, dt);
                    let targets: Option<Vec<i64>> = (mode == Mode::Cross
                        && (idx.is_multiple_of(2) || k < n))
                        .then(|| (0..n).map(|_| rng.random_range(0..k as i64)).collect());
                    let inputs = case_inputs(mode, &data, n, k, d, targets.as_deref());
                    let (up, count) = upstream(&mut rng, mode, n, r);
                    let out = reference::evaluate(&spec, &inputs, &up).unwrap();
                    let w = up.weights(&spec, count).unwrap();
                    let (tau, learn) = match t {
                        Temperature::Fixed(x) => (x, 0),
                        Temperature::Learnable(x) => (x, 1),
                        _ => unreachable!(),
                    };
                    let head = format!("{mi} 0 0 0 0 {tau} 0 0 {learn} {ri} 0 0");
                    let s = case_text(
                        &head,
                        &inputs,
                        targets.as_deref(),
                        &w,
                        &out,
                        &spec,
                        (n, k, d),
                    );
                    let f = dir.join(format!("{dt}-case{idx:03}.txt"));
                    std::fs::write(&f, s).unwrap();
                    files.push(f);
                    idx += 1;
                }
            }
        }
    }
    files
}

/// A test that cannot run fails, unless `FUSED_INFONCE_ALLOW_SKIP=1` says this machine may skip it
/// (a test that passes without running checks nothing).
fn skip(why: &str) {
    assert!(
        std::env::var("FUSED_INFONCE_ALLOW_SKIP").is_ok_and(|v| v == "1"),
        "the host emulator cannot run here: {why} (set FUSED_INFONCE_ALLOW_SKIP=1 to skip on this \
         machine)"
    );
    println!("skipped: {why}");
}

/// Builds the emulator's harnesses once per test binary (tools/kernel-emu/build.sh):
/// `(work dir, binaries dir)`, or why it cannot be built here.
fn emulator() -> Result<(PathBuf, PathBuf), String> {
    static BUILT: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // The sources at their build-time path (a test binary copied elsewhere, e.g. to the
            // GPU machine by scripts/gpu-bundle, has none: it skips).
            let script = root().join("tools/kernel-emu/build.sh");
            if !script.is_file() || !root().join("kernels/infonce_mma.cu").is_file() {
                return Err(format!(
                    "the emulator's sources are not at {}",
                    root().display()
                ));
            }
            let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernel-emu");
            std::fs::create_dir_all(&work).unwrap();
            if let Some(why) = missing_toolchain(&work) {
                return Err(why);
            }
            let out_dir = work.join("bin");
            let status = Command::new("bash")
                .arg(&script)
                .env("OUT", &out_dir)
                .env("SRC", root().join("kernels"))
                .status()
                .expect("run tools/kernel-emu/build.sh");
            assert!(status.success(), "tools/kernel-emu/build.sh failed");
            Ok((work, out_dir))
        })
        .clone()
}

/// Runs `jobs` on two threads (the emulator is single-threaded); the failures' descriptions.
fn run_parallel<J: Sync>(jobs: &[J], run: impl Fn(&J) -> Option<String> + Sync) -> Vec<String> {
    let (a, b) = jobs.split_at(jobs.len() / 2);
    std::thread::scope(|s| {
        let hs: Vec<_> = [a, b]
            .into_iter()
            .map(|part| {
                let run = &run;
                s.spawn(move || part.iter().filter_map(run).collect::<Vec<_>>())
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

/// Runs one harness invocation; returns its output when it failed.
fn run(bin: &Path, case: &Path, sms: u32, filter: Option<f64>) -> Option<String> {
    let mut cmd = Command::new(bin);
    cmd.arg(case).arg(sms.to_string());
    if let Some(f) = filter {
        cmd.env("EMU_FILTER", f.to_string());
    }
    let out = cmd.output().expect("run the emulator");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success() && text.lines().any(|l| l.starts_with("ok "));
    (!ok).then(|| {
        format!(
            "{} (SMS {sms}, filter {filter:?}): {}\n{text}",
            case.display(),
            out.status
        )
    })
}

#[test]
fn tensor_core_kernels_on_the_emulator() {
    let (work, out_dir) = match emulator() {
        Ok(x) => x,
        Err(why) => return skip(&why),
    };
    let full = std::env::var_os("FUSED_INFONCE_EMU_FULL").is_some();
    let mut failures = Vec::new();
    let mut runs = 0;
    for dt in ["f16", "bf16"] {
        let cases = work.join(format!("cases-{dt}"));
        let _ = std::fs::remove_dir_all(&cases);
        std::fs::create_dir_all(&cases).unwrap();
        let files = write_cases(&cases, dt);
        assert_eq!(files.len(), 90, "case count");
        let bin = out_dir.join(format!("mma_{dt}"));
        // Two harness processes at a time (the emulator is single-threaded).
        let jobs: Vec<(usize, u32, Option<f64>)> = (0..files.len())
            .flat_map(|i| {
                let mut v = vec![(i, 132, None)];
                if full || i % 3 == 0 {
                    v.push((i, 1, None));
                }
                if full || i % 3 == 1 {
                    v.push((i, 7, Some(0.99)));
                }
                if full {
                    v.push((i, 132, Some(2f64.powi(-12))));
                }
                v
            })
            .collect();
        runs += jobs.len();
        let results = run_parallel(&jobs, |&(i, sms, f)| run(&bin, &files[i], sms, f));
        failures.extend(results);
    }
    println!(
        "{runs} emulated runs of the tensor-core kernels, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} emulated runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The v1 cases: every mode × temperature kind (fixed, learnable, DySTreSS detach and full) ×
/// variant (standard, decoupled, simple with and without λ) × reduction × normalisation on the
/// first shape of each mode, a sample of those on two more (tile remainders, a 1100-key queue,
/// N = 1, K = 0, D = 2…40), the queue's gradient when normalising; f32 inputs.
fn write_v1_cases(dir: &Path) -> (Vec<PathBuf>, usize) {
    let temps = [
        Temperature::Fixed(0.1),
        Temperature::Learnable(0.2),
        Temperature::Dystress {
            tau_min: 0.1,
            tau_max: 0.2,
            grad: DystressGrad::Detach,
        },
        Temperature::Dystress {
            tau_min: 0.07,
            tau_max: 0.2,
            grad: DystressGrad::Full,
        },
    ];
    let variants = [
        Variant::Standard,
        Variant::Decoupled,
        Variant::Simple {
            lambda: None,
            hard_k: None,
        },
        Variant::Simple {
            lambda: Some(0.5),
            hard_k: None,
        },
    ];
    let mut unfused = 0;
    let mut files = Vec::new();
    let mut idx = 0u64;
    for (mi, mode) in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric]
        .into_iter()
        .enumerate()
    {
        let shapes: &[(usize, usize, usize)] = match mode {
            Mode::Queue => &[(5, 37, 33), (3, 1100, 7), (1, 0, 3)],
            Mode::InBatch => &[(5, 0, 33), (17, 0, 40), (1, 0, 2)],
            Mode::Cross => &[(5, 9, 33), (17, 40, 3), (1, 1, 5)],
            Mode::Symmetric => &[(5, 0, 33), (20, 0, 35), (1, 0, 4)],
        };
        for (si, &(n, k, d)) in shapes.iter().enumerate() {
            for (ti, t) in temps.iter().enumerate() {
                for (vi, v) in variants.iter().enumerate() {
                    for (ri, r) in [Reduction::Mean, Reduction::Sum, Reduction::None]
                        .into_iter()
                        .enumerate()
                    {
                        for norm in [false, true] {
                            if si > 0 && (ri != 2 || (ti + vi) % 2 == 1) {
                                continue;
                            }
                            let spec = LossSpec::builder(mode)
                                .temperature_scheme(*t)
                                .variant(*v)
                                .reduction(r)
                                .normalize(norm)
                                .grad_queue(mode == Mode::Queue && norm)
                                .build()
                                .unwrap();
                            let mut rng = StdRng::seed_from_u64(idx);
                            let data = draw(&mut rng, mode, n, k, d, "f32");
                            let targets: Option<Vec<i64>> = (mode == Mode::Cross
                                && idx.is_multiple_of(2))
                            .then(|| (0..n).map(|_| rng.random_range(0..k as i64)).collect());
                            let inputs = case_inputs(mode, &data, n, k, d, targets.as_deref());
                            let (up, count) = upstream(&mut rng, mode, n, r);
                            // Combinations the reference refuses (e.g. decoupled with one
                            // candidate) have no case.
                            let Ok(out) = reference::evaluate(&spec, &inputs, &up) else {
                                continue;
                            };
                            let w = up.weights(&spec, count).unwrap();
                            let (tk, tau, tmin, tmax, learn) = match *t {
                                Temperature::Fixed(x) => (0, x, 0.0, 0.0, 0),
                                Temperature::Learnable(x) => (0, x, 0.0, 0.0, 1),
                                Temperature::Dystress {
                                    tau_min,
                                    tau_max,
                                    grad,
                                } => (
                                    if grad == DystressGrad::Detach { 1 } else { 2 },
                                    tau_min,
                                    tau_min,
                                    tau_max,
                                    0,
                                ),
                            };
                            let (var, hl, lam) = match *v {
                                Variant::Standard => (0, 0, 0.0),
                                Variant::Decoupled => (1, 0, 0.0),
                                Variant::Simple { lambda, .. } => {
                                    (2, lambda.is_some() as i32, lambda.unwrap_or(0.0))
                                }
                                _ => unreachable!(),
                            };
                            let head = format!(
                                "{mi} {var} {hl} {lam} {tk} {tau} {tmin} {tmax} {learn} {ri} {} {}",
                                norm as i32,
                                spec.grad_queue() as i32
                            );
                            let s = case_text(
                                &head,
                                &inputs,
                                targets.as_deref(),
                                &w,
                                &out,
                                &spec,
                                (n, k, d),
                            );
                            let f = dir.join(format!("v1-case{idx:04}.txt"));
                            std::fs::write(&f, s).unwrap();
                            files.push(f);
                            unfused += usize::from(var == 0 && tk == 0 && !norm);
                            idx += 1;
                        }
                    }
                }
            }
        }
    }
    (files, unfused)
}

/// The v1 loss kernels (`normalize_fwd`, `infonce_rows/merge/cols/finish/reduce`, launched as
/// `paths::simple::evaluate` does, the queue in a wrapped ring) on the emulator: f32 within 1e-5 of
/// the f64 reference on every case; the unfused baseline's kernels (`unfused_ce_rows` and its
/// helpers, host GEMMs standing in for cuBLAS) within 2e-5 on the cases it supports; on every fourth case the f16 and bf16 builds must give
/// bitwise the f32 build's outputs on the same dtype-rounded inputs (accumulation is f32 in all
/// three; `loss_<dt>` also checks the input-dtype gradient store).
#[test]
fn v1_kernels_on_the_emulator() {
    let (work, bin) = match emulator() {
        Ok(x) => x,
        Err(why) => return skip(&why),
    };
    let cases = work.join("cases-v1");
    let _ = std::fs::remove_dir_all(&cases);
    std::fs::create_dir_all(&cases).unwrap();
    let (files, unfused_cases) = write_v1_cases(&cases);
    let unfused_ok = std::sync::atomic::AtomicUsize::new(0);
    assert!(files.len() > 400, "only {} v1 cases", files.len());
    let jobs: Vec<(usize, &str)> = (0..files.len())
        .flat_map(|i| {
            let mut v = vec![(i, "f32"), (i, "unf")];
            if i % 4 == 0 {
                v.extend([(i, "f16"), (i, "bf16")]);
            }
            v
        })
        .collect();
    let output = |cmd: &mut Command| {
        let o = cmd.output().expect("run the emulator");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    };
    let failures = run_parallel(&jobs, |&(i, dt)| {
        let f = &files[i];
        if dt == "f32" {
            let (ok, text) = output(Command::new(bin.join("loss")).arg(f));
            return (!ok || !text.contains("ok ")).then(|| format!("{}: {text}", f.display()));
        }
        if dt == "unf" {
            // The unfused baseline's kernels (standard variant, fixed/learnable τ; others skip).
            let (ok, text) = output(Command::new(bin.join("unf")).arg(f));
            if text.starts_with("ok ") {
                unfused_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let done = text.starts_with("ok ") || text.starts_with("skip ");
            return (!ok || !done).then(|| format!("{} (unfused): {text}", f.display()));
        }
        let (a, b) = (f.with_extension(dt), f.with_extension(format!("{dt}.ref")));
        let (ok, text) = output(
            Command::new(bin.join(format!("loss_{dt}")))
                .arg(f)
                .env("EMU_TOL", "1")
                .env("EMU_DUMP", &a),
        );
        if !ok {
            return Some(format!("{} ({dt}): {text}", f.display()));
        }
        let (ok, text) = output(
            Command::new(bin.join("loss"))
                .arg(f)
                .env("EMU_TOL", "1")
                .env("EMU_ROUND", dt)
                .env("EMU_DUMP", &b),
        );
        if !ok {
            return Some(format!(
                "{} (f32 on {dt}-rounded inputs): {text}",
                f.display()
            ));
        }
        let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        (x.is_empty() || x != y).then(|| {
            format!(
                "{}: the {dt} build differs from the f32 build on the same inputs ({} vs {})",
                f.display(),
                a.display(),
                b.display()
            )
        })
    });
    println!(
        "{} emulated runs of the v1 kernels over {} cases, {} failed",
        jobs.len(),
        files.len(),
        failures.len()
    );
    let ran = unfused_ok.into_inner();
    assert!(
        ran == unfused_cases && ran > 0,
        "the unfused harness checked {ran} cases, {unfused_cases} are in its scope"
    );
    assert!(
        failures.is_empty(),
        "{} emulated runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The selection (hard:k), metrics and normalisation kernels on the emulator with their own
/// generated inputs (tools/kernel-emu/sel.cpp: every skip mode, ties, k = 1 … k ≥ #negatives,
/// bit-exact against a host sort; met.cpp: uniformity, tolerance, penalty histogram and effective
/// negatives against their f64 definitions; nrm.cpp: normalize_fwd/bwd with D = 1, odd D, zero,
/// clamped and large rows; elt.cpp: the unfused module's cast, max-abs and random-unit-rows
/// helpers), in f32, f16 and bf16.
#[test]
fn selection_metrics_and_normalisation_kernels_on_the_emulator() {
    let (_, bin) = match emulator() {
        Ok(x) => x,
        Err(why) => return skip(&why),
    };
    let failures = run_parallel(&["sel", "met", "nrm", "elt"], |name| {
        let o = Command::new(bin.join(name))
            .output()
            .expect("run the emulator");
        let text = String::from_utf8_lossy(&o.stdout);
        let last = text.lines().last().unwrap_or("").to_string();
        println!("{name}: {last}");
        (!o.status.success() || !last.ends_with(" 0 failures")).then(|| {
            let bad: Vec<&str> = text.lines().filter(|l| !l.starts_with("ok")).collect();
            format!("{name} failed: {}", bad.join("\n"))
        })
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// hard:k cases (Wang & Liu eq. 9: `Hard { k }`, and `Simple { hard_k }`) in every mode, with and
/// without normalisation, k = 1, 3, 4, 7 and k ≥ #negatives; learnable τ, queue gradient on.
fn write_hard_cases(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut idx = 0u64;
    for (mi, mode) in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric]
        .into_iter()
        .enumerate()
    {
        let (n, kk, d) = match mode {
            Mode::Queue => (5, 40, 9),
            Mode::InBatch => (9, 0, 9),
            Mode::Cross => (18, 30, 9),
            Mode::Symmetric => (18, 0, 9),
        };
        for norm in [false, true] {
            for v in [
                Variant::Hard { k: 3 },
                Variant::Simple {
                    lambda: None,
                    hard_k: Some(4),
                },
                Variant::Hard { k: 7 },
                Variant::Hard { k: 1 },
                Variant::Hard { k: 200 },
            ] {
                for r in [Reduction::Mean, Reduction::None] {
                    let spec = LossSpec::builder(mode)
                        .learnable_temperature(0.2)
                        .variant(v)
                        .reduction(r)
                        .grad_queue(mode == Mode::Queue)
                        .normalize(norm)
                        .build()
                        .unwrap();
                    let mut rng = StdRng::seed_from_u64(1000 + idx);
                    let data = draw(&mut rng, mode, n, kk, d, "f32");
                    let targets: Option<Vec<i64>> = (mode == Mode::Cross)
                        .then(|| (0..n).map(|_| rng.random_range(0..kk as i64)).collect());
                    let inputs = case_inputs(mode, &data, n, kk, d, targets.as_deref());
                    let (up, count) = upstream(&mut rng, mode, n, r);
                    let out = reference::evaluate(&spec, &inputs, &up).unwrap();
                    let w = up.weights(&spec, count).unwrap();
                    // The harness reads k from the comment line ("Hard { k: …" / "hard_k: Some(…").
                    let var = if matches!(v, Variant::Simple { .. }) {
                        2
                    } else {
                        0
                    };
                    let head = format!(
                        "{mi} {var} 0 0 0 0.2 0 0 1 {} {} {}",
                        if r == Reduction::None { 2 } else { 0 },
                        norm as i32,
                        (mode == Mode::Queue) as i32
                    );
                    let s = case_text(
                        &head,
                        &inputs,
                        targets.as_deref(),
                        &w,
                        &out,
                        &spec,
                        (n, kk, d),
                    );
                    let f = dir.join(format!("hard-case{idx:03}.txt"));
                    std::fs::write(&f, s).unwrap();
                    files.push(f);
                    idx += 1;
                }
            }
        }
    }
    files
}

/// hard:k on the v1 kernels: the thresholds from `select_kth_f32` run on the rows the loss
/// kernels read (EMU_SELECT=1), then the loss kernels with the threshold hook, against the f64
/// reference within 1e-5 (80 cases).
#[test]
fn hard_k_on_the_emulator() {
    let (work, bin) = match emulator() {
        Ok(x) => x,
        Err(why) => return skip(&why),
    };
    let cases = work.join("cases-hard");
    let _ = std::fs::remove_dir_all(&cases);
    std::fs::create_dir_all(&cases).unwrap();
    let files = write_hard_cases(&cases);
    assert_eq!(files.len(), 80, "hard:k case count");
    let failures = run_parallel(&files, |f| {
        let o = Command::new(bin.join("loss"))
            .arg(f)
            .env("EMU_SELECT", "1")
            .output()
            .expect("run the emulator");
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        (!o.status.success() || !text.contains("ok ")).then(|| format!("{}: {text}", f.display()))
    });
    println!(
        "{} emulated hard:k runs, {} failed",
        files.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
