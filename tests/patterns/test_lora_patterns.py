"""LoRA projections written by hand (spt_compile/patterns/lora.py): `base(x) + s * B(A(dropout(x)))` on any
subset of gate/up/down, Conv1D-style bases, several adapters; the site is rewritten and exact mode equals eager
(output and every gradient, frozen bases get none); a DoRA-style term stays dense and says DoRA."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import compare_with_eager


class Lora(nn.Module):
    """y = base(x) + scale * B(A(drop(x))), optionally with a second adapter; `spelling` varies how it is written."""

    def __init__(self, n_in, n_out, r=4, scale=2.0, spelling="mul", second=False, conv1d=False, dora=False):
        super().__init__()
        self.conv1d, self.spelling, self.scale, self.dora = conv1d, spelling, scale, dora
        if conv1d:   # GPT-2's Conv1D: weight stored [in, out], addmm on the flattened input
            self.weight = nn.Parameter(torch.randn(n_in, n_out) * n_in ** -0.5)
            self.bias = nn.Parameter(torch.randn(n_out) * 0.1)
        else:
            self.base = nn.Linear(n_in, n_out)
        self.A, self.B = nn.Linear(n_in, r, bias=False), nn.Linear(r, n_out, bias=False)
        nn.init.normal_(self.B.weight, std=0.2)
        self.A2 = nn.Linear(n_in, 2, bias=False) if second else None
        self.B2 = nn.Linear(2, n_out, bias=False) if second else None
        if dora:
            self.magnitude = nn.Parameter(torch.ones(n_out))
        for p in (self.base.parameters() if not conv1d else (self.weight, self.bias)):
            p.requires_grad_(False)   # a frozen base, as in LoRA fine-tuning

    def _base(self, x):
        if self.conv1d:
            return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)
        return self.base(x)

    def forward(self, x):
        out = self._base(x)
        if self.dora:   # DoRA-like: the adapter term scaled by a learned magnitude over a weight norm
            norm = (self.base.weight + self.scale * self.B.weight @ self.A.weight).norm(dim=1).detach()
            return out + (self.magnitude / norm - 1) * out + (self.magnitude / norm) * self.B(self.A(x)) * self.scale
        term = self.B(self.A(F.dropout(x, 0.0, self.training)))
        if self.spelling == "mul":
            out = out + term * self.scale
        elif self.spelling == "rmul":
            out = self.scale * term + out
        else:
            out = out + term / (1.0 / self.scale)
        if self.A2 is not None:
            out = out + self.B2(self.A2(x)) * 0.5
        return out


class Mlp(nn.Module):
    def __init__(self, d=32, h=128, gated=True, adapted=("gate", "up", "down"), **kw):
        super().__init__()
        self.gated = gated

        def proj(name, n_in, n_out):
            if name in adapted:
                return Lora(n_in, n_out, **kw)
            lin = nn.Linear(n_in, n_out)
            lin.requires_grad_(False)
            return lin
        self.gate = proj("gate", d, h)
        self.up = proj("up", d, h) if gated else None
        self.down = proj("down", h, d)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.gated else F.gelu(self.gate(x))
        return self.down(h)


def _check(model, rewritten=True):
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    report = compare_with_eager(model.train(), (x,), same_grad_set=True)
    ffn = [s for s in report.sites if s.kind == "ffn"]
    assert len(ffn) == 1, str(report)
    assert (ffn[0].status == "rewritten") == rewritten, str(report)
    return ffn[0]


@pytest.mark.parametrize("adapted", [("gate", "up", "down"), ("down",), ("up",), ("gate", "down")])
@pytest.mark.parametrize("spelling", ["mul", "rmul", "div"])
def test_hand_written_lora_is_rewritten_and_exact(adapted, spelling):
    torch.manual_seed(0)
    _check(Mlp(adapted=adapted, spelling=spelling))


def test_conv1d_base_and_ungated():
    torch.manual_seed(0)
    _check(Mlp(gated=False, adapted=("gate", "down"), conv1d=True))


def test_several_adapters_on_one_projection():
    torch.manual_seed(0)
    _check(Mlp(adapted=("gate", "up", "down"), second=True))


def test_dora_like_term_stays_dense_and_says_dora():
    torch.manual_seed(0)
    site = _check(Mlp(adapted=("up",), dora=True), rewritten=False)
    assert "DoRA" in site.reason, site.reason
