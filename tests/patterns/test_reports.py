"""Reports a user can read: the user's module paths, one record per site per compiled graph, last_report()
merging the latest compile's graphs, and the Plan behind every rewritten site."""
import functools

import pytest
import torch
from torch import nn

import spt_compile
from spt_compile.patterns.graph_utils import clean_module_path
from spt_compile.plan import AttentionPlan, FfnPlan

AOT = {"min_seq_len": 1, "inner_backend": "aot_eager"}


@pytest.mark.parametrize("raw,user", [
    ("L['self'].model.layers[0].mlp", "model.layers.0.mlp"),
    ("L['args'][0].model.layers.0.self_attn", "model.layers.0.self_attn"),
    ("L['self']._modules['model'].__dict__['_modules']['layers'][1]", "model.layers.1"),
    ("L['model'].blocks[1].attn", "blocks.1.attn"),
    ("L['self']._orig_mod.layers[0]", "layers.0"),
    ("L['self']", "<root>"),
])
def test_module_paths_are_the_users(raw, user):
    assert clean_module_path(raw) == user


class Block(nn.Module):
    def __init__(self, d=16, h=64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))

    def forward(self, x):
        return x + self.mlp(x)


class Decorated(nn.Module):
    """transformers-style: forward wrapped by a decorator that receives the module as args[0]."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    @staticmethod
    def _wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


Decorated.forward = Decorated._wrap(Decorated.forward)


def test_paths_through_a_decorated_forward_and_a_compiled_function():
    spt_compile.report.clear_reports()
    model = Decorated()
    torch.compile(model, backend="spt", options=AOT)(torch.randn(2, 4, 16))
    assert [s.module for s in spt_compile.last_report().sites] == ["layers.0.mlp", "layers.1.mlp"]

    def step(m, x):
        return m(x).sum()

    torch.compile(step, backend="spt", options=AOT)(Decorated(), torch.randn(2, 4, 16))
    assert [s.module for s in spt_compile.last_report().sites] == ["layers.0.mlp", "layers.1.mlp"]


def test_last_report_merges_the_latest_compile_and_keeps_its_plans():
    transformers = pytest.importorskip("transformers")
    from spt_compile import zoo
    spt_compile.report.clear_reports()
    zm = zoo.build("gpt2", seq=16)
    # a small L_min so that attention at 16 keys is really sparse (the default floor covers them all)
    options = {**AOT, "attention_min_keys": 4}
    out = torch.compile(zm.model, backend="spt", options=options)(**zm.inputs, labels=zm.inputs["input_ids"])
    out.loss.backward()
    assert len(spt_compile.last_reports()) >= 2  # the model graph and the loss function's graph
    report = spt_compile.last_report()
    assert len(report.graphs) == len(spt_compile.last_reports())
    assert len(report.rewritten("attention")) == 2 and len(report.rewritten("ffn")) == 2, str(report)
    for s in report.rewritten():
        assert isinstance(s.plan, AttentionPlan if s.kind == "attention" else FfnPlan)
        assert s.params == s.plan.display() and s.plan.mode == "sparse"
    # another model compiled afterwards is the latest compile; GPT-2's graphs are not merged into it
    torch.compile(Decorated(), backend="spt", options=AOT)(torch.randn(2, 4, 16))
    assert [s.kind for s in spt_compile.last_report().sites] == ["ffn", "ffn"]


def test_a_recompile_reports_each_site_once():
    spt_compile.report.clear_reports()
    compiled = torch.compile(Decorated(), backend="spt", options=AOT, dynamic=False)
    for n in (4, 6, 8):
        compiled(torch.randn(2, n, 16))
    assert len(spt_compile.last_reports()) == 3  # one per compiled graph
    report = spt_compile.last_report()
    assert len(report.sites) == 2 and all(s.shape.startswith("x[2,8,16]") for s in report.sites), str(report)


def test_exact_mode_is_one_formula():
    """Exact mode wherever L >= Nk, not only at density 1.0 (lowering/formulas.py decides it)."""
    from tests.toy_transformer import ToyConfig, ToyTransformer
    model = ToyTransformer(ToyConfig(attention="sdpa", mask="causal"))
    x, lengths = torch.randn(1, 3, 32), torch.tensor([3])
    report = spt_compile.explain(model, x, lengths, options={"min_seq_len": 0, "attention_density": 0.9,
                                                            "ffn_density": 0.99, "ffn_blocks": 4})
    att, ffn = report.sites
    assert att.plan.L == 3 and att.plan.mode == "exact", str(report)  # ceil(0.9 * 3) = 3 = Nk
    assert ffn.plan.k == 4 and ffn.plan.mode == "exact", str(report)  # round(0.99 * 4) = 4 = E
