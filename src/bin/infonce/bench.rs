//! `infonce bench` (see spec/cli.md).

/// Arguments of `infonce bench`.
#[derive(Debug, Default, clap::Args)]
pub struct Args {}

/// Runs `infonce bench`.
pub fn run(_args: &Args) -> fused_infonce::Result<()> {
    Err(fused_infonce::Error::Unsupported(
        "`infonce bench` is not implemented yet".into(),
    ))
}

/// The benchmarks that fit this machine (no-argument run).
pub fn run_default() -> fused_infonce::Result<()> {
    println!("bench: not implemented yet");
    Ok(())
}
