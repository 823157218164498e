// select_kth_<dt> against a host sort of the same f32 similarities.
#include "emu.h"
#include "shim/common.cuh"
#include <cstdio>
#include <random>
#include <vector>
#include <algorithm>
#define DECL(NAME, T) extern "C" void select_kth_##NAME(const T* anchors, const T* keys, const int64_t* targets, int64_t n_anchors, int64_t capacity, int64_t start, int64_t len, int cols, int skip_mode, int normalize, int64_t k, float* threshold);
DECL(f32, float) DECL(f16, f16) DECL(bf16, bf16)
template <class T> void call(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int, int, int, int64_t, float*);
#define CALL(NAME, T) template <> void call<T>(const T* a, const T* b, const int64_t* t, int64_t n, int64_t c, int64_t s, int64_t l, int d, int sk, int nz, int64_t k, float* o) { launch(n, 1, 256, [=] { select_kth_##NAME(a, b, t, n, c, s, l, d, sk, nz, k, o); }); }
CALL(f32, float) CALL(f16, f16) CALL(bf16, bf16)
template <class T> float tf(T x) { return to_f32(x); }
static float inv_norm(const std::vector<float>& x, size_t r, int d) { float ss = 0; for (int c = 0; c < d; ++c) ss = fmaf(x[r*d+c], x[r*d+c], ss); return 1.0f / fmaxf(sqrtf(ss), 1e-12f); }
int fails = 0, runs = 0;
template <class T>
void run(const char* what, int n, int cap, int start, int len, int D, int skip, bool norm, const std::vector<int64_t>* tg, bool ints, bool inbatch_keys_are_anchors, uint64_t seed, const std::vector<int64_t>& ks) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> U(-1, 1); std::uniform_int_distribution<int> I(-2, 2);
    auto gen = [&](size_t r) { std::vector<T> v(r * D); for (auto& x : v) x = from_f32<T>(ints ? (float)I(rng) : U(rng)); return v; };
    std::vector<T> A = gen(n), B = inbatch_keys_are_anchors ? A : gen(cap);
    std::vector<float> Af(A.size()), Bf(B.size());
    for (size_t i = 0; i < A.size(); ++i) Af[i] = tf(A[i]);
    for (size_t i = 0; i < B.size(); ++i) Bf[i] = tf(B[i]);
    for (int64_t k : ks) {
        std::vector<float> out(n, 12345.0f);
        call<T>(A.data(), B.data(), tg ? tg->data() : nullptr, n, cap, start, len, D, skip, norm, k, out.data());
        for (int i = 0; i < n; ++i) {
            std::vector<float> s; std::vector<double> s64;
            float ia = inv_norm(Af, i, D);
            for (int j = 0; j < len; ++j) {
                int row = (start + j) % cap;
                if (skip == 1 && row == (tg ? (*tg)[i] : i)) continue;
                if (skip == 2 && (row == i || row == (i + n / 2) % n)) continue;
                float acc = 0; double a64 = 0;
                for (int d = 0; d < D; ++d) { acc = fmaf(Af[i*D+d], Bf[row*D+d], acc); a64 += (double)Af[i*D+d] * Bf[row*D+d]; }
                if (norm) { acc = acc * ia * inv_norm(Bf, row, D); }
                s.push_back(acc); s64.push_back(a64);
            }
            std::sort(s.begin(), s.end(), [](float x, float y) { return x > y; });
            float want = k >= (int64_t)s.size() ? -INFINITY : s[k - 1];
            ++runs;
            if (!(__float_as_uint(out[i]) == __float_as_uint(want))) { ++fails; printf("FAIL %s k=%ld anchor %d: got %.9g want %.9g (n_neg %zu)\n", what, (long)k, i, out[i], want, s.size()); }
        }
    }
}
template <class T> void all(const char* dt, uint64_t seed, bool quick) {
    char w[128];
    for (int norm = 0; norm < 2; ++norm) for (int ints = 0; ints < 2; ++ints) {
        if (quick && norm != ints) continue;
        int D = ints ? 4 : 37;
        snprintf(w, 128, "%s queue wrapped norm%d ints%d", dt, norm, ints); run<T>(w, 3, 61, 50, 57, D, 0, norm, nullptr, ints, false, seed + 1, {1, 3, 56, 57, 60});
        snprintf(w, 128, "%s queue full norm%d ints%d", dt, norm, ints); run<T>(w, 2, 40, 39, 40, D, 0, norm, nullptr, ints, false, seed + 2, {1, 5, 39, 40});
        snprintf(w, 128, "%s inbatch norm%d ints%d", dt, norm, ints); run<T>(w, 8, 8, 0, 8, D, 2, norm, nullptr, ints, true, seed + 3, {1, 2, 5, 6, 7});
        std::vector<int64_t> tg = {3, 0, 37, 5};
        snprintf(w, 128, "%s cross targets norm%d ints%d", dt, norm, ints); run<T>(w, 4, 38, 0, 38, D, 1, norm, &tg, ints, false, seed + 4, {1, 4, 36, 37, 38});
        snprintf(w, 128, "%s cross identity norm%d ints%d", dt, norm, ints); run<T>(w, 3, 20, 0, 20, D, 1, norm, nullptr, ints, false, seed + 5, {1, 4, 18, 19, 20});
        snprintf(w, 128, "%s symmetric norm%d ints%d", dt, norm, ints); run<T>(w, 6, 6, 0, 6, D, 1, norm, nullptr, ints, false, seed + 6, {1, 3, 4, 5, 6});
        printf("done %s norm%d ints%d: %d checks %d failures\n", dt, norm, ints, runs, fails); fflush(stdout);
    }
}
int main() {
    all<float>("f32", 10, false); all<f16>("f16", 20, true); all<bf16>("bf16", 30, true);
    printf("select: %d anchor checks, %d failures\n", runs, fails);
    return fails != 0;
}
