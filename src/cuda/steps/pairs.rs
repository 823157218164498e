//! The pair sets the selection and metrics kernels read (kernels/pairs.cuh, `PairSet`): one side
//! of a problem as its anchors, the key rows that are their negatives (a ring view of the keys)
//! and which of them each anchor skips, resolved from [`DeviceInputs`] with the shape checks the
//! kernels rely on.

use cudarc::driver::CudaSlice;

use crate::cuda::op::{device_shape, DeviceInputs};
use crate::cuda::runtime::{Args, DeviceElement, DeviceMatrix};
use crate::error::{Error, Result};
use crate::spec::LossSpec;

/// Which key rows are an anchor's negatives (kernels/pairs.cuh, `SKIP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum SkipMode {
    /// Queue: every row of the ring.
    None = 0,
    /// Every key row except `targets[i]` (row `i` without targets).
    Target = 1,
    /// In-batch: every row except `i` and `(i + N) mod 2N`.
    InBatch = 2,
}

/// The anchors and negatives of one side of a problem, as the kernels' `PairSet` arguments
/// (pushed in the order of `PAIR_SET_PARAMS` in kernels/pairs.cuh).
#[derive(Debug)]
pub(crate) struct PairSetArgs<'a, T: DeviceElement> {
    pub anchors: &'a DeviceMatrix<T>,
    pub keys: &'a DeviceMatrix<T>,
    pub targets: Option<&'a CudaSlice<i64>>,
    pub n_anchors: i64,
    pub capacity: i64,
    pub start: i64,
    pub len: i64,
    pub cols: i32,
    pub skip_mode: i32,
    pub normalize: i32,
}

impl<'a, T: DeviceElement> PairSetArgs<'a, T> {
    /// The number of anchors.
    pub fn anchors(&self) -> usize {
        self.n_anchors as usize
    }

    /// Pushes the ten `PAIR_SET_PARAMS` arguments: `const T* anchors, const T* keys,
    /// const int64_t* targets, int64_t n_anchors, int64_t capacity, int64_t start, int64_t len,
    /// int cols, int skip_mode, int normalize`.
    pub fn push(&self, a: &mut Args<'a>) {
        a.read(self.anchors.slice())
            .read(self.keys.slice())
            .read_opt(self.targets)
            .i64(self.n_anchors)
            .i64(self.capacity)
            .i64(self.start)
            .i64(self.len)
            .i32(self.cols)
            .i32(self.skip_mode)
            .i32(self.normalize);
    }
}

/// Resolves `inputs` into the anchors and negatives of one side: the row anchors, or with
/// `columns` the column anchors of symmetric mode (anchor `b_j` against every `a_i`, `i ≠ j`).
/// The shapes go through the crate's one check ([`device_shape`], for the inputs' mode), plus the
/// kernels' own limit of fewer than 2^32 − 1 negatives.
pub(crate) fn pair_set<'a, T: DeviceElement>(
    inputs: &DeviceInputs<'a, T>,
    columns: bool,
    normalize: bool,
) -> Result<PairSetArgs<'a, T>> {
    if columns && !matches!(inputs, DeviceInputs::Symmetric { .. }) {
        return Err(Error::parameter(
            "columns",
            true,
            "only symmetric mode has column anchors",
        ));
    }
    device_shape(&LossSpec::builder(inputs.mode()).build()?, inputs)?;
    let (anchors, keys, targets, start, len, skip) = match *inputs {
        DeviceInputs::Queue { query, queue, .. } => (
            query,
            queue.keys,
            None,
            queue.start,
            queue.len,
            SkipMode::None,
        ),
        DeviceInputs::InBatch { embeddings } => (
            embeddings,
            embeddings,
            None,
            0,
            embeddings.rows(),
            SkipMode::InBatch,
        ),
        DeviceInputs::Cross {
            query,
            key,
            targets,
        } => (query, key, targets, 0, key.rows(), SkipMode::Target),
        DeviceInputs::Symmetric { query, key } => {
            let (a, b) = if columns { (key, query) } else { (query, key) };
            (a, b, None, 0, b.rows(), SkipMode::Target)
        }
    };
    let cols = i32::try_from(anchors.cols())
        .map_err(|_| Error::shape("anchors", format!("{} columns", anchors.cols()), "D < 2^31"))?;
    if len > u32::MAX as usize - 1 {
        return Err(Error::shape(
            "keys",
            format!("{len} negatives"),
            "fewer than 2^32 − 1 negatives per anchor",
        ));
    }
    Ok(PairSetArgs {
        anchors,
        keys,
        targets,
        n_anchors: anchors.rows() as i64,
        capacity: keys.rows() as i64,
        start: start as i64,
        len: len as i64,
        cols,
        skip_mode: skip as i32,
        normalize: normalize as i32,
    })
}

/// Every ordered pair of distinct rows of `x`: anchor `i` against every row `j ≠ i` (the pairs of
/// the uniformity metric).
pub(crate) fn self_pairs<T: DeviceElement>(
    x: &DeviceMatrix<T>,
    normalize: bool,
) -> Result<PairSetArgs<'_, T>> {
    let cols = i32::try_from(x.cols())
        .map_err(|_| Error::shape("x", format!("{} columns", x.cols()), "D < 2^31"))?;
    Ok(PairSetArgs {
        anchors: x,
        keys: x,
        targets: None,
        n_anchors: x.rows() as i64,
        capacity: x.rows() as i64,
        start: 0,
        len: x.rows() as i64,
        cols,
        skip_mode: SkipMode::Target as i32,
        normalize: normalize as i32,
    })
}
