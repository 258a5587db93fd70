"""bench/finetune.py's cell grammar and the bf16-autocast training step (tiny stack, no timing)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.finetune import parse_cell  # noqa: E402
from spt_compile.stacks import TrainStep  # noqa: E402


def test_cell_grammar():
    assert parse_cell("gpt2-small:2048") == ("gpt2-small", False, 2048, False, False)
    assert parse_cell("llama+lora:4096:all:amp") == ("llama", True, 4096, True, True)
    assert parse_cell("gpt2-small:512:amp") == ("gpt2-small", False, 512, False, True)
    for bad in ("gpt2-small", "gpt2-small:x", "gpt2-small:512:fast", "gpt2-small:512:amp:amp"):
        with pytest.raises(ValueError, match="bad cell"):
            parse_cell(bad)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, input_ids):
        seen.append(self.lin(self.emb(input_ids)).dtype)
        return (self.lin(self.emb(input_ids)),)


seen: list = []


def test_autocast_step_runs_in_bf16_over_fp32_weights():
    m = Tiny()
    step = TrainStep(m, m, autocast=torch.bfloat16)
    seen.clear()
    loss = step(torch.randint(0, 16, (2, 4)))
    assert seen == [torch.bfloat16] and torch.isfinite(loss)
    assert m.lin.weight.dtype == torch.float32 and m.lin.weight.grad is None  # stepped, grads cleared
    seen.clear()
    TrainStep(m, m)(torch.randint(0, 16, (2, 4)))
    assert seen == [torch.float32]
