//! Timing and device-peak helpers for the benchmarks (`infonce bench`, `benches/`), following
//! spec/performance.md: CUDA-event timing after warm-up, medians over at least 20 repetitions,
//! the card's bf16 GEMM and copy peaks measured in the same run, the presets and their floors.

use cudarc::cublas::sys::{cublasComputeType_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::LaunchConfig;

use super::op::{DeviceInputs, QueueView};
use super::runtime::cublas::{cublas_handle, GemmCall};
use super::runtime::launch::{self, launch, Args};
use super::runtime::Gpu;
use super::runtime::{DeviceElement, DeviceMatrix};
use crate::error::{Error, Result};
use crate::spec::{LossSpec, Mode};
use half::bf16;

/// PyTorch's timings of one preset, as `bench/torch_reference.py` prints them (a JSON array of
/// these); `null` timings with a note where a preset did not run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TorchTiming {
    /// The preset's name.
    pub preset: String,
    /// PyTorch eager, milliseconds.
    #[serde(default)]
    pub torch_ms: Option<f64>,
    /// `torch.compile`, milliseconds.
    #[serde(default)]
    pub torch_compile_ms: Option<f64>,
    /// Why a timing is missing.
    #[serde(default)]
    pub torch_note: Option<String>,
}

/// Parses `bench/torch_reference.py`'s output (named `source` in messages). A row that is not
/// an object with a string `preset` and numbers or nulls for the timings, a negative or
/// non-finite timing, or a preset given twice is an error naming the row: a malformed file is
/// reported, not silently merged in part.
pub fn parse_torch_timings(text: &str, source: &str) -> Result<Vec<TorchTiming>> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::Input(format!("{source}: not JSON ({e})")))?;
    let rows = v
        .as_array()
        .ok_or_else(|| Error::Input(format!("{source}: expected a JSON array of rows")))?;
    let mut out: Vec<TorchTiming> = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let t: TorchTiming = serde_json::from_value(row.clone())
            .map_err(|e| Error::Input(format!("{source}: row {i} ({row}): {e}")))?;
        for (name, ms) in [
            ("torch_ms", t.torch_ms),
            ("torch_compile_ms", t.torch_compile_ms),
        ] {
            if let Some(x) = ms {
                if !(x.is_finite() && x >= 0.0) {
                    return Err(Error::Input(format!(
                        "{source}: row {i} (preset {}): {name} = {x} is not a time",
                        t.preset
                    )));
                }
            }
        }
        if out.iter().any(|o| o.preset == t.preset) {
            return Err(Error::Input(format!(
                "{source}: row {i}: preset {} appears twice",
                t.preset
            )));
        }
        out.push(t);
    }
    Ok(out)
}

/// Repetitions below which a median is not reported as a benchmark figure.
pub const MIN_REPEAT: usize = 20;

/// One timed region: the median and spread of `samples` CUDA-event measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Median milliseconds.
    pub median_ms: f64,
    /// Fastest repetition.
    pub min_ms: f64,
    /// Slowest repetition.
    pub max_ms: f64,
    /// Every repetition, in run order.
    pub samples: Vec<f64>,
}

impl Timing {
    /// From raw samples (at least one).
    pub fn from_samples(samples: Vec<f64>) -> Self {
        let mut s = samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        let median_ms = if s.is_empty() {
            f64::NAN
        } else if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            0.5 * (s[s.len() / 2 - 1] + s[s.len() / 2])
        };
        Self {
            median_ms,
            min_ms: s.first().copied().unwrap_or(f64::NAN),
            max_ms: s.last().copied().unwrap_or(f64::NAN),
            samples,
        }
    }
}

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

/// The card's measured peaks (spec/performance.md, "Floors").
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Peaks {
    /// Dense bf16 GEMM through cuBLAS (bf16 in and out, f32 accumulation), TFLOP/s.
    pub bf16_gemm_tflops: f64,
    /// Device-to-device copy, bytes read + written per second, TB/s.
    pub copy_tbps: f64,
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

/// Fills `x` with random rows of unit L2 norm (device-side hash of `(seed, row, col)`).
pub fn fill_unit_rows<T: DeviceElement>(
    gpu: &Gpu,
    x: &mut DeviceMatrix<T>,
    seed: u64,
) -> Result<()> {
    const K: &str = "unfused_fill_unit_rows";
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
    // SAFETY: unfused_fill_unit_rows_<dtype>(T* x, int64_t rows, int cols, uint64_t seed); x holds
    // rows×cols elements; one warp per row.
    unsafe {
        launch(
            gpu,
            K,
            "unfused",
            &format!("{K}_{}", T::DTYPE.name()),
            cfg,
            a,
        )
    }
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
    /// The rows of `a`, `b` and `c` for `p`'s mode.
    pub fn rows(p: &Preset) -> (usize, usize, usize) {
        match p.mode {
            Mode::Queue => (p.anchors, p.anchors, p.keys),
            Mode::InBatch => (p.anchors, 0, 0),
            _ => (p.anchors, p.keys, 0),
        }
    }

    /// Random unit rows filled on the device ([`fill_unit_rows`], seeds `3·seed + 1 … + 3`).
    pub fn random(gpu: &Gpu, p: &Preset, seed: u64) -> Result<Self> {
        let (ra, rb, rc) = Self::rows(p);
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

/// A benchmark shape of spec/performance.md.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// `moco`, `moco-xl`, `simclr`, `clip`, `clip-xl`.
    pub name: &'static str,
    /// The mode.
    pub mode: Mode,
    /// Anchors: N (queue, symmetric) or 2N (inbatch).
    pub anchors: usize,
    /// Keys: K (queue), 2N (inbatch), N (symmetric).
    pub keys: usize,
    /// D.
    pub dim: usize,
    /// τ.
    pub tau: f64,
    /// Whether τ is learnable (dτ is part of the work).
    pub learnable: bool,
}

/// Every preset, in the order of spec/performance.md (all bf16).
pub const PRESETS: [Preset; 5] = [
    Preset {
        name: "moco",
        mode: Mode::Queue,
        anchors: 256,
        keys: 65_536,
        dim: 128,
        tau: 0.2,
        learnable: false,
    },
    Preset {
        name: "moco-xl",
        mode: Mode::Queue,
        anchors: 4096,
        keys: 1 << 20,
        dim: 128,
        tau: 0.2,
        learnable: false,
    },
    Preset {
        name: "simclr",
        mode: Mode::InBatch,
        anchors: 8192,
        keys: 8192,
        dim: 128,
        tau: 0.1,
        learnable: false,
    },
    Preset {
        name: "clip",
        mode: Mode::Symmetric,
        anchors: 32_768,
        keys: 32_768,
        dim: 768,
        tau: 0.07,
        learnable: true,
    },
    Preset {
        name: "clip-xl",
        mode: Mode::Symmetric,
        anchors: 131_072,
        keys: 131_072,
        dim: 1024,
        tau: 0.07,
        learnable: true,
    },
];

impl Preset {
    /// The preset called `name`.
    pub fn by_name(name: &str) -> Option<Preset> {
        PRESETS.iter().copied().find(|p| p.name == name)
    }

    /// The preset's loss spec (mean reduction; the queue's gradient is not asked for, as MoCo).
    pub fn spec(&self) -> Result<LossSpec> {
        let b = LossSpec::builder(self.mode);
        if self.learnable {
            b.learnable_temperature(self.tau).build()
        } else {
            b.temperature(self.tau).build()
        }
    }

    /// The same spec on a small shape of the same mode (for the correctness check before timing).
    pub fn small(&self) -> Preset {
        Preset {
            anchors: if self.mode == Mode::InBatch { 256 } else { 128 },
            keys: match self.mode {
                Mode::Queue => 2048,
                Mode::InBatch => 256,
                _ => 128,
            },
            dim: self.dim.min(256),
            ..*self
        }
    }

    /// Matrix FLOPs of the fused schedule (spec/performance.md): `2·anchors·keys·D` per product;
    /// two products in queue mode (S and Σ P·m, one pass), four otherwise (S, the recompute in
    /// the backward, two gradient products).
    pub fn matrix_flops(&self) -> f64 {
        let products = if self.mode == Mode::Queue { 2.0 } else { 4.0 };
        2.0 * self.anchors as f64 * self.keys as f64 * self.dim as f64 * products
    }

    /// One exponential per logit per pass.
    pub fn exps(&self) -> f64 {
        let passes = if self.mode == Mode::Queue { 1.0 } else { 2.0 };
        self.anchors as f64 * self.keys as f64 * passes
    }

    /// Bytes of the inputs (bf16).
    pub fn input_bytes(&self) -> u64 {
        let rows = match self.mode {
            Mode::Queue => 2 * self.anchors + self.keys,
            Mode::InBatch => self.anchors,
            _ => 2 * self.anchors,
        };
        (rows * self.dim * 2) as u64
    }

    /// Bytes of the gradients (f32, every input except the queue).
    pub fn grad_bytes(&self) -> u64 {
        let rows = match self.mode {
            Mode::Queue => 2 * self.anchors,
            Mode::InBatch => self.anchors,
            _ => 2 * self.anchors,
        };
        (rows * self.dim * 4) as u64
    }

    /// The matrix floor in milliseconds at `tflops`.
    pub fn matrix_floor_ms(&self, tflops: f64) -> f64 {
        self.matrix_flops() / (tflops * 1e12) * 1e3
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_timings_parse_and_refuse_malformed_rows() {
        let ok = parse_torch_timings(
            r#"[{"preset":"moco","torch_ms":1.5,"torch_compile_ms":1.2},
                {"preset":"clip-xl","torch_ms":null,"torch_compile_ms":null,"torch_note":"OOM"},
                {"preset":"simclr","torch_ms":2}]"#,
            "t.json",
        )
        .unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[0].torch_ms, Some(1.5));
        assert_eq!(ok[0].torch_compile_ms, Some(1.2));
        assert_eq!(ok[1].torch_ms, None);
        assert_eq!(ok[1].torch_note.as_deref(), Some("OOM"));
        assert_eq!(ok[2].torch_ms, Some(2.0));
        for (bad, says) in [
            ("not json", "not JSON"),
            (r#"{"preset":"moco"}"#, "array"),
            (r#"[{"torch_ms":1.0}]"#, "row 0"),
            (r#"[{"preset":"moco","torch_ms":"fast"}]"#, "row 0"),
            (r#"[3]"#, "row 0"),
            (r#"[{"preset":"moco","torch_ms":-1}]"#, "not a time"),
            (r#"[{"preset":"a"},{"preset":"a"}]"#, "twice"),
        ] {
            let e = parse_torch_timings(bad, "t.json").unwrap_err().to_string();
            assert!(e.contains("t.json") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn median_and_spread() {
        let t = Timing::from_samples(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!(t.median_ms, 2.5);
        assert_eq!((t.min_ms, t.max_ms), (1.0, 10.0));
        assert_eq!(Timing::from_samples(vec![5.0, 1.0, 3.0]).median_ms, 3.0);
    }

    #[test]
    fn preset_flops_match_the_spec_table() {
        let g = |n: &str| Preset::by_name(n).unwrap().matrix_flops() / 1e9;
        assert!((g("moco") - 8.6).abs() < 0.05, "{}", g("moco"));
        assert!((g("simclr") - 68.7).abs() < 0.5, "{}", g("simclr"));
        assert!((g("clip") / 1e3 - 6.6).abs() < 0.05, "{}", g("clip"));
        // clip-xl's f32 logit matrix is 68.7 GB.
        let p = Preset::by_name("clip-xl").unwrap();
        assert!(((p.anchors * p.keys * 4) as f64 / 1e9 - 68.7).abs() < 0.1);
    }
}
