"""Shared helpers for the bench scripts: result files; the measuring helpers live in spt_compile.measure
(the demo uses them too) and are re-exported here.

Every bench prints a markdown table and writes `bench/results/<name>-<machine>.md`. Times are reported
as ratios to a baseline measured in the same process (absolute times on shared CI machines drift).
See spt_compile/measure.py for what each memory measure means (they are not interchangeable).
"""
from __future__ import annotations

import datetime
import os
import platform

import torch

from spt_compile.measure import (  # noqa: F401  re-exported for the bench scripts
    fmt_bytes, machine_name, machine_slug, markdown_table, peak_memory, saved_tensor_bytes, synchronize, time_fn,
)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_result(name: str, body: str, slug: str | None = None) -> str:
    """Write `bench/results/<name>-<machine>.md` with a header naming the machine and versions;
    returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}-{slug or machine_slug()}.md")
    header = (f"# {name}\n\n"
              f"- machine: {machine_name()}\n"
              f"- torch {torch.__version__}, python {platform.python_version()}\n"
              f"- date: {datetime.date.today().isoformat()}\n\n")
    with open(path, "w") as f:
        f.write(header + body.rstrip() + "\n")
    return path
