// Host emulation of the CUDA features the kernels use: one std::thread per CUDA thread of a
// block, blocks run one after another (so `static` works as __shared__), barriers for
// __syncthreads / __syncwarp, an exchange buffer for warp shuffles.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
#include <functional>
#include <algorithm>

struct dim3e { unsigned x = 0, y = 0, z = 0; };
extern dim3e threadIdx, blockIdx;
extern dim3e blockDim, gridDim;

// Threads of a block are cooperative fibers (ucontext), switched only at barriers: a barrier
// waiter yields to the scheduler until the barrier's generation moves on.
void emu_yield();
struct Barrier {
    int count = 0, waiting = 0; long gen = 0;
    void init(int c) { count = c; waiting = 0; }
    void wait() {
        long g = gen;
        if (++waiting == count) { waiting = 0; ++gen; return; }
        while (gen == g) emu_yield();
    }
};
extern Barrier block_barrier;
extern Barrier warp_barriers[32];
extern uint64_t warp_xch[32][32];
extern std::mutex atomic_mutex;

inline void __syncthreads() { block_barrier.wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { warp_barriers[threadIdx.x / 32].wait(); }
template <class T> inline T emu_shfl(T v, int src) {
    static_assert(sizeof(T) <= 8, "shfl");
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    uint64_t b = 0; std::memcpy(&b, &v, sizeof(T));
    warp_xch[w][l] = b;
    __syncwarp();
    uint64_t r = warp_xch[w][src & 31];
    __syncwarp();
    T out; std::memcpy(&out, &r, sizeof(T));
    return out;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, (threadIdx.x % 32) ^ o); }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src); }
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned o) {
    int l = threadIdx.x % 32; return emu_shfl(v, l + (int)o < 32 ? l + (int)o : l);
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned o) {
    int l = threadIdx.x % 32; return emu_shfl(v, l >= (int)o ? l - (int)o : l);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    warp_xch[w][l] = pred ? 1 : 0;
    __syncwarp();
    unsigned r = 0; for (int i = 0; i < 32; ++i) if (warp_xch[w][i]) r |= 1u << i;
    __syncwarp();
    return r;
}
template <class T, class U> inline T atomicAdd(T* p, U v) { T o = *p; *p = o + (T)v; return o; }
template <class T, class U> inline T atomicMax(T* p, U v) { T o = *p; *p = o > (T)v ? o : (T)v; return o; }
template <class T, class U> inline T atomicMin(T* p, U v) { T o = *p; *p = o < (T)v ? o : (T)v; return o; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float cospif(float x) { return (float)std::cos(M_PI * (double)x); }
inline float sinpif(float x) { return (float)std::sin(M_PI * (double)x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
#include <math.h>
template <class A, class B> inline auto min(A a, B b) -> decltype(a + b) { return a < b ? a : b; }

// Storage types round like the real ones (round to nearest even: f16 11-bit, bf16 8-bit mantissa).
// Storage types are 16-bit like the real ones (so byte offsets, 16-byte copies and register
// packing are realistic) and round to nearest even (f16 11-bit, bf16 8-bit significand).
struct __half { uint16_t x; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return (float)f; }
inline __half __float2half_rn(float f) { _Float16 h = (_Float16)f; __half r; std::memcpy(&r.x, &h, 2); return r; }
struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u | 0x00400000u) >> 16)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage");
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __log2f(float x) { return std::log2(x); }
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
#define __align__(n) __attribute__((aligned(n)))
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(x)
#define __shared__ static

void launch(unsigned gx, unsigned gy, unsigned threads, std::function<void()> body);
