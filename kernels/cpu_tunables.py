"""Tunables of the CPU paths, timed and cached by the same autotuner as the Triton kernels (kind "cpu").

Both CPU paths work through their rows in chunks so that transient memory stays small and cache-resident;
how large a chunk should be is a cache-size question with a machine-dependent best answer:
- attention (lowering/reference/pq_attention.py): query rows per chunk of each stage (select, forward,
  backward), as an element budget of the chunk's largest tile (the reference's default: 1 << 22);
- routed FFN (lowering/router.py): token rows per chunk of the router's score buffers, as a byte budget
  (default 1 << 21).
A stage calls its helper where it picks its chunk size, passing a closure that runs the stage once with an
explicit chunk (the tuner times it per candidate budget):

    step = query_chunk(nq, epq, chunk or attention_chunk("forward", q, epq, lambda c: stage(..., chunk=c)))

The answer is a chunk size in rows from a cached or freshly timed entry, or None ("untuned": the path's own
default). Entries are keyed by CPU model and thread count (the "device" of kind "cpu"), torch / triton
versions, the path's source hash, and the key below (dtype / exact widths, next powers of two of counts).
"""
from __future__ import annotations

from typing import Callable

import torch

from spt_compile.kernels.autotune import KernelConfig, bucket, register_candidates, resolve

ATTENTION_SOURCE = "spt_compile.lowering.reference.pq_attention"
ATTENTION_STAGES = ("select", "forward", "backward")
ATTENTION_BUDGETS = (1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 23)  # elements of a chunk's largest tile
ROUTER_SOURCE = "spt_compile.lowering.router"
ROUTER_KERNEL = "ffn_cpu_router"
ROUTER_BUDGETS = (1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 23)     # bytes of a chunk's fp32 score buffer


def chunk_rows(budget: int, rows: int, per_row: int) -> int:
    """Rows per chunk for a budget: as many as fit, at least 1, at most all (reference.query_chunk's rule)."""
    return max(1, min(max(rows, 1), budget // max(1, per_row)))


def _distinct(budgets: tuple[int, ...]):
    """fits(): of budgets giving the same chunk on the key's bucket (rows, per_row = key[-2:]), the smallest."""
    def fits(cfg: KernelConfig, key: tuple) -> bool:
        rows, per_row = key[-2], key[-1]
        b = cfg["budget"]
        smaller = [x for x in budgets if x < b]
        return not smaller or chunk_rows(b, rows, per_row) != chunk_rows(max(smaller), rows, per_row)
    return fits


def _register(name: str, budgets: tuple[int, ...], source: str) -> None:
    register_candidates(name, [KernelConfig.make(num_warps=1, num_stages=1, budget=b) for b in budgets],
                        fits=_distinct(budgets), kind="cpu", source=source)


for _stage in ATTENTION_STAGES:
    _register(f"attention_cpu_{_stage}", ATTENTION_BUDGETS, ATTENTION_SOURCE)
_register(ROUTER_KERNEL, ROUTER_BUDGETS, ROUTER_SOURCE)


def _chunk(name: str, key: tuple, rows: int, per_row: int, run: Callable[[int], object]) -> int | None:
    cfg, entry = resolve(name, key, lambda c: run(chunk_rows(c["budget"], rows, per_row)))
    return None if entry is None else chunk_rows(cfg["budget"], rows, per_row)


def attention_key(q: torch.Tensor, elems_per_query: int) -> tuple:
    """(dtype, head dim, bucket(Nq), bucket(elements per query row)) of a query tensor [B, H, Nq, D]."""
    return (str(q.dtype).removeprefix("torch."), int(q.shape[-1]), bucket(q.shape[2]), bucket(elems_per_query))


def attention_chunk(stage: str, q: torch.Tensor, elems_per_query: int,
                    run: Callable[[int], object]) -> int | None:
    """Query rows per chunk for a CPU attention stage, or None for the reference's default."""
    if q.device.type != "cpu":
        return None
    return _chunk(f"attention_cpu_{stage}", attention_key(q, elems_per_query), q.shape[2], elems_per_query, run)


def router_key(n_tokens: int, width: int) -> tuple:
    """(hidden width H, bucket(tokens), bytes per token row of the fp32 [chunk, H] buffer)."""
    return (int(width), bucket(n_tokens), 4 * int(width))


def router_chunk(n_tokens: int, width: int, device, run: Callable[[int], object]) -> int | None:
    """Token rows per chunk of the router's score buffers on CPU, or None for the router's default."""
    if torch.device(device).type != "cpu":
        return None
    return _chunk(ROUTER_KERNEL, router_key(n_tokens, width), n_tokens, 4 * int(width), run)
