"""Hypothesis, at the model level: over random spellings of the same transformer block (activation as a module,
a functional call with keyword arguments or a transformers ACT2FN object; separate or fused gate+up split by
chunk or slicing; dropout between the projections; every attention spelling of the toy model), every attention
and every FFN is reported exactly once, rewritten unless the spelling is one the op cannot take (then dense with
the failed step), and exact mode equals eager (output and every gradient)."""
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tests.helpers import compare_with_eager
from tests.toy_transformer import Attention, ToyConfig

ACTS = {
    "relu": [lambda: nn.ReLU(), lambda: (lambda h: F.relu(h, inplace=False))],
    "gelu": [lambda: nn.GELU(), lambda: (lambda h: F.gelu(h, approximate="none")), lambda: _act2fn("gelu")],
    "gelu_tanh": [lambda: nn.GELU(approximate="tanh"), lambda: _act2fn("gelu_new")],
    "silu": [lambda: nn.SiLU(), lambda: _act2fn("silu"), lambda: (lambda h: h * torch.sigmoid(h))],
}


def _act2fn(name):
    from transformers.activations import ACT2FN
    return ACT2FN[name]


class SpelledFfn(nn.Module):
    def __init__(self, d, h, act, layout, dropout):
        super().__init__()
        self.layout, self.act, self.drop = layout, act, nn.Dropout(dropout)
        if layout == "plain":
            self.up = nn.Linear(d, h)
        elif layout == "gated":
            self.gate, self.up = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        else:  # fused_chunk / fused_slice
            self.gate_up = nn.Linear(d, 2 * h, bias=False)
        self.down, self.h = nn.Linear(h, d), h

    def forward(self, x):
        if self.layout == "plain":
            hid = self.act(self.up(x))
        elif self.layout == "gated":
            hid = self.act(self.gate(x)) * self.up(x)
        else:
            gu = self.gate_up(x)
            g, u = gu.chunk(2, dim=-1) if self.layout == "fused_chunk" else (gu[..., :self.h], gu[..., self.h:])
            hid = self.act(g) * u
        return self.down(self.drop(hid))


class Model(nn.Module):
    def __init__(self, cfg: ToyConfig, ffn_args, layers):
        super().__init__()
        self.cfg = cfg
        self.attn = nn.ModuleList(Attention(cfg) for _ in range(layers))
        self.ffn = nn.ModuleList(SpelledFfn(cfg.hidden, cfg.ffn_hidden, *ffn_args) for _ in range(layers))
        self.norm = nn.LayerNorm(cfg.hidden)

    def forward(self, x):
        b, n, _ = x.shape
        pos = torch.arange(n)
        causal = (pos[None, :] <= pos[:, None])[None, None].expand(b, 1, n, n)
        additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(x.dtype).min)
        for attn, ffn in zip(self.attn, self.ffn):
            x = x + attn(self.norm(x), causal, additive)[0]
            x = x + ffn(self.norm(x))
        return x


@st.composite
def models(draw):
    act_name = draw(st.sampled_from(sorted(ACTS)))
    act = draw(st.sampled_from(ACTS[act_name]))()
    layout = draw(st.sampled_from(["plain", "gated", "fused_chunk", "fused_slice"]))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    attention = draw(st.sampled_from(["sdpa", "eager_div", "eager_mul_after_mask", "eager_prescaled",
                                      "eager_where", "eager_masked_fill"]))
    cfg = ToyConfig(hidden=16, heads=2, kv_heads=draw(st.sampled_from([1, 2])), ffn_hidden=32,
                    attention=attention, mask="causal")
    train = draw(st.booleans())
    return cfg, (act, layout, dropout), draw(st.integers(1, 2)), train, act_name


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(models(), st.integers(4, 12))
def test_every_site_reported_once_and_exact_when_rewritten(case, n):
    cfg, ffn_args, layers, train, act_name = case
    torch.manual_seed(n)
    model = Model(cfg, ffn_args, layers).train(train)
    x = torch.randn(2, n, cfg.hidden, generator=torch.Generator().manual_seed(n))
    dropout_active = train and ffn_args[2] > 0
    if dropout_active:  # eager and the compiled model draw different dropout masks: compare the report only
        import spt_compile
        report = spt_compile.explain(model, x, options={"min_seq_len": 0})
    else:
        report = compare_with_eager(model, (x,))
    att, ffn = report.rewritten("attention") + report.dense("attention"), report.rewritten("ffn") + report.dense("ffn")
    assert len(att) == layers and len(ffn) == layers, str(report)
    assert len(report.rewritten("attention")) == layers, str(report)
    if dropout_active:
        assert all(s.status == "dense" and s.near_miss == "dropout" for s in ffn), str(report)
    else:
        assert all(s.status == "rewritten" and s.params["act"] == act_name for s in ffn), str(report)
        assert all(s.params["gated"] == (ffn_args[1] != "plain") for s in ffn), str(report)
