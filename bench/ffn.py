"""Routed FFN vs dense FFN: forward+backward time at densities {0.25, 0.5, 1.0}.

Shapes: GPT-2-small (768→3072, gelu_tanh), GPT-2-medium (1024→4096, gelu_tanh), LLaMA-style SwiGLU
(2048→5632, silu, gated), 4096 tokens, E = 16 blocks, lowrank router (rank 32, its cost included).
Dense baseline: the plain eager Linear→act→Linear (SwiGLU: silu(gate)·up→down) forward + backward through
autograd, in the same process; also the same function torch.compile'd with the default (inductor) backend
unless --no-compile. All variants are timed round-robin (shared machines drift), median of --reps steps;
the 1-minute load average is written next to the table. fp32 on CPU, bf16 on CUDA. TFLOP/s counts the FLOPs
of the active blocks (density × dense GEMM FLOPs, forward + backward = 3 × forward); the router's small GEMMs
are not counted.

    python bench/ffn.py [--tokens 4096] [--reps 5] [--no-compile] [--quick]
Writes bench/results/ffn-<machine>.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import machine_name, markdown_table, time_fn, write_result  # noqa: E402

import spt_compile.lowering  # noqa: E402,F401  registers torch.ops.spt.routed_ffn
from spt_compile.lowering.neuron_blocks import compute_block_perm  # noqa: E402

SHAPES = (  # name, d, H, activation, gated
    ("GPT-2-small", 768, 3072, "gelu_tanh", False),
    ("GPT-2-medium", 1024, 4096, "gelu_tanh", False),
    ("LLaMA-style SwiGLU", 2048, 5632, "silu", True),
)
DENSITIES = (0.25, 0.5, 1.0)
E = 16


def make_params(d, H, gated, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def p(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    w1 = p(H, d, scale=d ** -0.5)
    b1 = None if gated else p(H, scale=0.02)
    w_up = p(H, d, scale=d ** -0.5) if gated else None
    w2 = p(d, H, scale=H ** -0.5)
    b2 = None if gated else p(d, scale=0.02)
    return w1, b1, w_up, w2, b2


def dense_ffn(x, w1, b1, w_up, w2, b2, activation):
    act = {"gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
           "silu": torch.nn.functional.silu}[activation]
    h = act(torch.nn.functional.linear(x, w1, b1))
    if w_up is not None:
        h = h * torch.nn.functional.linear(x, w_up)
    return torch.nn.functional.linear(h, w2, b2)


def step(fn, x, dy, params):
    """One forward + backward; grads of x and every parameter, as in fine-tuning."""
    for t in (x, *params):
        t.grad = None
    fn().backward(dy)


def interleaved_medians(fns: dict, reps: int, device) -> dict:
    """Median seconds per variant, timing the variants round-robin (one call of each per round, after one
    untimed warm-up call each): on a shared machine the load drifts over minutes, and interleaving makes
    every variant see the same drift, so the ratios stay meaningful even when absolute times do not."""
    for fn in fns.values():
        time_fn(fn, warmup=0, reps=1, device=device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, warmup=0, reps=1, device=device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_shape(name, d, H, activation, gated, tokens, reps, use_compile, device, dtype, loads):
    w1, b1, w_up, w2, b2 = make_params(d, H, gated, device, dtype)
    params = [t for t in (w1, b1, w_up, w2, b2) if t is not None]
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype)
    n_mats = 3 if gated else 2
    dense_flops = 3 * 2 * tokens * d * H * n_mats  # forward + backward (dX and dW) GEMMs

    fns = {"dense (eager)": lambda: step(lambda: dense_ffn(x, w1, b1, w_up, w2, b2, activation), x, dy, params)}
    compile_s = None
    if use_compile:
        cfn = torch.compile(dense_ffn)
        t0 = time.perf_counter()
        step(lambda: cfn(x, w1, b1, w_up, w2, b2, activation), x, dy, params)  # compiles fwd + bwd
        compile_s = time.perf_counter() - t0
        fns["dense (torch.compile)"] = lambda: step(lambda: cfn(x, w1, b1, w_up, w2, b2, activation), x, dy,
                                                    params)
    perm = compute_block_perm(w1, E).to(device)
    ks = {}
    for density in DENSITIES:
        k = max(1, round(density * E))
        ks[f"routed k={k}/{E}"] = k

        def routed(k=k):
            y, *_ = torch.ops.spt.routed_ffn(x, w1, b1, w_up, None, w2, b2, perm, activation, E, k,
                                                  "lowrank", 32, 200, hash(name) % 10_000)
            return y

        fns[f"routed k={k}/{E}"] = lambda routed=routed: step(routed, x, dy, params)
    load0 = os.getloadavg()[0]
    med = interleaved_medians(fns, reps, device)
    loads.append((name, load0, os.getloadavg()[0]))
    t_dense = med["dense (eager)"]
    rows = []
    for variant, t in med.items():
        k = ks.get(variant, E)
        active = dense_flops * k / E
        rows.append([name, variant, f"{k / E:.2f}", f"{t * 1e3:.0f}", f"{t_dense / t:.2f}x",
                     f"{active / t / 1e12:.3f}"])
        print(" | ".join(rows[-1]), flush=True)
    if compile_s is not None:
        print(f"{name}: torch.compile of the dense FFN (fwd+bwd) took {compile_s:.0f} s", flush=True)
    return rows, compile_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd dense baseline")
    ap.add_argument("--quick", action="store_true", help="GPT-2-small only (a smoke run)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows, loads, compiles = [], [], []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        r, c = bench_shape(*shape, args.tokens, args.reps, not args.no_compile, device, dtype, loads)
        rows += r
        if c is not None:
            compiles.append(f"{shape[0]} {c:.0f} s")
    headers = ["shape", "variant", "density", "fwd+bwd ms", "speedup vs dense eager", "TFLOP/s (active)"]
    table = markdown_table(headers, rows)
    print(table)
    load_txt = "; ".join(f"{n}: {a:.1f} -> {b:.1f}" for n, a, b in loads)
    print("load average (1 min) at start -> end of each shape:", load_txt)
    if not args.no_write:
        body = (f"Machine: {machine_name()}; {args.tokens} tokens, {dtype}, E={E}, lowrank router (rank 32, its "
                f"cost included), median of {args.reps} forward+backward steps per variant, variants timed "
                "round-robin after one warm-up step each.\n"
                "Dense baseline: plain eager `Linear -> act -> Linear` (SwiGLU: `silu(gate) * up -> down`) "
                "forward + backward with autograd; `dense (torch.compile)` is the same function compiled with "
                "the default (inductor) backend"
                + (f" (compile time: {', '.join(compiles)})" if compiles else "") + ".\n"
                "TFLOP/s counts the GEMM FLOPs of the active blocks (density x dense FLOPs, forward + backward "
                "= 3x forward); the router's small GEMMs are not counted.\n"
                f"Load average (1 min, shared machine) at start -> end of each shape: {load_txt}.\n"
                "Targets on CPU: >= 2x faster than dense at density 0.25, <= 1.05x slower at density 1.0.\n\n"
                + table + "\n")
        print("wrote", write_result("ffn", body))


if __name__ == "__main__":
    main()
