"""Hypothesis: over random transformer configs, backend="spt" in exact mode (densities 1.0) equals eager —
output and every parameter gradient — within the dtype's tolerance (tests/helpers.py explains the numbers)."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import compare_with_eager
from tests.toy_transformer import ToyConfig, ToyTransformer


@st.composite
def configs(draw):
    head_dim = draw(st.sampled_from([8, 16]))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    attention = draw(st.sampled_from(["sdpa", "eager_div", "eager_mul_after_mask", "eager_prescaled",
                                      "eager_where", "eager_masked_fill"]))
    masks = ["causal", "padding"] + (["none"] if attention not in ("eager_where", "eager_masked_fill") else []) \
        + (["bool_padding"] if attention == "sdpa" else [])
    ffn_kind = draw(st.sampled_from(["plain", "gated", "conv1d"]))
    cfg = ToyConfig(hidden=heads * head_dim, heads=heads, kv_heads=kv_heads,
                    ffn_hidden=16 * draw(st.integers(1, 4)), ffn_kind=ffn_kind,
                    activation=draw(st.sampled_from(["relu", "gelu", "gelu_tanh", "silu", "swish", "new_gelu"])),
                    attention=attention, mask=draw(st.sampled_from(masks)),
                    softmax_fp32=draw(st.booleans()), layers=draw(st.integers(1, 2)))
    return cfg, draw(st.integers(4, 24)), draw(st.sampled_from([torch.float32, torch.bfloat16]))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configs(), st.integers(0, 2**16))
def test_exact_mode_equals_eager(case, seed):
    cfg, n, dtype = case
    torch.manual_seed(seed)
    model = ToyTransformer(cfg).to(dtype).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, cfg.hidden, generator=g).to(dtype)
    lengths = torch.tensor([n, int(torch.randint(1, n + 1, (), generator=g))])
    report = compare_with_eager(model, (x, lengths))
    assert len(report.rewritten("attention")) == cfg.layers, str(report)
    assert len(report.rewritten("ffn")) == cfg.layers, str(report)
