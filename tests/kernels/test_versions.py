"""The version pins in pyproject.toml admit the GPU image (Python 3.12, torch 2.11.0+cu130, triton 3.6.0) and CI's
CPU stack (torch 2.13, triton 3.9), and the build requirement admits what an editable install there can use."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

try:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:  # pragma: no cover - packaging ships with pip/setuptools nearly everywhere
    SpecifierSet = Version = None


def load_pyproject() -> dict:
    text = PYPROJECT.read_text()
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib.loads(text)
    try:
        import tomli
        return tomli.loads(text)
    except ImportError:  # Python 3.10 without tomli: the few keys this test reads, by regex
        deps = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
        build = re.search(r"^requires = \[(.*?)\]", text, re.S | re.M).group(1)
        return {"project": {"dependencies": re.findall(r'"([^"]+)"', deps),
                            "requires-python": re.search(r'^requires-python = "([^"]+)"', text, re.M).group(1)},
                "build-system": {"requires": re.findall(r'"([^"]+)"', build)}}


def _parse_version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", v).group(0).split("."))


def admits(spec: str, version: str) -> bool:
    """Whether a PEP 440 specifier set admits a version (local labels like +cu130 are ignored, as PEP 440 says)."""
    if SpecifierSet is not None:
        return SpecifierSet(spec).contains(Version(version), prereleases=False)
    v = _parse_version(version.split("+")[0])
    ops = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
           "==": lambda a, b: a == b}
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, ver = re.match(r"(>=|<=|==|<|>)\s*(\S+)", clause).groups()
        b = _parse_version(ver)
        n = max(len(v), len(b))
        if not ops[op](v + (0,) * (n - len(v)), b + (0,) * (n - len(b))):
            return False
    return True


def requirement(name: str, reqs: list[str]) -> str:
    """The specifier of `name` in a requirement list (environment markers dropped)."""
    for r in reqs:
        m = re.match(rf"\s*{re.escape(name)}\s*([^;]*)", r)
        if m and not re.match(r"[A-Za-z0-9_.-]", m.group(1)[:1] or " "):
            return m.group(1).strip()
    raise AssertionError(f"{name} is not in {reqs}")


PROJECT = load_pyproject()
DEPS = PROJECT["project"]["dependencies"]


@pytest.mark.parametrize("name,version", [("torch", "2.11.0+cu130"), ("torch", "2.11.0"), ("torch", "2.12.1"),
                                          ("torch", "2.13.0+cpu"), ("triton", "3.6.0"), ("triton", "3.7.1"),
                                          ("triton", "3.9.0")])
def test_pins_admit_supported_versions(name, version):
    assert admits(requirement(name, DEPS), version), f"pyproject pins {requirement(name, DEPS)!r} for {name}"


@pytest.mark.parametrize("name,version", [("torch", "2.10.0"), ("torch", "2.14.0"), ("triton", "3.5.1"),
                                          ("triton", "3.10.0")])
def test_pins_exclude_untested_versions(name, version):
    # the upper bounds are deliberate: torch/triton internals we use (docs/COMPAT.md) move between releases
    assert not admits(requirement(name, DEPS), version)


@pytest.mark.parametrize("version,ok", [("3.10.0", True), ("3.11.7", True), ("3.12.3", True), ("3.9.18", False)])
def test_requires_python(version, ok):
    assert admits(PROJECT["project"]["requires-python"], version) == ok


def test_build_requirement_admits_old_setuptools():
    # `pip install --no-build-isolation -e .` uses whatever setuptools the image has (no registry there); PEP 660
    # editable builds need >= 64. Listing `wheel` would make nothing work that does not work without it.
    reqs = PROJECT["build-system"]["requires"]
    assert admits(requirement("setuptools", reqs), "64.0.0") and admits(requirement("setuptools", reqs), "68.1.2")
    assert not any(r.strip().startswith("wheel") for r in reqs)


def test_running_stack_is_within_the_pins():
    import torch
    import triton
    assert admits(requirement("torch", DEPS), torch.__version__), torch.__version__
    assert admits(requirement("triton", DEPS), triton.__version__), triton.__version__


def test_admits_fallback_parser_agrees_with_packaging(monkeypatch):
    if SpecifierSet is None:
        pytest.skip("packaging is not installed: only the fallback parser exists")
    cases = [(">=2.11,<2.14", v) for v in ("2.10.9", "2.11.0+cu130", "2.13.5", "2.14.0")]
    want = [admits(s, v) for s, v in cases]
    monkeypatch.setattr(sys.modules[__name__], "SpecifierSet", None)
    assert [admits(s, v) for s, v in cases] == want == [False, True, True, False]
