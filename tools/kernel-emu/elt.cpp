// The shared step kernels (kernels/steps.cu) on the emulator, launched as src/cuda launches them:
// steps_cast_* (f32 → dtype, grid-stride), steps_max_abs_f32 (the tf32 path's range check;
// NaN counts as +inf), steps_fill_unit_rows_* (the benchmarks' device-side random unit rows).
#include "emu.h"
#include "shim/common.cuh"
#include <cstdio>
#include <random>
#include <vector>

#define DECL(NAME, T)                                                                   \
    extern "C" void steps_cast_##NAME(const float*, T*, int64_t);                     \
    extern "C" void steps_fill_unit_rows_##NAME(T*, int64_t, int, uint64_t);
INFONCE_FOR_EACH_DTYPE(DECL)
extern "C" void steps_max_abs_f32(const float*, int64_t, unsigned int*);

static int checks = 0, fails = 0;
static void chk(const char* what, bool ok) {
    ++checks;
    if (!ok) { ++fails; printf("FAIL %s\n", what); }
}
// src/cuda/unfused.rs elementwise_cfg with `sms` SMs: blocks = clamp(⌈n/256⌉, 1, 16·sms).
static unsigned blocks(size_t n, unsigned sms) { return (unsigned)std::min<size_t>(std::max<size_t>((n + 255) / 256, 1), 16 * sms); }

template <typename T>
static void run(const char* dt, void (*cast)(const float*, T*, int64_t), void (*fill)(T*, int64_t, int, uint64_t)) {
    std::mt19937_64 rng(11);
    std::normal_distribution<float> g(0.0f, 3.0f);
    char w[128];
    for (size_t n : {1, 255, 256, 257, 9000}) {
        std::vector<float> x(n);
        for (auto& v : x) v = g(rng);
        std::vector<T> y(n, from_f32<T>(NAN));
        const float* px = x.data(); T* py = y.data(); const int64_t nn = n;
        launch(blocks(n, 1), 1, 256, [=] { cast(px, py, nn); });
        size_t bad = 0;
        for (size_t i = 0; i < n; ++i) {
            const T want = from_f32<T>(x[i]);
            if (std::memcmp(&want, &y[i], sizeof(T)) != 0) ++bad;
        }
        snprintf(w, 128, "%s cast n=%zu: %zu elements differ from host rounding", dt, n, bad);
        chk(w, bad == 0);
    }
    for (auto [rows, cols] : std::vector<std::pair<int, int>>{{1, 1}, {3, 7}, {17, 64}, {9, 129}}) {
        std::vector<T> a(rows * cols, from_f32<T>(NAN)), b(rows * cols, from_f32<T>(NAN)), c(rows * cols, from_f32<T>(NAN));
        T *pa = a.data(), *pb = b.data(), *pc = c.data(); const int64_t rr = rows; const int cc = cols;
        launch((rows + 7) / 8, 1, 256, [=] { fill(pa, rr, cc, 42); });
        launch((rows + 7) / 8, 1, 256, [=] { fill(pb, rr, cc, 42); });
        launch((rows + 7) / 8, 1, 256, [=] { fill(pc, rr, cc, 43); });
        const double tol = sizeof(T) == 4 ? 1e-5 : 1e-2;
        for (int r = 0; r < rows; ++r) {
            double ss = 0;
            for (int k = 0; k < cols; ++k) { double v = to_f32(a[r * cols + k]); ss += v * v; }
            snprintf(w, 128, "%s fill %dx%d row %d: norm %.6f", dt, rows, cols, r, std::sqrt(ss));
            chk(w, std::fabs(std::sqrt(ss) - 1.0) <= tol);
        }
        snprintf(w, 128, "%s fill %dx%d: same seed, same rows; another seed, other rows", dt, rows, cols);
        chk(w, std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0 &&
                   (cols == 1 || std::memcmp(a.data(), c.data(), a.size() * sizeof(T)) != 0));
    }
}

int main() {
    run<float>("f32", steps_cast_f32, steps_fill_unit_rows_f32);
    run<f16>("f16", steps_cast_f16, steps_fill_unit_rows_f16);
    run<bf16>("bf16", steps_cast_bf16, steps_fill_unit_rows_bf16);
    std::mt19937_64 rng(5);
    std::normal_distribution<float> g(0.0f, 1.0f);
    char w[128];
    for (size_t n : {1, 300, 5000, 70000}) {
        for (int kind = 0; kind < 3; ++kind) {
            std::vector<float> x(n);
            for (auto& v : x) v = g(rng);
            float want = 0;
            if (kind == 1) x[n / 2] = -70000.0f;  // the largest magnitude is negative
            if (kind == 2) x[n - 1] = NAN;        // NaN counts as +inf
            for (float v : x) want = std::max(want, v != v ? INFINITY : std::fabs(v));
            unsigned out = 0;
            const float* px = x.data(); unsigned* po = &out; const int64_t nn = n;
            launch(blocks(n, 2), 1, 256, [=] { steps_max_abs_f32(px, nn, po); });
            snprintf(w, 128, "max_abs n=%zu kind %d: got %g want %g", n, kind, __uint_as_float(out), want);
            chk(w, __uint_as_float(out) == want);
        }
    }
    printf("elementwise: %d checks, %d failures\n", checks, fails);
    return fails != 0;
}
