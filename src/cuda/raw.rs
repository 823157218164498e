//! The device op over raw device pointers and a raw `CUstream`, for engines that do not share this
//! crate's cudarc (another version, another language through FFI): [`evaluate_raw`].
//!
//! The caller owns every buffer: inputs are read in place and never freed, outputs are written
//! into the caller's buffers (a device-to-device copy of each result, queued on the caller's
//! stream), and all the work, scratch allocations and frees included, is queued on that stream in
//! order with the caller's other work. Nothing synchronises the stream. The candle op
//! (`fused_infonce::candle`, feature `candle`) is a safe user of the same borrowed matrices.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, CudaSlice, DeviceRepr};

use super::evaluate_device;
use super::op::{DeviceGrad, DeviceInputs, DeviceOptions, DeviceOutput, QueueView};
use super::runtime::{DeviceElement, DeviceMatrix, Gpu};
use crate::error::{Error, Result};
use crate::loss::Upstream;
use crate::spec::LossSpec;

/// A row-major `rows × cols` matrix in the caller's device memory (elements of the call's dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMatrix {
    /// The address of element (0, 0).
    pub ptr: CUdeviceptr,
    /// Rows.
    pub rows: usize,
    /// Columns (D).
    pub cols: usize,
}

/// The caller's inputs of one evaluation (shapes as [`crate::LossInputs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawInputs {
    /// `query` (N×D), `positive` (N×D), and the queue: `len` rows from row `start` of the
    /// `queue` ring buffer (`capacity × D`), wrapping around its end.
    Queue {
        /// Q.
        query: RawMatrix,
        /// P.
        positive: RawMatrix,
        /// The ring's storage.
        queue: RawMatrix,
        /// Its oldest row.
        start: usize,
        /// How many rows it holds.
        len: usize,
    },
    /// `embeddings` (2N×D).
    InBatch {
        /// E.
        embeddings: RawMatrix,
    },
    /// `query` (N×D), `key` (M×D), optional `targets`: N `int64` indices in `[0, M)` (not
    /// checked on the device: out-of-range targets are the caller's bug).
    Cross {
        /// A.
        query: RawMatrix,
        /// B.
        key: RawMatrix,
        /// The address of the N targets.
        targets: Option<CUdeviceptr>,
    },
    /// `query` (N×D), `key` (N×D).
    Symmetric {
        /// A.
        query: RawMatrix,
        /// B.
        key: RawMatrix,
    },
}

/// Where the results go: the caller's device buffers (f32 unless said otherwise). A gradient not
/// asked for is `None`; with none asked for, only the forward runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawOutputs {
    /// The loss: 1 f32 (mean, sum) or one per anchor loss (none: N; inbatch 2N; symmetric N rows
    /// then N columns).
    pub loss: CUdeviceptr,
    /// Per-anchor LSE of the rows (N; 2N for inbatch), if wanted (not for the simple variant).
    pub lse: Option<CUdeviceptr>,
    /// Symmetric mode's per-column LSE (N), if wanted.
    pub lse_cols: Option<CUdeviceptr>,
    /// Each input's gradient, in input order (queue: query, positive, queue — the queue's only
    /// with [`LossSpec::grad_queue`], its `len` rows oldest first; inbatch: embeddings; cross and
    /// symmetric: query, key), shaped as the input, in f32 or the input dtype
    /// ([`DeviceOptions::grad_dtype`]).
    pub grads: [Option<CUdeviceptr>; 3],
    /// `dL/dτ` (1 f32) for a learnable temperature, if wanted.
    pub grad_temperature: Option<CUdeviceptr>,
}

/// A caller's buffer seen as a `CudaSlice` (for copies and launches) that is never freed.
struct Borrowed<T>(ManuallyDrop<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `ptr` holds `len` elements of `T` in `gpu`'s context (see [`evaluate_raw`]).
    unsafe fn new(gpu: &Gpu, what: &str, ptr: CUdeviceptr, len: usize) -> Result<Self> {
        if ptr == 0 {
            return Err(Error::Input(format!("{what}: a null device pointer")));
        }
        // SAFETY: the caller's contract.
        Ok(Borrowed(ManuallyDrop::new(unsafe {
            gpu.stream().upgrade_device_ptr::<T>(ptr, len.max(1))
        })))
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; the memory is the caller's, so it is leaked, not freed.
        let _ = unsafe { ManuallyDrop::take(&mut self.0) }.leak();
    }
}

/// The `Gpu` for a caller's stream: the primary context of device `ordinal` (the one the CUDA
/// runtime and most engines use) and the stream wrapped without taking ownership. Kept per
/// (device, stream), so the kernel modules load once.
///
/// # Safety
/// `stream` must be a live stream of device `ordinal`'s primary context (checked: another
/// context is an error) that outlives every call made with it.
unsafe fn caller_gpu(ordinal: usize, stream: CUstream) -> Result<Arc<Gpu>> {
    type Key = (usize, usize);
    static GPUS: Mutex<Option<HashMap<Key, Arc<Gpu>>>> = Mutex::new(None);
    let key = (ordinal, stream as usize);
    let mut map = GPUS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(g) = map.get_or_insert_with(HashMap::new).get(&key) {
        return Ok(g.clone());
    }
    if !super::runtime::driver_present() {
        return Err(Error::NoCudaDriver);
    }
    let ctx = CudaContext::new(ordinal)?;
    let mut owner: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: writes one context handle for the caller's stream.
    unsafe { sys::cuStreamGetCtx(stream, &mut owner) }.result()?;
    if owner != ctx.cu_ctx() {
        return Err(Error::Input(format!(
            "the stream {stream:p} belongs to another context than device {ordinal}'s primary \
             context (evaluate_raw runs in the primary context, as the CUDA runtime does)"
        )));
    }
    // SAFETY: the caller keeps the stream alive (the contract above); it is never destroyed here.
    let s = unsafe { ctx.wrap_borrowed_stream(stream) };
    let gpu = Arc::new(Gpu::from_stream(s)?);
    map.get_or_insert_with(HashMap::new)
        .insert(key, gpu.clone());
    Ok(gpu)
}

/// Evaluates `spec` on the caller's device buffers, on the caller's `stream` of device
/// `ordinal`, writing the results into `out` (see [`RawOutputs`] for each buffer's size and
/// dtype). `T` is the inputs' dtype (f32, f16 or bf16). The work is queued and not waited for:
/// the outputs are ready when the stream reaches this point.
///
/// Shapes are checked as for [`evaluate_device`] (from the sizes given here; the buffers
/// themselves cannot be measured). Options as [`DeviceOptions`]; `forward_only` is implied when
/// no gradient is asked for.
///
/// # Safety
/// - `stream` is a live stream of device `ordinal`'s primary context (another context is refused
///   with an error) and stays alive until this work is done.
/// - Every input pointer holds its `rows × cols` elements of `T` (the queue its `capacity × D`,
///   the targets N `int64` values in range) in that context, aligned for its type, and nothing
///   writes them until the stream has run this call.
/// - Every output pointer holds its result's size (above) in its dtype, and nothing else reads or
///   writes it until the stream has run this call.
/// - The buffers are never freed here; the caller keeps them alive until the stream is done.
pub unsafe fn evaluate_raw<T: DeviceElement>(
    ordinal: usize,
    stream: CUstream,
    spec: &LossSpec,
    inputs: &RawInputs,
    upstream: &Upstream,
    opts: &DeviceOptions,
    out: &RawOutputs,
) -> Result<()> {
    // SAFETY: the caller's contract.
    let gpu = unsafe { caller_gpu(ordinal, stream) }?;
    let gpu = gpu.as_ref();
    let mat = |what: &str, m: RawMatrix| -> Result<DeviceMatrix<T>> {
        // SAFETY: the caller's contract: `m` holds rows × cols elements of T.
        unsafe { DeviceMatrix::borrowed(gpu, m.ptr, m.rows, m.cols) }
            .map_err(|e| Error::Input(format!("{what}: {e}")))
    };
    let (mats, targets) = match *inputs {
        RawInputs::Queue {
            query,
            positive,
            queue,
            ..
        } => (
            vec![
                mat("query", query)?,
                mat("positive", positive)?,
                mat("queue", queue)?,
            ],
            None,
        ),
        RawInputs::InBatch { embeddings } => (vec![mat("embeddings", embeddings)?], None),
        RawInputs::Cross {
            query,
            key,
            targets,
        } => {
            let t = match targets {
                // SAFETY: the caller's contract: N int64 targets.
                Some(p) => Some(unsafe { Borrowed::<i64>::new(gpu, "targets", p, query.rows) }?),
                None => None,
            };
            (vec![mat("query", query)?, mat("key", key)?], t)
        }
        RawInputs::Symmetric { query, key } => (vec![mat("query", query)?, mat("key", key)?], None),
    };
    let m: Vec<&DeviceMatrix<T>> = mats.iter().collect();
    let dev = match *inputs {
        RawInputs::Queue { start, len, .. } => DeviceInputs::Queue {
            query: m[0],
            positive: m[1],
            queue: QueueView {
                keys: m[2],
                start,
                len,
            },
        },
        RawInputs::InBatch { .. } => DeviceInputs::InBatch { embeddings: m[0] },
        RawInputs::Cross { .. } => DeviceInputs::Cross {
            query: m[0],
            key: m[1],
            targets: targets.as_ref().map(|t| &*t.0),
        },
        RawInputs::Symmetric { .. } => DeviceInputs::Symmetric {
            query: m[0],
            key: m[1],
        },
    };
    let opts = DeviceOptions {
        forward_only: opts.forward_only || out.grads.iter().all(Option::is_none),
        ..*opts
    };
    let names: Vec<&'static str> = dev.matrices().iter().map(|(n, _)| *n).collect();
    let result = evaluate_device(gpu, spec, &dev, upstream, &opts)?;
    // SAFETY: the caller's contract on the output buffers.
    unsafe { write_outputs(gpu, &result, &names, out) }
}

/// Copies each result into the caller's buffer (device to device, on the stream).
///
/// # Safety
/// As [`evaluate_raw`]'s outputs.
unsafe fn write_outputs<T: DeviceElement>(
    gpu: &Gpu,
    r: &DeviceOutput<T>,
    names: &[&'static str],
    out: &RawOutputs,
) -> Result<()> {
    /// # Safety
    /// `dst` holds `src.len()` elements of U.
    unsafe fn copy<U: DeviceRepr>(
        gpu: &Gpu,
        what: &str,
        src: &CudaSlice<U>,
        len: usize,
        dst: CUdeviceptr,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller's contract.
        let mut d = unsafe { Borrowed::<U>::new(gpu, what, dst, len) }?;
        gpu.stream()
            .memcpy_dtod(&src.slice(..len), &mut d.0.slice_mut(..len))?;
        Ok(())
    }
    // The loss buffer's length is the loss's (1, or one per anchor loss).
    let loss_len = r.loss.len();
    let check_dst = |what: &str, p: CUdeviceptr| -> Result<()> {
        if p == 0 {
            return Err(Error::Input(format!("{what}: a null device pointer")));
        }
        Ok(())
    };
    check_dst("loss", out.loss)?;
    // SAFETY (every copy): the caller's contract on the output buffers.
    unsafe { copy(gpu, "loss", &r.loss, loss_len, out.loss) }?;
    if let Some(p) = out.lse {
        unsafe { copy(gpu, "lse", &r.lse, r.lse.len(), p) }?;
    }
    if let (Some(p), Some(l)) = (out.lse_cols, r.lse_cols.as_ref()) {
        unsafe { copy(gpu, "lse_cols", l, l.len(), p) }?;
    }
    for (name, dst) in names.iter().zip(out.grads) {
        let Some(p) = dst else { continue };
        let Some((_, g)) = r.grads.iter().find(|(n, _)| n == name) else {
            return Err(Error::Input(format!(
                "the gradient of `{name}` was asked for but is not computed (the queue's needs \
                 LossSpec::grad_queue)"
            )));
        };
        match g {
            DeviceGrad::F32(m) => unsafe { copy(gpu, name, m.slice(), m.rows() * m.cols(), p) }?,
            DeviceGrad::Input(m) => unsafe { copy(gpu, name, m.slice(), m.rows() * m.cols(), p) }?,
        }
    }
    if out.grads.iter().skip(names.len()).any(Option::is_some) {
        return Err(Error::Input(format!(
            "a gradient buffer was given beyond the {} inputs of this mode",
            names.len()
        )));
    }
    if let (Some(p), Some(t)) = (out.grad_temperature, r.grad_temperature.as_ref()) {
        unsafe { copy(gpu, "grad_temperature", t, 1, p) }?;
    }
    Ok(())
}
