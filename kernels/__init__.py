"""Triton kernels for the spt ops, their launchers, and the config registry (autotune.py).

Kernel modules register their candidate configs and AOT specs when imported; `load_all()` imports
every one of them (the AOT test and the autotuner use it). Launchers are imported lazily by
`spt_compile.lowering` only on CUDA tensors, so CPU users never need a working Triton backend.
"""
import importlib

KERNEL_MODULES = (
    "pq",              # product quantization: k-means assignment and codebook update
    "attention_topk",  # lookup-table scoring + streaming top-L key selection
    "attention_fwd",   # sparse attention forward over the selected keys (out, lse)
    "attention_bwd",   # sparse attention backward: dQ, and dK/dV via the transposed index
    "attention_tiled_select",  # query-tile selection: PQ scoring, per-query normaliser, tile mass, top-L
    "attention_tiled_fwd",     # query-tile attention forward: tl.dot tiles over the gathered key list
    "attention_tiled_bwd",     # query-tile attention backward: dQ per tile, dK/dV per key block
    "routing",         # routed FFN prologue: per-block counts, offsets, token order by block
    "grouped_gemm",    # routed FFN grouped GEMMs forward and backward
)


def load_all() -> list:
    """Import every kernel module (registering its configs and AOT specs); returns the modules."""
    mods = []
    for name in KERNEL_MODULES:
        try:
            mods.append(importlib.import_module(f"spt_compile.kernels.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"spt_compile.kernels.{name}":
                raise
    return mods
