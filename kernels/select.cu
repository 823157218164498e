// Hard-negative thresholds (Wang & Liu eq. 9, spec/losses.md Variants `hard:k`):
//
//   threshold[i] = s_(k), the k-th largest negative similarity of anchor i   (k < #negatives)
//   threshold[i] = -inf                                                       (k ≥ #negatives)
//
// so that the fused loss keeps the negatives with s ≥ threshold[i] (ties at s_(k) all kept).
//
// One block per anchor; exact radix select on the f32 similarities: each similarity s maps to the
// order-preserving key  key(s) = bits(s) ≥ 0 ? bits | 2^31 : ~bits  (the order of total_cmp: -NaN <
// -inf < … < -0 < +0 < … < +inf < +NaN), and three passes over the negatives (digits 31..21,
// 20..10, 9..0) histogram the next digit of the keys that share the digits fixed so far, in shared
// memory (integer atomics: the counts, and so the result, are deterministic). Warp 0 then finds
// the digit holding the k-th largest key and the rank left within it. After the third pass every
// bit of the k-th key is fixed: the threshold is exactly one of the f32 similarities.
// Similarities are recomputed by warp_sim in every pass (one warp per negative): nothing N×K is
// stored, and the three passes see bit-identical values.
#include "pairs.cuh"

constexpr int RADIX_BINS = 2048;  // the widest digit (11 bits)
constexpr int RADIX_PASSES = 3;

__device__ __forceinline__ uint32_t orderable_key(float f) {
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Pass p's digit: bits [shift, shift + bits).
__device__ __forceinline__ int radix_shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
__device__ __forceinline__ int radix_bits(int pass) { return pass == 2 ? 10 : 11; }

template <typename T>
__device__ void select_kth(PairSet<T> p, int64_t k, float* __restrict__ threshold) {
    __shared__ uint32_t hist[RADIX_BINS];
    __shared__ uint32_t s_prefix;  // the digits of the k-th key fixed so far
    __shared__ uint32_t s_rank;    // its rank (1 = largest) among the keys with that prefix
    __shared__ float s_inv_a;
    __shared__ int s_fail;

    const int64_t i = blockIdx.x;
    if (i >= p.n_anchors) return;  // uniform over the block
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int nwarps = blockDim.x / WARP;
    int64_t s0, s1;
    p.skipped(i, s0, s1);
    const int64_t n_neg = p.count(s0, s1);
    if (k >= n_neg) {
        if (threadIdx.x == 0) threshold[i] = -INFINITY;
        return;
    }
    const T* a = p.anchors + i * (int64_t)p.cols;
    if (warp == 0) {
        const float inv = warp_inv_norm(a, p.cols, lane);
        if (lane == 0) s_inv_a = inv;
    }
    if (threadIdx.x == 0) {
        s_prefix = 0;
        s_rank = (uint32_t)k;  // 1 ≤ k < n_neg < 2^32 (checked by the launcher)
        s_fail = 0;
    }
    __syncthreads();
    const float inv_a = p.normalize ? s_inv_a : 1.0f;

    uint32_t mask = 0;  // the bits of s_prefix that are fixed
#pragma unroll 1
    for (int pass = 0; pass < RADIX_PASSES; ++pass) {
        const int shift = radix_shift(pass);
        const int nbins = 1 << radix_bits(pass);
        for (int b = threadIdx.x; b < nbins; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        const uint32_t prefix = s_prefix;
        for (int64_t j = warp; j < p.len; j += nwarps) {
            const int64_t row = p.key_row(j);
            if (row == s0 || row == s1) continue;  // uniform over the warp
            const float s = warp_sim(a, inv_a, p.keys + row * (int64_t)p.cols, p.cols,
                                     p.normalize, lane);
            const uint32_t key = orderable_key(s);
            if (lane == 0 && (key & mask) == prefix)
                atomicAdd(&hist[(key >> shift) & (uint32_t)(nbins - 1)], 1u);
        }
        __syncthreads();
        if (warp == 0) {
            // Lane l owns bins [l·per, (l+1)·per); higher bins hold larger keys.
            const int per = nbins / WARP;
            const int lo = lane * per;
            uint32_t mine = 0;
            for (int b = lo; b < lo + per; ++b) mine += hist[b];
            // incl = Σ over lanes ≥ lane (inclusive suffix sum).
            uint32_t incl = mine;
#pragma unroll
            for (int o = 1; o < WARP; o <<= 1) {
                const uint32_t v = __shfl_down_sync(FULL_MASK, incl, o);
                if (lane + o < WARP) incl += v;
            }
            const uint32_t above = incl - mine;  // keys in the bins of higher lanes
            const uint32_t rank = s_rank;
            const bool here = above < rank && rank <= incl;
            const unsigned ballot = __ballot_sync(FULL_MASK, here);
            if (ballot == 0) {
                // Unreachable while the passes recompute identical similarities; reported as NaN.
                if (lane == 0) s_fail = 1;
            } else if (here) {
                uint32_t cum = above;
                int digit = lo;
                for (int b = lo + per - 1; b >= lo; --b) {
                    if (cum + hist[b] >= rank) {
                        digit = b;
                        break;
                    }
                    cum += hist[b];
                }
                s_prefix = prefix | ((uint32_t)digit << shift);
                s_rank = rank - cum;
            }
        }
        __syncthreads();
        mask |= (uint32_t)(nbins - 1) << shift;
    }
    if (threadIdx.x == 0) threshold[i] = s_fail ? NAN : key_to_float(s_prefix);
}

#define SELECT_ENTRY(NAME, T)                                                                  \
    extern "C" __global__ void select_kth_##NAME(PAIR_SET_PARAMS(T), int64_t k,               \
                                                 float* threshold) {                          \
        select_kth<T>(PAIR_SET_ARGS(T), k, threshold);                                         \
    }
INFONCE_FOR_EACH_DTYPE(SELECT_ENTRY)
