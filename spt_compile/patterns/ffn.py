"""Find feed-forward sites in a (normalised) Dynamo graph.

    y = linear2(act(linear1(x)))                      ReLU, GELU (erf or tanh), SiLU — as one op or written out
    y = linear2(act(gate(x)) * up(x))                 gated (SwiGLU, GeGLU), either operand order
`linear` is `F.linear(x, W, b)` or GPT-2's `Conv1D` spelling `torch.addmm(b, x, W)` (W stored [in, out]); views
and reshapes between the projections are allowed when they keep the hidden dimension last.

The activation is recognised by what it computes, not how it is written: the elementwise region between the
projections is evaluated on probe values in float64 and compared with each known activation. So
`0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))` (GPT-2's new-GELU) is GELU-tanh in any order.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

from spt_compile.patterns import normalize as N
from spt_compile.patterns.graph_utils import is_call, is_view, val

ACTIVATIONS = {
    "relu": lambda x: torch.relu(x),
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": lambda x: F.silu(x),
}

_POINTWISE_FUNCTIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.pow, torch.tanh, torch.erf, torch.sigmoid, torch.exp, torch.neg, torch.square,
    F.gelu, F.relu, F.silu, torch.nn.functional.sigmoid, torch.nn.functional.tanh,
}
_POINTWISE_METHODS = {"tanh", "sigmoid", "pow", "exp", "neg", "erf", "square"}


@dataclasses.dataclass
class Projection:
    node: fx.Node          # the linear / addmm node
    x: fx.Node             # its input [..., d]
    weight: fx.Node        # W as stored
    bias: object           # fx.Node | None
    transposed: bool       # True when W is stored [in, out] (addmm / Conv1D): the op gets W.t()


@dataclasses.dataclass
class FfnMatch:
    output: fx.Node                # linear2 node: [..., d_out]
    up: Projection                 # first projection (the gate for gated FFNs)
    down: Projection
    activation: str
    gated_up: Projection | None = None
    interior: list[fx.Node] = dataclasses.field(default_factory=list)
    spelling: str = ""
    problem: str = ""

    @property
    def hidden(self) -> int:
        return int(val(self.up.node).shape[-1])


def find_ffn(graph: fx.Graph) -> list[FfnMatch]:
    matches = []
    for node in graph.nodes:
        down = _projection(node)
        if down is None:
            continue
        m = _match_from_down(down)
        if m is not None:
            matches.append(m)
    return matches


def _projection(node) -> Projection | None:
    if is_call(node, N.LINEAR):
        args = list(node.args) + [node.kwargs.get("bias")] * (3 - len(node.args))
        x, w, b = args[0], args[1], args[2]
        if val(w) is None or val(w).dim() != 2:
            return None
        return Projection(node, x, w, b, transposed=False)
    if is_call(node, torch.addmm) and not node.kwargs and len(node.args) == 3:
        b, x, w = node.args
        if val(w) is None or val(w).dim() != 2 or val(b) is None or val(b).dim() != 1:
            return None
        return Projection(node, x, w, b, transposed=True)
    return None


def _match_from_down(down: Projection) -> FfnMatch | None:
    region, leaves = _collect_region(down.x)
    if region is None or not 1 <= len(leaves) <= 2:
        return None
    hidden = val(down.x).shape[-1]
    for n in leaves:
        if val(n.node).shape[-1] != hidden:
            return None
    for n in region:
        v = val(n)
        if v is None or v.dim() == 0 or v.shape[-1] != hidden:
            return None
    if len(leaves) == 2 and leaves[0].x is not leaves[1].x:
        return None
    kind = _identify(region, leaves, down.x)
    if kind is None:
        return None
    activation, gate_first = kind
    if len(leaves) == 1:
        up, gated_up = leaves[0], None
        spelling = f"{'addmm' if up.transposed else 'linear'}+{activation}"
    else:
        up, gated_up = (leaves[0], leaves[1]) if gate_first else (leaves[1], leaves[0])
        spelling = f"gated {activation}"
    m = FfnMatch(output=down.node, up=up, down=down, activation=activation, gated_up=gated_up,
                 interior=region + [p.node for p in leaves], spelling=spelling)
    inside = set(m.interior) | {m.output}
    for n in m.interior:
        for u in n.users:
            if u not in inside:
                m.problem = f"FFN intermediate '{n.name}' is used outside the FFN (by '{u.name}')"
                break
        if m.problem:
            break
    return m


def _collect_region(h):
    """Walk back from the down projection's input through pointwise ops and views to projection leaves."""
    region: list[fx.Node] = []
    leaves: list[Projection] = []
    seen: set[fx.Node] = set()
    stack = [h]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        proj = _projection(n)
        if proj is not None:
            leaves.append(proj)
            continue
        if is_view(n):
            region.append(n)
            stack.append(n.args[0])
        elif (n.op == "call_function" and n.target in _POINTWISE_FUNCTIONS) or \
                (n.op == "call_method" and n.target in _POINTWISE_METHODS):
            if n.target is F.gelu and n.kwargs.get("approximate", "none") not in ("none", "tanh"):
                return None, []
            region.append(n)
            for a in list(n.args) + list(n.kwargs.values()):
                if isinstance(a, fx.Node):
                    stack.append(a)
                elif not isinstance(a, (int, float, str)) or isinstance(a, bool):
                    return None, []
        else:
            return None, []
    order = {n: i for i, n in enumerate(h.graph.nodes)}
    region.sort(key=order.__getitem__)
    leaves.sort(key=lambda p: order[p.node])
    return region, leaves


def _evaluate(region: list[fx.Node], out: fx.Node, env: dict) -> torch.Tensor:
    """Run the pointwise region on 1-D float64 probes (views are identities on a 1-D probe)."""
    env = dict(env)
    sub = lambda a: env[a] if isinstance(a, fx.Node) else a
    for n in region:
        if is_view(n):
            env[n] = env[n.args[0]]
            continue
        args = [sub(a) for a in n.args]
        kwargs = {k: sub(v) for k, v in n.kwargs.items()}
        if n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            env[n] = n.target(*args, **kwargs)
    return env[out]


def _identify(region, leaves, out):
    """(activation name, gate_is_first_leaf) if the region computes a known (gated) activation, else None."""
    g = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    u = torch.cos(torch.arange(241, dtype=torch.float64) * 0.7) * 3.0 + 0.1
    try:
        if len(leaves) == 1:
            y = _evaluate(region, out, {leaves[0].node: g})
            for name, f in ACTIVATIONS.items():
                if _close(y, f(g)):
                    return name, True
            return None
        y = _evaluate(region, out, {leaves[0].node: g, leaves[1].node: u})
        for name, f in ACTIVATIONS.items():
            if _close(y, f(g) * u):
                return name, True
            if _close(y, f(u) * g):
                return name, False
    except Exception:  # noqa: BLE001 - a region we cannot evaluate is simply not an FFN we know
        return None
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-6, atol=1e-9))
