"""`python -m spt_compile autotune {export FILE, import FILE, show, pretune MODEL, clear}`: the tuning cache."""
from __future__ import annotations

import argparse
import json
import sys

HELP = "export, import, show or pretune the kernel autotune cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("The autotune cache: one JSON file under the user's cache dir (SPT_CACHE_DIR overrides it; "
                          "SPT_AUTOTUNE=0 turns timing off). Entries from another device, kernel source or "
                          "torch / triton version are never applied.")
    sub = parser.add_subparsers(dest="autotune_command", metavar="{export,import,show,pretune,clear}")
    sub.required = True

    def command(name: str, text: str):
        return sub.add_parser(name, help=text, description=text)

    command("export", "write every cached entry to FILE").add_argument("file", metavar="FILE",
                                                                        help="JSON file to write")
    p = command("import", "merge the entries of FILE into the cache (prints a summary)")
    p.add_argument("file", metavar="FILE", help="a file written by `autotune export`")
    p.add_argument("--overwrite", action="store_true",
                   help="on a conflict (same kernel, device and key, another config) take the imported entry "
                        "(default: keep the local one)")
    command("show", "table of the cached entries: device, kernel, key, config, measured time")
    command("clear", "delete every cached entry")
    p = command("pretune", "compile MODEL with backend='spt' and tune every kernel one training step uses")
    p.add_argument("model", metavar="MODEL", help="a zoo architecture name (see `python -m spt_compile inspect "
                                                  "--help`)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch", type=int, default=2, help="sequences per batch (default 2)")
    p.add_argument("--attn-implementation", choices=("eager", "sdpa"), default="sdpa",
                   help="transformers attention implementation (default sdpa)")
    p.add_argument("--options", default="{}", help='JSON dict of backend options, e.g. \'{"ffn_density": 0.25}\'')
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model dtype: entries are per dtype, so use the training job's (default float32)")


def run(args) -> int:
    from spt_compile import autotune as at
    cmd = args.autotune_command
    try:
        if cmd == "export":
            n = at.export(args.file)
            print(f"exported {n} entries from {at.cache_path()} to {args.file}")
        elif cmd == "import":
            print(at.import_(args.file, overwrite=args.overwrite))
        elif cmd == "show":
            print(at.show())
        elif cmd == "clear":
            print(f"removed {at.clear()} entries from {at.cache_path()}")
        elif cmd == "pretune":
            options = json.loads(args.options)
            if not isinstance(options, dict):
                raise ValueError(f"--options must be a JSON object, got {args.options!r}")
            print(at.pretune(args.model, layers=args.layers, hidden=args.hidden, seq=args.seq, batch=args.batch,
                             attn_implementation=args.attn_implementation, options=options, device=args.device,
                             dtype=args.dtype))
        else:  # argparse only lets the choices through
            raise ValueError(f"unknown autotune command {cmd!r}")
    except (OSError, ValueError) as e:
        print(f"spt autotune {cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spt_compile autotune")
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
