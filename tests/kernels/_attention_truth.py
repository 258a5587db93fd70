"""Problems and an independent fp64 ground truth for pq_sparse_attention at the op level (shared by the kernel-path
tests on CPU and the @pytest.mark.gpu tests): autograd through a dense softmax over exactly the kept keys.

Accuracy rule: error vs fp64 <= 2x that of the same dense math in the input dtype + FLOOR + one output rounding.
"""
from __future__ import annotations


import torch

from tests.helpers import kernels_mode  # noqa: E402
import spt_compile.lowering  # noqa: F401  registers the ops

OP = torch.ops.spt.pq_sparse_attention.default
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}
ULP = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def make_problem(b, h, hkv, nq, nk, d, dv, dtype, kind, seed=0, contiguous=True):
    """(q, k, v, mask, is_causal, dout). Non-contiguous inputs are the [B, N, H, D].transpose(1, 2) views that
    HF attention modules pass. kind: none / causal / bool / bias (-inf holes and one fully -inf row) /
    pad_finfo (finite finfo.min key padding, [B, 1, 1, Nk])."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        if contiguous:
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
        bb, hh, n, dd = shape
        return torch.randn(bb, n, hh, dd, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)

    q, k, v = rnd(b, h, nq, d), rnd(b, hkv, nk, d), rnd(b, hkv, nk, dv)
    dout = rnd(b, h, nq, dv)
    mask, causal = None, kind == "causal"
    if kind == "bool":
        mask = torch.rand(b, 1, nq, nk, generator=g) < 0.6
        mask[..., 0] = True
    elif kind == "bias":
        mask = torch.randn(1, h, nq, nk, generator=g, dtype=torch.float64).to(dtype)
        mask = mask.masked_fill(torch.rand(1, h, nq, nk, generator=g) < 0.2, float("-inf"))
        mask[:, :, nq // 2] = float("-inf")
    elif kind == "pad_finfo":
        lens = torch.randint(1, nk + 1, (b,), generator=g)
        mask = torch.zeros(b, 1, 1, nk, dtype=dtype)
        mask[(torch.arange(nk)[None, :] >= lens[:, None])[:, None, None, :]] = torch.finfo(dtype).min
    return q, k, v, mask, causal, dout


def run_op(q, k, v, mask, causal, dout, density, mode, dropout_p=0.0, seed=None, m=4, c=8, iters=2,
           grad=(True, True, True)):
    """(out, idx, lse, dq, dk, dv) of the op's forward and autograd backward under SPT_KERNELS=mode."""
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((q, k, v), grad)]
    sd = None if seed is None else torch.tensor(seed, dtype=torch.int64)
    scale = q.shape[-1] ** -0.5
    with kernels_mode(mode):
        out, idx, lse = OP(*leaves, mask, causal, scale, density, m, c, iters, dropout_p, sd)
        out.backward(dout)
    return (out.detach(), idx, lse) + tuple(t.grad for t in leaves)


def kept_dense(idx, nk):
    """[B, H, Nq, Nk] bool: the keys listed in idx (-1 = empty slot)."""
    ii = idx.long()
    keep = torch.zeros(*idx.shape[:3], nk + 1, dtype=torch.bool)
    keep.scatter_(-1, torch.where(ii >= 0, ii, nk), True)
    return keep[..., :nk]


def allowed_dense(mask, causal, shape):
    b, h, nq, nk = shape
    ok = torch.ones(shape, dtype=torch.bool)
    if mask is not None:
        ok = ok & (mask if mask.dtype == torch.bool else torch.isfinite(mask))
    if causal:
        ok = ok & torch.ones(nq, nk, dtype=torch.bool).tril()
    return ok


def dense_attention(q, k, v, keep, mask, scale, zscale=None):
    """Softmax over the keys in `keep` in q's dtype (fp64: the ground truth); rows with no key give 0."""
    grp = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        s = s + torch.where(torch.isfinite(mask), mask, 0).to(s.dtype)
    any_ = keep.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")).masked_fill(~any_, 0.0), -1) * any_
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


def check_vs_truth(name, got, same, truth, dtype):
    """err(got) <= 2 err(same-dtype torch) + FLOOR + one output rounding of the largest entry."""
    eg, es = max_err(got, truth), max_err(same, truth)
    top = truth.abs().max().item() if truth.numel() else 0.0
    assert eg <= 2 * es + FLOOR[dtype] + top * ULP[dtype], f"{name}: kernel path err {eg:.3g}, torch {es:.3g}"


def check_all(res, q, k, v, mask, causal, dout, dtype, ref_res=None):
    """Kernel-path results vs the fp64 dense truth over its own kept keys, and vs the reference path."""
    out, idx, lse, *grads = (t.cpu() if t is not None else None for t in res)
    q, k, v, dout = (t.cpu() for t in (q, k, v, dout))
    mask = None if mask is None else mask.cpu()
    ref_res = None if ref_res is None else [t.cpu() for t in ref_res]
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    scale = q.shape[-1] ** -0.5
    keep = kept_dense(idx, nk) & allowed_dense(mask, causal, (b, h, nq, nk))
    m64 = None if mask is None else mask.double()
    truth = dense_grads(q.double(), k.double(), v.double(), keep, m64, scale, dout.double())
    same = dense_grads(q, k, v, keep, mask, scale, dout)
    for name, g, s_, t in zip(("out", "dq", "dk", "dv"), (out, *grads), same, truth):
        assert g.dtype == dtype and g.shape == t.shape, name
        check_vs_truth(name, g, s_, t, dtype)
    if ref_res is not None:
        # the reference path with the same kept keys: equal up to a few output roundings
        for name, g, r, t in zip(("out", "dq", "dk", "dv"), (out, *grads), ref_res, truth):
            top = t.abs().max().item() if t.numel() else 0.0
            tol = 4 * ULP[dtype] if dtype != torch.float32 else 1e-5
            torch.testing.assert_close(g.double(), r.double(), rtol=tol, atol=tol * top + FLOOR[dtype],
                                       msg=lambda msg, name=name: f"{name} vs reference path: {msg}")
    return keep
