"""torch.ops.spt.routed_ffn through its Triton launchers on CPU tensors (SPT_KERNELS=triton, interpreter).

What runs here is the op -> launcher wiring (argument plumbing, strides, dtypes, `needs`, config lookup, the
backward op, LoRA adapters); the kernels themselves are tested stage by stage against the reference and fp64
in test_ffn_kernels.py. Each result is compared with the reference path (SPT_KERNELS=reference) on the same
inputs (the router runs in torch on both, so both keep the same blocks). A launch counter proves the kernel
path ran and that launches nobody needs (frozen weights) are skipped.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it too)

import collections  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.helpers import kernels_mode  # noqa: E402
import spt_compile.lowering  # noqa: E402,F401  registers the ops
from spt_compile.kernels import grouped_gemm as K  # noqa: E402

OP = torch.ops.spt.routed_ffn
BASE = ("w1", "b1", "w_up", "b_up", "w2", "b2")
KERNELS = ("_up_kernel", "_down_kernel", "_pair_sum_kernel", "_dhidden_kernel", "_dw_in_kernel", "_dw_out_kernel")


class _Counted:
    """Stands in for a @triton.jit kernel in grouped_gemm: counts `kernel[grid](...)` launches (and the width
    N / D of each weight-gradient launch, which says whose gradient it computes)."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            width = {"_dw_in_kernel": 10, "_dw_out_kernel": 7}.get(self.name)
            self.log[self.name].append(args[width] if width is not None else None)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    log = collections.defaultdict(list)
    for name in KERNELS:
        monkeypatch.setattr(K, name, _Counted(name, getattr(K, name), log))
    return log


def make(T=21, d=24, Hb=16, E=4, d_out=20, r=3, gated=True, bias=True, lora=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    H = Hb * E

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale
    p = dict(x=rnd(T, d), w1=rnd(d, H, scale=d ** -0.5).t(),  # a strided (GPT-2 Conv1D) view, as compiled
             b1=rnd(H, scale=0.5) if bias else None, w_up=rnd(H, d, scale=d ** -0.5) if gated else None,
             b_up=rnd(H, scale=0.5) if gated and bias else None, w2=rnd(d_out, H, scale=H ** -0.5),
             b2=rnd(d_out, scale=0.5) if bias else None)
    for name, (n_in, n_out) in (("gate", (d, H)), ("up", (d, H)), ("down", (H, d_out))):
        on = name in lora and (gated or name != "up")
        p[f"la_{name}"] = rnd(r, n_in, scale=n_in ** -0.5) if on else None
        p[f"lb_{name}"] = rnd(n_out, r, scale=0.5) if on else None
    return p, torch.randperm(H, generator=g)


def run(mode, p, perm, E, k, frozen=(), act="gelu_tanh"):
    """(y, {name: grad or None}) of the op in `mode` on fresh leaves of p."""
    q = {n: (None if v is None else v.detach().clone().requires_grad_(n not in frozen)) for n, v in p.items()}
    with kernels_mode(mode):
        u1 = F.linear(q["x"], q["la_gate"]) if q["la_gate"] is not None else None
        uup = F.linear(q["x"], q["la_up"]) if q["la_up"] is not None else None
        y = OP(q["x"], q["w1"], q["b1"], q["w_up"], q["b_up"], q["w2"], q["b2"], perm, act, E, k, "oracle", 8,
               200, 0, u1, q["lb_gate"], 0.5, uup, q["lb_up"], 2.0, q["la_down"], q["lb_down"], 0.25)[0]
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
        if y.requires_grad:
            (y * dy).sum().backward()
    return y.detach(), {n: (v.grad if v is not None else None) for n, v in q.items()}


def compare(p, perm, E, k, frozen=(), rtol=2e-4, atol=2e-5):
    y, g = run("triton", p, perm, E, k, frozen)
    yr, gr = run("reference", p, perm, E, k, frozen)
    torch.testing.assert_close(y, yr, rtol=rtol, atol=atol)
    for n in g:
        assert (g[n] is None) == (gr[n] is None), n
        if g[n] is not None:
            torch.testing.assert_close(g[n], gr[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")
    return g


@pytest.mark.parametrize("gated, bias", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("k", [2, 4])   # sparse and exact mode
def test_forward_and_every_gradient_match_reference(gated, bias, k, launches):
    p, perm = make(gated=gated, bias=bias)
    compare(p, perm, 4, k)
    if k < 4:   # exact mode runs the dense FFN on every device; sparse mode must have reached the kernels
        assert launches["_up_kernel"] and launches["_dhidden_kernel"] and launches["_dw_in_kernel"]


@pytest.mark.parametrize("lora", [("gate", "up", "down"), ("up",), ("down",), ("gate",)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_lora_forward_and_every_gradient_match_reference(lora, k):
    p, perm = make(lora=lora)
    compare(p, perm, 4, k)


@pytest.mark.parametrize("frozen", [BASE, BASE + ("x",), ("w1", "w_up"), ("w2", "b1"),
                                    ("x", "w1", "w_up", "b1", "b_up")])
def test_frozen_weights_match_reference(frozen):
    p, perm = make()
    g = compare(p, perm, 4, 2, frozen)
    assert all(g[n] is None for n in frozen)


def test_frozen_base_skips_base_launches(launches):
    """Only the launches somebody needs run: everything frozen but x -> no weight-gradient kernel; LoRA with a
    frozen base -> weight-gradient launches only of the adapters' widths (r), never d or d_out."""
    T, d, d_out, r = 21, 24, 20, 3
    p, perm = make(T, d, d_out=d_out, r=r)
    run("triton", p, perm, 4, 2, frozen=BASE)
    assert len(launches["_dhidden_kernel"]) == 1 and not launches["_dw_in_kernel"] and not launches["_dw_out_kernel"]
    launches.clear()
    run("triton", p, perm, 4, 2, frozen=BASE + ("x",))   # nothing trainable reaches the op: no backward at all
    assert not launches["_dhidden_kernel"] and not launches["_dw_in_kernel"]
    launches.clear()
    run("triton", p, perm, 4, 2, frozen=("x", "w1", "b1", "w_up", "b_up"))   # only w2, b2: nothing below act
    assert not launches["_dhidden_kernel"] and launches["_dw_out_kernel"] == [d_out]
    launches.clear()
    pl, perm = make(T, d, d_out=d_out, r=r, lora=("gate", "up", "down"))
    run("triton", pl, perm, 4, 2, frozen=BASE + ("x",))
    assert sorted(launches["_dw_in_kernel"]) == [r, r]      # dB_gate, dB_up
    assert launches["_dw_out_kernel"] == [r]                # dA_down
    launches.clear()
    run("triton", pl, perm, 4, 2)                           # trainable base: its dW launches do run
    assert d in launches["_dw_in_kernel"] and d_out in launches["_dw_out_kernel"]


def test_bias_trainable_weight_frozen():
    # BitFit-style: the bias gradient alone (no dW launch) comes from a segment sum
    p, perm = make()
    g = compare(p, perm, 4, 2, frozen=("w1", "w_up", "w2"))
    assert g["b1"] is not None and g["b_up"] is not None


def test_opcheck_through_the_launchers():
    """Fake impl strides, autograd registration and schema hold on the kernel path too (sparse mode, LoRA)."""
    p, perm = make(T=6, d=16, Hb=16, E=2, d_out=16, r=2, lora=("gate", "up", "down"))
    q = {n: (None if v is None else v.detach().clone().requires_grad_()) for n, v in p.items()}
    u1 = F.linear(q["x"], q["la_gate"]).detach().requires_grad_()
    uup = F.linear(q["x"], q["la_up"]).detach().requires_grad_()
    args = (q["x"], q["w1"], q["b1"], q["w_up"], q["b_up"], q["w2"], q["b2"], perm, "silu", 2, 1, "oracle", 4, 200,
            5, u1, q["lb_gate"], 0.5, uup, q["lb_up"], 2.0, q["la_down"], q["lb_down"], 0.25)
    with kernels_mode("triton"):
        torch.library.opcheck(OP.default, args)
