"""Find attention sites in a (normalised) Dynamo graph, and every candidate we cannot take.

Two spellings are recognised:
- `scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`;
- eager attention, walked backwards from the output matmul:
      out = dropout?(cast*(softmax(S, dim=-1, dtype?))) @ v
      S   = a chain of: scale (mul/div by a constant, before or after the mask), additive masks (`+ bias`),
            boolean masks (`torch.where(m, S, fill)`, `S.masked_fill(m, fill)`), casts, ending in `q @ kᵀ`
            (q or kᵀ may carry the scale too) or `baddbmm(bias, q, kᵀ, beta, alpha)` (ALiBi folded into the
            score GEMM); q, k, v are [B, H, N, D] or [B*H, N, D] (bmm spellings).
  Grouped-query attention spelled with HF's `repeat_kv` (index None → expand → reshape) is undone, so the op
  sees the kv heads once.
Completeness: every SDPA call and every `softmax(...) → (dropout, casts) → @ V` is a candidate. One the matcher
cannot take is still returned, with `problem` (the reason) and `near_miss` (the step that failed: "weights" —
the ops between softmax and ·V, "softmax", "scores" — an op in the score chain, "qk" — the score GEMM).
The matcher only describes what it found (an AttentionMatch); whether to rewrite is decided in plan.py.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch import fx

from spt_compile.patterns import normalize as N
from spt_compile.patterns.graph_utils import const_number, is_binary, is_call, is_cast, is_view, val

@dataclasses.dataclass
class AttentionMatch:
    output: fx.Node                 # the node whose value the op replaces: [B, H, Nq, Dv]
    q: fx.Node                      # [B, H, Nq, D]
    k: fx.Node                      # [B, Hkv, Nk, D], or Kᵀ [B, Hkv, D, Nk] when k_transposed
    v: fx.Node                      # [B, Hkv, Nk, Dv]
    spelling: str                   # "sdpa" | "eager"
    k_transposed: bool = False
    scale: float | None = None      # None: 1/sqrt(D)
    additive: list[tuple[fx.Node, float]] = dataclasses.field(default_factory=list)   # (bias, multiplier)
    where_bias: list[tuple[fx.Node, bool, float, float]] = dataclasses.field(default_factory=list)
    # ^ (cond, keep_when_true, fill, multiplier): S <- where(cond, S, fill) with a finite fill, i.e. bias where(cond, 0, fill)
    bool_masks: list[tuple[fx.Node, bool]] = dataclasses.field(default_factory=list)  # (mask, keep_when_true)
    is_causal: bool = False
    dropout_p: float = 0.0
    enable_gqa: bool = False
    interior: list[fx.Node] = dataclasses.field(default_factory=list)  # replaced nodes besides `output`
    kv_repeat: int = 1              # >1 when repeat_kv was undone
    problem: str = ""               # non-empty: matched, but cannot be rewritten safely (the reason)
    near_miss: str = ""             # a candidate the matcher gave up on: the step that failed
    batch_heads_flat: bool = False  # q, k, v are [B*H, N, D] (bmm spellings): the op sees [1, B*H, N, D]


class _Fail(Exception):
    def __init__(self, step: str, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


def find_attention(graph: fx.Graph) -> list[AttentionMatch]:
    matches = []
    for node in graph.nodes:
        if is_call(node, N.SDPA):
            matches.append(_match_sdpa(node))
        elif is_call(node, N.MATMUL) and _fed_by_softmax(node.args[0]):
            try:
                matches.append(_match_eager(node))
            except _Fail as e:
                matches.append(AttentionMatch(output=node, q=None, k=None, v=node.args[1], spelling="eager",
                                              problem=e.reason, near_miss=e.step))
        elif is_call(node, torch.einsum) and any(_fed_by_softmax(a) for a in node.args[1:]):
            matches.append(AttentionMatch(output=node, q=None, k=None, v=None, spelling="einsum", near_miss="weights",
                                          problem=f"softmax weights applied with einsum({node.args[0]!r}): only "
                                                  f"matmul/bmm spellings of ·V are matched"))
    for m in matches:
        if not m.problem:
            m.problem = _check_escapes(m)
        if not m.problem:
            _undo_repeat_kv(m)
    return matches


def _match_sdpa(node: fx.Node) -> AttentionMatch:
    q, k, v = node.args[:3]
    kw = node.kwargs
    m = AttentionMatch(output=node, q=q, k=k, v=v, spelling="sdpa", is_causal=bool(kw["is_causal"]),
                       dropout_p=kw["dropout_p"], enable_gqa=bool(kw.get("enable_gqa", False)))
    if kw["scale"] is not None:
        s = const_number(kw["scale"])
        if s is None:
            m.problem = "scale is not a compile-time constant"
        m.scale = s
    if not isinstance(m.dropout_p, (int, float)):
        m.problem = "dropout_p is not a compile-time constant"
    mask = kw["attn_mask"]
    if mask is not None:
        mv = val(mask)
        if mv is None:
            m.problem = "attn_mask is not a tensor"
        elif mv.dtype == torch.bool:
            m.bool_masks.append((mask, True))
        else:
            m.additive.append((mask, 1.0))
    return m


def _fed_by_softmax(p, depth: int = 8) -> bool:
    """Whether the left operand of a matmul is a softmax, through dropout, casts and views: a candidate."""
    while depth > 0 and isinstance(p, fx.Node):
        depth -= 1
        if is_call(p, N.SOFTMAX):
            return True
        if not (is_call(p, N.DROPOUT) or is_cast(p) or is_view(p)):
            return False
        p = p.args[0]
    return False


def _match_eager(pv: fx.Node) -> AttentionMatch:
    """out = P @ v with P a softmax over scores S = f(q @ kᵀ); raises _Fail naming the step that failed."""
    p, v = pv.args[0], pv.args[1]
    interior: list[fx.Node] = []
    dropout_p = 0.0
    if is_call(p, N.DROPOUT):
        if not isinstance(p.kwargs["p"], (int, float)) or not isinstance(p.kwargs["training"], bool):
            raise _Fail("weights", f"dropout '{p.name}' with a non-constant probability or training flag")
        if p.kwargs["training"] and p.kwargs["p"]:
            dropout_p = p.kwargs["p"]
        if p.kwargs.get("inplace"):
            raise _Fail("weights", f"in-place dropout '{p.name}' on the attention weights")
        interior.append(p)
        p = p.args[0]
    while is_cast(p):
        interior.append(p)
        p = p.args[0]
    if not is_call(p, N.SOFTMAX):
        raise _Fail("weights", f"'{p.name}' between the softmax and ·V is not a dropout or a cast "
                               f"(e.g. a view between [B, H, N, N] and [B*H, N, N])")
    sv = val(p)
    dim = p.kwargs["dim"]
    if sv is None or dim not in (-1, sv.dim() - 1):
        raise _Fail("softmax", f"softmax '{p.name}' over dim {dim}, not over the keys (the last dim)")
    interior.append(p)
    m = AttentionMatch(output=pv, q=None, k=None, v=v, spelling="eager", dropout_p=dropout_p)  # type: ignore[arg-type]
    s = p.args[0]
    acc = 1.0  # multiplier applied to everything upstream of the current point
    for _ in range(32):
        if is_cast(s):
            interior.append(s)
            s = s.args[0]
        elif is_binary(s, operator.mul) and _scalar_side(s) is not None:
            c, s_next = _scalar_side(s)
            acc *= c
            interior.append(s)
            s = s_next
        elif is_binary(s, operator.truediv) and const_number(s.args[1]) is not None:
            acc /= const_number(s.args[1])
            interior.append(s)
            s = s.args[0]
        elif is_binary(s, operator.add, operator.sub):
            chain, other = _chain_side(s)
            if chain is None:
                raise _Fail("scores", f"'{s.name}': neither or both operands come from the score GEMM")
            sign = -1.0 if (s.target is operator.sub and other is s.args[1]) else 1.0
            if s.target is operator.sub and chain is s.args[1]:
                raise _Fail("scores", f"'{s.name}' computes bias - S")  # not a masked score
            if isinstance(other, fx.Node):
                m.additive.append((other, acc * sign))
            elif const_number(other) is None:
                raise _Fail("scores", f"'{s.name}' adds a non-constant non-tensor {other!r}")
            # a constant offset cancels in softmax: nothing to keep
            interior.append(s)
            s = chain
        elif is_call(s, torch.where) and len(s.args) == 3:
            cond, a, b = s.args
            if _reaches_qk(a) and const_number(b) is not None:
                keep, fill, s_next = True, const_number(b), a
            elif _reaches_qk(b) and const_number(a) is not None:
                keep, fill, s_next = False, const_number(a), b
            else:
                raise _Fail("scores", f"torch.where '{s.name}' does not select between the scores and a constant")
            if not _add_fill_mask(m, cond, keep, fill, acc):
                raise _Fail("scores", f"torch.where '{s.name}': the condition is not a bool tensor or the fill is +inf/nan")
            interior.append(s)
            s = s_next
        elif isinstance(s, fx.Node) and s.op == "call_method" and s.target == "masked_fill" and len(s.args) == 3:
            fill = const_number(s.args[2])
            if fill is None or not _add_fill_mask(m, s.args[1], False, fill, acc):
                raise _Fail("scores", f"masked_fill '{s.name}' with a non-constant fill or a non-bool mask")
            interior.append(s)
            s = s.args[0]
        elif is_call(s, N.MATMUL) or _baddbmm_args(s) is not None:
            break
        else:
            what = s.target if not isinstance(s, fx.Node) or s.op != "call_function" else \
                getattr(s.target, "__name__", s.target)
            raise _Fail("scores", f"'{getattr(s, 'name', s)}' ({what}) in the score chain is not a scale, mask, "
                                  f"cast or the score GEMM")
    else:
        raise _Fail("scores", "the score chain is longer than 32 ops")
    qk = s
    interior.append(qk)
    if is_call(qk, N.MATMUL):
        q, kt = qk.args[0], qk.args[1]
    else:  # baddbmm: S = beta * bias + alpha * q @ kᵀ, then the chain's multiplier acc on top
        bias, q, kt, beta, alpha = _baddbmm_args(qk)
        if beta != 0.0:
            m.additive.append((bias, acc * beta))
        acc *= alpha
    for _ in range(2):  # scale folded into q or kᵀ before the matmul
        if is_binary(q, operator.mul) and _scalar_side(q) is not None and len(q.users) == 1:
            c, q_next = _scalar_side(q)
            acc *= c
            interior.append(q)
            q = q_next
        elif is_binary(q, operator.truediv) and const_number(q.args[1]) is not None and len(q.users) == 1:
            acc /= const_number(q.args[1])
            interior.append(q)
            q = q.args[0]
        if is_binary(kt, operator.mul) and _scalar_side(kt) is not None and len(kt.users) == 1:
            c, kt_next = _scalar_side(kt)
            acc *= c
            interior.append(kt)
            kt = kt_next
    m.q, m.scale = q, acc
    kv_ = val(kt)
    if _is_last_two_transpose(kt) and len(kt.users) == 1:
        interior.append(kt)
        m.k, m.k_transposed = kt.args[0], False
    else:
        m.k, m.k_transposed = kt, True
    m.interior = interior
    qv_, vv_ = val(q), val(v)
    if qv_ is None or kv_ is None or vv_ is None:
        raise _Fail("qk", "q, k or v has no traced tensor value")
    if not (qv_.dim() == kv_.dim() == vv_.dim() and qv_.dim() in (3, 4)):
        raise _Fail("qk", f"q, kᵀ, v have {qv_.dim()}, {kv_.dim()}, {vv_.dim()} dims; expected 4 ([B, H, N, D]) "
                          f"or 3 ([B*H, N, D]) each")
    if qv_.shape[-1] != kv_.shape[-2] or kv_.shape[-1] != vv_.shape[-2]:
        raise _Fail("qk", "q·kᵀ·v shapes do not chain")
    m.batch_heads_flat = qv_.dim() == 3
    return m


def _baddbmm_args(node):
    """(bias, batch1, batch2, beta, alpha) of `torch.baddbmm(bias, b1, b2, beta=, alpha=)` / `bias.baddbmm(...)`
    with constant beta and alpha; None otherwise."""
    if not isinstance(node, fx.Node) or not ((node.op == "call_function" and node.target is torch.baddbmm) or
                                             (node.op == "call_method" and node.target == "baddbmm")):
        return None
    args, kw = list(node.args), dict(node.kwargs)
    names = ("input", "batch1", "batch2")
    vals = [kw.pop(n, args[i] if i < len(args) else None) for i, n in enumerate(names)]
    beta, alpha = kw.pop("beta", 1.0), kw.pop("alpha", 1.0)
    if kw or len(args) > 3 or any(not isinstance(x, fx.Node) for x in vals):
        return None
    if const_number(beta) is None or const_number(alpha) is None:
        return None
    return (*vals, const_number(beta), const_number(alpha))


def _add_fill_mask(m: AttentionMatch, cond, keep: bool, fill: float, acc: float) -> bool:
    """S <- where(keep ? cond : ~cond, S, fill). A -inf fill is a boolean mask; a finite fill (HF's finfo.min)
    is kept as the additive bias where(cond, 0, fill), which is what it computes (fully masked rows included)."""
    if not isinstance(cond, fx.Node) or val(cond) is None or val(cond).dtype != torch.bool:
        return False
    if fill == -math.inf:
        m.bool_masks.append((cond, keep))
    elif math.isfinite(fill):
        m.where_bias.append((cond, keep, fill, acc))
    else:
        return False
    return True


def _scalar_side(node: fx.Node):
    a, b = node.args
    if const_number(b) is not None and isinstance(a, fx.Node):
        return const_number(b), a
    if const_number(a) is not None and isinstance(b, fx.Node):
        return const_number(a), b
    return None


def _chain_side(node: fx.Node):
    a, b = node.args
    ra, rb = _reaches_qk(a), _reaches_qk(b)
    if ra and not rb:
        return a, b
    if rb and not ra:
        return b, a
    return None, None


def _reaches_qk(node, depth: int = 16) -> bool:
    """Whether `node` is a score chain ending in a matmul (casts, scales, masks in between)."""
    while depth > 0 and isinstance(node, fx.Node):
        depth -= 1
        if is_call(node, N.MATMUL) or _baddbmm_args(node) is not None:
            return True
        if is_cast(node) or (node.op == "call_method" and node.target == "masked_fill"):
            node = node.args[0]
        elif is_binary(node, operator.mul, operator.truediv, operator.add, operator.sub):
            a, b = node.args
            if isinstance(a, fx.Node) and (not isinstance(b, fx.Node) or not _reaches_qk(b, depth)):
                node = a
            elif isinstance(b, fx.Node):
                node = b
            else:
                return False
        elif is_call(node, torch.where) and len(node.args) == 3:
            a, b = node.args[1], node.args[2]
            node = a if isinstance(a, fx.Node) else b
        else:
            return False
    return False


def _is_last_two_transpose(node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.target not in ("transpose", "mT"):
        return False
    if node.target == "mT":
        return True
    v = val(node.args[0])
    if v is None or len(node.args) != 3:
        return False
    d = v.dim()
    dims = sorted(a % d for a in node.args[1:] if isinstance(a, int))
    return dims == [d - 2, d - 1]


def _check_escapes(m: AttentionMatch) -> str:
    """Rewrite only if nothing outside the site uses the scores or weights (e.g. output_attentions=True)."""
    inside = set(m.interior) | {m.output}
    for n in m.interior:
        for u in n.users:
            if u not in inside:
                what = "attention weights" if is_call(n, N.SOFTMAX) or is_call(n, N.DROPOUT) else f"intermediate '{n.name}'"
                return f"{what} used outside the attention (by '{u.name}'), e.g. output_attentions=True"
    return ""


def _undo_repeat_kv(m: AttentionMatch) -> None:
    """HF repeat_kv: x[:, :, None, :, :].expand(B, Hkv, n_rep, N, D).reshape(B, Hkv*n_rep, N, D)."""
    if m.k_transposed:
        return
    k0, rk = _repeat_source(m.k)
    v0, rv = _repeat_source(m.v)
    if k0 is None or v0 is None or rk != rv or rk <= 1:
        return
    m.k, m.v, m.kv_repeat = k0, v0, rk


def _repeat_source(node):
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape"):
        return None, 1
    ex = node.args[0]
    if not (isinstance(ex, fx.Node) and ex.op == "call_method" and ex.target == "expand"):
        return None, 1
    idx = ex.args[0]
    if not (isinstance(idx, fx.Node) and idx.op == "call_function" and idx.target is operator.getitem):
        return None, 1
    src, index = idx.args
    sv, ev, rv = val(src), val(ex), val(node)
    if sv is None or ev is None or rv is None or sv.dim() != 4 or ev.dim() != 5:
        return None, 1
    if not (isinstance(index, tuple) and len(index) >= 3 and index[2] is None
            and all(i == slice(None) for i in index[:2])):
        return None, 1
    b, hkv, rep, n, d = ev.shape
    if tuple(sv.shape) != (b, hkv, n, d) or tuple(rv.shape) != (b, hkv * rep, n, d):
        return None, 1
    r = rep if isinstance(rep, int) else None
    return (src, r) if r else (None, 1)
