// Embedding metrics on the device (spec/losses.md, Metrics; Wang & Isola, Wang & Liu eqs. 5, 10,
// 11). Every reduction runs in a fixed order (per-warp partials merged by one thread in warp
// order, per-block partials merged by a final one-block kernel): no float atomics, so results are
// deterministic for a given launch configuration.
//
// Uniformity (eq. 10):  −t‖u_i − u_j‖² = −t(‖u_i‖² + ‖u_j‖² − 2 s_ij)  (= 2t(s_ij − 1) for unit rows;
// the general form keeps an all-zero row exact, as the CPU metric does):
//   metrics_uniformity_rows_<dt>:  per row i, the (max, sum) state of LSE_(j≠i) −t‖u_i − u_j‖²
//   metrics_lse_merge:             LSE over all rows' states − log(n(n−1))
// Tolerance (eq. 11):  Σ_(i≠j, same class) s_ij = Σ_c (‖S_c‖² − Σ_(i∈c) ‖u_i‖²),  S_c = Σ_(i∈c) u_i
//   metrics_rownorm_<dt>:          inv_norm_i = 1/max(‖x_i‖, ε),  sqnorm_i = ‖u_i‖²
//   metrics_classsum_<dt>:         S_c, n_c, Σ_(i∈c) ‖u_i‖² (rows in index order)
//   metrics_tolerance_merge:       Σ_c (‖S_c‖² − Σ‖u_i‖²) / Σ_c n_c(n_c − 1)
// Penalty histogram and effective negatives (eq. 5):  r_i(s_ij) = exp(z_ij − LSE_(k neg) z_ik),
// z = s/τ(s) with τ(s) = τ_min + ½(τ_max − τ_min)(1 + cos(π(1 + s))) (DySTreSS; a fixed τ is
// τ_min = τ_max = τ)
//   metrics_penalty_<dt>:          per block (anchors b, b+G, …): bins Σ_i Σ_(j neg, s_ij ∈ bin) r_i,
//                                  and Σ_i exp(entropy(r_i)), entropy(r_i) = Σ_j r_ij (LSE_i − z_ij)
//   metrics_penalty_merge:         H_b = (1/N) Σ_blocks bins_b,  effective = (1/N) Σ_blocks eff
#include "pairs.cuh"

constexpr int METRICS_MAX_WARPS = 32;

// ---- uniformity -------------------------------------------------------------------------------

// One block per row i: state[i] = (max, sum) of LSE_(j≠i) −t(‖u_i‖² + ‖u_j‖² − 2 s_ij).
template <typename T>
__device__ void uniformity_rows(PairSet<T> p, float t, float* __restrict__ row_max,
                                float* __restrict__ row_sum) {
    __shared__ LseState warp_state[METRICS_MAX_WARPS];
    __shared__ float s_inv_a;
    __shared__ float s_a_sq;
    const int64_t i = blockIdx.x;
    if (i >= p.n_anchors) return;
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int nwarps = blockDim.x / WARP;
    int64_t s0, s1;
    p.skipped(i, s0, s1);
    const T* a = p.anchors + i * (int64_t)p.cols;
    if (warp == 0) {
        // ‖a‖² by warp_sim_sq's own arithmetic (a against itself), so that a row's ‖u‖² is the
        // same whether it is the anchor or the key.
        const float inv = warp_inv_norm(a, p.cols, lane);
        float a_sq;
        (void)warp_sim_sq(a, inv, a, p.cols, p.normalize, lane, a_sq);
        if (lane == 0) {
            s_inv_a = inv;
            s_a_sq = a_sq;
        }
    }
    __syncthreads();
    const float inv_a = p.normalize ? s_inv_a : 1.0f;
    const float a_sq = s_a_sq;
    LseState st = lse_empty();
    for (int64_t j = warp; j < p.len; j += nwarps) {
        const int64_t row = p.key_row(j);
        if (row == s0 || row == s1) continue;
        float b_sq;
        const float s = warp_sim_sq(a, inv_a, p.keys + row * (int64_t)p.cols, p.cols,
                                    p.normalize, lane, b_sq);
        st = lse_push(st, -t * ((a_sq + b_sq) - 2.0f * s));
    }
    if (lane == 0) warp_state[warp] = st;
    __syncthreads();
    if (threadIdx.x == 0) {
        LseState total = lse_empty();
        for (int w = 0; w < nwarps; ++w) total = lse_merge(total, warp_state[w]);
        row_max[i] = total.row_max;
        row_sum[i] = total.row_sum;
    }
}

// One block: out[0] = LSE of every row's (max, sum) state − log_count.
extern "C" __global__ void metrics_lse_merge(const float* __restrict__ row_max,
                                             const float* __restrict__ row_sum, int64_t rows,
                                             float log_count, float* __restrict__ out) {
    __shared__ LseState part[1024];
    LseState st = lse_empty();
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x)
        st = lse_merge(st, LseState{row_max[r], row_sum[r]});
    part[threadIdx.x] = st;
    __syncthreads();
    // blockDim.x is a power of two (the launcher's choice).
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) part[threadIdx.x] = lse_merge(part[threadIdx.x], part[threadIdx.x + half]);
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = lse_value(part[0]) - log_count;
}

// ---- tolerance --------------------------------------------------------------------------------

// One warp per row: inv_norm = 1/max(‖x‖, ε) and sqnorm = ‖u‖² = ‖x‖² · inv_norm² (1, or 0 for a
// zero row).
template <typename T>
__device__ void rownorm(const T* __restrict__ x, int64_t rows, int cols, float* __restrict__ inv_norm,
                        float* __restrict__ sqnorm) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const T* xr = x + row * (int64_t)cols;
    float ss = 0.0f;
    for (int c = lane; c < cols; c += WARP) {
        const float v = to_f32(xr[c]);
        ss = fmaf(v, v, ss);
    }
    ss = warp_sum(ss);
    const float inv = 1.0f / fmaxf(sqrtf(ss), PAIR_NORM_EPS);
    if (lane == 0) {
        inv_norm[row] = inv;
        sqnorm[row] = ss * inv * inv;
    }
}

constexpr int CLASSSUM_THREADS = 128;

// Block (c, y): columns [128·y, 128·y + 128) of S_c = Σ_(i: label_i = c) u_i, summed in row order;
// block (c, 0) also writes n_c and q_c = Σ_(i∈c) ‖u_i‖². Labels outside [0, classes) belong to
// no class. Launched with CLASSSUM_THREADS threads.
template <typename T>
__device__ void classsum(const T* __restrict__ x, const float* __restrict__ inv_norm,
                         const float* __restrict__ sqnorm, const int64_t* __restrict__ labels,
                         int64_t rows, int cols, int64_t classes, float* __restrict__ class_sum,
                         int64_t* __restrict__ class_count, float* __restrict__ class_sq) {
    __shared__ int64_t tile_label[CLASSSUM_THREADS];
    __shared__ float tile_inv[CLASSSUM_THREADS];
    __shared__ float tile_sq[CLASSSUM_THREADS];
    const int64_t c = blockIdx.x;
    if (c >= classes) return;
    const int t = threadIdx.x;
    const int64_t col = (int64_t)blockIdx.y * CLASSSUM_THREADS + t;
    const bool counter = blockIdx.y == 0 && t == 0;
    float acc = 0.0f;
    float sq = 0.0f;
    int64_t count = 0;
    for (int64_t base = 0; base < rows; base += CLASSSUM_THREADS) {
        const int64_t r = base + t;
        tile_label[t] = r < rows ? labels[r] : -1;
        tile_inv[t] = r < rows ? inv_norm[r] : 0.0f;
        tile_sq[t] = r < rows ? sqnorm[r] : 0.0f;
        __syncthreads();
        const int n = (int)min((int64_t)CLASSSUM_THREADS, rows - base);
        for (int k = 0; k < n; ++k) {
            if (tile_label[k] != c) continue;  // uniform over the block
            if (col < cols) acc += to_f32(x[(base + k) * (int64_t)cols + col]) * tile_inv[k];
            if (counter) {
                sq += tile_sq[k];
                ++count;
            }
        }
        __syncthreads();
    }
    if (col < cols) class_sum[c * (int64_t)cols + col] = acc;
    if (counter) {
        class_count[c] = count;
        class_sq[c] = sq;
    }
}

// One block: out[0] = Σ_c (‖S_c‖² − q_c) / Σ_c n_c(n_c − 1) (NaN when no class has two rows).
extern "C" __global__ void metrics_tolerance_merge(const float* __restrict__ class_sum,
                                                   const int64_t* __restrict__ class_count,
                                                   const float* __restrict__ class_sq,
                                                   int64_t classes, int cols,
                                                   float* __restrict__ out) {
    __shared__ double part_num[1024];
    __shared__ double part_pairs[1024];
    double num = 0.0;
    double pairs = 0.0;
    for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
        const float* sc = class_sum + c * (int64_t)cols;
        float ss = 0.0f;
        for (int k = 0; k < cols; ++k) ss = fmaf(sc[k], sc[k], ss);
        const double n = (double)class_count[c];
        num += (double)ss - (double)class_sq[c];
        pairs += n * (n - 1.0);
    }
    part_num[threadIdx.x] = num;
    part_pairs[threadIdx.x] = pairs;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            part_num[threadIdx.x] += part_num[threadIdx.x + half];
            part_pairs[threadIdx.x] += part_pairs[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = part_pairs[0] > 0.0 ? (float)(part_num[0] / part_pairs[0]) : NAN;
}

// ---- penalty histogram and effective negatives --------------------------------------------------

// The bin of s in `bins` equal bins over [−1, 1] (s < −1 or NaN: bin 0; s ≥ 1: the last bin).
__device__ __forceinline__ int penalty_bin(float s, int bins) {
    const float f = (s + 1.0f) * 0.5f * (float)bins;
    if (!(f >= 0.0f)) return 0;
    return f >= (float)(bins - 1) ? bins - 1 : (int)f;
}

// z = s / τ(s) (DySTreSS; τ_min = τ_max is a fixed τ, exactly s / τ).
__device__ __forceinline__ float penalty_logit(float s, float tau_min, float tau_max) {
    if (tau_max == tau_min) return s / tau_min;
    return s / (tau_min + 0.5f * (tau_max - tau_min) * (1.0f + cospif(1.0f + s)));
}

// Block b handles anchors b, b + G, … (G = gridDim.x). Per anchor: a pass for LSE_i of the
// negatives' z = s/τ(s), then a pass adding r = exp(z − LSE_i) into the warp's own bins (lane 0,
// in negative order) and r (LSE_i − z) into the entropy. Dynamic shared memory: nwarps × bins
// floats. Writes hist_part[b·bins + bin] and eff_part[b] (anchors without negatives add 0).
template <typename T>
__device__ void penalty(PairSet<T> p, float tau_min, float tau_max, int bins,
                        float* __restrict__ hist_part, float* __restrict__ eff_part) {
    extern __shared__ float warp_bins[];
    __shared__ LseState warp_state[METRICS_MAX_WARPS];
    __shared__ float warp_ent[METRICS_MAX_WARPS];
    __shared__ float s_inv_a;
    __shared__ float s_lse;
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    const int nwarps = blockDim.x / WARP;
    float* my_bins = warp_bins + warp * bins;
    for (int b = threadIdx.x; b < nwarps * bins; b += blockDim.x) warp_bins[b] = 0.0f;
    float eff = 0.0f;  // thread 0's Σ exp(entropy) over this block's anchors
    __syncthreads();
    for (int64_t i = blockIdx.x; i < p.n_anchors; i += gridDim.x) {
        int64_t s0, s1;
        p.skipped(i, s0, s1);
        const T* a = p.anchors + i * (int64_t)p.cols;
        if (warp == 0) {
            const float inv = warp_inv_norm(a, p.cols, lane);
            if (lane == 0) s_inv_a = inv;
        }
        __syncthreads();
        const float inv_a = p.normalize ? s_inv_a : 1.0f;
        // Pass 1: LSE_i.
        LseState st = lse_empty();
        for (int64_t j = warp; j < p.len; j += nwarps) {
            const int64_t row = p.key_row(j);
            if (row == s0 || row == s1) continue;
            const float s = warp_sim(a, inv_a, p.keys + row * (int64_t)p.cols, p.cols,
                                     p.normalize, lane);
            st = lse_push(st, penalty_logit(s, tau_min, tau_max));
        }
        if (lane == 0) warp_state[warp] = st;
        __syncthreads();
        if (threadIdx.x == 0) {
            LseState total = lse_empty();
            for (int w = 0; w < nwarps; ++w) total = lse_merge(total, warp_state[w]);
            s_lse = total.row_max == -INFINITY ? -INFINITY : lse_value(total);
        }
        __syncthreads();
        const float lse = s_lse;
        // Pass 2: bins and entropy (skipped for an anchor without negatives: lse = −inf).
        float ent = 0.0f;
        if (lse != -INFINITY) {
            for (int64_t j = warp; j < p.len; j += nwarps) {
                const int64_t row = p.key_row(j);
                if (row == s0 || row == s1) continue;
                const float s = warp_sim(a, inv_a, p.keys + row * (int64_t)p.cols, p.cols,
                                         p.normalize, lane);
                const float z = penalty_logit(s, tau_min, tau_max);
                const float r = __expf(z - lse);
                if (lane == 0) {
                    my_bins[penalty_bin(s, bins)] += r;
                    ent = fmaf(r, lse - z, ent);
                }
            }
        }
        if (lane == 0) warp_ent[warp] = ent;
        __syncthreads();
        if (threadIdx.x == 0 && lse != -INFINITY) {
            float total = 0.0f;
            for (int w = 0; w < nwarps; ++w) total += warp_ent[w];
            eff += expf(total);
        }
        // The next anchor's writes to s_inv_a / warp_state / warp_ent come after a barrier that
        // every thread reaches only once thread 0 is done here.
        __syncthreads();
    }
    for (int b = threadIdx.x; b < bins; b += blockDim.x) {
        float total = 0.0f;
        for (int w = 0; w < nwarps; ++w) total += warp_bins[w * bins + b];
        hist_part[(int64_t)blockIdx.x * bins + b] = total;
    }
    if (threadIdx.x == 0) eff_part[blockIdx.x] = eff;
}

// One block: hist[b] = scale · Σ_g hist_part[g·bins + b] (g in order), out_eff[0] = scale · Σ_g eff_part[g].
extern "C" __global__ void metrics_penalty_merge(const float* __restrict__ hist_part,
                                                 const float* __restrict__ eff_part, int groups,
                                                 int bins, float scale, float* __restrict__ hist,
                                                 float* __restrict__ out_eff) {
    for (int b = threadIdx.x; b < bins; b += blockDim.x) {
        float total = 0.0f;
        for (int g = 0; g < groups; ++g) total += hist_part[(int64_t)g * bins + b];
        hist[b] = total * scale;
    }
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int g = 0; g < groups; ++g) total += eff_part[g];
        out_eff[0] = total * scale;
    }
}

#define METRICS_ENTRY(NAME, T)                                                                  \
    extern "C" __global__ void metrics_uniformity_rows_##NAME(PAIR_SET_PARAMS(T), float t,      \
                                                              float* row_max, float* row_sum) { \
        uniformity_rows<T>(PAIR_SET_ARGS(T), t, row_max, row_sum);                              \
    }                                                                                           \
    extern "C" __global__ void metrics_rownorm_##NAME(const T* x, int64_t rows, int cols,       \
                                                      float* inv_norm, float* sqnorm) {         \
        rownorm<T>(x, rows, cols, inv_norm, sqnorm);                                            \
    }                                                                                           \
    extern "C" __global__ void metrics_classsum_##NAME(                                         \
        const T* x, const float* inv_norm, const float* sqnorm, const int64_t* labels,          \
        int64_t rows, int cols, int64_t classes, float* class_sum, int64_t* class_count,        \
        float* class_sq) {                                                                      \
        classsum<T>(x, inv_norm, sqnorm, labels, rows, cols, classes, class_sum, class_count,   \
                    class_sq);                                                                  \
    }                                                                                           \
    extern "C" __global__ void metrics_penalty_##NAME(PAIR_SET_PARAMS(T), float tau_min,        \
                                                      float tau_max, int bins, float* hist_part, \
                                                      float* eff_part) {                        \
        penalty<T>(PAIR_SET_ARGS(T), tau_min, tau_max, bins, hist_part, eff_part);              \
    }
INFONCE_FOR_EACH_DTYPE(METRICS_ENTRY)
