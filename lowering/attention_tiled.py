"""The query-tile mode of torch.ops.spt.pq_sparse_attention (query_tile = T > 0; docs/OPS.md "query tiles"):
the key lists the op body runs on (PQ + tile selection, or the exact lists) on the plain-PyTorch path.
The fast stages are lowering/attention_tiled_cpu_select.py and attention_tiled_cpu.py; lowering/reference/tiled_attention.py is the semantics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from spt_compile.lowering import attention_tiled_cpu_select as fast
from spt_compile.lowering.formulas import attention_tile_is_exact, attention_tile_slots
from spt_compile.lowering.reference import pq_attention as ref
from spt_compile.lowering.reference import tiled_attention as ta


def tiled_select(q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float, density: float,
                 tile: int, min_keys: int, pq_subspaces: int, pq_centroids: int, kmeans_iters: int,
                 min_seq_len: int = 0, stride: int = 1, group: int = 1) -> Tensor:
    """idx [B, H, ceil(Nq/T), L_max] int32 (exact key lists in exact mode; all -1 below min_seq_len when the
    exact lists do not fit L_max, as in the per-query op: the backward rebuilds them). group: heads per shared
    list (exact mode needs no sharing: every list is every key the tile may see)."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    L = attention_tile_slots(nq, nk, density, min_keys, is_causal)
    if attention_tile_is_exact(nq, nk, density, min_keys, is_causal, min_seq_len):
        full = attention_tile_slots(nq, nk, 1.0, 1, is_causal)
        idx = ta.tile_allowed_indices(mask, is_causal, (b, h, nq, nk), tile, full, q.device)
        return idx if full == L else torch.full((b, h, idx.shape[2], L), -1, dtype=torch.int32, device=q.device)
    codebooks, codes = ref.pq_quantize(k, pq_subspaces, pq_centroids, kmeans_iters)
    return fast.select_tiles(q, codebooks, codes, mask, is_causal, scale, tile, density, min_keys, L,
                             stride=stride, group=group)


def rebuild_exact(idx: Tensor, q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool, tile: int,
                  min_seq_len: int) -> Tensor:
    """The exact key lists when the call ran exact below min_seq_len and they did not fit idx's L_max slots."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    full = attention_tile_slots(nq, nk, 1.0, 1, is_causal)
    if nk < min_seq_len and idx.shape[3] < full:
        return ta.tile_allowed_indices(mask, is_causal, (b, h, nq, nk), tile, full, q.device)
    return idx
