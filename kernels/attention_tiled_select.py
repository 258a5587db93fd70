"""Query-tile key selection (issue 9): fused PQ lookup-table scoring, per-query normaliser, tile mass, top-L.

select_tiles(q, codebooks, codes, mask, is_causal, scale, tile, density, min_keys, L, stride=1)
-> idx [B, H, nT, L] int32 has the signature and semantics of lowering/reference/tiled_attention.select_tiles
(step 3 there): mass_t(j) = sum over the tile's scored queries i (every stride-th counted back from its last:
lowering.formulas.attention_scored_row, restated in the mass kernel) of softmax_j over i's allowed keys of
s~_ij = scale * q_i.k^_j + bias_ij,
each tile keeps its top L_tile keys by mass (ties: lower key first), listed ascending, then -1.

Three kernels, none writes an Nq x Nk array:
1. `_stats_kernel` (grid B*H x cdiv(Nq, BLOCK_M)): the per-query normaliser (m_i, 1/l_i) of s~ over the
   allowed keys, streamed with an online max/sum. s~ comes from the PQ codes: k^ is gathered from the
   codebooks (a few KB, L1/L2 resident) and scored with tl.dot, as in attention_topk.py.
2. `_mass_kernel` (grid B*H x c x cdiv(Nk, BLOCK_N), for a chunk of c tiles): each program rescores BLOCK_N keys
   against the tile's rows, sums exp(s~ - m_i) / l_i over the rows, and writes the chunk's masses
   [B, H, c, Nk] fp32 (-1 for keys no query of the tile may attend to). It also counts, per tile, the keys
   some query may attend to (union) and those not behind a padding bias (<= finfo(mask dtype).min / 2):
   the sizing counts of L_tile (integer atomics: exact, order-free, so deterministic).
   The launcher walks the tiles in chunks so that this transient is c * Nk per head (O(N^2/T) at most, never
   N x N), and it is read once more by kernel 3 instead of re-scoring: scoring costs a [T, D] x [D, BLOCK_N]
   dot plus T * BLOCK_N exps per key block, the masses one 4-byte load.
3. `_topl_kernel` (grid cdiv(B*H*c, BLOCK_T)): exact top-L_tile per tile over the mass rows, by the radix
   threshold search of attention_topk.py (8 passes x 4 bits over the order-preserving int image of the fp32
   mass: the L_tile-th largest mass exactly), then one compaction pass that writes the keys above the
   threshold and the first (lowest) keys equal to it in ascending key order through a running prefix sum.
   The selection is exact for the masses computed; they differ from the reference's by fp32 summation order
   (and tf32 scoring on GPU), which only reorders keys whose masses nearly tie.
L_tile = formulas.attention_tile_keys(sizing, density, min_keys) capped by the union (and L) runs in torch on
the [B, H, c] counts: one formula, one place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spt_compile.kernels import aot, autotune
from spt_compile.kernels._tiled_common import Limits, check_tile_args, tdot, tile_key, tiled_site_shapes
from spt_compile.kernels._triton_utils import block_d, check_pq_selection_args, mask_as_bias
from spt_compile.lowering.formulas import attention_tile_keys, mask_is_per_head

KERNEL_STATS = "attention_tiled_select_stats"
KERNEL_MASS = "attention_tiled_select_mass"
KERNEL_TOPL = "attention_tiled_select_topl"
RADIX_BITS = 4
NPASS = 32 // RADIX_BITS
_CHUNK_ELEMS = 1 << 24  # mass transient per chunk of tiles, in fp32 elements (64 MiB)


@triton.jit
def _est_logits(q, cb_base, codes_base, bias_base, stride_mi, stride_mj, rows, row_hi, offs_n, offs_d,
                Nk, C, DS, D, scale, pad_thr,
                HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """(s~ [BM, BN] fp32 with -inf where not allowed, allowed [BM, BN], allowed and not padding [BM, BN])."""
    n_ok = offs_n < Nk
    d_ok = offs_d < D
    sub = offs_d // DS                                                      # [BD] subspace of each dim
    ld = n_ok[:, None] & d_ok[None, :]
    code = tl.load(codes_base + offs_n[:, None] * (D // DS) + sub[None, :], mask=ld, other=0)  # [BN, BD]
    khat = tl.load(cb_base + (sub[None, :] * C + code) * DS + (offs_d % DS)[None, :], mask=ld, other=0.0)
    s = tdot(q, tl.trans(khat), PREC) * scale                               # [BM, BN]
    ok = (rows < row_hi)[:, None] & n_ok[None, :]
    if IS_CAUSAL:
        ok = ok & (offs_n[None, :] <= rows[:, None])
    strict = ok
    if HAS_MASK:
        bias = tl.load(bias_base + rows[:, None].to(tl.int64) * stride_mi + offs_n[None, :] * stride_mj,
                       mask=ok, other=float("-inf"))
        ok = ok & (bias > float("-inf")) & (bias < float("inf"))
        strict = ok & (bias > pad_thr)
        s = s + bias
    return tl.where(ok, s, float("-inf")), ok, strict


@triton.jit
def _stats_kernel(
    q_ptr, cb_ptr, codes_ptr, bias_ptr, stats_ptr,
    H, Hkv, Nq, Nk, C, DS, D, scale, pad_thr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B * H, cdiv(Nq, BLOCK_M)); stats [B, H, Nq, 2] = (m_i, 1/l_i), (0, 0) for a row with no allowed key
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
                mask=(rows < Nq)[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
    bkv = b.to(tl.int64) * Hkv + h // (H // Hkv)
    cb_base = cb_ptr + bkv * (D // DS) * C * DS      # codebooks [B, Hkv, M, C, DS] contiguous
    codes_base = codes_ptr + bkv * Nk * (D // DS)    # codes [B, Hkv, Nk, M] contiguous
    bias_base = bias_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    n_end = Nk
    if IS_CAUSAL:
        n_end = tl.minimum(Nk, (tl.program_id(1) + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s, ok, strict = _est_logits(q, cb_base, codes_base, bias_base, stride_mi, stride_mj, rows, Nq, offs_n,
                                    offs_d, Nk, C, DS, D, scale, pad_thr, HAS_MASK, IS_CAUSAL, PREC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    inv_l = tl.where(l_i == 0.0, 0.0, 1.0 / tl.where(l_i == 0.0, 1.0, l_i))
    out = stats_ptr + (pid_bh.to(tl.int64) * Nq + rows) * 2
    tl.store(out, tl.where(m_i == float("-inf"), 0.0, m_i), mask=rows < Nq)
    tl.store(out + 1, inv_l, mask=rows < Nq)


@triton.jit
def _mass_kernel(
    q_ptr, cb_ptr, codes_ptr, bias_ptr, stats_ptr, mass_ptr, count_ptr,
    H, Hkv, Nq, Nk, C, DS, D, T, t0, n_chunk, STRIDE, scale, pad_thr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B * H, n_chunk, cdiv(Nk, BLOCK_N)); tile t = t0 + program_id(1); rows not scored (STRIDE) add no mass
    # but still count for the union and sizing.
    # mass [B*H, n_chunk, Nk] fp32; count [B*H, n_chunk, 2] int32 = (union, union without padding)
    pid_bh = tl.program_id(0)
    tc = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    t = t0 + tc
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    bkv = b.to(tl.int64) * Hkv + h // (H // Hkv)
    cb_base = cb_ptr + bkv * (D // DS) * C * DS
    codes_base = codes_ptr + bkv * Nk * (D // DS)
    bias_base = bias_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    row_hi = tl.minimum(t * T + T, Nq)
    r_start = 0
    if IS_CAUSAL:  # rows before the block's first key see none of it
        r_start = (tl.maximum(0, tl.program_id(2) * BLOCK_N - t * T) // BLOCK_M) * BLOCK_M
    mass = tl.zeros([BLOCK_N], tl.float32)
    union = tl.zeros([BLOCK_N], tl.int32)
    strict_any = tl.zeros([BLOCK_N], tl.int32)
    for r0 in range(r_start, T, BLOCK_M):
        rows = t * T + r0 + tl.arange(0, BLOCK_M)
        r_ok = rows < row_hi
        q = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :] * stride_qd,
                    mask=r_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
        st = stats_ptr + (pid_bh.to(tl.int64) * Nq + rows) * 2
        m_row = tl.load(st, mask=r_ok, other=0.0)
        # formulas.attention_scored_row: every STRIDE-th row counted back from the tile's last real row
        scored = ((row_hi - 1 - rows) % STRIDE) == 0
        inv_l = tl.load(st + 1, mask=r_ok & scored, other=0.0)
        s, ok, strict = _est_logits(q, cb_base, codes_base, bias_base, stride_mi, stride_mj, rows, row_hi,
                                    offs_n, offs_d, Nk, C, DS, D, scale, pad_thr, HAS_MASK, IS_CAUSAL, PREC)
        mass += tl.sum(tl.exp(s - m_row[:, None]) * inv_l[:, None], axis=0)   # 0 where not allowed
        union = tl.maximum(union, tl.max(ok.to(tl.int32), axis=0))
        strict_any = tl.maximum(strict_any, tl.max(strict.to(tl.int32), axis=0))
    row = (pid_bh.to(tl.int64) * n_chunk + tc)
    tl.store(mass_ptr + row * Nk + offs_n, tl.where(union > 0, mass, -1.0), mask=offs_n < Nk)
    tl.atomic_add(count_ptr + row * 2, tl.sum(union, axis=0))
    tl.atomic_add(count_ptr + row * 2 + 1, tl.sum(strict_any, axis=0))


@triton.jit
def _topl_kernel(
    mass_ptr, ltile_ptr, idx_ptr, R, Nk, L,
    NPASS: tl.constexpr, RADIX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(R, BLOCK_T),) over the R = B*H*n_chunk mass rows [R, Nk]; idx rows [R, L] (pre-filled -1)
    rws = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = rws < R
    Li = tl.load(ltile_ptr + rws, mask=r_ok, other=0)                       # [BT] keys to keep
    base = mass_ptr + rws[:, None].to(tl.int64) * Nk
    # ---- exact threshold search over the ordered int image of the masses (attention_topk.py) ----
    lo = tl.full([BLOCK_T], -2147483648, tl.int64)       # invariant: count(key >= lo) >= L_i
    hi = tl.full([BLOCK_T], 2147483647, tl.int64)        # invariant: count(key >  hi) <  L_i
    cnt_hi = tl.zeros([BLOCK_T], tl.int32)
    ts = tl.arange(0, RADIX)
    for p in range(NPASS):
        step = (hi - lo + RADIX) // RADIX
        counts = tl.zeros([BLOCK_T, RADIX], tl.int32)
        for n0 in range(0, Nk, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mv = tl.load(base + offs_n[None, :], mask=r_ok[:, None] & (offs_n < Nk)[None, :], other=-1.0)
            ok = mv >= 0.0
            bits = (mv + 0.0).to(tl.int32, bitcast=True)   # mass >= 0: the bits are already ordered
            for t in tl.static_range(RADIX):
                thr = tl.minimum(lo + t * step, hi).to(tl.int32)
                c = tl.sum((ok & (bits >= thr[:, None])).to(tl.int32), axis=1)
                counts += tl.where(ts[None, :] == t, c[:, None], 0)
        valid = (ts[None, :].to(tl.int64) * step[:, None]) <= (hi - lo)[:, None]
        good = valid & (counts >= Li[:, None])
        kb = tl.max(tl.where(good, ts[None, :], 0), axis=1)
        nxt = kb + 1
        nxt_valid = (nxt < RADIX) & (nxt.to(tl.int64) * step <= hi - lo)
        cnt_nxt = tl.sum(tl.where(ts[None, :] == nxt[:, None], counts, 0), axis=1)
        new_lo = lo + kb.to(tl.int64) * step
        cnt_hi = tl.where(nxt_valid, cnt_nxt, cnt_hi)
        hi = tl.where(nxt_valid, new_lo + step - 1, hi)
        lo = new_lo
    tau = lo.to(tl.int32)
    # ---- compaction in ascending key order: every key > tau, and the lowest need_eq keys == tau ----
    need_eq = Li - cnt_hi
    sel_run = tl.zeros([BLOCK_T], tl.int32)
    eq_run = tl.zeros([BLOCK_T], tl.int32)
    idx_row = idx_ptr + rws.to(tl.int64) * L
    for n0 in range(0, Nk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mv = tl.load(base + offs_n[None, :], mask=r_ok[:, None] & (offs_n < Nk)[None, :], other=-1.0)
        ok = (mv >= 0.0) & (Li > 0)[:, None]
        bits = (mv + 0.0).to(tl.int32, bitcast=True)
        eq = ok & (bits == tau[:, None])
        eq_i = eq.to(tl.int32)
        eq_rank = eq_run[:, None] + tl.cumsum(eq_i, axis=1) - 1
        sel = (ok & (bits > tau[:, None])) | (eq & (eq_rank < need_eq[:, None]))
        sel_i = sel.to(tl.int32)
        pos = sel_run[:, None] + tl.cumsum(sel_i, axis=1) - 1
        val = tl.zeros([BLOCK_T, BLOCK_N], tl.int32) + offs_n[None, :]
        tl.store(idx_row[:, None] + pos, val, mask=sel & r_ok[:, None])
        sel_run += tl.sum(sel_i, axis=1)
        eq_run += tl.sum(eq_i, axis=1)


# ---------------------------------------------------------------------------------------------- configs
# Scoring kernels: q tile (fp32), the gathered k^ tile (fp32) and the [BM, BN] scores are live; fp32 dots.
# key = tile_key(BLOCK_D, BLOCK_D, "fp32" (scoring is fp32 for every input dtype), T, B*H*Nq).
_C = autotune.KernelConfig.make
STATS = Limits([
    (_C(num_warps=8, num_stages=1, BLOCK_M=32, BLOCK_N=32), 128, 128),
    (_C(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=32), 128, 128),
])
MASS = Limits([
    (_C(num_warps=8, num_stages=1, BLOCK_M=32, BLOCK_N=32), 128, 128),
    (_C(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=32), 128, 128),
])
# one candidate: a memory-bound pass over the masses (8 x 4-bit search passes + compaction); 2 x 256 and
# 4 x 128 put 8 B on the stack (sm_90)
TOPL = [_C(num_warps=4, num_stages=1, BLOCK_T=8, BLOCK_N=64)]



def _site_key_score(op: str, a: dict) -> tuple | None:
    """The key the stats and mass kernels launch with for a traced site (inspection report); None when the
    site runs exact (no selection) or the tiled kernels do not serve it."""
    s = tiled_site_shapes(op, a)
    if s is None or s["exact"]:
        return None
    bd = block_d(s["d"])
    return tile_key(bd, bd, "fp32", s["tile"], s["b"] * s["h"] * s["nq"])


def _site_key_topl(op: str, a: dict) -> tuple | None:
    s = tiled_site_shapes(op, a)
    return None if s is None or s["exact"] else ()


autotune.register_candidates(KERNEL_STATS, STATS.configs, fits=STATS.fits, site_key=_site_key_score)
autotune.register_candidates(KERNEL_MASS, MASS.configs, fits=MASS.fits, site_key=_site_key_score)
autotune.register_candidates(KERNEL_TOPL, TOPL, site_key=_site_key_topl)


def _sig_score(dt: str) -> dict:
    sig = {n: "i32" for n in ("H", "Hkv", "Nq", "Nk", "C", "DS", "D")}
    sig.update({"scale": "fp32", "pad_thr": "fp32"})
    sig.update({f"stride_q{a}": "i64" for a in "bhnd"})
    sig.update({f"stride_m{a}": "i64" for a in "bhij"})
    sig.update({n: "constexpr" for n in ("HAS_MASK", "IS_CAUSAL", "PREC", "BLOCK_M", "BLOCK_N", "BLOCK_D")})
    return sig


def _sig_stats(dt: str) -> dict:
    return {"q_ptr": f"*{dt}", "cb_ptr": "*fp32", "codes_ptr": "*i32", "bias_ptr": "*fp32", "stats_ptr": "*fp32",
            **_sig_score(dt)}


def _sig_mass(dt: str) -> dict:
    return {"q_ptr": f"*{dt}", "cb_ptr": "*fp32", "codes_ptr": "*i32", "bias_ptr": "*fp32", "stats_ptr": "*fp32",
            "mass_ptr": "*fp32", "count_ptr": "*i32", "T": "i32", "t0": "i32", "n_chunk": "i32", "STRIDE": "i32",
            **_sig_score(dt)}


def _cx_score(limits: Limits):
    def cx(cfg: autotune.KernelConfig, dt: str) -> dict:
        return {"HAS_MASK": True, "IS_CAUSAL": True, "PREC": "tf32", "BLOCK_M": cfg["BLOCK_M"],
                "BLOCK_N": cfg["BLOCK_N"], "BLOCK_D": limits.max_d(cfg, "fp32")}
    return cx


def _sig_topl(dt: str) -> dict:
    return {"mass_ptr": "*fp32", "ltile_ptr": "*i32", "idx_ptr": "*i32", "R": "i32", "Nk": "i32", "L": "i32",
            "NPASS": "constexpr", "RADIX": "constexpr", "BLOCK_T": "constexpr", "BLOCK_N": "constexpr"}


aot.register_aot(aot.AotSpec(KERNEL_STATS, _stats_kernel, _sig_stats, _cx_score(STATS)))
aot.register_aot(aot.AotSpec(KERNEL_MASS, _mass_kernel, _sig_mass, _cx_score(MASS)))
aot.register_aot(aot.AotSpec(KERNEL_TOPL, _topl_kernel, _sig_topl,
                             lambda cfg, dt: {"NPASS": NPASS, "RADIX": 1 << RADIX_BITS, **dict(cfg.meta)},
                             dtypes=("fp32",)))


# ---------------------------------------------------------------------------------------------- launcher

def padding_threshold(mask: torch.Tensor | None) -> float:
    """A finite bias at or below this counts as padding for sizing (finfo(mask dtype).min / 2), in fp32: an
    fp64 mask's threshold is below fp32's range, and its finfo.min padding (clamped to fp32's min by
    mask_as_bias) must still count as padding, so the threshold is capped at fp32's min."""
    if mask is None or not mask.dtype.is_floating_point:
        return float("-inf")
    return max(torch.finfo(mask.dtype).min / 2, torch.finfo(torch.float32).min)




def select_tiles(q, codebooks, codes, mask, is_causal, scale, tile, density, min_keys, L, *, stride=1, group=1,
                 chunk=None):
    """idx [B, H, ceil(Nq/T), L] int32: per tile its top-L_tile keys by the per-query-normalised PQ mass summed
    over the scored queries (lowering/reference/tiled_attention.select_tiles; see the module doc). group G > 1:
    G consecutive heads share each list, by their masses summed (in torch, between the mass and top-L kernels);
    the union and sizing come from the group's first head, so a per-head mask is the caller's to route elsewhere."""
    assert isinstance(stride, int) and stride >= 1, stride  # checked at the op boundary
    assert group == 1 or not mask_is_per_head(mask), "shared lists with a per-head mask: plain path"
    check_pq_selection_args(q, codebooks, codes, L)
    nt = check_tile_args(q, None, tile, scale)
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if not isinstance(min_keys, int) or min_keys < 1:
        raise ValueError(f"min_keys must be a positive int, got {min_keys!r}")
    b, h, nq, d = q.shape
    hkv, nk = codes.shape[1], codes.shape[2]
    C, DS = codebooks.shape[3], codebooks.shape[4]
    idx = torch.full((b, h, nt, L), -1, dtype=torch.int32, device=q.device)
    if nq == 0 or nk == 0:
        return idx
    bias, ms = mask_as_bias(mask, (b, h, nq, nk))
    codebooks = codebooks.to(torch.float32).contiguous()
    codes = codes.to(torch.int32).contiguous()
    stats = torch.empty((b, h, nq, 2), dtype=torch.float32, device=q.device)
    bias_t = bias if bias is not None else stats
    BD = block_d(d)
    key = tile_key(BD, BD, "fp32", tile, b * h * nq)
    flags = dict(HAS_MASK=bias is not None, IS_CAUSAL=bool(is_causal), PREC="tf32", BLOCK_D=BD)
    pad_thr = padding_threshold(mask)
    common = (h, hkv, nq, nk, C, DS, d)

    def run_stats(cfg):  # rewrites every row's stats: safe to time per candidate
        _stats_kernel[(b * h, triton.cdiv(nq, cfg["BLOCK_M"]))](
            q, codebooks, codes, bias_t, stats, *common, float(scale), pad_thr, *q.stride(), *ms,
            **flags, **cfg.kwargs())
    run_stats(autotune.get_config(KERNEL_STATS, key, bench=run_stats))
    # the chunk is the mass kernel's grid dim 1: at most 65535 on CUDA
    step = chunk if chunk is not None else max(1, min(nt, 65535, _CHUNK_ELEMS // max(1, b * h * nk)))
    if not 1 <= step <= 65535:
        raise ValueError(f"chunk must be in [1, 65535], got {chunk}")
    for t0 in range(0, nt, step):
        c = min(step, nt - t0)
        mass = torch.empty((b, h, c, nk), dtype=torch.float32, device=q.device)
        counts = torch.empty((b, h, c, 2), dtype=torch.int32, device=q.device)

        def run_mass(cfg, c=c, t0=t0, mass=mass, counts=counts):
            counts.zero_()  # atomic sums: zeroed per run, so every timed candidate starts clean
            _mass_kernel[(b * h, c, triton.cdiv(nk, cfg["BLOCK_N"]))](
                q, codebooks, codes, bias_t, stats, mass, counts, *common, tile, t0, c, stride, float(scale), pad_thr,
                *q.stride(), *ms, **flags, **cfg.kwargs())
        run_mass(autotune.get_config(KERNEL_MASS, key, bench=run_mass))  # tuned on the first chunk, then memo
        if group > 1:  # [B, H/G, c, Nk]: -1 outside the union, which every head of a group shares (no head mask)
            mass = _group_mass(mass, group)
            counts = counts[:, ::group]
        union, sizing = counts[..., 0], counts[..., 1]
        l_tile = torch.minimum(attention_tile_keys(sizing, float(density), min_keys), union)
        l_tile = l_tile.clamp(max=min(L, nk)).to(torch.int32).contiguous()   # [B, H/G, c]
        out = torch.empty((b, h // group, c, L), dtype=torch.int32, device=q.device)
        rows = b * (h // group) * c

        def run_topl(cfg, mass=mass, l_tile=l_tile, out=out, rows=rows):
            out.fill_(-1)  # the compaction writes only the kept slots
            _topl_kernel[(triton.cdiv(rows, cfg["BLOCK_T"]),)](
                mass, l_tile, out, rows, nk, L, NPASS=NPASS, RADIX=1 << RADIX_BITS, **cfg.kwargs())
        run_topl(autotune.get_config(KERNEL_TOPL, (), bench=run_topl))
        idx[:, :, t0:t0 + c] = out.repeat_interleave(group, dim=1) if group > 1 else out
    return idx


def _group_mass(mass: torch.Tensor, group: int) -> torch.Tensor:
    """[B, H, c, Nk] masses (-1 outside the union) -> [B, H/G, c, Nk] summed over each group of G heads,
    contiguous for the top-L kernel; -1 stays outside the union (the same keys for every head of a group)."""
    b, h, c, nk = mass.shape
    summed = mass.clamp(min=0.0).reshape(b, h // group, group, c, nk).sum(2)
    return torch.where(mass[:, ::group] >= 0, summed, -1.0).contiguous()
