"""The one place where kernel launchers get their launch configurations.

Every Triton kernel registers the list of configurations it may run with (`register_candidates`).
A launcher asks `get_config(kernel, key)` where `key` describes the problem (shapes, dtype) coarsely.
Until the autotuner lands (its own issue) the answer is the first candidate that `fits(key)`;
the autotuner will time the candidates per key and keep its choice in `kernels/cache.py`.
The AOT test (`tests/kernels/test_aot_compile.py`) compiles every candidate of every kernel for
sm_80 and sm_90, so a launcher can never pick a configuration that fails to compile or spills.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    meta: tuple[tuple[str, int], ...]  # constexpr block sizes, e.g. (("BLOCK_M", 64), ("BLOCK_N", 64))
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def make(num_warps: int = 4, num_stages: int = 2, **meta: int) -> "KernelConfig":
        return KernelConfig(tuple(sorted(meta.items())), num_warps, num_stages)

    def kwargs(self) -> dict:
        """Keyword arguments for `kernel[grid](..., **cfg.kwargs())`."""
        return {**dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __getitem__(self, name: str) -> int:
        return dict(self.meta)[name]


@dataclasses.dataclass
class KernelEntry:
    name: str
    candidates: list[KernelConfig]
    # fits(config, key) -> bool: whether a config is valid for a problem (e.g. BLOCK_D >= head dim)
    fits: Callable[[KernelConfig, tuple], bool] | None = None


_REGISTRY: dict[str, KernelEntry] = {}


def register_candidates(name: str, candidates: list[KernelConfig],
                        fits: Callable[[KernelConfig, tuple], bool] | None = None) -> None:
    if not candidates:
        raise ValueError(f"kernel {name!r}: at least one candidate config is required")
    _REGISTRY[name] = KernelEntry(name, list(candidates), fits)


def candidates(name: str) -> list[KernelConfig]:
    return list(_REGISTRY[name].candidates)


def registered_kernels() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str, key: tuple) -> KernelConfig:
    """The launch configuration for kernel `name` on problem `key`."""
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no configurations registered for kernel {name!r}") from None
    for cfg in entry.candidates:
        if entry.fits is None or entry.fits(cfg, key):
            return cfg
    raise ValueError(f"kernel {name!r}: no candidate config fits problem {key!r}")
