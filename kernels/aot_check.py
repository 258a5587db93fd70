"""Ahead-of-time resource check: compile every registered kernel x candidate config x dtype for real GPU
targets (no GPU needed) and read what the hardware would have to provide.

For one job (kernel, candidate config, dtype, target) we compile the spec registered in `aot.py` with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`, then read from the cubin:
  - registers, stack frame, local memory, static shared memory: `cuobjdump --dump-resource-usage`;
  - spill stores / loads in bytes: the STL / LDL instructions in the SASS (`cuobjdump -sass`). Spills are
    exactly the local-memory traffic ptxas inserts; counting them in the cubin works even when Triton serves
    the cubin from its cache (ptxas, and its `-v` log, then never runs);
  - dynamic shared memory: `.metadata.shared` (what the launcher requests at launch).
A job passes when it compiles, spills nothing, uses no stack/local memory and fits the target's shared memory.

Compilation must run with TRITON_INTERPRET unset: under the interpreter `@triton.jit` returns an
`InterpretedFunction`, which `triton.compile` cannot take. The kernel tests set TRITON_INTERPRET=1 before
`import triton`, so in a shared pytest process the kernels are already interpreted: `run_isolated` therefore
compiles in a fresh process (with a process pool inside it) whose environment has TRITON_INTERPRET removed.

CLI (what `run_isolated` launches): python -m spt_compile.kernels.aot_check --jobs IN.json --out OUT.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from spt_compile.kernels import aot, autotune, load_all

# target name -> CUDA compute capability
TARGETS = {"sm_80": 80, "sm_90": 90}
# Largest shared memory one block may use (static + dynamic, opt-in): A100 163 KB, H100 227 KB.
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
DTYPES = ("bf16", "fp16", "fp32")
# Triton int types the JIT may specialize as divisible by 16 (pointers are specialized too).
_INT_TYPES = {"i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64"}


@dataclasses.dataclass(frozen=True)
class AotJob:
    kernel: str        # name in the autotune / aot registries
    config_index: int  # index into autotune.candidates(kernel)
    config: str        # repr of that KernelConfig: the worker checks it sees the same registry
    dtype: str         # "bf16" | "fp16" | "fp32"
    target: str        # "sm_80" | "sm_90"

    @property
    def id(self) -> str:
        return f"{self.kernel}-c{self.config_index}-{self.dtype}-{self.target}"


@dataclasses.dataclass
class AotResult:
    job: AotJob
    ok: bool = False           # compiled and cuobjdump read the cubin
    error: str = ""
    regs: int = -1
    stack: int = -1            # bytes of stack frame per thread (spills land here)
    local: int = -1            # bytes of local memory per thread
    spill_store_bytes: int = -1
    spill_load_bytes: int = -1
    shared_dynamic: int = -1   # .metadata.shared: requested at launch
    shared_static: int = -1    # SHARED from cuobjdump (e.g. the 1 KB sm_90 cubins reserve)
    compile_s: float = 0.0

    @property
    def smem(self) -> int:
        return self.shared_dynamic + self.shared_static

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    def problems(self) -> list[str]:
        """Why this job fails the check (empty when it passes)."""
        if not self.ok:
            return [f"compile failed: {self.error}"]
        out = []
        if self.spill_store_bytes or self.spill_load_bytes:
            out.append(f"register spills: {self.spill_store_bytes} B stored, {self.spill_load_bytes} B loaded "
                       f"({self.regs} registers)")
        if self.stack or self.local:
            out.append(f"uses local memory: stack {self.stack} B, local {self.local} B per thread")
        limit = SMEM_LIMIT[self.job.target]
        if self.smem > limit:
            out.append(f"shared memory {self.smem} B > {limit} B usable on {self.job.target}")
        return out

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @staticmethod
    def from_json(d: dict) -> "AotResult":
        d = dict(d)
        d["job"] = AotJob(**d["job"])
        return AotResult(**d)


# ----------------------------------------------------------------------------------------------------------
# The registries: what must be checked.

def registry_problems() -> list[str]:
    """Kernels that cannot be checked: registered configs without an AOT spec, specs without configs or
    dtypes. Call after `load_all()`."""
    specs = {s.name: s for s in aot.aot_specs()}
    kernels = set(autotune.registered_kernels())
    out = [f"kernel {k!r} registers candidate configs but no AOT spec (register_aot)" for k in sorted(kernels - set(specs))]
    out += [f"AOT spec {k!r} has no candidate configs (register_candidates)" for k in sorted(set(specs) - kernels)]
    for name, s in specs.items():
        bad = [d for d in s.dtypes if d not in DTYPES]
        if not s.dtypes or bad:
            out.append(f"AOT spec {name!r}: dtypes {s.dtypes!r} must be a non-empty subset of {DTYPES}")
    return out


def enumerate_jobs(dtypes: tuple[str, ...] | None = None, targets: tuple[str, ...] = tuple(TARGETS),
                   kernels: list[str] | None = None) -> list[AotJob]:
    """Every (spec, candidate config, dtype, target) registered (after `load_all()`), restricted to `dtypes`
    when given. Specs without candidates are skipped here: `registry_problems` reports them."""
    jobs = []
    known = set(autotune.registered_kernels())
    for spec in aot.aot_specs():
        if spec.name not in known or (kernels is not None and spec.name not in kernels):
            continue
        for i, cfg in enumerate(autotune.candidates(spec.name)):
            for dt in spec.dtypes:
                if dtypes is not None and dt not in dtypes:
                    continue
                for tg in targets:
                    jobs.append(AotJob(spec.name, i, repr(cfg), dt, tg))
    return jobs


# ----------------------------------------------------------------------------------------------------------
# Compiling one job and reading the cubin (runs in the worker processes).

def _jit_function(fn):
    """The JITFunction under `fn` (unwrapping @triton.autotune / @triton.heuristics)."""
    from triton import knobs
    from triton.runtime.jit import JITFunction
    if knobs.runtime.interpret or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("TRITON_INTERPRET is set: @triton.jit gave interpreted functions, which cannot be "
                           "compiled for a GPU; run the check in a process without it (run_isolated)")
    for _ in range(8):
        if isinstance(fn, JITFunction) or not hasattr(fn, "fn"):
            break
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"AOT spec fn must be a @triton.jit function, got {type(fn).__name__}")
    return fn


def compile_job(job: AotJob, specialize: bool = True):
    """triton.compile the job for its target. `specialize` marks every pointer and integer argument as
    16-divisible, as the JIT does for aligned tensors and 16-multiple sizes (the common launch, and the
    one that pipelines loads through shared memory: the largest smem footprint)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = {s.name: s for s in aot.aot_specs()}.get(job.kernel)
    if spec is None:
        raise KeyError(f"no AOT spec registered for kernel {job.kernel!r}")
    cfg = autotune.candidates(job.kernel)[job.config_index]
    if repr(cfg) != job.config:
        raise RuntimeError(f"candidate {job.config_index} of {job.kernel!r} is {cfg!r} here but {job.config} "
                           "where the job was made: the registry differs between processes")
    fn = _jit_function(spec.fn)
    signature = dict(spec.signature(job.dtype))
    constexprs = dict(spec.constexprs_for(cfg, job.dtype))
    for k in constexprs:
        signature.setdefault(k, "constexpr")
    unknown = [k for k in signature if k not in fn.arg_names]
    if unknown:
        raise ValueError(f"signature names {unknown} are not arguments of {fn.__name__}")
    missing = [k for k, t in signature.items() if t == "constexpr" and k not in constexprs]
    if missing:
        raise ValueError(f"constexprs_for gives no value for constexpr args {missing}")
    attrs = {}
    if specialize:
        for k, t in signature.items():
            if t.startswith("*") or t in _INT_TYPES:
                attrs[(fn.arg_names.index(k),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", TARGETS[job.target], 32)
    return triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _nvidia_tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path} (it ships inside the triton wheel)")
    return path


def resource_usage(cubin: bytes) -> dict:
    """{"REG", "STACK", "SHARED", "LOCAL", ...} of the single kernel in `cubin`, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    funcs = re.findall(r"Function\s+(\S+):\s*\n\s*(.*)", out)
    if len(funcs) != 1:
        raise RuntimeError(f"expected one kernel in the cubin, cuobjdump says:\n{out}")
    return {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", funcs[0][1])}


_SIZE = {"8": 1, "U8": 1, "S8": 1, "16": 2, "U16": 2, "S16": 2, "64": 8, "128": 16}


def spill_bytes(cubin: bytes) -> tuple[int, int]:
    """(bytes stored, bytes loaded) per thread by the STL / LDL (local memory) instructions in the SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    totals = {"STL": 0, "LDL": 0}
    for op, mods in re.findall(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)\b", sass):
        width = 4  # 32-bit unless a size modifier says otherwise
        for m in mods.split(".")[1:]:
            width = _SIZE.get(m, width)
        totals[op] += width
    return totals["STL"], totals["LDL"]


def check_job(job: AotJob, specialize: bool = True) -> AotResult:
    """Compile one job and measure it; any failure is reported in the result, never raised."""
    res = AotResult(job)
    t0 = time.perf_counter()
    try:
        k = compile_job(job, specialize)
        cubin = k.asm["cubin"]
        usage = resource_usage(cubin)
        res.spill_store_bytes, res.spill_load_bytes = spill_bytes(cubin)
        res.regs, res.stack, res.local = usage["REG"], usage["STACK"], usage["LOCAL"]
        res.shared_static, res.shared_dynamic = usage["SHARED"], int(k.metadata.shared)
        res.ok = True
    except Exception as e:  # noqa: BLE001 -- every failure becomes a reported result
        msg = f"{type(e).__name__}: {e}"
        res.error = msg if len(msg) < 4000 else msg[:2000] + "\n...\n" + msg[-2000:]
    res.compile_s = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------------------------------------
# Running jobs in a clean process.

def _run_setup(setup: list[str]) -> None:
    """Import every kernel module, then run each "path/to/file.py:function" hook (e.g. a test registering
    example kernels in this process only)."""
    load_all()
    for i, item in enumerate(setup):
        path, func = item.rsplit(":", 1)
        spec = importlib.util.spec_from_file_location(f"_spt_aot_setup_{i}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        getattr(mod, func)()


def _worker_check(job_dict: dict, specialize: bool) -> dict:
    return check_job(AotJob(**job_dict), specialize).to_json()


def _coordinator(jobs: list[AotJob], out_path: str, setup: list[str], workers: int, specialize: bool) -> None:
    """Check `jobs` with a pool of `workers` processes, appending each result to `out_path` as it lands."""
    import concurrent.futures as cf
    import multiprocessing as mp

    # Under `python -m` this module is __main__: hand the pool the importable module's function.
    from spt_compile.kernels import aot_check as this

    _run_setup(setup)  # import errors surface here, once, with a clear traceback
    with open(out_path, "a") as out:
        def emit(d):
            out.write(json.dumps(d) + "\n")
            out.flush()
        if workers <= 1:
            for j in jobs:
                emit(check_job(j, specialize).to_json())
            return
        # fork: workers inherit the imported kernels (re-importing torch + triton per worker costs seconds).
        # Safe here: nothing has been compiled in this process yet, so no MLIR / LLVM state is shared.
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            futs = {pool.submit(this._worker_check, dataclasses.asdict(j), specialize): j for j in jobs}
            for f in cf.as_completed(futs):
                try:
                    emit(f.result())
                except Exception as e:  # noqa: BLE001 -- a crashed worker (e.g. a segfault in the compiler)
                    emit(AotResult(futs[f], error=f"worker crashed: {type(e).__name__}: {e}").to_json())


def clean_env() -> dict:
    """This process's environment without TRITON_INTERPRET (and without a GPU: the check never needs one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default Triton 3.9 uses anyway; silences its warning
    return env


def run_isolated(jobs: list[AotJob], setup: list[str] = (), workers: int | None = None,
                 specialize: bool = True, timeout: float = 1800) -> dict[AotJob, AotResult]:
    """Check `jobs` in a fresh process without TRITON_INTERPRET; returns a result for every job (jobs the
    process never finished get an error result carrying its stderr)."""
    jobs = list(dict.fromkeys(jobs))
    if not jobs:
        return {}
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        jobs_path, out_path = os.path.join(tmp, "jobs.json"), os.path.join(tmp, "out.jsonl")
        with open(jobs_path, "w") as f:
            json.dump([dataclasses.asdict(j) for j in jobs], f)
        cmd = [sys.executable, "-m", "spt_compile.kernels.aot_check", "--jobs", jobs_path, "--out", out_path,
               "--workers", str(workers)] + [a for s in setup for a in ("--setup", s)]
        if not specialize:
            cmd.append("--no-specialize")
        # Own session, so a timeout can end the pool workers too, not just the coordinator.
        with open(os.path.join(tmp, "stderr.txt"), "w+") as err:
            proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                why = f"checker process exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                why = f"checker process timed out after {timeout} s"
            finally:  # also on KeyboardInterrupt: leave no compiler running
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            err.seek(0)
            why += ":\n" + err.read()[-3000:]
        results = {}
        if os.path.exists(out_path):
            with open(out_path) as f:
                for line in f:
                    r = AotResult.from_json(json.loads(line))
                    results[r.job] = r
    for j in jobs:
        results.setdefault(j, AotResult(j, error=f"no result: {why}"))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", required=True, help="JSON list of AotJob dicts")
    p.add_argument("--out", required=True, help="JSON-lines file the results are appended to")
    p.add_argument("--setup", action="append", default=[], help="path/to/file.py:function to run first")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-specialize", action="store_true", help="compile without 16-divisibility hints")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces @triton.jit functions)", file=sys.stderr)
        return 2
    with open(a.jobs) as f:
        jobs = [AotJob(**d) for d in json.load(f)]
    _coordinator(jobs, a.out, a.setup, a.workers, not a.no_specialize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
