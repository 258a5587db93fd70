"""LoRA-adapted projections: `base(x) + scaling * lora_B(lora_A(dropout(x)))`, as graph nodes.

PEFT's LoraLayer computes exactly this for every active adapter (a chain of adds for several; an inactive or
disabled adapter leaves no nodes), and the same formula written by hand gives the same graph:
    base       F.linear(x, W, b), or GPT-2's Conv1D `addmm(b, x.view(-1, d), W).view(...)` (fan_in_fan_out)
    lora_A/B   F.linear without bias, rank r < min(in, out)
    scaling    `* s`, `s *`, `/ c` with a Python number, or absent (1)
    dropout    F.dropout on the adapter's input, or none (PEFT's p=0 is an nn.Identity)
`lora_projection(node)` returns a Projection (patterns/projection.py) whose `adapter` is an `Adapter`. An add of a
base projection and a term that reads x through low-rank linears but is not this formula (PEFT's DoRA:
`use_dora=True` scales it by a weight-norm magnitude) comes back with `adapter.problem` set: that site stays dense
with the reason. `lora_op_args` turns the adapters of an FFN into the extra arguments of torch.ops.spt.routed_ffn.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from spt_compile.patterns import normalize as N
from spt_compile.patterns.graph_utils import is_call, is_cast, is_view, val
from spt_compile.patterns.projection import Projection, match_projection, plain_projection


@dataclasses.dataclass(frozen=True)
class LoraTerm:
    """One adapter term `scaling * B(A(dropout(x)))`."""
    a: Projection                    # A: in -> r (a.node is A·dropout(x), the op's u for gate/up adapters)
    b: Projection                    # B: r -> out
    scaling: float
    dropout: fx.Node | None          # the dropout node on the adapter's input, if any
    dropout_p: float                 # its p when active in training, else 0.0
    nodes: tuple[fx.Node, ...]       # the term's own nodes (A, B, scaling, dropout)


@dataclasses.dataclass(frozen=True)
class Adapter:
    terms: tuple[LoraTerm, ...] = ()
    problem: str = ""                # non-empty: an adapter we see but cannot take (the site stays dense)


def lora_projection(node) -> Projection | None:
    """The adapted projection whose output is `node` (an add), or None."""
    if not (isinstance(node, fx.Node) and _is_plain_add(node)):
        return None
    for base_node, term_node in (node.args, node.args[::-1]):
        base = _base_projection(base_node)
        if base is None:
            continue
        prior = base.adapter if isinstance(base.adapter, Adapter) else Adapter()
        term = _lora_term(term_node, base.x)
        if term is not None:
            adapter = Adapter(prior.terms + (term,), prior.problem)
            return dataclasses.replace(base, node=node, adapter=adapter, inner=(*term.nodes, *base.nodes))
    return _unknown_adapter(node)


def _is_plain_add(node: fx.Node) -> bool:
    return (is_call(node, operator.add) or is_call(node, torch.add)) and len(node.args) == 2 and not node.kwargs


def _base_projection(node) -> Projection | None:
    """A projection (possibly already adapted), or Conv1D's `view(addmm(b, x.view(-1, d), W))` seen from the
    3-D side: then x is the un-flattened input, as LoRA's A reads it."""
    p = match_projection(node)
    if p is not None:
        return p
    if not (isinstance(node, fx.Node) and is_view(node)):
        return None
    p = plain_projection(node.args[0])
    if p is None or not p.transposed or not (isinstance(p.x, fx.Node) and is_view(p.x)):
        return None
    x3d = p.x.args[0]
    vx, vo = val(x3d), val(node)
    if vx is None or vo is None or tuple(vx.shape[:-1]) != tuple(vo.shape[:-1]):
        return None  # the views do not restore x's token layout
    return dataclasses.replace(p, node=node, x=x3d, inner=(p.node, p.x))


def _scaled(node):
    """(inner node, scaling) of `inner * s`, `s * inner`, `inner / c`, or (node, 1.0)."""
    if is_call(node, operator.mul) and len(node.args) == 2:
        a0, a1 = node.args
        inner, s = (a0, a1) if _number(a1) else (a1, a0)
        return (inner, float(s)) if _number(s) else (None, None)
    if is_call(node, operator.truediv) and len(node.args) == 2 and _number(node.args[1]) and node.args[1] != 0:
        return node.args[0], 1.0 / float(node.args[1])
    return node, 1.0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _lora_term(node, x) -> LoraTerm | None:
    if not isinstance(node, fx.Node):
        return None
    inner, scaling = _scaled(node)
    b = plain_projection(inner) if isinstance(inner, fx.Node) else None
    a = plain_projection(b.x) if b is not None else None
    if a is None or a.transposed or b.transposed or a.bias is not None or b.bias is not None:
        return None
    if a.out_features >= min(a.in_features, b.out_features) or len(a.node.users) != 1:
        return None  # not a low-rank pair of its own
    src, drop, p, casts = a.x, None, 0.0, []
    # PEFT casts the adapter's input to lora_A's dtype (a no-op, or under autocast fp32 -> the autocast linear);
    # a real dtype change without autocast has mismatched weights, which adapter_problem refuses
    while is_cast(src) or is_call(src, N.DROPOUT):
        if is_call(src, N.DROPOUT):
            drop, p = src, _dropout_p(src)
        else:
            casts.append(src)
        src = src.args[0]
    if src is not x:
        return None
    nodes = tuple(n for n in (node, inner, b.node, a.node, drop, *casts) if n is not None)
    return LoraTerm(a, b, scaling, drop, p, tuple(dict.fromkeys(nodes)))


def _dropout_p(node: fx.Node) -> float:
    """p of an F.dropout node when it is active (training), else 0."""
    args = list(node.args) + [None] * 4
    p = node.kwargs.get("p", args[1] if args[1] is not None else 0.5)
    training = node.kwargs.get("training", args[2] if args[2] is not None else True)
    return float(p) if training is True else 0.0


_UNKNOWN_DEPTH = 12  # nodes walked back from an add looking for a base projection and a low-rank pair


def _unknown_adapter(node: fx.Node) -> Projection | None:
    """An add combining a base projection P with a low-rank pair B(A(x)) that reads P's input, in a way that is
    not the LoRA formula (PEFT's DoRA scales both by a weight-norm magnitude; another adapter kind): P with
    `adapter.problem` set, so the FFN it belongs to stays dense with that reason. Already-matched projections
    are opaque to the walk (a residual add after an adapted projection is not an adapter)."""
    bases, pairs, seen, stack = [], [], set(), [(a, 0) for a in node.all_input_nodes]
    while stack:
        n, depth = stack.pop()
        if n in seen or depth > _UNKNOWN_DEPTH:
            continue
        seen.add(n)
        if _looks_adapted(n):
            continue  # an adapted projection of its own (e.g. before a residual add)
        p = plain_projection(n)
        if p is not None:
            a = plain_projection(p.x)
            low_rank = a is not None and a.out_features < min(a.in_features, p.out_features)
            (pairs if low_rank else bases).append((a, p) if low_rank else p)
            continue
        stack.extend((i, depth + 1) for i in n.all_input_nodes)
    for base in bases:
        if any(_reads(a.x, base.x) for a, _ in pairs):
            kind = "DoRA (use_dora=True)" if _mentions(seen, "magnitude") else "an unknown adapter kind"
            problem = (f"adapter on projection '{base.node.name}' is {kind}, not plain LoRA "
                       f"base(x) + s * B(A(x)): not supported, stays dense")
            return dataclasses.replace(base, node=node, adapter=Adapter((), problem), inner=(*base.nodes,))
    return None


def _looks_adapted(n) -> bool:
    """An add of a LoRA term and a plain (or Conv1D) projection, or of a LoRA term and such an add (several
    adapters) on the same input: a cheap check that never calls match_projection, so the walk above stays
    linear in the graph size."""
    if not (isinstance(n, fx.Node) and _is_plain_add(n)):
        return False
    for base_node, term_node in (n.args, n.args[::-1]):
        if not isinstance(base_node, fx.Node):
            continue
        if _is_plain_add(base_node):
            base_x = _first_base_x(base_node)
            if base_x is not None and _looks_adapted(base_node) and _lora_term(term_node, base_x) is not None:
                return True
            continue
        base = plain_projection(base_node) or (_base_projection(base_node) if is_view(base_node) else None)
        if base is not None and _lora_term(term_node, base.x) is not None:
            return True
    return False


def _first_base_x(n):
    """The input x of the innermost base projection of a chain of adapter adds (None if there is none)."""
    while isinstance(n, fx.Node) and _is_plain_add(n):
        n = n.args[0] if isinstance(n.args[0], fx.Node) else n.args[1]
    p = plain_projection(n) if isinstance(n, fx.Node) else None
    return p.x if p is not None else None


def _reads(n, x) -> bool:
    return n is x or (is_call(n, N.DROPOUT) and n.args[0] is x)


def _mentions(nodes, word: str) -> bool:
    return any(word in n.name or any(word in str(k) for k in (n.meta.get("nn_module_stack") or {})) for n in nodes)


# --- the op's arguments ------------------------------------------------------------------------

def adapters_of(p: Projection | None) -> tuple[LoraTerm, ...]:
    return p.adapter.terms if p is not None and isinstance(p.adapter, Adapter) else ()


def adapter_problem(projections) -> str:
    """Why the adapters of these projections (gate/first, up, down) cannot go into the op, or ""."""
    for role, p in projections:
        if p is None or p.adapter is None:
            continue
        if not isinstance(p.adapter, Adapter):
            return f"{role} projection '{p.node.name}': adapter kind not supported"
        if p.adapter.problem:
            return p.adapter.problem
        for t in p.adapter.terms:
            # weights only: under autocast fp32 weights feed bf16 activations, which the op's autocast handles
            dtypes = {getattr(val(n), "dtype", None) for n in (p.weight, t.a.weight, t.b.weight)}
            if len(dtypes) != 1:
                return (f"{role} projection '{p.node.name}': adapter dtypes {sorted(map(str, dtypes))} differ from "
                        f"the base's (e.g. PEFT's fp32 adapters on a half-precision base): the op runs one dtype")
        if role == "down" and any(t.dropout_p > 0 for t in p.adapter.terms):
            ps = sorted({t.dropout_p for t in p.adapter.terms})
            return (f"LoRA dropout p={ps[-1]} on the down projection's adapter: its input is the FFN's hidden "
                    f"activation inside the op, which has no dropout (use lora_dropout=0, or eval mode)")
    return ""


def lora_op_args(up: Projection, gated_up: Projection | None, down: Projection, add) -> tuple:
    """(lora_u1, lora_b1, lora_s1, lora_u_up, lora_b_up, lora_s_up, lora_a2, lora_b2, lora_s2) for
    torch.ops.spt.routed_ffn, created with `add(op, target, args)` (rewrite's inserter).

    Gate/up adapters pass u = A·dropout(x), the graph's own node, so dropout and the gradient to A and x stay
    with autograd; several adapters on one projection are stacked into one of rank Σr (u = cat(s_i u_i),
    B = cat(B_i), s = 1); the down adapters likewise (A = cat(A_i), B = cat(s_i B_i))."""
    return _input_adapter(adapters_of(up), add) + _input_adapter(adapters_of(gated_up), add) + \
        _down_adapter(adapters_of(down), add)


def _input_adapter(terms, add) -> tuple:
    if not terms:
        return (None, None, 1.0)
    if len(terms) == 1:
        return (terms[0].a.node, terms[0].b.weight, terms[0].scaling)
    us = [t.a.node if t.scaling == 1.0 else add("call_function", operator.mul, (t.a.node, t.scaling))
          for t in terms]
    u = add("call_function", torch.cat, (us, -1))
    b = add("call_function", torch.cat, ([t.b.weight for t in terms], 1))
    return (u, b, 1.0)


def _down_adapter(terms, add) -> tuple:
    if not terms:
        return (None, None, 1.0)
    if len(terms) == 1:
        return (terms[0].a.weight, terms[0].b.weight, terms[0].scaling)
    a = add("call_function", torch.cat, ([t.a.weight for t in terms], 0))
    bs = [t.b.weight if t.scaling == 1.0 else add("call_function", operator.mul, (t.b.weight, t.scaling))
          for t in terms]
    b = add("call_function", torch.cat, (bs, 1))
    return (a, b, 1.0)


def adapters_note(m) -> list[str]:
    """The report's note on an FfnMatch's adapters, e.g. ["LoRA on gate (r=16), up (r=16), down (r=16)"]."""
    parts = []
    for role, p in (("gate" if m.gated_up is not None else "up", m.up), ("up", m.gated_up), ("down", m.down)):
        terms = adapters_of(p)
        if terms:
            ranks = "+".join(str(t.a.out_features) for t in terms)
            parts.append(f"{role} (r={ranks})")
    return [f"LoRA on {', '.join(parts)}"] if parts else []
