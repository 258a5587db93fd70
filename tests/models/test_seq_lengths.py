"""min_seq_len across sequence lengths in one process, static and dynamic shapes.

Lengths 64, 100 (< min_seq_len=128) must run exact attention; 128, 200, 300 sparse. With static shapes the
compiler decides per graph (below the threshold the site stays dense); with a symbolic length it must not decide
from the hint: one graph serves every length and the op applies the threshold at run time."""
import copy

import pytest
import torch

import spt_compile
from spt_compile.plan import op_takes_min_seq_len
from tests.toy_transformer import ToyConfig, ToyTransformer

LENGTHS = (64, 100, 128, 200, 300)
THRESHOLD = 128

pytestmark = pytest.mark.skipif(not op_takes_min_seq_len(),
                                reason="torch.ops.spt.pq_sparse_attention has no run-time min_seq_len argument")


def _model():
    torch.manual_seed(0)
    cfg = ToyConfig(attention="sdpa", mask="causal", hidden=32, heads=2, kv_heads=2)
    return ToyTransformer(cfg).eval(), cfg


def _x(n, cfg):
    g = torch.Generator().manual_seed(n)
    return torch.randn(1, n, cfg.hidden, generator=g), torch.tensor([n])


def _run(dynamic):
    """(outputs of eager, outputs of spt, backend calls) over LENGTHS with one compiled model."""
    model, cfg = _model()
    compiled = torch.compile(copy.deepcopy(model), backend="spt", dynamic=dynamic,
                             options={"attention_density": 0.25, "ffn": "dense", "min_seq_len": THRESHOLD,
                                      "inner_backend": "aot_eager"})
    spt_compile.report.clear_reports()
    eager, spt, reports = [], [], []
    with torch.no_grad():
        for n in LENGTHS:
            x = _x(n, cfg)
            eager.append(model(*x))
            spt.append(compiled(*x))
            reports.append(spt_compile.last_report())
    return eager, spt, reports


def _check_threshold(eager, spt):
    for n, ref, out in zip(LENGTHS, eager, spt):
        if n < THRESHOLD:
            torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-5, msg=lambda m, n=n: f"N={n} not exact: {m}")
        else:
            assert (out - ref).abs().max() > 1e-3, f"N={n} >= min_seq_len ran exact, not sparse"


def test_static_shapes_decide_per_length():
    eager, spt, reports = _run(dynamic=False)
    _check_threshold(eager, spt)
    for n, r in zip(LENGTHS, reports):
        assert len(r.sites) == 2, str(r)  # once per compiled graph: the stale graphs of other lengths are not listed
        [site] = r.rewritten("attention") + r.dense("attention")
        if n < THRESHOLD:
            assert site.status == "dense" and f"{n} keys < min_seq_len={THRESHOLD}" in site.reason, str(r)
        else:
            assert site.status == "rewritten" and site.plan.mode == "sparse" and site.plan.L == -(-n // 4), str(r)


@pytest.mark.parametrize("dynamic", [True, None])  # dynamic=True, and automatic dynamic after a recompile
def test_symbolic_length_applies_the_threshold_at_run_time(dynamic):
    eager, spt, reports = _run(dynamic=dynamic)
    _check_threshold(eager, spt)
    final = reports[-1]
    assert len(final.sites) == 2, str(final)  # the attention and the (dense) FFN, once each
    [site] = final.rewritten("attention")
    assert site.status == "rewritten" and site.plan.mode == "runtime" and site.plan.L is None, str(final)
    assert site.plan.min_seq_len == THRESHOLD and site.params["min_seq_len"] == THRESHOLD
    frames = {(r.frame, r.frame_compile) for r in spt_compile.last_reports()}
    assert len(frames) == (1 if dynamic else 2), frames  # one graph for every length (after one recompile)
