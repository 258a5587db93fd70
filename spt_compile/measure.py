"""Measuring helpers shared by the demo (`python -m spt_compile demo`) and the bench/ scripts:
machine name, timing, memory measures, markdown tables.

Memory measures (say which one a table uses — they are not interchangeable):
- `peak_memory(fn)`: peak bytes allocated while `fn` runs, above what was allocated before it.
  CUDA: `torch.cuda.max_memory_allocated`. CPU: torch has no allocator statistics on CPU and
  `tracemalloc` does not see torch's allocations, so we replay the allocation/free events recorded
  by `torch.profiler(profile_memory=True)` and take the peak of their running sum.
- `saved_tensor_bytes(fn)`: bytes autograd keeps alive for the backward pass, counted with
  `torch.autograd.graph.saved_tensors_hooks` (each storage once; storages of the given inputs can be
  excluded because the caller owns them anyway).
"""
from __future__ import annotations

import os
import re
import statistics
import time
from typing import Callable, Iterable, Sequence

import torch


def machine_name() -> str:
    """A short human-readable name of the machine the bench runs on (GPU name if CUDA is used)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from spt_compile.kernels.autotune import cpu_model  # the autotune cache keys on the same CPU name

    cpu = cpu_model()
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def machine_slug() -> str:
    """`machine_name()` reduced to a file-name-safe slug, e.g. 'cpu' or 'nvidia-h100-80gb-hbm3'."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 1, reps: int = 5,
            device: torch.device | str | None = None) -> float:
    """Median wall time of `fn()` in seconds after `warmup` untimed calls (first calls pay for
    allocations, lazy init and compilation, which is not what a steady-state training step costs)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, str]:
    """(peak bytes allocated during `fn()` above the level before it, name of the method used)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto keeps one "[memory]" event per allocation (+bytes) and free (-bytes); FunctionEvent
    # aggregation folds allocations into their ops, so read the raw events and replay them in order.
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak, "torch.profiler CPU allocation events (peak of running sum)"


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` builds its graph.

    Storages of `exclude` (typically the inputs, which the caller keeps alive anyway) are not
    counted. Keep the result of `fn()` alive until this returns only if you need it; the count is
    taken at pack time, so it does not matter whether the graph is freed afterwards.
    """
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:  # views and repeated saves of one storage cost memory once
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"row has {len(r)} cells, table has {len(headers)} columns: {r}")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
