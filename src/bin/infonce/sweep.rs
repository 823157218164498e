//! `infonce sweep` (see spec/cli.md).

/// Arguments of `infonce sweep`.
#[derive(Debug, Default, clap::Args)]
pub struct Args {}

/// Runs `infonce sweep`.
pub fn run(_args: &Args) -> fused_infonce::Result<()> {
    Err(fused_infonce::Error::Unsupported(
        "`infonce sweep` is not implemented yet".into(),
    ))
}

/// A short sweep on the built-in data (no-argument run).
pub fn run_default() -> fused_infonce::Result<()> {
    println!("sweep: not implemented yet");
    Ok(())
}
