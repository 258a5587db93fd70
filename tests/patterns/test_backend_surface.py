"""The user surface: entry point, option validation, explain leaving the model alone, the CLI."""
import subprocess
import sys

import pytest
import torch

import spt_compile
from spt_compile.lowering import formulas
from spt_compile.options import OPTION_DOCS, SptOptions


def test_backend_spt_works_without_importing_spt_compile():
    code = (
        "import sys, torch\n"
        "assert 'spt_compile' not in sys.modules\n"
        "f = torch.compile(lambda x: torch.relu(x) * 2, backend='spt', options={'inner_backend': 'aot_eager'})\n"
        "y = f(torch.randn(4))\n"
        "assert 'spt_compile.backend' in sys.modules\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("options,needle", [
    ({"attention_densty": 0.5}, "unknown spt option(s) 'attention_densty'"),
    ({"attention_density": 0.0}, "'attention_density' must be a number in (0, 1]"),
    ({"attention_density": 1.5}, "'attention_density' must be a number in (0, 1]"),
    ({"ffn_density": float("nan")}, "'ffn_density'"),
    ({"ffn_density": True}, "'ffn_density'"),
    ({"attention": "sparse"}, "'attention' must be one of 'pq', 'dense'"),
    ({"ffn": "moe"}, "'ffn' must be one of 'routed', 'dense'"),
    ({"pq_subspaces": 0}, "'pq_subspaces' must be an integer"),
    ({"pq_centroids": 1}, "'pq_centroids' must be an integer in [2, 256]"),
    ({"pq_centroids": 16.0}, "'pq_centroids' must be an integer"),
    ({"min_seq_len": -1}, "'min_seq_len' must be an integer >= 0"),
    ({"ffn_blocks": 0}, "'ffn_blocks'"),
    ({"ffn_router": "learned"}, "'ffn_router' must be one of 'lowrank', 'oracle'"),
    ({"ffn_router_rank": 0}, "'ffn_router_rank'"),
    ({"ffn_router_refresh": 0}, "'ffn_router_refresh'"),
    ({"ffn_cluster": "yes"}, "'ffn_cluster' must be a bool"),
    ({"inner_backend": "eager"}, "'inner_backend' must be one of"),
    ("fast", "spt options must be a dict"),
])
def test_bad_options_raise_value_error_naming_them(options, needle):
    with pytest.raises(ValueError) as e:
        SptOptions.from_dict(options)
    assert needle in str(e.value)


def test_bad_options_fail_the_compile_with_the_value_error():
    f = torch.compile(lambda x: x + 1, backend="spt", options={"ffn_density": 2})
    with pytest.raises(Exception) as e:
        f(torch.randn(3))
    chain, err = [], e.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or getattr(err, "inner_exception", None)
    assert any(isinstance(x, ValueError) and "'ffn_density'" in str(x) for x in chain), chain


def test_every_option_is_documented_and_defaults_are_valid():
    assert set(OPTION_DOCS) == set(SptOptions().as_dict())
    assert SptOptions.from_dict(None) == SptOptions()


def test_explain_leaves_the_model_and_rng_alone():
    from tests.toy_transformer import ToyConfig, ToyTransformer
    cfg = ToyConfig(attention="eager_div", mask="causal", dropout=0.5)
    model = ToyTransformer(cfg).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, lengths = torch.randn(2, 8, cfg.hidden), torch.tensor([8, 5])
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    # a small L_min: at N=8 the default floor would cover every key and run the site exact
    options = {"min_seq_len": 0, "attention_min_keys": 1}
    report = spt_compile.explain(model, x, lengths, options=options)
    assert torch.equal(torch.rand(3), expected_next), "explain consumed the user's RNG"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert [s.kind for s in report.sites] == ["attention", "ffn"]
    att, ffn = report.sites
    assert att.module == "blocks.0.attn" and ffn.module == "blocks.0.ffn"
    assert att.source.startswith("toy_transformer.py:") and ffn.source.startswith("toy_transformer.py:")
    opts = SptOptions.from_dict(options)
    if opts.attention_query_tile:
        slots = formulas.attention_tile_slots(8, 8, opts.attention_density, opts.attention_min_keys,
                                               att.plan.is_causal)
    else:
        slots = formulas.attention_keys_kept(8, opts.attention_density)
    assert att.plan.mode == "sparse" and att.plan.L == slots < 8, att.plan  # fewer slots than the 8 keys
    text = str(report)
    assert "blocks.0.attn" in text and "rewritten" in text and f"L={slots}" in text


def test_cli_lists_options():
    out = subprocess.run([sys.executable, "-m", "spt_compile", "options"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for key in OPTION_DOCS:
        assert key in out.stdout
    bad = subprocess.run([sys.executable, "-m", "spt_compile", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage" in bad.stderr  # errors go to stderr
