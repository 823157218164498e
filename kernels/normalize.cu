// Row-wise L2 normalisation, forward and backward (spec/losses.md, Normalisation).
//
//   forward:  u = x / max(‖x‖₂, ε),           stores u (input dtype) and inv_norm = 1/max(‖x‖, ε) (f32)
//   backward: dx = (du − u (u·du)) · inv_norm  (for ‖x‖ > ε; dx = du · inv_norm otherwise)
//
// One warp per row, f32 accumulation; rows·cols may exceed 2^31 (64-bit offsets).
#include "common.cuh"

constexpr float NORM_EPS = 1e-12f;

template <typename T>
__device__ void normalize_fwd(const T* __restrict__ x, T* __restrict__ u,
                              float* __restrict__ inv_norm, int64_t rows, int cols) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const T* xr = x + row * (int64_t)cols;
    float ss = 0.0f;
    for (int c = lane; c < cols; c += WARP) {
        float v = to_f32(xr[c]);
        ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    const float inv = 1.0f / fmaxf(sqrtf(ss), NORM_EPS);
    T* ur = u + row * (int64_t)cols;
    for (int c = lane; c < cols; c += WARP) ur[c] = from_f32<T>(to_f32(xr[c]) * inv);
    if (lane == 0) inv_norm[row] = inv;
}

template <typename T>
__device__ void normalize_bwd(const T* __restrict__ x, const float* __restrict__ inv_norm,
                              const float* __restrict__ du, float* __restrict__ dx, int64_t rows,
                              int cols) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const int64_t off = row * (int64_t)cols;
    const float inv = inv_norm[row];
    // ‖x‖ ≤ ε: the forward was x/ε, a linear map.
    const bool clamped = inv >= 1.0f / NORM_EPS;
    float dot = 0.0f;
    if (!clamped) {
        for (int c = lane; c < cols; c += WARP) dot = fmaf(to_f32(x[off + c]) * inv, du[off + c], dot);
        dot = warp_sum(dot);
    }
    for (int c = lane; c < cols; c += WARP) {
        const float uc = to_f32(x[off + c]) * inv;
        dx[off + c] = (du[off + c] - uc * dot) * inv;
    }
}

#define NORMALIZE_ENTRY(NAME, T)                                                              \
    extern "C" __global__ void normalize_fwd_##NAME(const T* x, T* u, float* inv_norm,       \
                                                    int64_t rows, int cols) {                 \
        normalize_fwd<T>(x, u, inv_norm, rows, cols);                                         \
    }                                                                                         \
    extern "C" __global__ void normalize_bwd_##NAME(const T* x, const float* inv_norm,       \
                                                    const float* du, float* dx, int64_t rows, \
                                                    int cols) {                               \
        normalize_bwd<T>(x, inv_norm, du, dx, rows, cols);                                    \
    }
INFONCE_FOR_EACH_DTYPE(NORMALIZE_ENTRY)
