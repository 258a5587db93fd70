"""A configurable toy transformer block written in the spellings real models use, for matcher and exact-mode tests."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    hidden: int = 32
    heads: int = 4
    kv_heads: int = 2
    ffn_hidden: int = 64
    ffn_kind: str = "plain"          # plain | gated | conv1d
    activation: str = "gelu"         # relu | gelu | gelu_tanh | silu | swish | new_gelu
    attention: str = "sdpa"          # sdpa | eager_div | eager_mul_after_mask | eager_prescaled | eager_where | eager_masked_fill
    mask: str = "none"               # none | causal | padding | bool_padding
    layers: int = 1
    softmax_fp32: bool = False
    dropout: float = 0.0
    return_weights: bool = False


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    if name == "swish":  # SiLU written out
        return x * torch.sigmoid(x)
    if name == "new_gelu":  # GPT-2's NewGELUActivation, written out
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    raise ValueError(name)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], applied with addmm."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.size(-1),)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Attention(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.hidden // cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.heads * self.head_dim)
        self.k = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim)
        self.v = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim)
        self.o = nn.Linear(cfg.heads * self.head_dim, cfg.hidden)

    def forward(self, x, bool_mask, additive_mask):
        cfg, b, n = self.cfg, x.shape[0], x.shape[1]
        q = self.q(x).view(b, n, cfg.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, cfg.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, cfg.kv_heads, self.head_dim).transpose(1, 2)
        rep = cfg.heads // cfg.kv_heads
        scale = 1.0 / math.sqrt(self.head_dim)
        weights = None
        if cfg.attention == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if cfg.mask in ("none", "causal") else
                (bool_mask if cfg.mask == "bool_padding" else additive_mask),
                is_causal=cfg.mask == "causal", dropout_p=cfg.dropout if self.training else 0.0,
                enable_gqa=rep > 1)
        else:
            k = k[:, :, None, :, :].expand(b, cfg.kv_heads, rep, n, self.head_dim).reshape(b, cfg.heads, n, self.head_dim)
            v = v[:, :, None, :, :].expand(b, cfg.kv_heads, rep, n, self.head_dim).reshape(b, cfg.heads, n, self.head_dim)
            if cfg.attention == "eager_prescaled":
                s = (q * scale) @ k.transpose(-1, -2)
            else:
                s = torch.matmul(q, k.transpose(2, 3))
            if cfg.attention == "eager_div":
                s = s / math.sqrt(self.head_dim)
            if cfg.mask != "none":
                if cfg.attention == "eager_where":
                    s = torch.where(bool_mask, s, torch.finfo(s.dtype).min)
                elif cfg.attention == "eager_masked_fill":
                    s = s.masked_fill(~bool_mask, float("-inf"))
                else:
                    s = s + additive_mask
            if cfg.attention == "eager_mul_after_mask":
                s = s * scale
            if cfg.softmax_fp32:
                p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            else:
                p = s.softmax(-1)
            p = F.dropout(p, p=cfg.dropout, training=self.training)
            weights = p
            out = p @ v
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.o(out), weights


class FFN(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.ffn_kind == "conv1d":
            self.up, self.down = Conv1D(cfg.ffn_hidden, cfg.hidden), Conv1D(cfg.hidden, cfg.ffn_hidden)
        else:
            self.up = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=cfg.ffn_kind == "plain")
            self.down = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=cfg.ffn_kind == "plain")
        if cfg.ffn_kind == "gated":
            self.gate = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)

    def forward(self, x):
        if self.cfg.ffn_kind == "gated":
            return self.down(activation(self.cfg.activation, self.gate(x)) * self.up(x))
        return self.down(activation(self.cfg.activation, self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        self.attn, self.ffn = Attention(cfg), FFN(cfg)

    def forward(self, x, bool_mask, additive_mask):
        a, w = self.attn(self.ln1(x), bool_mask, additive_mask)
        x = x + a
        return x + self.ffn(self.ln2(x)), w


class ToyTransformer(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))

    def forward(self, x, lengths):
        """x [B, N, hidden]; lengths [B]: keys at positions >= length are padding (for the padding masks)."""
        b, n, _ = x.shape
        pos = torch.arange(n, device=x.device)
        keep = pos[None, :] < lengths[:, None]                      # [B, N]
        if self.cfg.mask == "causal":
            bool_mask = (pos[None, :] <= pos[:, None])[None, None].expand(b, 1, n, n)
        else:
            bool_mask = keep[:, None, None, :]                       # [B, 1, 1, N]
        additive_mask = torch.zeros(bool_mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~bool_mask, torch.finfo(x.dtype).min)
        weights = []
        for blk in self.blocks:
            x, w = blk(x, bool_mask, additive_mask)
            weights.append(w)
        return (x, weights) if self.cfg.return_weights else x
