//! Hard-negative thresholds on the device (kernels/select.cu; spec/losses.md, Variants `hard:k`,
//! Wang & Liu eq. 9).
//!
//! [`hard_thresholds`] returns, per anchor, `s_(k)`: the exact k-th largest of the anchor's
//! negative similarities, or `−inf` when `k ≥ #negatives` (every negative kept). The fused loss
//! kernels take it as their `s_threshold` array and keep the negatives with `s ≥ s_(k)` (ties at
//! the threshold all kept, so more than k may be kept).
//!
//! # Which similarities
//! The selection is exact on the **f32** similarities this kernel computes, which are those of
//! the v1 fused kernels (kernels/infonce.cu `sim_tile`): `s = Σ_d a_d b_d` as one sequential
//! `fmaf` chain in `d` order from +0 (zero-padded to a multiple of 32 columns) on the values as
//! stored. With `normalize = false` the threshold is therefore, bit for bit, one of the `s` the
//! fused kernel compares with it, and ties at `s_(k)` stay ties there. The fused path normalises
//! into a copy `u` (in the input dtype) before its loss kernels: **pass that copy here with
//! `normalize = false`**. `normalize = true` is for standalone use: it multiplies by
//! `inv_a · inv_b` (`inv = 1/max(‖x‖₂, 1e-12)`, squared norms summed in the same sequential order),
//! which is not bit-identical to normalising first.
//!
//! Against the f64 CPU reference ([`crate::reference`]), a negative whose similarity is within f32
//! rounding (a few ulps) of `s_(k)` may be selected differently; exact duplicates (equal rows)
//! stay tied.
//!
//! # Use with the fused loss (`hard:k`)
//! In `evaluate_device`, for `spec.variant().hard_k() == Some(k)`: build the `DeviceInputs` over
//! the matrices the loss kernels read (the normalised copies when the spec normalises), call
//! `hard_thresholds(gpu, &inputs, false, k, false)` and pass it as `InfonceParams::s_threshold`
//! of the row problem; in symmetric mode also `hard_thresholds(gpu, &inputs, false, k, true)` for
//! the column problem (X = B, Y = A). The threshold semantics are the kernel's
//! `!(s < threshold)`: `−inf` keeps everything, so `k ≥ #negatives` is the standard loss.
//!
//! # Method
//! One block per anchor (256 threads; each warp takes 32 negatives at a time, one per lane, the
//! slab of 32 key columns transposed through a shared tile); a radix select over the
//! order-preserving u32 keys of the similarities ([`orderable_key`]): three passes (digits
//! 31..21, 20..10, 9..0) recompute every similarity, histogram the next digit in shared memory
//! (integer atomics, so deterministic) and fix it. Nothing N×K is stored; the cost is three reads
//! of the negatives per anchor. [`radix_select_host`] is the same algorithm in Rust (tested here).
//!
//! A NaN similarity orders as `total_cmp` does (a positive NaN is the largest value); a NaN
//! threshold (a NaN among the k largest) keeps every negative in a kernel that drops `s < thr`.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::pairs::pair_set;
use crate::cuda::op::DeviceInputs;
use crate::cuda::runtime::launch::{self, launch, Args};
use crate::cuda::runtime::{DeviceElement, Gpu};
use crate::error::{Error, Result};

const KERNEL: &str = "select";
/// A grid or block shape.
type Dim3 = (u32, u32, u32);
/// Threads per block of `select_kth_*`: eight warps (the kernel's SELECT_WARPS), 32 negatives per
/// warp at a time.
pub(crate) const SELECT_THREADS: u32 = 256;

/// Grid and block of `select_kth_*` for `anchors` anchors: one block of [`SELECT_THREADS`]
/// threads per anchor, static shared memory only (8 KiB of histogram, 33 KiB of warp tiles).
pub(crate) fn select_dims(anchors: usize) -> Result<(Dim3, Dim3)> {
    Ok((
        (launch::grid_dim(KERNEL, anchors, 1)?, 1, 1),
        (SELECT_THREADS, 1, 1),
    ))
}

/// The number of anchors [`hard_thresholds`] returns a threshold for: N (queue, cross,
/// symmetric rows or columns) or 2N (inbatch).
pub fn threshold_len<T: DeviceElement>(inputs: &DeviceInputs<'_, T>) -> usize {
    match *inputs {
        DeviceInputs::Queue { query, .. }
        | DeviceInputs::Cross { query, .. }
        | DeviceInputs::Symmetric { query, .. } => query.rows(),
        DeviceInputs::InBatch { embeddings } => embeddings.rows(),
    }
}

/// Writes the hard-k thresholds of one side of `inputs` into `out` (at least one f32 per anchor):
/// `out[i] = s_(k)`, the k-th largest negative similarity of anchor `i` (`k ≥ 1`), or `−inf` when
/// `k ≥ #negatives`. `columns` selects symmetric mode's column anchors (an error in other modes);
/// `normalize` computes the similarities of the L2-normalised rows. Queued on `gpu`'s stream.
///
/// Negatives: queue, every row of the ring view; inbatch, every row but the anchor and its
/// positive; cross, every key row but the target (`targets[i]`, or `i` without targets; device
/// targets must lie in `[0, M)`, as for the fused kernels); symmetric rows, every key row but `i`;
/// symmetric columns, every query row but `j`.
///
/// Errors: `k = 0`, `columns` outside symmetric mode, inconsistent shapes, `out` too short.
pub fn hard_thresholds_into<T: DeviceElement>(
    gpu: &Gpu,
    inputs: &DeviceInputs<'_, T>,
    normalize: bool,
    k: usize,
    columns: bool,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if k == 0 {
        return Err(Error::parameter("k", k, "hard:k needs k ≥ 1"));
    }
    let p = pair_set(inputs, columns, normalize)?;
    if out.len() < p.anchors() {
        return Err(Error::shape(
            "threshold",
            format!("{} elements", out.len()),
            format!("at least {} (one per anchor)", p.anchors()),
        ));
    }
    if p.anchors() == 0 {
        return Ok(());
    }
    let (grid_dim, block_dim) = select_dims(p.anchors())?;
    let cfg = LaunchConfig {
        grid_dim,
        block_dim,
        shared_mem_bytes: 0,
    };
    let mut a = Args::new(gpu);
    p.push(&mut a);
    a.i64(i64::try_from(k).unwrap_or(i64::MAX)).write(out);
    // SAFETY: select_kth_<dtype>(PAIR_SET_PARAMS(T), int64_t k, float* threshold): const T*
    // anchors (n_anchors × cols), const T* keys (capacity × cols), const int64_t* targets
    // (null, or n_anchors elements: checked in pair_set), int64_t n_anchors, capacity, start, len,
    // int cols, skip_mode, normalize; the shapes and the ring view (start < capacity,
    // len ≤ capacity) were checked in pair_set, and `out` holds n_anchors floats (checked above);
    // SELECT_THREADS threads per block, as the kernel's tiles assume.
    unsafe {
        launch(
            gpu,
            KERNEL,
            KERNEL,
            &format!("select_kth_{}", T::DTYPE.name()),
            cfg,
            a,
        )
    }
}

/// As [`hard_thresholds_into`], allocating the output ([`threshold_len`] values; one element
/// when there are no anchors).
pub fn hard_thresholds<T: DeviceElement>(
    gpu: &Gpu,
    inputs: &DeviceInputs<'_, T>,
    normalize: bool,
    k: usize,
    columns: bool,
) -> Result<CudaSlice<f32>> {
    let mut out = gpu
        .stream()
        .alloc_zeros::<f32>(threshold_len(inputs).max(1))?;
    hard_thresholds_into(gpu, inputs, normalize, k, columns, &mut out)?;
    Ok(out)
}

/// The order-preserving u32 key of an f32 (the kernel's `orderable_key`): `a.total_cmp(b)` is
/// `key(a).cmp(key(b))`.
pub fn orderable_key(f: f32) -> u32 {
    let u = f.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// The inverse of [`orderable_key`].
pub fn key_to_f32(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7fff_ffff
    } else {
        !k
    })
}

/// The kernel's digits: (shift, bits) per pass.
const RADIX_DIGITS: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];

/// The k-th largest of `values` (`1 ≤ k ≤ values.len()`) by the kernel's algorithm, step for
/// step: three digit passes of histograms over the order-preserving keys that share the prefix
/// fixed so far; then warp 0's pick: lane `l` sums bins `[l·per, (l+1)·per)`, an inclusive suffix
/// sum over lanes finds the one lane whose range holds rank `k`, and that lane scans its bins from
/// the top. `None` when k is out of range.
pub fn radix_select_host(values: &[f32], k: usize) -> Option<f32> {
    if k == 0 || k > values.len() {
        return None;
    }
    let (mut prefix, mut mask, mut rank) = (0u32, 0u32, k as u64);
    for (shift, bits) in RADIX_DIGITS {
        let nbins = 1usize << bits;
        let mut hist = vec![0u64; nbins];
        for &v in values {
            let key = orderable_key(v);
            if key & mask == prefix {
                hist[((key >> shift) as usize) & (nbins - 1)] += 1;
            }
        }
        let per = nbins / 32;
        let mine: Vec<u64> = (0..32)
            .map(|l| hist[l * per..(l + 1) * per].iter().sum())
            .collect();
        let incl: Vec<u64> = (0..32).map(|l| mine[l..].iter().sum()).collect();
        let lanes: Vec<usize> = (0..32)
            .filter(|&l| incl[l] - mine[l] < rank && rank <= incl[l])
            .collect();
        let [lane] = lanes[..] else {
            return None;
        };
        let mut cum = incl[lane] - mine[lane];
        let mut digit = lane * per;
        for b in (lane * per..(lane + 1) * per).rev() {
            if cum + hist[b] >= rank {
                digit = b;
                break;
            }
            cum += hist[b];
        }
        prefix |= (digit as u32) << shift;
        rank -= cum;
        mask |= ((nbins - 1) as u32) << shift;
    }
    Some(key_to_f32(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn keys_order_as_total_cmp() {
        let v = [
            f32::from_bits(0xffc0_0000), // −NaN
            f32::NEG_INFINITY,
            -1.5,
            -f32::MIN_POSITIVE,
            -1e-45,
            -0.0,
            0.0,
            1e-45,
            0.25,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
        ];
        for a in v {
            assert_eq!(key_to_f32(orderable_key(a)).to_bits(), a.to_bits());
            for b in v {
                assert_eq!(
                    orderable_key(a).cmp(&orderable_key(b)),
                    a.total_cmp(&b),
                    "{a} vs {b}"
                );
            }
        }
    }

    fn kth_by_sort(v: &[f32], k: usize) -> f32 {
        let mut s = v.to_vec();
        s.sort_by(|a, b| b.total_cmp(a));
        s[k - 1]
    }

    #[test]
    fn radix_select_matches_sort_with_ties() {
        let mut rng = StdRng::seed_from_u64(7);
        for n in [1usize, 2, 3, 17, 300] {
            let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            // Duplicates, signed zeros, neighbours one ulp apart, and a tie run.
            if n > 10 {
                v[1] = v[0];
                v[2] = v[0];
                v[3] = 0.0;
                v[4] = -0.0;
                v[5] = f32::from_bits(v[6].to_bits() + 1);
                v[7] = -1.0;
            }
            for k in 1..=n {
                let got = radix_select_host(&v, k).unwrap();
                assert_eq!(got.to_bits(), kth_by_sort(&v, k).to_bits(), "n={n} k={k}");
            }
            assert_eq!(radix_select_host(&v, 0), None);
            assert_eq!(radix_select_host(&v, n + 1), None);
        }
        // Keys that share their top 22 bits (one bin in the first two passes), with repeats.
        let clustered: Vec<f32> = (0..700u32)
            .map(|i| f32::from_bits(0x3f80_0000 + (i * 7) % 300))
            .collect();
        for k in [1, 2, 3, 50, 299, 300, 301, 699, 700] {
            let got = radix_select_host(&clustered, k).unwrap();
            assert_eq!(got.to_bits(), kth_by_sort(&clustered, k).to_bits(), "k={k}");
        }
        let with_nan = [0.1f32, f32::NAN, 0.3, f32::NEG_INFINITY];
        assert!(radix_select_host(&with_nan, 1).unwrap().is_nan());
        assert_eq!(radix_select_host(&with_nan, 2), Some(0.3));
        assert_eq!(radix_select_host(&with_nan, 4), Some(f32::NEG_INFINITY));
    }

    #[test]
    fn launch_dims() {
        let (g, b) = select_dims(5).unwrap();
        assert_eq!(g, (5, 1, 1));
        assert_eq!(b, (SELECT_THREADS, 1, 1));
        assert_eq!(select_dims(0).unwrap().0, (1, 1, 1));
        assert!(select_dims(1usize << 40).is_err());
        assert_eq!(SELECT_THREADS % 32, 0);
    }
}
