"""torch.ops.spt.pq_sparse_attention on CPU (the plain-PyTorch reference path).

Exact mode is checked against scaled_dot_product_attention with an fp64 ground truth: the op in dtype X
may be at most 2x as far from the fp64 truth as SDPA computed in X (plus one ulp-sized floor).
Sparse mode is checked in fp64 against autograd through a dense formulation that masks out every key
not listed in idx, and the selection itself against an independent lookup-table PQ score.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import spt_compile.lowering  # noqa: F401  registers the ops
from spt_compile.lowering.attention import pq_sparse_attention
from spt_compile.lowering.reference import pq_attention as ref

OP = torch.ops.spt.pq_sparse_attention.default
BWD = torch.ops.spt.pq_sparse_attention_backward.default
MASK_KINDS = ("none", "causal", "bool", "pad_inf", "pad_finfo_min")


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------

def make_qkv(b, h, hkv, nq, nk, d, dtype, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, dv or d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_mask(kind, b, h, nq, nk, dtype, seed=0):
    """(mask, is_causal). Every row keeps >= 1 allowed key (SDPA gives NaN rows otherwise)."""
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "bool":
        m = torch.rand(b, 1, nq, nk, generator=g) < 0.6  # [B, 1, Nq, Nk]: broadcast over heads
        m[..., 0] = True
        return m, False
    lens = torch.randint(1, nk + 1, (b,), generator=g)  # key padding per batch, >= 1 real key
    pad = torch.arange(nk)[None, :] >= lens[:, None]  # [B, Nk]
    fill = float("-inf") if kind == "pad_inf" else torch.finfo(dtype).min
    m = torch.zeros(b, 1, 1, nk, dtype=dtype)
    m[pad[:, None, None, :]] = fill
    return m, False


def run_op(q, k, v, mask, is_causal, density, dout, dropout_p=0.0, seed=None, m=8, c=16, iters=3):
    """(out, idx, lse, dq, dk, dv) through the op's autograd."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sd = None if seed is None else torch.tensor(seed, dtype=torch.int64)
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, idx, lse = OP(q, k, v, mask, is_causal, scale, density, m, c, iters, dropout_p, sd)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), idx, lse, dq, dk, dv


def run_sdpa(q, k, v, mask, is_causal, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), dout)


def maxerr(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def selection_counts(idx, nk):
    """[B, H, Nq, Nk] int: how many valid slots of idx name each key (scatter_add: -1 slots add nothing)."""
    cnt = torch.zeros(idx.shape[:-1] + (nk,), dtype=torch.int64)
    return cnt.scatter_add_(-1, idx.clamp(min=0).long(), (idx >= 0).long())


def dense_kept_attention(q, k, v, idx, mask, is_causal, scale):
    """out of attention where query i sees only the keys idx[..., i, :] (autograd-able, fp64 in tests)."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    grp = h // k.shape[1]
    kk, vv = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)  # [B, H, Nk, D]
    keep = selection_counts(idx, nk) > 0
    s = scale * q @ kk.transpose(-1, -2)
    if mask is not None and mask.dtype != torch.bool:
        s = s + torch.where(torch.isfinite(mask), mask.to(s.dtype), 0.0)
    s = s.masked_fill(~keep, float("-inf"))
    row = keep.any(-1, keepdim=True)
    p = torch.where(row, torch.softmax(s.masked_fill(~row, 0.0), -1), 0.0)
    return p @ vv


def allowed_dense(mask, is_causal, b, h, nq, nk):
    a = torch.ones(b, h, nq, nk, dtype=torch.bool)
    if mask is not None:
        a &= (mask if mask.dtype == torch.bool else torch.isfinite(mask)).expand(b, h, nq, nk)
    if is_causal:
        a &= torch.ones(nq, nk, dtype=torch.bool).tril()
    return a


# ------------------------------------------------------------------------------------------------------------
# opcheck: schema, fake impl strides, autograd registration, AOT dispatch with dynamic shapes
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "bool_mask", "bias_causal_dropout", "gqa_exact"])
def test_opcheck(case):
    b, h, hkv, nq, nk, d = 1, 4, 2 if case == "gqa_exact" else 4, 12, 20, 16
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, torch.float32, dv=8)
    for t in (q, k, v):
        t.requires_grad_()
    mask, causal, dropout, seed, density = None, False, 0.0, None, 0.3
    if case == "bool_mask":
        mask, _ = make_mask("bool", b, h, nq, nk, torch.float32)
    if case == "bias_causal_dropout":
        mask, causal, dropout, seed = torch.randn(1, 1, nq, nk), True, 0.2, torch.tensor(7)
    if case == "gqa_exact":
        density = 1.0
    args = (q, k, v, mask, causal, 0.25, density, 4, 4, 2, dropout, seed)
    torch.library.opcheck(OP, args)
    out, idx, lse = OP(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(BWD, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, idx, mask,
                                causal, 0.25, dropout, seed))


def test_output_layout_and_dtypes():
    q, k, v = make_qkv(2, 4, 2, 9, 13, 32, torch.bfloat16, dv=16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # HF-style [B, N, H, D] storage: non-contiguous q
    out, idx, lse = OP(q, k, v, None, False, 0.2, 0.3, 8, 4, 1, 0.0, None)
    assert out.shape == (2, 4, 9, 16) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert idx.shape == (2, 4, 9, ref.num_kept(13, 0.3)) and idx.dtype == torch.int32 and idx.is_contiguous()
    assert lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    assert not lse.requires_grad


# ------------------------------------------------------------------------------------------------------------
# exact mode == SDPA (forward and gradients), judged against fp64
# ------------------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), hkv=st.sampled_from([1, 2]), grp=st.sampled_from([1, 2]), nq=st.integers(1, 19),
       nk=st.integers(1, 23), d=st.sampled_from([32, 64, 128]), kind=st.sampled_from(MASK_KINDS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(0, 2 ** 16))
def test_exact_mode_equals_sdpa(b, hkv, grp, nq, nk, d, kind, dtype, seed):
    h = hkv * grp
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, dtype, seed=seed)
    mask, causal = make_mask(kind, b, h, nq, nk, dtype, seed=seed)
    dout = torch.randn(b, h, nq, d, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64).to(dtype)
    got = run_op(q, k, v, mask, causal, 1.0, dout)
    assert (got[1][..., :1] >= 0).all()  # every row has >= 1 allowed key here
    truth = run_sdpa(q.double(), k.double(), v.double(), None if mask is None else
                     (mask if mask.dtype == torch.bool else mask.double()), causal, dout.double())
    mine = (got[0],) + got[3:]
    if dtype == torch.float64:
        for name, a, t in zip(("out", "dq", "dk", "dv"), mine, truth):
            assert maxerr(a, t) <= 1e-10 * max(1.0, t.abs().max().item()), name
        return
    base = run_sdpa(q, k, v, mask, causal, dout)
    eps = torch.finfo(dtype).eps
    for name, a, s, t in zip(("out", "dq", "dk", "dv"), mine, base, truth):
        # a few ulps at the tensor's scale: on tiny shapes the max is over a handful of elements, so the 2x ratio
        # alone would be noise; real bugs (wrong key, mask, fp32 -> bf16 internals) are orders of magnitude larger
        floor = 4 * eps * max(1.0, t.abs().max().item())
        assert maxerr(a, t) <= 2 * maxerr(s, t) + floor, (name, maxerr(a, t), maxerr(s, t))


def test_exact_mode_lse_matches_logsumexp():
    q, k, v = make_qkv(2, 2, 1, 7, 11, 32, torch.float64)
    mask, _ = make_mask("pad_inf", 2, 2, 7, 11, torch.float64)
    _, idx, lse = OP(q, k, v, mask, False, 0.3, 1.0, 8, 16, 3, 0.0, None)
    s = 0.3 * q @ k.transpose(-1, -2) + mask
    assert torch.allclose(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)
    # exact mode lists the allowed keys in order, then -1
    assert torch.equal((idx >= 0).sum(-1), torch.isfinite(mask).sum(-1).expand(2, 2, 7).int())


# ------------------------------------------------------------------------------------------------------------
# sparse mode: the op is exact attention over idx; idx is the top-L by PQ score
# ------------------------------------------------------------------------------------------------------------

@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), hkv=st.sampled_from([1, 2]), grp=st.sampled_from([1, 3]), nq=st.integers(1, 17),
       nk=st.integers(8, 40), d=st.sampled_from([32, 64]), kind=st.sampled_from(MASK_KINDS),
       density=st.sampled_from([0.1, 0.25, 0.5]), seed=st.integers(0, 2 ** 16))
def test_sparse_mode_matches_dense_kept_formulation(b, hkv, grp, nq, nk, d, kind, density, seed):
    h = hkv * grp
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, torch.float64, seed=seed)
    mask, causal = make_mask(kind, b, h, nq, nk, torch.float64, seed=seed)
    dout = torch.randn(b, h, nq, d, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    out, idx, lse, dq, dk, dv = run_op(q, k, v, mask, causal, density, dout)
    L = ref.num_kept(nk, density)
    assert L < nk and idx.shape[-1] == L
    # idx: valid slots first, distinct, allowed, and as many as min(allowed, L)
    valid = idx >= 0
    assert torch.equal(valid, valid.cummin(-1).values), "valid slots must come first"
    allowed = allowed_dense(mask, causal, b, h, nq, nk)
    assert torch.equal(valid.sum(-1), allowed.sum(-1).clamp(max=L).int())
    cnt = selection_counts(idx, nk)
    assert cnt.max() <= 1, "duplicate keys selected"
    assert not ((cnt > 0) & ~allowed).any(), "a disallowed key was selected"
    # forward and gradients equal autograd through the dense formulation restricted to idx (fp64)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out = dense_kept_attention(qq, kk, vv, idx, mask, causal, 1.0 / math.sqrt(d))
    ref_grads = torch.autograd.grad(ref_out, (qq, kk, vv), dout)
    for name, a, t in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref_out.detach(),) + ref_grads):
        assert maxerr(a, t) <= 1e-10 * max(1.0, t.abs().max().item()), name


@settings(max_examples=10, deadline=None)
@given(hkv=st.sampled_from([1, 2]), grp=st.sampled_from([1, 2]), nq=st.integers(1, 12), nk=st.integers(4, 48),
       m=st.sampled_from([2, 4, 8]), c=st.sampled_from([2, 4, 16]), kind=st.sampled_from(MASK_KINDS),
       seed=st.integers(0, 2 ** 16))
def test_select_topk_is_top_l_by_lookup_table_score(hkv, grp, nq, nk, m, c, kind, seed):
    """The kept keys beat every allowed key that was left out, by an independently computed LUT score."""
    b, h, d = 2, hkv * grp, 32
    q, k, _ = make_qkv(b, h, hkv, nq, nk, d, torch.float32, seed=seed)
    mask, causal = make_mask(kind, b, h, nq, nk, torch.float32, seed=seed)
    cb, codes = ref.pq_quantize(k, m, c, 2)
    L = max(1, nk // 3)
    idx = ref.select_topk(q, cb, codes, mask, causal, 0.5, L)
    # LUT[b, h, i, m, c] = <q_i slice m, centroid c of slice m>; score_j = 0.5 * sum_m LUT[.., m, code_jm] + bias
    qs = q.double().reshape(b, hkv, grp, nq, m, d // m)
    lut = torch.einsum("bkgims,bkmcs->bkgimc", qs, cb.double()).reshape(b, h, nq, m, c)
    cj = codes.long().repeat_interleave(grp, 1)  # [B, H, Nk, M]
    score = torch.zeros(b, h, nq, nk, dtype=torch.float64)
    for mm in range(m):  # loop over subspaces, not tokens
        score += torch.gather(lut[:, :, :, mm, :], -1, cj[:, :, None, :, mm].expand(b, h, nq, nk))
    score = 0.5 * score
    if mask is not None and mask.dtype != torch.bool:
        score = score + torch.where(torch.isfinite(mask), mask.double(), 0.0)
    allowed = allowed_dense(mask, causal, b, h, nq, nk)
    sel = selection_counts(idx, nk) > 0
    worst_kept = score.masked_fill(~sel, float("inf")).amin(-1)
    best_left = score.masked_fill(sel | ~allowed, float("-inf")).amax(-1)
    assert (best_left <= worst_kept + 1e-4 * (1 + score.abs().amax())).all()


# ------------------------------------------------------------------------------------------------------------
# PQ k-means
# ------------------------------------------------------------------------------------------------------------

def test_pq_quantize_batched_equals_per_head_and_codes_are_nearest():
    k = torch.randn(2, 3, 37, 16, generator=torch.Generator().manual_seed(0))
    cb, codes = ref.pq_quantize(k, 4, 5, 3)
    assert cb.shape == (2, 3, 4, 5, 4) and cb.dtype == torch.float32
    assert codes.shape == (2, 3, 37, 4) and codes.dtype == torch.int32
    for bi in range(2):  # groups are independent: batching must not mix them
        for hi in range(3):
            cb1, codes1 = ref.pq_quantize(k[bi:bi + 1, hi:hi + 1], 4, 5, 3)
            assert torch.equal(codes1[0, 0], codes[bi, hi]) and torch.allclose(cb1[0, 0], cb[bi, hi])
    # the final codes are the nearest centroids of the final codebooks (brute force, fp64)
    x = k.double().reshape(2, 3, 37, 4, 4)  # [B, Hkv, Nk, M, ds]
    dist = ((x[..., None, :] - cb.double()[:, :, None]) ** 2).sum(-1)  # [B, Hkv, Nk, M, C]
    chosen = torch.gather(dist, -1, codes.long()[..., None]).squeeze(-1)
    assert (chosen <= dist.amin(-1) + 1e-5).all()


def test_pq_quantize_lloyd_objective_decreases_and_fixed_point():
    k = torch.randn(1, 2, 200, 32, generator=torch.Generator().manual_seed(1))

    def objective(iters):
        cb, codes = ref.pq_quantize(k, 8, 8, iters)
        return (ref.reconstruct_keys(cb, codes) - k).square().sum().item(), cb, codes

    errs = [objective(i)[0] for i in (0, 1, 3, 10)]
    assert all(a >= b - 1e-3 for a, b in zip(errs, errs[1:])), errs  # Lloyd never increases the distortion
    assert errs[-1] < 0.8 * errs[0]
    # after many iterations every non-empty centroid is the mean of its keys (Lloyd fixed point)
    _, cb, codes = objective(60)
    x = k.reshape(1, 2, 200, 8, 4).permute(0, 1, 3, 2, 4)  # [B, Hkv, M, Nk, ds]
    onehot = F.one_hot(codes.permute(0, 1, 3, 2).long(), 8).double()  # [B, Hkv, M, Nk, C]
    counts = onehot.sum(3)  # [B, Hkv, M, C]
    means = onehot.transpose(-1, -2) @ x.double() / counts.clamp(min=1)[..., None]
    assert torch.allclose(means[counts > 0], cb.double()[counts > 0], atol=1e-5)


def test_pq_quantize_recovers_exactly_quantized_keys():
    # keys that take C distinct values in blocks: the evenly spaced init hits each value once, so the codebook
    # reproduces every key exactly
    pts = torch.randn(1, 1, 4, 16)
    k = pts.repeat_interleave(5, dim=2)  # [1, 1, 20, 16]
    cb, codes = ref.pq_quantize(k, 4, 4, 2)
    assert torch.equal(codes[0, 0].long(), torch.arange(4).repeat_interleave(5)[:, None].expand(20, 4))
    # the centroid update is a mean of 5 equal fp32 values: equal up to the rounding of the sum
    assert torch.allclose(ref.reconstruct_keys(cb, codes), k, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# fully masked rows, dropout, gradcheck
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [1.0, 0.3])
@pytest.mark.parametrize("kind", ["bool", "neg_inf"])
def test_fully_masked_rows_give_zeros(density, kind):
    q, k, v = make_qkv(1, 2, 1, 6, 10, 32, torch.float32)
    mask = torch.ones(1, 1, 6, 10, dtype=torch.bool)
    mask[:, :, 2] = False  # row 2 sees nothing
    if kind == "neg_inf":
        mask = torch.zeros(1, 1, 6, 10).masked_fill(~mask, float("-inf"))
    dout = torch.randn(1, 2, 6, 32)
    out, idx, lse, dq, dk, dv = run_op(q, k, v, mask, False, density, dout)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert (idx[:, :, 2] == -1).all() and torch.isneginf(lse[:, :, 2]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, [0, 1, 3, 4, 5]]).all()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, 2], torch.zeros_like(dq[:, :, 2]))


def test_dropout_replays_and_has_the_right_statistics():
    b, h, nq, nk, p = 1, 2, 64, 16, 0.3
    q, k, _ = make_qkv(b, h, h, nq, nk, 32, torch.float64)
    v = torch.eye(nk, dtype=torch.float64).expand(b, h, nk, nk)  # out[i, j] = keep * P[i, j] / (1 - p)
    scale = 1 / math.sqrt(32)
    args = (q, k, v, None, False, scale, 1.0, 8, 16, 3)
    o1, idx, _ = OP(*args, p, torch.tensor(11))
    o2, _, _ = OP(*args, p, torch.tensor(11))
    o3, _, _ = OP(*args, p, torch.tensor(12))
    o0, _, _ = OP(*args, 0.0, None)
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)
    kept = o1 != 0
    assert torch.allclose(o1[kept], o0[kept] / (1 - p))  # survivors are rescaled by 1 / (1 - p)
    # 2048 Bernoulli(0.7) draws: std of the kept fraction is 0.01, so 0.05 is a 5-sigma band
    assert abs(kept.double().mean().item() - (1 - p)) < 0.05
    # query chunking never changes the mask: the reference stages with 1-row chunks agree (to GEMM rounding;
    # a different mask would change entries by O(1))
    sd = torch.tensor(11)
    oc, lc = ref.sparse_attention_forward(q, k, v, idx, None, False, scale, p, sd, chunk=1)
    assert torch.allclose(oc, o1, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(o1)
    g_full = ref.sparse_attention_backward(dout, q, k, v, o1, lc, idx, None, False, scale, p, sd)
    g_chunk = ref.sparse_attention_backward(dout, q, k, v, o1, lc, idx, None, False, scale, p, sd, chunk=3)
    for a, c in zip(g_full, g_chunk):
        assert torch.allclose(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("density", [1.0, 0.4])
def test_gradcheck_with_dropout_fp64(density):
    q, k, v = make_qkv(1, 2, 1, 5, 9, 8, torch.float64, seed=3)
    mask = torch.zeros(1, 1, 5, 9, dtype=torch.float64)
    mask[..., -2:] = float("-inf")

    def f(q, k, v):
        return OP(q, k, v, mask, True, 0.4, density, 2, 4, 2, 0.25, torch.tensor(5))[0]

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (q, k, v)), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# autocast, torch.compile, convenience wrapper
# ------------------------------------------------------------------------------------------------------------

def test_autocast_casts_qkv_but_not_the_mask():
    q, k, v = make_qkv(1, 2, 2, 4, 6, 32, torch.float32)
    mask = torch.zeros(1, 1, 4, 6)
    mask[:, :, 1] = torch.finfo(torch.float32).min  # row 1: every key "allowed" with a huge negative bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pq_sparse_attention(q, k, v, mask=mask, density=1.0)
    assert out.dtype == torch.bfloat16
    # SDPA semantics: a row whose keys all carry finfo.min attends uniformly (a bf16 cast of the mask would
    # have turned it into -inf, i.e. a zero row)
    vmean = v.to(torch.bfloat16).float().mean(2)  # [B, H, Dv]
    assert torch.allclose(out[:, :, 1].float(), vmean, atol=2e-2)


def test_torch_compile_matches_eager_forward_and_backward():
    q, k, v = make_qkv(1, 4, 2, 10, 24, 32, torch.float32)

    def f(q, k, v):
        return pq_sparse_attention(q, k, v, density=0.25, is_causal=True, dropout_p=0.1, seed=3).square().sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    leaves0 = [t.clone().requires_grad_() for t in (q, k, v)]
    loss0 = f(*leaves0)
    grads0 = torch.autograd.grad(loss0, leaves0)
    assert torch.allclose(loss, loss0) and all(torch.allclose(a, b) for a, b in zip(grads, grads0))


def test_wrapper_defaults_match_sdpa_scale():
    q, k, v = make_qkv(2, 2, 2, 8, 8, 64, torch.float64)
    out = pq_sparse_attention(q, k, v, density=1.0)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# bad arguments name themselves
# ------------------------------------------------------------------------------------------------------------

def _good():
    q, k, v = make_qkv(1, 4, 2, 6, 8, 16, torch.float32)
    return dict(q=q, k=k, v=v, mask=None, is_causal=False, scale=0.25, density=0.5, pq_subspaces=4,
                pq_centroids=4, kmeans_iters=2, dropout_p=0.0, seed=None)


BAD = [
    ("q", dict(q=torch.randn(4, 6, 16)), "q must be 4-D"),
    ("k", dict(k=torch.randn(1, 2, 8, 8)), "k head dim"),
    ("v", dict(v=torch.randn(1, 2, 7, 16)), "v shape"),
    ("heads", dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "multiple of kv heads"),
    ("dtype", dict(q=torch.randn(1, 4, 6, 16).half(), k=torch.randn(1, 2, 8, 16).half(),
                   v=torch.randn(1, 2, 8, 16).int()), "v dtype"),
    ("mixed", dict(q=torch.randn(1, 4, 6, 16).double()), "share a dtype"),
    ("density0", dict(density=0.0), "density"),
    ("density>1", dict(density=1.5), "density"),
    ("subspaces", dict(pq_subspaces=5), "pq_subspaces"),
    ("centroids", dict(pq_centroids=0), "pq_centroids"),
    ("iters", dict(kmeans_iters=-1), "kmeans_iters"),
    ("dropout", dict(dropout_p=1.0), "dropout_p"),
    ("seed_missing", dict(dropout_p=0.1), "seed"),
    ("seed_dtype", dict(dropout_p=0.1, seed=torch.tensor(1.0)), "seed"),
    ("mask_dims", dict(mask=torch.ones(6, 8, dtype=torch.bool)), "mask must be 4-D"),
    ("mask_shape", dict(mask=torch.ones(1, 1, 5, 8, dtype=torch.bool)), "mask shape"),
    ("mask_dtype", dict(mask=torch.ones(1, 1, 6, 8, dtype=torch.int32)), "mask dtype"),
    ("scale", dict(scale=float("nan")), "scale"),
    # the trailing schema arguments, positionally: min_seq_len, query_tile, min_keys, select_stride, share_kv_lists
    ("select_stride0", dict(min_seq_len=0, query_tile=4, min_keys=4, select_stride=0), "select_stride must be"),
    ("select_stride_no_tiles", dict(min_seq_len=0, query_tile=0, min_keys=4, select_stride=2), "needs query tiles"),
    ("share_no_tiles", dict(min_seq_len=0, query_tile=0, min_keys=4, select_stride=1, share_kv_lists=True),
     "share_kv_lists=True needs query tiles"),
]


@pytest.mark.parametrize("name,change,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_value_error(name, change, msg):
    args = _good()
    args.update(change)
    with pytest.raises(ValueError, match=msg):
        OP(*args.values())
