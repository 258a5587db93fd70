"""Kernel tests run Triton kernels on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs (it picks the interpreted
function at decoration time), i.e. before a kernel module is imported: set it here, at the top of the
conftest that pytest loads before collecting any test module in this folder.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
