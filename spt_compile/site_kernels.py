"""Which autotune-cache entries a rewritten site would use: per kernel, the entry for its traced key, or "untuned".

The launchers own their tuning-key formulas (kernels/*.py). When the autotuner can name the (kernel, key)
pairs of a site (`autotune.site_kernel_keys(op, arguments)`, arguments as recorded by graph_snapshot), each
key is looked up exactly. Otherwise we can still say something true per kernel of the site's op and device:
"untuned" when the cache holds no entry for that kernel here, else how many entries it holds (for some keys).
"""
from __future__ import annotations

from typing import Any

# op name prefix -> kernel name prefixes (kernels/*.py register under these names)
_FAMILIES = {"spt.pq_sparse_attention": ("attention_", "pq_"), "spt.routed_ffn": ("ffn_", "routing_")}


def _device_kind(arguments: dict[str, Any]) -> str:
    for value in arguments.values():
        if isinstance(value, dict) and "device" in value:
            return "triton" if str(value["device"]).startswith("cuda") else "cpu"
    return "cpu"


def kernel_entries(arguments: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(kernel, what the cache says) for the kernels of one rewritten site."""
    if not arguments:
        return []
    try:
        from spt_compile.kernels import autotune
        autotune.ensure_registered()
    except Exception as e:  # noqa: BLE001 - the report must render without the kernels package
        return [("(kernels)", f"unavailable: {e}")]
    op = str(arguments.get("op", "")).removesuffix(".default")
    keys_of = getattr(autotune, "site_kernel_keys", None)
    pairs = keys_of(op, arguments) if keys_of is not None else None  # None: this device's kernels name no keys
    if pairs is not None:
        return [(f"{k} {tuple(key)}", autotune.describe(k, tuple(key))) for k, key in pairs]
    prefixes = _FAMILIES.get(op, ())
    kind = _device_kind(arguments)
    cached: dict[str, int] = {}
    for e in autotune.entries():
        if autotune.foreign_reason(e) is None:
            cached[e["kernel"]] = cached.get(e["kernel"], 0) + 1
    rows = []
    for name in autotune.registered_kernels(kind=None):  # Triton kernels and CPU tunables
        # CPU tunables are named "<family>_cpu_<stage>" (kernels/cpu_tunables.py); the rest are Triton kernels
        if not name.startswith(prefixes) or ("_cpu_" in name) != (kind == "cpu"):
            continue
        n = cached.get(name, 0)
        rows.append((name, "untuned" if n == 0 else f"{n} cached entr{'y' if n == 1 else 'ies'} (this key unknown)"))
    return rows
