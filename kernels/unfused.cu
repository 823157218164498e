// The unfused baseline's non-GEMM kernels (what a user writes around cuBLAS by hand): the logit
// matrix S = X·Yᵀ (raw similarities, f32, row-major with leading dimension `ld`) comes from cuBLAS;
// these kernels turn it into the loss and, in place, into the gradient with respect to S.
//
//   ce_rows:      per row i of S (spec/losses.md, "The standard loss"):
//                   z_ic = alpha · s_ic, lse_i = LSE over the row's candidates (online, f32),
//                   L_i = lse_i − z_i+,   P_ic = exp(z_ic − lse_i),
//                   dS_ic = w_i · alpha · (P_ic − [c is the positive])   (written over S),
//                 optionally a copy of dS in the input dtype (for the bf16/f16 gradient GEMMs),
//                 Σ_c w_i (P_ic − onehot) z_ic into dtau_acc scaled by −1/τ (learnable τ), and in
//                 queue mode the positive's gradient dpos_i = w_i · alpha · (P_i+ − 1).
//   pos_dot:      s_i+ = x_i · y_i (queue mode's positive similarity), f32 accumulation.
//   row_axpy:     out_i = beta · out_i + c_i · x_i (the positive's gradient terms).
// The reduction and the casts it shares with the other paths are in steps.cu.
#include "common.cuh"

// Where row i's positive is.
enum PositiveKind : int {
    POS_EXTRA = 0,     // not in the row: pos_s[i] (queue mode)
    POS_TARGETS = 1,   // column targets[i] (cross mode with targets)
    POS_IDENTITY = 2,  // column i (cross without targets, symmetric)
    POS_INBATCH = 3,   // column (i + rows/2) mod rows, and column i (itself) is masked out
};

constexpr int CE_THREADS = 256;

__device__ __forceinline__ LseState lse_add(LseState s, float z) {
    if (z > s.row_max) {
        s.row_sum = s.row_sum * __expf(s.row_max - z) + 1.0f;
        s.row_max = z;
    } else {
        s.row_sum += __expf(z - s.row_max);
    }
    return s;
}

template <typename T>
__device__ void ce_rows(float* __restrict__ S, T* __restrict__ G_lowp, int64_t rows, int64_t cols,
                        int64_t ld, const float* __restrict__ pos_s,
                        const int64_t* __restrict__ targets, int pos_kind, float alpha,
                        const float* __restrict__ weights, float* __restrict__ loss_out,
                        float* __restrict__ lse_out, float* __restrict__ dpos_out,
                        float* __restrict__ dtau_acc, float inv_tau, int write_grad) {
    __shared__ float sh_max[CE_THREADS / WARP];
    __shared__ float sh_sum[CE_THREADS / WARP];
    __shared__ float sh_gz[CE_THREADS / WARP];
    const int64_t i = blockIdx.x;
    if (i >= rows) return;
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    float* row = S + i * ld;

    int64_t pos_col = -1, self_col = -1;
    if (pos_kind == POS_TARGETS) pos_col = targets[i];
    else if (pos_kind == POS_IDENTITY) pos_col = i;
    else if (pos_kind == POS_INBATCH) {
        pos_col = (i + rows / 2) % rows;
        self_col = i;
    }

    // Pass 1: online (max, sum) over the row.
    LseState st = lse_empty();
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        if (c == self_col) continue;
        st = lse_add(st, row[c] * alpha);
    }
    // warp merge
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) {
        LseState other = {__shfl_xor_sync(FULL_MASK, st.row_max, o),
                          __shfl_xor_sync(FULL_MASK, st.row_sum, o)};
        st = lse_merge(st, other);
    }
    if (lane == 0) {
        sh_max[warp] = st.row_max;
        sh_sum[warp] = st.row_sum;
    }
    // The positive's logit is read before the barrier: after it, pass 2 overwrites the row with
    // the gradient (the thread owning column pos_col may get there before thread 0 reads it).
    const float z_pos = pos_kind == POS_EXTRA ? pos_s[i] * alpha : row[pos_col] * alpha;
    __syncthreads();
    LseState all = lse_empty();
    for (int w = 0; w < CE_THREADS / WARP; ++w) all = lse_merge(all, {sh_max[w], sh_sum[w]});
    if (pos_kind == POS_EXTRA) all = lse_merge(all, {z_pos, 1.0f});
    const float lse = lse_value(all);
    const float w = weights[i];

    // Pass 2: dS in place (and the low-precision copy), Σ g·z for dτ.
    float gz = 0.0f;
    if (write_grad) {
        const float wa = w * alpha;
        T* grow = G_lowp ? G_lowp + i * cols : nullptr;
        for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
            const float z = row[c] * alpha;
            float g = (c == self_col) ? 0.0f : __expf(z - lse) - (c == pos_col ? 1.0f : 0.0f);
            gz = fmaf(g * w, z, gz);
            g *= wa;
            row[c] = g;
            if (grow) grow[c] = from_f32<T>(g);
        }
        if (dtau_acc) {
            gz = warp_sum(gz);
            if (lane == 0) sh_gz[warp] = gz;
            __syncthreads();
        }
    }
    if (threadIdx.x == 0) {
        loss_out[i] = lse - z_pos;
        lse_out[i] = lse;
        if (write_grad) {
            if (pos_kind == POS_EXTRA) {
                const float g = __expf(z_pos - lse) - 1.0f;
                dpos_out[i] = g * w * alpha;
                gz = fmaf(g * w, z_pos, 0.0f);
            } else {
                gz = 0.0f;
            }
            if (dtau_acc) {
                for (int k = 0; k < CE_THREADS / WARP; ++k) gz += sh_gz[k];
                atomicAdd(dtau_acc, -gz * inv_tau);
            }
        }
    }
}

template <typename T>
__device__ void pos_dot(const T* __restrict__ x, const T* __restrict__ y, float* __restrict__ out,
                        int64_t rows, int cols) {
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    const int lane = threadIdx.x % WARP;
    if (r >= rows) return;
    float acc = 0.0f;
    for (int c = lane; c < cols; c += WARP)
        acc = fmaf(to_f32(x[r * cols + c]), to_f32(y[r * cols + c]), acc);
    acc = warp_sum(acc);
    if (lane == 0) out[r] = acc;
}

template <typename T>
__device__ void row_axpy(float* __restrict__ out, const T* __restrict__ x,
                         const float* __restrict__ coef, float beta, int64_t rows, int cols) {
    const int64_t n = rows * (int64_t)cols;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (int64_t)gridDim.x * blockDim.x) {
        const float v = coef[k / cols] * to_f32(x[k]);
        out[k] = beta == 0.0f ? v : fmaf(beta, out[k], v);
    }
}

#define UNFUSED_ENTRY(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(CE_THREADS) unfused_ce_rows_##NAME(             \
        float* S, T* G_lowp, int64_t rows, int64_t cols, int64_t ld, const float* pos_s,         \
        const int64_t* targets, int pos_kind, float alpha, const float* weights, float* loss_out, \
        float* lse_out, float* dpos_out, float* dtau_acc, float inv_tau, int write_grad) {       \
        ce_rows<T>(S, G_lowp, rows, cols, ld, pos_s, targets, pos_kind, alpha, weights,          \
                   loss_out, lse_out, dpos_out, dtau_acc, inv_tau, write_grad);                  \
    }                                                                                            \
    extern "C" __global__ void unfused_pos_dot_##NAME(const T* x, const T* y, float* out,        \
                                                      int64_t rows, int cols) {                  \
        pos_dot<T>(x, y, out, rows, cols);                                                       \
    }                                                                                            \
    extern "C" __global__ void unfused_row_axpy_##NAME(float* out, const T* x, const float* coef, \
                                                       float beta, int64_t rows, int cols) {     \
        row_axpy<T>(out, x, coef, beta, rows, cols);                                             \
    }
INFONCE_FOR_EACH_DTYPE(UNFUSED_ENTRY)
