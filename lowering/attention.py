"""torch.ops.spt.pq_sparse_attention: schema, argument checks, fake impl, autograd, autocast, dispatch.

The forward and its backward are two custom ops (`spt::pq_sparse_attention`,
`spt::pq_sparse_attention_backward`), so each stays one opaque node in inductor's forward and backward
graphs (a Python backward would be traced op by op, and the reference's torch.Generator is not traceable).
Dispatch happens inside the op bodies: CUDA tensors (fp16/bf16/fp32) run the Triton stages from
spt_compile.kernels (imported lazily, so CPU users never need a working Triton backend); everything else,
and fp64 everywhere, runs the plain-PyTorch reference in lowering/reference/pq_attention.py. Query-tile mode
(query_tile > 0) dispatches the same way between the tile kernels (kernels/attention_tiled_*.py) and the
plain-PyTorch tile stages (lowering/attention_tiled.py, lowering/reference/tiled_attention.py), with a
deliberate fallback to the latter where the kernels have limits (_tiled_kernels).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from spt_compile.lowering.formulas import (attention_is_exact, attention_list_group, attention_num_tiles,
                                          attention_tile_is_exact, attention_tile_slots, mask_is_per_head)
from spt_compile.lowering.reference import pq_attention as ref

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_DOC = ("PQ-sparse attention (docs/OPS.md). Returns (out [B, H, Nq, Dv], idx [B, H, Nq, L] int32, "
        "lse [B, H, Nq] fp32).\n\n" + ref.SEMANTICS + """
Exact mode (L >= Nk, or Nk < min_seq_len) skips PQ. idx and lse are auxiliary outputs without gradient.
A floating mask that requires grad gets dS at the kept keys (0 elsewhere), summed to its broadcast shape.
query_tile = T > 0: tiles of T queries share one key list; idx is then [B, H, ceil(Nq/T), L_max] (docs/OPS.md).
share_kv_lists (T > 0, GQA): the H / Hkv query heads of one kv head share each tile's list as well.
seed: int64 0-dim tensor, required when dropout_p > 0.
""")


# ----------------------------------------------------------------------------------------------------------
# argument checks (shared by the real and the fake impl, so bad calls fail at trace time too)
# ----------------------------------------------------------------------------------------------------------

def _check_args(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, density: float,
                pq_subspaces: int, pq_centroids: int, kmeans_iters: int, dropout_p: float,
                seed: Optional[Tensor], min_seq_len: int = 0, query_tile: int = 0, min_keys: int = 64,
                select_stride: int = 1, share_kv_lists: bool = False) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, N, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be one of float16/bfloat16/float32/float64, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    b, h, nq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"k head dim {k.shape[3]} != q head dim {d}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v shape {tuple(v.shape)} must match k {tuple(k.shape)} in heads and keys")
    hkv, nk = k.shape[1], k.shape[2]
    if hkv < 1 or h % hkv != 0:
        raise ValueError(f"query heads H={h} must be a multiple of kv heads Hkv={hkv} (k.shape[1])")
    if nk < 1:
        raise ValueError(f"k must have at least one key, got Nk={nk}")
    if not (isinstance(pq_subspaces, int) and pq_subspaces >= 1 and d % pq_subspaces == 0):
        raise ValueError(f"pq_subspaces={pq_subspaces} must be a positive divisor of the head dim {d}")
    if not (isinstance(pq_centroids, int) and pq_centroids >= 1):
        raise ValueError(f"pq_centroids must be a positive int, got {pq_centroids}")
    if not (isinstance(kmeans_iters, int) and kmeans_iters >= 0):
        raise ValueError(f"kmeans_iters must be an int >= 0, got {kmeans_iters}")
    if not (0.0 < density <= 1.0):  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if not (isinstance(min_seq_len, int) and min_seq_len >= 0):
        raise ValueError(f"min_seq_len must be an int >= 0, got {min_seq_len}")
    if not (isinstance(query_tile, int) and query_tile >= 0):
        raise ValueError(f"query_tile must be an int >= 0 (0 = per-query selection), got {query_tile}")
    if not (isinstance(min_keys, int) and min_keys >= 1):
        raise ValueError(f"min_keys must be an int >= 1, got {min_keys}")
    if not (isinstance(select_stride, int) and select_stride >= 1):
        raise ValueError(f"select_stride must be an int >= 1 (1 = every query of a tile scores keys), "
                         f"got {select_stride}")
    if select_stride > 1 and not query_tile:
        raise ValueError(f"select_stride={select_stride} needs query tiles (query_tile >= 1): per-query selection "
                         f"(query_tile=0) scores every query")
    if not isinstance(share_kv_lists, bool):
        raise ValueError(f"share_kv_lists must be a bool, got {share_kv_lists!r}")
    if share_kv_lists and not query_tile:
        raise ValueError("share_kv_lists=True needs query tiles (query_tile >= 1): the per-query op (query_tile=0) "
                         "keeps one list per query and head")
    if dropout_p > 0:
        if seed is None:
            raise ValueError("seed (int64 0-dim tensor) is required when dropout_p > 0")
    if seed is not None and (seed.dtype != torch.int64 or seed.dim() != 0):
        raise ValueError(f"seed must be an int64 0-dim tensor, got {seed.dtype} with shape {tuple(seed.shape)}")
    if mask is not None:
        if mask.dim() != 4:
            raise ValueError(f"mask must be 4-D, broadcastable to [B, H, Nq, Nk], got shape {tuple(mask.shape)}")
        full = (b, h, nq, nk)
        if any(ms not in (1, fs) for ms, fs in zip(mask.shape, full)):
            raise ValueError(f"mask shape {tuple(mask.shape)} is not broadcastable to [B, H, Nq, Nk] = {full} "
                             f"(each dim must be 1 or full)")
        if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            raise ValueError(f"mask dtype must be bool or floating (additive bias), got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")


def _use_kernels(q: Tensor) -> bool:
    """Triton kernels or reference: the one decision in lowering/dispatch.py (SPT_KERNELS switch)."""
    from spt_compile.lowering.dispatch import use_kernels
    return use_kernels(q)


# ----------------------------------------------------------------------------------------------------------
# forward op
# ----------------------------------------------------------------------------------------------------------

# explicit schemas: inferred ones would say SymInt where docs/OPS.md says int
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, float scale, float density, "
               "int pq_subspaces, int pq_centroids, int kmeans_iters, float dropout_p, Tensor? seed, "
               "int min_seq_len=0, int query_tile=0, int min_keys=64, int select_stride=1, "
               "bool share_kv_lists=False) -> (Tensor out, Tensor idx, Tensor lse)")
_BWD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor idx, Tensor? mask, "
               "bool is_causal, float scale, float dropout_p, Tensor? seed, bool mask_grad=False, int min_seq_len=0, "
               "int query_tile=0, bool share_kv_lists=False) "
               "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)")


@torch.library.custom_op("spt::pq_sparse_attention", mutates_args=(), schema=_FWD_SCHEMA)
def pq_sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
                           density: float, pq_subspaces: int, pq_centroids: int, kmeans_iters: int,
                           dropout_p: float, seed: Optional[Tensor], min_seq_len: int = 0, query_tile: int = 0,
                           min_keys: int = 64, select_stride: int = 1, share_kv_lists: bool = False
                           ) -> tuple[Tensor, Tensor, Tensor]:
    _check_args(q, k, v, mask, scale, density, pq_subspaces, pq_centroids, kmeans_iters, dropout_p, seed,
                min_seq_len, query_tile, min_keys, select_stride, share_kv_lists)
    if query_tile:
        group = attention_list_group(q.shape[1], k.shape[1], share_kv_lists)
        return _tiled_forward(q, k, v, mask, is_causal, scale, density, pq_subspaces, pq_centroids, kmeans_iters,
                              dropout_p, seed, min_seq_len, query_tile, min_keys, select_stride, group)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    L = ref.num_kept(nk, density)
    if _use_kernels(q):
        from spt_compile.kernels.attention_fwd import sparse_attention_forward
        from spt_compile.kernels.attention_topk import select_topk
        from spt_compile.kernels.pq import pq_quantize
    else:
        pq_quantize, select_topk, sparse_attention_forward = (
            ref.pq_quantize, ref.select_topk, ref.sparse_attention_forward)
    if attention_is_exact(nk, density, min_seq_len):  # every allowed key, no PQ (plain torch, any device)
        idx = ref.allowed_indices(mask, is_causal, (b, h, nq, nk), q.device)  # [B, H, Nq, Nk]
    else:
        codebooks, codes = pq_quantize(k, pq_subspaces, pq_centroids, kmeans_iters)
        idx = select_topk(q, codebooks, codes, mask, is_causal, scale, L)
    out, lse = sparse_attention_forward(q, k, v, idx, mask, is_causal, scale, dropout_p, seed)
    if idx.shape[3] != L:
        # exact below min_seq_len: the Nk-long key list does not fit the L slots the (size-only) fake impl
        # promised, so idx is all -1 and the backward rebuilds the list from the mask (docs/OPS.md)
        idx = torch.full((b, h, nq, L), -1, dtype=torch.int32, device=q.device)
    # the fake impl promises contiguous outputs; .contiguous() is free when a kernel already complies
    return out.contiguous(), idx.contiguous(), lse.contiguous()


pq_sparse_attention_op.__doc__ = _DOC


def _tiled_kernels(q: Tensor, v: Tensor) -> bool:
    """Whether a query-tile call runs the Triton tile kernels (kernels/attention_tiled_*.py). The op decides
    here, the launchers only assert their limits: where use_kernels(q) holds but a kernel limit does not (head
    dims > kernels._tiled_common.MAX_HEAD_DIM, which their configs do not serve), the call runs the
    plain-PyTorch tile path instead, a deliberate fallback with the same semantics. The backward op asks the
    same question on the same q and v, so a call's forward and backward run the same path: each path draws
    and replays its own dropout mask (docs/OPS.md), so the two must never be mixed within one call."""
    if not _use_kernels(q):
        return False
    from spt_compile.kernels._tiled_common import serves_head_dims
    return serves_head_dims(q.shape[3], v.shape[3])


def _tiled_forward(q, k, v, mask, is_causal, scale, density, pq_subspaces, pq_centroids, kmeans_iters, dropout_p,
                   seed, min_seq_len, tile, min_keys, stride, group):
    """Query-tile mode (docs/OPS.md "query tiles"): PQ + tile selection + attention, in the Triton tile kernels
    where _tiled_kernels says so, else in the plain-PyTorch stages. group: heads per shared list (1 = per head).
    Shared lists under a per-head mask take the plain selection (the selection kernels size a group's lists
    from its first head); the attention kernels run on the repeated lists either way."""
    from spt_compile.lowering.attention_tiled import rebuild_exact, tiled_select
    nq, nk = q.shape[2], k.shape[2]
    kernels = _tiled_kernels(q, v)
    select_kernels = kernels and (group == 1 or not mask_is_per_head(mask))
    if select_kernels and not attention_tile_is_exact(nq, nk, density, min_keys, is_causal, min_seq_len):
        from spt_compile.kernels.attention_tiled_select import select_tiles
        from spt_compile.kernels.pq import pq_quantize
        codebooks, codes = pq_quantize(k, pq_subspaces, pq_centroids, kmeans_iters)
        idx = select_tiles(q, codebooks, codes, mask, is_causal, scale, tile, density, min_keys,
                           attention_tile_slots(nq, nk, density, min_keys, is_causal), stride=stride, group=group)
    else:  # the plain selection, or exact mode's key lists (plain torch on every device, no PQ, as per query)
        idx = tiled_select(q, k, mask, is_causal, scale, density, tile, min_keys, pq_subspaces, pq_centroids,
                           kmeans_iters, min_seq_len, stride, group)  # [B, H, ceil(Nq/T), L_max]
    run_idx = rebuild_exact(idx, q, k, mask, is_causal, tile, min_seq_len)
    if kernels:
        from spt_compile.kernels.attention_tiled_fwd import tiled_attention_forward
        out, lse = tiled_attention_forward(q, k, v, run_idx, mask, is_causal, scale, tile, dropout_p, seed)
    else:  # the fast plain-PyTorch stages (lowering/attention_tiled_cpu.py; the reference is the semantics)
        from spt_compile.lowering.attention_tiled_cpu import tiled_attention_forward
        out, lse = tiled_attention_forward(q, k, v, run_idx, mask, is_causal, scale, tile, dropout_p, seed,
                                           group=group)
    return out.contiguous(), idx.contiguous(), lse.contiguous()


@pq_sparse_attention_op.register_fake
def _(q, k, v, mask, is_causal, scale, density, pq_subspaces, pq_centroids, kmeans_iters, dropout_p, seed,
      min_seq_len=0, query_tile=0, min_keys=64, select_stride=1, share_kv_lists=False):
    _check_args(q, k, v, mask, scale, density, pq_subspaces, pq_centroids, kmeans_iters, dropout_p, seed,
                min_seq_len, query_tile, min_keys, select_stride, share_kv_lists)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    # sizes only: the same shapes whether or not Nk < min_seq_len
    if query_tile:
        idx_shape = (b, h, attention_num_tiles(nq, query_tile),
                     attention_tile_slots(nq, nk, density, min_keys, is_causal))
    else:
        idx_shape = (b, h, nq, ref.num_kept(nk, density))
    out = q.new_empty((b, h, nq, v.shape[3]))
    idx = q.new_empty(idx_shape, dtype=torch.int32)
    lse = q.new_empty((b, h, nq), dtype=torch.float32)
    return out, idx, lse


# ----------------------------------------------------------------------------------------------------------
# backward op
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("spt::pq_sparse_attention_backward", mutates_args=(), schema=_BWD_SCHEMA)
def pq_sparse_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    idx: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
                                    dropout_p: float, seed: Optional[Tensor], mask_grad: bool = False,
                                    min_seq_len: int = 0, query_tile: int = 0, share_kv_lists: bool = False
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask) of pq_sparse_attention's out for the kept keys idx (exact gradients of step 4).

    dmask is d out / d mask when mask_grad (mask.shape, mask.dtype), else an empty [0] tensor."""
    _check_mask_grad(mask, mask_grad)
    if query_tile:
        return _tiled_backward(dout, q, k, v, out, lse, idx, mask, is_causal, scale, dropout_p, seed, mask_grad,
                               min_seq_len, query_tile, attention_list_group(q.shape[1], k.shape[1], share_kv_lists))
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    if nk < min_seq_len:  # the forward ran exact and returned an all -1 idx: rebuild the full key list
        idx = ref.allowed_indices(mask, is_causal, (b, h, nq, nk), q.device)
    if mask_grad:  # the kernels have no dmask output: the reference (plain torch) serves every device
        if dropout_p > 0 and _use_kernels(q):
            # the kernel forward drew its dropout mask with tl.rand; the reference would replay torch.Generator's,
            # a different mask: a silently wrong gradient. The query-tile op has a dS kernel for this case.
            raise NotImplementedError(
                "pq_sparse_attention: a trainable (requires_grad) mask together with attention dropout is not "
                "supported by the per-query kernels (query_tile=0); use query_tile >= 1 (the default option "
                "attention_query_tile=64), dropout 0, or SPT_KERNELS=reference")
        dq, dk, dv, dmask = ref.sparse_attention_backward_dmask(dout, q, k, v, out, lse, idx, mask, is_causal,
                                                                scale, dropout_p, seed, True)
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask.contiguous()
    if _use_kernels(q):
        from spt_compile.kernels.attention_bwd import sparse_attention_backward
    else:
        sparse_attention_backward = ref.sparse_attention_backward
    dq, dk, dv = sparse_attention_backward(dout, q, k, v, out, lse, idx, mask, is_causal, scale, dropout_p, seed)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), q.new_empty((0,))


def _tiled_backward(dout, q, k, v, out, lse, idx, mask, is_causal, scale, dropout_p, seed, mask_grad, min_seq_len,
                    tile, group):
    """The query-tile backward, on the path its forward took (_tiled_kernels): the Triton tile backward (dQ per
    tile, dK/dV through the deterministic key -> tiles index, dS for a trainable mask), replaying the kernel
    forward's dropout mask; or the plain-PyTorch stage, replaying the plain forward's."""
    from spt_compile.lowering.attention_tiled import rebuild_exact
    run_idx = rebuild_exact(idx, q, k, mask, is_causal, tile, min_seq_len)
    if _tiled_kernels(q, v):
        from spt_compile.kernels.attention_tiled_bwd import tiled_attention_backward
        dq, dk, dv, dmask = tiled_attention_backward(dout, q, k, v, out, lse, run_idx, mask, is_causal, scale, tile,
                                                     dropout_p, seed, mask_grad)  # takes dout's strides
    else:
        from spt_compile.lowering.attention_tiled_cpu import tiled_attention_backward
        dq, dk, dv, dmask = tiled_attention_backward(dout.contiguous(), q, k, v, out, lse, run_idx, mask, is_causal,
                                                     scale, tile, dropout_p, seed, mask_grad, group=group)
    dmask = dmask.contiguous() if mask_grad else q.new_empty((0,))
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask


@pq_sparse_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, idx, mask, is_causal, scale, dropout_p, seed, mask_grad=False, min_seq_len=0,
      query_tile=0, share_kv_lists=False):
    _check_mask_grad(mask, mask_grad)
    dmask = mask.new_empty(mask.shape) if mask_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _check_mask_grad(mask: Optional[Tensor], mask_grad: bool) -> None:
    if mask_grad and (mask is None or not mask.dtype.is_floating_point):
        raise ValueError("mask_grad=True needs a floating (additive) mask; a bool or absent mask has no gradient")


def _setup_context(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, _density, _m, _c, _iters, dropout_p, seed, *rest = inputs
    out, idx, lse = output
    # O(N * (D + L)) saved: q, k, v (inputs), out, idx (int32, N * L), lse; never an N x N matrix
    ctx.save_for_backward(q, k, v, mask, out, idx, lse, seed)
    ctx.is_causal, ctx.scale, ctx.dropout_p = is_causal, scale, dropout_p
    # the trailing schema defaults (min_seq_len, query_tile, min_keys, select_stride, share_kv_lists); autograd
    # passes every argument, defaults filled in
    ctx.min_seq_len = int(rest[0]) if rest else 0
    ctx.query_tile = int(rest[1]) if len(rest) > 1 else 0
    ctx.share_kv_lists = bool(rest[4]) if len(rest) > 4 else False
    ctx.mark_non_differentiable(idx, lse)


def _backward(ctx, dout, _didx, _dlse):
    q, k, v, mask, out, idx, lse, seed = ctx.saved_tensors
    # only a floating mask that requires grad costs the dS reduction; otherwise the backward does no extra work
    mask_grad = bool(ctx.needs_input_grad[3]) and mask is not None and mask.dtype.is_floating_point
    dq, dk, dv, dmask = torch.ops.spt.pq_sparse_attention_backward(
        dout, q, k, v, out, lse, idx, mask, ctx.is_causal, ctx.scale, ctx.dropout_p, seed, mask_grad,
        ctx.min_seq_len, ctx.query_tile, ctx.share_kv_lists)
    # grads for q, k, v and the mask; none for the 13 non-tensor / seed arguments
    return (dq, dk, dv, dmask if mask_grad else None) + (None,) * 13


pq_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# autocast: cast q, k, v (not the mask) to the autocast dtype
# ----------------------------------------------------------------------------------------------------------
# torch.library.register_autocast would cast every floating input, including an additive mask: an fp32
# finfo.min padding bias becomes -inf in bf16/fp16, turning "allowed with ~0 weight" into "not allowed"
# (different output for all-padding rows). So we register our own Autocast kernels that cast q, k, v only.

_autocast_lib = torch.library.Library("spt", "FRAGMENT")


def _register_autocast(device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def kernel(_keyset, q, k, v, *rest):
        dtype = torch.get_autocast_dtype(device_type)
        # like autocast's "lower precision" ops: only fp32 inputs are cast; fp64 stays (reference mode)
        q, k, v = (t.to(dtype) if t.dtype == torch.float32 and t.device.type == device_type else t
                   for t in (q, k, v))
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return torch.ops.spt.pq_sparse_attention.default(q, k, v, *rest)

    _autocast_lib.impl("pq_sparse_attention", kernel, key_name, with_keyset=True)


for _dev in ("cpu", "cuda"):
    _register_autocast(_dev)


# ----------------------------------------------------------------------------------------------------------
# user-facing convenience
# ----------------------------------------------------------------------------------------------------------

def pq_sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, is_causal: bool = False,
                        scale: Optional[float] = None, density: float = 0.25, pq_subspaces: int = 8,
                        pq_centroids: int = 16, kmeans_iters: int = 3, dropout_p: float = 0.0,
                        seed: int | Tensor | None = None, min_seq_len: int = 0, query_tile: int = 0,
                        min_keys: int = 64, select_stride: int = 1, share_kv_lists: bool = False) -> Tensor:
    """out [B, H, Nq, Dv] of torch.ops.spt.pq_sparse_attention with SDPA-like defaults.

    scale defaults to 1/sqrt(D). With dropout_p > 0 and no seed, a seed is drawn from torch's global RNG
    here, outside the op (the op itself never touches global RNG state)."""
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, heads, N, head_dim], got shape {tuple(q.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if dropout_p > 0 and seed is None:
        seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64)
    if isinstance(seed, int):
        seed = torch.tensor(seed, dtype=torch.int64)
    out, _idx, _lse = torch.ops.spt.pq_sparse_attention(
        q, k, v, mask, bool(is_causal), float(scale), float(density), int(pq_subspaces), int(pq_centroids),
        int(kmeans_iters), float(dropout_p), seed, int(min_seq_len), int(query_tile), int(min_keys),
        int(select_stride), bool(share_kv_lists))
    return out
