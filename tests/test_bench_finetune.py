"""bench/finetune.py's cell grammar and the bf16-autocast training step (tiny stack, no timing)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.finetune import DENSITIES, backends_for, parse_cell  # noqa: E402
from spt_compile.options import SptOptions  # noqa: E402
from spt_compile.stacks import TrainStep, adamw  # noqa: E402


def test_cell_grammar():
    assert parse_cell("gpt2-small:2048") == ("gpt2-small", False, 2048, False, False, False)
    assert parse_cell("llama+lora:4096:all:amp") == ("llama", True, 4096, True, True, False)
    assert parse_cell("gpt2-small:512:amp") == ("gpt2-small", False, 512, False, True, False)
    assert parse_cell("llama:2048:share:all").share
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


def test_single_density_cells_run_the_default_densities():
    (label, backend, opts), = [b for b in backends_for(False) if b[1] == "spt"]
    assert opts == {"attention_density": SptOptions().attention_density, "ffn_density": SptOptions().ffn_density}
    assert len(set(DENSITIES)) == len(DENSITIES) == len(backends_for(True)) - 2
    *_, (label, backend, opts) = backends_for(False, share=True)
    assert backend == "spt" and opts["attention_share_kv_lists"] is True and "shared" in label


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_adamw_is_fused_where_torch_has_it_and_steps_like_the_default(dtype):
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(5, 3, dtype=dtype)) for _ in range(2)]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opts = (torch.optim.AdamW(ref, lr=1e-2), adamw(mine, 1e-2))
    assert bool(opts[1].defaults["fused"]) == (dtype != torch.float64)  # fp64 is not a fused dtype on CPU
    for _ in range(3):
        g = [torch.randn_like(p) for p in ref]
        for params, opt in zip((ref, mine), opts):
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
