#!/usr/bin/env python3
"""The CPU presets of spec/performance.md in numpy (float32), as users write them: one product to
the logit matrix, a softmax cross-entropy, products for the gradients (the unfused pipeline the
fused CPU backend is compared with, cpu::bench). One warm-up call, then the median of
--repeat calls (at least 10). Prints JSON to stdout:

    [{"preset": ..., "numpy_ms": ..., "numpy_min_ms": ..., "repeat": ..., "blas": ...}, ...]

Progress and the BLAS in use (threadpoolctl, when installed) go to stderr. Install numpy with
`pip install numpy threadpoolctl` if missing.

    python3 bench/numpy_reference.py [--preset moco|simclr-cpu|clip-cpu|all] [--repeat 10]

Note: where OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set (this project's machines set them for old
OpenBLAS builds), they slow a current numpy; for a fair comparison run this with both unset in
that command alone (`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 ...`) and check the
`blas` field for the kernel that ran.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np

PRESETS = {
    # name: (mode, anchors, keys, dim, tau, learnable)
    "moco": ("queue", 256, 65536, 128, 0.2, False),
    "simclr-cpu": ("inbatch", 4096, 4096, 128, 0.1, False),
    "clip-cpu": ("symmetric", 4096, 4096, 768, 0.07, True),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def unit_rows(rng, r, d):
    x = rng.uniform(-1.0, 1.0, size=(r, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make(name):
    mode, n, k, d, tau, learnable = PRESETS[name]
    rng = np.random.default_rng(0)
    tau32 = np.float32(tau)

    if mode == "queue":
        q, p, m = unit_rows(rng, n, d), unit_rows(rng, n, d), unit_rows(rng, k, d)

        def step():
            l_pos = np.einsum("nc,nc->n", q, p)[:, None]
            l_neg = q @ m.T
            logits = np.concatenate([l_pos, l_neg], axis=1) / tau32
            mx = logits.max(axis=1, keepdims=True)
            e = np.exp(logits - mx)
            s = e.sum(axis=1, keepdims=True)
            loss = float(np.mean(mx[:, 0] + np.log(s[:, 0]) - logits[:, 0]))
            g = e / s
            g[:, 0] -= 1.0
            g *= np.float32(1.0 / (n * tau))
            dq = g[:, :1] * p + g[:, 1:] @ m
            dp = g[:, :1] * q
            return loss, dq, dp

        return step

    if mode == "inbatch":
        e_ = unit_rows(rng, n, d)
        half = n // 2
        pos = (np.arange(n) + half) % n
        rows = np.arange(n)

        def step():
            z = (e_ @ e_.T) / tau32
            np.fill_diagonal(z, -np.inf)
            mx = z.max(axis=1, keepdims=True)
            ex = np.exp(z - mx)
            s = ex.sum(axis=1, keepdims=True)
            loss = float(np.mean(mx[:, 0] + np.log(s[:, 0]) - z[rows, pos]))
            g = ex / s
            g[rows, pos] -= 1.0
            g *= np.float32(1.0 / (n * tau))
            de = g @ e_ + g.T @ e_
            return loss, de

        return step

    a, b = unit_rows(rng, n, d), unit_rows(rng, k, d)
    eye = np.arange(n)

    def step():
        z = (a @ b.T) / tau32
        mr = z.max(axis=1, keepdims=True)
        er = np.exp(z - mr)
        sr = er.sum(axis=1, keepdims=True)
        mc = z.max(axis=0, keepdims=True)
        ec = np.exp(z - mc)
        sc = ec.sum(axis=0, keepdims=True)
        diag = z[eye, eye]
        loss = 0.5 * float(np.mean(mr[:, 0] + np.log(sr[:, 0]) - diag)
                           + np.mean(mc[0] + np.log(sc[0]) - diag))
        g = er / sr + ec / sc
        g[eye, eye] -= 2.0
        g *= np.float32(0.5 / n)
        dtau = -float(np.sum(g * z)) / tau if learnable else 0.0
        g *= np.float32(1.0 / tau)
        da = g @ b
        db = g.T @ a
        return loss, da, db, dtau

    return step


def blas_info():
    try:
        from threadpoolctl import threadpool_info
        return "; ".join(
            f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
            f"threads={i.get('num_threads')}"
            for i in threadpool_info()
        )
    except Exception as e:  # noqa: BLE001 (informational only)
        return f"unknown ({e})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="all", choices=["all", *PRESETS])
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    repeat = max(10, args.repeat)
    blas = blas_info()
    log(f"numpy {np.__version__}, BLAS: {blas}")
    rows = []
    for name in PRESETS if args.preset == "all" else [args.preset]:
        step = make(name)
        step()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        med = statistics.median(times)
        log(f"{name}: numpy {med:.1f} ms (min {min(times):.1f}, max {max(times):.1f})")
        rows.append({"preset": name, "numpy_ms": med, "numpy_min_ms": min(times),
                     "repeat": repeat, "blas": blas})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
