"""One training step (fwd + bwd + AdamW) of transformer stacks: eager, backend="inductor" and backend="spt" at
several (attention, FFN) densities, as ratios to inductor measured in the same process.

Stacks (spt_compile/stacks.py, random weights, HF base models without LM head, synthetic loss = mean square of
the last hidden state): GPT-2-small and GPT-2-medium widths, a LLaMA-style stack (GQA 4:1, SwiGLU), and LoRA
rows (peft adapters on every attention/FFN linear, base frozen). Per cell (stack, seq) every backend is compiled,
warmed up (2 steps), then timed in interleaved rounds (one step of each backend per round, so machine load hits
all alike); a figure is the median over rounds. Peak memory: one extra forward + backward per backend (gradients
included; the AdamW step is left out: its temporaries are alike for every backend and would set every peak),
torch.cuda.max_memory_allocated on GPU, the torch.profiler CPU allocation events on CPU (spt_compile.measure).

    python bench/finetune.py                       # the CPU matrix (a subset of cells, < 20 min on 2 cores)
    python bench/finetune.py --cells gpt2-small:2048 --reps 5
    python bench/finetune.py --cells gpt2-small:2048 gpt2-small:2048:amp   # fp32 beside bf16 autocast
    python bench/finetune.py --quick --out $OUT    # the GPU check's small fixed size (bench/gpu_check.py)
Writes bench/results/finetune-<machine>.md and .png (or into --out).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import RESULTS_DIR, fmt_bytes, machine_name, machine_slug, markdown_table  # noqa: E402
from bench._common import write_result  # noqa: E402
from spt_compile.demo import fwd_bwd_peak, memory_label, speed_label  # noqa: E402
from spt_compile.options import SptOptions  # noqa: E402
from spt_compile.stacks import TrainStep, build_stack, stack_inputs  # noqa: E402

_DEFAULTS = SptOptions()
DEFAULT_DENSITIES = (_DEFAULTS.attention_density, _DEFAULTS.ffn_density)  # (attention, ffn)
# the defaults first: a cell without `all` runs only them (the targets are stated at the default densities)
DENSITIES = (DEFAULT_DENSITIES,) + tuple(d for d in ((0.5, 0.5), (0.25, 0.5), (0.25, 0.25)) if d != DEFAULT_DENSITIES)
# The CPU matrix: (stack, seq, backends). The target cell (GPT-2-small width, seq >= 2048) gets every backend.
CPU_CELLS = ("gpt2-small:512", "gpt2-small:2048:all", "gpt2-small:2048:amp", "gpt2-small:4096", "gpt2-medium:1024",
             "llama:2048:share", "gpt2-small+lora:2048")
QUICK_CELLS = ("gpt2-small:2048:all",)
GPU_CELLS = ("gpt2-small:1024:all", "gpt2-small:4096:all", "gpt2-small:4096:amp", "gpt2-small:8192", "gpt2-medium:4096:all",
             "llama:4096:all:share", "gpt2-small+lora:4096", "llama+lora:4096")


FLAGS = ("all", "amp", "share")  # every density pair; bf16 autocast over fp32 weights; + shared GQA key lists


class Cell(NamedTuple):
    stack: str
    lora: bool
    seq: int
    all_densities: bool
    amp: bool
    share: bool  # one more spt row at the default densities with attention_share_kv_lists=True (GQA stacks)


def parse_cell(text: str) -> Cell:
    """'gpt2-small+lora:2048[:all][:amp][:share]' -> Cell."""
    parts = text.split(":")
    flags = parts[2:]
    if len(parts) < 2 or not parts[1].isdigit() or any(f not in FLAGS for f in flags) \
            or len(set(flags)) != len(flags):
        raise ValueError(f"bad cell {text!r}: expected STACK[+lora]:SEQ[:all][:amp][:share], e.g. gpt2-small:2048:all")
    name, lora = (parts[0][:-5], True) if parts[0].endswith("+lora") else (parts[0], False)
    return Cell(name, lora, int(parts[1]), "all" in flags, "amp" in flags, "share" in flags)


def backends_for(all_densities: bool, share: bool = False):
    """[(label, backend, options)]: eager, inductor and spt; spt at every density or only the defaults, and with
    `share` once more at the defaults with shared GQA key lists."""
    def spt(densities, share_kv=False):
        a, f = densities
        opts = {"attention_density": a, "ffn_density": f} | ({"attention_share_kv_lists": True} if share_kv else {})
        return f"spt ({a}, {f}){' shared kv' if share_kv else ''}", "spt", opts

    out = [("eager", None, None), ("inductor", "inductor", None)]
    out += [spt(d) for d in (DENSITIES if all_densities else DENSITIES[:1])]
    return out + ([spt(DEFAULT_DENSITIES, share_kv=True)] if share else [])


def spt_sites(report_list) -> str:
    att = sum(len(r.rewritten("attention")) for r in report_list)
    ffn = sum(len(r.rewritten("ffn")) for r in report_list)
    dense = sum(len(r.dense()) for r in report_list)
    return f"{att} attn + {ffn} ffn rewritten, {dense} dense"


def run_cell(cell: str, args, device, dtype):
    import spt_compile
    name, lora, seq, all_d, amp, share = parse_cell(cell)
    stack = build_stack(name, layers=args.layers, seq=seq, lora_rank=16 if lora else 0)
    stack.model.to(device=device, dtype=torch.float32 if amp else dtype)  # autocast runs over fp32 weights
    # every cell compiles the same HF forward code again: without a reset Dynamo's per-code recompile limit is hit
    # after a few cells and later cells silently run eager (measured: a whole spt row with no site rewritten)
    torch._dynamo.reset()
    ids = stack_inputs(args.batch, seq, device)
    steps, sites = {}, {}
    for label, backend, opts in backends_for(all_d, share):
        m = copy.deepcopy(stack.model)
        fn = m if backend is None else torch.compile(m, backend=backend, options=opts, dynamic=False)
        steps[label] = TrainStep(fn, m, autocast=torch.bfloat16 if amp else None)
        # the list is capped (oldest dropped), so count the reports that are new, not the length; `seen` keeps the
        # old reports alive, so no new report can reuse one of their ids
        seen = spt_compile.last_reports()
        for _ in range(2):  # compile (forward at the first call, backward at the first backward), then warm up
            steps[label](ids).item()
        if backend == "spt":
            old = {id(r) for r in seen}
            new = [r for r in spt_compile.last_reports() if id(r) not in old]
            if not new:
                raise RuntimeError(f"{cell} {label}: backend='spt' compiled no graph (Dynamo fell back to eager?)")
            sites[label] = spt_sites(new)
    times = {label: [] for label in steps}
    for _ in range(args.reps):
        for label, step in steps.items():
            t = time.perf_counter()
            step(ids).item()
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    peaks, how = {}, ""
    for label, step in steps.items():
        peaks[label], how = fwd_bwd_peak(step.fwd_bwd, step.params, ids, device)
    rows = []
    for label in steps:
        rows.append(dict(cell=f"{name}{'+lora' if lora else ''}{' bf16-amp' if amp else ''}", seq=seq,
                         backend=label, time=med[label],
                         ratio=med["inductor"] / med[label], peak=peaks[label],
                         peak_ratio=peaks[label] / peaks["inductor"], sites=sites.get(label, "")))
    return stack.description, rows, how


def render(results, args, how, load: str) -> str:
    rows = []
    for r in results:
        ref = [x for x in results if x["cell"] == r["cell"] and x["seq"] == r["seq"] and x["backend"] == "inductor"][0]
        rows.append((r["cell"], r["seq"], r["backend"], f"{r['time'] * 1e3:.0f} ms",
                     "1.00x" if r is ref else speed_label(ref["time"], r["time"]), fmt_bytes(r["peak"]),
                     "-" if r is ref else memory_label(ref["peak"], r["peak"]), r["sites"]))
    table = markdown_table(("stack", "seq", "backend", "step time", "vs inductor", "peak memory", "vs inductor",
                            "spt sites"), rows)
    return (f"{table}\n\n- one training step: fwd + bwd + AdamW (fused: spt_compile.stacks.adamw), batch {args.batch}, {args.layers} layers, "
            f"{args.dtype}, synthetic loss (mean square of the last hidden state), random weights\n"
            f"- step time: median of {args.reps} interleaved rounds after 2 warm-up steps per backend\n"
            f"- peak memory: {how}\n"
            f"- {load}\n")


def plot(results, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    spt = [r for r in results if r["backend"].startswith("spt") or r["backend"] == "eager"]
    labels = [f"{r['cell']}\n{r['seq']}\n{r['backend']}" for r in spt]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.7 * len(spt)), 7), sharex=True)
    axes[0].bar(range(len(spt)), [r["ratio"] for r in spt], color="tab:blue")
    axes[0].set_ylabel("speed vs inductor (>1 = faster)")
    axes[1].bar(range(len(spt)), [r["peak_ratio"] for r in spt], color="tab:orange")
    axes[1].set_ylabel("peak memory vs inductor (<1 = less)")
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.8)
    axes[1].set_xticks(range(len(spt)), labels, fontsize=6, rotation=90)
    axes[0].set_title(f"one training step, {machine_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="*", help="STACK[+lora]:SEQ[:all][:amp][:share] (default: the CPU or GPU matrix); all = every "
                    "density pair, amp = bf16 autocast over fp32 weights, share = + a row with shared GQA key lists")
    ap.add_argument("--layers", type=int, default=None, help="layers per stack (default 2 on CPU, 4 on GPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="interleaved timing rounds (default 3)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--quick", action="store_true", help="one small cell (gpt2-small, 2 layers, seq 2048, every backend)")
    ap.add_argument("--budget", type=float, default=1200.0, help="seconds; cells not started by then are skipped")
    ap.add_argument("--out", default=RESULTS_DIR, help="folder for finetune-<machine>.md / .png")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.layers = args.layers or (2 if args.quick or device.type == "cpu" else 4)
    cells = args.cells or (QUICK_CELLS if args.quick else GPU_CELLS if device.type == "cuda" else CPU_CELLS)
    for c in cells:
        parse_cell(c)  # bad input fails before any compile
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    print(f"machine: {machine_name()}")
    t0, results, how, skipped, descs = time.perf_counter(), [], "", [], {}
    for cell in cells:
        if time.perf_counter() - t0 > args.budget:
            skipped.append(cell)
            continue
        print(f"cell {cell} ...", flush=True)
        desc, rows, how = run_cell(cell, args, device, getattr(torch, args.dtype))
        descs[cell.split(":")[0]] = desc
        results += rows
    from spt_compile.demo import load_note
    body = render(results, args, how, f"{load_note() or 'load unknown'}; total {time.perf_counter() - t0:.0f} s")
    body += "".join(f"- {d}\n" for d in descs.values())
    if skipped:
        body += f"- skipped (over the {args.budget:.0f} s budget): {', '.join(skipped)}\n"
    print(body)
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        if os.path.abspath(args.out) == os.path.abspath(RESULTS_DIR):
            path = write_result("finetune", body)
        else:
            path = os.path.join(args.out, f"finetune-{machine_slug()}.md")
            with open(path, "w") as f:
                f.write(f"# finetune\n\n- machine: {machine_name()}\n- torch {torch.__version__}\n\n{body}")
        png = path[:-3] + ".png"
        plot(results, png)
        print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
