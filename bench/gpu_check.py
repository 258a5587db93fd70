"""The one GPU check: install, versions, every `-m gpu` test, and the benchmarks at a small fixed size, in <= 5 minutes.

    bash bench/gpu_check.sh [--out DIR]          # on the lent GPU machine (DIR defaults to $OUT)
    python3 bench/gpu_check.py --dry-run         # print the plan (steps, commands, timeouts) and exit

Steps run one after another but independently: each in its own process with its own timeout (clamped so the
whole run stays within --budget-s), and a failing step never stops the next. Output, because only a few files
come back from the device: DIR/gpu_check_summary.md (one table: step, status, seconds, detail; the log tail of
every failed step) and DIR/gpu_check_logs.tar.gz (every step's full log, the pytest junit XML, the bench result
tables written during the run, and the summary). Exit status 0 only if every step passed.

Steps:
  install   python3 -m pip install --no-deps --no-build-isolation -e .   (the image has no package registry);
            if pip cannot build the editable wheel (setuptools < 70.1 without `wheel`), a source shim (a package
            tree of symlinks + dist-info with the backend's entry point) on PYTHONPATH serves the later steps
  versions  GPU name and capability, driver, Python, torch (+CUDA), triton, transformers; fails without CUDA
  pytest    python3 -m pytest -m gpu tests (TRITON_INTERPRET=0: the kernels compile for the GPU); fails if any
            test fails or if every selected test skipped (that means no GPU was seen)
  attention python3 bench/attention.py --quick   (first the query-tile section: bf16, causal, T=64, density 0.25,
            N 4096 and 16384 vs SDPA flash, fwd+bwd, TFLOP/s on kept pairs; then the per-query tables)
  ffn       python3 bench/ffn.py --quick
  finetune  python3 bench/finetune.py --quick (when bench/finetune.py exists)
The benches run with SPT_AUTOTUNE=0 (first-fit configs) unless --autotune.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = "gpu_check_summary.md"
TARBALL = "gpu_check_logs.tar.gz"
PY = sys.executable or "python3"

VERSIONS = r"""
import platform, subprocess, sys
print("python", platform.python_version(), sys.executable)
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip() or "nvidia-smi: no output")
except Exception as e:  # noqa: BLE001
    print("nvidia-smi:", e)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
import triton
print("triton", triton.__version__)
try:
    import transformers
    print("transformers", transformers.__version__)
except ImportError:
    print("transformers: not installed")
import spt_compile, spt_compile.lowering, spt_compile.kernels
print("spt_compile", spt_compile.__version__, spt_compile.__file__)
from torch._dynamo import lookup_backend
lookup_backend("spt")  # the torch_dynamo_backends entry point is installed
if not torch.cuda.is_available():
    sys.exit("no CUDA device: torch.cuda.is_available() is False")
print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
"""


@dataclasses.dataclass
class Step:
    name: str
    argv: list[str]
    timeout: float                      # seconds, before the budget clamp
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    skip_reason: str = ""               # non-empty: not run, reported as skipped (does not fail the check)
    judge: object = None                # judge(step, rc, log_text, work) -> (ok, detail); default: rc == 0


@dataclasses.dataclass
class Result:
    name: str
    status: str                         # pass | FAIL | TIMEOUT | skipped | not run
    seconds: float
    detail: str
    log: Path | None = None


# ----------------------------------------------------------------------------------------------------------
# the steps

def judge_pytest(step: Step, rc: int, log: str, work: Path) -> tuple[bool, str]:
    """Pass iff pytest exited 0 and ran at least one gpu test (all skipped = no GPU seen)."""
    xml = work / "pytest-gpu.xml"
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    ran = counts["tests"] - counts["skipped"]
    detail = (f"{ran - counts['failures'] - counts['errors']} passed, {counts['failures']} failed, "
              f"{counts['errors']} errors, {counts['skipped']} skipped")
    if rc == 5 or counts["tests"] == 0:
        return False, "no gpu test collected (pytest exit 5)"
    if rc == 0 and ran == 0:
        return False, detail + ": every gpu test skipped (no CUDA device seen?)"
    return rc == 0, detail


def judge_versions(step: Step, rc: int, log: str, work: Path) -> tuple[bool, str]:
    gpu = re.search(r"^gpu (.+)$", log, re.M)
    lines = [ln for ln in log.splitlines() if ln.startswith(("torch ", "triton "))]
    detail = "; ".join(lines + ([gpu.group(1)] if gpu else []))
    if rc != 0:
        last = (log.strip().splitlines() or ["(no output)"])[-1]
        return False, f"{detail}; {last}".strip("; ")
    return True, detail


def plan(tests: str = "tests", install: bool = True, autotune: bool = False) -> list[Step]:
    """The steps of the GPU check, in order. The benches run the first-fit configs unless `autotune` (timing
    every candidate of every kernel compiles each of them: minutes the 5-minute budget does not have)."""
    bench_env = {"TRITON_INTERPRET": "0", "SPT_AUTOTUNE": "1" if autotune else "0"}
    steps = []
    if install:
        steps.append(Step("install", [PY, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."],
                          90))
    steps.append(Step("versions", [PY, "-c", VERSIONS], 60, judge=judge_versions))
    # a module that fails to import on this torch/triton must not stop the others: continue on collection errors
    steps.append(Step("pytest", [PY, "-m", "pytest", "-m", "gpu", tests, "-q", "-rs", "-p", "no:cacheprovider",
                                 "--continue-on-collection-errors", "--junitxml", "{work}/pytest-gpu.xml"], 180,
                      env={"TRITON_INTERPRET": "0"}, judge=judge_pytest))
    # 100 s: the query-tile section compiles the tile kernels (PQ, selection, forward, backward) before it times
    steps.append(Step("attention", [PY, "bench/attention.py", "--quick"], 100, env=bench_env))
    steps.append(Step("ffn", [PY, "bench/ffn.py", "--quick"], 60, env=bench_env))
    finetune = REPO / "bench" / "finetune.py"
    steps.append(Step("finetune", [PY, "bench/finetune.py", "--quick", "--budget", "50", "--out", "{work}/results"],
                      60, env=bench_env,
                      skip_reason="" if finetune.exists() else "bench/finetune.py does not exist"))
    return steps


# ----------------------------------------------------------------------------------------------------------
# the fallback when pip cannot build the editable install

def make_shim(dest: Path, repo: Path = REPO) -> Path:
    """A source tree importable as the installed package, without building anything: dest/spt_compile holds
    symlinks to spt_compile/*, plus lowering/ and kernels/ (the package-dir mapping of pyproject.toml), and a
    dist-info carries the torch_dynamo_backends entry point (backend="spt"). Put dest on PYTHONPATH."""
    pkg = dest / "spt_compile"
    if dest.exists():
        shutil.rmtree(dest)
    pkg.mkdir(parents=True)
    for entry in (repo / "spt_compile").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for sub in ("lowering", "kernels"):
        (pkg / sub).symlink_to(repo / sub)
    info = dest / "spt_compile-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spt-compile\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[torch_dynamo_backends]\nspt = spt_compile.backend:spt_backend\n\n"
        "[console_scripts]\nspt-compile = spt_compile.__main__:main\n")
    (info / "top_level.txt").write_text("spt_compile\n")
    return dest


# ----------------------------------------------------------------------------------------------------------
# running

def run_step(step: Step, timeout: float, work: Path, env: dict) -> Result:
    if step.skip_reason:
        return Result(step.name, "skipped", 0.0, step.skip_reason)
    if timeout < 1:
        return Result(step.name, "not run", 0.0, "the time budget was spent")
    log_path = work / "logs" / f"{step.name}.log"
    argv = [a.replace("{work}", str(work)) for a in step.argv]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(argv)}\n(timeout {timeout:.0f} s)\n\n")
        log.flush()
        # own session: a timeout ends the step's children too (pytest workers, compilers)
        proc = subprocess.Popen(argv, cwd=REPO, env={**env, **step.env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    secs = time.monotonic() - t0
    text = log_path.read_text(errors="replace")
    if rc is None:
        return Result(step.name, "TIMEOUT", secs, f"killed after {timeout:.0f} s", log_path)
    ok, detail = (step.judge or (lambda s, r, t, w: (r == 0, f"exit {r}")))(step, rc, text, work)
    return Result(step.name, "pass" if ok else "FAIL", secs, detail, log_path)


def install_fallback(result: Result, work: Path, env: dict) -> Result:
    """pip failed: put a source shim on PYTHONPATH for the later steps (reported in the detail)."""
    shim = make_shim(work / "shim")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH", "")]))
    return dataclasses.replace(result, status="pass",
                               detail=f"pip failed ({result.detail}); using the source shim {shim} on PYTHONPATH")


def run_all(steps: list[Step], work: Path, budget_s: float) -> list[Result]:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    deadline = time.monotonic() + budget_s
    results = []
    for step in steps:
        left = deadline - time.monotonic()
        res = run_step(step, min(step.timeout, left), work, env)
        if step.name == "install" and res.status in ("FAIL", "TIMEOUT"):
            res = install_fallback(res, work, env)
        print(f"[gpu_check] {res.name:10s} {res.status:8s} {res.seconds:6.1f} s  {res.detail}", flush=True)
        results.append(res)
    return results


# ----------------------------------------------------------------------------------------------------------
# reporting

def summary_text(results: list[Result], started: str, total_s: float) -> str:
    ok = all(r.status in ("pass", "skipped") for r in results)
    lines = [f"# GPU check: {'PASS' if ok else 'FAIL'}", "",
             f"- started {started}, {total_s:.0f} s in all; host {os.uname().nodename}", "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |")
    for r in results:
        if r.status in ("FAIL", "TIMEOUT") and r.log is not None:
            tail = r.log.read_text(errors="replace").splitlines()[-40:]
            lines += ["", f"## {r.name}: last {len(tail)} log lines", "", "```", *tail, "```"]
    return "\n".join(lines) + "\n"


def collect_results(since: float, out_results: Path) -> list[Path]:
    """Bench result tables written during the run (bench/results/*.md|png newer than `since`, and --out ones)."""
    found = [p for p in (REPO / "bench" / "results").glob("*") if p.is_file() and p.stat().st_mtime >= since]
    return sorted(set(found) | {p for p in out_results.glob("*") if p.is_file()})


def write_outputs(out: Path, work: Path, summary: str, extra: list[Path]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (work / SUMMARY).write_text(summary)
    summary_path = out / SUMMARY
    summary_path.write_text(summary)
    tar_path = out / TARBALL
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(work / SUMMARY, arcname=f"gpu_check/{SUMMARY}")
        for p in sorted((work / "logs").glob("*")):
            tar.add(p, arcname=f"gpu_check/logs/{p.name}")
        for p in sorted(work.glob("*.xml")):
            tar.add(p, arcname=f"gpu_check/{p.name}")
        for p in extra:
            tar.add(p, arcname=f"gpu_check/results/{p.name}")
    return summary_path, tar_path


def check(steps: list[Step], out: Path, budget_s: float) -> int:
    """Run the steps, write the summary and the tarball into `out`; 0 iff every step passed or was skipped."""
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    t0, wall0 = time.monotonic(), time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        out_results = work / "results"  # "{work}/results" in a step's argv
        out_results.mkdir(parents=True)
        results = run_all(steps, work, budget_s)
        summary = summary_text(results, started, time.monotonic() - t0)
        paths = write_outputs(out, work, summary, collect_results(wall0, out_results))
    print(summary)
    print("[gpu_check] wrote", *paths)
    return 0 if all(r.status in ("pass", "skipped") for r in results) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(tempfile.gettempdir(), "gpu_check_out"),
                    help="folder for the summary and the tarball (default: $OUT, else $TMPDIR/gpu_check_out)")
    ap.add_argument("--budget-s", type=float, default=295.0, help="the whole run's time limit (default 295 s)")
    ap.add_argument("--tests", default="tests", help="what `pytest -m gpu` collects (default: tests)")
    ap.add_argument("--only", help="comma-separated step names to run (default: all)")
    ap.add_argument("--no-install", action="store_true", help="skip the pip install step (already installed)")
    ap.add_argument("--autotune", action="store_true", help="let the benches tune kernel configs (slower)")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    args = ap.parse_args(argv)
    steps = plan(args.tests, install=not args.no_install, autotune=args.autotune)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            ap.error(f"unknown step(s) {unknown}; the steps are {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in wanted]
    if args.dry_run:
        for s in steps:
            cmd = " ".join(a if len(a) < 60 else "'" + a.strip().replace("\n", "; ")[:40] + "...'" for a in s.argv)
            print(f"{s.name:10s} timeout {s.timeout:4.0f} s  env {s.env or '{}'}  {s.skip_reason or cmd}")
        print(f"budget {args.budget_s:.0f} s; output: {Path(args.out) / SUMMARY}, {Path(args.out) / TARBALL}")
        return 0
    return check(steps, Path(args.out), args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
