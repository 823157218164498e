// normalize_fwd_* / normalize_bwd_* (kernels/normalize.cu) on the emulator, launched as
// src/cuda/normalize.rs does (8 rows per 256-thread block), against f64 host definitions
// (spec/losses.md, Normalisation) on the same dtype-rounded inputs: shapes with D = 1, odd D,
// D > 32·k, one row; rows that are zero, tiny (‖x‖ < ε: the clamped, linear branch) and large.
#include "emu.h"
#include "shim/common.cuh"
#include <cstdio>
#include <random>
#include <vector>

#define DECL(NAME, T)                                                                            \
    extern "C" void normalize_fwd_##NAME(const T*, T*, float*, int64_t, int);                    \
    extern "C" void normalize_bwd_##NAME(const T*, const float*, const float*, float*, int64_t, int);
INFONCE_FOR_EACH_DTYPE(DECL)

static int checks = 0, fails = 0;
static void chk(const char* what, double err, double tol) {
    ++checks;
    if (!(err <= tol)) { ++fails; printf("FAIL %s: rel %.3e > %.1e\n", what, err, tol); }
}

template <typename T>
static void run(const char* dt, void (*fwd)(const T*, T*, float*, int64_t, int),
                void (*bwd)(const T*, const float*, const float*, float*, int64_t, int), double tol_u) {
    const int shapes[][2] = {{1, 1}, {5, 7}, {17, 33}, {9, 64}, {3, 129}, {2, 300}, {11, 1}};
    std::mt19937_64 rng(7);
    std::uniform_real_distribution<double> uni(-1.0, 1.0);
    for (const auto& sh : shapes) {
        const int rows = sh[0], cols = sh[1];
        std::vector<T> x(rows * cols), u(rows * cols, from_f32<T>(NAN));
        std::vector<float> inv(rows, NAN), du(rows * cols), dx(rows * cols, NAN);
        for (int r = 0; r < rows; ++r) {
            // Row kinds: 0 zero, 1 tiny (clamped), 2 large, others random of norm ~1.
            const double scale = r % 4 == 0 && rows > 1 ? 0.0 : r % 4 == 1 ? 1e-14 : r % 4 == 2 ? 300.0 : 1.0;
            for (int c = 0; c < cols; ++c) {
                x[r * cols + c] = from_f32<T>((float)(uni(rng) * scale));
                du[r * cols + c] = (float)uni(rng);
            }
        }
        const T* px = x.data(); T* pu = u.data(); float* pi = inv.data(); const float* pd = du.data(); float* po = dx.data();
        const int64_t rr = rows; const int cc = cols;
        launch((rows + 7) / 8, 1, 256, [=] { fwd(px, pu, pi, rr, cc); });
        launch((rows + 7) / 8, 1, 256, [=] { bwd(px, pi, pd, po, rr, cc); });
        for (int r = 0; r < rows; ++r) {
            double ss = 0;
            for (int c = 0; c < cols; ++c) { double v = to_f32(x[r * cols + c]); ss += v * v; }
            const double nrm = std::sqrt(ss), den = std::max(nrm, 1e-12), iv = 1.0 / den;
            double eu = 0, nu = 0, dot = 0;
            for (int c = 0; c < cols; ++c) {
                const double want = to_f32(x[r * cols + c]) * iv;
                const double got = to_f32(u[r * cols + c]);
                eu += (got - want) * (got - want); nu += want * want;
                dot += want * du[r * cols + c];
            }
            char w[96];
            snprintf(w, 96, "%s fwd u %dx%d row %d", dt, rows, cols, r);
            chk(w, std::sqrt(eu) / std::max(std::sqrt(nu), 1e-30), tol_u);
            snprintf(w, 96, "%s fwd inv_norm %dx%d row %d", dt, rows, cols, r);
            chk(w, std::fabs(inv[r] - iv) / iv, 1e-6);
            const bool clamped = nrm <= 1e-12;
            // Relative to the gradient's natural scale ‖du‖/max(‖x‖, ε) (for D = 1 the exact
            // gradient is 0: only rounding remains).
            double ed = 0, nd = 0, ndu = 0;
            for (int c = 0; c < cols; ++c) ndu += (double)du[r * cols + c] * du[r * cols + c];
            for (int c = 0; c < cols; ++c) {
                const double uc = to_f32(x[r * cols + c]) * iv;
                const double want = clamped ? du[r * cols + c] * iv : (du[r * cols + c] - uc * dot) * iv;
                const double got = dx[r * cols + c];
                ed += (got - want) * (got - want); nd += want * want;
            }
            snprintf(w, 96, "%s bwd %dx%d row %d%s", dt, rows, cols, r, clamped ? " (clamped)" : "");
            chk(w, std::sqrt(ed) / std::max(std::sqrt(nd), std::sqrt(ndu) * iv), 1e-5);
        }
    }
}

int main() {
    run<float>("f32", normalize_fwd_f32, normalize_bwd_f32, 1e-6);
    run<f16>("f16", normalize_fwd_f16, normalize_bwd_f16, 1e-3);
    run<bf16>("bf16", normalize_fwd_bf16, normalize_bwd_bf16, 8e-3);
    printf("normalize: %d checks, %d failures\n", checks, fails);
    return fails != 0;
}
