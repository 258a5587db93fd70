"""The report as ONE self-contained HTML page: tables, savings, pictures (inline SVG), code listings.

No script, no stylesheet or font from the network: the page opens from a file anywhere. Everything is rendered
from the Report's records (sites, plans, graph snapshots, Dynamo events); nothing here decides anything.
"""
from __future__ import annotations

import datetime
import html
import json
from typing import Any

from spt_compile.graph_picture import COLOURS, picture_graph, svg
from spt_compile.graph_snapshot import Group, assign_sites, diff_groups, listing
from spt_compile.savings import Estimate, human, site_estimates, totals

PLAN_COLUMNS = ("L", "T", "M", "C", "E", "k", "router", "mode")

CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f3f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.rewritten td.status{background:#dff3e3}tr.dense td.status{background:#fbe3e0}
.picture{overflow:auto;max-height:900px;border:1px solid #ddd;margin:6px 0;background:#fff}
.picture svg{max-width:100%;height:auto}
.pictures{display:flex;gap:12px;align-items:flex-start}.pictures>div{flex:1;min-width:0}
pre.listing{font-size:12px;line-height:1.35;overflow:auto;max-height:700px;border:1px solid #ddd;padding:6px}
pre.listing span.mark{display:block}.muted{color:#777}code{font-size:12px}
"""


# --- data the renderers share -----------------------------------------------------------------------------

def _graph_sites(report, index: int) -> list[tuple[int, Any]]:
    return [(i, s) for i, s in enumerate(report.sites) if s.graph == index]


def graph_groups(report, g) -> tuple[list[Group], dict[int, Group]]:
    """The rewritten subgraphs of graph `g` and which site (index into report.sites) each belongs to."""
    if not g.graph_before or not g.graph_after:
        return [], {}
    groups = diff_groups(g.graph_before, g.graph_after)
    pairs = _graph_sites(report, g.index)
    local = assign_sites(groups, [s for _, s in pairs])
    return groups, {pairs[j][0]: grp for j, grp in local.items()}


def report_savings(report) -> tuple[dict[int, list[Estimate]], list[dict[str, Any]]]:
    """Per rewritten site (index into report.sites) its estimates, and the totals over all sites."""
    per_site: dict[int, list[Estimate]] = {}
    for g in report.graphs:
        _, by_site = graph_groups(report, g)
        for i, grp in by_site.items():
            if grp.arguments:
                site = report.sites[i]
                try:
                    per_site[i] = site_estimates(site.kind, grp.arguments, site.params, site.spelling)
                except (ValueError, KeyError, TypeError):  # sizes unknown at compile time: no estimate
                    continue
    return per_site, totals(list(per_site.values()))


def _site_label(i: int, s) -> str:
    return f"#{i} {s.kind} {s.module}".strip()


def graph_listings(report):
    """(graph record, before rows, after rows): code listings with each rewritten node labelled by its site."""
    out = []
    for g in report.graphs:
        if not g.graph_before or not g.graph_after:
            continue
        _, by_site = graph_groups(report, g)
        removed = {n: _site_label(i, report.sites[i]) for i, grp in by_site.items() for n in grp.removed}
        added = {n: _site_label(i, report.sites[i]) for i, grp in by_site.items() for n in grp.added}
        out.append((g, listing(g.graph_before, removed, "-"), listing(g.graph_after, added, "+")))
    return out


def graph_pictures(report):
    """(graph index, side, networkx picture, title) for every captured graph, before and after."""
    out = []
    for g in report.graphs:
        if not g.graph_before or not g.graph_after:
            continue
        groups, by_site = graph_groups(report, g)
        pos = {id(grp): j for j, grp in enumerate(groups)}
        labels = {pos[id(grp)]: _site_label(i, report.sites[i]) for i, grp in by_site.items()}
        for side in ("before", "after"):
            out.append((g.index, side, picture_graph(g.graph_after if side == "after" else g.graph_before,
                                                     groups, side, labels),
                        f"graph {g.index} {side} the rewrite"))
    return out


def kernel_entries(site, group: Group | None) -> list[tuple[str, str]]:
    """(kernel, autotune-cache entry or "untuned") for a rewritten site (spt_compile/site_kernels.py)."""
    if site.status != "rewritten" or group is None:
        return []
    from spt_compile.site_kernels import kernel_entries as lookup
    return lookup(group.arguments)


# --- HTML pieces ------------------------------------------------------------------------------------------

def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _table(headers, rows, cls: str = "", row_classes=None) -> str:
    out = [f'<table class="{cls}">', "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>"]
    for j, row in enumerate(rows):
        rc = f' class="{row_classes[j]}"' if row_classes else ""
        out.append(f"<tr{rc}>" + "".join(c if c.startswith("<td") else f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _failed_step(s) -> str:
    for attr in ("step", "failed_step", "near_miss"):
        v = getattr(s, attr, None) or (s.params.get(attr) if isinstance(s.params, dict) else None)
        if v:
            return str(v)
    return ""


def _sites_section(report) -> str:
    headers = ("#", "graph", "kind", "module", "source", "spelling", "status", "reason", "near miss: failing step",
               *PLAN_COLUMNS, "other parameters", "kernels (autotune cache)")
    rows, classes = [], []
    groups = {}
    for g in report.graphs:
        groups.update(graph_groups(report, g)[1])
    for i, s in enumerate(report.sites):
        params = dict(s.params) if isinstance(s.params, dict) else {}
        plan = [str(params.pop(c, "")) for c in PLAN_COLUMNS]
        step = _failed_step(s)
        entries = kernel_entries(s, groups.get(i))
        kernels = '<td class="kernels">' + "<br>".join(f"{_e(k)}: {_e(v)}" for k, v in entries) + "</td>"
        other = " ".join(f"{k}={v}" for k, v in params.items())
        rows.append((str(i), str(s.graph), s.kind, s.module or "?", s.source or "?", s.spelling,
                     f'<td class="status">{_e(s.status)}</td>', s.reason,
                     f'<td class="step">{_e(step)}</td>' if step else "", *plan, other, kernels))
        classes.append(s.status)
    return "<h2>Sites</h2>\n" + _table(headers, rows, "sites", classes)


def _savings_section(report) -> str:
    per_site, tot = report_savings(report)
    out = ["<h2>Estimated savings (dense vs spt, at the traced sizes)</h2>"]
    if not per_site:
        return out[0] + "<p>No site was rewritten: nothing saved.</p>"
    rows = [(t["quantity"], f'<td class="num">{_e(human(t["dense"], t["unit"]))}</td>',
             f'<td class="num">{_e(human(t["spt"], t["unit"]))}</td>',
             f'<td class="num">{_e(_ratio(t["ratio"]))}</td>') for t in tot]
    out.append("<h3>Total</h3>" + _table(("quantity", "dense", "spt", "spt / dense"), rows, "savings-total"))
    rows = []
    for i, estimates in sorted(per_site.items()):
        for e in estimates:
            rows.append((_site_label(i, report.sites[i]), e.quantity,
                         f'<td class="num">{_e(human(e.dense_value(), e.unit))}</td>',
                         f'<td class="num">{_e(human(e.spt_value(), e.unit))}</td>',
                         f'<td class="num">{_e(_ratio(e.ratio()))}</td>',
                         f"<td><code>{_e(e.dense)}</code></td>", f"<td><code>{_e(e.spt)}</code></td>"))
    out.append("<details><summary><b>Per site, with the formulas</b></summary>"
               + _table(("site", "quantity", "dense", "spt", "spt / dense", "dense formula", "spt formula"), rows,
                        "savings-sites") + "</details>")
    out.append('<p class="muted">Formulas and what they count: spt_compile/savings.py (from docs/OPS.md). '
               "N: sequence length, n: tokens, s: bytes per element; the other symbols are the traced sizes "
               "and the site's plan.</p>")
    return "\n".join(out)


def _ratio(r) -> str:
    return "—" if r is None else f"{r:.3f}"


def _dynamo_section(report) -> str:
    ev = getattr(report, "dynamo", None) or {}
    out = ["<h2>Dynamo: graph breaks and recompiles</h2>"]
    if not ev:
        return out[0] + _per_graph_compiles(report)
    out.append(f"<p>{len(ev.get('frames', []))} frame(s) compiled, {len(report.graphs)} graph(s) handed to spt.</p>")
    breaks = ev.get("graph_breaks", [])
    out.append(_table(("graph break reason", "count"), [(b["reason"], str(b["count"])) for b in breaks],
                      "breaks") if breaks else "<p>No graph breaks.</p>")
    rec = ev.get("recompiles", [])
    out.append(_table(("compile id", "function", "recompile reason"),
                      [(r["compile_id"], f"{r['function']} ({r['file']}:{r['line']})", r["reason"]) for r in rec],
                      "recompiles") if rec else "<p>No recompiles.</p>")
    return "\n".join(out)


def _per_graph_compiles(report) -> str:
    """Without explain's capture (a report of torch.compile): each graph's compile id, its function (a
    `torch_dynamo_resume_in_*` function follows a graph break at the line it names) and its recompile reason."""
    rows = []
    for g in report.graphs:
        info = (g.graph_before or {}).get("compile") or {}
        rows.append((str(g.index), info.get("compile_id", ""), info.get("function", ""),
                     info.get("recompile_reason") or "first compile of this frame"))
    note = ("<p>Graph-break reasons are recorded by <code>spt_compile.explain</code>; here each graph's "
            "compile (a <code>torch_dynamo_resume_in_...</code> function follows a graph break).</p>")
    return note + _table(("graph", "compile id", "function", "recompile reason"), rows, "compiles")


def _listing_html(rows) -> str:
    lines = []
    for mark, label, text in rows:
        if label:
            kind = "attention" if " attention " in f" {label} " else "ffn"
            lines.append(f'<span class="mark" style="background:{COLOURS[kind]}" title="{_e(label)}">'
                         f"{_e(mark)} {_e(text)}   &lt;- {_e(label)}</span>")
        else:
            lines.append(f"  {_e(text)}")
    return '<pre class="listing">' + "\n".join(lines) + "</pre>"


def _graphs_section(report) -> str:
    out = []
    pictures = {(i, side): (pic, title) for i, side, pic, title in graph_pictures(report)}
    listings = {g.index: (b, a) for g, b, a in graph_listings(report)}
    for g in report.graphs:
        out.append(f"<h2>Graph {g.index}: {g.nodes_before} nodes before, {g.nodes_after} after</h2>")
        if (g.index, "before") not in pictures:
            out.append("<p>No node snapshot was taken for this graph.</p>")
            continue
        cells = []
        for side in ("before", "after"):
            pic, title = pictures[(g.index, side)]
            image, engine = svg(pic, title)
            cells.append(f'<div><h3>{side} <span class="muted">({_e(engine)})</span></h3>'
                         f'<div class="picture picture-{side}">{image}</div></div>')
        out.append('<div class="pictures">' + "".join(cells) + "</div>")
        before, after = listings[g.index]
        out.append('<div class="pictures">'
                   f"<div><h3>code before (- marks the replaced nodes)</h3>{_listing_html(before)}</div>"
                   f"<div><h3>code after (+ marks the spt nodes)</h3>{_listing_html(after)}</div></div>")
    return "\n".join(out)


def render(report, title: str = "spt-compile report") -> str:
    opts = _table(("option", "value"), [(k, json.dumps(v)) for k, v in (report.options or {}).items()], "options")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    legend = " ".join(f'<span style="background:{c};padding:1px 6px">{k}</span>' for k, c in COLOURS.items()
                      if k != "other")
    body = [f"<h1>{_e(title)}</h1>", f"<p>{_e(report.summary())} <span class='muted'>({stamp})</span></p>",
            f"<p>Rewritten subgraphs are coloured: {legend}</p>", _sites_section(report), _savings_section(report),
            _dynamo_section(report), _graphs_section(report), "<h2>Options</h2>", opts]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_html(report, path: str, title: str = "spt-compile report") -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(report, title))
    return path


def savings_dict(report) -> dict[str, Any]:
    """The estimates as plain data (for to_dict / JSON): per site (by index) and totals."""
    per_site, tot = report_savings(report)
    return {"sites": {str(i): [e.as_dict() for e in est] for i, est in sorted(per_site.items())}, "total": tot}
