"""`python -m spt_compile demo`: fine-tune a small LLaMA-style model with backend="spt" and with the default
backend (inductor + SDPA) from the same initial weights, on real English text, and print what was rewritten,
the step time and memory of both, and the losses.

Text: the docstrings of Python's standard library (real prose that every machine has), byte-level tokens.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time

import torch

from spt_compile.explain import explain
from spt_compile.measure import fmt_bytes, machine_name, markdown_table, peak_memory, saved_tensor_bytes

_PROSE_MODULES = ("argparse", "collections", "json", "logging", "subprocess", "threading", "typing", "unittest",
                  "email", "http.client", "pathlib", "functools", "itertools", "asyncio", "dataclasses", "decimal",
                  "fractions", "random", "statistics", "string", "textwrap", "zipfile", "tarfile", "csv", "sqlite3")


def prose_bytes() -> torch.Tensor:
    """Docstrings of stdlib modules, classes and functions as a uint8 tensor (byte-level tokens)."""
    chunks = []
    for name in _PROSE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                chunks.append(doc)
    text = "\n\n".join(dict.fromkeys(chunks))
    return torch.frombuffer(bytearray(text.encode("utf-8", "ignore")), dtype=torch.uint8).long()


def build_model(seq_len: int, device: torch.device, dtype: torch.dtype):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:  # transformers is a test/demo extra, not a runtime dependency
        raise SystemExit("the demo needs transformers: pip install 'spt-compile[test]'") from e
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=seq_len,
                      attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def batches(data: torch.Tensor, batch: int, seq_len: int, steps: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, data.numel() - seq_len - 1, (steps, batch), generator=g)
    return [torch.stack([data[s:s + seq_len] for s in row]).to(device) for row in starts]


def train(model, data, steps: int, warmup: int):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses, times = [], []
    for i, ids in enumerate(data[:steps]):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ids.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        losses.append(loss.item())
    return losses, statistics.median(times) if times else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spt_compile demo", description=__doc__)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4, help="steps not timed (the first one compiles)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--attention-density", type=float, default=0.25)
    ap.add_argument("--ffn-density", type=float, default=0.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    options = {"attention_density": args.attention_density, "ffn_density": args.ffn_density}

    data = batches(prose_bytes(), args.batch, args.seq_len, args.steps, device)
    base = build_model(args.seq_len, device, dtype)
    print(f"machine: {machine_name()}   model: LLaMA-style, 4 layers, d=256, 8 heads (4 kv), FFN 1024 SwiGLU, "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params; batch {args.batch} x {args.seq_len} tokens\n")
    print(explain(base, input_ids=data[0], options=options), "\n")

    results = {}
    for name, backend, opts in (("inductor (default)", "inductor", None), ("spt", "spt", options)):
        model = copy.deepcopy(base).train()
        compiled = torch.compile(model, backend=backend, options=opts)
        print(f"training with backend={backend!r} ({args.steps} steps, first compiles) ...", flush=True)
        losses, step_time = train(compiled, data, args.steps, args.warmup)
        ids = data[0]
        peak, how = peak_memory(lambda: compiled(input_ids=ids, labels=ids).loss.backward(), device)
        saved = saved_tensor_bytes(lambda: compiled(input_ids=ids, labels=ids).loss)
        model.zero_grad(set_to_none=True)
        results[name] = (losses, step_time, peak, saved)

    ref_time, ref_peak, ref_saved = results["inductor (default)"][1:4]
    rows = []
    for name, (losses, step_time, peak, saved) in results.items():
        rows.append((name, f"{step_time * 1e3:.1f} ms", f"{ref_time / step_time:.2f}x", fmt_bytes(peak),
                     f"{peak / ref_peak:.2f}x", fmt_bytes(saved), f"{saved / ref_saved:.2f}x",
                     f"{losses[0]:.3f}", f"{losses[-1]:.3f}"))
    print()
    print(markdown_table(("backend", "step time", "speed-up", "peak memory", "ratio", "saved for backward",
                          "ratio", "first loss", "last loss"), rows))
    print(f"\npeak memory: {how}; step time: median over steps {args.warmup}..{args.steps - 1}")
    return 0
