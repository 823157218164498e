//! Embedding metrics on the device (kernels/metrics.cu; spec/losses.md, Metrics), on the
//! L2-normalised rows, for f32, f16 and bf16 inputs. Results stay in device memory (f32).
//!
//! - [`uniformity`]: `log mean_(i≠j) exp(−t ‖u_i − u_j‖²)` (Wang & Isola; Wang & Liu eq. 10),
//!   computed as `LSE_(i≠j) −t(‖u_i‖² + ‖u_j‖² − 2 s_ij) − log(n(n−1))` (`= 2t(s_ij − 1)` for unit
//!   rows; the general form keeps an all-zero row exact, as the CPU `metrics::uniformity` does).
//!   One fused pass: per row a running (max, sum) over `j ≠ i`, then one block merges the rows in
//!   a fixed order.
//! - [`tolerance`]: the mean of `s_ij` over pairs `i ≠ j` with equal labels (eq. 11), as
//!   `Σ_c (‖S_c‖² − Σ_(i∈c) ‖u_i‖²) / Σ_c n_c(n_c − 1)` with `S_c = Σ_(i∈c) u_i`: per-class sums in
//!   row order (one block per class and 128 columns; no pairwise pass, no float atomics). Labels are
//!   dense class ids in `[0, classes)` ([`dense_labels`] maps arbitrary labels on the host).
//! - [`penalty`]: the penalty histogram `H_b = (1/N) Σ_i Σ_(j neg, s_ij ∈ b) r_i(s_ij)` over `bins`
//!   equal bins of `[−1, 1]`, with `r_i(s_ij) = softmax_j(z_ij)` over the negatives,
//!   `z = s/τ(s)` (a fixed τ, or DySTreSS's `τ(s)`) (eq. 5), and the
//!   effective number of negatives `mean_i exp(entropy(r_i))`, fused: per anchor one pass for the
//!   negatives' LSE and one for the bins and the entropy; per-warp bins in shared memory, per-block
//!   partials, merged in a fixed order by one block.
//!
//! Every reduction runs in a fixed order: results are deterministic (for a given device, since
//! the launch shapes do not depend on it). Similarities are f32 (as in [`super::steps::select`]).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::op::DeviceInputs;
use super::runtime::launch::{self, launch, Args};
use super::runtime::Gpu;
use super::runtime::{DeviceElement, DeviceMatrix};
use super::steps::pairs::{pair_set, self_pairs};
use crate::error::{Error, Result};
use crate::spec::Temperature;

const KERNEL: &str = "metrics";
/// Threads per block of the pair kernels (uniformity rows, penalty): eight warps.
pub(crate) const PAIR_THREADS: u32 = 256;
/// Threads of the one-block merge kernels (a power of two, ≤ 1024).
pub(crate) const MERGE_THREADS: u32 = 256;
/// Rows per block of `metrics_rownorm_*` (one warp per row).
const ROWNORM_ROWS: usize = 8;
/// Threads (= columns) per block of `metrics_classsum_*` (the kernel's CLASSSUM_THREADS).
const CLASSSUM_THREADS: usize = 128;
/// Most blocks of `metrics_penalty_*` (each handles anchors b, b + G, …).
pub(crate) const PENALTY_MAX_BLOCKS: usize = 1024;
/// Most bins of the penalty histogram (8 warps × bins floats of shared memory: 32 KiB).
pub const PENALTY_MAX_BINS: usize = 1024;
/// The uniformity metric's usual `t`.
pub const UNIFORMITY_T: f64 = 2.0;

type Dims = ((u32, u32, u32), (u32, u32, u32), u32);

/// Grid, block and dynamic shared memory of `metrics_uniformity_rows_*`: one block per row.
pub(crate) fn uniformity_dims(rows: usize) -> Result<Dims> {
    Ok((
        (launch::grid_dim(KERNEL, rows, 1)?, 1, 1),
        (PAIR_THREADS, 1, 1),
        0,
    ))
}

/// Grid, block and shared memory of the one-block merges.
pub(crate) fn merge_dims() -> Dims {
    ((1, 1, 1), (MERGE_THREADS, 1, 1), 0)
}

/// Grid, block and shared memory of `metrics_rownorm_*`: one warp per row.
pub(crate) fn rownorm_dims(rows: usize) -> Result<Dims> {
    Ok((
        (launch::grid_dim(KERNEL, rows, ROWNORM_ROWS)?, 1, 1),
        (32 * ROWNORM_ROWS as u32, 1, 1),
        0,
    ))
}

/// Grid, block and shared memory of `metrics_classsum_*`: block (c, y) sums columns
/// `[128 y, 128 y + 128)` of class c.
pub(crate) fn classsum_dims(classes: usize, cols: usize) -> Result<Dims> {
    Ok((
        (
            launch::grid_dim(KERNEL, classes, 1)?,
            launch::grid_dim(KERNEL, cols, CLASSSUM_THREADS)?,
            1,
        ),
        (CLASSSUM_THREADS as u32, 1, 1),
        0,
    ))
}

/// Grid, block and dynamic shared memory of `metrics_penalty_*`: `min(anchors, 1024)` blocks,
/// `8 × bins` floats of per-warp bins.
pub(crate) fn penalty_dims(anchors: usize, bins: usize) -> Result<Dims> {
    if bins == 0 || bins > PENALTY_MAX_BINS {
        return Err(Error::parameter(
            "bins",
            bins,
            format!("must be in 1..={PENALTY_MAX_BINS}"),
        ));
    }
    let groups = anchors.clamp(1, PENALTY_MAX_BLOCKS);
    let smem = (PAIR_THREADS as usize / 32) * bins * std::mem::size_of::<f32>();
    Ok(((groups as u32, 1, 1), (PAIR_THREADS, 1, 1), smem as u32))
}

fn config(d: Dims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: d.0,
        block_dim: d.1,
        shared_mem_bytes: d.2,
    }
}

fn cols_i32(name: &'static str, cols: usize) -> Result<i32> {
    i32::try_from(cols).map_err(|_| Error::shape(name, format!("{cols} columns"), "D < 2^31"))
}

fn positive_finite(name: &'static str, v: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::parameter(name, v, "must be finite and > 0"));
    }
    Ok(())
}

/// The uniformity of the rows of `x` (normalised on the fly), with `t` (usually
/// [`UNIFORMITY_T`]): one f32 in device memory. Needs at least two rows.
pub fn uniformity<T: DeviceElement>(
    gpu: &Gpu,
    x: &DeviceMatrix<T>,
    t: f64,
) -> Result<CudaSlice<f32>> {
    let mut out = gpu.stream().alloc_zeros::<f32>(1)?;
    uniformity_into(gpu, x, t, &mut out)?;
    Ok(out)
}

/// As [`uniformity`], writing `out[0]`.
pub fn uniformity_into<T: DeviceElement>(
    gpu: &Gpu,
    x: &DeviceMatrix<T>,
    t: f64,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    positive_finite("t", t)?;
    let n = x.rows();
    if n < 2 {
        return Err(Error::shape(
            "x",
            format!("[{n}, {}]", x.cols()),
            "at least two rows (uniformity averages over pairs)",
        ));
    }
    if out.is_empty() {
        return Err(Error::shape("uniformity", "0 elements", "at least 1"));
    }
    let p = self_pairs(x, true)?;
    let mut row_max = gpu.stream().alloc_zeros::<f32>(n)?;
    let mut row_sum = gpu.stream().alloc_zeros::<f32>(n)?;
    let t32 = t as f32;
    let mut a = Args::new(gpu);
    p.push(&mut a);
    a.f32(t32).write(&mut row_max).write(&mut row_sum);
    // SAFETY: metrics_uniformity_rows_<dtype>(PAIR_SET_PARAMS(T), float t, float* row_max,
    // float* row_sum); the pair set is x against itself (n × cols, skipping row i), row_max and
    // row_sum hold n floats; PAIR_THREADS threads per block.
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            &format!("metrics_uniformity_rows_{}", T::DTYPE.name()),
            config(uniformity_dims(n)?),
            a,
        )
    }?;
    let log_count = ((n as f64) * (n as f64 - 1.0)).ln() as f32;
    let mut a = Args::new(gpu);
    a.read(&row_max)
        .read(&row_sum)
        .i64(n as i64)
        .f32(log_count)
        .write(out);
    // SAFETY: metrics_lse_merge(const float* row_max, const float* row_sum, int64_t rows,
    // float log_count, float* out); row_max and row_sum hold `rows` floats, out at least one
    // (checked above); one block of MERGE_THREADS (a power of two ≤ 1024, the kernel's shared
    // array) threads.
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            "metrics_lse_merge",
            config(merge_dims()),
            a,
        )
    }
}

/// Maps arbitrary labels to dense class ids `0..classes` (in increasing label order) for
/// [`tolerance`]: returns the ids and the number of classes.
pub fn dense_labels(labels: &[i64]) -> (Vec<i64>, usize) {
    let mut distinct = labels.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let ids = labels
        .iter()
        .map(|l| distinct.binary_search(l).map_or(-1, |i| i as i64))
        .collect();
    (ids, distinct.len())
}

/// The tolerance of the rows of `x` (normalised on the fly) under `labels` (one dense class id
/// per row, in `[0, classes)`; ids outside that range belong to no class): one f32 in device
/// memory, NaN when no class has two rows.
pub fn tolerance<T: DeviceElement>(
    gpu: &Gpu,
    x: &DeviceMatrix<T>,
    labels: &CudaSlice<i64>,
    classes: usize,
) -> Result<CudaSlice<f32>> {
    let mut out = gpu.stream().alloc_zeros::<f32>(1)?;
    tolerance_into(gpu, x, labels, classes, &mut out)?;
    Ok(out)
}

/// As [`tolerance`], writing `out[0]`.
pub fn tolerance_into<T: DeviceElement>(
    gpu: &Gpu,
    x: &DeviceMatrix<T>,
    labels: &CudaSlice<i64>,
    classes: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let (n, d) = (x.rows(), x.cols());
    if labels.len() < n {
        return Err(Error::shape(
            "labels",
            format!("{} elements", labels.len()),
            format!("{n} (one per row)"),
        ));
    }
    if classes == 0 {
        return Err(Error::parameter("classes", classes, "must be ≥ 1"));
    }
    if out.is_empty() {
        return Err(Error::shape("tolerance", "0 elements", "at least 1"));
    }
    if n == 0 || d == 0 {
        return Err(Error::shape(
            "x",
            format!("[{n}, {d}]"),
            "at least one row and one column",
        ));
    }
    let cols = cols_i32("x", d)?;
    let (rows, classes_i) = (n as i64, classes as i64);
    let name = T::DTYPE.name();
    let s = gpu.stream();
    let mut inv = s.alloc_zeros::<f32>(n)?;
    let mut sq = s.alloc_zeros::<f32>(n)?;
    let mut a = Args::new(gpu);
    a.read(x.slice())
        .i64(rows)
        .i32(cols)
        .write(&mut inv)
        .write(&mut sq);
    // SAFETY: metrics_rownorm_<dtype>(const T* x, int64_t rows, int cols, float* inv_norm,
    // float* sqnorm); x holds rows × cols elements, inv and sq `rows` floats; one warp per row.
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            &format!("metrics_rownorm_{name}"),
            config(rownorm_dims(n)?),
            a,
        )
    }?;
    let sum_len = classes
        .checked_mul(d)
        .ok_or_else(|| Error::parameter("classes", classes, "classes × D must fit in memory"))?;
    let mut class_sum = s.alloc_zeros::<f32>(sum_len)?;
    let mut class_count = s.alloc_zeros::<i64>(classes)?;
    let mut class_sq = s.alloc_zeros::<f32>(classes)?;
    let mut a = Args::new(gpu);
    a.read(x.slice())
        .read(&inv)
        .read(&sq)
        .read(labels)
        .i64(rows)
        .i32(cols)
        .i64(classes_i)
        .write(&mut class_sum)
        .write(&mut class_count)
        .write(&mut class_sq);
    // SAFETY: metrics_classsum_<dtype>(const T* x, const float* inv_norm, const float* sqnorm,
    // const int64_t* labels, int64_t rows, int cols, int64_t classes, float* class_sum, int64_t*
    // class_count, float* class_sq); x holds rows × cols, inv/sq/labels ≥ rows (checked),
    // class_sum classes × cols, class_count and class_sq `classes` elements; the block is
    // CLASSSUM_THREADS threads as the kernel's shared tiles expect.
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            &format!("metrics_classsum_{name}"),
            config(classsum_dims(classes, d)?),
            a,
        )
    }?;
    let mut a = Args::new(gpu);
    a.read(&class_sum)
        .read(&class_count)
        .read(&class_sq)
        .i64(classes_i)
        .i32(cols)
        .write(out);
    // SAFETY: metrics_tolerance_merge(const float* class_sum, const int64_t* class_count,
    // const float* class_sq, int64_t classes, int cols, float* out); buffers sized as allocated
    // above, out ≥ 1 element; one block of MERGE_THREADS (≤ 1024, the kernel's shared arrays).
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            "metrics_tolerance_merge",
            config(merge_dims()),
            a,
        )
    }
}

/// The penalty histogram and the effective number of negatives, in device memory.
#[derive(Debug)]
pub struct PenaltyMetrics {
    /// `H_b` for the `bins` equal bins of `[−1, 1]` (bin b covers `[−1 + 2b/B, −1 + 2(b+1)/B)`,
    /// the last one closed; similarities outside `[−1, 1]` are counted in the end bins).
    pub histogram: CudaSlice<f32>,
    /// `mean_i exp(entropy(r_i))` (one f32).
    pub effective_negatives: CudaSlice<f32>,
}

/// The penalty histogram over `bins` bins (`1..=1024`) and the effective number of negatives of
/// the anchors of `inputs` (all modes; with `columns`, symmetric mode's column anchors), on the
/// normalised rows, with the logits `z = s/τ(s)` of `temperature` (fixed, learnable: its value;
/// DySTreSS: `τ(s)`), as the CPU `metrics::penalty_histogram` and `metrics::effective_negatives`
/// define them.
///
/// Both are means over the N anchors of that side; an anchor without negatives (an empty queue)
/// adds 0 to both.
pub fn penalty<T: DeviceElement>(
    gpu: &Gpu,
    inputs: &DeviceInputs<'_, T>,
    columns: bool,
    temperature: &Temperature,
    bins: usize,
) -> Result<PenaltyMetrics> {
    let (tau_min, tau_max) = match *temperature {
        Temperature::Fixed(t) | Temperature::Learnable(t) => {
            positive_finite("temperature", t)?;
            (t, t)
        }
        Temperature::Dystress {
            tau_min, tau_max, ..
        } => {
            positive_finite("tau_min", tau_min)?;
            positive_finite("tau_max", tau_max)?;
            if tau_max < tau_min {
                return Err(Error::parameter(
                    "dystress",
                    format!("{tau_min},{tau_max}"),
                    "needs tau_min <= tau_max",
                ));
            }
            (tau_min, tau_max)
        }
    };
    let (tau_min, tau_max) = (tau_min as f32, tau_max as f32);
    let p = pair_set(inputs, columns, true)?;
    let n = p.anchors();
    if n == 0 {
        return Err(Error::shape(
            "anchors",
            "0 rows",
            "at least one anchor (the metrics are means over anchors)",
        ));
    }
    let dims = penalty_dims(n, bins)?;
    let groups = dims.0 .0 as usize;
    let s = gpu.stream();
    let mut hist_part = s.alloc_zeros::<f32>(groups * bins)?;
    let mut eff_part = s.alloc_zeros::<f32>(groups)?;
    let bins_i = bins as i32;
    let name = T::DTYPE.name();
    let mut a = Args::new(gpu);
    p.push(&mut a);
    a.f32(tau_min)
        .f32(tau_max)
        .i32(bins_i)
        .write(&mut hist_part)
        .write(&mut eff_part);
    // SAFETY: metrics_penalty_<dtype>(PAIR_SET_PARAMS(T), float tau_min, float tau_max, int bins,
    // float* hist_part, float* eff_part); the pair set's shapes were checked by pair_set;
    // hist_part holds gridDim.x × bins floats and eff_part gridDim.x; the dynamic shared memory
    // is nwarps × bins floats as the kernel indexes it.
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            &format!("metrics_penalty_{name}"),
            config(dims),
            a,
        )
    }?;
    let mut histogram = s.alloc_zeros::<f32>(bins)?;
    let mut effective_negatives = s.alloc_zeros::<f32>(1)?;
    let groups_i = groups as i32;
    let scale = (1.0 / n as f64) as f32;
    let mut a = Args::new(gpu);
    a.read(&hist_part)
        .read(&eff_part)
        .i32(groups_i)
        .i32(bins_i)
        .f32(scale)
        .write(&mut histogram)
        .write(&mut effective_negatives);
    // SAFETY: metrics_penalty_merge(const float* hist_part, const float* eff_part, int groups,
    // int bins, float scale, float* hist, float* out_eff); sizes as allocated above; one block.
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            "metrics_penalty_merge",
            config(merge_dims()),
            a,
        )
    }?;
    Ok(PenaltyMetrics {
        histogram,
        effective_negatives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_dims() {
        assert_eq!(uniformity_dims(7).unwrap().0, (7, 1, 1));
        assert_eq!(uniformity_dims(7).unwrap().1, (PAIR_THREADS, 1, 1));
        assert_eq!(rownorm_dims(17).unwrap().0, (3, 1, 1));
        let (g, b, _) = classsum_dims(5, 300).unwrap();
        assert_eq!((g, b), ((5, 3, 1), (128, 1, 1)));
        let (g, b, smem) = penalty_dims(3000, 20).unwrap();
        assert_eq!(
            (g, b, smem),
            ((1024, 1, 1), (PAIR_THREADS, 1, 1), 8 * 20 * 4)
        );
        assert_eq!(penalty_dims(3, 1024).unwrap().0, (3, 1, 1));
        assert!(penalty_dims(3, 0).is_err());
        assert!(penalty_dims(3, PENALTY_MAX_BINS + 1).is_err());
        // Static (≤ 1 KiB) plus dynamic shared memory stays under the 48 KiB default limit.
        assert!(penalty_dims(1, PENALTY_MAX_BINS).unwrap().2 + 1024 <= 48 * 1024);
        assert!(MERGE_THREADS.is_power_of_two() && MERGE_THREADS <= 1024);
        assert_eq!(PAIR_THREADS / 32, 8);
    }

    #[test]
    fn dense_labels_are_sorted_ids() {
        let (ids, c) = dense_labels(&[7, -3, 7, 100, -3, 5]);
        assert_eq!(c, 4);
        assert_eq!(ids, vec![2, 0, 2, 3, 0, 1]);
        assert_eq!(dense_labels(&[]), (vec![], 0));
    }
}
