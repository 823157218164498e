//! `infonce info` (see spec/cli.md): what was built and what is present.
//!
//! A machine without a GPU is a normal answer: the command exits 0 either way.

use fused_infonce::cuda::module::{self, ImageKind};
use fused_infonce::cuda::{self as cuda};

/// Arguments of `infonce info`.
#[derive(Debug, Default, clap::Args)]
pub struct Args {
    /// Also print the ptxas resource report (registers, spills, shared memory per kernel).
    #[arg(long)]
    pub verbose: bool,
}

/// Runs `infonce info`.
pub fn run(args: &Args) -> fused_infonce::Result<()> {
    println!("fused-infonce {}", env!("CARGO_PKG_VERSION"));
    println!("build:");
    if module::kernels_built() {
        let names: Vec<&str> = module::MODULES.iter().map(|(n, _)| *n).collect();
        println!(
            "  kernels:      embedded ({} modules: {})",
            names.len(),
            names.join(", ")
        );
    } else {
        println!("  kernels:      not embedded (GPU calls return a 'kernels not built' error)");
    }
    println!("  nvcc:         {}", module::NVCC_VERSION);
    println!("  targets:      {}", module::TARGET_ARCHS.join(", "));
    let images = module::embedded_images();
    let list = |kind: ImageKind, prefix: &str| -> String {
        let v: Vec<String> = images
            .iter()
            .filter(|i| i.kind == kind)
            .map(|i| format!("{prefix}{}", i.arch))
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    };
    println!("  machine code: {}", list(ImageKind::Sass, "sm_"));
    println!("  PTX:          {}", list(ImageKind::Ptx, "compute_"));

    println!("machine:");
    if !cuda::driver_present() {
        println!(
            "  CUDA driver:  not found ({})",
            fused_infonce::Error::NoCudaDriver
        );
        println!(
            "  devices:      none (the CPU backend works; GPU commands report no CUDA driver)"
        );
    } else {
        match cuda::driver_version() {
            Ok((maj, min)) => println!("  CUDA driver:  found, CUDA {maj}.{min}"),
            Err(e) => println!("  CUDA driver:  found, version unknown ({e})"),
        }
        match cuda::list_devices() {
            Ok(devs) if devs.is_empty() => println!("  devices:      none"),
            Ok(devs) => {
                for d in devs {
                    let (maj, min) = d.compute_capability;
                    let cc = maj as u32 * 10 + min as u32;
                    let runs = images.iter().any(|i| match i.kind {
                        ImageKind::Sass => i.arch == cc,
                        ImageKind::Ptx => i.arch <= cc,
                    });
                    println!(
                        "  device {}:     {}, compute capability {maj}.{min}, {} SMs, {:.1} GiB{}",
                        d.ordinal,
                        d.name,
                        d.sm_count,
                        d.total_memory as f64 / (1u64 << 30) as f64,
                        if !module::kernels_built() {
                            ""
                        } else if runs {
                            ", kernels can run"
                        } else {
                            ", NO embedded code for this device"
                        }
                    );
                }
            }
            Err(e) => println!("  devices:      could not be listed ({e})"),
        }
    }
    if args.verbose {
        println!("ptxas resource report:");
        if module::PTXAS_REPORT.trim().is_empty() {
            println!("  (empty: no kernels were compiled)");
        } else {
            print!("{}", module::PTXAS_REPORT);
        }
    }
    Ok(())
}
