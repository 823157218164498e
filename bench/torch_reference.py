#!/usr/bin/env python3
"""The presets of spec/performance.md in PyTorch, as users write them: eager
(`F.cross_entropy(q @ k.T / tau, targets)` + backward, bf16 inputs) and the same function under
`torch.compile`. CUDA-event timing around forward + backward, 3 warm-up calls, the median of
--repeat calls. Prints JSON to stdout:

    [{"preset": ..., "torch_ms": ..., "torch_compile_ms": ..., "torch_note": ...}, ...]

(`infonce bench --torch FILE` merges `torch_ms`). A preset that does not fit (clip-xl's logit
matrix is 68.7 GB in f32) reports null with the reason. Progress goes to stderr.

    python3 bench/torch_reference.py [--preset moco|moco-xl|simclr|clip|clip-xl|all] [--repeat 20]
                                     [--no-compile]
"""
import argparse
import json
import statistics
import sys

PRESETS = {
    # name: (mode, anchors, keys, dim, tau, learnable)
    "moco": ("queue", 256, 65536, 128, 0.2, False),
    "moco-xl": ("queue", 4096, 1 << 20, 128, 0.2, False),
    "simclr": ("inbatch", 8192, 8192, 128, 0.1, False),
    "clip": ("symmetric", 32768, 32768, 768, 0.07, True),
    "clip-xl": ("symmetric", 131072, 131072, 1024, 0.07, True),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make(torch, name, device):
    mode, n, k, d, tau, learnable = PRESETS[name]
    F = torch.nn.functional
    g = torch.Generator(device=device).manual_seed(0)

    def rows(r, grad=True):
        x = F.normalize(torch.randn(r, d, device=device, generator=g), dim=1).to(torch.bfloat16)
        return x.requires_grad_(grad)

    if mode == "queue":
        q, p, m = rows(n), rows(n), rows(k, grad=False)  # MoCo detaches the queue
        targets = torch.zeros(n, dtype=torch.long, device=device)

        def step(q=q, p=p, m=m):
            pos = (q * p).sum(1, keepdim=True)
            neg = q @ m.T
            logits = torch.cat([pos, neg], dim=1).float() / tau
            return F.cross_entropy(logits, targets)

        return step, [q, p]
    if mode == "inbatch":
        e = rows(n)
        half = n // 2
        targets = (torch.arange(n, device=device) + half) % n
        mask = torch.eye(n, dtype=torch.bool, device=device)

        def step(e=e):
            logits = (e @ e.T).float() / tau
            logits = logits.masked_fill(mask, float("-inf"))
            return F.cross_entropy(logits, targets)

        return step, [e]
    a, b = rows(n), rows(k)
    log_scale = torch.tensor(1.0 / tau, device=device).log().requires_grad_(learnable)
    targets = torch.arange(n, device=device)

    def step(a=a, b=b, s=log_scale):
        logits = (a @ b.T).float() * s.exp()
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    return step, [a, b, log_scale]


def time_it(torch, fn, params, repeat):
    def once():
        for p in params:
            p.grad = None
        fn().backward()

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        once()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e))
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="all", choices=list(PRESETS) + ["all"])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    try:
        import torch
    except ImportError as e:
        print(json.dumps([{"preset": p, "torch_ms": None, "torch_compile_ms": None,
                           "torch_note": f"no torch: {e}"} for p in PRESETS]))
        return
    if not torch.cuda.is_available():
        print(json.dumps([{"preset": p, "torch_ms": None, "torch_compile_ms": None,
                           "torch_note": "no CUDA device"} for p in PRESETS]))
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    out = []
    for name in names:
        row = {"preset": name, "torch_ms": None, "torch_compile_ms": None, "torch_note": None}
        try:
            log(f"{name}: eager")
            fn, params = make(torch, name, "cuda")
            row["torch_ms"] = time_it(torch, fn, params, args.repeat)
            if not args.no_compile:
                log(f"{name}: torch.compile")
                row["torch_compile_ms"] = time_it(torch, torch.compile(fn), params, args.repeat)
        except torch.cuda.OutOfMemoryError as e:
            row["torch_note"] = f"does not fit: {str(e).splitlines()[0]}"
        except Exception as e:  # noqa: BLE001 - report, keep going
            row["torch_note"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        finally:
            torch.cuda.empty_cache()
        out.append(row)
        log(f"{name}: {row}")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
