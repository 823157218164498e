// The tensor-core kernels (kernels/infonce_mma.cu) on the host emulator, launched as
// src/cuda/fast.rs launches them, against a case's f64 CPU reference (cases from
// emu_mma_dump.rs, inputs already rounded to the dtype).
//
//   mma_<dt> CASE [SMS]        SMS (default 132) sets the queue/column split like the real device;
//                              SMS = 1 gives one split with many tiles (the cp.async pipeline).
//   EMU_TOL (default 1e-2, the f16/bf16 tolerance), EMU_FILTER=θ: the gradient filter's threshold;
//   the loss, LSE and dτ must still match and each gradient row must stay within the documented
//   bound (fast.rs filter_bound / pair_filter_bound) of the reference.
#include "emu.h"
#include "case.h"
#include "shim/infonce_mma.cuh"
#include <cstdio>
#include <fstream>
#include <string>
#ifndef DT
#define DT bf16
#endif
#define S2(x) #x
#define S(x) S2(x)
typedef DT TT;
#define DECL_D(D)                                                                                  \
    extern "C" void CAT3(infonce_mma_queue_fwd_, DT, _d##D)(const TT*, int64_t, const TT*, int64_t, int64_t, int64_t, int64_t, float, float, float*, float*, float*, float*); \
    extern "C" void CAT4(infonce_mma_queue_fwd_, DT, _d##D, _learn)(const TT*, int64_t, const TT*, int64_t, int64_t, int64_t, int64_t, float, float, float*, float*, float*, float*); \
    extern "C" void CAT3(infonce_mma_pair_lse_, DT, _d##D)(PAIR_SIG);                            \
    extern "C" void CAT3(infonce_mma_pair_grad_, DT, _d##D)(PAIR_SIG);
#define CAT3_(a, b, c) a##b##c
#define CAT3(a, b, c) CAT3_(a, b, c)
#define CAT4_(a, b, c, d) a##b##c##d
#define CAT4(a, b, c, d) CAT4_(a, b, c, d)
#define PAIR_SIG const TT*, int64_t, const TT*, int64_t, int64_t, float, int, int, const int64_t*, int64_t, float*, float*, const float*, const float*, const float*, const float*, float, float, float*, float*, int, float
DECL_D(64)
DECL_D(128)
extern "C" void CAT3(infonce_mma_queue_combine_, DT, )(const TT*, const TT*, int64_t, int, int64_t, const float*, const float*, const float*, const float*, float, const float*, float*, float*, float*, float*, float*, int);
extern "C" void CAT3(infonce_mma_pair_combine_, DT, )(const TT*, const TT*, int64_t, int, int64_t, const float*, const float*, float, int, const int64_t*, int64_t, float*, float*);

typedef void (*QueueFwd)(const TT*, int64_t, const TT*, int64_t, int64_t, int64_t, int64_t, float, float, float*, float*, float*, float*);
typedef void (*PairFn)(PAIR_SIG);

typedef std::vector<float> V;
static V nanv(size_t n) { return V(std::max<size_t>(n, 1), NAN); }
static V zeros(size_t n) { return V(std::max<size_t>(n, 1), 0.0f); }
static size_t cdiv(size_t a, size_t b) { return (a + b - 1) / b; }

// fast.rs queue_split: (splits, keys per split), about two blocks per SM.
static std::pair<size_t, size_t> queue_split(size_t sms, size_t anchors, size_t keys) {
    if (keys == 0) return {0, 0};
    size_t row_tiles = std::max<size_t>(cdiv(anchors, 64), 1), tiles = cdiv(keys, 64);
    size_t want = std::min(std::max<size_t>(cdiv(2 * std::max<size_t>(sms, 1), row_tiles), 1), std::min<size_t>(tiles, 1024));
    size_t per = cdiv(tiles, want) * 64;
    return {cdiv(keys, per), per};
}

static double rel(const V& g, const std::vector<double>& w, double floor = 1e-6) {
    if (g.size() < w.size()) return INFINITY;
    double num = 0, den = 0;
    for (size_t i = 0; i < w.size(); ++i) { if (!std::isfinite(g[i])) return INFINITY; num += (g[i] - w[i]) * (g[i] - w[i]); den += w[i] * w[i]; }
    return std::sqrt(num) / std::max(std::sqrt(den), floor);
}

static void poison_smem() { std::memset(emu_dyn_smem(), 0xff, emu_dyn_smem_bytes()); }
static int leaks(const char* what) {
    emu_cp_reset();
    if (emu_cp_leaked) { printf("FAIL %s: %ld cp.async copies never waited for\n", what, emu_cp_leaked); emu_cp_leaked = 0; return 1; }
    return 0;
}

struct Side { const TT* x; size_t rows; const TT* y; size_t cols; int tgt_kind; const int64_t* tgt; int64_t half; int mask_self; };

int main(int argc, char** argv) {
    const size_t sms = argc > 2 ? atoi(argv[2]) : 132;
    const double tol = getenv("EMU_TOL") ? atof(getenv("EMU_TOL")) : 1e-2;
    const float theta = getenv("EMU_FILTER") ? (float)atof(getenv("EMU_FILTER")) : 0.0f;
    const EmuCase ec = read_case(argv[1]);
    const int mode = ec.mode, var = ec.var, tk = ec.tk, learn = ec.learn, red = ec.red, norm = ec.norm, gq = ec.gq;
    const double tau = ec.tau;
    const int nm = (int)ec.mats.size(); const std::vector<size_t>& R = ec.rows; const size_t D = ec.D;
    std::vector<std::vector<TT>> mat(nm);
    for (int m = 0; m < nm; ++m) {
        mat[m].resize(ec.mats[m].size());
        for (size_t i = 0; i < ec.mats[m].size(); ++i) {
            const float x = ec.mats[m][i];
            mat[m][i] = from_f32<TT>(x);
            if (to_f32(mat[m][i]) != x) { printf("FAIL %s: input not representable in %s\n", argv[1], S(DT)); return 1; }
        }
    }
    std::vector<int64_t> targets = ec.targets; const int nt = (int)targets.size();
    const std::vector<double>& w64 = ec.w;
    const std::vector<double>&e_loss = ec.loss, &e_lse = ec.lse, &e_cols = ec.lse_cols;
    const int hc = ec.has_cols, ng = (int)ec.grads.size();
    const std::vector<std::vector<double>>& e_g = ec.grads; const std::vector<size_t>& gr = ec.grad_rows;
    const double e_dtau = ec.dtau;
    if (var != 0 || tk != 0 || norm || gq || (D != 64 && D != 128)) { printf("skip %s (not on the tensor-core path)\n", argv[1]); return 0; }

    const float alpha = (float)(1.0 / tau), scale_log2 = (float)(M_LOG2E / tau);
    const size_t count = w64.size();
    V w(count); for (size_t i = 0; i < count; ++i) w[i] = (float)w64[i];
    int worst = 0;
    V loss_each = nanv(count), lse0, lse1;
    std::vector<V> grads;
    double dtau_sum = 0.0;
    std::vector<double> grad_bound;  // per gradient row, with EMU_FILTER
    const QueueFwd fwd_fn[2][2] = {{CAT3(infonce_mma_queue_fwd_, DT, _d64), CAT4(infonce_mma_queue_fwd_, DT, _d64, _learn)},
                                   {CAT3(infonce_mma_queue_fwd_, DT, _d128), CAT4(infonce_mma_queue_fwd_, DT, _d128, _learn)}};
    const PairFn lse_fn[2] = {CAT3(infonce_mma_pair_lse_, DT, _d64), CAT3(infonce_mma_pair_lse_, DT, _d128)};
    const PairFn grad_fn[2] = {CAT3(infonce_mma_pair_grad_, DT, _d64), CAT3(infonce_mma_pair_grad_, DT, _d128)};
    const int di = D == 128;
    const int dd = (int)D;

    if (mode == 0) {
        // The queue in a wrapped ring (cap = K + 5, start = cap − 2), the rest poisoned.
        const size_t n = R[0], k = R[2], cap = k + 5, start = cap - 2;
        std::vector<TT> ring(cap * D, from_f32<TT>(NAN));
        for (size_t j = 0; j < k; ++j) for (size_t d = 0; d < D; ++d) ring[((start + j) % cap) * D + d] = mat[2][j * D + d];
        auto [splits, per] = queue_split(sms, n, k);
        V pm = nanv(splits * n), pl = nanv(splits * n), pt = nanv(learn ? splits * n : 0), po = nanv(splits * n * D);
        if (splits) {
            const TT *q = mat[0].data(), *keys = ring.data();
            float *a = pm.data(), *b = pl.data(), *c = learn ? pt.data() : nullptr, *o = po.data();
            const int64_t nn = n, c64 = cap, s64 = start, l64 = k, p64 = per;
            QueueFwd f = fwd_fn[di][learn];
            poison_smem();
            launch(cdiv(n, 64), splits, 128, [=] { f(q, nn, keys, c64, s64, l64, p64, scale_log2, theta, a, b, c, o); });
            worst |= leaks("queue_fwd");
        }
        lse0 = nanv(n);
        V dq = nanv(n * D), dp = nanv(n * D), dtr = nanv(n);
        {
            const TT *q = mat[0].data(), *p = mat[1].data();
            const float *a = pm.data(), *b = pl.data(), *c = learn ? pt.data() : nullptr, *o = po.data(), *ww = w.data();
            float *lr = loss_each.data(), *ls = lse0.data(), *g1 = dq.data(), *g2 = dp.data(), *dt = learn ? dtr.data() : nullptr;
            const int64_t nn = n, ss = splits;
            launch(n, 1, 128, [=] { CAT3(infonce_mma_queue_combine_, DT, )(q, p, nn, dd, ss, a, b, c, o, alpha, ww, lr, ls, g1, g2, dt, 1); });
        }
        grads = {dq, dp};
        if (learn) { for (size_t i = 0; i < n; ++i) dtau_sum += dtr[i]; dtau_sum *= -alpha; }
        // ‖Δdq_i‖ ≤ w_i·α·θ·Σ_j ‖m_j‖ (fast.rs filter_bound with the exact key norms).
        // What skipping can change: a skipped key's weight P_ij (≤ its weight relative to the
        // running max) is below θ, so ‖Δdq_i‖ ≤ w_i α Σ_(j: P_ij < θ) P_ij ‖m_j‖ (a 1 % margin on
        // θ for rounding; P from the kernel's own LSE). Far tighter than fast.rs's filter_bound,
        // so a wrong skip (a tile with a large weight) fails.
        for (size_t i = 0; i < n; ++i) {
            double b = 0;
            for (size_t j = 0; j < k; ++j) {
                double dot = 0, m2 = 0;
                for (size_t d = 0; d < D; ++d) { double x = to_f32(mat[2][j * D + d]); dot += (double)to_f32(mat[0][i * D + d]) * x; m2 += x * x; }
                const double P = std::exp(alpha * dot - lse0[i]);
                if (P < theta * 1.01) b += P * std::sqrt(m2);
            }
            grad_bound.push_back(w[i] * alpha * b);
        }
        grad_bound.resize(2 * n, 0.0);  // dp does not depend on the queue: exact
    } else {
        const size_t n = mode == 1 ? R[0] : R[0];
        Side fwd{}, swapped{};
        bool has_second = false;
        if (mode == 1) fwd = {mat[0].data(), n, mat[0].data(), n, 2, nullptr, (int64_t)n / 2, 1};
        if (mode == 2) {
            fwd = {mat[0].data(), n, mat[1].data(), R[1], nt ? 1 : 0, nt ? targets.data() : nullptr, 0, 0};
            swapped = fwd; swapped.x = mat[1].data(); swapped.rows = R[1]; swapped.y = mat[0].data(); swapped.cols = n; has_second = true;
        }
        if (mode == 3) {
            fwd = {mat[0].data(), n, mat[1].data(), n, 0, nullptr, 0, 0};
            swapped = fwd; swapped.x = mat[1].data(); swapped.y = mat[0].data(); has_second = true;
        }
        auto pair_lse = [&](const Side& s, V& lse_out, float* loss_out) {
            auto [splits, per] = queue_split(sms, s.rows, s.cols);
            V pm = nanv(splits * s.rows), pl = nanv(splits * s.rows);
            lse_out = nanv(s.rows);
            if (splits) {
                PairFn f = lse_fn[di];
                float *a = pm.data(), *b = pl.data();
                const int64_t rows = s.rows, cols = s.cols, p64 = per;
                poison_smem();
                launch(cdiv(s.rows, 64), splits, 128, [=] { f(s.x, rows, s.y, cols, p64, scale_log2, s.mask_self, s.tgt_kind, s.tgt, s.half, a, b, nullptr, nullptr, nullptr, nullptr, 0.0f, 1.0f, nullptr, nullptr, 0, 0.0f); });
                worst |= leaks("pair_lse");
            }
            const float *a = pm.data(), *b = pl.data(); float* lo = lse_out.data();
            const int64_t rows = s.rows, ss = splits;
            launch(cdiv(s.rows, 8), 1, 256, [=] { CAT3(infonce_mma_pair_combine_, DT, )(s.x, s.y, rows, dd, ss, a, b, alpha, s.tgt_kind, s.tgt, s.half, lo, loss_out); });
        };
        pair_lse(fwd, lse0, loss_each.data());
        const bool symmetric = mode == 3;
        if (symmetric) pair_lse(swapped, lse1, loss_each.data() + n);
        V dtau_acc = zeros(1);
        auto grad_pass = [&](const Side& s, const float* lr, const float* wr, const float* lc, const float* wc, float* dt, int terms) {
            V dx = zeros(s.rows * D);
            auto [splits, per] = queue_split(sms, s.rows, s.cols);
            if (splits) {
                PairFn f = grad_fn[di];
                float* o = dx.data();
                const int64_t rows = s.rows, cols = s.cols, p64 = per;
                poison_smem();
                launch(cdiv(s.rows, 64), splits, 128, [=] { f(s.x, rows, s.y, cols, p64, scale_log2, s.mask_self, s.tgt_kind, s.tgt, s.half, nullptr, nullptr, lr, wr, lc, wc, alpha, 1.0f, o, dt, terms, theta); });
                worst |= leaks("pair_grad");
            }
            // What skipping can change: a skipped tile holds no positive and every weight below θ,
            // so ‖Δdx_r‖ ≤ α Σ_(c skippable) (w_r P_rc + w_c P'_rc) ‖y_c‖ over the columns that
            // qualify (1 % margin on θ; P, P' from the kernel's LSEs). Far tighter than fast.rs's
            // pair_filter_bound, so skipping a positive's tile or a large weight fails.
            auto tgt_of = [&](int64_t a) -> int64_t {
                if (s.tgt_kind == 1) return s.tgt[a];
                if (s.tgt_kind == 2) { const int64_t t = a + s.half; return t >= 2 * s.half ? t - 2 * s.half : t; }
                return a;
            };
            for (size_t r = 0; r < s.rows; ++r) {
                double b = 0;
                for (size_t c = 0; c < s.cols; ++c) {
                    if (s.mask_self && c == r) continue;
                    if ((wr && (int64_t)c == tgt_of(r)) || (wc && (int64_t)r == tgt_of(c))) continue;
                    double dot = 0, y2 = 0;
                    for (size_t d = 0; d < D; ++d) { double y = to_f32(s.y[c * D + d]); dot += (double)to_f32(s.x[r * D + d]) * y; y2 += y * y; }
                    const double pr = wr ? std::exp(alpha * dot - lr[r]) : 0.0, pc = wc ? std::exp(alpha * dot - lc[c]) : 0.0;
                    if (pr >= theta * 1.01 || pc >= theta * 1.01) continue;
                    b += ((wr ? wr[r] * pr : 0.0) + (wc ? wc[c] * pc : 0.0)) * std::sqrt(y2);
                }
                grad_bound.push_back(alpha * b);
            }
            grads.push_back(dx);
        };
        float* dt = learn ? dtau_acc.data() : nullptr;
        const float* wp = w.data();
        if (mode == 1) grad_pass(fwd, lse0.data(), wp, lse0.data(), wp, dt, learn ? 1 : 0);
        if (mode == 2) { grad_pass(fwd, lse0.data(), wp, nullptr, nullptr, dt, learn ? 2 : 0); grad_pass(swapped, nullptr, nullptr, lse0.data(), wp, nullptr, 0); }
        if (mode == 3) { grad_pass(fwd, lse0.data(), wp, lse1.data(), wp + n, dt, learn ? 2 : 0); grad_pass(swapped, lse1.data(), wp + n, lse0.data(), wp, nullptr, 0); }
        if (learn) dtau_sum = -(double)alpha * alpha * dtau_acc[0];
        (void)has_second;
    }

    // Reduction (fast.rs sum_scaled with Upstream::One's weight).
    V loss;
    if (red == 2) loss = loss_each;
    else { double f = red == 0 ? 1.0 / count : (mode == 3 ? 0.5 : 1.0), s = 0; for (size_t i = 0; i < count; ++i) s += loss_each[i]; loss = {(float)(s * f)}; }
    auto check = [&](const char* what, const V& g, const std::vector<double>& e, double t) {
        // A reference that is exactly zero (one candidate: P = 1) is met with an absolute floor.
        const double n = (double)e.size();
        double r = rel(g, e, strcmp(what, "loss") == 0 ? std::sqrt(n) : (n == 1 ? 1e-3 : 1e-4 * std::sqrt(n)));
        printf("  %-6s rel %.2e\n", what, r);
        if (!(r <= t)) { printf("FAIL %s %s: rel %.3e (tol %.1e) got %g want %g\n", argv[1], what, r, t, e.empty() ? 0.0 : g[0], e.empty() ? 0.0 : e[0]); worst = 1; }
    };
    check("loss", loss, e_loss, tol);
    check("lse", lse0, e_lse, tol);
    if (hc) check("lsecol", lse1, e_cols, tol);
    if ((int)grads.size() != ng) { printf("FAIL %s: %zu grads, want %d\n", argv[1], grads.size(), ng); worst = 1; }
    size_t row0 = 0;
    for (int g = 0; g < std::min<int>(ng, grads.size()); ++g) {
        char nm[16]; snprintf(nm, 16, "grad%d", g);
        if (theta == 0.0f) check(nm, grads[g], e_g[g], tol);
        else {
            // Filtering: every row within its bound (plus the unfiltered tolerance).
            for (size_t r = 0; r < gr[g]; ++r) {
                double d2 = 0, e2 = 0;
                for (size_t c = 0; c < D; ++c) { double x = grads[g][r * D + c] - e_g[g][r * D + c]; d2 += x * x; e2 += e_g[g][r * D + c] * e_g[g][r * D + c]; }
                if (!(std::sqrt(d2) <= grad_bound[row0 + r] + tol * std::max(std::sqrt(e2), 1e-4 * std::sqrt((double)D)))) { printf("FAIL %s %s row %zu: |delta| %.3e > bound %.3e\n", argv[1], nm, r, std::sqrt(d2), grad_bound[row0 + r]); worst = 1; break; }
            }
            row0 += gr[g];
            printf("  %-6s within the filter bound (rel %.2e)\n", nm, rel(grads[g], e_g[g], 1e-4 * std::sqrt((double)e_g[g].size())));
        }
    }
    if (learn) check("dtau", V{(float)dtau_sum}, {e_dtau}, tol);
    if (!worst) printf("ok %s\n", argv[1]);
    return worst;
}
