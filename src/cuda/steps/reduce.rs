//! The loss's reduction: `steps_sum_scaled` (kernels/steps.cu), one block summing in a fixed
//! order, behind [`sum_scaled`] and [`reduce_losses`].

use cudarc::driver::{CudaSlice, LaunchConfig};

use crate::cuda::runtime::{launch, Args, Gpu};
use crate::error::Result;
use crate::loss::Upstream;
use crate::spec::{LossSpec, Reduction};

const MODULE: &str = "steps";
/// `SUM_THREADS` of kernels/steps.cu (its shared array and launch bounds).
const SUM_THREADS: u32 = 256;

/// `out[0] = c · Σ x[..n]`, in a fixed order (bitwise reproducible).
pub fn sum_scaled(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    c: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    const K: &str = "steps_sum_scaled";
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (SUM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = Args::new(gpu);
    a.read(x).i64(n as i64).f32(c).write(out);
    // SAFETY: steps_sum_scaled(const float* x, int64_t n, float c, float* out); x holds ≥ n
    // floats (the callers' buffers), out one; one block of SUM_THREADS (its shared array).
    unsafe { launch(gpu, K, MODULE, K, cfg, a) }
}

/// The loss `spec` asks for from `count` per-anchor losses: `None` keeps them (the caller's
/// buffer), `Mean`/`Sum` sum them scaled by the reduction's weight (`Upstream::One`: 1/count for
/// mean, ½ for symmetric) into one f32.
pub fn reduce_losses(
    gpu: &Gpu,
    spec: &LossSpec,
    per_anchor: CudaSlice<f32>,
    count: usize,
) -> Result<CudaSlice<f32>> {
    if spec.reduction() == Reduction::None {
        return Ok(per_anchor);
    }
    let c = Upstream::One
        .weights(spec, count)?
        .first()
        .copied()
        .unwrap_or(0.0);
    let mut out = gpu.stream().alloc_zeros::<f32>(1)?;
    sum_scaled(gpu, &per_anchor, count, c as f32, &mut out)?;
    Ok(out)
}
