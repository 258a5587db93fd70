"""Sparse attention backward: dQ per query over its gathered keys; dK/dV without an N x N intermediate.

sparse_attention_backward(dout, q, k, v, out, lse, idx, mask, is_causal, scale, dropout_p, seed)
    -> (dq, dk, dv)

With P_ij = exp(s_ij - m_i) / l_i, Z_ij the replayed dropout mask (scaled by 1/(1-p)),
delta_i = sum_j P_ij dP_ij (= dout_i . out_i, but in fp32 over the kept keys):
    dP_ij = Z_ij * dout_i . v_j,   dS_ij = P_ij (dP_ij - delta_i)
    dq_i = scale * sum_j dS_ij k_j,   dk_j = scale * sum_i dS_ij q_i,   dv_j = sum_i P_ij Z_ij dout_i
(GQA: dk/dv of a kv head sum over the query heads of its group.)

The row normaliser (max m_i and sum l_i over the kept keys) is recomputed by the dQ kernel's online pass,
like the reference, never read back as exp(s - lse): in a row whose keys all carry a finite finfo.min-sized
bias (padding masks), lse = m + log(l) rounds to m (log l is below m's ulp), so exp(s - lse) would give every
key P = 1 instead of eager's uniform 1/l. The dQ kernel stores (m_i, 1/l_i) and delta_i for the dK/dV kernel;
`lse` is checked but not read. A row without kept keys has l = 0: P = 0, zero gradients.

Two ways to get dK/dV (DKV_MODE / the `dkv_mode` argument):
  "sorted" (default) - the transposed index: every valid (query, slot) pair is keyed by its global
     kv row (b, kv head, j), sorted with torch.sort, and searchsorted gives each key its pair range;
     one program per key gathers its queries and reduces dk_j, dv_j in registers. No atomics, so
     it is deterministic run to run, and a key chosen by many queries (attention sinks, the first
     keys under a causal mask - exactly the keys PQ top-L favours) costs one longer loop instead of
     thousands of serialised atomics on the same address. Cost: a sort of B*H*Nq*L int64 keys and
     recomputing s_ij a second time.
  "atomic" - the dQ kernel also scatters scale*dS_ij*q_i and P_ij Z_ij dout_i into fp32 dK/dV
     buffers with tl.atomic_add (then cast): no sort, one pass, but non-deterministic summation order
     and contention on hot keys, plus fp32 buffers of the kv size.
The interpreter says nothing about speed; `bench_dkv_modes()` times both on a CUDA device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spt_compile.kernels import aot, autotune
from spt_compile.kernels._triton_utils import block_d, dtype_name, mask_as_bias
from spt_compile.kernels.attention_fwd import (_gather_scores, aot_block_d, check_attention_args,
                                               per_thread, seed_tensor, site_shapes, tile_d)

KERNEL_DQ = "attention_bwd_dq"
KERNEL_DKV = "attention_bwd_dkv"
DKV_MODES = ("sorted", "atomic")
DKV_MODE = "sorted"


@triton.jit
def _row_stats(q, k_base, v_base, bias_row, idx_row, i, Nk, L, scale, do, seed, row, dropout_p,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mj, offs_l, offs_d, offs_dv, D, DV,
               HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_L: tl.constexpr):
    """(m, 1/l, delta) of query row i over its kept keys, by an online pass (the atomic mode's first pass)."""
    m_i = float("-inf")
    l_i = 0.0
    c_i = 0.0                                    # sum_j e_j dP_j, rescaled with l_i
    for l0 in range(0, L, BLOCK_L):
        j, ok, jj, kt, s = _gather_scores(q, k_base, bias_row, idx_row, l0, i, Nk, L, scale,
                                          stride_kn, stride_kd, stride_mj, offs_l, offs_d, D,
                                          HAS_MASK, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        e = tl.exp(s - m_safe)                                              # [BL], 0 where not ok
        vt = tl.load(v_base + jj[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                     mask=ok[:, None] & (offs_dv < DV)[None, :], other=0.0).to(tl.float32)
        dp = tl.sum(do[None, :] * vt, axis=1)
        if DROPOUT:
            r = tl.rand(seed, row * L + l0 + offs_l)
            dp = tl.where(r >= dropout_p, dp / (1.0 - dropout_p), 0.0)
        l_i = l_i * alpha + tl.sum(e, axis=0)
        c_i = c_i * alpha + tl.sum(e * dp, axis=0)
        m_i = m_new
    inv_l = tl.where(l_i == 0.0, 0.0, 1.0 / tl.where(l_i == 0.0, 1.0, l_i))
    return tl.where(m_i == float("-inf"), 0.0, m_i), inv_l, c_i * inv_l


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, bias_ptr, seed_ptr, dout_ptr, stats_ptr, delta_ptr,
    dq_ptr, dk_acc_ptr, dv_acc_ptr,
    H, Hkv, Nq, Nk, L, D, DV, scale, dropout_p,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid: (B * H * Nq,) one query row per program, like the forward
    row = tl.program_id(0).to(tl.int64)          # = (b*H + h)*Nq + i
    i = row % Nq
    bh = row // Nq
    h = bh % H
    b = bh // H
    hk = h // (H // Hkv)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + i * stride_qn + offs_d * stride_qd,
                mask=d_ok, other=0.0).to(tl.float32)                         # [BD]
    do = tl.load(dout_ptr + b * stride_ob + h * stride_oh + i * stride_on + offs_dv * stride_od,
                 mask=dv_ok, other=0.0).to(tl.float32)                       # [BDV]
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    bias_row = bias_ptr + b * stride_mb + h * stride_mh + i * stride_mi
    idx_row = idx_ptr + row * L
    kv_row0 = (b * Hkv + hk) * Nk                # row of key 0 in the contiguous fp32 dk/dv buffers
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)

    if ATOMIC:
        # dK/dV atomics need the final P_ij and delta_i per slot, so the row statistics come first (own pass)
        m_fin, inv_fin, delta_fin = _row_stats(q, k_base, v_base, bias_row, idx_row, i, Nk, L, scale, do, seed,
                                               row, dropout_p, stride_kn, stride_kd, stride_vn, stride_vd,
                                               stride_mj, offs_l, offs_d, offs_dv, D, DV,
                                               HAS_MASK, IS_CAUSAL, DROPOUT, BLOCK_L)
    # one online pass (rescaled like the forward): with e_j = exp(s_j - m), l = sum_j e_j, P_j = e_j / l,
    #   dq_i = scale * (sum_j e dP k_j - delta_i * sum_j e k_j) / l,   delta_i = sum_j e dP / l
    m_i = float("-inf")
    l_i = 0.0
    edpk = tl.zeros([BLOCK_D], tl.float32)
    ek = tl.zeros([BLOCK_D], tl.float32)
    edp = 0.0
    for l0 in range(0, L, BLOCK_L):
        j, ok, jj, kt, s = _gather_scores(q, k_base, bias_row, idx_row, l0, i, Nk, L, scale,
                                          stride_kn, stride_kd, stride_mj, offs_l, offs_d, D,
                                          HAS_MASK, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all -inf so far: keep exp() finite
        alpha = tl.exp(m_i - m_safe)
        e = tl.exp(s - m_safe)                                              # [BL], 0 where not ok
        vt = tl.load(v_base + jj[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                     mask=ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # [BL, BDV]
        dp = tl.sum(do[None, :] * vt, axis=1)                               # [BL]
        zs = 1.0
        if DROPOUT:
            r = tl.rand(seed, row * L + l0 + offs_l)
            zs = tl.where(r >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)
            dp = dp * zs
        l_i = l_i * alpha + tl.sum(e, axis=0)
        edpk = edpk * alpha + tl.sum((e * dp)[:, None] * kt, axis=0)
        ek = ek * alpha + tl.sum(e[:, None] * kt, axis=0)
        edp = edp * alpha + tl.sum(e * dp, axis=0)
        m_i = m_new
        if ATOMIC:
            p = tl.where(ok, tl.exp(s - m_fin) * inv_fin, 0.0)
            ds = p * (dp - delta_fin)                                       # [BL]
            rows = kv_row0 + jj
            tl.atomic_add(dk_acc_ptr + rows[:, None] * D + offs_d[None, :],
                          (scale * ds)[:, None] * q[None, :], mask=ok[:, None] & d_ok[None, :])
            tl.atomic_add(dv_acc_ptr + rows[:, None] * DV + offs_dv[None, :],
                          (p * zs)[:, None] * do[None, :], mask=ok[:, None] & dv_ok[None, :])
    # a row without kept keys has l = 0: every P is 0, so are its dq and its share of dk/dv
    inv_l = tl.where(l_i == 0.0, 0.0, 1.0 / tl.where(l_i == 0.0, 1.0, l_i))
    delta = edp * inv_l
    dq = (edpk - delta * ek) * inv_l
    # the dK/dV kernel's normaliser: P_ij = exp(s_ij - m_i) / l_i (never exp(s - lse), see the module doc)
    # stats [B*H*Nq, 2] = (m_i, 1/l_i) interleaved: the dK/dV kernel gathers both with one 8-byte load
    tl.store(stats_ptr + row * 2, tl.where(m_i == float("-inf"), 0.0, m_i))
    tl.store(stats_ptr + row * 2 + 1, inv_l)
    tl.store(delta_ptr + row, delta)
    tl.store(dq_ptr + row * D + offs_d, (dq * scale).to(dq_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, seed_ptr, dout_ptr, stats_ptr, delta_ptr,
    pairs_ptr, offsets_ptr, dk_ptr, dv_ptr,
    H, Hkv, Nq, Nk, L, D, DV, scale, dropout_p,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid: (B * Hkv * Nk,) one key row per program; its (query, slot) pairs are
    # pairs[offsets[g]:offsets[g+1]], each the flat position ((b*H + h)*Nq + i)*L + slot in idx.
    g = tl.program_id(0).to(tl.int64)            # = (b*Hkv + hk)*Nk + j
    j = g % Nk
    bhk = g // Nk
    hk = bhk % Hkv
    b = bhk // Hkv
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    kj = tl.load(k_ptr + b * stride_kb + hk * stride_kh + j * stride_kn + offs_d * stride_kd,
                 mask=d_ok, other=0.0).to(tl.float32)                        # [BD]
    vj = tl.load(v_ptr + b * stride_vb + hk * stride_vh + j * stride_vn + offs_dv * stride_vd,
                 mask=dv_ok, other=0.0).to(tl.float32)                       # [BDV]
    start = tl.load(offsets_ptr + g)
    end = tl.load(offsets_ptr + g + 1)
    if DROPOUT:
        seed = tl.load(seed_ptr)

    dk = tl.zeros([BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_DV], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        pm = (p0 + offs_p) < end
        pair = tl.load(pairs_ptr + p0 + offs_p, mask=pm, other=0)           # [BP] int64
        row = pair // L                                                     # (b*H + h)*Nq + i
        i = row % Nq
        h = (row // Nq) % H
        ok = pm
        if IS_CAUSAL:
            ok = ok & (j <= i)
        q_off = b * stride_qb + h * stride_qh + i * stride_qn
        qt = tl.load(q_ptr + q_off[:, None] + offs_d[None, :] * stride_qd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)   # [BP, BD]
        o_off = b * stride_ob + h * stride_oh + i * stride_on
        dot = tl.load(dout_ptr + o_off[:, None] + offs_dv[None, :] * stride_od,
                      mask=ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)  # [BP, BDV]
        s = tl.sum(qt * kj[None, :], axis=1) * scale                        # [BP]
        if HAS_MASK:
            bias = tl.load(bias_ptr + b * stride_mb + h * stride_mh + i * stride_mi + j * stride_mj,
                           mask=ok, other=float("-inf"))
            ok = ok & (bias > float("-inf")) & (bias < float("inf"))
            s = s + bias
        stats = tl.load(stats_ptr + row[:, None] * 2 + tl.arange(0, 2)[None, :], mask=ok[:, None],
                        other=0.0)                                          # [BP, 2] = (m_i, 1/l_i)
        m_row, inv_l = tl.split(stats)
        delta = tl.load(delta_ptr + row, mask=ok, other=0.0)
        p = tl.where(ok, tl.exp(s - m_row) * inv_l, 0.0)                    # [BP]
        dp = tl.sum(dot * vj[None, :], axis=1)
        pz = p
        if DROPOUT:
            r = tl.rand(seed, pair)
            zs = tl.where(r >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)
            dp = dp * zs
            pz = p * zs
        ds = p * (dp - delta)
        dk += tl.sum(ds[:, None] * qt, axis=0)
        dv += tl.sum(pz[:, None] * dot, axis=0)
    tl.store(dk_ptr + g * D + offs_d, (dk * scale).to(dk_ptr.dtype.element_ty), mask=d_ok)
    tl.store(dv_ptr + g * DV + offs_dv, dv.to(dv_ptr.dtype.element_ty), mask=dv_ok)


# fp32 values per thread per gathered tile, per kernel. Below the forward's 32: the dK/dV kernel keeps
# two gathered tiles plus two [BD] accumulators live (spilled at 32 on sm_80/sm_90); the dQ kernel
# also carries three accumulators and the atomic operands (8 B of stack at 16 on sm_80).
BUDGET_DQ = 8
BUDGET_DKV = 16


def dq_key(d: int, dv: int, dtype: torch.dtype, mode: str, rows: int, L: int) -> tuple:
    """(D, DV, dtype, dK/dV mode, bucket(B*H*Nq query rows), bucket(L)): the atomic mode's dQ kernel is another
    compiled variant with twice the passes, so it tunes apart."""
    return (int(d), int(dv), dtype_name(dtype), mode, autotune.bucket(rows), autotune.bucket(L))


def dkv_key(d: int, dv: int, dtype: torch.dtype, kv_rows: int, slots: int) -> tuple:
    """(D, DV, dtype, bucket(B*Hkv*Nk key rows), bucket(B*H*Nq*L (query, slot) pairs the key rows share))."""
    return (int(d), int(dv), dtype_name(dtype), autotune.bucket(kv_rows), autotune.bucket(slots))


def _fits(cfg: autotune.KernelConfig, key: tuple, block: str, budget: int) -> bool:
    return per_thread(cfg, block, tile_d(key)) <= budget


def _site_key_dq(op: str, a: dict) -> tuple | None:
    s = site_shapes(op, a)  # the backward of a traced forward site (same q, k, v and idx)
    return None if s is None else dq_key(s["d"], s["dv"], s["dtype"], DKV_MODE, s["b"] * s["h"] * s["nq"], s["L"])


def _site_key_dkv(op: str, a: dict) -> tuple | None:
    s = site_shapes(op, a)
    if s is None or DKV_MODE != "sorted":  # the atomic mode has no dK/dV kernel
        return None
    return dkv_key(s["d"], s["dv"], s["dtype"], s["b"] * s["hkv"] * s["nk"], s["b"] * s["h"] * s["nq"] * s["L"])


autotune.register_candidates(KERNEL_DQ, [
    autotune.KernelConfig.make(num_warps=4, num_stages=2, BLOCK_L=8),
    autotune.KernelConfig.make(num_warps=8, num_stages=2, BLOCK_L=16),
    autotune.KernelConfig.make(num_warps=2, num_stages=2, BLOCK_L=4),
], fits=lambda cfg, key: _fits(cfg, key, "BLOCK_L", BUDGET_DQ), site_key=_site_key_dq)
autotune.register_candidates(KERNEL_DKV, [
    autotune.KernelConfig.make(num_warps=4, num_stages=2, BLOCK_P=16),
    autotune.KernelConfig.make(num_warps=8, num_stages=2, BLOCK_P=32),
    autotune.KernelConfig.make(num_warps=2, num_stages=2, BLOCK_P=8),
], fits=lambda cfg, key: _fits(cfg, key, "BLOCK_P", BUDGET_DKV), site_key=_site_key_dkv)


def _sig_common(dt: str) -> dict:
    sig = {n: "i32" for n in ("H", "Hkv", "Nq", "Nk", "L", "D", "DV")}
    sig.update({"scale": "fp32", "dropout_p": "fp32"})
    for t, axes in (("q", "bhnd"), ("k", "bhnd"), ("v", "bhnd"), ("o", "bhnd"), ("m", "bhij")):
        sig.update({f"stride_{t}{a}": "i64" for a in axes})
    return sig


def _aot_sig_dq(dt: str) -> dict:
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "idx_ptr": "*i32",
           "bias_ptr": "*fp32", "seed_ptr": "*i64", "dout_ptr": f"*{dt}", "stats_ptr": "*fp32",
           "delta_ptr": "*fp32", "dq_ptr": f"*{dt}", "dk_acc_ptr": "*fp32",
           "dv_acc_ptr": "*fp32"}
    sig.update(_sig_common(dt))
    sig.update({n: "constexpr" for n in ("HAS_MASK", "IS_CAUSAL", "DROPOUT", "ATOMIC",
                                         "BLOCK_L", "BLOCK_D", "BLOCK_DV")})
    return sig


def _aot_sig_dkv(dt: str) -> dict:
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "bias_ptr": "*fp32",
           "seed_ptr": "*i64", "dout_ptr": f"*{dt}", "stats_ptr": "*fp32", "delta_ptr": "*fp32", "pairs_ptr": "*i64", "offsets_ptr": "*i64", "dk_ptr": f"*{dt}",
           "dv_ptr": f"*{dt}"}
    sig.update(_sig_common(dt))
    sig.update({n: "constexpr" for n in ("HAS_MASK", "IS_CAUSAL", "DROPOUT",
                                         "BLOCK_P", "BLOCK_D", "BLOCK_DV")})
    return sig


def _aot_cx_dq(cfg: autotune.KernelConfig, dt: str) -> dict:
    bd = aot_block_d(cfg, "BLOCK_L", BUDGET_DQ)
    return {"HAS_MASK": True, "IS_CAUSAL": True, "DROPOUT": True, "ATOMIC": True,
            "BLOCK_L": cfg["BLOCK_L"], "BLOCK_D": bd, "BLOCK_DV": bd}


def _aot_cx_dkv(cfg: autotune.KernelConfig, dt: str) -> dict:
    bd = aot_block_d(cfg, "BLOCK_P", BUDGET_DKV)
    return {"HAS_MASK": True, "IS_CAUSAL": True, "DROPOUT": True,
            "BLOCK_P": cfg["BLOCK_P"], "BLOCK_D": bd, "BLOCK_DV": bd}


aot.register_aot(aot.AotSpec(KERNEL_DQ, _bwd_dq_kernel, _aot_sig_dq, _aot_cx_dq))
aot.register_aot(aot.AotSpec(KERNEL_DKV, _bwd_dkv_kernel, _aot_sig_dkv, _aot_cx_dkv))


def transposed_index(idx: torch.Tensor, H: int, Hkv: int, Nk: int):
    """(pairs, offsets): the valid flat slots of idx [B, H, Nq, L] grouped by global kv row
    g = (b*Hkv + h // (H//Hkv))*Nk + j; key g owns pairs[offsets[g]:offsets[g+1]] (int64).
    Invalid slots (-1) get the sentinel key B*Hkv*Nk and sort past the last offset - no host sync."""
    B, _, Nq, L = idx.shape
    n_keys = B * Hkv * Nk
    flat = idx.reshape(-1).long()                                           # [B*H*Nq*L]
    pos = torch.arange(flat.numel(), device=idx.device)
    bh = pos // (Nq * L)
    kv = (bh // H) * Hkv + (bh % H) // (H // Hkv)                           # b*Hkv + hk
    valid = (flat >= 0) & (flat < Nk)
    gkey = torch.where(valid, kv * Nk + flat, n_keys)
    sorted_keys, order = torch.sort(gkey, stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(n_keys + 1, device=idx.device))
    return order, offsets                                                   # order == pair positions


def sparse_attention_backward(dout, q, k, v, out, lse, idx, mask, is_causal, scale, dropout_p, seed,
                              dkv_mode: str | None = None):
    """(dq, dk, dv) in the dtypes of q, k, v (see module doc; dkv_mode in DKV_MODES)."""
    check_attention_args(q, k, v, idx, scale, dropout_p, seed)
    mode = DKV_MODE if dkv_mode is None else dkv_mode
    if mode not in DKV_MODES:
        raise ValueError(f"dkv_mode must be one of {DKV_MODES}, got {dkv_mode!r}")
    B, H, Nq, D = q.shape
    Hkv, Nk, DV = k.shape[1], k.shape[2], v.shape[3]
    L = idx.shape[3]
    if dout.shape != (B, H, Nq, DV) or out.shape != (B, H, Nq, DV):
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must be "
                         f"[B, H, Nq, Dv] = {[B, H, Nq, DV]}")
    if lse.shape != (B, H, Nq):
        raise ValueError(f"lse must be [B, H, Nq] = {[B, H, Nq]}, got {tuple(lse.shape)}")
    dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    if B * H * Nq == 0 or Nk == 0:
        return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v)
    bias, ms = mask_as_bias(mask, (B, H, Nq, Nk))
    idx = idx.to(torch.int32).contiguous()
    # delta_i = sum_j P_ij dP_ij, written by the dQ kernel: computed in fp32 from the kept keys it
    # equals dout_i . out_i without the rounding of out to q.dtype (which, for bf16, made dq/dk several
    # times less accurate than torch's own bf16 autograd). m_i and 1/l_i: the row normaliser (module doc).
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    stats = torch.empty((B, H, Nq, 2), dtype=torch.float32, device=q.device)
    dropout = float(dropout_p) > 0
    seed_t = seed_tensor(seed, q.device) if dropout else delta
    bias_t = bias if bias is not None else delta
    BD, BDV = block_d(D), block_d(DV)
    flags = dict(HAS_MASK=bias is not None, IS_CAUSAL=bool(is_causal), DROPOUT=dropout,
                 BLOCK_D=BD, BLOCK_DV=BDV)
    common = (H, Hkv, Nq, Nk, L, D, DV, float(scale), float(dropout_p),
              *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *ms)
    atomic = mode == "atomic"
    if atomic:
        dk_acc = torch.empty((B, Hkv, Nk, D), dtype=torch.float32, device=q.device)
        dv_acc = torch.empty((B, Hkv, Nk, DV), dtype=torch.float32, device=q.device)
    else:
        dk_acc = dv_acc = delta  # unused

    def run_dq(cfg):  # one launch; the autotuner times it per candidate (dq, stats, delta are overwritten)
        if atomic:  # the atomics accumulate: every run, timed or final, starts from zero
            dk_acc.zero_()
            dv_acc.zero_()
        _bwd_dq_kernel[(B * H * Nq,)](
            q, k, v, idx, bias_t, seed_t, dout, stats, delta, dq, dk_acc, dv_acc, *common,
            ATOMIC=atomic, **flags, **cfg.kwargs())
    run_dq(autotune.get_config(KERNEL_DQ, dq_key(D, DV, q.dtype, mode, B * H * Nq, L), bench=run_dq))
    if atomic:
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)

    pairs, offsets = transposed_index(idx, H, Hkv, Nk)
    dk = torch.empty((B, Hkv, Nk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Nk, DV), dtype=v.dtype, device=q.device)

    def run_dkv(cfg):  # one launch; every key row rewrites its dk, dv (stats, delta are only read)
        _bwd_dkv_kernel[(B * Hkv * Nk,)](
            q, k, v, bias_t, seed_t, dout, stats, delta, pairs, offsets, dk, dv, *common,
            **flags, **cfg.kwargs())
    run_dkv(autotune.get_config(KERNEL_DKV, dkv_key(D, DV, q.dtype, B * Hkv * Nk, B * H * Nq * L), bench=run_dkv))
    return dq, dk, dv


def bench_dkv_modes(B=4, H=16, Hkv=16, N=4096, D=64, density=0.1, dtype=torch.bfloat16, reps=20):
    """Bench hook (CUDA only): ms per backward call for each dK/dV mode on a random causal problem."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_dkv_modes needs a CUDA device")
    from spt_compile.kernels.attention_fwd import sparse_attention_forward
    dev = "cuda"
    q = torch.randn(B, H, N, D, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype)
    L = max(1, int(density * N))
    i = torch.arange(N, device=dev)[:, None]
    idx = (torch.rand(B, H, N, L, device=dev) * (i + 1)).long().clamp_max(i).int()  # causal keys
    out, lse = sparse_attention_forward(q, k, v, idx, None, True, D ** -0.5, 0.0, None)
    dout = torch.randn_like(out)
    res = {}
    for mode in DKV_MODES:
        fn = lambda: sparse_attention_backward(dout, q, k, v, out, lse, idx, None, True, D ** -0.5,
                                               0.0, None, dkv_mode=mode)
        res[mode] = triton.testing.do_bench(fn, rep=reps * 10)
    return res
