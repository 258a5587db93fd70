"""`python -m spt_compile {demo, inspect, options, kernels}`."""
from __future__ import annotations

import argparse
import sys


def _inspect(argv) -> int:
    from spt_compile.inspect_models import main
    return main(argv)


def _options(argv) -> int:
    from spt_compile.options import OPTION_DOCS, SptOptions
    defaults = SptOptions().as_dict()
    for key, doc in OPTION_DOCS.items():
        print(f"{key:20s} default {defaults[key]!r:12s} {doc}")
    return 0


def _kernels(argv) -> int:
    from spt_compile.kernels import autotune, load_all
    load_all()
    for name in autotune.registered_kernels():
        print(name)
        for cfg in autotune.candidates(name):
            print(f"    {dict(cfg.meta)} num_warps={cfg.num_warps} num_stages={cfg.num_stages}")
    return 0


def _demo(argv) -> int:
    from spt_compile.demo import main
    return main(argv)


COMMANDS = {
    "demo": (_demo, "fine-tune a small LLaMA with backend='spt' vs the default backend"),
    "inspect": (_inspect, "print what backend='spt' rewrites in a small HF model (gpt2, bert, llama)"),
    "options": (_options, "list the backend options with defaults"),
    "kernels": (_kernels, "list the Triton kernels and their candidate launch configs"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m spt_compile {" + ",".join(COMMANDS) + "} [args]\n")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:10s} {doc}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    fn, _ = COMMANDS[argv[0]]
    return fn(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
