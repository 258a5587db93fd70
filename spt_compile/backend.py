"""`torch.compile(model, backend="spt", options={...})` lands here (entry point `torch_dynamo_backends`).

Dynamo hands us one FX graph at a time. We validate the options, rewrite attention and FFN sites into spt ops
(rewrite.py), record every decision in a Report, and give the graph to inductor, which runs AOTAutograd and
generates code for everything else; our ops stay single nodes in the forward and backward graphs.
"""
from __future__ import annotations

import copy
import logging
import os
import sys

import torch
from torch import fx

from spt_compile.cache_salt import salted_config_patches
from spt_compile.graph_snapshot import capture_rewrite
from spt_compile.inspect_logs import configure as configure_logging, log_compile
from spt_compile.options import SptOptions
from spt_compile.report import Report, record_compile
from spt_compile.patterns.graph_utils import user_module_names
from spt_compile.rewrite import rewrite_graph

log = logging.getLogger("spt_compile")
configure_logging(log)  # SPT_LOGS=info|rewrites|rewrites,graphs (spt_compile/inspect_logs.py)


def spt_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    """The Dynamo backend. `example_inputs` are the user's real tensors: read, never mutated."""
    options = SptOptions.from_dict(kwargs.pop("options", None))
    if kwargs:
        raise ValueError(f"backend 'spt' got unexpected argument(s) {sorted(kwargs)}; pass settings via options={{...}}")
    report = Report(options=options.as_dict(), **_frame_identity())
    with user_module_names(_compiled_root()):
        gm = capture_rewrite(rewrite_graph, gm, example_inputs, options, report, graph_index=0)
    record_compile(report)
    _trace_report(report)
    log_compile(log, report)
    return compile_rewritten(gm, example_inputs, options)


def compile_rewritten(gm: fx.GraphModule, example_inputs, options: SptOptions):
    if options.inner_backend == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=salted_config_patches())


def analysis_backend(options: SptOptions, report: Report, root=None):
    """A backend that rewrites and records but runs the original graph eagerly (used by `explain`); module
    paths are named as in `root` (the user's model) when given."""

    def backend(gm: fx.GraphModule, example_inputs, **_):
        probe = copy.deepcopy(gm)  # analyse a copy; the user's model runs unchanged
        sub = Report(options=options.as_dict())
        with user_module_names(root if root is not None else _compiled_root()):
            capture_rewrite(rewrite_graph, probe, example_inputs, options, sub, graph_index=0)
        report.extend(sub)
        return gm.forward

    return backend


def _frame_identity() -> dict:
    """Which Dynamo frame and which (re)compile of it this graph belongs to (groups graphs in last_report())."""
    out = {"frame": "", "frame_compile": 0, "attempt": 0, "code_name": "", "entry": _entry_key()}
    try:
        from torch._guards import CompileContext, TracingContext
        trace = CompileContext.current_trace_id()
        if trace is not None:
            cid = trace.compile_id
            out["frame"], out["frame_compile"] = str(cid.frame_id), int(cid.frame_compile_id or 0)
            out["attempt"] = int(trace.attempt)
        tc = TracingContext.try_get()
        if tc is not None and tc.traced_code:
            out["code_name"] = tc.traced_code[0].co_name
    except Exception:  # noqa: BLE001 - provenance only; never break compilation
        pass
    return out


def _compiled_root() -> list:
    """The modules on the call stack, outermost first (a compiled module's original in place of the wrapper):
    module paths are named from the outermost that contains a module (patterns/graph_utils.py)."""
    f, roots = sys._getframe(), []
    while f is not None:  # method receivers only (`self`), and what Dynamo's compile wrapper compiles (`fn`)
        keys = ("self", "fn") if f.f_code.co_name == "compile_wrapper" else ("self",)
        for key in keys:
            obj = f.f_locals.get(key) if key in f.f_code.co_varnames + f.f_code.co_freevars else None
            obj = getattr(obj, "__self__", obj)  # a bound forward
            if isinstance(obj, torch.nn.Module):
                roots.append(getattr(obj, "_orig_mod", obj))
        f = f.f_back
    unique = {id(r): r for r in reversed(roots)}  # outermost first
    return list(unique.values())


def _entry_key() -> str:
    """Which torch.compile'd callable this compile runs under: the `fn` of Dynamo's outermost compile wrapper on
    the stack. All graphs of one model (its graph-break frames, its loss function) share it; another model
    compiled later does not."""
    f, key = sys._getframe(), ""
    while f is not None:
        if f.f_code.co_name == "compile_wrapper" and f.f_code.co_filename.endswith("eval_frame.py"):
            fn = f.f_locals.get("fn")
            key = f"{type(fn).__name__}@{id(fn):x}" if fn is not None else key
        f = f.f_back
    return key


def _trace_report(report: Report) -> None:
    """Put the report into TORCH_TRACE logs (tlparse shows it) when tracing is on."""
    try:
        from torch._logging import trace_structured
        trace_structured("artifact", metadata_fn=lambda: {"name": "spt_rewrite_report", "encoding": "json"},
                         payload_fn=report.to_json)
    except Exception:  # noqa: BLE001 - logging must never break compilation
        pass
