//! `cuda::raw::evaluate_raw`: the op over raw device pointers and a raw `CUstream`, as an engine
//! on another cudarc or another language calls it. The buffers are allocated here (standing in
//! for the engine's), their addresses passed, the results read back from the caller's output
//! buffers and compared with the reference; the inputs must come back untouched and unfreed.

mod support;

use cudarc::driver::{CudaSlice, DevicePtr};
use fused_infonce::cuda::raw::{evaluate_raw, RawInputs, RawMatrix, RawOutputs};
use fused_infonce::cuda::{DeviceOptions, Gpu, GradDType};
use fused_infonce::{
    bf16, reference, Element, LossInputs, LossSpec, MatRef, Mode, Reduction, Upstream,
};
use support::{assert_outputs_close, unit_rows, Outputs, Scales};

/// Device memory the "engine" owns, with its address.
struct Buf<T> {
    slice: CudaSlice<T>,
    ptr: u64,
}

fn buf<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    host: &[T],
) -> Buf<T> {
    let slice = if host.is_empty() {
        gpu.stream().alloc_zeros::<T>(1).unwrap()
    } else {
        gpu.stream().clone_htod(host).unwrap()
    };
    let ptr = slice.device_ptr(gpu.stream()).0;
    Buf { slice, ptr }
}

fn out_buf<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    n: usize,
) -> Buf<T> {
    let slice = gpu.stream().alloc_zeros::<T>(n.max(1)).unwrap();
    let ptr = slice.device_ptr(gpu.stream()).0;
    Buf { slice, ptr }
}

fn f64s<T: Element + cudarc::driver::DeviceRepr>(gpu: &Gpu, b: &Buf<T>, n: usize) -> Vec<f64> {
    let v = gpu.stream().clone_dtoh(&b.slice).unwrap();
    v[..n].iter().map(|x| x.to_f64()).collect()
}

/// One case: host rows, the spec, and which outputs the caller asks for.
fn run<T: Element + fused_infonce::cuda::DeviceElement>(
    gpu: &Gpu,
    spec: &LossSpec,
    mats: &[(&'static str, Vec<T>, usize, usize)],
    targets: Option<Vec<i64>>,
    ring: Option<(usize, usize)>,
    up: Upstream,
    grad_dtype: GradDType,
) {
    let what = format!("{:?} {:?} {}", spec.mode(), spec.reduction(), T::DTYPE);
    let ins: Vec<Buf<T>> = mats.iter().map(|(_, h, _, _)| buf(gpu, h)).collect();
    let raw = |i: usize| RawMatrix {
        ptr: ins[i].ptr,
        rows: mats[i].2,
        cols: mats[i].3,
    };
    let tgt = targets.as_ref().map(|t| buf(gpu, t));
    let inputs = match spec.mode() {
        Mode::Queue => {
            let (start, len) = ring.unwrap_or((0, mats[2].2));
            RawInputs::Queue {
                query: raw(0),
                positive: raw(1),
                queue: raw(2),
                start,
                len,
            }
        }
        Mode::InBatch => RawInputs::InBatch { embeddings: raw(0) },
        Mode::Cross => RawInputs::Cross {
            query: raw(0),
            key: raw(1),
            targets: tgt.as_ref().map(|b| b.ptr),
        },
        Mode::Symmetric => RawInputs::Symmetric {
            query: raw(0),
            key: raw(1),
        },
    };

    // The reference on the same values (the queue rotated to oldest-first for a wrapped ring).
    let mut host: Vec<(&'static str, Vec<T>, usize, usize)> = mats.to_vec();
    if let (Mode::Queue, Some((start, len))) = (spec.mode(), ring) {
        let (cap, d) = (mats[2].2, mats[2].3);
        let rows: Vec<T> = (0..len)
            .flat_map(|j| mats[2].1[((start + j) % cap) * d..((start + j) % cap + 1) * d].to_vec())
            .collect();
        host[2] = ("queue", rows, len, d);
    }
    let views: Vec<MatRef<'_, T>> = host
        .iter()
        .map(|(n, v, r, c)| MatRef::new(n, v, *r, *c).unwrap())
        .collect();
    let li = LossInputs::from_matrices(spec.mode(), &views, targets.as_deref()).unwrap();
    let want = reference::evaluate(spec, &li, &up).unwrap();

    // The caller's output buffers.
    let count = want.loss.values().len();
    let loss = out_buf::<f32>(gpu, count);
    let lse = out_buf::<f32>(gpu, want.lse.len());
    let lse_cols = want.lse_cols.as_ref().map(|c| out_buf::<f32>(gpu, c.len()));
    let grads_f32: Vec<Buf<f32>> = want
        .grads
        .iter()
        .map(|g| out_buf::<f32>(gpu, g.value.data.len()))
        .collect();
    let grads_t: Vec<Buf<T>> = want
        .grads
        .iter()
        .map(|g| out_buf::<T>(gpu, g.value.data.len()))
        .collect();
    let dtau = out_buf::<f32>(gpu, 1);
    let mut grads = [None; 3];
    for (i, g) in want.grads.iter().enumerate() {
        let slot = mats.iter().position(|(n, _, _, _)| *n == g.name).unwrap();
        grads[slot] = Some(match grad_dtype {
            GradDType::F32 => grads_f32[i].ptr,
            GradDType::Input => grads_t[i].ptr,
        });
    }
    let out = RawOutputs {
        loss: loss.ptr,
        lse: (!want.lse.is_empty()).then_some(lse.ptr),
        lse_cols: lse_cols.as_ref().map(|b| b.ptr),
        grads,
        grad_temperature: want.grad_temperature.map(|_| dtau.ptr),
    };
    let opts = DeviceOptions {
        grad_dtype,
        ..DeviceOptions::default()
    };
    // SAFETY: every buffer above is alive until after the synchronisation below, holds what
    // evaluate_raw's contract asks, and the stream is the Gpu's, of device 0's primary context.
    unsafe { evaluate_raw::<T>(0, gpu.stream().cu_stream(), spec, &inputs, &up, &opts, &out) }
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    gpu.synchronize().unwrap();

    let got = Outputs {
        loss: f64s(gpu, &loss, count),
        lse: f64s(gpu, &lse, want.lse.len()),
        lse_cols: lse_cols
            .as_ref()
            .map(|b| f64s(gpu, b, want.lse_cols.as_ref().unwrap().len())),
        grads: want
            .grads
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let n = g.value.data.len();
                let v = match grad_dtype {
                    GradDType::F32 => f64s(gpu, &grads_f32[i], n),
                    GradDType::Input => f64s(gpu, &grads_t[i], n),
                };
                (g.name.to_string(), v)
            })
            .collect(),
        grad_temperature: want.grad_temperature.map(|_| f64s(gpu, &dtau, 1)[0]),
    };
    // f32 arithmetic on the same values; gradients stored in bf16 hold one rounding (2^-8).
    let tol = match (grad_dtype, T::DTYPE) {
        (GradDType::Input, fused_infonce::DType::BF16) => 2f64.powi(-8),
        _ => 1e-5,
    };
    assert_outputs_close(&what, &got, &want, tol, &Scales::of(spec, &li, &up));
    // The inputs are the caller's: untouched (and still allocated: readable).
    for (b, (name, h, _, _)) in ins.iter().zip(mats) {
        let back = gpu.stream().clone_dtoh(&b.slice).unwrap();
        assert!(
            back.iter()
                .zip(h)
                .all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits()),
            "{what}: input `{name}` changed"
        );
    }
}

#[test]
fn raw_pointers_every_mode() {
    let Some(gpu) = support::gpu("raw_pointers_every_mode") else {
        return;
    };
    let (n, k, d) = (9, 21, 13);
    let q = unit_rows::<f32>(1, n, d);
    let p = unit_rows::<f32>(2, n, d);
    let m = unit_rows::<f32>(3, k, d);
    // A wrapped ring: 17 rows from row 11 of a 21-row buffer.
    let spec = LossSpec::queue()
        .temperature(0.1)
        .grad_queue(true)
        .build()
        .unwrap();
    let mats = [
        ("query", q.clone(), n, d),
        ("positive", p.clone(), n, d),
        ("queue", m, k, d),
    ];
    run(
        &gpu,
        &spec,
        &mats,
        None,
        Some((11, 17)),
        Upstream::One,
        GradDType::F32,
    );

    let e = unit_rows::<f32>(4, 2 * n, d);
    let spec = LossSpec::inbatch()
        .learnable_temperature(0.2)
        .normalize(true)
        .reduction(Reduction::Sum)
        .build()
        .unwrap();
    run(
        &gpu,
        &spec,
        &[("embeddings", e, 2 * n, d)],
        None,
        None,
        Upstream::Scalar(0.5),
        GradDType::F32,
    );

    let key = unit_rows::<f32>(5, k, d);
    let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7) % k as i64).collect();
    let spec = LossSpec::cross()
        .temperature(0.07)
        .reduction(Reduction::None)
        .build()
        .unwrap();
    let w: Vec<f64> = (0..n).map(|i| 0.5 + i as f64 / 10.0).collect();
    run(
        &gpu,
        &spec,
        &[("query", q.clone(), n, d), ("key", key, k, d)],
        Some(targets),
        None,
        Upstream::PerAnchor(w),
        GradDType::F32,
    );

    let spec = LossSpec::symmetric()
        .learnable_temperature(0.1)
        .build()
        .unwrap();
    run(
        &gpu,
        &spec,
        &[("query", q, n, d), ("key", p, n, d)],
        None,
        None,
        Upstream::One,
        GradDType::F32,
    );
}

#[test]
fn raw_pointers_bf16_with_input_dtype_gradients() {
    let Some(gpu) = support::gpu("raw_pointers_bf16_with_input_dtype_gradients") else {
        return;
    };
    let (n, d) = (16, 64);
    let q = unit_rows::<bf16>(6, n, d);
    let k = unit_rows::<bf16>(7, n, d);
    let spec = LossSpec::symmetric().temperature(0.1).build().unwrap();
    run(
        &gpu,
        &spec,
        &[("query", q, n, d), ("key", k, n, d)],
        None,
        None,
        Upstream::One,
        GradDType::Input,
    );
}

#[test]
fn raw_pointer_mistakes_are_errors() {
    let Some(gpu) = support::gpu("raw_pointer_mistakes_are_errors") else {
        return;
    };
    let (n, k, d) = (4, 6, 8);
    let q = buf(&gpu, &unit_rows::<f32>(1, n, d));
    let p = buf(&gpu, &unit_rows::<f32>(2, n, d));
    let m = buf(&gpu, &unit_rows::<f32>(3, k, d));
    let loss = out_buf::<f32>(&gpu, 1);
    let g = out_buf::<f32>(&gpu, k * d);
    let mat = |ptr, rows| RawMatrix { ptr, rows, cols: d };
    let inputs = |qp| RawInputs::Queue {
        query: mat(qp, n),
        positive: mat(p.ptr, n),
        queue: mat(m.ptr, k),
        start: 0,
        len: k,
    };
    let spec = LossSpec::queue().build().unwrap();
    let call = |inputs: &RawInputs, out: &RawOutputs| {
        // SAFETY: live buffers of the sizes given; the Gpu's stream.
        unsafe {
            evaluate_raw::<f32>(
                0,
                gpu.stream().cu_stream(),
                &spec,
                inputs,
                &Upstream::One,
                &DeviceOptions::default(),
                out,
            )
        }
    };
    let out = RawOutputs {
        loss: loss.ptr,
        ..RawOutputs::default()
    };
    let e = call(&inputs(0), &out).unwrap_err().to_string();
    assert!(e.contains("query") && e.contains("null"), "{e}");
    let e = call(&inputs(q.ptr), &RawOutputs::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("loss") && e.contains("null"), "{e}");
    // The queue's gradient without grad_queue.
    let out = RawOutputs {
        loss: loss.ptr,
        grads: [None, None, Some(g.ptr)],
        ..RawOutputs::default()
    };
    let e = call(&inputs(q.ptr), &out).unwrap_err().to_string();
    assert!(e.contains("queue") && e.contains("grad_queue"), "{e}");
    // A shape the crate's check refuses (positive rows ≠ query rows).
    let bad = RawInputs::Queue {
        query: mat(q.ptr, n),
        positive: mat(p.ptr, n - 1),
        queue: mat(m.ptr, k),
        start: 0,
        len: k,
    };
    let e = call(
        &bad,
        &RawOutputs {
            loss: loss.ptr,
            ..RawOutputs::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("positive"), "{e}");
    // Nothing was freed: every buffer is still readable.
    for b in [&q, &p, &m] {
        gpu.stream().clone_dtoh(&b.slice).unwrap();
    }
}
