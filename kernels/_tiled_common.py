"""Pieces shared by the query-tile attention kernels (attention_tiled_select/fwd/bwd.py): the dot that stays
correct under the CPU interpreter, the per-dtype head-dim limits of the candidate configs, and launcher checks.

Tiled layout (lowering/reference/tiled_attention.py): query tile t holds rows t*T .. min(t*T + T, Nq) - 1;
idx [B, H, ceil(Nq/T), L] int32 lists each tile's kept keys ascending, then -1. A program covers BLOCK_M rows
of ONE tile (a tile of T rows takes cdiv(T, BLOCK_M) programs), so every row of a program shares the tile's
key list and the gathered K/V blocks feed tl.dot (tensor cores) instead of per-query gathers.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from spt_compile.kernels import autotune
from spt_compile.kernels._triton_utils import next_power_of_2

MAX_HEAD_DIM = 128  # every kernel's largest config limit (Limits below); larger heads stay on the reference

# The CPU interpreter's tl.dot multiplies bf16 bit patterns as integers (triton 3.9, see grouped_gemm.py):
# under it the operands go up to fp32 first, the same math as the GPU's bf16 MMA with fp32 accumulation.
_UPCAST_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def tdot(a, b, PREC: tl.constexpr):
    """a @ b accumulated in fp32 (PREC: "ieee" or "tf32" for fp32 operands; ignored for bf16/fp16)."""
    if _UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's TF32 switch (off by default), so fp32 errors match torch's own."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class Limits:
    """Largest head dim (a power of two) each candidate config of a kernel serves, per dtype class:
    half = bf16/fp16 operands, fp32 = fp32 operands (IEEE fp32 dots hold twice the registers per tile).
    fits() prunes with it, and the AOT spec compiles each config at exactly these head dims, so a launch
    can never pick a config that the AOT test did not compile spill-free."""

    def __init__(self, table: list[tuple[autotune.KernelConfig, int, int]]):
        self.configs = [c for c, _, _ in table]
        self._max = {c: (half, fp32) for c, half, fp32 in table}

    def max_d(self, cfg: autotune.KernelConfig, dt: str) -> int:
        half, fp32 = self._max[cfg]
        return fp32 if dt == "fp32" else half

    def fits(self, cfg: autotune.KernelConfig, key: tuple) -> bool:
        """key = tile_key(...) (its first four fields decide the fit); a config's BLOCK_M must not exceed the
        tile (a program never spans two tiles, so rows past T are wasted) unless it is 16, the dot minimum."""
        bd, bdv, dt, tp2 = key[:4]
        bm = dict(cfg.meta).get("BLOCK_M", 16)
        return max(bd, bdv) <= self.max_d(cfg, dt) and bm <= max(16, tp2)


def tile_key(bd: int, bdv: int, dt: str, tile: int, rows: int) -> tuple:
    """The tuning key of a tiled kernel: (BLOCK_D, BLOCK_DV, dtype name, next_power_of_2(T), bucket(rows)),
    rows = the rows the launch walks (query rows B*H*Nq; key rows B*Hkv*Nk for dK/dV): the best block sizes
    change with the amount of work, so each size bucket is tuned apart."""
    return (bd, bdv, dt, next_power_of_2(tile), autotune.bucket(rows))


def check_tile_args(q: torch.Tensor, idx: torch.Tensor | None, tile: int, scale: float) -> int:
    """Validate the tiled arguments shared by the launchers; returns the number of tiles."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")
    b, h, nq = q.shape[:3]
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[3]} > {MAX_HEAD_DIM}: the tiled kernels' configs serve head dims up "
                         f"to {MAX_HEAD_DIM}")
    nt = -(-nq // tile)
    if idx is not None and (not isinstance(idx, torch.Tensor) or idx.dim() != 4
                            or tuple(idx.shape[:3]) != (b, h, nt) or idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"idx must be an int32 tensor [B, H, ceil(Nq/T), L] = [{b}, {h}, {nt}, L], got "
                         f"{getattr(idx, 'dtype', None)} {tuple(getattr(idx, 'shape', ()))}")
    return nt


def list_lengths(idx: torch.Tensor) -> torch.Tensor:
    """[B, H, nT] int32: valid slots per tile (lists are valid-first), the kernels' loop bound, so short
    (early causal, padded) tiles cost only their own keys."""
    return (idx >= 0).sum(-1, dtype=torch.int32).contiguous()


def serves_head_dims(d: int, dv: int) -> bool:
    """Whether the tiled kernels serve q/k head dim d and v head dim dv: the op asks this before it dispatches
    (it runs the plain-PyTorch tile path otherwise); the launchers only assert it (check_tile_args)."""
    return max(d, dv) <= MAX_HEAD_DIM


def tiled_site_shapes(op: str, a: dict) -> dict | None:
    """Sizes a traced spt.pq_sparse_attention site in query-tile mode launches the tiled kernels with, from the
    op's arguments as graph_snapshot records them (tensors as {"shape", "dtype", "device"}): b, h, hkv, nq, nk,
    d, dv, tile, dtype, exact. None when these kernels do not serve the site: another op, per-query mode
    (query_tile 0), symbolic sizes, a dtype without kernels, head dims the op sends to the plain path."""
    from spt_compile.kernels._triton_utils import TRITON_TYPE
    from spt_compile.lowering.formulas import attention_tile_is_exact
    tile = int(a.get("query_tile") or 0)
    if not op.startswith("spt.pq_sparse_attention") or tile < 1:
        return None
    if not all(isinstance(a.get(t), dict) for t in ("q", "k", "v")):
        return None
    shapes = [a[t]["shape"] for t in ("q", "k", "v")]
    if not all(s and all(isinstance(x, int) for x in s) for s in shapes):
        return None  # symbolic sizes: the keys are unknown until run time
    (b, h, nq, d), (_, hkv, nk, _), dv = shapes[0], shapes[1], shapes[2][3]
    dtype = getattr(torch, str(a["q"]["dtype"]), None)
    if dtype not in TRITON_TYPE or not serves_head_dims(d, dv):
        return None
    exact = attention_tile_is_exact(nq, nk, float(a.get("density", 1.0)), int(a.get("min_keys") or 64),
                                    bool(a.get("is_causal")), int(a.get("min_seq_len") or 0))
    return {"b": b, "h": h, "hkv": hkv, "nq": nq, "nk": nk, "d": d, "dv": dv, "tile": tile, "dtype": dtype,
            "exact": exact}
