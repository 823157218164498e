//! MoCo's FIFO queue of negatives as a candle tensor, on any candle device.

use candle_core::{DType, Device, Tensor};

use super::wrap;
use crate::error::Error;
use crate::queue::enqueue_plan;

/// A FIFO queue of up to `capacity` keys of dimension D held in one candle tensor (a ring
/// buffer, `capacity × D`, on the CPU or a CUDA device), the candle counterpart of
/// [`crate::queue::HostQueue`] and [`crate::cuda::NegativeQueue`] with the same ring arithmetic
/// ([`enqueue_plan`]).
///
/// [`Queue::keys`] is what [`super::InfoNce::queue`] reads: the held rows in storage order, a view
/// of the ring without a copy (the loss is a sum over its negatives, so their order does not
/// matter). As MoCo does, enqueue the momentum encoder's keys after each step's backward:
/// [`Queue::enqueue`] writes the ring in place, so a loss with reduction `none` whose backward has
/// not run yet would see the new keys.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use fused_infonce::candle::Queue;
/// # fn main() -> candle_core::Result<()> {
/// let mut q = Queue::new(4, 2, DType::F32, &Device::Cpu)?;
/// q.enqueue(&Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &Device::Cpu)?)?;
/// q.enqueue(&Tensor::new(&[[2f32, 2.], [3., 3.]], &Device::Cpu)?)?;
/// assert_eq!(q.len(), 4);
/// // The oldest key [1, 0] was overwritten by the newest, [3, 3].
/// assert_eq!(q.keys()?.to_vec2::<f32>()?, [[3., 3.], [0., 1.], [1., 1.], [2., 2.]]);
/// # Ok(())
/// # }
/// ```
///
/// Not `Clone`: a clone would share candle's storage and see the other's enqueues overwrite its
/// rows; [`Queue::copy`] makes an independent copy.
#[derive(Debug)]
pub struct Queue {
    ring: Tensor,
    start: usize,
    len: usize,
}

impl Queue {
    /// An independent copy of the queue (its ring copied on its device).
    pub fn copy(&self) -> candle_core::Result<Queue> {
        Ok(Queue {
            ring: self.ring.copy()?,
            start: self.start,
            len: self.len,
        })
    }

    /// An empty queue of `capacity` rows of dimension `dim` (zero-filled storage).
    pub fn new(
        capacity: usize,
        dim: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        if capacity == 0 || dim == 0 {
            return Err(wrap(Error::parameter(
                "queue",
                format!("{capacity} × {dim}"),
                "capacity and dimension must be >= 1",
            )));
        }
        Ok(Self {
            ring: Tensor::zeros((capacity, dim), dtype, device)?,
            start: 0,
            len: 0,
        })
    }

    /// Appends the rows of `batch` (B × D, the queue's dtype and device) as the newest keys,
    /// overwriting the oldest when full (with B > capacity only the last `capacity` rows are
    /// kept): at most two in-place copies into the ring. The batch is detached (no gradient flows
    /// into the queue's history).
    pub fn enqueue(&mut self, batch: &Tensor) -> candle_core::Result<()> {
        let d = self.dim();
        let dims = batch.dims();
        if dims.len() != 2 || (dims[1] != d && dims[0] > 0) {
            return Err(wrap(Error::shape(
                "batch",
                format!("{dims:?}"),
                format!("[B, {d}] (D as the queue)"),
            )));
        }
        if batch.dtype() != self.ring.dtype() || !batch.device().same_device(self.ring.device()) {
            return Err(wrap(Error::Input(format!(
                "tensor `batch` is {:?} on {:?}, the queue {:?} on {:?}",
                batch.dtype(),
                batch.device().location(),
                self.ring.dtype(),
                self.ring.device().location()
            ))));
        }
        let (segs, start, len) = enqueue_plan(self.capacity(), self.start, self.len, dims[0]);
        let batch = batch.detach();
        for s in segs {
            let rows = batch.narrow(0, s.src, s.rows)?.contiguous()?;
            self.ring.slice_set(&rows, 0, s.dst)?;
        }
        self.start = start;
        self.len = len;
        Ok(())
    }

    /// The queued keys as the loss reads them: `len × D`, storage order, a view of the ring.
    pub fn keys(&self) -> candle_core::Result<Tensor> {
        // From empty, the ring holds rows [0, len) until it is full, then all of them
        // (enqueue_plan keeps start = 0 until the ring first wraps).
        self.ring.narrow(0, 0, self.len)
    }

    /// The queued keys oldest first (a copy).
    pub fn oldest_first(&self) -> candle_core::Result<Tensor> {
        if self.len < self.capacity() || self.start == 0 {
            return self.keys()?.copy();
        }
        let cap = self.capacity();
        Tensor::cat(
            &[
                self.ring.narrow(0, self.start, cap - self.start)?,
                self.ring.narrow(0, 0, self.start)?,
            ],
            0,
        )
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
        self.ring.dims()[0]
    }
    /// The key dimension D.
    pub fn dim(&self) -> usize {
        self.ring.dims()[1]
    }
    /// The ring row of the oldest key.
    pub fn start(&self) -> usize {
        self.start
    }
    /// The ring storage (`capacity × D`).
    pub fn storage(&self) -> &Tensor {
        &self.ring
    }
}
