// Host emulation of the tensor-core primitives of kernels/infonce_mma.cuh (included there when
// FUSED_INFONCE_EMU is defined): cp.async with commit/wait groups, ldmatrix (.x4, .trans) and
// mma.sync.m16n8k16 with the PTX ISA fragment layouts, ex2.approx.
//
// - Shared memory: the kernels' `extern __shared__ smem[]` becomes the launch's dynamic shared
//   memory, `emu_dyn_smem()` (build.sh, tools/emulated-cuda); a 32-bit shared address is the low
//   half of its host pointer (the buffer cannot cross a 4 GiB boundary, checked). Every access is
//   bounds- and alignment-checked against the bytes the launch asked for.
// - cp.async copies are queued per thread and land only when a `cp.async.wait_group` retires
//   their group, so reading a stage before waiting for it reads the poison the harness filled
//   shared memory with (NaN halves), and a kernel that exits with copies in flight is reported.
// - ldmatrix and mma.sync are warp-collective: every lane publishes its operands, the warp
//   synchronises, and each lane assembles its result from the others' registers by the layouts
//   below (lane = 4·g + t):
//     A (16×16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//     B (16×8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//     C (16×8):       c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
//   ldmatrix .x4: lanes 8j..8j+7 give the row addresses of matrix j; lane l receives row l/4,
//   elements 2(l%4), 2(l%4)+1 of each matrix (.trans: elements (2(l%4), l/4) and (2(l%4)+1, l/4)).
//   Products are exact (double) and added to the f32 accumulator once per mma.
#pragma once
#define EMU_MMA_H 1
#include <cstdio>
#include <cstdlib>
#include <vector>

struct EmuCopy { unsigned char* dst; const unsigned char* src; int bytes; };
constexpr int EMU_MAX_THREADS = 1024;
// The tensor-core primitives' state, one per host thread, behind a `const` accessor (as emu.h's
// EmuKernelState): the high half of shared addresses, each thread's open and committed cp.async
// groups, the exchange buffer of the warp-collective operations.
struct EmuMmaState {
    uint64_t smem_hi = 0;
    std::vector<EmuCopy> cp_open[EMU_MAX_THREADS];
    std::vector<std::vector<EmuCopy>> cp_groups[EMU_MAX_THREADS];
    long cp_leaked = 0;  // copies a kernel left in flight (counted by emu_cp_reset)
    uint32_t mma_xch[32][32][6];
};
__attribute__((const, noinline)) inline EmuMmaState* emu_mma() {
    static thread_local EmuMmaState s;
    return &s;
}
#define emu_smem_hi (emu_mma()->smem_hi)
#define emu_cp_open (emu_mma()->cp_open)
#define emu_cp_groups (emu_mma()->cp_groups)
#define emu_cp_leaked (emu_mma()->cp_leaked)
#define emu_mma_xch (emu_mma()->mma_xch)

inline uint32_t smem_addr(const void* p) {
    const uint64_t a = (uint64_t)p, b = (uint64_t)emu_dyn_smem(), n = emu_dyn_smem_bytes();
    if (a < b || a >= b + n) emu_fail("smem_addr of a pointer outside the launch's dynamic shared memory", a);
    if ((b >> 32) != ((b + n - 1) >> 32)) emu_fail("shared array crosses 4 GiB", b);
    emu_smem_hi = b >> 32;
    return (uint32_t)a;
}
// Host pointer of `bytes` bytes at shared address `a` (bounds and alignment checked).
inline unsigned char* emu_smem(uint32_t a, size_t bytes, size_t align) {
    const uint64_t p = (emu_smem_hi << 32) | a, b = (uint64_t)emu_dyn_smem();
    if (p < b || p + bytes > b + emu_dyn_smem_bytes())
        emu_fail("shared access beyond the launch's dynamic shared memory", a);
    if (p % align) emu_fail("misaligned shared access", a);
    return (unsigned char*)p;
}


inline void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    if (src_bytes != 0 && src_bytes != 16) emu_fail("cp.async src-size not 0 or 16", src_bytes);
    if (src_bytes && (uint64_t)src % 16) emu_fail("misaligned cp.async source", (uint64_t)src);
    emu_cp_open[emu_tid()].push_back({emu_smem(dst, 16, 16), (const unsigned char*)src, src_bytes});
}
inline void cp_async_commit() {
    emu_cp_groups[emu_tid()].push_back(std::move(emu_cp_open[emu_tid()]));
    emu_cp_open[emu_tid()].clear();
}
template <int N> inline void cp_async_wait() {
    auto& gs = emu_cp_groups[emu_tid()];
    while (gs.size() > (size_t)N) {
        for (const EmuCopy& c : gs.front()) {
            if (c.bytes) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        }
        gs.erase(gs.begin());
    }
}
// Called by the harness after a launch: copies still queued were never waited for.
inline void emu_cp_reset() {
    for (int t = 0; t < EMU_MAX_THREADS; ++t) {
        emu_cp_leaked += (long)emu_cp_open[t].size();
        for (auto& g : emu_cp_groups[t]) emu_cp_leaked += (long)g.size();
        emu_cp_open[t].clear();
        emu_cp_groups[t].clear();
    }
}

inline void emu_ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
    const int w = emu_tid() / 32, l = emu_tid() % 32;
    emu_smem(addr, 16, 16);  // every lane's row: 16 bytes, 16-byte aligned
    warp_xch[w][l] = addr;
    __syncwarp();
    for (int j = 0; j < 4; ++j) {
        if (!trans) {
            std::memcpy(&r[j], emu_smem((uint32_t)warp_xch[w][8 * j + l / 4], 16, 16) + 4 * (l % 4), 4);
        } else {
            uint16_t lo, hi;
            std::memcpy(&lo, emu_smem((uint32_t)warp_xch[w][8 * j + 2 * (l % 4)], 16, 16) + 2 * (l / 4), 2);
            std::memcpy(&hi, emu_smem((uint32_t)warp_xch[w][8 * j + 2 * (l % 4) + 1], 16, 16) + 2 * (l / 4), 2);
            r[j] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
    __syncwarp();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu_ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu_ldmatrix(r, addr, true); }

template <typename T> inline float emu_half_value(uint32_t word, int high) {
    T h; const uint16_t bits = high ? (uint16_t)(word >> 16) : (uint16_t)word;
    std::memcpy(&h, &bits, 2);
    return to_f32(h);
}
template <typename T> inline void emu_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const int w = emu_tid() / 32, l = emu_tid() % 32, g = l / 4, t = l % 4;
    uint32_t* mine = emu_mma_xch[w][l];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b0; mine[5] = b1;
    __syncwarp();
    auto A = [&](int row, int k) {
        return emu_half_value<T>(emu_mma_xch[w][4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
    };
    auto B = [&](int k, int n) {
        return emu_half_value<T>(emu_mma_xch[w][4 * n + (k % 8) / 2][4 + k / 8], k % 2);
    };
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
        double s = 0.0;
        for (int k = 0; k < 16; ++k) s += (double)A(row, k) * (double)B(k, col);
        c[e] = (float)((double)c[e] + s);
    }
    __syncwarp();
}
template <typename T> inline uint32_t emu_pack(float lo, float hi) {
    const T a = from_f32<T>(lo), b = from_f32<T>(hi);
    uint16_t x, y;
    std::memcpy(&x, &a, 2);
    std::memcpy(&y, &b, 2);
    return (uint32_t)x | ((uint32_t)y << 16);
}
template <typename T> struct Mma {
    static inline void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        emu_mma<T>(c, a, b0, b1);
    }
    static inline uint32_t pack(float lo, float hi) { return emu_pack<T>(lo, hi); }
};

// ex2.approx.ftz: results below the smallest normal f32 flush to zero (its 2 ulp are not modelled).
inline float ex2(float x) {
    const float y = std::exp2(x);
    return y < 1.17549435e-38f ? 0.0f : y;
}
