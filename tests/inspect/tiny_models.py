"""Tiny models for the inspection tests; also usable as CLI factories (`tests/inspect/tiny_models.py:factory`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm block: eager attention (softmax over `softmax_dim`) and a GELU FFN."""

    def __init__(self, hidden=32, heads=2, ffn=None, softmax_dim=-1):
        ffn = ffn or 2 * hidden  # widening: an FFN candidate
        super().__init__()
        self.heads, self.softmax_dim = heads, softmax_dim
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.ModuleDict({n: nn.Linear(hidden, hidden) for n in ("q", "k", "v", "o")})
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def attend(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731  [B, H, N, Dh]
        q, k, v = (split(self.qkv[c](x)) for c in "qkv")
        scores = (q @ k.transpose(-2, -1)) / (d // self.heads) ** 0.5                # [B, H, N, N]
        out = scores.softmax(dim=self.softmax_dim) @ v
        return self.qkv["o"](out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x):
        x = x + self.attend(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Tiny(nn.Module):
    def __init__(self, layers=2, hidden=32, softmax_dim=-1, graph_break=False):
        super().__init__()
        self.graph_break = graph_break
        self.blocks = nn.ModuleList(Block(hidden, softmax_dim=softmax_dim) for _ in range(layers))

    def forward(self, x):
        x = self.blocks[0](x)
        if self.graph_break:
            torch._dynamo.graph_break()  # two Dynamo graphs (not inside the loop: Dynamo resumes after it)
        for blk in self.blocks[1:]:
            x = blk(x)
        return x


def factory(layers=2, hidden=32, seq=32, batch=2):
    torch.manual_seed(0)
    return Tiny(layers, hidden), (torch.randn(batch, seq, hidden),)


def unsupported_factory(layers=1, hidden=32, seq=32, batch=2):
    """Attention whose softmax runs over the queries (dim -2): a spelling spt must not rewrite."""
    torch.manual_seed(0)
    return Tiny(layers, hidden, softmax_dim=-2), (torch.randn(batch, seq, hidden),)


def breaking_factory(layers=2, hidden=32, seq=32, batch=2):
    """A graph break between the blocks: two Dynamo graphs."""
    torch.manual_seed(0)
    return Tiny(layers, hidden, graph_break=True), (torch.randn(batch, seq, hidden),)


OPTIONS = {"min_seq_len": 1}
