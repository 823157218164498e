//! Inbatch, cross and symmetric modes on the tensor-core pair kernels (kernels/infonce_mma.cu).
//!
//! `evaluate` runs, in this order:
//! 1. `side_lse` for the rows (and, in symmetric mode, for the columns: the swapped side):
//!    `infonce_mma_pair_lse_<dtype>_d<D>` (per column split, the rows' online (max, sum)) →
//!    `infonce_mma_pair_combine_<dtype>` (the splits merged: LSE and per-row loss);
//! 2. `gradients`: `infonce_mma_pair_grad_<dtype>_d<D>` once per input, recomputing the logits
//!    and forming `g = w (P − onehot)` in registers before the tensor-core product into the
//!    gradient (f32 atomics across splits), with Σ g·s for dτ on the first;
//! 3. the reduction and dτ (steps::reduce), the gradients' dtype (steps::convert).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{queue_split, unsupported, weight_scale, Checked, BLOCK_KEYS, BLOCK_ROWS, MODULE};
use super::{STAGES, THREADS};
use crate::cuda::op::{DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput};
use crate::cuda::runtime::launch::{self, launch, Args};
use crate::cuda::runtime::{DeviceElement, DeviceMatrix, Gpu};
use crate::cuda::steps::convert::cast_grad;
use crate::cuda::steps::reduce::{reduce_losses, sum_scaled};
use crate::error::Result;
use crate::loss::Upstream;
use crate::spec::{LossSpec, Mode};

// kernels/infonce_mma.cu TargetKind.
const TGT_IDENTITY: i32 = 0;
const TGT_ARRAY: i32 = 1;
const TGT_HALF_SHIFT: i32 = 2;

/// One side of a pair problem: rows X against columns Y, with how row r's positive column is
/// found.
struct Side<'a, T: DeviceElement> {
    x: &'a CudaSlice<T>,
    rows: usize,
    y: &'a CudaSlice<T>,
    cols: usize,
    tgt_kind: i32,
    tgt: Option<&'a CudaSlice<i64>>,
    half: i64,
    mask_self: bool,
}

impl<T: DeviceElement> Side<'_, T> {
    /// The same problem with rows and columns swapped (the second gradient's).
    fn swapped(&self) -> Self {
        Side {
            x: self.y,
            rows: self.cols,
            y: self.x,
            cols: self.rows,
            ..*self
        }
    }
}

impl<T: DeviceElement> Clone for Side<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: DeviceElement> Copy for Side<'_, T> {}

/// What the row and column terms of a gradient pass read: each an LSE array and a weight array
/// (with the element its anchors start at); `None` leaves the term out.
#[derive(Clone, Copy)]
struct Terms<'a> {
    row: Option<(&'a CudaSlice<f32>, &'a CudaSlice<f32>, usize)>,
    col: Option<(&'a CudaSlice<f32>, &'a CudaSlice<f32>, usize)>,
}

/// What one launch of the pair kernels computes: pass 1's per-split (max, sum), or pass 2's
/// gradient (and Σ g·s for dτ on `dtau_terms` of the terms).
enum Pass<'a> {
    Lse {
        part_m: &'a mut CudaSlice<f32>,
        part_l: &'a mut CudaSlice<f32>,
    },
    Grad {
        terms: Terms<'a>,
        dx: &'a mut CudaSlice<f32>,
        dtau: Option<(&'a mut CudaSlice<f32>, i32)>,
        w_scale: f32,
        theta: f32,
    },
}

/// Launches pass 1 (`infonce_mma_pair_lse_<dtype>_d<D>`) or pass 2
/// (`infonce_mma_pair_grad_<dtype>_d<D>`) of the pair kernels over `side`.
#[allow(clippy::too_many_arguments)]
fn launch_pass<T: DeviceElement>(
    gpu: &Gpu,
    side: &Side<'_, T>,
    d: usize,
    splits: usize,
    per: usize,
    scale_log2: f32,
    alpha: f32,
    pass: Pass<'_>,
) -> Result<()> {
    if splits == 0 {
        return Ok(());
    }
    const K: &str = "infonce_mma_pair";
    let grad = matches!(pass, Pass::Grad { .. });
    let name = format!(
        "infonce_mma_pair_{}_{}_d{d}",
        if grad { "grad" } else { "lse" },
        T::DTYPE.name()
    );
    let cfg = LaunchConfig {
        grid_dim: (
            launch::grid_dim(K, side.rows, BLOCK_ROWS)?,
            u32::try_from(splits).map_err(|_| unsupported("too many splits"))?,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: (STAGES * BLOCK_KEYS * d * 2) as u32,
    };
    let mut a = Args::new(gpu);
    a.read(side.x)
        .i64(side.rows as i64)
        .read(side.y)
        .i64(side.cols as i64)
        .i64(per as i64)
        .f32(scale_log2)
        .i32(i32::from(side.mask_self))
        .i32(side.tgt_kind)
        .read_opt(side.tgt)
        .i64(side.half);
    match pass {
        Pass::Lse { part_m, part_l } => {
            a.write(part_m).write(part_l);
            a.null()
                .null()
                .null()
                .null()
                .f32(0.0)
                .f32(1.0)
                .null()
                .null()
                .i32(0)
                .f32(0.0);
        }
        Pass::Grad {
            terms,
            dx,
            dtau,
            w_scale,
            theta,
        } => {
            a.null().null();
            for term in [terms.row, terms.col] {
                match term {
                    Some((lse, w, at)) => {
                        a.read(lse).read_at(w, at)?;
                    }
                    None => {
                        a.null().null();
                    }
                }
            }
            a.f32(alpha).f32(w_scale).write(dx);
            match dtau {
                Some((acc, n)) => a.write(acc).i32(n),
                None => a.null().i32(0),
            };
            a.f32(theta);
        }
    }
    // SAFETY: infonce_mma_pair_{lse,grad}_<dtype>_d<D>(const T* x, int64_t rows, const T* y,
    // int64_t cols, int64_t cols_per_split, float scale_log2, int mask_self, int tgt_kind,
    // const int64_t* tgt, int64_t half, float* part_m, float* part_l, const float* lse_row,
    // const float* w_row, const float* lse_col, const float* w_col, float alpha, float w_scale,
    // float* dx, float* dtau_acc, int dtau_terms, float filter_thr). x holds rows×D, y cols×D,
    // targets (kind ARRAY) rows indices < cols; pass 1 writes splits×rows partials; pass 2 reads
    // the row terms (rows floats) and column terms (cols floats) when given and adds into dx
    // (rows×D f32) and dtau (one f32, only when dtau_terms > 0). STAGES tiles of 64×D elements
    // of dynamic shared memory, THREADS threads.
    unsafe { launch(gpu, K, MODULE, &name, cfg, a) }
}

/// The row LSE and per-row loss of one side (pass 1, then `infonce_mma_pair_combine_<dtype>`
/// merging its splits): `lse` gets `side.rows` values, `loss` gets them from element `loss_at` on.
fn side_lse<T: DeviceElement>(
    gpu: &Gpu,
    side: &Side<'_, T>,
    pass: &PassConsts,
    lse: &mut CudaSlice<f32>,
    loss: &mut CudaSlice<f32>,
    loss_at: usize,
) -> Result<()> {
    let (d, scale_log2, alpha) = (pass.d, pass.scale_log2, pass.alpha);
    let stream = gpu.stream();
    let (splits, per) = queue_split(gpu.properties().sm_count, side.rows, side.cols);
    let mut part_m = stream.alloc_zeros::<f32>((splits * side.rows).max(1))?;
    let mut part_l = stream.alloc_zeros::<f32>((splits * side.rows).max(1))?;
    let lse_pass = Pass::Lse {
        part_m: &mut part_m,
        part_l: &mut part_l,
    };
    launch_pass::<T>(gpu, side, d, splits, per, scale_log2, alpha, lse_pass)?;
    const K: &str = "infonce_mma_pair_combine";
    let cfg = LaunchConfig {
        grid_dim: (launch::grid_dim(K, side.rows, 8)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut a = Args::new(gpu);
    a.read(side.x)
        .read(side.y)
        .i64(side.rows as i64)
        .i32(d as i32)
        .i64(splits as i64)
        .read(&part_m)
        .read(&part_l)
        .f32(alpha)
        .i32(side.tgt_kind)
        .read_opt(side.tgt)
        .i64(side.half)
        .write(lse)
        .write_at(loss, loss_at)?;
    // SAFETY: infonce_mma_pair_combine_<dtype>(const T* x, const T* y, int64_t rows, int d,
    // int64_t splits, const float* part_m, const float* part_l, float alpha, int tgt_kind,
    // const int64_t* tgt, int64_t half, float* lse_out, float* loss_out); x holds rows×D,
    // y cols×D, the partials splits×rows, lse rows floats and loss rows floats from `loss_at`;
    // targets (kind ARRAY) rows indices < cols; one warp per row, 8 per block.
    unsafe { launch(gpu, K, MODULE, &format!("{K}_{}", T::DTYPE.name()), cfg, a) }
}

/// The forward side of `inputs` (rows against columns) and, for cross and symmetric modes, the
/// swapped side with the second input's gradient name.
type Sides<'a, T> = (Side<'a, T>, Option<(Side<'a, T>, &'static str)>);

fn sides<'a, T: DeviceElement>(inputs: &DeviceInputs<'a, T>) -> Result<Sides<'a, T>> {
    let pair = |x: &'a DeviceMatrix<T>, y: &'a DeviceMatrix<T>| Side {
        x: x.slice(),
        rows: x.rows(),
        y: y.slice(),
        cols: y.rows(),
        tgt_kind: TGT_IDENTITY,
        tgt: None,
        half: 0,
        mask_self: false,
    };
    match *inputs {
        DeviceInputs::InBatch { embeddings } => Ok((
            Side {
                tgt_kind: TGT_HALF_SHIFT,
                half: (embeddings.rows() / 2) as i64,
                mask_self: true,
                ..pair(embeddings, embeddings)
            },
            None,
        )),
        DeviceInputs::Cross {
            query,
            key,
            targets,
        } => {
            let fwd = Side {
                tgt_kind: if targets.is_some() {
                    TGT_ARRAY
                } else {
                    TGT_IDENTITY
                },
                tgt: targets,
                ..pair(query, key)
            };
            Ok((fwd, Some((fwd.swapped(), "key"))))
        }
        DeviceInputs::Symmetric { query, key } => {
            let fwd = pair(query, key);
            Ok((fwd, Some((fwd.swapped(), "key"))))
        }
        DeviceInputs::Queue { .. } => Err(unsupported(
            "queue mode runs the queue kernels, not the pair kernels",
        )),
    }
}

/// Inbatch, cross and symmetric modes (the caller checked the spec, the shapes and D).
pub(super) fn evaluate<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    inputs: &DeviceInputs<'_, T>,
    upstream: &Upstream,
    opts: &DeviceOptions,
    c: &Checked,
) -> Result<DeviceOutput<T>> {
    let stream = gpu.stream();
    let alloc = |len: usize| stream.alloc_zeros::<f32>(len.max(1));
    let (fwd, second) = sides(inputs)?;
    let d = inputs.matrices()[0].1.cols();
    let n = fwd.rows;
    let symmetric = spec.mode() == Mode::Symmetric;
    let losses = if symmetric { 2 * n } else { n };
    let w: Vec<f32> = upstream
        .weights(spec, losses)?
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let weights = stream.clone_htod(&w)?;
    let pass = PassConsts {
        d,
        scale_log2: c.scale_log2(),
        alpha: c.alpha(),
    };

    // 1. Row (and column) LSE and per-anchor losses.
    let mut loss_each = alloc(losses)?;
    let mut lse = alloc(n)?;
    side_lse::<T>(gpu, &fwd, &pass, &mut lse, &mut loss_each, 0)?;
    let lse_cols = if symmetric {
        let mut lc = alloc(n)?;
        let (swapped, _) = second.ok_or_else(|| unsupported("symmetric mode without columns"))?;
        side_lse::<T>(gpu, &swapped, &pass, &mut lc, &mut loss_each, n)?;
        Some(lc)
    } else {
        None
    };

    // 2. Gradients (and Σ g·s for dτ).
    let mut dtau_acc = (c.learnable && !opts.forward_only)
        .then(|| alloc(1))
        .transpose()?;
    let grads = if opts.forward_only {
        Vec::new()
    } else {
        let lses = Lses {
            rows: &lse,
            cols: lse_cols.as_ref(),
            weights: &weights,
            w_scale: weight_scale(&w),
            theta: c.theta,
        };
        gradients(
            gpu,
            spec,
            &fwd,
            second,
            &lses,
            &pass,
            dtau_acc.as_mut(),
            opts,
        )?
    };

    // 3. The loss and dL/dτ = −α² Σ g·s.
    let loss = reduce_losses(gpu, spec, loss_each, losses)?;
    let grad_temperature = match &dtau_acc {
        Some(acc) => {
            let mut out = alloc(1)?;
            sum_scaled(gpu, acc, 1, -pass.alpha * pass.alpha, &mut out)?;
            Some(out)
        }
        None => None,
    };
    Ok(DeviceOutput {
        loss,
        lse,
        lse_cols,
        grads,
        grad_temperature,
    })
}

/// What every pass of one evaluation shares: D and the temperature's two forms.
struct PassConsts {
    d: usize,
    scale_log2: f32,
    alpha: f32,
}

/// The row (and column) LSEs and weights the gradient passes read, with the weight scale and
/// the filter threshold.
struct Lses<'a> {
    rows: &'a CudaSlice<f32>,
    cols: Option<&'a CudaSlice<f32>>,
    weights: &'a CudaSlice<f32>,
    w_scale: f32,
    theta: f32,
}

/// Pass 2: the first input's gradient on the forward side (inbatch `(G + Gᵀ)·E` with one weight
/// and LSE array for both terms; cross `G·B`; symmetric `(G_row + G_col)·B`, the column loss's
/// weights from element N), then the second input's on the swapped side (its "row" anchors are
/// the column loss's in symmetric mode, its "column" anchors the forward rows).
#[allow(clippy::too_many_arguments)]
fn gradients<T: DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    fwd: &Side<'_, T>,
    second: Option<(Side<'_, T>, &'static str)>,
    l: &Lses<'_>,
    pass: &PassConsts,
    dtau_acc: Option<&mut CudaSlice<f32>>,
    opts: &DeviceOptions,
) -> Result<Vec<(&'static str, DeviceGrad<T>)>> {
    let n = fwd.rows;
    let symmetric = spec.mode() == Mode::Symmetric;
    let row = Some((l.rows, l.weights, 0));
    let col = l.cols.map(|c| (c, l.weights, n));
    let (terms, dterms, first_name) = match spec.mode() {
        Mode::InBatch => (Terms { row, col: row }, 1, "embeddings"),
        Mode::Symmetric => (Terms { row, col }, 2, "query"),
        _ => (Terms { row, col: None }, 2, "query"),
    };
    let one = |side: &Side<'_, T>, terms: Terms<'_>, dtau| -> Result<DeviceMatrix<f32>> {
        let mut dx = DeviceMatrix::<f32>::zeros(gpu, side.rows, pass.d)?;
        let (splits, per) = queue_split(gpu.properties().sm_count, side.rows, side.cols);
        let p = Pass::Grad {
            terms,
            dx: dx.slice_mut(),
            dtau,
            w_scale: l.w_scale,
            theta: l.theta,
        };
        launch_pass::<T>(
            gpu,
            side,
            pass.d,
            splits,
            per,
            pass.scale_log2,
            pass.alpha,
            p,
        )?;
        Ok(dx)
    };
    let dx = one(fwd, terms, dtau_acc.map(|acc| (acc, dterms)))?;
    let mut grads = vec![(first_name, cast_grad(gpu, dx, opts.grad_dtype)?)];
    if let Some((swapped, name)) = second {
        let terms = Terms {
            row: if symmetric { col } else { None },
            col: row,
        };
        let dy = one(&swapped, terms, None)?;
        grads.push((name, cast_grad(gpu, dy, opts.grad_dtype)?));
    }
    Ok(grads)
}
