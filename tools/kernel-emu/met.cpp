// metrics.cu against f64 host definitions (spec/losses.md, Metrics).
#include "emu.h"
#include "shim/common.cuh"
#include <cstdio>
#include <random>
#include <vector>
#define PS(T) const T* anchors, const T* keys, const int64_t* targets, int64_t n_anchors, int64_t capacity, int64_t start, int64_t len, int cols, int skip_mode, int normalize
#define DECL(NAME, T) \
 extern "C" void metrics_uniformity_rows_##NAME(PS(T), float t, float* row_max, float* row_sum); \
 extern "C" void metrics_rownorm_##NAME(const T* x, int64_t rows, int cols, float* inv_norm, float* sqnorm); \
 extern "C" void metrics_classsum_##NAME(const T* x, const float* inv_norm, const float* sqnorm, const int64_t* labels, int64_t rows, int cols, int64_t classes, float* class_sum, int64_t* class_count, float* class_sq); \
 extern "C" void metrics_penalty_##NAME(PS(T), float tau_min, float tau_max, int bins, float* hist_part, float* eff_part);
DECL(f32, float) DECL(f16, f16) DECL(bf16, bf16)
extern "C" void metrics_lse_merge(const float* row_max, const float* row_sum, int64_t rows, float log_count, float* out);
extern "C" void metrics_tolerance_merge(const float* class_sum, const int64_t* class_count, const float* class_sq, int64_t classes, int cols, float* out);
extern "C" void metrics_penalty_merge(const float* hist_part, const float* eff_part, int groups, int bins, float scale, float* hist, float* out_eff);
template <class T> struct K;
#define KS(NAME, T) template <> struct K<T> { \
  static void uni(PS(T), float t, float* a, float* b) { launch(n_anchors, 1, 256, [=] { metrics_uniformity_rows_##NAME(anchors, keys, targets, n_anchors, capacity, start, len, cols, skip_mode, normalize, t, a, b); }); } \
  static void rown(const T* x, int64_t rows, int cols, float* a, float* b) { launch((rows + 7) / 8, 1, 256, [=] { metrics_rownorm_##NAME(x, rows, cols, a, b); }); } \
  static void cls(const T* x, const float* iv, const float* sq, const int64_t* lb, int64_t rows, int cols, int64_t classes, float* cs, int64_t* cc, float* cq) { launch(classes, (cols + 127) / 128, 128, [=] { metrics_classsum_##NAME(x, iv, sq, lb, rows, cols, classes, cs, cc, cq); }); } \
  static void pen(unsigned groups, PS(T), float a, float b, int bins, float* hp, float* ep) { launch(groups, 1, 256, [=] { metrics_penalty_##NAME(anchors, keys, targets, n_anchors, capacity, start, len, cols, skip_mode, normalize, a, b, bins, hp, ep); }); } };
KS(f32, float) KS(f16, f16) KS(bf16, bf16)
int fails = 0;
static void chk(const char* what, double got, double want, double tol) {
    double r = std::fabs(got - want) / std::max(std::fabs(want), 1e-3);
    bool ok = r <= tol;
    if (!ok) ++fails;
    printf("%s %s: got %.7g want %.7g rel %.2e\n", ok ? "ok  " : "FAIL", what, got, want, r);
}
template <class T> std::vector<T> gen(std::mt19937_64& rng, size_t r, int D, bool zero_row) {
    std::uniform_real_distribution<float> U(-1, 1);
    std::vector<T> v(r * D); for (auto& x : v) x = from_f32<T>(U(rng));
    if (zero_row) for (int d = 0; d < D; ++d) v[1 * D + d] = from_f32<T>(0.0f);
    return v;
}
template <class T> std::vector<double> unit(const std::vector<T>& x, int D) {
    std::vector<double> u(x.size());
    for (size_t r = 0; r < x.size() / D; ++r) { double ss = 0; for (int d = 0; d < D; ++d) ss += (double)to_f32(x[r*D+d]) * to_f32(x[r*D+d]);
        double inv = 1.0 / std::max(std::sqrt(ss), 1e-12); for (int d = 0; d < D; ++d) u[r*D+d] = to_f32(x[r*D+d]) * inv; }
    return u;
}
static double dotd(const std::vector<double>& a, size_t i, const std::vector<double>& b, size_t j, int D) { double s = 0; for (int d = 0; d < D; ++d) s += a[i*D+d] * b[j*D+d]; return s; }
template <class T> void run(const char* dt, double tol) {
    char w[160];
    std::mt19937_64 rng(7);
    for (int zr = 0; zr < 2; ++zr) for (int n : {2, 9, 40}) {
        int D = n == 9 ? 150 : 33;
        auto x = gen<T>(rng, n, D, zr && n > 2); auto u = unit(x, D);
        // uniformity, t = 2
        double t = 2.0; std::vector<float> rm(n), rs(n), out(1);
        K<T>::uni(x.data(), x.data(), nullptr, n, n, 0, n, D, 1, 1, (float)t, rm.data(), rs.data());
        float lc = (float)std::log((double)n * (n - 1));
        const float *a = rm.data(), *b = rs.data(); float* o = out.data();
        launch(1, 1, 256, [=] { metrics_lse_merge(a, b, n, lc, o); });
        double m = -1e300; std::vector<double> e;
        for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) if (i != j) { double d2 = 0; for (int d = 0; d < D; ++d) d2 += (u[i*D+d]-u[j*D+d])*(u[i*D+d]-u[j*D+d]); e.push_back(-t * d2); m = std::max(m, -t*d2); }
        double sum = 0; for (double z : e) sum += std::exp(z - m);
        snprintf(w, 160, "%s uniformity n=%d D=%d zero_row=%d", dt, n, D, zr); chk(w, out[0], m + std::log(sum / e.size()), tol);
        // tolerance
        int C = n == 2 ? 1 : 4;
        std::vector<int64_t> lab(n); for (int i = 0; i < n; ++i) lab[i] = (i * 7 + 3) % C;
        std::vector<float> iv(n), sq(n), cs((size_t)C * D), cq(C), tol_out(1); std::vector<int64_t> cc(C);
        K<T>::rown(x.data(), n, D, iv.data(), sq.data());
        K<T>::cls(x.data(), iv.data(), sq.data(), lab.data(), n, D, C, cs.data(), cc.data(), cq.data());
        { const float* p1 = cs.data(); const int64_t* p2 = cc.data(); const float* p3 = cq.data(); float* o2 = tol_out.data(); int64_t CC = C; int DD = D;
          launch(1, 1, 256, [=] { metrics_tolerance_merge(p1, p2, p3, CC, DD, o2); }); }
        double num = 0, cnt = 0;
        for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) if (i != j && lab[i] == lab[j]) { num += dotd(u, i, u, j, D); cnt += 1; }
        snprintf(w, 160, "%s tolerance n=%d D=%d zero_row=%d", dt, n, D, zr);
        if (cnt == 0) { if (!std::isnan(tol_out[0])) { ++fails; printf("FAIL %s: want NaN\n", w); } else printf("ok   %s NaN\n", w); }
        else chk(w, tol_out[0], num / cnt, tol);
    }
    // penalty: queue (wrapped ring), inbatch, cross with targets, symmetric rows; fixed and DySTreSS τ
    struct Cfg { const char* name; int n, cap, start, len, skip; bool inb; };
    for (Cfg c : {Cfg{"queue", 5, 23, 20, 19, 0, false}, Cfg{"inbatch", 12, 12, 0, 12, 2, true}, Cfg{"cross-targets", 6, 30, 0, 30, 1, false}, Cfg{"symmetric", 7, 7, 0, 7, 1, false}})
    for (int dys = 0; dys < 2; ++dys) for (unsigned groups : {0u, 2u}) for (int bins : {1, 16, 1024}) {
        int D = 20;
        auto A = gen<T>(rng, c.n, D, false); auto B = c.inb ? A : gen<T>(rng, c.cap, D, false);
        auto ua = unit(A, D), ub = unit(B, D);
        std::vector<int64_t> tg(c.n); for (int i = 0; i < c.n; ++i) tg[i] = (i * 5 + 1) % c.cap;
        const int64_t* tp = c.skip == 1 && std::string(c.name) == "cross-targets" ? tg.data() : nullptr;
        float tmin = dys ? 0.07f : 0.1f, tmax = dys ? 0.2f : 0.1f;
        unsigned G = groups ? groups : std::min(c.n, 1024);
        std::vector<float> hp((size_t)G * bins, NAN), ep(G, NAN), hist(bins), eff(1);
        K<T>::pen(G, A.data(), B.data(), tp, c.n, c.cap, c.start, c.len, D, c.skip, 1, tmin, tmax, bins, hp.data(), ep.data());
        { const float* p1 = hp.data(); const float* p2 = ep.data(); float* o1 = hist.data(); float* o2 = eff.data(); int GG = G, bb = bins; float sc = (float)(1.0 / c.n);
          launch(1, 1, 256, [=] { metrics_penalty_merge(p1, p2, GG, bb, sc, o1, o2); }); }
        std::vector<double> H(bins, 0.0); double E = 0;
        for (int i = 0; i < c.n; ++i) {
            std::vector<double> s, z;
            for (int jj = 0; jj < c.len; ++jj) {
                int row = (c.start + jj) % c.cap;
                if (c.skip == 1 && row == (tp ? tp[i] : i)) continue;
                if (c.skip == 2 && (row == i || row == (i + c.n / 2) % c.n)) continue;
                double sv = dotd(ua, i, ub, row, D);
                double tau = tmin + 0.5 * ((double)tmax - tmin) * (1 + std::cos(M_PI * (1 + sv)));
                s.push_back(sv); z.push_back(sv / tau);
            }
            if (s.empty()) continue;
            double m = -1e300; for (double q : z) m = std::max(m, q);
            double sum = 0; for (double q : z) sum += std::exp(q - m);
            double lse = m + std::log(sum), ent = 0;
            for (size_t k = 0; k < s.size(); ++k) {
                double r = std::exp(z[k] - lse);
                int b = (int)std::floor((s[k] + 1) * 0.5 * bins); b = std::max(0, std::min(bins - 1, b));
                H[b] += r / c.n; ent += r * (lse - z[k]);
            }
            E += std::exp(ent) / c.n;
        }
        double herr = 0, hmax = 0; for (int b = 0; b < bins; ++b) { herr = std::max(herr, std::fabs(hist[b] - H[b])); hmax = std::max(hmax, H[b]); }
        snprintf(w, 160, "%s penalty %s dys=%d G=%u bins=%d hist(max abs err / max)", dt, c.name, dys, G, bins); chk(w, hmax + herr, hmax, tol * 10);
        snprintf(w, 160, "%s penalty %s dys=%d G=%u bins=%d effective", dt, c.name, dys, G, bins); chk(w, eff[0], E, tol);
    }
}
int main() { run<float>("f32", 1e-5); run<f16>("f16", 1e-2); run<bf16>("bf16", 5e-2); printf("metrics: %d failures\n", fails); return fails != 0; }
