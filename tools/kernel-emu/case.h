// The case files the harnesses read (written by tests/kernel_emu.rs, `case_text`): a spec line
// (mode variant has_lambda lambda temp_kind tau tau_min tau_max learnable reduction normalize
// grad_queue), the input matrices, targets, per-anchor weights, then the f64 reference's loss,
// LSE, column LSE, gradients and dτ, and a trailing comment naming the case.
#pragma once
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

struct EmuCase {
    int mode = 0, var = 0, hl = 0, tk = 0, learn = 0, red = 0, norm = 0, gq = 0;
    double lam = 0, tau = 0, tmin = 0, tmax = 0;
    std::vector<std::vector<float>> mats;  // each at least one element long
    std::vector<size_t> rows;
    size_t D = 0;
    std::vector<int64_t> targets;
    std::vector<double> w, loss, lse, lse_cols;
    bool has_cols = false;
    std::vector<std::vector<double>> grads;
    std::vector<size_t> grad_rows;
    bool has_dtau = false;
    double dtau = 0;
    std::string rest;  // the trailing comment (hard:k is read from it)
};

inline EmuCase read_case(const char* path) {
    std::ifstream in(path);
    EmuCase c;
    in >> c.mode >> c.var >> c.hl >> c.lam >> c.tk >> c.tau >> c.tmin >> c.tmax >> c.learn >> c.red >> c.norm >> c.gq;
    int nm; in >> nm;
    c.mats.resize(nm); c.rows.resize(nm);
    for (int m = 0; m < nm; ++m) {
        size_t r, k; in >> r >> k; c.rows[m] = r; c.D = k;
        c.mats[m].resize(std::max<size_t>(r * k, 1));
        for (size_t i = 0; i < r * k; ++i) in >> c.mats[m][i];
    }
    int nt; in >> nt; c.targets.resize(nt); for (auto& t : c.targets) in >> t;
    auto readv = [&](std::vector<double>& v) { size_t n; in >> n; v.resize(n); for (auto& x : v) in >> x; };
    readv(c.w); readv(c.loss); readv(c.lse);
    int hc; in >> hc; c.has_cols = hc; if (hc) readv(c.lse_cols);
    int ng; in >> ng; c.grads.resize(ng); c.grad_rows.resize(ng);
    for (int g = 0; g < ng; ++g) { size_t r, k; in >> r >> k; c.grad_rows[g] = r; readv(c.grads[g]); }
    int hd; in >> hd; c.has_dtau = hd; if (hd) in >> c.dtau;
    std::string line; while (std::getline(in, line)) c.rest += line;
    return c;
}
