"""Query-tile selection shared by a group of query heads (issue 9, GQA): plain-PyTorch reference.

lowering/reference/tiled_attention.py's select_tiles keeps one key list per (batch, head, tile). Here `group`
consecutive query heads (e.g. the query heads of one GQA kv head) keep ONE list per tile: the keys with the
largest estimated mass summed over the tile's queries AND the group's heads. Each head's per-query mass is the
same as in select_tiles (softmax over the query's allowed keys of scale * q.k^ + bias, k^ the PQ
reconstruction of that head's kv head), so group=1 is select_tiles exactly. A group's tile may see the keys
that some query of some head of the group may attend to; L_tile = attention_tile_keys of that count (a padding
bias counts as not allowed for sizing only, as in select_tiles). The attention stage is unchanged: each query
attends exactly over the shared list's keys that its own head's mask and causality allow.

Why a group shares a list: in a GQA kernel the group's heads then read one gathered K/V tile (group x the reuse
per gathered key). bench/attention_tiles.py measures what it costs in quality on MiniLM.
"""
from __future__ import annotations

import torch
from torch import Tensor

from spt_compile.lowering.formulas import attention_num_tiles, attention_tile_keys
from spt_compile.lowering.reference.pq_attention import _slot_softmax, reconstruct_keys
from spt_compile.lowering.reference.tiled_attention import (_ascending_first, _tile_any, _tile_view,
                                                            query_allowed, tile_chunk)


def check_group(heads: int, group: int) -> int:
    """Groups of consecutive query heads; `group` must divide the number of heads. Returns the group count."""
    if not isinstance(group, int) or group < 1 or heads % group:
        raise ValueError(f"group={group!r} must be a positive int dividing the {heads} query heads")
    return heads // group


def _group_any(x: Tensor, groups: int) -> Tensor:
    """[B, H, c, Nk] bool -> [B, G, c, Nk]: True where some head of the group has it."""
    b, h, c, nk = x.shape
    return x.reshape(b, groups, h // groups, c, nk).any(2)


def select_tiles_grouped(q: Tensor, codebooks: Tensor, codes: Tensor, mask: Tensor | None, is_causal: bool,
                         scale: float, tile: int, density: float, min_keys: int, L: int, group: int, *,
                         chunk: int | None = None) -> Tensor:
    """idx [B, H, ceil(Nq/T), L] int32; the `group` heads of a group hold the same lists (ascending, then -1)."""
    b, h, nq, d = q.shape
    hkv, nk = codes.shape[1], codes.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of the {hkv} kv heads")
    ng = check_group(h, group)
    nt = attention_num_tiles(nq, tile)
    khat_t = reconstruct_keys(codebooks, codes).transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Nk] fp32
    idx = torch.full((b, ng, nt, L), -1, dtype=torch.int32, device=q.device)
    step = tile_chunk(nt, b * h * tile * nk, chunk)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1, c = t0 * tile, min(nq, t1 * tile), t1 - t0
        qs = q[:, :, i0:i1].to(torch.float32).reshape(b, hkv, h // hkv, i1 - i0, d)
        s = (qs @ khat_t).reshape(b, h, i1 - i0, nk) * scale  # [B, H, rows, Nk] estimated logits
        allowed, bias = query_allowed(mask, is_causal, i0, i1, nk, torch.float32, q.device)
        if bias is not None:
            s = s + bias
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        mass = _tile_view(_slot_softmax(s), c, tile).sum(3)  # [B, H, c, Nk]: per-query softmax, tile sum
        del s
        mass = mass.reshape(b, ng, group, c, nk).sum(2)  # [B, G, c, Nk]: and the group's heads
        if allowed is None:
            union = torch.ones((b, ng, c, nk), dtype=torch.bool, device=q.device)
            sizing = torch.full((b, ng, c), nk, dtype=torch.int64, device=q.device)
        else:
            union = _group_any(_tile_any(allowed, c, tile).expand(b, h, c, nk), ng)
            strict, _ = query_allowed(mask, is_causal, i0, i1, nk, torch.float32, q.device, padding_too=False)
            sizing = _group_any(_tile_any(strict, c, tile).expand(b, h, c, nk), ng).sum(-1)
        l_tile = torch.minimum(attention_tile_keys(sizing, density, min_keys), union.sum(-1))  # [B, G, c]
        kk = min(L, nk)
        # stable descending sort: equal masses keep the lower key first (select_tiles' contract)
        top = torch.sort(mass.masked_fill(~union, -1.0), dim=-1, descending=True, stable=True).indices[..., :kk]
        valid = torch.arange(kk, device=q.device) < l_tile[..., None]
        idx[:, :, t0:t1] = _ascending_first(top, valid, L)
    return idx.repeat_interleave(group, dim=1)  # [B, H, nT, L]
