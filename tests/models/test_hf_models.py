"""Real Hugging Face architectures (random weights from small configs): every layer's attention and FFN is
rewritten, exact mode equals eager (output and every parameter gradient), a training step at the default
densities runs through inductor, and backend="spt" adds no graph breaks."""
import pytest
import torch

import spt_compile
from spt_compile.inspect_models import small_hf_model
from spt_compile.lowering.formulas import attention_keys_kept, attention_tile_slots
from spt_compile.options import SptOptions
from tests.helpers import compare_with_eager

transformers = pytest.importorskip("transformers")

LAYERS = 2
FAMILIES = ["gpt2", "bert", "llama"]


def _model(kind, impl, dropout=0.0):
    torch.manual_seed(0)
    model = small_hf_model(kind, impl, layers=LAYERS, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=128)
    if dropout == 0.0:  # eager dropout and the op's dropout draw different masks: compare without it
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        for attr in ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout"):
            if hasattr(model.config, attr):
                setattr(model.config, attr, 0.0)
    return model.train()


def _inputs(kind, batch=2, n=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    if kind == "bert":
        mask[1, n - 5:] = 0  # BERT-style padding
    return {"input_ids": ids, "attention_mask": mask}


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _default_slots(n, is_causal):
    """idx slots of self-attention over n tokens under the default options."""
    opts = SptOptions()
    if opts.attention_query_tile:
        return attention_tile_slots(n, n, opts.attention_density, opts.attention_min_keys, is_causal)
    return attention_keys_kept(n, opts.attention_density)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_exact_mode_equals_eager_and_every_layer_is_rewritten(kind, impl):
    report = compare_with_eager(_model(kind, impl), kwargs=_inputs(kind), pick=_out)
    assert len(report.rewritten("attention")) == LAYERS, str(report)
    assert len(report.rewritten("ffn")) == LAYERS, str(report)
    assert not report.dense(), str(report)
    spelling = {s.spelling for s in report.rewritten("attention")}
    assert spelling == ({"sdpa"} if impl == "sdpa" else {"eager"})


def _count_graphs(model, inputs, backend, options=None):
    calls = []

    def counting(gm, example_inputs, **kw):
        calls.append(gm)
        return gm.forward

    torch._dynamo.reset()
    if backend == "spt":
        spt_compile.report.clear_reports()
        torch.compile(model, backend="spt", options={**(options or {}), "inner_backend": "aot_eager"})(**inputs)
        return len(spt_compile.last_reports())
    torch.compile(model, backend=counting)(**inputs)
    return len(calls)


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_step_at_default_densities_through_inductor(kind):
    """Default options (attention_density 0.25, ffn_density 0.5, min_seq_len 128) on 128 tokens, inductor."""
    model = _model(kind, "sdpa", dropout=0.1)
    inputs = _inputs(kind, batch=2, n=128)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compiled = torch.compile(model, backend="spt")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = _out(compiled(**inputs))
    # a random projection, not a sum of squares: BERT ends in a LayerNorm, whose output's mean square is constant
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    loss = (out.float() * cot).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    report = spt_compile.last_reports()[-1]
    assert len(report.rewritten("attention")) == LAYERS and len(report.rewritten("ffn")) == LAYERS, str(report)
    for s in report.rewritten("attention"):  # the default tile and floor: L from lowering/formulas.py, sparse
        assert s.plan.mode == "sparse" and s.params["L"] == _default_slots(128, s.plan.is_causal) < 128, str(report)
    assert all(s.params["k"] == 8 for s in report.rewritten("ffn"))          # round(0.5 * 16)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    # every parameter on the loss path learns (BERT's pooler is not on it)
    frozen = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach()) and "pooler" not in n]
    assert not frozen, f"parameters without an update: {frozen}"
    # graph breaks are decided by Dynamo before any backend runs: spt must not add any
    assert _count_graphs(model, inputs, "spt") == _count_graphs(model, inputs, "count")
