// Host emulation of the CUDA features the kernels use: each CUDA thread of a block is a fiber,
// blocks run one after another, `__shared__` is `static thread_local` (one copy per host thread,
// reused by each block in turn), barriers for __syncthreads / __syncwarp, an exchange buffer for
// warp shuffles.
//
// Every piece of state is per host thread, so several host threads (the test harness's) can each
// run kernels at once. The same runtime serves the stand-alone harnesses (`launch`) and the
// emulated CUDA device (`emu_run_grid`, tools/emulated-cuda).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <algorithm>

struct dim3e { unsigned x = 1, y = 1, z = 1; };

// A fault inside a kernel (shared-memory bounds, a barrier deadlock, …): reported and, on the
// emulated device, the launch is abandoned (the driver turns it into a sticky launch error); in a
// stand-alone harness the process aborts.
[[noreturn]] void emu_fail(const char* what, uint64_t v);

// Threads of a block are cooperative fibers, switched only at barriers: a barrier waiter is parked
// until the barrier completes, which puts its waiters back in the scheduler's run queue. When the
// queue runs dry while some threads have not finished, they wait at a barrier that others have
// exited or never reach: a deadlock, which fails the launch.
struct Barrier;
// Parks the current fiber on `b` (which it did not complete).
void emu_wait(Barrier* b);
// Puts `b`'s parked fibers back in the run queue (it just completed).
void emu_release(Barrier* b);
struct Barrier {
    int count = 0, waiting = 0;
    int nparked = 0;
    unsigned short parked[1024];
    void init(int c) { count = c; waiting = 0; nparked = 0; }
    void wait() {
        if (++waiting == count) { waiting = 0; emu_release(this); return; }
        emu_wait(this);
    }
};

// What the kernels see of the emulator (CUDA's built-in variables, the barriers, the warps'
// exchange buffers): one per host thread. It is reached through a `const` function, so the
// compiler looks its address up once per kernel function instead of at every use (a fiber never
// leaves its host thread, so the address is the same across barriers).
struct EmuKernelState {
    dim3e thread_idx, block_idx, block_dim, grid_dim;
    Barrier block_bar;
    Barrier warp_bars[32];
    uint64_t warp_x[32][32];
};
EmuKernelState* emu_k() __attribute__((const));
#define threadIdx (emu_k()->thread_idx)
#define blockIdx (emu_k()->block_idx)
#define blockDim (emu_k()->block_dim)
#define gridDim (emu_k()->grid_dim)
#define block_barrier (emu_k()->block_bar)
#define warp_barriers (emu_k()->warp_bars)
#define warp_xch (emu_k()->warp_x)

// Linear thread index within the block (warps are formed from consecutive linear indices).
inline unsigned emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline void __syncthreads() { block_barrier.wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { warp_barriers[emu_tid() / 32].wait(); }
template <class T> inline T emu_shfl(T v, int src) {
    static_assert(sizeof(T) <= 8, "shfl");
    const unsigned t = emu_tid();
    const int w = t / 32, l = t % 32;
    uint64_t b = 0; std::memcpy(&b, &v, sizeof(T));
    warp_xch[w][l] = b;
    __syncwarp();
    uint64_t r = warp_xch[w][src & 31];
    __syncwarp();
    T out; std::memcpy(&out, &r, sizeof(T));
    return out;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, (emu_tid() % 32) ^ o); }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src); }
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned o) {
    int l = emu_tid() % 32; return emu_shfl(v, l + (int)o < 32 ? l + (int)o : l);
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned o) {
    int l = emu_tid() % 32; return emu_shfl(v, l >= (int)o ? l - (int)o : l);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    const unsigned t = emu_tid();
    int w = t / 32, l = t % 32;
    warp_xch[w][l] = pred ? 1 : 0;
    __syncwarp();
    unsigned r = 0; for (int i = 0; i < 32; ++i) if (warp_xch[w][i]) r |= 1u << i;
    __syncwarp();
    return r;
}
// Fibers switch only at barriers, so a read-modify-write is atomic with respect to the block.
// Global-memory atomics across blocks are atomic too: blocks run one after another on one host
// thread, and two host threads never share a launch's buffers.
template <class T, class U> inline T atomicAdd(T* p, U v) { T o = *p; *p = o + (T)v; return o; }
template <class T, class U> inline T atomicMax(T* p, U v) { T o = *p; *p = o > (T)v ? o : (T)v; return o; }
template <class T, class U> inline T atomicMin(T* p, U v) { T o = *p; *p = o < (T)v ? o : (T)v; return o; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float cospif(float x) { return (float)std::cos(M_PI * (double)x); }
inline float sinpif(float x) { return (float)std::sin(M_PI * (double)x); }
// The fast-math intrinsics as the hardware computes them (CUDA Math API, "Intrinsic Functions"),
// so their error shows here too: __expf is ex2.approx of the f32 product x·log2(e), whose rounding
// grows with |x| (the documented 2 + 1.173·|x| ulp); __fdividef is a·rcp.approx(b), 0 for
// 2^126 < |b| < 2^128; __log2f is lg2.approx. ex2.approx's own 2 ulp are not modelled.
inline float __expf(float x) { return std::exp2(x * 1.4426950408889634f); }
inline float __fdividef(float a, float b) {
    const float m = std::fabs(b);
    if (m > 8.50705917e37f && m < INFINITY) return 0.0f;
    return a * (1.0f / b);
}
#include <math.h>
template <class A, class B> inline auto min(A a, B b) -> decltype(a + b) { return a < b ? a : b; }

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
inline float __log2f(float x) { return std::log2(x); }  // lg2.approx: ~2^-22 absolute
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
#define __align__(n) __attribute__((aligned(n)))
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(x)
#define __shared__ static thread_local
#ifdef EMU_LIST_KERNELS
// tools/emulated-cuda lists a module's entry points from its preprocessed source by this mark.
#define __global__ __emu_global__
#else
#define __global__
#endif

// The launch's dynamic shared memory (`extern __shared__` arrays become this pointer): the
// emulated device gives each block exactly the bytes the launch asked for (poisoned with NaN
// bytes, bounds-checked by the tensor-core primitives, followed by a guard page); stand-alone
// harnesses get a 64 KiB buffer.
unsigned char* emu_dyn_smem();
size_t emu_dyn_smem_bytes();

// Runs every block of `grid` (x fastest), each block's threads as fibers, with `dyn_bytes` of
// dynamic shared memory at `dyn_smem` (filled with 0xff bytes, NaN in every float type, before
// each block when `poison_per_block`). Fiber order alternates between blocks (forward, then
// reverse thread order), so a read of shared memory that another thread of the same barrier
// interval writes sees the write in some blocks and not in others.
void emu_run_grid(dim3e grid, dim3e block, unsigned char* dyn_smem, size_t dyn_bytes,
                  bool poison_per_block, const std::function<void()>& body);
// The stand-alone harnesses' launch: a grid.x × grid.y grid of 1-D blocks, 64 KiB of dynamic
// shared memory.
void launch(unsigned gx, unsigned gy, unsigned threads, std::function<void()> body);
// Called around a launch by the emulated device so that a fault (emu_fail, or a signal the
// device catches) abandons the launch instead of the process: `handler(what, v)` records the
// message and does not return (it jumps back into the device's launch).
typedef void (*EmuFaultHandler)(const char* what, uint64_t v);
void emu_set_fault_handler(EmuFaultHandler handler);
// Drops the fibers of an abandoned launch (the next launch starts clean).
void emu_reset_after_fault();
