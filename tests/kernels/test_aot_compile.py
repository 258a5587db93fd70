"""Every Triton kernel x every candidate config compiles ahead of time for sm_80 (A100) and sm_90 (H100),
without register spills or local memory, and within the target's shared memory. No GPU needed.

A launcher may pick any registered candidate (autotune.get_config), so every candidate must be runnable.
The compile runs in a separate process without TRITON_INTERPRET (see kernels/aot_check.py: under the
interpreter `@triton.jit` yields functions `triton.compile` cannot take), one session-wide batch, with a
process pool inside it; Triton's on-disk cache makes re-runs cheap.

The checker itself is tested on example kernels defined here and registered only inside the checker process
(`register_examples`), so they never leak into the registry the rest of the suite sees: a clean vector add,
a kernel that must spill, one that must overflow shared memory and one the GPU compiler rejects.

Dtypes: every spec's candidates are compiled in its training dtype (bf16, or its first dtype when it has no
bf16) for both targets, plus fp32 on sm_90: 119 compiles, ~180 CPU-seconds from a cold Triton cache (~1.5 s
each; spilling configs take 10-90 s), i.e. ~1.5 minutes on 2 idle cores. The full matrix (206 compiles) is
~60% more. fp16 adds nothing: in the full report it matched bf16 in smem and spills for all 68 (config,
target) pairs and in registers for 67 (the other: 38 vs 40). fp32 tiles are the largest (4-byte operands in
smem and registers) and overflow first, so fp32 is kept on one target. SPT_AOT_ALL_DTYPES=1 checks every
declared dtype on both targets; `python bench/aot_report.py` writes the full matrix to
bench/results/aot-cpu.md.
"""
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

from spt_compile.kernels import KERNEL_MODULES, aot, autotune, load_all
from spt_compile.kernels.aot_check import (SMEM_LIMIT, TARGETS, AotJob, clean_env, enumerate_jobs,
                                           registry_problems, run_isolated)
from spt_compile.kernels.autotune import KernelConfig

LOADED_MODULES = load_all()


def _selected_jobs() -> list[AotJob]:
    """The (spec, candidate, dtype, target) jobs this run checks: see the module docstring."""
    jobs = enumerate_jobs()
    if os.environ.get("SPT_AOT_ALL_DTYPES") == "1":
        return jobs
    primary = {s.name: ("bf16" if "bf16" in s.dtypes else s.dtypes[0]) for s in aot.aot_specs()}
    return [j for j in jobs if j.dtype == primary[j.kernel] or (j.dtype == "fp32" and j.target == "sm_90")]


REAL_JOBS = _selected_jobs()


def _module_of(fn) -> str:
    """The Python module a (possibly wrapped / interpreted) Triton kernel was defined in."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn.__module__


def _owner(kernel: str) -> str:
    spec = {s.name: s for s in aot.aot_specs()}[kernel]
    return _module_of(spec.fn)


# --------------------------------------------------------------------------------------------------------
# The real kernels.

@pytest.fixture(scope="module")
def real_results():
    return run_isolated(REAL_JOBS)


@pytest.mark.slow
@pytest.mark.parametrize("job", REAL_JOBS, ids=lambda j: j.id)
def test_candidate_compiles_without_spills_within_smem(job, real_results):
    r = real_results[job]
    problems = r.problems()
    assert not problems, (f"{job.kernel} ({_owner(job.kernel)}) config {job.config} {job.dtype} on "
                          f"{job.target}: " + "; ".join(problems))


def test_load_all_found_specs():
    # Without this the parametrized test above could pass by checking nothing.
    assert LOADED_MODULES, f"load_all() imported none of {KERNEL_MODULES}"
    assert aot.aot_specs(), "load_all() registered no AOT spec"
    assert REAL_JOBS, "no (spec, candidate, dtype, target) to check"


def test_every_kernel_can_be_checked():
    problems = registry_problems()
    assert not problems, "\n".join(problems)


def test_every_kernel_module_registers_a_spec():
    owners = {_module_of(s.fn) for s in aot.aot_specs()}
    silent = [m.__name__ for m in LOADED_MODULES if m.__name__ not in owners]
    assert not silent, f"kernel modules registering no AOT spec (their kernels go unchecked): {silent}"


def test_kernel_modules_import_without_interpreter_or_gpu():
    # What a CUDA user's process does: import every kernel module with TRITON_INTERPRET unset. On this
    # CPU-only machine that also proves import touches no GPU driver.
    code = ("from spt_compile.kernels import load_all, aot\n"
            "from triton.runtime.jit import JITFunction\n"
            "mods = load_all()\n"
            "print(sorted(m.__name__ for m in mods))\n"
            "f = lambda fn: fn if isinstance(fn, JITFunction) or not hasattr(fn, 'fn') else f(fn.fn)\n"
            "print(sorted(s.name for s in aot.aot_specs() if not isinstance(f(s.fn), JITFunction)))\n")
    p = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    mods, not_jit = p.stdout.strip().splitlines()[-2:]
    assert mods == str(sorted(m.__name__ for m in LOADED_MODULES))
    assert not_jit == "[]", f"AOT specs whose fn is not a @triton.jit function: {not_jit}"


# --------------------------------------------------------------------------------------------------------
# The checker, on example kernels whose outcome is known.

@triton.jit
def _example_add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)


@triton.jit
def _example_spill(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # BLOCK fp32 values live across the loop on one warp: BLOCK / 32 registers per thread, > 255 at 8192.
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n):
        acc = acc * 1.5 + tl.load(x_ptr + i * BLOCK + offs)
    tl.store(out_ptr + offs, acc)


@triton.jit
def _example_matmul(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # A single-tile matmul whose K loop Triton pipelines through shared memory: num_stages - 1 buffers of
    # (BM + BN) * BK elements each.
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = a_ptr + rm[:, None] * K + rk[None, :]
    b = b_ptr + rk[:, None] * BN + rn[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BK)):
        acc += tl.dot(tl.load(a), tl.load(b))
        a += BK
        b += BK * BN
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


_EX_ADD = [KernelConfig.make(num_warps=4, BLOCK=1024), KernelConfig.make(num_warps=2, BLOCK=256)]
_EX_SPILL = [KernelConfig.make(num_warps=1, num_stages=1, BLOCK=8192)]
# 64x64x128 bf16 tiles, 8 stages: 7 buffers x 32 KB = 224 KB dynamic (+1 KB static on sm_90) > 163 KB on
# A100 and > 227 KB on H100; 4 warps hold the 64x64 fp32 accumulator in 32 registers per thread: no spills.
_EX_SMEM = [KernelConfig.make(num_warps=4, num_stages=8, BM=64, BN=64, BK=128)]
# tl.dot needs every dim >= 16 on the GPU (the interpreter accepts 8): this config must fail to compile.
_EX_BAD = [KernelConfig.make(num_warps=4, num_stages=2, BM=8, BN=8, BK=8)]


def _ptr_sig(names, dtype):
    return {n: f"*{dtype}" for n in names}


EXAMPLES = {
    "_aot_example_add": (_example_add, _EX_ADD, ("bf16", "fp16", "fp32"),
                         lambda dt: {**_ptr_sig(["x_ptr", "y_ptr", "out_ptr"], dt), "n": "i32",
                                     "BLOCK": "constexpr"}),
    "_aot_example_spill": (_example_spill, _EX_SPILL, ("fp32",),
                           lambda dt: {**_ptr_sig(["x_ptr", "out_ptr"], dt), "n": "i32", "BLOCK": "constexpr"}),
    "_aot_example_smem": (_example_matmul, _EX_SMEM, ("bf16",),
                          lambda dt: {**_ptr_sig(["a_ptr", "b_ptr"], dt), "c_ptr": "*fp32", "K": "i32",
                                      "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}),
    "_aot_example_bad": (_example_matmul, _EX_BAD, ("bf16",),
                         lambda dt: {**_ptr_sig(["a_ptr", "b_ptr"], dt), "c_ptr": "*fp32", "K": "i32",
                                     "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}),
}


def register_examples():
    """Run inside the checker process only (run_isolated's setup hook)."""
    for name, (fn, cfgs, dtypes, sig) in EXAMPLES.items():
        autotune.register_candidates(name, cfgs)
        aot.register_aot(aot.AotSpec(name=name, fn=fn, signature=sig,
                                     constexprs_for=lambda cfg, dt: dict(cfg.meta), dtypes=dtypes))


def _example_jobs(name, targets=tuple(TARGETS)):
    _, cfgs, dtypes, _ = EXAMPLES[name]
    return [AotJob(name, i, repr(c), dt, tg) for i, c in enumerate(cfgs) for dt in dtypes for tg in targets]


@pytest.fixture(scope="module")
def example_results():
    jobs = [j for name in EXAMPLES for j in _example_jobs(name)]
    return run_isolated(jobs, setup=[f"{os.path.abspath(__file__)}:register_examples"])


def test_checker_passes_a_clean_kernel(example_results):
    for job in _example_jobs("_aot_example_add"):
        r = example_results[job]
        assert r.ok, r.error
        assert r.problems() == [], (job, r.problems())
        assert 0 < r.regs <= 255 and r.spill_bytes == 0 and r.stack == 0 and r.local == 0
        assert r.smem <= SMEM_LIMIT[job.target]


def test_checker_detects_spills(example_results):
    for job in _example_jobs("_aot_example_spill"):
        r = example_results[job]
        assert r.ok, r.error
        assert r.spill_store_bytes > 0 and r.spill_load_bytes > 0 and r.stack > 0, r
        assert any("spill" in p for p in r.problems()), r.problems()


def test_checker_detects_shared_memory_overflow(example_results):
    for job in _example_jobs("_aot_example_smem"):
        r = example_results[job]
        assert r.ok, r.error
        assert r.smem > SMEM_LIMIT[job.target], r
        # no spills: it is the shared-memory check, and only it, that rejects this kernel
        assert [p for p in r.problems() if "shared memory" not in p] == [], r.problems()
        assert len(r.problems()) == 1


def test_checker_reports_compile_failure(example_results):
    for job in _example_jobs("_aot_example_bad"):
        r = example_results[job]
        assert not r.ok and r.error
        assert r.problems()[0].startswith("compile failed"), r.problems()


def test_checker_refuses_interpreted_kernels():
    # TRITON_INTERPRET replaces @triton.jit functions by interpreted ones: the checker must say so rather
    # than fail obscurely, and its CLI must refuse to run under it.
    code = ("from spt_compile.kernels.aot_check import check_job, AotJob\n"
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('ex', {os.path.abspath(__file__)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.register_examples()\n"
            f"r = check_job(AotJob('_aot_example_add', 0, {repr(_EX_ADD[0])!r}, 'bf16', 'sm_90'))\n"
            "print(r.ok, r.error)\n"
            "from spt_compile.kernels.aot_check import main\n"
            "print('cli exit', main(['--jobs', 'x', '--out', 'y']))\n")
    env = {**clean_env(), "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    result, cli = p.stdout.strip().splitlines()[-2:]
    assert result.startswith("False") and "TRITON_INTERPRET" in result, result
    assert cli == "cli exit 2" and "unset TRITON_INTERPRET" in p.stderr
