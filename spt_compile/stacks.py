"""Random-weight transformer stacks for timing one training step: the demo's larger-size step and
bench/finetune.py. HF base models (no LM head: a 50k-vocabulary head would dominate the step and is not what
spt rewrites), fed real token ids, trained on a synthetic objective (mean square of the last hidden state):
the loss only has to reach every parameter; attention and FFN cost the same whatever the loss is.

    stack = build_stack("gpt2-small", layers=4, seq=1024)
    step = TrainStep(torch.compile(stack.model, backend="spt"), stack.model)
"""
from __future__ import annotations

import dataclasses

import torch

# name -> (family, hidden, heads, kv heads, FFN width). GPT-2 widths as published; the LLaMA-style row is a
# TinyLlama-like shape (GQA 4:1, SwiGLU) at a width this CPU can train.
STACKS = {
    "gpt2-small": ("gpt2", 768, 12, 12, 3072),
    "gpt2-medium": ("gpt2", 1024, 16, 16, 4096),
    "llama": ("llama", 1024, 16, 4, 2816),
}
VOCAB = 30522  # the MiniLM tokenizer's vocabulary (its ids are what the demo has at hand)


@dataclasses.dataclass
class Stack:
    name: str
    model: torch.nn.Module
    description: str


def build_stack(name: str, layers: int, seq: int, lora_rank: int = 0, seed: int = 0,
                attn_implementation: str = "sdpa") -> Stack:
    """A random-weight stack named in STACKS with `layers` layers for sequences up to `seq`; `lora_rank` > 0
    freezes the base weights and adds peft LoRA adapters of that rank to every attention and FFN linear."""
    if name not in STACKS:
        raise ValueError(f"unknown stack {name!r}: expected one of {', '.join(STACKS)}")
    import transformers as T
    family, hidden, heads, kv, ffn = STACKS[name]
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=ffn, n_positions=seq,
                           vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           attn_implementation=attn_implementation)
        model, targets = T.GPT2Model(cfg), ["c_attn", "c_proj", "c_fc"]
    else:
        cfg = T.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            num_key_value_heads=kv, intermediate_size=ffn, max_position_embeddings=seq,
                            vocab_size=VOCAB, attn_implementation=attn_implementation)
        model = T.LlamaModel(cfg)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    desc = (f"{name}: {family}, {layers} layers, d={hidden}, {heads} heads ({kv} kv), FFN {ffn}"
            f"{' SwiGLU' if family == 'llama' else ' GELU'}")
    if lora_rank:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules=targets, fan_in_fan_out=family == "gpt2"))
        desc += f", LoRA r={lora_rank} on {'/'.join(targets)} (base frozen)"
    n = sum(p.numel() for p in model.parameters())
    t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Stack(name, model.train(), f"{desc}; {n / 1e6:.1f}M params ({t / 1e6:.1f}M trained)")


def stack_inputs(batch: int, seq: int, device, seed: int = 0) -> torch.Tensor:
    """ids [batch, seq]. Random ids from a local generator; the cost of a step does not depend on them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g).to(device)


def synthetic_loss(out) -> torch.Tensor:
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]       # [B, N, d]
    return h.float().square().mean()


def adamw(params, lr: float) -> torch.optim.AdamW:
    """AdamW as a user tuning for speed runs it: fused (one kernel over all parameters) where torch has it (CPU
    and CUDA, fp32/bf16/fp16 parameters). On the 2-core CPU the default for-loop AdamW takes 7x as long for a
    40M-parameter stack (bench/optimizer.py); that cost is the same for every backend, so it only dilutes the
    ratios. Falls back to the default implementation elsewhere."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16,
                                                                                 torch.float16) for p in params)
    return torch.optim.AdamW(params, lr=lr, fused=fused or None)


class TrainStep:
    """One fwd + bwd + AdamW step of `fn` (the compiled model) over `model`'s trainable parameters."""

    def __init__(self, fn, model: torch.nn.Module, lr: float = 1e-4, autocast: torch.dtype | None = None):
        self.fn = fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = adamw(self.params, lr)
        self.autocast = autocast  # e.g. torch.bfloat16: mixed precision, fp32 weights and optimizer state

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return synthetic_loss(self.fn(input_ids=ids))
        with torch.autocast(ids.device.type, dtype=self.autocast):
            return synthetic_loss(self.fn(input_ids=ids))

    def fwd_bwd(self, ids: torch.Tensor) -> None:
        self.loss(ids).backward()

    def __call__(self, ids: torch.Tensor) -> float:
        loss = self.loss(ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()
