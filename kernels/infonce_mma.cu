// Tensor-core InfoNCE, queue mode (MoCo): loss, LSE, dq and dp in one read of the queue
// (spec/losses.md, "queue mode"): the flash-attention-2 forward with V = K.
//
//   pass 1, infonce_mma_queue_fwd_<dtype>_d<D>: grid (row tiles of 64 queries, splits of the queue).
//     Each warp owns 16 query rows (Q fragments stay in registers); key tiles of 64 rows stream
//     through a 3-stage cp.async pipeline into swizzled shared memory. Per tile:
//        S   = Q·Mᵀ                      (mma.sync m16n8k16, f32 accumulation)
//        x   = s·scale_log2              (scale_log2 = log2(e)/τ, folded into the exp's FMA)
//        row_max' = max(row_max, max x);  p = 2^(s·scale_log2 − row_max')   (one FMA + ex2)
//        row_sum = row_sum·2^(row_max − row_max') + Σ p
//        O   = O·2^(row_max − row_max') + P·M     (P re-packed from the S fragments, no smem)
//        (learnable τ) ps_sum = ps_sum·corr + Σ p·s   (for dL/dτ)
//     and stores the split's partial (row_max, row_sum, ps_sum, O) per row.
//     Gradient filter: a warp skips P·M for a tile where every p < threshold (p relative to the
//     running max bounds the final P from above, so each skipped weight is < threshold; the loss
//     and LSE stay exact, only dq changes, by at most w·α·threshold·Σ_skipped ‖m_j‖).
//   pass 2, infonce_mma_queue_combine_<dtype>: one warp per query row merges the splits (spec:
//     Chunking) with the positive z+ = α q·p:
//        lse = LSE(z+, negatives),  L = lse − z+,  P+ = exp(z+ − lse),
//        dq = w α [(P+ − 1) p + Σ_j P_j m_j],  dp = w α (P+ − 1) q,
//        dtau_row = w (Σ_c P_c z_c − z+)   (dL/dτ = −(1/τ) Σ_i dtau_row)
#include "infonce_mma.cuh"

constexpr int BLOCK_ROWS = 64;  // queries per block (4 warps × 16)
constexpr int BLOCK_KEYS = 64;  // keys per tile
constexpr int STAGES = 3;
constexpr int THREADS = 128;

// Copies `rows` × D elements (row r from `src_row(r)`, zero-filled where invalid) into a tile.
template <int D, typename E, typename RowPtr>
__device__ __forceinline__ void load_tile(uint32_t tile, RowPtr src_row, const E* fallback,
                                          int tid) {
    constexpr int CHUNKS = D / 8;
    constexpr int ITERS = BLOCK_KEYS * CHUNKS / THREADS;
    static_assert(BLOCK_KEYS * CHUNKS % THREADS == 0, "tile chunks per thread");
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
        const int id = tid + k * THREADS;
        const int r = id / CHUNKS, c = id % CHUNKS;
        const E* p = src_row(r);
        // A row past the end is zero-filled (src-size 0 reads nothing; the address stays valid).
        cp_async16(tile + tile_offset<D>(r, c), p ? p + c * 8 : fallback, p ? 16 : 0);
    }
}

// The block's 64 rows (row0 …, zero past `rows`) → stage 0 → each warp's 16 rows as A fragments
// for every k16 step; shared memory is free again on return.
template <typename T, int D>
__device__ __forceinline__ void load_row_fragments(uint32_t (&qa)[D / 16][4], uint32_t base,
                                                   const T* __restrict__ x, int64_t rows,
                                                   int64_t row0, int tid) {
    const int warp = tid / WARP, lane = tid % WARP;
    load_tile<D>(base, [&](int r) -> const T* {
        const int64_t i = row0 + r;
        return i < rows ? x + i * D : nullptr;
    }, x, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qa[kk], base + tile_offset<D>(warp * 16 + (lane % 16), 2 * kk + lane / 16));
    __syncthreads();
}

// s = Q·Kᵀ for the warp's 16 rows against the 64-key tile at shared address `kt` (8 n8 blocks).
template <typename T, int D>
__device__ __forceinline__ void tile_scores(float (&s)[8][4], const uint32_t (&qa)[D / 16][4],
                                            uint32_t kt) {
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int b = 0; b < 8; ++b) s[b][0] = s[b][1] = s[b][2] = s[b][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int nb2 = 0; nb2 < 4; ++nb2) {
            uint32_t b[4];
            const int key = nb2 * 16 + (lane & 7) + ((lane >> 4) << 3);
            ldmatrix_x4(b, kt + tile_offset<D>(key, 2 * kk + ((lane >> 3) & 1)));
            Mma<T>::run(s[2 * nb2], qa[kk], b[0], b[1]);
            Mma<T>::run(s[2 * nb2 + 1], qa[kk], b[2], b[3]);
        }
    }
}

// o += w·K for the warp's 16 rows: the weights w (the S fragments, re-packed as A operands, no
// shared memory) against the same key tile read transposed (V = K).
template <typename T, int D>
__device__ __forceinline__ void accumulate_weighted_keys(float (&o)[D / 8][4],
                                                         const float (&w)[8][4], uint32_t kt) {
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
        const uint32_t a[4] = {Mma<T>::pack(w[2 * kb][0], w[2 * kb][1]),
                               Mma<T>::pack(w[2 * kb][2], w[2 * kb][3]),
                               Mma<T>::pack(w[2 * kb + 1][0], w[2 * kb + 1][1]),
                               Mma<T>::pack(w[2 * kb + 1][2], w[2 * kb + 1][3])};
        const int key = kb * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
#pragma unroll
        for (int db = 0; db < D / 16; ++db) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, kt + tile_offset<D>(key, 2 * db + (lane >> 4)));
            Mma<T>::run(o[2 * db], a, b[0], b[1]);
            Mma<T>::run(o[2 * db + 1], a, b[2], b[3]);
        }
    }
}

template <typename T, int D, bool LEARN>
__device__ void queue_fwd(const T* __restrict__ q, int64_t n, const T* __restrict__ keys,
                          int64_t cap, int64_t qstart, int64_t qlen, int64_t keys_per_split,
                          float scale_log2, float filter_thr, float* __restrict__ part_m,
                          float* __restrict__ part_l, float* __restrict__ part_t,
                          float* __restrict__ part_o) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int TILE_BYTES = BLOCK_KEYS * D * 2;
    constexpr int KSTEPS = D / 16;  // k16 steps of Q·Mᵀ
    constexpr int OBLK = D / 8;     // n8 blocks of O
    const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    const int g = lane / 4, t = lane % 4;
    const int64_t row0 = (int64_t)blockIdx.x * BLOCK_ROWS;
    const int64_t split = blockIdx.y;
    const int64_t kbeg = split * keys_per_split;
    const int64_t kend = min(qlen, kbeg + keys_per_split);
    const uint32_t base = smem_addr(smem);

    uint32_t qa[KSTEPS][4];
    load_row_fragments<T, D>(qa, base, q, n, row0, tid);

    const int ntiles = (int)((kend - kbeg + BLOCK_KEYS - 1) / BLOCK_KEYS);
    auto load_keys = [&](int tile_idx) {
        const int64_t j0 = kbeg + (int64_t)tile_idx * BLOCK_KEYS;
        load_tile<D>(base + (tile_idx % STAGES) * TILE_BYTES, [&](int r) -> const T* {
            const int64_t j = j0 + r;
            if (j >= kend) return nullptr;
            int64_t row = qstart + j;
            if (row >= cap) row -= cap;  // a wrapped ring: two segments, no copy
            return keys + row * D;
        }, keys, tid);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ntiles) load_keys(s);
        cp_async_commit();
    }

    float o[OBLK][4];
#pragma unroll
    for (int b = 0; b < OBLK; ++b) o[b][0] = o[b][1] = o[b][2] = o[b][3] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    float ps_sum[2] = {0.0f, 0.0f};

    for (int tile_idx = 0; tile_idx < ntiles; ++tile_idx) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (tile_idx + STAGES - 1 < ntiles) load_keys(tile_idx + STAGES - 1);
        cp_async_commit();
        const uint32_t kt = base + (tile_idx % STAGES) * TILE_BYTES;

        // S = Q·Mᵀ: 16 rows × 64 keys per warp, 8 n-blocks.
        float s[8][4];
        tile_scores<T, D>(s, qa, kt);
        // Keys past the split's end do not exist.
        const int valid = (int)min((int64_t)BLOCK_KEYS, kend - kbeg - (int64_t)tile_idx * BLOCK_KEYS);
        if (valid < BLOCK_KEYS) {
#pragma unroll
            for (int b = 0; b < 8; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (b * 8 + 2 * t + (e & 1) >= valid) s[b][e] = -INFINITY;
        }

        // Online softmax in base 2; rows g (e = 0, 1) and g + 8 (e = 2, 3).
        float corr[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = row_max[h];
#pragma unroll
            for (int b = 0; b < 8; ++b)
                mx = fmaxf(mx, fmaxf(s[b][2 * h], s[b][2 * h + 1]) * scale_log2);
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            corr[h] = ex2(row_max[h] - mx);
            row_max[h] = mx;
        }
        bool big = false;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float sum = 0.0f, ps = 0.0f;
#pragma unroll
            for (int b = 0; b < 8; ++b)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    const float raw = s[b][e];
                    const float p = ex2(fmaf(raw, scale_log2, -row_max[h]));
                    sum += p;
                    if (LEARN) ps = fmaf(p, raw == -INFINITY ? 0.0f : raw, ps);
                    big |= p >= filter_thr;
                    s[b][e] = p;
                }
            row_sum[h] = fmaf(row_sum[h], corr[h], sum);
            if (LEARN) ps_sum[h] = fmaf(ps_sum[h], corr[h], ps);
        }
#pragma unroll
        for (int b = 0; b < OBLK; ++b) {
            o[b][0] *= corr[0];
            o[b][1] *= corr[0];
            o[b][2] *= corr[1];
            o[b][3] *= corr[1];
        }
        // O += P·M (V = M: the same shared tile, read transposed).
        if (__any_sync(FULL_MASK, big)) {
            accumulate_weighted_keys<T, D>(o, s, kt);
        }
    }
    cp_async_wait<0>();

    // Partial sums are per thread (its columns); the quad holds the whole row.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        row_sum[h] += __shfl_xor_sync(FULL_MASK, row_sum[h], 1);
        row_sum[h] += __shfl_xor_sync(FULL_MASK, row_sum[h], 2);
        if (LEARN) {
            ps_sum[h] += __shfl_xor_sync(FULL_MASK, ps_sum[h], 1);
            ps_sum[h] += __shfl_xor_sync(FULL_MASK, ps_sum[h], 2);
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int64_t i = row0 + warp * 16 + g + 8 * h;
        if (i >= n) continue;
        const int64_t at = split * n + i;
        if (t == 0) {
            part_m[at] = row_max[h];
            part_l[at] = row_sum[h];
            if (LEARN) part_t[at] = ps_sum[h];
        }
        float* dst = part_o + at * D;
#pragma unroll
        for (int b = 0; b < OBLK; ++b)
            *reinterpret_cast<float2*>(dst + b * 8 + 2 * t) = make_float2(o[b][2 * h], o[b][2 * h + 1]);
    }
}

constexpr int MAX_SPLITS = 1024;
constexpr int COMBINE_THREADS = 128;

// One block per query row: warp 0 merges the splits' (max, sum, ps_sum) with the positive; every
// thread then merges O for its columns, with the per-split factors 2^(m_s − m) from shared memory.
template <typename T>
__device__ void queue_combine(const T* __restrict__ q, const T* __restrict__ p, int64_t n, int d,
                              int64_t splits, const float* __restrict__ part_m,
                              const float* __restrict__ part_l, const float* __restrict__ part_t,
                              const float* __restrict__ part_o, float alpha,
                              const float* __restrict__ weights, float* __restrict__ loss_row,
                              float* __restrict__ lse_out, float* __restrict__ dq,
                              float* __restrict__ dp, float* __restrict__ dtau_row,
                              int write_grad) {
    __shared__ float factor[MAX_SPLITS];
    __shared__ float dot_part[COMBINE_THREADS / WARP];
    __shared__ float coef[2];  // (P+ − 1)·w·α, o_scale·w·α
    const int64_t i = blockIdx.x;
    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    if (i >= n) return;

    float dot = 0.0f;
    for (int c = tid; c < d; c += blockDim.x)
        dot = fmaf(to_f32(q[i * d + c]), to_f32(p[i * d + c]), dot);
    dot = warp_sum(dot);
    if (lane == 0) dot_part[warp] = dot;
    float m = -INFINITY;
    for (int64_t s = tid; s < splits; s += blockDim.x) m = fmaxf(m, part_m[s * n + i]);
    m = warp_max(m);
    __syncthreads();
    if (lane == 0) factor[warp] = m;  // scratch: the warps' maxima
    __syncthreads();
    float mall = -INFINITY;
    for (int w = 0; w < (int)(blockDim.x / WARP); ++w) mall = fmaxf(mall, factor[w]);
    __syncthreads();
    for (int64_t s = tid; s < splits; s += blockDim.x)
        factor[s] = mall == -INFINITY ? 0.0f : ex2(part_m[s * n + i] - mall);
    __syncthreads();

    if (warp == 0) {
        float l = 0.0f, tsum = 0.0f;
        for (int64_t s = lane; s < splits; s += WARP) {
            l = fmaf(part_l[s * n + i], factor[s], l);
            if (part_t) tsum = fmaf(part_t[s * n + i], factor[s], tsum);
        }
        l = warp_sum(l);
        tsum = warp_sum(tsum);
        float qp = 0.0f;
        for (int w = 0; w < (int)(blockDim.x / WARP); ++w) qp += dot_part[w];
        const float z_pos = alpha * qp;
        const float z2_pos = z_pos * LOG2E;
        const float mt = fmaxf(mall, z2_pos);
        const float total = (mall == -INFINITY ? 0.0f : l * ex2(mall - mt)) + ex2(z2_pos - mt);
        const float lse2 = mt + __log2f(total);
        const float lse = lse2 * LN2;
        const float p_pos = ex2(z2_pos - lse2);
        // Σ_j P_j m_j = O · o_scale (O relative to the merged max).
        const float o_scale = mall == -INFINITY ? 0.0f : ex2(mall - lse2);
        const float w = weights[i];
        if (lane == 0) {
            loss_row[i] = lse - z_pos;
            lse_out[i] = lse;
            if (dtau_row) dtau_row[i] = w * (p_pos * z_pos + alpha * tsum * o_scale - z_pos);
            coef[0] = (p_pos - 1.0f) * w * alpha;
            coef[1] = o_scale * w * alpha;
        }
    }
    __syncthreads();
    if (!write_grad) return;
    const float c_pos = coef[0], c_o = coef[1];
    for (int c = tid; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int64_t s = 0; s < splits; ++s) acc = fmaf(part_o[(s * n + i) * d + c], factor[s], acc);
        dq[i * d + c] = fmaf(c_pos, to_f32(p[i * d + c]), c_o * acc);
        dp[i * d + c] = c_pos * to_f32(q[i * d + c]);
    }
}

// ---------------------------------------------------------------------------------------------
// Pair modes (inbatch, cross, symmetric): rows X (R×D) against columns Y (C×D), S = X·Yᵀ.
//
//   pass 1, infonce_mma_pair_lse_<dtype>_d<D> (GRAD = false): per (row tile, column split) the
//     online (max, sum) of 2^(s·scale_log2) over the row's candidates (every column; inbatch masks
//     the row itself), stored as partials; infonce_mma_pair_combine_<dtype> merges them into
//     lse_r and the loss lse_r − z_r+ (z_r+ = α x_r·y_tgt(r)).
//   pass 2, infonce_mma_pair_grad_<dtype>_d<D> (GRAD = true): the LSEs known, per logit
//        g_rc = wr_r (P_rc − [c = tgt(r)]) + wc_c (P'_rc − [r = tgt(c)])   (= ∂L/∂z_rc)
//        P_rc = 2^(s·scale_log2 − lse_r·log2e), P'_rc = 2^(s·scale_log2 − lsec_c·log2e)
//     (each term only where its arrays are given; inbatch: g_rr = 0), then
//        dX_r += α Σ_c g_rc y_c   (mma.sync, f32 atomics into dX: splits of C add up)
//     and Σ g·s for dL/dτ = −α² Σ g·s on the terms `dtau_terms` says (1: the row term, 2: both).
//     The weights are scaled by `w_scale` (a power of two, about 1/max w) before g is packed into
//     the dtype for the product, and the sums divided by it after: with mean weights w = 1/N and
//     P ≈ 1/N, g ≈ 1/N² would fall below f16's normal range (6.1e-5) and lose its precision or
//     flush to zero; scaled, |g| ≤ 2 and only P's own tail is subnormal.
//   Gradient filter: a warp skips the product for a tile where no logit is a positive and every
//   weight P, P' < filter_thr; dX_r then changes by at most α θ Σ_(c skipped) (wr_r + wc_c) ‖y_c‖.
//   With both terms, one call computes inbatch's dE = α (G + Gᵀ) E (S is symmetric), and
//   symmetric mode's dA; dB is the same call with X and Y (and the terms) swapped.

enum TargetKind : int { TGT_IDENTITY = 0, TGT_ARRAY = 1, TGT_HALF_SHIFT = 2 };

__device__ __forceinline__ int64_t target_of(int64_t anchor, int kind,
                                             const int64_t* __restrict__ tgt, int64_t half) {
    if (kind == TGT_ARRAY) return tgt[anchor];
    if (kind == TGT_HALF_SHIFT) {
        const int64_t t = anchor + half;
        return t >= 2 * half ? t - 2 * half : t;
    }
    return anchor;
}

template <typename T, int D, bool GRAD>
__device__ void pair_pass(const T* __restrict__ x, int64_t rows, const T* __restrict__ y,
                          int64_t cols, int64_t cols_per_split, float scale_log2, int mask_self,
                          int tgt_kind, const int64_t* __restrict__ tgt, int64_t half,
                          float* __restrict__ part_m, float* __restrict__ part_l,
                          const float* __restrict__ lse_row, const float* __restrict__ w_row,
                          const float* __restrict__ lse_col, const float* __restrict__ w_col,
                          float alpha, float w_scale, float* __restrict__ dx,
                          float* __restrict__ dtau_acc, int dtau_terms, float filter_thr) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int TILE_BYTES = BLOCK_KEYS * D * 2;
    constexpr int KSTEPS = D / 16;
    constexpr int OBLK = D / 8;
    const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
    const int g = lane / 4, t = lane % 4;
    const int64_t row0 = (int64_t)blockIdx.x * BLOCK_ROWS;
    const int64_t split = blockIdx.y;
    const int64_t kbeg = split * cols_per_split;
    const int64_t kend = min(cols, kbeg + cols_per_split);
    const uint32_t base = smem_addr(smem);

    uint32_t qa[KSTEPS][4];
    load_row_fragments<T, D>(qa, base, x, rows, row0, tid);

    // This thread's two rows: g and g + 8 of the warp's 16.
    int64_t r_of[2];
    float lse2_r[2] = {0.0f, 0.0f}, w_r[2] = {0.0f, 0.0f};
    int64_t tgt_r[2] = {-1, -1};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        r_of[h] = row0 + warp * 16 + g + 8 * h;
        if (GRAD && w_row && r_of[h] < rows) {
            lse2_r[h] = lse_row[r_of[h]] * LOG2E;
            w_r[h] = w_row[r_of[h]] * w_scale;
            tgt_r[h] = target_of(r_of[h], tgt_kind, tgt, half);
        }
    }

    const int ntiles = (int)((kend - kbeg + BLOCK_KEYS - 1) / BLOCK_KEYS);
    auto load_keys = [&](int tile_idx) {
        const int64_t j0 = kbeg + (int64_t)tile_idx * BLOCK_KEYS;
        load_tile<D>(base + (tile_idx % STAGES) * TILE_BYTES, [&](int r) -> const T* {
            const int64_t j = j0 + r;
            return j < kend ? y + j * D : nullptr;
        }, y, tid);
    };
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < ntiles) load_keys(st);
        cp_async_commit();
    }

    float o[GRAD ? OBLK : 1][4];
#pragma unroll
    for (int b = 0; b < (GRAD ? OBLK : 1); ++b) o[b][0] = o[b][1] = o[b][2] = o[b][3] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.0f, 0.0f};
    float gs = 0.0f;

    for (int tile_idx = 0; tile_idx < ntiles; ++tile_idx) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (tile_idx + STAGES - 1 < ntiles) load_keys(tile_idx + STAGES - 1);
        cp_async_commit();
        const uint32_t kt = base + (tile_idx % STAGES) * TILE_BYTES;
        const int64_t j0 = kbeg + (int64_t)tile_idx * BLOCK_KEYS;

        float s[8][4];
        tile_scores<T, D>(s, qa, kt);

        if constexpr (!GRAD) {
            // Online (max, sum) in base 2; missing columns and the row itself (inbatch) are -inf.
#pragma unroll
            for (int b = 0; b < 8; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int64_t c = j0 + b * 8 + 2 * t + (e & 1);
                    if (c >= kend || (mask_self && c == r_of[e >> 1])) s[b][e] = -INFINITY;
                }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = row_max[h];
#pragma unroll
                for (int b = 0; b < 8; ++b)
                    mx = fmaxf(mx, fmaxf(s[b][2 * h], s[b][2 * h + 1]) * scale_log2);
                mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
                // A row may have seen only masked columns so far (inbatch, first tile).
                const float corr = mx == -INFINITY ? 1.0f : ex2(row_max[h] - mx);
                float sum = 0.0f;
                if (mx != -INFINITY) {
#pragma unroll
                    for (int b = 0; b < 8; ++b) {
                        sum += ex2(fmaf(s[b][2 * h], scale_log2, -mx));
                        sum += ex2(fmaf(s[b][2 * h + 1], scale_log2, -mx));
                    }
                }
                row_sum[h] = fmaf(row_sum[h], corr, sum);
                row_max[h] = mx;
            }
        } else {
            // Gradient filter: the warp skips the product when every weight of its 16×64 tile is
            // below the threshold and the tile holds no positive (threshold 0: never skips).
            bool big = false;
#pragma unroll
            for (int b = 0; b < 8; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int h = e >> 1;
                    const int64_t c = j0 + b * 8 + 2 * t + (e & 1);
                    const int64_t r = r_of[h];
                    const float raw = s[b][e];
                    float gr = 0.0f, gc = 0.0f;
                    if (c < kend && r < rows && !(mask_self && c == r)) {
                        if (w_row) {
                            const float p = ex2(fmaf(raw, scale_log2, -lse2_r[h]));
                            const bool pos = c == tgt_r[h];
                            gr = w_r[h] * (p - (pos ? 1.0f : 0.0f));
                            big |= pos || p >= filter_thr;
                        }
                        if (w_col) {
                            const float p = ex2(fmaf(raw, scale_log2, -__ldg(lse_col + c) * LOG2E));
                            const bool pos = r == target_of(c, tgt_kind, tgt, half);
                            gc = __ldg(w_col + c) * w_scale * (p - (pos ? 1.0f : 0.0f));
                            big |= pos || p >= filter_thr;
                        }
                    }
                    if (dtau_terms == 2) gs = fmaf(gr + gc, raw, gs);
                    else if (dtau_terms == 1) gs = fmaf(gr, raw, gs);
                    s[b][e] = gr + gc;
                }
            if (!__any_sync(FULL_MASK, big)) continue;
            accumulate_weighted_keys<T, D>(o, s, kt);
        }
    }
    cp_async_wait<0>();

    if constexpr (!GRAD) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_sum[h] += __shfl_xor_sync(FULL_MASK, row_sum[h], 1);
            row_sum[h] += __shfl_xor_sync(FULL_MASK, row_sum[h], 2);
            if (t == 0 && r_of[h] < rows) {
                part_m[split * rows + r_of[h]] = row_max[h];
                part_l[split * rows + r_of[h]] = row_sum[h];
            }
        }
    } else {
        const float out_scale = alpha / w_scale;  // exact: w_scale is a power of two
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (r_of[h] >= rows) continue;
            float* dst = dx + r_of[h] * D;
#pragma unroll
            for (int b = 0; b < OBLK; ++b) {
                atomicAdd(dst + b * 8 + 2 * t, out_scale * o[b][2 * h]);
                atomicAdd(dst + b * 8 + 2 * t + 1, out_scale * o[b][2 * h + 1]);
            }
        }
        if (dtau_terms) {
            gs = warp_sum(gs);
            if (lane == 0) atomicAdd(dtau_acc, gs / w_scale);
        }
    }
}

// One warp per row: merges the splits' (max, sum) into lse_r (natural log) and the loss
// lse_r − z_r+, z_r+ = α x_r · y_tgt(r).
template <typename T>
__device__ void pair_combine(const T* __restrict__ x, const T* __restrict__ y, int64_t rows,
                             int d, int64_t splits, const float* __restrict__ part_m,
                             const float* __restrict__ part_l, float alpha, int tgt_kind,
                             const int64_t* __restrict__ tgt, int64_t half,
                             float* __restrict__ lse_out, float* __restrict__ loss_out) {
    const int64_t i = (int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (i >= rows) return;
    float m = -INFINITY;
    for (int64_t s = lane; s < splits; s += WARP) m = fmaxf(m, part_m[s * rows + i]);
    m = warp_max(m);
    float l = 0.0f;
    if (m != -INFINITY)
        for (int64_t s = lane; s < splits; s += WARP) {
            const float ms = part_m[s * rows + i];
            if (ms != -INFINITY) l = fmaf(part_l[s * rows + i], ex2(ms - m), l);
        }
    l = warp_sum(l);
    const int64_t j = target_of(i, tgt_kind, tgt, half);
    float dot = 0.0f;
    for (int c = lane; c < d; c += WARP) dot = fmaf(to_f32(x[i * d + c]), to_f32(y[j * d + c]), dot);
    dot = warp_sum(dot);
    if (lane == 0) {
        const float lse = (m + __log2f(l)) * LN2;
        lse_out[i] = lse;
        loss_out[i] = lse - alpha * dot;
    }
}

#define PAIR_ARGS(T)                                                                              \
    const T *x, int64_t rows, const T *y, int64_t cols, int64_t cols_per_split, float scale_log2, \
        int mask_self, int tgt_kind, const int64_t *tgt, int64_t half, float *part_m,             \
        float *part_l, const float *lse_row, const float *w_row, const float *lse_col,            \
        const float *w_col, float alpha, float w_scale, float *dx, float *dtau_acc,               \
        int dtau_terms, float filter_thr
#define PAIR_PASS_ARGS                                                                            \
    x, rows, y, cols, cols_per_split, scale_log2, mask_self, tgt_kind, tgt, half, part_m, part_l, \
        lse_row, w_row, lse_col, w_col, alpha, w_scale, dx, dtau_acc, dtau_terms, filter_thr
#define PAIR_ENTRY(NAME, T, D)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                         \
        infonce_mma_pair_lse_##NAME##_d##D(PAIR_ARGS(T)) {                                           \
        pair_pass<T, D, false>(PAIR_PASS_ARGS);                                                   \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS)                                         \
        infonce_mma_pair_grad_##NAME##_d##D(PAIR_ARGS(T)) {                                          \
        pair_pass<T, D, true>(PAIR_PASS_ARGS);                                                    \
    }
#define PAIR_ENTRIES(NAME, T)                                                                     \
    PAIR_ENTRY(NAME, T, 64)                                                                       \
    PAIR_ENTRY(NAME, T, 128)                                                                      \
    extern "C" __global__ void infonce_mma_pair_combine_##NAME(                                   \
        const T* x, const T* y, int64_t rows, int d, int64_t splits, const float* part_m,         \
        const float* part_l, float alpha, int tgt_kind, const int64_t* tgt, int64_t half,         \
        float* lse_out, float* loss_out) {                                                        \
        pair_combine<T>(x, y, rows, d, splits, part_m, part_l, alpha, tgt_kind, tgt, half,        \
                        lse_out, loss_out);                                                       \
    }
PAIR_ENTRIES(f16, f16)
PAIR_ENTRIES(bf16, bf16)

#define MMA_FWD_ENTRY(NAME, T, D, LEARN, SUFFIX)                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS)                                         \
        infonce_mma_queue_fwd_##NAME##_d##D##SUFFIX(                                              \
            const T* q, int64_t n, const T* keys, int64_t cap, int64_t qstart, int64_t qlen,      \
            int64_t keys_per_split, float scale_log2, float filter_thr, float* part_m,            \
            float* part_l, float* part_t, float* part_o) {                                        \
        queue_fwd<T, D, LEARN>(q, n, keys, cap, qstart, qlen, keys_per_split, scale_log2,         \
                               filter_thr, part_m, part_l, part_t, part_o);                       \
    }

#define MMA_ENTRIES(NAME, T)                                                                      \
    MMA_FWD_ENTRY(NAME, T, 64, false, )                                                           \
    MMA_FWD_ENTRY(NAME, T, 128, false, )                                                          \
    MMA_FWD_ENTRY(NAME, T, 64, true, _learn)                                                      \
    MMA_FWD_ENTRY(NAME, T, 128, true, _learn)                                                     \
    extern "C" __global__ void __launch_bounds__(COMBINE_THREADS) infonce_mma_queue_combine_##NAME(   \
        const T* q, const T* p, int64_t n, int d, int64_t splits, const float* part_m,            \
        const float* part_l, const float* part_t, const float* part_o, float alpha,               \
        const float* weights, float* loss_row, float* lse_out, float* dq, float* dp,              \
        float* dtau_row, int write_grad) {                                                        \
        queue_combine<T>(q, p, n, d, splits, part_m, part_l, part_t, part_o, alpha, weights,      \
                         loss_row, lse_out, dq, dp, dtau_row, write_grad);                        \
    }
MMA_ENTRIES(f16, f16)
MMA_ENTRIES(bf16, bf16)
