"""The one place for the sizing formulas every layer shares: the compiler's plan, the ops, their fake impls
and the report all call these, so they agree bit for bit (docs/OPS.md).

- attention: L, the number of key slots per query (or per query tile), and when attention is exact;
- routed FFN: k, the number of blocks per token, and when the FFN is exact.
"""
from __future__ import annotations

import math

import torch


def attention_keys_kept(nk: int, density: float) -> int:
    """L = max(1, ceil(density * Nk)): key slots per query."""
    return max(1, math.ceil(density * nk))


def attention_is_exact(nk: int, density: float, min_seq_len: int = 0) -> bool:
    """Exact mode: every allowed key is kept (no PQ, equals scaled_dot_product_attention). It holds when L
    covers every key, and below the run-time threshold Nk < min_seq_len (the op decides per call, so one
    graph with a symbolic length serves short and long sequences)."""
    return nk < min_seq_len or attention_keys_kept(nk, density) >= nk


def attention_tile_keys(allowed_tile: int, density: float, min_keys: int) -> int:
    """L_tile = min(allowed_tile, max(L_min, ceil(density * allowed_tile))): key slots of one query tile.

    allowed_tile counts the keys that some query of the tile may attend to (a padding bias <= half the
    dtype's most negative finite value counts as not allowed here, for sizing only); L_min = min_keys keeps
    early causal tiles from starving. Works elementwise on int tensors too (the sparse selection sizes every
    tile at once with it)."""
    if isinstance(allowed_tile, torch.Tensor):
        want = torch.ceil(density * allowed_tile.to(torch.float64)).to(allowed_tile.dtype).clamp(min=min_keys)
        return torch.minimum(allowed_tile, want)
    # sym_min / sym_max: a symbolic length stays symbolic (Python's min / max would guard on it and recompile)
    return torch.sym_min(allowed_tile, torch.sym_max(min_keys, math.ceil(density * allowed_tile)))


def attention_tile_visible(nq: int, nk: int, is_causal: bool) -> int:
    """Most keys a query tile can see from shapes alone: Nk, or min(Nk, Nq) under top-left causality."""
    return torch.sym_min(nk, nq) if is_causal else nk


def attention_tile_slots(nq: int, nk: int, density: float, min_keys: int, is_causal: bool) -> int:
    """L_max: slots of the tiled idx [B, H, ceil(Nq / T), L_max], from shapes only (the fake impl stays static).
    L_tile grows with allowed_tile, and no tile can see more than attention_tile_visible keys."""
    return torch.sym_max(1, attention_tile_keys(attention_tile_visible(nq, nk, is_causal), density, min_keys))


def attention_tile_is_exact(nq: int, nk: int, density: float, min_keys: int, is_causal: bool,
                            min_seq_len: int = 0) -> bool:
    """Exact mode of the query-tile semantics: Nk < min_seq_len (decided per call), or L_max covers every key a
    tile can see (density 1.0, or L_min that large). Each tile then lists every key its queries may attend to."""
    visible = attention_tile_visible(nq, nk, is_causal)
    return nk < min_seq_len or attention_tile_slots(nq, nk, density, min_keys, is_causal) >= visible


def attention_scored_row(local, rows_in_tile, stride: int):
    """Whether query `local` (0-based within its tile of `rows_in_tile` real queries) scores keys in the
    selection: every stride-th query counted back from the tile's last one (stride 1: all of them). The last
    query is always scored: under causality it sees every key some query of the tile sees, so no key the tile
    may attend to is left without an estimate. Works elementwise on int tensors (the selection's row masks)."""
    return (rows_in_tile - 1 - local) % stride == 0


def attention_list_group(heads: int, kv_heads: int, share_kv_lists: bool) -> int:
    """G: how many consecutive query heads keep one key list per tile. share_kv_lists (GQA): the H / Hkv query
    heads of one kv head share it (mass summed over them); otherwise every head keeps its own (G = 1)."""
    return heads // kv_heads if share_kv_lists else 1


def mask_is_per_head(mask) -> bool:
    """A mask [B, H or 1, Nq or 1, Nk] that differs between heads. Shared lists (G > 1) then need the group's
    union of allowed keys: the plain selection computes it; the selection kernels and the CPU group layout do not."""
    return mask is not None and mask.shape[1] > 1


PQ_FIT_KEYS = 1024  # k-means fits on at most this many keys: 64 per centroid at C = 16 is plenty for 3 Lloyd steps


def pq_fit_positions(nk: int, device: torch.device) -> torch.Tensor:
    """[F] int64: the key positions the PQ k-means fits its codebooks on (every key is then assigned to them):
    all Nk keys up to PQ_FIT_KEYS, else PQ_FIT_KEYS evenly spaced ones, (i * Nk) // F. Fitting is then O(F) per
    Lloyd step instead of O(Nk) (at Nk = 8192: 1/8 of it)."""
    f = min(nk, PQ_FIT_KEYS)
    return (torch.arange(f, device=device) * nk) // f


def attention_num_tiles(nq: int, tile: int) -> int:
    """ceil(Nq / T): query tiles of T consecutive positions, the last one possibly short."""
    return -(-nq // tile)


def ffn_top_k(num_blocks: int, density: float) -> int:
    """k = max(1, round(density * E)), at most E: blocks per token."""
    return max(1, min(num_blocks, round(density * num_blocks)))


def ffn_is_exact(num_blocks: int, top_k: int) -> bool:
    """Exact mode: every block is kept (the op runs the dense FFN)."""
    return top_k >= num_blocks
