//! cuBLAS, loaded at run time: the handle on a [`Gpu`]'s stream and one GEMM call whose operands
//! come from an [`Args`] (so their guards order the call against other streams, as a kernel
//! launch's are). Used by the unfused baseline and the benchmarks' matrix-product peak.

use std::ffi::c_void;

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cudaDataType,
};
use cudarc::cublas::{result as blas, CudaBlas};

use super::device::Gpu;
#[cfg(doc)]
use super::launch::Args;
use super::launch::Ptr;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The cuBLAS element type of a storage dtype.
pub fn cuda_type(d: DType) -> Result<cudaDataType> {
    Ok(match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::F16 => cudaDataType::CUDA_R_16F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        DType::F64 => {
            return Err(Error::Unsupported(
                "the CUDA backend takes f32, f16 or bf16 (not f64)".into(),
            ))
        }
    })
}

/// Whether the cuBLAS library can be loaded (never panics).
#[cfg(not(feature = "candle-cuda"))]
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen libcublas by its usual names.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Whether the cuBLAS library can be loaded: always, with the `candle-cuda` feature (cudarc's
/// `dynamic-linking`: the program is linked against libcublas).
#[cfg(feature = "candle-cuda")]
pub fn cublas_present() -> bool {
    true
}

/// A cuBLAS handle on `gpu`'s stream, or a clear error when cuBLAS is missing.
pub fn cublas_handle(gpu: &Gpu) -> Result<CudaBlas> {
    if !cublas_present() {
        return Err(Error::Unsupported(
            "cuBLAS could not be loaded on this machine (the unfused baseline and the benchmarks' \
             matrix-product peak need it: install the CUDA toolkit's cuBLAS, or put it on \
             LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    gpu.context().bind_to_thread()?;
    Ok(CudaBlas::new(gpu.stream().clone())?)
}

/// One GEMM in cuBLAS's column-major terms, `C = op(A)·op(B) + beta·C` with op(A) m×k and op(B)
/// k×n (the callers map their row-major products onto it); the operands are [`Ptr`]s from an
/// [`Args`] that guards them for the call.
#[derive(Debug, Clone, Copy)]
pub struct GemmCall {
    /// op(A).
    pub ta: cublasOperation_t,
    /// op(B).
    pub tb: cublasOperation_t,
    /// Rows of op(A) and C.
    pub m: usize,
    /// Columns of op(B) and C.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// A.
    pub a: Ptr,
    /// A's element type.
    pub a_type: cudaDataType,
    /// A's leading dimension.
    pub lda: usize,
    /// B.
    pub b: Ptr,
    /// B's element type.
    pub b_type: cudaDataType,
    /// B's leading dimension.
    pub ldb: usize,
    /// C's factor (0: C is not read).
    pub beta: f32,
    /// C.
    pub c: Ptr,
    /// C's element type.
    pub c_type: cudaDataType,
    /// C's leading dimension.
    pub ldc: usize,
    /// The compute type (f32, or f32 with TF32 tensor cores).
    pub compute: cublasComputeType_t,
}

fn c_int(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Launch {
        kernel: "cublas gemm",
        reason: format!("{what} = {v} does not fit in a 32-bit int"),
    })
}

impl GemmCall {
    /// Runs the call on `handle` (alpha = 1), on the handle's stream.
    ///
    /// # Safety
    /// The pointers must come from an [`Args`] of the handle's `Gpu` that is still alive (its
    /// guards order the call against other streams), over buffers of at least the sizes the
    /// call's shapes and leading dimensions imply.
    pub unsafe fn run(&self, handle: cublasHandle_t) -> Result<()> {
        if self.m == 0 || self.n == 0 {
            return Ok(());
        }
        let alpha = 1.0f32;
        let beta = self.beta;
        // SAFETY: the caller's contract (above); alpha and beta live across the call.
        unsafe {
            blas::gemm_ex(
                handle,
                self.ta,
                self.tb,
                c_int("m", self.m)?,
                c_int("n", self.n)?,
                c_int("k", self.k)?,
                &alpha as *const f32 as *const c_void,
                self.a.addr() as *const c_void,
                self.a_type,
                c_int("lda", self.lda.max(1))?,
                self.b.addr() as *const c_void,
                self.b_type,
                c_int("ldb", self.ldb.max(1))?,
                &beta as *const f32 as *const c_void,
                self.c.addr() as *mut c_void,
                self.c_type,
                c_int("ldc", self.ldc.max(1))?,
                self.compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }
}
