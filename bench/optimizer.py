"""AdamW step time over a stack's parameters: torch's default (for-loop on CPU), foreach and fused
implementations, interleaved rounds. Why the training-step benchmarks use the fused one (spt_compile.stacks.adamw):
the optimizer's cost is the same under every backend, so a slow one only dilutes the backend ratios.

    python bench/optimizer.py [--stack gpt2-small] [--layers 2] [--reps 7]
Writes bench/results/optimizer-<machine>.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import machine_name, markdown_table, write_result  # noqa: E402
from spt_compile.stacks import STACKS, adamw, build_stack  # noqa: E402

VARIANTS = {"default": lambda ps: torch.optim.AdamW(ps, lr=1e-4), "foreach": lambda ps: torch.optim.AdamW(
    ps, lr=1e-4, foreach=True), "fused (stacks.adamw)": lambda ps: adamw(ps, 1e-4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", choices=tuple(STACKS), default="gpt2-small")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    stack = build_stack(args.stack, layers=args.layers, seq=2048)
    runs = {}
    for name, make in VARIANTS.items():  # one copy of the parameters (with gradients) per optimizer
        params = [torch.nn.Parameter(p.detach().clone()) for p in stack.model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        runs[name] = make(params)
    times = {name: [] for name in runs}
    for r in range(args.reps + 1):  # round 0 warms up (and allocates the optimizer state)
        for name, opt in runs.items():
            t0 = time.perf_counter()
            opt.step()
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [[name, f"{med[name] * 1e3:.0f} ms", f"{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f} ms",
             f"{med['default'] / med[name]:.1f}x"] for name, ts in times.items()]
    from spt_compile.demo import load_note
    n = sum(p.numel() for p in stack.model.parameters())
    body = (f"Machine: {machine_name()}, {torch.get_num_threads()} torch threads. One AdamW step over the "
            f"parameters of {stack.description} ({n / 1e6:.1f}M, fp32, random gradients); median of {args.reps} "
            f"interleaved rounds after a warm-up. {load_note() or ''}\n\n"
            f"Reproduce: `python bench/optimizer.py --stack {args.stack} --layers {args.layers} --reps {args.reps}`"
            f"\n\n{markdown_table(['AdamW', 'step', 'min-max', 'vs default'], rows)}\n")
    print(body)
    print("wrote", write_result("optimizer", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
