"""PQ-sparse attention (torch.ops.spt.pq_sparse_attention) vs scaled_dot_product_attention and eager
matmul-softmax attention: forward+backward time, peak memory, and bytes saved for backward.

Shapes: B=1, H=4 (time) / H=2 (saved bytes), D=64, N in {512, 1024, 2048, 4096}, densities {0.1, 0.25},
non-causal, default PQ (M=8, C=16, 3 Lloyd iterations; its cost is included). fp32 on CPU (the op runs the
plain-PyTorch reference), bf16 on CUDA (the op runs the Triton kernels). Times are ratios to SDPA measured
in the same process.

    python bench/attention.py [--ns 512 1024 2048 4096] [--densities 0.1 0.25] [--reps 3] [--quick]
Writes bench/results/attention-<machine>.md and bench/results/attention-memory-<machine>.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import (fmt_bytes, machine_name, markdown_table, peak_memory, saved_tensor_bytes,  # noqa: E402
                           time_fn, write_result)

import spt_compile.lowering  # noqa: E402,F401  registers torch.ops.spt.pq_sparse_attention
from spt_compile.lowering.reference.pq_attention import num_kept  # noqa: E402

OP = torch.ops.spt.pq_sparse_attention.default


def eager_attention(q, k, v):
    """The matmul-softmax attention models write by hand (what the compiler rewrites)."""
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, N, N]
    return s.softmax(-1) @ v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def spt(density):
    def f(q, k, v):
        return OP(q, k, v, None, False, 1.0 / math.sqrt(q.shape[-1]), density, 8, 16, 3, 0.0, None)[0]
    return f


def make_inputs(b, h, n, d, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3)]


def saved_bytes(impl, n, d=64, b=1, h=2, device="cpu", dtype=torch.float32):
    """Bytes saved for backward by one forward call of impl, beyond the inputs q, k, v (which every
    implementation keeps and the caller owns anyway)."""
    q, k, v = make_inputs(b, h, n, d, device, dtype)
    return saved_tensor_bytes(lambda: impl(q, k, v), exclude=(q, k, v))


def memory_rows(ns, density=0.25, d=64, b=1, h=2, device="cpu", dtype=torch.float32):
    """Rows of the saved-for-backward table: N, L, op bytes (beyond inputs), op bytes / (B*H*N*L), eager, SDPA."""
    rows = []
    for n in ns:
        L = num_kept(n, density)
        op_extra = saved_bytes(spt(density), n, d, b, h, device, dtype)
        eager_extra = saved_bytes(eager_attention, n, d, b, h, device, dtype)
        sdpa_extra = saved_bytes(sdpa, n, d, b, h, device, dtype)
        rows.append(dict(N=n, L=L, op=op_extra, op_per_NL=op_extra / (b * h * n * L), eager=eager_extra,
                         sdpa=sdpa_extra))
    return rows


def time_rows(ns, densities, d=64, b=1, h=4, device="cpu", dtype=torch.float32, reps=3):
    rows = []
    for n in ns:
        q, k, v = make_inputs(b, h, n, d, device, dtype)
        dout = torch.randn_like(q)

        def step(impl):
            def run():
                out = impl(q, k, v)
                torch.autograd.grad(out, (q, k, v), dout)
            return run

        t_sdpa = time_fn(step(sdpa), warmup=1, reps=reps, device=device)
        t_eager = time_fn(step(eager_attention), warmup=1, reps=reps, device=device)
        m_sdpa, how = peak_memory(step(sdpa), device)
        m_eager, _ = peak_memory(step(eager_attention), device)
        for dens in densities:
            t_spt = time_fn(step(spt(dens)), warmup=1, reps=reps, device=device)
            m_spt, _ = peak_memory(step(spt(dens)), device)
            rows.append(dict(N=n, density=dens, L=num_kept(n, dens), t_sdpa=t_sdpa, eager=t_eager / t_sdpa,
                             spt=t_spt / t_sdpa, m_sdpa=m_sdpa, m_eager=m_eager, m_spt=m_spt, how=how))
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="N in {512, 1024}, 1 rep: a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.ns, args.reps = [512, 1024], 1
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    path_name = "Triton kernels" if cuda else "plain-PyTorch reference"

    rows = time_rows(args.ns, args.densities, device=device, dtype=dtype, reps=args.reps)
    how = rows[0]["how"]
    table = markdown_table(
        ["N", "density", "L", "SDPA fwd+bwd", "eager / SDPA", "spt / SDPA", "peak SDPA", "peak eager", "peak spt"],
        [[r["N"], r["density"], r["L"], f"{r['t_sdpa'] * 1e3:.1f} ms", f"{r['eager']:.2f}x", f"{r['spt']:.2f}x",
          fmt_bytes(r["m_sdpa"]), fmt_bytes(r["m_eager"]), fmt_bytes(r["m_spt"])] for r in rows])
    body = (f"PQ-sparse attention ({path_name}) vs `F.scaled_dot_product_attention` and eager matmul-softmax, "
            f"forward+backward, B=1, H=4, D=64, {str(dtype).replace('torch.', '')}, non-causal, PQ M=8 C=16 3 iters "
            f"(included). Time: median of {args.reps} after 1 warmup, as a ratio to SDPA in the same run "
            f"(>1 = slower). Peak memory: {how}, above the inputs.\n\n{table}\n")
    if not cuda:
        body += ("\nOn CPU the op runs the plain-PyTorch reference: PQ k-means, a top-L over PQ scores of every "
                 "key, and attention whose kept-slot weights are summed onto keys in [chunk, N] tiles for GEMMs, "
                 "chunked over queries. It is the semantics and a working CPU path, not a fast one: it does the "
                 "dense FLOPs plus selection, so it cannot beat SDPA's fused CPU kernel; it bounds transient memory "
                 "by the tile size (peak spt), not by N^2 (peak eager). On a shared 2-core machine the small-N "
                 "ratios are noisy.\n")
    print(body)
    print("wrote", write_result("attention", body))

    mrows = memory_rows(args.ns, device=device, dtype=dtype)
    mtable = markdown_table(
        ["N", "L", "spt saved", "spt bytes / (B·H·N·L)", "eager saved", "SDPA saved", "spt / eager"],
        [[r["N"], r["L"], fmt_bytes(r["op"]), f"{r['op_per_NL']:.2f}", fmt_bytes(r["eager"]), fmt_bytes(r["sdpa"]),
          f"{r['op'] / r['eager']:.3f}"] for r in mrows])
    mbody = (f"Bytes saved for backward (torch.autograd.graph.saved_tensors_hooks, distinct storages, not counting "
             f"the inputs q, k, v), B=1, H=2, D=64, density 0.25, {str(dtype).replace('torch.', '')}.\n"
             f"spt saves out [B,H,N,D], lse [B,H,N] fp32 and idx [B,H,N,L] int32: 4 bytes per kept slot plus "
             f"(D·{torch.finfo(dtype).bits // 8}+4) bytes per row, so bytes/(B·H·N·L) tends to 4. Eager keeps the "
             f"N×N probabilities; SDPA's fused kernel keeps only out and lse (it recomputes the scores in "
             f"backward).\n\n{mtable}\n")
    print(mbody)
    print("wrote", write_result("attention-memory", mbody))
    print("machine:", machine_name())


if __name__ == "__main__":
    main()
