"""The fast plain-PyTorch path of query-tile attention (CPU tensors, and any device without tile kernels):
the attention over the kept keys, forward and backward (the selection is attention_tiled_cpu_select.py).

Same semantics as lowering/reference/tiled_attention.py (the reference and fp64 ground truth); this file only
changes how the work is laid out, because on CPU the time goes into memory passes, not FLOPs:
- chunks of query tiles sized to stay in the core's L2 cache (about 2^18 elements per chunk), so the softmax
  passes after each GEMM read cache, not DRAM;
- scale folded into q (N·D multiplies instead of N·Nk);
- attention: masks are built only when some slot needs one (empty slots, causality, a mask), and the backward
  recomputes P from the saved lse where that is safe (one softmax pass fewer);
- on CPUs with bf16 GEMM units (AMX or AVX512-BF16): bf16 inputs keep bf16 GEMM
  operands (gemm_dtype); logits, softmax and accumulation stay fp32;
- lists shared by the G query heads of a kv head (share_kv_lists): each kept key is gathered once per group and
  the group's G x T query rows multiply it in one GEMM (G x the reuse per gathered byte), and dK / dV come out of
  the GEMMs already summed over the group (_shared_group says when this layout applies).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from spt_compile.lowering.formulas import mask_is_per_head
from spt_compile.lowering.reference.pq_attention import compute_dtype, dropout_keep
from spt_compile.lowering.reference.tiled_attention import (_add_mask_grad, _ds_on_keys, _flat_index, _gather_mask,
                                                            _gather_rows, _trim, tile_chunk)

_CACHE_ELEMS = 1 << 18  # elements of a chunk's largest transient: ~1 MB fp32, inside a core's L2


def _chunk_tiles(n_tiles: int, elems_per_tile: int, chunk: int | None) -> int:
    return tile_chunk(n_tiles, elems_per_tile, chunk, budget=_CACHE_ELEMS)


def scoring_dtype(q: Tensor) -> torch.dtype:
    """dtype of the selection's estimated-logit GEMM. bf16 on CPUs with bf16 GEMM units (AMX tiles or
    AVX512-BF16 dot products, where bf16 GEMMs outrun fp32 ones): the logits only rank keys, and bf16 inputs (8 mantissa bits) move a logit by ~0.4%, which
    tests/lowering/test_attention_tiled_cpu.py bounds as lost attention mass. fp32 elsewhere (a CPU without
    bf16 units would emulate it slowly); fp64 inputs (the ground-truth mode) score in fp64."""
    if q.dtype == torch.float64:
        return torch.float64
    if q.device.type == "cpu" and BF16_SCORING and _has_bf16_gemm():
        return torch.bfloat16
    return torch.float32


BF16_SCORING = True  # tests switch it off to compare the selection bit for bit with the reference


def gemm_dtype(q: Tensor) -> torch.dtype:
    """Operand dtype of the attention GEMMs: bf16 inputs stay bf16 on CPUs with bf16 GEMM units (as SDPA's CPU kernel
    does; products accumulate in fp32, logits and softmax are fp32); everything else runs in compute_dtype."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and BF16_SCORING and _has_bf16_gemm():
        return torch.bfloat16
    return compute_dtype(q.dtype)


def _has_bf16_gemm() -> bool:
    """AMX tiles or AVX512-BF16 dot products: bf16 GEMMs run faster than fp32 ones (oneDNN uses either)."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(p()) for p in probes if p is not None)


def _rows_padded(x: Tensor, rows: int) -> Tensor:
    """A mask chunk broadcastable to [B, H, rows_real or 1, K] -> [.., rows or 1, K] (extra rows repeat the last)."""
    while x.dim() < 4:
        x = x[None]
    if x.shape[2] in (1, rows):
        return x
    return torch.cat([x, x[:, :, -1:].expand(x.shape[0], x.shape[1], rows - x.shape[2], x.shape[3])], 2)


def _padded_rows(x: Tensor, rows: int) -> Tensor:
    """[B, H, N, X] -> [B, H, rows, X] (rows >= N), zero padded: whole tiles, no short-tile special case."""
    n = x.shape[2]
    if n == rows:
        return x
    return torch.cat([x, x.new_zeros(x.shape[:2] + (rows - n, x.shape[3]))], 2)


# ----------------------------------------------------------------------------------------------------------
# attention over the kept keys (forward, backward)
# ----------------------------------------------------------------------------------------------------------

def _slot_ok(idx_c: Tensor, mask: Tensor | None, is_causal: bool, i0: int, i1: int, tile: int,
             cdt: torch.dtype) -> tuple[Tensor | None, Tensor | None, int]:
    """(ok, bias, w0) for the chunk's [B, H, c, T, L'] logits: ok covers slots w0 .. L' - 1 (every slot before
    w0 is allowed for every row), None when every slot of every row is allowed (full lists, no causality, no
    mask, no padded rows: the common bidirectional case builds nothing)."""
    b, h, c, L = idx_c.shape
    rows = torch.arange(i0, i0 + c * tile, device=idx_c.device).reshape(c, tile)  # [c, T] query positions
    w0 = 0
    if mask is None and is_causal:
        # lists are ascending with -1 after: only the tail slots (a key of the tile's own block, or empty) need
        # a mask; its length is about T plus the chunk's spread of L_tile, not L'
        before = ((idx_c >= 0) & (idx_c < rows[:, :1].to(idx_c.dtype))).sum(-1)  # [B, H, c]
        w0 = int(before.min())
        idx_c = idx_c[..., w0:]
    ok = None
    if bool((idx_c < 0).any()):
        ok = (idx_c >= 0)[:, :, :, None, :]
    if i1 < i0 + c * tile:
        pad = (rows < i1)[None, None, :, :, None]
        ok = pad if ok is None else ok & pad
    if is_causal:
        cz = idx_c[:, :, :, None, :] <= rows[None, None, :, :, None]
        ok = cz if ok is None else ok & cz
    bias = None
    if mask is not None:
        got = _gather_mask(mask, idx_c, i0, i1, tile)  # [B, H, c, T or 1, L']
        if got.dtype == torch.bool:
            ok = got if ok is None else ok & got
        else:
            fin = torch.finfo(cdt)
            finite = torch.isfinite(got)
            ok = finite if ok is None else ok & finite
            bias = torch.where(finite, got.to(cdt).clamp(fin.min, fin.max), 0.0)
    return ok, bias, w0


def _logits(q_t: Tensor, kg: Tensor, ok: Tensor | None, bias: Tensor | None, w0: int, cdt: torch.dtype,
            group: int = 1) -> Tensor:
    """s [B, H, c, T, L'] cdt = q_t.kg (q_t pre-scaled) + bias, -inf where not ok (ok covers slots w0 ..).
    group G > 1: q_t holds a group's rows [B, H/G, c, G*T, D] (_group_rows); ok / bias [.., c, T, ..] apply
    to each of its G heads alike."""
    s = (q_t @ kg.transpose(-1, -2)).to(cdt)
    per_head = s if group == 1 else s.unflatten(3, (group, -1))  # a view: [B, H/G, c, G, T, L']
    if bias is not None:
        per_head += bias if group == 1 else bias.unsqueeze(3)
    if ok is not None:
        per_head[..., w0:].masked_fill_(~(ok if group == 1 else ok.unsqueeze(3)), float("-inf"))
    return s


def _shared_group(q: Tensor, k: Tensor, group: int, mask: Tensor | None, dropout_p: float, mask_grad: bool = False
                  ) -> int:
    """The G of the group layout (1 = per-head layout). Shared lists (group = H / Hkv > 1) are gathered once per
    kv head where every head of the group attends alike: no per-head mask, no dropout (its keep mask is drawn per
    head) and no mask gradient; otherwise the per-head layout runs on the repeated lists (same results)."""
    if group == 1 or group != q.shape[1] // k.shape[1] or dropout_p > 0 or mask_grad:
        return 1
    return 1 if mask_is_per_head(mask) else group


def _group_rows(x: Tensor, group: int) -> Tensor:
    """[B, H, c, T, X] -> [B, H/G, c, G*T, X]: the G heads' rows of each tile side by side (a copy)."""
    if group == 1:
        return x
    b, h, c, t, xd = x.shape
    return x.reshape(b, h // group, group, c, t, xd).transpose(2, 3).reshape(b, h // group, c, group * t, xd)


def _ungroup_rows(x: Tensor, group: int) -> Tensor:
    """[B, H/G, c, G*T, X] -> [B, H, c, T, X] (inverse of _group_rows)."""
    if group == 1:
        return x
    b, hg, c, gt, xd = x.shape
    return x.reshape(b, hg, c, group, gt // group, xd).transpose(2, 3).reshape(b, hg * group, c, gt // group, xd)


def _exp_rows(s: Tensor) -> tuple[Tensor, Tensor]:
    """In place: s -> exp(s - rowmax) (0 on -inf slots); returns (s, rowmax with non-finite -> 0)."""
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, 0.0)
    return s.sub_(mx).exp_(), mx


def _tiles(x: Tensor, i0: int, c: int, tile: int) -> Tensor:
    """Rows i0 .. i0 + c*T of a row-padded [B, H, N', X] -> [B, H, c, T, X] (a view)."""
    b, h, _, xd = x.shape
    return x[:, :, i0:i0 + c * tile].reshape(b, h, c, tile, xd)


def tiled_attention_forward(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, mask: Tensor | None, is_causal: bool,
                            scale: float, tile: int, dropout_p: float, seed: Tensor | None, *, group: int = 1,
                            chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, H, Nq, Dv] q.dtype, lse [B, H, Nq] fp32), as reference.tiled_attention.tiled_attention_forward.
    group: the heads sharing each list (lowering.formulas.attention_list_group); G > 1 may use the group layout."""
    b, h, nq, d = q.shape
    dv = v.shape[3]
    nt, L = idx.shape[2], idx.shape[3]
    cdt, mdt = compute_dtype(q.dtype), gemm_dtype(q)
    g = _shared_group(q, k, group, mask, dropout_p)  # heads whose rows share one gathered K/V tile
    qs = _padded_rows((q.to(cdt) * scale).to(mdt), nt * tile)  # [B, H, Nq', D]: scale folded into q
    kc, vc = k.to(mdt).contiguous(), v.to(mdt).contiguous()  # once: _gather_rows flattens them per chunk
    out = torch.empty((b, h, nq, dv), dtype=q.dtype, device=q.device)  # exact size: the op saves it for backward
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    keep = dropout_keep((b, h, nq, L), dropout_p, seed, q.device) if dropout_p > 0 else None
    step = _chunk_tiles(nt, b * h * L * (tile + d + dv), chunk)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1, c = t0 * tile, min(nq, t1 * tile), t1 - t0
        idx_c = _trim(idx[:, ::g, t0:t1])  # [B, H/G, c, L']: one list per group
        kg, vg = _gather_rows(kc, idx_c, h // g), _gather_rows(vc, idx_c, h // g)  # [B, H/G, c, L', D|Dv]
        ok, bias, w0 = _slot_ok(idx_c, mask, is_causal, i0, i1, tile, cdt)
        q_t = _group_rows(_tiles(qs, i0, c, tile), g)  # [B, H/G, c, G*T, D]
        e, mx = _exp_rows(_logits(q_t, kg, ok, bias, w0, cdt, g))  # [B, H/G, c, G*T, L']
        den = e.sum(-1, keepdim=True)
        lse[:, :, i0:i1] = _ungroup_rows(mx + torch.log(den), g).reshape(b, h, c * tile)[:, :, :i1 - i0]
        if keep is not None:  # g = 1 here: dropout keeps the per-head layout
            e *= _keep_tiles(keep, i0, i1, c, tile, idx_c.shape[-1], cdt) / (1.0 - dropout_p)
        o = (e.to(mdt) @ vg).to(cdt) / torch.where(den > 0, den, 1.0)  # [B, H/G, c, G*T, Dv]
        out[:, :, i0:i1] = _ungroup_rows(o, g).reshape(b, h, c * tile, dv)[:, :, :i1 - i0]
    return out, lse


def _keep_tiles(keep: Tensor, i0: int, i1: int, c: int, tile: int, Lc: int, cdt: torch.dtype) -> Tensor:
    """The dropout keep mask of the chunk's rows and first Lc slots as [B, H, c, T, Lc] (padded rows: 0)."""
    return _padded_rows(keep[:, :, i0:i1, :Lc].to(cdt), c * tile).reshape(keep.shape[0], keep.shape[1], c, tile, Lc)


def tiled_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, idx: Tensor,
                             mask: Tensor | None, is_causal: bool, scale: float, tile: int, dropout_p: float,
                             seed: Tensor | None, mask_grad: bool = False, *, group: int = 1,
                             chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dmask), as reference.tiled_attention.tiled_attention_backward.

    P comes from exp(s - lse) unless a floating mask may hold finite padding values (a finfo.min row's lse
    cancels catastrophically: then P is recomputed from the row's own max and sum, as the reference does) or
    the inputs are fp64."""
    b, h, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    nt, L = idx.shape[2], idx.shape[3]
    cdt, mdt = compute_dtype(q.dtype), gemm_dtype(q)
    if mask_grad and (mask is None or not mask.dtype.is_floating_point):
        raise ValueError("mask_grad needs a floating (additive) mask")
    g = _shared_group(q, k, group, mask, dropout_p, mask_grad)  # as in the forward
    rows = nt * tile
    qs = _padded_rows((q.to(cdt) * scale).to(mdt), rows)  # [B, H, Nq', D]
    do = _padded_rows(dout.to(mdt), rows)  # [B, H, Nq', Dv]
    # a row with no kept key has lse = -inf: +inf there makes exp(s - lse) = exp(-inf) = 0, not exp(nan)
    lse_p = _padded_rows(torch.where(lse == -math.inf, math.inf, lse).to(cdt)[..., None], rows)  # [B, H, Nq', 1]
    # fp64 (ground-truth mode) too: its lse is stored in fp32, which would cap the accuracy at 1e-7
    own_max = (mask is not None and mask.dtype.is_floating_point) or cdt == torch.float64
    dq = torch.empty((b, h, rows, d), dtype=cdt, device=q.device)
    dk = torch.zeros((b * hkv * nk, d), dtype=cdt, device=q.device)
    dvv = torch.zeros((b * hkv * nk, dv), dtype=cdt, device=q.device)
    dmask = torch.zeros(mask.shape, dtype=cdt, device=q.device) if mask_grad else None
    keep = dropout_keep((b, h, nq, L), dropout_p, seed, q.device) if dropout_p > 0 else None
    kc, vc = k.to(mdt).contiguous(), v.to(mdt).contiguous()  # once: _gather_rows flattens them per chunk
    step = _chunk_tiles(nt, b * h * L * (2 * tile + 2 * d + 2 * dv), chunk)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1, c = t0 * tile, min(nq, t1 * tile), t1 - t0
        idx_c = _trim(idx[:, ::g, t0:t1])  # [B, H/G, c, L']
        kg, vg = _gather_rows(kc, idx_c, h // g), _gather_rows(vc, idx_c, h // g)  # [B, H/G, c, L', D|Dv]
        q_t, do_t = _group_rows(_tiles(qs, i0, c, tile), g), _group_rows(_tiles(do, i0, c, tile), g)
        ok, bias, w0 = _slot_ok(idx_c, mask, is_causal, i0, i1, tile, cdt)
        s = _logits(q_t, kg, ok, bias, w0, cdt, g)  # [B, H/G, c, G*T, L']
        if own_max:
            p, _ = _exp_rows(s)
            p /= torch.where((den := p.sum(-1, keepdim=True)) > 0, den, 1.0)
        else:
            p = s.sub_(_group_rows(_tiles(lse_p, i0, c, tile), g)).exp_()  # -inf slots -> 0
        dp = (do_t @ vg.transpose(-1, -2)).to(cdt)  # [B, H/G, c, G*T, L']
        pd = p
        if keep is not None:
            ks = _keep_tiles(keep, i0, i1, c, tile, idx_c.shape[-1], cdt) / (1.0 - dropout_p)
            dp *= ks
            pd = p * ks
        dv_rows = pd.to(mdt).transpose(-1, -2) @ do_t  # [B, H/G, c, L', Dv] (before p is overwritten by dS)
        # delta = rowsum(P * dP), not rowsum(dout * out): equal in exact arithmetic, but this one cancels exactly
        # where the dense formulation does (one kept key: dS = 0), keeping the error within 2x dense's
        delta = (p * dp).sum(-1, keepdim=True)
        ds = p.mul_(dp.sub_(delta))  # dS = P (dP - delta), in place over p
        ds_m = ds.to(mdt)
        dq[:, :, i0:t1 * tile] = _ungroup_rows(ds_m @ kg, g).reshape(b, h, c * tile, d)
        flat = _flat_index(idx_c, hkv, nk).reshape(-1)
        # empty slots point at key 0 of their kv head but carry dS = 0 and P = 0: they add nothing
        dk.index_add_(0, flat, (ds_m.transpose(-1, -2) @ q_t).reshape(-1, d).to(cdt))  # q_t pre-scaled: scale dS^T Q
        dvv.index_add_(0, flat, dv_rows.reshape(-1, dv).to(cdt))
        if dmask is not None:
            _add_mask_grad(dmask, _ds_on_keys(ds, idx_c, nk, i1 - i0), i0, i1)
    dq = (dq[:, :, :nq] * scale).to(q.dtype)
    dk = dk.reshape(b, hkv, nk, d).to(k.dtype)
    dvv = dvv.reshape(b, hkv, nk, dv).to(v.dtype)
    return dq, dk, dvv, None if dmask is None else dmask.to(mask.dtype)
