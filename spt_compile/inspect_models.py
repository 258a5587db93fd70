"""`python -m spt_compile inspect --model {gpt2,bert,llama}`: the explain table of a small HF model."""
from __future__ import annotations

import argparse
import json

import torch

from spt_compile.explain import explain


def small_hf_model(kind: str, attn_implementation: str = "sdpa", layers: int = 2, hidden: int = 128,
                   heads: int = 4, kv_heads: int = 2, ffn: int = 512, vocab: int = 256, max_len: int = 512):
    """A randomly initialised HF model of the given family (no hub access needed)."""
    import transformers as T

    common = dict(attn_implementation=attn_implementation, vocab_size=vocab)
    if kind == "gpt2":
        cfg = T.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=ffn, n_positions=max_len, **common)
        return T.GPT2LMHeadModel(cfg)
    if kind == "bert":
        cfg = T.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                           intermediate_size=ffn, max_position_embeddings=max_len, **common)
        return T.BertModel(cfg)
    if kind == "llama":
        cfg = T.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=max_len,
                            **common)
        return T.LlamaForCausalLM(cfg)
    raise ValueError(f"unknown model kind {kind!r}: expected 'gpt2', 'bert' or 'llama'")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spt_compile inspect")
    ap.add_argument("--model", choices=("gpt2", "bert", "llama"), default="llama")
    ap.add_argument("--attn-implementation", choices=("eager", "sdpa"), default="sdpa")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--options", default="{}", help='JSON dict of backend options, e.g. \'{"ffn_density": 0.25}\'')
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = small_hf_model(args.model, args.attn_implementation).train()
    ids = torch.randint(0, 256, (args.batch, args.seq_len))
    report = explain(model, input_ids=ids, options=json.loads(args.options))
    print(report.to_json() if args.json else report)
    return 0
