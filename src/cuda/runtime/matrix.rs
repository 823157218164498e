//! [`DeviceMatrix`]: a row-major matrix in device memory.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use super::device::Gpu;
use crate::error::{Error, Result};
use crate::tensor::{Element, MatRef};

/// An element type the kernels accept on the device: `f32`, `f16`, `bf16`.
pub trait DeviceElement: Element + DeviceRepr + ValidAsZeroBits {}
impl DeviceElement for f32 {}
impl DeviceElement for half::f16 {}
impl DeviceElement for half::bf16 {}

/// A `rows × cols` row-major matrix in device memory.
#[derive(Debug)]
pub struct DeviceMatrix<T: DeviceElement> {
    rows: usize,
    cols: usize,
    data: CudaSlice<T>,
}

impl<T: DeviceElement> DeviceMatrix<T> {
    /// Copies a host matrix to the device (on `gpu`'s stream). An empty matrix (a queue with
    /// K = 0) gets a one-element buffer: the driver cannot allocate zero bytes
    /// (`cuMemAlloc` documents `CUDA_ERROR_INVALID_VALUE` for a size of 0).
    pub fn upload(gpu: &Gpu, m: &MatRef<'_, T>) -> Result<Self> {
        if m.data().is_empty() {
            return Self::zeros(gpu, m.rows(), m.cols());
        }
        let data = gpu.stream().clone_htod(m.data())?;
        Ok(Self {
            rows: m.rows(),
            cols: m.cols(),
            data,
        })
    }

    /// A zero-filled matrix (a one-element buffer when it has no elements).
    pub fn zeros(gpu: &Gpu, rows: usize, cols: usize) -> Result<Self> {
        let n = rows.checked_mul(cols).ok_or_else(|| {
            Error::shape(
                "matrix",
                format!("[{rows}, {cols}]"),
                "a size that fits in usize",
            )
        })?;
        let data = gpu.stream().alloc_zeros::<T>(n.max(1))?;
        Ok(Self { rows, cols, data })
    }

    /// Wraps a caller's device buffer (e.g. an engine's tensor storage) as a matrix, without a copy.
    ///
    /// Fails with [`Error::Shape`] unless `data.len() == rows * cols` (a zero-sized matrix may use
    /// a buffer of one element).
    pub fn from_slice(data: CudaSlice<T>, rows: usize, cols: usize) -> Result<Self> {
        let n = rows.checked_mul(cols);
        if n != Some(data.len()) && !(n == Some(0) && data.len() <= 1) {
            return Err(Error::shape(
                "device buffer",
                format!("{} elements", data.len()),
                format!("[{rows}, {cols}]"),
            ));
        }
        Ok(Self { rows, cols, data })
    }

    /// Copies the matrix back to the host (waits for the stream).
    pub fn download(&self, gpu: &Gpu) -> Result<Vec<T>> {
        let mut v = gpu.stream().clone_dtoh(&self.data)?;
        v.truncate(self.rows * self.cols);
        Ok(v)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The device buffer.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.data
    }
    /// The device buffer, mutable.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.data
    }
    /// Gives the buffer back.
    pub fn into_slice(self) -> CudaSlice<T> {
        self.data
    }
}
