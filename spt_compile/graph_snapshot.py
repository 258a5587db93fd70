"""A JSON-able picture of a Dynamo FX graph, taken before and after the rewrite, and what changed between them.

The rewrite works in place, so a node keeps its name unless it is replaced: the nodes only the "before" graph
has are the matched subgraphs the rewrite erased, the nodes only the "after" graph has are the spt op calls and
their small helpers. Grouping both by connectivity gives one (removed, added) pair per rewritten site, with no
help from the rewrite itself. The report stores the two snapshots; the HTML page, the DOT files and the code
listings are all rendered from them.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import networkx as nx
import torch
from torch import fx

from spt_compile.patterns.graph_utils import clean_module_path, source_line, val

log = logging.getLogger(__name__)

SPT_PREFIX = "spt."   # str(torch.ops.spt.x.default) == "spt.x.default"


# --- taking a snapshot ------------------------------------------------------------------------------------

def snapshot(gm_or_graph) -> dict[str, Any]:
    """{"nodes": [...]} with, per node: name, op, target, inputs, text, module, source, shape, dtype, spt."""
    graph = gm_or_graph.graph if isinstance(gm_or_graph, fx.GraphModule) else gm_or_graph
    return {"nodes": [_node_record(n) for n in graph.nodes]}


def _node_record(n: fx.Node) -> dict[str, Any]:
    info = tensor_info(n)
    stack = n.meta.get("nn_module_stack")
    module = clean_module_path(str(list(stack.values())[-1][0])) if stack else ""
    rec = {"name": n.name, "op": n.op, "target": target_name(n), "inputs": [a.name for a in n.all_input_nodes],
           "text": node_text(n), "module": module, "source": source_line(n),
           "shape": info["shape"] if info else None, "dtype": info["dtype"] if info else None, "spt": None}
    if is_spt_op(n):
        rec["spt"] = op_arguments(n)
    return rec


def target_name(n: fx.Node) -> str:
    if n.op in ("placeholder", "output", "get_attr"):
        return str(n.target)
    if n.op == "call_method":
        return "." + str(n.target)
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__qualname__", getattr(t, "__name__", str(t)))
    if name.startswith("_VariableFunctionsClass."):  # torch.arange & co. are methods of a hidden class
        mod, name = "torch", name.split(".", 1)[1]
    if mod.startswith("torch") or mod == "_operator":
        mod = {"_operator": "operator", "torch._C._nn": "torch.nn.functional",
               "torch.nn.functional": "F"}.get(mod, mod)
    return f"{mod}.{name}" if mod else name


def is_spt_op(n: fx.Node) -> bool:
    return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and \
        str(n.target).startswith(SPT_PREFIX)


def _arg_text(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg_text(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, torch.dtype):
        return str(a)
    return repr(a)


def node_text(n: fx.Node) -> str:
    """A readable one-line spelling: `matmul_1 = torch.matmul(q, transpose)`."""
    if n.op == "placeholder":
        return f"{n.name} = <input>"
    if n.op == "output":
        return f"return {_arg_text(n.args[0])}"
    if n.op == "get_attr":
        return f"{n.name} = self.{n.target}"
    args = [_arg_text(a) for a in n.args] + [f"{k}={_arg_text(v)}" for k, v in n.kwargs.items()]
    if n.op == "call_method":
        return f"{n.name} = {args[0]}.{n.target}({', '.join(args[1:])})"
    return f"{n.name} = {target_name(n)}({', '.join(args)})"


def tensor_info(n) -> dict[str, Any] | None:
    """shape, dtype and itemsize of a node's value; nodes the rewrite created have no example value, so a
    transpose of a known tensor (the only kind of helper the rewrite adds in front of an op) is derived."""
    if not isinstance(n, fx.Node):
        return None
    v = val(n)
    if v is not None:
        return {"shape": [_int(s) for s in v.shape], "dtype": str(v.dtype).replace("torch.", ""),
                "itemsize": v.element_size(), "device": str(v.device)}
    if n.op == "call_method" and n.target in ("t", "transpose") and n.args:
        src = tensor_info(n.args[0])
        if src is not None and len(src["shape"]) >= 2:
            dims = (-2, -1) if n.target == "t" else tuple(n.args[1:3])
            shape = list(src["shape"])
            shape[dims[0]], shape[dims[1]] = shape[dims[1]], shape[dims[0]]
            return {**src, "shape": shape}
    return None


def _int(s) -> int | str:
    if isinstance(s, int):  # never int() a SymInt: that adds a guard and specialises the graph (dynamic=True)
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)  # a symbolic size without a hint stays "s0"
    return int(hint) if hint is not None else str(s)


def op_arguments(n: fx.Node) -> dict[str, Any]:
    """The spt op's arguments by schema name: tensors as {shape, dtype, itemsize} (None if absent)."""
    schema = n.target._schema
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(n.args):
            value = n.args[i]
        elif arg.name in n.kwargs:
            value = n.kwargs[arg.name]
        elif arg.has_default_value():
            value = arg.default_value
        else:
            continue
        bound[arg.name] = tensor_info(value) if isinstance(value, fx.Node) else value
    bound["op"] = str(n.target)
    return bound


# --- what changed -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Group:
    """One rewritten subgraph: the nodes it replaced (before) and the nodes that replaced them (after)."""
    kind: str                  # "attention" | "ffn" | "other"
    op: str                    # name of the spt op node in the after graph ("" if none)
    module: str                # the op node's module path
    removed: list[str]
    added: list[str]
    arguments: dict[str, Any] | None


def _kind_of(op_target: str) -> str:
    if "attention" in op_target:
        return "attention"
    if "ffn" in op_target:
        return "ffn"
    return "other"


def diff_groups(before: dict[str, Any], after: dict[str, Any]) -> list[Group]:
    """Pair each connected set of added nodes (an spt op and its helpers) with the removed nodes it replaced."""
    gb, ga = to_networkx(before), to_networkx(after)
    removed = set(gb) - set(ga)
    added = set(ga) - set(gb)
    removed_parts = [set(c) for c in nx.weakly_connected_components(gb.subgraph(removed))]
    groups = []
    for part in nx.weakly_connected_components(ga.subgraph(added)):
        ops = [n for n in part if ga.nodes[n]["rec"]["spt"] is not None]
        if not ops:
            continue
        op = ops[0]
        rec = ga.nodes[op]["rec"]
        # consumers of the new group in the after graph used to consume the removed nodes it replaced
        consumers = {s for n in part for s in ga.successors(n)} - part
        taken = [r for r in removed_parts if {s for n in r for s in gb.successors(n)} & consumers]
        for r in taken:
            removed_parts.remove(r)
        gone = sorted(set().union(*taken), key=lambda x: gb.nodes[x]["order"]) if taken else []
        groups.append(Group(kind=_kind_of(rec["target"]), op=op, module=rec["module"], removed=gone,
                            added=sorted(part, key=lambda x: ga.nodes[x]["order"]), arguments=rec["spt"]))
    groups.sort(key=lambda g: ga.nodes[g.op]["order"])
    return groups


def to_networkx(snap: dict[str, Any]) -> nx.DiGraph:
    """Nodes carry the snapshot record ("rec") and their position in the graph ("order"); edges input → user."""
    g = nx.DiGraph()
    for i, rec in enumerate(snap.get("nodes", [])):
        g.add_node(rec["name"], rec=rec, order=i)
    for rec in snap.get("nodes", []):
        for src in rec["inputs"]:
            if src in g:
                g.add_edge(src, rec["name"])
    return g


def assign_sites(groups: list[Group], sites: list) -> dict[int, Group]:
    """site position in `sites` -> its group: same kind, the op's module inside the site's module, in order."""
    out: dict[int, Group] = {}
    free = list(groups)
    for i, s in enumerate(sites):
        if getattr(s, "status", "") != "rewritten":
            continue
        for g in free:
            if g.kind == s.kind and (g.module == s.module or g.module.startswith(s.module + ".")
                                     or not s.module):
                out[i] = g
                free.remove(g)
                break
    return out


# --- code listings ----------------------------------------------------------------------------------------

def listing(snap: dict[str, Any], marked: dict[str, str], sign: str) -> list[tuple[str, str, str]]:
    """(mark, label, text) per node: mark is `sign` for marked nodes, label their site label."""
    rows = []
    params = [rec for rec in snap.get("nodes", []) if is_parameter_input(rec)]
    if params:
        rows.append((" ", "", f"# {len(params)} parameter / buffer inputs (l_..._parameters_...) not listed"))
    for rec in snap.get("nodes", []):
        if is_parameter_input(rec):
            continue
        label = marked.get(rec["name"], "")
        shape = f"{rec['dtype']}{rec['shape']}" if rec["shape"] is not None else ""
        note = " ".join(x for x in (shape, rec["module"]) if x)
        rows.append((sign if label else " ", label, rec["text"] + (f"  # {note}" if note else "")))
    return rows


def is_parameter_input(rec: dict[str, Any]) -> bool:
    """A placeholder Dynamo lifted from a parameter or buffer (a model has hundreds; no structure)."""
    return rec["op"] == "placeholder" and bool(re.search(r"_(parameters|buffers)_", rec["name"]))


def capture_rewrite(rewrite, gm, example_inputs, options, report, **kwargs):
    """Run `rewrite(gm, example_inputs, options, report, **kwargs)` and store before/after snapshots in the
    GraphRecord it appends. Snapshots never break a compile: on failure the record just has none."""
    from spt_compile.dynamo_events import compile_info

    try:
        before = {**snapshot(gm), "compile": compile_info()}
    except Exception as e:  # noqa: BLE001 - inspection must never break compilation
        log.warning("spt inspection: no graph snapshot of this compile (%s: %s); the report has no listing or "
                    "picture for it", type(e).__name__, e)
        before = None
    n_graphs = len(report.graphs)
    out = rewrite(gm, example_inputs, options, report, **kwargs)
    if before is not None and len(report.graphs) > n_graphs:
        try:
            record = report.graphs[-1]
            record.graph_before, record.graph_after = before, snapshot(out if out is not None else gm)
        except Exception as e:  # noqa: BLE001
            log.warning("spt inspection: no graph snapshot after the rewrite (%s: %s); the report has no listing "
                        "or picture for it", type(e).__name__, e)
    return out
