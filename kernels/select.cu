// Hard-negative thresholds (Wang & Liu eq. 9, spec/losses.md Variants `hard:k`):
//
//   threshold[i] = s_(k), the k-th largest negative similarity of anchor i   (k < #negatives)
//   threshold[i] = -inf                                                       (k ≥ #negatives)
//
// so that the fused loss keeps the negatives with s ≥ threshold[i] (ties at s_(k) all kept).
//
// One block (8 warps) per anchor; exact radix select on the f32 similarities: each similarity s
// maps to the order-preserving key  key(s) = bits(s) ≥ 0 ? bits | 2^31 : ~bits  (the order of
// total_cmp: -NaN < -inf < … < -0 < +0 < … < +inf < +NaN), and three passes over the negatives
// (digits 31..21, 20..10, 9..0) histogram the next digit of the keys that share the digits fixed
// so far, in shared memory (integer atomics: the counts, and so the result, are deterministic).
// Warp 0 then finds the digit holding the k-th largest key and the rank left within it. After the
// third pass every bit of the k-th key is fixed: the threshold is exactly one of the f32
// similarities. Nothing N×K is stored: every pass recomputes the similarities, bit-identically.
//
// The similarity is computed as kernels/infonce.cu (v1) computes it, so that ties are ties there
// too: s = Σ_d a_d b_d as one sequential fmaf chain in d order from +0 (slabs of 32 columns,
// zero-padded), by one lane per negative (a warp takes 32 negatives; the slab of keys is
// transposed through the warp's shared tile, the anchor's column broadcast by shuffle). With
// `normalize`, s is then multiplied by inv_a and inv_b (1/max(‖·‖₂, ε), the squared norms summed
// in the same sequential order).
#include "pairs.cuh"

constexpr int RADIX_BINS = 2048;  // the widest digit (11 bits)
constexpr int RADIX_PASSES = 3;
constexpr int SELECT_WARPS = 8;  // the launcher's block: 256 threads

// s for the negative at key row `row` (this lane's; -1: none, read as a zero row) and its squared
// norm `bb`, both as sequential fmaf chains over d. Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ float lane_dot(const T* __restrict__ a, const T* __restrict__ keys,
                                          int64_t row, int cols, float (*tile)[WARP + 1],
                                          int lane, float& bb) {
    float acc = 0.0f;
    float sq = 0.0f;
    for (int d0 = 0; d0 < cols; d0 += WARP) {
        const int d = d0 + lane;
        const float xv = d < cols ? to_f32(a[d]) : 0.0f;
        for (int r = 0; r < WARP; ++r) {
            const int64_t kr = __shfl_sync(FULL_MASK, row, r);
            tile[r][lane] = (kr >= 0 && d < cols) ? to_f32(keys[kr * (int64_t)cols + d]) : 0.0f;
        }
        __syncwarp();
#pragma unroll 8
        for (int dd = 0; dd < WARP; ++dd) {
            const float y = tile[lane][dd];
            acc = fmaf(__shfl_sync(FULL_MASK, xv, dd), y, acc);
            sq = fmaf(y, y, sq);
        }
        __syncwarp();
    }
    bb = sq;
    return acc;
}

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
    __shared__ float tiles[SELECT_WARPS][WARP][WARP + 1];
    __shared__ uint32_t s_prefix;  // the digits of the k-th key fixed so far
    __shared__ uint32_t s_rank;    // its rank (1 = largest) among the keys with that prefix
    __shared__ float s_inv_a;
    __shared__ int s_fail;

    const int64_t i = blockIdx.x;
    if (i >= p.n_anchors) return;  // uniform over the block
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int nwarps = SELECT_WARPS;
    if (blockDim.x != SELECT_WARPS * WARP) {  // a launcher bug: the tiles assume 8 warps
        if (threadIdx.x == 0) threshold[i] = NAN;
        return;
    }
    int64_t s0, s1;
    p.skipped(i, s0, s1);
    const int64_t n_neg = p.count(s0, s1);
    if (k >= n_neg) {
        if (threadIdx.x == 0) threshold[i] = -INFINITY;
        return;
    }
    const T* a = p.anchors + i * (int64_t)p.cols;
    if (threadIdx.x == 0) {
        float ss = 0.0f;  // sequential, as lane_dot sums bb
        for (int d = 0; d < p.cols; ++d) {
            const float v = to_f32(a[d]);
            ss = fmaf(v, v, ss);
        }
        s_inv_a = 1.0f / fmaxf(sqrtf(ss), PAIR_NORM_EPS);
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
        for (int64_t j0 = (int64_t)warp * WARP; j0 < p.len; j0 += (int64_t)nwarps * WARP) {
            const int64_t j = j0 + lane;
            int64_t row = j < p.len ? p.key_row(j) : -1;
            if (row == s0 || row == s1) row = -1;
            float bb;
            float s = lane_dot(a, p.keys, row, p.cols, tiles[warp], lane, bb);
            if (p.normalize) s = __fmul_rn(__fmul_rn(s, inv_a), 1.0f / fmaxf(sqrtf(bb), PAIR_NORM_EPS));
            const uint32_t key = orderable_key(s);
            if (row >= 0 && (key & mask) == prefix)
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
