//! Dtype conversions on the device (kernels/steps.cu): `steps_cast_<dtype>` rounds f32 to a
//! storage dtype (gradients returned in the input dtype, the tf32 path's f16 inputs) and
//! `steps_max_abs_f32` finds the largest magnitude of f32 buffers (the tf32 path's range check).

use crate::cuda::op::{DeviceGrad, GradDType};
use crate::cuda::runtime::launch::grid_stride;
use crate::cuda::runtime::{launch, Args, DeviceElement, DeviceMatrix, Gpu};
use crate::error::{Error, Result};
use crate::tensor::DType;

const MODULE: &str = "steps";

fn f32_only<T: DeviceElement>(what: &str) -> Result<()> {
    if T::DTYPE != DType::F32 {
        return Err(Error::Unsupported(format!(
            "{what} takes f32 matrices, not {}",
            T::DTYPE
        )));
    }
    Ok(())
}

/// `m` (f32; an error otherwise) rounded to `U`, as a new matrix.
pub fn cast<T: DeviceElement, U: DeviceElement>(
    gpu: &Gpu,
    m: &DeviceMatrix<T>,
) -> Result<DeviceMatrix<U>> {
    f32_only::<T>("steps::convert::cast")?;
    const K: &str = "steps_cast";
    let n = m.rows() * m.cols();
    let mut out = DeviceMatrix::<U>::zeros(gpu, m.rows(), m.cols())?;
    if n > 0 {
        let mut a = Args::new(gpu);
        a.read(m.slice()).write(out.slice_mut()).i64(n as i64);
        // SAFETY: steps_cast_<U>(const float* x, U* y, int64_t n); T is f32 (checked above), so
        // x holds n floats; out holds n elements of U; grid-stride.
        unsafe {
            launch(
                gpu,
                K,
                MODULE,
                &format!("{K}_{}", U::DTYPE.name()),
                grid_stride(gpu, n),
                a,
            )
        }?;
    }
    Ok(out)
}

/// An f32 gradient in the dtype the caller asked for: itself for [`GradDType::F32`] (or f32
/// inputs), else rounded to the input dtype `T`.
pub fn cast_grad<T: DeviceElement>(
    gpu: &Gpu,
    g: DeviceMatrix<f32>,
    want: GradDType,
) -> Result<DeviceGrad<T>> {
    if want == GradDType::F32 || T::DTYPE == DType::F32 {
        return Ok(DeviceGrad::F32(g));
    }
    Ok(DeviceGrad::Input(cast::<f32, T>(gpu, &g)?))
}

/// The largest `|x|` of each f32 matrix (an error for other dtypes); NaN counts as +inf. One
/// launch per non-empty matrix into one buffer, read back once.
pub fn max_abs<T: DeviceElement>(gpu: &Gpu, mats: &[&DeviceMatrix<T>]) -> Result<Vec<f32>> {
    f32_only::<T>("steps::convert::max_abs")?;
    const K: &str = "steps_max_abs_f32";
    let stream = gpu.stream();
    let mut mx = stream.alloc_zeros::<u32>(mats.len().max(1))?;
    for (i, m) in mats.iter().enumerate() {
        let n = m.rows() * m.cols();
        if n == 0 {
            continue;
        }
        let mut a = Args::new(gpu);
        a.read(m.slice()).i64(n as i64).write_at(&mut mx, i)?;
        // SAFETY: steps_max_abs_f32(const float* x, int64_t n, unsigned* out); T is f32 (checked
        // above), so x holds n floats; the slot is one zeroed u32 (an atomicMax of the bits).
        unsafe { launch(gpu, K, MODULE, K, grid_stride(gpu, n), a) }?;
    }
    let bits = stream.clone_dtoh(&mx)?;
    Ok(bits
        .into_iter()
        .take(mats.len())
        .map(f32::from_bits)
        .collect())
}
