"""Shared test helpers: compile with backend="spt" and compare with eager, outputs and every gradient."""
from __future__ import annotations

import copy

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
    torch.testing.assert_close(out.float(), ref.float(), **tol, msg=lambda m: f"output differs: {m}")
    g_ref, g_out = grads_of(eager), grads_of(spt)
    assert g_ref, "no gradients at all"
    if same_grad_set:
        assert g_ref.keys() == g_out.keys(), f"gradient sets differ: {sorted(g_ref.keys() ^ g_out.keys())}"
    params = dict(spt.named_parameters())
    for name in sorted(g_ref.keys() | g_out.keys()):
        # AOTAutograd gives zeros where eager leaves None (parameters not on the loss path, e.g. BERT's pooler)
        zero = torch.zeros_like(params[name])
        torch.testing.assert_close(g_out.get(name, zero).float(), g_ref.get(name, zero).float(), **tol,
                                   msg=lambda m, name=name: f"grad of {name} differs: {m}")
    reports = spt_compile.last_reports()
    assert reports, "backend='spt' was never called"
    merged = spt_compile.Report()
    for r in reports:
        merged.extend(r)
    return merged
