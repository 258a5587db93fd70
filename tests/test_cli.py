"""`python -m spt_compile`: the CLI explains itself (unknown commands, --help of every command and flag, the
options list) and a command whose module is missing fails alone with a clear message."""
import argparse
import logging
import re
import warnings

import pytest

from spt_compile import __main__ as cli
from spt_compile.options import SptOptions


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _walk(parser):
    """The parser and every nested subcommand parser (e.g. `autotune pretune`)."""
    yield parser
    for child in _subparsers(parser).values():
        yield from _walk(child)


def test_unknown_command_is_named_before_the_usage(capsys):
    assert cli.main(["foo"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'foo'" in err and err.index("unknown command 'foo'") < err.index("usage:")
    for name in cli.COMMANDS:  # the usage that follows lists what exists
        assert name in err
    assert cli.main(["inspec"]) == 2
    assert "did you mean 'inspect'" in capsys.readouterr().err


def test_no_command_prints_the_command_list(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name, (_, help_text) in cli.COMMANDS.items():
        assert name in out
    assert "<command> --help" in out


def test_bad_flag_value_names_the_problem_before_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", "--attn-implementation", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and err.index("invalid choice") < err.index("usage:")


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_help_describes_the_command_and_every_flag_with_its_default(command, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    sub = _subparsers(cli.build_parser(command))[command]
    for parser in _walk(sub):
        text = parser.format_help()
        assert parser.description and parser.description.strip(), f"{parser.prog} has no description"
        fmt = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help.strip(), f"{parser.prog}: {name} has no help text"
            shown = fmt._get_help_string(action) % {**vars(action), "prog": parser.prog}
            assert shown.strip() in " ".join(text.split()) or shown.split()[0] in text
            if action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                    and not isinstance(action.default, bool):
                spellings = {str(action.default)} | ({f"{action.default:g}"} if isinstance(action.default, float) else set())
                assert re.search(r"\bdefault\b", shown) and any(v in shown for v in spellings), \
                    f"{parser.prog}: {name} does not show its default {action.default!r}: {shown!r}"
    with pytest.raises(SystemExit) as e:  # and --help itself works end to end
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {cli.PROG} {command}")


def test_options_prints_each_option_and_each_default_once(capsys):
    assert cli.main(["options"]) == 0
    lines = capsys.readouterr().out.splitlines()
    defaults = SptOptions().as_dict()
    assert len(lines) == 1 + len(defaults)
    for line, (key, default) in zip(lines[1:], defaults.items()):
        name, shown, meaning = line.split(maxsplit=2)
        assert (name, shown) == (key, repr(default))
        assert "default" not in meaning.lower(), f"{key}: default repeated in {meaning!r}"
        assert meaning.strip()


def test_options_json_is_the_defaults(capsys):
    import json
    assert cli.main(["options", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == SptOptions().as_dict()


def test_first_existing_module_serves_a_command(monkeypatch):
    # a command may name fallback modules: a missing one is skipped, the next one that exists serves it
    monkeypatch.setitem(cli.COMMANDS, "inspect", (("spt_compile.no_such_module_xyz", "spt_compile.cli_options"),
                                                  "help"))
    assert cli.command_module("inspect").__name__ == "spt_compile.cli_options"


def test_missing_command_module_fails_alone_with_a_clear_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(cli.COMMANDS, "autotune", (("spt_compile.no_such_module_xyz",), "help"))
    assert cli.main(["autotune", "show"]) == 1
    assert "'autotune' is not available" in capsys.readouterr().err
    assert cli.main(["options", "--json"]) == 0  # the other commands still work

    (tmp_path / "spt_cli_needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "autotune", (("spt_cli_needs_dep",), "help"))
    assert cli.main(["autotune"]) == 1
    assert "needs the Python package 'no_such_dependency_xyz'" in capsys.readouterr().err


def test_kernels_lists_registered_kernels_and_rejects_unknown(capsys):
    assert cli.main(["kernels", "--kernel", "nope"]) == 2
    out = capsys.readouterr().out
    assert "unknown kernel 'nope'" in out and "attention_fwd" in out


def test_inspect_command_prints_the_report(capsys):
    assert cli.main(["inspect", "llama", "--hidden", "64", "--seq", "16", "--batch", "1",
                     "--options", '{"min_seq_len": 1}']) == 0
    out = capsys.readouterr().out
    assert "attention 2 rewritten / 0 dense; ffn 2 rewritten / 0 dense" in out
    assert "model.layers.1.mlp" in out


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_small_configs_make_transformers_print_no_warnings(kind):
    pytest.importorskip("transformers")
    from spt_compile.inspect_models import small_hf_model

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            small_hf_model(kind, layers=1, hidden=64, ffn=128, vocab=128)
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records]
    assert not [str(w.message) for w in caught]
