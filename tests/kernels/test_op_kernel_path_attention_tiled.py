"""torch.ops.spt.pq_sparse_attention in query-tile mode (query_tile = T > 0) through the Triton tile kernels on CPU
tensors (SPT_KERNELS=triton, interpreter): the op -> launcher wiring of lowering/attention.py (PQ in Triton, tile
selection, FA2-style forward, the tile backward with the transposed key -> tiles index) and its deliberate
fallbacks to the plain-PyTorch tile path. The kernels themselves are tested stage by stage in
test_attention_tiled_kernels.py. Each result is compared with
  - the plain tile path given the same kept keys (lowering/reference/tiled_attention.py stages), and
  - an fp64 ground truth: autograd through a dense softmax in which query i sees exactly its tile's kept keys
    that it may attend to (tests/kernels/_tiled_truth.py, independent of both).
A spy on the launchers proves which path ran (a silent fallback would pass the numeric checks otherwise). The one
deliberate fallback: head dims over the kernels' limit run the plain tile path (forward and backward).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it too)

import math

import pytest
import torch
import torch.nn.functional as F

import spt_compile.lowering  # noqa: F401  registers the ops
from spt_compile.kernels import attention_tiled_bwd as kbwd
from spt_compile.kernels import attention_tiled_fwd as kfwd
from spt_compile.kernels import attention_tiled_select as ksel
from spt_compile.kernels import autotune
from spt_compile.kernels import pq as kpq
from spt_compile.lowering import attention_tiled, attention_tiled_cpu
from spt_compile.lowering.formulas import attention_num_tiles, attention_tile_slots
from spt_compile.lowering.reference import tiled_attention as ta
from tests.helpers import kernels_mode
from tests.kernels._tiled_truth import (FLOOR, ULP, allowed_dense, assert_close_to_gt, build_mask, dense_attention,
                                        dense_grads, max_err, tile_kept)

OP = torch.ops.spt.pq_sparse_attention.default
M, C, ITERS = 4, 8, 2  # PQ subspaces, centroids, Lloyd steps of every call here


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the Triton tile launchers and of the plain-PyTorch tile stages the op may run."""
    calls = dict.fromkeys(("pq", "select", "fwd", "bwd", "plain_select", "plain_fwd", "plain_bwd"), 0)

    def wrap(mod, name, key):
        orig = getattr(mod, name)

        def f(*a, **kw):
            calls[key] += 1
            return orig(*a, **kw)
        monkeypatch.setattr(mod, name, f)

    wrap(kpq, "pq_quantize", "pq")
    wrap(ksel, "select_tiles", "select")
    wrap(kfwd, "tiled_attention_forward", "fwd")
    wrap(kbwd, "tiled_attention_backward", "bwd")
    # the plain path: its selection entry (also the exact lists), and the attention stages of the reference and
    # of the fast CPU path (whichever the op's plain branch calls)
    wrap(attention_tiled, "tiled_select", "plain_select")
    for mod in (ta, attention_tiled_cpu):
        wrap(mod, "tiled_attention_forward", "plain_fwd")
        wrap(mod, "tiled_attention_backward", "plain_bwd")
    return calls


KERNEL_RUN = {"pq": 1, "select": 1, "fwd": 1, "bwd": 1, "plain_select": 0, "plain_fwd": 0, "plain_bwd": 0}


def make(b, h, hkv, nq, nk, d, dv, dtype, kind, seed, full_row=True, contiguous=True):
    """(q, k, v, mask, is_causal, dout); non-contiguous = the [B, N, H, D].transpose(1, 2) views HF passes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(bb, hh, n, dd):
        x = torch.randn(bb, n, hh, dd, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        return x.contiguous() if contiguous else x

    q, k, v, dout = rnd(b, h, nq, d), rnd(b, hkv, nk, d), rnd(b, hkv, nk, dv), rnd(b, h, nq, dv)
    mask, causal = build_mask(kind, b, h, nq, nk, dtype, g, full_row)
    return q, k, v, mask, causal, dout


def run_op(q, k, v, mask, causal, dout, density, mode, tile, min_keys=4, dropout_p=0.0, seed=None,
           min_seq_len=0, grad=(True, True, True), mask_grad=False):
    """(out, idx, lse, dq, dk, dv[, dmask]) of the op's forward and autograd backward under SPT_KERNELS=mode."""
    leaves = [t.detach().clone().requires_grad_(r) for t, r in zip((q, k, v), grad)]
    if mask_grad:
        mask = mask.detach().clone().requires_grad_()
    sd = None if seed is None else torch.tensor(seed, dtype=torch.int64)
    with kernels_mode(mode):
        out, idx, lse = OP(*leaves, mask, causal, q.shape[-1] ** -0.5, density, M, C, ITERS, dropout_p, sd,
                           min_seq_len, tile, min_keys)
        out.backward(dout)
    res = (out.detach(), idx, lse) + tuple(t.grad for t in leaves)
    return res + (mask.grad,) if mask_grad else res


def plain_given_idx(q, k, v, mask, causal, dout, idx, tile):
    """(out, dq, dk, dv) of the plain-PyTorch tile stages over the kernel path's kept keys."""
    scale = q.shape[-1] ** -0.5
    out, lse = ta.tiled_attention_forward(q, k, v, idx, mask, causal, scale, tile, 0.0, None)
    dq, dk, dv, _ = ta.tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, causal, scale, tile, 0.0, None)
    return out, dq, dk, dv


def check(res, q, k, v, mask, causal, dout, tile, dtype, plain=None):
    """Kernel-path (out, dq, dk, dv) vs fp64 over its own kept keys, and vs the plain path given the same idx."""
    out, idx, _lse, *grads = res
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    scale = q.shape[-1] ** -0.5
    keep = tile_kept(idx, tile, nq, nk) & allowed_dense(mask, causal, b, h, nq, nk)
    m64 = None if mask is None else mask.double()
    truth = dense_grads(q.double(), k.double(), v.double(), keep, m64, scale, dout.double())
    same = dense_grads(q, k, v, keep, mask, scale, dout)
    plain = plain_given_idx(q, k, v, mask, causal, dout, idx, tile) if plain is None else plain
    for name, g, s_, t, p in zip(("out", "dq", "dk", "dv"), (out, *grads), same, truth, plain):
        assert g.dtype == dtype and g.shape == t.shape, name
        assert_close_to_gt(name, g, s_, t, dtype)
        top = t.abs().max().item() if t.numel() else 0.0
        tol = 4 * ULP[dtype] if dtype != torch.float32 else 1e-5
        torch.testing.assert_close(g.double(), p.double(), rtol=tol, atol=tol * top + FLOOR[dtype],
                                   msg=lambda m, name=name: f"{name} vs plain tile path: {m}")
    return keep


# ------------------------------------------------------------------------------------------------------------
# sparse mode: PQ + tile selection + attention in Triton
# ------------------------------------------------------------------------------------------------------------

SPARSE = [  # (B, H, Hkv, Nq, Nk, D, Dv, T, dtype, mask kind, density)
    (1, 2, 2, 12, 20, 16, 16, 1, torch.float32, "causal", 0.3),          # T = 1: per-query lists
    (1, 4, 2, 37, 37, 16, 16, 16, torch.float32, "bias", 0.3),           # GQA, Nq % T != 0, -inf / finfo rows
    (2, 2, 1, 30, 41, 32, 16, 12, torch.bfloat16, "bool", 0.35),         # T not a power of two, MQA, Dv != D
    (1, 2, 2, 33, 33, 16, 16, 16, torch.bfloat16, "pad_finfo_min", 0.3),  # finfo.min padding (+ an all-pad row)
    (1, 2, 1, 40, 40, 16, 32, 16, torch.float32, "bias_causal", 0.25),
    (2, 2, 2, 21, 26, 16, 16, 16, torch.float32, "pad_inf", 0.4),
]


@pytest.mark.parametrize("case", SPARSE, ids=[f"T{c[7]}-{str(c[8])[6:]}-{c[9]}" for c in SPARSE])
def test_sparse_mode_kernel_path(case, spy):
    b, h, hkv, nq, nk, d, dv, tile, dtype, kind, density = case
    q, k, v, mask, causal, dout = make(b, h, hkv, nq, nk, d, dv, dtype, kind, seed=nq + nk)
    res = run_op(q, k, v, mask, causal, dout, density, "triton", tile)
    assert spy == KERNEL_RUN
    out, idx, lse = res[:3]
    L = attention_tile_slots(nq, nk, density, 4, causal)
    assert idx.shape == (b, h, attention_num_tiles(nq, tile), L) and idx.dtype == torch.int32
    assert idx.is_contiguous() and out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == (b, h, nq)
    # the plain path keeps as many keys per tile (which keys may differ only on PQ-mass ties)
    plain = run_op(q, k, v, mask, causal, dout, density, "reference", tile)
    assert spy["plain_select"] == 1 and spy["plain_fwd"] >= 1 and spy["plain_bwd"] >= 1
    assert {n: spy[n] for n in ("pq", "select", "fwd", "bwd")} == {"pq": 1, "select": 1, "fwd": 1, "bwd": 1}
    assert torch.equal((idx >= 0).sum(-1), (plain[1] >= 0).sum(-1))
    keep = check(res, q, k, v, mask, causal, dout, tile, dtype)
    empty = ~keep.any(-1)
    assert torch.equal(torch.isneginf(lse), empty) and bool((out[empty] == 0).all())
    assert bool((res[3][empty] == 0).all())  # dq of a query without keys


def test_noncontiguous_inputs_and_frozen_kv(spy):
    """HF passes transposed views: the launchers use the strides. k, v frozen: dq only, the same values."""
    args = (1, 4, 2, 20, 24, 16, 16, torch.float32, "causal")
    q, k, v, mask, causal, dout = make(*args, seed=3, contiguous=False)
    assert not q.is_contiguous() and not dout.is_contiguous()
    res = run_op(q, k, v, mask, causal, dout, 0.4, "triton", 8)
    res_c = run_op(*(t.contiguous() for t in (q, k, v)), mask, causal, dout.contiguous(), 0.4, "triton", 8)
    for a, c in zip(res, res_c):
        assert torch.equal(a, c)  # same kernels, same values: only the strides differ
    frozen = run_op(q, k, v, mask, causal, dout, 0.4, "triton", 8, grad=(True, False, False))
    assert frozen[4] is None and frozen[5] is None and torch.equal(frozen[3], res[3])
    assert spy["bwd"] == 3 and spy["plain_bwd"] == 0


# ------------------------------------------------------------------------------------------------------------
# exact mode: every key a tile may see, equals SDPA
# ------------------------------------------------------------------------------------------------------------

EXACT = [  # (B, H, Hkv, Nq, Nk, D, Dv, T, dtype, kind, density, min_seq_len)
    (1, 2, 2, 13, 13, 16, 16, 16, torch.float32, "none", 1.0, 0),
    (2, 4, 2, 19, 19, 16, 16, 5, torch.float32, "causal", 1.0, 0),       # GQA, T not a power of two
    (1, 2, 1, 18, 23, 32, 16, 16, torch.bfloat16, "bool", 1.0, 0),
    (1, 2, 2, 17, 21, 16, 16, 16, torch.float32, "pad_finfo_min", 0.3, 64),  # below min_seq_len: idx all -1
    (1, 2, 2, 20, 20, 16, 16, 16, torch.bfloat16, "causal", 0.25, 32),       # below min_seq_len, causal
]


@pytest.mark.parametrize("case", EXACT, ids=[f"T{c[7]}-{str(c[8])[6:]}-{c[9]}-min{c[11]}" for c in EXACT])
def test_exact_mode_kernel_path_equals_sdpa(case, spy):
    b, h, hkv, nq, nk, d, dv, tile, dtype, kind, density, min_seq_len = case
    q, k, v, mask, causal, dout = make(b, h, hkv, nq, nk, d, dv, dtype, kind, seed=nq, full_row=False)
    res = run_op(q, k, v, mask, causal, dout, density, "triton", tile, min_seq_len=min_seq_len)
    assert spy["fwd"] == 1 and spy["bwd"] == 1 and spy["pq"] == 0 and spy["select"] == 0  # no PQ, no selection
    assert spy["plain_fwd"] == 0 and spy["plain_bwd"] == 0
    plain = run_op(q, k, v, mask, causal, dout, density, "reference", tile, min_seq_len=min_seq_len)
    assert torch.equal(res[1], plain[1])  # the same (exact, or all -1) lists on both paths
    L = attention_tile_slots(nq, nk, density, 4, causal)
    full = attention_tile_slots(nq, nk, 1.0, 1, causal)
    run_idx = ta.tile_allowed_indices(mask, causal, (b, h, nq, nk), tile, full, q.device)
    if full > L:
        assert bool((res[1] == -1).all())  # exact below min_seq_len: the lists did not fit; rebuilt by the op
    keep = check((res[0], run_idx) + res[2:], q, k, v, mask, causal, dout, tile, dtype)
    assert torch.equal(keep, allowed_dense(mask, causal, b, h, nq, nk))  # every allowed key
    # SDPA in fp64, forward and every gradient (every row has an allowed key here)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    am = None if mask is None else mask if mask.dtype == torch.bool else mask.double()
    sd = F.scaled_dot_product_attention(*leaves, attn_mask=am, is_causal=causal, enable_gqa=True)
    sd.backward(dout.double())
    for name, g, t in zip(("out", "dq", "dk", "dv"), (res[0], *res[3:]), (sd.detach(), *(x.grad for x in leaves))):
        top = t.abs().max().item()
        assert max_err(g, t) <= 8 * ULP[dtype] * top + 4 * FLOOR[dtype], f"{name} vs SDPA: {max_err(g, t):.3g}"


# ------------------------------------------------------------------------------------------------------------
# dropout: the kernels' own mask, replayed exactly by the kernel backward
# ------------------------------------------------------------------------------------------------------------

def recover_zscale(q, k, mask, causal, density, tile, p, seed):
    """(keep / (1 - p) per (query, key) [B, H, Nq, Nk], idx) of the kernel path's dropout, read back through the
    op with v = identity (Dv = Nk: out[.., j] = P_ij z_ij), divided by the same call without dropout (P_ij)."""
    b, hkv, nk, _ = k.shape
    eye = torch.eye(nk, dtype=q.dtype).expand(b, hkv, nk, nk)
    with kernels_mode("triton"):
        args = (q, k, eye, mask, causal, q.shape[-1] ** -0.5, density, M, C, ITERS)
        zd, idx, _ = OP(*args, p, torch.tensor(seed), 0, tile, 4)
        plain, idx0, _ = OP(*args, 0.0, None, 0, tile, 4)
    assert torch.equal(idx, idx0)  # the selection does not depend on v or dropout
    return torch.where(plain > 0, zd / plain.clamp_min(1e-30), 0.0), idx


def test_dropout_replays_exactly_in_backward(spy):
    b, h, hkv, nq, nk, d, p, tile, density = 1, 2, 1, 20, 24, 16, 0.3, 8, 0.5
    q, k, v, mask, causal, dout = make(b, h, hkv, nq, nk, d, d, torch.float32, "causal", seed=9)
    r1 = run_op(q, k, v, mask, causal, dout, density, "triton", tile, dropout_p=p, seed=77)
    r2 = run_op(q, k, v, mask, causal, dout, density, "triton", tile, dropout_p=p, seed=77)
    r3 = run_op(q, k, v, mask, causal, dout, density, "triton", tile, dropout_p=p, seed=78)
    for a, c in zip(r1, r2):
        assert torch.equal(a, c)  # same seed: bit-identical forward and backward
    assert not torch.equal(r1[0], r3[0])
    z, idx = recover_zscale(q, k, mask, causal, density, tile, p, 77)
    assert torch.equal(idx, r1[1])
    keep = tile_kept(idx, tile, nq, nk) & allowed_dense(mask, causal, b, h, nq, nk)
    zk = z[keep]
    assert torch.allclose(zk, torch.where(zk > 0.5, 1 / (1 - p), 0.0), atol=1e-4)
    frac = (zk > 0.5).double().mean().item()
    assert abs(frac - (1 - p)) < 4 * math.sqrt(p * (1 - p) / zk.numel()), frac
    truth = dense_grads(q.double(), k.double(), v.double(), keep, None, d ** -0.5, dout.double(), zscale=z.double())
    for name, g, t in zip(("out", "dq", "dk", "dv"), (r1[0],) + r1[3:], truth):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert spy["bwd"] == 3 and spy["plain_bwd"] == 0


# ------------------------------------------------------------------------------------------------------------
# the deliberate fallback to the plain-PyTorch tile path; a trainable mask on the kernel path
# ------------------------------------------------------------------------------------------------------------

def test_head_dim_over_the_kernel_limit_runs_the_plain_path(spy):
    from spt_compile.kernels._tiled_common import MAX_HEAD_DIM
    d = 2 * MAX_HEAD_DIM  # the tile kernels' configs stop at MAX_HEAD_DIM: the op must not call them
    q, k, v, mask, causal, dout = make(1, 2, 1, 10, 12, d, 16, torch.float32, "causal", seed=1)
    res = run_op(q, k, v, mask, causal, dout, 0.5, "triton", 4, min_keys=2)
    assert {n: spy[n] for n in ("pq", "select", "fwd", "bwd")} == {"pq": 0, "select": 0, "fwd": 0, "bwd": 0}
    assert spy["plain_select"] == 1 and spy["plain_fwd"] >= 1 and spy["plain_bwd"] >= 1
    plain = run_op(q, k, v, mask, causal, dout, 0.5, "reference", 4, min_keys=2)
    for a, c in zip(res, plain):
        assert torch.equal(a, c)  # the very same plain path
    with pytest.raises(ValueError, match="head dim"):  # the launcher itself only asserts its limit
        kfwd.tiled_attention_forward(q, k, v, res[1], None, True, 0.1, 4, 0.0, None)


def mask_grad_truth(q, k, v, mask, keep, dout, zscale=None):
    """fp64 d out / d mask over the kept allowed keys (0 at -inf entries), summed to the mask's shape."""
    leaves = [t.double().requires_grad_() for t in (q, k, v, mask)]
    dense_attention(*leaves[:3], keep, leaves[3], q.shape[-1] ** -0.5, zscale).backward(dout.double())
    return torch.where(torch.isfinite(mask), leaves[3].grad, 0.0)


MASK_GRAD = [  # (dtype, mask kind, mask shape, T)
    (torch.float32, "bias", None, 8),             # [B, H, Nq, Nk] with -inf holes, a finfo.min and an -inf row
    (torch.bfloat16, "bias", None, 5),
    (torch.float32, "pad_finfo_min", None, 8),    # [B, 1, 1, Nk]: summed over heads and queries
    (torch.float32, "shared", (1, 1, 18, 20), 8),  # [1, 1, Nq, Nk]: summed over batch and heads
]


@pytest.mark.parametrize("dtype,kind,shape,tile", MASK_GRAD, ids=[f"{str(c[0])[6:]}-{c[1]}-T{c[3]}" for c in MASK_GRAD])
def test_trainable_mask_gradient_on_the_kernel_path(dtype, kind, shape, tile, spy):
    """mask_grad: the tile backward's dS kernel; dmask vs fp64 and vs the plain tile backward on the same keys."""
    b, h, nq, nk, d = 2, 2, 18, 20, 16
    q, k, v, mask, causal, dout = make(b, h, h, nq, nk, d, d, dtype, "bias" if kind == "shared" else kind, seed=4)
    if shape is not None:
        mask = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    res = run_op(q, k, v, mask, causal, dout, 0.4, "triton", tile, mask_grad=True)
    assert spy["fwd"] == 1 and spy["bwd"] == 1 and spy["plain_fwd"] == 0 and spy["plain_bwd"] == 0
    check(res[:6], q, k, v, mask, causal, dout, tile, dtype)
    idx, dmask = res[1], res[6]
    assert dmask.shape == mask.shape and dmask.dtype == dtype
    keep = tile_kept(idx, tile, nq, nk) & allowed_dense(mask, causal, b, h, nq, nk)
    want = mask_grad_truth(q, k, v, mask, keep, dout)
    got = torch.where(torch.isfinite(mask), dmask.double(), 0.0)
    top = want.abs().max().item()
    assert max_err(got, want) <= 8 * ULP[dtype] * top + 4 * FLOOR[dtype], max_err(got, want)
    scale = d ** -0.5
    out, lse = ta.tiled_attention_forward(q, k, v, idx, mask, causal, scale, tile, 0.0, None)
    plain = ta.tiled_attention_backward(dout, q, k, v, out, lse, idx, mask, causal, scale, tile, 0.0, None, True)[3]
    assert max_err(dmask, plain) <= 8 * ULP[dtype] * top + 4 * FLOOR[dtype]


def test_trainable_mask_with_dropout_replays_the_kernel_mask(spy):
    """mask_grad and dropout on the kernel path: dmask from the same dropout mask the kernel forward drew."""
    b, h, nq, nk, d, tile, p, density = 1, 2, 16, 20, 16, 8, 0.3, 0.5
    q, k, v, mask, causal, dout = make(b, h, h, nq, nk, d, d, torch.float32, "bias", seed=5)
    r1 = run_op(q, k, v, mask, causal, dout, density, "triton", tile, dropout_p=p, seed=11, mask_grad=True)
    r2 = run_op(q, k, v, mask, causal, dout, density, "triton", tile, dropout_p=p, seed=11, mask_grad=True)
    assert all(torch.equal(a, c) for a, c in zip(r1, r2)) and spy["plain_bwd"] == 0
    z, idx = recover_zscale(q, k, mask, causal, density, tile, p, 11)
    assert torch.equal(idx, r1[1])
    keep = tile_kept(idx, tile, nq, nk) & allowed_dense(mask, causal, b, h, nq, nk)
    truth = dense_grads(q.double(), k.double(), v.double(), keep, mask.double(), d ** -0.5, dout.double(),
                        zscale=z.double())
    for name, g, t in zip(("out", "dq", "dk", "dv"), (r1[0],) + r1[3:6], truth):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    want = mask_grad_truth(q, k, v, mask, keep, dout, zscale=z.double())
    torch.testing.assert_close(torch.where(torch.isfinite(mask), r1[6].double(), 0.0), want, rtol=1e-4, atol=1e-5)


def test_fp64_and_the_default_mode_on_cpu_run_the_plain_path(spy):
    q, k, v, mask, causal, dout = make(1, 2, 2, 12, 14, 16, 16, torch.float64, "causal", seed=6)
    run_op(q, k, v, mask, causal, dout, 0.5, "triton", 4)  # fp64 is the ground-truth mode everywhere
    run_op(*(t.float() for t in (q, k, v)), mask, causal, dout.float(), 0.5, "auto", 4)  # CPU, auto: plain
    assert {n: spy[n] for n in ("pq", "select", "fwd", "bwd")} == {"pq": 0, "select": 0, "fwd": 0, "bwd": 0}
    assert spy["plain_select"] == 2 and spy["plain_fwd"] >= 2 and spy["plain_bwd"] >= 2


# ------------------------------------------------------------------------------------------------------------
# the op's contract through the kernel path: opcheck, torch.compile; the autotuner's closures and site keys
# ------------------------------------------------------------------------------------------------------------

def test_opcheck_through_tile_kernel_path(monkeypatch, spy):
    monkeypatch.setenv("SPT_KERNELS", "triton")
    q, k, v, mask, causal, _ = make(1, 2, 1, 10, 14, 16, 16, torch.float32, "bias", seed=2)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, False, 0.25, 0.5, M, C, 1, 0.2,
            torch.tensor(3), 0, 4, 2)
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))
    assert spy["fwd"] >= 1 and spy["bwd"] >= 1 and spy["plain_fwd"] == 0 and spy["plain_bwd"] == 0


def test_torch_compile_through_tile_kernel_path(monkeypatch, spy):
    monkeypatch.setenv("SPT_KERNELS", "triton")
    q, k, v, _, _, _ = make(1, 2, 2, 12, 16, 16, 16, torch.float32, "none", seed=4)

    def f(q, k, v):
        return OP(q, k, v, None, True, 0.25, 0.5, M, C, 1, 0.1, torch.tensor(5), 0, 4, 2)[0].square().sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves), leaves)
    assert spy["fwd"] >= 1 and spy["bwd"] >= 1
    leaves0 = [t.clone().requires_grad_() for t in (q, k, v)]
    for a, b in zip(grads, torch.autograd.grad(f(*leaves0), leaves0)):
        assert torch.equal(a, b)


TILE_KERNELS = {  # kernel name -> (module, kernel attribute, meta names)
    ksel.KERNEL_STATS: (ksel, "_stats_kernel", ("BLOCK_M", "BLOCK_N")),
    ksel.KERNEL_MASS: (ksel, "_mass_kernel", ("BLOCK_M", "BLOCK_N")),
    ksel.KERNEL_TOPL: (ksel, "_topl_kernel", ("BLOCK_T", "BLOCK_N")),
    kfwd.KERNEL: (kfwd, "_fwd_kernel", ("BLOCK_M", "BLOCK_N")),
    kbwd.KERNEL_DQ: (kbwd, "_dq_kernel", ("BLOCK_M", "BLOCK_N")),
    kbwd.KERNEL_DKV: (kbwd, "_dkv_kernel", ("BLOCK_M", "BLOCK_N")),
    kbwd.KERNEL_DS: (kbwd, "_ds_kernel", ("BLOCK_M", "BLOCK_N")),
}


def _tile_problem():
    """Causal, with a trainable [1, 1, Nq, Nk] bias, so that every tile kernel (the dS one too) launches."""
    q, k, v, _, causal, dout = make(1, 2, 1, 40, 40, 16, 16, torch.float32, "causal", seed=8)
    return q, k, v, torch.randn(1, 1, 40, 40, generator=torch.Generator().manual_seed(8)), causal, dout


def _run_tiled_op(q, k, v, mask, causal, dout, density=0.3):
    return run_op(q, k, v, mask, causal, dout, density, "triton", 32, mask_grad=True)


@pytest.mark.parametrize("kernel", list(TILE_KERNELS))
def test_tile_launchers_pass_bench_closures(kernel, autotune_on, monkeypatch):
    """Timing forced on with a fake timer: each fitting candidate of the kernel runs once through the launcher's
    bench closure on the real inputs, the fake argmin is kept and used, the op's results do not change."""
    mod, attr, meta = TILE_KERNELS[kernel]
    inputs = _tile_problem()
    untuned = _run_tiled_op(*inputs)
    launches = []
    orig = getattr(mod, attr)

    class Spy:
        def __getitem__(self, grid):
            def call(*a, **kw):
                launches.append(autotune.KernelConfig.make(kw["num_warps"], kw["num_stages"],
                                                           **{m: kw[m] for m in meta}))
                return orig[grid](*a, **kw)
            return call
    monkeypatch.setattr(mod, attr, Spy())
    (key,) = {tuple(r["key"]) for r in autotune.used() if r["kernel"] == kernel}
    cands = autotune.fitting(kernel, key)
    fast = cands[min(1, len(cands) - 1)]
    timed = []

    def timer(fn, cfg):
        timed.append(cfg)
        fn()
        return 0.5 if cfg == fast else 2.0
    monkeypatch.setattr(autotune, "_can_time", lambda entry: True)  # what a GPU allows
    autotune.invalidate()
    autotune.set_timer(timer)
    others = {n: autotune.candidates(n)[0] for n in (*TILE_KERNELS, kpq.KERNEL) if n != kernel}  # time one kernel
    with autotune.forced(others):
        tuned = _run_tiled_op(*inputs)
    if len(cands) > 1:
        assert timed == cands and launches[:len(cands) + 1] == cands + [fast]
        (rec,) = [r for r in autotune.used() if r["kernel"] == kernel]
        assert rec["source"] == "tuned" and rec["entry"]["config"] == fast.to_json()
    else:  # one candidate (top-L): nothing to time, the closure is still handed over
        assert timed == [] and set(launches) == {fast}
    for got, want in zip(tuned, untuned):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_tile_site_keys_are_the_keys_the_launchers_use(autotune_on):
    q, k, v, mask, causal, dout = _tile_problem()
    _run_tiled_op(q, k, v, mask, causal, dout)
    launched = {r["kernel"]: tuple(r["key"]) for r in autotune.used()}
    t = lambda x: {"shape": list(x.shape), "dtype": "float32", "itemsize": 4, "device": "cuda:0"}  # noqa: E731
    site = {"q": t(q), "k": t(k), "v": t(v), "mask": t(mask), "is_causal": causal, "density": 0.3,
            "pq_subspaces": M, "pq_centroids": C, "kmeans_iters": ITERS, "min_seq_len": 0, "query_tile": 32,
            "min_keys": 4}
    wanted = set(TILE_KERNELS) - {kbwd.KERNEL_DS} | {kpq.KERNEL}  # dS: only for a trainable mask, no site key

    def keys(args):
        return {n: key for n, key in autotune.site_kernel_keys("spt.pq_sparse_attention", args) if n in wanted}
    assert keys(site) == {n: launched[n] for n in wanted}
    exact = keys({**site, "density": 1.0})  # every key listed: no PQ, no selection
    assert set(exact) == {kfwd.KERNEL, kbwd.KERNEL_DQ, kbwd.KERNEL_DKV} and exact[kfwd.KERNEL] == launched[kfwd.KERNEL]
    assert keys({**site, "query_tile": 0}) == {kpq.KERNEL: launched[kpq.KERNEL]}  # per-query: other kernels
    assert keys({**site, "q": {**site["q"], "shape": [1, 2, "s0", 16]}}) == {}     # symbolic sizes
    big = {**site, "q": {**site["q"], "shape": [1, 2, 40, 256]}, "k": {**site["k"], "shape": [1, 1, 40, 256]}}
    assert keys(big) == {}  # head dim over the kernels' limit: the op runs the plain path
