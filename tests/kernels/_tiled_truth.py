"""Problems and an independent fp64 ground truth for the query-tile attention kernels (shared by
test_attention_tiled_kernels.py under the interpreter and the @pytest.mark.gpu test_gpu_attention_tiled.py):
dense attention in which query i sees exactly its tile's kept keys that it may attend to.

Accuracy rule: error vs fp64 <= 2x that of the same dense math in torch in the input dtype + FLOOR + one output
rounding of the largest entry.
"""
from __future__ import annotations

import math

import torch

FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-3, torch.float16: 5e-4}
ULP = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def build_mask(kind, b, h, nq, nk, dtype, g, full_row):
    """(mask, is_causal). full_row: one row with no allowed key (bool / -inf) or only finfo.min keys."""
    if kind in ("none", "causal"):
        return None, kind == "causal"
    fmin = torch.finfo(dtype).min
    if kind == "bool":
        m = torch.rand(b, 1, nq, nk, generator=g) < 0.5
        if full_row:
            m[0, :, nq // 2] = False
        return m, False
    if kind.startswith("pad"):
        lens = torch.randint(1, nk + 1, (b,), generator=g)
        if full_row:
            lens[0] = 0
        m = torch.zeros(b, 1, 1, nk, dtype=dtype)
        m[(torch.arange(nk)[None, :] >= lens[:, None])[:, None, None, :]] = -math.inf if kind == "pad_inf" else fmin
        return m, False
    m = torch.randn(b if kind == "bias" else 1, h, nq, nk, generator=g, dtype=torch.float64).to(dtype)
    m = m.masked_fill(torch.rand(m.shape, generator=g) < 0.2, -math.inf)
    if full_row:
        m[0, 0, nq // 2] = fmin
        m[0, 0, nq // 3] = -math.inf
    return m, kind == "bias_causal"


def allowed_dense(mask, causal, b, h, nq, nk):
    ok = torch.ones(b, h, nq, nk, dtype=torch.bool)
    if mask is not None:
        ok &= (mask if mask.dtype == torch.bool else torch.isfinite(mask)).expand(b, h, nq, nk)
    if causal:
        ok &= torch.ones(nq, nk, dtype=torch.bool).tril()
    return ok


def tile_kept(idx, tile, nq, nk):
    """[B, H, Nq, Nk] bool: query i sees the keys listed for its tile."""
    ii = idx.long()
    keep = torch.zeros(*idx.shape[:3], nk + 1, dtype=torch.bool)
    keep.scatter_(-1, torch.where(ii >= 0, ii, nk), True)
    return keep[..., :nk].repeat_interleave(tile, 2)[:, :, :nq]


def random_tiled_idx(b, h, nt, nk, L, g):
    """Valid tiled lists: up to L distinct keys per tile, ascending, then -1."""
    keys = torch.rand(b, h, nt, nk, generator=g).argsort(-1)[..., :L]
    n = torch.randint(0, min(L, nk) + 1, (b, h, nt, 1), generator=g)
    keys = torch.where(torch.arange(keys.shape[-1]) < n, keys, nk).sort(-1).values
    idx = torch.where(keys == nk, -1, keys).int()
    if idx.shape[-1] < L:
        idx = torch.cat([idx, idx.new_full(idx.shape[:3] + (L - idx.shape[-1],), -1)], -1)
    return idx


def dense_attention(q, k, v, keep, mask, scale, zscale=None):
    """Softmax over the keys in `keep` in q's dtype (fp64: the ground truth); rows with no key give 0."""
    grp = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        s = s + torch.where(torch.isfinite(mask), mask, 0).to(s.dtype)
    any_ = keep.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~keep, -math.inf).masked_fill(~any_, 0.0), -1) * any_
    if zscale is not None:
        p = p * zscale.to(p.dtype)
    return p @ vv


def dense_grads(q, k, v, keep, mask, scale, dout, zscale=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = dense_attention(*leaves, keep, mask, scale, zscale)
    o.backward(dout.to(o.dtype))
    return (o.detach(),) + tuple(t.grad for t in leaves)


def max_err(x, gt):
    return (x.double() - gt.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_gt(name, got, same, gt, dtype):
    """err(kernel) <= 2 err(torch, same dtype) + FLOOR + one output rounding of the largest entry."""
    eg, es = max_err(got, gt), max_err(same, gt)
    top = gt.abs().max().item() if gt.numel() else 0.0
    assert eg <= 2 * es + FLOOR[dtype] + top * ULP[dtype], f"{name}: kernel err {eg:.3g}, torch-{dtype} {es:.3g}"
