"""torch.ops.spt.routed_ffn (lowering/ffn.py) and its reference stages (lowering/reference/routed_ffn.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spt_compile.lowering  # noqa: F401  registers the op
from spt_compile.lowering.ffn import routed_ffn
from spt_compile.lowering.neuron_blocks import compute_block_perm
from spt_compile.lowering.reference import routed_ffn as ref

OP = torch.ops.spt.routed_ffn


def make(T, d, H, d_out, gated, bias, dtype=torch.float64, seed=0, conv1d=False):
    """Random FFN parameters scaled like a trained layer (unit-variance pre-activations)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = r(T, d)
    # GPT-2 Conv1D stores W1 as [d, H]; the compiler passes its .t() view (strided, not contiguous)
    w1 = r(d, H, scale=d ** -0.5).t() if conv1d else r(H, d, scale=d ** -0.5)
    p = dict(
        w1=w1,
        b1=r(H, scale=0.5) if bias else None,
        w_up=r(H, d, scale=d ** -0.5) if gated else None,
        b_up=r(H, scale=0.5) if (gated and bias) else None,
        w2=r(d_out, H, scale=H ** -0.5),
        b2=r(d_out, scale=0.5) if bias else None,
    )
    return x, p


def leaves(x, p):
    """Copies with requires_grad, so each formulation gets its own .grad."""
    def c(t):
        return None if t is None else t.detach().clone().requires_grad_()
    return c(x), {k: c(v) for k, v in p.items()}


def run_op(x, p, perm, act, E, k, router="oracle", site=0):
    # (y, block_ids, h_pre, h_up); the 5th output, the down adapter input v2, is empty without LoRA
    return OP(x, p["w1"], p["b1"], p["w_up"], p["b_up"], p["w2"], p["b2"], perm, act, E, k, router, 8, 200, site)[:4]


def masked_dense(x, p, perm, act, E, block_ids=None):
    """Autograd reference: the dense FFN with the neurons of unselected blocks multiplied by 0."""
    T = x.shape[0]
    H = p["w1"].shape[0]
    h = ref.activation_forward(torch.nn.functional.linear(x, p["w1"], p["b1"]), act)
    if p["w_up"] is not None:
        h = h * torch.nn.functional.linear(x, p["w_up"], p["b_up"])
    if block_ids is not None:
        blk_mask = torch.zeros(T, E, dtype=x.dtype).scatter_(1, block_ids.long(), 1.0)     # [T, E]
        neuron_mask = torch.empty(T, H, dtype=x.dtype)
        neuron_mask[:, perm] = blk_mask.repeat_interleave(H // E, dim=1)                 # [T, H]
        h = h * neuron_mask
    return torch.nn.functional.linear(h, p["w2"], p["b2"])


def grads(y, x, p, dy):
    ins = [x] + [t for t in p.values() if t is not None]
    return [y] + list(torch.autograd.grad(y, ins, dy))


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("router", ["oracle", "lowrank"])
def test_opcheck(gated, bias, router):
    x, p = make(12, 16, 64, 16, gated, bias, dtype=torch.float32)
    x, p = leaves(x.view(3, 4, 16), p)
    perm = compute_block_perm(p["w1"], 4)
    args = (x, p["w1"], p["b1"], p["w_up"], p["b_up"], p["w2"], p["b2"], perm, "silu", 4, 2, router, 8, 200, 3)
    torch.library.opcheck(OP.default, args)


# ---------------------------------------------------------------- exact mode == dense

SHAPE = st.tuples(st.integers(1, 24), st.sampled_from([8, 16]), st.sampled_from([2, 4]),
                  st.sampled_from([4, 8]), st.sampled_from([8, 12]))  # T, d, E, Hb, d_out


@settings(max_examples=12, deadline=None)
@given(shape=SHAPE, gated=st.booleans(), bias=st.booleans(), conv1d=st.booleans(),
       act=st.sampled_from(ref.ACTIVATIONS), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 1000))
def test_exact_mode_equals_dense(shape, gated, bias, conv1d, act, dtype, seed):
    """top_k == E: output and every gradient match the dense FFN as closely as torch itself does.

    Both the op and dense torch (same dtype) are measured against fp64 dense; the op may be at most 2x worse
    than torch plus a floor of a few ulps of the result's scale (two correct low-precision computations can
    differ by rounding of a single element, which would make a pure ratio test flaky on tiny tensors).
    """
    T, d, E, Hb, d_out = shape
    H = E * Hb
    x64, p64 = make(T, d, H, d_out, gated, bias, seed=seed, conv1d=conv1d)
    perm = torch.randperm(H, generator=torch.Generator().manual_seed(seed))
    dy64 = torch.randn(T, d_out, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)

    xg, pg = leaves(x64, p64)
    truth = grads(masked_dense(xg, pg, perm, act, E), xg, pg, dy64)
    xt, pt = leaves(x64.to(dtype), {k: None if v is None else v.to(dtype) for k, v in p64.items()})
    if conv1d:  # keep the strided layout in the low-precision copy too
        pt["w1"] = pt["w1"].detach().t().contiguous().t().requires_grad_()
    torch_res = grads(masked_dense(xt, pt, perm, act, E), xt, pt, dy64.to(dtype))
    xo, po = leaves(xt.detach(), {k: None if v is None else v.detach() for k, v in pt.items()})
    if conv1d:
        po["w1"] = pt["w1"].detach().t().contiguous().t().requires_grad_()
        assert not po["w1"].is_contiguous()
    y, block_ids, h_pre, h_up = run_op(xo, po, perm, act, E, E)
    op_res = grads(y, xo, po, dy64.to(dtype))
    eps = torch.finfo(dtype).eps
    for name, a, b, t in zip(["y", "dx"] + [k for k, v in p64.items() if v is not None], op_res, torch_res, truth):
        assert a.shape == t.shape and a.dtype == dtype, name
        err_op = (a.double() - t).abs().max().item()
        err_torch = (b.double() - t).abs().max().item()
        floor = 4 * eps * t.abs().max().item() + 1e-30
        assert err_op <= 2 * err_torch + floor, (name, err_op, err_torch, floor)


# ---------------------------------------------------------------- sparse mode == masked dense (fp64)


@settings(max_examples=12, deadline=None)
@given(shape=SHAPE, gated=st.booleans(), bias=st.booleans(), act=st.sampled_from(ref.ACTIVATIONS),
       router=st.sampled_from(["oracle", "lowrank"]), kfrac=st.floats(0.0, 1.0), seed=st.integers(0, 1000),
       lead=st.sampled_from([(), (1,), (2,)]))
def test_sparse_mode_equals_masked_dense(shape, gated, bias, act, router, kfrac, seed, lead):
    """fp64: the routed output and gradients equal autograd through the dense FFN with the unselected blocks'
    neurons masked to 0 (same block_ids). Only summation order differs, so 1e-10 relative is tight."""
    T, d, E, Hb, d_out = shape
    H = E * Hb
    k = 1 + int(kfrac * (E - 1))
    x, p = make(T, d, H, d_out, gated, bias, seed=seed)
    perm = torch.randperm(H, generator=torch.Generator().manual_seed(seed))
    dy = torch.randn(T, d_out, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    xo, po = leaves(x, p)
    shaped = xo.view(*lead, -1, d) if lead and T % lead[0] == 0 else xo
    y, block_ids, h_pre, h_up = run_op(shaped, po, perm, act, E, k, router=router, site=seed)
    assert y.shape == (*shaped.shape[:-1], d_out) and y.is_contiguous()
    assert block_ids.shape == (T, k) and block_ids.dtype == torch.int32
    assert h_pre.shape == (T * k, Hb) and (h_up.shape == (T * k, Hb) if gated else h_up.numel() == 0)
    op_res = grads(y.reshape(T, d_out), xo, po, dy)
    xr, pr = leaves(x, p)
    ref_res = grads(masked_dense(xr, pr, perm, act, E, block_ids), xr, pr, dy)
    for a, b in zip(op_res, ref_res):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * (1 + b.abs().max().item()))


def test_h_pre_is_block_grouped():
    """h_pre rows follow the stable sort of (token, slot) pairs by block id, columns block_perm order."""
    T, d, E, Hb = 10, 8, 4, 4
    x, p = make(T, d, E * Hb, 8, gated=True, bias=True)
    perm = torch.randperm(E * Hb, generator=torch.Generator().manual_seed(5))
    y, block_ids, h_pre, h_up = run_op(x, p, perm, "gelu", E, 2)
    order = torch.sort(block_ids.flatten().long(), stable=True).indices      # [T*k]
    tok, blk = order // 2, block_ids.flatten().long()[order]
    cols = perm.view(E, Hb)[blk]                                             # [T*k, Hb]
    pre = torch.nn.functional.linear(x, p["w1"], p["b1"])
    up = torch.nn.functional.linear(x, p["w_up"], p["b_up"])
    torch.testing.assert_close(h_pre, pre[tok.unsqueeze(1), cols])
    torch.testing.assert_close(h_up, up[tok.unsqueeze(1), cols])


def test_routing_prologue():
    block_ids = torch.tensor([[2, 0], [0, 1], [2, 1], [3, 0]], dtype=torch.int32)
    order, offsets = ref.routing_prologue(block_ids, 5)
    assert order.dtype == torch.int32 and offsets.dtype == torch.int32
    assert order.tolist() == [1, 2, 7, 3, 5, 0, 4, 6]
    assert offsets.tolist() == [0, 3, 5, 7, 8, 8]


def test_unused_blocks_get_exactly_zero_weight_grads():
    T, d, E, Hb = 3, 8, 8, 4
    H = E * Hb
    for gated in (False, True):
        x, p = make(T, d, H, 8, gated, bias=True)
        xo, po = leaves(x, p)
        perm = torch.randperm(H, generator=torch.Generator().manual_seed(1))
        y, block_ids, _, _ = run_op(xo, po, perm, "gelu", E, 1)
        y.sum().backward()
        used = torch.zeros(E, dtype=torch.bool)
        used[block_ids.long().flatten()] = True
        assert used.sum() <= T < E  # some blocks are unused, so the check below is not vacuous
        for e in range(E):
            nrn = perm[e * Hb:(e + 1) * Hb]
            rows = [po["w1"].grad[nrn], po["b1"].grad[nrn], po["w2"].grad[:, nrn]]
            if gated:
                rows.append(po["w_up"].grad[nrn])
            for r in rows:
                if used[e]:
                    assert r.abs().sum() > 0
                else:
                    assert torch.count_nonzero(r) == 0


def test_strided_w1_matches_contiguous():
    """GPT-2 Conv1D: w1 is weight.t() of a [d, H] parameter; output and the parameter's grad match."""
    T, d, H, E = 6, 8, 16, 4
    x, p = make(T, d, H, 8, gated=False, bias=True)
    conv_w = p["w1"].t().contiguous().requires_grad_()                       # [d, H] like Conv1D.weight
    lin_w = p["w1"].clone().requires_grad_()
    perm = compute_block_perm(p["w1"], E)
    outs = []
    for w, view in ((conv_w, conv_w.t()), (lin_w, lin_w)):
        q = dict(p, w1=view)
        y, _, _, _ = run_op(x, q, perm, "gelu_tanh", E, 2, router="lowrank", site=11)
        y.square().sum().backward()
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(conv_w.grad.t(), lin_w.grad)


def test_convenience_function_density():
    T, d, H = 8, 8, 32
    x, p = make(T, d, H, 8, gated=False, bias=True)
    full = routed_ffn(x, p["w1"], p["b1"], p["w2"], p["b2"], num_blocks=4, density=1.0)
    dense = masked_dense(x, p, torch.arange(H), "gelu", 4)
    torch.testing.assert_close(full, dense)
    half = routed_ffn(x, p["w1"], p["b1"], p["w2"], p["b2"], num_blocks=4, density=0.5, router="oracle")
    assert not torch.allclose(half, dense)  # really sparse
    with pytest.raises(ValueError, match="density"):
        routed_ffn(x, p["w1"], p["b1"], p["w2"], p["b2"], density=0.0)


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("change, match", [
    (dict(activation="tanh"), "activation"),
    (dict(router="random"), "router"),
    (dict(num_blocks=5), "num_blocks"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=5), "top_k"),
    (dict(block_perm=torch.zeros(16, dtype=torch.int64)), "block_perm"),
    (dict(block_perm=torch.arange(16, dtype=torch.int32)), "block_perm"),
    (dict(block_perm=torch.arange(8)), "block_perm"),
    (dict(x=torch.randn(3, 7)), "x"),
    (dict(x=torch.randint(0, 3, (3, 8))), "x dtype"),
    (dict(w2=torch.randn(8, 15)), "w2"),
    (dict(b1=torch.randn(15)), "b1"),
    (dict(b2=torch.randn(7)), "b2"),
    (dict(w_up=torch.randn(16, 7)), "w_up"),
    (dict(b2=torch.randn(8, dtype=torch.float64)), "b2"),
    (dict(router_rank=0), "router_rank"),
    (dict(router_refresh=0), "router_refresh"),
])
def test_bad_arguments_raise_value_error(change, match):
    a = dict(x=torch.randn(3, 8), w1=torch.randn(16, 8), b1=torch.randn(16), w_up=None, b_up=None,
             w2=torch.randn(8, 16), b2=torch.randn(8), block_perm=torch.arange(16), activation="gelu",
             num_blocks=4, top_k=2, router="oracle", router_rank=8, router_refresh=10, site_id=0)
    a.update(change)
    with pytest.raises(ValueError, match=match):
        OP(*a.values())


@pytest.mark.parametrize("k", [2, 4])  # sparse and exact mode (E = 4)
@pytest.mark.parametrize("frozen", [("w1", "w_up", "w2"), ("x", "b1"), ("w2", "b2")])
def test_frozen_inputs_get_no_grad_and_the_rest_is_unchanged(frozen, k):
    """Fine-tuning with frozen base weights: the op computes only the gradients autograd asks for, and those
    equal the all-trainable run's."""
    T, d, H, E = 6, 8, 16, 4
    x, p = make(T, d, H, 8, gated=True, bias=True, seed=3)
    perm = torch.randperm(H, generator=torch.Generator().manual_seed(3))
    dy = torch.randn(T, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    xa, pa = leaves(x, p)
    y, *_ = run_op(xa, pa, perm, "silu", E, k, site=11)
    y.backward(dy)
    xf, pf = leaves(x, p)
    for name in frozen:
        (xf if name == "x" else pf[name]).requires_grad_(False)
    y2, *_ = run_op(xf, pf, perm, "silu", E, k, site=11)
    y2.backward(dy)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    for name, (a, b) in {"x": (xf, xa), **{n: (pf[n], pa[n]) for n in p}}.items():
        if name in frozen:
            assert a.grad is None, name
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_single_token_leaves_the_bias_untouched():
    """T == 1 once wrote into the user's b2 (b2.expand(...).contiguous() is a view of b2)."""
    x, p = make(1, 8, 16, 8, gated=False, bias=True, seed=5)
    b2 = p["b2"].clone()
    perm = torch.arange(16)
    for k in (2, 4):
        y, block_ids, _, _ = run_op(x, p, perm, "gelu", 4, k, site=12)
        assert torch.equal(p["b2"], b2)
        expected = masked_dense(x, p, perm, "gelu", 4, block_ids if k < 4 else None)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
