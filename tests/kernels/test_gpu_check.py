"""bench/gpu_check.py's control flow on CPU: independent steps with their own timeouts within a budget, failures and
skips reported, exactly one summary and one tarball written, non-zero exit on any failure; the pytest judge; the
source shim that replaces a failed editable install; and the real CLI with CUDA absent."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up while the class is made
_spec.loader.exec_module(gc)
PY = sys.executable


def members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return sorted(tar.getnames())


def test_steps_are_independent_timed_and_reported(tmp_path):
    steps = [
        gc.Step("ok", [PY, "-c", "print('fine')"], 30),
        gc.Step("broken", [PY, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
        gc.Step("hangs", [PY, "-c", "import time; time.sleep(60)"], 2),
        gc.Step("after", [PY, "-c", "print('still ran')"], 30),        # a failure never stops the next step
        gc.Step("optional", [PY, "-c", "raise SystemExit(1)"], 30, skip_reason="bench/x.py does not exist"),
    ]
    out = tmp_path / "out"
    rc = gc.check(steps, out, budget_s=60)
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([gc.SUMMARY, gc.TARBALL])  # one summary + one tarball
    summary = (out / gc.SUMMARY).read_text()
    assert summary.startswith("# GPU check: FAIL")
    for row in ("| ok | pass |", "| broken | FAIL |", "| hangs | TIMEOUT |", "| after | pass |",
                "| optional | skipped |"):
        assert row in summary, row
    assert "exit 3" in summary and "boom" in summary           # the failed step's log tail is in the summary
    assert "killed after 2 s" in summary
    names = members(out / gc.TARBALL)
    assert f"gpu_check/{gc.SUMMARY}" in names
    assert {f"gpu_check/logs/{n}.log" for n in ("ok", "broken", "hangs", "after")} <= set(names)


def test_budget_clamps_timeouts_and_all_pass_exits_zero(tmp_path):
    steps = [gc.Step("slow", [PY, "-c", "import time; time.sleep(60)"], 600),
             gc.Step("late", [PY, "-c", "print(1)"], 600)]
    rc = gc.check(steps, tmp_path, budget_s=3)
    summary = (tmp_path / gc.SUMMARY).read_text()
    assert rc == 1 and "| slow | TIMEOUT |" in summary and "| late | not run |" in summary
    assert gc.check([gc.Step("ok", [PY, "-c", "print(1)"], 30)], tmp_path / "b", budget_s=30) == 0
    assert (tmp_path / "b" / gc.SUMMARY).read_text().startswith("# GPU check: PASS")


JUNIT = '<testsuites><testsuite name="pytest" tests="{t}" failures="{f}" errors="0" skipped="{s}"/></testsuites>'


@pytest.mark.parametrize("t,f,s,rc,ok,words", [
    (10, 0, 2, 0, True, "8 passed, 0 failed"),
    (10, 1, 0, 1, False, "9 passed, 1 failed"),
    (10, 0, 10, 0, False, "every gpu test skipped"),
    (0, 0, 0, 5, False, "no gpu test collected"),
])
def test_pytest_judge(tmp_path, t, f, s, rc, ok, words):
    (tmp_path / "pytest-gpu.xml").write_text(JUNIT.format(t=t, f=f, s=s))
    got, detail = gc.judge_pytest(None, rc, "", tmp_path)
    assert got == ok and words in detail, detail


def test_plan_names_every_step_and_skips_a_missing_benchmark():
    steps = {s.name: s for s in gc.plan()}
    assert list(steps) == ["install", "versions", "pytest", "attention", "ffn", "finetune"]
    assert steps["install"].argv[1:] == ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    assert "gpu" in steps["pytest"].argv and steps["pytest"].env["TRITON_INTERPRET"] == "0"
    assert sum(s.timeout for s in steps.values() if s.name != "install") > 0
    assert [s.name for s in gc.plan(install=False)][0] == "versions"
    assert bool(steps["finetune"].skip_reason) != (REPO / "bench" / "finetune.py").exists()


def test_source_shim_imports_the_package_and_registers_the_backend(tmp_path):
    shim = gc.make_shim(tmp_path / "shim")
    # hide this venv's editable install (a meta-path finder would answer first), then import through the shim
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
            "getattr(type(f), '__module__', '') and '__editable__' not in getattr(f, '__module__', '')]\n"
            "import spt_compile.lowering.dispatch as d, spt_compile.kernels as k\n"
            "from importlib.metadata import entry_points\n"
            "ep = [e for e in entry_points(group='torch_dynamo_backends') if e.name == 'spt']\n"
            "print(d.__file__); print(k.__file__); print(ep[0].value if ep else None)\n"
            "fn = ep[0].load(); print(sys.modules[fn.__module__].__file__)\n")
    env = {**os.environ, "PYTHONPATH": str(shim)}
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0].startswith(str(shim)) and lines[1].startswith(str(shim)), lines
    assert lines[2] == "spt_compile.backend:spt_backend" and lines[3].startswith(str(shim)), lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_cli_without_cuda_fails_clearly_and_writes_both_files(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([PY, str(REPO / "bench" / "gpu_check.py"), "--no-install", "--only", "versions,pytest",
                           "--tests", "tests/kernels/test_gpu_ffn.py", "--out", str(out), "--budget-s", "200"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / gc.SUMMARY).read_text()
    assert "| versions | FAIL |" in summary and "no CUDA device" in summary
    assert "| pytest | FAIL |" in summary and "every gpu test skipped" in summary
    assert {"gpu_check/logs/versions.log", "gpu_check/logs/pytest.log", "gpu_check/pytest-gpu.xml"} <= set(
        members(out / gc.TARBALL))
