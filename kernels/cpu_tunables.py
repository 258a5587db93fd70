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
# the path's own default first: the registry's first fitting candidate is the "untuned" choice
ATTENTION_BUDGETS = (1 << 22, 1 << 18, 1 << 20, 1 << 21, 1 << 23)  # elements of a chunk's largest tile
ROUTER_SOURCE = "spt_compile.lowering.router"
ROUTER_KERNEL = "ffn_cpu_router"
ROUTER_BUDGETS = (1 << 21, 1 << 19, 1 << 20, 1 << 22, 1 << 23)     # bytes of a chunk's fp32 score buffer


def chunk_rows(budget: int, rows: int, per_row: int) -> int:
    """Rows per chunk for a budget: as many as fit, at least 1, at most all (reference.query_chunk's rule)."""
    return max(1, min(max(rows, 1), budget // max(1, per_row)))


def _distinct(budgets: tuple[int, ...]):
    """fits(): of budgets giving the same chunk on the key's bucket (rows, per_row = key[-2:]), the first listed
    (so the default always fits, and no chunk size is timed twice)."""
    def fits(cfg: KernelConfig, key: tuple) -> bool:
        rows, per_row = key[-2], key[-1]
        earlier = budgets[:budgets.index(cfg["budget"])]
        return all(chunk_rows(x, rows, per_row) != chunk_rows(cfg["budget"], rows, per_row) for x in earlier)
    return fits


def register_chunk_tunable(name: str, budgets: tuple[int, ...], source: str, site_key=None) -> None:
    """Declare a CPU chunk-size tunable: candidate budgets (the path's default first), the module whose source
    the entries are tied to, and optionally site_key(op, arguments) -> key for the inspection report. The
    key's last two values must be (bucketed rows, per-row size), which `fits` uses to drop duplicate sizes."""
    register_candidates(name, [KernelConfig.make(num_warps=1, num_stages=1, budget=b) for b in budgets],
                        fits=_distinct(budgets), kind="cpu", source=source, site_key=site_key)


def tuned_chunk(name: str, key: tuple, rows: int, per_row: int, run: Callable[[int], object]) -> int | None:
    """Rows per chunk from a cached or freshly timed entry of tunable `name`, or None (the path's default).
    `run(rows)` runs the stage once with that explicit chunk size."""
    cfg, entry = resolve(name, key, lambda c: run(chunk_rows(c["budget"], rows, per_row)))
    return None if entry is None else chunk_rows(cfg["budget"], rows, per_row)


def attention_key(q: torch.Tensor, elems_per_query: int) -> tuple:
    """(dtype, head dim, bucket(Nq), bucket(elements per query row)) of a query tensor [B, H, Nq, D]."""
    return _attention_key(q.dtype, q.shape[-1], q.shape[2], elems_per_query)


def _attention_key(dtype: torch.dtype, d: int, nq: int, elems_per_query: int) -> tuple:
    return (str(dtype).removeprefix("torch."), int(d), bucket(nq), bucket(elems_per_query))


def attention_chunk(stage: str, q: torch.Tensor, elems_per_query: int,
                    run: Callable[[int], object]) -> int | None:
    """Query rows per chunk for a CPU attention stage, or None for the reference's default."""
    if q.device.type != "cpu":
        return None
    return tuned_chunk(f"attention_cpu_{stage}", attention_key(q, elems_per_query), q.shape[2], elems_per_query,
                       run)


def router_key(n_tokens: int, width: int) -> tuple:
    """(hidden width H, bucket(tokens), bytes per token row of the fp32 [chunk, H] buffer)."""
    return (int(width), bucket(n_tokens), 4 * int(width))


def router_chunk(n_tokens: int, width: int, device, run: Callable[[int], object]) -> int | None:
    """Token rows per chunk of the router's score buffers on CPU, or None for the router's default."""
    if torch.device(device).type != "cpu":
        return None
    return tuned_chunk(ROUTER_KERNEL, router_key(n_tokens, width), n_tokens, 4 * int(width), run)


def attention_site_keys(b: int, h: int, nq: int, nk: int, d: int, L: int, dtype: torch.dtype) -> dict[str, tuple]:
    """{kernel: key} of the CPU attention stages for a site's shapes (what the inspection report looks up).
    The elements per query row follow the stages: select tiles [B, H, c, Nk]; forward / backward max(Nk, L)."""
    per_row = {"select": b * h * nk, "forward": b * h * max(nk, L), "backward": b * h * max(nk, L)}
    return {f"attention_cpu_{s}": _attention_key(dtype, d, nq, e) for s, e in per_row.items()}


# ---------------------------------------------------------------------------------------------- site keys
# For the inspection report: the key each tunable will use for a rewritten site, from the op's arguments as
# the graph snapshot records them (tensors as {"shape", "dtype", "device"}); None when it will not run there.


def _ints(shape) -> list[int] | None:
    return list(shape) if shape and all(isinstance(s, int) for s in shape) else None  # symbolic: unknown


def _attention_site_key(stage: str):
    def site_key(op: str, a: dict) -> tuple | None:
        from spt_compile.lowering.formulas import attention_is_exact, attention_keys_kept
        if not op.startswith("spt.pq_sparse_attention") or not a.get("q") or not a.get("k"):
            return None
        q, k = _ints(a["q"]["shape"]), _ints(a["k"]["shape"])
        if q is None or k is None:
            return None
        (b, h, nq, d), nk = q, k[2]
        density = float(a.get("density", 1.0))
        if attention_is_exact(nk, density, int(a.get("min_seq_len") or 0)) and stage == "select":
            return None  # exact mode lists every key: no selection stage
        keys = attention_site_keys(b, h, nq, nk, d, attention_keys_kept(nk, density),
                                   getattr(torch, a["q"]["dtype"]))
        return keys[f"attention_cpu_{stage}"]
    return site_key


def _router_site_key(op: str, a: dict) -> tuple | None:
    if not op.startswith("spt.routed_ffn") or not a.get("x") or not a.get("w1"):
        return None
    x, w1 = _ints(a["x"]["shape"]), _ints(a["w1"]["shape"])
    if x is None or w1 is None or a.get("top_k") == a.get("num_blocks"):  # exact mode: no routing
        return None
    n_tokens = 1
    for s in x[:-1]:
        n_tokens *= s
    return router_key(n_tokens, w1[0])


for _stage in ATTENTION_STAGES:
    register_chunk_tunable(f"attention_cpu_{_stage}", ATTENTION_BUDGETS, ATTENTION_SOURCE, _attention_site_key(_stage))
register_chunk_tunable(ROUTER_KERNEL, ROUTER_BUDGETS, ROUTER_SOURCE, _router_site_key)
