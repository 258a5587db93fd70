"""Completeness: every d -> H -> d projection chain and every softmax -> ·V chain is rewritten or reported dense
with the matcher step that failed, whatever its spelling; non-candidates (LoRA pairs, routers, LM heads) are not
listed. Rewritten spellings are checked against eager in exact mode (outputs and every gradient)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spt_compile
from tests.helpers import compare_with_eager

D, H = 16, 64


def _x(n=6, d=D):
    return torch.randn(2, n, d, generator=torch.Generator().manual_seed(0))


class Mlp(nn.Module):
    """up -> act -> (dropout) -> down, the activation given as a module or a callable."""

    def __init__(self, act, dropout=0.0):
        super().__init__()
        self.up, self.down, self.act, self.drop = nn.Linear(D, H), nn.Linear(H, D), act, nn.Dropout(dropout)

    def forward(self, x):
        return self.down(self.drop(self.act(self.up(x))))


def _act2fn(name):
    from transformers.activations import ACT2FN
    return ACT2FN[name]


@pytest.mark.parametrize("make,expected", [
    (lambda: nn.ReLU(), "relu"),
    (lambda: nn.SiLU(), "silu"),
    (lambda: nn.GELU(), "gelu"),
    (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
    (lambda: (lambda h: F.relu(h, inplace=False)), "relu"),
    (lambda: (lambda h: F.gelu(h, approximate="none")), "gelu"),
    (lambda: _act2fn("gelu"), "gelu"),
    (lambda: _act2fn("gelu_new"), "gelu_tanh"),
    (lambda: _act2fn("silu"), "silu"),
    (lambda: _act2fn("relu"), "relu"),
])
def test_activation_spellings_modules_and_kwargs(make, expected):
    torch.manual_seed(0)
    report = compare_with_eager(Mlp(make()), (_x(),))
    [site] = report.sites
    assert site.status == "rewritten" and site.params["act"] == expected, str(report)


def test_dropout_between_projections():
    torch.manual_seed(0)
    report = compare_with_eager(Mlp(nn.GELU(), dropout=0.0), (_x(),))  # p=0: an identity
    assert report.sites[0].status == "rewritten", str(report)
    report = compare_with_eager(Mlp(nn.GELU(), dropout=0.1).eval(), (_x(),))  # eval: an identity
    assert report.sites[0].status == "rewritten", str(report)
    report = spt_compile.explain(Mlp(nn.GELU(), dropout=0.1).train(), _x())
    [site] = report.sites
    assert site.status == "dense" and site.near_miss == "dropout" and "p=0.1" in site.reason, str(report)


class FusedGateUp(nn.Module):
    def __init__(self, split="chunk"):
        super().__init__()
        self.split = split
        self.gate_up, self.down = nn.Linear(D, 2 * H, bias=False), nn.Linear(H, D, bias=False)

    def forward(self, x):
        gu = self.gate_up(x)
        if self.split == "chunk":
            gate, up = gu.chunk(2, dim=-1)
        elif self.split == "split":
            gate, up = gu.split(H, dim=-1)
        else:
            gate, up = gu[..., :H], gu[..., H:]
        return self.down(F.silu(gate) * up)


@pytest.mark.parametrize("split", ["chunk", "split", "slice"])
def test_fused_gate_up_projection_is_split_and_rewritten(split):
    torch.manual_seed(0)
    report = compare_with_eager(FusedGateUp(split), (_x(),))
    [site] = report.sites
    assert site.status == "rewritten" and site.params["gated"] and site.params["act"] == "silu", str(report)
    report = compare_with_eager(FusedGateUp(split), (_x(),), options={"ffn_density": 0.5, "ffn_blocks": 4},
                                tol=dict(rtol=1e9, atol=1e9))  # sparse: runs (forward and backward), not exact
    assert report.sites[0].status == "rewritten"


class Odd(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.up, self.down, self.norm = nn.Linear(D, H), nn.Linear(H, D), nn.LayerNorm(H)

    def forward(self, x):
        h = self.up(x)
        h = torch.tanh(h) if self.kind == "tanh" else F.gelu(self.norm(h))
        return self.down(h)


@pytest.mark.parametrize("kind,step", [("tanh", "activation"), ("norm", "region")])
def test_unsupported_ffn_chains_are_near_misses_naming_the_step(kind, step):
    report = compare_with_eager(Odd(kind), (_x(),))
    [site] = report.sites
    assert site.kind == "ffn" and site.status == "dense" and site.near_miss == step, str(report)
    assert f"near miss at step '{step}'" in str(report)


class NotCandidates(nn.Module):
    """A LoRA-style low-rank pair d -> r -> d, a router d -> E, an LM head d -> V: none is an FFN."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, 4, bias=False), nn.Linear(4, D, bias=False)
        self.router, self.head = nn.Linear(D, 8), nn.Linear(D, 100)

    def forward(self, x):
        x = x + self.b(self.a(x))
        return self.head(x).float().log_softmax(-1), self.router(x).softmax(-1)


def test_low_rank_pairs_routers_and_lm_heads_are_not_candidates():
    report = spt_compile.explain(NotCandidates(), _x())
    assert report.sites == [], str(report)


def test_lora_adapted_ffn_is_reported_with_the_reason():
    peft = pytest.importorskip("peft")

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
            self.down_proj = nn.Linear(H, D, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    for targets in (["gate_proj", "up_proj", "down_proj"], ["down_proj"]):
        model = peft.get_peft_model(Gated(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        report = spt_compile.explain(model, _x())
        [site] = report.sites
        # the routed FFN op takes LoRA adapters (patterns/lora.py): rewritten, the report names the adapters
        assert site.status == "rewritten" and "LoRA on" in site.reason, str(report)
        assert "down (r=4)" in site.reason


class Alibi(nn.Module):
    """BLOOM-style eager attention in [B*H, N, D] with the ALiBi bias folded into the score GEMM (baddbmm)."""

    def __init__(self, heads=2, view=False):
        super().__init__()
        self.h, self.view = heads, view
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.slopes = torch.tensor([2.0 ** -(i + 1) for i in range(heads)])

    def forward(self, x):
        b, n, _ = x.shape
        hd = D // self.h
        q, k, v = self.qkv(x).view(b, n, 3, self.h, hd).permute(2, 0, 3, 1, 4).reshape(3, b * self.h, n, hd)
        alibi = (self.slopes[:, None] * torch.arange(n)[None, :]).repeat(b, 1)[:, None, :]  # [B*H, 1, N]
        s = alibi.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=1.0 / math.sqrt(hd))
        if self.view:  # BLOOM views to [B, H, N, N] for the mask and back: not matched yet
            s = s.view(b, self.h, n, n)
            p = F.softmax(s, dim=-1).view(b * self.h, n, n)
        else:
            p = F.softmax(s, dim=-1)
        out = torch.bmm(p, v).view(b, self.h, n, hd).transpose(1, 2).reshape(b, n, D)
        return self.o(out)


def test_baddbmm_alibi_attention_is_rewritten():
    torch.manual_seed(0)
    report = compare_with_eager(Alibi(), (_x(),))
    [site] = report.sites
    assert site.kind == "attention" and site.status == "rewritten", str(report)


def test_unmatched_attention_spellings_are_near_misses():
    report = spt_compile.explain(Alibi(view=True), _x(), options={"min_seq_len": 0})
    [site] = report.sites
    assert site.status == "dense" and site.near_miss == "weights", str(report)

    class Einsum(nn.Module):
        def forward(self, q, k, v):
            return torch.einsum("bhqk,bhkd->bhqd", (q @ k.transpose(-1, -2)).softmax(-1), v)

    q = torch.randn(1, 2, 8, 4)
    report = spt_compile.explain(Einsum(), q, q, q, options={"min_seq_len": 0})
    [site] = report.sites
    assert site.status == "dense" and site.near_miss == "weights" and "einsum" in site.reason


class FusedQkv(nn.Module):
    """nanoGPT (split + SDPA) and timm-ViT (reshape/permute/unbind + prescaled eager) spellings."""

    def __init__(self, style, heads=2):
        super().__init__()
        self.style, self.h = style, heads
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        hd = D // self.h
        if self.style == "nanogpt":
            q, k, v = self.c_attn(x).split(D, dim=2)
            q, k, v = (t.view(b, n, self.h, hd).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            qkv = self.c_attn(x).reshape(b, n, 3, self.h, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
            y = attn.softmax(dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, n, D))


@pytest.mark.parametrize("style", ["nanogpt", "timm"])
def test_attention_from_fused_qkv_projection(style):
    torch.manual_seed(0)
    report = compare_with_eager(FusedQkv(style), (_x(),))
    [site] = report.sites
    assert site.status == "rewritten", str(report)


class BrokenMlp(nn.Module):
    def __init__(self, where):
        super().__init__()
        self.where = where
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        h = self.up(x)
        if self.where == "before_act":
            torch._dynamo.graph_break()
        h = F.gelu(h)
        if self.where == "after_act":
            torch._dynamo.graph_break()
        return self.down(h)


@pytest.mark.parametrize("where", ["before_act", "after_act"])
def test_ffn_cut_by_a_graph_break_is_reported_once(where):
    torch.manual_seed(0)
    report = compare_with_eager(BrokenMlp(where), (_x(),))
    ffn = [s for s in report.sites if s.kind == "ffn"]
    assert len(ffn) == 1 and ffn[0].status == "dense" and ffn[0].near_miss == "cut", str(report)
    assert "cut by a graph break/split" in ffn[0].reason
    assert ffn[0].module == "<root>", str(report)  # the module holding the projections (here the root)
