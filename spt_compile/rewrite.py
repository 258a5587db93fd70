"""Decide, per matched site, whether to rewrite it; rewrite it; record the decision.

All policy lives here (options, shape limits, parameter adjustments). Each rewritten site becomes one
`torch.ops.spt.*` call whose arguments carry every parameter, so the graph alone says what will run.
"""
from __future__ import annotations

import itertools
import math
import operator

import torch
from torch import fx

from spt_compile.options import SptOptions
from spt_compile.patterns.attention import AttentionMatch, find_attention
from spt_compile.patterns.ffn import FfnMatch, find_ffn
from spt_compile.patterns.graph_utils import copy_provenance, module_path, shape_str, size_hint, source_line, val
from spt_compile.patterns.normalize import normalize_graph
from spt_compile.report import DENSE, REWRITTEN, GraphRecord, Report, SiteRecord

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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
                          shape=f"q{shape_str(m.q)} k{shape_str(m.k)}")
        reason = m.problem or _attention_policy(m, options, site)
        if not reason:
            _rewrite_attention(graph, m, options, site)
            site.status = REWRITTEN
        else:
            site.reason = reason
        report.sites.append(site)

    for m in find_ffn(graph):
        site = SiteRecord(kind="ffn", module=_common_module(m.up.node, m.output), source=source_line(m.output), status=DENSE,
                          spelling=m.spelling, graph=graph_index,
                          shape=f"x{shape_str(m.up.x)} H={m.hidden}")
        reason = m.problem or _ffn_policy(m, options, site)
        if not reason:
            _rewrite_ffn(gm, m, options, site, weights)
            site.status = REWRITTEN
        else:
            site.reason = reason
        report.sites.append(site)

    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    record.nodes_after, record.code_after = len(graph.nodes), gm.code
    report.graphs.append(record)
    return gm


# --- attention --------------------------------------------------------------------------------

def _attention_policy(m: AttentionMatch, options: SptOptions, site: SiteRecord) -> str:
    if options.attention == "dense":
        return "attention='dense' in options"
    q, k, v = val(m.q), val(m.k), val(m.v)
    if q.dim() != 4:
        return f"q has {q.dim()} dims; the op needs [B, H, N, D]"
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} not supported (float16, bfloat16, float32, all equal)"
    head_dim = size_hint(q.shape[-1])
    n_keys = size_hint(k.shape[-1] if m.k_transposed else k.shape[-2])
    heads, kv_heads = size_hint(q.shape[1]), size_hint(k.shape[1])
    if head_dim is None or n_keys is None or heads is None or kv_heads is None:
        return "symbolic head dim / key count / heads without a hint"
    if heads % kv_heads:
        return f"{heads} query heads not a multiple of {kv_heads} kv heads"
    if n_keys < options.min_seq_len:
        return f"{n_keys} keys < min_seq_len={options.min_seq_len}"
    subspaces = _largest_divisor_at_most(head_dim, options.pq_subspaces)
    if subspaces != options.pq_subspaces:
        site.reason = f"pq_subspaces {options.pq_subspaces} -> {subspaces} (head dim {head_dim})"
    keep = max(1, math.ceil(options.attention_density * n_keys))
    site.params = {"density": options.attention_density, "L": keep, "M": subspaces, "C": options.pq_centroids,
                   "kv_heads": kv_heads, "dropout": m.dropout_p}
    if options.exact_attention:
        site.params["mode"] = "exact"
    return ""


def _rewrite_attention(graph: fx.Graph, m: AttentionMatch, options: SptOptions, site: SiteRecord) -> None:
    out = m.output
    add = _Inserter(graph)
    with graph.inserting_before(out):
        k = add("call_method", "transpose", (m.k, -2, -1)) if m.k_transposed else m.k
        mask = _combine_masks(m, add)
        scale = m.scale if m.scale is not None else 1.0 / math.sqrt(size_hint(val(m.q).shape[-1]))
        seed = None
        if m.dropout_p > 0:
            seed = add("call_function", torch.randint, (0, 2**62, ()),
                       {"dtype": torch.int64, "device": val(m.q).device})
        op = add("call_function", torch.ops.spt.pq_sparse_attention.default,
                 (m.q, k, m.v, mask, bool(m.is_causal), float(scale), float(options.attention_density),
                  int(site.params["M"]), int(options.pq_centroids), int(options.pq_kmeans_iters),
                  float(m.dropout_p), seed))
        result = add("call_function", operator.getitem, (op, 0))
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
    rank = _result_rank(m, mask)
    if rank < 4:
        mask = add("call_function", operator.getitem, (mask, (None,) * (4 - rank) + (Ellipsis,)))
    return mask


def _result_rank(m: AttentionMatch, mask: fx.Node) -> int:
    # masks added by _combine_masks have no example value yet: derive the rank from their inputs
    ranks = [val(c).dim() for c, _ in m.bool_masks] + [val(n).dim() for n, _ in m.additive] + \
            [val(c).dim() for c, *_ in m.where_bias]
    return max(ranks) if ranks else 4


# --- ffn --------------------------------------------------------------------------------------

def _ffn_policy(m: FfnMatch, options: SptOptions, site: SiteRecord) -> str:
    if options.ffn == "dense":
        return "ffn='dense' in options"
    x = val(m.up.x)
    if x.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {x.dtype} not supported (float16, bfloat16, float32)"
    for p in (m.up, m.down) + ((m.gated_up,) if m.gated_up else ()):
        if val(p.weight).dtype != x.dtype:
            return f"weight dtype {val(p.weight).dtype} differs from activation dtype {x.dtype}"
    hidden = size_hint(m.hidden)
    out_shape, in_shape = val(m.output).shape, val(m.up.x).shape
    if tuple(out_shape[:-1]) != tuple(in_shape[:-1]):
        return f"views between the projections change the token layout ({shape_str(m.up.x)} -> {shape_str(m.output)})"
    blocks = _largest_divisor_at_most(hidden, options.ffn_blocks)
    if blocks != options.ffn_blocks:
        site.reason = f"ffn_blocks {options.ffn_blocks} -> {blocks} (hidden width {hidden})"
    top_k = options.ffn_top_k(blocks)
    site.params = {"density": options.ffn_density, "E": blocks, "k": top_k, "act": m.activation,
                   "router": options.ffn_router, "gated": m.gated_up is not None}
    if top_k == blocks:
        site.params["mode"] = "exact"
    return ""


def _rewrite_ffn(gm: fx.GraphModule, m: FfnMatch, options: SptOptions, site: SiteRecord, weights: dict) -> None:
    graph, out = gm.graph, m.output
    blocks, top_k = site.params["E"], site.params["k"]
    perm = _block_perm(m, blocks, options, weights, site)
    add = _Inserter(graph)
    with graph.inserting_before(out):
        def weight(p):
            return add("call_method", "t", (p.weight,)) if p.transposed else p.weight

        w1, w2 = weight(m.up), weight(m.down)
        w_up = weight(m.gated_up) if m.gated_up else None
        b_up = m.gated_up.bias if m.gated_up else None
        perm_node = _constant(gm, add, "spt_block_perm", torch.tensor(perm, dtype=torch.int64, device=val(m.up.x).device))
        op = add("call_function", torch.ops.spt.routed_ffn.default,
                 (m.up.x, w1, m.up.bias, w_up, b_up, w2, m.down.bias, perm_node, m.activation, int(blocks),
                  int(top_k), options.ffn_router, int(options.ffn_router_rank), int(options.ffn_router_refresh),
                  next(_SITE_IDS)))
        result = add("call_function", operator.getitem, (op, 0))
    add.copy_provenance_from(out)
    out.replace_all_uses_with(result)
    _erase([out] + m.interior)


def _block_perm(m: FfnMatch, blocks: int, options: SptOptions, weights: dict, site: SiteRecord) -> list[int]:
    hidden = size_hint(m.hidden)
    w = weights.get(m.up.weight)
    if not options.ffn_cluster or blocks == 1 or site.params.get("mode") == "exact":
        return list(range(hidden))
    if w is None:
        site.reason = (site.reason + "; " if site.reason else "") + "weights unknown at compile time: contiguous blocks"
        return list(range(hidden))
    from spt_compile.lowering.neuron_blocks import compute_block_perm

    w1 = w.detach().t() if m.up.transposed else w.detach()
    site.params["clustered"] = True
    return compute_block_perm(w1, blocks, cluster=True).tolist()


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


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


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
