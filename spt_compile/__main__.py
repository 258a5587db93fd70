"""`python -m spt_compile <command>`: the command-line interface.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; this file only
registers them with argparse subparsers. A command's module is imported only when that command runs (or its
--help is asked for), so a command whose module or optional dependency is missing fails alone, with a clear message.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys

PROG = "python -m spt_compile"

# name: (modules to try in order, one-line help). The first module that exists serves the command.
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "demo": (("spt_compile.demo",),
             "fine-tune a small model with backend='spt' and with the default backend; print what was rewritten, "
             "speed, memory and loss"),
    "inspect": (("spt_compile.cli_inspect",),
                "print what backend='spt' rewrites in a small Hugging Face model, and why sites stay dense"),
    "options": (("spt_compile.cli_options",), "list the backend options, their defaults and meaning"),
    "kernels": (("spt_compile.cli_kernels",), "list the Triton kernels and their candidate launch configs"),
    "autotune": (("spt_compile.cli_autotune",), "export, import, show or pretune the kernel autotune cache"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default once: appended as '(default: X)' unless the help text already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if re.search(r"\bdefault\b", text, re.IGNORECASE) or action.default in (None, argparse.SUPPRESS) \
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Our formatter everywhere (nested subparsers are built with this class too), and errors that name the
    problem before the usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n\n{self.format_usage()}")


class CommandUnavailable(RuntimeError):
    pass


def command_module(name: str):
    """Import the module serving command `name` (the first of its candidates that exists)."""
    modules, _ = COMMANDS[name]
    for mod in modules:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # this candidate does not exist: try the next one
                continue
            raise CommandUnavailable(f"command {name!r} needs the Python package {e.name!r}, which is not "
                                     f"installed ({mod} imports it)") from e
        if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
            raise CommandUnavailable(f"command {name!r}: {mod} does not define add_arguments(parser) and run(args)")
        return module
    raise CommandUnavailable(f"command {name!r} is not available in this installation: none of the modules "
                             f"{', '.join(modules)} exists")


def build_parser(command: str | None = None) -> Parser:
    """The top-level parser; the subparser of `command` (if given) gets that command's arguments."""
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                    epilog=f"'{PROG} <command> --help' describes a command and each of its flags.")
    parser.add_argument("--version", action="version", version=f"spt-compile {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=Parser)
    for name, (_, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        module = command_module(name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__ or help_text)
        module.add_arguments(p)  # may set its own description
        _describe_nested(p)
        p.set_defaults(_run=module.run)
    return parser


def _describe_nested(parser: argparse.ArgumentParser) -> None:
    """A nested subcommand (e.g. `autotune export`) without a description shows its one-line help in its --help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                if not child.description:
                    child.description = helps.get(name)
                _describe_nested(child)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        build_parser().print_help()
        return 0
    first = argv[0]
    if not first.startswith("-") and first not in COMMANDS:
        close = difflib.get_close_matches(first, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"{PROG}: unknown command {first!r}{hint}\n", file=sys.stderr)
        build_parser().print_help(sys.stderr)
        return 2
    try:
        parser = build_parser(first if first in COMMANDS else None)
    except CommandUnavailable as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


def _version() -> str:
    from spt_compile import __version__
    return __version__


if __name__ == "__main__":
    sys.exit(main())
