"""Query-tile sparse attention backward: dQ per tile, dK/dV per key block through a deterministic transposed index.

tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, is_causal, scale, tile, dropout_p, seed, mask_grad)
    -> (dq, dk, dv, dmask or None)
is lowering/reference/tiled_attention.tiled_attention_backward (dmask for a trainable mask: kernel 3).
With P_ij = exp(s_ij - m_i) / l_i over query i's kept allowed keys, Z_ij the replayed dropout scale, dP_ij = Z_ij dout_i.v_j, delta_i = sum_j P_ij dP_ij,
dS_ij = P_ij (dP_ij - delta_i):
    dq_i = scale sum_j dS_ij k_j,   dk_j = scale sum_i dS_ij q_i,   dv_j = sum_i P_ij Z_ij dout_i.

1. `_dq_kernel` (grid as the forward: BLOCK_M rows of one tile x B*H): pass 1 over the tile's list recomputes the
   row normaliser (m_i, l_i) and delta_i online (never exp(s - lse): in a row whose keys all carry a finite
   finfo.min bias, lse = m + log l rounds to m and exp(s - lse) would give P = 1 per key; delta from the kept
   keys in fp32, not dout.out, whose rounding to bf16 would reach every gradient); pass 2 accumulates
   dq = dS K with tl.dot. It stores (m_i, 1/l_i) and delta_i for kernel 2.
2. `_dkv_kernel` (grid B*Hkv*cdiv(Nk, BLOCK_N)): one program owns BLOCK_N consecutive keys of one kv head and
   visits every (query head of the group, tile) whose list kept at least one of them: the transposed index,
   built in torch by sorting the valid slots by (b, kv head, key block, head, tile) (torch.unique, sorted)
   and searchsorted for each program's range, with the first slot of the block's keys in each visited list
   (lists are ascending, so the block's keys sit in at most BLOCK_N consecutive slots from there; a
   [BLOCK_N, BLOCK_N] compare finds each key's slot, needed for its dropout offset). Per visit and BLOCK_M
   rows of the tile: S^T = K Q^T, P^T, dP^T = V dO^T, then dv += (P Z)^T dO and dk += dS^T Q with tl.dot, fp32
   accumulators in registers, one store per key: no atomics, a fixed summation order, deterministic.
   Work per visit is BLOCK_N x rows even when the list kept fewer of the block's keys: the cost grows with
   how scattered the kept keys are (1/fill of the visited blocks); fp32 atomics from the dq kernel would do
   only the kept pairs but in a racy order. Which wins is a GPU measurement (issue 9: deterministic first).
3. `_ds_kernel` (grid as the dq kernel; only with mask_grad): one more pass over the tile's list with kernel 1's
   (m_i, 1/l_i) and delta_i writes dS [B, H, Nq, L] fp32 by slot (the same dropout replay), which torch puts
   onto the keys and sums to the mask's broadcast shape (mask_gradient, the plain backward's reduction).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spt_compile.kernels import aot, autotune
from spt_compile.kernels._tiled_common import (Limits, dot_precision, list_lengths, tdot, tile_key,
                                               tiled_site_shapes)
from spt_compile.kernels._triton_utils import block_d, dtype_name, mask_as_bias
from spt_compile.kernels.attention_fwd import seed_tensor
from spt_compile.kernels.attention_tiled_fwd import (aot_constexprs, check_tiled_args, dropout_scale, load_rows,
                                                     tile_logits, tile_program)

KERNEL_DQ = "attention_tiled_bwd_dq"
KERNEL_DKV = "attention_tiled_bwd_dkv"
KERNEL_DS = "attention_tiled_bwd_ds"


@triton.jit
def _dp_tile(do, v_base, jj, j_ok, offs_dv, DV, stride_vn, stride_vd, PREC: tl.constexpr):
    """(dP [BM, BN] = dO V^T, the gathered V [BN, BDV])."""
    vt = tl.load(v_base + jj[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                 mask=j_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    return tdot(do, tl.trans(vt), PREC), vt


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, lens_ptr, bias_ptr, seed_ptr, dout_ptr, stats_ptr, delta_ptr, dq_ptr,
    H, Hkv, Nq, Nk, T, NT, L, D, DV, scale, dropout_p,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid: (NT * cdiv(T, BLOCK_M), B * H), as the forward
    t, bh, b, h, hk, rows, row_hi, r_ok = tile_program(H, Hkv, Nq, T, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(q_ptr + b * stride_qb + h * stride_qh, rows, r_ok, offs_d, D, stride_qn, stride_qd)  # [BM, BD]
    do = load_rows(dout_ptr + b * stride_ob + h * stride_oh, rows, r_ok, offs_dv, DV, stride_on, stride_od)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    bias_base = bias_ptr + b * stride_mb + h * stride_mh
    idx_row = idx_ptr + (bh * NT + t) * L
    lens_t = tl.load(lens_ptr + bh * NT + t)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    # ---- pass 1: m_i, l_i and c_i = sum_j e_ij dP_ij (rescaled with l_i), online ----
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    c_i = tl.zeros([BLOCK_M], tl.float32)
    for l0 in range(0, lens_t, BLOCK_N):
        s, ok, jj, j_ok, kt = tile_logits(q, k_base, bias_base, idx_row, lens_t, l0, rows, row_hi, Nk, scale,
                                          stride_kn, stride_kd, stride_mi, stride_mj, offs_d, D,
                                          HAS_MASK, IS_CAUSAL, PREC, BLOCK_N)
        dp, vt = _dp_tile(do, v_base, jj, j_ok, offs_dv, DV, stride_vn, stride_vd, PREC)
        if DROPOUT:
            dp = dp * dropout_scale(seed, bh, rows, l0 + tl.arange(0, BLOCK_N), Nq, L, dropout_p)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        e = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(e, axis=1)
        c_i = c_i * alpha + tl.sum(e * dp, axis=1)
        m_i = m_new
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i == 0.0, 0.0, 1.0 / tl.where(l_i == 0.0, 1.0, l_i))  # a row without keys: P = 0
    delta = c_i * inv_l
    # ---- pass 2: dq = sum_j dS_ij k_j ----
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for l0 in range(0, lens_t, BLOCK_N):
        s, ok, jj, j_ok, kt = tile_logits(q, k_base, bias_base, idx_row, lens_t, l0, rows, row_hi, Nk, scale,
                                          stride_kn, stride_kd, stride_mi, stride_mj, offs_d, D,
                                          HAS_MASK, IS_CAUSAL, PREC, BLOCK_N)
        dp, vt = _dp_tile(do, v_base, jj, j_ok, offs_dv, DV, stride_vn, stride_vd, PREC)
        if DROPOUT:
            dp = dp * dropout_scale(seed, bh, rows, l0 + tl.arange(0, BLOCK_N), Nq, L, dropout_p)
        p = tl.exp(s - m_fin[:, None]) * inv_l[:, None]                    # 0 where not ok
        ds = p * (dp - delta[:, None])
        dq += tdot(ds.to(kt.dtype), tl.trans(kt), PREC)
    row = bh * Nq + rows.to(tl.int64)
    tl.store(stats_ptr + row * 2, m_fin, mask=r_ok)
    tl.store(stats_ptr + row * 2 + 1, inv_l, mask=r_ok)
    tl.store(delta_ptr + row, delta, mask=r_ok)
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=r_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _ds_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, lens_ptr, bias_ptr, seed_ptr, dout_ptr, stats_ptr, delta_ptr, ds_ptr,
    H, Hkv, Nq, Nk, T, NT, L, D, DV, scale, dropout_p,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid as _dq_kernel, whose (m_i, 1/l_i) and delta_i it reads; writes dS [B, H, Nq, L] fp32 in slot order
    # (slots past the tile's list stay as the launcher zeroed them): the mask gradient, d out / d bias_ij = dS_ij
    t, bh, b, h, hk, rows, row_hi, r_ok = tile_program(H, Hkv, Nq, T, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(q_ptr + b * stride_qb + h * stride_qh, rows, r_ok, offs_d, D, stride_qn, stride_qd)  # [BM, BD]
    do = load_rows(dout_ptr + b * stride_ob + h * stride_oh, rows, r_ok, offs_dv, DV, stride_on, stride_od)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    bias_base = bias_ptr + b * stride_mb + h * stride_mh
    idx_row = idx_ptr + (bh * NT + t) * L
    lens_t = tl.load(lens_ptr + bh * NT + t)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    row = bh * Nq + rows.to(tl.int64)
    m_row = tl.load(stats_ptr + row * 2, mask=r_ok, other=0.0)
    inv_l = tl.load(stats_ptr + row * 2 + 1, mask=r_ok, other=0.0)
    delta = tl.load(delta_ptr + row, mask=r_ok, other=0.0)
    for l0 in range(0, lens_t, BLOCK_N):
        s, ok, jj, j_ok, kt = tile_logits(q, k_base, bias_base, idx_row, lens_t, l0, rows, row_hi, Nk, scale,
                                          stride_kn, stride_kd, stride_mi, stride_mj, offs_d, D,
                                          HAS_MASK, IS_CAUSAL, PREC, BLOCK_N)
        dp, vt = _dp_tile(do, v_base, jj, j_ok, offs_dv, DV, stride_vn, stride_vd, PREC)
        slots = l0 + tl.arange(0, BLOCK_N)
        if DROPOUT:
            dp = dp * dropout_scale(seed, bh, rows, slots, Nq, L, dropout_p)
        ds = tl.exp(s - m_row[:, None]) * inv_l[:, None] * (dp - delta[:, None])  # 0 where not ok
        tl.store(ds_ptr + row[:, None] * L + slots[None, :], ds, mask=r_ok[:, None] & (slots < lens_t)[None, :])


@triton.jit
def _dkv_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, bias_ptr, seed_ptr, dout_ptr, stats_ptr, delta_ptr,
    visit_ptr, vslot_ptr, voff_ptr, dk_ptr, dv_ptr,
    H, Hkv, Nq, Nk, T, NT, L, D, DV, scale, dropout_p,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid: (B * Hkv * cdiv(Nk, BLOCK_N),); program g = (b*Hkv + hk) * nKB + kb owns keys kb*BN .. kb*BN+BN-1.
    # Its visits are visit[voff[g]:voff[g+1]] = hg * NT + t (query head hk*G + hg, tile t), vslot = first slot.
    g = tl.program_id(0).to(tl.int64)
    n_kb = tl.cdiv(Nk, BLOCK_N)
    kb = g % n_kb
    bhk = g // n_kb
    hk = bhk % Hkv
    b = bhk // Hkv
    G = H // Hkv
    keys = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = keys < Nk
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kblk = tl.load(k_ptr + b * stride_kb + hk * stride_kh + keys[:, None].to(tl.int64) * stride_kn
                   + offs_d[None, :] * stride_kd, mask=k_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    vblk = tl.load(v_ptr + b * stride_vb + hk * stride_vh + keys[:, None].to(tl.int64) * stride_vn
                   + offs_dv[None, :] * stride_vd, mask=k_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lanes = tl.arange(0, BLOCK_N)
    v_start = tl.load(voff_ptr + g)
    v_end = tl.load(voff_ptr + g + 1)
    for vi in range(v_start, v_end):
        vis = tl.load(visit_ptr + vi)
        s0 = tl.load(vslot_ptr + vi)
        t = vis % NT
        h = hk * G + vis // NT
        bh = b * H + h
        ids = tl.load(idx_ptr + (bh * NT + t) * L + s0 + lanes, mask=s0 + lanes < L, other=-1)  # [BN] slots
        eq = keys[:, None] == ids[None, :]                                   # [BN keys, BN slots]
        member = tl.max(eq.to(tl.int32), axis=1) > 0                         # [BN] key kept by this tile
        slot = s0 + tl.sum(tl.where(eq, lanes[None, :], 0), axis=1)          # [BN] its slot
        q_base = q_ptr + b * stride_qb + h * stride_qh
        o_base = dout_ptr + b * stride_ob + h * stride_oh
        bias_base = bias_ptr + b * stride_mb + h * stride_mh
        row_hi = tl.minimum(t * T + T, Nq)
        r_start = 0
        if IS_CAUSAL:  # rows before the block's first key attend to none of it
            r_start = (tl.maximum(0, kb * BLOCK_N - t * T) // BLOCK_M) * BLOCK_M
        for r0 in range(r_start, T, BLOCK_M):
            rows = t * T + r0 + tl.arange(0, BLOCK_M)
            r_ok = rows < row_hi
            qt = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
                         mask=r_ok[:, None] & (offs_d < D)[None, :], other=0.0)      # [BM, BD]
            dot_ = tl.load(o_base + rows[:, None].to(tl.int64) * stride_on + offs_dv[None, :] * stride_od,
                           mask=r_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)  # [BM, BDV]
            srow = bh * Nq + rows.to(tl.int64)
            m_row = tl.load(stats_ptr + srow * 2, mask=r_ok, other=0.0)
            inv_l = tl.load(stats_ptr + srow * 2 + 1, mask=r_ok, other=0.0)
            delta = tl.load(delta_ptr + srow, mask=r_ok, other=0.0)
            st = tdot(kblk, tl.trans(qt), PREC) * scale                       # [BN, BM] = S^T
            ok = member[:, None] & r_ok[None, :]
            if IS_CAUSAL:
                ok = ok & (keys[:, None] <= rows[None, :])
            if HAS_MASK:
                bias = tl.load(bias_base + rows[None, :].to(tl.int64) * stride_mi
                               + keys[:, None].to(tl.int64) * stride_mj, mask=ok, other=float("-inf"))
                ok = ok & (bias > float("-inf")) & (bias < float("inf"))
                st = st + bias
            pt = tl.where(ok, tl.exp(st - m_row[None, :]) * inv_l[None, :], 0.0)   # P^T
            dpt = tdot(vblk, tl.trans(dot_), PREC)                              # [BN, BM] = dP^T
            pz = pt
            if DROPOUT:
                off = (bh * Nq + rows[None, :].to(tl.int64)) * L + slot[:, None]
                z = tl.where(tl.rand(seed, off) >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)
                dpt = dpt * z
                pz = pt * z
            dst = pt * (dpt - delta[None, :])
            dv += tdot(pz.to(dot_.dtype), dot_, PREC)
            dk += tdot(dst.to(qt.dtype), qt, PREC)
    g_row = bhk * Nk + keys.to(tl.int64)
    tl.store(dk_ptr + g_row[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=k_ok[:, None] & (offs_d < D)[None, :])
    tl.store(dv_ptr + g_row[:, None] * DV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=k_ok[:, None] & (offs_dv < DV)[None, :])


# dq: Q, dO, the dq accumulator, gathered K^T / V and S, dP, dS live; dkv: K, V blocks, dk / dv accumulators,
# Q, dO and the [BN, BM] S^T, dP^T. Head-dim limits per config (half, fp32).
_C = autotune.KernelConfig.make
# 4 warps spilled on sm_80/sm_90 at 32x32 (bf16, D=128; fp32, D=64) and at 16x16 (fp32, D=128); the dkv
# kernel's 32x32 on 8 warps still spilled 24 B at fp32, D=64 (sm_90), so fp32 takes it only up to D=32.
DQ = Limits([
    (_C(num_warps=8, num_stages=2, BLOCK_M=32, BLOCK_N=32), 128, 64),
    (_C(num_warps=8, num_stages=2, BLOCK_M=16, BLOCK_N=16), 128, 128),
])
DKV = Limits([
    (_C(num_warps=8, num_stages=2, BLOCK_M=32, BLOCK_N=32), 128, 32),
    (_C(num_warps=8, num_stages=2, BLOCK_M=16, BLOCK_N=16), 128, 128),
])


def _site_key(rows: str):
    """site_key hook (inspection report) of the kernel whose launch walks `rows`: "q" (B*H*Nq) or "kv"
    (B*Hkv*Nk); the backward of a traced forward site has its q, k, v."""
    def key(op: str, a: dict) -> tuple | None:
        s = tiled_site_shapes(op, a)
        if s is None:
            return None
        n = s["b"] * s["h"] * s["nq"] if rows == "q" else s["b"] * s["hkv"] * s["nk"]
        return tile_key(block_d(s["d"]), block_d(s["dv"]), dtype_name(s["dtype"]), s["tile"], n)
    return key


autotune.register_candidates(KERNEL_DQ, DQ.configs, fits=DQ.fits, site_key=_site_key("q"))
# the dS kernel holds the dq kernel's live tiles minus its [BM, BD] accumulator: the dq configs and limits serve it.
# No site key: it runs only when the mask requires grad, which a traced site's arguments do not record.
autotune.register_candidates(KERNEL_DS, DQ.configs, fits=DQ.fits)
autotune.register_candidates(KERNEL_DKV, DKV.configs, fits=DKV.fits, site_key=_site_key("kv"))


def _sig_common() -> dict:
    sig = {n: "i32" for n in ("H", "Hkv", "Nq", "Nk", "T", "NT", "L", "D", "DV")}
    sig.update({"scale": "fp32", "dropout_p": "fp32"})
    for t, axes in (("q", "bhnd"), ("k", "bhnd"), ("v", "bhnd"), ("o", "bhnd"), ("m", "bhij")):
        sig.update({f"stride_{t}{a}": "i64" for a in axes})
    sig.update({n: "constexpr" for n in ("HAS_MASK", "IS_CAUSAL", "DROPOUT", "PREC",
                                         "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV")})
    return sig


def _sig_dq(dt: str) -> dict:
    return {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "idx_ptr": "*i32", "lens_ptr": "*i32",
            "bias_ptr": "*fp32", "seed_ptr": "*i64", "dout_ptr": f"*{dt}", "stats_ptr": "*fp32",
            "delta_ptr": "*fp32", "dq_ptr": f"*{dt}", **_sig_common()}


def _sig_ds(dt: str) -> dict:
    return {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "idx_ptr": "*i32", "lens_ptr": "*i32",
            "bias_ptr": "*fp32", "seed_ptr": "*i64", "dout_ptr": f"*{dt}", "stats_ptr": "*fp32",
            "delta_ptr": "*fp32", "ds_ptr": "*fp32", **_sig_common()}


def _sig_dkv(dt: str) -> dict:
    return {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "idx_ptr": "*i32", "bias_ptr": "*fp32",
            "seed_ptr": "*i64", "dout_ptr": f"*{dt}", "stats_ptr": "*fp32", "delta_ptr": "*fp32",
            "visit_ptr": "*i64", "vslot_ptr": "*i32", "voff_ptr": "*i64", "dk_ptr": f"*{dt}", "dv_ptr": f"*{dt}",
            **_sig_common()}


aot.register_aot(aot.AotSpec(KERNEL_DQ, _dq_kernel, _sig_dq, aot_constexprs(DQ)))
aot.register_aot(aot.AotSpec(KERNEL_DS, _ds_kernel, _sig_ds, aot_constexprs(DQ)))
aot.register_aot(aot.AotSpec(KERNEL_DKV, _dkv_kernel, _sig_dkv, aot_constexprs(DKV)))


def transposed_tiles(idx: torch.Tensor, H: int, Hkv: int, Nk: int, block_n: int):
    """The key -> tiles index of idx [B, H, nT, L]: (visit [V] int64 = hg * nT + t, vslot [V] int32 = the first
    slot of the visited list holding a key of the block, voff [B*Hkv*nKB + 1] int64), grouped by program
    g = (b*Hkv + hk) * nKB + kb, nKB = cdiv(Nk, block_n), visits of a program ordered by (hg, t). Sorted
    (torch.unique) and searchsorted: deterministic, no host sync beyond unique's output size."""
    B, _, nT, L = idx.shape
    G = H // Hkv
    n_kb = -(-Nk // block_n)
    flat = idx.reshape(-1).long()
    pos = torch.arange(flat.numel(), device=idx.device)
    valid = (flat >= 0) & (flat < Nk)
    flat, pos = flat[valid], pos[valid]
    slot = pos % L
    t = (pos // L) % nT
    bh = pos // (L * nT)
    b, h = bh // H, bh % H
    prog = (b * Hkv + h // G) * n_kb + flat // block_n
    vid = (prog * G + h % G) * nT + t                                   # sorts by (program, hg, t)
    uniq, inverse = torch.unique(vid, sorted=True, return_inverse=True)
    vslot = torch.full((uniq.numel(),), L, dtype=torch.long, device=idx.device)
    vslot.scatter_reduce_(0, inverse, slot, "amin")
    voff = torch.searchsorted(uniq // (G * nT), torch.arange(B * Hkv * n_kb + 1, device=idx.device))
    return (uniq % (G * nT)).contiguous(), vslot.to(torch.int32).contiguous(), voff.contiguous()


def tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, is_causal, scale, tile, dropout_p, seed,
                             mask_grad=False):
    """(dq, dk, dv, dmask) in the dtypes of q, k, v (see the module doc): the reference stage's signature and
    return shape. dmask is None unless mask_grad (a floating mask that requires grad): then d out / d mask in
    mask.shape and mask.dtype, dS at the kept allowed keys (0 elsewhere) summed to the mask's broadcast shape,
    from the dS kernel (which replays the same dropout mask as the forward)."""
    if mask_grad and (mask is None or not mask.dtype.is_floating_point):
        raise ValueError("mask_grad needs a floating (additive) mask")
    nt = check_tiled_args(q, k, v, idx, tile, scale, dropout_p, seed)
    b, h, nq, d = q.shape
    hkv, nk, dv_ = k.shape[1], k.shape[2], v.shape[3]
    L = idx.shape[3]
    if tuple(dout.shape) != (b, h, nq, dv_) or tuple(out.shape) != (b, h, nq, dv_):
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must be [B, H, Nq, Dv] = "
                         f"{[b, h, nq, dv_]}")
    if tuple(lse.shape) != (b, h, nq):
        raise ValueError(f"lse must be [B, H, Nq] = {[b, h, nq]}, got {tuple(lse.shape)}")
    if b * h * nq == 0 or nk == 0:
        dmask = torch.zeros_like(mask) if mask_grad else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dmask
    bias, ms = mask_as_bias(mask, (b, h, nq, nk))
    idx = idx.to(torch.int32).contiguous()
    lens = list_lengths(idx)
    stats = torch.empty((b, h, nq, 2), dtype=torch.float32, device=q.device)
    delta = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    dropout = float(dropout_p) > 0
    seed_t = seed_tensor(seed, q.device) if dropout else lens
    bias_t = bias if bias is not None else delta
    BD, BDV = block_d(d), block_d(dv_)
    dt = dtype_name(q.dtype)
    flags = dict(HAS_MASK=bias is not None, IS_CAUSAL=bool(is_causal), DROPOUT=dropout, PREC=dot_precision(q.dtype),
                 BLOCK_D=BD, BLOCK_DV=BDV)
    common = (h, hkv, nq, nk, tile, nt, L, d, dv_, float(scale), float(dropout_p),
              *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *ms)
    dq = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)

    def run_dq(cfg):  # rewrites every row's dq, stats and delta: safe to time per candidate
        _dq_kernel[(nt * triton.cdiv(tile, cfg["BLOCK_M"]), b * h)](
            q, k, v, idx, lens, bias_t, seed_t, dout, stats, delta, dq, *common, **flags, **cfg.kwargs())
    run_dq(autotune.get_config(KERNEL_DQ, tile_key(BD, BDV, dt, tile, b * h * nq), bench=run_dq))
    dk = torch.empty((b, hkv, nk, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, hkv, nk, dv_), dtype=v.dtype, device=q.device)

    transposed = {}  # BLOCK_N -> the key -> tiles index, built once per block size, outside the timed launch

    def run_dkv(cfg):  # each key block rewrites its dk / dv rows (no atomics): safe to time per candidate
        bn = cfg["BLOCK_N"]
        visit, vslot, voff = transposed.get(bn) or transposed.setdefault(bn, transposed_tiles(idx, h, hkv, nk, bn))
        _dkv_kernel[(b * hkv * triton.cdiv(nk, cfg["BLOCK_N"]),)](
            q, k, v, idx, bias_t, seed_t, dout, stats, delta, visit, vslot, voff, dk, dv, *common,
            **flags, **cfg.kwargs())
    run_dkv(autotune.get_config(KERNEL_DKV, tile_key(BD, BDV, dt, tile, b * hkv * nk), bench=run_dkv))
    if not mask_grad:
        return dq, dk, dv, None
    ds = torch.zeros((b, h, nq, L), dtype=torch.float32, device=q.device)  # slots past a list stay 0

    def run_ds(cfg):  # rewrites every listed slot's dS: safe to time per candidate
        _ds_kernel[(nt * triton.cdiv(tile, cfg["BLOCK_M"]), b * h)](
            q, k, v, idx, lens, bias_t, seed_t, dout, stats, delta, ds, *common, **flags, **cfg.kwargs())
    run_ds(autotune.get_config(KERNEL_DS, tile_key(BD, BDV, dt, tile, b * h * nq), bench=run_ds))
    return dq, dk, dv, mask_gradient(ds, idx, mask, tile, nk)


def mask_gradient(ds, idx, mask, tile, nk):
    """dmask [mask.shape] mask.dtype from dS [B, H, Nq, L] in slot order: per chunk of tiles, dS goes onto its
    keys [B, H, rows, Nk] and is summed to the mask's broadcast shape, with the plain tile backward's own
    helpers (one reduction, one place). Transient O(chunk * T * Nk), bounded by the reference's chunking."""
    from spt_compile.lowering.reference.pq_attention import _add_mask_grad
    from spt_compile.lowering.reference.tiled_attention import _ds_on_keys, tile_chunk
    b, h, nq, L = ds.shape
    nt = idx.shape[2]
    dmask = torch.zeros(mask.shape, dtype=torch.float32, device=ds.device)
    step = tile_chunk(nt, b * h * tile * (nk + L))
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1 = t0 * tile, min(nq, t1 * tile)
        ds_c = torch.nn.functional.pad(ds[:, :, i0:i1], (0, 0, 0, (t1 - t0) * tile - (i1 - i0)))  # short last tile
        keys = _ds_on_keys(ds_c.reshape(b, h, t1 - t0, tile, L), idx[:, :, t0:t1], nk, i1 - i0)  # [B, H, rows, Nk]
        _add_mask_grad(dmask, keys, i0, i1)
    return dmask.to(mask.dtype)
