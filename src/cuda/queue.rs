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

/// One device copy of an enqueue: `rows` rows from batch row `src` to ring row `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First ring row written.
    pub dst: usize,
    /// First batch row read.
    pub src: usize,
    /// Number of rows.
    pub rows: usize,
}

/// The ring arithmetic of an enqueue of `batch` rows into a ring of `capacity` rows holding `len`
/// rows from `start`: the (at most two) copies, and the new `(start, len)`.
///
/// A batch larger than the ring keeps its last `capacity` rows (the newest). The oldest rows are
/// overwritten first, as MoCo's FIFO queue does.
pub fn enqueue_plan(
    capacity: usize,
    start: usize,
    len: usize,
    batch: usize,
) -> (Vec<Segment>, usize, usize) {
    if capacity == 0 || batch == 0 {
        return (Vec::new(), start, len);
    }
    let skip = batch.saturating_sub(capacity);
    let b = batch - skip;
    let write = (start + len) % capacity;
    let first = b.min(capacity - write);
    let mut segs = vec![Segment {
        dst: write,
        src: skip,
        rows: first,
    }];
    if first < b {
        segs.push(Segment {
            dst: 0,
            src: skip + first,
            rows: b - first,
        });
    }
    let new_len = (len + b).min(capacity);
    let new_start = (start + len + b - new_len) % capacity;
    (segs, new_start, new_len)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A host model of the queue: the logical contents after each enqueue.
    fn simulate(capacity: usize, batches: &[usize]) {
        let mut ring = vec![usize::MAX; capacity];
        let (mut start, mut len) = (0, 0);
        let mut model: Vec<usize> = Vec::new();
        let mut next = 0usize;
        for &b in batches {
            let batch: Vec<usize> = (next..next + b).collect();
            next += b;
            let (segs, s, l) = enqueue_plan(capacity, start, len, b);
            for seg in &segs {
                assert!(seg.dst + seg.rows <= capacity);
                assert!(seg.src + seg.rows <= b);
                ring[seg.dst..seg.dst + seg.rows]
                    .copy_from_slice(&batch[seg.src..seg.src + seg.rows]);
            }
            assert!(segs.len() <= 2);
            (start, len) = (s, l);
            model.extend(&batch);
            let keep = model.len().saturating_sub(capacity);
            model.drain(..keep);
            assert_eq!(len, model.len());
            let got: Vec<usize> = (0..len).map(|j| ring[(start + j) % capacity]).collect();
            assert_eq!(got, model, "capacity {capacity} batches {batches:?}");
        }
    }

    #[test]
    fn enqueue_matches_a_fifo() {
        simulate(8, &[3, 3, 3, 3, 5, 1, 8, 2]);
        simulate(5, &[7, 1, 4, 0, 5, 6]);
        simulate(1, &[1, 2, 1]);
        simulate(16, &[16, 16, 15, 1, 17]);
    }

    #[test]
    fn empty_ring_is_a_no_op() {
        assert_eq!(enqueue_plan(0, 0, 0, 5), (Vec::new(), 0, 0));
        assert_eq!(enqueue_plan(4, 1, 2, 0), (Vec::new(), 1, 2));
    }

    #[test]
    fn wrap_gives_two_segments() {
        let (segs, start, len) = enqueue_plan(8, 6, 2, 4);
        assert_eq!(
            segs,
            vec![Segment {
                dst: 0,
                src: 0,
                rows: 4
            }]
        );
        assert_eq!((start, len), (6, 6));
        let (segs, start, len) = enqueue_plan(8, 2, 4, 4);
        assert_eq!(segs.len(), 2);
        assert_eq!(
            segs[0],
            Segment {
                dst: 6,
                src: 0,
                rows: 2
            }
        );
        assert_eq!(
            segs[1],
            Segment {
                dst: 0,
                src: 2,
                rows: 2
            }
        );
        assert_eq!((start, len), (2, 8));
    }
}
