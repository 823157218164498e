// libcublas.so of the emulated CUDA device: the handle calls and cublasGemmEx, computed on the host
// over the driver's memory (libcuda.so, abi.h), in the order of the handle's stream.
//
// GemmEx follows the cuBLAS documentation: column-major C = alpha·op(A)·op(B) + beta·C with op(A)
// m×k, op(B) k×n; lda ≥ max(1, m) for op N (else max(1, k)), ldb ≥ max(1, k) for N (else
// max(1, n)), ldc ≥ max(1, m); m = 0 or n = 0 returns at once; beta = 0 does not read C (NaN in C
// stays out). The type combinations are the documented ones for the f32 compute types:
// COMPUTE_32F with A/B f32, f16 or bf16 and C the same or f32; COMPUTE_32F_FAST_TF32, _FAST_16F,
// _FAST_16BF with f32 A/B/C, the inputs rounded to TF32 (10-bit mantissa, round to nearest, ties
// away: cvt.rna.tf32.f32), f16 or bf16 first. Products accumulate in f32 in order of k. Every
// operand's extent (from its leading dimension) must lie in one live allocation.
#include <library_types.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "abi.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 } cublasPointerMode_t;
typedef enum {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_16F_PEDANTIC = 65,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
} cublasComputeType_t;

namespace {

struct Handle {
    void* stream = nullptr;
    int pointer_mode = CUBLAS_POINTER_MODE_HOST;
    int math_mode = 0;
};
std::mutex g_mutex;
std::set<Handle*> g_handles;

Handle* handle_of(void* h) {
    std::lock_guard<std::mutex> l(g_mutex);
    Handle* p = static_cast<Handle*>(h);
    return g_handles.count(p) ? p : nullptr;
}

cublasStatus_t invalid(const std::string& m) {
    std::fprintf(stderr, "emulated CUDA device: cublasGemmEx: CUBLAS_STATUS_INVALID_VALUE: %s\n", m.c_str());
    return CUBLAS_STATUS_INVALID_VALUE;
}
cublasStatus_t unsupported(const std::string& m) {
    std::fprintf(stderr, "emulated CUDA device: cublasGemmEx: CUBLAS_STATUS_NOT_SUPPORTED: %s\n", m.c_str());
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

float f16_to_f32(uint16_t h) {
    _Float16 f;
    std::memcpy(&f, &h, 2);
    return (float)f;
}
uint16_t f32_to_f16(float x) {
    _Float16 f = (_Float16)x;
    uint16_t h;
    std::memcpy(&h, &f, 2);
    return h;
}
float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
uint16_t f32_to_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u | 0x00400000u) >> 16);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
// cvt.rna.tf32.f32: keep 10 mantissa bits, round to nearest, ties away from zero.
float round_tf32(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf, NaN
    u = (u + 0x1000u) & ~0x1fffu;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

size_t elem_size(cudaDataType t) {
    switch (t) {
        case CUDA_R_32F: return 4;
        case CUDA_R_16F:
        case CUDA_R_16BF: return 2;
        default: return 0;
    }
}
const char* type_name(cudaDataType t) {
    switch (t) {
        case CUDA_R_32F: return "CUDA_R_32F";
        case CUDA_R_16F: return "CUDA_R_16F";
        case CUDA_R_16BF: return "CUDA_R_16BF";
        default: return "an unsupported cudaDataType";
    }
}

float load(const void* p, size_t i, cudaDataType t) {
    switch (t) {
        case CUDA_R_32F: return static_cast<const float*>(p)[i];
        case CUDA_R_16F: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
        default: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    }
}
void store(void* p, size_t i, cudaDataType t, float v) {
    switch (t) {
        case CUDA_R_32F: static_cast<float*>(p)[i] = v; break;
        case CUDA_R_16F: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
        default: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    }
}

// The bytes a column-major rows × cols operand with leading dimension ld spans.
uint64_t extent(int64_t rows, int64_t cols, int64_t ld, size_t es) {
    if (rows == 0 || cols == 0) return 0;
    return ((uint64_t)(cols - 1) * (uint64_t)ld + (uint64_t)rows) * es;
}

}  // namespace

EXPORT int fused_infonce_emulated_cublas(void) { return 1; }

EXPORT cublasStatus_t cublasCreate_v2(void** handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    uint64_t epoch;
    // cuBLAS needs a current context, as the real library does.
    if (fused_infonce_emu_begin_op(nullptr, "cublasCreate", &epoch) != 0) return CUBLAS_STATUS_NOT_INITIALIZED;
    Handle* h = new Handle();
    std::lock_guard<std::mutex> l(g_mutex);
    g_handles.insert(h);
    *handle = h;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasDestroy_v2(void* handle) {
    std::lock_guard<std::mutex> l(g_mutex);
    Handle* h = static_cast<Handle*>(handle);
    if (!g_handles.erase(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasSetStream_v2(void* handle, void* stream) {
    Handle* h = handle_of(handle);
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasGetStream_v2(void* handle, void** stream) {
    Handle* h = handle_of(handle);
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (stream) *stream = h->stream;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasSetPointerMode_v2(void* handle, int mode) {
    Handle* h = handle_of(handle);
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) return CUBLAS_STATUS_INVALID_VALUE;
    h->pointer_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasGetPointerMode_v2(void* handle, int* mode) {
    Handle* h = handle_of(handle);
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode) *mode = h->pointer_mode;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasSetMathMode(void* handle, int mode) {
    Handle* h = handle_of(handle);
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->math_mode = mode;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasGetMathMode(void* handle, int* mode) {
    Handle* h = handle_of(handle);
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode) *mode = h->math_mode;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT cublasStatus_t cublasSetWorkspace_v2(void* handle, void*, size_t) {
    return handle_of(handle) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}
EXPORT cublasStatus_t cublasGetVersion_v2(void*, int* v) {
    if (v) *v = 130000;
    return CUBLAS_STATUS_SUCCESS;
}
EXPORT const char* cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        default: return "CUBLAS_STATUS_UNKNOWN";
    }
}
EXPORT const char* cublasGetStatusString(cublasStatus_t s) { return cublasGetStatusName(s); }

EXPORT cublasStatus_t cublasGemmEx(void* handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                   int k, const void* alpha, const void* A, cudaDataType Atype, int lda,
                                   const void* B, cudaDataType Btype, int ldb, const void* beta, void* C,
                                   cudaDataType Ctype, int ldc, cublasComputeType_t compute, int /*algo*/) {
    Handle* h = handle_of(handle);
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    auto op_ok = [](cublasOperation_t o) { return o == CUBLAS_OP_N || o == CUBLAS_OP_T || o == CUBLAS_OP_C; };
    if (!op_ok(transa) || !op_ok(transb)) return invalid("transa/transb must be CUBLAS_OP_N, _T or _C");
    if (m < 0 || n < 0 || k < 0)
        return invalid("m = " + std::to_string(m) + ", n = " + std::to_string(n) + ", k = " + std::to_string(k) + ": negative");
    const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
    const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
    if (lda < std::max<int64_t>(1, a_rows))
        return invalid("lda = " + std::to_string(lda) + " < max(1, " + std::to_string(a_rows) + ") for op(A) " + (ta ? "T" : "N"));
    if (ldb < std::max<int64_t>(1, b_rows))
        return invalid("ldb = " + std::to_string(ldb) + " < max(1, " + std::to_string(b_rows) + ") for op(B) " + (tb ? "T" : "N"));
    if (ldc < std::max(1, m)) return invalid("ldc = " + std::to_string(ldc) + " < max(1, m = " + std::to_string(m) + ")");
    // The documented combinations for the f32 compute types (scale type f32).
    const bool f32_all = Atype == CUDA_R_32F && Btype == CUDA_R_32F && Ctype == CUDA_R_32F;
    bool types_ok = false;
    switch (compute) {
        case CUBLAS_COMPUTE_32F:
        case CUBLAS_COMPUTE_32F_PEDANTIC:
            types_ok = f32_all || (Atype == Btype && (Atype == CUDA_R_16F || Atype == CUDA_R_16BF) &&
                                   (Ctype == Atype || Ctype == CUDA_R_32F));
            break;
        case CUBLAS_COMPUTE_32F_FAST_TF32:
        case CUBLAS_COMPUTE_32F_FAST_16F:
        case CUBLAS_COMPUTE_32F_FAST_16BF:
            types_ok = f32_all;
            break;
        default:
            return unsupported("compute type " + std::to_string((int)compute) + " is not emulated (f32 compute types only)");
    }
    if (!types_ok)
        return unsupported(std::string("A ") + type_name(Atype) + ", B " + type_name(Btype) + ", C " + type_name(Ctype) +
                           " with compute type " + std::to_string((int)compute) + " is not a documented combination");
    if (!alpha || !beta) return invalid("null alpha or beta");
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;

    uint64_t epoch;
    if (fused_infonce_emu_begin_op(h->stream, "cublasGemmEx", &epoch) != 0) return CUBLAS_STATUS_EXECUTION_FAILED;
    auto touch = [&](uint64_t p, uint64_t bytes, int write, const char* operand) {
        return bytes == 0 || fused_infonce_emu_access(h->stream, epoch, p, bytes, write, "cublasGemmEx", operand) == 0;
    };
    float al, be;
    if (h->pointer_mode == CUBLAS_POINTER_MODE_DEVICE) {
        if (!touch((uint64_t)alpha, 4, 0, "alpha") || !touch((uint64_t)beta, 4, 0, "beta")) return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    std::memcpy(&al, alpha, 4);
    std::memcpy(&be, beta, 4);
    const size_t ea = elem_size(Atype), eb = elem_size(Btype), ec = elem_size(Ctype);
    if (k > 0 && (!touch((uint64_t)A, extent(a_rows, a_cols, lda, ea), 0, "A") ||
                  !touch((uint64_t)B, extent(b_rows, b_cols, ldb, eb), 0, "B")))
        return CUBLAS_STATUS_EXECUTION_FAILED;
    if (!touch((uint64_t)C, extent(m, n, ldc, ec), 1, "C")) return CUBLAS_STATUS_EXECUTION_FAILED;

    auto round_in = [&](float x) {
        switch (compute) {
            case CUBLAS_COMPUTE_32F_FAST_TF32: return round_tf32(x);
            case CUBLAS_COMPUTE_32F_FAST_16F: return f16_to_f32(f32_to_f16(x));
            case CUBLAS_COMPUTE_32F_FAST_16BF: return bf16_to_f32(f32_to_bf16(x));
            default: return x;
        }
    };
    // op(A) as an m×k row-major f32 copy and op(B) as n×k (so the inner loop runs over k).
    std::vector<float> a((size_t)m * k), b((size_t)n * k);
    for (int64_t i = 0; i < m; ++i)
        for (int64_t l = 0; l < k; ++l)
            a[(size_t)i * k + l] = round_in(load(A, ta ? (size_t)(l + i * (int64_t)lda) : (size_t)(i + l * (int64_t)lda), Atype));
    for (int64_t j = 0; j < n; ++j)
        for (int64_t l = 0; l < k; ++l)
            b[(size_t)j * k + l] = round_in(load(B, tb ? (size_t)(j + l * (int64_t)ldb) : (size_t)(l + j * (int64_t)ldb), Btype));
    for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < m; ++i) {
            const float* ar = &a[(size_t)i * k];
            const float* br = &b[(size_t)j * k];
            float acc = 0.0f;
            for (int64_t l = 0; l < k; ++l) acc = std::fma(ar[l], br[l], acc);
            const size_t ci = (size_t)(i + j * (int64_t)ldc);
            float v = al * acc;
            if (be != 0.0f) v = std::fma(be, load(C, ci, Ctype), v);
            store(C, ci, Ctype, v);
        }
    return CUBLAS_STATUS_SUCCESS;
}
