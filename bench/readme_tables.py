"""Render README.md's result tables from the committed bench/results/*.md files.

README.md marks each rendered region:

    <!-- table:ffn-cpu -->
    ...rendered from bench/results/ffn-cpu.md, with the machine named...
    <!-- /table -->

`python bench/readme_tables.py` rewrites every marked region; `--check` changes nothing and exits 1 (printing
a diff) when README.md is stale, 2 when a marker names a result file that does not exist or cannot be rendered.
The view of a result file is chosen by its bench name (the file name without the machine suffix): `ffn` is
pivoted to one row per shape, `attention` drops the absolute times, `demo` is the printed output of a run (the
file's first fenced block, verbatim); any other bench shows its first table.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
README = os.path.join(ROOT, "README.md")
REGION = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


class RenderError(ValueError):
    pass


@dataclasses.dataclass
class Table:
    heading: str
    headers: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> int:
        if name not in self.headers:
            raise RenderError(f"no column {name!r} in table {self.heading!r}; columns: {self.headers}")
        return self.headers.index(name)


@dataclasses.dataclass
class Result:
    path: str
    machine: str
    date: str
    torch: str
    tables: list[Table]
    text: str


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_result(path: str) -> Result:
    """The header fields (`- machine: ...`) and every markdown table of a bench result file."""
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    fields, tables, heading, i = {}, [], "", 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"- (machine|date|torch):?\s*(.*)", line)
        if m and m.group(1) not in fields:
            fields[m.group(1)] = m.group(2).split(",")[0] if m.group(1) == "torch" else m.group(2)
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[\s:|-]+\|", lines[i + 1].strip()):
            headers, rows, i = _cells(line), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append(Table(heading, headers, rows))
            continue
        i += 1
    if "machine" not in fields:
        raise RenderError(f"{path}: no '- machine: ...' line (bench/_common.py write_result writes one)")
    if not tables:
        raise RenderError(f"{path}: no markdown table")
    return Result(path, fields["machine"], fields.get("date", "?"), fields.get("torch", "?"), tables, text)


def markdown(headers, rows) -> str:
    from spt_compile.measure import markdown_table  # the one table formatter (the demo and benches use it)
    return markdown_table(headers, rows)


# -- views, by bench name -------------------------------------------------------------------------------------
def view_ffn(res: Result) -> str:
    """One row per shape: inductor-compiled dense and routed FFN at each density, as speed-ups vs eager dense."""
    t = res.tables[0]
    shape, variant, density, speed = (t.column(c) for c in ("shape", "variant", "density", "speedup vs dense eager"))
    densities = sorted({float(r[density]) for r in t.rows if r[variant].startswith("routed")})
    out: dict[str, dict[str, str]] = {}
    for r in t.rows:
        cells = out.setdefault(r[shape], {})
        if r[variant] == "dense (torch.compile)":
            cells["inductor"] = r[speed]
        elif r[variant].startswith("routed"):
            cells[float(r[density])] = r[speed]
    headers = ["shape", "dense, inductor"] + [f"routed {d}" + (" (exact)" if d == 1.0 else "") for d in densities]
    rows = [[s, c.get("inductor", "-")] + [c.get(d, "-") for d in densities] for s, c in out.items()]
    return markdown(headers, rows) + "\n\nspeed-up of forward+backward vs eager dense `Linear -> act -> Linear` (> 1 = faster)"


def view_attention(res: Result) -> str:
    t = res.tables[0]
    keep = [c for c in t.headers if not c.endswith("fwd+bwd")]  # absolute times: shown as ratios only
    idx = [t.column(c) for c in keep]
    return markdown(keep, [[r[i] for i in idx] for r in t.rows]) + "\n\ntimes are ratios to SDPA in the same run (> 1 = slower)"


def view_first_table(res: Result) -> str:
    t = res.tables[0]
    return markdown(t.headers, t.rows)


# bench name -> view; a result file `<bench>-<machine slug>.md` takes the view of the longest bench name it starts
# with, so 'attention-memory-cpu' must not fall under 'attention'
def view_output(res: Result) -> str:
    """A command's printed output, kept as the file's first fenced block (e.g. a `demo` run written by the demo)."""
    m = re.search(r"^```[^\n]*\n.*?^```$", res.text, re.DOTALL | re.MULTILINE)
    if not m:
        raise RenderError(f"{res.path}: no fenced output block")
    return m.group(0)


VIEWS = {"ffn": view_ffn, "attention": view_attention, "attention-memory": view_first_table, "demo": view_output}


def view_for(stem: str):
    names = [b for b in VIEWS if stem.startswith(b + "-")]
    return VIEWS[max(names, key=len)] if names else view_first_table


def render(name: str) -> str:
    path = os.path.join(RESULTS, f"{name}.md")
    if not os.path.exists(path):
        raise RenderError(f"README marks table {name!r} but {os.path.relpath(path, ROOT)} does not exist")
    res = parse_result(path)
    body = view_for(name)(res)
    return (f"{body}\n\nMachine: {res.machine}; torch {res.torch}; {res.date} "
            f"(`bench/results/{name}.md`, rendered by `python bench/readme_tables.py`)\n")


def rewrite(text: str) -> str:
    def sub(m: re.Match) -> str:
        return m.group(1) + "\n" + render(m.group("name")) + "\n" + m.group(4)
    return REGION.sub(sub, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 with a diff if README.md is stale; write nothing")
    ap.add_argument("--readme", default=README, help="the README to render into (default: the repository's)")
    args = ap.parse_args(argv)
    with open(args.readme) as f:
        old = f.read()
    try:
        new = rewrite(old)
    except RenderError as e:
        print(f"readme_tables: {e}", file=sys.stderr)
        return 2
    names = [m.group("name") for m in REGION.finditer(old)]
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       "README.md", "README.md (rendered)"))
            print(f"\nREADME.md is stale: run `python bench/readme_tables.py`", file=sys.stderr)
            return 1
        print(f"README.md is up to date ({len(names)} tables: {', '.join(names)})")
        return 0
    if new != old:
        with open(args.readme, "w") as f:
            f.write(new)
    print(f"rendered {len(names)} tables into {args.readme}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
