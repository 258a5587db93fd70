"""Group-shared query-tile selection (lowering/reference/tiled_attention.select_tiles with group = G, the op's
share_kv_lists) against an independent fp64 formulation: one list per (group of query heads, tile), top L_tile
keys by the per-query-normalised PQ mass summed over the tile's scored queries and the group's heads."""
from __future__ import annotations

import math

import pytest
import torch

from spt_compile.lowering.formulas import attention_num_tiles, attention_tile_keys, attention_tile_slots
from spt_compile.lowering.reference import pq_attention as ref
from spt_compile.lowering.reference import tiled_attention as ta

# (b, h, hkv, nq, nk, tile, mask kind): N not a multiple of T, T not a power of two, GQA, per-head masks
CASES = [(1, 4, 4, 37, 37, 5, "none"), (2, 4, 2, 50, 50, 16, "causal"), (1, 8, 8, 40, 33, 8, "bias"),
         (2, 4, 4, 30, 45, 7, "pad")]


def make(case, seed=0):
    b, h, hkv, nq, nk, tile, kind = case
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, nq, 16, generator=g), torch.randn(b, hkv, nk, 16, generator=g)
    mask, causal = None, kind == "causal"
    if kind == "bias":  # differs per head: the group's union matters
        mask = torch.randn(b, h, nq, nk, generator=g)
        mask[:, 0, :, : nk // 3] = -math.inf
    elif kind == "pad":  # a padding bias: not allowed for sizing only
        mask = torch.zeros(b, 1, 1, nk)
        mask[1, ..., nk // 2:] = torch.finfo(torch.float32).min
    return q, k, mask, causal, tile


def allowed_dense(mask, causal, b, h, nq, nk, strict=False):
    a = torch.ones(b, h, nq, nk, dtype=torch.bool)
    if mask is not None:
        a = a & torch.isfinite(mask)
        if strict:
            a = a & (mask > torch.finfo(mask.dtype).min / 2)
    if causal:
        a = a & torch.ones(nq, nk, dtype=torch.bool).tril()
    return a


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("group,stride", [(1, 1), (2, 1), (4, 1), (2, 3), (4, 4)])
def test_group_lists_are_shared_top_mass(case, group, stride):
    q, k, mask, causal, tile = make(case, seed=group)
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    density, lmin, scale = 0.3, 6, 0.25
    cb, codes = ref.pq_quantize(k, 4, 4, 2)
    L = attention_tile_slots(nq, nk, density, lmin, causal)
    idx = ta.select_tiles(q, cb, codes, mask, causal, scale, tile, density, lmin, L, stride=stride, group=group)
    nt, ng = attention_num_tiles(nq, tile), h // group
    assert idx.shape == (b, h, nt, L) and idx.dtype == torch.int32
    lists = idx.reshape(b, ng, group, nt, L)
    assert (lists == lists[:, :, :1]).all(), "the heads of a group share one list"
    lists = lists[:, :, 0]  # [B, G, nT, L]
    valid = lists >= 0
    assert torch.equal(valid, valid.cummin(-1).values), "valid slots first"

    def per_group_tile(x):  # [B, H, Nq, Nk] -> [B, G, nT, Nk], summed over the group's heads and tile rows
        x = torch.nn.functional.pad(x, (0, 0, 0, nt * tile - nq))
        return x.reshape(b, ng, group, nt, tile, nk).sum((2, 4))

    allowed = allowed_dense(mask, causal, b, h, nq, nk)
    union = per_group_tile(allowed.double()) > 0
    sizing = (per_group_tile(allowed_dense(mask, causal, b, h, nq, nk, strict=True).double()) > 0).sum(-1)
    want_n = torch.minimum(attention_tile_keys(sizing, density, lmin), union.sum(-1))
    assert torch.equal(valid.sum(-1).long(), want_n), "L_tile keys per group tile"
    sel = torch.zeros(b, ng, nt, nk + 1, dtype=torch.bool).scatter_(-1, torch.where(valid, lists.long(), nk), True)
    sel = sel[..., :nk]
    assert not (sel & ~union).any(), "a key no query of the group's tile may see was kept"
    khat = ref.reconstruct_keys(cb, codes).double().repeat_interleave(h // hkv, 1)  # [B, H, Nk, D]
    s = scale * q.double() @ khat.transpose(-1, -2)
    if mask is not None:
        s = s + torch.where(torch.isfinite(mask), mask.double(), 0.0)
    s = s.masked_fill(~allowed, -math.inf)
    row = allowed.any(-1, keepdim=True)
    p = torch.where(row, torch.softmax(s.masked_fill(~row, 0.0), -1), 0.0)
    scored = ta.scored_rows(0, nq, nq, tile, stride, q.device)  # [Nq]: the rows whose softmax counts
    mass = per_group_tile(p * scored[:, None])
    worst_kept = mass.masked_fill(~sel, math.inf).amin(-1)
    best_left = mass.masked_fill(sel | ~union, -math.inf).amax(-1)
    assert (best_left <= worst_kept + 1e-5 * (1 + mass.amax())).all(), "a left-out key had more group mass"


def test_bad_group_is_named():
    q, k, mask, causal, tile = make(CASES[0])
    cb, codes = ref.pq_quantize(k, 4, 4, 1)
    for bad in (0, 3, 2.0):
        with pytest.raises(ValueError, match="group"):
            ta.select_tiles(q, cb, codes, mask, causal, 0.25, tile, 0.3, 6, 12, group=bad)
