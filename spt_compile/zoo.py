"""A zoo of small Hugging Face architectures built from configs (random weights, no hub access).

    from spt_compile import zoo
    zoo.names()                                   # ['bart', 'bert', ...]; zoo.family(name), zoo.attn_implementations(name)
    zm = zoo.build("llama", layers=2, hidden=64, seq=32, batch=2, attn_implementation="sdpa")
    out = zm.output(zm.model(**zm.inputs))       # the logits / last hidden state tensor
    zm.expected                                   # {"attention": 2, "ffn": 2}: sites the compiler must account for

Every config sets valid special-token ids (inside the tiny vocabulary) so transformers prints no warnings.
Used by the model tests, the inspection CLI and the Trainer tests.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2


@dataclasses.dataclass
class ZooModel:
    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]          # keyword arguments of model(**inputs)
    expected: dict[str, int]                 # {"attention": n, "ffn": n}: candidate sites in the model
    attn_implementation: str

    def output(self, out) -> torch.Tensor:
        """The main output tensor of a model call (logits, or the last hidden state)."""
        for attr in ("logits", "last_hidden_state"):
            if getattr(out, attr, None) is not None:
                return getattr(out, attr)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclasses.dataclass(frozen=True)
class _Entry:
    build: Callable[..., torch.nn.Module]   # (layers, hidden, heads, kv_heads, ffn, impl) -> model
    kind: str                                # "decoder" | "encoder" | "encoder-decoder" | "vision"
    impls: tuple[str, ...] = ("eager", "sdpa")
    pad_inputs: bool = False                 # right-pad the second sequence (encoders)


def _tokens(**extra) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **extra)


def _decoder(config_cls: str, model_cls: str, kv: bool = True, **fixed):
    def build(layers, hidden, heads, kv_heads, ffn, impl):
        import transformers as T
        kw = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn,
                  max_position_embeddings=512, **_tokens(), **fixed)
        if kv:
            kw["num_key_value_heads"] = kv_heads
        cfg = getattr(T, config_cls)(**kw)
        cfg._attn_implementation = impl
        return getattr(T, model_cls)(cfg)
    return build


def _gpt2(layers, hidden, heads, kv_heads, ffn, impl):
    import transformers as T
    cfg = T.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=ffn, n_positions=512, **_tokens())
    cfg._attn_implementation = impl
    return T.GPT2LMHeadModel(cfg)


def _opt(layers, hidden, heads, kv_heads, ffn, impl):
    import transformers as T
    cfg = T.OPTConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_dim=ffn,
                      word_embed_proj_dim=hidden, max_position_embeddings=512, **_tokens())
    cfg._attn_implementation = impl
    return T.OPTForCausalLM(cfg)


def _gpt_neox(layers, hidden, heads, kv_heads, ffn, impl):
    import transformers as T
    cfg = T.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          intermediate_size=ffn, max_position_embeddings=512, **_tokens())
    cfg._attn_implementation = impl
    return T.GPTNeoXForCausalLM(cfg)


def _phi(layers, hidden, heads, kv_heads, ffn, impl):
    import transformers as T
    cfg = T.PhiConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=512, **_tokens())
    cfg._attn_implementation = impl
    return T.PhiForCausalLM(cfg)


def _gemma(layers, hidden, heads, kv_heads, ffn, impl):
    import transformers as T
    cfg = T.GemmaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, head_dim=hidden // heads, intermediate_size=ffn,
                        max_position_embeddings=512, **_tokens())
    cfg._attn_implementation = impl
    return T.GemmaForCausalLM(cfg)


def _encoder(config_cls: str, model_cls: str):
    def build(layers, hidden, heads, kv_heads, ffn, impl):
        import transformers as T
        cfg = getattr(T, config_cls)(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                     intermediate_size=ffn, max_position_embeddings=520, **_tokens())
        cfg._attn_implementation = impl
        return getattr(T, model_cls)(cfg, add_pooling_layer=False)
    return build


def _distilbert(layers, hidden, heads, kv_heads, ffn, impl):
    import transformers as T
    cfg = T.DistilBertConfig(n_layers=layers, dim=hidden, n_heads=heads, hidden_dim=ffn,
                             max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=PAD)
    cfg._attn_implementation = impl
    return T.DistilBertModel(cfg)


def _t5(layers, hidden, heads, kv_heads, ffn, impl):
    import transformers as T
    cfg = T.T5Config(num_layers=layers, num_decoder_layers=layers, d_model=hidden, num_heads=heads,
                     d_kv=hidden // heads, d_ff=ffn, vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS,
                     decoder_start_token_id=PAD, feed_forward_proj="gated-gelu")
    cfg._attn_implementation = impl
    return T.T5ForConditionalGeneration(cfg)


def _bart(layers, hidden, heads, kv_heads, ffn, impl):
    import transformers as T
    cfg = T.BartConfig(encoder_layers=layers, decoder_layers=layers, d_model=hidden, encoder_attention_heads=heads,
                       decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                       max_position_embeddings=512, decoder_start_token_id=EOS, forced_eos_token_id=EOS,
                       **_tokens())
    cfg._attn_implementation = impl
    return T.BartForConditionalGeneration(cfg)


def _vit(layers, hidden, heads, kv_heads, ffn, impl):
    import transformers as T
    cfg = T.ViTConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn,
                      image_size=32, patch_size=4, num_channels=3)
    cfg._attn_implementation = impl
    return T.ViTModel(cfg, add_pooling_layer=False)


_ZOO: dict[str, _Entry] = {
    "gpt2": _Entry(_gpt2, "decoder"),
    "llama": _Entry(_decoder("LlamaConfig", "LlamaForCausalLM"), "decoder"),
    "mistral": _Entry(_decoder("MistralConfig", "MistralForCausalLM"), "decoder"),
    "qwen2": _Entry(_decoder("Qwen2Config", "Qwen2ForCausalLM"), "decoder"),
    "opt": _Entry(_opt, "decoder"),
    "gpt_neox": _Entry(_gpt_neox, "decoder"),
    "phi": _Entry(_phi, "decoder"),
    "gemma": _Entry(_gemma, "decoder"),
    "bert": _Entry(_encoder("BertConfig", "BertModel"), "encoder", pad_inputs=True),
    "roberta": _Entry(_encoder("RobertaConfig", "RobertaModel"), "encoder", pad_inputs=True),
    "distilbert": _Entry(_distilbert, "encoder", pad_inputs=True),
    "t5": _Entry(_t5, "encoder-decoder"),
    "bart": _Entry(_bart, "encoder-decoder"),
    "vit": _Entry(_vit, "vision"),
}


def names() -> list[str]:
    return sorted(_ZOO)


def attn_implementations(name: str) -> tuple[str, ...]:
    return _entry(name).impls


def family(name: str) -> str:
    """"decoder", "encoder", "encoder-decoder" or "vision"."""
    return _entry(name).kind


def build(name: str, layers: int = 2, hidden: int = 64, seq: int = 32, batch: int = 2,
          attn_implementation: str = "sdpa", heads: int = 4, kv_heads: int = 2, ffn: int | None = None,
          seed: int = 0) -> ZooModel:
    """A freshly initialised model of architecture `name` (train mode, dropout off) and its example inputs.

    `seq` is the token count (vision: the patch count is fixed at 64 by the 32x32 image, 4x4 patches)."""
    entry = _entry(name)
    if attn_implementation not in entry.impls:
        raise ValueError(f"zoo model {name!r} has no attn_implementation {attn_implementation!r}; "
                         f"choose one of {', '.join(entry.impls)}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden={hidden} must be a multiple of heads={heads}, and heads of kv_heads={kv_heads}")
    torch.manual_seed(seed)
    model = entry.build(layers, hidden, heads, kv_heads, ffn or 2 * hidden, attn_implementation)
    _no_dropout(model)
    per_stack = {"attention": layers, "ffn": layers}
    if entry.kind == "encoder-decoder":  # encoder self-attn, decoder self-attn and cross-attn
        per_stack = {"attention": 3 * layers, "ffn": 2 * layers}
    return ZooModel(name, model.train(), _inputs(entry, seq, batch, seed), per_stack, attn_implementation)


def _entry(name: str) -> _Entry:
    if name not in _ZOO:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(names())}")
    return _ZOO[name]


def _no_dropout(model: torch.nn.Module) -> None:
    """Dropout off, so eager and compiled runs are comparable (the op draws its own dropout masks)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for attr in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_probs_dropout_prob", "hidden_dropout_prob",
                 "attention_dropout", "dropout", "activation_dropout", "dropout_rate", "attention_dropout_rate",
                 "hidden_dropout", "resid_dropout", "embd_dropout", "qa_dropout", "seq_classif_dropout"):
        if isinstance(getattr(model.config, attr, None), float):
            setattr(model.config, attr, 0.0)
    for m in model.modules():  # modules that copied the probability from the config at init
        for attr in ("dropout", "attention_dropout", "dropout_p"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def _inputs(entry: _Entry, seq: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if entry.kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if entry.pad_inputs and batch > 1 and seq > 4:
        pad = max(1, seq // 8)
        mask[1, seq - pad:] = 0  # right padding: padded keys, no fully masked row
        ids[1, seq - pad:] = PAD
    inputs = {"input_ids": ids, "attention_mask": mask}
    if entry.kind == "encoder-decoder":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq), generator=g)
    return inputs
