"""Projections (the linear maps the FFN matcher starts and ends at), as graph nodes.

    F.linear(x, W, b)                 W stored [out, in]
    torch.addmm(b, x, W)              GPT-2's Conv1D: W stored [in, out]
    chunk / split / slice of either   a fused projection (gate+up in one GEMM): the rows `rows` of W's outputs

`match_projection(node)` tries the matchers in PROJECTION_MATCHERS in order; a matcher for another spelling (e.g.
LoRA-wrapped projections, spt_compile/patterns/lora.py) is appended there and returns a `Projection` whose
`adapter` describes the extra terms. `claimed_nodes(p)` are the nodes a compound projection consists of, so its
inner linears are not mistaken for projections of their own.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable

import torch
from torch import fx

from spt_compile.patterns import normalize as N
from spt_compile.patterns.graph_utils import is_call, val


@dataclasses.dataclass
class Projection:
    node: fx.Node                    # the node whose value is the projection's output [..., out]
    x: fx.Node                       # its input [..., in]
    weight: fx.Node                  # W as stored
    bias: object                     # fx.Node | None
    transposed: bool                 # True when W is stored [in, out] (addmm / Conv1D): the op gets W.t()
    rows: tuple[int, int] | None = None   # a slice [lo, hi) of the output features of a fused projection
    adapter: Any = None              # set by adapter-aware matchers (LoRA): the rewrite must handle it or refuse
    inner: tuple[fx.Node, ...] = ()  # further nodes the projection consists of (the fused GEMM, chunk, adapter)

    @property
    def in_features(self) -> int:
        w = val(self.weight)
        return int(w.shape[0] if self.transposed else w.shape[1])

    @property
    def out_features(self) -> int:
        if self.rows is not None:
            return self.rows[1] - self.rows[0]
        w = val(self.weight)
        return int(w.shape[1] if self.transposed else w.shape[0])

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.node, *self.inner]


def plain_projection(node) -> Projection | None:
    """F.linear or Conv1D's addmm with a 2-D weight."""
    if is_call(node, N.LINEAR):
        args = list(node.args) + [node.kwargs.get("bias")] * (3 - len(node.args))
        x, w, b = args[0], node.kwargs.get("weight", args[1]), args[2]
        if val(w) is None or val(w).dim() != 2:
            return None
        return Projection(node, x, w, b, transposed=False)
    if is_call(node, torch.addmm) and not node.kwargs and len(node.args) == 3:
        b, x, w = node.args
        if val(w) is None or val(w).dim() != 2 or val(b) is None or val(b).dim() != 1:
            return None
        return Projection(node, x, w, b, transposed=True)
    return None


def sliced_projection(node) -> Projection | None:
    """One part of a fused projection: `proj(x).chunk(n, -1)[i]`, `.split(s, -1)[i]`, `proj(x)[..., a:b]`."""
    if not is_call(node, operator.getitem):
        return None
    src, index = node.args
    if isinstance(src, fx.Node) and src.op in ("call_method", "call_function") and _split_target(src):
        base = match_projection(src.args[0])
        bounds = _split_bounds(src, base)
        if base is None or bounds is None or not isinstance(index, int) or not 0 <= index < len(bounds):
            return None
        return _slice_of(base, node, bounds[index], (src,))
    base = match_projection(src)
    if base is None or base.rows is not None:
        return None
    v = val(node)
    rows = None if v is None else _last_dim_slice(index, base.out_features, v.dim())
    return None if rows is None else _slice_of(base, node, rows, ())


def _lora_projection(node) -> Projection | None:
    from spt_compile.patterns.lora import lora_projection  # lora.py builds on this module (import cycle)
    return lora_projection(node)


PROJECTION_MATCHERS: list[Callable[[fx.Node], Projection | None]] = [_lora_projection, plain_projection,
                                                                      sliced_projection]


def match_projection(node) -> Projection | None:
    """The projection whose output `node` is, or None."""
    if not isinstance(node, fx.Node):
        return None
    for matcher in PROJECTION_MATCHERS:
        p = matcher(node)
        if p is not None:
            return p
    return None


# --- helpers ----------------------------------------------------------------------------------

def _slice_of(base: Projection, node: fx.Node, rows: tuple[int, int], extra: tuple) -> Projection | None:
    if base.adapter is not None:  # a slice of an adapted fused projection: leave it to the adapter's matcher
        return None
    return dataclasses.replace(base, node=node, rows=rows, inner=(*extra, *base.nodes))


def _split_target(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("chunk", "split")
    return node.target in (torch.chunk, torch.split)


def _split_bounds(node: fx.Node, base: Projection | None) -> list[tuple[int, int]] | None:
    """[lo, hi) of each part of a chunk/split along the last dim of the projection's output."""
    if base is None or base.rows is not None:
        return None
    out = base.out_features
    args = list(node.args[1:])
    dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
    size = node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections", node.kwargs.get("split_size",
                                                                                  args[0] if args else None)))
    v = val(node.args[0])
    if v is None or not isinstance(dim, int) or dim % v.dim() != v.dim() - 1:
        return None
    name = node.target if node.op == "call_method" else node.target.__name__
    if name == "chunk":
        if not isinstance(size, int) or size < 1:
            return None
        step = -(-out // size)
        sizes = [min(step, out - i) for i in range(0, out, step)]
    elif isinstance(size, int) and size > 0:
        sizes = [min(size, out - i) for i in range(0, out, size)]
    elif isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size) and sum(size) == out:
        sizes = list(size)
    else:
        return None
    bounds, lo = [], 0
    for s in sizes:
        bounds.append((lo, lo + s))
        lo += s
    return bounds


def _last_dim_slice(index, width: int, ndim: int) -> tuple[int, int] | None:
    """(lo, hi) when `index` is `[..., a:b]` (or `[:, :, a:b]` of full leading slices) with step 1."""
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    lead = index[:-1]
    if not all(i is Ellipsis or i == slice(None) for i in lead):
        return None
    if Ellipsis not in lead and len(index) != ndim:
        return None
    s = index[-1]
    if s.step not in (None, 1) or not all(isinstance(b, (int, type(None))) for b in (s.start, s.stop)):
        return None
    lo, hi, _ = s.indices(width)
    return (lo, hi) if hi > lo else None
