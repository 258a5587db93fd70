"""Rewrite each matched site by its Plan (spt_compile/plan.py decides) and record it in the report.

Each rewritten site becomes one `torch.ops.spt.*` call whose arguments carry every parameter of its Plan, so
the graph alone says what will run. A site without a Plan stays dense, and its reason is recorded.
"""
from __future__ import annotations

import itertools
import math
import operator

import torch
from torch import fx

from spt_compile.options import SptOptions
from spt_compile.plan import AttentionPlan, FfnPlan, op_takes_min_seq_len, plan_attention, plan_ffn
from spt_compile.patterns.attention import AttentionMatch, find_attention
from spt_compile.patterns.ffn import FfnMatch, find_ffn
from spt_compile.patterns.lora import lora_op_args
from spt_compile.patterns.graph_utils import copy_provenance, module_path, shape_str, size_hint, source_line, val
from spt_compile.patterns.normalize import normalize_graph
from spt_compile.report import DENSE, REWRITTEN, GraphRecord, Report, SiteRecord

_SITE_IDS = itertools.count()
_CONSTANT_IDS = itertools.count()  # process-wide: keys the routed-FFN router cache of each rewritten site


def rewrite_graph(gm: fx.GraphModule, example_inputs, options: SptOptions, report: Report,
                  graph_index: int = 0) -> fx.GraphModule:
    """Rewrite `gm` in place and return it; every candidate site is recorded in `report`."""
    import spt_compile.lowering  # noqa: F401  - registers torch.ops.spt.*

    graph = gm.graph
    record = GraphRecord(index=graph_index, nodes_before=len(graph.nodes), code_before=gm.code)
    normalize_graph(graph)
    weights = _placeholder_values(graph, example_inputs)

    for m in find_attention(graph):
        site = SiteRecord(kind="attention", module=module_path(m.output), source=source_line(m.output),
                          status=DENSE, spelling=m.spelling, graph=graph_index,
                          shape=f"q{shape_str(m.q)} k{shape_str(m.k)}", near_miss=m.near_miss)
        plan = m.problem or plan_attention(m, options)
        _record(site, plan, lambda p: _rewrite_attention(graph, m, p))
        report.sites.append(site)

    for m in find_ffn(graph):
        site = SiteRecord(kind="ffn", module=m.module or _common_module(m.up.node, m.output),
                          source=source_line(m.output), status=DENSE, spelling=m.spelling, graph=graph_index,
                          shape=f"x{shape_str(m.up.x)} H={m.hidden}" if m.up is not None else "",
                          near_miss=m.near_miss)
        plan = m.problem or plan_ffn(m, options, weight_known=m.up.weight in weights)
        _record(site, plan, lambda p: _rewrite_ffn(gm, m, p, weights))
        report.sites.append(site)

    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    record.nodes_after, record.code_after = len(graph.nodes), gm.code
    report.graphs.append(record)
    return gm


def _record(site: SiteRecord, plan, rewrite) -> None:
    """A Plan is rewritten and rendered; a string is the reason the site stays dense."""
    if isinstance(plan, str):
        site.reason = plan
        return
    rewrite(plan)
    site.status, site.plan, site.params = REWRITTEN, plan, plan.display()
    site.reason = "; ".join(plan.notes)


# --- attention --------------------------------------------------------------------------------

def _rewrite_attention(graph: fx.Graph, m: AttentionMatch, plan: AttentionPlan) -> None:
    out = m.output
    add = _Inserter(graph)
    with graph.inserting_before(out):
        q, k, v = m.q, m.k, m.v
        if m.batch_heads_flat:  # [B*H, N, D] spellings (bmm / baddbmm): the op sees B=1, H=B*H
            q, k, v = (add("call_function", operator.getitem, (t, (None, Ellipsis))) for t in (q, k, v))
        k = add("call_method", "transpose", (k, -2, -1)) if m.k_transposed else k
        mask = _combine_masks(m, add)
        seed = None
        if plan.dropout > 0:
            seed = add("call_function", torch.randint, (0, 2**62, ()),
                       {"dtype": torch.int64, "device": val(m.q).device})
        args = (q, k, v, mask, bool(m.is_causal), plan.scale, float(plan.density), int(plan.M), int(plan.C),
                int(plan.kmeans_iters), float(plan.dropout), seed)
        if op_takes_min_seq_len():
            # the op's trailing arguments: run-time threshold, the query tile T, its floor L_min, the scoring
            # stride, lists shared by a kv head's query heads
            args += (int(plan.min_seq_len), int(plan.T), int(plan.L_min), int(plan.select_stride),
                     bool(plan.share_kv_lists))
        op = add("call_function", torch.ops.spt.pq_sparse_attention.default, args)
        result = add("call_function", operator.getitem, (op, 0))
        if m.batch_heads_flat:
            result = add("call_function", operator.getitem, (result, 0))
        out_dtype = val(out).dtype
        if out_dtype != val(m.q).dtype:
            result = add("call_method", "to", (result, out_dtype))
    add.copy_provenance_from(out)
    out.replace_all_uses_with(result)
    _erase([out] + m.interior)


def _combine_masks(m: AttentionMatch, add):
    """One mask tensor for the op: bool (True = attend) when only boolean masks, else an additive bias."""
    bools = []
    for cond, keep in m.bool_masks:
        bools.append(cond if keep else add("call_function", operator.invert, (cond,)))
    bias = None
    for node, mult in m.additive:
        term = node if mult == 1.0 else add("call_function", operator.mul, (node, mult))
        bias = term if bias is None else add("call_function", operator.add, (bias, term))
    for cond, keep, fill, mult in m.where_bias:
        fill_value = fill * mult
        term = (add("call_function", torch.where, (cond, 0.0, fill_value)) if keep
                else add("call_function", torch.where, (cond, fill_value, 0.0)))
        bias = term if bias is None else add("call_function", operator.add, (bias, term))
    mask = None
    for b in bools:
        mask = b if mask is None else add("call_function", operator.and_, (mask, b))
    if bias is not None and mask is not None:
        mask = add("call_function", torch.where, (mask, bias, -math.inf))
    elif bias is not None:
        mask = bias
    if mask is None:
        return None
    rank = _result_rank(m, mask)  # a 3-D mask of a [B*H, N, D] spelling becomes [1, B*H, N, N]
    if rank < 4:
        mask = add("call_function", operator.getitem, (mask, (None,) * (4 - rank) + (Ellipsis,)))
    return mask


def _result_rank(m: AttentionMatch, mask: fx.Node) -> int:
    # masks added by _combine_masks have no example value yet: derive the rank from their inputs
    ranks = [val(c).dim() for c, _ in m.bool_masks] + [val(n).dim() for n, _ in m.additive] + \
            [val(c).dim() for c, *_ in m.where_bias]
    return max(ranks) if ranks else 4


# --- ffn --------------------------------------------------------------------------------------

def _rewrite_ffn(gm: fx.GraphModule, m: FfnMatch, plan: FfnPlan, weights: dict) -> None:
    graph, out = gm.graph, m.output
    perm = _block_perm(m, plan, weights)
    add = _Inserter(graph)
    with graph.inserting_before(out):
        w1, b1 = _projection_args(m.up, add)
        w2, b2 = _projection_args(m.down, add)
        w_up, b_up = _projection_args(m.gated_up, add) if m.gated_up else (None, None)
        perm_node = _constant(gm, add, "spt_block_perm", torch.tensor(perm, dtype=torch.int64, device=val(m.up.x).device))
        op = add("call_function", torch.ops.spt.routed_ffn.default,
                 (m.up.x, w1, b1, w_up, b_up, w2, b2, perm_node, plan.act, int(plan.E), int(plan.k), plan.router,
                  int(plan.rank), int(plan.refresh), next(_SITE_IDS)) + lora_op_args(m.up, m.gated_up, m.down, add))
        result = add("call_function", operator.getitem, (op, 0))
    add.copy_provenance_from(out)
    out.replace_all_uses_with(result)
    _erase([out] + m.interior)


def _projection_args(p, add):
    """(W [out, in], bias) of a projection as graph nodes: Conv1D's [in, out] weight is transposed, and a slice
    of a fused projection (gate+up split with chunk) takes its rows of W and b."""
    w = add("call_method", "t", (p.weight,)) if p.transposed else p.weight
    b = p.bias
    if p.rows is not None:
        lo, hi = p.rows
        w = add("call_function", operator.getitem, (w, slice(lo, hi)))
        if b is not None:
            b = add("call_function", operator.getitem, (b, slice(lo, hi)))
    return w, b


def _block_perm(m: FfnMatch, plan: FfnPlan, weights: dict) -> list[int]:
    hidden = size_hint(m.hidden)
    if not plan.clustered:
        return list(range(hidden))
    from spt_compile.lowering.neuron_blocks import compute_block_perm

    w = weights[m.up.weight].detach()
    w1 = w.t() if m.up.transposed else w
    if m.up.rows is not None:
        w1 = w1[m.up.rows[0]:m.up.rows[1]]
    return compute_block_perm(w1, plan.E, cluster=True).tolist()


# --- helpers ----------------------------------------------------------------------------------

class _Inserter:
    """`add(op, target, args, kwargs)` creates a node at the graph's insertion point and remembers it, so the
    new nodes can inherit the matched code's provenance (replace_pattern-style rewrites lose it)."""

    def __init__(self, graph: fx.Graph):
        self.graph, self.nodes = graph, []

    def __call__(self, op, target, args, kwargs=None) -> fx.Node:
        n = self.graph.create_node(op, target, tuple(args), kwargs or {})
        self.nodes.append(n)
        return n

    def copy_provenance_from(self, src: fx.Node) -> None:
        for n in self.nodes:
            copy_provenance(src, n)


def _constant(gm: fx.GraphModule, add, prefix: str, value: torch.Tensor) -> fx.Node:
    """A tensor the rewritten graph reads, held by the graph module as a buffer (not by the user's model).

    AOTAutograd lifts it into a graph input, so it lives on the device once instead of being rebuilt from a
    Python list every call, and its storage is stable (the router cache keys on it). Dynamo graphs map every
    lifted parameter/buffer name to a guard source: ours is a ConstantSource (nothing to guard).
    """
    from torch._dynamo.source import ConstantSource

    name = f"_{prefix}_{next(_CONSTANT_IDS)}"
    gm.register_buffer(name, value)
    if hasattr(gm, "_param_name_to_source"):
        gm._param_name_to_source[name] = ConstantSource(name)
    return add("get_attr", name, ())


def _placeholder_values(graph: fx.Graph, example_inputs) -> dict:
    """placeholder node -> the real tensor the user passed (parameters included), for compile-time analysis."""
    out = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for n, x in zip(placeholders, example_inputs):
        if isinstance(x, torch.Tensor) and not isinstance(x, torch._subclasses.FakeTensor):
            out[n] = x
    return out


def _common_module(a: fx.Node, b: fx.Node) -> str:
    """The module that owns both projections (the MLP), not the down projection's Linear."""
    pa, pb = module_path(a).split("."), module_path(b).split(".")
    common = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        common.append(x)
    return ".".join(common) or module_path(b)


def _erase(nodes: list[fx.Node]) -> None:
    """Erase replaced nodes, users first; a node something else still uses stays (eliminate_dead_code later)."""
    pending = list(nodes)
    while pending:
        progressed = False
        for n in list(pending):
            if not n.users:
                n.graph.erase_node(n)
                pending.remove(n)
                progressed = True
        if not progressed:
            return
