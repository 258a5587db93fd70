"""`python -m spt_compile inspect MODEL`: what backend="spt" matches, rewrites and rejects in a model, and why.

MODEL is a model-zoo name (spt_compile/zoo.py: gpt2, bert, llama, ...; built from a small config, random weights)
or `path/to/file.py:factory`, a function returning (model, example inputs); the inputs are a tuple of
positional arguments, a dict of keyword arguments, or one tensor. The factory gets those of `layers`, `hidden`,
`seq`, `batch`, `attn_implementation` that it names as parameters. Prints the table and the estimated savings;
writes the page (--html), the JSON (--json) and DOT files (--dot) on request. The model runs once (no grad)
and is not changed.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys

import torch

DEFAULTS = {"layers": 2, "hidden": 64, "seq": 128, "batch": 2, "attn_implementation": "sdpa"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from spt_compile import zoo

    parser.add_argument("model", metavar="MODEL",
                        help=f"a model-zoo name ({', '.join(zoo.names())}) or path/to/file.py:factory returning "
                             "(model, example inputs)")
    parser.add_argument("--layers", type=int, default=DEFAULTS["layers"], help="layers (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=DEFAULTS["hidden"], help="model width (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=DEFAULTS["seq"],
                        help="tokens per sequence; attention below the min_seq_len option (128) stays dense "
                             "(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="batch size (default: %(default)s)")
    parser.add_argument("--attn-implementation", choices=("eager", "sdpa"), default=DEFAULTS["attn_implementation"],
                        help="transformers attention implementation of zoo models (default: %(default)s)")
    parser.add_argument("--options", default="{}", metavar="JSON",
                        help='backend options as a JSON object, e.g. \'{"attention_density": 0.125}\'; '
                             "`python -m spt_compile options` lists them (default: %(default)s)")
    parser.add_argument("--html", metavar="FILE", default=None,
                        help="write the self-contained HTML page here (default: not written)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="write the report as JSON here, '-' for stdout (default: not written)")
    parser.add_argument("--dot", metavar="DIR", default=None,
                        help="write Graphviz DOT files (and SVG/PNG when `dot` is installed) here (default: not written)")


def run(args: argparse.Namespace) -> int:
    from spt_compile.explain import explain
    from spt_compile.inspect_logs import savings_text

    try:
        options = _options(args.options)
        model, call_args, call_kwargs = load_model(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 2
    report = explain(model, *call_args, options=options, **call_kwargs)
    if args.json != "-":
        print(report)
        print(savings_text(report))
    if args.json:
        text = json.dumps(report.to_dict(), indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            _write(args.json, text)
    if args.html:
        report.write_html(args.html)
        print(f"wrote {args.html}", file=sys.stderr)
    if args.dot:
        files = report.write_dot(args.dot)
        print(f"wrote {len(files)} file(s) under {args.dot}", file=sys.stderr)
    return 0


def _options(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--options is not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--options must be a JSON object like '{{\"ffn_density\": 0.25}}', got {text!r}")
    from spt_compile.options import SptOptions
    SptOptions.from_dict(value)  # validate now: a bad key is named before the model is built
    return value


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path}", file=sys.stderr)


def load_model(args) -> tuple[torch.nn.Module, tuple, dict]:
    """(model, positional args, keyword args) for MODEL."""
    sizes = {k: getattr(args, k) for k in DEFAULTS}
    for key in ("layers", "hidden", "seq", "batch"):
        if sizes[key] < 1:
            raise ValueError(f"--{key} must be >= 1, got {sizes[key]}")
    if ":" in args.model and args.model.rsplit(":", 1)[0].endswith(".py"):
        return _from_factory(args.model, sizes)
    from spt_compile import zoo
    if args.model not in zoo.names():
        raise ValueError(f"unknown MODEL {args.model!r}: a zoo name ({', '.join(zoo.names())}) "
                         f"or path/to/file.py:factory")
    zm = zoo.build(args.model, **sizes)
    return zm.model, (), dict(zm.inputs)


def _from_factory(spec: str, sizes: dict) -> tuple[torch.nn.Module, tuple, dict]:
    path, name = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"spt_inspect_user_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{path!r} has no function {name!r}")
    params = inspect.signature(factory).parameters
    result = factory(**{k: v for k, v in sizes.items() if k in params})
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise ValueError(f"{spec} must return (model, example inputs), got {type(result).__name__}")
    model, inputs = result
    if isinstance(inputs, dict):
        return model, (), inputs
    if isinstance(inputs, torch.Tensor):
        return model, (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return model, tuple(inputs), {}
    raise ValueError(f"{spec}: example inputs must be a tuple, a dict or a tensor, got {type(inputs).__name__}")


def main(argv=None) -> int:
    """Standalone entry (the package CLI registers add_arguments / run as the `inspect` subcommand)."""
    parser = argparse.ArgumentParser(prog="python -m spt_compile inspect", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
