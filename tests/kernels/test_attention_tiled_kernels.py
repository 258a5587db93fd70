"""Query-tile attention Triton kernels (interpreter, small shapes) vs the plain-PyTorch reference stages
(lowering/reference/tiled_attention.py) and independent fp64 ground truths.

- selection: the kernel keeps the reference's L_tile keys per tile (ascending, distinct, allowed), and the fp64
  per-query-normalised PQ mass it keeps equals the reference's up to fp32 rounding: the lost mass is bounded;
- forward and backward over a tiled idx: error vs fp64 (dense attention where query i sees exactly its tile's
  kept keys that it may attend to) at most 2x that of the same math in torch in the input dtype + a floor;
  and equal to the reference stage up to output roundings;
- dropout: deterministic per seed, drop rate ~p, forward and backward replay the same mask;
- the transposed index groups every kept (tile, slot) under its key block.
T in {1, 16, 64, 24 (not a power of two)}, N not a multiple of T, masks: none, causal, bool, -inf / finfo.min
padding, additive bias (+ causal), fully masked rows (no allowed key -> zeros; only finfo.min keys -> uniform),
GQA, fp32 / bf16.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it too)

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from spt_compile.kernels import attention_tiled_bwd as kbwd, autotune
from spt_compile.kernels import attention_tiled_fwd as kfwd
from spt_compile.kernels import attention_tiled_select as ksel
from spt_compile.lowering.formulas import attention_num_tiles, attention_tile_slots
from spt_compile.lowering.reference import pq_attention as ref
from spt_compile.lowering.reference import tiled_attention as ta
from tests.kernels._tiled_truth import (FLOOR, allowed_dense, assert_close_to_gt, build_mask, dense_attention,
                                        dense_grads, random_tiled_idx, tile_kept)

# no shrinking: under the interpreter it can take minutes; the failing example is printed as found
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.generate))
TILES = (1, 16, 24, 64)
MASKS = ("none", "causal", "bool", "pad_inf", "pad_finfo_min", "bias", "bias_causal")


# ------------------------------------------------------------------------------------------------
# problems and dense fp64 formulations
# ------------------------------------------------------------------------------------------------

def assert_close_to_ref(name, got, want, gt, dtype, rel):
    top = gt.abs().max().item() if gt.numel() else 0.0
    tol = rel if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * top + FLOOR[dtype],
                               msg=lambda m: f"{name} vs reference stage: {m}")


def problem(b, hkv, grp, nq, nk, d, dv, tile, kind, dtype, seed, full_row):
    g = torch.Generator().manual_seed(seed)
    nq = min(nq, max(8, 3 * tile))  # the interpreter runs a program per (tile, row block): keep T=1 small
    h = hkv * grp
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, nk, dv, generator=g, dtype=torch.float64).to(dtype)
    mask, causal = build_mask(kind, b, h, nq, nk, dtype, g, full_row)
    return g, q, k, v, mask, causal


# ------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------

def mass64(q, cb, codes, mask, causal, scale, tile, stride=1):
    """fp64 tile mass [B, H, nT, Nk] (independent of the reference): per-query softmax over its allowed keys of
    scale * q.k^ + bias, summed over the tile's scored queries (from its last query back in steps of stride);
    -1 where no query of the tile may attend."""
    b, h, nq, _ = q.shape
    khat = ref.reconstruct_keys(cb, codes).double()
    nk = khat.shape[2]
    s = (q.double() @ khat.repeat_interleave(h // khat.shape[1], 1).transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        fin = torch.finfo(torch.float32)
        s = s + torch.where(torch.isfinite(mask), mask.double().clamp(fin.min, fin.max), 0)
    ok = allowed_dense(mask, causal, b, h, nq, nk)
    s = s.masked_fill(~ok, -math.inf)
    p = torch.softmax(s.masked_fill(~ok.any(-1, keepdim=True), 0.0), -1) * ok
    nt = attention_num_tiles(nq, tile)
    scored = torch.zeros(nq, dtype=torch.float64)
    for t in range(nt):
        scored[list(range(min(nq, (t + 1) * tile) - 1, t * tile - 1, -stride))] = 1.0
    p = p * scored[:, None]
    pad = nt * tile - nq
    p = torch.cat([p, p.new_zeros(b, h, pad, nk)], 2).reshape(b, h, nt, tile, nk)
    okt = torch.cat([ok, ok.new_zeros(b, h, pad, nk)], 2).reshape(b, h, nt, tile, nk).any(3)
    return p.sum(3).masked_fill(~okt, -1.0)


def group_mass(m, group):
    """[B, H, nT, Nk] tile masses (-1 outside the union, alike for a group's heads) -> summed over each group of
    G heads, repeated to every head of it (the shared lists' mass)."""
    if group == 1:
        return m
    b, h, nt, nk = m.shape
    summed = m.clamp_min(0).reshape(b, h // group, group, nt, nk).sum(2).repeat_interleave(group, 1)
    return torch.where(m >= 0, summed, -1.0)


def kept_mass(m, idx):
    """Descending masses of idx's valid slots, -inf padded [B, H, nT, L], and their sum per tile."""
    got = m.gather(-1, idx.long().clamp_min(0)).masked_fill(idx < 0, -math.inf)
    return got.sort(-1, descending=True).values, torch.where(idx >= 0, got, 0.0).sum(-1)


@pytest.mark.parametrize("tile", TILES)
@settings(max_examples=3, **SETTINGS)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), grp=st.integers(1, 2), nq=st.integers(1, 70),
       nk=st.integers(2, 70), d=st.sampled_from([32, 64]),
       density=st.floats(0.05, 0.6), min_keys=st.integers(1, 12), kind=st.sampled_from(MASKS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), full_row=st.booleans(), seed=st.integers(0, 99),
       stride=st.sampled_from([1, 3]), share=st.booleans())
def test_select_tiles_vs_reference_and_fp64(b, hkv, grp, nq, nk, d, tile, density, min_keys, kind, dtype, full_row,
                                            seed, stride, share):
    g, q, k, _, mask, causal = problem(b, hkv, grp, nq, nk, d, 16, tile, kind, dtype, seed, full_row)
    nq = q.shape[2]
    cb, codes = ref.pq_quantize(k, d // 16, 8, 2)
    scale = d ** -0.5
    L = attention_tile_slots(nq, nk, density, min_keys, causal)
    # shared lists (share_kv_lists): the op routes a per-head mask to the plain selection, so the kernel never sees it
    group = grp if share and (mask is None or mask.shape[1] == 1) else 1
    idx = ksel.select_tiles(q, cb, codes, mask, causal, scale, tile, density, min_keys, L, stride=stride, group=group)
    ridx = ta.select_tiles(q, cb, codes, mask, causal, scale, tile, density, min_keys, L, stride=stride, group=group)
    nt = attention_num_tiles(nq, tile)
    assert idx.shape == (b, q.shape[1], nt, L) and idx.dtype == torch.int32
    # the reference's L_tile per tile, valid slots first, ascending (so distinct), only keys some query may see
    n = (idx >= 0).sum(-1)
    assert torch.equal(n, (ridx >= 0).sum(-1))
    assert torch.equal(idx >= 0, torch.arange(L) < n[..., None])
    assert bool(((idx[..., 1:] > idx[..., :-1]) | (idx[..., 1:] < 0)).all())
    if group > 1:
        lists = idx.reshape(b, -1, group, nt, L)
        assert bool((lists == lists[:, :, :1]).all()), "a group's heads share one list"
    m64 = group_mass(mass64(q, cb, codes, mask, causal, scale, tile, stride), group)
    got, got_sum = kept_mass(m64, idx)
    want, want_sum = kept_mass(m64, ridx)
    assert bool((got[torch.isfinite(got)] >= 0).all()), "a kept key no query of the tile may attend to"
    # lost mass: exact top-L of fp32 masses; they differ from fp64 by rounding only, so the kept masses match
    # the reference's up to ties reordered by that rounding (a tile's mass sums to at most T)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=1e-5 * tile * group)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=0, atol=1e-5 * tile * group)


def test_select_tiles_ties_and_chunks():
    """C = 2 codebooks (every score tied: the lower key must win, as in the reference) and a 1-tile chunk."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 50, 32, generator=g)
    k = torch.randn(1, 1, 45, 32, generator=g)
    cb, codes = ref.pq_quantize(k, 2, 2, 1)
    L = attention_tile_slots(50, 45, 0.2, 4, True)
    for chunk in (None, 1):
        idx = ksel.select_tiles(q, cb, codes, None, True, 0.3, 16, 0.2, 4, L, chunk=chunk)
        ridx = ta.select_tiles(q, cb, codes, None, True, 0.3, 16, 0.2, 4, L)
        m64 = mass64(q, cb, codes, None, True, 0.3, 16)
        torch.testing.assert_close(kept_mass(m64, idx)[0], kept_mass(m64, ridx)[0], rtol=0, atol=1e-5)
        assert torch.equal((idx >= 0).sum(-1), (ridx >= 0).sum(-1))


def test_select_tiles_bad_args():
    q = torch.randn(1, 2, 4, 32)
    cb, codes = ref.pq_quantize(torch.randn(1, 2, 8, 32), 4, 4, 1)
    with pytest.raises(ValueError, match="L must"):
        ksel.select_tiles(q, cb, codes, None, False, 1.0, 16, 0.5, 4, 0)
    with pytest.raises(ValueError, match="tile"):
        ksel.select_tiles(q, cb, codes, None, False, 1.0, 0, 0.5, 4, 4)
    with pytest.raises(ValueError, match="density"):
        ksel.select_tiles(q, cb, codes, None, False, 1.0, 16, 1.5, 4, 4)
    with pytest.raises(ValueError, match="codes"):
        ksel.select_tiles(q, cb, codes[0], None, False, 1.0, 16, 0.5, 4, 4)
    with pytest.raises(ValueError, match="mask"):
        ksel.select_tiles(q, cb, codes, torch.ones(1, 3, 4, 8, dtype=torch.bool), False, 1.0, 16, 0.5, 4, 4)


# ------------------------------------------------------------------------------------------------
# forward and backward over a tiled idx
# ------------------------------------------------------------------------------------------------

ATT_CASE = dict(b=st.integers(1, 2), hkv=st.integers(1, 2), grp=st.integers(1, 2), nq=st.integers(1, 70),
                nk=st.integers(1, 70), d=st.sampled_from([32, 64]), dv=st.sampled_from([16, 48]),
                density=st.floats(0.1, 1.0), kind=st.sampled_from(MASKS),
                dtype=st.sampled_from([torch.float32, torch.bfloat16]), full_row=st.booleans(),
                exact=st.booleans(), seed=st.integers(0, 99))


def attention_problem(b, hkv, grp, nq, nk, d, dv, tile, density, kind, dtype, full_row, exact, seed):
    g, q, k, v, mask, causal = problem(b, hkv, grp, nq, nk, d, dv, tile, kind, dtype, seed, full_row)
    h, nq = q.shape[1], q.shape[2]
    L = attention_tile_slots(nq, nk, 1.0 if exact else density, 1, causal)
    if exact:
        idx = ta.tile_allowed_indices(mask, causal, (b, h, nq, nk), tile, L, q.device)
    else:
        idx = random_tiled_idx(b, h, attention_num_tiles(nq, tile), nk, L, g)
    keep = tile_kept(idx, tile, nq, nk) & allowed_dense(mask, causal, b, h, nq, nk)
    dout = torch.randn(b, h, nq, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, mask, causal, idx, keep, dout


@pytest.mark.parametrize("tile", TILES)
@settings(max_examples=3, **SETTINGS)
@given(**ATT_CASE)
def test_forward_vs_reference_and_fp64(b, hkv, grp, nq, nk, d, dv, tile, density, kind, dtype, full_row, exact,
                                       seed):
    q, k, v, mask, causal, idx, keep, _ = attention_problem(b, hkv, grp, nq, nk, d, dv, tile, density, kind, dtype,
                                                            full_row, exact, seed)
    nq, scale = q.shape[2], d ** -0.5
    out, lse = kfwd.tiled_attention_forward(q, k, v, idx, mask, causal, scale, tile, 0.0, None)
    rout, rlse = ta.tiled_attention_forward(q, k, v, idx, mask, causal, scale, tile, 0.0, None)
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    m64 = None if mask is None else mask.double()
    gt = dense_attention(q.double(), k.double(), v.double(), keep, m64, scale)
    assert_close_to_gt("out", out, dense_attention(q, k, v, keep, mask, scale), gt, dtype)
    assert_close_to_ref("out", out, rout, gt, dtype, 2 ** -7)
    empty = ~keep.any(-1)
    assert torch.equal(torch.isneginf(lse), empty) and bool((out[empty] == 0).all())
    fin = ~empty
    torch.testing.assert_close(lse[fin], rlse[fin], rtol=1e-5, atol=1e-5)
    if exact and kind in ("none", "causal", "bool", "pad_finfo_min"):  # exact mode = SDPA on rows with a key
        h = q.shape[1]
        am = None if mask is None else mask.expand(b, h, nq, nk)
        sd = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=am,
                                                              is_causal=causal, scale=scale, enable_gqa=True)
        torch.testing.assert_close(gt[fin], sd[fin])


@pytest.mark.parametrize("tile", TILES)
@settings(max_examples=3, **SETTINGS)
@given(**ATT_CASE)
def test_backward_vs_reference_and_fp64(b, hkv, grp, nq, nk, d, dv, tile, density, kind, dtype, full_row, exact,
                                        seed):
    q, k, v, mask, causal, idx, keep, dout = attention_problem(b, hkv, grp, nq, nk, d, dv, tile, density, kind,
                                                               dtype, full_row, exact, seed)
    scale = d ** -0.5
    out, lse = kfwd.tiled_attention_forward(q, k, v, idx, mask, causal, scale, tile, 0.0, None)
    grads = kbwd.tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, causal, scale, tile, 0.0, None)
    assert grads[3] is None
    grads = grads[:3]
    rgrads = ta.tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, causal, scale, tile, 0.0, None)[:3]
    m64 = None if mask is None else mask.double()
    _, *gt = dense_grads(q.double(), k.double(), v.double(), keep, m64, scale, dout.double())
    _, *same = dense_grads(q, k, v, keep, mask, scale, dout)
    for name, g_, s_, t_, r_ in zip(("dq", "dk", "dv"), grads, same, gt, rgrads):
        assert g_.dtype == dtype and g_.shape == t_.shape, name
        assert_close_to_gt(name, g_, s_, t_, dtype)
        assert_close_to_ref(name, g_, r_, t_, dtype, 2 ** -6)


def test_backward_deterministic_and_gqa_sums_heads():
    """Two runs give identical bits; with all query heads of a kv head sharing q, dk/dv are G x one head's."""
    q, k, v, mask, causal, idx, keep, dout = attention_problem(1, 1, 1, 37, 41, 32, 16, 16, 0.5, "causal",
                                                               torch.float32, False, False, 4)
    g = 3
    qg, dg = q.expand(1, g, 37, 32).contiguous(), dout.expand(1, g, 37, 16).contiguous()
    ig = idx.expand(1, g, *idx.shape[2:]).contiguous()
    out, lse = kfwd.tiled_attention_forward(qg, k, v, ig, None, True, 0.2, 16, 0.0, None)
    a = kbwd.tiled_attention_backward(dg, qg, k, v, out, lse, ig, None, True, 0.2, 16, 0.0, None)
    b_ = kbwd.tiled_attention_backward(dg, qg, k, v, out, lse, ig, None, True, 0.2, 16, 0.0, None)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b_[:3]))
    o1, l1 = kfwd.tiled_attention_forward(q, k, v, idx, None, True, 0.2, 16, 0.0, None)
    one = kbwd.tiled_attention_backward(dout, q, k, v, o1, l1, idx, None, True, 0.2, 16, 0.0, None)
    torch.testing.assert_close(a[1], g * one[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[2], g * one[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [ksel.KERNEL_STATS, ksel.KERNEL_MASS, kfwd.KERNEL, kbwd.KERNEL_DQ,
                                    kbwd.KERNEL_DKV])
def test_every_candidate_config_gives_the_same_result(kernel):
    """Tuning may pick any fitting candidate: each must give the default's result (row blocks per tile, key
    blocks, dropout offsets are config-independent). T = 64 > BLOCK_M for some configs: several row blocks."""
    g = torch.Generator().manual_seed(11)
    q, k, v = torch.randn(1, 2, 70, 32, generator=g), torch.randn(1, 1, 50, 32, generator=g), torch.randn(
        1, 1, 50, 16, generator=g)
    mask = torch.randn(1, 2, 70, 50, generator=g).masked_fill(torch.rand(1, 2, 70, 50, generator=g) < 0.2, -math.inf)
    dout = torch.randn(1, 2, 70, 16, generator=g)
    cb, codes = ref.pq_quantize(k, 2, 8, 2)
    L, seed = attention_tile_slots(70, 50, 0.3, 4, True), torch.tensor(7)
    stage = {ksel.KERNEL_STATS: "select", ksel.KERNEL_MASS: "select", kfwd.KERNEL: "fwd"}.get(kernel, "bwd")
    idx = ksel.select_tiles(q, cb, codes, mask, True, 0.2, 64, 0.3, 4, L)
    out, lse = kfwd.tiled_attention_forward(q, k, v, idx, mask, True, 0.2, 64, 0.25, seed)

    def run():
        if stage == "select":
            return (ksel.select_tiles(q, cb, codes, mask, True, 0.2, 64, 0.3, 4, L),)
        if stage == "fwd":
            return kfwd.tiled_attention_forward(q, k, v, idx, mask, True, 0.2, 64, 0.25, seed)
        return kbwd.tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, True, 0.2, 64, 0.25, seed)[:3]

    base = run()
    fits = autotune.fitting(kernel, (32, 32 if stage == "select" else 16, "fp32", 64))
    assert len(fits) >= 2 or len(autotune.candidates(kernel)) == 1
    for cfg in fits:
        with autotune.forced({kernel: cfg}):
            got = run()
        for i, (a_, b_) in enumerate(zip(got, base)):
            torch.testing.assert_close(a_, b_, rtol=1e-5, atol=1e-6, msg=lambda m: f"{cfg} output {i}: {m}")


def test_transposed_tiles_groups_every_kept_slot():
    g = torch.Generator().manual_seed(0)
    b, h, hkv, nt, nk, L, bn = 2, 4, 2, 3, 37, 9, 16
    idx = random_tiled_idx(b, h, nt, nk, L, g)
    visit, vslot, voff = kbwd.transposed_tiles(idx, h, hkv, nk, bn)
    n_kb = -(-nk // bn)
    assert voff.shape == (b * hkv * n_kb + 1,) and int(voff[0]) == 0 and int(voff[-1]) == visit.numel()
    seen = set()
    for prog in range(b * hkv * n_kb):
        bb, hk, kb = prog // (hkv * n_kb), (prog // n_kb) % hkv, prog % n_kb
        vs = visit[voff[prog]:voff[prog + 1]].tolist()
        assert vs == sorted(set(vs))  # ordered, no repeats
        for vv, s0 in zip(vs, vslot[voff[prog]:voff[prog + 1]].tolist()):
            hh, t = hk * (h // hkv) + vv // nt, vv % nt
            row = idx[bb, hh, t].tolist()
            mine = [s for s, j in enumerate(row) if j >= 0 and j // bn == kb]
            assert mine and mine[0] == s0 and mine == list(range(s0, s0 + len(mine)))
            seen.update((bb, hh, t, s) for s in mine)
    assert len(seen) == int((idx >= 0).sum())


# ------------------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------------------

def test_dropout_deterministic_and_backward_consistent():
    b, hkv, grp, nq, nk, d, dv, tile, p = 1, 1, 2, 21, 24, 32, 16, 16, 0.3
    q, k, v, mask, causal, idx, keep, dout = attention_problem(b, hkv, grp, nq, nk, d, dv, tile, 0.7, "causal",
                                                               torch.float32, False, False, 5)
    scale, seed = d ** -0.5, torch.tensor(1234)
    f = kfwd.tiled_attention_forward
    o1, l1 = f(q, k, v, idx, mask, causal, scale, tile, p, seed)
    o2, l2 = f(q, k, v, idx, mask, causal, scale, tile, p, seed)
    o3, _ = f(q, k, v, idx, mask, causal, scale, tile, p, torch.tensor(99))
    _, l0 = f(q, k, v, idx, mask, causal, scale, tile, 0.0, None)
    assert torch.equal(o1, o2) and torch.equal(l1, l2) and not torch.equal(o1, o3)
    torch.testing.assert_close(l1, l0)  # lse is over the kept keys before dropout
    # read the dropout scale back: with v = identity (Dv = Nk) out[.., j] = P_ij * z_ij
    eye = torch.eye(nk).expand(b, hkv, nk, nk)
    z = f(q, k, eye, idx, mask, causal, scale, tile, p, seed)[0] / f(q, k, eye, idx, mask, causal, scale, tile,
                                                                    0.0, None)[0].clamp_min(1e-30)
    zk = z[keep]
    assert torch.allclose(zk, torch.where(zk > 0.5, 1 / (1 - p), 0.0), atol=1e-4)
    rate = (zk < 0.5).float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / zk.numel()), rate
    z = torch.where(keep, z, 0.0)
    o64, *g64 = dense_grads(q.double(), k.double(), v.double(), keep, None, scale, dout.double(), zscale=z.double())
    torch.testing.assert_close(o1.double(), o64, rtol=1e-4, atol=1e-5)
    grads = kbwd.tiled_attention_backward(dout, q, k, v, o1, l1, idx, mask, causal, scale, tile, p, seed)[:3]
    for name, g_, want in zip(("dq", "dk", "dv"), grads, g64):
        torch.testing.assert_close(g_.double(), want, rtol=1e-4, atol=1e-5, msg=name)


def test_attention_bad_args():
    q, k, v = torch.randn(1, 2, 20, 32), torch.randn(1, 1, 6, 32), torch.randn(1, 1, 6, 16)
    idx = torch.zeros(1, 2, 2, 3, dtype=torch.int32)
    f = kfwd.tiled_attention_forward
    with pytest.raises(ValueError, match="idx"):
        f(q, k, v, torch.zeros(1, 2, 20, 3, dtype=torch.int32), None, False, 1.0, 16, 0.0, None)
    with pytest.raises(ValueError, match="tile"):
        f(q, k, v, idx, None, False, 1.0, 0, 0.0, None)
    with pytest.raises(ValueError, match="seed"):
        f(q, k, v, idx, None, False, 1.0, 16, 0.1, None)
    with pytest.raises(ValueError, match="mask"):
        f(q, k, v, idx, torch.zeros(2, 1, 20, 6), False, 1.0, 16, 0.0, None)
    out, lse = f(q, k, v, idx, None, False, 1.0, 16, 0.0, None)
    with pytest.raises(ValueError, match="lse"):
        kbwd.tiled_attention_backward(out, q, k, v, out, lse[0], idx, None, False, 1.0, 16, 0.0, None)
    with pytest.raises(ValueError, match="mask_grad"):
        kbwd.tiled_attention_backward(out, q, k, v, out, lse, idx, torch.ones(1, 1, 20, 6, dtype=torch.bool), False,
                                      1.0, 16, 0.0, None, True)  # a bool mask has no gradient
    with pytest.raises(ValueError, match="head dim"):
        f(torch.randn(1, 2, 20, 256), torch.randn(1, 1, 6, 256), torch.randn(1, 1, 6, 16), idx, None, False, 1.0,
          16, 0.0, None)
