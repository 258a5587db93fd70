"""Normalise the spellings of the ops our matchers look at, in place, on a Dynamo FX graph.

Dynamo records what the user wrote: `a @ b`, `torch.matmul(a, b)` and `a.matmul(b)` are three different nodes,
`softmax(x, -1)` and `x.softmax(dim=-1)` two more. The matchers only ever see the canonical spelling below, so
each pattern is written once. Rewriting a node's target to an equivalent callable changes nothing numerically.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

# canonical call_function targets
MATMUL = torch.matmul
SOFTMAX = F.softmax
DROPOUT = F.dropout
LINEAR = F.linear
SDPA = F.scaled_dot_product_attention
GELU = F.gelu
RELU = F.relu
SILU = F.silu

_FUNCTION_ALIASES = {
    operator.matmul: MATMUL,
    torch.bmm: MATMUL,
    torch.softmax: SOFTMAX,
    torch._C._nn.linear: LINEAR,
    torch._C._nn.scaled_dot_product_attention: SDPA,
    torch._C._nn.gelu: GELU,
    torch.relu: RELU,
    torch.nn.functional.relu: RELU,
    torch.dropout: DROPOUT,
    torch.mul: operator.mul,
    torch.div: operator.truediv,
    torch.true_divide: operator.truediv,
    torch.add: operator.add,
    torch.sub: operator.sub,
    torch.nn.functional.silu: SILU,
}

# method name -> (canonical function, how many leading positional args the method takes incl. self)
_METHOD_ALIASES = {
    "matmul": MATMUL,
    "bmm": MATMUL,
    "softmax": SOFTMAX,
    "relu": RELU,
    "mul": operator.mul,
    "div": operator.truediv,
    "add": operator.add,
    "sub": operator.sub,
}


def normalize_graph(graph: fx.Graph) -> int:
    """Canonicalise op spellings in place; returns how many nodes were changed."""
    changed = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTION_ALIASES:
            if _normalize_function(node):
                changed += 1
        elif node.op == "call_method" and node.target in _METHOD_ALIASES:
            if _normalize_method(node):
                changed += 1
        if node.op == "call_function" and node.target is SOFTMAX:
            _normalize_softmax_args(node)
        elif node.op == "call_function" and node.target is DROPOUT:
            _normalize_dropout_args(node)
        elif node.op == "call_function" and node.target is SDPA:
            _normalize_sdpa_args(node)
    return changed


def _normalize_function(node: fx.Node) -> bool:
    target = _FUNCTION_ALIASES[node.target]
    # torch.add(a, b, alpha=2) / torch.mul(..., out=...) are not plain binary ops: leave them alone
    if target in (operator.add, operator.sub, operator.mul, operator.truediv) and node.kwargs:
        return False
    if node.target is torch.dropout:  # torch.dropout(x, p, train) -> F.dropout(x, p, training)
        node.args, node.kwargs = (node.args[0],), {"p": node.args[1], "training": node.args[2]}
    node.target = target
    return True


def _normalize_method(node: fx.Node) -> bool:
    target = _METHOD_ALIASES[node.target]
    if target in (operator.add, operator.sub, operator.mul, operator.truediv) and (node.kwargs or len(node.args) != 2):
        return False
    node.op, node.target = "call_function", target
    return True


def _normalize_softmax_args(node: fx.Node) -> None:
    # F.softmax(input, dim=None, _stacklevel=3, dtype=None)
    args, kwargs = list(node.args), dict(node.kwargs)
    dim = kwargs.pop("dim", args[1] if len(args) > 1 else None)
    dtype = kwargs.pop("dtype", args[3] if len(args) > 3 else None)
    kwargs.pop("_stacklevel", None)
    node.args, node.kwargs = (args[0],), {"dim": dim, "dtype": dtype}


def _normalize_dropout_args(node: fx.Node) -> None:
    # F.dropout(input, p=0.5, training=True, inplace=False)
    args, kwargs = list(node.args), dict(node.kwargs)
    names = ("p", "training", "inplace")
    defaults = (0.5, True, False)
    out = {}
    for i, (name, default) in enumerate(zip(names, defaults)):
        out[name] = kwargs.pop(name, args[i + 1] if len(args) > i + 1 else default)
    node.args, node.kwargs = (args[0],), out


def _normalize_sdpa_args(node: fx.Node) -> None:
    # F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    args, kwargs = list(node.args), dict(node.kwargs)
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, 0.0, False, None, False)
    out = {}
    for i, (name, default) in enumerate(zip(names, defaults)):
        out[name] = kwargs.pop(name, args[i + 3] if len(args) > i + 3 else default)
    out.update(kwargs)
    node.args, node.kwargs = tuple(args[:3]), out
