//! The kernel paths behind [`crate::cuda::evaluate_device`], one module each, every one an
//! `evaluate` over the op's types (`op.rs`) and the shared steps (`steps/`); none imports another:
//!
//! - [`simple`]: the v1 fused kernels (kernels/infonce.cu) on CUDA cores: every mode,
//!   temperature, variant and reduction; the baseline the others are checked against;
//! - [`tensor_core`]: the `mma.sync` kernels (kernels/infonce_mma.cu): f16/bf16 (f32 with tf32
//!   opt-in), D ∈ {64, 128}, the standard variant;
//! - [`unfused`]: what users write by hand, cuBLAS GEMM → f32 logits → softmax cross-entropy
//!   (kernels/unfused.cu) → cuBLAS GEMMs; the yardstick the fused kernels are timed against.

pub mod simple;
pub mod tensor_core;
pub mod unfused;
