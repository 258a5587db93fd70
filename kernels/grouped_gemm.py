"""Routed FFN grouped GEMMs on GPU (Triton), forward and backward, with their launchers.

Rows are the (token, slot) pairs in block-grouped order (routing.routing_prologue): block e owns
grouped rows offsets[e]:offsets[e+1]; grouped row r is pair p = pair_order[r] of token p // top_k.
Block e's neurons are block_perm[e*Hb:(e+1)*Hb]; weights stay in the user's layout (strides are
passed, so w1 may be a transposed view) and are gathered through block_perm inside the kernels.

Row-tiled kernels get a grid of cdiv(P, BLOCK_M) + E row tiles (an upper bound on the sum over blocks
of cdiv(count_e, BLOCK_M), known without a host sync); `_tile_of` maps a program to (block, first row)
from the offsets, surplus programs exit at once.

Forward:  _up_kernel       h_pre = x[tok] @ w1[blk]^T + b1 (and h_up), hidden = act(h_pre) (* h_up)
          _down_kernel     part[p] = hidden[r] @ w2[:, blk]^T          -> [P, d_out] fp32, per pair
          _pair_sum_kernel y[t] = sum_s part[t*k + s] + b2           (fixed order: deterministic)
Backward: _dhidden_kernel  dh = dy[tok] @ w2[:, blk], times the activation derivative (and gate)
          _down_kernel     dx parts = dh_pre @ w1[blk] (+ dh_up @ w_up[blk]); _pair_sum_kernel sums them
          _dw_in_kernel    dW1[blk] = dh_pre_e^T @ x_e (dW_up too), db1 = row sums; one program per tile
          _dw_out_kernel   dW2[:, blk] = dy_e^T @ hidden_e (hidden recomputed from h_pre, h_up)
Per-pair outputs + a fixed-order sum instead of float atomics: results are bitwise reproducible and
the extra [P, d] fp32 buffer costs far less than the GEMMs. Weight-gradient tiles are owned by one
program each (a block's rows are reduced in a loop), so no atomics there either; a block no token
chose runs zero loop iterations and writes zeros.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from spt_compile.kernels import _gemm_configs as C
from spt_compile.kernels.aot import AotSpec, register_aot
from spt_compile.kernels.autotune import get_config, register_candidates
from spt_compile.kernels.routing import routing_prologue

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
_TL_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------- device helpers
# The CPU interpreter's tl.dot multiplies bf16 bit patterns as integers (triton 3.9); under it the
# operands go up to fp32 first, which is the same math as the GPU's bf16 MMA with fp32 accumulation.
_UPCAST_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _tanh(u):
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _act(h, ACT: tl.constexpr):
    """act(h) in fp32; ACT codes as ACTIVATIONS."""
    if ACT == 0:
        a = tl.maximum(h, 0.0)
    elif ACT == 1:
        a = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        a = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    else:
        a = h * tl.sigmoid(h)
    return a


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """(act(h), act'(h)) in fp32."""
    if ACT == 0:
        a = tl.maximum(h, 0.0)
        d = (h > 0.0).to(tl.float32)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        a = h * cdf
        d = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        a = 0.5 * h * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    else:
        s = tl.sigmoid(h)
        a = h * s
        d = s * (1.0 + h * (1.0 - s))
    return a, d


@triton.jit
def _tile_of(pid, offsets_ptr, NUM_BLOCKS, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile `pid` of the block-grouped rows -> (block e, first row, end row of block e).

    e == NUM_BLOCKS for a surplus program (the grid is an upper bound)."""
    e_idx = tl.arange(0, BLOCK_E)
    lo = tl.load(offsets_ptr + e_idx, mask=e_idx < NUM_BLOCKS, other=0)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=e_idx < NUM_BLOCKS, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    e = tl.sum((tile_end <= pid).to(tl.int32), axis=0)
    sel = e_idx == e
    first_tile = tl.sum(tl.where(sel, tile_end - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(sel, lo, 0), axis=0) + (pid - first_tile) * BLOCK_M
    return e, row0, tl.sum(tl.where(sel, hi, 0), axis=0)


# ----------------------------------------------------------------------------- forward kernels
@triton.jit
def _adapter_dot(acc, u_ptr, tok, rmask, lb_ptr, neur, cmask, R, stride_lbn, stride_lbk,
                 BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """acc += u[tok] @ lb[neur]^T: a LoRA term's extra K loop over its rank R (u [T, R] contiguous, pre-scaled)."""
    u_rows = u_ptr + tok * R
    for k0 in range(0, R, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < R
        a = tl.load(u_rows[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)   # [BM, BK]
        w = tl.load(lb_ptr + neur[None, :] * stride_lbn + ks[:, None] * stride_lbk,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)                                 # [BK, BN]
        acc = _dot(a, w, acc, PREC)
    return acc


@triton.jit
def _up_kernel(x_ptr, w1_ptr, b1_ptr, wu_ptr, bu_ptr, perm_ptr, order_ptr, offsets_ptr,
               hpre_ptr, hup_ptr, hid_ptr, lu1_ptr, lb1_ptr, luu_ptr, lbu_ptr,
               D, HB, NUM_BLOCKS, TOP_K, stride_xm, stride_xk, stride_w1n, stride_w1k, stride_wun, stride_wuk,
               R1, RU, stride_lb1n, stride_lb1k, stride_lbun, stride_lbuk,
               ACT: tl.constexpr, GATED: tl.constexpr, HAS_B1: tl.constexpr, HAS_BU: tl.constexpr,
               LORA1: tl.constexpr, LORA_UP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
               PREC: tl.constexpr):
    e, row0, row_end = _tile_of(tl.program_id(0), offsets_ptr, NUM_BLOCKS, BLOCK_M, BLOCK_E)
    if e >= NUM_BLOCKS:
        return
    rows = row0 + tl.arange(0, BLOCK_M)                       # grouped rows [BM]
    rmask = rows < row_end
    tok = (tl.load(order_ptr + rows, mask=rmask, other=0) // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # neuron slots of block e [BN]
    cmask = cols < HB
    neur = tl.load(perm_ptr + e * HB + cols, mask=cmask, other=0).to(tl.int32)  # weight offsets fit int32 (checked)
    x_rows = x_ptr + tok * stride_xm                           # [BM] pointers (int64 math once)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        a = tl.load(x_rows[:, None] + ks[None, :] * stride_xk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)                 # [BM, BK]
        wmask = kmask[:, None] & cmask[None, :]
        w = tl.load(w1_ptr + neur[None, :] * stride_w1n + ks[:, None] * stride_w1k, mask=wmask, other=0.0)
        acc = _dot(a, w, acc, PREC)                              # [BM, BN]
        if GATED:
            wu = tl.load(wu_ptr + neur[None, :] * stride_wun + ks[:, None] * stride_wuk, mask=wmask, other=0.0)
            acc_u = _dot(a, wu, acc_u, PREC)
    if LORA1:  # + s1·B1_e·(A1 x): lu1 holds s1·A1·x [T, R1], computed once for all blocks
        acc = _adapter_dot(acc, lu1_ptr, tok, rmask, lb1_ptr, neur, cmask, R1, stride_lb1n, stride_lb1k,
                           BLOCK_K, PREC)
    if LORA_UP:
        acc_u = _adapter_dot(acc_u, luu_ptr, tok, rmask, lbu_ptr, neur, cmask, RU, stride_lbun, stride_lbuk,
                             BLOCK_K, PREC)
    if HAS_B1:
        acc += tl.load(b1_ptr + neur, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out_ty = hpre_ptr.dtype.element_ty
    offs = rows.to(tl.int64)[:, None] * HB + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    tl.store(hpre_ptr + offs, acc.to(out_ty), mask=omask)
    hid = _act(acc, ACT)
    if GATED:
        if HAS_BU:
            acc_u += tl.load(bu_ptr + neur, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(hup_ptr + offs, acc_u.to(out_ty), mask=omask)
        hid = hid * acc_u
    tl.store(hid_ptr + offs, hid.to(out_ty), mask=omask)


@triton.jit
def _down_kernel(a_ptr, w_ptr, a2_ptr, w2_ptr, perm_ptr, order_ptr, offsets_ptr, out_ptr,
                 N, HB, NUM_BLOCKS, stride_wn, stride_wk, stride_w2n, stride_w2k,
                 TWO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_E: tl.constexpr, PREC: tl.constexpr):
    """out[pair(r), n] = sum_j a[r, j] * w[n, neur_e(j)]  (+ a2 @ w2 when TWO); fp32, one row per pair."""
    e, row0, row_end = _tile_of(tl.program_id(0), offsets_ptr, NUM_BLOCKS, BLOCK_M, BLOCK_E)
    if e >= NUM_BLOCKS:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    a_rows = a_ptr + rows.to(tl.int64) * HB                    # [BM] pointers
    a2_rows = a2_ptr + rows.to(tl.int64) * HB
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HB, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < HB
        neur = tl.load(perm_ptr + e * HB + ks, mask=kmask, other=0).to(tl.int32)     # [BK]
        amask = rmask[:, None] & kmask[None, :]
        wmask = kmask[:, None] & nmask[None, :]
        a = tl.load(a_rows[:, None] + ks[None, :], mask=amask, other=0.0)              # [BM, BK]
        w = tl.load(w_ptr + ns[None, :] * stride_wn + neur[:, None] * stride_wk, mask=wmask, other=0.0)
        acc = _dot(a, w, acc, PREC)
        if TWO:
            a2 = tl.load(a2_rows[:, None] + ks[None, :], mask=amask, other=0.0)
            w2 = tl.load(w2_ptr + ns[None, :] * stride_w2n + neur[:, None] * stride_w2k, mask=wmask, other=0.0)
            acc = _dot(a2, w2, acc, PREC)
    tl.store((out_ptr + pair * N)[:, None] + ns[None, :], acc, mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _pair_sum_kernel(part_ptr, bias_ptr, out_ptr, T, N, TOP_K,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = sum_{s < TOP_K} part[t*TOP_K + s] (+ bias), summed in slot order in fp32."""
    ts = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (ts < T)[:, None] & (ns < N)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(0, TOP_K):
        acc += tl.load(part_ptr + (ts * TOP_K + s)[:, None] * N + ns[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ns, mask=ns < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + ts[:, None] * N + ns[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward kernels
@triton.jit
def _dhidden_kernel(dy_ptr, w2_ptr, perm_ptr, order_ptr, offsets_ptr, hpre_ptr, hup_ptr, dhpre_ptr, dhup_ptr,
                    dv_ptr, a2_ptr,
                    DOUT, HB, NUM_BLOCKS, TOP_K, stride_dym, stride_dyk, stride_w2n, stride_w2h,
                    R2, stride_a2r, stride_a2h,
                    ACT: tl.constexpr, GATED: tl.constexpr, LORA2: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                    PREC: tl.constexpr):
    """dhidden = dy[tok] @ w2[:, neur_e] (+ dv[tok] @ a2[:, neur_e], the down adapter: dv = s2·dy·B2 [T, R2]);
    dh_pre = dhidden * act'(h_pre) (* h_up); dh_up = dhidden * act(h_pre)."""
    e, row0, row_end = _tile_of(tl.program_id(0), offsets_ptr, NUM_BLOCKS, BLOCK_M, BLOCK_E)
    if e >= NUM_BLOCKS:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    tok = (tl.load(order_ptr + rows, mask=rmask, other=0) // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < HB
    neur = tl.load(perm_ptr + e * HB + cols, mask=cmask, other=0).to(tl.int32)
    dy_rows = dy_ptr + tok * stride_dym                        # [BM] pointers
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, DOUT, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < DOUT
        g = tl.load(dy_rows[:, None] + ks[None, :] * stride_dyk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)                 # [BM, BK]
        w = tl.load(w2_ptr + ks[:, None] * stride_w2n + neur[None, :] * stride_w2h,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)                 # [BK, BN]
        acc = _dot(g, w, acc, PREC)
    if LORA2:  # a2 [R2, H] read as the "B" of an adapter term: lb[neur, r] = a2[r, neur]
        acc = _adapter_dot(acc, dv_ptr, tok, rmask, a2_ptr, neur, cmask, R2, stride_a2h, stride_a2r, BLOCK_K, PREC)
    offs = rows.to(tl.int64)[:, None] * HB + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    out_ty = dhpre_ptr.dtype.element_ty
    a, da = _act_grad(tl.load(hpre_ptr + offs, mask=omask, other=0.0).to(tl.float32), ACT)
    if GATED:
        u = tl.load(hup_ptr + offs, mask=omask, other=0.0).to(tl.float32)
        tl.store(dhup_ptr + offs, (acc * a).to(out_ty), mask=omask)
        acc = acc * u
    tl.store(dhpre_ptr + offs, (acc * da).to(out_ty), mask=omask)


@triton.jit
def _dw_in_kernel(dh_ptr, dh2_ptr, x_ptr, perm_ptr, order_ptr, offsets_ptr, dw_ptr, dw2_ptr, db_ptr, db2_ptr,
                  D, HB, TOP_K, stride_xm, stride_xk,
                  GATED: tl.constexpr, HAS_B: tl.constexpr, HAS_B2: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """dW[neur_e(j), d] = sum_{r in block e} dh[r, j] * x[tok(r), d]; db[neur_e(j)] = sum_r dh[r, j].

    Grid (E, cdiv(HB, BLOCK_M), cdiv(D, BLOCK_N)); dw/dw2 are contiguous [H, D]."""
    e = tl.program_id(0)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    js = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    jmask = js < HB
    neur = tl.load(perm_ptr + e * HB + js, mask=jmask, other=0).to(tl.int32)
    ds = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    dmask = ds < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    db2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        rm = rs < hi
        tok = (tl.load(order_ptr + rs, mask=rm, other=0) // TOP_K).to(tl.int64)
        xt = tl.load(x_ptr + tok[:, None] * stride_xm + ds[None, :] * stride_xk,
                     mask=rm[:, None] & dmask[None, :], other=0.0)                   # [BK, BN]
        hoffs = rs.to(tl.int64)[None, :] * HB + js[:, None]
        hmask = jmask[:, None] & rm[None, :]
        g = tl.load(dh_ptr + hoffs, mask=hmask, other=0.0)                          # dh^T [BM, BK]
        acc = _dot(g, xt, acc, PREC)
        if HAS_B:
            db += tl.sum(g.to(tl.float32), axis=1)
        if GATED:
            g2 = tl.load(dh2_ptr + hoffs, mask=hmask, other=0.0)
            acc2 = _dot(g2, xt, acc2, PREC)
            if HAS_B2:
                db2 += tl.sum(g2.to(tl.float32), axis=1)
    offs = neur[:, None] * D + ds[None, :]
    omask = jmask[:, None] & dmask[None, :]
    tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=omask)
    if GATED:
        tl.store(dw2_ptr + offs, acc2.to(dw2_ptr.dtype.element_ty), mask=omask)
    if tl.program_id(2) == 0:  # bias sums are the same in every d tile: one writer
        if HAS_B:
            tl.store(db_ptr + neur, db.to(db_ptr.dtype.element_ty), mask=jmask)
        if HAS_B2:
            tl.store(db2_ptr + neur, db2.to(db2_ptr.dtype.element_ty), mask=jmask)


@triton.jit
def _dw_out_kernel(dy_ptr, hpre_ptr, hup_ptr, perm_ptr, order_ptr, offsets_ptr, dw_ptr,
                   DOUT, HB, H, TOP_K, stride_dym, stride_dyk,
                   ACT: tl.constexpr, GATED: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """dW2[n, neur_e(j)] = sum_{r in block e} dy[tok(r), n] * hidden[r, j], hidden recomputed.

    Grid (E, cdiv(DOUT, BLOCK_M), cdiv(HB, BLOCK_N)); dw is contiguous [DOUT, H]."""
    e = tl.program_id(0)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    ns = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = ns < DOUT
    js = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = js < HB
    neur = tl.load(perm_ptr + e * HB + js, mask=jmask, other=0).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        rm = rs < hi
        tok = (tl.load(order_ptr + rs, mask=rm, other=0) // TOP_K).to(tl.int64)
        g = tl.load(dy_ptr + tok[None, :] * stride_dym + ns[:, None] * stride_dyk,
                    mask=nmask[:, None] & rm[None, :], other=0.0)                   # dy^T [BM, BK]
        hoffs = rs.to(tl.int64)[:, None] * HB + js[None, :]
        hmask = rm[:, None] & jmask[None, :]
        hid = _act(tl.load(hpre_ptr + hoffs, mask=hmask, other=0.0).to(tl.float32), ACT)  # act(0) == 0
        if GATED:
            hid = hid * tl.load(hup_ptr + hoffs, mask=hmask, other=0.0).to(tl.float32)
        # rounded to the input dtype exactly as the forward's hidden was
        acc = _dot(g, hid.to(g.dtype), acc, PREC)
    tl.store(dw_ptr + ns[:, None] * H + neur[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=nmask[:, None] & jmask[None, :])


# ----------------------------------------------------------------------------- configs and AOT specs
_ROW_KERNELS = ("ffn_up", "ffn_down", "ffn_dhidden")
_WG_KERNELS = ("ffn_dw_in", "ffn_dw_out")


def _fits_in(cands):
    return lambda cfg, key: C.fits_last_resort(cfg, key, cands)


for _n in _ROW_KERNELS + _WG_KERNELS:
    _c = C.ROW_TILED if _n in _ROW_KERNELS else C.WEIGHT_GRAD
    register_candidates(_n, _c, _fits_in(_c))
    _f = C.FP32 if _n in _ROW_KERNELS else C.FP32_WG
    register_candidates(_n + "_fp32", _f, _fits_in(_f))  # see _gemm_configs.FP32
register_candidates("ffn_pair_sum", C.PAIR_SUM, _fits_in(C.PAIR_SUM))


def _kname(base: str, dtype: torch.dtype) -> str:
    return base + "_fp32" if dtype == torch.float32 else base


_AOT_BLOCK_E = 64  # representative: the block-table width only sizes a tiny vector


def _prec(dt: str) -> str:
    return "ieee" if dt == "fp32" else "tf32"  # fp32 matches torch's default (no TF32 matmul)


def _aot(name, fn, sig, fixed):
    """Register `fn`'s AOT specs (half types under `name`, fp32 under name_fp32 with its own configs);
    every int arg is i32, `sig` maps pointer args to dtype roles."""
    def signature(dt):
        roles = {"x": f"*{dt}", "f32": "*fp32", "i32": "*i32", "i64": "*i64", "i": "i32", "c": "constexpr"}
        return {arg: roles[role] for arg, role in sig}

    def constexprs_for(cfg, dt):
        return {**dict(cfg.meta), **fixed, **({"PREC": _prec(dt)} if "PREC" in dict(sig) else {})}
    if name == "ffn_pair_sum":
        register_aot(AotSpec(name, fn, signature, constexprs_for))
    else:
        register_aot(AotSpec(name, fn, signature, constexprs_for, dtypes=("bf16", "fp16")))
        register_aot(AotSpec(name + "_fp32", fn, signature, constexprs_for, dtypes=("fp32",)))


def _args(spec: str) -> list[tuple[str, str]]:
    return [tuple(a.split(":")) for a in spec.split()]


_TILE = "BLOCK_M:c BLOCK_N:c BLOCK_K:c"
# the heaviest variant of each kernel (gated, biased, gelu_tanh) is the one compiled ahead of time
_aot("ffn_up", _up_kernel, _args(
    "x_ptr:x w1_ptr:x b1_ptr:x wu_ptr:x bu_ptr:x perm_ptr:i64 order_ptr:i32 offsets_ptr:i32 hpre_ptr:x "
    "hup_ptr:x hid_ptr:x lu1_ptr:x lb1_ptr:x luu_ptr:x lbu_ptr:x D:i HB:i NUM_BLOCKS:i TOP_K:i stride_xm:i "
    "stride_xk:i stride_w1n:i stride_w1k:i stride_wun:i stride_wuk:i R1:i RU:i stride_lb1n:i stride_lb1k:i "
    f"stride_lbun:i stride_lbuk:i ACT:c GATED:c HAS_B1:c HAS_BU:c LORA1:c LORA_UP:c {_TILE} BLOCK_E:c PREC:c"),
    {"ACT": 2, "GATED": True, "HAS_B1": True, "HAS_BU": True, "LORA1": True, "LORA_UP": True,
     "BLOCK_E": _AOT_BLOCK_E})
_aot("ffn_down", _down_kernel, _args(
    "a_ptr:x w_ptr:x a2_ptr:x w2_ptr:x perm_ptr:i64 order_ptr:i32 offsets_ptr:i32 out_ptr:f32 N:i HB:i "
    f"NUM_BLOCKS:i stride_wn:i stride_wk:i stride_w2n:i stride_w2k:i TWO:c {_TILE} BLOCK_E:c PREC:c"),
    {"TWO": True, "BLOCK_E": _AOT_BLOCK_E})
_aot("ffn_pair_sum", _pair_sum_kernel, _args(
    "part_ptr:f32 bias_ptr:x out_ptr:x T:i N:i TOP_K:i HAS_BIAS:c BLOCK_M:c BLOCK_N:c"),
    {"HAS_BIAS": True})
_aot("ffn_dhidden", _dhidden_kernel, _args(
    "dy_ptr:x w2_ptr:x perm_ptr:i64 order_ptr:i32 offsets_ptr:i32 hpre_ptr:x hup_ptr:x dhpre_ptr:x dhup_ptr:x "
    "dv_ptr:x a2_ptr:x DOUT:i HB:i NUM_BLOCKS:i TOP_K:i stride_dym:i stride_dyk:i stride_w2n:i stride_w2h:i "
    f"R2:i stride_a2r:i stride_a2h:i ACT:c GATED:c LORA2:c {_TILE} BLOCK_E:c PREC:c"),
    {"ACT": 2, "GATED": True, "LORA2": True, "BLOCK_E": _AOT_BLOCK_E})
_aot("ffn_dw_in", _dw_in_kernel, _args(
    "dh_ptr:x dh2_ptr:x x_ptr:x perm_ptr:i64 order_ptr:i32 offsets_ptr:i32 dw_ptr:x dw2_ptr:x db_ptr:x "
    f"db2_ptr:x D:i HB:i TOP_K:i stride_xm:i stride_xk:i GATED:c HAS_B:c HAS_B2:c {_TILE} PREC:c"),
    {"GATED": True, "HAS_B": True, "HAS_B2": True})
_aot("ffn_dw_out", _dw_out_kernel, _args(
    "dy_ptr:x hpre_ptr:x hup_ptr:x perm_ptr:i64 order_ptr:i32 offsets_ptr:i32 dw_ptr:x DOUT:i HB:i H:i "
    f"TOP_K:i stride_dym:i stride_dyk:i ACT:c GATED:c {_TILE} PREC:c"),
    {"ACT": 2, "GATED": True})


# ----------------------------------------------------------------------------- launchers
def _check(x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, activation, num_blocks):
    """Validate the OPS.md routed_ffn stage arguments; returns (T, d, H, Hb, d_out, top_k, gated)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D [T, d], got shape {tuple(x2d.shape)}")
    if x2d.dtype not in _TL_DTYPE:
        raise ValueError(f"x2d dtype must be one of {list(_TL_DTYPE)}, got {x2d.dtype}")
    T, d = x2d.shape
    if w1.dim() != 2 or w1.shape[1] != d:
        raise ValueError(f"w1 must be [H, {d}], got {tuple(w1.shape)}")
    H = w1.shape[0]
    if num_blocks < 1 or H % num_blocks:
        raise ValueError(f"num_blocks must divide H={H}, got {num_blocks}")
    if w2.dim() != 2 or w2.shape[1] != H:
        raise ValueError(f"w2 must be [d_out, {H}], got {tuple(w2.shape)}")
    gated = w_up is not None
    if gated and tuple(w_up.shape) != (H, d):
        raise ValueError(f"w_up must be [{H}, {d}], got {tuple(w_up.shape)}")
    if b_up is not None and not gated:
        raise ValueError("b_up given without w_up")
    for name, b, n in (("b1", b1, H), ("b_up", b_up, H), ("b2", b2, w2.shape[0])):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name} must be [{n}], got {tuple(b.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w_up", w_up), ("b_up", b_up), ("w2", w2), ("b2", b2)):
        if t is not None and (t.dtype != x2d.dtype or t.device != x2d.device):
            raise ValueError(f"{name} must match x2d's dtype and device ({x2d.dtype}, {x2d.device}), "
                             f"got ({t.dtype}, {t.device})")
    if block_perm.dtype != torch.int64 or tuple(block_perm.shape) != (H,):
        raise ValueError(f"block_perm must be int64 [{H}], got {block_perm.dtype} {tuple(block_perm.shape)}")
    if block_ids.dim() != 2 or block_ids.shape[0] != T or block_ids.dtype != torch.int32:
        raise ValueError(f"block_ids must be int32 [{T}, top_k], got {block_ids.dtype} {tuple(block_ids.shape)}")
    if max(H * d, w2.shape[0] * H) >= 2 ** 31:
        raise ValueError(f"w1/w2 too large for the kernels' int32 weight offsets: H={H}, d={d}, d_out={w2.shape[0]}")
    top_k = block_ids.shape[1]
    if not 1 <= top_k <= num_blocks:
        raise ValueError(f"block_ids: top_k must be in [1, num_blocks={num_blocks}], got {top_k}")
    return T, d, H, H // num_blocks, w2.shape[0], top_k, gated


def _prec_of(dtype: torch.dtype) -> str:
    # fp32 GEMMs follow torch's matmul TF32 switch (off by default), so errors match torch's own
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _row_grid(P: int, E: int, cfg, n: int) -> tuple[int, int]:
    # sum_e cdiv(count_e, BM) <= cdiv(P, BM) + E: an upper bound without reading the counts
    return (triton.cdiv(P, cfg["BLOCK_M"]) + E, triton.cdiv(n, cfg["BLOCK_N"]))


def _pair_sum(part: torch.Tensor, bias, T: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T*top_k, N] fp32 per-pair rows -> [T, N] dtype, summed per token in slot order (+ bias)."""
    N = part.shape[1]
    out = torch.empty(T, N, dtype=dtype, device=part.device)
    cfg = get_config("ffn_pair_sum", C.gemm_key(_TL_DTYPE[dtype], T, N, 1))
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _pair_sum_kernel[grid](part, bias if bias is not None else out, out, T, N, top_k,
                           HAS_BIAS=bias is not None, **cfg.kwargs())
    return out


class _NoLora:
    u1 = b1 = u_up = b_up = a2 = b2 = None
    s1 = s_up = s2 = 1.0


def _check_lora(lora, T, H, d_out, dt):
    """lora: the op's adapters (lowering/reference/routed_ffn.Lora: u1 [T, r1] with b1 [H, r1], u_up/b_up,
    a2 [r2, H] with b2 [d_out, r2]) or None."""
    if lora is None:
        return _NoLora
    for name, t, shape in (("u1", lora.u1, (T, None)), ("b1", lora.b1, (H, None)), ("u_up", lora.u_up, (T, None)),
                           ("b_up", lora.b_up, (H, None)), ("a2", lora.a2, (None, H)), ("b2", lora.b2, (d_out, None))):
        if t is None:
            continue
        if t.dim() != 2 or any(n is not None and n != m for n, m in zip(shape, t.shape)) or t.dtype != dt:
            raise ValueError(f"lora.{name} must be {dt} {shape} (None = any), got {t.dtype} {tuple(t.shape)}")
    return lora


def _scaled(u, s):
    """s·u as a contiguous tensor (the kernels add u @ B^T unscaled: the scaling is folded into the small u)."""
    return (u * s).contiguous() if s != 1.0 else u.contiguous()


def routed_ffn_forward(x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, activation, num_blocks,
                       lora=None):
    """OPS.md stage: -> (y2d [T, d_out], h_pre [T*k, Hb], h_up [T*k, Hb] or [0], v2 [T, r2] or [0]), on CUDA via
    Triton. LoRA: the input adapters are an extra K loop of _up_kernel over their rank; the down adapter is one
    more _down_kernel launch (v2 = Σ_e A2_e·hidden_e, N = r2) and a small dense GEMM s2·v2·B2ᵀ."""
    T, d, H, Hb, d_out, top_k, gated = _check(x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids,
                                              activation, num_blocks)
    lora = _check_lora(lora, T, H, d_out, x2d.dtype)
    E, P, dt, dev = num_blocks, T * top_k, x2d.dtype, x2d.device
    h_pre = torch.empty(P, Hb, dtype=dt, device=dev)
    h_up = torch.empty(P, Hb, dtype=dt, device=dev) if gated else torch.empty(0, dtype=dt, device=dev)
    v2 = torch.zeros(T, lora.a2.shape[0], dtype=dt, device=dev) if lora.a2 is not None else h_pre.new_empty(0)
    if P == 0:
        return torch.zeros(T, d_out, dtype=dt, device=dev), h_pre, h_up, v2
    order, offsets = routing_prologue(block_ids, E)
    perm = block_perm.contiguous()
    hidden = torch.empty(P, Hb, dtype=dt, device=dev)  # act(h_pre) (* h_up), block-grouped
    tdt, prec, block_e = _TL_DTYPE[dt], _prec_of(dt), max(16, triton.next_power_of_2(E))
    b1c = b1.contiguous() if b1 is not None else h_pre
    wu, buc = (w_up, b_up.contiguous() if b_up is not None else h_pre) if gated else (w1, h_pre)
    lu1 = _scaled(lora.u1, lora.s1) if lora.u1 is not None else h_pre
    luu = _scaled(lora.u_up, lora.s_up) if lora.u_up is not None else h_pre
    lb1 = lora.b1 if lora.b1 is not None else w1
    lbu = lora.b_up if lora.b_up is not None else w1
    cfg = get_config(_kname("ffn_up", dt), C.gemm_key(tdt, P // E, Hb, d))
    _up_kernel[_row_grid(P, E, cfg, Hb)](
        x2d, w1, b1c, wu, buc, perm, order, offsets, h_pre, h_up if gated else h_pre, hidden, lu1, lb1, luu, lbu,
        d, Hb, E, top_k, x2d.stride(0), x2d.stride(1), w1.stride(0), w1.stride(1), wu.stride(0), wu.stride(1),
        lu1.shape[-1] if lora.u1 is not None else 0, luu.shape[-1] if lora.u_up is not None else 0,
        lb1.stride(0), lb1.stride(1), lbu.stride(0), lbu.stride(1),
        ACT=ACTIVATIONS[activation], GATED=gated, HAS_B1=b1 is not None, HAS_BU=b_up is not None,
        LORA1=lora.u1 is not None, LORA_UP=lora.u_up is not None, BLOCK_E=block_e, PREC=prec, **cfg.kwargs())
    y = _grouped_down(hidden, w2, d_out, w2.stride(0), w2.stride(1), None, None, perm, order, offsets, E, T, top_k,
                      b2.contiguous() if b2 is not None else None, torch.float32)     # [T, d_out] fp32
    if lora.a2 is not None:
        a2 = lora.a2
        v2 = _grouped_down(hidden, a2, a2.shape[0], a2.stride(0), a2.stride(1), None, None, perm, order, offsets, E, T,
                           top_k, None, dt)                                           # [T, r2]
        y.addmm_(v2.float(), lora.b2.float().t(), alpha=lora.s2)
    return y.to(dt), h_pre, h_up, v2


def _grouped_down(a, w, N, stride_wn, stride_wk, a2, w2, perm, order, offsets, E, T, top_k, bias, out_dtype):
    """out[t, n] = Σ over t's pairs of a[r] @ w[n, neur_e]ᵀ (+ a2[r] @ w2[n, neur_e]ᵀ) (+ bias), n < N: one
    _down_kernel launch into per-pair fp32 rows, then the fixed-order per-token sum. w is addressed as
    w[n, neuron] through (stride_wn, stride_wk), so [H, N] weights go in transposed (W1 for dx, B1 for du1);
    w2 (only with a2: the gated pair of dx) is addressed the same way as w."""
    P, Hb = a.shape
    dt = a.dtype
    part = torch.empty(P, N, dtype=torch.float32, device=a.device)  # per-pair outputs
    cfg = get_config(_kname("ffn_down", dt), C.gemm_key(_TL_DTYPE[dt], P // E, N, Hb))
    two = a2 is not None
    _down_kernel[_row_grid(P, E, cfg, N)](
        a, w, a2 if two else a, w2 if two else w, perm, order, offsets, part, N, Hb, E,
        stride_wn, stride_wk, *((w2.stride(1), w2.stride(0)) if two else (0, 0)),
        TWO=two, BLOCK_E=max(16, triton.next_power_of_2(E)), PREC=_prec_of(dt), **cfg.kwargs())
    return _pair_sum(part, bias, T, top_k, out_dtype)


def _bias_grad(dh, perm, offsets, E):
    """db[neuron] = Σ over block e's grouped rows of dh[r, j] for the neurons of block e: the bias gradient
    alone (a frozen weight with a trainable bias), as a sync-free segment sum. [H]"""
    P, Hb = dh.shape
    rows = torch.arange(P, device=dh.device)
    blk = torch.searchsorted(offsets[1:].long(), rows, right=True)                # [P] block of each row
    per_block = torch.zeros(E, Hb, dtype=torch.float32, device=dh.device).index_add_(0, blk, dh.float())
    return torch.empty(E * Hb, dtype=dh.dtype, device=dh.device).index_copy_(0, perm, per_block.view(-1).to(dh.dtype))


def _dw_in(dh, dh2, x, perm, order, offsets, E, top_k, with_b, with_b2, H):
    """(dW [H, D], dW2 [H, D] or None, db [H] or None, db2 [H] or None) = Σ over each block's rows of dhᵀ·x[tok]
    (dh2 too when given: the gated pair shares the x loads): one _dw_in_kernel launch."""
    dt, dev, D = dh.dtype, dh.device, x.shape[1]
    Hb = dh.shape[1]
    dw = torch.zeros(H, D, dtype=dt, device=dev)
    dw2 = torch.zeros(H, D, dtype=dt, device=dev) if dh2 is not None else None
    db = torch.zeros(H, dtype=dt, device=dev) if with_b else None
    db2 = torch.zeros(H, dtype=dt, device=dev) if with_b2 else None
    cfg = get_config(_kname("ffn_dw_in", dt), C.gemm_key(_TL_DTYPE[dt], Hb, D, dh.shape[0] // E))
    grid = (E, triton.cdiv(Hb, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_N"]))
    _dw_in_kernel[grid](
        dh, dh2 if dh2 is not None else dh, x, perm, order, offsets, dw, dw2 if dw2 is not None else dw,
        db if db is not None else dw, db2 if db2 is not None else dw, D, Hb, top_k, x.stride(0), x.stride(1),
        GATED=dh2 is not None, HAS_B=with_b, HAS_B2=with_b2, PREC=_prec_of(dt), **cfg.kwargs())
    return dw, dw2, db, db2


def _dw_out(dy, h_pre, h_up, perm, order, offsets, E, top_k, activation, H):
    """dW [N, H] = Σ over each block's rows of dy[tok]ᵀ·hidden (hidden recomputed from h_pre, h_up)."""
    dt, N, Hb = dy.dtype, dy.shape[1], h_pre.shape[1]
    dw = torch.zeros(N, H, dtype=dt, device=dy.device)
    cfg = get_config(_kname("ffn_dw_out", dt), C.gemm_key(_TL_DTYPE[dt], N, Hb, h_pre.shape[0] // E))
    grid = (E, triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(Hb, cfg["BLOCK_N"]))
    _dw_out_kernel[grid](
        dy, h_pre, h_up if h_up is not None else h_pre, perm, order, offsets, dw, N, Hb, H, top_k,
        dy.stride(0), dy.stride(1), ACT=ACTIVATIONS[activation], GATED=h_up is not None, PREC=_prec_of(dt),
        **cfg.kwargs())
    return dw


_ALL_NEEDS = (True,) * 13


def routed_ffn_backward(dy2d, x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, h_pre, h_up,
                        activation, num_blocks, needs=_ALL_NEEDS, lora=None, v2=None):
    """OPS.md stage: -> 13 gradients (dx, dw1, db1, dw_up, db_up, dw2, db2, du1, dlb1, du_up, dlb_up, dla2, dlb2),
    None where absent or not needed. needs (13 bools, same order; shorter = the rest False) is
    ctx.needs_input_grad: a launch whose results nobody needs does not run (frozen weights cost nothing;
    with a frozen base and LoRA, no base weight-gradient GEMM runs)."""
    T, d, H, Hb, d_out, top_k, gated = _check(x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids,
                                              activation, num_blocks)
    lora = _check_lora(lora, T, H, d_out, x2d.dtype)
    E, P, dt, dev = num_blocks, T * top_k, x2d.dtype, x2d.device
    if tuple(dy2d.shape) != (T, d_out) or dy2d.dtype != dt:
        raise ValueError(f"dy2d must be {dt} [{T}, {d_out}], got {dy2d.dtype} {tuple(dy2d.shape)}")
    if tuple(h_pre.shape) != (P, Hb) or (gated and tuple(h_up.shape) != (P, Hb)):
        raise ValueError(f"h_pre (and h_up when gated) must be [{P}, {Hb}], got {tuple(h_pre.shape)}, "
                         f"{tuple(h_up.shape) if h_up is not None else None}")
    present = (True, True, b1 is not None, gated, b_up is not None, True, b2 is not None,
               lora.u1 is not None, lora.u1 is not None, lora.u_up is not None, lora.u_up is not None,
               lora.a2 is not None, lora.a2 is not None)
    n = tuple(bool(a) and p for a, p in zip(tuple(needs) + (False,) * (13 - len(needs)), present))
    g = [None] * 13
    g[6] = dy2d.sum(0, dtype=torch.float32).to(dt) if n[6] else None  # deterministic reduction
    if lora.a2 is not None:
        dv2 = (dy2d.mm(lora.b2) * lora.s2).contiguous()                             # [T, r2]
        g[12] = (dy2d.float().t().mm(v2.float()) * lora.s2).to(dt) if n[12] else None
    if P == 0:
        return tuple(torch.zeros_like(t) if (t is not None and n[i] and g[i] is None) else g[i]
                     for i, t in enumerate((x2d, w1, b1, w_up, b_up, w2, b2, lora.u1, lora.b1, lora.u_up,
                                            lora.b_up, lora.a2, lora.b2)))
    order, offsets = routing_prologue(block_ids, E)
    perm = block_perm.contiguous()
    h_pre = h_pre.contiguous()
    h_up = h_up.contiguous() if gated else None
    if n[5]:
        g[5] = _dw_out(dy2d, h_pre, h_up, perm, order, offsets, E, top_k, activation, H)
    if n[11]:
        g[11] = _dw_out(dv2, h_pre, h_up, perm, order, offsets, E, top_k, activation, H)   # dA2 [r2, H]
    if any(n[i] for i in (0, 1, 2, 3, 4, 7, 8, 9, 10)):
        dh_pre, dh_up = _dhidden(dy2d, w2, perm, order, offsets, h_pre, h_up, lora, dv2 if lora.a2 is not None
                                 else None, E, top_k, activation)
        _input_side_grads(g, n, x2d, w1, w_up, dh_pre, dh_up, perm, order, offsets, E, T, top_k, lora, H)
    return tuple(g)


def _dhidden(dy2d, w2, perm, order, offsets, h_pre, h_up, lora, dv2, E, top_k, activation):
    """(dh_pre, dh_up or None) [P, Hb] block-grouped: one _dhidden_kernel launch."""
    P, Hb = h_pre.shape
    dt, d_out = dy2d.dtype, dy2d.shape[1]
    gated = h_up is not None
    dh_pre = torch.empty(P, Hb, dtype=dt, device=dy2d.device)       # block-grouped, like h_pre
    dh_up = torch.empty(P, Hb, dtype=dt, device=dy2d.device) if gated else dh_pre
    a2 = lora.a2 if dv2 is not None else w2
    cfg = get_config(_kname("ffn_dhidden", dt), C.gemm_key(_TL_DTYPE[dt], P // E, Hb, d_out))
    _dhidden_kernel[_row_grid(P, E, cfg, Hb)](
        dy2d, w2, perm, order, offsets, h_pre, h_up if gated else h_pre, dh_pre, dh_up,
        dv2 if dv2 is not None else dy2d, a2, d_out, Hb, E, top_k,
        dy2d.stride(0), dy2d.stride(1), w2.stride(0), w2.stride(1),
        dv2.shape[1] if dv2 is not None else 0, a2.stride(0), a2.stride(1),
        ACT=ACTIVATIONS[activation], GATED=gated, LORA2=dv2 is not None,
        BLOCK_E=max(16, triton.next_power_of_2(E)), PREC=_prec_of(dt), **cfg.kwargs())
    return dh_pre, (dh_up if gated else None)


def _input_side_grads(g, n, x2d, w1, w_up, dh_pre, dh_up, perm, order, offsets, E, T, top_k, lora, H):
    """Fill g[0:5] and g[7:11] (dx, dW1, db1, dW_up, db_up, du1, dB1, du_up, dB_up): only the launches needed."""
    dt = x2d.dtype
    if n[0]:  # dx = Σ_e dh_pre·W1_e (+ dh_up·W_up_e)
        wu = w_up if dh_up is not None else None
        g[0] = _grouped_down(dh_pre, w1, w1.shape[1], w1.stride(1), w1.stride(0), dh_up, wu, perm, order, offsets, E, T,
                             top_k, None, dt)
    # base weight gradients: one launch for the pair that is needed (the gated pair shares the x loads)
    want1, want_up = n[1], n[3]
    if want1 or want_up:
        first = dh_pre if want1 else dh_up
        second = dh_up if (want1 and want_up) else None
        dw, dw2, db, db2 = _dw_in(first, second, x2d, perm, order, offsets, E, top_k,
                                  n[2] if want1 else n[4], n[4] if (want1 and want_up) else False, H)
        if want1:
            g[1], g[2] = dw, db
            if want_up:
                g[3], g[4] = dw2, db2
        else:
            g[3], g[4] = dw, db
    if n[2] and g[2] is None:
        g[2] = _bias_grad(dh_pre, perm, offsets, E)
    if n[4] and g[4] is None:
        g[4] = _bias_grad(dh_up, perm, offsets, E)
    # adapters: du = s·Σ_e dh·B_e  (B read as [r, H] through its strides), dB = Σ_e dhᵀ·(s·u)[tok]
    for (iu, ib, u, lb, s, dh) in ((7, 8, lora.u1, lora.b1, lora.s1, dh_pre),
                                   (9, 10, lora.u_up, lora.b_up, lora.s_up, dh_up)):
        if u is None:
            continue
        if n[iu]:
            du = _grouped_down(dh, lb, lb.shape[1], lb.stride(1), lb.stride(0), None, None, perm, order, offsets, E, T,
                               top_k, None, torch.float32)
            g[iu] = (du * s).to(dt)
        if n[ib]:
            g[ib] = _dw_in(dh, None, _scaled(u, s), perm, order, offsets, E, top_k, False, False, H)[0]
