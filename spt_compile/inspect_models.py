"""Small randomly initialised Hugging Face models (gpt2, bert, llama) for tests and the GPU check.

Their configs set valid special-token ids, so transformers prints no warnings. The `inspect` command itself
lives in spt_compile/cli_inspect.py (its models come from the zoo, spt_compile/zoo.py).
"""
from __future__ import annotations

PAD, BOS, EOS = 0, 1, 2  # special-token ids inside every tiny vocabulary: transformers warns about ids outside it


def small_hf_model(kind: str, attn_implementation: str = "sdpa", layers: int = 2, hidden: int = 128,
                   heads: int = 4, kv_heads: int = 2, ffn: int = 512, vocab: int = 256, max_len: int = 512):
    """A randomly initialised HF model of the given family (no hub access needed)."""
    import transformers as T

    if vocab <= EOS:
        raise ValueError(f"vocab must exceed the special-token ids {PAD, BOS, EOS}, got {vocab}")
    common = dict(attn_implementation=attn_implementation, vocab_size=vocab, pad_token_id=PAD)
    if kind == "gpt2":
        cfg = T.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=ffn, n_positions=max_len,
                           bos_token_id=BOS, eos_token_id=EOS, **common)
        return T.GPT2LMHeadModel(cfg)
    if kind == "bert":
        cfg = T.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                           intermediate_size=ffn, max_position_embeddings=max_len, **common)
        return T.BertModel(cfg)
    if kind == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=max_len,
                            bos_token_id=BOS, eos_token_id=EOS, **common)
        return T.LlamaForCausalLM(cfg)
    raise ValueError(f"unknown model kind {kind!r}: expected 'gpt2', 'bert' or 'llama'")
