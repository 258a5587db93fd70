"""The savings formulas (spt_compile/savings.py) against independent measurements on small cases.

- bytes saved for backward: every tensor autograd packs (`torch.autograd.graph.saved_tensors_hooks`), counted
  once per storage, minus the storages of the inputs (q, k, v / x) and of the weights: what the formula counts;
- FLOPs: `FlopCounterMode` over forward + backward of the dense computation; for spt, the dense measurement
  times the kept fraction read off the op's own outputs (valid idx slots / all pairs; block_ids width / E).
Tolerance: 1 % relative (the formulas are exact here; the slack only absorbs counting conventions).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import spt_compile.lowering  # noqa: F401  - registers torch.ops.spt.*
from spt_compile.lowering import formulas
from spt_compile.savings import AttentionSizes, FfnSizes, attention_estimates, ffn_estimates

RTOL = 0.01
B, H, N, D = 2, 2, 96, 16


def saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves while running fn(), minus those of `exclude`."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and t.numel():
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def train_flops(fn):
    with FlopCounterMode(display=False) as fc:
        out = fn()
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return fc.get_total_flops()


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, requires_grad=True) for _ in range(3)]


CAUSAL_FILL = torch.ones(N, N, dtype=torch.bool).triu(1)  # the mask: not counted (the op gets it as an input)


def eager_attention(q, k, v, causal):
    s = (q @ k.transpose(-2, -1)) * D ** -0.5
    if causal:
        s = s.masked_fill(CAUSAL_FILL, float("-inf"))
    return s.softmax(-1) @ v


def spt_attention(q, k, v, causal, density):
    return torch.ops.spt.pq_sparse_attention(q, k, v, None, causal, D ** -0.5, density, 4, 16, 3, 0.0, None)


def sizes(causal, density, spelling="eager"):
    L = formulas.attention_keys_kept(N, density)
    return AttentionSizes(batch=B, heads=H, kv_heads=H, nq=N, nk=N, head_dim=D, v_dim=D, elem_bytes=4, keys_kept=L,
                          exact=formulas.attention_is_exact(N, density), is_causal=causal, spelling=spelling,
                          subspaces=4, centroids=16, kmeans_iters=3)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_saved_bytes_dense_and_spt(causal):
    q, k, v = qkv()
    est = attention_estimates(sizes(causal, 0.25))[0]
    dense, _ = saved_bytes(lambda: eager_attention(q, k, v, causal), (q, k, v, CAUSAL_FILL))
    spt, _ = saved_bytes(lambda: spt_attention(q, k, v, causal, 0.25), (q, k, v))
    assert dense == pytest.approx(est.dense_value(), rel=RTOL)
    assert spt == pytest.approx(est.spt_value(), rel=RTOL)
    assert spt < dense


def test_attention_saved_bytes_sdpa_spelling():
    q, k, v = qkv()
    est = attention_estimates(sizes(False, 0.25, spelling="sdpa"))[0]
    dense, _ = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v), (q, k, v))
    assert dense == pytest.approx(est.dense_value(), rel=RTOL)


@pytest.mark.parametrize("causal,density", [(False, 0.25), (True, 0.25), (False, 1.0)])
def test_attention_flops(causal, density):
    q, k, v = qkv()
    est = attention_estimates(sizes(causal, density))[1]
    dense = train_flops(lambda: eager_attention(q, k, v, causal))
    assert dense == pytest.approx(est.dense_value(), rel=RTOL)
    with torch.no_grad():
        idx = spt_attention(q, k, v, causal, density)[1]            # [B, H, N, L], -1 = empty slot
    kept_fraction = (idx >= 0).sum().item() / (B * H * N * N)
    assert dense * kept_fraction == pytest.approx(est.spt_value(), rel=RTOL)


FFN_TOKENS, FFN_D, FFN_H, FFN_E = 2 * 48, 32, 128, 8


def ffn_weights(gated, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.1).requires_grad_()  # noqa: E731
    w = {"w1": mk(FFN_H, FFN_D), "b1": mk(FFN_H), "w2": mk(FFN_D, FFN_H), "b2": mk(FFN_D)}
    if gated:
        w.update(w_up=mk(FFN_H, FFN_D), b_up=mk(FFN_H))
    return w


def dense_ffn(x, w, act):
    h = getattr(F, act)(F.linear(x, w["w1"], w["b1"]))
    if "w_up" in w:
        h = h * F.linear(x, w["w_up"], w["b_up"])
    return F.linear(h, w["w2"], w["b2"])


PERM = torch.arange(FFN_H)  # block_perm: a constant of the graph, like the weights


def spt_ffn(x, w, act, top_k):
    perm = PERM
    return torch.ops.spt.routed_ffn(x, w["w1"], w["b1"], w.get("w_up"), w.get("b_up"), w["w2"], w["b2"], perm, act,
                                    FFN_E, top_k, "lowrank", 8, 200, 987654)


@pytest.mark.parametrize("act,gated,density", [("gelu", False, 0.5), ("relu", False, 0.25), ("silu", True, 0.5),
                                                ("relu", True, 0.5), ("gelu", False, 1.0)])
def test_ffn_bytes_and_flops(act, gated, density):
    x = torch.randn(FFN_TOKENS, FFN_D, requires_grad=True)
    w = ffn_weights(gated)
    top_k = formulas.ffn_top_k(FFN_E, density)
    z = FfnSizes(tokens=FFN_TOKENS, d_model=FFN_D, hidden=FFN_H, d_out=FFN_D, elem_bytes=4, num_blocks=FFN_E,
                 top_k=top_k, gated=gated, activation=act, router="lowrank", router_rank=8)
    flops_est, _, bytes_est = ffn_estimates(z)
    params = [x, PERM, *w.values()]
    dense_b, _ = saved_bytes(lambda: dense_ffn(x, w, act), params)
    spt_b, outs = saved_bytes(lambda: spt_ffn(x, w, act, top_k), params)
    assert dense_b == pytest.approx(bytes_est.dense_value(), rel=RTOL)
    assert spt_b == pytest.approx(bytes_est.spt_value(), rel=RTOL)
    dense_f = train_flops(lambda: dense_ffn(x, w, act))
    assert dense_f == pytest.approx(flops_est.dense_value(), rel=RTOL)
    kept_fraction = outs[1].shape[1] / FFN_E                               # block_ids [T, k]
    assert dense_f * kept_fraction == pytest.approx(flops_est.spt_value(), rel=RTOL)


def test_formulas_are_symbolic_in_sequence_length_and_tokens():
    att = attention_estimates(sizes(True, 0.25))
    assert {"N"} <= {str(s) for s in att[1].dense.free_symbols}
    ffn = ffn_estimates(FfnSizes(64, 32, 128, 32, 2, 8, 4, False, "gelu"))
    assert "n" in {str(s) for s in ffn[0].dense.free_symbols}
    # doubling N quadruples dense attention FLOPs but only doubles spt's at a fixed L
    e = att[1]
    n = next(s for s in e.dense.free_symbols if str(s) == "N")
    vals = dict(e.values)
    ratio_dense = e.dense.subs({**vals, n: 2 * N}) / e.dense.subs(vals)
    assert ratio_dense == 4
    assert math.isclose(float(e.spt.subs({**vals, n: 2 * N}) / e.spt.subs(vals)), 2, rel_tol=0.2)
