//! [`NegativeQueue`]: MoCo's queue of negative keys as a device ring buffer.
//!
//! After each step MoCo enqueues the batch's keys and drops the oldest ones. Here the keys live in
//! a `capacity × D` device buffer written in place (at most two device-to-device copies per
//! enqueue); [`NegativeQueue::view`] hands the kernels a [`QueueView`] that they read across the
//! wrap-around (`(start + j) mod capacity`), so the queue is never copied or rotated.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::op::QueueView;
use super::runtime::Gpu;
use super::runtime::{DeviceElement, DeviceMatrix};
use crate::error::{Error, Result};
use crate::queue::enqueue_plan;

/// A FIFO queue of up to `capacity` keys of dimension `D` in device memory (a ring buffer).
///
/// Enqueues are queued on the stream of the [`Gpu`] the queue was created with, in order with the
/// loss evaluations on that stream.
#[derive(Debug)]
pub struct NegativeQueue<T: DeviceElement> {
    stream: Arc<CudaStream>,
    keys: DeviceMatrix<T>,
    start: usize,
    len: usize,
}

impl<T: DeviceElement> NegativeQueue<T> {
    /// An empty queue of `capacity` rows of dimension `dim` (zero-filled storage).
    pub fn new(gpu: &Gpu, capacity: usize, dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::shape(
                "queue",
                format!("[{capacity}, 0]"),
                "at least one column (D >= 1)",
            ));
        }
        Ok(Self {
            stream: gpu.stream().clone(),
            keys: DeviceMatrix::zeros(gpu, capacity, dim)?,
            start: 0,
            len: 0,
        })
    }

    /// Appends the rows of `batch` (B × D) as the newest keys, overwriting the oldest when full
    /// (with B > capacity only the last `capacity` rows are kept): at most two device-to-device
    /// copies, queued on the queue's stream.
    pub fn enqueue(&mut self, batch: &DeviceMatrix<T>) -> Result<()> {
        let d = self.dim();
        if batch.cols() != d && batch.rows() > 0 {
            return Err(Error::shape(
                "batch",
                format!("[{}, {}]", batch.rows(), batch.cols()),
                format!("[B, {d}] (D as the queue)"),
            ));
        }
        let (segs, start, len) = enqueue_plan(self.capacity(), self.start, self.len, batch.rows());
        for s in segs {
            let src = batch.slice().slice(s.src * d..(s.src + s.rows) * d);
            let mut dst = self
                .keys
                .slice_mut()
                .slice_mut(s.dst * d..(s.dst + s.rows) * d);
            self.stream.memcpy_dtod(&src, &mut dst)?;
        }
        self.start = start;
        self.len = len;
        Ok(())
    }

    /// The queue as the kernels read it (oldest key first, in place).
    pub fn view(&self) -> QueueView<'_, T> {
        QueueView {
            keys: &self.keys,
            start: self.start,
            len: self.len,
        }
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the queue holds no key.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Maximum number of keys.
    pub fn capacity(&self) -> usize {
        self.keys.rows()
    }
    /// The key dimension D.
    pub fn dim(&self) -> usize {
        self.keys.cols()
    }
    /// The ring row of the oldest key.
    pub fn start(&self) -> usize {
        self.start
    }
    /// The ring storage (`capacity × D`).
    pub fn storage(&self) -> &DeviceMatrix<T> {
        &self.keys
    }
}
