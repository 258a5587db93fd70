"""Quality after fine-tuning: the real pretrained all-MiniLM-L6-v2 fine-tuned as in the demo (contrastive sentence
embedding on licence text, spt_compile/demo_data.py), dense (backend="inductor") against backend="spt" at
attention density {0.5, 0.25} x FFN density {0.5, 0.25}, with the same seed, batches, steps and learning rate.

Reported per configuration: held-out loss before and after fine-tuning and its relative gap to dense after
fine-tuning, held-out retrieval accuracy, and the training-free embedding cosine (pretrained weights, spt vs dense
embeddings of the held-out sequences). Every spt model is evaluated as compiled (sparse), as a user would run it;
the dense row is evaluated dense. Targets: gap <= 2% at (0.5, 0.5), <= 5% at (0.25, 0.25).

    python bench/quality.py [--steps 40] [--seq 128] [--batch 8] [--seeds 0 1 2] [--improve '{"ffn_blocks": 64}']
                            [--name quality]
--seeds: every configuration is fine-tuned once per batch-order seed (dense too); each gap is against the dense run
of the same seed, and the table reports the gaps' mean and spread (the held-out set is small: one seed's gap is
mostly noise).
--improve adds rows with the given extra spt options at the grid's densities that have a target ((0.5, 0.5),
(0.25, 0.25)), to show a change's before/after; e.g. `--grid 0.25,0.25 --improve ... --name quality-improve`
measures one before/after pair without overwriting the full grid's file (`--grid '' --improve-at 0.25,0.25`:
the dense row and the changed row only, against an earlier run's unchanged row). Writes
bench/results/<name>-<machine>.md and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine_name, markdown_table, write_result  # noqa: E402
from spt_compile import demo_data as D  # noqa: E402
from spt_compile.demo import FineTuneRun, load_note, quiet_transformers  # noqa: E402

GRID = ((0.5, 0.5), (0.5, 0.25), (0.25, 0.5), (0.25, 0.25))  # (attention, ffn)
TARGETS = {(0.5, 0.5): 0.02, (0.25, 0.25): 0.05}


def embeddings(fn, batches) -> torch.Tensor:
    return torch.cat([fn(ids)[1].detach().float() for ids in batches])               # [N, d]


def run_config(label, backend, options, encoder, train, held, lr, ref_emb=None):
    """Fine-tune one fresh copy; returns a result dict (and the pretrained embeddings for the cosine)."""
    r = FineTuneRun(label, backend, encoder, options, lr)
    t0 = time.perf_counter()
    r.first_call(train[0])                              # compiles; the router is fit on training text
    emb0 = embeddings(r.fn, held)                       # pretrained weights
    r.before = D.evaluate(r.fn, held)
    for ids in train:
        r.losses.append(r.step(ids))
    r.after = D.evaluate(r.fn, held)
    cos = float("nan") if ref_emb is None else torch.nn.functional.cosine_similarity(emb0, ref_emb, dim=-1).mean().item()
    return dict(label=label, options=options, before=r.before, after=r.after, cos=cos, losses=r.losses,
                secs=time.perf_counter() - t0), emb0


def render(runs, args, data) -> str:
    """runs: {seed: [result per config, dense first]}; one row per config, figures averaged over the seeds."""
    import statistics
    seeds = sorted(runs)
    rows = []
    for i, r in enumerate(runs[seeds[0]]):
        done = [s for s in seeds if i < len(runs[s])]  # a partial run: the seeds that reached this config
        per = [runs[s][i] for s in done]
        gaps = [x["after"][0] / runs[s][0]["after"][0] - 1 for s, x in zip(done, per)]
        gap = statistics.mean(gaps)
        key = (r["options"] or {}).get("attention_density"), (r["options"] or {}).get("ffn_density")
        target = TARGETS.get(key)
        verdict = "" if i == 0 or target is None else (" (target <= {:.0%}: {})".format(
            target, "met" if gap <= target else "MISSED"))
        spread = f" ± {statistics.stdev(gaps):.1%}" if len(gaps) > 1 else ""
        mean = lambda f: statistics.mean(f(x) for x in per)  # noqa: E731
        rows.append((r["label"], "-" if i == 0 else f"{r['cos']:.3f}", f"{mean(lambda x: x['before'][0]):.4f}",
                     f"{mean(lambda x: x['after'][0]):.4f}", "-" if i == 0 else f"{gap:+.1%}{spread}{verdict}",
                     "-" if i == 0 or len(gaps) < 2 else " ".join(f"{g:+.1%}" for g in gaps),
                     f"{mean(lambda x: x['before'][1]):.3f} -> {mean(lambda x: x['after'][1]):.3f}",
                     f"{sum(x['secs'] for x in per):.0f} s"))
    table = markdown_table(("config (attention, ffn)", "training-free cosine", "held-out loss before",
                            "after", "gap to dense after (mean ± sd over seeds)", "gap per seed", "retrieval acc",
                            "wall"), rows)
    return (f"{table}\n\n"
            f"- model: all-MiniLM-L6-v2 (pretrained wheel), full fine-tuning, fused AdamW lr {args.lr}, {args.steps} steps, "
            f"batch {args.batch} pairs (= {2 * args.batch} x {args.seq} tokens), batch-order seeds "
            f"{' '.join(map(str, seeds))} (figures: means over the seeds; each gap against the dense run of its seed), "
            f"dropout 0, fp32\n"
            f"- data: {data.files} texts from {data.source}; {data.train.shape[0]} training pairs, "
            f"{data.heldout.shape[0]} held-out pairs (held out: {data.heldout_note}); every config sees the same "
            f"batches in the same order\n"
            f"- held-out loss: symmetric in-batch InfoNCE (scale {D.SCALE:g}) over fixed held-out batches of "
            f"{args.batch} pairs; gap = spt after / dense after - 1 (lower loss is better); retrieval: each first "
            f"half against all held-out second halves\n"
            f"- evaluation: each spt row as compiled (sparse), the dense row dense; spt options besides the "
            f"densities: {args.options} (the rest at their defaults)\n"
            f"- training-free cosine: mean cosine between the spt and dense embeddings of the held-out sequences "
            f"with the pretrained weights\n"
            f"- {load_note() or 'load unknown'} (wall times only; the figures above do not depend on load)\n")


def plot(results, path):
    """Training-loss curves of one seed's runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(r["losses"], label=r["label"], alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (in-batch InfoNCE)")
    ax.set_title(f"MiniLM fine-tuning, dense vs spt ({machine_name()})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_grid(text: str) -> list[tuple[float, float]]:
    """'0.5,0.5;0.25,0.25' -> [(0.5, 0.5), (0.25, 0.25)]; '' -> [] (no such rows)."""
    return [tuple(float(x) for x in c.split(",")) for c in text.split(";") if c.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (attention needs >= min_seq_len=128 "
                                                         "keys to be rewritten at the defaults)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per batch")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="batch-order seeds (each config runs once per seed)")
    ap.add_argument("--grid", default=None, help="subset of the grid, e.g. '0.5,0.5;0.25,0.25'")
    ap.add_argument("--improve", default=None,
                    help="JSON of extra spt options for added rows at the grid's target densities")
    ap.add_argument("--improve-at", default=None,
                    help="densities of the --improve rows, as --grid (default: the grid's target densities)")
    ap.add_argument("--options", default="{}",
                    help='JSON of spt options for every spt row besides the densities, e.g. \'{"inner_backend": '
                         '"aot_eager"}\' (the same rewritten graph and sparse ops without inductor\'s code '
                         'generation: minutes less compile per row on a small CPU)')
    ap.add_argument("--name", default="quality", help="result file bench/results/<name>-<machine>.md (and .png)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    grid = GRID if args.grid is None else parse_grid(args.grid)
    improve_at = [c for c in grid if c in TARGETS] if args.improve_at is None else parse_grid(args.improve_at)
    extra = json.loads(args.improve) if args.improve else None
    base = json.loads(args.options)
    quiet_transformers()
    tok, encoder = D.load_minilm()
    data = D.make_pairs(tok, half=args.seq - 2)
    held = D.heldout_batches(data.heldout, args.batch)
    print(f"machine: {machine_name()}", flush=True)

    configs = [("dense (inductor)", "inductor", None)]
    configs += [(f"spt ({a}, {f})", "spt", {**base, "attention_density": a, "ffn_density": f}) for a, f in grid]
    if extra:
        configs += [(f"spt ({a}, {f}) + {json.dumps(extra)}", "spt",
                     {**base, "attention_density": a, "ffn_density": f, **extra})
                    for a, f in improve_at]
    runs, ref = {}, None
    for seed in args.seeds:
        torch.manual_seed(seed)
        train = D.train_batches(data.train, args.batch, args.steps, seed)
        runs[seed] = []
        for label, backend, opts in configs:
            print(f"seed {seed}, {label}: {args.steps} steps ...", flush=True)
            res, emb0 = run_config(label, backend, opts, encoder, train, held, args.lr, ref)
            ref = emb0 if ref is None else ref
            runs[seed].append(res)
            print(f"  held-out loss {res['before'][0]:.4f} -> {res['after'][0]:.4f} ({res['secs']:.0f} s)", flush=True)
            body = render(runs, args, data)
            left = len(configs) * len(args.seeds) - sum(map(len, runs.values()))
            if left:
                body += f"- partial: {left} run(s) still running or not run\n"
            if not args.no_write:  # after every run: a long run that is cut short keeps what it measured
                path = write_result(args.name, body)
                plot(runs[args.seeds[0]], path[:-3] + ".png")
    print(body)
    if not args.no_write:
        print(f"wrote {path} and {path[:-3]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
