"""`python -m spt_compile kernels`: the Triton kernels and the candidate launch configs the autotuner picks from.

The autotune cache (which candidate was picked for which problem) is `python -m spt_compile autotune show`.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", default=None, help="show only this kernel (default: all)")


def run(args) -> int:
    from spt_compile.kernels import autotune, load_all
    load_all()
    names = autotune.registered_kernels()
    if args.kernel is not None:
        if args.kernel not in names:
            print(f"unknown kernel {args.kernel!r}; registered: {', '.join(names)}")
            return 2
        names = [args.kernel]
    for name in names:
        print(name)
        for cfg in autotune.candidates(name):
            print(f"    {autotune.describe_config(cfg)}")
    return 0
