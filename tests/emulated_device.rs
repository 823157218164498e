//! The emulated CUDA device's own checks (tools/emulated-cuda): each rule it enforces, broken on
//! purpose with this crate's kernels and raw driver calls (bypassing the launch layer's own
//! checks), must give the error the driver documents (or, for what a GPU does not check itself,
//! the one compute-sanitizer would report), with a message that names the culprit.
//!
//! Every scenario opens a fresh primary context and releases it: a kernel fault is sticky, as on
//! a GPU, so one scenario's fault must not leak into the next. They run one after another in a
//! single test (the primary context is one per process). On a real GPU only the rules the
//! hardware enforces as well are run.

mod support;

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::sys::{CUfunction_attribute, CUresult};
use cudarc::driver::{result, CudaFunction, CudaStream, DriverError};
use fused_infonce::cuda::runtime::launch::{self, Args};
use fused_infonce::cuda::Gpu;

/// A kernel launched with raw pointer values (no cudarc guards, no launch-layer checks).
fn launch(
    f: &CudaFunction,
    stream: &CudaStream,
    grid: u32,
    block: u32,
    smem: u32,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    // SAFETY: deliberately unchecked: the emulated device is what checks these launches, and
    // every scenario below that breaks a rule runs only there.
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            (grid, 1, 1),
            (block, 1, 1),
            smem,
            stream.cu_stream(),
            params,
        )
    }
}

fn p<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// Whether this run is on the emulated device (its messages are checked; a driver's are its own).
static EMULATED: AtomicBool = AtomicBool::new(true);

/// Asserts `r` failed with `code` and, on the emulated device, a message holding every one of
/// `words`.
fn expect_err<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, DriverError>,
    code: CUresult,
    words: &[&str],
) {
    let e = match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected {code:?}"),
        Err(e) => e,
    };
    assert_eq!(e.0, code, "{what}: {e}");
    let msg = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for w in words.iter().filter(|_| EMULATED.load(Ordering::Relaxed)) {
        assert!(msg.contains(w), "{what}: the message lacks `{w}`: {msg}");
    }
}

/// Device memory as raw allocations (freed explicitly: the scenarios free some on purpose).
struct Raw(u64, usize);

impl Raw {
    fn new(bytes: usize) -> Self {
        // SAFETY: a plain allocation in the current context.
        Raw(
            unsafe { result::malloc_sync(bytes) }.expect("malloc"),
            bytes,
        )
    }
    fn upload(&self, v: &[f32]) {
        assert_eq!(v.len() * 4, self.1);
        // SAFETY: `self` holds `v.len()` f32.
        unsafe { result::memcpy_htod_sync(self.0, v) }.expect("htod");
    }
    fn download(&self) -> Result<Vec<f32>, DriverError> {
        let mut v = vec![0f32; self.1 / 4];
        // SAFETY: `self` holds that many f32.
        unsafe { result::memcpy_dtoh_sync(&mut v, self.0) }?;
        Ok(v)
    }
    fn free(self) {
        // SAFETY: allocated by malloc_sync, freed once.
        unsafe { result::free_sync(self.0) }.expect("free");
    }
}

/// A fresh context for one scenario (the previous one's Gpu is dropped first, which releases the
/// primary context, and with it any sticky error).
fn fresh() -> Gpu {
    let gpu = Gpu::new(0).expect("device 0");
    gpu.context().bind_to_thread().expect("bind");
    gpu
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
}

/// `steps_cast_f32(const float* x, float* y, int64_t n)`: y[k] = x[k] for k < n (grid-stride).
fn cast(
    gpu: &Gpu,
    x: u64,
    y: u64,
    n: i64,
    grid: u32,
    block: u32,
    smem: u32,
) -> Result<(), DriverError> {
    let f = gpu
        .function("steps", "steps_cast_f32")
        .expect("cast kernel");
    let (mut x, mut y, mut n) = (x, y, n);
    launch(
        &f,
        gpu.stream(),
        grid,
        block,
        smem,
        &mut [p(&mut x), p(&mut y), p(&mut n)],
    )
}

/// The launch layer opts a function in to dynamic shared memory beyond 48 KiB (no kernel of the
/// crate needs it yet: the tensor-core kernels' 3 × 64 × 128 × 2 bytes are exactly 48 KiB), and
/// refuses more than the device's opt-in maximum itself, with a message.
fn launch_layer_opts_in() {
    let gpu = fresh();
    let n = 1000usize;
    let x = gpu.stream().clone_htod(&values(n)).unwrap();
    let mut y = gpu.stream().alloc_zeros::<f32>(n).unwrap();
    let cfg = |smem: u32| cudarc::driver::LaunchConfig {
        grid_dim: (4, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem,
    };
    for (smem, ok) in [
        (64 << 10, true),
        (gpu.properties().max_shared_per_block + 1, false),
    ] {
        let mut a = Args::new(&gpu);
        a.read(&x).write(&mut y).i64(n as i64);
        // SAFETY: steps_cast_f32(const float* x, float* y, int64_t n); x and y hold n floats;
        // the kernel ignores its dynamic shared memory.
        let r = unsafe { launch::launch(&gpu, "cast", "steps", "steps_cast_f32", cfg(smem), a) };
        match (r, ok) {
            (Ok(()), true) => {}
            (Err(e), false) => assert!(e.to_string().contains("shared memory"), "{e}"),
            (r, _) => panic!("{smem} bytes of dynamic shared memory: {r:?}"),
        }
    }
    assert_eq!(gpu.stream().clone_dtoh(&y).unwrap(), values(n));
}

/// Rules a GPU enforces too: launch limits, dynamic shared memory, missing kernels, empty
/// allocations.
fn hardware_rules() {
    let gpu = fresh();
    let n = 1000usize;
    let (x, y) = (Raw::new(n * 4), Raw::new(n * 4));
    x.upload(&values(n));

    // More than 1024 threads per block (CUDA C++ Programming Guide, compute capabilities).
    expect_err(
        "block of 1025",
        cast(&gpu, x.0, y.0, n as i64, 1, 1025, 0),
        CUresult::CUDA_ERROR_INVALID_VALUE,
        &["block"],
    );
    // Dynamic shared memory above 48 KiB without the opt-in attribute, then with it, then above
    // the device's opt-in maximum (cuFuncSetAttribute documents the limit).
    expect_err(
        "64 KiB dynamic shared memory without the attribute",
        cast(&gpu, x.0, y.0, n as i64, 4, 256, 64 << 10),
        CUresult::CUDA_ERROR_INVALID_VALUE,
        &["MAX_DYNAMIC_SHARED_SIZE_BYTES"],
    );
    let f = gpu.function("steps", "steps_cast_f32").unwrap();
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        64 << 10,
    )
    .expect("opt in to 64 KiB");
    cast(&gpu, x.0, y.0, n as i64, 4, 256, 64 << 10).expect("64 KiB once opted in");
    assert_eq!(
        y.download().unwrap(),
        values(n),
        "the cast with 64 KiB of shared memory"
    );
    let optin = gpu.properties().max_shared_per_block as i32;
    expect_err(
        "opt-in above the device's maximum",
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            optin + 1,
        ),
        CUresult::CUDA_ERROR_INVALID_VALUE,
        &[],
    );
    // __launch_bounds__(256) on unfused_ce_rows: 512 threads may not launch (cuLaunchKernel:
    // CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES when the block needs more than the function allows).
    let ce = gpu
        .function("unfused", "unfused_ce_rows_f32")
        .expect("ce_rows");
    let mut args = [0u64; 16];
    let mut params: Vec<*mut c_void> = args.iter_mut().map(p).collect();
    let bounds = launch(&ce, gpu.stream(), 1, 512, 0, &mut params);
    if EMULATED.load(Ordering::Relaxed) {
        expect_err(
            "512 threads for __launch_bounds__(256)",
            bounds,
            CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
            &["__launch_bounds__(256)"],
        );
    } else {
        // The Programming Guide says only that such a launch fails; record the driver's code.
        let e = bounds.expect_err("512 threads for __launch_bounds__(256) launched");
        eprintln!(
            "the driver refuses a launch beyond __launch_bounds__ with {:?}",
            e.0
        );
        assert!(
            matches!(
                e.0,
                CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES | CUresult::CUDA_ERROR_INVALID_VALUE
            ),
            "{e}"
        );
    }
    // A kernel that is not in the module.
    let missing = gpu
        .function("unfused", "unfused_no_such_kernel")
        .unwrap_err();
    assert!(missing.to_string().contains("not in module"), "{missing}");
    // cuMemAlloc documents CUDA_ERROR_INVALID_VALUE for 0 bytes.
    // SAFETY: an allocation request only.
    expect_err(
        "0-byte allocation",
        unsafe { result::malloc_sync(0) },
        CUresult::CUDA_ERROR_INVALID_VALUE,
        &[],
    );
    // The context is still usable: none of those was a fault.
    cast(&gpu, x.0, y.0, n as i64, 4, 256, 0).expect("a good launch after the refused ones");
    gpu.synchronize().expect("no sticky error");
    x.free();
    y.free();
}

/// Fresh memory reads as NaN; a grid one block short leaves its rows unwritten (NaN), which the
/// parity tests' comparisons then fail on.
fn grid_one_block_short() {
    let gpu = fresh();
    // steps_fill_unit_rows_f32(float* x, int64_t rows, int cols, uint64_t seed): one warp per
    // row, no grid stride.
    let f = gpu.function("steps", "steps_fill_unit_rows_f32").unwrap();
    let (rows, cols, per_block) = (40usize, 9i32, 8usize);
    let x = Raw::new(rows * cols as usize * 4);
    let (mut xp, mut r, mut c, mut seed) = (x.0, rows as i64, cols, 7u64);
    let grid = (rows / per_block) as u32 - 1;
    launch(
        &f,
        gpu.stream(),
        grid,
        (per_block * 32) as u32,
        0,
        &mut [p(&mut xp), p(&mut r), p(&mut c), p(&mut seed)],
    )
    .expect("launch");
    let v = x.download().unwrap();
    let written = grid as usize * per_block * cols as usize;
    for row in v[..written].chunks(cols as usize) {
        let norm: f32 = row.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "a written row has norm {norm}");
    }
    assert!(
        v[written..].iter().all(|a| a.is_nan()),
        "the rows the missing block owns are NaN"
    );
    x.free();
}

/// A kernel writing one element past a buffer's end (inside the 256-byte alignment slack, where a
/// GPU would not fault): the canary after the buffer catches it, and the error is sticky.
fn small_overrun() {
    let gpu = fresh();
    let n = 1000usize;
    let (x, y) = (Raw::new(n * 4), Raw::new((n - 1) * 4));
    x.upload(&values(n));
    expect_err(
        "a one-element overrun",
        cast(&gpu, x.0, y.0, n as i64, 4, 256, 0),
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        &[
            "steps_cast_f32",
            "a write past the end of allocation",
            "3996 bytes",
            "(bytes 0 to 3 past its end)",
        ],
    );
    expect_err(
        "the next call",
        gpu.synchronize().map_err(|e| match e {
            fused_infonce::Error::Driver(d) => d,
            other => panic!("{other}"),
        }),
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        &["sticky"],
    );
}

/// A kernel writing far past a buffer's end: the guard page faults, and the message names the
/// allocation and the distance.
fn large_overrun() {
    let gpu = fresh();
    let n = 10_000usize;
    let (x, y) = (Raw::new(n * 4), Raw::new(1000 * 4));
    x.upload(&values(n));
    expect_err(
        "a 9000-element overrun",
        cast(&gpu, x.0, y.0, n as i64, 8, 256, 0),
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        &["steps_cast_f32", "past the end of allocation"],
    );
}

/// An input freed before the kernel that reads it was launched.
fn freed_input() {
    let gpu = fresh();
    let n = 100usize;
    let (x, y) = (Raw::new(n * 4), Raw::new(n * 4));
    x.upload(&values(n));
    let stale = x.0;
    x.free();
    expect_err(
        "a freed input",
        cast(&gpu, stale, y.0, n as i64, 1, 128, 0),
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        &["parameter 0 (const float*)", "use after free"],
    );
}

/// A buffer written on one stream and read on another with nothing ordering the two.
fn unordered_streams() {
    let gpu = fresh();
    let n = 100usize;
    let (x, y, z) = (Raw::new(n * 4), Raw::new(n * 4), Raw::new(n * 4));
    x.upload(&values(n));
    let other = gpu.context().new_stream().unwrap();
    cast(&gpu, x.0, y.0, n as i64, 1, 128, 0).expect("write y on the first stream");
    let f = gpu.function("steps", "steps_cast_f32").unwrap();
    let (mut yp, mut zp, mut nn) = (y.0, z.0, n as i64);
    expect_err(
        "read y on a second stream",
        launch(
            &f,
            &other,
            1,
            128,
            0,
            &mut [p(&mut yp), p(&mut zp), p(&mut nn)],
        ),
        CUresult::CUDA_ERROR_ILLEGAL_STATE,
        &[
            "race on allocation",
            "nothing (event, stream or context synchronisation) orders the two",
        ],
    );
    drop(other);
}

/// An event between the streams orders them: the same two launches are fine.
fn ordered_streams() {
    let gpu = fresh();
    let n = 100usize;
    let (x, y, z) = (Raw::new(n * 4), Raw::new(n * 4), Raw::new(n * 4));
    x.upload(&values(n));
    let other = gpu.context().new_stream().unwrap();
    cast(&gpu, x.0, y.0, n as i64, 1, 128, 0).expect("write y");
    other
        .join(gpu.stream())
        .expect("event: the second stream waits for the first");
    let f = gpu.function("steps", "steps_cast_f32").unwrap();
    let (mut yp, mut zp, mut nn) = (y.0, z.0, n as i64);
    launch(
        &f,
        &other,
        1,
        128,
        0,
        &mut [p(&mut yp), p(&mut zp), p(&mut nn)],
    )
    .expect("ordered read");
    other.synchronize().unwrap();
    assert_eq!(z.download().unwrap(), values(n));
    for r in [x, y, z] {
        r.free();
    }
}

#[test]
fn the_emulated_device_enforces_the_hardware_rules() {
    // Every error below is expected and its message checked: keep the emulator's own copy of each
    // off stderr. Set before the first driver call (the emulator reads it at cuInit); this binary
    // has no other test, so no thread reads the environment meanwhile.
    std::env::set_var("FUSED_INFONCE_EMU_QUIET", "1");
    let Some(gpu) = support::gpu("the_emulated_device_enforces_the_hardware_rules") else {
        return;
    };
    let emulated = gpu.properties().emulated;
    EMULATED.store(emulated, Ordering::Relaxed);
    drop(gpu);
    launch_layer_opts_in();
    hardware_rules();
    if !emulated {
        eprintln!("a real GPU: the emulator-only scenarios (canary, guard pages, freed inputs, races) do not run");
        return;
    }
    grid_one_block_short();
    small_overrun();
    large_overrun();
    freed_input();
    unordered_streams();
    ordered_streams();
    // After all those faults, a fresh context is clean.
    let gpu = fresh();
    let x = Raw::new(16);
    x.upload(&values(4));
    assert_eq!(x.download().unwrap(), values(4));
    x.free();
    gpu.synchronize().unwrap();
}
