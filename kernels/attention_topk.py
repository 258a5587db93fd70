"""Fused PQ scoring + streaming top-L key selection (never writes an Nq x Nk score matrix).

select_topk(q, codebooks, codes, mask, is_causal, scale, L) -> idx [B, H, Nq, L] int32 (-1 = empty slot)

Per (batch, head, query tile) the kernel reconstructs k_hat (the PQ approximation of each key) from its
codes and the codebooks, tile by tile, and scores s = scale * q . k_hat + bias with tl.dot (tensor
cores; the codebooks are a few KB and stay in L1/L2, so the gather is cheap). Only allowed keys count
(mask bias finite, j <= i when causal).

Selection: L may be ~Nk/4 (hundreds to thousands of slots), far too many for a register-resident
top-L buffer per query, so this is the documented two-pass scheme - threshold search, then
compaction - run entirely in registers:
  1. Threshold: the L_i-th largest score per row (L_i = min(L, allowed_i)) found by a 16-way search
     over the 32-bit order-preserving integer image of the fp32 score. Each of NPASS = 8 passes
     re-streams the keys and counts, per row, how many scores reach each of 16 candidate thresholds;
     8 passes x 4 bits = 32 bits, so the threshold is exact (not a histogram approximation).
  2. Compaction: one more pass writes keys strictly above the threshold (their count g_i is known
     from the search) into slots [0, g_i) and keys equal to it into [g_i, L_i) in key order, using
     a running prefix sum per row (tl.cumsum), so every slot is written exactly once.
Re-scoring is cheap next to writing/reading an Nq x Nk matrix: each pass is an M-code gather plus a
[BM, D] x [D, BN] dot per tile. On GPU the fp32 dot runs as tf32: the score is already a PQ
approximation, and tf32 rounding only reorders keys whose approximate scores nearly tie.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from spt_compile.kernels import aot, autotune
from spt_compile.kernels._triton_utils import block_d, check_pq_selection_args, dtype_name, mask_as_bias
from spt_compile.kernels.attention_fwd import site_shapes

KERNEL = "attention_topk"
RADIX_BITS = 4          # bits resolved per search pass (16 candidate thresholds)
NPASS = 32 // RADIX_BITS


@triton.jit
def _score_tile(q, scale, cb_base, codes_base, bias_base, stride_mi, stride_mj, offs_m, offs_n,
                offs_d, Nq, Nk, C, DS, D,
                HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Ordered-int keys [BM, BN] of scale*q.k_hat + bias, and whether each (i, j) is allowed."""
    n_ok = offs_n < Nk
    d_ok = offs_d < D
    sub = offs_d // DS                                                       # [BD] subspace of each dim
    code = tl.load(codes_base + offs_n[:, None] * (D // DS) + sub[None, :],
                   mask=n_ok[:, None] & d_ok[None, :], other=0)              # [BN, BD]
    khat = tl.load(cb_base + (sub[None, :] * C + code) * DS + (offs_d % DS)[None, :],
                   mask=n_ok[:, None] & d_ok[None, :], other=0.0)            # [BN, BD] fp32
    s = tl.dot(q, tl.trans(khat)) * scale                                    # [BM, BN]
    ok = (offs_m < Nq)[:, None] & n_ok[None, :]
    if IS_CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        bias = tl.load(bias_base + offs_m[:, None] * stride_mi + offs_n[None, :] * stride_mj,
                       mask=ok, other=float("-inf"))
        ok = ok & (bias > float("-inf")) & (bias < float("inf"))
        s = s + bias
    s = s + 0.0  # -0.0 -> +0.0 so equal scores get equal keys
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving: float order == signed int order
    return key, ok


@triton.jit
def _topk_kernel(
    q_ptr, cb_ptr, codes_ptr, bias_ptr, idx_ptr,
    H, Hkv, Nq, Nk, C, DS, D, L, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, NPASS: tl.constexpr, RADIX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B * H, cdiv(Nq, BLOCK_M))
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // Hkv)
    M = D // DS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)

    bkv = b.to(tl.int64) * Hkv + hk
    cb_base = cb_ptr + bkv * M * C * DS            # codebooks [B, Hkv, M, C, DS] contiguous
    codes_base = codes_ptr + bkv * Nk * M          # codes [B, Hkv, Nk, M] contiguous
    bias_base = bias_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    n_end = Nk
    if IS_CAUSAL:
        n_end = tl.minimum(Nk, (pid_m + 1) * BLOCK_M)   # keys j <= i only

    # ---- 1. exact threshold search over the ordered 32-bit keys (see module doc) ----
    lo = tl.full([BLOCK_M], -2147483648, tl.int64)      # invariant: count(key >= lo) >= L_i
    hi = tl.full([BLOCK_M], 2147483647, tl.int64)       # invariant: count(key >  hi) <  L_i
    cnt_hi = tl.zeros([BLOCK_M], tl.int32)              # count(key > hi)
    Li = tl.zeros([BLOCK_M], tl.int32)
    ts = tl.arange(0, RADIX)
    for p in range(NPASS):
        step = (hi - lo + RADIX) // RADIX                                    # ceil(width / RADIX)
        counts = tl.zeros([BLOCK_M, RADIX], tl.int32)
        for n0 in range(0, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            key, ok = _score_tile(q, scale, cb_base, codes_base, bias_base, stride_mi, stride_mj, offs_m,
                                  offs_n, offs_d, Nq, Nk, C, DS, D, HAS_MASK, IS_CAUSAL)
            for t in tl.static_range(RADIX):
                thr = tl.minimum(lo + t * step, hi).to(tl.int32)            # [BM]
                c = tl.sum((ok & (key >= thr[:, None])).to(tl.int32), axis=1)
                counts += tl.where(ts[None, :] == t, c[:, None], 0)
        # pass 0's first threshold is INT_MIN: its count is the number of allowed keys
        Li = tl.where(p == 0, tl.minimum(tl.sum(tl.where(ts[None, :] == 0, counts, 0), axis=1), L), Li)
        valid = (ts[None, :].to(tl.int64) * step[:, None]) <= (hi - lo)[:, None]
        good = valid & (counts >= Li[:, None])
        kb = tl.max(tl.where(good, ts[None, :], 0), axis=1)                  # largest good threshold
        nxt = kb + 1
        nxt_valid = (nxt < RADIX) & (nxt.to(tl.int64) * step <= hi - lo)
        cnt_nxt = tl.sum(tl.where(ts[None, :] == nxt[:, None], counts, 0), axis=1)
        new_lo = lo + kb.to(tl.int64) * step
        cnt_hi = tl.where(nxt_valid, cnt_nxt, cnt_hi)
        hi = tl.where(nxt_valid, new_lo + step - 1, hi)
        lo = new_lo
    tau = lo.to(tl.int32)  # the L_i-th largest key; cnt_hi keys lie strictly above it

    # ---- 2. compaction: > tau into [0, cnt_hi), == tau into [cnt_hi, L_i) in key order ----
    idx_row = idx_ptr + (pid_bh.to(tl.int64) * Nq + offs_m.to(tl.int64)) * L   # idx [B, H, Nq, L]
    gt_run = tl.zeros([BLOCK_M], tl.int32)
    eq_run = tl.zeros([BLOCK_M], tl.int32)
    need_eq = Li - cnt_hi
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key, ok = _score_tile(q, scale, cb_base, codes_base, bias_base, stride_mi, stride_mj, offs_m,
                              offs_n, offs_d, Nq, Nk, C, DS, D, HAS_MASK, IS_CAUSAL)
        gt = ok & (key > tau[:, None])
        eq = ok & (key == tau[:, None])
        gt_i = gt.to(tl.int32)
        eq_i = eq.to(tl.int32)
        gt_pos = gt_run[:, None] + tl.cumsum(gt_i, axis=1) - 1
        eq_rank = eq_run[:, None] + tl.cumsum(eq_i, axis=1) - 1
        eq_keep = eq & (eq_rank < need_eq[:, None])
        pos = tl.where(gt, gt_pos, cnt_hi[:, None] + eq_rank)
        val = tl.zeros([BLOCK_M, BLOCK_N], tl.int32) + offs_n[None, :]
        tl.store(idx_row[:, None] + pos, val, mask=(gt | eq_keep) & m_ok[:, None])
        gt_run += tl.sum(gt_i, axis=1)
        eq_run += tl.sum(eq_i, axis=1)


def tuning_key(d: int, dtype: torch.dtype, rows: int, nk: int) -> tuple:
    """(D, dtype, bucket(B*H*Nq query rows), bucket(Nk)): every search pass re-streams all Nk keys per row."""
    return (int(d), dtype_name(dtype), autotune.bucket(rows), autotune.bucket(nk))


def _fits(cfg: autotune.KernelConfig, key: tuple) -> bool:
    # The q tile, k_hat tile, the [BM, BN] keys and the 16 unrolled threshold counts are live together; these
    # configs compile spill-free for sm_80/sm_90 up to BLOCK_D = 128 (64x64 on 4 or 8 warps, 16x16 on 2 or 4
    # warps, 16x32 on 4 warps spilled), so head dims > 128 are refused.
    return block_d(key[0]) <= 128


def _site_key(op: str, a: dict) -> tuple | None:
    s = site_shapes(op, a)
    if s is None or s["exact"]:  # exact mode lists every allowed key: no selection
        return None
    return tuning_key(s["d"], s["dtype"], s["b"] * s["h"] * s["nq"], s["nk"])


autotune.register_candidates(KERNEL, [
    autotune.KernelConfig.make(num_warps=8, num_stages=1, BLOCK_M=32, BLOCK_N=32),
    autotune.KernelConfig.make(num_warps=8, num_stages=1, BLOCK_M=16, BLOCK_N=32),
    autotune.KernelConfig.make(num_warps=8, num_stages=1, BLOCK_M=32, BLOCK_N=16),
], fits=_fits, site_key=_site_key)


def _aot_signature(dt: str) -> dict:
    sig = {"q_ptr": f"*{dt}", "cb_ptr": "*fp32", "codes_ptr": "*i32", "bias_ptr": "*fp32",
           "idx_ptr": "*i32"}
    sig.update({n: "i32" for n in ("H", "Hkv", "Nq", "Nk", "C", "DS", "D", "L")})
    sig["scale"] = "fp32"
    sig.update({f"stride_q{a}": "i64" for a in "bhnd"})
    sig.update({f"stride_m{a}": "i64" for a in "bhij"})
    sig.update({n: "constexpr" for n in ("HAS_MASK", "IS_CAUSAL", "NPASS", "RADIX",
                                         "BLOCK_M", "BLOCK_N", "BLOCK_D")})
    return sig


def _aot_constexprs(cfg: autotune.KernelConfig, dt: str) -> dict:
    # everything switched on, at the largest head dim fits() admits for this config
    bd = 128
    return {"HAS_MASK": True, "IS_CAUSAL": True, "NPASS": NPASS, "RADIX": 1 << RADIX_BITS,
            "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": bd}


aot.register_aot(aot.AotSpec(KERNEL, _topk_kernel, _aot_signature, _aot_constexprs))


def select_topk(q, codebooks, codes, mask, is_causal, scale, L):
    """Top-L allowed keys per query by PQ score (see module doc). q [B, H, Nq, D];
    codebooks [B, Hkv, M, C, D//M] fp32; codes [B, Hkv, Nk, M] int32 -> idx [B, H, Nq, L] int32."""
    check_pq_selection_args(q, codebooks, codes, L)
    B, H, Nq, D = q.shape
    Bc, Hkv, M, C, DS = codebooks.shape
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")
    Nk = codes.shape[2]
    bias, ms = mask_as_bias(mask, (B, H, Nq, Nk))
    idx = torch.full((B, H, Nq, L), -1, dtype=torch.int32, device=q.device)
    if Nq == 0 or Nk == 0:
        return idx
    codebooks = codebooks.to(torch.float32).contiguous()
    codes = codes.to(torch.int32).contiguous()
    BD = block_d(D)

    def run(cfg):  # one launch; the autotuner times it per candidate on the real inputs
        # Safe to repeat into idx: every run writes exactly the slots [0, L_i) of each row (L_i = min(L, allowed
        # keys), the same for every config), so the final run below rewrites all that any timed run wrote.
        _topk_kernel[(B * H, triton.cdiv(Nq, cfg["BLOCK_M"]))](
            q, codebooks, codes, bias if bias is not None else codebooks, idx,
            H, Hkv, Nq, Nk, C, DS, D, L, float(scale), *q.stride(), *ms,
            HAS_MASK=bias is not None, IS_CAUSAL=bool(is_causal), NPASS=NPASS, RADIX=1 << RADIX_BITS,
            BLOCK_D=BD, **cfg.kwargs())
    run(autotune.get_config(KERNEL, tuning_key(D, q.dtype, B * H * Nq, Nk), bench=run))
    return idx
