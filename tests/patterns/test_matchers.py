"""Every attention and FFN spelling the matchers claim to handle: found, rewritten, and exact mode equals eager."""
import dataclasses

import pytest
import torch

from tests.helpers import compare_with_eager
from tests.toy_transformer import ToyConfig, ToyTransformer


def _inputs(cfg: ToyConfig, batch=2, n=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, cfg.hidden, generator=g, dtype=dtype)
    lengths = torch.tensor([n, max(1, n - 3)])[:batch]
    return x, lengths


def _check(cfg: ToyConfig, expect_attention="rewritten", expect_ffn="rewritten", **kw):
    torch.manual_seed(0)
    model = ToyTransformer(cfg).train()
    x, lengths = _inputs(cfg)
    pick = (lambda o: o[0]) if cfg.return_weights else (lambda o: o)
    report = compare_with_eager(model, (x, lengths), pick=pick, **kw)
    att = [s for s in report.sites if s.kind == "attention"]
    ffn = [s for s in report.sites if s.kind == "ffn"]
    assert len(att) == cfg.layers and len(ffn) == cfg.layers, str(report)
    assert all(s.status == expect_attention for s in att), str(report)
    assert all(s.status == expect_ffn for s in ffn), str(report)
    return report


ATTENTION_SPELLINGS = ["sdpa", "eager_div", "eager_mul_after_mask", "eager_prescaled", "eager_where",
                       "eager_masked_fill"]


# every spelling once with a padding mask, every mask kind with the sdpa and one eager spelling
_ATTENTION_CASES = sorted({(a, "padding") for a in ATTENTION_SPELLINGS} |
                          {(a, m) for a in ("sdpa", "eager_div") for m in ("none", "causal")} |
                          {("eager_masked_fill", "causal"), ("eager_mul_after_mask", "causal")})


@pytest.mark.parametrize("attention,mask", _ATTENTION_CASES)
def test_attention_spellings(attention, mask):
    _check(ToyConfig(attention=attention, mask=mask))


def test_sdpa_bool_mask_and_gqa():
    report = _check(ToyConfig(attention="sdpa", mask="bool_padding", heads=4, kv_heads=1))
    assert report.sites[0].params["kv_heads"] == 1


def test_repeat_kv_is_undone():
    """HF's repeat_kv is folded back: the op sees the kv heads once (GQA), not the repeated copies."""
    report = _check(ToyConfig(attention="eager_div", mask="causal", heads=4, kv_heads=2))
    assert report.sites[0].params["kv_heads"] == 2


def test_softmax_in_fp32_then_cast_back():
    _check(ToyConfig(attention="eager_div", mask="padding", softmax_fp32=True))


def test_attention_dropout_is_matched_with_its_probability():
    from spt_compile.explain import explain
    cfg = ToyConfig(attention="eager_div", mask="causal", dropout=0.1)
    model = ToyTransformer(cfg).train()
    report = explain(model, *_inputs(cfg), options={"min_seq_len": 0})
    assert report.sites[0].status == "rewritten" and report.sites[0].params["dropout"] == 0.1
    report = explain(model.eval(), *_inputs(cfg), options={"min_seq_len": 0})
    assert report.sites[0].params["dropout"] == 0.0


def test_escaping_attention_weights_stay_dense():
    cfg = ToyConfig(attention="eager_div", mask="causal", return_weights=True)
    report = _check(cfg, expect_attention="dense")
    assert "used outside the attention" in report.sites[0].reason


_FFN_CASES = [("plain", a) for a in ("relu", "gelu", "gelu_tanh", "silu", "swish", "new_gelu")] + \
             [("gated", "silu"), ("gated", "gelu"), ("gated", "swish"), ("conv1d", "new_gelu"), ("conv1d", "relu")]


@pytest.mark.parametrize("ffn_kind,activation", _FFN_CASES)
def test_ffn_spellings(ffn_kind, activation):
    report = _check(ToyConfig(ffn_kind=ffn_kind, activation=activation))
    site = [s for s in report.sites if s.kind == "ffn"][0]
    expected = {"swish": "silu", "new_gelu": "gelu_tanh"}.get(activation, activation)
    assert site.params["act"] == expected
    assert site.params["gated"] == (ffn_kind == "gated")


def test_ffn_with_escaping_intermediate_stays_dense():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            h = torch.relu(self.up(x))
            return self.down(h) + h.mean(-1, keepdim=True)

    report = compare_with_eager(Leaky(), (torch.randn(4, 8),))
    assert [s.status for s in report.sites] == ["dense"]
    assert "used outside the FFN" in report.sites[0].reason


def test_unknown_activation_chains_are_near_misses():
    class TwoLinears(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))  # tanh is not an FFN activation we route

    report = compare_with_eager(TwoLinears(), (torch.randn(4, 8),))
    [site] = report.sites  # a d -> H -> d chain is a candidate: listed dense, naming the failed step
    assert site.status == "dense" and site.near_miss == "activation", str(report)


def test_options_turn_rewrites_off_and_say_why():
    cfg = ToyConfig(attention="sdpa", mask="causal")
    report = _check(cfg, expect_attention="dense", expect_ffn="dense",
                    options={"attention": "dense", "ffn": "dense"})
    assert {s.reason for s in report.sites} == {"attention='dense' in options", "ffn='dense' in options"}


def test_min_seq_len_keeps_short_attention_dense():
    report = _check(ToyConfig(), expect_attention="dense", options={"min_seq_len": 64})
    assert "< min_seq_len=64" in report.sites[0].reason


def test_parameters_are_adjusted_and_reported():
    # head dim 8 with pq_subspaces 3 -> 2; hidden 64 with ffn_blocks 24 -> 16
    report = _check(ToyConfig(), options={"pq_subspaces": 3, "ffn_blocks": 24})
    att, ffn = report.sites
    assert att.params["M"] == 2 and "pq_subspaces 3 -> 2" in att.reason
    assert ffn.params["E"] == 16 and "ffn_blocks 24 -> 16" in ffn.reason


def test_sparse_mode_runs_forward_and_backward():
    cfg = ToyConfig(attention="sdpa", mask="causal", ffn_kind="gated", activation="silu")
    model = ToyTransformer(cfg).train()
    x, lengths = _inputs(cfg, n=16)
    x.requires_grad_(True)
    compiled = torch.compile(model, backend="spt", options={"min_seq_len": 0, "inner_backend": "aot_eager"})
    out = compiled(x, lengths)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
