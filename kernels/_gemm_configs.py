"""Candidate launch configs of the routed-FFN grouped GEMMs (kernels/grouped_gemm.py).

Candidates go from large to small; `fits` skips tiles much larger than the problem, so the registry's
first-fit answer (autotune.get_config) gives small problems small tiles. Every candidate compiles
for sm_80 and sm_90 in bf16/fp16/fp32 without spills and within sm_80's 164 KB shared memory
(checked with cuobjdump; the AOT test keeps it so).

Keys (built by `gemm_key`): (dtype name, M, N, K) rounded up to powers of two, where M is the
average rows per block (row-tiled kernels) or the output rows (weight-gradient kernels).
"""
from __future__ import annotations

import triton

from spt_compile.kernels.autotune import KernelConfig

_C = KernelConfig.make

# grouped row-tiled GEMMs: rows of one block x N, reduction over K (forward up/down, dhidden, dx).
# Larger tiles (64x128, 128x128) spill: each tile's rows and weight columns are gathered, so every
# element carries its own 64-bit address; 8 warps on 64x64 keep the per-thread share small enough.
ROW_TILED = [
    _C(num_warps=8, num_stages=2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    _C(num_warps=4, num_stages=2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32),
    _C(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16),
]
# per-block weight gradients: [BLOCK_M, BLOCK_N] output tile, reduction over the block's rows (BLOCK_K)
WEIGHT_GRAD = [
    _C(num_warps=8, num_stages=2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    _C(num_warps=4, num_stages=2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32),
    _C(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16),
]
# fp32 (IEEE, no TF32) dots run on FMA units and hold far more registers per tile: sm_80 spills from
# 32x64 up, so fp32 kernels are registered under their own names with these smaller tiles.
FP32 = [
    _C(num_warps=4, num_stages=2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16),
    _C(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16),
]
# fp32 weight gradients: 32x32 at 4 warps spills 8 bytes on sm_80 (dW1 with dW_up); 8 warps do not
FP32_WG = [
    _C(num_warps=8, num_stages=2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=16),
    _C(num_warps=4, num_stages=2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16),
]
# the deterministic per-token sum of the top_k pair rows (elementwise, no dot)
PAIR_SUM = [
    _C(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=256),
    _C(num_warps=4, num_stages=1, BLOCK_M=16, BLOCK_N=64),
    _C(num_warps=2, num_stages=1, BLOCK_M=16, BLOCK_N=16),
]


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def gemm_key(dtype: str, m: int, n: int, k: int) -> tuple:
    return (dtype, _p2(m), _p2(n), _p2(k))


def fits_gemm(cfg: KernelConfig, key: tuple) -> bool:
    """A tile may overhang the problem by at most 2x in each dim (smaller tiles waste less)."""
    _, m, n, k = key
    meta = dict(cfg.meta)
    ok = meta["BLOCK_M"] <= max(16, 2 * m) and meta["BLOCK_N"] <= max(16, 2 * n)
    return ok and ("BLOCK_K" not in meta or meta["BLOCK_K"] <= max(16, 2 * k))


def fits_last_resort(cfg: KernelConfig, key: tuple, cands: list[KernelConfig]) -> bool:
    """fits_gemm, but the smallest candidate always fits (every problem gets a config)."""
    return cfg == cands[-1] or fits_gemm(cfg, key)
