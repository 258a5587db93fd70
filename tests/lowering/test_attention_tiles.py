"""Query-tile sparse attention against fp64 ground truths: the reference (lowering/reference/tiled_attention.py)
and the fast CPU path (lowering/attention_tiled_cpu_select.py + attention_tiled_cpu.py) pass the same tests (the
`impl` parameter).

- attention over a tiled idx: forward and every gradient (q, k, v, a trainable mask) equal autograd through a
  dense fp64 formulation in which query i sees exactly its tile's kept keys that it may attend to; dropout is
  replayed through the same per-slot keep mask;
- exact mode (every key of the tile's union) equals SDPA / eager, incl. fully masked rows;
- selection: each tile keeps L_tile keys (the formula of lowering/formulas.py), distinct, ascending, allowed,
  and the top ones by an independently computed fp64 per-query-normalised PQ mass over the scored queries
  (select_stride 1, 2, 3: every stride-th query counted back from the tile's last).
T in {1, 16, 64, 5 (not a power of two)}, N not a multiple of T, every mask kind, causal, GQA, fp32/bf16.
"""
from __future__ import annotations

import math
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from spt_compile.lowering import attention_tiled_cpu as fast
from spt_compile.lowering import attention_tiled_cpu_select as fast_select
from spt_compile.lowering.formulas import (attention_num_tiles, attention_tile_is_exact, attention_tile_keys,
                                          attention_tile_slots)
from spt_compile.lowering.reference import pq_attention as ref
from spt_compile.lowering.reference import tiled_attention as ta

TILES = (1, 5, 16, 64)
MASKS = ("none", "causal", "bool", "pad_inf", "pad_finfo_min", "bias", "bias_causal")
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
# the reference attends per head whatever the lists (group is the CPU path's layout choice, not semantics)
IMPLS = {"reference": types.SimpleNamespace(
    select_tiles=ta.select_tiles,
    tiled_attention_forward=lambda *a, group=1, **kw: ta.tiled_attention_forward(*a, **kw),
    tiled_attention_backward=lambda *a, group=1, **kw: ta.tiled_attention_backward(*a, **kw)),
    "cpu": types.SimpleNamespace(
    select_tiles=fast_select.select_tiles, tiled_attention_forward=fast.tiled_attention_forward,
    tiled_attention_backward=fast.tiled_attention_backward)}


def build_mask(kind, b, h, nq, nk, dtype, g, full_row):
    """(mask, is_causal, trainable). full_row: one row with no allowed key (bool/-inf) or only finfo.min keys."""
    if kind in ("none", "causal"):
        return None, kind == "causal", False
    fmin = torch.finfo(dtype).min
    if kind == "bool":
        m = torch.rand(b, 1, nq, nk, generator=g) < 0.5
        if full_row:
            m[0, :, nq // 2] = False
        return m, False, False
    if kind.startswith("pad"):
        lens = torch.randint(1, nk + 1, (b,), generator=g)
        if full_row:
            lens[0] = 0
        m = torch.zeros(b, 1, 1, nk, dtype=dtype)
        m[(torch.arange(nk)[None, :] >= lens[:, None])[:, None, None, :]] = -math.inf if kind == "pad_inf" else fmin
        return m, False, False
    m = torch.randn(b if kind == "bias" else 1, h, nq, nk, generator=g, dtype=torch.float64).to(dtype)
    if full_row:
        m[0, 0, nq // 2] = fmin
    return m, kind == "bias_causal", True


def allowed_dense(mask, is_causal, b, h, nq, nk):
    a = torch.ones(b, h, nq, nk, dtype=torch.bool)
    if mask is not None:
        a &= (mask if mask.dtype == torch.bool else torch.isfinite(mask)).expand(b, h, nq, nk)
    if is_causal:
        a &= torch.ones(nq, nk, dtype=torch.bool).tril()
    return a


def kept_dense(idx, tile, nq, nk):
    """[B, H, Nq, Nk] bool: key j is in query i's tile list; and the slot of each kept key (for dropout)."""
    b, h, nt, L = idx.shape
    rows = idx.repeat_interleave(tile, 2)[:, :, :nq]  # [B, H, Nq, L]
    kept = torch.zeros(b, h, nq, nk + 1, dtype=torch.bool)
    kept.scatter_(-1, torch.where(rows >= 0, rows.long(), nk), True)
    slot = torch.zeros(b, h, nq, nk + 1, dtype=torch.long)
    slot.scatter_(-1, torch.where(rows >= 0, rows.long(), nk), torch.arange(L).expand(b, h, nq, L))
    return kept[..., :nk], slot[..., :nk]


def dense_tiled(q, k, v, mask, is_causal, scale, idx, tile, dropout_p=0.0, keep=None):
    """Autograd-able step 4 of the semantics: query i over kept_i & allowed_i; a row with none gives zeros."""
    b, h, nq, _ = q.shape
    nk, grp = k.shape[2], h // k.shape[1]
    kept, slot = kept_dense(idx, tile, nq, nk)
    ok = kept & allowed_dense(mask, is_causal, b, h, nq, nk)
    s = scale * q @ k.repeat_interleave(grp, 1).transpose(-1, -2)
    if mask is not None and mask.dtype != torch.bool:
        s = s + torch.where(torch.isfinite(mask), mask.to(s.dtype), 0.0)
    row = ok.any(-1, keepdim=True)
    p = torch.where(row, torch.softmax(s.masked_fill(~ok, -math.inf).masked_fill(~row, 0.0), -1), 0.0)
    if keep is not None:
        p = p * torch.gather(keep, -1, slot).to(p.dtype) / (1.0 - dropout_p)
    return p @ v.repeat_interleave(grp, 1)


@st.composite
def cases(draw):
    hkv, grp = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    tile = draw(st.sampled_from(TILES))
    nq = draw(st.integers(1, 3 * max(tile, 8) - 1))
    nk = nq if draw(st.booleans()) else draw(st.integers(1, 40))
    return dict(b=draw(st.integers(1, 2)), hkv=hkv, h=hkv * grp, nq=nq, nk=nk, d=draw(st.sampled_from([8, 16])),
                tile=tile, kind=draw(st.sampled_from(MASKS)), full_row=draw(st.booleans()),
                density=draw(st.sampled_from([0.125, 0.25, 0.5, 1.0])), min_keys=draw(st.sampled_from([1, 4, 64])),
                dropout=draw(st.sampled_from([0.0, 0.0, 0.3])), seed=draw(st.integers(0, 2 ** 16)),
                stride=draw(st.sampled_from([1, 1, 2, 3])), share=draw(st.booleans()))


def group_of(c):
    """G: heads per shared list (the op's share_kv_lists: the H / Hkv query heads of a kv head)."""
    return c["h"] // c["hkv"] if c["share"] else 1


def scored_weights(nq, tile, stride):
    """[nT * T] 0/1: the queries that score, written out independently of lowering.formulas: from each tile's
    last query back in steps of stride."""
    nt = attention_num_tiles(nq, tile)
    w = torch.zeros(nt * tile, dtype=torch.float64)
    for j in range(nt):
        for i in range(min(nq, (j + 1) * tile) - 1, j * tile - 1, -stride):
            w[i] = 1.0
    return w


def setup(c, dtype=torch.float64):
    g = torch.Generator().manual_seed(c["seed"])
    b, h, hkv, nq, nk, d = c["b"], c["h"], c["hkv"], c["nq"], c["nk"], c["d"]
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in
               ((b, h, nq, d), (b, hkv, nk, d), (b, hkv, nk, d)))
    dout = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    mask, causal, trainable = build_mask(c["kind"], b, h, nq, nk, dtype, g, c["full_row"])
    return q, k, v, dout, mask, causal, trainable


def select(q, k, mask, causal, c, scale, impl=IMPLS["reference"]):
    L = attention_tile_slots(c["nq"], c["nk"], c["density"], c["min_keys"], causal)
    if c["density"] >= 1.0:
        return ta.tile_allowed_indices(mask, causal, (c["b"], c["h"], c["nq"], c["nk"]), c["tile"], L, q.device)
    cb, codes = ref.pq_quantize(k.float(), 4, 4, 1)
    return impl.select_tiles(q, cb, codes, mask, causal, scale, c["tile"], c["density"], c["min_keys"], L,
                             stride=c["stride"], group=group_of(c))


def run_tiled(q, k, v, dout, mask, trainable, causal, scale, idx, c, seed_t, chunk=None, impl=IMPLS["reference"]):
    g = group_of(c)
    out, lse = impl.tiled_attention_forward(q, k, v, idx, mask, causal, scale, c["tile"], c["dropout"], seed_t,
                                            group=g, chunk=chunk)
    dq, dk, dv, dm = impl.tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, causal, scale, c["tile"],
                                                   c["dropout"], seed_t, trainable, group=g, chunk=chunk)
    return [out, dq, dk, dv] + ([dm] if trainable else []), lse


def run_dense(q, k, v, dout, mask, trainable, causal, scale, idx, c, keep):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v) + ((mask,) if trainable else ())]
    out = dense_tiled(*leaves[:3], leaves[3] if trainable else mask, causal, scale, idx, c["tile"], c["dropout"],
                      keep)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, dout))


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=40, **SETTINGS)
@given(c=cases())
def test_tiled_attention_equals_dense_formulation_fp64(impl, c):
    impl = IMPLS[impl]
    q, k, v, dout, mask, causal, trainable = setup(c)
    scale = 1 / math.sqrt(c["d"])
    idx = select(q, k, mask, causal, c, scale, impl)
    assert idx.shape == (c["b"], c["h"], attention_num_tiles(c["nq"], c["tile"]),
                         attention_tile_slots(c["nq"], c["nk"], c["density"], c["min_keys"], causal))
    seed_t = torch.tensor(c["seed"]) if c["dropout"] > 0 else None
    keep = ref.dropout_keep((c["b"], c["h"], c["nq"], idx.shape[-1]), c["dropout"], seed_t, q.device) \
        if c["dropout"] > 0 else None
    got, lse = run_tiled(q, k, v, dout, mask, trainable, causal, scale, idx, c, seed_t, impl=impl)
    want = run_dense(q, k, v, dout, mask, trainable, causal, scale, idx, c, keep)
    for name, a, t in zip(("out", "dq", "dk", "dv", "dmask"), got, want):
        assert a.shape == t.shape and a.dtype == t.dtype, name
        assert (a - t).abs().max().item() <= 1e-10 * max(1.0, t.abs().max().item()), name
    # chunking over tiles changes nothing (one tile per chunk vs the default)
    got1, _ = run_tiled(q, k, v, dout, mask, trainable, causal, scale, idx, c, seed_t, chunk=1, impl=impl)
    for a, a1 in zip(got, got1):
        assert torch.allclose(a, a1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=30, **SETTINGS)
@given(c=cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_tiled_attention_low_precision_is_as_accurate_as_dense(impl, c, dtype):
    """In fp32 / bf16 the tiled path may be at most 2x as far from the fp64 truth as the dense formulation
    computed in the same dtype (plus a few-ulp floor)."""
    impl = IMPLS[impl]
    c = {**c, "dropout": 0.0}
    q, k, v, dout, mask, causal, trainable = setup(c, dtype)
    scale = 1 / math.sqrt(c["d"])
    idx = select(q, k, mask, causal, c, scale)
    lo = [t.to(dtype) for t in (q, k, v, dout)]
    got, _ = run_tiled(*lo, mask, trainable, causal, scale, idx, c, None, impl=impl)
    base = run_dense(*lo, mask, trainable, causal, scale, idx, c, None)
    truth = run_dense(q, k, v, dout, None if mask is None else (mask if mask.dtype == torch.bool else mask.double()),
                      trainable, causal, scale, idx, c, None)
    for name, a, s_, t in zip(("out", "dq", "dk", "dv", "dmask"), got, base, truth):
        assert a.dtype == s_.dtype and torch.isfinite(a).all(), name
        err, berr = (a.double() - t).abs().max().item(), (s_.double() - t).abs().max().item()
        assert err <= 2 * berr + 8 * torch.finfo(dtype).eps * max(1.0, t.abs().max().item()), (name, err, berr)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=40, **SETTINGS)
@given(c=cases())
def test_tile_selection_contract(impl, c):
    """impl "cpu" scores in fp32 here (bf16 scoring is bounded as lost mass in test_attention_tiled_cpu.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast, "BF16_SCORING", False)
        _check_selection_contract(IMPLS[impl], c)


def _check_selection_contract(impl, c):
    q, k, _, _, mask, causal, _ = setup(c, torch.float32)
    q, k = q.float(), k.float()
    scale = 1 / math.sqrt(c["d"])
    c = {**c, "density": min(c["density"], 0.5), "share": False}  # shared lists: test_tiled_group_select.py
    cb, codes = ref.pq_quantize(k, 4, 4, 1)
    L = attention_tile_slots(c["nq"], c["nk"], c["density"], c["min_keys"], causal)
    idx = impl.select_tiles(q, cb, codes, mask, causal, scale, c["tile"], c["density"], c["min_keys"], L,
                            stride=c["stride"])
    b, h, nq, nk, tile = c["b"], c["h"], c["nq"], c["nk"], c["tile"]
    nt = attention_num_tiles(nq, tile)
    valid = idx >= 0
    assert torch.equal(valid, valid.cummin(-1).values), "valid slots first"
    big = torch.where(valid, idx.long(), 1 << 40)
    assert (big[..., 1:] > big[..., :-1]).logical_or(~valid[..., 1:]).all(), "ascending and distinct"
    allowed = allowed_dense(mask, causal, b, h, nq, nk)
    pad = torch.nn.functional.pad(allowed, (0, 0, 0, nt * tile - nq))
    union = pad.reshape(b, h, nt, tile, nk).any(3)  # [B, H, nT, Nk]
    strict = allowed.clone()
    if mask is not None and mask.dtype != torch.bool:
        strict &= (mask > torch.finfo(mask.dtype).min / 2).expand_as(strict)
    sizing = torch.nn.functional.pad(strict, (0, 0, 0, nt * tile - nq)).reshape(b, h, nt, tile, nk).any(3).sum(-1)
    want_n = torch.minimum(attention_tile_keys(sizing, c["density"], c["min_keys"]), union.sum(-1))
    assert torch.equal(valid.sum(-1).long(), want_n), "L_tile keys per tile"
    sel = torch.zeros(b, h, nt, nk + 1, dtype=torch.bool).scatter_(-1, torch.where(valid, idx.long(), nk), True)
    sel = sel[..., :nk]
    assert not (sel & ~union).any(), "a key no query of the tile may see was kept"
    # independent fp64 mass: per-query softmax of the PQ-estimated logits over allowed keys, summed per tile over
    # the scored queries
    khat = ref.reconstruct_keys(cb, codes).double().repeat_interleave(h // c["hkv"], 1)
    s = scale * q.double() @ khat.transpose(-1, -2)
    if mask is not None and mask.dtype != torch.bool:
        s = s + torch.where(torch.isfinite(mask), mask.double().clamp(min=torch.finfo(torch.float32).min), 0.0)
    s = s.masked_fill(~allowed, -math.inf)
    row = allowed.any(-1, keepdim=True)
    p = torch.where(row, torch.softmax(s.masked_fill(~row, 0.0), -1), 0.0)
    p = torch.nn.functional.pad(p, (0, 0, 0, nt * tile - nq)) * scored_weights(nq, tile, c["stride"])[:, None]
    mass = p.reshape(b, h, nt, tile, nk).sum(3)
    worst_kept = mass.masked_fill(~sel, math.inf).amin(-1)
    best_left = mass.masked_fill(sel | ~union, -math.inf).amax(-1)
    assert (best_left <= worst_kept + 1e-5 * (1 + mass.amax())).all(), "a left-out key had more mass"


def test_lmax_is_the_largest_l_tile_and_shapes_only():
    for nq, nk, causal in ((100, 100, True), (100, 300, True), (300, 100, True), (77, 50, False)):
        for density, lmin in ((0.25, 64), (0.125, 8), (1.0, 1)):
            lmax = attention_tile_slots(nq, nk, density, lmin, causal)
            visible = min(nk, nq) if causal else nk
            assert lmax == min(visible, max(lmin, math.ceil(density * visible)))
    # causal tiles are sized by what they may see: early tiles are short, so causal saves like bidirectional
    q = torch.randn(1, 1, 256, 16)
    k = torch.randn(1, 1, 256, 16)
    cb, codes = ref.pq_quantize(k, 4, 4, 1)
    idx = ta.select_tiles(q, cb, codes, None, True, 0.25, 64, 0.25, 16, attention_tile_slots(256, 256, 0.25, 16, True))
    assert (idx >= 0).sum(-1)[0, 0].tolist() == [16, 32, 48, 64]


def test_exact_mode_tiles_equal_sdpa_with_padding_rows():
    """Density 1: every key of the tile's union; a fully padded (finfo.min) sequence attends uniformly."""
    b, h, n, d = 2, 2, 45, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(b, 1, 1, n, dtype=torch.float64)
    mask[0] = torch.finfo(torch.float64).min
    mask[1, ..., 30:] = torch.finfo(torch.float64).min
    for tile in TILES:
        for causal in (False, True):
            L = attention_tile_slots(n, n, 1.0, 64, causal)
            idx = ta.tile_allowed_indices(mask, causal, (b, h, n, n), tile, L, q.device)
            out, _ = ta.tiled_attention_forward(q, k, v, idx, mask, causal, 0.3, tile, 0.0, None)
            s = 0.3 * q @ k.transpose(-1, -2) + mask
            if causal:
                s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
            assert torch.allclose(out, s.softmax(-1) @ v, atol=1e-12), (tile, causal)


# ------------------------------------------------------------------------------------------------------------
# the op's query-tile mode (query_tile = T > 0): saved bytes, gradcheck, min_seq_len, opcheck, exact == SDPA
# ------------------------------------------------------------------------------------------------------------

import spt_compile.lowering  # noqa: E402,F401  registers the ops

OP = torch.ops.spt.pq_sparse_attention.default


def tiled_sparse_attention(q, k, v, mask=None, is_causal=False, scale=None, density=0.25, tile=64, min_keys=64,
                           m=8, c=16, iters=3, dropout_p=0.0, seed=None, min_seq_len=0, stride=1, share=False):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return OP(q, k, v, mask, is_causal, scale, density, m, c, iters, dropout_p, seed, min_seq_len, tile, min_keys,
              stride, share)


def test_saved_bytes_are_out_lse_idx_only_and_within_2x_sdpa():
    """Saved beyond q, k, v: out [B,H,N,D], lse [B,H,N] fp32 and idx [B,H,ceil(N/T),L_max] int32, no N x N;
    at T=64 that is <= 2x what SDPA's fused CPU kernel saves (out and its logsumexp)."""
    from spt_compile.measure import saved_tensor_bytes
    b, h, d = 1, 1, 64
    for n, causal in ((1024, False), (700, True)):
        q, k, v = (torch.randn(b, h, n, d).requires_grad_() for _ in range(3))
        L = attention_tile_slots(n, n, 0.25, 64, causal)
        got = saved_tensor_bytes(lambda: tiled_sparse_attention(q, k, v, is_causal=causal, tile=64)[0], (q, k, v))
        assert got == b * h * (n * d * 4 + n * 4 + attention_num_tiles(n, 64) * L * 4), (n, got)
        sdpa = saved_tensor_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                  (q, k, v))
        assert got <= 2 * sdpa, (got, sdpa)


@pytest.mark.parametrize("density,tile", [(1.0, 5), (0.3, 4), (0.3, 1)])
def test_pipeline_gradcheck_fp64_with_mask_grad_and_dropout(density, tile):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 2, 1, 11, generator=g, dtype=torch.float64)

    def f(q, k, v, bias):
        return tiled_sparse_attention(q, k, v, bias, True, 0.4, density, tile, 2, 2, 4, 2, 0.25, torch.tensor(5))[0]

    # fast_mode: a random projection of the Jacobian (a few evaluations instead of one per input element)
    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (q, k, v, bias)), eps=1e-6, atol=1e-7,
                                    fast_mode=True)


def test_pipeline_min_seq_len_runs_exact_below_the_threshold():
    for n in (40, 100):
        q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64).requires_grad_() for _ in range(3))
        out, idx, _ = tiled_sparse_attention(q, k, v, is_causal=True, density=0.25, tile=16, min_keys=4,
                                             min_seq_len=64)
        assert idx.shape == (1, 2, attention_num_tiles(n, 16), attention_tile_slots(n, n, 0.25, 4, True))
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        dense_err = (out - sdpa).abs().max().item()
        assert (dense_err < 1e-12) == (n < 64), (n, dense_err)
        if n < 64:
            assert (idx == -1).all()  # the exact lists do not fit L_max: rebuilt by the backward
            got = torch.autograd.grad(out.sum(), (q, k, v))
            want = torch.autograd.grad(sdpa.sum(), (q, k, v))
            assert all((a - b_).abs().max() < 1e-12 for a, b_ in zip(got, want))


def test_opcheck_query_tiles():
    q, k, v = (torch.randn(1, 4, 13, 8, requires_grad=True) for _ in range(3))
    k2, v2 = (torch.randn(1, 2, 21, 8, requires_grad=True) for _ in range(2))
    mask = torch.randn(1, 1, 13, 21, requires_grad=True)
    for args in ((q, k, v, None, True, 0.3, 0.3, 2, 4, 1, 0.0, None, 0, 5, 2),
                 (q, k2, v2, mask, False, 0.3, 0.3, 2, 4, 1, 0.2, torch.tensor(3), 0, 4, 3),
                 (q, k2, v2, mask, False, 0.3, 1.0, 2, 4, 1, 0.0, None, 0, 16, 3),
                 (q, k, v, None, True, 0.3, 0.3, 2, 4, 1, 0.0, None, 32, 4, 2),
                 (q, k2, v2, None, True, 0.3, 0.3, 2, 4, 1, 0.0, None, 0, 4, 2, 2, True),  # shared lists (GQA)
                 (q, k2, v2, mask, False, 0.3, 0.3, 2, 4, 1, 0.0, None, 0, 4, 2, 1, True)):
        torch.library.opcheck(OP, args)


@settings(max_examples=20, **SETTINGS)
@given(cases())
def test_op_shared_lists_attend_exactly_over_them(c):
    """share_kv_lists through the op (sparse, fp64): the heads of a kv head get one list per tile, sized as the
    reference's group selection (group = H / Hkv), and out and every gradient equal the dense formulation over
    those lists."""
    c = {**c, "share": True, "density": min(c["density"], 0.5)}
    q, k, v, dout, mask, causal, trainable = setup(c)
    scale = 1 / math.sqrt(c["d"])
    seed_t = torch.tensor(c["seed"]) if c["dropout"] > 0 else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((mask,) if trainable else ())]
    out, idx, _ = tiled_sparse_attention(*leaves[:3], leaves[3] if trainable else mask, causal, scale, c["density"],
                                         c["tile"], c["min_keys"], 4, 4, 1, c["dropout"], seed_t, 0, c["stride"], True)
    got = [out.detach()] + list(torch.autograd.grad(out, leaves, dout))
    if not attention_tile_is_exact(c["nq"], c["nk"], c["density"], c["min_keys"], causal):
        cb, codes = ref.pq_quantize(k, 4, 4, 1)
        want_idx = ta.select_tiles(q, cb, codes, mask, causal, scale, c["tile"], c["density"], c["min_keys"],
                                   idx.shape[-1], stride=c["stride"], group=group_of(c))
        assert torch.equal((idx >= 0).sum(-1), (want_idx >= 0).sum(-1)), "L_tile of the group's union"
        lists = idx.reshape(c["b"], c["hkv"], group_of(c), *idx.shape[2:])
        assert torch.equal(lists, lists[:, :, :1].expand_as(lists)), "a kv head's query heads share one list"
        # (which keys: the fast selection keeps the reference's mass, test_attention_tiled_cpu.py)
    keep = ref.dropout_keep((c["b"], c["h"], c["nq"], idx.shape[-1]), c["dropout"], seed_t, q.device) \
        if c["dropout"] > 0 else None
    want = run_dense(q, k, v, dout, mask, trainable, causal, scale, idx, c, keep)
    for name, a, t in zip(("out", "dq", "dk", "dv", "dmask"), got, want):
        assert (a - t).abs().max().item() <= 1e-10 * max(1.0, t.abs().max().item()), name



@settings(max_examples=20, **SETTINGS)
@given(cases())
def test_op_query_tiles_exact_mode_equals_sdpa(c):
    """Density 1 through the op (forward and every gradient) equals eager attention in fp64, for every mask
    kind; rows with no allowed key follow the zero-row convention."""
    q, k, v, dout, mask, causal, trainable = setup(c)
    scale = 1 / math.sqrt(c["d"])
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((mask,) if trainable else ())]
    out, idx, _ = tiled_sparse_attention(*leaves[:3], leaves[3] if trainable else mask, causal, scale, 1.0,
                                         c["tile"], c["min_keys"], share=c["share"])
    got = [out.detach()] + list(torch.autograd.grad(out, leaves, dout))
    full = ta.tile_allowed_indices(mask, causal, (c["b"], c["h"], c["nq"], c["nk"]), c["tile"],
                                   attention_tile_slots(c["nq"], c["nk"], 1.0, 1, causal), q.device)
    assert torch.equal(idx, full)
    want = run_dense(q, k, v, dout, mask, trainable, causal, scale, full, {**c, "dropout": 0.0}, None)
    for name, a, t in zip(("out", "dq", "dk", "dv", "dmask"), got, want):
        assert (a - t).abs().max().item() <= 1e-10 * max(1.0, t.abs().max().item()), name
