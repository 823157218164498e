//! `infonce`: evaluate, check, benchmark and explore the contrastive loss family
//! (see spec/cli.md for the interface contract).

mod bar;
mod bench;
mod eval;
mod info;
mod sweep;

use clap::{Parser, Subcommand};

/// Fused contrastive (InfoNCE) losses: evaluate, check against the CPU reference, benchmark,
/// and sweep the temperature.
#[derive(Debug, Parser)]
#[command(name = "infonce", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// What was built (kernels, architectures, nvcc) and what is present (driver, devices).
    Info(info::Args),
    /// Evaluate a loss on tensors from a safetensors file; write loss, LSE and gradients.
    Eval(eval::Args),
    /// Benchmark the fused kernels against the unfused pipeline.
    Bench(bench::Args),
    /// Sweep the temperature: loss, gradient picture, metrics, plots.
    Sweep(sweep::Args),
}

fn main() {
    let cli = Cli::parse();
    // FUSED_INFONCE_EMULATED_CUDA=<dir> runs the CUDA backend on the emulated device (built by
    // scripts/emulated-cuda) where no real driver is present.
    if let Err(e) = fused_infonce::cuda::emulated::load_from_env() {
        eprintln!("infonce: error: {e}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Some(Command::Info(a)) => info::run(&a),
        Some(Command::Eval(a)) => eval::run(&a),
        Some(Command::Bench(a)) => bench::run(&a),
        Some(Command::Sweep(a)) => sweep::run(&a),
        None => run_all(),
    };
    if let Err(e) = result {
        // One line on stderr, whatever the message holds.
        eprintln!("infonce: error: {}", e.to_string().replace('\n', " "));
        std::process::exit(1);
    }
}

/// No subcommand (what `cargo run --release` runs): `info`, then the benchmarks that fit the
/// machine, then a short sweep on the built-in data.
fn run_all() -> fused_infonce::Result<()> {
    info::run(&info::Args::default())?;
    println!();
    bench::run_default()?;
    println!();
    sweep::run_default()
}
