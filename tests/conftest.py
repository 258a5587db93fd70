import atexit
import os
import shutil
import tempfile

# Triton kernels run on CPU tensors only through the interpreter, and @triton.jit picks the interpreted function
# when a kernel module is imported: set it before anything (a test module of any folder, e.g. tests/inspect,
# may import spt_compile.kernels at collection time, before tests/kernels/conftest.py is read). setdefault: the
# GPU check runs the gpu tests with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests must not depend on each other's compiled-code caches or on leftover Dynamo state.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Autotuning: never the user's cache, and no timing (first-fit defaults: fast, deterministic). The autotune
# tests switch tuning on themselves (tests/kernels/test_autotune*.py).
_SPT_CACHE = tempfile.mkdtemp(prefix="spt-test-cache-")
atexit.register(shutil.rmtree, _SPT_CACHE, ignore_errors=True)
os.environ["SPT_CACHE_DIR"] = _SPT_CACHE
os.environ["SPT_AUTOTUNE"] = "0"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def autotune_on(tmp_path, monkeypatch):
    """Tuning on, a fresh cache dir, a private copy of the kernel registry (test kernels vanish afterwards)
    and fresh in-memory tuner state; yields the cache dir."""
    from spt_compile.kernels import autotune
    autotune.ensure_registered()  # before the copy: a kernel module imported later would register into it only
    monkeypatch.setenv("SPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPT_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_REGISTRY", dict(autotune._REGISTRY))
    autotune.reset()
    prev = autotune.set_timer(None)
    yield tmp_path / "cache"
    autotune.set_timer(prev)
    autotune.reset()
