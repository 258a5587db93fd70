"""Shared test helpers: compile with backend="spt" and compare with eager, outputs and every gradient."""
from __future__ import annotations

import contextlib
import copy
import os

import torch

import spt_compile

EXACT = {"attention_density": 1.0, "ffn_density": 1.0, "min_seq_len": 0}

# Tolerances for exact mode against eager in the same dtype. The spt ops reorder sums (per-block FFN partial
# sums, softmax over a gathered key list) so results differ by rounding only: a few ulps of the dtype times the
# reduction depth. fp32: ~1e-6 relative per op; bf16: 2^-8 = 0.4% per rounding.
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_and_grad(model, args, kwargs, pick=lambda o: o):
    out = pick(model(*args, **kwargs))
    # a fixed random cotangent exercises every gradient path, not just the sum
    g = torch.Generator().manual_seed(123)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
    (out.float() * cot.float()).sum().backward()
    return out.detach()


def compare_with_eager(model, args=(), kwargs=None, options=None, inner_backend="aot_eager",
                       pick=lambda o: o, tol=None, same_grad_set=False):
    """Run eager and backend="spt" from identical weights; assert output and all parameter grads match
    (same_grad_set: and exactly the same parameters get a gradient). Returns the spt Report of the compile."""
    kwargs = kwargs or {}
    options = {**EXACT, **(options or {}), "inner_backend": inner_backend}
    eager = copy.deepcopy(model)
    spt = copy.deepcopy(model)
    torch.manual_seed(0)
    ref = run_and_grad(eager, args, kwargs, pick)
    spt_compile.report.clear_reports()
    torch._dynamo.reset()  # hypothesis runs many examples per test: stay clear of Dynamo's recompile limit
    compiled = torch.compile(spt, backend="spt", options=options)
    torch.manual_seed(0)
    out = run_and_grad(compiled, args, kwargs, pick)
    dtype = ref.dtype
    tol = tol or TOL[dtype]
    truth = _fp64_truth(model, args, kwargs, pick) if dtype in (torch.bfloat16, torch.float16) else None
    _assert_close(out, ref, tol, truth and truth[0], "output")
    g_ref, g_out = grads_of(eager), grads_of(spt)
    assert g_ref, "no gradients at all"
    if same_grad_set:
        assert g_ref.keys() == g_out.keys(), f"gradient sets differ: {sorted(g_ref.keys() ^ g_out.keys())}"
    params = dict(spt.named_parameters())
    for name in sorted(g_ref.keys() | g_out.keys()):
        # AOTAutograd gives zeros where eager leaves None (parameters not on the loss path, e.g. BERT's pooler)
        zero = torch.zeros_like(params[name])
        _assert_close(g_out.get(name, zero), g_ref.get(name, zero), tol,
                      truth and truth[1].get(name, torch.zeros_like(zero, dtype=torch.float64)), f"grad of {name}")
    reports = spt_compile.last_reports()
    assert reports, "backend='spt' was never called"
    merged = spt_compile.Report()
    for r in reports:
        merged.extend(r)
    return merged


def _fp64_truth(model, args, kwargs, pick):
    """(output, grads) of the same model and inputs in float64: the ground truth for half-precision checks."""
    m64 = copy.deepcopy(model).double()
    a64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    torch.manual_seed(0)
    out = run_and_grad(m64, a64, kwargs, pick)
    return out, grads_of(m64)


def _assert_close(got, ref, tol, truth, what):
    """Elementwise within `tol` of eager; in half precision, failing that, at most 2x eager's own error against
    fp64 (relative Frobenius norm, plus the atol floor). Why: at a ReLU kink (or a softmax tie) a pre-activation
    one rounding away from 0 flips between two implementations that round the same math differently, moving one
    token's whole contribution to one neuron; eager's bf16 differs from fp64 by such flips too, so the fair bar
    is the project's kernel standard: no worse than PyTorch's own error in the same dtype."""
    try:
        torch.testing.assert_close(got.float(), ref.float(), **tol)
        return
    except AssertionError as e:
        if truth is None:
            raise AssertionError(f"{what} differs: {e}") from None
        elementwise = e
    t = truth.double()
    floor = tol["atol"] * t.numel() ** 0.5
    err_got, err_ref = (got.double() - t).norm().item(), (ref.double() - t).norm().item()
    assert err_got <= 2 * err_ref + floor, (
        f"{what}: error vs fp64 {err_got:.3g} > 2 x eager's {err_ref:.3g} + {floor:.3g}; elementwise: {elementwise}")


@contextlib.contextmanager
def kernels_mode(mode: str):
    """Run the spt ops with SPT_KERNELS=mode (lowering/dispatch.py), restoring the previous value."""
    old = os.environ.get("SPT_KERNELS")
    os.environ["SPT_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPT_KERNELS", None)
        else:
            os.environ["SPT_KERNELS"] = old
