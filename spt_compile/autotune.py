"""The autotune cache, for users: export, import, show, pretune (a thin facade over spt_compile.kernels.autotune).

    import spt_compile.autotune as at
    at.pretune("llama", layers=2, hidden=64, seq=256)   # compile + one training step: tunes every kernel used
    at.export("tuned.json")                             # ship it with the training job ...
    print(at.import_("tuned.json"))                     # ... and merge it there: added / foreign / conflicting
    print(at.show())                                    # device, kernel, key, config, measured time

The cache is one JSON file under the user's cache dir (`SPT_CACHE_DIR` overrides it; `cache_path()`).
`SPT_AUTOTUNE=0` turns timing off (cached entries still apply). Entries made on another device, for another
kernel source or another torch / triton version are never applied.
"""
from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from pathlib import Path

from spt_compile.kernels import autotune as _at
from spt_compile.kernels.autotune import ImportSummary, describe, lookup, used  # noqa: F401  (re-exported)
from spt_compile.kernels.cache import default_path

__all__ = ["cache_path", "export", "import_", "show", "pretune", "entries", "clear", "lookup", "used",
           "describe", "ImportSummary", "PretuneResult"]


def cache_path() -> Path:
    """The cache file this process reads and writes."""
    return default_path()


def entries() -> list[dict]:
    """Every entry of the cache file (also those that do not apply on this machine)."""
    return _at.entries()


def export(path) -> int:
    """Write the whole cache to `path`; returns the number of entries."""
    return _at.export(path)


def import_(path, overwrite: bool = False) -> ImportSummary:
    """Merge an exported file into the cache; `str(summary)` says what was added, skipped as foreign, or
    conflicting (the local entry stays unless `overwrite`)."""
    return _at.import_(path, overwrite=overwrite)


def clear() -> int:
    """Delete every cached entry; returns how many."""
    return _at.clear()


def show() -> str:
    """The cache as a table: device, kernel, key, config, measured time, and whether it applies here."""
    rows = _at.rows()
    if not rows:
        return f"autotune cache {cache_path()}: no entries"
    cols = ("device", "kernel", "key", "config", "time", "default config", "status")
    cells = [[r["device"], r["kernel"], r["key"], r["config"], _ms(r["time_ms"]), _ms(r["default_ms"]), r["status"]]
             for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(vals):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, width)) + " |"

    out = [f"autotune cache {cache_path()}: {len(rows)} entries", line(cols),
           "|" + "|".join("-" * (w + 2) for w in width) + "|"]
    return "\n".join(out + [line(r) for r in cells])


def _ms(t) -> str:
    return "-" if t is None else f"{t:.4g} ms"


@dataclasses.dataclass
class PretuneResult:
    model: str
    device: str
    tuned: list[dict]       # entries made by this run
    used: list[dict]        # what every kernel / CPU tunable launched by the step used
    benchmarks: int         # configs timed

    def __str__(self) -> str:
        lines = [f"pretune {self.model} on {self.device}: {len(self.tuned)} entries tuned, "
                 f"{self.benchmarks} configs timed, cache {cache_path()}"]
        for r in self.used:
            lines.append(f"  {r['kernel']:24s} {json.dumps(r['key']):36s} {r['config']:32s} {r['source']}")
        if not self.used:
            lines.append("  (no spt kernel ran: nothing was rewritten? try a longer --seq or check `inspect`)")
        return "\n".join(lines)


@contextmanager
def _tuning_on():
    old = os.environ.get("SPT_AUTOTUNE")
    os.environ["SPT_AUTOTUNE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPT_AUTOTUNE", None)
        else:
            os.environ["SPT_AUTOTUNE"] = old


def pretune(model: str = "llama", *, layers: int = 2, hidden: int = 64, seq: int = 256, batch: int = 2,
            attn_implementation: str = "sdpa", options: dict | None = None, device: str | None = None,
            dtype: str = "float32") -> PretuneResult:
    """Compile a zoo model config with backend="spt" and run training steps (forward + backward) with tuning
    on, so every kernel (GPU) or CPU tunable the job will use is tuned for these shapes and cached: launchers
    that pass a bench closure time their kernel alone, the others are timed through the whole step with
    each candidate forced (`tune_stage`)."""
    import torch

    from spt_compile import zoo
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    zm = zoo.build(model, layers=layers, hidden=hidden, seq=seq, batch=batch,
                   attn_implementation=attn_implementation)
    net = zm.model.to(device=dev, dtype=getattr(torch, dtype))
    inputs = {k: v.to(dev, getattr(torch, dtype)) if v.is_floating_point() else v.to(dev)
              for k, v in zm.inputs.items()}
    before = {json.dumps(e, sort_keys=True) for e in _at.entries()}
    n0 = _at.stats()["benchmarks"]
    with _tuning_on():
        _at.invalidate()
        _at.clear_used()
        torch._dynamo.reset()
        compiled = torch.compile(net, backend="spt", options=dict(options or {}))

        def step():
            zm.output(compiled(**inputs)).float().square().mean().backward()

        step()  # compiles; launchers with a bench closure and the CPU tunables tune themselves here
        _at.tune_stage(step)  # the kernels still untuned: the whole step timed per forced candidate
    tuned = [e for e in _at.entries() if json.dumps(e, sort_keys=True) not in before]
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else _at.cpu_model()
    return PretuneResult(model, name, tuned, _at.used(), _at.stats()["benchmarks"] - n0)
