//! Row-wise L2 normalisation on the device (kernels/normalize.cu), forward and backward.
//!
//! `u = x / max(‖x‖₂, 1e-12)` with the per-row `inv_norm = 1 / max(‖x‖, ε)` kept for the backward
//! `dx = (du − u (u·du)) · inv_norm`. The loss paths normalise every input into a copy first
//! ([`normalize_inputs`]) and run the loss on the copies; the simple path's finish kernel chains
//! the gradients back through `inv_norm` itself, the tensor-core path through
//! [`normalize_rows_backward`].

use cudarc::driver::{CudaSlice, LaunchConfig};

use crate::cuda::op::DeviceInputs;
use crate::cuda::runtime::launch::{self, launch, Args};
use crate::cuda::runtime::{DeviceElement, DeviceMatrix, Gpu};
use crate::error::{Error, Result};

const KERNEL: &str = "normalize";
/// Rows per block: one warp per row.
const ROWS_PER_BLOCK: usize = 8;

/// The launch configuration of both normalisation kernels for `rows` rows: one warp per row.
fn config(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (launch::grid_dim(KERNEL, rows, ROWS_PER_BLOCK)?, 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn cols_i32(cols: usize) -> Result<i32> {
    i32::try_from(cols).map_err(|_| Error::shape("x", format!("{cols} columns"), "D < 2^31"))
}

fn check_len<T>(name: &'static str, s: &CudaSlice<T>, want: usize) -> Result<()> {
    if s.len() < want {
        return Err(Error::shape(
            name,
            format!("{} elements", s.len()),
            format!("at least {want}"),
        ));
    }
    Ok(())
}

/// Normalises the rows of `x` into `u` (same shape) and `inv_norm` (one f32 per row).
pub fn normalize_rows_into<T: DeviceElement>(
    gpu: &Gpu,
    x: &DeviceMatrix<T>,
    u: &mut DeviceMatrix<T>,
    inv_norm: &mut CudaSlice<f32>,
) -> Result<()> {
    if (u.rows(), u.cols()) != (x.rows(), x.cols()) {
        return Err(Error::shape(
            "u",
            format!("[{}, {}]", u.rows(), u.cols()),
            format!("[{}, {}] (as x)", x.rows(), x.cols()),
        ));
    }
    check_len("inv_norm", inv_norm, x.rows())?;
    if x.rows() == 0 || x.cols() == 0 {
        return Ok(());
    }
    let (rows, cols) = (x.rows() as i64, cols_i32(x.cols())?);
    let mut a = Args::new(gpu);
    a.read(x.slice())
        .write(u.slice_mut())
        .write(inv_norm)
        .i64(rows)
        .i32(cols);
    // SAFETY: normalize_fwd_<dtype>(const T* x, T* u, float* inv_norm, int64_t rows, int cols);
    // x and u hold rows × cols elements, inv_norm rows (checked above); one warp per row.
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            &format!("normalize_fwd_{}", T::DTYPE.name()),
            config(x.rows())?,
            a,
        )
    }
}

/// Normalises the rows of `x`: returns `u` and `inv_norm`.
pub fn normalize_rows<T: DeviceElement>(
    gpu: &Gpu,
    x: &DeviceMatrix<T>,
) -> Result<(DeviceMatrix<T>, CudaSlice<f32>)> {
    let mut u = DeviceMatrix::zeros(gpu, x.rows(), x.cols())?;
    let mut inv = gpu.stream().alloc_zeros::<f32>(x.rows().max(1))?;
    normalize_rows_into(gpu, x, &mut u, &mut inv)?;
    Ok((u, inv))
}

/// The backward of [`normalize_rows`]: from `x`, its `inv_norm` and `du` (f32, shaped as x), writes
/// `dx` (f32, shaped as x).
pub fn normalize_rows_backward_into<T: DeviceElement>(
    gpu: &Gpu,
    x: &DeviceMatrix<T>,
    inv_norm: &CudaSlice<f32>,
    du: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    let n = x.rows() * x.cols();
    check_len("inv_norm", inv_norm, x.rows())?;
    check_len("du", du, n)?;
    check_len("dx", dx, n)?;
    if n == 0 {
        return Ok(());
    }
    let (rows, cols) = (x.rows() as i64, cols_i32(x.cols())?);
    let mut a = Args::new(gpu);
    a.read(x.slice())
        .read(inv_norm)
        .read(du)
        .write(dx)
        .i64(rows)
        .i32(cols);
    // SAFETY: normalize_bwd_<dtype>(const T* x, const float* inv_norm, const float* du,
    // float* dx, int64_t rows, int cols); lengths checked above; one warp per row.
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            &format!("normalize_bwd_{}", T::DTYPE.name()),
            config(x.rows())?,
            a,
        )
    }
}

/// The backward of [`normalize_rows`], allocating `dx`.
pub fn normalize_rows_backward<T: DeviceElement>(
    gpu: &Gpu,
    x: &DeviceMatrix<T>,
    inv_norm: &CudaSlice<f32>,
    du: &CudaSlice<f32>,
) -> Result<CudaSlice<f32>> {
    let mut dx = gpu
        .stream()
        .alloc_zeros::<f32>((x.rows() * x.cols()).max(1))?;
    normalize_rows_backward_into(gpu, x, inv_norm, du, &mut dx)?;
    Ok(dx)
}

/// Every input matrix of a problem normalised row-wise into a copy (in the input dtype, so the
/// loss reads `u` rounded once), with each copy's inverse norms for the backward.
#[derive(Debug)]
pub struct NormalizedInputs<T: DeviceElement> {
    /// The copies, in [`DeviceInputs::matrices`] order (the queue's whole ring).
    pub copies: Vec<DeviceMatrix<T>>,
    /// `inv_norm` of each copy's rows.
    pub inv_norms: Vec<CudaSlice<f32>>,
}

impl<T: DeviceElement> NormalizedInputs<T> {
    /// The problem of `raw` over the normalised copies (the ring view and targets kept).
    pub fn inputs<'b>(&'b self, raw: &DeviceInputs<'b, T>) -> Result<DeviceInputs<'b, T>> {
        let mats: Vec<&DeviceMatrix<T>> = self.copies.iter().collect();
        raw.with_matrices(&mats)
    }
}

/// Normalises every input matrix of `inputs` ([`normalize_rows`] each).
pub fn normalize_inputs<T: DeviceElement>(
    gpu: &Gpu,
    inputs: &DeviceInputs<'_, T>,
) -> Result<NormalizedInputs<T>> {
    let (copies, inv_norms) = inputs
        .matrices()
        .into_iter()
        .map(|(_, m)| normalize_rows(gpu, m))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    Ok(NormalizedInputs { copies, inv_norms })
}
