"""PQ-sparse attention (torch.ops.spt.pq_sparse_attention) vs scaled_dot_product_attention and eager
matmul-softmax attention: forward+backward time, peak memory, and bytes saved for backward.

Shapes: B=1, H=4 (time) / H=2 (saved bytes), D=64, N in {512, 1024, 2048, 4096}, densities {0.1, 0.25},
non-causal, default PQ (M=8, C=16, 3 Lloyd iterations; its cost is included). fp32 on CPU (the op runs the
plain-PyTorch reference), bf16 on CUDA (the op runs the Triton kernels). Times are ratios to SDPA measured
in the same process.

    python bench/attention.py [--ns 512 1024 2048 4096] [--densities 0.1 0.25] [--reps 3] [--quick]
Writes bench/results/attention-<machine>.md and bench/results/attention-memory-<machine>.md.

On CUDA it first runs the query-tile section (issue 9; --tile-ns, --no-tiles): the tiled op (query_tile=64,
density 0.25, bf16, causal, B=1, H=8, D=64) vs SDPA's flash kernel, forward+backward, N in {4096, 8192, 16384}
({4096, 16384} with --quick), with TFLOP/s on the kept pairs; it writes bench/results/attention-tiles-gpu-<machine>.md.
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
from spt_compile.options import DEFAULT_ATTENTION_SELECT_STRIDE  # noqa: E402

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


# ----------------------------------------------------------------------------------------------------------
# GPU section: query tiles (issue 9) against SDPA's flash kernel, bf16, causal, forward+backward

def kept_pairs(idx, tile, nq, is_causal):
    """(query, key) pairs the tiled attention computes: each query with its tile's kept keys it may attend to
    (no mask here; under causality key j serves the tile's rows i >= j)."""
    t = torch.arange(idx.shape[2], device=idx.device)[:, None]                  # [nT, 1]
    lo, hi = t * tile, torch.clamp((t + 1) * tile, max=nq)
    j = idx.long()
    rows = (hi - torch.maximum(j, lo)).clamp(min=0) if is_causal else (hi - lo).expand_as(j)
    return int(torch.where(j >= 0, rows, 0).sum())


def attention_flops(pairs, d):
    """Forward + backward FLOPs of attention over `pairs` (query, key) pairs, FlashAttention's count: forward
    QK^T and PV (4 d per pair), backward 2.5x that (QK^T recomputed, dP, dV, dQ, dK)."""
    return 14 * d * pairs


STRIDE = DEFAULT_ATTENTION_SELECT_STRIDE  # the tiled op as the compiler calls it by default


def tile_gpu_rows(ns, density, tile, reps, b=1, h=8, d=64, device="cuda", dtype=torch.bfloat16, causal=True):
    """Per N: SDPA (flash on CUDA) and the tiled op (PQ + tile selection + attention, Triton kernels), forward+
    backward; the tile kernels alone (forward + backward over a fixed idx); TFLOP/s on the kept pairs."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from spt_compile.kernels.attention_tiled_bwd import tiled_attention_backward
    from spt_compile.kernels.attention_tiled_fwd import tiled_attention_forward
    backend = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if str(device).startswith("cuda") else nullcontext()
    scale = 1.0 / math.sqrt(d)
    rows = []
    for n in ns:
        q, k, v = make_inputs(b, h, n, d, device, dtype, seed=n)
        dout = torch.randn_like(q)

        def sdpa_step():
            with backend:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.autograd.grad(out, (q, k, v), dout)

        def tiled_step():
            out = OP(q, k, v, None, causal, scale, density, 8, 16, 3, 0.0, None, 0, tile, 64, STRIDE)[0]
            torch.autograd.grad(out, (q, k, v), dout)

        with torch.no_grad():
            out, idx, lse = OP(q, k, v, None, causal, scale, density, 8, 16, 3, 0.0, None, 0, tile, 64, STRIDE)
        qd, kd, vd = (t.detach() for t in (q, k, v))

        def kernels_step():  # the attention kernels alone, on the selection above
            o, m = tiled_attention_forward(qd, kd, vd, idx, None, causal, scale, tile, 0.0, None)
            tiled_attention_backward(dout, qd, kd, vd, o, m, idx, None, causal, scale, tile, 0.0, None)

        t_sdpa = time_fn(sdpa_step, warmup=1, reps=reps, device=device)
        t_spt = time_fn(tiled_step, warmup=1, reps=reps, device=device)
        t_kern = time_fn(kernels_step, warmup=1, reps=reps, device=device)
        pairs = kept_pairs(idx, tile, n, causal)
        dense_pairs = b * h * (n * (n + 1) // 2 if causal else n * n)
        rows.append(dict(N=n, L=idx.shape[3], pairs=pairs / (b * h), kept=pairs / dense_pairs, t_sdpa=t_sdpa,
                         t_spt=t_spt, t_kern=t_kern,
                         tf_sdpa=attention_flops(dense_pairs, d) / t_sdpa / 1e12,
                         tf_spt=attention_flops(pairs, d) / t_spt / 1e12,
                         tf_kern=attention_flops(pairs, d) / t_kern / 1e12))
        print(rows[-1], flush=True)
    return rows


def run_tiles_gpu(ns, density, tile, reps, device="cuda", dtype=torch.bfloat16):
    rows = tile_gpu_rows(ns, density, tile, reps, device=device, dtype=dtype)
    table = markdown_table(
        ["N", "L_max", "kept pairs / causal", "SDPA flash", "tiled op", "SDPA / tiled", "tile kernels",
         "TFLOP/s SDPA", "TFLOP/s tiled op (kept)", "TFLOP/s kernels (kept)"],
        [[r["N"], r["L"], f"{r['kept']:.3f}", f"{r['t_sdpa'] * 1e3:.2f} ms", f"{r['t_spt'] * 1e3:.2f} ms",
          f"{r['t_sdpa'] / r['t_spt']:.2f}x", f"{r['t_kern'] * 1e3:.2f} ms", f"{r['tf_sdpa']:.1f}",
          f"{r['tf_spt']:.1f}", f"{r['tf_kern']:.1f}"] for r in rows])
    body = (f"Query-tile sparse attention (torch.ops.spt.pq_sparse_attention, query_tile={tile}, density {density}, "
            f"min_keys 64, select_stride {STRIDE} (the option's default); Triton kernels: PQ M=8 C=16 3 iters, tile selection, FA2-style forward, backward with the "
            f"deterministic key -> tiles index) vs `F.scaled_dot_product_attention` (flash backend), forward+"
            f"backward, B=1, H=8, D=64, {str(dtype).replace('torch.', '')}, causal. Median of {reps} after 1 warmup "
            f"(first-fit kernel configs unless SPT_AUTOTUNE tuned them). 'tiled op' includes PQ and selection; "
            f"'tile kernels' is the attention forward+backward alone on the same key lists. TFLOP/s count "
            f"14·D FLOPs per computed (query, key) pair (FlashAttention's fwd+bwd count): all causal pairs for "
            f"SDPA, the kept pairs for the tiled path.\n\n{table}\n")
    print(body)
    print("wrote", write_result("attention-tiles-gpu", body))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="N in {512, 1024}, 1 rep: a smoke run")
    ap.add_argument("--tile-ns", type=int, nargs="+", default=[4096, 8192, 16384],
                    help="CUDA only: N of the query-tile section (bf16, causal, T=64, density 0.25)")
    ap.add_argument("--no-tiles", action="store_true", help="skip the query-tile section on CUDA")
    args = ap.parse_args(argv)
    if args.quick:
        args.ns, args.reps = [512, 1024], 1
        args.tile_ns = [4096, 16384]
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda and not args.no_tiles:  # first: the numbers issue 9 asks for, before the per-query tables
        run_tiles_gpu(args.tile_ns, 0.25, 64, max(3, args.reps))
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
