"""`python -m spt_compile autotune ...` (spt_compile/cli_autotune.py) and the spt_compile.autotune facade:
export / clear / import / show round trip, a subprocess run, clear errors, and pretune on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spt_compile import autotune as at
from spt_compile import cli_autotune
from spt_compile.kernels import autotune
from spt_compile.lowering.reference import pq_attention as ref

ROOT = Path(__file__).resolve().parents[1]


def _tuned_cpu_entry():
    """One real CPU-attention entry, tuned with a fake timer (the small chunk wins)."""
    autotune.set_timer(lambda fn, cfg: cfg["budget"] / 1e6)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    idx = torch.randint(0, 512, (1, 2, 512, 128), generator=g, dtype=torch.int32)
    ref.sparse_attention_forward(q, k, v, idx, None, False, 0.25, 0.0, None)
    autotune.set_timer(None)
    (e,) = at.entries()
    return e


def test_cli_export_clear_import_show_round_trip(autotune_on, tmp_path, capsys):
    e = _tuned_cpu_entry()
    f = tmp_path / "tuned.json"
    assert cli_autotune.main(["export", str(f)]) == 0
    assert "exported 1 entries" in capsys.readouterr().out
    assert cli_autotune.main(["clear"]) == 0 and at.entries() == []
    assert cli_autotune.main(["show"]) == 0
    assert "no entries" in capsys.readouterr().out
    assert cli_autotune.main(["import", str(f)]) == 0
    out = capsys.readouterr().out
    assert "added        1" in out and "foreign      0 skipped" in out
    assert cli_autotune.main(["show"]) == 0
    table = capsys.readouterr().out
    assert "attention_cpu_forward" in table and "budget=262144" in table and "applies" in table
    assert e["device"] in table and json.dumps(e["key"]) in table
    assert at.lookup("attention_cpu_forward", tuple(e["key"]))["config"] == e["config"]


def test_cli_import_errors_are_clear(autotune_on, tmp_path, capsys):
    f = tmp_path / "bad.json"
    f.write_text("{truncated")
    assert cli_autotune.main(["import", str(f)]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert cli_autotune.main(["import", str(tmp_path / "missing.json")]) == 1
    with pytest.raises(SystemExit):
        cli_autotune.main(["pretune"])  # MODEL is required: argparse says so


def test_cli_show_in_a_subprocess(autotune_on, tmp_path):
    _tuned_cpu_entry()
    env = {**os.environ, "SPT_CACHE_DIR": str(autotune_on)}
    r = subprocess.run([sys.executable, "-m", "spt_compile.cli_autotune", "show"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 entries" in r.stdout and "attention_cpu_forward" in r.stdout


@pytest.mark.slow
def test_pretune_tunes_then_a_second_compile_reuses_the_entries(autotune_on):
    autotune.set_timer(lambda fn, cfg: cfg["budget"] / 1e6)  # real runs, fake (deterministic) times
    # the per-query op (T = 0): its plain-PyTorch stages are the CPU tunables (kernels/cpu_tunables.py); the
    # query-tile CPU path (lowering/attention_tiled_cpu.py) has none
    opts = {"inner_backend": "aot_eager", "attention_query_tile": 0}
    first = at.pretune("llama", layers=1, hidden=32, seq=512, batch=1, options=opts, device="cpu")
    kernels = {e["kernel"] for e in first.tuned}
    assert {"attention_cpu_select", "attention_cpu_forward", "attention_cpu_backward"} <= kernels, str(first)
    assert first.benchmarks > 0 and "entries tuned" in str(first)
    second = at.pretune("llama", layers=1, hidden=32, seq=512, batch=1, options=opts, device="cpu")
    assert second.tuned == [] and second.benchmarks == 0
    sources = {r["kernel"]: r["source"] for r in second.used}
    assert "tuned" not in sources.values() and sources["attention_cpu_forward"] == "cache"
