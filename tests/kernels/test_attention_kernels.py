"""PQ-sparse attention Triton kernels (interpreter, tiny shapes) vs the plain-PyTorch reference stages
and an fp64 ground truth.

Accuracy rule: the kernel's max error against fp64 must be at most 2x the error of the same math done
by PyTorch in the input dtype (a dense masked formulation over exactly the kept keys) plus a small
absolute floor (fp32 summation-order noise).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it too)

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from spt_compile.kernels import attention_bwd as kbwd
from spt_compile.kernels import attention_fwd as kfwd
from spt_compile.kernels import attention_topk as ktopk
from spt_compile.kernels import pq as kpq
from spt_compile.lowering.reference import pq_attention as ref

# no shrinking: under the interpreter it can take minutes; the failing example is printed as found
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                phases=(Phase.explicit, Phase.generate))
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-3}


# ------------------------------------------------------------------------------------------------
# problem builders and the dense torch formulation
# ------------------------------------------------------------------------------------------------

def make_mask(kind, B, H, Nq, Nk, gen):
    """(mask, is_causal) for kind in none / causal / padding (bool [B,1,1,Nk]) / bias (float [1,H,Nq,Nk]
    with -inf holes and one fully masked row)."""
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "padding":
        lens = torch.randint(1, Nk + 1, (B,), generator=gen)
        return (torch.arange(Nk)[None, :] < lens[:, None])[:, None, None, :], False
    bias = torch.randn(1, H, Nq, Nk, generator=gen)
    bias = bias.masked_fill(torch.rand(1, H, Nq, Nk, generator=gen) < 0.2, float("-inf"))
    bias[:, :, Nq // 2] = float("-inf")  # a fully masked row: out 0, lse -inf
    return bias, False


def allowed_dense(mask, is_causal, B, H, Nq, Nk):
    """[B, H, Nq, Nk] bool: mask allows (bool True / finite bias) and j <= i if causal."""
    ok = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    if mask is not None:
        ok = ok & (mask if mask.dtype == torch.bool else torch.isfinite(mask))
    if is_causal:
        ok = ok & torch.ones(Nq, Nk, dtype=torch.bool).tril()
    return ok


def kept_dense(idx, Nk):
    """[B, H, Nq, Nk] bool: the keys listed in idx (-1 = empty)."""
    ii = idx.long()
    keep = torch.zeros(*idx.shape[:3], Nk + 1, dtype=torch.bool)
    keep.scatter_(-1, torch.where(ii >= 0, ii, Nk), True)
    return keep[..., :Nk]


def dense_attention(q, k, v, keep, mask, scale, zscale=None):
    """Softmax attention over the keys in `keep`, in q's dtype (the 'torch, same dtype' baseline and,
    in fp64, the ground truth). zscale [B,H,Nq,Nk]: dropout keep/(1-p) applied after the softmax."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ kk.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        s = s + torch.where(torch.isfinite(mask), mask, 0).to(s.dtype)
    any_ = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~any_, 0.0)
    p = torch.softmax(s, -1) * any_
    if zscale is not None:
        p = p * zscale.to(p.dtype)
    return p @ vv


def random_idx(B, H, Nq, Nk, L, gen):
    """A valid idx: L distinct random keys per row, some slots -1 (valid slots first)."""
    idx = torch.rand(B, H, Nq, Nk, generator=gen).argsort(-1)[..., :L].int()
    nvalid = torch.randint(0, L + 1, (B, H, Nq, 1), generator=gen)
    return torch.where(torch.arange(L) < nvalid, idx, -1)


def max_err(x, gt):
    return (x.double() - gt.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_gt(name, kernel, torch_same, gt, dtype):
    """err_kernel <= 2 err_torch + floor. The floor adds one rounding of the largest output to the
    output dtype (2^-8 relative for bf16, which any bf16 result carries; torch's own max error can
    land below it by luck on a small element) on top of the absolute FLOOR."""
    ek, et = max_err(kernel, gt), max_err(torch_same, gt)
    top = gt.abs().max().item() if gt.numel() else 0.0
    floor = FLOOR[dtype] + top * (2 ** -8 if dtype == torch.bfloat16 else 2 ** -23)
    assert ek <= 2 * et + floor, f"{name}: kernel err {ek:.3g} vs torch-{dtype} err {et:.3g}"


# ------------------------------------------------------------------------------------------------
# stage 1: PQ
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,Hkv,Nk,D,M,C,iters,dtype", [
    (1, 2, 37, 32, 4, 8, 3, torch.float32),
    (2, 1, 50, 64, 8, 16, 2, torch.bfloat16),
    (1, 1, 5, 32, 2, 8, 1, torch.float32),    # C > Nk: repeated init keys, empty clusters
])
def test_pq_quantize_matches_reference(B, Hkv, Nk, D, M, C, iters, dtype):
    gen = torch.Generator().manual_seed(Nk)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    cb, codes = kpq.pq_quantize(k, M, C, iters)
    rcb, rcodes = ref.pq_quantize(k, M, C, iters)
    assert cb.shape == rcb.shape and cb.dtype == torch.float32
    assert codes.shape == rcodes.shape == (B, Hkv, Nk, M) and codes.dtype == torch.int32
    # same init and Lloyd steps: identical up to fp32 rounding of near-ties (none on random data)
    assert torch.equal(codes, rcodes)
    torch.testing.assert_close(cb, rcb, rtol=1e-5, atol=1e-5)


def test_pq_assign_is_nearest_centroid():
    """The assignment kernel alone vs an fp64 brute-force argmin over the same codebooks."""
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(2, 2, 45, 64, generator=gen)
    cb = torch.randn(2, 2, 4, 24, 16, generator=gen)  # C = 24: not a multiple of BLOCK_C
    codes = kpq.pq_assign(k, cb)
    x = k.double().reshape(2, 2, 45, 4, 1, 16)
    d = ((x - cb.double().permute(0, 1, 2, 3, 4)[:, :, None]) ** 2).sum(-1)  # [B, Hkv, Nk, M, C]
    best = d.min(-1).values
    got = d.gather(-1, codes.long()[..., None]).squeeze(-1)
    assert torch.allclose(got, best, rtol=0, atol=1e-5)  # equal distance (ties aside: exact codes)
    assert (codes.long() == d.argmin(-1)).float().mean() == 1.0


def test_pq_bad_args():
    k = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="subspaces"):
        kpq.pq_quantize(k, 5, 4, 1)
    with pytest.raises(ValueError, match="centroids"):
        kpq.pq_quantize(k, 4, 0, 1)
    with pytest.raises(ValueError, match="iters"):
        kpq.pq_quantize(k, 4, 4, -1)
    with pytest.raises(ValueError, match="k must be"):
        kpq.pq_quantize(k[0], 4, 4, 1)


# ------------------------------------------------------------------------------------------------
# stage 2: top-L selection
# ------------------------------------------------------------------------------------------------

def pq_scores64(q, cb, codes, mask, is_causal, scale):
    """fp64 PQ scores [B, H, Nq, Nk], -inf where not allowed."""
    B, H, Nq, _ = q.shape
    khat = ref.reconstruct_keys(cb, codes).double()
    s = (q.double() @ khat.repeat_interleave(H // khat.shape[1], 1).transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        s = s + torch.where(torch.isfinite(mask), mask, 0).double()
    ok = allowed_dense(mask, is_causal, B, H, Nq, codes.shape[2])
    return s.masked_fill(~ok, float("-inf"))


def selected_scores(s, idx):
    """Descending multiset of the scores of idx's valid slots (-inf pads) [B, H, Nq, L]."""
    v = s.gather(-1, idx.long().clamp_min(0)).masked_fill(idx < 0, float("-inf"))
    return v.sort(-1, descending=True).values


@settings(max_examples=6, **SETTINGS)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 2), Nq=st.integers(1, 20),
       Nk=st.integers(2, 70), D=st.sampled_from([32, 64, 128]), density=st.floats(0.05, 0.6),
       kind=st.sampled_from(["none", "causal", "padding", "bias"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_select_topk_vs_reference(B, Hkv, G, Nq, Nk, D, density, kind, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    H, M, C = Hkv * G, D // 16, 8
    q = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    mask, causal = make_mask(kind, B, H, Nq, Nk, gen)
    L = ref.num_kept(Nk, density)
    cb, codes = ref.pq_quantize(k, M, C, 2)
    scale = D ** -0.5
    idx = ktopk.select_topk(q, cb, codes, mask, causal, scale, L)
    ridx = ref.select_topk(q, cb, codes, mask, causal, scale, L)
    assert idx.shape == (B, H, Nq, L) and idx.dtype == torch.int32
    # same number of valid slots per row, valid slots first, no duplicates, only allowed keys
    nvalid = (idx >= 0).sum(-1)
    assert torch.equal(nvalid, (ridx >= 0).sum(-1))
    assert torch.equal(idx >= 0, torch.arange(L) < nvalid[..., None])
    ok = allowed_dense(mask, causal, B, H, Nq, Nk)
    assert torch.equal(kept_dense(idx, Nk).sum(-1), nvalid)            # distinct keys
    assert bool((kept_dense(idx, Nk) <= ok).all())                      # allowed keys only
    # ties are common with PQ codes: compare the multiset of selected scores, not the indices
    s = pq_scores64(q, cb, codes, mask, causal, scale)
    got, want = selected_scores(s, idx), selected_scores(s, ridx)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_select_topk_multiple_query_tiles_and_ties():
    """Nq > BLOCK_M (several query tiles) and a codebook with C = 2: massive exact ties."""
    gen = torch.Generator().manual_seed(3)
    B, H, Nq, Nk, D, L = 1, 1, 40, 50, 32, 13
    q = torch.randn(B, H, Nq, D, generator=gen)
    k = torch.randn(B, H, Nk, D, generator=gen)
    cb, codes = ref.pq_quantize(k, 2, 2, 1)  # only 4 distinct k_hat: every score is tied
    idx = ktopk.select_topk(q, cb, codes, None, True, 0.3, L)
    s = pq_scores64(q, cb, codes, None, True, 0.3)
    ridx = ref.select_topk(q, cb, codes, None, True, 0.3, L)
    assert torch.equal((idx >= 0).sum(-1), torch.clamp(torch.arange(Nq) + 1, max=L)[None, None])
    torch.testing.assert_close(selected_scores(s, idx), selected_scores(s, ridx))
    assert torch.equal(kept_dense(idx, Nk).sum(-1), (idx >= 0).sum(-1))


def test_select_topk_bad_args():
    q = torch.randn(1, 2, 4, 32)
    cb, codes = ref.pq_quantize(torch.randn(1, 2, 8, 32), 4, 4, 1)
    with pytest.raises(ValueError, match="L must"):
        ktopk.select_topk(q, cb, codes, None, False, 1.0, 0)
    with pytest.raises(ValueError, match="codes"):
        ktopk.select_topk(q, cb, codes[0], None, False, 1.0, 2)
    with pytest.raises(ValueError, match="mask"):
        ktopk.select_topk(q, cb, codes, torch.ones(1, 3, 4, 8, dtype=torch.bool), False, 1.0, 2)
    with pytest.raises(ValueError, match="q"):
        ktopk.select_topk(q.int(), cb, codes, None, False, 1.0, 2)


# ------------------------------------------------------------------------------------------------
# stages 3-4: forward and backward
# ------------------------------------------------------------------------------------------------

def attention_problem(B, Hkv, G, Nq, Nk, D, DV, density, kind, dtype, seed, exact=False):
    gen = torch.Generator().manual_seed(seed)
    H = Hkv * G
    q = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nk, DV, generator=gen).to(dtype)
    mask, causal = make_mask(kind, B, H, Nq, Nk, gen)
    if exact:
        idx = ref.allowed_indices(mask, causal, (B, H, Nq, Nk), q.device)
    else:
        idx = random_idx(B, H, Nq, Nk, ref.num_kept(Nk, density), gen)
    keep = kept_dense(idx, Nk) & allowed_dense(mask, causal, B, H, Nq, Nk)
    return q, k, v, mask, causal, idx, keep


FWD_CASE = dict(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.integers(1, 2), Nq=st.integers(1, 9),
                Nk=st.integers(1, 70), D=st.sampled_from([32, 64, 128]), DV=st.sampled_from([16, 32, 48]),
                density=st.floats(0.05, 1.0), kind=st.sampled_from(["none", "causal", "padding", "bias"]),
                dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))


@settings(max_examples=8, **SETTINGS)
@given(**FWD_CASE, exact=st.booleans())
def test_forward_vs_reference_and_fp64(B, Hkv, G, Nq, Nk, D, DV, density, kind, dtype, seed, exact):
    q, k, v, mask, causal, idx, keep = attention_problem(B, Hkv, G, Nq, Nk, D, DV, density, kind, dtype,
                                                          seed, exact)
    scale = D ** -0.5
    out, lse = kfwd.sparse_attention_forward(q, k, v, idx, mask, causal, scale, 0.0, None)
    rout, rlse = ref.sparse_attention_forward(q, k, v, idx, mask, causal, scale, 0.0, None)
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    m64 = None if mask is None else mask.double()
    gt = dense_attention(q.double(), k.double(), v.double(), keep, m64, scale)
    same = dense_attention(q, k, v, keep, mask, scale)
    assert_close_to_gt("out", out, same, gt, dtype)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5  # vs the reference stage: one output rounding
    torch.testing.assert_close(out.double(), rout.double(), rtol=tol, atol=FLOOR[dtype])
    # lse: -inf exactly on rows without a kept key, else the fp32 logsumexp of the kept logits
    empty = ~keep.any(-1)
    assert torch.equal(torch.isneginf(lse), empty) and torch.equal(torch.isneginf(rlse), empty)
    assert bool((out[empty] == 0).all())
    G_ = q.shape[1] // k.shape[1]
    s64 = (q.double() @ k.double().repeat_interleave(G_, 1).transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        s64 = s64 + torch.where(torch.isfinite(m64), m64, 0)
    lse64 = s64.masked_fill(~keep, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse[~empty].double(), lse64[~empty], rtol=1e-5, atol=1e-5)
    if exact and kind != "bias":  # exact mode equals SDPA (finite rows)
        am = None if mask is None else mask.expand(B, q.shape[1], Nq, Nk)
        sd = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=am, is_causal=causal, scale=scale,
            enable_gqa=True)
        assert_close_to_gt("exact", out[~empty], sd[~empty].to(dtype), gt[~empty], dtype)


def grads_dense(q, k, v, keep, mask, scale, dout, zscale=None):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = dense_attention(qq, kk, vv, keep, mask, scale, zscale)
    o.backward(dout.to(o.dtype))
    return o.detach(), qq.grad, kk.grad, vv.grad


@settings(max_examples=6, **SETTINGS)
@given(**FWD_CASE)
def test_backward_vs_reference_and_fp64(B, Hkv, G, Nq, Nk, D, DV, density, kind, dtype, seed):
    q, k, v, mask, causal, idx, keep = attention_problem(B, Hkv, G, Nq, Nk, D, DV, density, kind, dtype,
                                                          seed)
    scale = D ** -0.5
    out, lse = kfwd.sparse_attention_forward(q, k, v, idx, mask, causal, scale, 0.0, None)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    m64 = None if mask is None else mask.double()
    _, *gt = grads_dense(q.double(), k.double(), v.double(), keep, m64, scale, dout.double())
    _, *same = grads_dense(q, k, v, keep, mask, scale, dout)
    rgrads = ref.sparse_attention_backward(dout, q, k, v, out, lse, idx, mask, causal, scale, 0.0, None)
    results = {}
    for mode in kbwd.DKV_MODES:
        grads = kbwd.sparse_attention_backward(dout, q, k, v, out, lse, idx, mask, causal, scale, 0.0, None,
                                               dkv_mode=mode)
        for name, g, s_, g64, r in zip(("dq", "dk", "dv"), grads, same, gt, rgrads):
            assert g.dtype == dtype and g.shape == g64.shape
            assert_close_to_gt(f"{mode} {name}", g, s_, g64, dtype)
            # vs the reference stage: equal up to a couple of roundings to the output dtype
            tol = 2 ** -6 if dtype == torch.bfloat16 else 1e-5
            top = g64.abs().max().item() if g64.numel() else 0.0
            torch.testing.assert_close(g.double(), r.double(), rtol=tol, atol=tol * top + FLOOR[dtype],
                                       msg=f"{mode} {name} vs reference")
        results[mode] = grads
    # the two modes sum in different orders: equal up to one rounding of the output dtype
    for a, b in zip(results["sorted"], results["atomic"]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-5,
                                   atol=FLOOR[dtype])


def test_transposed_index_groups_pairs_by_key():
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, Nq, Nk, L = 2, 4, 2, 5, 7, 3
    idx = random_idx(B, H, Nq, Nk, L, gen)
    pairs, offsets = kbwd.transposed_index(idx, H, Hkv, Nk)
    assert offsets.shape == (B * Hkv * Nk + 1,) and offsets[0] == 0
    assert int(offsets[-1]) == int((idx >= 0).sum())
    flat = idx.reshape(-1).long()
    for g in [0, 3, Nk + 2, B * Hkv * Nk - 1]:  # a few keys: their pairs point at that key
        p = pairs[offsets[g]:offsets[g + 1]]
        b, hk, j = g // (Hkv * Nk), (g // Nk) % Hkv, g % Nk
        bh = p // (Nq * L)
        assert bool((flat[p] == j).all()) and bool((bh // H == b).all())
        assert bool(((bh % H) // (H // Hkv) == hk).all())
        expect = ((idx[b, hk * 2:hk * 2 + 2] == j).sum())
        assert len(p) == int(expect)


# ------------------------------------------------------------------------------------------------
# dropout: determinism and forward/backward consistency
# ------------------------------------------------------------------------------------------------

def recover_dropout_scale(q, k, idx, mask, causal, scale, p, seed):
    """zscale [B, H, Nq, Nk] = keep/(1-p) of the kernel's dropout, read back by running the forward
    with v = identity (Dv = Nk): out[.., j] = P_ij * z_ij, and with p = 0: P_ij."""
    B, Hkv, Nk, _ = k.shape
    eye = torch.eye(Nk, dtype=q.dtype).expand(B, Hkv, Nk, Nk)
    with_drop, _ = kfwd.sparse_attention_forward(q, k, eye, idx, mask, causal, scale, p, seed)
    plain, _ = kfwd.sparse_attention_forward(q, k, eye, idx, mask, causal, scale, 0.0, None)
    return torch.where(plain > 0, with_drop / plain.clamp_min(1e-30), 0.0)


def test_dropout_deterministic_and_backward_consistent():
    B, Hkv, G, Nq, Nk, D, DV, p = 1, 2, 2, 9, 24, 32, 16, 0.3
    q, k, v, mask, causal, idx, keep = attention_problem(B, Hkv, G, Nq, Nk, D, DV, 0.7, "causal",
                                                          torch.float32, 5)
    scale, seed = D ** -0.5, torch.tensor(1234)
    o1, l1 = kfwd.sparse_attention_forward(q, k, v, idx, mask, causal, scale, p, seed)
    o2, l2 = kfwd.sparse_attention_forward(q, k, v, idx, mask, causal, scale, p, seed)
    o3, _ = kfwd.sparse_attention_forward(q, k, v, idx, mask, causal, scale, p, torch.tensor(99))
    o0, l0 = kfwd.sparse_attention_forward(q, k, v, idx, mask, causal, scale, 0.0, None)
    assert torch.equal(o1, o2) and torch.equal(l1, l2) and not torch.equal(o1, o3)
    torch.testing.assert_close(l1, l0)  # lse is over the kept keys before dropout

    z = recover_dropout_scale(q, k, idx, mask, causal, scale, p, seed)
    zk = z[keep]
    # every kept entry is either dropped (0) or scaled by 1/(1-p); the drop rate is about p
    assert torch.allclose(zk, torch.where(zk > 0.5, 1 / (1 - p), 0.0), atol=1e-4)
    rate = (zk < 0.5).float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / zk.numel()), rate
    # forward and backward with dropout equal the dense formulation with that same mask
    dout = torch.randn(o1.shape, generator=torch.Generator().manual_seed(7))
    o64, *g64 = grads_dense(q.double(), k.double(), v.double(), keep, None, scale, dout.double(),
                            zscale=z.double())
    torch.testing.assert_close(o1.double(), o64, rtol=1e-4, atol=1e-5)
    for mode in kbwd.DKV_MODES:
        grads = kbwd.sparse_attention_backward(dout, q, k, v, o1, l1, idx, mask, causal, scale, p, seed,
                                               dkv_mode=mode)
        for name, g, want in zip(("dq", "dk", "dv"), grads, g64):
            torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-5, msg=f"{mode} {name}")


def test_attention_bad_args():
    q, k, v = torch.randn(1, 2, 4, 32), torch.randn(1, 1, 6, 32), torch.randn(1, 1, 6, 16)
    idx = torch.zeros(1, 2, 4, 3, dtype=torch.int32)
    f = kfwd.sparse_attention_forward
    with pytest.raises(ValueError, match="dropout_p"):
        f(q, k, v, idx, None, False, 1.0, 1.0, torch.tensor(0))
    with pytest.raises(ValueError, match="seed"):
        f(q, k, v, idx, None, False, 1.0, 0.1, None)
    with pytest.raises(ValueError, match="idx"):
        f(q, k, v, idx[0], None, False, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="kv heads"):
        f(torch.randn(1, 3, 4, 32), torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 16),
          torch.zeros(1, 3, 4, 3, dtype=torch.int32), None, False, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="mask"):
        f(q, k, v, idx, torch.zeros(2, 1, 4, 6), False, 1.0, 0.0, None)
    out, lse = f(q, k, v, idx, None, False, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="dkv_mode"):
        kbwd.sparse_attention_backward(out, q, k, v, out, lse, idx, None, False, 1.0, 0.0, None,
                                       dkv_mode="dense")
    with pytest.raises(ValueError, match="lse"):
        kbwd.sparse_attention_backward(out, q, k, v, out, lse[0], idx, None, False, 1.0, 0.0, None)
