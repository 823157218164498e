// unfused.cu's ce_rows (+ pos_dot, row_axpy, sum_scaled) with the cuBLAS GEMMs replaced by host GEMMs.
#include "emu.h"
#include "case.h"
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>
#include <algorithm>
extern "C" void unfused_ce_rows_f32(float* S, float* G_lowp, int64_t rows, int64_t cols, int64_t ld, const float* pos_s, const int64_t* targets, int pos_kind, float alpha, const float* weights, float* loss_out, float* lse_out, float* dpos_out, float* dtau_acc, float inv_tau, int write_grad);
extern "C" void unfused_pos_dot_f32(const float* x, const float* y, float* out, int64_t rows, int cols);
extern "C" void unfused_row_axpy_f32(float* out, const float* x, const float* coef, float beta, int64_t rows, int cols);
extern "C" void steps_sum_scaled(const float* x, int64_t n, float c, float* out);
typedef std::vector<float> V; typedef std::vector<double> VD;
static double rel(const V& g, const VD& w) { double a = 0, b = 0; for (size_t i = 0; i < w.size(); ++i) { if (!std::isfinite(g[i])) return INFINITY; a += (g[i]-w[i])*(g[i]-w[i]); b += w[i]*w[i]; } return std::sqrt(a) / std::max(std::sqrt(b), 1e-6); }
// S[r][c] = X_r · Y_c (f32 result of an f64 dot, as a well-rounded GEMM)
static V gemm_nt(const V& X, size_t r, const V& Y, size_t c, size_t D) { V S(std::max<size_t>(r*c,1)); for (size_t i = 0; i < r; ++i) for (size_t j = 0; j < c; ++j) { double s = 0; for (size_t d = 0; d < D; ++d) s += (double)X[i*D+d]*Y[j*D+d]; S[i*c+j] = (float)s; } return S; }
// out[r×D] += G[r×c] · Y[c×D]
static void gemm_nn(V& out, const V& G, size_t r, size_t c, const V& Y, size_t D) { for (size_t i = 0; i < r; ++i) for (size_t d = 0; d < D; ++d) { double s = 0; for (size_t j = 0; j < c; ++j) s += (double)G[i*c+j]*Y[j*D+d]; out[i*D+d] += (float)s; } }
// out[c×D] += Gᵀ[c×r] · X[r×D]
static void gemm_tn(V& out, const V& G, size_t r, size_t c, const V& X, size_t D) { for (size_t j = 0; j < c; ++j) for (size_t d = 0; d < D; ++d) { double s = 0; for (size_t i = 0; i < r; ++i) s += (double)G[i*c+j]*X[i*D+d]; out[j*D+d] += (float)s; } }
int main(int argc, char** argv) {
    const EmuCase ec = read_case(argv[1]);
    const int mode = ec.mode, var = ec.var, tk = ec.tk, learn = ec.learn, red = ec.red, norm = ec.norm, gq = ec.gq;
    const double tau = ec.tau;
    if (var != 0 || tk != 0 || norm) { printf("skip %s\n", argv[1]); return 0; }
    const std::vector<V>& M = ec.mats; const std::vector<size_t>& R = ec.rows; const size_t D = ec.D;
    const std::vector<int64_t>& tg = ec.targets; const int nt = (int)tg.size();
    const VD &w64 = ec.w, &e_loss = ec.loss, &e_lse = ec.lse, &e_cols = ec.lse_cols;
    const int hc = ec.has_cols, ng = (int)ec.grads.size();
    const std::vector<VD>& e_g = ec.grads;
    const double e_dtau = ec.dtau;
    size_t n = R[0], count = w64.size();
    V w(count); for (size_t i = 0; i < count; ++i) w[i] = (float)w64[i];
    float alpha = (float)(1.0 / tau), inv_tau = alpha;
    V losses(std::max<size_t>(count, 1), NAN), lse(std::max<size_t>(n,1), NAN), lsec(std::max<size_t>(n,1), NAN), dtau(1, 0.0f);
    std::vector<V> grads;
    auto ce = [&](V& S, size_t cols, const float* pos_s, const int64_t* t, int kind, size_t off, float* lse_p, float* dpos) {
        float* s = S.data(); float* lo = losses.data() + off; const float* ww = w.data() + off; float* dt = learn ? dtau.data() : nullptr; int64_t rr = n, cc = cols;
        launch(n, 1, 256, [=] { unfused_ce_rows_f32(s, nullptr, rr, cc, cc, pos_s, t, kind, alpha, ww, lo, lse_p, dpos, dt, inv_tau, 1); });
    };
    if (mode == 0) {
        size_t K = R[2];
        V pos_s(std::max<size_t>(n,1)), dpos(std::max<size_t>(n,1));
        { const float* q = M[0].data(); const float* p = M[1].data(); float* o = pos_s.data(); int64_t rr = n; int dd = D; launch((n + 7) / 8, 1, 256, [=] { unfused_pos_dot_f32(q, p, o, rr, dd); }); }
        V S = gemm_nt(M[0], n, M[2], K, D);
        ce(S, K, pos_s.data(), nullptr, 0, 0, lse.data(), dpos.data());
        V dq(n*D, 0.0f), dp(n*D, 0.0f), dm(std::max<size_t>(K*D,1), 0.0f);
        gemm_nn(dq, S, n, K, M[2], D);
        { float* o = dq.data(); const float* x = M[1].data(); const float* c = dpos.data(); int64_t rr = n; int dd = D; launch(4, 1, 128, [=] { unfused_row_axpy_f32(o, x, c, 1.0f, rr, dd); }); }
        { float* o = dp.data(); const float* x = M[0].data(); const float* c = dpos.data(); int64_t rr = n; int dd = D; launch(4, 1, 128, [=] { unfused_row_axpy_f32(o, x, c, 0.0f, rr, dd); }); }
        gemm_tn(dm, S, n, K, M[0], D);
        grads = {dq, dp}; if (gq) grads.push_back(dm);
    } else if (mode == 1) {
        V S = gemm_nt(M[0], n, M[0], n, D);
        ce(S, n, nullptr, nullptr, 3, 0, lse.data(), nullptr);
        V de(n*D, 0.0f); gemm_nn(de, S, n, n, M[0], D); gemm_tn(de, S, n, n, M[0], D); grads = {de};
    } else if (mode == 2) {
        size_t K = R[1];
        V S = gemm_nt(M[0], n, M[1], K, D);
        ce(S, K, nullptr, nt ? tg.data() : nullptr, nt ? 1 : 2, 0, lse.data(), nullptr);
        V da(n*D, 0.0f), db(std::max<size_t>(K*D,1), 0.0f); gemm_nn(da, S, n, K, M[1], D); gemm_tn(db, S, n, K, M[0], D); grads = {da, db};
    } else {
        V S = gemm_nt(M[0], n, M[1], n, D), St = gemm_nt(M[1], n, M[0], n, D);
        ce(S, n, nullptr, nullptr, 2, 0, lse.data(), nullptr);
        ce(St, n, nullptr, nullptr, 2, n, lsec.data(), nullptr);
        V da(n*D, 0.0f), db(n*D, 0.0f);
        gemm_nn(da, S, n, n, M[1], D); gemm_tn(da, St, n, n, M[1], D);
        gemm_nn(db, St, n, n, M[0], D); gemm_tn(db, S, n, n, M[0], D); grads = {da, db};
    }
    V loss;
    if (red == 2) loss = losses; else {
        double f = red == 0 ? 1.0 / count : (mode == 3 ? 0.5 : 1.0);   // Upstream::One weights
        loss = V(1, NAN); float* o = loss.data(); const float* x = losses.data(); float ff = f; int64_t c = count;
        launch(1, 1, 256, [=] { steps_sum_scaled(x, c, ff, o); });
    }
    int bad = 0; double tol = 2e-5;
    auto chk = [&](const char* what, const V& g, const VD& e) { double r = rel(g, e); if (!(r <= tol)) { printf("FAIL %s %s rel %.3e got %g want %g\n", argv[1], what, r, g.empty() ? 0.0 : g[0], e.empty() ? 0.0 : e[0]); bad = 1; } };
    chk("loss", loss, e_loss); chk("lse", lse, e_lse); if (hc) chk("lse_cols", lsec, e_cols);
    if ((int)grads.size() != ng) { printf("FAIL %s grads %zu want %d\n", argv[1], grads.size(), ng); bad = 1; }
    else for (int g = 0; g < ng; ++g) { char nmv[16]; snprintf(nmv, 16, "grad%d", g); chk(nmv, grads[g], e_g[g]); }
    if (learn) chk("dtau", dtau, {e_dtau});
    if (!bad) printf("ok %s\n", argv[1]);
    return bad;
}
