"""pq_sparse_attention: gradient of a trainable additive mask, fully masked rows, the run-time min_seq_len.

Contract (docs/OPS.md): a floating mask that requires grad gets dS = P * (dP - delta) at the kept allowed keys,
0 at keys not kept, summed down to its broadcast shape; in exact mode that is eager's gradient. A row whose
allowed keys all carry a finfo.min-sized bias attends uniformly, forward and backward, as eager does; a row
with no allowed key at all (bool False / -inf) gives zeros (eager gives NaN). Below Nk < min_seq_len the op
runs exact attention and returns an all -1 idx of the size-only shape [B, H, Nq, L].
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import spt_compile.lowering  # noqa: F401  registers the ops
from spt_compile.lowering.attention import pq_sparse_attention
from spt_compile.lowering.reference import pq_attention as ref
from tests.lowering.test_attention_op import dense_kept_attention, make_qkv, maxerr

OP = torch.ops.spt.pq_sparse_attention.default
BWD = torch.ops.spt.pq_sparse_attention_backward.default

# broadcast shapes of a learned bias: full, per head (relative-position style), ALiBi-like [1, H, 1, Nk],
# key padding [B, 1, 1, Nk], shared [1, 1, Nq, Nk]
BIAS_SHAPES = ("full", "heads", "alibi", "keys", "shared")


def bias_shape(kind, b, h, nq, nk):
    return {"full": (b, h, nq, nk), "heads": (1, h, nq, nk), "alibi": (1, h, 1, nk), "keys": (b, 1, 1, nk),
            "shared": (1, 1, nq, nk)}[kind]


def eager(q, k, v, mask, is_causal, scale):
    """softmax(scale * q k^T + mask) v as an eager model writes it (GQA by repeat), in the inputs' dtype."""
    grp = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)
    s = scale * q @ kk.transpose(-1, -2)
    if mask is not None:
        s = s + mask if mask.dtype != torch.bool else s.masked_fill(~mask, float("-inf"))
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1) @ vv


def grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return (out.detach(),) + torch.autograd.grad(out, leaves, dout)


def op_fn(mask_is_leaf_arg=True, density=1.0, is_causal=False, scale=0.25, min_seq_len=0, **kw):
    def f(q, k, v, mask):
        return pq_sparse_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, density=density,
                                   min_seq_len=min_seq_len, **kw)
    return f


def check_vs_eager(mine, base, truth, names, dtype):
    """The op at most 2x as far from the fp64 truth as eager in the same dtype (plus a few-ulp floor)."""
    eps = torch.finfo(dtype).eps
    for name, a, s, t in zip(names, mine, base, truth):
        floor = 8 * eps * max(1.0, t.abs().max().item())
        assert maxerr(a, t) <= 2 * maxerr(s, t) + floor, (name, maxerr(a, t), maxerr(s, t))


# ------------------------------------------------------------------------------------------------------------
# mask gradient
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape_kind", BIAS_SHAPES)
@pytest.mark.parametrize("is_causal,hkv", [(False, 2), (True, 1)])
def test_exact_mode_mask_grad_equals_eager(dtype, shape_kind, is_causal, hkv):
    b, h, nq, nk, d = 2, 2, 7, 7 if is_causal else 11, 16
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, torch.float64, seed=4)
    g = torch.Generator().manual_seed(5)
    mask = torch.randn(bias_shape(shape_kind, b, h, nq, nk), generator=g, dtype=torch.float64)
    if shape_kind in ("full", "keys"):
        mask[..., -2:] = float("-inf")  # disallowed keys: gradient 0 (eager: P = 0 there)
    dout = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    args64 = (q, k, v, mask)
    truth = grads(lambda *t: eager(*t, is_causal, 0.25), args64, dout)
    lo = tuple(t.to(dtype) for t in args64)
    mine = grads(op_fn(is_causal=is_causal), lo, dout.to(dtype))
    base = grads(lambda *t: eager(*t, is_causal, 0.25), lo, dout.to(dtype))
    assert mine[4].shape == mask.shape and mine[4].dtype == dtype
    if shape_kind in ("full", "keys"):
        assert torch.equal(mine[4][..., -2:], torch.zeros_like(mine[4][..., -2:]))
    check_vs_eager(mine, base, truth, ("out", "dq", "dk", "dv", "dmask"), dtype)


def test_exact_mode_mask_grad_fp64_and_fp32_mask_with_bf16_qkv():
    b, h, nq, nk, d = 1, 2, 5, 9, 8
    q, k, v = make_qkv(b, h, h, nq, nk, d, torch.float64, seed=1)
    mask = torch.randn(1, h, nq, nk, dtype=torch.float64)
    dout = torch.randn(b, h, nq, d, dtype=torch.float64)
    truth = grads(lambda *t: eager(*t, False, 0.3), (q, k, v, mask), dout)
    mine = grads(op_fn(scale=0.3), (q, k, v, mask), dout)
    for name, a, t in zip(("out", "dq", "dk", "dv", "dmask"), mine, truth):
        assert maxerr(a, t) <= 1e-12, name
    # an fp32 bias with bf16 q/k/v (autocast keeps masks fp32): the gradient comes back fp32, same shape
    got = grads(op_fn(scale=0.3), (q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.float()), dout.bfloat16())
    assert got[4].dtype == torch.float32 and maxerr(got[4], truth[4]) < 3e-2


@pytest.mark.parametrize("shape_kind", BIAS_SHAPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_sparse_mode_mask_grad_is_ds_at_kept_keys(shape_kind, is_causal):
    """fp64: the op's dmask equals autograd through attention restricted to idx's keys (0 at keys not kept)."""
    b, h, hkv, nq, nk, d = 2, 4, 2, 9, 24, 16
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, torch.float64, seed=7)
    g = torch.Generator().manual_seed(8)
    mask = torch.randn(bias_shape(shape_kind, b, h, nq, nk), generator=g, dtype=torch.float64)
    dout = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    out, idx, _ = OP(*leaves[:4], is_causal, 0.25, 0.25, 4, 8, 2, 0.0, None)
    got = torch.autograd.grad(out, leaves, dout)
    assert (idx >= 0).sum() < b * h * nq * nk  # really sparse
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    ref_out = dense_kept_attention(*leaves2[:3], idx, leaves2[3].expand(b, h, nq, nk), is_causal, 0.25)
    want = torch.autograd.grad(ref_out, leaves2, dout)
    for name, a, t in zip(("dq", "dk", "dv", "dmask"), got, want):
        assert maxerr(a, t) <= 1e-10 * max(1.0, t.abs().max().item()), name


@pytest.mark.parametrize("density", [1.0, 0.4])
def test_gradcheck_mask_grad_with_dropout_fp64(density):
    q, k, v = make_qkv(1, 2, 1, 5, 9, 8, torch.float64, seed=3)
    mask = torch.randn(1, 2, 1, 9, dtype=torch.float64)
    mask[..., -2:] = float("-inf")  # d/d(-inf) is 0 by contract; gradcheck perturbs only finite entries below

    def f(q, k, v, bias):
        m = torch.cat([bias, mask[..., -2:]], -1)
        return OP(q, k, v, m, True, 0.4, density, 2, 4, 2, 0.25, torch.tensor(5))[0]

    bias = mask[..., :-2].clone()
    leaves = tuple(t.requires_grad_() for t in (q, k, v, bias))
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


def test_no_mask_grad_no_extra_output():
    """A mask that does not require grad gets None, and the backward op then returns an empty dmask."""
    q, k, v = make_qkv(1, 2, 2, 4, 6, 8, torch.float32)
    mask = torch.randn(1, 1, 4, 6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, idx, lse = OP(*leaves, mask, False, 0.3, 1.0, 2, 4, 1, 0.0, None)
    assert torch.autograd.grad(out.sum(), leaves[0]) is not None
    res = BWD(torch.ones_like(out), q, k, v, out.detach(), lse, idx, mask, False, 0.3, 0.0, None)
    assert res[3].numel() == 0
    res = BWD(torch.ones_like(out), q, k, v, out.detach(), lse, idx, mask, False, 0.3, 0.0, None, True)
    assert res[3].shape == mask.shape
    with pytest.raises(ValueError, match="mask_grad"):
        BWD(torch.ones_like(out), q, k, v, out.detach(), lse, idx, mask > 0, False, 0.3, 0.0, None, True)


def test_opcheck_with_mask_grad_and_min_seq_len():
    q, k, v = make_qkv(1, 2, 1, 6, 10, 8, torch.float32)
    mask = torch.randn(1, 2, 1, 10, requires_grad=True)
    for t in (q, k, v):
        t.requires_grad_()
    for msl in (0, 16):
        args = (q, k, v, mask, True, 0.3, 0.3, 2, 4, 1, 0.0, None, msl)
        torch.library.opcheck(OP, args)
        out, idx, lse = OP(*args)
        torch.library.opcheck(BWD, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
                                    idx, mask.detach(), True, 0.3, 0.0, None, True, msl))


# ------------------------------------------------------------------------------------------------------------
# fully masked rows
# ------------------------------------------------------------------------------------------------------------

def padded_bias(b, nq, nk, dtype, full_rows=(), pad_keys=3):
    """[B, 1, Nq, Nk] bias: finfo.min on the last pad_keys keys of every row, and on every key of full_rows."""
    m = torch.zeros(b, 1, nq, nk, dtype=dtype)
    m[..., nk - pad_keys:] = torch.finfo(dtype).min
    for r in full_rows:
        m[:, :, r] = torch.finfo(dtype).min
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_grad", [False, True])
def test_finfo_min_fully_masked_rows_match_eager(dtype, mask_grad):
    """Rows 1 and 4 see only finfo.min keys: eager attends uniformly (fl(s + min) == min) with finite fp32/fp64
    gradients; the op must give the same out, dq, dk, dv (and dmask) in exact mode."""
    b, h, nq, nk, d = 2, 2, 6, 10, 16
    q, k, v = make_qkv(b, h, 1, nq, nk, d, dtype, seed=2)
    mask = padded_bias(b, nq, nk, dtype, full_rows=(1, 4))
    dout = torch.randn(b, h, nq, d, dtype=torch.float64).to(dtype)
    tensors = (q, k, v, mask) if mask_grad else (q, k, v)

    def mine_fn(*t):
        return op_fn(scale=0.25)(*t[:3], t[3] if mask_grad else mask)

    def eager_fn(*t):
        return eager(*t[:3], t[3] if mask_grad else mask, False, 0.25)

    mine, base = grads(mine_fn, tensors, dout), grads(eager_fn, tensors, dout)
    # fp64 truth on the same values: a finfo.min-sized bias absorbs the scores in fp64 too (uniform rows)
    truth = grads(eager_fn, tuple(t.double() for t in tensors), dout.double())
    vmean = v.double().mean(2, keepdim=True)  # [B, 1, 1, D]: uniform weights over all Nk keys
    assert maxerr(truth[0][:, :, [1, 4]], vmean.expand(b, h, 2, d)) <= 1e-12
    names = ("out", "dq", "dk", "dv", "dmask")
    for name, a, e in zip(names, mine, base):
        assert torch.isfinite(a).all() and torch.isfinite(e).all(), name
    if dtype == torch.float64:
        for name, a, t in zip(names, mine, truth):
            assert maxerr(a, t) <= 1e-12 * max(1.0, t.abs().max().item()), name
    else:
        check_vs_eager(mine, base, truth, names, dtype)


@pytest.mark.parametrize("density", [1.0, 0.3])
@pytest.mark.parametrize("kind", ["bool", "neg_inf"])
def test_no_allowed_key_rows_follow_the_zero_row_convention(density, kind):
    """A row with no allowed key: eager gives NaN; the op gives out = 0 and the row contributes no gradient,
    i.e. the op equals attention on the other rows with that row's output multiplied by 0."""
    b, h, nq, nk, d = 1, 2, 6, 10, 8
    q, k, v = make_qkv(b, h, 1, nq, nk, d, torch.float64, seed=6)
    allow = torch.rand(b, 1, nq, nk, generator=torch.Generator().manual_seed(1)) < 0.7
    allow[..., 0] = True
    allow[:, :, 2] = False  # row 2 sees nothing
    mask = allow if kind == "bool" else torch.zeros(allow.shape, dtype=torch.float64).masked_fill(~allow, -math.inf)
    dout = torch.randn(b, h, nq, d, dtype=torch.float64)
    assert torch.isnan(eager(q, k, v, mask, False, 0.25)[:, :, 2]).all()  # eager's own convention
    rowkeep = allow.any(-1, keepdim=True)  # [B, 1, Nq, 1]
    fixed = allow | ~rowkeep  # let the empty row see every key, then zero its output: no NaN, no gradient
    fixed = fixed if kind == "bool" else torch.zeros(allow.shape, dtype=torch.float64).masked_fill(~fixed, -math.inf)
    want = grads(lambda *t: eager(*t, fixed, False, 0.25) * rowkeep, (q, k, v), dout)
    if density < 1.0:  # sparse: compare with attention restricted to the op's own selection
        out, idx, _ = OP(q, k, v, mask, False, 0.25, density, 4, 4, 2, 0.0, None)
        want = grads(lambda *t: dense_kept_attention(*t, idx, mask, False, 0.25), (q, k, v), dout)
    got = grads(lambda *t: pq_sparse_attention(*t, mask=mask, scale=0.25, density=density, pq_subspaces=4,
                                               pq_centroids=4, kmeans_iters=2), (q, k, v), dout)
    assert torch.equal(got[0][:, :, 2], torch.zeros_like(got[0][:, :, 2]))
    assert torch.equal(got[1][:, :, 2], torch.zeros_like(got[1][:, :, 2]))
    for name, a, t in zip(("out", "dq", "dk", "dv"), got, want):
        assert maxerr(a, t) <= 1e-12, name


# ------------------------------------------------------------------------------------------------------------
# run-time min_seq_len threshold
# ------------------------------------------------------------------------------------------------------------

LENGTHS = (64, 100, 128, 200, 300)
THRESHOLD = 128


def _attn(q, k, v):
    return pq_sparse_attention(q, k, v, is_causal=True, density=0.25, pq_subspaces=4, pq_centroids=8,
                               kmeans_iters=1, min_seq_len=THRESHOLD)


@pytest.mark.parametrize("mode", ["eager", "static", "dynamic"])
def test_min_seq_len_decides_at_run_time(mode):
    """One process, lengths across the threshold: below it the op equals SDPA (forward and gradients), at and
    above it the op is sparse (differs from SDPA); under dynamic=True one graph serves every length."""
    fn = _attn if mode == "eager" else torch.compile(_attn, backend="aot_eager", fullgraph=True,
                                                      dynamic=mode == "dynamic")
    torch._dynamo.reset()
    for n in LENGTHS:
        q, k, v = make_qkv(1, 2, 2, n, n, 16, torch.float32, seed=n)
        dout = torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(n))
        got = grads(fn, (q, k, v), dout)
        sdpa = grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), (q, k, v), dout)
        err = max(maxerr(a, s) for a, s in zip(got, sdpa))
        if n < THRESHOLD:
            assert err < 1e-4, (n, err)
        else:
            assert err > 1e-2, (n, err)  # sparse attention at density 0.25 visibly differs from dense


def test_min_seq_len_idx_shape_and_backward_rebuild():
    n, L = 40, ref.num_kept(40, 0.25)
    q, k, v = make_qkv(1, 2, 1, n, n, 8, torch.float64, seed=9)
    mask = torch.randn(1, 1, n, n, dtype=torch.float64)
    mask[..., :, -3:] = -math.inf
    dout = torch.randn(1, 2, n, 8, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    out, idx, lse = OP(*leaves, True, 0.35, 0.25, 2, 4, 1, 0.2, torch.tensor(3), n + 1)
    assert idx.shape == (1, 2, n, L) and (idx == -1).all()  # exact: the Nk-long list does not fit L slots
    got = torch.autograd.grad(out, leaves, dout)
    # the same call at min_seq_len 0 and density 1 lists every key: identical forward and gradients
    leaves2 = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    out2, idx2, lse2 = OP(*leaves2, True, 0.35, 1.0, 2, 4, 1, 0.2, torch.tensor(3), 0)
    want = torch.autograd.grad(out2, leaves2, dout)
    assert torch.allclose(lse, lse2) and maxerr(out, out2) <= 1e-12
    for name, a, t in zip(("dq", "dk", "dv", "dmask"), got, want):
        assert maxerr(a, t) <= 1e-12, name
