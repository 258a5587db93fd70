"""@pytest.mark.gpu: one compiled training step of a Hugging Face LLaMA (random weights, small config) on CUDA with
backend="spt" through inductor: exact mode equals eager (loss and every parameter gradient), and the default
densities train (finite loss and gradients, every parameter on the loss path updated, every layer rewritten).
Skipped without CUDA (reason given) or without transformers; SPT_GPU_TESTS_ON_CPU=1 runs it on CPU (_gpu.py)."""
import pytest
import torch

import spt_compile
from spt_compile.inspect_models import small_hf_model
from tests.helpers import compare_with_eager
from tests.kernels._gpu import CUDA, DEVICE, GPU, kernel_path, size  # noqa: F401  (kernel_path is a fixture)

pytestmark = GPU
transformers = pytest.importorskip("transformers", reason="the HF LLaMA step needs transformers")

LAYERS = 2
# on CPU the dry run uses aot_eager: inductor's CPU codegen would take minutes for nothing the GPU run needs
INNER = "inductor" if CUDA else "aot_eager"


def llama(dropout: float = 0.0):
    torch.manual_seed(0)
    model = small_hf_model("llama", "sdpa", layers=LAYERS, hidden=size(256, 64), heads=4, kv_heads=2,
                           ffn=size(1024, 128), vocab=256)
    model.config.attention_dropout = dropout
    return model.to(DEVICE).train()


def inputs(n: int, batch: int = 2):
    ids = torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(DEVICE), "attention_mask": torch.ones(batch, n, dtype=torch.long, device=DEVICE)}


def test_llama_exact_mode_step_equals_eager(kernel_path):
    report = compare_with_eager(llama(), kwargs=inputs(size(128, 16)), pick=lambda o: o.logits, inner_backend=INNER)
    assert len(report.rewritten("attention")) == LAYERS and len(report.rewritten("ffn")) == LAYERS, str(report)


def test_llama_default_mode_training_step(kernel_path):
    n = size(256, 128)  # >= min_seq_len (128): attention is rewritten at its default density
    model = llama(dropout=0.1)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    spt_compile.report.clear_reports()
    compiled = torch.compile(model, backend="spt", options={"inner_backend": INNER})
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    batch = inputs(n)
    loss = compiled(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss), loss
    report = spt_compile.last_reports()[-1]
    assert len(report.rewritten("attention")) == LAYERS and len(report.rewritten("ffn")) == LAYERS, str(report)
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    stale = [k for k, p in model.named_parameters() if torch.equal(before[k], p.detach())]
    assert not stale, f"parameters without an update: {stale}"
