//! The GPU benchmarks (`infonce bench`, `benches/`), following spec/performance.md: a preset's
//! inputs generated on the device, CUDA-event timing after warm-up, the card's bf16 GEMM and copy
//! peaks measured in the same run, the pool's peak memory; [`run()`] times the presets (the
//! presets themselves, the report and its rows are [`crate::bench`]'s).

use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::LaunchConfig;

pub mod run;

pub use run::run;

use super::op::{DeviceInputs, QueueView};
use super::runtime::cublas::{cublas_handle, GemmCall};
use super::runtime::launch::{self, launch, Args};
use super::runtime::Gpu;
use super::runtime::{DeviceElement, DeviceMatrix};
use crate::bench::{Peaks, Preset, Timing};
use crate::error::{Error, Result};
use crate::spec::Mode;
use half::bf16;

/// Times `f` (which queues work on `gpu`'s stream; `f(i)` gets the repetition index, e.g. to
/// rotate input buffers) with CUDA events around each call: `warmup` untimed calls, then
/// `repeat` timed ones.
pub fn time_device<F>(gpu: &Gpu, warmup: usize, repeat: usize, mut f: F) -> Result<Timing>
where
    F: FnMut(usize) -> Result<()>,
{
    let stream = gpu.stream();
    for i in 0..warmup {
        f(i)?;
    }
    gpu.synchronize()?;
    let mut samples = Vec::with_capacity(repeat);
    for i in 0..repeat.max(1) {
        let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f(warmup + i)?;
        let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        end.synchronize()?;
        samples.push(start.elapsed_ms(&end)? as f64);
    }
    Ok(Timing::from_samples(samples))
}

/// Measures [`Peaks`]: an `8192³` bf16 GEMM and a 1 GiB device copy, medians of `repeat`.
pub fn measure_peaks(gpu: &Gpu, repeat: usize) -> Result<Peaks> {
    let blas = cublas_handle(gpu)?;
    let n = 8192usize;
    let mut a = DeviceMatrix::<half::bf16>::zeros(gpu, n, n)?;
    let mut b = DeviceMatrix::<half::bf16>::zeros(gpu, n, n)?;
    fill_unit_rows(gpu, &mut a, 1)?;
    fill_unit_rows(gpu, &mut b, 2)?;
    let mut c = DeviceMatrix::<half::bf16>::zeros(gpu, n, n)?;
    let handle = *blas.handle();
    let t = {
        let mut g = Args::new(gpu);
        let call = GemmCall {
            ta: cublasOperation_t::CUBLAS_OP_T,
            tb: cublasOperation_t::CUBLAS_OP_N,
            m: n,
            n,
            k: n,
            a: g.read_ptr(a.slice(), 0)?,
            a_type: cudaDataType::CUDA_R_16BF,
            lda: n,
            b: g.read_ptr(b.slice(), 0)?,
            b_type: cudaDataType::CUDA_R_16BF,
            ldb: n,
            beta: 0.0,
            c: g.write_ptr(c.slice_mut(), 0)?,
            c_type: cudaDataType::CUDA_R_16BF,
            ldc: n,
            compute: cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        // SAFETY: a, b, c are n×n bf16 buffers guarded by `g` until the timing has synchronised.
        time_device(gpu, 3, repeat, |_| unsafe { call.run(handle) })?
    };
    let tflops = 2.0 * (n as f64).powi(3) / (t.median_ms * 1e-3) / 1e12;
    drop((a, b, c));

    let bytes = 1usize << 30;
    let src = gpu.stream().alloc_zeros::<u8>(bytes)?;
    let mut dst = gpu.stream().alloc_zeros::<u8>(bytes)?;
    let t = time_device(gpu, 3, repeat, |_| {
        gpu.stream().memcpy_dtod(&src, &mut dst)?;
        Ok(())
    })?;
    let tbps = 2.0 * bytes as f64 / (t.median_ms * 1e-3) / 1e12;
    Ok(Peaks {
        bf16_gemm_tflops: tflops,
        copy_tbps: tbps,
    })
}

/// Fills `x` with random rows of unit L2 norm (device-side hash of `(seed, row, col)`:
/// `steps_fill_unit_rows_<dtype>`, kernels/steps.cu).
pub fn fill_unit_rows<T: DeviceElement>(
    gpu: &Gpu,
    x: &mut DeviceMatrix<T>,
    seed: u64,
) -> Result<()> {
    const K: &str = "steps_fill_unit_rows";
    if x.rows() == 0 || x.cols() == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (launch::grid_dim(K, x.rows(), 8)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows, cols) = (x.rows() as i64, x.cols() as i32);
    let mut a = Args::new(gpu);
    a.write(x.slice_mut()).i64(rows).i32(cols).u64(seed);
    // SAFETY: steps_fill_unit_rows_<dtype>(T* x, int64_t rows, int cols, uint64_t seed); x holds
    // rows×cols elements; one warp per row.
    unsafe { launch(gpu, K, "steps", &format!("{K}_{}", T::DTYPE.name()), cfg, a) }
}

/// Peak bytes allocated from the device's default memory pool (where this crate's stream-ordered
/// allocations come from) while `f` runs, above what was in use before it: the peak extra device
/// memory of an op, its outputs included. `None` where the device has no memory pools.
pub fn pool_peak<R>(gpu: &Gpu, f: impl FnOnce() -> Result<R>) -> Result<(R, Option<u64>)> {
    use cudarc::driver::sys::{self, CUmemPool_attribute as A};
    gpu.context().bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one pool handle for a valid device of the bound context.
    let ok = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, gpu.context().cu_device()) }
        .result()
        .is_ok();
    let get = |a: A| -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: the USED_MEM attributes are cuuint64_t values.
        unsafe { sys::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut std::ffi::c_void) }
            .result()
            .ok()
            .map(|_| v)
    };
    gpu.synchronize()?;
    let before = if ok {
        get(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    } else {
        None
    };
    if before.is_some() {
        let mut zero: u64 = 0;
        // SAFETY: resetting the high watermark takes a cuuint64_t 0.
        let _ = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                A::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut std::ffi::c_void,
            )
        };
    }
    let r = f()?;
    gpu.synchronize()?;
    let peak = match before {
        Some(b) => get(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH).map(|h| h.saturating_sub(b)),
        None => None,
    };
    Ok((r, peak))
}

/// A preset's device inputs (bf16): `a`, `b`, `c` are query / positive / queue (queue mode),
/// the embeddings (inbatch), query / key (cross, symmetric); the ones a mode does not use are
/// empty.
pub struct PresetInputs {
    /// The first input.
    pub a: DeviceMatrix<bf16>,
    /// The second input (empty in inbatch mode).
    pub b: DeviceMatrix<bf16>,
    /// The queue (empty outside queue mode).
    pub c: DeviceMatrix<bf16>,
}

impl PresetInputs {
    /// Random unit rows filled on the device ([`fill_unit_rows`], seeds `3·seed + 1 … + 3`).
    pub fn random(gpu: &Gpu, p: &Preset, seed: u64) -> Result<Self> {
        let (ra, rb, rc) = p.rows();
        let mk = |rows: usize, s: u64| -> Result<DeviceMatrix<bf16>> {
            let mut m = DeviceMatrix::zeros(gpu, rows, p.dim)?;
            fill_unit_rows(gpu, &mut m, s)?;
            Ok(m)
        };
        Ok(Self {
            a: mk(ra, 3 * seed + 1)?,
            b: mk(rb, 3 * seed + 2)?,
            c: mk(rc, 3 * seed + 3)?,
        })
    }

    /// The inputs of `mode` over these buffers (cross mode with the default targets).
    pub fn inputs(&self, mode: Mode) -> DeviceInputs<'_, bf16> {
        match mode {
            Mode::Queue => DeviceInputs::Queue {
                query: &self.a,
                positive: &self.b,
                queue: QueueView::whole(&self.c),
            },
            Mode::InBatch => DeviceInputs::InBatch {
                embeddings: &self.a,
            },
            Mode::Cross => DeviceInputs::Cross {
                query: &self.a,
                key: &self.b,
                targets: None,
            },
            Mode::Symmetric => DeviceInputs::Symmetric {
                query: &self.a,
                key: &self.b,
            },
        }
    }
}

/// Device memory free right now (bytes).
pub fn free_memory(gpu: &Gpu) -> Result<u64> {
    Ok(gpu.context().mem_get_info()?.0 as u64)
}

/// Checks the inputs and gradients of `p` fit on the device (with 1 GB to spare).
pub fn preset_fits(gpu: &Gpu, p: &Preset) -> Result<()> {
    let need = p.input_bytes() + p.grad_bytes() + (1 << 30);
    let free = free_memory(gpu)?;
    if need > free {
        return Err(Error::Unsupported(format!(
            "preset {}: inputs and gradients need {:.1} GB, {:.1} GB free",
            p.name,
            need as f64 / 1e9,
            free as f64 / 1e9
        )));
    }
    Ok(())
}
