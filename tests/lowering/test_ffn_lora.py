"""LoRA adapters in torch.ops.spt.routed_ffn (docs/OPS.md), reference path, and the op's autocast.

The op takes u = A·dropout(x) for the gate/up adapters (computed once, outside the block loop, by the graph) and
the down adapter's A2, B2 itself. Ground truth: eager autograd through the PEFT formula
    base(x) + s·B(A(x)),  with the neurons of unselected blocks masked to 0 (sparse mode).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spt_compile.lowering  # noqa: F401  registers the op
from spt_compile.lowering import router as R
from spt_compile.lowering.reference import routed_ffn as ref

OP = torch.ops.spt.routed_ffn
ADAPTED = ("gate", "up", "down")
SCALE = {"gate": 0.5, "up": 2.0, "down": 0.25}
BASE = ("w1", "b1", "w_up", "b_up", "w2", "b2")


def make(T=12, d=24, Hb=16, E=4, d_out=20, r=3, gated=True, bias=True, lora=ADAPTED, dtype=torch.float64, seed=0):
    """Parameters (adapter factors la_*/lb_* = LoRA A/B per projection, None where not adapted) and block_perm."""
    g = torch.Generator().manual_seed(seed)
    H = Hb * E

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    p = dict(x=rnd(T, d), w1=rnd(H, d, scale=d ** -0.5), b1=rnd(H, scale=0.5) if bias else None,
             w_up=rnd(H, d, scale=d ** -0.5) if gated else None,
             b_up=rnd(H, scale=0.5) if gated and bias else None,
             w2=rnd(d_out, H, scale=H ** -0.5), b2=rnd(d_out, scale=0.5) if bias else None)
    for name, (n_in, n_out) in (("gate", (d, H)), ("up", (d, H)), ("down", (H, d_out))):
        on = name in lora and (gated or name != "up")
        p[f"la_{name}"] = rnd(r, n_in, scale=n_in ** -0.5) if on else None
        p[f"lb_{name}"] = rnd(n_out, r, scale=0.5) if on else None
    return p, torch.randperm(H, generator=g)


def leaves(p, frozen=()):
    return {k: (None if v is None else v.detach().clone().requires_grad_(k not in frozen)) for k, v in p.items()}


def run_op(p, perm, E, k, act="silu", router="oracle", site=0):
    """The op as the rewrite calls it: u = A·x in the graph, the rest inside. -> (y, block_ids, h_pre, h_up, v2)"""
    u1 = F.linear(p["x"], p["la_gate"]) if p["la_gate"] is not None else None
    uup = F.linear(p["x"], p["la_up"]) if p["la_up"] is not None else None
    return OP(p["x"], p["w1"], p["b1"], p["w_up"], p["b_up"], p["w2"], p["b2"], perm, act, E, k, router, 8, 200,
              site, u1, p["lb_gate"], SCALE["gate"], uup, p["lb_up"], SCALE["up"], p["la_down"], p["lb_down"],
              SCALE["down"])


def _proj(x, w, b, la, lb, s):
    out = F.linear(x, w, b)
    return out if la is None else out + F.linear(F.linear(x, la), lb) * s


def eager(p, perm, E, block_ids, act="silu"):
    """PEFT's formula through autograd, unselected blocks' neurons multiplied by 0."""
    T, H = p["x"].shape[0], p["w1"].shape[0]
    h = ref.activation_forward(_proj(p["x"], p["w1"], p["b1"], p["la_gate"], p["lb_gate"], SCALE["gate"]), act)
    if p["w_up"] is not None:
        h = h * _proj(p["x"], p["w_up"], p["b_up"], p["la_up"], p["lb_up"], SCALE["up"])
    blk = torch.zeros(T, E, dtype=h.dtype).scatter_(1, block_ids.long(), 1.0)           # [T, E]
    mask = torch.empty(T, H, dtype=h.dtype)
    mask[:, perm] = blk.repeat_interleave(H // E, dim=1)                                 # [T, H]
    return _proj(h * mask, p["w2"], p["b2"], p["la_down"], p["lb_down"], SCALE["down"])


def _grads_match(pa, pb, rtol=1e-9, atol=1e-10):
    for name, a in pa.items():
        b = pb[name]
        if a is None:
            continue
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("lora", [ADAPTED, ("gate",), ("up",), ("down",), ("gate", "down")])
@pytest.mark.parametrize("gated, bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_lora_forward_and_every_gradient_equal_eager(lora, gated, bias, k):
    p, perm = make(gated=gated, bias=bias, lora=lora)
    pa, pb = leaves(p), leaves(p)
    y, ids, *_ = run_op(pa, perm, 4, k)
    ye = eager(pb, perm, 4, ids)
    torch.testing.assert_close(y, ye, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (ye * dy).sum().backward()
    _grads_match(pa, pb)


@pytest.mark.parametrize("k", [2, 4])
def test_frozen_base_runs_no_base_weight_gradient_gemm(k):
    """LoRA fine-tuning: base frozen, adapters trained. No GEMM of a base weight-gradient's shape may run in
    the backward (profiler over every aten matmul), and the adapters' gradients stay exact."""
    T, d, Hb, E, d_out, r = 12, 24, 16, 4, 20, 3   # T < Hb: a [Hb, d] / [d_out, Hb] output can only be a dW
    p, perm = make(T, d, Hb, E, d_out, r)
    pa, pb = leaves(p, frozen=BASE + ("x",)), leaves(p, frozen=BASE + ("x",))
    y, ids, *_ = run_op(pa, perm, E, k)
    ye = eager(pb, perm, E, ids)
    dy = torch.randn_like(y)
    base_shapes = {(Hb, d), (Hb * E, d), (d_out, Hb), (d_out, Hb * E)}

    def gemm_outputs(loss):
        with torch.profiler.profile(record_shapes=True) as prof:
            loss.backward()
        out = []
        for ev in prof.events():   # (out [m, n] of every matmul: mm(a, b[, out]), addmm(c, a, b), addmm_)
            first = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1}.get(ev.name)
            if first is not None and ev.input_shapes:
                a, b = ev.input_shapes[first], ev.input_shapes[first + 1]
                out.append((a[0], b[1]))
        return out

    ours = gemm_outputs((y * dy).sum())
    assert ours, "the profiler saw no GEMM at all: the test would prove nothing"
    assert not base_shapes & set(ours), f"base weight-gradient GEMMs ran: {sorted(base_shapes & set(ours))}"
    trained = gemm_outputs((eager(leaves(p), perm, E, ids) * dy).sum())   # everything trainable: dW GEMMs run
    assert base_shapes & set(trained)
    (ye * dy).sum().backward()
    _grads_match(pa, pb)
    for n in BASE:
        assert pa[n] is None or pa[n].grad is None


def test_lowrank_router_reads_current_adapters_every_call():
    """The adapter's term joins the base's low-rank factors exactly: at full rank lowrank == oracle with
    LoRA, and changing B changes the routing on the next call without a refresh (refresh re-fits the base)."""
    R.clear_router_cache()
    p, perm = make(T=40, d=16, Hb=8, E=8, r=2, lora=("gate", "up"))
    p["lb_gate"] = p["lb_gate"] * 4  # a strong adapter: routing depends on it
    ids_oracle = run_op(p, perm, 8, 3, router="oracle")[1]
    ids_lr = OP(p["x"], p["w1"], p["b1"], p["w_up"], p["b_up"], p["w2"], p["b2"], perm, "silu", 8, 3, "lowrank",
                16, 1000, 77, F.linear(p["x"], p["la_gate"]), p["lb_gate"], SCALE["gate"],
                F.linear(p["x"], p["la_up"]), p["lb_up"], SCALE["up"])[1]
    assert torch.equal(ids_oracle.sort(1).values, ids_lr.sort(1).values)
    p2 = dict(p, lb_gate=-p["lb_gate"])
    ids_lr2 = OP(p2["x"], p2["w1"], p2["b1"], p2["w_up"], p2["b_up"], p2["w2"], p2["b2"], perm, "silu", 8, 3,
                 "lowrank", 16, 1000, 77, F.linear(p2["x"], p2["la_gate"]), p2["lb_gate"], SCALE["gate"],
                 F.linear(p2["x"], p2["la_up"]), p2["lb_up"], SCALE["up"])[1]
    (entry,) = R.router_cache_entries(77)
    assert entry.refreshes == 1                                   # the base factors were not re-fitted ...
    assert not torch.equal(ids_lr.sort(1).values, ids_lr2.sort(1).values)   # ... yet the routing followed B
    assert torch.equal(ids_lr2.sort(1).values, run_op(p2, perm, 8, 3)[1].sort(1).values)


def test_opcheck_with_lora():
    p, perm = make(T=6, d=8, Hb=4, E=4, d_out=8, r=2, dtype=torch.float32)
    p = leaves(p)
    u1, uup = F.linear(p["x"], p["la_gate"]).detach().requires_grad_(), F.linear(p["x"], p["la_up"]).detach()
    args = (p["x"], p["w1"], p["b1"], p["w_up"], p["b_up"], p["w2"], p["b2"], perm, "gelu", 4, 2, "oracle", 4,
            200, 3, u1, p["lb_gate"], 0.5, uup.requires_grad_(), p["lb_up"], 2.0, p["la_down"], p["lb_down"], 0.25)
    torch.library.opcheck(OP.default, args)


@pytest.mark.parametrize("change, match", [
    (dict(lb_gate=None), "lora_u1 and lora_b1"),
    (dict(lb_down=torch.zeros(3, 3, dtype=torch.float64)), "lora_b2"),
    (dict(la_down=torch.zeros(3, 7, dtype=torch.float64)), "lora_a2"),
    (dict(lb_up=torch.zeros(64, 3)), "lora_b_up"),
])
def test_bad_adapter_arguments_name_them(change, match):
    p, perm = make()
    p.update(change)
    with pytest.raises(ValueError, match=match):
        run_op(p, perm, 4, 2)


@pytest.mark.parametrize("k", [2, 4])
def test_bf16_autocast_runs_the_routed_ffn_in_bf16(k):
    """Under CPU bf16 autocast the op casts its fp32 inputs to bf16, as autocast casts the linears it replaces;
    outputs match eager autocast within bf16 rounding, and gradients flow back to the fp32 parameters."""
    p, perm = make(dtype=torch.float32, lora=("gate", "down"))
    pa, pb = leaves(p), leaves(p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ids, h_pre, _, v2 = run_op(pa, perm, 4, k)
        ye = eager(pb, perm, 4, ids)
    assert y.dtype == torch.bfloat16 and h_pre.dtype == torch.bfloat16 and v2.dtype == torch.bfloat16
    assert ye.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ye.float(), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    ye.float().sum().backward()
    for n in ("w1", "la_gate", "lb_gate", "la_down", "lb_down"):
        assert pa[n].grad.dtype == torch.float32
        torch.testing.assert_close(pa[n].grad, pb[n].grad, rtol=5e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # fp64 (reference mode) is left alone
        assert run_op(make()[0], perm, 4, k)[0].dtype == torch.float64
