"""Find feed-forward sites in a (normalised) Dynamo graph, and every candidate we cannot take.

    y = down(act(up(x)))                      ReLU, GELU (erf or tanh), SiLU: as a call, a module, or written out
    y = down(act(gate(x)) * up(x))            gated (SwiGLU, GeGLU), either operand order
`up`/`gate`/`down` are projections (patterns/projection.py: F.linear, GPT-2's Conv1D addmm, a chunk/slice of a
fused gate+up GEMM). Views, casts and identity dropouts (p=0 or eval) between the projections are allowed.

The activation is recognised by what it computes, not how it is written: the elementwise region between the
projections is evaluated on probe values in float64 and compared with each known activation. So
`0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))` (GPT-2's new-GELU) is GELU-tanh in any order.

Completeness: a candidate is every projection back to d (H -> d, H > d) fed, through elementwise ops, by a
projection d -> H (or a multiple of H: fused). An FFN with H <= d is matched too, but is no candidate: it is
listed only when it matches up to its activation (dropout, escapes and adapters are then still reported). Each candidate becomes an FfnMatch; one the matcher cannot take
carries `problem` (the reason) and `near_miss` (the step that failed):
    "region"      an op between the projections is not elementwise
    "dropout"     dropout with p > 0 in training between the projections (the op has none)
    "projections" not one projection (or a gate/up pair on the same input) feeding the region
    "activation"  the region computes no known (gated) activation
    "adapter"     a LoRA-adapted projection the op cannot take (patterns/lora.py says which: DoRA, dropout on down)
    "cut"         half an FFN: its other half is in another graph (a graph break, DDP's bucket split)
Low-rank pairs (LoRA's A -> B), routers and LM heads never form the d -> H -> d chain and are not candidates.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx

from spt_compile.patterns import normalize as N
from spt_compile.patterns.graph_utils import is_call, is_cast, is_view, module_path, val
from spt_compile.patterns.projection import Projection, match_projection

ACTIVATIONS = {
    "relu": lambda x: torch.relu(x),
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": lambda x: F.silu(x),
}

_POINTWISE_FUNCTIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.pow, torch.tanh, torch.erf, torch.sigmoid, torch.exp, torch.neg, torch.square,
    F.gelu, F.relu, F.silu, torch.nn.functional.sigmoid, torch.nn.functional.tanh, torch.mul, torch.add,
}
_POINTWISE_METHODS = {"tanh", "sigmoid", "pow", "exp", "neg", "erf", "square", "mul", "add"}
_SEARCH_DEPTH = 24  # nodes walked back from a down projection looking for its up projection


@dataclasses.dataclass
class FfnMatch:
    output: fx.Node                # down projection's output node: [..., d_out]
    up: Projection | None          # first projection (the gate for gated FFNs); None for a cut second half
    down: Projection | None
    activation: str = ""
    gated_up: Projection | None = None
    interior: list[fx.Node] = dataclasses.field(default_factory=list)
    spelling: str = ""
    problem: str = ""              # non-empty: a candidate that stays dense, and why
    near_miss: str = ""            # the matcher step that failed (see the module docstring)
    module: str = ""               # module path when it cannot be derived from up/down

    @property
    def hidden(self) -> int:
        node = self.up.node if self.up is not None else self.down.x
        return int(val(node).shape[-1])


class _Fail(Exception):
    def __init__(self, step: str, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


def find_ffn(graph: fx.Graph) -> list[FfnMatch]:
    projections = _projections(graph)
    matches, used = [], set()
    for down in list(projections.values()):
        ups = _candidate_ups(down, projections)
        if ups:
            m = _match_from_down(down, projections)
            if down.in_features <= down.out_features and m.near_miss in ("region", "projections", "activation"):
                continue  # H <= d is no candidate (a LoRA pair, a one-head attention's v -> o): taken if it matches
            used.update(p.node for p in ups)
            matches.append(m)
        elif down.in_features > down.out_features:
            cut = _cut_second_half(down, projections)
            if cut is not None:
                matches.append(cut)
    matches += _cut_first_halves(graph, projections, used)
    return matches


def _projections(graph: fx.Graph) -> dict[fx.Node, Projection]:
    """node -> Projection; the parts of a compound projection (a fused GEMM behind its slices, LoRA's A and B)
    are not projections of their own."""
    out: dict[fx.Node, Projection] = {}
    claimed: set[fx.Node] = set()
    for node in graph.nodes:
        p = match_projection(node)
        if p is None or val(p.weight) is None:
            continue
        out[node] = p
        claimed.update(p.inner)
    return {n: p for n, p in out.items() if n not in claimed}


# --- candidates -------------------------------------------------------------------------------

def _candidate_ups(down: Projection, projections) -> list[Projection]:
    """Projections d -> (multiple of) H reaching `down` (H -> d) through at most _SEARCH_DEPTH nodes whose last
    dim is a multiple of H: the candidate test, deliberately looser than the matcher."""
    hidden, d = down.in_features, down.out_features
    found, seen, stack = [], set(), [(down.x, 0)]
    while stack:
        n, depth = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or depth > _SEARCH_DEPTH:
            continue
        seen.add(n)
        p = projections.get(n)
        if p is not None:
            if p.in_features == d and p.out_features % hidden == 0:
                found.append(p)
            continue
        v = val(n)
        if n.op not in ("call_function", "call_method") or v is None or v.dim() == 0 or v.shape[-1] % hidden:
            continue
        stack.extend((a, depth + 1) for a in n.all_input_nodes)
    return found


def _match_from_down(down: Projection, projections) -> FfnMatch:
    m = FfnMatch(output=down.node, up=None, down=down)
    try:
        region, leaves = _collect_region(down.x, projections)
        projs = [projections[n] for n in leaves if n in projections]
        _check_leaves(down, leaves, projs)
        m.up = projs[0]
        activation, gate_first = _identify(region, leaves, down.x)
        _assign(m, projs, activation, gate_first, region)
        _check_adapters(m)
        _check_escapes(m)
    except _Fail as e:
        m.problem, m.near_miss = e.reason, e.step
        if m.up is None:
            m.up = (_candidate_ups(down, projections) or [None])[0]
    if m.up is None:
        m.module = module_path(down.node)
    return m


def _check_leaves(down: Projection, leaves: list[fx.Node], projs: list[Projection]) -> None:
    if len(projs) != len(leaves) or not 1 <= len(projs) <= 2:
        raise _Fail("projections", f"{len(leaves)} inputs feed the ops before '{down.node.name}'; an FFN has one "
                                   f"projection, or a gate and an up projection")
    if len(projs) == 2 and projs[0].x is not projs[1].x:
        raise _Fail("projections", f"gate '{projs[0].node.name}' and up '{projs[1].node.name}' read different inputs")
    for p in projs:
        if p.in_features != down.out_features or p.out_features != down.in_features:
            raise _Fail("projections", f"'{p.node.name}' maps {p.in_features} -> {p.out_features}, not "
                                       f"{down.out_features} -> {down.in_features}")


def _assign(m: FfnMatch, projs, activation: str, gate_first: bool, region) -> None:
    m.activation = activation
    if len(projs) == 1:
        m.up, m.gated_up = projs[0], None
        m.spelling = f"{'addmm' if m.up.transposed else 'linear'}+{activation}"
    else:
        m.up, m.gated_up = (projs[0], projs[1]) if gate_first else (projs[1], projs[0])
        fused = " (fused gate+up)" if projs[0].rows is not None else ""
        m.spelling = f"gated {activation}{fused}"
    inner = [n for p in projs for n in p.nodes]
    m.interior = region + list(dict.fromkeys(inner))


def _check_adapters(m: FfnMatch) -> None:
    from spt_compile.patterns.lora import adapter_problem  # LoRA adapters go into the op (patterns/lora.py)
    problem = adapter_problem((("first", m.up), ("up", m.gated_up), ("down", m.down)))
    if problem:
        raise _Fail("adapter", problem)


def _check_escapes(m: FfnMatch) -> None:
    inside = set(m.interior) | {m.output} | set(m.down.nodes if m.down is not None else ())  # (LoRA's A reads h)
    for n in m.interior:
        for u in n.users:
            if u in inside:
                continue
            if u.op == "output":
                raise _Fail("cut", f"cut by a graph break/split (or returned): FFN intermediate '{n.name}' is an "
                                   f"output of this graph")
            raise _Fail("escape", f"FFN intermediate '{n.name}' is used outside the FFN (by '{u.name}')")


# --- halves cut apart by graph breaks / splits -------------------------------------------------

def _cut_second_half(down: Projection, projections) -> FfnMatch | None:
    """`down(act(h))` where h is an input of this graph: the up projection ran in the previous graph."""
    try:
        region, leaves = _collect_region(down.x, projections, inputs_are_leaves=True)
    except _Fail:
        return None
    if len(leaves) not in (1, 2) or any(n.op != "placeholder" for n in leaves) or not region:
        return None
    try:
        activation, _ = _identify(region, leaves, down.x)
    except _Fail:
        return None
    return FfnMatch(output=down.node, up=None, down=down, activation=activation, spelling=f"half ffn ({activation})",
                    problem=f"cut by a graph break/split: the up projection is in another graph ('{down.node.name}' "
                            f"reads graph input '{leaves[0].name}' through {activation})",
                    near_miss="cut", module=_parent_module(down.node))


def _cut_first_halves(graph: fx.Graph, projections, used: set) -> list[FfnMatch]:
    """`act(up(x))` returned from this graph: the down projection runs in the next graph."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    out = []
    for o in dict.fromkeys(output.all_input_nodes):
        if o in projections:
            continue
        try:
            region, leaves = _collect_region(o, projections)
            projs = [projections[n] for n in leaves if n in projections]
            if not projs or len(projs) != len(leaves) or any(p.node in used for p in projs):
                continue
            if any(p.in_features >= p.out_features for p in projs):
                continue
            activation, _ = _identify(region, leaves, o)
        except _Fail:
            continue
        used.update(p.node for p in projs)
        out.append(FfnMatch(output=o, up=projs[0], down=None, activation=activation,
                            spelling=f"half ffn ({activation})", near_miss="cut", module=_parent_module(projs[0].node),
                            problem=f"cut by a graph break/split: '{o.name}' = {activation}(up projection) is an "
                                    f"output of this graph; the down projection is in another graph"))
    return out


# --- the region between the projections ------------------------------------------------------

def _collect_region(h, projections, inputs_are_leaves: bool = False):
    """Walk back from the down projection's input through elementwise ops, views, casts and identity dropouts to
    the projections (or, for a cut half, graph inputs). Raises _Fail naming the first op that is none of these."""
    region: list[fx.Node] = []
    leaves: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [h]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n in projections or (inputs_are_leaves and n.op == "placeholder"):
            leaves.append(n)
            continue
        if is_cast(n) and val(n).dtype != val(n.args[0]).dtype:
            raise _Fail("region", f"cast '{n.name}' changes the dtype between the projections")
        if is_view(n) or is_cast(n):
            region.append(n)
            stack.append(n.args[0])
        elif is_call(n, N.DROPOUT):
            _check_dropout(n)
            region.append(n)
            stack.append(n.args[0])
        elif _is_pointwise(n):
            if n.target is F.gelu and n.kwargs.get("approximate", "none") not in ("none", "tanh"):
                raise _Fail("activation", f"gelu(approximate={n.kwargs.get('approximate')!r}) is not supported")
            region.append(n)
            for a in list(n.args) + list(n.kwargs.values()):
                if isinstance(a, fx.Node):
                    stack.append(a)
                elif not isinstance(a, (int, float, str, bool)):
                    raise _Fail("region", f"'{n.name}' takes a non-constant argument {a!r}")
        else:
            what = n.target if n.op != "call_function" else getattr(n.target, "__name__", n.target)
            raise _Fail("region", f"'{n.name}' ({n.op} {what}) between the projections is not an elementwise op")
    order = {n: i for i, n in enumerate(h.graph.nodes)}
    region.sort(key=order.__getitem__)
    leaves.sort(key=order.__getitem__)
    return region, leaves


def _parent_module(projection: fx.Node) -> str:
    """The module holding a projection (the MLP), for a half FFN whose other projection is not in this graph."""
    path = module_path(projection)
    return path.rsplit(".", 1)[0] if "." in path else "<root>"


def _is_pointwise(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _POINTWISE_FUNCTIONS) or \
        (n.op == "call_method" and n.target in _POINTWISE_METHODS)


def _check_dropout(n: fx.Node) -> None:
    if n.kwargs.get("inplace"):
        raise _Fail("dropout", f"in-place dropout '{n.name}' between the projections")
    p, training = n.kwargs.get("p"), n.kwargs.get("training")
    if not isinstance(p, (int, float)) or not isinstance(training, bool):
        raise _Fail("dropout", f"dropout '{n.name}' with a non-constant probability or training flag")
    if training and p > 0:
        raise _Fail("dropout", f"dropout p={p} between the projections in training: the routed FFN op has no "
                               f"dropout (train with it off, or it stays dense)")


def _evaluate(region: list[fx.Node], out: fx.Node, env: dict) -> torch.Tensor:
    """Run the region on 1-D float64 probes (views, casts and identity dropouts are identities on a probe)."""
    env = dict(env)
    sub = lambda a: env[a] if isinstance(a, fx.Node) else a
    for n in region:
        if is_view(n) or is_cast(n) or is_call(n, N.DROPOUT):
            env[n] = env[n.args[0]]
            continue
        args = [sub(a) for a in n.args]
        kwargs = {k: sub(v) for k, v in n.kwargs.items() if k != "inplace"}  # never modify a probe
        if n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            env[n] = n.target(*args, **kwargs)
    return env[out]


def _identify(region, leaves, out):
    """(activation name, gate_is_first_leaf) if the region computes a known (gated) activation; else _Fail."""
    g = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    u = torch.cos(torch.arange(241, dtype=torch.float64) * 0.7) * 3.0 + 0.1
    try:
        if len(leaves) == 1:
            y = _evaluate(region, out, {leaves[0]: g})
            for name, f in ACTIVATIONS.items():
                if _close(y, f(g)):
                    return name, True
        else:
            y = _evaluate(region, out, {leaves[0]: g, leaves[1]: u})
            for name, f in ACTIVATIONS.items():
                if _close(y, f(g) * u):
                    return name, True
                if _close(y, f(u) * g):
                    return name, False
    except Exception as e:  # noqa: BLE001 - a region we cannot evaluate is not an FFN we know
        raise _Fail("activation", f"the ops between the projections could not be evaluated ({e})") from None
    known = ", ".join(ACTIVATIONS)
    raise _Fail("activation", f"the ops between the projections compute none of {known}"
                              f"{' (gated)' if len(leaves) == 2 else ''}")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-6, atol=1e-9))
