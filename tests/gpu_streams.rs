//! The loss on a training engine's streams: the engine holds its tensors on its own stream, the
//! loss runs on a second one (`Gpu::from_stream`), and the engine reads the outputs and frees the
//! inputs on its stream. Every kernel path must leave cudarc's events right (read and write
//! guards held until each launch and cuBLAS call is queued), or an output is read before it is
//! written and an input freed while a kernel still reads it. On a GPU that is a race that may or
//! may not show; the emulated device checks the order of every access (vector clocks per stream)
//! and fails the run at the first unordered one.

mod support;

use fused_infonce::cuda::{
    evaluate_device, DeviceInputs, DeviceMatrix, DeviceOptions, Gpu, KernelPath, QueueView,
};
use fused_infonce::{bf16, reference, LossInputs, LossSpec, Upstream};
use support::{assert_close, unit_rows};

#[test]
fn every_path_orders_its_work_on_an_engines_streams() {
    let Some(first) = support::gpu("every_path_orders_its_work_on_an_engines_streams") else {
        return;
    };
    let ctx = first.context().clone();
    // The engine's stream and the loss's stream: two streams put cudarc in multi-stream mode,
    // where every buffer's reads and writes are tracked with events.
    let engine = ctx.new_stream().unwrap();
    let gpu = Gpu::from_stream(ctx.new_stream().unwrap()).unwrap();
    let (n, k, d) = (70, 300, 64);
    let (q, p, m) = (
        unit_rows::<bf16>(1, n, d),
        unit_rows::<bf16>(2, n, d),
        unit_rows::<bf16>(3, k, d),
    );
    let hi = LossInputs::Queue {
        query: support::mat("query", &q, n, d),
        positive: support::mat("positive", &p, n, d),
        queue: support::mat("queue", &m, k, d),
    };
    // The v1 kernels compute in f32 from the stored bf16 values (1e-5); the tensor-core kernels
    // and the unfused baseline round P, resp. dS, to bf16 for their products (1e-2).
    for (path, tol) in [
        (KernelPath::Simple, 1e-5),
        (KernelPath::TensorCore, 1e-2),
        (KernelPath::Unfused, 1e-2),
    ] {
        let spec = LossSpec::queue()
            .learnable_temperature(0.1)
            .build()
            .unwrap();
        let up = Upstream::One;
        let want = reference::evaluate(&spec, &hi, &up).unwrap();
        // The engine's tensors, uploaded on its stream.
        let on_engine = |v: &[bf16], rows| {
            DeviceMatrix::from_slice(engine.clone_htod(v).unwrap(), rows, d).unwrap()
        };
        let (qd, pd, md) = (on_engine(&q, n), on_engine(&p, n), on_engine(&m, k));
        let di = DeviceInputs::Queue {
            query: &qd,
            positive: &pd,
            queue: QueueView::whole(&md),
        };
        let opts = DeviceOptions {
            path,
            ..DeviceOptions::default()
        };
        let out = evaluate_device(&gpu, &spec, &di, &up, &opts)
            .unwrap_or_else(|e| panic!("{path:?}: {e}"));
        // The engine frees its inputs at once (stream-ordered on its stream) and reads the
        // outputs on its stream.
        drop((qd, pd, md));
        let got = support::download_on(&engine, &out);
        assert_close(
            &format!("{path:?} on the engine's streams"),
            &got,
            &want,
            tol,
            &spec,
            &hi,
            &up,
        );
        drop(out);
        engine.synchronize().unwrap();
        gpu.synchronize().unwrap();
    }
}
