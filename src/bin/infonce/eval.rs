//! `infonce eval` (see spec/cli.md).

/// Arguments of `infonce eval`.
#[derive(Debug, Default, clap::Args)]
pub struct Args {}

/// Runs `infonce eval`.
pub fn run(_args: &Args) -> fused_infonce::Result<()> {
    Err(fused_infonce::Error::Unsupported(
        "`infonce eval` is not implemented yet".into(),
    ))
}
