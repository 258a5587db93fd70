"""The fast plain-PyTorch selection of query-tile attention (CPU tensors, and any device without tile kernels):
lowering/reference/tiled_attention.select_tiles (the semantics) laid out for a CPU, where memory passes, not
FLOPs, cost the time:
- only the scored queries (every select_stride-th of a tile, lowering.formulas.attention_scored_row) are
  multiplied: their rows are gathered once, so stride s divides the N x N work (GEMM, softmax) by s;
- chunks of tiles sized to stay in the core's L2 cache, scale folded into q, causal chunks score only the keys
  they can see, bf16 scoring where attention_tiled_cpu.scoring_dtype says so (CPUs with AMX or AVX512-BF16);
- one GEMM of estimated logits, max / exp / sum in place, and the per-query normalisation and the tile sum as
  one small batched GEMM (w [S] . e [S, Nk]);
- top-L by one topk over unique int64 keys (mass bits, then lower key first: the reference's tie order; unsorted
  where every tile of a chunk keeps as many keys), listed ascending by a mark-and-compact pass, not a sort;
- shared lists (group G > 1): the masses of a group's heads are summed before the top-L, which then runs once per
  group (the union and sizing are the group's too).
"""
from __future__ import annotations

import torch
from torch import Tensor

from spt_compile.lowering.attention_tiled_cpu import _chunk_tiles, _padded_rows, _rows_padded, scoring_dtype
from spt_compile.lowering.formulas import attention_num_tiles, attention_scored_row, attention_tile_keys
from spt_compile.lowering.reference.pq_attention import reconstruct_keys
from spt_compile.lowering.reference.tiled_attention import _tile_any, check_group, group_any, query_allowed


def select_tiles(q: Tensor, codebooks: Tensor, codes: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
                 tile: int, density: float, min_keys: int, L: int, *, stride: int = 1, group: int = 1,
                 chunk: int | None = None) -> Tensor:
    """idx [B, H, ceil(Nq/T), L] int32, as reference.tiled_attention.select_tiles (same tie order)."""
    b, h, nq, d = q.shape
    hkv, nk = codes.shape[1], codes.shape[2]
    grp = h // hkv
    ng = check_group(h, group)
    nt = attention_num_tiles(nq, tile)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    gdt = scoring_dtype(q)
    # [B, Hkv, D, Nk] contiguous: with a transposed view the bf16 GEMM copies its operand on every chunk
    khat_t = reconstruct_keys(codebooks, codes).to(gdt).transpose(-1, -2).contiguous()
    qs = _padded_rows((q.to(cdt) * scale).to(gdt), nt * tile).reshape(b, hkv, grp, nt * tile, d)  # [B,Hkv,g,Nq',D]
    pos, valid = scored_positions(nq, tile, stride, q.device)  # [nT, S]
    S = pos.shape[1]
    if stride > 1:
        qs = qs.index_select(3, pos.reshape(-1))  # [B, Hkv, g, nT * S, D]: the scored rows only
    idx = torch.full((b, ng, nt, L), -1, dtype=torch.int32, device=q.device)
    step = _chunk_tiles(nt, b * h * S * nk, chunk) if chunk is not None else _select_chunk(nt, b * h * S * nk, S)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        i0, i1, c = t0 * tile, min(nq, t1 * tile), t1 - t0
        kmax = min(nk, i1) if is_causal else nk  # top-left causal: no query of the chunk sees key >= i1
        m_c = None if mask is None else mask[..., :kmax]  # causal chunks: keys >= K are not allowed anyway
        rows = _RowSet(pos[t0:t1], valid[t0:t1], i0, i1, stride)
        mass, allowed = _tile_mass(qs[:, :, :, t0 * S:t1 * S], khat_t[..., :kmax], m_c, is_causal, rows, b, h, cdt)
        if group > 1:
            mass = mass.reshape(b, ng, group, t1 - t0, kmax).sum(2)  # [B, H/G, c, K]: the group's heads too
        union, sizing = _union_sizing(allowed, m_c, is_causal, rows, tile, kmax, nk, b, h, group)
        l_tile = torch.minimum(attention_tile_keys(sizing, density, min_keys), union.sum(-1))  # [B, H/G, c]
        idx[:, :, t0:t1] = _top_lists(mass, union, l_tile, L)
    return idx.repeat_interleave(group, dim=1) if group > 1 else idx  # [B, H, nT, L]


# Scored rows per head in one chunk's GEMM, at least: the cache budget alone gives one tile per chunk at GPT-2
# widths (12 heads x 16 scored rows x 2048 keys already fill it), i.e. thin [16, D] x [D, K] GEMMs and ~30 small
# ops per tile. At stride 4 (S = 16, 4 tiles a chunk) the selection runs 1.1-2.0x faster than at one tile a chunk
# (N = 1024-8192, 8 and 12 heads, causal and not: bench/results/attention-tiles-chunks-cpu.md, 2-core EPYC);
# 8-16 tiles a chunk gained no more or lost in a scratch sweep on the same machine.
_MIN_SCORED_ROWS = 64


def _select_chunk(n_tiles: int, elems_per_tile: int, scored: int) -> int:
    """Tiles per selection chunk: the L2 budget, raised to _MIN_SCORED_ROWS scored rows (S = `scored` a tile)."""
    return max(_chunk_tiles(n_tiles, elems_per_tile, None), min(n_tiles, -(-_MIN_SCORED_ROWS // scored)))


def scored_positions(nq: int, tile: int, stride: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(pos [nT, S] int64, valid [nT, S] bool): the query positions each tile scores, valid slots first and
    ascending, S = ceil(T / stride) slots. Stride 1: every row of the row-padded tiles (padded rows invalid,
    clamped to the last query). Stride > 1: the rows attention_scored_row picks (a short last tile scores fewer:
    its invalid slots point at its first query). Invalid slots weigh 0 and are a query of their own tile, so
    they change neither the mass nor the union."""
    nt = attention_num_tiles(nq, tile)
    start = torch.arange(nt, device=device)[:, None] * tile  # [nT, 1]
    if stride == 1:
        p = start + torch.arange(tile, device=device)
        return p.clamp(max=nq - 1), p < nq
    S = (tile - 1) // stride + 1
    local = torch.arange(tile, device=device)  # [T]
    real = torch.clamp(nq - start, max=tile)  # [nT, 1] queries per tile
    scored = (local < real) & attention_scored_row(local, real, stride)  # [nT, T]
    first = torch.where(scored, local, tile).sort(-1).values[:, :S]  # scored rows first, ascending; T = none
    return start + first.masked_fill(first == tile, 0), first < tile


class _RowSet:
    """The scored rows of one chunk: pos / valid [c, S]; i0, i1 the chunk's query range; contiguous when they
    are the chunk's rows in order (stride 1: masks are sliced, not gathered)."""

    def __init__(self, pos: Tensor, valid: Tensor, i0: int, i1: int, stride: int):
        self.pos, self.valid, self.i0, self.i1 = pos, valid, i0, i1
        self.c, self.S = pos.shape
        self.contiguous = stride == 1

    def allowed(self, mask: Tensor | None, is_causal: bool, kmax: int, cdt: torch.dtype, padding_too: bool = True):
        """(allowed, bias) of the scored rows, broadcastable to [B, H, c * S, K] (None = all / no bias)."""
        if self.contiguous:
            allowed, bias = query_allowed(mask, is_causal, self.i0, self.i1, kmax, cdt, self.pos.device, padding_too)
            rows = self.c * self.S
            return (None if allowed is None else _rows_padded(allowed, rows),
                    None if bias is None else _rows_padded(bias, rows))
        if mask is not None and mask.shape[2] > 1:
            mask = mask.index_select(2, self.pos.reshape(-1))
        allowed, bias = query_allowed(mask, False, 0, self.c * self.S, kmax, cdt, self.pos.device, padding_too)
        if is_causal:
            cz = torch.arange(kmax, device=self.pos.device)[None, :] <= self.pos.reshape(-1, 1)
            allowed = cz if allowed is None else allowed & cz
        return allowed, bias


def _tile_mass(qs_c: Tensor, khat_t: Tensor, mask: Tensor | None, is_causal: bool, rows: _RowSet, b: int, h: int,
               cdt: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(mass [B, H, c, K], allowed of the scored rows or None) of one chunk of c tiles over the first K keys:
    mass = sum over each tile's scored queries of the query's softmax of the estimated logits."""
    c, S, kmax = rows.c, rows.S, khat_t.shape[-1]
    # one 4-D GEMM per kv head over its g query heads' rows (a 5-D broadcast matmul copies the sliced k^ operand)
    s = (qs_c.reshape(b, khat_t.shape[1], -1, qs_c.shape[-1]) @ khat_t).reshape(b, h, c * S, kmax).to(cdt)
    allowed, bias = rows.allowed(mask, is_causal, kmax, s.dtype)
    if bias is not None:
        s += bias
    if allowed is not None:
        s.masked_fill_(~allowed, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    s.sub_(torch.where(torch.isfinite(mx), mx, 0.0)).exp_()  # e = exp(s - max); 0 where not allowed
    den = s.sum(-1)  # [B, H, c*S]
    w = torch.where((den > 0) & rows.valid.reshape(-1), 1.0 / den, 0.0)  # invalid (padding) slots add nothing
    mass = (w.reshape(b, h, c, 1, S) @ s.reshape(b, h, c, S, kmax)).reshape(b, h, c, kmax)
    return mass, allowed


def _union_sizing(allowed: Tensor | None, mask: Tensor | None, is_causal: bool, rows: _RowSet, tile: int,
                  kmax: int, nk: int, b: int, h: int, group: int = 1) -> tuple[Tensor, Tensor]:
    """(union [B, H/G, c, K] bool, sizing [B, H/G, c]) over ALL queries of each tile (and of the G heads of a
    group). The scored rows' masks serve when they cover the same keys: stride 1, or masks without a query dim
    (invalid slots repeat a query of their own tile); a per-query mask at stride > 1 is re-read for every row."""
    c, dev, hg = rows.c, rows.pos.device, h // group
    if allowed is None:
        union = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=dev).expand(b, hg, c, kmax)
        return union, torch.full((b, hg, c), nk, dtype=torch.int64, device=dev)
    if mask is None:  # causal only: a tile sees the keys up to its last query, none of them padding
        last = (rows.pos * rows.valid).amax(-1)  # [c]
        union = (torch.arange(kmax, device=dev) <= last[:, None]).expand(b, hg, c, kmax)
        return union, union.sum(-1)
    if rows.contiguous or mask.shape[2] == 1:
        strict, _ = rows.allowed(mask, is_causal, kmax, torch.float32, padding_too=False)
        per_tile = rows.S
    else:
        allowed, _ = query_allowed(mask, is_causal, rows.i0, rows.i1, kmax, torch.float32, dev)
        strict, _ = query_allowed(mask, is_causal, rows.i0, rows.i1, kmax, torch.float32, dev, padding_too=False)
        per_tile = tile
    union, strict = _tile_any(allowed, c, per_tile), _tile_any(strict, c, per_tile)  # at the mask's broadcast shape
    if union.shape[1] > 1:  # a per-head mask: the group's union (a head-less mask is the same for every head)
        union, strict = group_any(union, group), group_any(strict, group)
    return union.expand(b, hg, c, kmax), strict.sum(-1).expand(b, hg, c)


def _top_lists(mass: Tensor, union: Tensor, l_tile: Tensor, L: int) -> Tensor:
    """[B, H, c, L] int32: per tile the first l_tile keys by (mass desc, key asc) among union, ascending, -1 after."""
    kmax = mass.shape[-1]
    kk = min(L, kmax, int(l_tile.max()) if l_tile.numel() else 0)
    out = torch.full(mass.shape[:3] + (L,), -1, dtype=torch.int32, device=mass.device)
    if kk == 0:
        return out
    uniform = False
    if mass.dtype == torch.float64:  # fp64 bits do not fit beside the key: the reference's stable sort
        keys = mass.masked_fill(~union, -1.0)
        top = torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :kk]
    else:  # unique sort keys: masses are >= 0, so their fp32 bits order like the values; -1 outside the union
        bits = mass.view(torch.int32).to(torch.int64).masked_fill_(~union, -1)
        keys = bits * kmax + (kmax - 1 - torch.arange(kmax, device=mass.device))
        uniform = bool((l_tile == kk).all())  # every tile keeps kk: the set is all that matters, not the rank
        top = keys.topk(kk, dim=-1, sorted=not uniform).indices  # [B, H, c, kk] key positions
    if not uniform:
        top = top.masked_fill(torch.arange(kk, device=top.device) >= l_tile[..., None], kmax)  # past L_tile: drop
    marks = torch.zeros(top.shape[:3] + (kmax + 1,), dtype=torch.bool, device=top.device)
    marks.scatter_(-1, top, True)
    return _compact(marks[..., :kmax], l_tile.clamp(max=kk), out)


def _compact(marks: Tensor, count: Tensor, out: Tensor) -> Tensor:
    """Write the marked key positions of each row of marks [B, H, c, K] ascending into out [B, H, c, L] (count
    [B, H, c] marks per row), -1 after."""
    rows = marks.reshape(-1, marks.shape[-1])
    cols = rows.nonzero()[:, 1]  # row-major: each row's marked keys, ascending
    n = count.reshape(-1)
    flat = out.view(-1, out.shape[-1])
    if bool((n == n[0]).all()):
        flat[:, :int(n[0])] = cols.reshape(flat.shape[0], int(n[0])).to(torch.int32)
        return out
    row = torch.repeat_interleave(torch.arange(flat.shape[0], device=out.device), n)
    slot = torch.arange(cols.numel(), device=out.device) - torch.repeat_interleave(n.cumsum(0) - n, n)
    flat[row, slot] = cols.to(torch.int32)
    return out
