// Anchor/negative sets shared by the hard-k selection (select.cu) and the metrics (metrics.cu):
// which key rows are an anchor's negatives (spec/losses.md, Modes); for the metrics, the warp-level
// similarity s = a·b (of the L2-normalised rows when asked), recomputed on the fly so that no N×K
// matrix is ever stored, and the online log-sum-exp push. (The selection computes s as the fused
// loss kernels do, one lane per negative: see select.cu.)
#pragma once

#include "common.cuh"

constexpr float PAIR_NORM_EPS = 1e-12f;

// How an anchor's negatives are chosen among the key rows.
//   SKIP_NONE    (queue):     every row of the ring, negative j is key row (start + j) % capacity.
//   SKIP_TARGET  (cross, symmetric rows/columns, uniformity): every key row except targets[i]
//                (row i when targets is nullptr).
//   SKIP_INBATCH (inbatch, keys == anchors, 2N rows): every row except i and (i + N) mod 2N.
// With SKIP_TARGET and SKIP_INBATCH the ring is the whole matrix (start 0, len = capacity).
constexpr int SKIP_NONE = 0;
constexpr int SKIP_TARGET = 1;
constexpr int SKIP_INBATCH = 2;

template <typename T>
struct PairSet {
    const T* anchors;        // n_anchors × cols
    const T* keys;           // capacity × cols
    const int64_t* targets;  // SKIP_TARGET only; may be nullptr
    int64_t n_anchors;
    int64_t capacity;
    int64_t start;
    int64_t len;
    int cols;
    int skip_mode;
    int normalize;

    // The key row of negative slot j in [0, len).
    __device__ __forceinline__ int64_t key_row(int64_t j) const {
        const int64_t r = start + j;
        return r >= capacity ? r - capacity : r;
    }

    // The (up to two) key rows anchor i skips; -1 for none.
    __device__ __forceinline__ void skipped(int64_t i, int64_t& s0, int64_t& s1) const {
        s0 = -1;
        s1 = -1;
        if (skip_mode == SKIP_TARGET) {
            s0 = targets != nullptr ? targets[i] : i;
        } else if (skip_mode == SKIP_INBATCH) {
            s0 = i;
            s1 = i + n_anchors / 2;
            if (s1 >= n_anchors) s1 -= n_anchors;
        }
    }

    // How many negatives anchor i has.
    __device__ __forceinline__ int64_t count(int64_t s0, int64_t s1) const {
        int64_t n = len;
        if (s0 >= 0 && s0 < len) --n;
        if (s1 >= 0 && s1 < len && s1 != s0) --n;
        return n;
    }
};

// 1 / max(‖x‖₂, ε) of one row, by one warp (every lane gets the value). Same order of operations as
// normalize_fwd (lane-strided fmaf, butterfly sum), so it equals that kernel's inv_norm bit for bit.
template <typename T>
__device__ __forceinline__ float warp_inv_norm(const T* __restrict__ x, int cols, int lane) {
    float ss = 0.0f;
    for (int c = lane; c < cols; c += WARP) {
        const float v = to_f32(x[c]);
        ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    return 1.0f / fmaxf(sqrtf(ss), PAIR_NORM_EPS);
}

// s = a·b (f32 accumulation: lane-strided fmaf, then the butterfly sum; every lane gets the same
// value, bit for bit, and the same inputs always give the same bits). With `normalize`,
// s = (a·b) · inv_a · inv_b with inv = 1 / max(‖·‖₂, ε).
template <typename T>
__device__ __forceinline__ float warp_sim(const T* __restrict__ a, float inv_a,
                                          const T* __restrict__ b, int cols, int normalize,
                                          int lane) {
    float dot = 0.0f;
    float bb = 0.0f;
    for (int c = lane; c < cols; c += WARP) {
        const float x = to_f32(a[c]);
        const float y = to_f32(b[c]);
        dot = fmaf(x, y, dot);
        bb = fmaf(y, y, bb);
    }
    dot = warp_sum(dot);
    if (!normalize) return dot;
    bb = warp_sum(bb);
    const float inv_b = 1.0f / fmaxf(sqrtf(bb), PAIR_NORM_EPS);
    return __fmul_rn(__fmul_rn(dot, inv_a), inv_b);
}

// As warp_sim, also giving b's squared norm as used: ‖b‖² · inv_b² with `normalize` (1 for a
// non-zero row, 0 for a zero row), ‖b‖² without.
template <typename T>
__device__ __forceinline__ float warp_sim_sq(const T* __restrict__ a, float inv_a,
                                             const T* __restrict__ b, int cols, int normalize,
                                             int lane, float& b_sq) {
    float dot = 0.0f;
    float bb = 0.0f;
    for (int c = lane; c < cols; c += WARP) {
        const float x = to_f32(a[c]);
        const float y = to_f32(b[c]);
        dot = fmaf(x, y, dot);
        bb = fmaf(y, y, bb);
    }
    dot = warp_sum(dot);
    bb = warp_sum(bb);
    if (!normalize) {
        b_sq = bb;
        return dot;
    }
    const float inv_b = 1.0f / fmaxf(sqrtf(bb), PAIR_NORM_EPS);
    b_sq = bb * inv_b * inv_b;
    return __fmul_rn(__fmul_rn(dot, inv_a), inv_b);
}

// Adds one logit z to an online (max, sum) state.
__device__ __forceinline__ LseState lse_push(LseState s, float z) {
    if (z > s.row_max) {
        const float scaled = s.row_max == -INFINITY ? 0.0f : s.row_sum * __expf(s.row_max - z);
        return {z, scaled + 1.0f};
    }
    if (z == -INFINITY) return s;
    return {s.row_max, s.row_sum + __expf(z - s.row_max)};
}

// Expands the kernel arguments of a PairSet (the Rust launcher pushes them in this order).
#define PAIR_SET_PARAMS(T)                                                                      \
    const T *anchors, const T *keys, const int64_t *targets, int64_t n_anchors,                \
        int64_t capacity, int64_t start, int64_t len, int cols, int skip_mode, int normalize
#define PAIR_SET_ARGS(T)                                                                        \
    PairSet<T> {                                                                                \
        anchors, keys, targets, n_anchors, capacity, start, len, cols, skip_mode, normalize     \
    }
