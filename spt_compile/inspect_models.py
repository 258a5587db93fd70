"""`python -m spt_compile inspect --model {gpt2,bert,llama}`: what backend="spt" rewrites in a small HF model.

Builds a randomly initialised model of the family (no hub access), runs it once through `spt_compile.explain`
(which changes nothing) and prints one row per candidate attention / FFN site: rewritten with its parameters, or
dense and why.
"""
from __future__ import annotations

import argparse
import json

import torch

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("gpt2", "bert", "llama"), default="llama", help="model family")
    parser.add_argument("--attn-implementation", choices=("eager", "sdpa"), default="sdpa",
                        help="transformers attention implementation")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (the FFN is 4x wider)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch")
    parser.add_argument("--options", default="{}", help='JSON dict of backend options, e.g. \'{"ffn_density": 0.25}\'')
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from spt_compile.explain import explain

    options = json.loads(args.options)
    if not isinstance(options, dict):
        raise SystemExit(f"--options must be a JSON object, got {args.options!r}")
    for flag in ("layers", "hidden", "seq", "batch"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    torch.manual_seed(0)
    model = small_hf_model(args.model, args.attn_implementation, layers=args.layers, hidden=args.hidden,
                           ffn=4 * args.hidden, max_len=max(512, args.seq)).train()
    ids = torch.randint(0, 256, (args.batch, args.seq))
    report = explain(model, input_ids=ids, options=options)
    print(report.to_json() if args.json else report)
    return 0
