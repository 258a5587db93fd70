"""The fast plain-PyTorch path of query-tile attention (CPU tensors, and any device without tile kernels).

Same semantics as lowering/reference/tiled_attention.py (the reference and fp64 ground truth); this file only
changes how the work is laid out, because on CPU the time goes into memory passes, not FLOPs:
- chunks of query tiles sized to stay in the core's L2 cache (about 2^18 elements per chunk), so the softmax
  passes after each GEMM read cache, not DRAM;
- scale folded into q (N·D multiplies instead of N·Nk), causal chunks score only the keys they can see;
- selection: one GEMM of estimated logits, max / exp / sum in place, and the per-query normalisation and the
  tile sum as one small batched GEMM (w [T] · e [T, Nk]); top-L by one topk over unique int64 keys (mass bits,
  then lower key first: the reference's stable tie order) instead of a full sort;
- attention: masks are built only when some slot needs one (empty slots, causality, a mask), and the backward
  recomputes P from the saved lse where that is safe (one softmax pass fewer);
- on CPUs with AMX: the selection's scoring GEMM in bf16 (scoring_dtype), and bf16 inputs keep bf16 GEMM
  operands (gemm_dtype); logits, softmax and accumulation stay fp32.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from spt_compile.lowering.formulas import attention_num_tiles, attention_tile_keys
from spt_compile.lowering.reference.pq_attention import compute_dtype, dropout_keep, reconstruct_keys
from spt_compile.lowering.reference.tiled_attention import (_add_mask_grad, _ds_on_keys, _flat_index, _gather_mask,
                                                            _gather_rows, _tile_any, _trim, query_allowed,
                                                            tile_chunk)

_CACHE_ELEMS = 1 << 18  # elements of a chunk's largest transient: ~1 MB fp32, inside a core's L2


def _chunk_tiles(n_tiles: int, elems_per_tile: int, chunk: int | None) -> int:
    return tile_chunk(n_tiles, elems_per_tile, chunk, budget=_CACHE_ELEMS)


def scoring_dtype(q: Tensor) -> torch.dtype:
    """dtype of the selection's estimated-logit GEMM. bf16 on CPUs with AMX tiles (about 6x the fp32 GEMM
    rate there): the logits only rank keys, and bf16 inputs (8 mantissa bits) move a logit by ~0.4%, which
    tests/lowering/test_attention_tiled_cpu.py bounds as lost attention mass. fp32 elsewhere (a CPU without
    bf16 units would emulate it slowly); fp64 inputs (the ground-truth mode) score in fp64."""
    if q.dtype == torch.float64:
        return torch.float64
    if q.device.type == "cpu" and BF16_SCORING and _has_amx():
        return torch.bfloat16
    return torch.float32


BF16_SCORING = True  # tests switch it off to compare the selection bit for bit with the reference


def gemm_dtype(q: Tensor) -> torch.dtype:
    """Operand dtype of the attention GEMMs: bf16 inputs stay bf16 on CPUs with AMX (as SDPA's CPU kernel
    does; products accumulate in fp32, logits and softmax are fp32); everything else runs in compute_dtype."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and BF16_SCORING and _has_amx():
        return torch.bfloat16
    return compute_dtype(q.dtype)


def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def _padded_rows(x: Tensor, rows: int) -> Tensor:
    """[B, H, N, X] -> [B, H, rows, X] (rows >= N), zero padded: whole tiles, no short-tile special case."""
    n = x.shape[2]
    if n == rows:
        return x
    return torch.cat([x, x.new_zeros(x.shape[:2] + (rows - n, x.shape[3]))], 2)


# ----------------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------------

def select_tiles(q: Tensor, codebooks: Tensor, codes: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
                 tile: int, density: float, min_keys: int, L: int, *, chunk: int | None = None) -> Tensor:
    """idx [B, H, ceil(Nq/T), L] int32, as reference.tiled_attention.select_tiles (same tie order)."""
    b, h, nq, d = q.shape
    hkv, nk = codes.shape[1], codes.shape[2]
    grp = h // hkv
    nt = attention_num_tiles(nq, tile)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    gdt = scoring_dtype(q)
    khat_t = reconstruct_keys(codebooks, codes).to(gdt).transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Nk]
    qs = _padded_rows((q.to(cdt) * scale).to(gdt), nt * tile).reshape(b, hkv, grp, nt * tile, d)  # [B,Hkv,g,Nq',D]
    idx = torch.full((b, h, nt, L), -1, dtype=torch.int32, device=q.device)
    step = _chunk_tiles(nt, b * h * tile * nk, chunk)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1 = t0 * tile, min(nq, t1 * tile)
        kmax = min(nk, i1) if is_causal else nk  # top-left causal: no query of the chunk sees key >= i1
        mass, union, sizing = _tile_mass(qs[:, :, :, i0:t1 * tile], khat_t[..., :kmax], mask, is_causal,
                                         i0, i1, tile, nk, b, h, cdt)
        l_tile = torch.minimum(attention_tile_keys(sizing, density, min_keys), union.sum(-1))  # [B, H, c]
        idx[:, :, t0:t1] = _top_lists(mass, union, l_tile, L)
    return idx


def _tile_mass(qs_c: Tensor, khat_t: Tensor, mask: Tensor | None, is_causal: bool, i0: int, i1: int, tile: int,
               nk: int, b: int, h: int, cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(mass [B, H, c, K], union [B, H, c, K] bool, sizing [B, H, c]) of one chunk of c tiles over the first K
    keys: mass = sum over the tile's queries of each query's softmax of the estimated logits."""
    rows, kmax = qs_c.shape[3], khat_t.shape[-1]
    c = rows // tile
    s = (qs_c @ khat_t).reshape(b, h, rows, kmax).to(cdt)  # [B, H, rows, K] estimated logits (scale in q)
    mask = None if mask is None else mask[..., :kmax]  # causal chunks: keys >= K are not allowed anyway
    allowed, bias = query_allowed(mask, is_causal, i0, i1, kmax, s.dtype, s.device)
    if allowed is not None:
        allowed = _rows_padded(allowed, rows)
    if bias is not None:
        bias = _rows_padded(bias, rows)
        s += bias
    if allowed is not None:
        s.masked_fill_(~allowed, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    s.sub_(torch.where(torch.isfinite(mx), mx, 0.0)).exp_()  # e = exp(s - max); 0 where not allowed
    den = s.sum(-1)  # [B, H, rows]
    w = torch.where(den > 0, 1.0 / den, 0.0)
    if i1 < i0 + rows:
        w[:, :, i1 - i0:] = 0.0  # the zero-padded rows of a short last tile add nothing
    mass = (w.reshape(b, h, c, 1, tile) @ s.reshape(b, h, c, tile, kmax)).reshape(b, h, c, kmax)
    if allowed is None:
        union = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=s.device).expand(b, h, c, kmax)
        sizing = torch.full((b, h, c), nk, dtype=torch.int64, device=s.device)
        return mass, union, sizing
    if i1 < i0 + rows:
        allowed = allowed.clone()
        allowed[:, :, i1 - i0:] = False
    union = _tile_any(allowed, c, tile).expand(b, h, c, kmax)
    if mask is None:  # causal only: nothing is padding, the sizing count is the union's
        sizing = union.sum(-1)
    else:
        strict, _ = query_allowed(mask, is_causal, i0, i1, kmax, s.dtype, s.device, padding_too=False)
        sizing = _tile_any(strict, c, tile).sum(-1).expand(b, h, c)
    return mass, union, sizing


def _rows_padded(x: Tensor, rows: int) -> Tensor:
    """A mask chunk broadcastable to [B, H, rows_real or 1, K] -> [.., rows or 1, K] (extra rows repeat the last)."""
    while x.dim() < 4:
        x = x[None]
    if x.shape[2] in (1, rows):
        return x
    return torch.cat([x, x[:, :, -1:].expand(x.shape[0], x.shape[1], rows - x.shape[2], x.shape[3])], 2)


def _top_lists(mass: Tensor, union: Tensor, l_tile: Tensor, L: int) -> Tensor:
    """[B, H, c, L] int32: per tile the first l_tile keys by (mass desc, key asc) among union, ascending, -1 after."""
    kmax = mass.shape[-1]
    kk = min(L, kmax, int(l_tile.max()) if l_tile.numel() else 0)
    out = torch.full(mass.shape[:3] + (L,), -1, dtype=torch.int32, device=mass.device)
    if kk == 0:
        return out
    # unique sort keys: masses are >= 0, so their fp32 bits order like the values; -1 marks keys outside the union
    if mass.dtype == torch.float64:  # fp64 bits do not fit beside the key: the reference's stable sort
        top = torch.sort(mass.masked_fill(~union, -1.0), dim=-1, descending=True, stable=True).indices[..., :kk]
        return _ascending(top, l_tile, out, kk)
    bits = mass.view(torch.int32).to(torch.int64).masked_fill_(~union, -1)
    keys = bits * kmax + (kmax - 1 - torch.arange(kmax, device=mass.device))
    top = (kmax - 1 - keys.topk(kk, dim=-1, sorted=True).values % kmax)  # [B, H, c, kk], by mass
    return _ascending(top, l_tile, out, kk)


def _ascending(top: Tensor, l_tile: Tensor, out: Tensor, kk: int) -> Tensor:
    """Write the first l_tile keys of each row of top (ranked by mass) into out ascending, -1 after."""
    big = torch.iinfo(torch.int64).max
    top = top.masked_fill(torch.arange(kk, device=top.device) >= l_tile[..., None], big).sort(-1).values
    out[..., :kk] = torch.where(top == big, -1, top).to(torch.int32)
    return out


# ----------------------------------------------------------------------------------------------------------
# attention over the kept keys (forward, backward)
# ----------------------------------------------------------------------------------------------------------

def _slot_ok(idx_c: Tensor, mask: Tensor | None, is_causal: bool, i0: int, i1: int, tile: int,
             cdt: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """(ok, bias) for the chunk's [B, H, c, T, L'] logits; ok None when every slot of every row is allowed
    (full lists, no causality, no mask, no padded rows: the common bidirectional case builds nothing)."""
    b, h, c, L = idx_c.shape
    rows = torch.arange(i0, i0 + c * tile, device=idx_c.device).reshape(c, tile)  # [c, T] query positions
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
    return ok, bias


def _logits(q_t: Tensor, kg: Tensor, ok: Tensor | None, bias: Tensor | None, cdt: torch.dtype) -> Tensor:
    """s [B, H, c, T, L'] cdt = q_t.kg (q_t pre-scaled) + bias, -inf where not ok."""
    s = (q_t @ kg.transpose(-1, -2)).to(cdt)
    if bias is not None:
        s += bias
    if ok is not None:
        s.masked_fill_(~ok, float("-inf"))
    return s


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
                            scale: float, tile: int, dropout_p: float, seed: Tensor | None, *,
                            chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, H, Nq, Dv] q.dtype, lse [B, H, Nq] fp32), as reference.tiled_attention.tiled_attention_forward."""
    b, h, nq, d = q.shape
    dv = v.shape[3]
    nt, L = idx.shape[2], idx.shape[3]
    cdt, mdt = compute_dtype(q.dtype), gemm_dtype(q)
    qs = _padded_rows((q.to(cdt) * scale).to(mdt), nt * tile)  # [B, H, Nq', D]: scale folded into q
    kc, vc = k.to(mdt), v.to(mdt)
    out = torch.empty((b, h, nq, dv), dtype=q.dtype, device=q.device)  # exact size: the op saves it for backward
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    keep = dropout_keep((b, h, nq, L), dropout_p, seed, q.device) if dropout_p > 0 else None
    step = _chunk_tiles(nt, b * h * L * (tile + d + dv), chunk)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1, c = t0 * tile, min(nq, t1 * tile), t1 - t0
        idx_c = _trim(idx[:, :, t0:t1])
        kg, vg = _gather_rows(kc, idx_c, h), _gather_rows(vc, idx_c, h)  # [B, H, c, L', D|Dv]
        ok, bias = _slot_ok(idx_c, mask, is_causal, i0, i1, tile, cdt)
        e, mx = _exp_rows(_logits(_tiles(qs, i0, c, tile), kg, ok, bias, cdt))  # [B, H, c, T, L']
        den = e.sum(-1, keepdim=True)
        lse[:, :, i0:i1] = (mx + torch.log(den)).reshape(b, h, c * tile)[:, :, :i1 - i0]
        if keep is not None:
            e *= _keep_tiles(keep, i0, i1, c, tile, idx_c.shape[-1], cdt) / (1.0 - dropout_p)
        o = (e.to(mdt) @ vg).to(cdt)  # [B, H, c, T, Dv]
        out[:, :, i0:i1] = (o / torch.where(den > 0, den, 1.0)).reshape(b, h, c * tile, dv)[:, :, :i1 - i0]
    return out, lse


def _keep_tiles(keep: Tensor, i0: int, i1: int, c: int, tile: int, Lc: int, cdt: torch.dtype) -> Tensor:
    """The dropout keep mask of the chunk's rows and first Lc slots as [B, H, c, T, Lc] (padded rows: 0)."""
    return _padded_rows(keep[:, :, i0:i1, :Lc].to(cdt), c * tile).reshape(keep.shape[0], keep.shape[1], c, tile, Lc)


def tiled_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, idx: Tensor,
                             mask: Tensor | None, is_causal: bool, scale: float, tile: int, dropout_p: float,
                             seed: Tensor | None, mask_grad: bool = False, *, chunk: int | None = None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
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
    kc, vc = k.to(mdt), v.to(mdt)
    step = _chunk_tiles(nt, b * h * L * (2 * tile + 2 * d + 2 * dv), chunk)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1, c = t0 * tile, min(nq, t1 * tile), t1 - t0
        idx_c = _trim(idx[:, :, t0:t1])
        kg, vg = _gather_rows(kc, idx_c, h), _gather_rows(vc, idx_c, h)  # [B, H, c, L', D|Dv]
        q_t, do_t = _tiles(qs, i0, c, tile), _tiles(do, i0, c, tile)
        ok, bias = _slot_ok(idx_c, mask, is_causal, i0, i1, tile, cdt)
        s = _logits(q_t, kg, ok, bias, cdt)  # [B, H, c, T, L']
        if own_max:
            p, _ = _exp_rows(s)
            p /= torch.where((den := p.sum(-1, keepdim=True)) > 0, den, 1.0)
        else:
            p = s.sub_(_tiles(lse_p, i0, c, tile)).exp_()  # -inf slots -> 0
        dp = (do_t @ vg.transpose(-1, -2)).to(cdt)  # [B, H, c, T, L']
        pd = p
        if keep is not None:
            ks = _keep_tiles(keep, i0, i1, c, tile, idx_c.shape[-1], cdt) / (1.0 - dropout_p)
            dp *= ks
            pd = p * ks
        dv_rows = pd.to(mdt).transpose(-1, -2) @ do_t  # [B, H, c, L', Dv] (before p is overwritten by dS)
        # delta = rowsum(P * dP), not rowsum(dout * out): equal in exact arithmetic, but this one cancels exactly
        # where the dense formulation does (one kept key: dS = 0), keeping the error within 2x dense's
        delta = (p * dp).sum(-1, keepdim=True)
        ds = p.mul_(dp.sub_(delta))  # dS = P (dP - delta), in place over p
        ds_m = ds.to(mdt)
        dq[:, :, i0:t1 * tile] = (ds_m @ kg).reshape(b, h, c * tile, d)
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
