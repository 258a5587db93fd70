"""The report: every decision the backend took, one record per candidate site.

`spt_compile.explain(...)` returns a `Report`; the backend also appends to `last_reports()` on every compiled
graph, and `last_report()` merges the graphs of the latest compile, so a user of
`torch.compile(..., backend="spt")` can look at what happened. The inspection tool (its own issue)
renders the same records: nothing is decided anywhere without being written here.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

REWRITTEN = "rewritten"
DENSE = "dense"


@dataclasses.dataclass
class SiteRecord:
    kind: str                 # "attention" | "ffn"
    module: str               # module path, e.g. "model.layers.0.self_attn"
    source: str               # "modeling_llama.py:253"
    status: str               # REWRITTEN | DENSE
    reason: str = ""          # why it stayed dense, or notes on adjusted parameters
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    spelling: str = ""        # which pattern matched: "sdpa", "eager", "linear+gelu", "gated silu", ...
    graph: int = 0            # index of the Dynamo graph it came from
    shape: str = ""           # e.g. "q[2,4,128,64] k[2,2,128,64]" or "x[256,768] H=3072"
    near_miss: str = ""       # a candidate the matcher gave up on: the step that failed ("activation", ...)
    plan: Any = None          # the site's Plan (spt_compile/plan.py) when rewritten; `params` renders it

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GraphRecord:
    index: int
    nodes_before: int = 0
    nodes_after: int = 0
    code_before: str = ""
    code_after: str = ""
    # node-level snapshots for the inspection tool (spt_compile/graph_snapshot.py); None when not taken
    graph_before: dict[str, Any] | None = None
    graph_after: dict[str, Any] | None = None


@dataclasses.dataclass
class Report:
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    sites: list[SiteRecord] = dataclasses.field(default_factory=list)
    graphs: list[GraphRecord] = dataclasses.field(default_factory=list)
    frame: str = ""           # Dynamo frame the graphs came from (e.g. "0"; resume frames get their own id)
    frame_compile: int = 0    # which (re)compile of that frame
    code_name: str = ""       # the compiled function's name ("forward", "torch_dynamo_resume_in_forward_at_..")
    entry: str = ""           # the torch.compile'd callable the graph ran under (groups a model's graphs)
    attempt: int = 0          # Dynamo restarts an analysis (e.g. to specialise a float): the last attempt counts
    dynamo: dict[str, Any] = dataclasses.field(default_factory=dict)  # graph breaks / recompiles (explain)

    # -- queries ------------------------------------------------------------------------------
    def rewritten(self, kind: str | None = None) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == REWRITTEN and (kind is None or s.kind == kind)]

    def dense(self, kind: str | None = None) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == DENSE and (kind is None or s.kind == kind)]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            key = f"{s.kind}:{s.status}"
            out[key] = out.get(key, 0) + 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"options": self.options, "sites": [s.as_dict() for s in self.sites],
                "graphs": [dataclasses.asdict(g) for g in self.graphs], "dynamo": self.dynamo}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_dict(self) -> dict[str, Any]:
        """as_dict() plus the estimated savings per site and in total (spt_compile/savings.py)."""
        from spt_compile.html_report import savings_dict
        return {**self.as_dict(), "savings": savings_dict(self)}

    def write_html(self, path: str) -> str:
        """ONE self-contained page: tables, savings, pictures (inline SVG), code listings (html_report.py)."""
        from spt_compile.html_report import write_html
        return write_html(self, str(path))

    def write_dot(self, directory: str) -> list[str]:
        """Graphviz DOT files of every graph before/after (+ SVG/PNG when `dot` is installed)."""
        from spt_compile.graph_picture import write_dot
        return write_dot(self, str(directory))

    def extend(self, other: "Report") -> None:
        """Append another report's graphs and sites (graph indices renumbered after ours)."""
        offset = len(self.graphs)
        for g in other.graphs:
            self.graphs.append(dataclasses.replace(g, index=g.index + offset))
        for s in other.sites:
            self.sites.append(dataclasses.replace(s, graph=s.graph + offset))
        if not self.options:
            self.options = dict(other.options)

    # -- rendering ----------------------------------------------------------------------------
    def table(self) -> str:
        headers = ("#", "kind", "module", "source", "status", "params / reason")
        rows = []
        for i, s in enumerate(self.sites):
            detail = _format_params(s.params) if s.status == REWRITTEN else s.reason
            if s.near_miss:
                detail = f"near miss at step '{s.near_miss}': {s.reason}"
            if s.status == REWRITTEN and s.reason:
                detail = f"{detail}; {s.reason}"
            rows.append((str(i), s.kind, s.module or "?", s.source or "?", s.status, detail))
        widths = [max(len(h), *(len(r[c]) for r in rows)) if rows else len(h) for c, h in enumerate(headers)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
        out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in rows]
        return "\n".join(out)

    def summary(self) -> str:
        att_r, att_d = len(self.rewritten("attention")), len(self.dense("attention"))
        ffn_r, ffn_d = len(self.rewritten("ffn")), len(self.dense("ffn"))
        return (f"spt: {len(self.graphs)} graph(s); attention {att_r} rewritten / {att_d} dense; "
                f"ffn {ffn_r} rewritten / {ffn_d} dense")

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()


def _format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


# Reports of the compiles this process ran with backend="spt" (most recent last), bounded.
_LOCK = threading.Lock()
_RECENT: list[Report] = []
_MAX_RECENT = 64


def record_compile(report: Report) -> None:
    with _LOCK:
        if report.frame:  # an analysis Dynamo restarted: the graphs of the abandoned attempt never run
            key = (report.entry, report.frame, report.frame_compile)
            _RECENT[:] = [r for r in _RECENT if (r.entry, r.frame, r.frame_compile) != key or r.attempt >= report.attempt]
        _RECENT.append(report)
        del _RECENT[:-_MAX_RECENT]


def last_reports() -> list[Report]:
    """Reports of recent backend="spt" compiles in this process, oldest first (one per compiled graph)."""
    with _LOCK:
        return list(_RECENT)


def last_report() -> Report:
    """The report of the latest compile: every graph of the model compiled last, merged, each site once.

    Graphs belong to the latest compile when they ran under the same torch.compile'd callable as the newest
    graph (its graph-break frames and e.g. the loss function it calls included). When a frame was recompiled for
    the same modules (a new shape, dynamic=True), only its newest compile counts: the older graphs no longer run
    for the shapes seen last, and their statuses would be stale."""
    with _LOCK:
        recent = list(_RECENT)
    if not recent:
        return Report()
    entry = recent[-1].entry
    live: list[Report] = []
    for r in (r for r in recent if r.entry == entry):
        live = [old for old in live if not _superseded(old, r)]
        live.append(r)
    merged = Report(entry=entry)
    for r in live:
        merged.extend(r)
    return merged


def _superseded(old: Report, new: Report) -> bool:
    """A later compile of the same frame replaces an earlier one that covered the same modules (a new shape).
    A recompile for another module instance (a frame traced once per layer) leaves the other layers' graphs."""
    if not old.frame or old.frame != new.frame or old.frame_compile >= new.frame_compile:
        return False
    mods = lambda rep: {(s.kind, s.module) for s in rep.sites}
    return bool(mods(old) & mods(new))


def clear_reports() -> None:
    with _LOCK:
        _RECENT.clear()
