//! `infonce eval` end to end: the real binary on safetensors files written here, its outputs
//! checked against `reference::evaluate` on the same inputs (names, shapes and values), the golden cases
//! run through the command line with their manifest flags, and every bad input: a non-zero exit,
//! exactly one line on stderr naming the culprit, and no output file.

use fused_infonce::{
    bf16, f16, reference, DystressGrad, Element, LossInputs, LossOutput, LossSpec, LossValue,
    MatRef, Mode, Reduction, Upstream, Variant,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;

// ---------------------------------------------------------------------------------------------
// Writing inputs, running the binary, reading outputs.

/// One tensor of an input file.
#[derive(Clone)]
struct In {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl In {
    fn new(name: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
            bytes,
        }
    }
    fn f32(name: &str, shape: Vec<usize>, v: &[f32]) -> Self {
        Self::new(name, Dtype::F32, shape, bytemuck::cast_slice(v).to_vec())
    }
}

fn st_dtype<T: Element>() -> Dtype {
    match T::DTYPE {
        fused_infonce::DType::F32 => Dtype::F32,
        fused_infonce::DType::F16 => Dtype::F16,
        fused_infonce::DType::BF16 => Dtype::BF16,
        fused_infonce::DType::F64 => Dtype::F64,
    }
}

/// A scratch directory with an input file and an (initially empty) output directory.
struct Scratch {
    _dir: tempfile::TempDir,
    input: PathBuf,
    out_dir: PathBuf,
    output: PathBuf,
}

impl Scratch {
    fn new(tensors: &[In]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in.safetensors");
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.bytes).expect("tensor view"),
                )
            })
            .collect();
        let bytes = safetensors::serialize(views, &None).expect("serialize");
        std::fs::write(&input, bytes).expect("write input");
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&out_dir).expect("out dir");
        let output = out_dir.join("out.safetensors");
        Self {
            _dir: dir,
            input,
            out_dir,
            output,
        }
    }

    /// `infonce eval --input IN --output OUT` followed by `flags`.
    fn eval(&self, flags: &[&str]) -> Output {
        let mut args: Vec<String> = vec![
            "eval".into(),
            "--input".into(),
            self.input.display().to_string(),
            "--output".into(),
            self.output.display().to_string(),
        ];
        args.extend(flags.iter().map(|s| s.to_string()));
        run(&args)
    }

    /// As [`Scratch::eval`], on the GPU or the emulated CUDA device this test run uses.
    fn eval_on_device(&self, flags: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_infonce"));
        if let Some(dir) = support::emulated_device() {
            cmd.env(fused_infonce::cuda::emulated::ENV_DIR, dir);
        }
        cmd.args(["eval", "--input"])
            .arg(&self.input)
            .arg("--output")
            .arg(&self.output)
            .args(flags)
            .output()
            .expect("run infonce")
    }

    /// Whatever is in the output directory (it should hold `out.safetensors` or nothing at all).
    fn out_dir_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.out_dir)
            .expect("read out dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// The program as a user without a GPU runs it: without the emulated device even where the test
/// run has one (tests that want a device use [`Scratch::eval_on_device`]).
fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infonce"))
        .env_remove(fused_infonce::cuda::emulated::ENV_DIR)
        .args(args)
        .output()
        .expect("run infonce")
}

/// name → (shape, values) of an output file; every tensor must be f32.
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

fn read_output(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).expect("read output");
    let st = SafeTensors::deserialize(&bytes).expect("output is safetensors");
    st.iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), Dtype::F32, "output `{name}` is not f32");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect();
            (name.to_string(), (t.shape().to_vec(), v))
        })
        .collect()
}

/// The contract of spec/cli.md, stated independently of the program: what `out` should be
/// written as.
fn expected_tensors(out: &LossOutput) -> Tensors {
    let mut m = Tensors::new();
    match &out.loss {
        LossValue::Scalar(x) => {
            m.insert("loss".into(), (vec![], vec![*x]));
        }
        LossValue::PerAnchor(v) => {
            m.insert("loss".into(), (vec![v.len()], v.clone()));
        }
        LossValue::Symmetric { rows, cols } => {
            m.insert("loss_rows".into(), (vec![rows.len()], rows.clone()));
            m.insert("loss_cols".into(), (vec![cols.len()], cols.clone()));
        }
    }
    if !out.lse.is_empty() {
        m.insert("lse".into(), (vec![out.lse.len()], out.lse.clone()));
    }
    if let Some(c) = &out.lse_cols {
        if !c.is_empty() {
            m.insert("lse_cols".into(), (vec![c.len()], c.clone()));
        }
    }
    for g in &out.grads {
        m.insert(
            format!("grad_{}", g.name),
            (vec![g.value.rows, g.value.cols], g.value.data.clone()),
        );
    }
    if let Some(t) = out.grad_temperature {
        m.insert("grad_temperature".into(), (vec![], vec![t]));
    }
    m
}

/// Same names, same shapes, and every value within `rel` of the expected one (relative to the
/// value, with a floor of `rel × 1e-3 ×` the tensor's largest magnitude for values near zero).
fn assert_close(label: &str, got: &Tensors, want: &Tensors, rel: f64) {
    let gn: Vec<&String> = got.keys().collect();
    let wn: Vec<&String> = want.keys().collect();
    assert_eq!(gn, wn, "{label}: output tensor names");
    for (name, (wshape, w)) in want {
        let (gshape, g) = &got[name];
        assert_eq!(gshape, wshape, "{label}: shape of `{name}`");
        let scale = w.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            let tol = rel * b.abs() + rel * 1e-3 * scale + 1e-30;
            assert!(
                (a - b).abs() <= tol,
                "{label}: `{name}`[{i}] = {a:e}, expected {b:e} (tolerance {tol:e})"
            );
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_success(label: &str, o: &Output, s: &Scratch) {
    assert!(
        o.status.success(),
        "{label}: infonce eval failed: {}",
        stderr(o)
    );
    let out = stdout(o);
    assert!(out.contains("loss"), "{label}: summary without loss: {out}");
    assert!(
        out.contains(&s.output.display().to_string()),
        "{label}: summary without the output path: {out}"
    );
    assert_eq!(
        s.out_dir_entries(),
        vec!["out.safetensors".to_string()],
        "{label}: exactly the output file (no temporary left)"
    );
}

// ---------------------------------------------------------------------------------------------
// Problems: random inputs of one dtype, the reference, the input file.

enum Targets {
    I64(Vec<i64>),
    I32(Vec<i32>),
}

struct Problem<T> {
    mats: Vec<(&'static str, Vec<T>, usize, usize)>,
    targets: Option<Targets>,
    /// (shape, values) of the `upstream` tensor.
    upstream: Option<(Vec<usize>, Vec<f32>)>,
}

fn random_mat<T: Element>(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<T> {
    (0..rows * cols)
        .map(|_| T::from_f64(rng.random_range(-1.0..1.0)))
        .collect()
}

/// Random inputs for `mode`: N anchors (2N rows for inbatch), `keys` queue or key rows
/// (queue, cross), dimension `d`.
fn problem<T: Element>(mode: Mode, n: usize, keys: usize, d: usize, seed: u64) -> Problem<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mats = match mode {
        Mode::Queue => vec![
            ("query", random_mat(&mut rng, n, d), n, d),
            ("positive", random_mat(&mut rng, n, d), n, d),
            ("queue", random_mat(&mut rng, keys, d), keys, d),
        ],
        Mode::InBatch => vec![("embeddings", random_mat(&mut rng, 2 * n, d), 2 * n, d)],
        Mode::Cross => vec![
            ("query", random_mat(&mut rng, n, d), n, d),
            ("key", random_mat(&mut rng, keys, d), keys, d),
        ],
        Mode::Symmetric => vec![
            ("query", random_mat(&mut rng, n, d), n, d),
            ("key", random_mat(&mut rng, n, d), n, d),
        ],
    };
    Problem {
        mats,
        targets: None,
        upstream: None,
    }
}

impl<T: Element> Problem<T> {
    fn file(&self) -> Vec<In> {
        let mut v: Vec<In> = self
            .mats
            .iter()
            .map(|(name, data, r, c)| {
                In::new(
                    name,
                    st_dtype::<T>(),
                    vec![*r, *c],
                    bytemuck::cast_slice(data).to_vec(),
                )
            })
            .collect();
        match &self.targets {
            Some(Targets::I64(t)) => v.push(In::new(
                "targets",
                Dtype::I64,
                vec![t.len()],
                bytemuck::cast_slice(t).to_vec(),
            )),
            Some(Targets::I32(t)) => v.push(In::new(
                "targets",
                Dtype::I32,
                vec![t.len()],
                bytemuck::cast_slice(t).to_vec(),
            )),
            None => {}
        }
        if let Some((shape, u)) = &self.upstream {
            v.push(In::f32("upstream", shape.clone(), u));
        }
        v
    }

    fn reference(&self, spec: &LossSpec) -> LossOutput {
        let m: Vec<MatRef<'_, T>> = self
            .mats
            .iter()
            .map(|(name, data, r, c)| MatRef::new(name, data, *r, *c).expect("matrix"))
            .collect();
        let targets: Option<Vec<i64>> = self.targets.as_ref().map(|t| match t {
            Targets::I64(t) => t.clone(),
            Targets::I32(t) => t.iter().map(|&y| y as i64).collect(),
        });
        let inputs = LossInputs::from_matrices(spec.mode(), &m, targets.as_deref()).unwrap();
        let upstream = match &self.upstream {
            None => Upstream::One,
            Some((shape, u)) if shape.is_empty() => Upstream::Scalar(u[0] as f64),
            Some((_, u)) if spec.reduction() != Reduction::None && u.len() == 1 => {
                Upstream::Scalar(u[0] as f64)
            }
            Some((_, u)) => Upstream::PerAnchor(u.iter().map(|&x| x as f64).collect()),
        };
        reference::evaluate(spec, &inputs, &upstream).expect("reference")
    }

    /// Runs the binary with `flags` and checks every output against the reference for `spec`;
    /// returns the outputs.
    fn check(&self, label: &str, spec: &LossSpec, flags: &[&str]) -> Tensors {
        let s = Scratch::new(&self.file());
        let o = s.eval(flags);
        assert_success(label, &o, &s);
        let got = read_output(&s.output);
        let want = expected_tensors(&self.reference(spec));
        // Outputs are f32: the f64 reference rounded once (2^-24 relative).
        assert_close(label, &got, &want, 1e-6);
        got
    }
}

fn names(t: &Tensors) -> Vec<&str> {
    t.keys().map(String::as_str).collect()
}

fn spec(mode: Mode) -> fused_infonce::LossSpecBuilder {
    LossSpec::builder(mode).grad_queue(mode == Mode::Queue)
}

// ---------------------------------------------------------------------------------------------
// Modes and dtypes.

fn queue_for<T: Element>(seed: u64) {
    let p = problem::<T>(Mode::Queue, 4, 9, 6, seed);
    let sp = spec(Mode::Queue)
        .temperature(0.1)
        .normalize(true)
        .build()
        .expect("spec");
    let label = format!("queue {}", T::DTYPE);
    let got = p.check(
        &label,
        &sp,
        &["--mode", "queue", "--temperature", "0.1", "--normalize"],
    );
    assert_eq!(
        names(&got),
        ["grad_positive", "grad_query", "grad_queue", "loss", "lse"]
    );
    assert_eq!(got["grad_queue"].0, vec![9, 6]);
    assert_eq!(got["lse"].0, vec![4]);
}

#[test]
fn queue_mode_in_each_dtype() {
    queue_for::<f32>(1);
    queue_for::<f16>(2);
    queue_for::<bf16>(3);
}

#[test]
fn queue_is_the_default_mode_and_0_07_the_default_temperature() {
    let p = problem::<f32>(Mode::Queue, 3, 5, 4, 4);
    let sp = spec(Mode::Queue).temperature(0.07).build().expect("spec");
    p.check("defaults", &sp, &[]);
    // And the default really is 0.07: another τ gives another loss.
    let other = spec(Mode::Queue).temperature(0.5).build().expect("spec");
    let a = expected_tensors(&p.reference(&sp))["loss"].1[0];
    let b = expected_tensors(&p.reference(&other))["loss"].1[0];
    assert!((a - b).abs() > 1e-3 * a.abs());
}

#[test]
fn inbatch_mode_in_each_dtype() {
    fn case<T: Element>(seed: u64) {
        let p = problem::<T>(Mode::InBatch, 5, 0, 7, seed);
        let sp = spec(Mode::InBatch)
            .temperature(0.2)
            .normalize(true)
            .build()
            .expect("spec");
        let got = p.check(
            &format!("inbatch {}", T::DTYPE),
            &sp,
            &["--mode", "inbatch", "--temperature", "0.2", "--normalize"],
        );
        assert_eq!(names(&got), ["grad_embeddings", "loss", "lse"]);
        assert_eq!(got["grad_embeddings"].0, vec![10, 7]);
        assert_eq!(got["lse"].0, vec![10]);
    }
    case::<f32>(10);
    case::<f16>(11);
    case::<bf16>(12);
}

#[test]
fn cross_mode_with_and_without_targets() {
    let sp = spec(Mode::Cross).temperature(0.3).build().expect("spec");
    let flags = ["--mode", "cross", "--temperature", "0.3"];
    // Default targets y_i = i, with more keys than queries.
    let p = problem::<f32>(Mode::Cross, 4, 7, 5, 20);
    let got = p.check("cross, default targets", &sp, &flags);
    assert_eq!(names(&got), ["grad_key", "grad_query", "loss", "lse"]);
    assert_eq!(got["grad_key"].0, vec![7, 5]);

    let targets = vec![6i64, 0, 3, 3];
    let mut p = problem::<f32>(Mode::Cross, 4, 7, 5, 21);
    p.targets = Some(Targets::I64(targets.clone()));
    let with_i64 = p.check("cross, i64 targets", &sp, &flags);
    p.targets = Some(Targets::I32(targets.iter().map(|&y| y as i32).collect()));
    let with_i32 = p.check("cross, i32 targets", &sp, &flags);
    assert_eq!(
        with_i64, with_i32,
        "i32 and i64 targets give the same outputs"
    );
    p.targets = None;
    let without = expected_tensors(&p.reference(&sp));
    assert!(
        (without["loss"].1[0] - with_i64["loss"].1[0]).abs() > 1e-4,
        "targets change the loss"
    );

    // f16 and bf16 with targets too.
    let mut p = problem::<bf16>(Mode::Cross, 3, 3, 4, 22);
    p.targets = Some(Targets::I32(vec![2, 1, 0]));
    p.check("cross bf16, i32 targets", &sp, &flags);
    let mut p = problem::<f16>(Mode::Cross, 3, 6, 4, 23);
    p.targets = Some(Targets::I64(vec![5, 1, 0]));
    p.check("cross f16, i64 targets", &sp, &flags);
}

#[test]
fn symmetric_mode_every_reduction() {
    let p = problem::<f32>(Mode::Symmetric, 5, 0, 6, 30);
    let base = ["--mode", "symmetric", "--temperature", "0.1", "--normalize"];
    for (red, r) in [
        ("mean", Reduction::Mean),
        ("sum", Reduction::Sum),
        ("none", Reduction::None),
    ] {
        let sp = spec(Mode::Symmetric)
            .temperature(0.1)
            .normalize(true)
            .reduction(r)
            .build()
            .expect("spec");
        let mut flags = base.to_vec();
        flags.extend(["--reduction", red]);
        let got = p.check(&format!("symmetric {red}"), &sp, &flags);
        if r == Reduction::None {
            assert_eq!(
                names(&got),
                [
                    "grad_key",
                    "grad_query",
                    "loss_cols",
                    "loss_rows",
                    "lse",
                    "lse_cols"
                ]
            );
            assert_eq!(got["loss_rows"].0, vec![5]);
            assert_eq!(got["loss_cols"].0, vec![5]);
        } else {
            assert_eq!(
                names(&got),
                ["grad_key", "grad_query", "loss", "lse", "lse_cols"]
            );
            assert_eq!(got["loss"].0, Vec::<usize>::new());
        }
        assert_eq!(got["lse_cols"].0, vec![5]);
    }
    // In f16 and bf16.
    let sp = spec(Mode::Symmetric)
        .temperature(0.1)
        .normalize(true)
        .build()
        .expect("spec");
    problem::<f16>(Mode::Symmetric, 4, 0, 8, 31).check("symmetric f16", &sp, &base);
    problem::<bf16>(Mode::Symmetric, 4, 0, 8, 32).check("symmetric bf16", &sp, &base);
}

// ---------------------------------------------------------------------------------------------
// Temperatures, variants, reductions, upstream.

#[test]
fn learnable_temperature_writes_grad_temperature() {
    let p = problem::<f32>(Mode::Queue, 4, 6, 5, 40);
    let sp = spec(Mode::Queue)
        .learnable_temperature(0.2)
        .normalize(true)
        .build()
        .expect("spec");
    let got = p.check(
        "queue learnable",
        &sp,
        &[
            "--temperature",
            "0.2",
            "--learnable-temperature",
            "--normalize",
        ],
    );
    assert_eq!(got["grad_temperature"].0, Vec::<usize>::new());
    assert!(got["grad_temperature"].1[0] != 0.0);

    // Without --temperature it starts from 0.07.
    let sp = spec(Mode::Queue)
        .learnable_temperature(0.07)
        .build()
        .expect("spec");
    p.check(
        "queue learnable, default τ",
        &sp,
        &["--learnable-temperature"],
    );

    let p = problem::<bf16>(Mode::Symmetric, 4, 0, 6, 41);
    let sp = spec(Mode::Symmetric)
        .learnable_temperature(0.07)
        .normalize(true)
        .build()
        .expect("spec");
    let got = p.check(
        "symmetric learnable bf16",
        &sp,
        &[
            "--mode",
            "symmetric",
            "--learnable-temperature",
            "--temperature",
            "0.07",
            "--normalize",
        ],
    );
    assert!(got.contains_key("grad_temperature"));
}

#[test]
fn dystress_detach_and_full() {
    let p = problem::<f32>(Mode::Queue, 4, 8, 6, 50);
    for (g, grad) in [
        ("detach", DystressGrad::Detach),
        ("full", DystressGrad::Full),
    ] {
        let sp = spec(Mode::Queue)
            .dystress(0.07, 0.2, grad)
            .normalize(true)
            .build()
            .expect("spec");
        let got = p.check(
            &format!("dystress {g}"),
            &sp,
            &[
                "--dystress",
                "0.07,0.2",
                "--dystress-grad",
                g,
                "--normalize",
            ],
        );
        assert!(!got.contains_key("grad_temperature"));
    }
    // detach is the default.
    let sp = spec(Mode::Queue)
        .dystress(0.1, 0.2, DystressGrad::Detach)
        .normalize(true)
        .build()
        .expect("spec");
    p.check(
        "dystress default grad",
        &sp,
        &["--dystress", "0.1,0.2", "--normalize"],
    );
    // In-batch with DySTreSS, f16.
    let p = problem::<f16>(Mode::InBatch, 3, 0, 5, 51);
    let sp = spec(Mode::InBatch)
        .dystress(0.1, 0.2, DystressGrad::Full)
        .normalize(true)
        .build()
        .expect("spec");
    p.check(
        "inbatch dystress full f16",
        &sp,
        &[
            "--mode",
            "inbatch",
            "--dystress",
            "0.1,0.2",
            "--dystress-grad",
            "full",
            "--normalize",
        ],
    );
}

#[test]
fn every_variant() {
    let variants = [
        ("standard", Variant::Standard),
        ("decoupled", Variant::Decoupled),
        ("hard:3", Variant::Hard { k: 3 }),
        (
            "simple",
            Variant::Simple {
                lambda: None,
                hard_k: None,
            },
        ),
        (
            "simple:0.25",
            Variant::Simple {
                lambda: Some(0.25),
                hard_k: None,
            },
        ),
    ];
    for mode in [Mode::Queue, Mode::InBatch, Mode::Cross, Mode::Symmetric] {
        let p = problem::<f32>(mode, 4, 8, 5, 60);
        for (v, variant) in variants {
            let sp = spec(mode)
                .variant(variant)
                .temperature(0.2)
                .normalize(true)
                .build()
                .expect("spec");
            let got = p.check(
                &format!("{} {v}", mode.name()),
                &sp,
                &[
                    "--mode",
                    mode.name(),
                    "--variant",
                    v,
                    "--temperature",
                    "0.2",
                    "--normalize",
                ],
            );
            let simple = matches!(variant, Variant::Simple { .. });
            assert_eq!(got.contains_key("lse"), !simple, "{v}: lse iff not simple");
            assert!(!got.contains_key("lse_cols") || mode == Mode::Symmetric);
        }
    }
}

#[test]
fn reductions_and_upstream() {
    // Sum, no upstream.
    let mut p = problem::<f32>(Mode::Queue, 4, 6, 5, 70);
    let sum = spec(Mode::Queue)
        .temperature(0.5)
        .reduction(Reduction::Sum)
        .build()
        .expect("spec");
    p.check(
        "queue sum",
        &sum,
        &["--reduction", "sum", "--temperature", "0.5"],
    );
    // A scalar upstream under mean and sum (0-D, and a one-element vector).
    let mean = spec(Mode::Queue).temperature(0.5).build().expect("spec");
    p.upstream = Some((vec![], vec![2.5]));
    let scaled = p.check("queue mean, upstream 2.5", &mean, &["--temperature", "0.5"]);
    p.upstream = None;
    let plain = expected_tensors(&p.reference(&mean));
    let (a, b) = (scaled["grad_query"].1[0], plain["grad_query"].1[0]);
    assert!(
        (a - 2.5 * b).abs() <= 1e-5 * b.abs(),
        "upstream scales the gradient"
    );
    p.upstream = Some((vec![1], vec![-0.5]));
    p.check(
        "queue sum, upstream [1]",
        &sum,
        &["--reduction", "sum", "--temperature", "0.5"],
    );
    // Per anchor with none, queue and symmetric (2N weights: rows then columns).
    let none = spec(Mode::Queue)
        .temperature(0.5)
        .reduction(Reduction::None)
        .build()
        .expect("spec");
    p.upstream = None;
    let got = p.check(
        "queue none",
        &none,
        &["--reduction", "none", "--temperature", "0.5"],
    );
    assert_eq!(got["loss"].0, vec![4]);
    p.upstream = Some((vec![4], vec![1.0, -2.0, 0.5, 3.0]));
    p.check(
        "queue none, per-anchor upstream",
        &none,
        &["--reduction", "none", "--temperature", "0.5"],
    );
    let mut p = problem::<f16>(Mode::Symmetric, 3, 0, 4, 71);
    p.upstream = Some((vec![6], vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.25]));
    let sp = spec(Mode::Symmetric)
        .temperature(0.5)
        .reduction(Reduction::None)
        .build()
        .expect("spec");
    p.check(
        "symmetric none, per-anchor upstream",
        &sp,
        &[
            "--mode",
            "symmetric",
            "--reduction",
            "none",
            "--temperature",
            "0.5",
        ],
    );
    let mut p = problem::<bf16>(Mode::InBatch, 2, 0, 4, 72);
    p.upstream = Some((vec![4], vec![1.0, 2.0, 3.0, 4.0]));
    let sp = spec(Mode::InBatch)
        .temperature(0.5)
        .reduction(Reduction::None)
        .build()
        .expect("spec");
    let got = p.check(
        "inbatch none, per-anchor upstream",
        &sp,
        &[
            "--mode",
            "inbatch",
            "--reduction",
            "none",
            "--temperature",
            "0.5",
        ],
    );
    assert_eq!(got["loss"].0, vec![4]);
}

#[test]
fn allow_nonfinite_lets_nan_propagate() {
    let mut p = problem::<f32>(Mode::Queue, 3, 5, 4, 80);
    p.mats[0].1[4 + 2] = f32::NAN; // query row 1, column 2
    let s = Scratch::new(&p.file());
    let o = s.eval(&["--allow-nonfinite"]);
    assert_success("nan allowed", &o, &s);
    let got = read_output(&s.output);
    assert!(got["loss"].1[0].is_nan(), "NaN reaches the loss");
    // Anchors other than row 1 keep finite LSEs.
    assert!(got["lse"].1[0].is_finite() && got["lse"].1[1].is_nan());
    // Without the flag: rejected, naming the tensor, row and column.
    let s = Scratch::new(&p.file());
    assert_fails(&s, &[], &["query", "row 1", "column 2"]);
}

/// `--backend cuda` (a GPU, or the emulated CUDA device) against `--backend cpu` in every mode:
/// the same output tensors, f32-level agreement.
#[test]
fn cuda_backend_agrees_with_the_cpu_backend_in_every_mode() {
    let Some(_gpu) = support::gpu("cuda_backend_agrees_with_the_cpu_backend_in_every_mode") else {
        return;
    };
    let mut cross = problem::<f32>(Mode::Cross, 6, 11, 9, 91);
    cross.targets = Some(Targets::I64(vec![3, 0, 10, 5, 5, 1]));
    let cases = [
        (
            "queue",
            problem::<f32>(Mode::Queue, 5, 40, 9, 90),
            vec!["--mode", "queue", "--normalize", "--temperature", "0.1"],
        ),
        (
            "inbatch",
            problem::<f32>(Mode::InBatch, 7, 0, 9, 92),
            vec![
                "--mode",
                "inbatch",
                "--learnable-temperature",
                "--reduction",
                "sum",
            ],
        ),
        (
            "cross",
            cross,
            vec![
                "--mode",
                "cross",
                "--variant",
                "decoupled",
                "--reduction",
                "none",
            ],
        ),
        (
            "symmetric",
            problem::<f32>(Mode::Symmetric, 8, 0, 9, 93),
            vec![
                "--mode",
                "symmetric",
                "--dystress",
                "0.1,0.2",
                "--normalize",
            ],
        ),
    ];
    for (mode, p, flags) in cases {
        let s = Scratch::new(&p.file());
        let mut cpu_flags = flags.clone();
        cpu_flags.extend(["--backend", "cpu"]);
        let o = s.eval(&cpu_flags);
        assert_success(&format!("{mode} cpu"), &o, &s);
        let want = read_output(&s.output);
        std::fs::remove_file(&s.output).expect("remove");
        let mut cuda_flags = flags.clone();
        cuda_flags.extend(["--backend", "cuda"]);
        let o = s.eval_on_device(&cuda_flags);
        assert_success(&format!("{mode} cuda"), &o, &s);
        let got = read_output(&s.output);
        // Relative L2 per tensor (the GPU tests' measure): the inputs are rows of norm ~2.6
        // at τ = 0.07, logits up to ~100, where f32's own rounding of a logit (ulp 8e-6) makes
        // single small elements differ by 1e-4 relative.
        let names = |t: &Tensors| t.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{mode}: output tensor names");
        for (name, (shape, w)) in &want {
            assert_eq!(&got[name].0, shape, "{mode}: shape of `{name}`");
            let e = support::rel_l2(&got[name].1, w);
            assert!(e <= 1e-5, "{mode}: `{name}` relative L2 error {e:e}");
        }
    }
}

/// A problem larger than the device's memory: `--backend cuda` is one clear line naming the
/// allocation that failed, and no output file. Only the emulated device's memory can be made small
/// (`FUSED_INFONCE_EMU_MEMORY`); on a GPU the test says so and checks nothing.
#[test]
fn cuda_backend_out_of_device_memory_is_one_line() {
    let Some(_gpu) = support::gpu("cuda_backend_out_of_device_memory_is_one_line") else {
        return;
    };
    let Some(dir) = support::emulated_device() else {
        eprintln!(
            "cuda_backend_out_of_device_memory_is_one_line: a real GPU (memory not shrinkable)"
        );
        return;
    };
    // 64 × 2048 queue of D = 64 f32: half a MiB of queue, under the 256 KiB device.
    let p = problem::<f32>(Mode::Queue, 64, 2048, 64, 94);
    let s = Scratch::new(&p.file());
    let o = Command::new(env!("CARGO_BIN_EXE_infonce"))
        .env(fused_infonce::cuda::emulated::ENV_DIR, dir)
        .env("FUSED_INFONCE_EMU_MEMORY", "256K")
        .env("FUSED_INFONCE_EMU_QUIET", "1")
        .args(["eval", "--input"])
        .arg(&s.input)
        .arg("--output")
        .arg(&s.output)
        .args(["--backend", "cuda", "--temperature", "0.2"])
        .output()
        .expect("run infonce");
    assert!(
        !o.status.success(),
        "a 256 KiB device ran a 0.5 MiB problem"
    );
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("infonce: error: ") && err.contains("OUT_OF_MEMORY"),
        "{err}"
    );
    assert!(s.out_dir_entries().is_empty(), "{:?}", s.out_dir_entries());
}

/// Without a usable driver, `--backend cuda` is one clear line and no output file.
#[test]
fn cuda_backend_without_a_driver_is_one_line() {
    if fused_infonce::cuda::driver_present() {
        eprintln!("cuda_backend_without_a_driver_is_one_line: a CUDA driver is present here");
        return;
    }
    let p = problem::<f32>(Mode::Queue, 4, 16, 8, 90);
    let s = Scratch::new(&p.file());
    let o = s.eval(&["--backend", "cuda", "--normalize", "--temperature", "0.1"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("infonce: error: ") && err.contains("driver"),
        "{err}"
    );
    assert!(!s.output.exists());
    assert!(s.out_dir_entries().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Golden cases through the command line.

fn golden_dir() -> PathBuf {
    std::env::var_os("FUSED_INFONCE_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden"))
}

fn read_f64(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f64>) {
    let t = st.tensor(name).expect("tensor");
    assert_eq!(t.dtype(), Dtype::F64, "golden `{name}` is f64");
    let v = t
        .data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    (t.shape().to_vec(), v)
}

#[test]
fn golden_cases_through_the_cli() {
    let dir = golden_dir();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("parse manifest");
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8);
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let flags: Vec<String> = case["eval_args"]
            .as_array()
            .expect("eval_args")
            .iter()
            .map(|a| a.as_str().expect("flag").to_string())
            .collect();
        let out_dir = tempfile::tempdir().expect("tempdir");
        let out = out_dir.path().join("out.safetensors");
        let mut args: Vec<String> = vec![
            "eval".into(),
            "--input".into(),
            dir.join(file).display().to_string(),
            "--output".into(),
            out.display().to_string(),
        ];
        args.extend(flags.iter().cloned());
        let o = run(&args);
        assert!(o.status.success(), "{file}: {}", stderr(&o));
        let got = read_output(&out);

        let bytes = std::fs::read(dir.join(file)).expect("golden file");
        let st = SafeTensors::deserialize(&bytes).expect("golden safetensors");
        let mut want = Tensors::new();
        for name in st.names() {
            if let Some(output) = name.strip_prefix("expected_") {
                want.insert(output.to_string(), read_f64(&st, name));
            }
        }
        assert!(want.contains_key("loss"), "{file}: expected_loss");
        // Every expected output is written, and nothing beyond them but the LSEs.
        let extra: Vec<&str> = got
            .keys()
            .map(String::as_str)
            .filter(|n| !want.contains_key(*n))
            .collect();
        assert!(
            extra.iter().all(|n| *n == "lse" || *n == "lse_cols"),
            "{file}: unexpected outputs {extra:?}"
        );
        let got: Tensors = got
            .into_iter()
            .filter(|(n, _)| want.contains_key(n))
            .collect();
        // The reference agrees with the golden values to 1e-9; the outputs are f32.
        assert_close(file, &got, &want, 1e-6);
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input: non-zero exit, one line on stderr naming the culprit, no output file.

fn assert_fails(s: &Scratch, flags: &[&str], culprits: &[&str]) {
    let o = s.eval(flags);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "{flags:?} {culprits:?}: expected a failure, got success: {}",
        stdout(&o)
    );
    assert_eq!(
        err.lines().count(),
        1,
        "{flags:?}: exactly one line on stderr, got: {err}"
    );
    assert!(err.starts_with("infonce: error: "), "{err}");
    for c in culprits {
        assert!(err.contains(c), "{flags:?}: `{c}` not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!s.output.exists(), "{flags:?}: an output file was written");
    assert!(
        s.out_dir_entries().is_empty(),
        "{flags:?}: files left behind: {:?}",
        s.out_dir_entries()
    );
}

/// A flag clap rejects: non-zero exit, no output.
fn assert_usage_error(s: &Scratch, flags: &[&str]) {
    let o = s.eval(flags);
    assert!(!o.status.success(), "{flags:?}: expected a usage error");
    assert!(!stderr(&o).is_empty());
    assert!(!stderr(&o).contains("panicked"));
    assert!(s.out_dir_entries().is_empty(), "{flags:?}: output written");
}

fn queue_file() -> Vec<In> {
    problem::<f32>(Mode::Queue, 3, 5, 4, 100).file()
}

fn without(mut v: Vec<In>, name: &str) -> Vec<In> {
    v.retain(|t| t.name != name);
    v
}

fn replace(mut v: Vec<In>, t: In) -> Vec<In> {
    v.retain(|x| x.name != t.name);
    v.push(t);
    v
}

#[test]
fn missing_tensors() {
    let s = Scratch::new(&without(queue_file(), "queue"));
    assert_fails(&s, &[], &["`queue`", "missing"]);
    let s = Scratch::new(&without(queue_file(), "positive"));
    assert_fails(&s, &[], &["`positive`"]);
    // The file is for queue mode; symmetric needs `key`.
    let s = Scratch::new(&queue_file());
    assert_fails(&s, &["--mode", "symmetric"], &["`key`"]);
    assert_fails(&s, &["--mode", "inbatch"], &["`embeddings`"]);
    let s = Scratch::new(&[]);
    assert_fails(&s, &[], &["`query`"]);
}

#[test]
fn shape_mismatches() {
    // Positive with fewer rows than query.
    let v = vec![0.5f32; 2 * 4];
    let s = Scratch::new(&replace(queue_file(), In::f32("positive", vec![2, 4], &v)));
    assert_fails(&s, &[], &["`positive`", "[2, 4]"]);
    // Queue with another D.
    let v = vec![0.5f32; 5 * 3];
    let s = Scratch::new(&replace(queue_file(), In::f32("queue", vec![5, 3], &v)));
    assert_fails(&s, &[], &["`queue`"]);
    // Not 2-D: a vector and a 3-D tensor.
    let v = vec![0.5f32; 12];
    let s = Scratch::new(&replace(queue_file(), In::f32("query", vec![12], &v)));
    assert_fails(&s, &[], &["`query`", "2-D"]);
    let s = Scratch::new(&replace(queue_file(), In::f32("query", vec![3, 2, 2], &v)));
    assert_fails(&s, &[], &["`query`", "[3, 2, 2]"]);
    // In-batch with an odd number of rows.
    let v = vec![0.5f32; 5 * 4];
    let s = Scratch::new(&[In::f32("embeddings", vec![5, 4], &v)]);
    assert_fails(&s, &["--mode", "inbatch"], &["`embeddings`"]);
    // Symmetric with different row counts.
    let mut p = problem::<f32>(Mode::Cross, 3, 4, 4, 101);
    let s = Scratch::new(&p.file());
    assert_fails(&s, &["--mode", "symmetric"], &["`key`"]);
    // Cross with fewer keys than queries and default targets.
    p = problem::<f32>(Mode::Cross, 4, 3, 4, 102);
    let s = Scratch::new(&p.file());
    assert_fails(&s, &["--mode", "cross"], &["`key`"]);
    // Targets: wrong length, out of range, wrong dtype, wrong rank.
    let mut p = problem::<f32>(Mode::Cross, 3, 4, 4, 103);
    p.targets = Some(Targets::I64(vec![0, 1]));
    assert_fails(&Scratch::new(&p.file()), &["--mode", "cross"], &["targets"]);
    p.targets = Some(Targets::I32(vec![0, 4, 1]));
    assert_fails(
        &Scratch::new(&p.file()),
        &["--mode", "cross"],
        &["targets[1]"],
    );
    p.targets = Some(Targets::I64(vec![0, -1, 1]));
    assert_fails(
        &Scratch::new(&p.file()),
        &["--mode", "cross"],
        &["targets[1]"],
    );
    p.targets = None;
    let mut f = p.file();
    f.push(In::f32("targets", vec![3], &[0.0, 1.0, 2.0]));
    assert_fails(
        &Scratch::new(&f),
        &["--mode", "cross"],
        &["`targets`", "f32"],
    );
    let mut f = p.file();
    f.push(In::new(
        "targets",
        Dtype::I64,
        vec![3, 1],
        bytemuck::cast_slice(&[0i64, 1, 2]).to_vec(),
    ));
    assert_fails(&Scratch::new(&f), &["--mode", "cross"], &["`targets`"]);
}

#[test]
fn unreadable_dtypes() {
    // f64, i32 and u8 embeddings.
    let f64s = vec![0.25f64; 3 * 4];
    let s = Scratch::new(&replace(
        queue_file(),
        In::new(
            "query",
            Dtype::F64,
            vec![3, 4],
            bytemuck::cast_slice(&f64s).to_vec(),
        ),
    ));
    assert_fails(&s, &[], &["`query`", "f64"]);
    let s = Scratch::new(&replace(
        queue_file(),
        In::new("queue", Dtype::I32, vec![5, 4], vec![0u8; 5 * 4 * 4]),
    ));
    assert_fails(&s, &[], &["`queue`", "i32"]);
    let s = Scratch::new(&[In::new("embeddings", Dtype::U8, vec![4, 2], vec![1u8; 8])]);
    assert_fails(&s, &["--mode", "inbatch"], &["`embeddings`", "u8"]);
    // Mixed dtypes: query f32, positive f16.
    let p16 = problem::<f16>(Mode::Queue, 3, 5, 4, 104);
    let positive = p16.file().into_iter().find(|t| t.name == "positive");
    let s = Scratch::new(&replace(queue_file(), positive.expect("positive")));
    assert_fails(&s, &[], &["`positive`", "f16", "f32"]);
}

#[test]
fn bad_parameters() {
    let s = Scratch::new(&queue_file());
    for t in ["0", "-1", "-0.5", "nan", "inf", "-inf"] {
        assert_fails(&s, &["--temperature", t], &["temperature"]);
    }
    assert_fails(
        &s,
        &["--temperature", "0", "--learnable-temperature"],
        &["temperature"],
    );
    assert_fails(&s, &["--variant", "hard:0"], &["hard", "0"]);
    assert_fails(&s, &["--variant", "hard:x"], &["--variant", "hard:x"]);
    assert_fails(&s, &["--variant", "hard"], &["--variant"]);
    assert_fails(&s, &["--variant", "soft"], &["--variant", "soft"]);
    assert_fails(&s, &["--variant", "simple:abc"], &["--variant"]);
    assert_fails(&s, &["--variant", "simple:nan"], &["lambda"]);
    assert_fails(&s, &["--dystress", "0.1"], &["--dystress"]);
    assert_fails(&s, &["--dystress", "a,b"], &["--dystress"]);
    assert_fails(&s, &["--dystress", "0.2,0.1"], &["tau_max"]);
    assert_fails(&s, &["--dystress", "-0.1,0.2"], &["tau_min"]);
    assert_fails(&s, &["--dystress", "0,0.2"], &["tau_min"]);
    // Clap's own errors: non-zero exit and no output suffice.
    assert_usage_error(&s, &["--mode", "pairs"]);
    assert_usage_error(&s, &["--reduction", "max"]);
    assert_usage_error(&s, &["--backend", "tpu"]);
    assert_usage_error(&s, &["--temperature", "warm"]);
    assert_usage_error(&s, &["--dystress-grad", "full"]); // needs --dystress
    assert_usage_error(&s, &["--dystress-grad", "half", "--dystress", "0.1,0.2"]);
    assert_usage_error(&s, &["--dystress", "0.1,0.2", "--learnable-temperature"]);
    assert_usage_error(&s, &["--dystress", "0.1,0.2", "--temperature", "0.1"]);
    assert_usage_error(&s, &["--no-such-flag"]);
    // Decoupled with an empty queue has no negatives.
    let v: Vec<f32> = vec![];
    let s = Scratch::new(&replace(queue_file(), In::f32("queue", vec![0, 4], &v)));
    assert_fails(&s, &["--variant", "decoupled"], &["decoupled"]);
}

#[test]
fn bad_upstream() {
    let mut p = problem::<f32>(Mode::Queue, 3, 5, 4, 105);
    // Per-anchor weights need reduction none; none needs one weight per anchor.
    p.upstream = Some((vec![3], vec![1.0, 2.0, 3.0]));
    assert_fails(&Scratch::new(&p.file()), &[], &["upstream"]);
    p.upstream = Some((vec![2], vec![1.0, 2.0]));
    assert_fails(
        &Scratch::new(&p.file()),
        &["--reduction", "none"],
        &["upstream"],
    );
    p.upstream = Some((vec![], vec![1.0]));
    assert_fails(
        &Scratch::new(&p.file()),
        &["--reduction", "none"],
        &["upstream"],
    );
    p.upstream = Some((vec![], vec![f32::NAN]));
    assert_fails(&Scratch::new(&p.file()), &[], &["upstream"]);
    p.upstream = Some((vec![3], vec![1.0, f32::INFINITY, 3.0]));
    assert_fails(
        &Scratch::new(&p.file()),
        &["--reduction", "none"],
        &["upstream", "row 1"],
    );
    p.upstream = Some((vec![1, 3], vec![1.0, 2.0, 3.0]));
    assert_fails(
        &Scratch::new(&p.file()),
        &["--reduction", "none"],
        &["`upstream`"],
    );
    // Not f32.
    p.upstream = None;
    let mut f = p.file();
    f.push(In::new(
        "upstream",
        Dtype::F64,
        vec![],
        2.0f64.to_le_bytes().to_vec(),
    ));
    assert_fails(&Scratch::new(&f), &[], &["`upstream`", "f64"]);
}

#[test]
fn nonfinite_inputs_name_tensor_row_and_column() {
    for (tensor, idx, value, row, col) in [
        ("query", 0usize, f32::NAN, 0usize, 0usize),
        ("positive", 2 * 4 + 3, f32::INFINITY, 2, 3),
        ("queue", 4 * 4 + 1, f32::NEG_INFINITY, 4, 1),
    ] {
        let mut p = problem::<f32>(Mode::Queue, 3, 5, 4, 106);
        let m = p.mats.iter_mut().find(|m| m.0 == tensor).expect("tensor");
        m.1[idx] = value;
        let s = Scratch::new(&p.file());
        let r = format!("row {row}");
        let c = format!("column {col}");
        assert_fails(&s, &[], &[tensor, &r, &c]);
    }
    // In bf16 too.
    let mut p = problem::<bf16>(Mode::InBatch, 2, 0, 3, 107);
    p.mats[0].1[3 * 3 + 2] = bf16::NAN;
    let s = Scratch::new(&p.file());
    assert_fails(
        &s,
        &["--mode", "inbatch"],
        &["embeddings", "row 3", "column 2"],
    );
}

#[test]
fn missing_or_unreadable_input_file() {
    let s = Scratch::new(&queue_file());
    let dir = s.input.parent().expect("dir").to_path_buf();
    let missing = dir.join("nope.safetensors");
    let o = run(&[
        "eval",
        "--input",
        missing.to_str().expect("utf-8"),
        "--output",
        s.output.to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nope.safetensors"), "{err}");
    assert!(s.out_dir_entries().is_empty());

    // Not a safetensors file.
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").expect("write");
    let o = run(&[
        "eval",
        "--input",
        garbage.to_str().expect("utf-8"),
        "--output",
        s.output.to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("garbage.safetensors"), "{err}");
    assert!(s.out_dir_entries().is_empty());
}

#[test]
fn unwritable_output_leaves_nothing() {
    let s = Scratch::new(&queue_file());
    let bad = s.out_dir.join("no-such-dir").join("out.safetensors");
    let o = run(&[
        "eval",
        "--input",
        s.input.to_str().expect("utf-8"),
        "--output",
        bad.to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no-such-dir"), "{err}");
    assert!(s.out_dir_entries().is_empty());
    // The output path is a directory: the rename fails, the temporary file is removed.
    let o = run(&[
        "eval",
        "--input",
        s.input.to_str().expect("utf-8"),
        "--output",
        s.out_dir.to_str().expect("utf-8"),
    ]);
    assert!(!o.status.success());
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    let parent = s.out_dir.parent().expect("parent");
    let leftovers: Vec<String> = std::fs::read_dir(parent)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn an_error_keeps_an_existing_output_file() {
    let s = Scratch::new(&queue_file());
    std::fs::write(&s.output, b"previous").expect("write");
    let o = s.eval(&["--temperature", "0"]);
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&s.output).expect("read"), b"previous");
}

#[test]
fn empty_queue_is_the_zero_loss() {
    let mut p = problem::<f32>(Mode::Queue, 3, 0, 4, 110);
    p.mats[2] = ("queue", vec![], 0, 4);
    let sp = spec(Mode::Queue).build().expect("spec");
    let got = p.check("empty queue", &sp, &[]);
    assert_eq!(got["loss"].1, vec![0.0]);
    assert_eq!(got["grad_queue"].0, vec![0, 4]);
}

#[test]
fn summary_reports_the_loss() {
    let p = problem::<f32>(Mode::Queue, 3, 5, 4, 111);
    let s = Scratch::new(&p.file());
    let o = s.eval(&["--temperature", "0.3"]);
    assert_success("summary", &o, &s);
    let sp = spec(Mode::Queue).temperature(0.3).build().expect("spec");
    let loss = p.reference(&sp).loss.scalar().expect("scalar");
    let out = stdout(&o);
    let printed: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("loss = "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `loss = ` line in {out}"));
    assert!(
        (printed - loss).abs() <= 1e-8 * loss.abs(),
        "summary says {printed}, the loss is {loss}"
    );
}

// ---------------------------------------------------------------------------------------------
// The library side: fused_infonce::io.

mod io_api {
    use super::*;
    use fused_infonce::io::{output_tensors, write_f32, OutputTensor, TensorFile};
    use fused_infonce::Error;

    #[test]
    fn reads_typed_tensors() {
        let q: Vec<f16> = [1.0, -2.0, 0.5, 4.0, 0.25, -1.5]
            .iter()
            .map(|&x| f16::from_f64(x))
            .collect();
        let s = Scratch::new(&[
            In::new(
                "query",
                Dtype::F16,
                vec![2, 3],
                bytemuck::cast_slice(&q).to_vec(),
            ),
            In::new(
                "targets",
                Dtype::I32,
                vec![2],
                bytemuck::cast_slice(&[7i32, -3]).to_vec(),
            ),
            In::f32("up_scalar", vec![], &[2.0]),
            In::f32("up_vector", vec![2], &[1.0, 3.0]),
        ]);
        let f = TensorFile::read(&s.input).expect("read");
        assert_eq!(
            f.names().collect::<Vec<_>>(),
            ["query", "targets", "up_scalar", "up_vector"]
        );
        assert_eq!(
            f.float_dtype("query").expect("dtype"),
            fused_infonce::DType::F16
        );
        let m = f.matrix::<f16>("query").expect("matrix");
        assert_eq!((m.rows(), m.cols()), (2, 3));
        assert_eq!(m.view().expect("view").get(1, 2), -1.5);
        assert!(matches!(f.matrix::<f32>("query"), Err(Error::Input(_))));
        assert_eq!(f.targets("targets").expect("targets"), vec![7i64, -3]);
        assert_eq!(f.upstream("up_scalar").expect("up"), Upstream::Scalar(2.0));
        assert_eq!(
            f.upstream("up_vector").expect("up"),
            Upstream::PerAnchor(vec![1.0, 3.0])
        );
        let e = f.matrix::<f32>("nope").expect_err("missing");
        assert!(e.to_string().contains("`nope`"), "{e}");
        assert!(matches!(f.targets("query"), Err(Error::Shape { .. })));
    }

    #[test]
    fn writes_atomically_and_checks_shapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("o.safetensors");
        let bad = [OutputTensor::new("x", vec![2, 2], vec![1.0; 3])];
        assert!(matches!(write_f32(&path, &bad), Err(Error::Shape { .. })));
        let dup = [
            OutputTensor::scalar("x", 1.0),
            OutputTensor::scalar("x", 2.0),
        ];
        assert!(write_f32(&path, &dup).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
        let ok = [
            OutputTensor::scalar("loss", 0.5),
            OutputTensor::vector("lse", &[1.0, 2.0]),
        ];
        write_f32(&path, &ok).expect("write");
        let got = read_output(&path);
        assert_eq!(got["loss"], (vec![], vec![0.5]));
        assert_eq!(got["lse"], (vec![2], vec![1.0, 2.0]));
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    }

    #[test]
    fn output_names_follow_the_contract() {
        let p = problem::<f32>(Mode::Symmetric, 3, 0, 4, 120);
        let sp = spec(Mode::Symmetric)
            .learnable_temperature(0.1)
            .reduction(Reduction::None)
            .build()
            .expect("spec");
        let out = p.reference(&sp);
        let names: Vec<String> = output_tensors(&out).into_iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            [
                "loss_rows",
                "loss_cols",
                "lse",
                "lse_cols",
                "grad_query",
                "grad_key",
                "grad_temperature"
            ]
        );
    }
}
