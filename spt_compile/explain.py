"""`spt_compile.explain(model, *args, options=..., **kwargs)`: what backend="spt" would do to this model.

Runs the model once under Dynamo with an analysis backend that matches and decides exactly as the real backend
does, but executes the original graph: the model, its parameters, gradients and the RNG state are untouched.
"""
from __future__ import annotations

import torch

from spt_compile import dynamo_events
from spt_compile.backend import analysis_backend
from spt_compile.options import SptOptions
from spt_compile.report import Report


def explain(model, *args, options=None, **kwargs) -> Report:
    """Return a Report listing every candidate attention / FFN site with its status and parameters."""
    opts = SptOptions.from_dict(options)
    report = Report(options=opts.as_dict())
    root = model if isinstance(model, torch.nn.Module) else None
    compiled = torch.compile(model, backend=analysis_backend(opts, report, root), dynamic=False, fullgraph=False)
    devices = _cuda_devices(model, args, kwargs)
    with torch.random.fork_rng(devices=devices), torch.no_grad(), dynamo_events.capture() as events:
        compiled(*args, **kwargs)
    report.dynamo = events.as_dict()
    return report


def _cuda_devices(model, args, kwargs) -> list[int]:
    tensors = list(args) + list(kwargs.values())
    if isinstance(model, torch.nn.Module):
        tensors += list(model.parameters())[:1]
    return sorted({t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})
