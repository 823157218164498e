// The small kernels the loss paths share (src/cuda/steps/) and the benchmarks' input generator.
//
//   steps_sum_scaled:      out[0] = c · Σ_k x[k], one block, a fixed order (warp sums, then the
//                          warps' partials in order): the mean / sum reduction of per-anchor losses
//                          (c = 1/N, ½ for symmetric, or a gradient's constant), and dL/dτ from
//                          per-anchor terms.
//   steps_cast_<dtype>:    y[k] = round_to_dtype(x[k]) over n elements, grid-stride: gradients
//                          returned in the input dtype, and the tf32 path's f32 → f16 inputs.
//   steps_max_abs_f32:     *out = max_k |x[k]| (NaN counts as +inf) as the bits of a non-negative
//                          float (integer atomicMax orders them; *out starts at 0): the tf32
//                          path's check that its inputs fit f16's range.
//   steps_fill_unit_rows_<dtype>: rows of unit L2 norm from a counter-based hash of (seed, row,
//                          col), one warp per row: the benchmarks' random inputs, generated on
//                          the device so multi-GB presets start fast (never zeros).
#include "common.cuh"

constexpr int SUM_THREADS = 256;

extern "C" __global__ void __launch_bounds__(SUM_THREADS)
    steps_sum_scaled(const float* __restrict__ x, int64_t n, float c, float* __restrict__ out) {
    __shared__ float part[SUM_THREADS / WARP];
    float acc = 0.0f;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) acc += x[k];
    acc = warp_sum(acc);
    if (threadIdx.x % WARP == 0) part[threadIdx.x / WARP] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int k = 0; k < (int)(blockDim.x / WARP); ++k) s += part[k];
        out[0] = c * s;
    }
}

template <typename T>
__device__ void cast_from_f32(const float* __restrict__ x, T* __restrict__ y, int64_t n) {
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (int64_t)gridDim.x * blockDim.x)
        y[k] = from_f32<T>(x[k]);
}

extern "C" __global__ void steps_max_abs_f32(const float* __restrict__ x, int64_t n,
                                             unsigned int* __restrict__ out) {
    float m = 0.0f;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (int64_t)gridDim.x * blockDim.x) {
        const float a = fabsf(x[k]);
        m = fmaxf(m, a != a ? INFINITY : a);
    }
    m = warp_max(m);
    if (threadIdx.x % WARP == 0) atomicMax(out, __float_as_uint(m));
}

__device__ __forceinline__ float hash_uniform(uint64_t seed, uint64_t idx) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + idx;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

template <typename T>
__device__ void fill_unit_rows(T* __restrict__ x, int64_t rows, int cols, uint64_t seed) {
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (r >= rows) return;
    float ss = 0.0f;
    for (int c = lane; c < cols; c += WARP) {
        const float v = hash_uniform(seed, (uint64_t)r * cols + c);
        ss = fmaf(v, v, ss);
    }
    const float inv = 1.0f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
    for (int c = lane; c < cols; c += WARP)
        x[r * cols + c] = from_f32<T>(hash_uniform(seed, (uint64_t)r * cols + c) * inv);
}

#define STEPS_ENTRY(NAME, T)                                                                 \
    extern "C" __global__ void steps_cast_##NAME(const float* x, T* y, int64_t n) {          \
        cast_from_f32<T>(x, y, n);                                                           \
    }                                                                                        \
    extern "C" __global__ void steps_fill_unit_rows_##NAME(T* x, int64_t rows, int cols,     \
                                                           uint64_t seed) {                 \
        fill_unit_rows<T>(x, rows, cols, seed);                                              \
    }
INFONCE_FOR_EACH_DTYPE(STEPS_ENTRY)
