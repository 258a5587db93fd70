"""`python -m spt_compile options`: the options of `torch.compile(model, backend="spt", options={...})`.

Each option with its default (from SptOptions) and its meaning (from OPTION_DOCS). Unknown keys or bad values
raise ValueError naming them when compiling.
"""
from __future__ import annotations

import argparse
import json
import re

# OPTION_DOCS texts also mention the default ("(default 0.25)", '"pq" (default): ...'); the default column
# already shows it, so it is cut from the meaning to print each default once.
_DEFAULT_NOTE = re.compile(r"\s*\(default(?: [^)]*)?\)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print {key: default} as JSON instead of a table")


def rows() -> list[tuple[str, str, str]]:
    from spt_compile.options import OPTION_DOCS, SptOptions
    defaults = SptOptions().as_dict()
    missing = sorted(set(defaults) ^ set(OPTION_DOCS))
    if missing:  # a new option must be documented (and a documented one must exist)
        raise RuntimeError(f"OPTION_DOCS and SptOptions disagree on {missing}")
    return [(key, repr(defaults[key]), _DEFAULT_NOTE.sub("", OPTION_DOCS[key])) for key in defaults]


def run(args) -> int:
    if args.json:
        from spt_compile.options import SptOptions
        print(json.dumps(SptOptions().as_dict(), indent=2))
        return 0
    table = rows()
    width = max(len(k) for k, _, _ in table)
    dwidth = max(len(d) for _, d, _ in table)
    print(f"{'option':{width}s}  {'default':{dwidth}s}  meaning")
    for key, default, meaning in table:
        print(f"{key:{width}s}  {default:{dwidth}s}  {meaning}")
    return 0
