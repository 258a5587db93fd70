"""Product quantization of keys: k-means per (batch, kv head, subspace) with a Triton assignment step.

pq_quantize(k, subspaces, centroids, iters) -> (codebooks [B, Hkv, M, C, D//M] fp32, codes [B, Hkv, Nk, M] int32)
follows lowering/reference/pq_attention.py exactly (same fit keys, formulas.pq_fit_positions; same init, same
number of Lloyd steps, same handling of empty clusters); only the nearest-centroid search runs in Triton.

Why the centroid update stays in torch: it is a segmented sum of Nk rows into C buckets (index_add_)
plus a division - one memory-bound pass that torch already runs as a single fused scatter kernel; a
Triton version would do the same loads with atomics and buy nothing. The assignment is the
O(Nk * C * D) part and is what this kernel fuses (distances never reach memory, only the argmin).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spt_compile.kernels import aot, autotune
from spt_compile.kernels._triton_utils import check_float, dtype_name, next_power_of_2
from spt_compile.lowering.formulas import pq_fit_positions

KERNEL = "pq_assign"


@triton.jit
def _pq_assign_kernel(
    k_ptr, cb_ptr, codes_ptr,
    Hkv, Nk, C, DS,
    stride_kb, stride_kh, stride_kn, stride_kd,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DS: tl.constexpr,
):
    # grid: (B * Hkv * M, cdiv(Nk, BLOCK_N)); one program = BLOCK_N keys of one subspace.
    pid_bhm = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_bhm % M
    bh = pid_bhm // M
    b = bh // Hkv
    h = bh % Hkv

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DS)
    n_ok = offs_n < Nk
    d_ok = offs_d < DS
    k_ptrs = (k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
              + offs_n[:, None].to(tl.int64) * stride_kn + (m * DS + offs_d[None, :]) * stride_kd)
    x = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BN, BDS]

    # codebooks contiguous [B, Hkv, M, C, DS]
    cb_base = cb_ptr + pid_bhm.to(tl.int64) * C * DS
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        cb = tl.load(cb_base + offs_c[:, None] * DS + offs_d[None, :],
                     mask=c_ok[:, None] & d_ok[None, :], other=0.0)               # [BC, BDS]
        # |c|^2 - 2 x.c: the reference's formula (|x|^2 is the same for every c), so near-ties
        # round the same way; dsub is often < 16, too narrow for tl.dot, hence a broadcast-sum
        xc = tl.sum(x[:, None, :] * cb[None, :, :], axis=2)                        # [BN, BC]
        dist = tl.sum(cb * cb, axis=1)[None, :] - 2.0 * xc                         # [BN, BC]
        dist = tl.where(c_ok[None, :], dist, float("inf"))
        cmin = tl.min(dist, axis=1)                                                # [BN]
        carg = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int32) + c0
        take = cmin < best  # strict: the earliest centroid wins ties, like torch.argmin
        best_i = tl.where(take, carg, best_i)
        best = tl.where(take, cmin, best)

    # codes contiguous [B, Hkv, Nk, M]
    tl.store(codes_ptr + bh.to(tl.int64) * Nk * M + offs_n * M + m, best_i, mask=n_ok)


def _fits(cfg: autotune.KernelConfig, key: tuple) -> bool:
    # key = (dsub, C, dtype_name)
    # the [BN, BC, BDS] product is the live tensor: <= 64 fp32 values per thread (no spills)
    dsub = key[0]
    elems = cfg["BLOCK_N"] * cfg["BLOCK_C"] * next_power_of_2(max(dsub, 1))
    return elems <= 64 * 32 * cfg.num_warps


def _site_key(op: str, a: dict) -> tuple | None:
    """The key pq_assign launches with for a traced attention site (inspection report); None in exact mode."""
    from spt_compile.kernels._tiled_common import tiled_site_shapes
    from spt_compile.kernels.attention_fwd import site_shapes
    s = site_shapes(op, a) or tiled_site_shapes(op, a)  # per-query or query-tile site: the same PQ
    if s is None or s["exact"]:
        return None
    return (s["d"] // int(a["pq_subspaces"]), int(a["pq_centroids"]), dtype_name(s["dtype"]),
            autotune.bucket(s["b"] * s["hkv"] * s["nk"]))


autotune.register_candidates(KERNEL, [
    autotune.KernelConfig.make(num_warps=4, num_stages=1, BLOCK_N=64, BLOCK_C=16),  # dsub <= 8
    autotune.KernelConfig.make(num_warps=4, num_stages=1, BLOCK_N=32, BLOCK_C=16),  # dsub <= 16
    autotune.KernelConfig.make(num_warps=4, num_stages=1, BLOCK_N=16, BLOCK_C=8),   # dsub <= 64
    autotune.KernelConfig.make(num_warps=8, num_stages=1, BLOCK_N=16, BLOCK_C=8),   # dsub <= 128
], fits=_fits, site_key=_site_key)


def _aot_signature(dt: str) -> dict:
    return {"k_ptr": f"*{dt}", "cb_ptr": "*fp32", "codes_ptr": "*i32",
            "Hkv": "i32", "Nk": "i32", "C": "i32", "DS": "i32",
            "stride_kb": "i64", "stride_kh": "i64", "stride_kn": "i64", "stride_kd": "i64",
            "M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr", "BLOCK_DS": "constexpr"}


def _aot_constexprs(cfg: autotune.KernelConfig, dt: str) -> dict:
    # compiled at the widest subspace the fits() predicate admits for the config
    ds = 64 * 32 * cfg.num_warps // (cfg["BLOCK_N"] * cfg["BLOCK_C"])
    return {"M": 8, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_C": cfg["BLOCK_C"], "BLOCK_DS": min(ds, 128)}


aot.register_aot(aot.AotSpec(KERNEL, _pq_assign_kernel, _aot_signature, _aot_constexprs))


def pq_assign(k: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per key and subspace. k [B, Hkv, Nk, D]; codebooks [B, Hkv, M, C, D//M] fp32
    -> codes [B, Hkv, Nk, M] int32."""
    B, Hkv, Nk, D = k.shape
    M, C, DS = codebooks.shape[2:]
    codebooks = codebooks.contiguous()
    codes = torch.empty((B, Hkv, Nk, M), dtype=torch.int32, device=k.device)
    if Nk == 0:
        return codes
    def run(cfg):  # one launch; the autotuner times it per candidate (it only overwrites codes)
        _pq_assign_kernel[(B * Hkv * M, triton.cdiv(Nk, cfg["BLOCK_N"]))](
            k, codebooks, codes, Hkv, Nk, C, DS, *k.stride(),
            M=M, BLOCK_DS=next_power_of_2(DS), **cfg.kwargs())
    run(autotune.get_config(KERNEL, (DS, C, dtype_name(k.dtype), autotune.bucket(B * Hkv * Nk)), bench=run))
    return codes


def init_codebooks(ks: torch.Tensor, centroids: int) -> torch.Tensor:
    """Initial centroids: the keys at positions (c * Nk) // C, as the reference (repeats if C > Nk).
    ks [B, Hkv, Nk, M, DS] fp32 -> [B, Hkv, M, C, DS]."""
    Nk = ks.shape[2]
    pos = (torch.arange(centroids, device=ks.device) * Nk) // centroids  # [C]
    return ks[:, :, pos].permute(0, 1, 3, 2, 4).contiguous()


def update_codebooks(ks: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """One Lloyd update: each centroid becomes the mean of its keys; empty clusters keep their centroid.
    ks [B, Hkv, Nk, M, DS]; codes [B, Hkv, Nk, M]; codebooks [B, Hkv, M, C, DS]."""
    B, Hkv, Nk, M, DS = ks.shape
    C = codebooks.shape[3]
    sums = torch.zeros_like(codebooks)                                   # [B, Hkv, M, C, DS]
    idx = codes.long().permute(0, 1, 3, 2)                               # [B, Hkv, M, Nk]
    sums.scatter_add_(3, idx[..., None].expand(B, Hkv, M, Nk, DS), ks.permute(0, 1, 3, 2, 4))
    counts = torch.zeros(codebooks.shape[:4], dtype=torch.float32, device=ks.device)
    counts.scatter_add_(3, idx, torch.ones_like(idx, dtype=torch.float32))  # [B, Hkv, M, C]
    mean = sums / counts.clamp_min(1.0)[..., None]
    return torch.where(counts[..., None] > 0, mean, codebooks)


def pq_quantize(k: torch.Tensor, subspaces: int, centroids: int, iters: int):
    """k-means PQ of the keys (see module doc). Returns (codebooks, codes)."""
    check_float("k", k, 4)
    B, Hkv, Nk, D = k.shape
    if not isinstance(subspaces, int) or subspaces < 1 or D % subspaces:
        raise ValueError(f"subspaces must be a positive divisor of the head dim {D}, got {subspaces!r}")
    if not isinstance(centroids, int) or centroids < 1:
        raise ValueError(f"centroids must be a positive int, got {centroids!r}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if Nk == 0:
        raise ValueError("k must have at least one key (Nk == 0)")
    M, DS = subspaces, D // subspaces
    fit = pq_fit_positions(Nk, k.device)                                 # the reference's fit keys
    kf = k if fit.numel() == Nk else k[:, :, fit]                        # [B, Hkv, F, D]
    ks = kf.float().reshape(B, Hkv, kf.shape[2], M, DS)                  # [B, Hkv, F, M, DS]
    codebooks = init_codebooks(ks, centroids)                            # [B, Hkv, M, C, DS]
    for _ in range(iters):
        codes = pq_assign(kf, codebooks)
        codebooks = update_codebooks(ks, codes, codebooks)
    return codebooks, pq_assign(k, codebooks)                            # every key assigned
