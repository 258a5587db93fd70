"""Query-tile sparse attention (issue 9): plain-PyTorch semantics and the CPU path, one function per stage.

Semantics (docs/OPS.md, "query tiles"):
1. Queries form tiles of T consecutive positions (the last may be short); tile t holds queries t*T .. t*T+T-1.
2. A tile may see the keys some query of it may attend to (mask allows: bool True / finite bias; causal j <= i).
   For sizing only, a padding bias <= finfo(dtype).min / 2 counts as not allowed:
   L_tile = lowering.formulas.attention_tile_keys(allowed_tile, density, min_keys).
3. Estimated mass of key j for the tile = sum over its scored queries i of softmax_j over i's allowed keys of
   the estimated logits scale * q_i.k^_j + bias_ij (k^ the PQ reconstruction); the scored queries are every
   select_stride-th one counted back from the tile's last (lowering.formulas.attention_scored_row; stride 1:
   all of them), the other queries still attend. The tile keeps its top L_tile keys
   by that mass (ties: lower key first), listed ascending, then -1 up to L_max
   (lowering.formulas.attention_tile_slots, shapes only).
4. Each query attends exactly (softmax of scale * q.k + bias) over its tile's kept keys that it may attend to;
   a query with none gives zeros. Exact mode lists every key some query of the tile may attend to.
5. Backward: exact gradients of 4 w.r.t. q, k, v and a floating mask that requires grad.

The attention stages multiply only the kept keys: per chunk of tiles they gather the tile's K/V rows and run
batched GEMMs [T, D] x [D, L] over (batch, head, tile); slots past the chunk's longest list are trimmed, so
short (early causal, padded) tiles cost less. Transient memory is O(chunk * T * L), saved memory idx + lse.
"""
from __future__ import annotations

import torch
from torch import Tensor

from spt_compile.lowering.formulas import attention_num_tiles, attention_scored_row, attention_tile_keys
from spt_compile.lowering.reference.pq_attention import (_add_mask_grad, _slot_softmax, compute_dtype,
                                                         dropout_keep, reconstruct_keys)

_CHUNK_ELEMS = 1 << 22  # largest transient per tile chunk, in elements (as in pq_attention)


def tile_chunk(n_tiles: int, elems_per_tile: int, chunk: int | None = None, budget: int = _CHUNK_ELEMS) -> int:
    """Tiles per chunk so that the chunk's largest transient holds about `budget` elements (or `chunk`)."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return chunk
    return max(1, min(n_tiles, budget // max(1, elems_per_tile)))


def _rows(mask: Tensor, i0: int, i1: int) -> Tensor:
    return mask if mask.shape[2] == 1 else mask[:, :, i0:i1]


def query_allowed(mask: Tensor | None, is_causal: bool, i0: int, i1: int, nk: int, cdt: torch.dtype,
                  device: torch.device, padding_too: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """(allowed, bias) of query rows i0:i1, broadcastable to [B, H, i1 - i0, Nk] (None = all / no bias).

    padding_too=False also marks keys with a padding bias (<= finfo(mask.dtype).min / 2) not allowed: the
    sizing rule of step 2. A finite bias is clamped into cdt's range (an fp64 finfo.min stays finite in fp32)."""
    allowed = bias = None
    if mask is not None:
        m = _rows(mask, i0, i1)
        if m.dtype == torch.bool:
            allowed = m
        else:
            allowed = torch.isfinite(m)
            if not padding_too:
                allowed = allowed & (m > torch.finfo(m.dtype).min / 2)
            fin = torch.finfo(cdt)
            bias = m.to(cdt).clamp(fin.min, fin.max)
    if is_causal:
        causal = torch.arange(nk, device=device)[None, :] <= torch.arange(i0, i1, device=device)[:, None]
        allowed = causal if allowed is None else allowed & causal
    return allowed, bias


def scored_rows(i0: int, i1: int, nq: int, tile: int, stride: int, device: torch.device) -> Tensor:
    """[i1 - i0] bool: which query positions i0 .. i1 - 1 (i0 at a tile start) score keys in the selection."""
    pos = torch.arange(i0, i1, device=device)
    start = pos - pos % tile
    return attention_scored_row(pos - start, torch.clamp(nq - start, max=tile), stride)


def _tile_view(x: Tensor, c: int, tile: int) -> Tensor:
    """[B, H, rows, X] (rows <= c * T, the last tile possibly short) -> [B, H, c, T, X], zero padded."""
    b, h, rows, xd = x.shape
    if rows < c * tile:
        x = torch.cat([x, x.new_zeros((b, h, c * tile - rows, xd))], 2)
    return x.reshape(b, h, c, tile, xd)


def _tile_any(a: Tensor, c: int, tile: int) -> Tensor:
    """[Bm, Hm, rows or 1, Nk] (or [rows, Nk]) bool -> [Bm, Hm, c, Nk]: allowed for some query of each tile
    (padded rows add nothing). Reduces at the mask's own broadcast shape: callers expand the result."""
    while a.dim() < 4:
        a = a[None]
    if a.shape[2] == 1:  # the query dim broadcasts: every tile sees the same row
        return a.expand(a.shape[0], a.shape[1], c, a.shape[3])
    return _tile_view(a.to(torch.uint8), c, tile).amax(3).bool()


def _ascending_first(keys: Tensor, valid: Tensor, L: int) -> Tensor:
    """Valid keys of each row ascending, then -1, in L slots. keys/valid [.., K] with K >= valid count."""
    big = torch.iinfo(torch.int64).max
    order = torch.where(valid, keys.long(), big).sort(-1).values[..., :L]
    return torch.where(order == big, -1, order).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------------

def tile_allowed_indices(mask: Tensor | None, is_causal: bool, shape: tuple[int, int, int, int], tile: int,
                         L: int, device: torch.device, *, chunk: int | None = None) -> Tensor:
    """Exact mode: idx [B, H, ceil(Nq/T), L] int32 listing every key some query of the tile may attend to,
    ascending, then -1 (L >= the longest list, e.g. attention_tile_slots at density 1)."""
    b, h, nq, nk = shape
    nt = attention_num_tiles(nq, tile)
    idx = torch.full((b, h, nt, L), -1, dtype=torch.int32, device=device)
    step = tile_chunk(nt, b * h * tile * nk, chunk)
    keys = torch.arange(nk, device=device)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1 = t0 * tile, min(nq, t1 * tile)
        allowed, _ = query_allowed(mask, is_causal, i0, i1, nk, torch.float32, device)
        if allowed is None:
            n = min(nk, L)
            idx[:, :, t0:t1, :n] = keys[:n].to(torch.int32)
            continue
        union = _tile_any(allowed, t1 - t0, tile).expand(b, h, t1 - t0, nk)  # [B, H, c, Nk]
        if int(union.sum(-1).max()) > L:
            raise ValueError(f"a tile may see {int(union.sum(-1).max())} keys, more than its L={L} slots")
        idx[:, :, t0:t1] = _ascending_first(keys.expand(union.shape), union, L)
    return idx


def select_tiles(q: Tensor, codebooks: Tensor, codes: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
                 tile: int, density: float, min_keys: int, L: int, *, stride: int = 1, group: int = 1,
                 chunk: int | None = None) -> Tensor:
    """idx [B, H, ceil(Nq/T), L] int32: per tile its top-L_tile keys by the per-query-normalised PQ mass summed
    over the tile's scored queries (every stride-th, counted back from its last).

    group = G > 1 (share_kv_lists, lowering.formulas.attention_list_group): G consecutive query heads keep ONE
    list per tile, by the mass summed over their heads too; the group's tile may see the keys some query of
    some of its heads may attend to (the sizing of step 2 over that union). G = 1 is per-head lists."""
    b, h, nq, d = q.shape
    hkv, nk = codes.shape[1], codes.shape[2]
    grp = h // hkv
    ng = check_group(h, group)
    nt = attention_num_tiles(nq, tile)
    khat_t = reconstruct_keys(codebooks, codes).transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Nk] fp32
    idx = torch.full((b, ng, nt, L), -1, dtype=torch.int32, device=q.device)
    step = tile_chunk(nt, b * h * tile * nk, chunk)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1, c = t0 * tile, min(nq, t1 * tile), t1 - t0
        qs = q[:, :, i0:i1].to(torch.float32).reshape(b, hkv, grp, i1 - i0, d)
        s = (qs @ khat_t).reshape(b, h, i1 - i0, nk) * scale  # [B, H, rows, Nk] estimated logits
        allowed, bias = query_allowed(mask, is_causal, i0, i1, nk, torch.float32, q.device)
        if bias is not None:
            s = s + bias
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        scored = scored_rows(i0, i1, nq, tile, stride, q.device).to(s.dtype)[:, None]  # [rows, 1] 0/1
        mass = _tile_view(_slot_softmax(s) * scored, c, tile).sum(3)  # [B, H, c, Nk]: per-query softmax, summed
        del s
        mass = mass.reshape(b, ng, group, c, nk).sum(2)  # [B, H/G, c, Nk]: and over the group's heads
        if allowed is None:
            union = torch.ones((b, ng, c, nk), dtype=torch.bool, device=q.device)
            sizing = torch.full((b, ng, c), nk, dtype=torch.int64, device=q.device)
        else:
            union = group_any(_tile_any(allowed, c, tile).expand(b, h, c, nk), group)
            strict, _ = query_allowed(mask, is_causal, i0, i1, nk, torch.float32, q.device, padding_too=False)
            sizing = group_any(_tile_any(strict, c, tile).expand(b, h, c, nk), group).sum(-1)
        l_tile = torch.minimum(attention_tile_keys(sizing, density, min_keys), union.sum(-1))  # [B, H/G, c]
        kk = min(L, nk)
        # stable descending sort: equal masses keep the lower key first (a deterministic contract)
        top = torch.sort(mass.masked_fill(~union, -1.0), dim=-1, descending=True, stable=True).indices[..., :kk]
        valid = torch.arange(kk, device=q.device) < l_tile[..., None]  # first L_tile by mass (all candidates)
        idx[:, :, t0:t1] = _ascending_first(top, valid, L)
    return idx.repeat_interleave(group, dim=1) if group > 1 else idx  # [B, H, nT, L]


def check_group(heads: int, group: int) -> int:
    """Groups of `group` consecutive query heads; `group` must divide the number of heads. Returns H / G."""
    if not isinstance(group, int) or group < 1 or heads % group:
        raise ValueError(f"group={group!r} must be a positive int dividing the {heads} query heads")
    return heads // group


def group_any(x: Tensor, group: int) -> Tensor:
    """[B, H, c, Nk] bool -> [B, H/G, c, Nk]: True where some head of the group has it. A head dim broadcast
    by expand (stride 0: every head alike) is sliced, not reduced."""
    if group == 1:
        return x
    if x.stride(1) == 0:
        return x[:, ::group]
    b, h, c, nk = x.shape
    return x.reshape(b, h // group, group, c, nk).any(2)


# ----------------------------------------------------------------------------------------------------------
# attention over the kept keys (forward, backward)
# ----------------------------------------------------------------------------------------------------------

def _gather_rows(x: Tensor, idx_c: Tensor, h: int) -> Tensor:
    """x [B, Hkv, Nk, X] rows at idx_c [B, H, c, L] (-1 -> row 0) -> [B, H, c, L, X]; head h reads kv head
    h // (H // Hkv). One index_select on the flattened rows (the GEMM operands of the tile)."""
    b, hkv, nk, xd = x.shape
    return x.reshape(b * hkv * nk, xd).index_select(0, _flat_index(idx_c, hkv, nk).reshape(-1)).reshape(
        idx_c.shape + (xd,))


def _flat_index(idx_c: Tensor, hkv: int, nk: int) -> Tensor:
    b, h, c, L = idx_c.shape
    kvh = torch.arange(h, device=idx_c.device) // (h // hkv)
    base = (torch.arange(b, device=idx_c.device)[:, None] * hkv + kvh[None, :]) * nk  # [B, H]
    return base[:, :, None, None] + idx_c.long().clamp(min=0)  # [B, H, c, L] int64


def _tile_logits(q_t: Tensor, kg: Tensor, idx_c: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
                 i0: int, i1: int, tile: int) -> Tensor:
    """s [B, H, c, T, L] = scale * q.k + bias at the tile's kept keys; -inf where the query may not attend
    (empty slot, mask, causality) and on the padded rows of a short last tile."""
    b, h, c, L = idx_c.shape
    s = (q_t @ kg.transpose(-1, -2)) * scale  # [B, H, c, T, L]
    rows = torch.arange(i0, i0 + c * tile, device=q_t.device).reshape(c, tile)  # [c, T] query positions
    ok = (idx_c >= 0)[:, :, :, None, :] & (rows < i1)[None, None, :, :, None]  # [B, H, c, T, L]
    if is_causal:
        ok = ok & (idx_c[:, :, :, None, :] <= rows[None, None, :, :, None])
    if mask is not None:
        got = _gather_mask(mask, idx_c, i0, i1, tile)  # [B, H, c, T or 1, L]
        if got.dtype == torch.bool:
            ok = ok & got
        else:
            fin = torch.finfo(s.dtype)
            finite = torch.isfinite(got)
            ok = ok & finite
            s = s + torch.where(finite, got.to(s.dtype).clamp(fin.min, fin.max), 0.0)
    return s.masked_fill(~ok, float("-inf"))


def _gather_mask(mask: Tensor, idx_c: Tensor, i0: int, i1: int, tile: int) -> Tensor:
    """The mask at the tile's kept keys: [B, H, c, 1, L] when the query dim broadcasts (padding masks, ALiBi:
    no per-row work), else [B, H, c, T, L] (rows past i1 of a short last tile repeat row i1 - 1)."""
    b, h, c, L = idx_c.shape
    nk = mask.shape[3]
    index = idx_c.long().clamp(min=0)
    if mask.shape[2] == 1:
        m = mask[:, :, 0].expand(b, h, nk)
        return torch.gather(m, -1, index.reshape(b, h, c * L)).reshape(b, h, c, 1, L)
    rows = torch.arange(i0, i0 + c * tile, device=idx_c.device).clamp(max=i1 - 1)
    m = mask[:, :, rows].expand(b, h, c * tile, nk).reshape(b, h, c, tile, nk)
    return torch.gather(m, -1, index[:, :, :, None, :].expand(b, h, c, tile, L))


def _trim(idx_c: Tensor) -> Tensor:
    """Drop the trailing slots that are -1 in every tile of the chunk (lists are valid-first)."""
    n = int((idx_c >= 0).sum(-1).max()) if idx_c.numel() else 0
    return idx_c[..., :max(1, n)]


def tiled_attention_forward(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, mask: Tensor | None, is_causal: bool,
                            scale: float, tile: int, dropout_p: float, seed: Tensor | None, *,
                            chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, H, Nq, Dv] q.dtype, lse [B, H, Nq] fp32) of step 4 over the tiled idx [B, H, nT, L]."""
    b, h, nq, d = q.shape
    dv = v.shape[3]
    nt, L = idx.shape[2], idx.shape[3]
    cdt = compute_dtype(q.dtype)
    out = q.new_empty((b, h, nq, dv))
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    keep = dropout_keep((b, h, nq, L), dropout_p, seed, q.device) if dropout_p > 0 else None
    kc, vc = k.to(cdt), v.to(cdt)
    step = tile_chunk(nt, b * h * L * (tile + d + dv), chunk)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1, c = t0 * tile, min(nq, t1 * tile), t1 - t0
        idx_c = _trim(idx[:, :, t0:t1])
        kg, vg = _gather_rows(kc, idx_c, h), _gather_rows(vc, idx_c, h)  # [B, H, c, L', D|Dv]
        q_t = _tile_view(q[:, :, i0:i1].to(cdt), c, tile)  # [B, H, c, T, D]
        s = _tile_logits(q_t, kg, idx_c, mask, is_causal, scale, i0, i1, tile)  # [B, H, c, T, L']
        mx = s.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, 0.0)
        e = torch.exp(s - mx)
        den = e.sum(-1, keepdim=True)
        lse[:, :, i0:i1] = (mx + torch.log(den)).reshape(b, h, c * tile)[:, :, :i1 - i0].to(torch.float32)
        if keep is not None:
            e = e * _tile_view(keep[:, :, i0:i1, :idx_c.shape[-1]].to(cdt), c, tile) / (1.0 - dropout_p)
        o = (e @ vg) / torch.where(den > 0, den, 1.0)  # [B, H, c, T, Dv]
        out[:, :, i0:i1] = o.reshape(b, h, c * tile, dv)[:, :, :i1 - i0].to(q.dtype)
    return out, lse


def tiled_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, idx: Tensor,
                             mask: Tensor | None, is_causal: bool, scale: float, tile: int, dropout_p: float,
                             seed: Tensor | None, mask_grad: bool = False, *, chunk: int | None = None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dmask) of tiled_attention_forward's out (dmask None unless mask_grad), written by hand:
    P recomputed from the row's own max and sum (never exp(s - lse), see pq_attention), dS = P (dP - delta),
    dq = scale dS K_tile, and the tile's dK / dV rows added back to their keys with one index_add_ per chunk
    (GQA: every query head of a kv head adds into the same rows)."""
    b, h, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    nt, L = idx.shape[2], idx.shape[3]
    cdt = compute_dtype(q.dtype)
    if mask_grad and (mask is None or not mask.dtype.is_floating_point):
        raise ValueError("mask_grad needs a floating (additive) mask")
    dq = q.new_empty((b, h, nq, d))
    dk = torch.zeros((b * hkv * nk, d), dtype=cdt, device=q.device)
    dvv = torch.zeros((b * hkv * nk, dv), dtype=cdt, device=q.device)
    dmask = torch.zeros(mask.shape, dtype=cdt, device=q.device) if mask_grad else None
    keep = dropout_keep((b, h, nq, L), dropout_p, seed, q.device) if dropout_p > 0 else None
    kc, vc = k.to(cdt), v.to(cdt)
    step = tile_chunk(nt, b * h * L * (2 * tile + 2 * d + 2 * dv), chunk)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1, c = t0 * tile, min(nq, t1 * tile), t1 - t0
        idx_c = _trim(idx[:, :, t0:t1])
        Lc = idx_c.shape[-1]
        kg, vg = _gather_rows(kc, idx_c, h), _gather_rows(vc, idx_c, h)  # [B, H, c, L', D|Dv]
        q_t = _tile_view(q[:, :, i0:i1].to(cdt), c, tile)  # [B, H, c, T, D]
        do = _tile_view(dout[:, :, i0:i1].to(cdt), c, tile)  # [B, H, c, T, Dv]
        p = _slot_softmax(_tile_logits(q_t, kg, idx_c, mask, is_causal, scale, i0, i1, tile))  # [B, H, c, T, L']
        dp = do @ vg.transpose(-1, -2)  # [B, H, c, T, L']
        pd = p
        if keep is not None:
            ks = _tile_view(keep[:, :, i0:i1, :Lc].to(cdt), c, tile) / (1.0 - dropout_p)
            dp, pd = dp * ks, p * ks
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # [B, H, c, T, L']
        dq[:, :, i0:i1] = ((ds @ kg) * scale).reshape(b, h, c * tile, d)[:, :, :i1 - i0].to(q.dtype)
        flat = _flat_index(idx_c, hkv, nk).reshape(-1)
        # empty slots point at key 0 of their kv head but carry dS = 0 and P = 0: they add nothing
        dk.index_add_(0, flat, ((ds.transpose(-1, -2) @ q_t) * scale).reshape(-1, d))
        dvv.index_add_(0, flat, (pd.transpose(-1, -2) @ do).reshape(-1, dv))
        if dmask is not None:
            _add_mask_grad(dmask, _ds_on_keys(ds, idx_c, nk, i1 - i0), i0, i1)
    dk = dk.reshape(b, hkv, nk, d).to(k.dtype)
    dvv = dvv.reshape(b, hkv, nk, dv).to(v.dtype)
    return dq, dk, dvv, None if dmask is None else dmask.to(mask.dtype)


def _ds_on_keys(ds: Tensor, idx_c: Tensor, nk: int, rows: int) -> Tensor:
    """dS [B, H, c, T, L] -> [B, H, rows, Nk] on the keys (0 where not kept) for the mask gradient."""
    b, h, c, tile, L = ds.shape
    index = idx_c.long().clamp(min=0)[:, :, :, None, :].expand(b, h, c, tile, L)
    dense = torch.zeros((b, h, c, tile, nk), dtype=ds.dtype, device=ds.device).scatter_add_(-1, index, ds)
    return dense.reshape(b, h, c * tile, nk)[:, :, :rows]
