"""Pictures of a graph before and after the rewrite: networkx model → Graphviz DOT (always) → SVG / PNG.

Each rewritten subgraph is collapsed into one coloured node (before: the matched attention / FFN; after: the spt
op call), so a 300-node graph still shows at a glance where the sites are. Parameter and buffer inputs are left
out (a model has hundreds; they carry no structure). SVG and PNG come from the `dot` program when it is
installed; without it the SVG is drawn by `layered_svg` (longest-path layers, barycentre ordering), so a page
always has a picture.
"""
from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from typing import Any

import networkx as nx

from spt_compile.graph_snapshot import Group, is_parameter_input, to_networkx

COLOURS = {"attention": "#f6b26b", "ffn": "#76c7b7", "other": "#c9b3e6"}
PLAIN = "#ffffff"
IO = "#e8eef7"


def _hidden(rec: dict[str, Any]) -> bool:
    """Parameters, buffers and constants: inputs without structure."""
    return rec["op"] == "get_attr" or is_parameter_input(rec)


def _short(rec: dict[str, Any]) -> str:
    if rec["op"] in ("placeholder", "output"):
        return rec["name"] if rec["op"] == "placeholder" else "output"
    t = rec["target"].split(".")
    return t[-2] if t[-1] == "default" and len(t) > 1 else t[-1] or rec["target"]


def picture_graph(snap: dict[str, Any], groups: list[Group], side: str,
                  labels: dict[int, str] | None = None) -> nx.DiGraph:
    """The graph to draw: one node per kept node, one coloured node per group (side "before" | "after")."""
    if side not in ("before", "after"):
        raise ValueError(f"side must be 'before' or 'after', got {side!r}")
    full = to_networkx(snap)
    owner: dict[str, str] = {}
    pic = nx.DiGraph()
    for i, grp in enumerate(groups):
        members = grp.removed if side == "before" else grp.added
        members = [m for m in members if m in full]
        if not members:
            continue
        key = f"site{i}"
        title = (labels or {}).get(i) or f"{grp.kind} {grp.module}".strip()
        op = str((grp.arguments or {}).get("op", grp.op)).removesuffix(".default")
        what = f"{grp.kind} ({len(members)} nodes)" if side == "before" else op
        pic.add_node(key, label=f"{title}\n{what}", tooltip="\n".join(full.nodes[m]["rec"]["text"] for m in members),
                     fill=COLOURS.get(grp.kind, COLOURS["other"]), group=i, order=full.nodes[members[0]]["order"])
        owner.update({m: key for m in members})
    for name, data in full.nodes(data=True):
        rec = data["rec"]
        if name in owner or _hidden(rec):
            continue
        fill = IO if rec["op"] in ("placeholder", "output") else PLAIN
        pic.add_node(name, label=_short(rec), tooltip=rec["text"] + (f"\n{rec['module']}" if rec["module"] else ""),
                     fill=fill, group=None, order=data["order"])
    for a, b in full.edges:
        ka, kb = owner.get(a, a), owner.get(b, b)
        if ka in pic and kb in pic and ka != kb:
            pic.add_edge(ka, kb)
    return pic


# --- DOT --------------------------------------------------------------------------------------------------

def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(pic: nx.DiGraph, title: str = "graph") -> str:
    lines = [f"digraph {_q(title)} {{", "  rankdir=TB; nodesep=0.15; ranksep=0.25;", f"  label={_q(title)}; labelloc=t; fontname=Helvetica;",
             '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10, height=0.3];',
             "  edge [arrowsize=0.6, color=\"#777777\"];"]
    for name, d in sorted(pic.nodes(data=True), key=lambda x: x[1]["order"]):
        extra = ", penwidth=2, fontsize=12" if d["group"] is not None else ""
        lines.append(f"  {_q(name)} [label={_q(d['label'])}, tooltip={_q(d['tooltip'])}, "
                     f"fillcolor={_q(d['fill'])}{extra}];")
    for a, b in pic.edges:
        lines.append(f"  {_q(a)} -> {_q(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_program() -> str | None:
    return shutil.which("dot")


def render_with_dot(dot_text: str, fmt: str = "svg", timeout: float = 120.0) -> bytes:
    exe = dot_program()
    if exe is None:
        raise RuntimeError("the Graphviz `dot` program is not installed (apt-get install graphviz)")
    proc = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"dot -T{fmt} failed: {proc.stderr.decode(errors='replace')[:500]}")
    return proc.stdout


def svg(pic: nx.DiGraph, title: str = "graph") -> tuple[str, str]:
    """(inline SVG text, engine): Graphviz when available, else our own layered layout."""
    if dot_program() is not None:
        try:
            out = render_with_dot(to_dot(pic, title)).decode()
            out = out[out.index("<svg"):]
            # dot sizes in pt (1pt = 1.33px on screen): the same numbers in px draw it at 3/4, easier to scan
            out = re.sub(r'(<svg[^>]*?\b(?:width|height)="[\d.]+)pt"', r'\1px"', out, count=1)
            out = re.sub(r'(<svg[^>]*?\b(?:width|height)="[\d.]+)pt"', r'\1px"', out, count=1)
            return out, "graphviz dot"
        except (RuntimeError, subprocess.TimeoutExpired, ValueError):
            pass  # fall through: the page must still get a picture
    return layered_svg(pic, title), "built-in layered layout"


# --- the fallback layout ----------------------------------------------------------------------------------

def _layers(pic: nx.DiGraph) -> list[list[str]]:
    level: dict[str, int] = {}
    for n in nx.topological_sort(pic):
        level[n] = 1 + max((level[p] for p in pic.predecessors(n)), default=-1)
    rows: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for n in sorted(pic, key=lambda n: pic.nodes[n]["order"]):
        rows[level[n]].append(n)
    for _ in range(2):  # barycentre sweeps: order each layer by the mean position of its predecessors
        pos = {n: i for row in rows for i, n in enumerate(row)}
        for row in rows[1:]:
            row.sort(key=lambda n: sum(pos[p] for p in pic.predecessors(n)) / max(1, pic.in_degree(n)))
            pos.update({n: i for i, n in enumerate(row)})
    return rows


def layered_svg(pic: nx.DiGraph, title: str = "graph") -> str:
    """A plain SVG of `pic`: top-to-bottom layers, boxes with labels, straight edges with arrows."""
    char_w, line_h, pad, gap_x, gap_y = 6.6, 13, 8, 14, 34
    size, xy = {}, {}
    for n, d in pic.nodes(data=True):
        lines = d["label"].split("\n")
        size[n] = (max(len(s) for s in lines) * char_w + 2 * pad, len(lines) * line_h + pad)
    rows = _layers(pic)
    widths = [sum(size[n][0] for n in row) + gap_x * max(0, len(row) - 1) for row in rows]
    total_w = max(widths, default=100) + 40
    y = 40.0
    for row, w in zip(rows, widths):
        x = (total_w - w) / 2
        row_h = max((size[n][1] for n in row), default=20)
        for n in row:
            xy[n] = (x, y)
            x += size[n][0] + gap_x
        y += row_h + gap_y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w:.0f}" height="{y:.0f}" '
             f'viewBox="0 0 {total_w:.0f} {y:.0f}" font-family="Helvetica,Arial,sans-serif" font-size="11">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
             'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>',
             f'<text x="10" y="20" font-size="13">{html.escape(title)}</text>']
    for a, b in pic.edges:
        (xa, ya), (xb, yb) = xy[a], xy[b]
        parts.append(f'<g class="edge"><title>{html.escape(a)}-&gt;{html.escape(b)}</title>'
                     f'<line x1="{xa + size[a][0] / 2:.1f}" y1="{ya + size[a][1]:.1f}" x2="{xb + size[b][0] / 2:.1f}" '
                     f'y2="{yb:.1f}" stroke="#777" stroke-width="1" marker-end="url(#arrow)"/></g>')
    for n, d in pic.nodes(data=True):
        x, y0 = xy[n]
        w, h = size[n]
        bold = d["group"] is not None
        parts.append(f'<g class="node"><title>{html.escape(n)}: {html.escape(d["tooltip"])}</title>'
                     f'<rect x="{x:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{h:.1f}" rx="5" fill="{d["fill"]}" '
                     f'stroke="#333" stroke-width="{2 if bold else 1}"/>')
        for i, line in enumerate(d["label"].split("\n")):
            weight = ' font-weight="bold"' if bold and i == 0 else ""
            parts.append(f'<text x="{x + w / 2:.1f}" y="{y0 + pad / 2 + (i + 0.8) * line_h:.1f}" '
                         f'text-anchor="middle"{weight}>{html.escape(line)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


# --- files ------------------------------------------------------------------------------------------------

def write_dot(report, directory: str) -> list[str]:
    """graph<i>-before.dot / -after.dot per graph (and .svg / .png beside them when `dot` is installed)."""
    from spt_compile.html_report import graph_pictures

    os.makedirs(directory, exist_ok=True)
    written = []
    for index, side, pic, title in graph_pictures(report):
        base = os.path.join(directory, f"graph{index}-{side}")
        text = to_dot(pic, title)
        with open(base + ".dot", "w") as f:
            f.write(text)
        written.append(base + ".dot")
        if dot_program() is not None:
            for fmt in ("svg", "png"):
                with open(f"{base}.{fmt}", "wb") as f:
                    f.write(render_with_dot(text, fmt))
                written.append(f"{base}.{fmt}")
    return written
