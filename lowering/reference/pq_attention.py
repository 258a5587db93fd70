"""Plain-PyTorch reference of torch.ops.spt.pq_sparse_attention, one function per stage of docs/OPS.md.

Semantics: SEMANTICS below (also the op's docstring).

Reference choices the Triton kernels (kernels/pq.py, attention_*.py) must match:
- k-means init: the centroids of a (batch, kv head, slice) are the key slices at positions
  (c * Nk) // C, c = 0..C-1. Each iteration assigns every key to argmin_c (|c|^2 - 2 x.c) (the |x|^2 term
  does not change the argmin; ties go to the lowest c), then moves each centroid to the mean of its keys;
  an empty cluster keeps its centroid. After `iters` iterations, the codes are re-assigned once more so
  that codes and codebooks agree. Everything in fp32.
- selection scores use k^ = the key reconstructed from its codes (s~ = scale * q.k^ is the lookup-table sum
  written differently); fp32.
- dropout: keep[b, h, i, slot] = rand(B, H, Nq, L; generator seeded with int(seed))[b, h, i, slot] >= p,
  drawn over the full shape at once so that query chunking does not change it. The Triton kernels draw
  from tl.rand instead: each implementation replays its own mask in its own backward, but the two
  implementations' dropout masks differ.

Only the query dimension is chunked (`chunk` rows at a time), so transient memory is O(chunk * Nk) (score
tiles, slot weights summed onto keys), saved memory is the op's O(N * L) idx, and nothing O(Nq * Nk) is ever
allocated except in exact mode's index list, which is that size by definition.
"""
from __future__ import annotations

SEMANTICS = """1. PQ of keys: split D into M = pq_subspaces slices; per (batch, kv head, slice) fit C = pq_centroids
   centroids by a few Lloyd iterations with deterministic init. Each key gets M codes.
2. s~(i,j) = scale * sum_m <q_i slice m, centroid of key j's code in slice m> + additive bias.
3. Allowed keys per the mask (causal, boolean, additive -inf). Query i keeps the top L_i allowed keys by s~,
   L_i = min(allowed_i, max(1, ceil(density * N_keys))).
4. Output: softmax over kept keys of (scale * q_i.k_j + bias_ij), dropout with explicit seed, times V.
5. Backward: exact gradients of step 4 w.r.t. q, k, v and a floating mask that requires grad (dS at the kept
   keys, 0 elsewhere, summed to the mask's shape); selection and codebooks carry no gradient.
GQA: a query head uses its kv head's codebooks. A row with no allowed key -> zeros (eager: NaN); a row whose
keys all carry a finite finfo.min bias attends uniformly, as in eager. Density 1.0 (or Nk < min_seq_len)
equals SDPA.
"""

import math

import torch
from torch import Tensor

from spt_compile.kernels.cpu_tunables import attention_chunk
from spt_compile.lowering.formulas import attention_keys_kept, pq_fit_positions

# Largest transient tile per query chunk, in elements (16 MiB of fp32; a chunk keeps a few such tiles alive):
# big enough that per-chunk Python overhead is negligible, small enough that sequence length does not grow the
# working set.
_CHUNK_ELEMS = 1 << 22


def num_kept(nk: int, density: float) -> int:
    """L per query (docs/OPS.md); the formula lives in lowering/formulas.py."""
    return attention_keys_kept(nk, density)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and accumulation dtype: fp32 for half types and fp32; fp64 stays fp64 (reference-only
    ground-truth mode, where fp32 internals would cap the accuracy the tests rely on)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def query_chunk(nq: int, elems_per_query: int, chunk: int | None = None) -> int:
    """Rows per query chunk so that a chunk's largest transient holds about _CHUNK_ELEMS elements."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return chunk
    return max(1, min(max(nq, 1), _CHUNK_ELEMS // max(1, elems_per_query)))


def _rows(mask: Tensor, i0: int, i1: int) -> Tensor:
    """Rows i0:i1 of a mask broadcastable to [B, H, Nq, Nk] (a size-1 query dim broadcasts)."""
    return mask if mask.shape[2] == 1 else mask[:, :, i0:i1]


def mask_chunk(mask: Tensor | None, is_causal: bool, i0: int, i1: int, nk: int, cdt: torch.dtype,
               device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """(allowed, bias) for query rows i0:i1, each broadcastable to [B, H, i1 - i0, Nk], or None.

    allowed: bool, True where the key may be attended (mask True / finite bias, and j <= i if causal).
    bias: additive bias in `cdt` (None for a bool mask or no mask). A finite bias is clamped into cdt's range
    so that e.g. an fp64 finfo.min padding bias stays finite (= allowed, as docs/OPS.md says) in fp32.
    """
    allowed = bias = None
    if mask is not None:
        m = _rows(mask, i0, i1)
        if m.dtype == torch.bool:
            allowed = m
        else:
            allowed = torch.isfinite(m)
            fin = torch.finfo(cdt)
            bias = m.to(cdt).clamp(fin.min, fin.max)
    if is_causal:
        qi = torch.arange(i0, i1, device=device)
        causal = torch.arange(nk, device=device)[None, :] <= qi[:, None]  # [c, Nk] top-left aligned
        allowed = causal if allowed is None else allowed & causal
    return allowed, bias


# ----------------------------------------------------------------------------------------------------------
# Stage 1: product quantization of the keys
# ----------------------------------------------------------------------------------------------------------

def _assign(x: Tensor, cent: Tensor) -> Tensor:
    """Nearest centroid per key slice. x [G, Nk, ds], cent [G, C, ds] -> codes [G, Nk] int64."""
    g, nk, _ = x.shape
    c = cent.shape[1]
    codes = torch.empty((g, nk), dtype=torch.long, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(1, nk * c))  # groups per slice: dist is [step, Nk, C]
    for g0 in range(0, g, step):
        xs, cs = x[g0:g0 + step], cent[g0:g0 + step]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every c, so it is left out
        dist = torch.baddbmm((cs * cs).sum(-1)[:, None, :], xs, cs.transpose(1, 2), alpha=-2.0)  # [g, Nk, C]
        # min(dim).indices, not argmin: same first-minimum tie rule, ~1.5x faster on CPU over a short last dim
        codes[g0:g0 + step] = dist.min(-1).indices
    return codes


def pq_quantize(k: Tensor, subspaces: int, centroids: int, iters: int) -> tuple[Tensor, Tensor]:
    """k [B, Hkv, Nk, D] -> (codebooks [B, Hkv, M, C, D//M] fp32, codes [B, Hkv, Nk, M] int32).

    Lloyd k-means per (batch, kv head, subspace), all groups batched together (no loop over keys), fitted on the
    keys at formulas.pq_fit_positions (all of them up to PQ_FIT_KEYS); every key is then assigned."""
    b, hkv, nk, d = k.shape
    m, c = subspaces, centroids
    if d % m:
        raise ValueError(f"subspaces={m} must divide the head dim {d}")
    ds = d // m
    g = b * hkv * m
    x = k.to(torch.float32).reshape(b, hkv, nk, m, ds).permute(0, 1, 3, 2, 4).reshape(g, nk, ds)  # [G, Nk, ds]
    fit = pq_fit_positions(nk, k.device)
    xf = x if fit.numel() == nk else x[:, fit]  # [G, F, ds]: the keys the codebooks are fitted on
    nf = xf.shape[1]
    init = (torch.arange(c, device=k.device) * nf) // c  # evenly spaced fit positions (repeat if C > F)
    cent = xf[:, init, :].clone()  # [G, C, ds]
    ones = torch.ones((g, nf), dtype=torch.float32, device=k.device)
    for _ in range(iters):
        codes = _assign(xf, cent)  # [G, F]
        sums = torch.zeros_like(cent).scatter_add_(1, codes[:, :, None].expand(g, nf, ds), xf)  # [G, C, ds]
        counts = torch.zeros((g, c), dtype=torch.float32, device=k.device).scatter_add_(1, codes, ones)
        # an empty cluster keeps its centroid (a fresh random restart would make the result init-order dependent)
        cent = torch.where(counts[:, :, None] > 0, sums / counts.clamp(min=1.0)[:, :, None], cent)
    codes = _assign(x, cent)
    codebooks = cent.reshape(b, hkv, m, c, ds)
    codes = codes.reshape(b, hkv, m, nk).permute(0, 1, 3, 2).to(torch.int32).contiguous()  # [B, Hkv, Nk, M]
    return codebooks, codes


def reconstruct_keys(codebooks: Tensor, codes: Tensor) -> Tensor:
    """k^ [B, Hkv, Nk, D] fp32: every key slice replaced by its centroid."""
    b, hkv, m, c, ds = codebooks.shape
    nk = codes.shape[2]
    sel = codes.permute(0, 1, 3, 2).long()[..., None].expand(b, hkv, m, nk, ds)  # [B, Hkv, M, Nk, ds]
    khat = torch.gather(codebooks, 3, sel)  # [B, Hkv, M, Nk, ds]
    return khat.permute(0, 1, 3, 2, 4).reshape(b, hkv, nk, m * ds)


# ----------------------------------------------------------------------------------------------------------
# Stage 2: top-L selection by PQ score (and the exact-mode index list)
# ----------------------------------------------------------------------------------------------------------

def _masked_scores(s: Tensor, allowed: Tensor | None, bias: Tensor | None) -> Tensor:
    """s + bias where allowed, -inf elsewhere (all broadcast to s's shape)."""
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def select_topk(q: Tensor, codebooks: Tensor, codes: Tensor, mask: Tensor | None, is_causal: bool,
                scale: float, L: int, *, chunk: int | None = None) -> Tensor:
    """idx [B, H, Nq, L] int32: per query the top-L allowed keys by PQ score, valid slots first, -1 = empty."""
    b, h, nq, d = q.shape
    hkv, nk = codes.shape[1], codes.shape[2]
    grp = h // hkv
    khat = reconstruct_keys(codebooks, codes)[:, :, None]  # [B, Hkv, 1, Nk, D] fp32
    q5 = q.reshape(b, hkv, grp, nq, d)  # [B, Hkv, G, Nq, D]: query head h uses kv head h // G
    kk = min(L, nk)
    idx = torch.full((b, h, nq, L), -1, dtype=torch.int32, device=q.device)
    step = query_chunk(nq, b * h * nk, chunk or attention_chunk("select", q, b * h * nk, lambda c: select_topk(
        q, codebooks, codes, mask, is_causal, scale, L, chunk=c)))
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        s = torch.matmul(q5[:, :, :, i0:i1].to(torch.float32), khat.transpose(-1, -2))  # [B, Hkv, G, c, Nk]
        s = s.reshape(b, h, i1 - i0, nk) * scale
        allowed, bias = mask_chunk(mask, is_causal, i0, i1, nk, torch.float32, q.device)
        s = _masked_scores(s, allowed, bias)
        vals, top = s.topk(kk, dim=-1, sorted=False)  # unsorted: ~40% cheaper; only "valid first" is promised
        valid = vals != float("-inf")  # [B, H, c, kk]; False where fewer than kk keys are allowed
        top = torch.where(valid, top, -1)
        if not bool(valid.all()):
            top = _valid_first(top, valid)
        idx[:, :, i0:i1, :kk] = top.to(torch.int32)
    return idx


def _valid_first(top: Tensor, valid: Tensor) -> Tensor:
    """Move the valid slots of each row to the front, keeping their order (a stable partition, no sort)."""
    n_valid = valid.sum(-1, keepdim=True)
    pos = torch.where(valid, valid.cumsum(-1) - 1, n_valid + (~valid).cumsum(-1) - 1)  # [.., kk] destination
    return torch.empty_like(top).scatter_(-1, pos, top)


def allowed_indices(mask: Tensor | None, is_causal: bool, shape: tuple[int, int, int, int],
                    device: torch.device, *, chunk: int | None = None) -> Tensor:
    """Exact mode: idx [B, H, Nq, Nk] int32 listing every allowed key in ascending order, then -1s."""
    b, h, nq, nk = shape
    idx = torch.empty((b, h, nq, nk), dtype=torch.int32, device=device)
    step = query_chunk(nq, b * h * nk, chunk)
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        allowed, _ = mask_chunk(mask, is_causal, i0, i1, nk, torch.float32, device)
        if allowed is None:
            idx[:, :, i0:i1] = torch.arange(nk, dtype=torch.int32, device=device)
            continue
        valid = allowed.expand(b, h, i1 - i0, nk)
        keys = torch.arange(nk, device=device).expand(b, h, i1 - i0, nk)
        idx[:, :, i0:i1] = _valid_first(torch.where(valid, keys, -1), valid).to(torch.int32)
    return idx


# ----------------------------------------------------------------------------------------------------------
# Stages 3-4: exact attention over the kept keys, forward and backward
# ----------------------------------------------------------------------------------------------------------

def dropout_keep(shape: tuple[int, ...], dropout_p: float, seed: Tensor, device: torch.device) -> Tensor:
    """keep [B, H, Nq, L] bool with P(keep) = 1 - dropout_p, a pure function of (shape, seed)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32) >= dropout_p


def _heads(x: Tensor, hkv: int) -> Tensor:
    """[B, H, c, X] -> [B, Hkv, G*c, X]: a kv head's query-head group stacked along rows (a GEMM against that kv
    head then serves the whole group, and a GEMM contracting the rows sums the group, as GQA's dk/dv need)."""
    b, h, c, xd = x.shape
    return x.reshape(b, hkv, (h // hkv) * c, xd)


def _unheads(x: Tensor, h: int) -> Tensor:
    """[B, Hkv, G*c, X] -> [B, H, c, X] (inverse of _heads)."""
    b, hkv, gc, xd = x.shape
    return x.reshape(b, h, gc // (h // hkv), xd)


def _slot_logits(s_dense: Tensor, idx_c: Tensor, safe: Tensor, mask: Tensor | None, is_causal: bool, i0: int,
                 i1: int) -> Tensor:
    """s [B, H, c, L]: the dense chunk logits scale*q.k [B, H, c, Nk] read at the kept keys (safe = idx_c with
    -1 replaced by 0, int64), plus the bias; -inf on empty (-1) or disallowed slots."""
    b, h, c, nk = s_dense.shape
    s = torch.gather(s_dense, -1, safe)
    allowed, bias = mask_chunk(mask, is_causal, i0, i1, nk, s_dense.dtype, s_dense.device)
    ok = idx_c >= 0
    if allowed is not None:  # gather the [.., c, Nk] mask at the kept keys (broadcast dims expand for free)
        ok &= torch.gather(allowed.expand(b, h, c, nk), -1, safe)
    if bias is not None:
        s += torch.gather(bias.expand(b, h, c, nk), -1, safe)
    return torch.where(ok, s, float("-inf"))


def _to_keys(w: Tensor, safe: Tensor, nk: int) -> Tensor:
    """Per-slot weights w [B, H, c, L] summed onto their keys: [B, H, c, Nk] (zero for keys not kept)."""
    dense = torch.zeros(w.shape[:-1] + (nk,), dtype=w.dtype, device=w.device)
    return dense.scatter_add_(-1, safe, w)  # empty slots point at key 0 but carry w = 0


def sparse_attention_forward(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, mask: Tensor | None, is_causal: bool,
                             scale: float, dropout_p: float, seed: Tensor | None, *,
                             chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, H, Nq, Dv] q.dtype contiguous, lse [B, H, Nq] fp32) of softmax attention over idx's keys.

    Per query chunk: logits of the kept slots, softmax over slots, then the slot weights are summed onto
    their keys in a [B, H, c, Nk] tile and multiplied with V. Equivalent to gathering the kept k/v rows, but
    it runs as GEMMs (on CPU a per-query row gather + index_add is 10-50x slower than the dense tile GEMM,
    and the tile is O(chunk * Nk) transient memory, less than the O(chunk * L * D) of gathered rows)."""
    b, h, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    L = idx.shape[3]
    cdt = compute_dtype(q.dtype)
    out = q.new_empty((b, h, nq, dv))
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    keep = dropout_keep((b, h, nq, L), dropout_p, seed, q.device) if dropout_p > 0 else None
    kt, vc = k.to(cdt).transpose(-1, -2), v.to(cdt)  # [B, Hkv, D, Nk], [B, Hkv, Nk, Dv]
    step = query_chunk(nq, b * h * max(nk, L), chunk or attention_chunk("forward", q, b * h * max(nk, L), lambda c:
                       sparse_attention_forward(q, k, v, idx, mask, is_causal, scale, dropout_p, seed, chunk=c)))
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        idx_c = idx[:, :, i0:i1]  # [B, H, c, L]
        safe = idx_c.long().clamp_(min=0)
        s_dense = _unheads(_heads(q[:, :, i0:i1].to(cdt), hkv) @ kt, h) * scale  # [B, H, c, Nk]
        s = _slot_logits(s_dense, idx_c, safe, mask, is_causal, i0, i1)  # [B, H, c, L]
        del s_dense
        # normalise by the row sum (not exp(s - lse)): lse's rounding, eps * |lse|, would otherwise scale
        # every probability of the row by the same relative error
        mx = s.amax(-1, keepdim=True)  # [B, H, c, 1]; -inf for a row with no kept key
        mx = torch.where(torch.isfinite(mx), mx, 0.0)
        e = torch.exp(s - mx)  # [B, H, c, L]; 0 on -inf slots
        den = e.sum(-1, keepdim=True)  # [B, H, c, 1]; 0 only for a row with no kept key
        lse[:, :, i0:i1] = (mx + torch.log(den)).squeeze(-1).to(torch.float32)  # log 0 = -inf for such rows
        if keep is not None:
            e = e * keep[:, :, i0:i1] / (1.0 - dropout_p)
        w = _to_keys(e, safe, nk)  # [B, H, c, Nk]
        o = _unheads(_heads(w, hkv) @ vc, h) / torch.where(den > 0, den, 1.0)  # [B, H, c, Dv]
        out[:, :, i0:i1] = o.to(q.dtype)
    return out, lse


def sparse_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, idx: Tensor,
                              mask: Tensor | None, is_causal: bool, scale: float, dropout_p: float,
                              seed: Tensor | None, *, chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of sparse_attention_forward's out (the stage contract of docs/OPS.md)."""
    dq, dk, dv, _ = sparse_attention_backward_dmask(dout, q, k, v, out, lse, idx, mask, is_causal, scale,
                                                    dropout_p, seed, False, chunk=chunk)
    return dq, dk, dv


def sparse_attention_backward_dmask(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    idx: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
                                    dropout_p: float, seed: Tensor | None, mask_grad: bool, *,
                                    chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dmask) of sparse_attention_forward's out, by the flash-attention identities:
    dP = dout.v (times the dropout scale), delta = rowsum(dout * out) = sum_l P_l dP_l, dS = P * (dP - delta);
    dq = scale * sum_l dS_l k_l; dk_j, dv_j sum the slots that kept key j over the query-head group of its
    kv head (GQA). Slot quantities are summed onto keys in a [B, H, c, Nk] tile and contracted by GEMMs, the
    same tile trick as the forward.

    dmask (only when mask_grad, else None): d out / d bias = dS at the kept allowed keys, 0 elsewhere, summed
    down to mask.shape (its broadcast dims), in mask.dtype.

    P is recomputed from the kept slots' own row max and sum, never as exp(s - lse): in a row whose keys all
    carry a finfo.min-sized bias, lse = m + log(l) rounds to m (log(l) is below m's ulp), so exp(s - lse) would
    give P = 1 per key instead of 1/l. `out` and `lse` are part of the shared signature (the Triton backward
    uses them); the reference needs neither."""
    b, h, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    L = idx.shape[3]
    cdt = compute_dtype(q.dtype)
    if mask_grad and (mask is None or not mask.dtype.is_floating_point):
        raise ValueError("mask_grad needs a floating (additive) mask")
    dq = q.new_empty((b, h, nq, d))
    dk = torch.zeros((b, hkv, nk, d), dtype=cdt, device=k.device)
    dvv = torch.zeros((b, hkv, nk, dv), dtype=cdt, device=k.device)
    dmask = torch.zeros(mask.shape, dtype=cdt, device=mask.device) if mask_grad else None
    keep = dropout_keep((b, h, nq, L), dropout_p, seed, q.device) if dropout_p > 0 else None
    kc, vt = k.to(cdt), v.to(cdt).transpose(-1, -2)  # [B, Hkv, Nk, D], [B, Hkv, Dv, Nk]
    step = query_chunk(nq, b * h * max(nk, L), chunk or attention_chunk("backward", q, b * h * max(nk, L), lambda c:
                       sparse_attention_backward_dmask(dout, q, k, v, out, lse, idx, mask, is_causal, scale,
                                                       dropout_p, seed, mask_grad, chunk=c)))
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        idx_c = idx[:, :, i0:i1]
        safe = idx_c.long().clamp_(min=0)
        q_c = _heads(q[:, :, i0:i1].to(cdt), hkv)  # [B, Hkv, G*c, D]
        do = _heads(dout[:, :, i0:i1].to(cdt), hkv)  # [B, Hkv, G*c, Dv]
        s = _slot_logits(_unheads(q_c @ kc.transpose(-1, -2), h) * scale, idx_c, safe, mask, is_causal, i0, i1)
        p = _slot_softmax(s)  # [B, H, c, L]
        dp = torch.gather(_unheads(do @ vt, h), -1, safe)  # [B, H, c, L] = dout . v_j
        pd = p
        if keep is not None:
            kscale = keep[:, :, i0:i1].to(cdt) / (1.0 - dropout_p)
            dp, pd = dp * kscale, p * kscale
        # delta = rowsum(dout * out) = sum_l P_l dP_l. We use the right-hand form: the same number in exact
        # arithmetic, but built from the same dP it is subtracted from (so e.g. a single kept key gives dS = 0
        # exactly) and free of out's rounding to q.dtype (one bf16 ulp of out would reach every gradient).
        delta = (p * dp).sum(-1, keepdim=True)  # [B, H, c, 1]
        ds_keys = _to_keys(p * (dp - delta), safe, nk)  # [B, H, c, Nk]; 0 off the kept keys
        if dmask is not None:
            _add_mask_grad(dmask, ds_keys, i0, i1)
        ds = _heads(ds_keys, hkv)  # [B, Hkv, G*c, Nk]
        dq[:, :, i0:i1] = _unheads((ds @ kc) * scale, h).to(q.dtype)
        dk += (ds.transpose(-1, -2) @ q_c) * scale  # contracting G*c rows sums the GQA group
        dvv += _heads(_to_keys(pd, safe, nk), hkv).transpose(-1, -2) @ do
    dmask = None if dmask is None else dmask.to(mask.dtype)
    return dq, dk.to(k.dtype), dvv.to(v.dtype), dmask


def _add_mask_grad(dmask: Tensor, ds_keys: Tensor, i0: int, i1: int) -> None:
    """Sum one query chunk's dS [B, H, c, Nk] down to the mask's broadcast shape and add it into dmask."""
    dims = [dim for dim in (0, 1, 3) if dmask.shape[dim] == 1 and ds_keys.shape[dim] > 1]
    g = ds_keys.sum(dim=dims, keepdim=True) if dims else ds_keys
    if dmask.shape[2] == 1:  # the query dim broadcasts: every chunk adds into the same row
        dmask += g.sum(2, keepdim=True)
    else:
        dmask[:, :, i0:i1] += g


def _slot_softmax(s: Tensor) -> Tensor:
    """p [.., L] = softmax over the slots of s, 0 for a row with no finite slot (no kept key)."""
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, 0.0)
    e = torch.exp(s - mx)  # 0 on -inf slots
    den = e.sum(-1, keepdim=True)
    return e / torch.where(den > 0, den, 1.0)
