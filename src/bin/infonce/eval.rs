//! `infonce eval` (see spec/cli.md): evaluate one loss on tensors read from a safetensors file
//! and write the loss, the per-anchor LSEs and every gradient to another.
//!
//! The input matrices are read in their stored dtype (f32, f16 or bf16) and evaluated by one
//! generic function ([`evaluate_as`]), on the CPU reference or the CUDA backend. Every error is one
//! line naming the tensor or parameter at fault, and no output file is written on error.

use clap::ValueEnum;
use fused_infonce::io::{output_tensors, write_f32, OwnedMatrix, TensorFile};
use fused_infonce::{
    bf16, cpu, cuda, f16, reference, DType, DystressGrad, Element, Error, LossInputs, LossOutput,
    LossSpec, LossValue, Mode, Reduction, Result, Upstream, Variant,
};
use std::path::PathBuf;

/// Arguments of `infonce eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The input safetensors file (tensor names and shapes by mode: see spec/cli.md).
    #[arg(long, value_name = "IN.safetensors")]
    pub input: PathBuf,
    /// Where to write the results (f32): loss, lse, grad_<input>, grad_temperature.
    #[arg(long, value_name = "OUT.safetensors")]
    pub output: PathBuf,
    /// Which implementation evaluates the loss.
    #[arg(long, value_enum, default_value_t = BackendArg::Reference)]
    pub backend: BackendArg,
    /// Where positives and negatives come from: queue (query, positive, queue), inbatch
    /// (embeddings), cross (query, key, optional targets), symmetric (query, key).
    #[arg(long, value_enum, default_value_t = ModeArg::Queue)]
    pub mode: ModeArg,
    /// The temperature τ (> 0); the initial value with --learnable-temperature. Default 0.07.
    #[arg(
        long,
        value_name = "T",
        allow_hyphen_values = true,
        conflicts_with = "dystress"
    )]
    pub temperature: Option<f64>,
    /// Treat τ as learnable: also write grad_temperature (dL/dτ).
    #[arg(long, conflicts_with = "dystress")]
    pub learnable_temperature: bool,
    /// DySTreSS temperature τ(s) between TMIN (at s = 0) and TMAX (at s = ±1).
    #[arg(long, value_name = "TMIN,TMAX", allow_hyphen_values = true)]
    pub dystress: Option<String>,
    /// Gradient through the DySTreSS temperature (default detach).
    #[arg(long, value_enum, requires = "dystress")]
    pub dystress_grad: Option<DystressGradArg>,
    /// The loss variant: standard, decoupled, hard:K (the K hardest negatives), simple, or
    /// simple:LAMBDA (simple's default λ is 1/#negatives).
    #[arg(
        long,
        value_name = "standard|decoupled|hard:K|simple[:LAMBDA]",
        default_value = "standard"
    )]
    pub variant: String,
    /// L2-normalise every row first (gradients are still with respect to the rows as given).
    #[arg(long)]
    pub normalize: bool,
    /// How per-anchor losses are reduced.
    #[arg(long, value_enum, default_value_t = ReductionArg::Mean)]
    pub reduction: ReductionArg,
    /// Let NaN and infinity in the inputs through (they propagate to the outputs as in PyTorch)
    /// instead of rejecting them.
    #[arg(long)]
    pub allow_nonfinite: bool,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The f64 oracle (exact, slow by design).
    Reference,
    /// The fast fused CPU path (f32 arithmetic, multi-threaded).
    Cpu,
    /// The fused CUDA kernels (needs a GPU).
    Cuda,
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// MoCo: query, positive, queue.
    Queue,
    /// SimCLR NT-Xent: embeddings (2N rows; a and a+N are a pair).
    Inbatch,
    /// One-directional: query against key, optional targets.
    Cross,
    /// CLIP: query and key, rows and columns.
    Symmetric,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Queue => Mode::Queue,
            ModeArg::Inbatch => Mode::InBatch,
            ModeArg::Cross => Mode::Cross,
            ModeArg::Symmetric => Mode::Symmetric,
        }
    }
}

/// `--dystress-grad`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DystressGradArg {
    /// ∂z/∂s = 1/τ(s) (the authors' code).
    Detach,
    /// Also differentiate through τ(s).
    Full,
}

/// `--reduction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReductionArg {
    /// Mean over anchors.
    Mean,
    /// Sum over anchors.
    Sum,
    /// Per-anchor losses (symmetric: rows and columns).
    None,
}

impl From<ReductionArg> for Reduction {
    fn from(r: ReductionArg) -> Reduction {
        match r {
            ReductionArg::Mean => Reduction::Mean,
            ReductionArg::Sum => Reduction::Sum,
            ReductionArg::None => Reduction::None,
        }
    }
}

/// The τ used when `--temperature` is not given.
const DEFAULT_TEMPERATURE: f64 = 0.07;

/// Parses `--variant`: `standard`, `decoupled`, `hard:K`, `simple` or `simple:LAMBDA`.
/// Ranges (K ≥ 1, λ finite) are checked by [`LossSpec`]'s builder.
fn parse_variant(v: &str) -> Result<Variant> {
    let bad = |why: &str| {
        Error::parameter(
            "--variant",
            v,
            format!("{why}; expected standard, decoupled, hard:K or simple[:LAMBDA]"),
        )
    };
    match v.split_once(':') {
        None => match v {
            "standard" => Ok(Variant::Standard),
            "decoupled" => Ok(Variant::Decoupled),
            "simple" => Ok(Variant::Simple {
                lambda: None,
                hard_k: None,
            }),
            "hard" => Err(bad("hard needs K")),
            _ => Err(bad("unknown variant")),
        },
        Some(("hard", k)) => k
            .trim()
            .parse::<usize>()
            .map(|k| Variant::Hard { k })
            .map_err(|_| bad("K must be a non-negative integer")),
        Some(("simple", l)) => l
            .trim()
            .parse::<f64>()
            .map(|l| Variant::Simple {
                lambda: Some(l),
                hard_k: None,
            })
            .map_err(|_| bad("LAMBDA must be a number")),
        Some(_) => Err(bad("unknown variant")),
    }
}

/// Parses `--dystress TMIN,TMAX`; ranges are checked by [`LossSpec`]'s builder.
fn parse_dystress(v: &str) -> Result<(f64, f64)> {
    let bad = || Error::parameter("--dystress", v, "expected TMIN,TMAX, e.g. 0.07,0.2");
    let (a, b) = v.split_once(',').ok_or_else(bad)?;
    let a = a.trim().parse::<f64>().map_err(|_| bad())?;
    let b = b.trim().parse::<f64>().map_err(|_| bad())?;
    Ok((a, b))
}

/// The validated spec the flags describe (queue mode always computes `grad_queue`).
fn spec_from_args(args: &Args) -> Result<LossSpec> {
    let mode = Mode::from(args.mode);
    let mut b = LossSpec::builder(mode)
        .variant(parse_variant(&args.variant)?)
        .reduction(args.reduction.into())
        .normalize(args.normalize)
        .grad_queue(mode == Mode::Queue);
    let tau = args.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    b = match (&args.dystress, args.learnable_temperature) {
        (Some(d), _) => {
            let (lo, hi) = parse_dystress(d)?;
            let grad = match args.dystress_grad {
                Some(DystressGradArg::Full) => DystressGrad::Full,
                Some(DystressGradArg::Detach) | None => DystressGrad::Detach,
            };
            b.dystress(lo, hi, grad)
        }
        (None, true) => b.learnable_temperature(tau),
        (None, false) => b.temperature(tau),
    };
    b.build()
}

/// The input matrices of `mode`, in the order of [`LossInputs::matrices`].
fn input_names(mode: Mode) -> &'static [&'static str] {
    match mode {
        Mode::Queue => &["query", "positive", "queue"],
        Mode::InBatch => &["embeddings"],
        Mode::Cross | Mode::Symmetric => &["query", "key"],
    }
}

/// The upstream gradient: the `upstream` tensor if the file has one, else 1.
///
/// A one-element vector counts as a scalar under `mean` and `sum`. Unless non-finite values are
/// allowed, every weight must be finite.
fn read_upstream(file: &TensorFile, spec: &LossSpec, allow_nonfinite: bool) -> Result<Upstream> {
    if !file.contains("upstream") {
        return Ok(Upstream::One);
    }
    let up = match file.upstream("upstream")? {
        Upstream::PerAnchor(w) if w.len() == 1 && spec.reduction() != Reduction::None => {
            Upstream::Scalar(w[0])
        }
        u => u,
    };
    if !allow_nonfinite {
        let values = match &up {
            Upstream::Scalar(g) => vec![*g],
            Upstream::PerAnchor(w) => w.clone(),
            Upstream::One => vec![],
        };
        if let Some((i, &g)) = values.iter().enumerate().find(|(_, g)| !g.is_finite()) {
            return Err(Error::NonFinite {
                tensor: "upstream".into(),
                row: i,
                col: 0,
                value: g,
            });
        }
    }
    Ok(up)
}

/// Reads the inputs of `spec`'s mode as `T`, checks them, and evaluates on `backend`: the one
/// code path for every dtype.
fn evaluate_as<T: Element>(
    file: &TensorFile,
    spec: &LossSpec,
    upstream: &Upstream,
    args: &Args,
) -> Result<LossOutput> {
    let owned: Vec<OwnedMatrix<T>> = input_names(spec.mode())
        .iter()
        .map(|n| file.matrix::<T>(n))
        .collect::<Result<_>>()?;
    let m = owned
        .iter()
        .map(OwnedMatrix::view)
        .collect::<Result<Vec<_>>>()?;
    let targets = match spec.mode() {
        Mode::Cross if file.contains("targets") => Some(file.targets("targets")?),
        _ => None,
    };
    let inputs = LossInputs::from_matrices(spec.mode(), &m, targets.as_deref())?;
    inputs.validate(spec)?;
    if !args.allow_nonfinite {
        for x in &m {
            x.check_finite()?;
        }
    }
    match args.backend {
        BackendArg::Reference => reference::evaluate(spec, &inputs, upstream),
        BackendArg::Cpu => cpu::evaluate(spec, &inputs, upstream),
        BackendArg::Cuda => cuda::evaluate(spec, &inputs, upstream),
    }
}

/// Runs `infonce eval`.
pub fn run(args: &Args) -> Result<()> {
    let spec = spec_from_args(args)?;
    let file = TensorFile::read(&args.input)?;
    let names = input_names(spec.mode());
    // Every missing input is reported before any is read.
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !file.contains(n))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Input(format!(
            "missing tensor{} {} in {} ({} mode needs {}; the file has {})",
            if missing.len() > 1 { "s" } else { "" },
            missing
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", "),
            file.source(),
            spec.mode().name(),
            names.join(", "),
            file.names_list()
        )));
    }
    let dtype = file.float_dtype(names[0])?;
    for &n in &names[1..] {
        let d = file.float_dtype(n)?;
        if d != dtype {
            return Err(Error::Input(format!(
                "tensor `{n}` has dtype {d} but `{}` has {dtype}; every input matrix must have the same dtype",
                names[0]
            )));
        }
    }
    let upstream = read_upstream(&file, &spec, args.allow_nonfinite)?;
    let output = match dtype {
        DType::F32 => evaluate_as::<f32>(&file, &spec, &upstream, args)?,
        DType::F16 => evaluate_as::<f16>(&file, &spec, &upstream, args)?,
        DType::BF16 => evaluate_as::<bf16>(&file, &spec, &upstream, args)?,
        DType::F64 => {
            return Err(Error::Input(format!(
                "tensor `{}` has dtype f64, which cannot be read as embeddings (expected f32, f16 or bf16)",
                names[0]
            )))
        }
    };
    let tensors = output_tensors(&output);
    write_f32(&args.output, &tensors)?;

    let shapes: Vec<String> = names
        .iter()
        .map(|n| {
            let s = file.shape(n).unwrap_or(&[]);
            format!(
                "{n} {}",
                s.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x")
            )
        })
        .collect();
    println!(
        "infonce eval: {} mode, {} variant, {} reduction, {dtype} inputs ({}), {} backend",
        spec.mode().name(),
        args.variant,
        args.reduction
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        shapes.join(", "),
        match args.backend {
            BackendArg::Reference => "reference",
            BackendArg::Cpu => "cpu",
            BackendArg::Cuda => "cuda",
        }
    );
    match &output.loss {
        LossValue::Scalar(x) => println!("loss = {x:.9}"),
        LossValue::PerAnchor(l) => {
            println!("loss = {} per-anchor values, mean {:.9}", l.len(), mean(l))
        }
        LossValue::Symmetric { rows, cols } => println!(
            "loss = {} row and {} column values, ½(mean rows + mean cols) = {:.9}",
            rows.len(),
            cols.len(),
            0.5 * (mean(rows) + mean(cols))
        ),
    }
    if let Some(t) = output.grad_temperature {
        println!("dL/dτ = {t:.9}");
    }
    println!(
        "wrote {}: {}",
        args.output.display(),
        tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
