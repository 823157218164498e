//! MoCo's queue of negative keys: the ring arithmetic both queues share ([`enqueue_plan`]), and
//! [`HostQueue`], the queue in host memory (the CPU counterpart of the device ring buffer
//! [`crate::cuda::NegativeQueue`]). After each step MoCo enqueues the batch's keys and drops the
//! oldest ones; neither queue is ever rotated or copied whole.

use crate::error::{Error, Result};
use crate::tensor::{Element, MatRef};

/// One copy of an enqueue: `rows` rows from batch row `src` to ring row `dst`.
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

/// A FIFO queue of up to `capacity` keys of dimension `D` in host memory (a ring buffer).
///
/// [`HostQueue::keys`] is what the loss reads: the queued rows in storage order, which is their
/// age order until the ring first wraps and a rotation of it after. The loss does not depend on
/// the order of its negatives (a sum over them), so no copy is made; the queue's gradient, when
/// asked for, comes in this same storage order. [`HostQueue::oldest_first`] copies them in age
/// order.
#[derive(Debug, Clone)]
pub struct HostQueue<T: Element> {
    data: Vec<T>,
    capacity: usize,
    dim: usize,
    start: usize,
    len: usize,
}

impl<T: Element> HostQueue<T> {
    /// An empty queue of `capacity` rows of dimension `dim`.
    pub fn new(capacity: usize, dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::shape(
                "queue",
                format!("[{capacity}, 0]"),
                "at least one column (D >= 1)",
            ));
        }
        let n = capacity.checked_mul(dim).ok_or_else(|| {
            Error::shape(
                "queue",
                format!("[{capacity}, {dim}]"),
                "a size that fits in usize",
            )
        })?;
        Ok(Self {
            data: vec![T::from_f64(0.0); n],
            capacity,
            dim,
            start: 0,
            len: 0,
        })
    }

    /// Appends the rows of `batch` (B × D) as the newest keys, overwriting the oldest when full
    /// (with B > capacity only the last `capacity` rows are kept).
    pub fn enqueue(&mut self, batch: &MatRef<'_, T>) -> Result<()> {
        let d = self.dim;
        if batch.cols() != d && batch.rows() > 0 {
            return Err(Error::shape(
                batch.name(),
                format!("[{}, {}]", batch.rows(), batch.cols()),
                format!("[B, {d}] (D as the queue)"),
            ));
        }
        let (segs, start, len) = enqueue_plan(self.capacity, self.start, self.len, batch.rows());
        for s in segs {
            self.data[s.dst * d..(s.dst + s.rows) * d]
                .copy_from_slice(&batch.data()[s.src * d..(s.src + s.rows) * d]);
        }
        self.start = start;
        self.len = len;
        Ok(())
    }

    /// The queued keys as the loss reads them (`len × D`, storage order; see the type's docs).
    pub fn keys(&self) -> MatRef<'_, T> {
        // From empty, the ring holds rows [0, len) until it is full, then all of them: the held
        // rows are always the first `len` of the storage.
        debug_assert!(self.start == 0 || self.len == self.capacity);
        MatRef::new(
            "queue",
            &self.data[..self.len * self.dim],
            self.len,
            self.dim,
        )
        .expect("the queue's own shape")
    }

    /// The queued keys oldest first (a copy).
    pub fn oldest_first(&self) -> Vec<T> {
        let d = self.dim;
        (0..self.len)
            .flat_map(|j| {
                let r = (self.start + j) % self.capacity.max(1);
                self.data[r * d..(r + 1) * d].iter().copied()
            })
            .collect()
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
        self.capacity
    }
    /// The key dimension D.
    pub fn dim(&self) -> usize {
        self.dim
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
    fn host_queue_holds_the_newest_keys() {
        let mut q = HostQueue::<f64>::new(5, 2).unwrap();
        let mut next = 0.0;
        let mut model: Vec<f64> = Vec::new();
        for b in [2usize, 2, 3, 7, 1] {
            let rows: Vec<f64> = (0..2 * b)
                .map(|_| {
                    next += 1.0;
                    next
                })
                .collect();
            q.enqueue(&MatRef::new("batch", &rows, b, 2).unwrap())
                .unwrap();
            model.extend(&rows);
            let keep = model.len().saturating_sub(10);
            model.drain(..keep);
            assert_eq!(q.oldest_first(), model);
            // `keys` holds the same rows (a rotation of them).
            let mut keys = q.keys().data().to_vec();
            let mut want = model.clone();
            keys.sort_by(f64::total_cmp);
            want.sort_by(f64::total_cmp);
            assert_eq!(keys, want);
        }
        let wrong = [1.0; 3];
        assert!(q
            .enqueue(&MatRef::new("batch", &wrong, 1, 3).unwrap())
            .is_err());
        assert!(HostQueue::<f32>::new(4, 0).is_err());
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
