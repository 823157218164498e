//! The simple path's kernel parameters and launch configurations: the tile sizes of
//! kernels/infonce.cu, the row pass's split of the keys into chunks ([`plan_rows`]), one launch
//! configuration per pass, and the `InfonceParams` block every tile kernel takes.

use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::cuda::runtime::launch::{self, Ptr};
use crate::error::Result;
use crate::spec::{DystressGrad, LossSpec, Temperature, Variant};

/// The kernel module (`kernels/infonce.cu`).
pub const MODULE: &str = "infonce";
/// Anchors per tile (`TILE_A` in the kernels).
pub const TILE_A: usize = 16;
/// Keys per tile (`TILE_K`).
pub const TILE_K: usize = 32;
/// Threads of the tile kernels (`THREADS`; the kernels assume exactly this block size).
pub const THREADS: u32 = 128;
/// Anchors per block of the merge (one warp each).
pub const MERGE_ROWS: usize = THREADS as usize / 32;
/// Rows per block of the finish kernel (one warp each, 256 threads).
pub const FINISH_ROWS: usize = 8;
/// Threads of the reduce kernel (`REDUCE_THREADS`).
pub const REDUCE_THREADS: u32 = 256;
/// The fewest keys worth a chunk (a block) of their own in the row pass.
pub const MIN_CHUNK_KEYS: usize = 512;
/// The row pass aims at this many blocks per SM before it stops splitting the keys.
pub const BLOCKS_PER_SM: usize = 4;

/// How the row pass splits its work: a grid of anchor tiles × key chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsPlan {
    /// `ceil(n_anchors / TILE_A)`.
    pub anchor_tiles: u32,
    /// Number of key chunks (grid.y), ≥ 1.
    pub chunks: u32,
    /// Keys per chunk, a multiple of `TILE_K` (the last chunk may be shorter).
    pub chunk_len: usize,
}

/// Plans the row pass for `n_anchors` anchors and `n_keys` keys on a device with `sm_count` SMs.
///
/// Few anchors (MoCo's queue with a small batch) split the keys into chunks so that the grid
/// fills the device (spec: *Chunking*); chunks hold at least [`MIN_CHUNK_KEYS`] keys and at most
/// 65535 chunks are made. Every key lies in exactly one chunk.
pub fn plan_rows(n_anchors: usize, n_keys: usize, sm_count: u32) -> Result<RowsPlan> {
    const KERNEL: &str = "infonce_rows";
    let anchor_tiles = launch::grid_dim(KERNEL, n_anchors, TILE_A)?;
    let target = (sm_count.max(1) as usize) * BLOCKS_PER_SM;
    let want = target.div_ceil(anchor_tiles as usize).max(1);
    let by_keys = n_keys.div_ceil(MIN_CHUNK_KEYS).max(1);
    let chunks = want.min(by_keys).min(65535);
    let chunk_len = n_keys.div_ceil(chunks).div_ceil(TILE_K).max(1) * TILE_K;
    let chunks = n_keys.div_ceil(chunk_len).max(1);
    Ok(RowsPlan {
        anchor_tiles,
        chunks: chunks as u32,
        chunk_len,
    })
}

fn block(threads: u32) -> (u32, u32, u32) {
    (threads, 1, 1)
}

/// The row pass's launch configuration (static shared memory only).
pub fn rows_config(plan: &RowsPlan) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (plan.anchor_tiles, plan.chunks, 1),
        block_dim: block(THREADS),
        shared_mem_bytes: 0,
    }
}

/// The merge's launch configuration: one warp per anchor.
pub fn merge_config(n_anchors: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            launch::grid_dim("infonce_merge", n_anchors, MERGE_ROWS)?,
            1,
            1,
        ),
        block_dim: block(THREADS),
        shared_mem_bytes: 0,
    })
}

/// The column pass's launch configuration: one block per `TILE_K` keys.
pub fn cols_config(n_keys: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (launch::grid_dim("infonce_cols", n_keys, TILE_K)?, 1, 1),
        block_dim: block(THREADS),
        shared_mem_bytes: 0,
    })
}

/// The finish kernel's launch configuration: one warp per row.
pub fn finish_config(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (launch::grid_dim("infonce_finish", rows, FINISH_ROWS)?, 1, 1),
        block_dim: block(32 * FINISH_ROWS as u32),
        shared_mem_bytes: 0,
    })
}

/// The reduce kernel's launch configuration: one block.
pub fn reduce_config() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: block(REDUCE_THREADS),
        shared_mem_bytes: 0,
    }
}

/// `POS_*`, `VARIANT_*`, `TEMP_*` of kernels/infonce.cuh.
pub(super) const POS_NONE: i32 = 0;
pub(super) const POS_PAIR: i32 = 1;
pub(super) const POS_TARGET: i32 = 2;
pub(super) const VARIANT_STANDARD: i32 = 0;
pub(super) const VARIANT_DECOUPLED: i32 = 1;
pub(super) const VARIANT_SIMPLE: i32 = 2;
pub(super) const TEMP_CONST: i32 = 0;
pub(super) const TEMP_DYSTRESS_DETACH: i32 = 1;
pub(super) const TEMP_DYSTRESS_FULL: i32 = 2;

/// The parameter block of the tile kernels: `InfonceParams` of kernels/infonce.cuh, field by
/// field (pointers as [`Ptr`]s from the `Args` that guards their buffers; [`Ptr::NULL`] = null).
/// The size is asserted on both sides.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct InfonceParams {
    pub(super) x: Ptr,
    pub(super) y: Ptr,
    pub(super) pos: Ptr,
    pub(super) targets: Ptr,
    pub(super) s_threshold: Ptr,
    pub(super) weights: Ptr,
    pub(super) part_max: Ptr,
    pub(super) part_sum: Ptr,
    pub(super) part_pz: Ptr,
    pub(super) part_acc: Ptr,
    pub(super) lse: Ptr,
    pub(super) loss: Ptr,
    pub(super) dpos: Ptr,
    pub(super) scale: Ptr,
    pub(super) dtau: Ptr,
    pub(super) grad_x: Ptr,
    pub(super) grad_y: Ptr,
    pub(super) grad_pos: Ptr,
    pub(super) n_anchors: i64,
    pub(super) n_keys: i64,
    pub(super) y_start: i64,
    pub(super) y_cap: i64,
    pub(super) chunk_len: i64,
    pub(super) dim: i32,
    pub(super) n_chunks: i32,
    pub(super) pos_kind: i32,
    pub(super) self_skip: i32,
    pub(super) variant: i32,
    pub(super) temp_kind: i32,
    pub(super) inv_tau: f32,
    pub(super) tau: f32,
    pub(super) tau_min: f32,
    pub(super) tau_max: f32,
    pub(super) lambda: f32,
    pub(super) has_lambda: i32,
}
const _: () = assert!(std::mem::size_of::<InfonceParams>() == 232);
// Field offsets, asserted identically in kernels/infonce.cuh (offsetof).
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(InfonceParams, x) == 0);
    assert!(offset_of!(InfonceParams, y) == 8);
    assert!(offset_of!(InfonceParams, pos) == 16);
    assert!(offset_of!(InfonceParams, targets) == 24);
    assert!(offset_of!(InfonceParams, s_threshold) == 32);
    assert!(offset_of!(InfonceParams, weights) == 40);
    assert!(offset_of!(InfonceParams, part_max) == 48);
    assert!(offset_of!(InfonceParams, part_sum) == 56);
    assert!(offset_of!(InfonceParams, part_pz) == 64);
    assert!(offset_of!(InfonceParams, part_acc) == 72);
    assert!(offset_of!(InfonceParams, lse) == 80);
    assert!(offset_of!(InfonceParams, loss) == 88);
    assert!(offset_of!(InfonceParams, dpos) == 96);
    assert!(offset_of!(InfonceParams, scale) == 104);
    assert!(offset_of!(InfonceParams, dtau) == 112);
    assert!(offset_of!(InfonceParams, grad_x) == 120);
    assert!(offset_of!(InfonceParams, grad_y) == 128);
    assert!(offset_of!(InfonceParams, grad_pos) == 136);
    assert!(offset_of!(InfonceParams, n_anchors) == 144);
    assert!(offset_of!(InfonceParams, n_keys) == 152);
    assert!(offset_of!(InfonceParams, y_start) == 160);
    assert!(offset_of!(InfonceParams, y_cap) == 168);
    assert!(offset_of!(InfonceParams, chunk_len) == 176);
    assert!(offset_of!(InfonceParams, dim) == 184);
    assert!(offset_of!(InfonceParams, n_chunks) == 188);
    assert!(offset_of!(InfonceParams, pos_kind) == 192);
    assert!(offset_of!(InfonceParams, self_skip) == 196);
    assert!(offset_of!(InfonceParams, variant) == 200);
    assert!(offset_of!(InfonceParams, temp_kind) == 204);
    assert!(offset_of!(InfonceParams, inv_tau) == 208);
    assert!(offset_of!(InfonceParams, tau) == 212);
    assert!(offset_of!(InfonceParams, tau_min) == 216);
    assert!(offset_of!(InfonceParams, tau_max) == 220);
    assert!(offset_of!(InfonceParams, lambda) == 224);
    assert!(offset_of!(InfonceParams, has_lambda) == 228);
};

// SAFETY: a #[repr(C)] struct of addresses (Ptr: a transparent u64), integers and floats laid out
// exactly as the CUDA struct
// (same field order and types; sizes asserted on both sides), passed by value as a kernel argument.
unsafe impl DeviceRepr for InfonceParams {}

/// The spec's temperature and variant as kernel parameters.
pub(super) fn loss_params(spec: &LossSpec) -> Result<InfonceParams> {
    let mut p = InfonceParams::default();
    match spec.temperature() {
        Temperature::Fixed(t) | Temperature::Learnable(t) => {
            p.temp_kind = TEMP_CONST;
            p.tau = t as f32;
            p.inv_tau = (1.0 / t) as f32;
        }
        Temperature::Dystress {
            tau_min,
            tau_max,
            grad,
        } => {
            p.temp_kind = match grad {
                DystressGrad::Detach => TEMP_DYSTRESS_DETACH,
                DystressGrad::Full => TEMP_DYSTRESS_FULL,
            };
            p.tau_min = tau_min as f32;
            p.tau_max = tau_max as f32;
            p.tau = tau_min as f32; // only dL/dτ reads it, and DySTreSS has none
            p.inv_tau = (1.0 / tau_min) as f32;
        }
    }
    // hard:k and HardSimple run the standard and simple kernels with per-anchor similarity
    // thresholds from `select::hard_thresholds` (see `evaluate`).
    match spec.variant() {
        Variant::Standard | Variant::Hard { .. } => p.variant = VARIANT_STANDARD,
        Variant::Decoupled => p.variant = VARIANT_DECOUPLED,
        Variant::Simple { lambda, .. } => {
            p.variant = VARIANT_SIMPLE;
            if let Some(l) = lambda {
                p.has_lambda = 1;
                p.lambda = l as f32;
            }
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_plan_covers_every_key_once() {
        for &(n, k, sms) in &[
            (1usize, 0usize, 132u32),
            (1, 1, 132),
            (256, 65536, 132),
            (4096, 1 << 20, 132),
            (32769, 65536, 132),
            (17, 1000, 1),
            (33, 31, 8),
            (1, 65537, 132),
            (1, 100_000_000, 132),
        ] {
            let p = plan_rows(n, k, sms).unwrap();
            assert_eq!(p.anchor_tiles as usize, n.div_ceil(TILE_A).max(1));
            assert!(p.chunks >= 1 && p.chunks <= 65535);
            assert_eq!(p.chunk_len % TILE_K, 0, "{n} {k}");
            assert!(p.chunk_len >= TILE_K);
            // Every key is in exactly one chunk, and no chunk is empty unless K = 0.
            assert!(p.chunks as usize * p.chunk_len >= k, "{n} {k}: {p:?}");
            if k > 0 {
                assert!((p.chunks as usize - 1) * p.chunk_len < k, "{n} {k}: {p:?}");
            } else {
                assert_eq!(p.chunks, 1);
            }
        }
    }

    #[test]
    fn rows_plan_splits_keys_only_for_few_anchors() {
        // MoCo: 256 queries = 16 tiles, a 65536-key queue: split until ~4 blocks per SM.
        let p = plan_rows(256, 65536, 132).unwrap();
        assert_eq!(p.anchor_tiles, 16);
        assert_eq!(p.chunks, 33);
        assert!(p.chunk_len >= MIN_CHUNK_KEYS);
        // CLIP-sized: enough anchor tiles already, one chunk.
        let p = plan_rows(32768, 32768, 132).unwrap();
        assert_eq!(p.chunks, 1);
        assert_eq!(p.chunk_len, 32768);
        // Few keys: never a chunk below MIN_CHUNK_KEYS keys.
        let p = plan_rows(1, 1000, 132).unwrap();
        assert_eq!(p.chunks, 2);
    }

    #[test]
    fn launch_configs_are_in_range() {
        let c = rows_config(&plan_rows(33, 100, 4).unwrap());
        assert_eq!(c.block_dim, (THREADS, 1, 1));
        assert_eq!(c.grid_dim.0, 3);
        let c = merge_config(9).unwrap();
        assert_eq!(c.grid_dim, (3, 1, 1));
        let c = cols_config(65).unwrap();
        assert_eq!(c.grid_dim, (3, 1, 1));
        let c = finish_config(17).unwrap();
        assert_eq!(c.grid_dim, (3, 1, 1));
        assert_eq!(c.block_dim, (256, 1, 1));
        assert_eq!(reduce_config().block_dim, (REDUCE_THREADS, 1, 1));
        // 2^31 anchors is still a grid.x of 2^27 merge blocks.
        assert_eq!(merge_config(1 << 31).unwrap().grid_dim.0, 1 << 29);
        assert!(merge_config(usize::MAX).is_err());
    }

    #[test]
    fn hard_k_runs_the_standard_and_simple_kernels_with_thresholds() {
        let spec = LossSpec::queue()
            .variant(Variant::Hard { k: 4 })
            .build()
            .unwrap();
        assert_eq!(loss_params(&spec).unwrap().variant, VARIANT_STANDARD);
        let spec = LossSpec::queue()
            .variant(Variant::Simple {
                lambda: None,
                hard_k: Some(3),
            })
            .build()
            .unwrap();
        let p = loss_params(&spec).unwrap();
        assert_eq!((p.variant, p.has_lambda), (VARIANT_SIMPLE, 0));
    }

    #[test]
    fn loss_params_encode_the_temperature() {
        let spec = LossSpec::queue().temperature(0.5).build().unwrap();
        let p = loss_params(&spec).unwrap();
        assert_eq!((p.temp_kind, p.tau, p.inv_tau), (TEMP_CONST, 0.5, 2.0));
        let spec = LossSpec::queue()
            .dystress(0.1, 0.2, DystressGrad::Full)
            .variant(Variant::Simple {
                lambda: Some(0.25),
                hard_k: None,
            })
            .build()
            .unwrap();
        let p = loss_params(&spec).unwrap();
        assert_eq!(p.temp_kind, TEMP_DYSTRESS_FULL);
        assert_eq!(
            (p.variant, p.has_lambda, p.lambda),
            (VARIANT_SIMPLE, 1, 0.25)
        );
    }
}
