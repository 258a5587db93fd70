"""Graph snapshots, the before/after diff, and the pictures (DOT always; SVG by Graphviz or our own layout)."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from spt_compile import graph_picture
from spt_compile.graph_picture import COLOURS, layered_svg, picture_graph, to_dot
from spt_compile.graph_snapshot import diff_groups
from spt_compile.html_report import graph_groups, graph_pictures

SVG_NS = "{http://www.w3.org/2000/svg}"


def _nodes(svg_text):
    root = ET.fromstring(svg_text)
    return [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "node"]


def test_diff_finds_one_group_per_rewritten_site(tiny_report):
    g = tiny_report.graphs[0]
    groups, by_site = graph_groups(tiny_report, g)
    assert len(groups) == len(tiny_report.rewritten()) == 4
    assert sorted(by_site) == [i for i, s in enumerate(tiny_report.sites) if s.status == "rewritten"]
    before = {r["name"]: r for r in g.graph_before["nodes"]}
    after = {r["name"]: r for r in g.graph_after["nodes"]}
    for i, grp in by_site.items():
        site = tiny_report.sites[i]
        assert grp.kind == site.kind and grp.module.startswith(site.module)
        assert all(n in before and n not in after for n in grp.removed)
        assert all(n in after and n not in before for n in grp.added)
        targets = {before[n]["target"].rsplit(".", 1)[-1] for n in grp.removed}
        assert ("softmax" in targets) if site.kind == "attention" else ("gelu" in targets)
        assert after[grp.op]["spt"]["op"].startswith("spt.")


def test_pictures_collapse_each_rewritten_subgraph_into_one_coloured_node(tiny_report):
    g = tiny_report.graphs[0]
    groups = diff_groups(g.graph_before, g.graph_after)
    for side, snap in (("before", g.graph_before), ("after", g.graph_after)):
        pic = picture_graph(snap, groups, side)
        site_nodes = [n for n, d in pic.nodes(data=True) if d["group"] is not None]
        assert len(site_nodes) == len(groups)
        members = {m for grp in groups for m in (grp.removed if side == "before" else grp.added)}
        assert not members & set(pic.nodes)          # the members are gone, only their collapsed node is left
        for n in site_nodes:
            kind = groups[pic.nodes[n]["group"]].kind
            assert pic.nodes[n]["fill"] == COLOURS[kind]
            assert pic.in_degree(n) > 0 and pic.out_degree(n) > 0   # still wired into the graph
        dot = to_dot(pic, f"graph {side}")
        assert dot.startswith("digraph") and dot.count("->") == pic.number_of_edges()
        assert dot.count(COLOURS["attention"]) == 2 and dot.count(COLOURS["ffn"]) == 2


def test_builtin_layout_draws_every_node_and_edge(tiny_report):
    _, _, pic, title = graph_pictures(tiny_report)[1]
    svg = layered_svg(pic, title)
    root = ET.fromstring(svg)
    assert len(_nodes(svg)) == pic.number_of_nodes()
    edges = [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "edge"]
    assert len(edges) == pic.number_of_edges()
    # layers run top to bottom: every edge points downwards
    for line in root.iter(f"{SVG_NS}line"):
        assert float(line.get("y2")) > float(line.get("y1"))


def test_svg_falls_back_to_builtin_layout_without_dot(tiny_report, monkeypatch):
    _, _, pic, title = graph_pictures(tiny_report)[0]
    monkeypatch.setattr(graph_picture, "dot_program", lambda: None)
    svg, engine = graph_picture.svg(pic, title)
    assert engine == "built-in layered layout" and len(_nodes(svg)) == pic.number_of_nodes()


@pytest.mark.skipif(graph_picture.dot_program() is None,
                    reason="Graphviz `dot` not installed (apt-get install graphviz); the built-in layout is tested")
def test_graphviz_svg_and_write_dot(tiny_report, tmp_path):
    _, _, pic, title = graph_pictures(tiny_report)[1]
    svg, engine = graph_picture.svg(pic, title)
    assert engine == "graphviz dot" and len(_nodes(svg)) == pic.number_of_nodes()
    files = tiny_report.write_dot(tmp_path)
    names = sorted(p.rsplit("/", 1)[-1] for p in files)
    assert names == sorted(f"graph0-{s}.{e}" for s in ("before", "after") for e in ("dot", "svg", "png"))
    assert (tmp_path / "graph0-after.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_dot_without_graphviz_writes_dot_only(tiny_report, tmp_path, monkeypatch):
    monkeypatch.setattr(graph_picture, "dot_program", lambda: None)
    files = tiny_report.write_dot(tmp_path)
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["graph0-after.dot", "graph0-before.dot"]


def test_a_failing_snapshot_warns_and_never_breaks_the_compile(monkeypatch, caplog):
    from types import SimpleNamespace

    from spt_compile import graph_snapshot

    def broken(gm):
        raise RuntimeError("boom")

    def rewrite(gm, example_inputs, options, report, **kwargs):
        report.graphs.append(SimpleNamespace(graph_before=None, graph_after=None))
        return "compiled"

    monkeypatch.setattr(graph_snapshot, "snapshot", broken)
    report = SimpleNamespace(graphs=[])
    with caplog.at_level("WARNING", logger="spt_compile.graph_snapshot"):
        assert graph_snapshot.capture_rewrite(rewrite, None, [], None, report) == "compiled"
    assert report.graphs[0].graph_before is None and "RuntimeError: boom" in caplog.text
