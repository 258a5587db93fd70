"""The model zoo (spt_compile/zoo.py): per architecture and attention implementation,
- exact mode equals eager: output and every parameter gradient, and the same parameters get a gradient;
- completeness: every attention and FFN module of the model is accounted for (rewritten + dense), and here all
  are rewritten;
- a training step at the default densities (min_seq_len=1 and a small attention_min_keys so the tiny sequences are
  sparse): finite loss, and every trainable parameter gets a finite gradient.
Tiny configs (2 layers, hidden 64) and inner_backend="aot_eager": the zoo's share of CI stays within minutes."""
import pytest
import torch

import spt_compile
from spt_compile import zoo
from tests.helpers import compare_with_eager

pytest.importorskip("transformers")

CASES = [(name, impl) for name in zoo.names() for impl in zoo.attn_implementations(name)]
SEQ = 16
MIN_KEYS = 4  # <= ceil(0.25 * SEQ): the key lists keep ceil(density * allowed) keys, as at real lengths


def _counts(report, kind):
    return len(report.rewritten(kind)), len(report.dense(kind))


def test_zoo_covers_the_architectures_issue_8_names():
    kinds = {zoo.family(n) for n in zoo.names()}
    assert len(zoo.names()) >= 12 and kinds == {"decoder", "encoder", "encoder-decoder", "vision"}
    with pytest.raises(ValueError, match="unknown zoo model 'nope'"):
        zoo.build("nope")
    with pytest.raises(ValueError, match="no attn_implementation 'flash'"):
        zoo.build("gpt2", attn_implementation="flash")


@pytest.mark.parametrize("name,impl", CASES)
def test_exact_mode_equals_eager_and_every_site_is_accounted_for(name, impl):
    zm = zoo.build(name, seq=SEQ, attn_implementation=impl)
    report = compare_with_eager(zm.model, kwargs=zm.inputs, pick=zm.output, same_grad_set=True)
    for kind, expected in zm.expected.items():
        rewritten, dense = _counts(report, kind)
        assert rewritten + dense == expected, f"{kind}: {rewritten} + {dense} != {expected}\n{report}"
        assert rewritten == expected, str(report)
    assert all(s.plan is not None and s.plan.mode == "exact" for s in report.rewritten()), str(report)
    assert not any(s.module.startswith(("L.", "L[")) or "_modules" in s.module for s in report.sites), str(report)


@pytest.mark.parametrize("name", zoo.names())
def test_training_step_at_default_densities(name):
    impl = "sdpa" if "sdpa" in zoo.attn_implementations(name) else zoo.attn_implementations(name)[0]
    zm = zoo.build(name, seq=SEQ, attn_implementation=impl)
    spt_compile.report.clear_reports()
    # attention_min_keys: the default floor L_min covers every one of SEQ keys (exact mode); a small one keeps the
    # default density really sparse at this tiny length
    options = {"min_seq_len": 1, "attention_min_keys": MIN_KEYS, "inner_backend": "aot_eager"}
    compiled = torch.compile(zm.model, backend="spt", options=options)
    out = zm.output(compiled(**zm.inputs))
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    loss = (out.float() * cot).mean()
    loss.backward()
    assert torch.isfinite(loss)
    report = spt_compile.last_report()
    assert len(report.rewritten("attention")) == zm.expected["attention"], str(report)
    assert len(report.rewritten("ffn")) == zm.expected["ffn"], str(report)
    assert all(s.plan.mode == "sparse" for s in report.rewritten()), str(report)
    missing = [n for n, p in zm.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"trainable parameters without a gradient: {missing}"
    bad = [n for n, p in zm.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
