"""lowering/dispatch.py: the one kernels-or-reference decision and its SPT_KERNELS switch."""
import os
import subprocess
import sys

import pytest
import torch

from spt_compile.lowering import dispatch


@pytest.mark.parametrize("value,want", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("Triton", "triton"),
                                        (" reference ", "reference")])
def test_mode_parsing(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("SPT_KERNELS", raising=False)
    else:
        monkeypatch.setenv("SPT_KERNELS", value)
    assert dispatch.mode() == want


def test_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv("SPT_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"SPT_KERNELS='cuda' is not one of \('auto', 'triton', 'reference'\)"):
        dispatch.use_kernels(torch.zeros(1))


def test_cpu_decisions(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("SPT_KERNELS", raising=False)
    assert not dispatch.use_kernels(x)                      # auto: CPU runs the reference
    monkeypatch.setenv("SPT_KERNELS", "triton")             # TRITON_INTERPRET=1 comes from conftest.py
    assert dispatch.use_kernels(x) and dispatch.use_kernels(x.bfloat16()) and dispatch.use_kernels(x.half())
    assert not dispatch.use_kernels(x.double())             # fp64 is the reference-only ground truth
    assert not dispatch.use_kernels(x.int())
    monkeypatch.setenv("SPT_KERNELS", "reference")
    assert not dispatch.use_kernels(x)


def test_triton_mode_without_interpreter_names_both_variables(monkeypatch):
    monkeypatch.setenv("SPT_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1") as e:
        dispatch.use_kernels(torch.zeros(2))
    assert "SPT_KERNELS=triton" in str(e.value) and "before triton is imported" in str(e.value)
    # the reference path needs neither variable
    monkeypatch.setenv("SPT_KERNELS", "auto")
    assert not dispatch.use_kernels(torch.zeros(2))


def test_kernels_imported_before_the_interpreter_was_set_are_reported():
    """Setting TRITON_INTERPRET after the kernels were compiled-for-GPU imported is caught, not a segfault."""
    code = ("import os, torch\n"
            "import spt_compile.kernels.attention_fwd\n"       # imported while TRITON_INTERPRET is unset
            "os.environ['TRITON_INTERPRET'] = '1'; os.environ['SPT_KERNELS'] = 'triton'\n"
            "from spt_compile.lowering.dispatch import use_kernels\n"
            "try:\n    use_kernels(torch.zeros(2))\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPT_KERNELS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERR" in out.stdout and "spt_compile.kernels.attention_fwd was imported before" in out.stdout, out.stdout


def test_ops_route_through_the_switch(monkeypatch):
    """The ops' own _use_kernels is the dispatch decision (one place)."""
    from spt_compile.lowering import attention, ffn
    x = torch.zeros(2)
    for mode in ("auto", "triton", "reference"):
        monkeypatch.setenv("SPT_KERNELS", mode)
        assert attention._use_kernels(x) == ffn._use_kernels(x) == dispatch.use_kernels(x)
