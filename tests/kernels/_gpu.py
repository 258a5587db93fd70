"""Shared by the @pytest.mark.gpu tests (tests/kernels/test_gpu_*.py): where they run and at what size.

They run on CUDA when torch sees a GPU (`bench/gpu_check.sh` runs `pytest -m gpu`), and are skipped with the
reason otherwise. SPT_GPU_TESTS_ON_CPU=1 runs the very same test code on CPU tensors through the Triton
interpreter (SPT_KERNELS=triton, tiny sizes), so the GPU tests' own logic is checked without a GPU:
    TRITON_INTERPRET=1 SPT_GPU_TESTS_ON_CPU=1 python -m pytest -m gpu tests/kernels
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
ON_CPU = not CUDA and os.environ.get("SPT_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cuda" if CUDA else "cpu"
MODE = "auto" if CUDA else "triton"  # the SPT_KERNELS value that puts the ops on their kernel path on DEVICE
REASON = ("needs a CUDA device: torch.cuda.is_available() is False (bench/gpu_check.sh runs these on a GPU; "
          "SPT_GPU_TESTS_ON_CPU=1 runs them on CPU through the Triton interpreter)")

# every gpu test module: `pytestmark = GPU`
GPU = [pytest.mark.gpu, pytest.mark.skipif(not (CUDA or ON_CPU), reason=REASON)]


def size(gpu: int, cpu: int) -> int:
    """A problem size: realistic on the GPU, tiny under the interpreter."""
    return gpu if CUDA else cpu


@pytest.fixture
def kernel_path(monkeypatch):
    """The op's kernel path on DEVICE: the default on CUDA, SPT_KERNELS=triton for the CPU dry run."""
    monkeypatch.setenv("SPT_KERNELS", MODE)
    if CUDA and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        # tests/kernels/conftest.py sets it for the CPU tests: on a GPU the kernels would then run interpreted
        pytest.fail("TRITON_INTERPRET is on with a CUDA device: the kernels would run in the interpreter, not on "
                    "the GPU. Run the gpu tests with TRITON_INTERPRET=0 (bench/gpu_check.sh does)")
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references must be IEEE fp32
        torch.backends.cudnn.allow_tf32 = False
    return DEVICE
