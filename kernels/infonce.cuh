// The simple (v1) fused InfoNCE kernels: the launch parameters shared by every pass, and the
// per-logit math of spec/losses.md (Temperature) written once.
//
// One "problem" is a set of anchors X (n_anchors × D) against a set of keys Y (n_keys × D, read
// in place from a ring buffer: key j is physical row (y_start + j) mod y_cap). Each anchor i has
// one positive and the keys minus up to two excluded indices as negatives:
//   queue      X = Q, Y = M (ring), positive p_i from the separate matrix `pos`, no exclusion
//   inbatch    X = Y = E, positive key (i + n/2) mod n, excluded keys: the positive and i itself
//   cross      X = A, Y = B, positive key y_i (targets, default i), excluded: the positive
//   symmetric  twice: (X = A, Y = B) for the row losses and (X = B, Y = A) for the column losses,
//              positive key i
// The struct layout must match `InfonceParams` in src/cuda/paths/simple/params.rs (the size is asserted on
// both sides).
#pragma once

#include "common.cuh"

enum : int { POS_NONE = 0, POS_PAIR = 1, POS_TARGET = 2 };
enum : int { VARIANT_STANDARD = 0, VARIANT_DECOUPLED = 1, VARIANT_SIMPLE = 2 };
enum : int { TEMP_CONST = 0, TEMP_DYSTRESS_DETACH = 1, TEMP_DYSTRESS_FULL = 2 };

struct InfonceParams {
    // ---- inputs (device pointers; `void` = the storage dtype T of the entry point)
    const void* x;             // anchors X, n_anchors × dim
    const void* y;             // keys Y, ring of y_cap rows × dim
    const void* pos;           // queue mode: the positives P (n_anchors × dim); else null
    const int64_t* targets;    // POS_TARGET: y_i per anchor; null = identity
    // Optional per-anchor similarity threshold (hard-negative selection hook): a negative key j of
    // anchor i with s_ij < s_threshold[i] is excluded from the loss and gets no gradient (the
    // positive is never excluded). Null keeps every negative. A selection kernel (hard:k) fills it.
    const float* s_threshold;
    const float* weights;      // w_i per anchor (the upstream weight of the anchor's loss)
    // ---- per (chunk, anchor) partials of the row pass, index c * n_anchors + i
    float* part_max;           // running max of the chunk's logits (simple: unused, 0)
    float* part_sum;           // Σ exp(z − max)   (simple: the number of kept negatives)
    float* part_pz;            // Σ exp(z − max) z (simple: Σ s over kept negatives)
    float* part_acc;           // Σ exp(z − max) dz/ds k_j, (c * n_anchors + i) * dim + d; null = forward only
    // ---- per-anchor results of the merge
    float* lse;                // LSE of the loss's denominator (null for simple)
    float* loss;               // L_i (unweighted)
    float* dpos;               // w_i ∂L_i/∂s_i+
    float* scale;              // w_i (standard, decoupled) or w_i λ_i (simple): the negatives' factor
    float* dtau;               // w_i ∂L_i/∂τ (learnable τ; null otherwise)
    // ---- f32 gradient accumulators (added to; null = not wanted)
    float* grad_x;             // n_anchors × dim
    float* grad_y;             // n_keys × dim, in key (logical) order
    float* grad_pos;           // queue mode: n_anchors × dim
    // ---- sizes
    int64_t n_anchors;
    int64_t n_keys;
    int64_t y_start;
    int64_t y_cap;
    int64_t chunk_len;         // keys per chunk of the row pass (a multiple of TILE_K)
    int32_t dim;
    int32_t n_chunks;
    int32_t pos_kind;          // POS_*
    int32_t self_skip;         // 1: key i is not a negative of anchor i (inbatch)
    int32_t variant;           // VARIANT_*
    int32_t temp_kind;         // TEMP_*
    // ---- temperature and variant parameters
    float inv_tau;             // 1/τ (TEMP_CONST)
    float tau;                 // τ (TEMP_CONST; dL/dτ)
    float tau_min;             // DySTreSS τ(0)
    float tau_max;             // DySTreSS τ(±1)
    float lambda;              // simple:λ when has_lambda
    int32_t has_lambda;        // 0: λ = 1/#kept negatives
};
static_assert(sizeof(InfonceParams) == 232, "InfonceParams must match src/cuda/paths/simple/params.rs");
// Field offsets, asserted identically in src/cuda/paths/simple/params.rs (offset_of!).
#define INFONCE_PARAMS_OFFSET(F, O) static_assert(__builtin_offsetof(InfonceParams, F) == O, "InfonceParams." #F " offset");
INFONCE_PARAMS_OFFSET(x, 0)
INFONCE_PARAMS_OFFSET(y, 8)
INFONCE_PARAMS_OFFSET(pos, 16)
INFONCE_PARAMS_OFFSET(targets, 24)
INFONCE_PARAMS_OFFSET(s_threshold, 32)
INFONCE_PARAMS_OFFSET(weights, 40)
INFONCE_PARAMS_OFFSET(part_max, 48)
INFONCE_PARAMS_OFFSET(part_sum, 56)
INFONCE_PARAMS_OFFSET(part_pz, 64)
INFONCE_PARAMS_OFFSET(part_acc, 72)
INFONCE_PARAMS_OFFSET(lse, 80)
INFONCE_PARAMS_OFFSET(loss, 88)
INFONCE_PARAMS_OFFSET(dpos, 96)
INFONCE_PARAMS_OFFSET(scale, 104)
INFONCE_PARAMS_OFFSET(dtau, 112)
INFONCE_PARAMS_OFFSET(grad_x, 120)
INFONCE_PARAMS_OFFSET(grad_y, 128)
INFONCE_PARAMS_OFFSET(grad_pos, 136)
INFONCE_PARAMS_OFFSET(n_anchors, 144)
INFONCE_PARAMS_OFFSET(n_keys, 152)
INFONCE_PARAMS_OFFSET(y_start, 160)
INFONCE_PARAMS_OFFSET(y_cap, 168)
INFONCE_PARAMS_OFFSET(chunk_len, 176)
INFONCE_PARAMS_OFFSET(dim, 184)
INFONCE_PARAMS_OFFSET(n_chunks, 188)
INFONCE_PARAMS_OFFSET(pos_kind, 192)
INFONCE_PARAMS_OFFSET(self_skip, 196)
INFONCE_PARAMS_OFFSET(variant, 200)
INFONCE_PARAMS_OFFSET(temp_kind, 204)
INFONCE_PARAMS_OFFSET(inv_tau, 208)
INFONCE_PARAMS_OFFSET(tau, 212)
INFONCE_PARAMS_OFFSET(tau_min, 216)
INFONCE_PARAMS_OFFSET(tau_max, 220)
INFONCE_PARAMS_OFFSET(lambda, 224)
INFONCE_PARAMS_OFFSET(has_lambda, 228)
#undef INFONCE_PARAMS_OFFSET

// τ(s) = τ_min + ½(τ_max − τ_min)(1 + cos(π(1 + s)))   (constant τ for fixed and learnable)
__device__ __forceinline__ float tau_of(const InfonceParams& p, float s) {
    if (p.temp_kind == TEMP_CONST) return p.tau;
    return p.tau_min + 0.5f * (p.tau_max - p.tau_min) * (1.0f + cospif(1.0f + s));
}

// z = s / τ(s). The DySTreSS divisions use __fdividef (2 ulp, no IEEE slow-path call: the call's
// saved registers spill on sm_80); τ(s) ∈ [τ_min, τ_max] is far from the range where it is inexact.
__device__ __forceinline__ float logit(const InfonceParams& p, float s) {
    if (p.temp_kind == TEMP_CONST) return s * p.inv_tau;
    return __fdividef(s, tau_of(p, s));
}

// ∂z/∂s: 1/τ (constant, DySTreSS detach) or 1/τ(s) − s τ'(s)/τ(s)² (DySTreSS full),
// τ'(s) = −½ π (τ_max − τ_min) sin(π(1 + s)). The simple variant has no temperature: 1.
__device__ __forceinline__ float dz_ds(const InfonceParams& p, float s) {
    if (p.variant == VARIANT_SIMPLE) return 1.0f;
    if (p.temp_kind == TEMP_CONST) return p.inv_tau;
    const float inv = __fdividef(1.0f, tau_of(p, s));
    if (p.temp_kind == TEMP_DYSTRESS_DETACH) return inv;
    const float dtau = -0.5f * 3.14159265358979f * (p.tau_max - p.tau_min) * sinpif(1.0f + s);
    return inv - s * dtau * inv * inv;
}

// The positive's key index of anchor i among the keys (−1: the positive is not a key, queue mode).
__device__ __forceinline__ int64_t pos_key(const InfonceParams& p, int64_t i) {
    if (p.pos_kind == POS_PAIR) {  // (i + n/2) mod n without a 64-bit division (0 ≤ i < n)
        const int64_t j = i + p.n_anchors / 2;
        return j >= p.n_anchors ? j - p.n_anchors : j;
    }
    if (p.pos_kind == POS_TARGET) return p.targets ? p.targets[i] : i;
    return -1;
}

// The key index that is anchor i itself (−1: none).
__device__ __forceinline__ int64_t self_key(const InfonceParams& p, int64_t i) {
    return p.self_skip ? i : -1;
}

// Physical row of key j (0 ≤ j < n_keys ≤ y_cap, 0 ≤ y_start < y_cap): the ring read in place.
__device__ __forceinline__ int64_t key_row(const InfonceParams& p, int64_t j) {
    int64_t r = p.y_start + j;
    return r >= p.y_cap ? r - p.y_cap : r;
}
