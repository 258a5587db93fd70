"""Bytes the op saves for backward grow with N*L (idx) + N*D (out), never N^2 like eager attention.

Measured with torch.autograd.graph.saved_tensors_hooks through bench/attention.py's `saved_bytes` (the same
function writes bench/results/attention-memory-<machine>.md). B=1, H=2, D=64, fp32, forward only (saving
happens in the forward; no backward is run).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench.attention import eager_attention, saved_bytes, spt  # noqa: E402

from spt_compile.lowering.reference.pq_attention import num_kept  # noqa: E402

B, H, D = 1, 2, 64
NS = (512, 1024, 2048, 4096)


def expected_op_bytes(n, L, es=4):
    """What setup_context keeps beyond q, k, v: out [B,H,N,D] (es bytes), idx [B,H,N,L] int32, lse [B,H,N] fp32."""
    return B * H * (n * D * es + n * L * 4 + n * 4)


@pytest.fixture(scope="module")
def measured():
    rows = {}
    for n in NS:
        L = num_kept(n, 0.25)
        rows[n] = dict(L=L, op=saved_bytes(spt(0.25), n, D, B, H), eager=saved_bytes(eager_attention, n, D, B, H))
    return rows


def test_saved_bytes_are_out_idx_lse_only(measured):
    for n, r in measured.items():
        assert r["op"] == expected_op_bytes(n, r["L"]), (n, r)


def test_saved_bytes_per_kept_slot_is_bounded(measured):
    """bytes / (B*H*N*L) = 4 (idx) + (4*D + 4)/L (out, lse): between 4 and 4 + 260/L, whatever N is."""
    for n, r in measured.items():
        per = r["op"] / (B * H * n * r["L"])
        print(f"\n[attention memory] N={n} L={r['L']}: op saves {r['op']} B = {per:.2f} B per kept slot; "
              f"eager saves {r['eager']} B ({r['op'] / r['eager']:.3f}x of eager)")
        assert 4.0 <= per <= 4.0 + (4 * D + 4) / r["L"] + 1e-9


def test_fixed_l_grows_linearly_and_eager_quadratically():
    """With L fixed (64), doubling N doubles the op's saved bytes, while eager's N x N probabilities quadruple."""
    op = {n: saved_bytes(spt(64 / n), n, D, B, H) for n in (512, 1024)}
    eager = {n: saved_bytes(eager_attention, n, D, B, H) for n in (512, 1024)}
    assert op[1024] == 2 * op[512] == 2 * expected_op_bytes(512, 64)
    assert eager[1024] == 4 * eager[512]


def test_op_saves_a_fraction_of_eager(measured):
    """Eager keeps the fp32 N x N probabilities; the op's int32 idx is density * N^2 and out/lse add (D + 1) * N
    per head, so op / eager <= density + (D + 1) / N (0.39 at N=512, 0.27 at N=4096)."""
    for n, r in measured.items():
        assert r["eager"] >= B * H * n * n * 4  # eager keeps at least the softmax output
        assert r["op"] / r["eager"] <= 0.25 + (D + 1) / n + 1e-9
