//! Launch-configuration checks shared by every kernel family: each family computes its grid,
//! block and shared memory in one function and passes the result through [`checked`].

use cudarc::driver::LaunchConfig;

use super::device::Gpu;
use crate::error::{Error, Result};

/// Checks `cfg` against `gpu`'s limits (block size, grid size, shared memory) and returns it.
pub fn checked(gpu: &Gpu, kernel: &'static str, cfg: LaunchConfig) -> Result<LaunchConfig> {
    let p = gpu.properties();
    let threads = cfg.block_dim.0 as u64 * cfg.block_dim.1 as u64 * cfg.block_dim.2 as u64;
    let err = |reason: String| Err(Error::Launch { kernel, reason });
    if threads == 0 || threads > p.max_threads_per_block as u64 {
        return err(format!(
            "block of {threads} threads (device allows 1..={})",
            p.max_threads_per_block
        ));
    }
    if cfg.grid_dim.0 == 0 || cfg.grid_dim.0 > p.max_grid_x {
        return err(format!(
            "grid.x = {} (device allows 1..={})",
            cfg.grid_dim.0, p.max_grid_x
        ));
    }
    if cfg.grid_dim.1 == 0
        || cfg.grid_dim.1 > p.max_grid_y
        || cfg.grid_dim.2 == 0
        || cfg.grid_dim.2 > p.max_grid_y
    {
        return err(format!(
            "grid.y/z = {}/{} (device allows 1..={})",
            cfg.grid_dim.1, cfg.grid_dim.2, p.max_grid_y
        ));
    }
    if cfg.shared_mem_bytes > p.max_shared_per_block {
        return err(format!(
            "{} bytes of shared memory (device allows {})",
            cfg.shared_mem_bytes, p.max_shared_per_block
        ));
    }
    Ok(cfg)
}

/// `ceil(a / b)` as a grid dimension, or a launch error when it does not fit in u32.
pub fn grid_dim(kernel: &'static str, a: usize, b: usize) -> Result<u32> {
    let g = a.div_ceil(b.max(1)).max(1);
    u32::try_from(g).map_err(|_| Error::Launch {
        kernel,
        reason: format!("grid of {g} blocks does not fit in 32 bits"),
    })
}
