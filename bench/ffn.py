"""Routed FFN vs dense FFN: forward+backward time at densities {0.25, 0.5, 1.0}.

Shapes: GPT-2-small (768→3072, gelu_tanh), GPT-2-medium (1024→4096, gelu_tanh), LLaMA-style SwiGLU
(2048→5632, silu, gated), 4096 tokens, E = 16 blocks, lowrank router (rank 32, its cost included).
Dense baseline: plain torch Linear→act→Linear in the same process (and torch.compile'd with the default
backend unless --no-compile). fp32 on CPU, bf16 on CUDA. TFLOP/s counts the FLOPs of the active blocks
(density × dense GEMM FLOPs, forward + backward = 3 × forward); the router's small GEMMs are not counted.

    python bench/ffn.py [--tokens 4096] [--reps 3] [--no-compile] [--quick]
Writes bench/results/ffn-<machine>.md.
"""
from __future__ import annotations

import argparse
import os
import sys

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


def bench_shape(name, d, H, activation, gated, tokens, reps, use_compile, device, dtype):
    w1, b1, w_up, w2, b2 = make_params(d, H, gated, device, dtype)
    params = [t for t in (w1, b1, w_up, w2, b2) if t is not None]
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype)
    n_mats = 3 if gated else 2
    dense_flops = 3 * 2 * tokens * d * H * n_mats  # forward + backward (dX and dW) GEMMs

    t_dense = time_fn(lambda: step(lambda: dense_ffn(x, w1, b1, w_up, w2, b2, activation), x, dy, params),
                      warmup=1, reps=reps, device=device)
    rows = [[name, "dense (eager)", "1.00", f"{t_dense * 1e3:.0f}", "1.00x", f"{dense_flops / t_dense / 1e12:.3f}"]]
    if use_compile:
        cfn = torch.compile(dense_ffn)
        t_c = time_fn(lambda: step(lambda: cfn(x, w1, b1, w_up, w2, b2, activation), x, dy, params),
                      warmup=2, reps=reps, device=device)
        rows.append([name, "dense (torch.compile)", "1.00", f"{t_c * 1e3:.0f}", f"{t_dense / t_c:.2f}x",
                     f"{dense_flops / t_c / 1e12:.3f}"])
    perm = compute_block_perm(w1, E).to(device)
    for density in DENSITIES:
        k = max(1, round(density * E))

        def routed():
            y, _, _, _ = torch.ops.spt.routed_ffn(x, w1, b1, w_up, None, w2, b2, perm, activation, E, k,
                                                  "lowrank", 32, 200, hash(name) % 10_000)
            return y

        t = time_fn(lambda: step(routed, x, dy, params), warmup=1, reps=reps, device=device)
        active = dense_flops * k / E
        rows.append([name, f"routed k={k}/{E}", f"{k / E:.2f}", f"{t * 1e3:.0f}", f"{t_dense / t:.2f}x",
                     f"{active / t / 1e12:.3f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd dense baseline")
    ap.add_argument("--quick", action="store_true", help="GPT-2-small only (a smoke run)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        rows += bench_shape(*shape, args.tokens, args.reps, not args.no_compile, device, dtype)
    headers = ["shape", "variant", "density", "fwd+bwd ms", "speedup vs dense eager", "TFLOP/s (active)"]
    table = markdown_table(headers, rows)
    print(table)
    if not args.no_write:
        body = (f"Machine: {machine_name()}; {args.tokens} tokens, {dtype}, E={E}, lowrank router (rank 32), "
                f"median of {args.reps} forward+backward steps after warm-up.\n"
                "Targets on CPU: >= 2x faster than dense at density 0.25, <= 1.05x slower at density 1.0.\n\n"
                + table + "\n")
        print("wrote", write_result("ffn", body))


if __name__ == "__main__":
    main()
