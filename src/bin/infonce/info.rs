//! `infonce info` (see spec/cli.md).

/// Arguments of `infonce info`.
#[derive(Debug, Default, clap::Args)]
pub struct Args {
    /// Also print the ptxas resource report (registers, spills, shared memory per kernel).
    #[arg(long)]
    pub verbose: bool,
}

/// Runs `infonce info`.
pub fn run(_args: &Args) -> fused_infonce::Result<()> {
    Ok(())
}
