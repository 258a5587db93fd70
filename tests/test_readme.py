"""The README shows what users get: its result tables are rendered from bench/results/ (and are fresh), and its
demo excerpt has the format the demo prints today."""
import importlib.util
import os
import re
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", os.path.join(ROOT, "bench", "readme_tables.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["readme_tables"] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def _table(text: str, first_header: str) -> list[list[str]]:
    """The markdown table in `text` whose first header cell is `first_header`, as rows of cells (header first)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = [cells]
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with first header {first_header!r} in:\n{text}")


def _shape(cell: str) -> str:
    """A cell's format with the values taken out: '511.0 ms' -> '9.9 ms', '2.10x faster' -> '9.9x <cmp>'."""
    cell = re.sub(r"\b(faster|slower|less|more)\b", "<cmp>", cell)
    cell = re.sub(r"\bsame\b", "9% <cmp>", cell)
    return re.sub(r"\d+", "9", cell)


def test_readme_result_tables_are_rendered_from_bench_results():
    rt = _readme_tables()
    text = open(README).read()
    names = [m.group("name") for m in rt.REGION.finditer(text)]
    assert {"ffn-cpu", "attention-cpu", "attention-memory-cpu"} <= set(names), names
    assert rt.main(["--check"]) == 0, "README.md is stale: run `python bench/readme_tables.py`"
    for m in rt.REGION.finditer(text):
        assert "Machine: " in m.group("body"), f"table {m.group('name')} does not name the machine"


def test_readme_tables_check_catches_a_stale_or_broken_readme(tmp_path, capsys):
    rt = _readme_tables()
    good = open(README).read()
    stale = tmp_path / "README.md"
    # a hand edit of one number inside a rendered region
    m = next(rt.REGION.finditer(good))
    body = m.group("body")
    edited = re.sub(r"\d\.\d\dx", "9.99x", body, count=1)
    assert edited != body
    stale.write_text(good[:m.start("body")] + edited + good[m.end("body"):])
    assert rt.main(["--check", "--readme", str(stale)]) == 1
    assert "9.99x" in capsys.readouterr().out  # the diff shows the stale line
    assert rt.main(["--readme", str(stale)]) == 0  # rendering repairs it
    assert stale.read_text() == good
    stale.write_text("<!-- table:nope-cpu -->\n<!-- /table -->\n")
    assert rt.main(["--check", "--readme", str(stale)]) == 2
    assert "bench/results/nope-cpu.md does not exist" in capsys.readouterr().err


def test_result_parser_reads_machine_and_tables():
    rt = _readme_tables()
    res = rt.parse_result(os.path.join(ROOT, "bench", "results", "ffn-cpu.md"))
    assert res.machine and res.tables and "shape" in res.tables[0].headers
    with pytest.raises(rt.RenderError, match="no column 'nope'"):
        res.tables[0].column("nope")


def test_demo_output_view_keeps_the_printed_block_verbatim(tmp_path):
    rt = _readme_tables()
    block = "```\nmachine: X\n| backend | step time |\n|---|---|\n| spt | 1 ms |\n```"
    path = tmp_path / "demo-cpu.md"
    path.write_text(f"# demo\n\n- machine: X (2 cores)\n\n{block}\n\nnotes\n")
    assert rt.view_for("demo-cpu")(rt.parse_result(str(path))) == block
    assert rt.view_for("attention-memory-nvidia-h200") is rt.view_first_table
    assert rt.view_for("attention-nvidia-h200") is rt.view_attention


def test_markdown_table_format_and_bad_rows():
    from spt_compile.measure import markdown_table
    assert markdown_table(("a", "bb"), [(1, "x"), ("long", 2.5)]).splitlines() == [
        "| a    | bb  |", "|------|-----|", "| 1    | x   |", "| long | 2.5 |"]
    with pytest.raises(ValueError, match="row has 1 cells, table has 2 columns"):
        markdown_table(("a", "bb"), [(1,)])


def test_readme_demo_excerpt_has_the_format_the_demo_prints(capsys):
    """Run the demo's results formatter on fixed numbers; the README's demo table must have the same columns and
    the same cell formats (values differ: the README shows a real run)."""
    demo = pytest.importorskip("spt_compile.demo")
    text = open(README).read()
    section = text[text.index("### Demo"):]
    excerpt = section[section.index("```") + 3:]
    excerpt = excerpt[:excerpt.index("```")]

    def run(name, backend, step, peak, before, after):  # the fields of demo.FineTuneRun the formatter reads
        return types.SimpleNamespace(name=name, backend=backend, step_time=step, peak=peak, before=before,
                                     after=after, losses=[2.0] * 8)

    runs = {"inductor (default)": run("inductor (default)", "inductor", 0.240, 90e6, (2.1234, 0.501), (1.5, 0.75)),
            "spt": run("spt", "spt", 0.480, 72e6, (2.1234, 0.501), (1.6, 0.70))}
    demo._print_results(runs, "torch.profiler CPU allocation events")
    printed = capsys.readouterr().out
    ours, theirs = _table(printed, "backend"), _table(excerpt, "backend")
    assert theirs[0] == ours[0], f"README demo table columns {theirs[0]} != the demo's {ours[0]}"
    assert [r[0] for r in theirs[1:]] == [r[0] for r in ours[1:]], "README demo table rows differ"
    for got, want in zip(theirs[1:], ours[1:]):
        assert [_shape(c) for c in got] == [_shape(c) for c in want], \
            f"README demo row {got} is not in the format the demo prints: {want}"


def test_readme_cli_commands_parse():
    """Every `python -m spt_compile ...` line the README shows is accepted by today's CLI (flags and arguments;
    nothing runs), so a renamed flag (e.g. `--seq-len` -> `--seq`) cannot linger in the README."""
    import shlex

    from spt_compile import __main__ as cli
    commands = [m.group(1).split(" #")[0].strip()
                for m in re.finditer(r"python -m spt_compile ([^`\n)]*)", open(README).read())]
    commands = [c for c in commands if c and not re.search(r"[{<]", c)]  # `{demo,inspect}` / `<command>`: prose
    assert any(c.startswith("inspect ") for c in commands), commands
    for command in commands:
        argv = shlex.split(command)
        if len(argv) == 1:  # a bare command named in prose or a heading: it must exist
            assert argv[0] in cli.COMMANDS, f"README names `python -m spt_compile {command}`: no such command"
            continue
        try:
            cli.build_parser(argv[0]).parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"README command `python -m spt_compile {command}` is rejected by the CLI") from e
