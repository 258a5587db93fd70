"""The fast CPU path of query-tile attention (lowering/attention_tiled_cpu{_select}.py), beyond the shared ground-truth
tests in test_attention_tiles.py (which run it as impl "cpu"):
- its selection keeps the same attention mass as the reference's (fp32 scoring: equal up to rounding ties);
- bf16 scoring (CPUs with bf16 GEMM units) loses at most 0.1% of the tile's estimated mass against an fp64 top-L;
- the scoring dtype rule.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from spt_compile.lowering import attention_tiled_cpu as fast
from spt_compile.lowering import attention_tiled_cpu_select as fast_select
from spt_compile.lowering.formulas import attention_num_tiles, attention_tile_slots
from spt_compile.lowering.reference import pq_attention as ref
from spt_compile.lowering.reference import tiled_attention as ta

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def fp64_tile_mass(q, cb, codes, mask, causal, scale, tile, stride=1):
    """[B, H, nT, Nk] fp64: per-query softmax of the PQ-estimated logits over allowed keys, summed per tile over
    its scored queries (every stride-th counted back from its last)."""
    b, h, nq, _ = q.shape
    nk = codes.shape[2]
    khat = ref.reconstruct_keys(cb, codes).double().repeat_interleave(h // codes.shape[1], 1)
    s = scale * q.double() @ khat.transpose(-1, -2)
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if mask is not None:
        s = s + torch.where(torch.isfinite(mask), mask.double(), 0.0)
        allowed = allowed & torch.isfinite(mask)
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
    p = p * ta.scored_rows(0, nq, nq, tile, stride, q.device)[:, None]
    nt = attention_num_tiles(nq, tile)
    return torch.nn.functional.pad(p, (0, 0, 0, nt * tile - nq)).reshape(b, h, nt, tile, nk).sum(3)


def kept_mass(mass, idx, group=1):
    """Sum of mass over each tile's kept keys. mass [B, H, nT, Nk], idx [B, H, nT, L] (-1 = empty); group > 1:
    the lists shared by G heads (the first head's) over the mass summed over the group."""
    if group > 1:
        b, h, nt, nk = mass.shape
        mass, idx = mass.reshape(b, h // group, group, nt, nk).sum(2), idx[:, ::group]
    got = torch.gather(mass, -1, idx.long().clamp(min=0))
    return (got * (idx >= 0)).sum(-1)


@st.composite
def cases(draw):
    tile = draw(st.sampled_from([1, 5, 16, 64]))
    n = draw(st.integers(2, 160))
    return dict(n=n, tile=tile, causal=draw(st.booleans()), hkv=draw(st.sampled_from([1, 2])),
                grp=draw(st.sampled_from([1, 2])), pad=draw(st.booleans()), density=draw(st.sampled_from([0.125, 0.25])),
                seed=draw(st.integers(0, 2 ** 16)), stride=draw(st.sampled_from([1, 2, 3])), share=draw(st.booleans()),
                head_mask=draw(st.booleans()))


def setup(c, d=32):
    g = torch.Generator().manual_seed(c["seed"])
    h = c["hkv"] * c["grp"]
    q = 1.5 * torch.randn(1, h, c["n"], d, generator=g)  # logits of a few units, like trained attention
    k = torch.randn(1, c["hkv"], c["n"], d, generator=g)
    mask = None
    if c["pad"]:  # padding; per head (a different cut per head) when head_mask: the group's union matters
        heads = h if c["head_mask"] else 1
        mask = torch.zeros(1, heads, 1, c["n"])
        for i in range(heads):
            mask[:, i, :, c["n"] - c["n"] // (3 + i):] = -math.inf
    cb, codes = ref.pq_quantize(k, 8, 16, 2)
    L = attention_tile_slots(c["n"], c["n"], c["density"], 8, c["causal"])
    return q, cb, codes, mask, L


@settings(max_examples=25, **SETTINGS)
@given(cases())
def test_fp32_selection_keeps_the_reference_mass(c):
    q, cb, codes, mask, L = setup(c)
    scale = q.shape[-1] ** -0.5
    group = c["grp"] if c["share"] else 1  # share_kv_lists: the query heads of a kv head share lists
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast, "BF16_SCORING", False)
        got = fast_select.select_tiles(q, cb, codes, mask, c["causal"], scale, c["tile"], c["density"], 8, L,
                                       stride=c["stride"], group=group)
    want = ta.select_tiles(q, cb, codes, mask, c["causal"], scale, c["tile"], c["density"], 8, L, stride=c["stride"],
                           group=group)
    assert torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1)), "L_tile per tile"
    if group > 1:
        lists = got.reshape(got.shape[0], -1, group, *got.shape[2:])
        assert (lists == lists[:, :, :1]).all(), "a group's heads share one list"
    mass = fp64_tile_mass(q, cb, codes, mask, c["causal"], scale, c["tile"], c["stride"])
    a, b = kept_mass(mass, got, group), kept_mass(mass, want, group)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), (a - b).abs().max()


@settings(max_examples=25, **SETTINGS)
@given(cases())
def test_bf16_scoring_loses_at_most_a_tenth_of_a_percent_of_the_mass(c):
    """Against the exact top-L by fp64 mass: bf16 logits (8 mantissa bits) only swap near-ties at the cut."""
    q, cb, codes, mask, L = setup(c)
    scale = q.shape[-1] ** -0.5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast, "BF16_SCORING", True)
        mp.setattr(fast, "_has_bf16_gemm", lambda: True)  # bf16 scoring even on a CPU without bf16 units (slow, same values)
        got = fast_select.select_tiles(q, cb, codes, mask, c["causal"], scale, c["tile"], c["density"], 8, L)
    mass = fp64_tile_mass(q, cb, codes, mask, c["causal"], scale, c["tile"])
    n_kept = (got >= 0).sum(-1, keepdim=True)  # [B, H, nT, 1]
    best = mass.sort(-1, descending=True).values
    best = (best * (torch.arange(best.shape[-1]) < n_kept)).sum(-1)  # the largest mass n_kept keys can hold
    lost = (best - kept_mass(mass, got)) / best.clamp(min=1e-12)
    assert lost.max().item() <= 1e-3, lost.max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "inf"])
def test_rows_with_no_allowed_key_give_zeros_and_finite_gradients(dtype, kind):
    """lse = -inf on such a row; the backward's exp(s - lse) must not turn into exp(nan)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g).to(dtype) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9, generator=g) < 0.7
    mask[0, 0, 3] = False
    mask[1, 0, 8] = False
    if kind == "inf":
        mask = torch.where(mask, 0.0, -math.inf).to(dtype)
    for tile in (1, 4):
        idx = ta.tile_allowed_indices(mask, True, (2, 2, 9, 9), tile, 9, q.device)
        out, lse = fast.tiled_attention_forward(q, k, v, idx, mask, True, 0.3, tile, 0.0, None)
        dout = torch.randn(out.shape, generator=g).to(dtype)
        grads = fast.tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, True, 0.3, tile, 0.0, None)
        want = ta.tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, True, 0.3, tile, 0.0, None)
        assert (out[0, :, 3] == 0).all() and (out[1, :, 8] == 0).all()
        for a, b in zip(grads[:3], want[:3]):
            assert torch.isfinite(a).all()
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the fast path keeps bf16 GEMM operands
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_scoring_dtype_rule(monkeypatch):
    q32, q64 = torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    assert fast.scoring_dtype(q64) == torch.float64
    monkeypatch.setattr(fast, "_has_bf16_gemm", lambda: True)
    assert fast.scoring_dtype(q32) == torch.bfloat16
    assert fast.scoring_dtype(q32.bfloat16()) == torch.bfloat16
    monkeypatch.setattr(fast, "_has_bf16_gemm", lambda: False)
    assert fast.scoring_dtype(q32) == torch.float32
    monkeypatch.setattr(fast, "_has_bf16_gemm", lambda: True)
    monkeypatch.setattr(fast, "BF16_SCORING", False)
    assert fast.scoring_dtype(q32) == torch.float32


def test_chunk_argument_is_checked():
    q = torch.randn(1, 1, 8, 8)
    cb, codes = ref.pq_quantize(q, 2, 2, 1)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        fast_select.select_tiles(q, cb, codes, None, False, 1.0, 4, 0.5, 1, 4, chunk=0)


def test_select_chunk_rule_raises_thin_chunks_to_the_minimum_scored_rows():
    rows = fast_select._MIN_SCORED_ROWS
    assert fast_select._select_chunk(32, 10 ** 9, 16) == -(-rows // 16)  # over the cache budget: rows decide
    assert fast_select._select_chunk(2, 10 ** 9, 16) == 2  # never more tiles than there are
    assert fast_select._select_chunk(32, 10 ** 9, rows) == 1  # stride 1 at T = 64: one tile is enough rows
    assert fast_select._select_chunk(32, 1, 16) == 32  # a small problem: the cache budget takes all tiles


@settings(max_examples=15, **SETTINGS)
@given(cases(), st.integers(1, 4))
def test_selection_does_not_depend_on_the_chunking(c, chunk):
    """Chunks only lay out the work: any chunk size keeps the same mass and the same L_tile as the default."""
    q, cb, codes, mask, L = setup(c)
    scale = q.shape[-1] ** -0.5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast, "BF16_SCORING", False)
        got, want = (fast_select.select_tiles(q, cb, codes, mask, c["causal"], scale, c["tile"], c["density"], 8, L,
                                              stride=c["stride"], chunk=ch) for ch in (chunk, None))
    assert torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1))
    mass = fp64_tile_mass(q, cb, codes, mask, c["causal"], scale, c["tile"], c["stride"])
    torch.testing.assert_close(kept_mass(mass, got), kept_mass(mass, want), rtol=1e-6, atol=1e-9)
