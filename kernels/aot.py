"""Ahead-of-time compilation specs: how to compile each registered kernel for a real GPU target
without a GPU (Triton compiles PTX and cubins on CPU machines).

A kernel module calls `register_aot(name, fn, signature, constexprs_for)`: `signature` maps every
runtime argument to its Triton type (e.g. "*fp16", "i32") and every constexpr to "constexpr";
`constexprs_for(config, dtype)` gives the constexpr values for one candidate config.
`tests/kernels/test_aot_compile.py` compiles every (kernel, candidate, dtype) for sm_80 and sm_90.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from spt_compile.kernels.autotune import KernelConfig


@dataclasses.dataclass
class AotSpec:
    name: str                      # the name the configs are registered under in autotune.py
    fn: object                     # the @triton.jit function
    signature: Callable[[str], dict]  # dtype name ("fp16", "bf16", "fp32") -> {arg: triton type}
    constexprs_for: Callable[[KernelConfig, str], dict]
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")


_AOT: dict[str, AotSpec] = {}


def register_aot(spec: AotSpec) -> None:
    _AOT[spec.name] = spec


def aot_specs() -> list[AotSpec]:
    return [_AOT[k] for k in sorted(_AOT)]
