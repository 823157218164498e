//! The candle op on candle's CUDA device (feature `candle-cuda`): the fused kernels on candle's
//! buffers and stream, no copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, DevicePtr};

use super::{from_storage, unsupported_dtype, wrap, Call, Evaluated};
use crate::cuda::{
    evaluate_device, DeviceElement, DeviceGrad, DeviceInputs, DeviceMatrix, DeviceOptions, Gpu,
    GradDType, QueueView,
};
use crate::error::Error;
use crate::loss::Upstream;

/// The [`Gpu`] over candle's stream of `dev`, kept per candle device and stream so the kernel
/// modules load once. candle's [`DeviceId`] is unique per device created, so a stream address
/// reused by a later device (after the first was dropped) cannot find the old context's entry.
fn gpu_of(dev: &CudaDevice) -> candle_core::Result<Arc<Gpu>> {
    type Key = (DeviceId, usize);
    static GPUS: Mutex<Option<HashMap<Key, Arc<Gpu>>>> = Mutex::new(None);
    let stream = dev.cuda_stream();
    let key = (dev.id(), stream.cu_stream() as usize);
    let mut map = GPUS.lock().unwrap_or_else(|p| p.into_inner());
    let map = map.get_or_insert_with(HashMap::new);
    if let Some(g) = map.get(&key) {
        return Ok(g.clone());
    }
    let gpu = Arc::new(Gpu::from_stream(stream).map_err(wrap)?);
    map.insert(key, gpu.clone());
    Ok(gpu)
}

/// The fused evaluation on candle's CUDA buffers and stream.
pub(super) fn evaluate(
    dev: &CudaDevice,
    call: &Call,
    upstream: &Upstream,
    want_grads: bool,
) -> candle_core::Result<Evaluated> {
    match call.inputs[0].dtype() {
        DType::F32 => typed::<f32>(dev, call, upstream, want_grads),
        DType::F16 => typed::<half::f16>(dev, call, upstream, want_grads),
        DType::BF16 => typed::<half::bf16>(dev, call, upstream, want_grads),
        other => Err(unsupported_dtype(other, "f32, f16 or bf16 CUDA")),
    }
}

fn typed<T: DeviceElement + CudaDType>(
    dev: &CudaDevice,
    call: &Call,
    upstream: &Upstream,
    want_grads: bool,
) -> candle_core::Result<Evaluated> {
    let gpu = gpu_of(dev)?;
    let gpu = gpu.as_ref();
    let stream = gpu.stream().clone();
    // Hold candle's storages (read) until every kernel of this call is queued.
    let guards: Vec<_> = call.inputs.iter().map(|t| t.storage_and_layout()).collect();
    let mut mats: Vec<DeviceMatrix<T>> = Vec::with_capacity(guards.len());
    let mut syncs = Vec::with_capacity(guards.len());
    for ((storage, layout), name) in guards.iter().zip(&call.names) {
        let Storage::Cuda(s) = &**storage else {
            return Err(wrap(Error::Input(format!(
                "tensor `{name}` is not on a CUDA device"
            ))));
        };
        let (a, _) = layout
            .contiguous_offsets()
            .ok_or_else(|| wrap(Error::Input(format!("tensor `{name}` is not contiguous"))))?;
        let (rows, cols) = layout.shape().dims2()?;
        if rows == 0 {
            // An empty queue: a [0, D] matrix of the crate's own (one element, never read).
            mats.push(DeviceMatrix::zeros(gpu, 0, cols).map_err(wrap)?);
            continue;
        }
        let slice = s.as_cuda_slice::<T>()?;
        let (ptr, sync) = slice.device_ptr(&stream);
        syncs.push(sync);
        let ptr = ptr + (a * std::mem::size_of::<T>()) as u64;
        // SAFETY: `ptr` is element `a` of candle's buffer, which holds the tensor's
        // `rows × cols` contiguous elements of T (checked above) in the context of candle's
        // stream, which `gpu` wraps; the read guard keeps the storage alive and unwritten while
        // the work is queued, and candle frees buffers stream-ordered, after it.
        mats.push(unsafe { DeviceMatrix::borrowed(gpu, ptr, rows, cols) }.map_err(wrap)?);
    }
    let targets: Option<CudaSlice<i64>> = match &call.targets {
        Some(t) if !t.is_empty() => Some(stream.clone_htod(t.as_slice()).map_err(wrap_driver)?),
        _ => None,
    };
    let m: Vec<&DeviceMatrix<T>> = mats.iter().collect();
    let inputs = match call.spec.mode() {
        crate::Mode::Queue => DeviceInputs::Queue {
            query: m[0],
            positive: m[1],
            queue: QueueView::whole(m[2]),
        },
        crate::Mode::InBatch => DeviceInputs::InBatch { embeddings: m[0] },
        crate::Mode::Cross => DeviceInputs::Cross {
            query: m[0],
            key: m[1],
            targets: targets.as_ref(),
        },
        crate::Mode::Symmetric => DeviceInputs::Symmetric {
            query: m[0],
            key: m[1],
        },
    };
    let opts = DeviceOptions {
        grad_dtype: GradDType::F32,
        forward_only: !want_grads,
        ..DeviceOptions::default()
    };
    let out = evaluate_device(gpu, &call.spec, &inputs, upstream, &opts).map_err(wrap)?;
    drop(syncs);
    drop(mats);
    drop(guards);

    let wrap_f32 = |slice: CudaSlice<f32>, shape: Shape| -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        if slice.len() < n {
            return Err(wrap(Error::Input(format!(
                "the kernels returned {} values for a result of shape {shape:?}",
                slice.len()
            ))));
        }
        // A longer buffer (an empty gradient's one placeholder element) is trimmed by a copy,
        // except to nothing: the driver refuses a zero-byte allocation, and candle reads only
        // the shape's elements.
        let slice = if slice.len() == n || n == 0 {
            slice
        } else {
            stream.clone_dtod(&slice.slice(..n)).map_err(wrap_driver)?
        };
        Ok(from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
            shape,
        ))
    };
    let loss_shape: Shape = match call.spec.reduction() {
        crate::Reduction::None => Shape::from(loss_count(call)?),
        _ => Shape::from(()),
    };
    let loss = wrap_f32(out.loss, loss_shape)?;
    let mut grads: Vec<Option<Tensor>> = vec![None; call.names.len()];
    for (name, g) in out.grads {
        let Some(i) = call.names.iter().position(|n| *n == name) else {
            continue;
        };
        let (rows, cols) = call.inputs[i].dims2()?;
        let slice = match g {
            DeviceGrad::F32(m) => m.into_slice(),
            DeviceGrad::Input(_) => None,
        }
        .ok_or_else(|| {
            wrap(Error::Input(format!(
                "the gradient of `{name}` is not owned"
            )))
        })?;
        grads[i] = Some(wrap_f32(slice, Shape::from((rows, cols)))?);
    }
    let grad_temperature = out
        .grad_temperature
        .map(|t| wrap_f32(t, Shape::from(())))
        .transpose()?;
    Ok(Evaluated {
        loss,
        grads,
        grad_temperature,
    })
}

/// The number of anchor losses of reduction `none`.
fn loss_count(call: &Call) -> candle_core::Result<usize> {
    let rows = call.inputs[0].dims2()?.0;
    Ok(match call.spec.mode() {
        crate::Mode::Symmetric => 2 * rows,
        _ => rows,
    })
}

fn wrap_driver(e: cudarc::driver::DriverError) -> candle_core::Error {
    wrap(Error::Driver(e))
}

/// The attach op's forward on CUDA: a copy of the loss on candle's stream.
pub(super) fn identity(s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| wrap(Error::Input("the loss is not contiguous".into())))?;
    let src = s.as_cuda_slice::<f32>()?.slice(a..b);
    let out = s
        .device
        .cuda_stream()
        .clone_dtod(&src)
        .map_err(wrap_driver)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, s.device.clone()),
        l.shape().clone(),
    ))
}
