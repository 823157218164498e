// The simple (v1) fused InfoNCE kernels (spec/losses.md): CUDA cores, f32 accumulation, no float
// atomics (every output element has one owner and sums in a fixed order, so results are bitwise
// reproducible). The N×K logit matrix never exists: similarities are recomputed tile by tile.
// Parameters: kernels/infonce.cuh (InfonceParams). The passes of one problem, in stream order:
//
//   infonce_rows_T   grid (anchor tiles, key chunks). For anchor i and the chunk's negatives j:
//                    s_ij = x_i · y_j, z_ij = s_ij / τ(s_ij), the online (max, sum) of exp(z)
//                    (spec: "Chunking"), Σ exp(z − max) z (for dL/dτ) and, with gradients, the
//                    unnormalised softmax-weighted key sum Σ_j exp(z_ij − max) (∂z/∂s)_ij y_j
//                    rescaled with the running max (attention with V = K). Simple variant: the count,
//                    Σ s_ij and Σ y_j of the kept negatives. Stores one partial per (chunk, anchor).
//   infonce_merge_T  one warp per anchor: merges the chunks' partials in chunk order, adds the
//                    positive z_i+ (standard), and writes LSE_i, L_i = LSE_i − z_i+ (decoupled: LSE
//                    over negatives; simple: −s_i+ + λ Σ s_ij), w_i ∂L/∂s_i+, w_i ∂L_i/∂τ and adds
//                    dx_i = Σ_j w_i P_ij (∂z/∂s)_ij y_j + w_i ∂L/∂s_i+ · positive_i
//                    (queue mode also dp_i = w_i ∂L/∂s_i+ · q_i).
//   infonce_cols_T   the key side, one block per tile of keys, owning their gradient rows: recomputes
//                    s_ij from the stored LSE and adds dy_j = Σ_i g_ij x_i with
//                    g_ij = w_i P_ij (∂z/∂s)_ij for a negative, w_i ∂L/∂s_i+ where j is i's positive.
//   infonce_finish_T one warp per row: the gradient with respect to the raw input through the
//                    optional normalisation, dx = (du − u (u·du)) / max(‖x‖, ε), cast to f32 or T.
//   infonce_reduce_f32  one block: Σ x · factor in f64, fixed order (the loss reduction, dL/dτ).
//
// Index arithmetic is 64-bit wherever a product of sizes appears (N·K, N·D may exceed 2^31).
#include "infonce.cuh"

constexpr int TILE_A = 16;    // anchors per tile
constexpr int TILE_K = 32;    // keys per tile (one per lane in the softmax step)
constexpr int TILE_D = 32;    // embedding columns per shared-memory slab
constexpr int THREADS = 128;  // 4 warps; every tile kernel assumes exactly this block size
constexpr int WARPS = THREADS / WARP;
static_assert(TILE_K == WARP, "the softmax step maps one key to one lane");
static_assert(TILE_A % WARPS == 0, "each warp owns TILE_A / WARPS anchor rows of a tile");

// s[a][k] = x_(a0 + a) · y_(krow[k]) for a tile of TILE_A anchors and TILE_K keys (f32, summed in
// d order). Anchors ≥ n_a and keys with krow < 0 read as zero rows. `krow` must be visible to the
// whole block before the call; `s` is visible to the whole block after it.
template <typename T>
__device__ void sim_tile(const T* __restrict__ x, int64_t a0, int64_t n_a, const T* __restrict__ y,
                         const int64_t* krow, int dim, float (*xs)[TILE_D + 1],
                         float (*ys)[TILE_D + 1], float (*s)[TILE_K]) {
    const int t = threadIdx.x, lane = t % WARP, warp = t / WARP;
    float acc[TILE_A / WARPS];
#pragma unroll
    for (int q = 0; q < TILE_A / WARPS; ++q) acc[q] = 0.0f;
    for (int d0 = 0; d0 < dim; d0 += TILE_D) {
        for (int idx = t; idx < TILE_A * TILE_D; idx += THREADS) {
            const int r = idx / TILE_D, dd = idx % TILE_D;
            const int64_t a = a0 + r;
            const int d = d0 + dd;
            xs[r][dd] = (a < n_a && d < dim) ? to_f32(x[a * (int64_t)dim + d]) : 0.0f;
        }
        for (int idx = t; idx < TILE_K * TILE_D; idx += THREADS) {
            const int k = idx / TILE_D, dd = idx % TILE_D;
            const int64_t row = krow[k];
            const int d = d0 + dd;
            ys[k][dd] = (row >= 0 && d < dim) ? to_f32(y[row * (int64_t)dim + d]) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int dd = 0; dd < TILE_D; ++dd) {
            const float yv = ys[lane][dd];
#pragma unroll
            for (int q = 0; q < TILE_A / WARPS; ++q) acc[q] = fmaf(xs[warp + WARPS * q][dd], yv, acc[q]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < TILE_A / WARPS; ++q) s[warp + WARPS * q][lane] = acc[q];
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Row pass: online LSE (and the anchor-side gradient accumulator) over one chunk of keys.
template <typename T>
__device__ void infonce_rows(const InfonceParams& p) {
    __shared__ float xs[TILE_A][TILE_D + 1];
    __shared__ float ys[TILE_K][TILE_D + 1];
    __shared__ float s[TILE_A][TILE_K];
    __shared__ float wgt[TILE_A][TILE_K];   // exp(z − max_new) ∂z/∂s (simple: 1) per kept negative
    __shared__ int64_t krow[TILE_K];
    __shared__ int64_t pos_k[TILE_A], self_k[TILE_A];
    __shared__ float thr[TILE_A];
    __shared__ float row_max[TILE_A], row_sum[TILE_A], row_pz[TILE_A], rescale[TILE_A];

    const int t = threadIdx.x, lane = t % WARP, warp = t / WARP;
    const int64_t n = p.n_anchors;
    const int64_t a0 = (int64_t)blockIdx.x * TILE_A;
    const int64_t chunk = blockIdx.y;
    const int64_t k_begin = chunk * p.chunk_len;
    const int64_t k_end = min(k_begin + p.chunk_len, p.n_keys);
    const int dim = p.dim;
    const bool simple = p.variant == VARIANT_SIMPLE;
    const T* x = static_cast<const T*>(p.x);
    const T* y = static_cast<const T*>(p.y);
    const int64_t rows_here = min((int64_t)TILE_A, n - a0);

    if (t < TILE_A) {
        const int64_t a = a0 + t;
        const bool valid = a < n;
        row_max[t] = simple ? 0.0f : -INFINITY;
        row_sum[t] = 0.0f;
        row_pz[t] = 0.0f;
        rescale[t] = 1.0f;
        pos_k[t] = valid ? pos_key(p, a) : -1;
        self_k[t] = valid ? self_key(p, a) : -1;
        thr[t] = (valid && p.s_threshold) ? p.s_threshold[a] : -INFINITY;
    }
    float* acc = p.part_acc ? p.part_acc + (chunk * n + a0) * (int64_t)dim : nullptr;
    if (acc)
        for (int64_t idx = t; idx < rows_here * dim; idx += THREADS) acc[idx] = 0.0f;
    __syncthreads();

    for (int64_t k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        if (t < TILE_K) krow[t] = (k0 + t < k_end) ? key_row(p, k0 + t) : -1;
        __syncthreads();
        sim_tile<T>(x, a0, n, y, krow, dim, xs, ys, s);

        // Online softmax: warp w updates anchor rows w, w + WARPS, ...; lane = key of the tile.
#pragma unroll
        for (int r = warp; r < TILE_A; r += WARPS) {
            const int64_t j = k0 + lane;
            const float sv = s[r][lane];
            const bool keep = (a0 + r < n) && (j < k_end) && j != pos_k[r] && j != self_k[r] &&
                              !(sv < thr[r]);
            if (simple) {
                const float cnt = warp_sum(keep ? 1.0f : 0.0f);
                const float ssum = warp_sum(keep ? sv : 0.0f);
                wgt[r][lane] = keep ? 1.0f : 0.0f;
                __syncwarp();
                if (lane == 0) {
                    row_sum[r] += cnt;
                    row_pz[r] += ssum;
                    rescale[r] = 1.0f;
                }
            } else {
                const float z = keep ? logit(p, sv) : -INFINITY;
                const float m_old = row_max[r];
                const float m_new = fmaxf(m_old, warp_max(z));
                float e = 0.0f, rs = 1.0f;
                if (m_new != -INFINITY) {
                    e = keep ? expf(z - m_new) : 0.0f;
                    rs = expf(m_old - m_new);  // 0 when m_old = −inf
                }
                const float tile_sum = warp_sum(e);
                const float tile_pz = warp_sum(keep ? e * z : 0.0f);
                wgt[r][lane] = keep ? e * dz_ds(p, sv) : 0.0f;
                __syncwarp();  // every lane has read row_max[r] before lane 0 overwrites it
                if (lane == 0) {
                    row_max[r] = m_new;
                    row_sum[r] = row_sum[r] * rs + tile_sum;
                    row_pz[r] = row_pz[r] * rs + tile_pz;
                    rescale[r] = rs;
                }
            }
        }
        __syncthreads();  // wgt, rescale visible

        if (acc) {
            // Each thread owns elements (r, d ≡ t mod THREADS) of the block's accumulator slice:
            // rescale, then add the tile's weighted keys in key order. (Nested loops: no 64-bit
            // division, whose call would spill registers.)
            for (int r = 0; r < rows_here; ++r) {
                float* acc_r = acc + (int64_t)r * dim;
                const float rs = rescale[r];
                for (int d = t; d < dim; d += THREADS) {
                    float v = acc_r[d] * rs;
#pragma unroll 1
                    for (int k = 0; k < TILE_K; ++k) {
                        const float w = wgt[r][k];
                        if (w != 0.0f) v = fmaf(w, to_f32(y[krow[k] * (int64_t)dim + d]), v);
                    }
                    acc_r[d] = v;
                }
            }
        }
        __syncthreads();  // before the next tile overwrites krow, s, wgt
    }

    if (t < rows_here) {
        const int64_t o = chunk * n + a0 + t;
        p.part_max[o] = row_max[t];
        p.part_sum[o] = row_sum[t];
        p.part_pz[o] = row_pz[t];
    }
}

// ---------------------------------------------------------------------------------------------
// Merge: one warp per anchor.
template <typename T>
__device__ void infonce_merge(const InfonceParams& p) {
    const int lane = threadIdx.x % WARP;
    const int64_t i = (int64_t)blockIdx.x * WARPS + threadIdx.x / WARP;
    const int64_t n = p.n_anchors;
    if (i >= n) return;  // whole warps only; no block-level barrier below
    const int dim = p.dim;
    const T* x = static_cast<const T*>(p.x);
    const T* xi = x + i * (int64_t)dim;
    const T* posr = p.pos ? static_cast<const T*>(p.pos) + i * (int64_t)dim
                          : static_cast<const T*>(p.y) + key_row(p, pos_key(p, i)) * (int64_t)dim;

    float sp = 0.0f;
    for (int d = lane; d < dim; d += WARP) sp = fmaf(to_f32(xi[d]), to_f32(posr[d]), sp);
    sp = warp_sum(sp);  // s_i+ (identical in every lane)

    const float w = p.weights[i];
    const int chunks = p.n_chunks;
    float loss, dpos, scale, lse = 0.0f, dtau = 0.0f;
    if (p.variant == VARIANT_SIMPLE) {
        float cnt = 0.0f, ssum = 0.0f;
        for (int c = 0; c < chunks; ++c) {
            cnt += p.part_sum[c * n + i];
            ssum += p.part_pz[c * n + i];
        }
        const float lambda = p.has_lambda ? p.lambda : (cnt > 0.0f ? 1.0f / cnt : 0.0f);
        loss = -sp + lambda * ssum;
        dpos = -w;
        scale = w * lambda;
    } else {
        LseState neg = lse_empty();
        for (int c = 0; c < chunks; ++c) neg = lse_merge(neg, {p.part_max[c * n + i], p.part_sum[c * n + i]});
        const float zp = logit(p, sp);
        const bool decoupled = p.variant == VARIANT_DECOUPLED;
        lse = lse_value(decoupled ? neg : lse_merge(neg, {zp, 1.0f}));
        loss = lse - zp;
        const float dz_pos = decoupled ? -w : w * (expf(zp - lse) - 1.0f);
        dpos = dz_pos * dz_ds(p, sp);
        scale = w;
        // Σ_neg ∂L/∂z · z = w Σ_c exp(max_c − LSE) pz_c
        float neg_pz = 0.0f;
        for (int c = 0; c < chunks; ++c) {
            const float m = p.part_max[c * n + i];
            if (m != -INFINITY) neg_pz += expf(m - lse) * p.part_pz[c * n + i];
        }
        dtau = -(dz_pos * zp + w * neg_pz) / p.tau;
    }
    if (lane == 0) {
        if (p.lse) p.lse[i] = lse;
        p.loss[i] = loss;
        if (p.dpos) p.dpos[i] = dpos;
        if (p.scale) p.scale[i] = scale;
        if (p.dtau) p.dtau[i] = dtau;
    }
    if (p.grad_x && p.part_acc) {
        float* gx = p.grad_x + i * (int64_t)dim;
        float* gp = p.grad_pos ? p.grad_pos + i * (int64_t)dim : nullptr;
        for (int d = lane; d < dim; d += WARP) {
            float v = 0.0f;
            for (int c = 0; c < chunks; ++c) {
                float f = scale;  // simple: the accumulator is the plain key sum
                if (p.variant != VARIANT_SIMPLE) {
                    const float m = p.part_max[c * n + i];
                    f = m == -INFINITY ? 0.0f : w * expf(m - lse);
                }
                if (f != 0.0f) v = fmaf(f, p.part_acc[(c * n + i) * (int64_t)dim + d], v);
            }
            v = fmaf(dpos, to_f32(posr[d]), v);
            gx[d] += v;
            if (gp) gp[d] += dpos * to_f32(xi[d]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Column pass: the key side of the gradient. One block per TILE_K keys; it owns grad_y's rows of
// those keys and adds the anchors' contributions in anchor order.
template <typename T>
__device__ void infonce_cols(const InfonceParams& p) {
    __shared__ float xs[TILE_A][TILE_D + 1];
    __shared__ float ys[TILE_K][TILE_D + 1];
    __shared__ float s[TILE_A][TILE_K];
    __shared__ float wgt[TILE_A][TILE_K];  // g_ij
    __shared__ int64_t krow[TILE_K];

    const int t = threadIdx.x;
    const int64_t n = p.n_anchors;
    const int64_t j0 = (int64_t)blockIdx.x * TILE_K;
    const int64_t keys_here = min((int64_t)TILE_K, p.n_keys - j0);
    const int dim = p.dim;
    const bool simple = p.variant == VARIANT_SIMPLE;
    const T* x = static_cast<const T*>(p.x);
    const T* y = static_cast<const T*>(p.y);
    float* gy = p.grad_y + j0 * (int64_t)dim;

    if (t < TILE_K) krow[t] = (t < keys_here) ? key_row(p, j0 + t) : -1;
    __syncthreads();

    for (int64_t a0 = 0; a0 < n; a0 += TILE_A) {
        sim_tile<T>(x, a0, n, y, krow, dim, xs, ys, s);
        for (int idx = t; idx < TILE_A * TILE_K; idx += THREADS) {
            const int r = idx / TILE_K, k = idx % TILE_K;
            const int64_t i = a0 + r, j = j0 + k;
            float g = 0.0f;
            if (i < n && k < keys_here) {
                const float sv = s[r][k];
                if (j == pos_key(p, i)) {
                    g = p.dpos[i];
                } else if (j != self_key(p, i) && !(p.s_threshold && sv < p.s_threshold[i])) {
                    g = simple ? p.scale[i]
                               : p.scale[i] * expf(logit(p, sv) - p.lse[i]) * dz_ds(p, sv);
                }
            }
            wgt[r][k] = g;
        }
        __syncthreads();
        const int64_t rows_here = min((int64_t)TILE_A, n - a0);
        for (int k = 0; k < keys_here; ++k) {
            float* gy_k = gy + (int64_t)k * dim;
            for (int d = t; d < dim; d += THREADS) {
                float v = gy_k[d];
                for (int r = 0; r < rows_here; ++r) {
                    const float g = wgt[r][k];
                    if (g != 0.0f) v = fmaf(g, to_f32(x[(a0 + r) * (int64_t)dim + d]), v);
                }
                gy_k[d] = v;
            }
        }
        __syncthreads();  // before the next anchor tile overwrites s, wgt
    }
}

// ---------------------------------------------------------------------------------------------
// Finish: gradient rows with respect to the raw input (through the optional normalisation), cast.
// Row r of g belongs to input row (x_start + r) mod x_cap (the queue's ring; x_start = 0 otherwise).
constexpr float NORM_EPS = 1e-12f;

template <typename T>
__device__ void infonce_finish(const T* __restrict__ x, const float* __restrict__ inv_norm,
                               const float* __restrict__ g, float* __restrict__ out_f32,
                               T* __restrict__ out_t, int64_t rows, int dim, int64_t x_start,
                               int64_t x_cap) {
    const int lane = threadIdx.x % WARP;
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (r >= rows) return;
    int64_t xr = x_start + r;
    if (xr >= x_cap) xr -= x_cap;
    const float* gr = g + r * (int64_t)dim;
    const T* xrow = x + xr * (int64_t)dim;
    float inv = 1.0f, dot = 0.0f;
    if (inv_norm) {
        inv = inv_norm[xr];
        // ‖x‖ > ε: project out u. (‖x‖ ≤ ε: the forward was x/ε, a linear map, so dot stays 0.)
        if (inv < 1.0f / NORM_EPS) {
            for (int d = lane; d < dim; d += WARP) dot = fmaf(to_f32(xrow[d]) * inv, gr[d], dot);
            dot = warp_sum(dot);
        }
    }
    for (int d = lane; d < dim; d += WARP) {
        float v = gr[d];
        if (inv_norm) v = (v - to_f32(xrow[d]) * inv * dot) * inv;
        if (out_f32) out_f32[r * (int64_t)dim + d] = v;
        if (out_t) out_t[r * (int64_t)dim + d] = from_f32<T>(v);
    }
}

// ---------------------------------------------------------------------------------------------
// Reduce: out[0] = factor · Σ x (f64, fixed order; one block of 256 threads).
constexpr int REDUCE_THREADS = 256;

extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    infonce_reduce_f32(const float* __restrict__ x, int64_t n, float factor, float* __restrict__ out) {
    __shared__ double part[REDUCE_THREADS];
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += REDUCE_THREADS) acc += (double)x[i];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int o = REDUCE_THREADS / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = (float)(part[0] * (double)factor);
}

#define INFONCE_ENTRY(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS)                                       \
        infonce_rows_##NAME(const InfonceParams p) { infonce_rows<T>(p); }                      \
    extern "C" __global__ void __launch_bounds__(THREADS)                                       \
        infonce_merge_##NAME(const InfonceParams p) { infonce_merge<T>(p); }                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                       \
        infonce_cols_##NAME(const InfonceParams p) { infonce_cols<T>(p); }                      \
    extern "C" __global__ void infonce_finish_##NAME(const T* x, const float* inv_norm,         \
                                                     const float* g, float* out_f32, T* out_t,  \
                                                     int64_t rows, int dim, int64_t x_start,    \
                                                     int64_t x_cap) {                           \
        infonce_finish<T>(x, inv_norm, g, out_f32, out_t, rows, dim, x_start, x_cap);           \
    }
INFONCE_FOR_EACH_DTYPE(INFONCE_ENTRY)
