#include "emu.h"
#include "case.h"
#include "shim/infonce.cuh"
#ifndef DT
#define DT f32
#define TT float
#endif
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
extern "C" void CAT(infonce_rows, DT)(const InfonceParams p);
extern "C" void CAT(infonce_merge, DT)(const InfonceParams p);
extern "C" void CAT(infonce_cols, DT)(const InfonceParams p);
extern "C" void CAT(infonce_finish, DT)(const TT* x, const float* inv_norm, const float* g, float* out_f32, TT* out_t, int64_t rows, int dim, int64_t x_start, int64_t x_cap);
extern "C" void CAT(normalize_fwd, DT)(const TT* x, TT* u, float* inv_norm, int64_t rows, int cols);
typedef std::vector<TT> VT;
static VT toT(const std::vector<float>& v) { VT o(v.size()); for (size_t i = 0; i < v.size(); ++i) o[i] = from_f32<TT>(v[i]); return o; }
static std::vector<float> fromT(const VT& v) { std::vector<float> o(v.size()); for (size_t i = 0; i < v.size(); ++i) o[i] = to_f32(v[i]); return o; }
static void round_as(std::vector<float>& v, const char* r) { if (!r) return; for (auto& x : v) x = !strcmp(r, "f16") ? to_f32(from_f32<f16>(x)) : to_f32(from_f32<bf16>(x)); }

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <memory>

extern "C" void infonce_rows_f32(const InfonceParams p);
extern "C" void infonce_merge_f32(const InfonceParams p);
extern "C" void infonce_cols_f32(const InfonceParams p);
extern "C" void infonce_finish_f32(const float* x, const float* inv_norm, const float* g, float* out_f32, float* out_t, int64_t rows, int dim, int64_t x_start, int64_t x_cap);
extern "C" void infonce_reduce_f32(const float* x, int64_t n, float factor, float* out);
extern "C" void select_kth_f32(const float* anchors, const float* keys, const int64_t* targets, int64_t n_anchors, int64_t capacity, int64_t start, int64_t len, int cols, int skip_mode, int normalize, int64_t k, float* threshold);
extern "C" void normalize_fwd_f32(const float* x, float* u, float* inv_norm, int64_t rows, int cols);

typedef std::vector<float> V;
static V nanv(size_t n) { return V(std::max<size_t>(n, 1), NAN); }
static V zeros(size_t n) { return V(std::max<size_t>(n, 1), 0.0f); }

struct Plan { unsigned tiles, chunks; size_t chunk_len; };
static size_t cdiv(size_t a, size_t b) { return (a + b - 1) / b; }
static Plan plan_rows(size_t n, size_t k, size_t sms) {
    size_t tiles = std::max<size_t>(cdiv(n, 16), 1);
    size_t target = sms * 4;
    size_t want = std::max<size_t>(cdiv(target, tiles), 1);
    size_t by_keys = std::max<size_t>(cdiv(k, 512), 1);
    size_t chunks = std::min(std::min(want, by_keys), (size_t)65535);
    size_t chunk_len = std::max<size_t>(cdiv(cdiv(k, chunks), 32), 1) * 32;
    chunks = std::max<size_t>(cdiv(k, chunk_len), 1);
    return {(unsigned)tiles, (unsigned)chunks, chunk_len};
}

static double rel(const V& g, const std::vector<double>& w, size_t n, double floor = 1e-6) {
    if (g.size() < n || w.size() < n) return INFINITY;
    double num = 0, den = 0;
    for (size_t i = 0; i < n; ++i) { if (!std::isfinite(g[i])) return INFINITY; num += (g[i]-w[i])*(g[i]-w[i]); den += w[i]*w[i]; }
    return std::sqrt(num) / std::max(std::sqrt(den), floor);
}

int main(int argc, char** argv) {
    size_t sms = argc > 2 ? atoi(argv[2]) : 132;
    const EmuCase ec = read_case(argv[1]);
    const int mode = ec.mode, var = ec.var, hl = ec.hl, tk = ec.tk, learn = ec.learn, red = ec.red, norm = ec.norm, gq = ec.gq;
    const double lam = ec.lam, tau = ec.tau, tmin = ec.tmin, tmax = ec.tmax;
    const int nm = (int)ec.mats.size(); std::vector<V> raw = ec.mats; std::vector<size_t> R = ec.rows; const size_t D = ec.D;
    for (auto& m : raw) round_as(m, getenv("EMU_ROUND"));
    std::vector<int64_t> targets = ec.targets; const int nt = (int)targets.size();
    const std::vector<double>& w64 = ec.w;
    const std::vector<double>&e_loss = ec.loss, &e_lse = ec.lse, &e_cols = ec.lse_cols;
    const int hc = ec.has_cols, ng = (int)ec.grads.size(), hd = ec.has_dtau;
    const std::vector<std::vector<double>>& e_g = ec.grads;
    const double e_dtau = ec.dtau; (void)hd;

    int64_t hard_k = 0;
    { const std::string& rest = ec.rest;
      size_t q = rest.find("Hard { k: "); if (q != std::string::npos) hard_k = atol(rest.c_str() + q + 10);
      q = rest.find("hard_k: Some("); if (q != std::string::npos) hard_k = atol(rest.c_str() + q + 13); }
    std::vector<V> thr;
    if (!getenv("EMU_SELECT")) {
        std::string tp = std::string(argv[1]); tp = tp.substr(0, tp.size() - 4) + ".thr";
        std::ifstream ti(tp);
        size_t c;
        while (ti >> c) { V t(c); for (auto& x : t) ti >> x; thr.push_back(t); }
    }
    // Queue: place the logical queue into a wrapped ring (cap = K + 5, start = cap - 2).
    size_t qstart = 0, qcap = 0, qlen = 0;
    if (mode == 0) {
        qlen = R[2]; qcap = qlen + 5; qstart = qcap - 2;
        V ring(qcap * D, 123.0f);
        for (size_t j = 0; j < qlen; ++j) for (size_t d = 0; d < D; ++d) ring[((qstart + j) % qcap) * D + d] = raw[2][j * D + d];
        raw[2] = ring; R[2] = qcap;
    }
    InfonceParams base{};
    base.temp_kind = tk; base.tau = tk == 0 ? (float)tau : (float)tmin; base.inv_tau = (float)(1.0 / (tk == 0 ? tau : tmin));
    base.tau_min = (float)tmin; base.tau_max = (float)tmax; base.variant = var; base.has_lambda = hl; base.lambda = (float)lam;
    size_t count = w64.size();
    V w(count); for (size_t i = 0; i < count; ++i) w[i] = (float)w64[i];
    // normalise
    std::vector<V> used = raw, inv(nm);
    std::vector<VT> rawT(nm), usedT(nm);
    for (int m = 0; m < nm; ++m) rawT[m] = toT(raw[m]);
    usedT = rawT;
    for (int m = 0; m < nm; ++m) used[m] = fromT(usedT[m]);
    for (int m = 0; m < nm; ++m) if (norm && R[m] > 0) {
        inv[m] = nanv(R[m]); usedT[m] = toT(nanv(R[m] * D));
        const TT* x = rawT[m].data(); TT* u = usedT[m].data(); float* iv = inv[m].data(); int64_t rows = R[m]; int cols = D;
        launch(cdiv(R[m], 8), 1, 256, [=] { CAT(normalize_fwd, DT)(x, u, iv, rows, cols); });
        used[m] = fromT(usedT[m]); round_as(used[m], getenv("EMU_ROUND")); usedT[m] = toT(used[m]);
    }
    if (getenv("EMU_SELECT") && hard_k > 0) {
        auto sel = [&](int a, int b, const int64_t* tg, int64_t na, int64_t cap, int64_t st, int64_t len, int skip) {
            V t = nanv(na); const float* A = used[a].data(); const float* B = used[b].data(); float* o = t.data(); int dd = D; int64_t kk = hard_k;
            launch(na, 1, 256, [=] { select_kth_f32(A, B, tg, na, cap, st, len, dd, skip, 0, kk, o); });
            thr.push_back(t);
        };
        if (mode == 0) sel(0, 2, nullptr, R[0], R[2], qstart, qlen, 0);
        if (mode == 1) sel(0, 0, nullptr, R[0], R[0], 0, R[0], 2);
        if (mode == 2) sel(0, 1, nt ? targets.data() : nullptr, R[0], R[1], 0, R[1], 1);
        if (mode == 3) { sel(0, 1, nullptr, R[0], R[1], 0, R[1], 1); sel(1, 0, nullptr, R[1], R[0], 0, R[0], 1); }
    }
    std::vector<V> grads(nm);
    for (int m = 0; m < nm; ++m) grads[m] = zeros((mode == 0 && m == 2 ? qlen : R[m]) * D);
    size_t n = mode == 0 ? R[0] : (mode == 1 ? R[0] : R[0]);
    V losses = nanv(count), dtau = learn ? zeros(count) : V();
    std::vector<V> lse(mode == 3 ? 2 : 1, nanv(n));
    struct Prob { int x, y; size_t nk, ys, yc; int pos_kind, self_skip; size_t off; int gx, gy, gp; };
    std::vector<Prob> probs;
    if (mode == 0) probs.push_back({0, 2, qlen, qstart, qcap, 0, 0, 0, 0, gq ? 2 : -1, 1});
    if (mode == 1) probs.push_back({0, 0, n, 0, n, 1, 1, 0, 0, 0, -1});
    if (mode == 2) probs.push_back({0, 1, R[1], 0, R[1], 2, 0, 0, 0, 1, -1});
    if (mode == 3) { probs.push_back({0, 1, n, 0, n, 2, 0, 0, 0, 1, -1}); probs.push_back({1, 0, n, 0, n, 2, 0, n, 1, 0, -1}); }
    for (size_t k = 0; k < probs.size(); ++k) {
        Prob& pr = probs[k];
        Plan pl = plan_rows(n, pr.nk, sms);
        size_t parts = pl.chunks * n;
        V pm = nanv(parts), ps = nanv(parts), pz = nanv(parts), pa = nanv(parts * D), dpos = nanv(n), scale = nanv(n);
        InfonceParams p = base;
        p.x = usedT[pr.x].data(); p.y = usedT[pr.y].data(); p.pos = mode == 0 ? usedT[1].data() : nullptr;
        p.targets = (mode == 2 && nt) ? targets.data() : nullptr; p.s_threshold = k < thr.size() ? thr[k].data() : nullptr;
        p.weights = w.data() + pr.off; p.part_max = pm.data(); p.part_sum = ps.data(); p.part_pz = pz.data(); p.part_acc = pa.data();
        p.loss = losses.data() + pr.off; p.lse = var == 2 ? nullptr : lse[k].data(); p.dtau = learn ? dtau.data() + pr.off : nullptr;
        p.dpos = dpos.data(); p.scale = scale.data();
        p.grad_x = grads[pr.gx].data(); p.grad_y = pr.gy >= 0 ? grads[pr.gy].data() : nullptr; p.grad_pos = pr.gp >= 0 ? grads[pr.gp].data() : nullptr;
        p.n_anchors = n; p.n_keys = pr.nk; p.y_start = pr.ys; p.y_cap = pr.yc; p.chunk_len = pl.chunk_len; p.dim = D; p.n_chunks = pl.chunks;
        p.pos_kind = pr.pos_kind; p.self_skip = pr.self_skip;
        launch(pl.tiles, pl.chunks, 128, [=] { CAT(infonce_rows, DT)(p); });
        launch(cdiv(n, 4), 1, 128, [=] { CAT(infonce_merge, DT)(p); });
        if (pr.gy >= 0 && pr.nk > 0) launch(cdiv(pr.nk, 32), 1, 128, [=] { CAT(infonce_cols, DT)(p); });
    }
    V loss;
    if (red == 2) loss = losses; else {
        double f = red == 0 ? 1.0 / count : (mode == 3 ? 0.5 : 1.0);
        loss = nanv(1); float* o = loss.data(); const float* x = losses.data(); float ff = f; int64_t c = count;
        launch(1, 1, 256, [=] { infonce_reduce_f32(x, c, ff, o); });
    }
    V gt; if (learn) { gt = nanv(1); float* o = gt.data(); const float* x = dtau.data(); int64_t c = count; launch(1, 1, 256, [=] { infonce_reduce_f32(x, c, 1.0f, o); }); }
    int worst = 0; double tol = getenv("EMU_TOL") ? atof(getenv("EMU_TOL")) : 1e-5;
    FILE* dump = getenv("EMU_DUMP") ? fopen(getenv("EMU_DUMP"), "w") : nullptr;
    if (dump) { fprintf(dump, "loss"); for (float x : loss) fprintf(dump, " %.9g", x); fprintf(dump, "\nlse"); for (float x : lse[0]) fprintf(dump, " %.9g", x); if (lse.size() > 1) for (float x : lse[1]) fprintf(dump, " %.9g", x); fprintf(dump, "\n"); if (learn) fprintf(dump, "dtau %.9g\n", gt[0]); }
    auto check = [&](const char* what, const V& g, const std::vector<double>& e) {
        double r = rel(g, e, e.size(), strcmp(what, "loss") == 0 ? std::sqrt((double)e.size()) : 1e-6);
        if (!(r <= tol)) { printf("FAIL %s %s: rel %.3e got %g want %g\n", argv[1], what, r, e.empty() ? 0.0 : g[0], e.empty() ? 0.0 : e[0]); worst = 1; }
    };
    check("loss", loss, e_loss);
    if (var != 2) { check("lse", lse[0], e_lse); if (hc) check("lse_cols", lse[1], e_cols); }
    int gi = 0;
    for (int m = 0; m < nm; ++m) {
        if (mode == 0 && m == 2 && !gq) continue;
        size_t rows = mode == 0 && m == 2 ? qlen : R[m];
        V out = nanv(rows * D);
        if (rows > 0) {
            const TT* x = rawT[m].data(); const float* iv = norm ? inv[m].data() : nullptr; const float* g = grads[m].data(); float* o = out.data();
            VT outT(rows * D); TT* ot = outT.data();
            int64_t st = (mode == 0 && m == 2) ? qstart : 0, cap = std::max<size_t>(R[m], 1); int dd = D; int64_t rr = rows;
            launch(cdiv(rows, 8), 1, 256, [=] { CAT(infonce_finish, DT)(x, iv, g, o, ot, rr, dd, st, cap); });
            for (size_t e = 0; e < rows * D; ++e) if (__float_as_uint(to_f32(outT[e])) != __float_as_uint(to_f32(from_f32<TT>(out[e])))) { printf("FAIL %s out_t[%zu] %g vs out_f32 %g\n", argv[1], e, to_f32(outT[e]), out[e]); worst = 1; break; }
        }
        if (dump) { fprintf(dump, "grad%d", m); for (size_t e = 0; e < rows * D; ++e) fprintf(dump, " %.9g", out[e]); fprintf(dump, "\n"); }
        char nmv[32]; snprintf(nmv, 32, "grad%d", m);
        if (gi < ng) check(nmv, out, e_g[gi]);
        ++gi;
    }
    if (gi != ng) { printf("FAIL %s: %d grads, want %d\n", argv[1], gi, ng); worst = 1; }
    if (learn) { V g1 = gt; check("dtau", g1, {e_dtau}); }
    if (dump) fclose(dump);
    if (!worst) printf("ok %s\n", argv[1]);
    return worst;
}
