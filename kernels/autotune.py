"""The one place where kernel launchers get their launch configurations: a timing autotuner with a disk cache.

A kernel declares its config space once, at import:

    register_candidates("attention_fwd", [KernelConfig.make(num_warps=4, BLOCK_L=32), ...],
                        fits=lambda cfg, key: ...,        # prune configs that cannot serve the problem
                        smem=lambda cfg, key: bytes)      # optional: prune against the GPU's shared memory

and a launcher asks, on every launch,

    cfg = get_config("attention_fwd", key, bench=lambda cfg: kernel[grid(cfg)](..., **cfg.kwargs()))

`key` is the tuning key the launcher builds: bucketed sizes (`bucket(n)`: next power of two of a token
count), exact head dims / block counts, the dtype name: plain str / int / float / bool values. The answer:
1. an entry of the cache (kernels/cache.py) made for this kernel source, device, torch / triton versions and
   key: no timing at all (this is how imported entries and `torch.compile` runs pick configs up);
2. else, when tuning is possible, each fitting candidate is timed through `bench(cfg)` and the fastest is
   kept, in memory and on disk: on a GPU with `triton.testing.do_bench` (median, warm-up excluded, on the
   launcher's real inputs); for CPU tunables (`kind="cpu"`, e.g. the reference paths' chunk sizes,
   kernels/cpu_tunables.py) with `time.perf_counter` (one warm-up call, median of a few);
3. else the first candidate that fits ("untuned").
Tuning is possible when `SPT_AUTOTUNE` is not 0, a bench closure was given, and, for Triton kernels, a CUDA
device runs them: under `TRITON_INTERPRET=1` Triton configs are never timed (the interpreter says nothing
about GPU speed) but cached entries still apply. `bench` runs the kernel once with `cfg` on the launch's
inputs; a kernel that accumulates into its outputs (atomics) must reset them inside `bench`.

Launchers that cannot re-run their kernel alone are tuned through a whole stage instead: `tune_stage(run)`
runs `run()` once to learn which (kernel, key) pairs it launches, then times it with each fitting candidate of
one pair forced in turn (`forced({...})`); `pretune` does this with a whole training step.

What each launch used is recorded per process (`used()`); `lookup(kernel, key)` / `describe(kernel, key)` give
the entry that applies to a key and `site_kernel_keys(op, arguments)` the keys a traced site will use (from
each kernel's optional `site_key` hook), for the inspection report. The AOT test compiles every candidate of every kernel for
sm_80 and sm_90, so neither the default nor a tuned choice can be a config that fails to compile or spills.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from spt_compile.kernels import cache as _cache

log = logging.getLogger("spt_compile.autotune")

KINDS = ("triton", "cpu")


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

    def to_json(self) -> dict:
        return {"meta": dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @staticmethod
    def from_json(d: dict) -> "KernelConfig":
        return KernelConfig.make(d["num_warps"], d["num_stages"], **d["meta"])


def describe_config(cfg: dict | KernelConfig, kind: str = "triton") -> str:
    """'BLOCK_L=32 warps=4 stages=2' (CPU tunables: 'chunk_elems=4194304')."""
    d = cfg.to_json() if isinstance(cfg, KernelConfig) else cfg
    meta = " ".join(f"{k}={v}" for k, v in sorted(d["meta"].items()))
    return meta if kind == "cpu" else f"{meta} warps={d['num_warps']} stages={d['num_stages']}"


@dataclasses.dataclass
class KernelEntry:
    name: str
    candidates: list[KernelConfig]
    # fits(config, key) -> bool: whether a config is valid for a problem (e.g. BLOCK_D >= head dim)
    fits: Callable[[KernelConfig, tuple], bool] | None = None
    kind: str = "triton"
    source: str | None = None          # file or module whose source the cache entries are tied to
    # smem(config, key) -> bytes of shared memory; configs above the device's limit are pruned on GPU
    smem: Callable[[KernelConfig, tuple], int] | None = None
    # site_key(op, arguments) -> key | None: the key a rewritten site will launch with (inspection report)
    site_key: Callable[[str, dict], tuple | None] | None = None
    _hash: str | None = None

    def kernel_hash(self) -> str:
        """Hash of the kernel's source file and its candidate list: an edit to either retires old entries."""
        if self._hash is None:
            h = hashlib.sha256(repr(self.candidates).encode())
            path = _source_file(self.source)
            h.update(Path(path).read_bytes() if path else self.name.encode())
            self._hash = h.hexdigest()[:16]
        return self._hash


def _source_file(source: str | None) -> str | None:
    if source is None or os.path.exists(source):
        return source
    mod = sys.modules.get(source)
    if mod is not None and getattr(mod, "__file__", None):
        return mod.__file__
    spec = importlib.util.find_spec(source)
    return spec.origin if spec else None


_REGISTRY: dict[str, KernelEntry] = {}


def register_candidates(name: str, candidates: list[KernelConfig],
                        fits: Callable[[KernelConfig, tuple], bool] | None = None, *, kind: str = "triton",
                        source: str | None = None, smem: Callable[[KernelConfig, tuple], int] | None = None,
                        site_key: Callable[[str, dict], tuple | None] | None = None) -> None:
    """Declare kernel `name`'s config space. `source` (a file or module name; default: the calling module's
    file) is what the cache entries' kernel hash covers; `site_key(op, arguments)` names the key a rewritten
    site will use (see site_kernel_keys)."""
    if not candidates:
        raise ValueError(f"kernel {name!r}: at least one candidate config is required")
    if kind not in KINDS:
        raise ValueError(f"kernel {name!r}: kind must be one of {KINDS}, got {kind!r}")
    if source is None:
        source = sys._getframe(1).f_globals.get("__file__")
    _REGISTRY[name] = KernelEntry(name, list(candidates), fits, kind, source, smem, site_key)
    _memo.clear()


def candidates(name: str) -> list[KernelConfig]:
    return list(_entry(name).candidates)


def registered_kernels(kind: str | None = "triton") -> list[str]:
    """Names of the registered Triton kernels (what the AOT check compiles); kind="cpu": the CPU tunables;
    None: both."""
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def _entry(name: str) -> KernelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no configurations registered for kernel {name!r}") from None


def bucket(n: int) -> int:
    """Shape bucket of a size: the next power of two (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------- environment


def tuning_enabled() -> bool:
    """`SPT_AUTOTUNE=0` (or off / false / no) turns timing off; cached entries still apply."""
    return os.environ.get("SPT_AUTOTUNE", "1").strip().lower() not in ("0", "off", "false", "no")


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _versions() -> tuple[str, str]:
    import torch
    try:
        from importlib.metadata import version
        triton_version = version("triton")
    except Exception:  # no triton distribution: CPU tunables still work
        triton_version = "none"
    return torch.__version__, triton_version


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


@functools.lru_cache(maxsize=None)
def _gpu(index: int) -> tuple[str, str]:
    import torch
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"sm_{major}{minor}"


def environment(kind: str = "triton") -> dict:
    """The fields an entry must match to apply here: device, capability, torch, triton."""
    import torch
    if kind == "cpu":
        device, cap = cpu_model(), f"threads={torch.get_num_threads()}"
    elif interpreter():
        device, cap = "triton-interpreter", "cpu"
    elif torch.cuda.is_available():
        device, cap = _gpu(torch.cuda.current_device())
    else:
        device, cap = "no-gpu", "none"
    tv, trv = _versions()
    return {"device": device, "capability": cap, "torch": tv, "triton": trv}


def _can_time(entry: KernelEntry) -> bool:
    if not tuning_enabled():
        return False
    import torch
    if torch.compiler.is_compiling():  # a trace must not run kernels; the run time call tunes
        return False
    if entry.kind == "cpu":
        return True
    # never time inside a CUDA graph capture (mode="reduce-overhead"): the replayed graph keeps the default
    return not interpreter() and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------------------- timing

Timer = Callable[[Callable[[], object], KernelConfig], float]  # (run once, config) -> milliseconds


def gpu_timer(fn: Callable[[], object], cfg: KernelConfig) -> float:
    """Median ms of `fn` by triton.testing.do_bench (its warm-up and compilation are not timed)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def cpu_timer(fn: Callable[[], object], cfg: KernelConfig, reps: int = 3) -> float:
    """Median ms of `reps` timed calls after one warm-up call (one timed call when a call takes > 2 s: tuning
    happens once per key, but a first call should not take minutes)."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > 2.0:
        reps = 1
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


_timer: Timer | None = None  # injected by tests (set_timer); None = the kind's own timer


def set_timer(timer: Timer | None) -> Timer | None:
    """Replace the timer (tests inject a fake one); returns the previous one. None restores the defaults."""
    global _timer
    prev, _timer = _timer, timer
    return prev


class _Progress:
    """One updating status line on a TTY (stderr), nothing otherwise."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.on = total > 1 and getattr(sys.stderr, "isatty", lambda: False)()

    def update(self, done: int, best_ms: float) -> None:
        if self.on:
            best = f", best {best_ms:.3f} ms" if math.isfinite(best_ms) else ""
            sys.stderr.write(f"\r\x1b[2Kspt autotune {self.label}: {done}/{self.total} configs{best}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------- state

_lock = threading.RLock()
_stores: dict[str, _cache.CacheStore] = {}
# (kernel, key) -> (config, entry): the launch fast path, one dict lookup. The environment (SPT_CACHE_DIR,
# SPT_AUTOTUNE) is read when a kernel meets a new key; a key already resolved keeps its config until
# invalidate() / reset() (reading os.environ on every launch costs more than the lookup itself).
_memo: dict[tuple, tuple] = {}
_used: dict[tuple[str, tuple], dict] = {}  # (kernel, key) -> what the last such launch used
_stats = {"benchmarks": 0, "tunes": 0, "lookups": 0}
_forced: dict = {}                         # kernel or (kernel, key) -> config launches must use (forced())
_recording: list | None = None             # (kernel, key) of every launch while tune_stage() discovers them


def store() -> _cache.CacheStore:
    """The cache store of the current cache path (`SPT_CACHE_DIR` is read on every call)."""
    path = str(_cache.default_path())
    st = _stores.get(path)
    if st is None:
        with _lock:
            st = _stores.setdefault(path, _cache.CacheStore(Path(path)))
    return st


def stats() -> dict:
    """Counters of this process: `benchmarks` (configs timed), `tunes` (keys tuned), `lookups` (cache misses
    of the launch fast path)."""
    return dict(_stats)


def reset() -> None:
    """Forget this process's in-memory state (stores, launch memo, records, counters). The files stay."""
    with _lock:
        _stores.clear()
        _memo.clear()
        _used.clear()
        for k in _stats:
            _stats[k] = 0


def invalidate() -> None:
    """Drop the launch memo: the next launch of every kernel consults the cache again (after an import)."""
    with _lock:
        _memo.clear()


def key_json(key: tuple) -> list:
    """The key as stored in JSON (tuples become lists); ValueError for values JSON cannot hold."""
    try:
        return json.loads(json.dumps(list(key)))
    except (TypeError, ValueError):
        raise ValueError(f"autotune key {key!r} must hold only str / int / float / bool values") from None


# ---------------------------------------------------------------------------------------------- lookup


def foreign_reason(e: dict) -> str | None:
    """Why a (well-formed) entry does not apply on this machine and kernel source, or None if it does."""
    entry = _REGISTRY.get(e["kernel"])
    if entry is None:
        return "unknown kernel"
    if e["kind"] != entry.kind:
        return "kernel kind changed"
    if e["kernel_hash"] != entry.kernel_hash():
        return "kernel source changed"
    env = environment(entry.kind)
    if (e["device"], e["capability"]) != (env["device"], env["capability"]):
        return "other device"
    if (e["torch"], e["triton"]) != (env["torch"], env["triton"]):
        return "other torch / triton version"
    if KernelConfig.from_json(e["config"]) not in entry.candidates:
        return "config is not a candidate"
    return None


def _identity(entry: KernelEntry, key: tuple) -> dict:
    return {"kernel": entry.name, "kernel_hash": entry.kernel_hash(), "kind": entry.kind,
            **environment(entry.kind), "key": key_json(key)}


def _applicable(entry: KernelEntry, key: tuple, st: _cache.CacheStore) -> dict | None:
    e = st.entries.get(_cache.entry_id(_identity(entry, key)))
    if e is None or foreign_reason(e) is not None:
        return None
    return e if _fits(entry, KernelConfig.from_json(e["config"]), key) else None


def lookup(kernel: str, key: tuple) -> dict | None:
    """The cache entry a launch of `kernel` with `key` applies here, or None ("untuned")."""
    entry = _entry(kernel)
    st = store()
    st.refresh()
    return _applicable(entry, tuple(key), st)


def used() -> list[dict]:
    """What each (kernel, key) launched in this process used: {kernel, key, config, source, entry}; source is
    "cache" (an entry found), "tuned" (timed here), or "default" (first fitting candidate; entry None)."""
    with _lock:
        return [dict(r) for r in _used.values()]


def clear_used() -> None:
    """Forget the per-process launch records (pretune reports only what its own step used)."""
    with _lock:
        _used.clear()
        _memo.clear()  # launches record on a memo miss: start both afresh


def site_kernel_keys(op: str, arguments: dict) -> list[tuple[str, tuple]] | None:
    """[(kernel, key)] a rewritten site will launch on its device, from the op's arguments as the graph
    snapshot records them (tensors as {"shape", "dtype", "device"}). None when that device's kernels declare no
    `site_key` (the Triton launchers may not yet): the caller then cannot name exact keys."""
    ensure_registered()
    devices = [v["device"] for v in arguments.values() if isinstance(v, dict) and "device" in v]
    kind = "triton" if devices and str(devices[0]).startswith("cuda") else "cpu"
    hooks = [e for e in _REGISTRY.values() if e.kind == kind and e.site_key is not None]
    if not hooks:
        return None
    pairs = [(e.name, e.site_key(op, arguments)) for e in sorted(hooks, key=lambda e: e.name)]
    return [(name, key) for name, key in pairs if key is not None]


def describe(kernel: str, key: tuple) -> str:
    """'untuned', or the entry for the key: 'BLOCK_L=32 warps=4 stages=2 (0.041 ms, NVIDIA H200)'."""
    e = lookup(kernel, key)
    if e is None:
        return "untuned"
    t = "" if e["time_ms"] is None else f"{e['time_ms']:.4g} ms, "
    return f"{describe_config(e['config'], e['kind'])} ({t}{e['device']})"


# ---------------------------------------------------------------------------------------------- get_config


def _smem_limit() -> int | None:
    import torch
    if interpreter() or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", None) or getattr(props, "shared_memory_per_block", None)


def _fits(entry: KernelEntry, cfg: KernelConfig, key: tuple) -> bool:
    return entry.fits is None or entry.fits(cfg, key)


def fitting(name: str, key: tuple) -> list[KernelConfig]:
    """The candidates of `name` that can serve `key` (shape and shared-memory pruning), in registry order."""
    entry = _entry(name)
    cfgs = [c for c in entry.candidates if _fits(entry, c, key)]
    limit = _smem_limit() if (entry.smem is not None and entry.kind == "triton") else None
    if limit:
        cfgs = [c for c in cfgs if entry.smem(c, key) <= limit]
    if not cfgs:
        raise ValueError(f"kernel {name!r}: no candidate config fits problem {key!r}")
    return cfgs


def get_config(name: str, key: tuple, bench: Callable[[KernelConfig], object] | None = None) -> KernelConfig:
    """The launch configuration for kernel `name` on problem `key` (see the module docstring)."""
    return resolve(name, key, bench)[0]


def resolve(name: str, key: tuple, bench: Callable[[KernelConfig], object] | None = None
            ) -> tuple[KernelConfig, dict | None]:
    """(config, entry or None): get_config plus the cache entry it came from (None = first fitting default)."""
    if _recording is not None:
        _recording.append((name, key))
    if _forced:
        f = _forced.get((name, key)) or _forced.get(name)
        if f is not None:
            return f, None
    memo_key = (name, key)
    hit = _memo.get(memo_key)
    if hit is not None:
        return hit
    with _lock:
        _stats["lookups"] += 1
        entry = _entry(name)
        cfgs = fitting(name, key)
        st = store()
        st.refresh()
        found, source = _applicable(entry, key, st), "cache"
        if found is None and len(cfgs) > 1 and bench is not None and _can_time(entry):
            found, source = _tune(entry, key, cfgs, bench, st), "tuned"
        cfg = KernelConfig.from_json(found["config"]) if found is not None else cfgs[0]
        result = (cfg, found)
        _used[(name, key)] = {"kernel": name, "key": key_json(key), "config": describe_config(cfg, entry.kind),
                              "source": source if found is not None else "default", "entry": found}
        _memo[memo_key] = result
        return result


def _tune(entry: KernelEntry, key: tuple, cfgs: list[KernelConfig], bench, st: _cache.CacheStore) -> dict:
    """Time every candidate, keep the fastest in the cache; raises if every candidate fails to run."""
    import torch
    timer = _timer or (cpu_timer if entry.kind == "cpu" else gpu_timer)
    times, errors = [], []
    progress = _Progress(f"{entry.name} {list(key)}", len(cfgs))
    try:
        with torch.no_grad():
            for i, cfg in enumerate(cfgs):
                try:
                    t = float(timer(functools.partial(bench, cfg), cfg))
                except Exception as e:  # e.g. out of resources on this device: that config cannot run here
                    t, _ = math.inf, errors.append(f"{describe_config(cfg, entry.kind)}: {e}")
                _stats["benchmarks"] += 1
                times.append(t if t == t else math.inf)  # a NaN from a broken timer never wins
                progress.update(i + 1, min(times))
    finally:
        progress.close()
    best = min(range(len(cfgs)), key=times.__getitem__)
    if not math.isfinite(times[best]):
        raise RuntimeError(f"autotune {entry.name} {key!r}: no candidate config ran; " + "; ".join(errors))
    e = {**_identity(entry, key), "config": cfgs[best].to_json(), "time_ms": times[best],
         "default_ms": times[0] if math.isfinite(times[0]) else None, "candidates": len(cfgs),
         "tuned_at": _cache.now()}
    st.put(e, replace=True)  # a fresh measurement replaces whatever was stored under this identity
    _stats["tunes"] += 1
    log.info("autotune %s %s: %s (%.4g ms, %d candidates)", entry.name, list(key),
             describe_config(cfgs[best], entry.kind), times[best], len(cfgs))
    return e


@contextlib.contextmanager
def forced(configs: dict):
    """Within the block, launches use the given configs: {kernel: cfg} for every key, {(kernel, key): cfg} for
    one key (nothing is cached or recorded). How a benchmark compares candidates through a whole stage."""
    with _lock:
        prev = dict(_forced)
        _forced.update(configs)
    try:
        yield
    finally:
        with _lock:
            _forced.clear()
            _forced.update(prev)


def tune_stage(run: Callable[[], object], retune: bool = False) -> list[dict]:
    """Tune every kernel that `run()` (one op stage on fixed inputs, e.g. a launcher of docs/OPS.md) launches,
    for launchers that pass no bench closure: each fitting candidate of one kernel is forced in turn and the
    whole stage is timed, the other kernels staying at their current choice. Returns the new entries.
    Kernels that already have an applicable entry are skipped unless `retune`."""
    global _recording
    with _lock:
        _recording = []
        try:
            run()
        finally:
            launched, _recording = list(dict.fromkeys(_recording)), None
        made = []
        for name, key in launched:
            entry, st = _entry(name), store()
            cfgs = fitting(name, key)
            if len(cfgs) < 2 or not _can_time(entry) or (not retune and _applicable(entry, key, st)):
                continue

            def bench(cfg, name=name, key=key):
                with forced({(name, key): cfg}):
                    run()

            made.append(_tune(entry, key, cfgs, bench, st))
        invalidate()
        return made


# ---------------------------------------------------------------------------------------------- export / import


def ensure_registered() -> None:
    """Import every kernel module and the CPU tunables, so that entries can be checked against them."""
    from spt_compile.kernels import cpu_tunables, load_all  # noqa: F401  (registers on import)
    load_all()


def entries() -> list[dict]:
    """Every entry of the current cache file (applicable here or not)."""
    st = store()
    st.refresh()
    return list(st.entries.values())


def export(path) -> int:
    """Write every entry of the cache to `path` (atomically); returns how many."""
    es = entries()
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(f"directory of {path} does not exist")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_cache.render_document(es), encoding="utf-8")
    os.replace(tmp, path)
    return len(es)


@dataclasses.dataclass
class ImportSummary:
    path: str
    added: list[dict] = dataclasses.field(default_factory=list)
    unchanged: list[dict] = dataclasses.field(default_factory=list)
    replaced: list[dict] = dataclasses.field(default_factory=list)
    conflicting: list[dict] = dataclasses.field(default_factory=list)   # kept the local entry
    foreign: list[tuple[dict, str]] = dataclasses.field(default_factory=list)
    invalid: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        reasons: dict[str, int] = {}
        for _, why in self.foreign:
            reasons[why] = reasons.get(why, 0) + 1
        foreign = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        lines = [f"imported {self.path}:",
                 f"  added        {len(self.added)}",
                 f"  unchanged    {len(self.unchanged)} (already in the cache)",
                 f"  foreign      {len(self.foreign)} skipped" + (f" ({foreign})" if foreign else ""),
                 f"  conflicting  {len(self.conflicting)}" + (" (kept the local entries; --overwrite takes the "
                                                               "imported ones)" if self.conflicting else ""),
                 f"  replaced     {len(self.replaced)}",
                 f"  malformed    {len(self.invalid)}" + (f" (first: {self.invalid[0]})" if self.invalid else "")]
        return "\n".join(lines)


def import_(path, overwrite: bool = False) -> ImportSummary:
    """Merge the entries of an exported file into the cache. Foreign entries (other device, kernel source,
    torch / triton version) are skipped; an entry whose identity is already cached with another config is a
    conflict: the local one stays unless `overwrite`. Raises ValueError / OSError for an unreadable file."""
    ensure_registered()
    good, problems = _cache.read_entries(Path(path))
    summary = ImportSummary(str(path), invalid=problems)
    st = store()
    st.refresh()
    with _lock:
        for e in good:
            why = foreign_reason(e)
            if why is not None:
                summary.foreign.append((e, why))
                continue
            old = st.entries.get(_cache.entry_id(e))
            if old is None:
                summary.added.append(e)
            elif old["config"] == e["config"]:
                summary.unchanged.append(e)
                continue
            elif overwrite:
                summary.replaced.append(e)
            else:
                summary.conflicting.append(e)
                continue
            st.entries[_cache.entry_id(e)] = e
        if summary.added or summary.replaced:
            st.save(replace_ids={_cache.entry_id(e) for e in summary.replaced})
        invalidate()
    return summary


def clear() -> int:
    """Delete every entry of the current cache file; returns how many."""
    n = store().remove_all()
    invalidate()
    return n


def rows() -> list[dict]:
    """One row per cached entry for `show`: device, kernel, key, config, time, and whether it applies here."""
    ensure_registered()
    out = []
    for e in sorted(entries(), key=lambda e: (e["device"], e["kernel"], json.dumps(e["key"]))):
        why = foreign_reason(e)
        out.append({"device": f"{e['device']} ({e['capability']})", "kernel": e["kernel"],
                    "key": json.dumps(e["key"]), "config": describe_config(e["config"], e["kind"]),
                    "time_ms": e["time_ms"], "default_ms": e.get("default_ms"),
                    "status": "applies" if why is None else f"ignored: {why}"})
    return out
