"""Routed FFN prologue on GPU: group the (token, slot) pairs by block id without a host sync.

    routing_prologue(block_ids [T, k] int32, num_blocks) -> (pair_order [T*k] int32, block_offsets [E+1] int32)

pair_order is the *stable* argsort of block_ids.flatten() (OPS.md); block e owns
pair_order[block_offsets[e]:block_offsets[e+1]].

Why two Triton kernels rather than torch.sort: a counting sort over E buckets is linear, stable by
construction, deterministic, and every size it needs is known from shapes alone (the worst case is
T*k pairs), so nothing ever waits on the GPU. The pairs are cut into C chunks (C bounded, so the
second pass stays cheap):
  1. `_block_hist_kernel`, one program per chunk: per-chunk block histogram hist[C, E] (no atomics).
  2. `_block_scatter_kernel`, one program per chunk: its base for block e is
     (pairs of all chunks in blocks < e) + (pairs of earlier chunks in block e); within the chunk a
     one-hot cumsum ranks each pair among equal ids, so pair_order keeps ascending pair index per block.
The grouped GEMMs derive their tile grid from block_offsets inside the kernel, so no tile-padded
offsets are produced here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spt_compile.kernels.aot import AotSpec, register_aot
from spt_compile.kernels.autotune import KernelConfig, get_config, register_candidates

MAX_BLOCKS = 512    # the one-hot tile is [SUB, BLOCK_E]; beyond this it no longer fits registers
_MAX_CHUNKS = 512   # bounds pass 2's O(C) scan over the histogram rows
_ONEHOT_ELEMS = 8192  # SUB * BLOCK_E per one-hot tile: 16384 spills on sm_90 (checked with cuobjdump)


@triton.jit
def _block_hist_kernel(ids_ptr, hist_ptr, P, CHUNK, NUM_BLOCKS,
                       SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    e_idx = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for s in range(0, CHUNK, SUB):
        p = c * CHUNK + s + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + p, mask=(p < P) & (s + tl.arange(0, SUB) < CHUNK), other=-1)
        onehot = (ids[:, None] == e_idx[None, :]).to(tl.int32)  # [SUB, BLOCK_E]
        counts += tl.sum(onehot, axis=0)
    tl.store(hist_ptr + c * BLOCK_E + e_idx, counts)


@triton.jit
def _block_scatter_kernel(ids_ptr, hist_ptr, order_ptr, offsets_ptr, P, CHUNK, NUM_CHUNKS, NUM_BLOCKS,
                          SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    e_idx = tl.arange(0, BLOCK_E)
    total = tl.zeros([BLOCK_E], dtype=tl.int32)    # pairs per block over all chunks
    before = tl.zeros([BLOCK_E], dtype=tl.int32)   # pairs per block in chunks before c
    for cc in range(0, NUM_CHUNKS):
        h = tl.load(hist_ptr + cc * BLOCK_E + e_idx)
        total += h
        before += tl.where(cc < c, h, 0)
    start = tl.cumsum(total, axis=0) - total       # exclusive scan: block_offsets[:E]
    if c == 0:
        tl.store(offsets_ptr + e_idx, start, mask=e_idx < NUM_BLOCKS)
        tl.store(offsets_ptr + NUM_BLOCKS, tl.sum(total, axis=0))
    base = start + before
    for s in range(0, CHUNK, SUB):
        local = s + tl.arange(0, SUB)
        p = c * CHUNK + local
        valid = (p < P) & (local < CHUNK)
        ids = tl.load(ids_ptr + p, mask=valid, other=-1)
        onehot = (ids[:, None] == e_idx[None, :]).to(tl.int32)         # [SUB, BLOCK_E]
        rank = tl.cumsum(onehot, axis=0) - 1                            # rank among equal ids
        dest = tl.sum(onehot * (base[None, :] + rank), axis=1)          # [SUB]
        tl.store(order_ptr + dest, p, mask=valid & (tl.sum(onehot, axis=1) > 0))
        base += tl.sum(onehot, axis=0)


_CANDIDATES = [KernelConfig.make(num_warps=4, num_stages=1, SUB=s) for s in (128, 64, 16)]


def _fits(cfg: KernelConfig, key: tuple) -> bool:
    (block_e,) = key
    return cfg["SUB"] * block_e <= _ONEHOT_ELEMS


for _name in ("routing_hist", "routing_scatter"):
    register_candidates(_name, _CANDIDATES, _fits)


def _aot_constexprs(cfg: KernelConfig, dtype: str) -> dict:
    # the largest one-hot tile this SUB is ever launched with
    return {"SUB": cfg["SUB"], "BLOCK_E": min(MAX_BLOCKS, _ONEHOT_ELEMS // cfg["SUB"])}


register_aot(AotSpec(
    "routing_hist", _block_hist_kernel,
    lambda dt: {"ids_ptr": "*i32", "hist_ptr": "*i32", "P": "i32", "CHUNK": "i32", "NUM_BLOCKS": "i32",
                "SUB": "constexpr", "BLOCK_E": "constexpr"},
    _aot_constexprs, dtypes=("fp32",)))  # index-only kernel: one dtype-independent compile
register_aot(AotSpec(
    "routing_scatter", _block_scatter_kernel,
    lambda dt: {"ids_ptr": "*i32", "hist_ptr": "*i32", "order_ptr": "*i32", "offsets_ptr": "*i32",
                "P": "i32", "CHUNK": "i32", "NUM_CHUNKS": "i32", "NUM_BLOCKS": "i32",
                "SUB": "constexpr", "BLOCK_E": "constexpr"},
    _aot_constexprs, dtypes=("fp32",)))  # index-only kernel: one dtype-independent compile


def routing_prologue(block_ids: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable grouping of the flattened (token, slot) pairs by block id; see the module docstring.

    block_ids must hold values in [0, num_blocks) (not checked: that would sync with the GPU);
    a pair with an out-of-range id is left out of every block.
    """
    if not isinstance(block_ids, torch.Tensor) or block_ids.dim() != 2:
        raise ValueError(f"block_ids must be a 2-D [T, top_k] tensor, got {getattr(block_ids, 'shape', block_ids)}")
    if block_ids.dtype != torch.int32:
        raise ValueError(f"block_ids must be int32, got {block_ids.dtype}")
    if not 1 <= int(num_blocks) <= MAX_BLOCKS:
        raise ValueError(f"num_blocks must be in [1, {MAX_BLOCKS}], got {num_blocks}")
    ids = block_ids.contiguous().view(-1)  # [P]
    P = ids.numel()
    dev = ids.device
    order = torch.empty(P, dtype=torch.int32, device=dev)
    offsets = torch.empty(num_blocks + 1, dtype=torch.int32, device=dev)
    block_e = max(16, triton.next_power_of_2(num_blocks))
    cfg_h = get_config("routing_hist", (block_e,))
    cfg_s = get_config("routing_scatter", (block_e,))
    sub = cfg_s["SUB"]
    if cfg_h["SUB"] != sub:
        raise ValueError("routing_hist and routing_scatter must share SUB (chunks are cut by it)")
    # chunk length: a multiple of SUB, enough chunks to fill the GPU, at most _MAX_CHUNKS of them
    chunk = max(sub, triton.cdiv(triton.cdiv(max(P, 1), _MAX_CHUNKS), sub) * sub)
    n_chunks = max(1, triton.cdiv(P, chunk))
    hist = torch.empty(n_chunks, block_e, dtype=torch.int32, device=dev)  # [C, BLOCK_E]
    _block_hist_kernel[(n_chunks,)](ids, hist, P, chunk, num_blocks, BLOCK_E=block_e, **cfg_h.kwargs())
    _block_scatter_kernel[(n_chunks,)](ids, hist, order, offsets, P, chunk, n_chunks, num_blocks,
                                       BLOCK_E=block_e, **cfg_s.kwargs())
    return order, offsets
