"""The one decision every spt op makes per call: run the Triton kernels or the plain-PyTorch reference.

Environment switch `SPT_KERNELS` (read on every call, so a test or a debugging session can flip it):
  auto       (default) CUDA tensors in fp16/bf16/fp32 run the Triton kernels; everything else the reference.
  triton     as auto, and CPU tensors in fp16/bf16/fp32 run the Triton kernels too, through the Triton
             interpreter. This is how CI exercises the op -> launcher wiring (argument plumbing, strides,
             dtypes, needs_input_grad, config lookup) without a GPU. It needs TRITON_INTERPRET=1 in the
             environment *before triton is imported* (@triton.jit picks the interpreter at decoration time):
                 TRITON_INTERPRET=1 SPT_KERNELS=triton python -m pytest tests/kernels
             Without it the first call raises a RuntimeError naming both variables.
  reference  the reference everywhere, CUDA included (A/B debugging of a kernel on the device).
fp64 always runs the reference: it is the ground-truth mode the tests compare against.
use_kernels() says whether kernels may run; an op still runs its reference for a call its kernels do not serve,
a deliberate, documented and tested fallback decided in the op (the launchers only assert their limits): the
per-query attention backward for a trainable mask, the query-tile attention for head dims > 128
(lowering/attention.py).
"""
from __future__ import annotations

import os
import sys

import torch

ENV = "SPT_KERNELS"
MODES = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mode() -> str:
    """The SPT_KERNELS mode in force ("auto" when unset or empty); ValueError naming the variable if bad."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {MODES}")
    return value


def use_kernels(t: torch.Tensor) -> bool:
    """Whether an op whose main input is `t` runs the Triton kernels (see the module doc)."""
    if t.dtype not in KERNEL_DTYPES:
        return False
    m = mode()
    if m == "reference":
        return False
    if t.is_cuda:
        return True
    if m == "triton" and t.device.type == "cpu":
        check_interpreter()
        return True
    return False


def check_interpreter() -> None:
    """RuntimeError unless CPU tensors can run our Triton kernels: TRITON_INTERPRET=1 set, and no spt kernel
    module imported before it was set (those kernels were compiled for a GPU and would fail on CPU pointers)."""
    if os.environ.get("TRITON_INTERPRET", "") != "1":
        raise RuntimeError(
            f"{ENV}=triton runs CPU tensors through the Triton kernels, which needs the Triton interpreter: "
            f"set TRITON_INTERPRET=1 in the environment before triton is imported, e.g. "
            f"`TRITON_INTERPRET=1 {ENV}=triton python ...` (or unset {ENV} to use the reference on CPU)")
    stale = _compiled_kernel_modules()
    if stale:
        raise RuntimeError(
            f"{ENV}=triton: TRITON_INTERPRET=1 is set now, but {', '.join(stale)} was imported before it was "
            f"(its @triton.jit kernels target a GPU). Set TRITON_INTERPRET=1 before importing triton or "
            f"spt_compile.kernels, e.g. `TRITON_INTERPRET=1 {ENV}=triton python ...`")


def _compiled_kernel_modules() -> list[str]:
    """Loaded spt kernel modules holding non-interpreted @triton.jit functions."""
    if "triton" not in sys.modules:
        return []
    from triton.runtime.jit import JITFunction  # InterpretedFunction is not a subclass of it
    stale = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("spt_compile.kernels.") and mod is not None:
            if any(isinstance(v, JITFunction) for v in vars(mod).values()):
                stale.append(name)
    return sorted(stale)
