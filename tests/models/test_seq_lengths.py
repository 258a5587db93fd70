"""min_seq_len across sequence lengths in one process, static and dynamic shapes.

Lengths 64, 100 (< min_seq_len=128) must run exact attention; 128, 200, 300 sparse. With static shapes the
compiler decides per graph (below the threshold the site stays dense); with a symbolic length it must not decide
from the hint: one graph serves every length and the op applies the threshold at run time."""
import copy

import pytest
import torch

import spt_compile
from spt_compile.lowering.formulas import attention_keys_kept, attention_num_tiles, attention_tile_slots
from spt_compile.options import SptOptions
from spt_compile.plan import op_takes_min_seq_len
from tests.toy_transformer import ToyConfig, ToyTransformer

LENGTHS = (64, 100, 128, 200, 300)
THRESHOLD = 128
DENSITY = 0.25

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
                             options={"attention_density": DENSITY, "ffn": "dense", "min_seq_len": THRESHOLD,
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
            assert site.status == "rewritten" and site.plan.mode == "sparse" and site.plan.L == _slots(n), str(r)


def _slots(n):
    """idx slots of the causal self-attention at length n under the default options (lowering/formulas.py)."""
    opts = SptOptions(attention_density=DENSITY)
    if opts.attention_query_tile:
        return attention_tile_slots(n, n, DENSITY, opts.attention_min_keys, True)
    return attention_keys_kept(n, DENSITY)


def _graphs_for(lengths, dynamic):
    """Compiled graphs expected over `lengths`. One symbolic graph serves every length, with one exception: with
    query tiles the idx output has ceil(N/T) tiles, and when that is 1 (N <= T) torch guards on it (the size-1
    check of the output's contiguity, as Dynamo's 0/1 specialisation), so lengths N <= T and N > T get one graph
    each (docs/OPS.md). dynamic=None compiles the first length static, then one symbolic graph per such class."""
    tile = SptOptions().attention_query_tile

    def classes(ns):
        return len({bool(tile) and attention_num_tiles(n, tile) == 1 for n in ns})

    return classes(lengths) if dynamic else 1 + classes(lengths[1:])


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
    # one graph for every length (after the first static compile when dynamic=None), except N <= T vs N > T
    assert len(frames) == _graphs_for(LENGTHS, dynamic), frames
