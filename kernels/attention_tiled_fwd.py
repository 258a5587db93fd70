"""Query-tile sparse attention forward: FlashAttention-2-style tl.dot tiles over each tile's gathered key list.

tiled_attention_forward(q, k, v, idx, mask, is_causal, scale, tile, dropout_p, seed) -> (out, lse)
has the signature and semantics of lowering/reference/tiled_attention.tiled_attention_forward (step 4):
each query attends exactly (softmax of scale * q.k + bias) over its tile's kept keys that it may attend to.

One program = BLOCK_M consecutive queries of ONE tile (grid: nT * cdiv(T, BLOCK_M) x B*H). It walks the tile's
list in BLOCK_N slots: gathers the K rows (as a [BLOCK_D, BLOCK_N] operand) and V rows ([BLOCK_N, BLOCK_DV]) once
for all BLOCK_M queries, S = tl.dot(Q, K^T), online softmax in fp32, acc += tl.dot(P, V). The loop stops at
the tile's list length (lengths [B, H, nT] from the launcher), so short lists cost only their keys.
Masked per (query, slot): empty slot (-1), row past the tile / Nq, causal j > i, mask bias not finite.
GQA: head h reads kv head h // (H // Hkv). Fully masked rows (no kept allowed key): out = 0, lse = -inf; a row
whose kept keys all carry a finite finfo.min bias attends uniformly over them, as eager does.
Dropout: keep iff tl.rand(seed, ((b*H + h)*Nq + i)*L + slot) >= p (the flat position of (query i, slot) in a
[B, H, Nq, L] grid, as the per-query kernels), applied to P after the row sum, replayed by the backward.
The reference draws its own mask (torch generator): the two agree in distribution, not bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spt_compile.kernels import aot, autotune
from spt_compile.kernels._tiled_common import (MAX_HEAD_DIM, Limits, check_tile_args, dot_precision, list_lengths,
                                               tdot, tile_key, tiled_site_shapes)
from spt_compile.kernels._triton_utils import block_d, dtype_name, mask_as_bias
from spt_compile.kernels.attention_fwd import check_attention_args, seed_tensor

KERNEL = "attention_tiled_fwd"


@triton.jit
def tile_logits(q, k_base, bias_base, idx_row, lens_t, l0, rows, row_hi, Nk, scale,
                stride_kn, stride_kd, stride_mi, stride_mj, offs_d, D,
                HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """For slots l0 + arange(BLOCK_N) of the tile: (s [BM, BN] fp32, -inf where the query may not attend;
    ok [BM, BN]; key ids jj [BN] int64 (0 on empty slots); slot valid [BN]; the gathered K^T [BD, BN])."""
    slots = l0 + tl.arange(0, BLOCK_N)
    j = tl.load(idx_row + slots, mask=slots < lens_t, other=-1)             # [BN] int32
    j_ok = (j >= 0) & (j < Nk)
    jj = tl.where(j_ok, j, 0).to(tl.int64)
    kt = tl.load(k_base + jj[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=j_ok[None, :] & (offs_d < D)[:, None], other=0.0)    # [BD, BN]
    s = tdot(q, kt, PREC) * scale                                           # [BM, BN]
    ok = (rows < row_hi)[:, None] & j_ok[None, :]
    if IS_CAUSAL:
        ok = ok & (jj[None, :] <= rows[:, None])
    if HAS_MASK:
        bias = tl.load(bias_base + rows[:, None].to(tl.int64) * stride_mi + jj[None, :] * stride_mj,
                       mask=ok, other=float("-inf"))
        ok = ok & (bias > float("-inf")) & (bias < float("inf"))
        s = s + bias
    return tl.where(ok, s, float("-inf")), ok, jj, j_ok, kt


@triton.jit
def tile_program(H, Hkv, Nq, T, BLOCK_M: tl.constexpr):
    """Which rows a program of the (NT * cdiv(T, BLOCK_M), B * H) grid owns (fwd and dq share the grid):
    (tile t, bh, b, h, kv head hk, rows [BM], the tile's row end row_hi, rows valid [BM])."""
    rb_per_tile = tl.cdiv(T, BLOCK_M)
    t = tl.program_id(0) // rb_per_tile
    r0 = (tl.program_id(0) % rb_per_tile) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = t * T + r0 + tl.arange(0, BLOCK_M)
    row_hi = tl.minimum(t * T + T, Nq)
    return t, bh, b, h, h // (H // Hkv), rows, row_hi, rows < row_hi


@triton.jit
def load_rows(ptr, rows, r_ok, offs, n, stride_n, stride_d):
    """[BM, len(offs)] rows of one (b, h) slice at ptr, 0 past the tile or past n columns."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_n + offs[None, :] * stride_d,
                   mask=r_ok[:, None] & (offs < n)[None, :], other=0.0)


@triton.jit
def dropout_scale(seed, bh, rows, slots, Nq, L, dropout_p):
    """[BM, BN] keep / (1 - p) of (query rows, slots): the shared offset convention of fwd and bwd."""
    off = ((bh * Nq + rows[:, None].to(tl.int64)) * L + slots[None, :])
    r = tl.rand(seed, off)
    return tl.where(r >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, lens_ptr, bias_ptr, seed_ptr, out_ptr, lse_ptr,
    H, Hkv, Nq, Nk, T, NT, L, D, DV, scale, dropout_p,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid: (NT * cdiv(T, BLOCK_M), B * H)
    t, bh, b, h, hk, rows, row_hi, r_ok = tile_program(H, Hkv, Nq, T, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(q_ptr + b * stride_qb + h * stride_qh, rows, r_ok, offs_d, D, stride_qn, stride_qd)  # [BM, BD]
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    bias_base = bias_ptr + b * stride_mb + h * stride_mh
    idx_row = idx_ptr + (bh * NT + t) * L
    lens_t = tl.load(lens_ptr + bh * NT + t)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for l0 in range(0, lens_t, BLOCK_N):
        s, ok, jj, j_ok, kt = tile_logits(q, k_base, bias_base, idx_row, lens_t, l0, rows, row_hi, Nk, scale,
                                          stride_kn, stride_kd, stride_mi, stride_mj, offs_d, D,
                                          HAS_MASK, IS_CAUSAL, PREC, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all -inf so far: keep exp() finite
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])                          # [BM, BN], 0 where not ok
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = p * dropout_scale(seed, bh, rows, l0 + tl.arange(0, BLOCK_N), Nq, L, dropout_p)
        vt = tl.load(v_base + jj[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                     mask=j_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)   # [BN, BDV]
        acc = acc * alpha[:, None] + tdot(p.to(vt.dtype), vt, PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]               # empty rows: acc = 0
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_row = bh * Nq + rows.to(tl.int64)
    tl.store(out_ptr + o_row[:, None] * DV + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & (offs_dv < DV)[None, :])
    tl.store(lse_ptr + o_row, lse, mask=r_ok)


# Live per program: Q [BM, BD], the gathered K^T [BD, BN] and V [BN, BDV], S/P [BM, BN] and the fp32 acc
# [BM, BDV]; gathered operands carry 64-bit addresses per element. Head-dim limits per config (half, fp32).
_C = autotune.KernelConfig.make
# With every feature compiled in (mask gather, causal, dropout's philox on [BM, BN]) 4 warps spilled on
# sm_80/sm_90 from 16x32 (bf16, D=128) up; 8 warps halve the per-thread share.
LIMITS = Limits([
    (_C(num_warps=8, num_stages=2, BLOCK_M=64, BLOCK_N=32), 64, 64),
    (_C(num_warps=8, num_stages=2, BLOCK_M=32, BLOCK_N=32), 128, 64),
    (_C(num_warps=8, num_stages=2, BLOCK_M=16, BLOCK_N=32), 128, 128),
])


def _site_key(op: str, a: dict) -> tuple | None:
    """The key this kernel launches with for a traced query-tile site (inspection report); exact mode too."""
    s = tiled_site_shapes(op, a)
    if s is None:
        return None
    return tile_key(block_d(s["d"]), block_d(s["dv"]), dtype_name(s["dtype"]), s["tile"], s["b"] * s["h"] * s["nq"])


autotune.register_candidates(KERNEL, LIMITS.configs, fits=LIMITS.fits, site_key=_site_key)


def _aot_signature(dt: str) -> dict:
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "idx_ptr": "*i32", "lens_ptr": "*i32",
           "bias_ptr": "*fp32", "seed_ptr": "*i64", "out_ptr": f"*{dt}", "lse_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("H", "Hkv", "Nq", "Nk", "T", "NT", "L", "D", "DV")})
    sig.update({"scale": "fp32", "dropout_p": "fp32"})
    for t, axes in (("q", "bhnd"), ("k", "bhnd"), ("v", "bhnd"), ("m", "bhij")):
        sig.update({f"stride_{t}{a}": "i64" for a in axes})
    sig.update({n: "constexpr" for n in ("HAS_MASK", "IS_CAUSAL", "DROPOUT", "PREC",
                                         "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV")})
    return sig


def aot_constexprs(limits: Limits):
    """Everything switched on, at the largest head dim the config serves for the dtype."""
    def cx(cfg: autotune.KernelConfig, dt: str) -> dict:
        bd = limits.max_d(cfg, dt)
        return {"HAS_MASK": True, "IS_CAUSAL": True, "DROPOUT": True, "PREC": "ieee" if dt == "fp32" else "tf32",
                "BLOCK_D": bd, "BLOCK_DV": bd, **dict(cfg.meta)}
    return cx


aot.register_aot(aot.AotSpec(KERNEL, _fwd_kernel, _aot_signature, aot_constexprs(LIMITS)))


def check_tiled_args(q, k, v, idx, tile, scale, dropout_p, seed) -> int:
    """The per-query kernels' checks (shapes, dtypes, dropout, seed) plus the tiled idx; returns nT."""
    nt = check_tile_args(q, idx, tile, scale)
    # the per-query check wants idx [B, H, Nq, L]: hand it a view of that shape (values are not read)
    fake = idx.new_empty(()).expand(q.shape[0], q.shape[1], q.shape[2], idx.shape[3])
    check_attention_args(q, k, v, fake, scale, dropout_p, seed)
    if v.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"v head dim {v.shape[3]} > {MAX_HEAD_DIM}: the tiled kernels serve head dims up to "
                         f"{MAX_HEAD_DIM}")
    return nt


def tiled_attention_forward(q, k, v, idx, mask, is_causal, scale, tile, dropout_p, seed):
    """(out [B, H, Nq, Dv] q.dtype contiguous, lse [B, H, Nq] fp32) over the tiled idx [B, H, nT, L]."""
    nt = check_tiled_args(q, k, v, idx, tile, scale, dropout_p, seed)
    b, h, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    L = idx.shape[3]
    out = torch.zeros((b, h, nq, dv), dtype=q.dtype, device=q.device)
    lse = torch.full((b, h, nq), float("-inf"), dtype=torch.float32, device=q.device)
    if b * h * nq == 0 or nk == 0:
        return out, lse
    bias, ms = mask_as_bias(mask, (b, h, nq, nk))
    idx = idx.to(torch.int32).contiguous()
    lens = list_lengths(idx)
    dropout = float(dropout_p) > 0
    seed_t = seed_tensor(seed, q.device) if dropout else lens
    BD, BDV = block_d(d), block_d(dv)

    def run(cfg):  # one launch; the autotuner times it per candidate (every row rewrites its out and lse)
        _fwd_kernel[(nt * triton.cdiv(tile, cfg["BLOCK_M"]), b * h)](
            q, k, v, idx, lens, bias if bias is not None else lse, seed_t, out, lse,
            h, hkv, nq, nk, tile, nt, L, d, dv, float(scale), float(dropout_p),
            *q.stride(), *k.stride(), *v.stride(), *ms,
            HAS_MASK=bias is not None, IS_CAUSAL=bool(is_causal), DROPOUT=dropout, PREC=dot_precision(q.dtype),
            BLOCK_D=BD, BLOCK_DV=BDV, **cfg.kwargs())
    run(autotune.get_config(KERNEL, tile_key(BD, BDV, dtype_name(q.dtype), tile, b * h * nq), bench=run))
    return out, lse
