// Shared device helpers for every kernel family: dtype conversion, warp reductions, the
// per-dtype instantiation macro, and the (max, sum) merge of the online log-sum-exp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __half f16;
typedef __nv_bfloat16 bf16;

// Accumulation is always f32; storage may be f32, f16 or bf16.
template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<f16>(f16 x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<bf16>(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int WARP = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Online log-sum-exp state (spec: Chunking): `row_max` and `row_sum = Σ exp(z − row_max)`.
// The empty state is (-inf, 0).
struct LseState {
    float row_max;
    float row_sum;
};

__device__ __forceinline__ LseState lse_empty() { return {-INFINITY, 0.0f}; }

// Merges two partial (max, sum) pairs; exact up to rounding, and safe for empty states. expf, not
// __expf: the fast intrinsic's error grows with |max − m| (2 + 1.173·|x| ulp), and the v1 kernels,
// the reference path, are held to 1e-5 in f32.
__device__ __forceinline__ LseState lse_merge(LseState a, LseState b) {
    float m = fmaxf(a.row_max, b.row_max);
    if (m == -INFINITY) return lse_empty();
    return {m, a.row_sum * expf(a.row_max - m) + b.row_sum * expf(b.row_max - m)};
}

__device__ __forceinline__ float lse_value(LseState s) { return s.row_max + logf(s.row_sum); }

// Calls X(name, type) for each storage dtype, to instantiate one template as extern "C"
// entry points NAME_f32, NAME_f16 and NAME_bf16 (nothing written per dtype).
#define INFONCE_FOR_EACH_DTYPE(X) X(f32, float) X(f16, f16) X(bf16, bf16)
