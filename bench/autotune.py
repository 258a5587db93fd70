"""Tuned vs default launch configs, per kernel: what the autotuner buys on this machine.

For each shape the stage is one op call, forward + backward through autograd (torch.ops.spt.pq_sparse_attention,
the routed FFN). On CPU the CPU tunables (attention chunk sizes, router chunk sizes) tune themselves on the
first call, each timing its own stage per candidate; on a GPU every Triton kernel the call launches is tuned
(`autotune.tune_stage`: the whole call timed with each fitting candidate of one kernel forced; a launcher that
passes a bench closure times its kernel alone). The table lists, per (kernel, key), the default config (the
first fitting candidate, what an untuned run uses) and the tuned one with the times of what was timed, and the
ratio default / tuned (> 1: tuning wins). A temporary cache is used, never the user's (unless --cache).

    python bench/autotune.py [--quick] [--cache]
Writes bench/results/autotune-<machine>.md (fp32 on CPU, bf16 on CUDA).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import machine_name, markdown_table, write_result  # noqa: E402

ATTENTION = {  # (B, H, N, D, density)
    "cuda": [(4, 16, 4096, 64, 0.1), (2, 16, 2048, 128, 0.25), (8, 12, 1024, 64, 0.25)],
    "cpu": [(1, 4, 1024, 64, 0.25), (1, 4, 2048, 64, 0.25)],
}
FFN = {  # (tokens, d, H, activation, gated)
    "cuda": [(8192, 768, 3072, "gelu_tanh", False), (8192, 2048, 5632, "silu", True)],
    "cpu": [(4096, 768, 3072, "gelu_tanh", False)],
}


def attention_stage(B, H, N, D, density, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, N, D, generator=g).to(device, dtype)

    def run():
        out = torch.ops.spt.pq_sparse_attention(q, k, v, None, True, D ** -0.5, density, 8, 16, 3, 0.0, None)[0]
        out.backward(dout)
    return run


def ffn_stage(T, d, H, activation, gated, device, dtype):
    from spt_compile.lowering.ffn import routed_ffn
    g = torch.Generator(device="cpu").manual_seed(0)

    def p(*shape):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(device, dtype).requires_grad_()

    x, w1, w2 = p(T, d), p(H, d), p(d, H)
    w_up = p(H, d) if gated else None
    dy = torch.randn(T, d, generator=g).to(device, dtype)

    def run():
        routed_ffn(x, w1, None, w2, None, w_up=w_up, activation=activation, num_blocks=16, density=0.25,
                   cluster=False).backward(dy)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="first shape of each op only")
    ap.add_argument("--cache", action="store_true", help="tune into the user's cache instead of a temporary one")
    args = ap.parse_args(argv)
    if not args.cache:
        os.environ["SPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="spt-bench-autotune-")
    os.environ["SPT_AUTOTUNE"] = "1"
    import spt_compile.lowering  # noqa: F401  registers the ops
    from spt_compile.kernels import autotune
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    stages = [(f"attention B={B} H={H} N={N} D={D} density={dens}", attention_stage(B, H, N, D, dens, device, dtype))
              for B, H, N, D, dens in ATTENTION[device]]
    stages += [(f"ffn T={T} {d}->{H} {act}{' gated' if gated else ''} density=0.25",
                ffn_stage(T, d, H, act, gated, device, dtype)) for T, d, H, act, gated in FFN[device]]
    if args.quick:
        stages = [stages[0], stages[len(ATTENTION[device])]]
    rows = []
    for label, run in stages:
        before = {json.dumps(e, sort_keys=True) for e in autotune.entries()}
        autotune.tune_stage(run)
        for e in autotune.entries():
            if json.dumps(e, sort_keys=True) in before or e.get("default_ms") is None:
                continue
            default = autotune.fitting(e["kernel"], tuple(e["key"]))[0]
            rows.append([label, e["kernel"], json.dumps(e["key"]), autotune.describe_config(default, e["kind"]),
                         f"{e['default_ms']:.4g} ms", autotune.describe_config(e["config"], e["kind"]),
                         f"{e['time_ms']:.4g} ms", f"{e['default_ms'] / e['time_ms']:.2f}x"])
        print(f"{label}: done", flush=True)
    table = markdown_table(["stage", "kernel", "key", "default config", "default", "tuned config", "tuned",
                            "default / tuned"], rows)
    load = f"\n\n1-minute load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    body = (f"machine: {machine_name()}; {dtype} on {device}; kernels or CPU tunables with one fitting candidate "
            f"are not listed (nothing to tune).\n\n{table}{load}\n")
    print(body)
    print("wrote", write_result("autotune", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
