"""Routed FFN Triton kernels (kernels/routing.py, kernels/grouped_gemm.py) under the CPU interpreter,
against the plain-PyTorch reference stages (lowering/reference/routed_ffn.py) and an fp64 ground truth.

Accuracy rule: the kernel's max error against fp64 is at most 2x the error of the reference run in the
same dtype, plus a floor of a few units in the last place of the output's scale (the reference's error can
be ~0 on an entry where the kernel's differently ordered fp32 sums still round one ulp apart).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest may also set it)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from spt_compile.kernels import grouped_gemm as K  # noqa: E402
from spt_compile.kernels.routing import routing_prologue  # noqa: E402
from spt_compile.lowering.reference import routed_ffn as R  # noqa: E402

ACTS = ("relu", "gelu", "gelu_tanh", "silu")
# floor per dtype, relative to the output's max magnitude: ~4 ulp of the output dtype
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8}


def _block_ids(T, k, E, gen, skip_block0=False):
    """[T, k] int32 distinct blocks per token (random top-k), optionally never choosing block 0."""
    lo = 1 if skip_block0 else 0
    scores = torch.rand(T, E - lo, generator=gen)
    return (scores.topk(k, dim=1).indices + lo).to(torch.int32)


def _problem(T, d, Hb, E, k, d_out, gated, bias, dtype, seed, transposed_w1=True, skip_block0=False):
    gen = torch.Generator().manual_seed(seed)
    H = Hb * E

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    w1 = rnd(d, H, scale=d ** -0.5).t() if transposed_w1 else rnd(H, d, scale=d ** -0.5)  # GPT-2 Conv1D view
    p = dict(
        x2d=rnd(T, d), w1=w1, b1=rnd(H, scale=0.5) if bias else None,
        w_up=rnd(H, d, scale=d ** -0.5) if gated else None,
        b_up=rnd(H, scale=0.5) if (gated and bias) else None,
        w2=rnd(d_out, H, scale=H ** -0.5), b2=rnd(d_out, scale=0.5) if bias else None,
        block_perm=torch.randperm(H, generator=gen),
        block_ids=_block_ids(T, k, E, gen, skip_block0),
    )
    return p, rnd(T, d_out)


def _f64(p):
    return {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in p.items()}


def _check_close(name, got, ref, truth, dtype):
    """max|got - truth| <= 2 * max|ref - truth| + floor."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, ref.dtype, got.shape, ref.shape)
    err_k = (got.double() - truth).abs().max().item()
    err_t = (ref.double() - truth).abs().max().item()
    floor = 4 * ULP[dtype] * max(truth.abs().max().item(), 1e-3)
    assert err_k <= 2 * err_t + floor, f"{name}: kernel err {err_k:.3g} vs torch {dtype} err {err_t:.3g}"


def _run_and_compare(p, dy, activation, E, dtype):
    y, h_pre, h_up, _ = K.routed_ffn_forward(**p, activation=activation, num_blocks=E)
    yr, h_pre_r, h_up_r, _ = R.routed_ffn_forward(**p, activation=activation, num_blocks=E)
    p64 = _f64(p)
    y64, h_pre64, h_up64, _ = R.routed_ffn_forward(**p64, activation=activation, num_blocks=E)
    _check_close("y", y, yr, y64, dtype)
    _check_close("h_pre", h_pre, h_pre_r, h_pre64, dtype)  # also pins the block-grouped row order
    assert h_up.shape == h_up_r.shape
    if p["w_up"] is not None:
        _check_close("h_up", h_up, h_up_r, h_up64, dtype)
    # every backward sees the same saved tensors (the reference's), so gradients compare like for like
    g = K.routed_ffn_backward(dy, **p, h_pre=h_pre_r, h_up=h_up_r, activation=activation, num_blocks=E)
    gr = R.routed_ffn_backward(dy, **p, h_pre=h_pre_r, h_up=h_up_r, activation=activation, num_blocks=E)
    g64 = R.routed_ffn_backward(dy.double(), **p64, h_pre=h_pre64, h_up=h_up64, activation=activation,
                                num_blocks=E)
    g, gr, g64 = g[:7], gr[:7], g64[:7]  # no adapters: the LoRA gradients are None
    for name, a, b, c in zip(("dx", "dw1", "db1", "dw_up", "db_up", "dw2", "db2"), g, gr, g64):
        assert (a is None) == (b is None), name
        if a is not None:
            _check_close(name, a, b, c, dtype)
    return y, g


# ----------------------------------------------------------------------------------------------- routing
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 70), E=st.integers(1, 9), k_frac=st.floats(0, 1), seed=st.integers(0, 2 ** 16))
def test_routing_prologue_matches_reference(T, E, k_frac, seed):
    k = 1 + int(k_frac * (E - 1))
    ids = _block_ids(T, k, E, torch.Generator().manual_seed(seed))
    order, offsets = routing_prologue(ids, E)
    order_r, offsets_r = R.routing_prologue(ids, E)
    assert order.dtype == torch.int32 and offsets.dtype == torch.int32
    assert torch.equal(order, order_r)      # stable: equal ids keep ascending pair index
    assert torch.equal(offsets, offsets_r)


def test_routing_prologue_many_chunks(monkeypatch):
    # forces several chunks so the cross-chunk base (pass 2) is exercised, with blocks crossing chunks
    import spt_compile.kernels.routing as routing
    monkeypatch.setattr(routing, "_MAX_CHUNKS", 3)
    ids = torch.randint(0, 5, (700, 2), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    order, offsets = routing_prologue(ids, 5)
    assert torch.equal(order, torch.argsort(ids.flatten().long(), stable=True).int())
    assert torch.equal(offsets[1:], torch.bincount(ids.flatten().long(), minlength=5).cumsum(0).int())


# ----------------------------------------------------------------------------------------------- GEMMs
@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 40), d=st.sampled_from([8, 24, 40]), Hb=st.sampled_from([8, 16, 24]),
       E=st.integers(1, 4), k_frac=st.floats(0, 1), d_out=st.sampled_from([8, 20, 40]),
       activation=st.sampled_from(ACTS), gated=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_forward_backward_match_reference_and_fp64(T, d, Hb, E, k_frac, d_out, activation, gated, bias, dtype,
                                                   seed):
    k = 1 + int(k_frac * (E - 1))
    p, dy = _problem(T, d, Hb, E, k, d_out, gated, bias, dtype, seed)
    _run_and_compare(p, dy, activation, E, dtype)


@pytest.mark.parametrize("activation", ACTS)
def test_every_activation_gated_bf16(activation):
    # T=37 leaves ragged row tiles in every block; d, d_out not multiples of the tile
    p, dy = _problem(37, 24, 16, 3, 2, 20, gated=True, bias=True, dtype=torch.bfloat16, seed=7)
    _run_and_compare(p, dy, activation, 3, torch.bfloat16)


def test_unused_block_gets_zero_grads_and_contiguous_w1():
    E, Hb = 3, 16
    p, dy = _problem(21, 24, Hb, E, 2, 20, gated=True, bias=True, dtype=torch.float32, seed=3,
                     transposed_w1=False, skip_block0=True)
    _, g = _run_and_compare(p, dy, "silu", E, torch.float32)
    dx, dw1, db1, dw_up, db_up, dw2, db2 = g
    unused = p["block_perm"][:Hb]                            # neurons of block 0, never chosen
    for t in (dw1, dw_up):
        assert torch.all(t[unused] == 0) and torch.any(t != 0)
    assert torch.all(db1[unused] == 0) and torch.all(db_up[unused] == 0)
    assert torch.all(dw2[:, unused] == 0)


def test_deterministic_bitwise():
    p, dy = _problem(33, 24, 16, 4, 3, 20, gated=False, bias=True, dtype=torch.bfloat16, seed=11)
    y1, h1, _, _ = K.routed_ffn_forward(**p, activation="gelu", num_blocks=4)
    y2, h2, _, _ = K.routed_ffn_forward(**p, activation="gelu", num_blocks=4)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    g1 = K.routed_ffn_backward(dy, **p, h_pre=h1, h_up=torch.empty(0), activation="gelu", num_blocks=4)
    g2 = K.routed_ffn_backward(dy, **p, h_pre=h1, h_up=torch.empty(0), activation="gelu", num_blocks=4)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b)


def test_exact_mode_equals_dense_ffn():
    # top_k == num_blocks: every token uses every block, so the kernel is the dense FFN
    p, _ = _problem(13, 24, 8, 4, 4, 20, gated=False, bias=True, dtype=torch.float32, seed=5)
    y, _, _, _ = K.routed_ffn_forward(**p, activation="relu", num_blocks=4)
    dense = torch.relu(p["x2d"].double() @ p["w1"].double().t() + p["b1"].double()) @ p["w2"].double().t()
    torch.testing.assert_close(y.double(), dense + p["b2"].double(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, arg", [
    (dict(activation="tanh"), "activation"),
    (dict(num_blocks=5), "num_blocks"),
    (dict(block_perm=torch.arange(32, dtype=torch.int32)), "block_perm"),
    (dict(block_ids=torch.zeros(6, 2, dtype=torch.int64)), "block_ids"),
    (dict(b1=torch.zeros(7)), "b1"),
    (dict(w2=torch.zeros(8, 31)), "w2"),
    (dict(b_up=torch.zeros(32)), "b_up"),
    (dict(x2d=torch.zeros(6, 16, dtype=torch.float64)), "x2d"),
])
def test_bad_arguments_raise_value_error_naming_them(change, arg):
    p, _ = _problem(6, 16, 8, 4, 2, 8, gated=False, bias=True, dtype=torch.float32, seed=0)
    kw = dict(p, activation="relu", num_blocks=4)
    kw.update(change)
    with pytest.raises(ValueError, match=arg):
        K.routed_ffn_forward(**kw)


def test_routing_bad_arguments():
    with pytest.raises(ValueError, match="block_ids"):
        routing_prologue(torch.zeros(4, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="num_blocks"):
        routing_prologue(torch.zeros(4, 2, dtype=torch.int32), 0)


# ----------------------------------------------------------------------------------------------- LoRA
def _lora(T, d, H, d_out, r, gated, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)
    return R.Lora(u1=rnd(T, r), b1=rnd(H, r, scale=0.3), s1=0.5,
                  u_up=rnd(T, r + 1) if gated else None, b_up=rnd(H, r + 1, scale=0.3) if gated else None, s_up=2.0,
                  a2=rnd(r, H, scale=H ** -0.5), b2=rnd(d_out, r, scale=0.3), s2=0.25)


def _lora64(lora):
    return lora._replace(**{f: getattr(lora, f).double() for f in ("u1", "b1", "u_up", "b_up", "a2", "b2")
                            if getattr(lora, f) is not None})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_lora_stages_match_reference_and_fp64(gated, dtype):
    """Adapters in the grouped GEMMs (extra K loops) and as extra launches: forward, v2 and all 13 gradients."""
    T, d, Hb, E, k, d_out, r = 29, 24, 16, 4, 2, 20, 3
    p, dy = _problem(T, d, Hb, E, k, d_out, gated, bias=True, dtype=dtype, seed=4)
    lora = _lora(T, d, Hb * E, d_out, r, gated, dtype, seed=5)
    kw = dict(activation="silu", num_blocks=E)
    y, h_pre, h_up, v2 = K.routed_ffn_forward(**p, **kw, lora=lora)
    yr, h_pre_r, h_up_r, v2_r = R.routed_ffn_forward(**p, **kw, lora=lora)
    p64, l64 = _f64(p), _lora64(lora)
    y64, h_pre64, h_up64, v2_64 = R.routed_ffn_forward(**p64, **kw, lora=l64)
    for name, a, b, c in (("y", y, yr, y64), ("h_pre", h_pre, h_pre_r, h_pre64), ("v2", v2, v2_r, v2_64)):
        _check_close(name, a, b, c, dtype)
    g = K.routed_ffn_backward(dy, **p, h_pre=h_pre_r, h_up=h_up_r, **kw, lora=lora, v2=v2_r)
    gr = R.routed_ffn_backward(dy, **p, h_pre=h_pre_r, h_up=h_up_r, **kw, lora=lora, v2=v2_r)
    g64 = R.routed_ffn_backward(dy.double(), **p64, h_pre=h_pre64, h_up=h_up64, **kw, lora=l64, v2=v2_64)
    for name, a, b, c in zip(R.GRAD_NAMES, g, gr, g64):
        assert (a is None) == (b is None), name
        if a is not None:
            _check_close(name, a, b, c, dtype)
    assert g[7] is not None and g[12] is not None   # the adapters' gradients were computed
