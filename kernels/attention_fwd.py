"""Sparse attention forward over the selected keys: out and lse, online softmax in fp32.

sparse_attention_forward(q, k, v, idx, mask, is_causal, scale, dropout_p, seed) -> (out, lse)

One program per (batch, head, query): each query has its own key list (idx [B, H, Nq, L]), so a
tile of queries shares no key/value loads and a [BM, BL, D] tile would only add register pressure;
the work is a gather of L key and value rows (memory-bound, ~1 FLOP/byte), streamed in BLOCK_L
chunks with an online softmax. Slots with idx = -1, disallowed keys (mask bias not finite, or
j > i when causal) are skipped, so a stale idx can never leak a masked key.
Dropout: keep iff tl.rand(seed, offset) >= dropout_p with offset = ((b*H + h)*Nq + i)*L + slot,
i.e. the flat position of the slot in idx, so the backward (both dK/dV modes) replays it exactly.
Fully masked rows: out = 0, lse = -inf.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from spt_compile.kernels import aot, autotune
from spt_compile.kernels._triton_utils import TRITON_TYPE, block_d, check_float, dtype_name, mask_as_bias

KERNEL = "attention_fwd"


@triton.jit
def _gather_scores(q, k_base, bias_row, idx_row, l0, i, Nk, L, scale,
                   stride_kn, stride_kd, stride_mj, offs_l, offs_d, D,
                   HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """For slots l0 + offs_l of query i: key ids j [BL], allowed [BL], scores [BL] (-inf if not
    allowed) and the gathered keys [BL, BD] (fp32)."""
    slot_ok = (l0 + offs_l) < L
    j = tl.load(idx_row + l0 + offs_l, mask=slot_ok, other=-1)               # [BL] int32
    ok = (j >= 0) & (j < Nk)
    if IS_CAUSAL:
        ok = ok & (j <= i)
    jj = tl.where(ok, j, 0).to(tl.int64)
    kt = tl.load(k_base + jj[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                 mask=ok[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)  # [BL, BD]
    s = tl.sum(q[None, :] * kt, axis=1) * scale                               # [BL]
    if HAS_MASK:
        bias = tl.load(bias_row + jj * stride_mj, mask=ok, other=float("-inf"))
        ok = ok & (bias > float("-inf")) & (bias < float("inf"))
        s = s + bias
    s = tl.where(ok, s, float("-inf"))
    return j, ok, jj, kt, s


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, bias_ptr, seed_ptr, out_ptr, lse_ptr,
    H, Hkv, Nq, Nk, L, D, DV, scale, dropout_p,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # grid: (B * H * Nq,) one query row per program
    row = tl.program_id(0).to(tl.int64)          # = (b*H + h)*Nq + i
    i = row % Nq
    bh = row // Nq
    h = bh % H
    b = bh // H
    hk = h // (H // Hkv)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + i * stride_qn + offs_d * stride_qd,
                mask=offs_d < D, other=0.0).to(tl.float32)                   # [BD]
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    bias_row = bias_ptr + b * stride_mb + h * stride_mh + i * stride_mi
    idx_row = idx_ptr + row * L
    if DROPOUT:
        seed = tl.load(seed_ptr)

    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        j, ok, jj, kt, s = _gather_scores(q, k_base, bias_row, idx_row, l0, i, Nk, L, scale,
                                          stride_kn, stride_kd, stride_mj, offs_l, offs_d, D,
                                          HAS_MASK, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all -inf so far: keep exp() finite
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)                                              # [BL], 0 where not ok
        l_i = l_i * alpha + tl.sum(p, axis=0)
        if DROPOUT:
            r = tl.rand(seed, row * L + l0 + offs_l)
            p = tl.where(r >= dropout_p, p / (1.0 - dropout_p), 0.0)
        vt = tl.load(v_base + jj[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                     mask=ok[:, None] & (offs_dv < DV)[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m_i = m_new

    empty = l_i == 0.0
    out = tl.where(empty, 0.0, acc / tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(out_ptr + row * DV + offs_dv, out.to(out_ptr.dtype.element_ty), mask=offs_dv < DV)
    tl.store(lse_ptr + row, lse)


def per_thread(cfg: autotune.KernelConfig, block: str, bd: int) -> int:
    """fp32 values per thread of one gathered [block, bd] tile: the register budget we bound."""
    return cfg[block] * bd // (32 * cfg.num_warps)


def _triton_at_least(major: int, minor: int) -> bool:
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (major, minor)


# fp32 values per thread of one gathered [BLOCK_L, BLOCK_D] tile. The k and v chunks are live together (plus
# the next chunk's prefetch): triton 3.9 compiles this kernel at D = 64 in ~107 registers and spills at D = 128
# beyond 32 values per thread; triton 3.6 needs twice the registers (~214 at D = 64) and spills at D = 128 beyond
# 16 (cuobjdump, sm_80 and sm_90, every dtype; docs/COMPAT.md). Versions between are not measured: 16 for them.
FWD_BUDGET = 32 if _triton_at_least(3, 9) else 16


def tile_d(key: tuple) -> int:
    """The widest head-dim tile of a (D, DV, ...) key: what the per-thread register budget bounds."""
    return max(block_d(key[0]), block_d(key[1]))


def tuning_key(d: int, dv: int, dtype: torch.dtype, rows: int, L: int) -> tuple:
    """(D, DV, dtype, bucket(B*H*Nq query rows), bucket(L slots)): exact head dims, bucketed work."""
    return (int(d), int(dv), dtype_name(dtype), autotune.bucket(rows), autotune.bucket(L))


def _fits(cfg: autotune.KernelConfig, key: tuple) -> bool:
    return per_thread(cfg, "BLOCK_L", tile_d(key)) <= FWD_BUDGET


CANDIDATES = [
    autotune.KernelConfig.make(num_warps=4, num_stages=2, BLOCK_L=32),
    autotune.KernelConfig.make(num_warps=8, num_stages=2, BLOCK_L=64),
    autotune.KernelConfig.make(num_warps=2, num_stages=2, BLOCK_L=16),
    autotune.KernelConfig.make(num_warps=8, num_stages=2, BLOCK_L=32),  # D = 128 at the 16-value budget
]


def _ints(shape) -> list[int] | None:
    return list(shape) if shape and all(isinstance(x, int) for x in shape) else None  # symbolic: unknown


def site_shapes(op: str, a: dict) -> dict | None:
    """Sizes a traced spt.pq_sparse_attention site launches the per-query kernels with, from the op's arguments
    as graph_snapshot records them (tensors as {"shape", "dtype", "device"}): b, h, hkv, nq, nk, d, dv, L (the
    slots of the forward's idx), dtype, exact. None when these kernels do not serve the site: another op,
    query-tile mode, symbolic sizes, a dtype without kernels."""
    from spt_compile.lowering.formulas import attention_is_exact, attention_keys_kept
    if not op.startswith("spt.pq_sparse_attention") or int(a.get("query_tile") or 0):
        return None
    if not all(isinstance(a.get(t), dict) for t in ("q", "k", "v")):
        return None
    q, k, v = (_ints(a[t]["shape"]) for t in ("q", "k", "v"))
    dtype = getattr(torch, str(a["q"]["dtype"]), None)
    if q is None or k is None or v is None or dtype not in TRITON_TYPE:
        return None
    (b, h, nq, d), (hkv, nk), dv = q, k[1:3], v[3]
    exact = attention_is_exact(nk, float(a.get("density", 1.0)), int(a.get("min_seq_len") or 0))
    L = nk if exact else attention_keys_kept(nk, float(a["density"]))  # exact mode lists every key
    return {"b": b, "h": h, "hkv": hkv, "nq": nq, "nk": nk, "d": d, "dv": dv, "L": L, "dtype": dtype,
            "exact": exact}


def _site_key(op: str, a: dict) -> tuple | None:
    s = site_shapes(op, a)
    return None if s is None else tuning_key(s["d"], s["dv"], s["dtype"], s["b"] * s["h"] * s["nq"], s["L"])


autotune.register_candidates(KERNEL, CANDIDATES, fits=_fits, site_key=_site_key)


def aot_block_d(cfg: autotune.KernelConfig, name: str = "BLOCK_L", budget: int = 32) -> int:
    """The largest head dim (<= 128) a per-thread `budget` admits for a config: what AOT compiles."""
    return min(128, budget * 32 * cfg.num_warps // cfg[name])


def _aot_signature(dt: str) -> dict:
    sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "idx_ptr": "*i32",
           "bias_ptr": "*fp32", "seed_ptr": "*i64", "out_ptr": f"*{dt}", "lse_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("H", "Hkv", "Nq", "Nk", "L", "D", "DV")})
    sig.update({"scale": "fp32", "dropout_p": "fp32"})
    for t, axes in (("q", "bhnd"), ("k", "bhnd"), ("v", "bhnd"), ("m", "bhij")):
        sig.update({f"stride_{t}{a}": "i64" for a in axes})
    sig.update({n: "constexpr" for n in ("HAS_MASK", "IS_CAUSAL", "DROPOUT",
                                         "BLOCK_L", "BLOCK_D", "BLOCK_DV")})
    return sig


def _aot_constexprs(cfg: autotune.KernelConfig, dt: str) -> dict:
    bd = aot_block_d(cfg, budget=FWD_BUDGET)
    return {"HAS_MASK": True, "IS_CAUSAL": True, "DROPOUT": True,
            "BLOCK_L": cfg["BLOCK_L"], "BLOCK_D": bd, "BLOCK_DV": bd}


aot.register_aot(aot.AotSpec(KERNEL, _fwd_kernel, _aot_signature, _aot_constexprs))


def check_attention_args(q, k, v, idx, scale, dropout_p, seed):
    """Shared argument validation for the forward and backward launchers (ValueError names the arg)."""
    check_float("q", q, 4)
    check_float("k", k, 4)
    check_float("v", v, 4)
    B, H, Nq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    Hkv, Nk = k.shape[1], k.shape[2]
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {tuple(v.shape)} does not match k {tuple(k.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of kv heads ({Hkv})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (not isinstance(idx, torch.Tensor) or idx.dim() != 4 or tuple(idx.shape[:3]) != (B, H, Nq)
            or idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"idx must be an int32 tensor [B, H, Nq, L] = [{B}, {H}, {Nq}, L], got "
                         f"{getattr(idx, 'dtype', None)} {getattr(idx, 'shape', None)}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and (not isinstance(seed, torch.Tensor) or seed.numel() != 1):
        raise ValueError(f"seed must be a one-element int64 tensor when dropout_p > 0, got {seed!r}")


def seed_tensor(seed, device) -> torch.Tensor:
    return seed.reshape(1).to(device=device, dtype=torch.int64)


def sparse_attention_forward(q, k, v, idx, mask, is_causal, scale, dropout_p, seed):
    """out [B, H, Nq, Dv] (q.dtype, contiguous), lse [B, H, Nq] fp32 over the kept keys."""
    check_attention_args(q, k, v, idx, scale, dropout_p, seed)
    B, H, Nq, D = q.shape
    Hkv, Nk, DV = k.shape[1], k.shape[2], v.shape[3]
    L = idx.shape[3]
    out = torch.empty((B, H, Nq, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if B * H * Nq == 0:
        return out, lse
    bias, ms = mask_as_bias(mask, (B, H, Nq, Nk))
    idx = idx.to(torch.int32).contiguous()
    dropout = float(dropout_p) > 0
    seed_t = seed_tensor(seed, q.device) if dropout else idx
    BD, BDV = block_d(D), block_d(DV)

    def run(cfg):  # one launch; the autotuner times it per candidate (every row rewrites its out and lse)
        _fwd_kernel[(B * H * Nq,)](
            q, k, v, idx, bias if bias is not None else lse, seed_t, out, lse,
            H, Hkv, Nq, Nk, L, D, DV, float(scale), float(dropout_p),
            *q.stride(), *k.stride(), *v.stride(), *ms,
            HAS_MASK=bias is not None, IS_CAUSAL=bool(is_causal), DROPOUT=dropout,
            BLOCK_D=BD, BLOCK_DV=BDV, **cfg.kwargs())
    run(autotune.get_config(KERNEL, tuning_key(D, DV, q.dtype, B * H * Nq, L), bench=run))
    return out, lse
