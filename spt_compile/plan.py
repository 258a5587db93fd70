"""The policy: one frozen Plan per matched site, or the reason it stays dense.

Every decision about a site (L, T, M, C, E, k, router, exact mode, the run-time threshold) is taken here, once,
from the options, the site's traced shapes and the sizing formulas of lowering/formulas.py. The rewrite
consumes the Plan; the report renders it (`Plan.display()`); nothing reads a decision back from a display dict.

A symbolic key count (Dynamo's dynamic shapes) is never decided from its hint: the op takes `min_seq_len` and
decides exact vs sparse per call, and L (per query, or L_max per query tile) is computed by the op at run time.

Attention selection (option attention_query_tile = T, docs/OPS.md "query tiles"): T = 0 is the per-query op
(L = attention_keys_kept(Nk, density) slots per query); T >= 1 tiles T consecutive queries under one key list of
L_tile = attention_tile_keys(allowed_tile, density, L_min) keys, in an idx of L = attention_tile_slots(...) slots
(T = 1: per-query selection with the tile formula).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from spt_compile.lowering import formulas
from spt_compile.options import SptOptions
from spt_compile.patterns.graph_utils import size_hint, val

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

EXACT, SPARSE, RUNTIME = "exact", "sparse", "runtime"  # RUNTIME: the op decides per call (symbolic length)


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    density: float
    L: int | None           # idx slots: per query (T = 0), or L_max per tile (T >= 1); None when symbolic
    T: int                  # queries per tile sharing one key list (0: the per-query op; 1: tiles of one query)
    L_min: int              # floor of a tile's key list (the op's min_keys; unused when T = 0)
    select_stride: int      # every s-th query of a tile scores keys (the op's select_stride; 1 when T = 0)
    share_kv_lists: bool    # GQA: a kv head's query heads share each tile's list (T >= 1 and H > Hkv only)
    is_causal: bool         # the op's is_causal (sizes the tiles' lists: L_max <= min(Nk, Nq) when causal)
    L_first: int | None     # T >= 1: the first tile's list length from shapes (< L under causality), else None
    M: int                  # PQ sub-spaces
    C: int                  # PQ centroids per sub-space
    kmeans_iters: int
    kv_heads: int
    dropout: float
    mode: str               # EXACT | SPARSE | RUNTIME
    min_seq_len: int        # the threshold the op applies at run time (0: decided here, nothing at run time)
    scale: float
    notes: tuple[str, ...] = ()

    def display(self) -> dict[str, Any]:
        out = {"density": self.density, "L": self._slots_text(), "T": self.T}
        if self.T:
            out.update(L_min=self.L_min, L_tile=self.tile_keys_text(), select_stride=self.select_stride)
            if self.share_kv_lists:
                out["share_kv_lists"] = True
        out.update(M=self.M, C=self.C, kv_heads=self.kv_heads, dropout=self.dropout, mode=self.mode)
        if self.mode == RUNTIME:
            out["min_seq_len"] = self.min_seq_len
        return out

    def _slots_text(self) -> int | str:
        if self.L is not None:
            return self.L
        if not self.T:
            return f"ceil({self.density}*Nk)"
        visible = "min(Nk,Nq)" if self.is_causal else "Nk"
        return f"min({visible}, max({self.L_min}, ceil({self.density}*{visible})))"

    def tile_keys_text(self) -> int | str:
        """The tiles' key-list lengths from shapes (no padding mask): one number when every tile sees the same
        keys, else "first..last" (causal: tile t sees min(Nk, (t+1)*T) keys)."""
        if self.L is None or self.L_first is None:
            return "per call"
        return self.L if self.L_first == self.L else f"{self.L_first}..{self.L}"


@dataclasses.dataclass(frozen=True)
class FfnPlan:
    density: float
    E: int                  # neuron blocks
    k: int                  # blocks per token
    act: str
    router: str             # "lowrank" | "oracle"
    rank: int               # low-rank router rank
    refresh: int            # router refresh period (calls)
    gated: bool
    clustered: bool         # neurons grouped by balanced k-means (needs the weights at compile time)
    mode: str               # EXACT | SPARSE
    notes: tuple[str, ...] = ()

    def display(self) -> dict[str, Any]:
        return {"density": self.density, "E": self.E, "k": self.k, "act": self.act, "router": self.router,
                "rank": self.rank, "gated": self.gated, "clustered": self.clustered, "mode": self.mode}


def op_takes_min_seq_len() -> bool:
    """Whether torch.ops.spt.pq_sparse_attention has the run-time threshold argument."""
    import spt_compile.lowering  # noqa: F401  - registers torch.ops.spt.*
    schema = torch.ops.spt.pq_sparse_attention.default._schema
    return any(a.name == "min_seq_len" for a in schema.arguments)


# --- attention --------------------------------------------------------------------------------

def plan_attention(m, options: SptOptions) -> AttentionPlan | str:
    """The plan for an AttentionMatch, or the reason it stays dense."""
    if options.attention == "dense":
        return "attention='dense' in options"
    q, k, v = val(m.q), val(m.k), val(m.v)
    if q is None or k is None or v is None:
        return "q/k/v have no traced tensor values"
    flat = getattr(m, "batch_heads_flat", False)  # [B*H, N, D]: the op sees B=1, H=B*H
    if q.dim() != (3 if flat else 4):
        return f"q has {q.dim()} dims; the op needs [B, H, N, D]"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} not supported (float16, bfloat16, float32, all equal)"
    head_axis = 0 if flat else 1
    head_dim, heads, kv_heads = (_static(s) for s in (q.shape[-1], q.shape[head_axis], k.shape[head_axis]))
    if head_dim is None or heads is None or kv_heads is None:
        return "symbolic head dim or head count: the op needs them fixed at compile time"
    if heads % kv_heads:
        return f"{heads} query heads not a multiple of {kv_heads} kv heads"
    n_keys = _static(k.shape[-1] if m.k_transposed else k.shape[-2])
    notes = []
    subspaces = _largest_divisor_at_most(head_dim, options.pq_subspaces)
    if subspaces != options.pq_subspaces:
        notes.append(f"pq_subspaces {options.pq_subspaces} -> {subspaces} (head dim {head_dim})")
    scale = m.scale if m.scale is not None else head_dim ** -0.5
    tile = options.attention_query_tile
    # stride >= T scores only each tile's last query, as stride = T does; the per-query op scores every query
    stride = min(options.attention_select_stride, tile) if tile else 1
    share = bool(options.attention_share_kv_lists and tile and heads > kv_heads)  # else nothing to share
    common = dict(density=options.attention_density, T=tile, L_min=options.attention_min_keys, select_stride=stride,
                  share_kv_lists=share,
                  is_causal=bool(m.is_causal), M=subspaces, C=options.pq_centroids,
                  kmeans_iters=options.pq_kmeans_iters, kv_heads=kv_heads, dropout=float(m.dropout_p),
                  scale=float(scale), notes=tuple(notes))
    n_queries = _static(q.shape[-2])
    if n_keys is None or (tile and n_queries is None):  # symbolic: never decide from the hint
        if options.min_seq_len > 0 and not op_takes_min_seq_len():
            return (f"symbolic key count and min_seq_len={options.min_seq_len}: this build's op cannot apply the "
                    f"threshold at run time (set min_seq_len=0 to rewrite)")
        # density 1.0 covers every key for every length: L = Nk (T = 0), L_tile = allowed_tile (T >= 1)
        exact = options.attention_density >= 1.0
        return AttentionPlan(L=None, L_first=None, mode=EXACT if exact else RUNTIME,
                             min_seq_len=options.min_seq_len, **common)
    if n_keys < options.min_seq_len:
        return f"{n_keys} keys < min_seq_len={options.min_seq_len}"
    slots, first, exact = _attention_sizes(n_queries, n_keys, options, bool(m.is_causal))
    return AttentionPlan(L=slots, L_first=first, mode=EXACT if exact else SPARSE, min_seq_len=0, **common)


def _attention_sizes(nq: int | None, nk: int, options: SptOptions, causal: bool) -> tuple[int, int | None, bool]:
    """(idx slots L or L_max, the first tile's list length or None, exact mode) from lowering/formulas.py."""
    density, tile, floor = options.attention_density, options.attention_query_tile, options.attention_min_keys
    if not tile:
        return formulas.attention_keys_kept(nk, density), None, formulas.attention_is_exact(nk, density)
    slots = formulas.attention_tile_slots(nq, nk, density, floor, causal)
    # the first tile's queries see the fewest keys (under causality); every tile sees them all otherwise
    first_visible = formulas.attention_tile_visible(min(tile, nq), nk, causal)
    first = max(1, formulas.attention_tile_keys(first_visible, density, floor))
    return slots, first, formulas.attention_tile_is_exact(nq, nk, density, floor, causal)


# --- ffn --------------------------------------------------------------------------------------

def plan_ffn(m, options: SptOptions, weight_known: bool) -> FfnPlan | str:
    """The plan for an FfnMatch, or the reason it stays dense. `weight_known`: the first projection's weight
    is a real tensor at compile time (needed to cluster neurons into blocks)."""
    if options.ffn == "dense":
        return "ffn='dense' in options"
    x = val(m.up.x)
    if x is None:
        return "the FFN input has no traced tensor value"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} not supported (float16, bfloat16, float32)"
    for p in (m.up, m.down) + ((m.gated_up,) if m.gated_up else ()):
        if val(p.weight) is None or val(p.weight).dtype != x.dtype:
            wd = None if val(p.weight) is None else val(p.weight).dtype
            return f"weight dtype {wd} differs from activation dtype {x.dtype}"
    hidden = _static(m.hidden)
    if hidden is None:
        return "symbolic hidden width"
    out_shape, in_shape = val(m.output).shape, x.shape
    if tuple(out_shape[:-1]) != tuple(in_shape[:-1]):
        return f"views between the projections change the token layout ({list(in_shape)} -> {list(out_shape)})"
    from spt_compile.patterns.lora import adapters_note  # e.g. "LoRA on gate (r=16), up (r=16), down (r=16)"
    notes = adapters_note(m)
    blocks = _largest_divisor_at_most(hidden, options.ffn_blocks)
    if blocks != options.ffn_blocks:
        notes.append(f"ffn_blocks {options.ffn_blocks} -> {blocks} (hidden width {hidden})")
    top_k = formulas.ffn_top_k(blocks, options.ffn_density)
    exact = formulas.ffn_is_exact(blocks, top_k)
    clustered = options.ffn_cluster and blocks > 1 and not exact
    if clustered and not weight_known:
        clustered = False
        notes.append("weights unknown at compile time: contiguous blocks")
    return FfnPlan(density=options.ffn_density, E=blocks, k=top_k, act=m.activation, router=options.ffn_router,
                   rank=options.ffn_router_rank, refresh=options.ffn_router_refresh, gated=m.gated_up is not None,
                   clustered=clustered, mode=EXACT if exact else SPARSE, notes=tuple(notes))


# --- helpers ----------------------------------------------------------------------------------

def _static(size) -> int | None:
    """An int for a static size; None for a symbolic one (its hint is not a decision we may take)."""
    if isinstance(size, int):
        return size
    try:
        from torch.fx.experimental.symbolic_shapes import is_concrete_int
        if is_concrete_int(size):
            return int(size)
    except Exception:  # noqa: BLE001
        pass
    return None


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


__all__ = ["AttentionPlan", "FfnPlan", "plan_attention", "plan_ffn", "op_takes_min_seq_len", "EXACT", "SPARSE",
           "RUNTIME", "size_hint"]
