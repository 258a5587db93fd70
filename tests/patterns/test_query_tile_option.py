"""The user-facing query-tile options (issue #9): attention_query_tile (T), attention_min_keys (L_min) and
attention_select_stride (s: every s-th query of a tile scores keys).

Options validation, the per-site plan (T, L_min, L_max by lowering/formulas.py), the rewritten graph passing them
to torch.ops.spt.pq_sparse_attention, exact mode with T = 64 equal to eager (output and every gradient), a
training step at the default density, the report and the savings (tile formula against the op's own idx).
Every test passes T explicitly: none depends on the default (options.DEFAULT_ATTENTION_QUERY_TILE).
"""
from __future__ import annotations

import pytest
import torch

import spt_compile
from spt_compile.graph_snapshot import op_arguments
from spt_compile.lowering import formulas
from spt_compile.options import (DEFAULT_ATTENTION_QUERY_TILE, DEFAULT_ATTENTION_SELECT_STRIDE, OPTION_DOCS,
                                 SptOptions)
from spt_compile.report import Report
from spt_compile.rewrite import rewrite_graph
from spt_compile.savings import AttentionSizes, attention_estimates, tile_pairs
from tests.helpers import compare_with_eager
from tests.toy_transformer import ToyConfig, ToyTransformer

OP = torch.ops.spt.pq_sparse_attention.default


# --- options --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, needle", [
    ({"attention_query_tile": -1}, "'attention_query_tile' must be an integer >= 0"),
    ({"attention_query_tile": 16.0}, "'attention_query_tile' must be an integer >= 0"),
    ({"attention_query_tile": True}, "'attention_query_tile' must be an integer >= 0"),
    ({"attention_query_tile": "64"}, "0 = per-query op"),
    ({"attention_min_keys": 0}, "'attention_min_keys' must be an integer >= 1"),
    ({"attention_min_keys": 2.5}, "'attention_min_keys' must be an integer >= 1"),
    ({"attention_select_stride": 0}, "'attention_select_stride' must be an integer >= 1"),
    ({"attention_select_stride": 2.0}, "'attention_select_stride' must be an integer >= 1"),
    ({"attention_share_kv_lists": 1}, "'attention_share_kv_lists' must be a bool"),
])
def test_bad_tile_options_raise_naming_them(options, needle):
    with pytest.raises(ValueError) as e:
        SptOptions.from_dict(options)
    assert needle in str(e.value)


@pytest.mark.parametrize("tile", [0, 1, 7, 64])
def test_valid_tile_options(tile):
    o = SptOptions.from_dict({"attention_query_tile": tile, "attention_min_keys": 3})
    assert (o.attention_query_tile, o.attention_min_keys) == (tile, 3)


def test_the_default_tile_lives_in_one_constant_and_is_documented():
    assert SptOptions().attention_query_tile == DEFAULT_ATTENTION_QUERY_TILE
    assert f"(default {DEFAULT_ATTENTION_QUERY_TILE})" in OPTION_DOCS["attention_query_tile"]
    assert "attention_min_keys" in OPTION_DOCS
    assert SptOptions().attention_select_stride == DEFAULT_ATTENTION_SELECT_STRIDE
    assert f"(default {DEFAULT_ATTENTION_SELECT_STRIDE})" in OPTION_DOCS["attention_select_stride"]


# --- plan -----------------------------------------------------------------------------------------------

def _toy(mask="causal"):
    torch.manual_seed(0)
    return ToyTransformer(ToyConfig(attention="sdpa", mask=mask))


def _site(mask, n, **options):
    x, lengths = torch.randn(1, n, 32), torch.tensor([n])
    report = spt_compile.explain(_toy(mask), x, lengths, options={"min_seq_len": 0, "ffn": "dense", **options})
    [site] = report.rewritten("attention")
    return site, report


@pytest.mark.parametrize("mask", ["causal", "none"])
def test_plan_carries_tile_and_floor_and_sizes_by_the_tile_formula(mask):
    # N = 300, density 0.25: L_max = max(L_min, ceil(0.25 * 300)) = 75 whether causal or not (Nq = Nk)
    site, _ = _site(mask, 300, attention_query_tile=16, attention_min_keys=8)
    plan = site.plan
    assert (plan.T, plan.L_min, plan.L, plan.mode, plan.is_causal) == (16, 8, 75, "sparse", mask == "causal")
    # causal: the first tile's 16 queries see 16 keys: min(16, max(8, ceil(0.25 * 16) = 4)) = 8
    assert plan.L_first == (8 if mask == "causal" else 75)
    assert site.params["L_tile"] == ("8..75" if mask == "causal" else 75)


def test_floor_beats_density_and_can_make_a_site_exact():
    site, _ = _site("causal", 300, attention_query_tile=16, attention_min_keys=100)
    assert (site.plan.L, site.plan.L_first, site.plan.mode) == (100, 16, "sparse")  # max(100, 75); min(16, 100)
    site, _ = _site("causal", 300, attention_query_tile=16, attention_min_keys=300)
    assert site.plan.mode == "exact" and site.plan.L == 300  # L_max covers every key a tile can see


def test_tile_zero_is_the_per_query_op():
    site, _ = _site("causal", 300, attention_query_tile=0, attention_min_keys=100)
    assert (site.plan.T, site.plan.L, site.plan.mode) == (0, 75, "sparse")  # ceil(0.25 * 300); L_min unused
    assert "L_min" not in site.params and "L_tile" not in site.params


@pytest.mark.parametrize("tile, stride, want", [(16, 4, 4), (16, 1, 1), (16, 40, 16), (0, 4, 1)])
def test_plan_caps_the_select_stride_at_the_tile(tile, stride, want):
    """s >= T scores only each tile's last query, as s = T does; the per-query op (T = 0) scores every query."""
    site, _ = _site("causal", 300, attention_query_tile=tile, attention_select_stride=stride)
    assert site.plan.select_stride == want
    assert site.params.get("select_stride") == (want if tile else None)


def test_cross_attention_causal_and_bidirectional_l_max():
    """Nq < Nk: under top-left causality no tile sees more than Nq keys, bidirectional tiles see all Nk."""
    class Cross(torch.nn.Module):
        def __init__(self, causal):
            super().__init__()
            self.causal = causal

        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)

    q, k = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 400, 8)
    for causal, l_max in ((True, 25), (False, 100)):  # max(4, ceil(0.25 * 100)); max(4, ceil(0.25 * 400))
        report = spt_compile.explain(Cross(causal), q, k, k, options={
            "min_seq_len": 0, "attention_query_tile": 32, "attention_min_keys": 4})
        [site] = report.rewritten("attention")
        assert site.plan.L == l_max == formulas.attention_tile_slots(100, 400, 0.25, 4, causal), str(report)


# --- rewrite --------------------------------------------------------------------------------------------

def _op_calls(model, args, options, kwargs=None, out=None):
    """(the rewritten graphs' pq_sparse_attention arguments by schema name, the report); out: a list that gets
    the model's output (the rewritten graph runs eagerly, with autograd)."""
    calls, report = [], Report()

    def backend(gm, example_inputs, **_):
        rewrite_graph(gm, example_inputs, SptOptions.from_dict(options), report)
        calls.extend(op_arguments(n) for n in gm.graph.nodes if n.target is OP)
        return gm.forward

    torch._dynamo.reset()
    result = torch.compile(model, backend=backend)(*args, **(kwargs or {}))
    if out is not None:
        out.append(result)
    return calls, report


@pytest.mark.parametrize("tile, floor, stride", [(0, 64, 1), (1, 5, 1), (16, 8, 3), (64, 64, 4)])
def test_rewritten_graph_passes_the_plans_tile_and_floor(tile, floor, stride):
    n = 130
    calls, report = _op_calls(_toy(), (torch.randn(1, n, 32), torch.tensor([n])),
                              {"min_seq_len": 0, "ffn": "dense", "attention_query_tile": tile,
                               "attention_min_keys": floor, "attention_select_stride": stride})
    [site] = report.rewritten("attention")
    [args] = calls
    assert (args["query_tile"], args["min_keys"]) == (site.plan.T, site.plan.L_min) == (tile, floor)
    assert args["select_stride"] == site.plan.select_stride == stride
    assert args["density"] == 0.25 and args["min_seq_len"] == 0


# --- exact mode and a training step on a real HF architecture -------------------------------------------

def _hf(kind):
    from spt_compile.inspect_models import small_hf_model
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = small_hf_model(kind, "sdpa", layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=128)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for attr in ("attention_dropout", "attention_probs_dropout_prob"):
        if hasattr(model.config, attr):
            setattr(model.config, attr, 0.0)
    return model.train()


def _ids(kind, n, batch=2):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, n, dtype=torch.long)
    if kind == "bert":
        mask[1, n - 7:] = 0  # padding: the last tile of row 1 sees fewer keys
    return {"input_ids": torch.randint(3, 128, (batch, n), generator=g), "attention_mask": mask}


def _logits(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_exact_mode_with_tiles_equals_eager_and_every_gradient(kind):
    # N = 100 with T = 64: two tiles, the last one short (36 queries)
    report = compare_with_eager(_hf(kind), kwargs=_ids(kind, 100), pick=_logits,
                                options={"attention_query_tile": 64, "ffn": "dense"})
    sites = report.rewritten("attention")
    assert len(sites) == 2 and all(s.plan.T == 64 and s.plan.mode == "exact" for s in sites), str(report)


def test_training_step_at_default_density_with_tiles_has_finite_loss():
    model, n = _hf("llama"), 192
    options = {"attention_query_tile": 64, "attention_min_keys": 16, "min_seq_len": 0, "ffn": "dense",
               "inner_backend": "aot_eager"}
    spt_compile.report.clear_reports()
    torch._dynamo.reset()
    out = _logits(torch.compile(model, backend="spt", options=options)(**_ids("llama", n)))
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    loss = (out.float() * cot).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    sites = spt_compile.last_report().rewritten("attention")
    # default density 0.25: L_max = max(16, ceil(0.25 * 192)) = 48 < 192 keys, so the tiles really are sparse
    assert len(sites) == 2 and all((s.plan.T, s.plan.L, s.plan.mode) == (64, 48, "sparse") for s in sites)


def test_shared_kv_lists_reach_the_op_on_gqa_and_exact_mode_still_equals_eager():
    """attention_share_kv_lists: planned (and passed to the op) only where there is something to share (T >= 1,
    H > Hkv); the HF LLaMA (4 query heads, 2 kv heads) then trains with one list per kv head and tile, and in
    exact mode still equals eager (output and every gradient)."""
    site, _ = _site("causal", 300, attention_query_tile=16, attention_share_kv_lists=True)
    assert site.plan.share_kv_lists is True and site.params["share_kv_lists"] is True  # the toy: 4 heads, 2 kv
    torch.manual_seed(0)
    mha = ToyTransformer(ToyConfig(attention="sdpa", mask="causal", kv_heads=4))
    x, lengths = torch.randn(1, 300, 32), torch.tensor([300])
    for tile, share in ((16, True), (0, True), (16, False)):  # nothing to share without GQA or without tiles
        report = spt_compile.explain(mha if tile else _toy(), x, lengths, options={
            "min_seq_len": 0, "ffn": "dense", "attention_query_tile": tile, "attention_share_kv_lists": share})
        [site] = report.rewritten("attention")
        assert site.plan.share_kv_lists is False and "share_kv_lists" not in site.params
    model, n = _hf("llama"), 192
    options = {"attention_query_tile": 64, "attention_min_keys": 16, "min_seq_len": 0, "ffn": "dense",
               "attention_share_kv_lists": True}
    got = []
    calls, _ = _op_calls(model, (), options, kwargs=_ids("llama", n), out=got)
    _logits(got[0]).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert len(calls) == 2 and all(a["share_kv_lists"] is True for a in calls), calls
    report = compare_with_eager(_hf("llama"), kwargs=_ids("llama", 100), pick=_logits,
                                options={"attention_query_tile": 64, "ffn": "dense", "attention_share_kv_lists": True})
    sites = report.rewritten("attention")
    assert len(sites) == 2 and all(s.plan.share_kv_lists and s.plan.mode == "exact" for s in sites), str(report)
    assert "share_kv_lists=True" in str(report)


# --- report and savings ---------------------------------------------------------------------------------

def test_report_shows_tile_floor_and_tile_lengths():
    site, report = _site("causal", 300, attention_query_tile=16, attention_min_keys=8)
    text = str(report)
    assert "T=16" in text and "L_min=8" in text and "L_tile=8..75" in text and "L=75" in text, text
    saved = report.to_dict()["savings"]
    assert saved, "no savings estimate for a rewritten tiled site"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tile", [1, 16, 24])
def test_savings_count_the_tiled_ops_own_slots(causal, tile):
    """pairs and idx bytes of the savings formulas against the op's idx: valid slots x the tile's queries."""
    b, h, n, d, density, floor = 1, 2, 100, 8, 0.25, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    _, idx, _ = OP(q, k, v, None, causal, d ** -0.5, density, 2, 8, 2, 0.0, None, 0, tile, floor)
    rows = torch.tensor([min(tile, n - s) for s in range(0, n, tile)])   # queries per tile, the last short
    measured = int(((idx >= 0).sum(-1) * rows).sum()) // (b * h)        # (query, slot) pairs per head
    assert tile_pairs(n, n, tile, density, floor, causal) == measured
    sizes = AttentionSizes(batch=b, heads=h, kv_heads=h, nq=n, nk=n, head_dim=d, v_dim=d, elem_bytes=4,
                           keys_kept=idx.shape[-1], exact=False, is_causal=causal, spelling="sdpa",
                           query_tile=tile, min_keys=floor, density=density, subspaces=2, centroids=8)
    saved, flops, _ = attention_estimates(sizes)
    assert flops.spt_value() == 6 * b * h * measured * 2 * d
    out_lse = b * h * n * d * 4 + 4 * b * h * n
    assert saved.spt_value() == out_lse + 4 * idx.numel()
