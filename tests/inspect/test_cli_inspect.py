"""`python -m spt_compile inspect`: zoo names and file:factory models, the table, JSON, HTML, errors, near misses,
and SPT_LOGS printing the report while compiling."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spt_compile import cli_inspect
from spt_compile.html_report import render

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TINY = f"{HERE / 'tiny_models.py'}:factory"
UNSUPPORTED = f"{HERE / 'tiny_models.py'}:unsupported_factory"
OPTS = json.dumps({"min_seq_len": 1})
# tiny lengths really sparse: a small L_min, since the default floor covers every one of --seq 16 keys
SPARSE_OPTS = json.dumps({"min_seq_len": 1, "attention_min_keys": 4})


def inspect(*argv) -> int:
    return cli_inspect.main([*map(str, argv)])


def test_help_names_every_flag_with_its_default():
    parser = argparse.ArgumentParser(prog="inspect")
    cli_inspect.add_arguments(parser)
    text = parser.format_help()
    for flag, default in (("--layers", 2), ("--hidden", 64), ("--seq", 128), ("--batch", 2),
                          ("--attn-implementation", "sdpa"), ("--options", "{}")):
        assert flag in text
        assert f"(default: {default})" in " ".join(text.split())
    for flag in ("--html", "--json", "--dot"):
        assert flag in text
    assert "llama" in text and "file.py:factory" in text


def test_factory_model_table_json_and_html(tmp_path, capsys):
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    assert inspect(TINY, "--layers", 2, "--seq", 16, "--options", SPARSE_OPTS, "--json", out_json,
                   "--html", out_html) == 0
    printed = capsys.readouterr().out
    assert "attention 2 rewritten / 0 dense; ffn 2 rewritten / 0 dense" in printed
    assert "estimated savings (dense -> spt)" in printed
    data = json.loads(out_json.read_text())
    assert [(s["kind"], s["module"], s["status"]) for s in data["sites"]] == [
        ("attention", "blocks.0", "rewritten"), ("attention", "blocks.1", "rewritten"),
        ("ffn", "blocks.0", "rewritten"), ("ffn", "blocks.1", "rewritten")]
    assert len(data["savings"]["sites"]) == 4
    totals = {t["quantity"]: t for t in data["savings"]["total"]}
    assert totals["attention FLOPs (fwd+bwd)"]["spt"] < totals["attention FLOPs (fwd+bwd)"]["dense"]
    assert out_html.read_text().count("<svg") == 2


def test_zoo_model_lists_every_layer_with_user_module_paths(tmp_path):
    out_json = tmp_path / "r.json"
    assert inspect("llama", "--layers", 2, "--seq", 128, "--attn-implementation", "eager", "--json", out_json) == 0
    sites = json.loads(out_json.read_text())["sites"]
    got = sorted((s["kind"], s["module"], s["status"]) for s in sites)
    want = sorted([("attention", f"model.layers.{i}.self_attn", "rewritten") for i in range(2)]
                  + [("ffn", f"model.layers.{i}.mlp", "rewritten") for i in range(2)])
    assert got == want


def test_unsupported_attention_spelling_is_a_near_miss_naming_the_step(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert inspect(UNSUPPORTED, "--layers", 1, "--seq", 16, "--options", OPTS, "--json", out_json) == 0
    sites = json.loads(out_json.read_text())["sites"]
    att = [s for s in sites if s["kind"] == "attention"]
    assert len(att) == 1 and att[0]["status"] == "dense" and att[0]["module"] == "blocks.0"
    assert att[0]["near_miss"] == "softmax" and "dim" in att[0]["reason"]
    assert "softmax" in capsys.readouterr().out


def test_near_miss_step_is_on_the_page():
    import spt_compile
    from tests.inspect.tiny_models import OPTIONS, unsupported_factory
    model, args = unsupported_factory()
    page = render(spt_compile.explain(model, *args, options=OPTIONS))
    assert '<td class="step">softmax</td>' in page


@pytest.mark.parametrize("argv,message", [
    (["--options", "{not json"], "--options is not valid JSON"),
    (["--options", '{"attention_densty": 0.5}'], "attention_densty"),
    (["--seq", "0"], "--seq must be >= 1"),
])
def test_bad_input_is_named(argv, message, capsys):
    assert inspect(TINY, *argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_and_missing_factory_file(capsys, tmp_path):
    assert inspect("not-a-model") == 2
    assert "unknown MODEL 'not-a-model'" in capsys.readouterr().err
    assert inspect(f"{tmp_path / 'missing.py'}:f") == 2
    assert "not found" in capsys.readouterr().err


def test_spt_logs_rewrites_graphs_prints_the_report_while_compiling():
    code = ("import torch, sys; sys.path.insert(0, %r)\n"
            "from tests.inspect.tiny_models import factory\n"
            "m, a = factory(layers=1, seq=16)\n"
            "torch.compile(m, backend='spt', options={'min_seq_len': 1, 'inner_backend': 'aot_eager'})(*a)\n"
            % str(ROOT))
    env = {**os.environ, "SPT_LOGS": "rewrites,graphs"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stderr
    assert "attention 1 rewritten / 0 dense; ffn 1 rewritten / 0 dense" in log
    assert "estimated savings (dense -> spt)" in log
    assert "--- graph 0 before the rewrite ---" in log and "--- graph 0 after the rewrite ---" in log
    assert "spt.pq_sparse_attention" in log and "<- #0 attention blocks.0" in log


def test_spt_logs_levels_and_topics(caplog):
    import logging
    from spt_compile import inspect_logs
    from tests.inspect.tiny_models import OPTIONS, factory
    import spt_compile
    model, args = factory(layers=1, seq=16)
    report = spt_compile.explain(model, *args, options=OPTIONS)
    log = logging.getLogger("spt_compile.test_inspect_logs")
    log.propagate = True
    for value, savings, listing in (("info", False, False), ("rewrites", True, False), ("rewrites,graphs", True, True)):
        caplog.clear()
        inspect_logs.configure(log, value)
        with caplog.at_level(logging.INFO, logger=log.name):
            inspect_logs.log_compile(log, report, value)
        text = caplog.text
        assert "ffn 1 rewritten" in text
        assert ("estimated savings" in text) == savings and ("before the rewrite" in text) == listing
    caplog.clear()
    inspect_logs.configure(log, "rewrite")
    assert "unknown entry 'rewrite' ignored" in caplog.text
