"""The graph breaks and recompiles Dynamo reported while a block of code ran (for the inspection report).

    with dynamo_events.capture() as events:
        compiled(*args)
    events.as_dict()   # {"frames": 2, "graph_breaks": [{"reason": ..., "count": 1}], "recompiles": [...]}

Read from Dynamo's own bookkeeping (`torch._dynamo.utils.counters["graph_break"]` and the compilation
metrics), so it says exactly what `torch._dynamo.explain` / TORCH_LOGS=graph_breaks,recompiles would.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any


@dataclasses.dataclass
class DynamoEvents:
    frames: list[dict[str, Any]] = dataclasses.field(default_factory=list)      # one per compiled frame
    graph_breaks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    recompiles: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _break_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters
    return dict(counters["graph_break"])


def _metrics() -> list:
    from torch._dynamo.utils import get_compilation_metrics
    try:
        return list(get_compilation_metrics())
    except Exception:  # noqa: BLE001 - bookkeeping differs across torch versions: report nothing, never fail
        return []


@contextlib.contextmanager
def capture():
    events = DynamoEvents()
    breaks_before = _break_counts()
    seen = {id(m) for m in _metrics()}
    try:
        yield events
    finally:
        for reason, count in _break_counts().items():
            new = count - breaks_before.get(reason, 0)
            if new > 0:
                events.graph_breaks.append({"reason": _first_paragraph(reason), "count": new})
        for m in _metrics():
            if id(m) in seen:
                continue
            frame = {"compile_id": str(getattr(m, "compile_id", "")), "function": getattr(m, "co_name", ""),
                     "file": (getattr(m, "co_filename", "") or "").rsplit("/", 1)[-1],
                     "line": getattr(m, "co_firstlineno", None), "ops": getattr(m, "graph_op_count", None),
                     "fail_reason": getattr(m, "fail_reason", None)}
            events.frames.append(frame)
            reason = getattr(m, "recompile_reason", None)
            if reason:
                events.recompiles.append({**frame, "reason": reason})


def _first_paragraph(reason: str) -> str:
    """Dynamo's graph-break text is long (hints, links): keep its first two lines."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    return " ".join(lines[:2])


def compile_info() -> dict[str, Any]:
    """Called inside a backend: which compile this graph is ({compile_id, function, recompile_reason}).

    The recompile reason is what Dynamo computed for this compile before tracing (the guard that failed); torch
    keeps it only in the compile's metrics context, which has no public getter, so read it defensively."""
    out: dict[str, Any] = {"compile_id": "", "function": "", "recompile_reason": None}
    try:
        from torch._guards import CompileContext, TracingContext
        cid = CompileContext.current_compile_id()
        out["compile_id"] = "" if cid is None else str(cid)
        tc = TracingContext.try_get()
        if tc is not None and tc.traced_code:
            code = tc.traced_code[0]
            out["function"] = f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})"
        from torch._dynamo.utils import get_metrics_context
        out["recompile_reason"] = getattr(get_metrics_context(), "_metrics", {}).get("recompile_reason")
    except Exception:  # noqa: BLE001 - provenance only; never break compilation
        pass
    return out
