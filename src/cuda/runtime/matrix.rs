//! [`DeviceMatrix`]: a row-major matrix in device memory.

use std::mem::ManuallyDrop;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use super::device::Gpu;
use crate::error::{Error, Result};
use crate::tensor::{Element, MatRef};

/// An element type the kernels accept on the device: `f32`, `f16`, `bf16`.
pub trait DeviceElement: Element + DeviceRepr + ValidAsZeroBits {}
impl DeviceElement for f32 {}
impl DeviceElement for half::f16 {}
impl DeviceElement for half::bf16 {}

/// A `rows × cols` row-major matrix in device memory: owned (freed when dropped, stream-ordered),
/// or borrowed from a caller ([`DeviceMatrix::borrowed`]: never freed here).
#[derive(Debug)]
pub struct DeviceMatrix<T: DeviceElement> {
    rows: usize,
    cols: usize,
    data: ManuallyDrop<CudaSlice<T>>,
    borrowed: bool,
}

impl<T: DeviceElement> Drop for DeviceMatrix<T> {
    fn drop(&mut self) {
        // SAFETY: `data` is taken out exactly once, here, and never used again.
        let data = unsafe { ManuallyDrop::take(&mut self.data) };
        if self.borrowed {
            // The caller owns the memory: give the address back without freeing it (after the
            // buffer's pending work, as cudarc's `leak` waits for it).
            let _ = data.leak();
        } else {
            drop(data);
        }
    }
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
        Ok(Self::owned(data, m.rows(), m.cols()))
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
        Ok(Self::owned(data, rows, cols))
    }

    fn owned(data: CudaSlice<T>, rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: ManuallyDrop::new(data),
            borrowed: false,
        }
    }

    /// Borrows `rows × cols` elements of a caller's device memory at `ptr` (an engine's tensor,
    /// any allocator's), without a copy and without taking ownership: dropping the matrix never
    /// frees it. Work on it is queued on `gpu`'s stream.
    ///
    /// # Safety
    /// `ptr` must be the address of `rows × cols` elements of `T` (at least one element) in the
    /// context of `gpu`, aligned for `T`, and stay allocated, and not be written by other work
    /// the caller has not ordered against `gpu`'s stream, until the matrix and every operation
    /// queued on it are done.
    pub unsafe fn borrowed(gpu: &Gpu, ptr: CUdeviceptr, rows: usize, cols: usize) -> Result<Self> {
        let n = rows.checked_mul(cols).ok_or_else(|| {
            Error::shape(
                "matrix",
                format!("[{rows}, {cols}]"),
                "a size that fits in usize",
            )
        })?;
        if ptr == 0 {
            return Err(Error::Input(format!(
                "a borrowed [{rows}, {cols}] matrix at a null device pointer"
            )));
        }
        if !ptr.is_multiple_of(std::mem::align_of::<T>() as u64) {
            return Err(Error::Input(format!(
                "a borrowed [{rows}, {cols}] matrix at {ptr:#x}: not aligned for {}",
                T::DTYPE
            )));
        }
        // SAFETY: the caller's contract; the slice never frees it (see Drop).
        let data = unsafe { gpu.stream().upgrade_device_ptr::<T>(ptr, n.max(1)) };
        Ok(Self {
            rows,
            cols,
            data: ManuallyDrop::new(data),
            borrowed: true,
        })
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
        Ok(Self::owned(data, rows, cols))
    }

    /// Copies the matrix back to the host (waits for the stream).
    pub fn download(&self, gpu: &Gpu) -> Result<Vec<T>> {
        let mut v = gpu.stream().clone_dtoh(&*self.data)?;
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
    /// Whether the memory is a caller's ([`DeviceMatrix::borrowed`]).
    pub fn is_borrowed(&self) -> bool {
        self.borrowed
    }
    /// Gives an owned buffer back (`None` for a borrowed one, whose memory is the caller's).
    pub fn into_slice(self) -> Option<CudaSlice<T>> {
        let mut m = ManuallyDrop::new(self);
        if m.borrowed {
            // Dropping it leaks the slice (the caller's memory) as Drop would.
            drop(ManuallyDrop::into_inner(m));
            return None;
        }
        // SAFETY: `m` is never dropped (ManuallyDrop), so `data` is taken exactly once.
        Some(unsafe { ManuallyDrop::take(&mut m.data) })
    }
}
