"""Router quality on the real pretrained all-MiniLM-L6-v2 (and a random-weight SwiGLU FFN).

Per layer we capture the FFN inputs x on real English prose (the GPL-3 / Apache-2.0 texts in
/usr/share/common-licenses, padding excluded) and measure the activation *energy kept*:
    kept(x) = Σ over the token's kept blocks e of ||act(W1_e x + b1_e)||² / ||act(W1 x + b1)||²,
averaged over tokens, for the oracle, lowrank (rank 32) and random routers, with and without neuron
clustering (balanced k-means block_perm), E = 16, density 0.5 (top 8 blocks). The oracle maximises kept energy
by construction; the target is lowrank >= 85% of the oracle's kept energy (averaged over layers, clustered).
Also: training-free sentence-embedding cosine (mean pooling) of the model with every FFN routed vs dense, at
densities 0.75 and 0.5 with the oracle and lowrank routers.

    python bench/router_quality.py [--sentences 64] [--no-write]
Writes bench/results/router-<machine>.md. tests/models/test_router_quality.py imports the helpers.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import spt_compile.lowering  # noqa: E402,F401
from spt_compile.lowering import router as R  # noqa: E402
from spt_compile.lowering.neuron_blocks import compute_block_perm  # noqa: E402
from spt_compile.lowering.reference.routed_ffn import activation_forward  # noqa: E402

LICENSE_FILES = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from spt_compile.demo_data import minilm_dir
    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tok, model


def prose_sentences(n: int) -> list[str]:
    """Sentences of English prose (license texts: no code), deterministic order, at least 8 words each."""
    text = " ".join(open(f, encoding="utf-8").read() for f in LICENSE_FILES if os.path.exists(f))
    if not text:
        raise FileNotFoundError(f"none of {LICENSE_FILES} exists on this machine")
    text = re.sub(r"\s+", " ", text)
    sents = [s.strip() for s in re.split(r"(?<=[.;:])\s+", text)]
    sents = [s for s in sents if len(s.split()) >= 8 and sum(c.isalpha() for c in s) > 0.7 * len(s)]
    return sents[:n]


def capture_ffn_inputs(tok, model, sentences, max_length=64):
    """Per layer: x [N_tokens, d] entering intermediate.dense (padding tokens dropped), plus (W1, b1)."""
    batch = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    keep = batch["attention_mask"].bool()                                       # [B, S]
    layers = model.encoder.layer
    xs = [None] * len(layers)
    hooks = [layer.intermediate.dense.register_forward_hook(
        lambda m, inp, out, i=i: xs.__setitem__(i, inp[0][keep].detach())) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    weights = [(layer.intermediate.dense.weight.detach(), layer.intermediate.dense.bias.detach()) for layer in layers]
    return xs, weights


def block_energy(x, w1, b1, perm, E, activation="gelu", w_up=None, b_up=None):
    """[T, E] energy ||hidden_e(x)||² per block (fp32)."""
    return R.oracle_scores(x, w1, b1, w_up, b_up, perm, activation, E) ** 2


def kept_fraction(energy: torch.Tensor, block_ids: torch.Tensor) -> float:
    """Mean over tokens of (energy in the kept blocks) / (total energy)."""
    kept = energy.gather(1, block_ids.long()).sum(1)
    return (kept / energy.sum(1).clamp_min(1e-30)).mean().item()


ROUTER_NAMES = ("oracle", "lowrank", "lowrank-svd", "random")


def router_choices(x, w1, b1, perm, E, k, activation="gelu", w_up=None, b_up=None, rank=32, seed=0, x_fit=None):
    """block_ids [T, k] per router: oracle, lowrank (the op's data-aware factors), lowrank-svd (plain SVD of
    W1), random (a local generator: no global RNG). x_fit: tokens of the call that computes the lowrank
    factors (held out from x, as in training where a refresh serves the next router_refresh calls)."""
    out = {}
    for name, router, aware in (("oracle", "oracle", True), ("lowrank", "lowrank", True),
                                ("lowrank-svd", "lowrank", False)):
        R.clear_router_cache()
        if x_fit is not None and router == "lowrank":  # this call computes and caches the factors
            R.route(x_fit, w1, b1, w_up, b_up, perm, activation, E, k, router, rank, 10**9, site_id=-1,
                    data_aware=aware)
        out[name] = R.route(x, w1, b1, w_up, b_up, perm, activation, E, k, router, rank, 10**9, site_id=-1,
                            data_aware=aware)
    g = torch.Generator().manual_seed(seed)
    out["random"] = torch.rand(x.shape[0], E, generator=g).topk(k, dim=1).indices.to(torch.int32)
    return out


def energy_table(xs, weights, E=16, density=0.5, rank=32, activation="gelu", gated_weights=None,
                 xs_fit=None, clusters=(True, False)):
    """rows: per layer and clustering, the kept energy of each router; returns (rows, summary dict).
    xs_fit: per layer, held-out tokens the lowrank factors are computed from (None: from xs itself)."""
    k = max(1, round(density * E))
    rows, ratios, ratios_svd = [], {True: [], False: []}, {True: [], False: []}
    for li, (x, (w1, b1)) in enumerate(zip(xs, weights)):
        w_up = b_up = None
        if gated_weights is not None:
            w_up, b_up = gated_weights[li]
        for cluster in clusters:
            perm = compute_block_perm(w1, E, cluster=cluster)
            R.clear_router_cache()
            energy = block_energy(x, w1, b1, perm, E, activation, w_up, b_up)
            ch = router_choices(x, w1, b1, perm, E, k, activation, w_up, b_up, rank,
                                x_fit=None if xs_fit is None else xs_fit[li])
            kept = {n: kept_fraction(energy, ids) for n, ids in ch.items()}
            ratios[cluster].append(kept["lowrank"] / kept["oracle"])
            ratios_svd[cluster].append(kept["lowrank-svd"] / kept["oracle"])
            rows.append([li, "yes" if cluster else "no", f"{kept['oracle']:.3f}", f"{kept['lowrank']:.3f}",
                         f"{kept['lowrank-svd']:.3f}", f"{kept['random']:.3f}",
                         f"{kept['lowrank'] / kept['oracle']:.3f}", f"{kept['lowrank-svd'] / kept['oracle']:.3f}"])
    summary = {c: sum(v) / len(v) for c, v in ratios.items() if v}
    summary.update({("svd", c): sum(v) / len(v) for c, v in ratios_svd.items() if v})
    return rows, summary


# ------------------------------------------------------------------ end-to-end: sentence embeddings


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embed(tok, model, sentences, routed=None, max_length=64):
    """Mean-pooled embeddings; routed=(density, router, E) swaps every layer's FFN for the routed op."""
    batch = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    patches = []
    if routed is not None:
        density, router, E = routed
        k = max(1, round(density * E))
        for i, layer in enumerate(model.encoder.layer):
            inter = layer.intermediate
            perm = compute_block_perm(inter.dense.weight, E)
            out_dense = layer.output.dense

            def fwd(hidden_states, inter=inter, out_dense=out_dense, perm=perm, site=i):
                y, *_ = torch.ops.spt.routed_ffn(
                    hidden_states, inter.dense.weight, inter.dense.bias, None, None, out_dense.weight,
                    out_dense.bias, perm, "gelu", E, k, router, 32, 200, 10_000 + site)
                return y

            # BertIntermediate -> routed op computing W2·act(W1 x); BertOutput.dense then must be identity
            patches.append((inter, inter.forward, out_dense, out_dense.forward))
            inter.forward = fwd
            out_dense.forward = lambda h: h
    try:
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
    finally:
        for inter, f1, out_dense, f2 in patches:
            inter.forward = f1
            out_dense.forward = f2
    return mean_pool(hidden, batch["attention_mask"])


def embedding_cosines(tok, model, sentences, densities=(0.75, 0.5), E=16):
    R.clear_router_cache()
    dense = embed(tok, model, sentences)
    rows = []
    for density in densities:
        for router in ("oracle", "lowrank"):
            e = embed(tok, model, sentences, routed=(density, router, E))
            cos = torch.nn.functional.cosine_similarity(e, dense, dim=-1)
            rows.append([density, router, f"{cos.mean().item():.4f}", f"{cos.min().item():.4f}"])
    return rows


# ------------------------------------------------------------------ random-weight SwiGLU


def swiglu_inputs(T=512, d=256, H=704, seed=0):
    """A LLaMA-style SwiGLU FFN with random (init-scale) weights and Gaussian inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    w_gate = torch.randn(H, d, generator=g) * d ** -0.5
    w_up = torch.randn(H, d, generator=g) * d ** -0.5
    return x, w_gate, w_up


def main(argv=None):
    from bench._common import machine_name, markdown_table, write_result
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)  # nothing below uses the global RNG; this only pins any library default
    tok, model = load_minilm()
    sents = prose_sentences(args.sentences)
    # even sentences are evaluated; the lowrank factors come from the odd ones (held out)
    xs, weights = capture_ffn_inputs(tok, model, sents[0::2])
    xs_fit, _ = capture_ffn_inputs(tok, model, sents[1::2])
    ntok = sum(x.shape[0] for x in xs) // len(xs)
    out = [f"Machine: {machine_name()}. all-MiniLM-L6-v2 (pretrained), {len(sents)} prose sentences "
           f"(evaluated on the {ntok} tokens of the even ones; lowrank factors fit on the odd ones) from {', '.join(LICENSE_FILES)}. E=16, density 0.5 (k=8). lowrank = the op's router (rank-r factors of W1 weighted by the input "
           f"second moment of the refresh call's tokens); lowrank-svd = plain truncated SVD of W1.\n"]
    headers = ["layer", "clustered", "oracle kept", "lowrank kept", "lowrank-svd kept", "random kept",
               "lowrank / oracle", "lowrank-svd / oracle"]
    for rank in (32, 64):
        rows, summary = energy_table(xs, weights, rank=rank, xs_fit=xs_fit)
        out.append(f"\n## Energy kept per layer, MiniLM, lowrank rank {rank}\n\n" + markdown_table(headers, rows))
        out.append(f"\nlowrank/oracle averaged over layers: clustered {summary[True]:.3f}, "
                   f"unclustered {summary[False]:.3f} (target >= 0.85 clustered); plain-SVD lowrank: clustered "
                   f"{summary[('svd', True)]:.3f}, unclustered {summary[('svd', False)]:.3f}\n")
        print(out[-2], out[-1], flush=True)
    x, wg, wu = swiglu_inputs()
    rows, summary = energy_table([x], [(wg, None)], activation="silu", gated_weights=[(wu, None)])
    out.append("\n## Random-weight SwiGLU (d=256, H=704, silu, Gaussian x; scores ||silu(Wg x) * (Wu x)||)\n\n"
               + markdown_table(headers, rows))
    out.append(f"\nlowrank/oracle: clustered {summary[True]:.3f}, unclustered {summary[False]:.3f}; plain SVD: "
               f"clustered {summary[('svd', True)]:.3f}, unclustered {summary[('svd', False)]:.3f}\n")
    print(out[-2], out[-1], flush=True)
    rows = embedding_cosines(tok, model, sents)
    out.append("\n## Sentence-embedding cosine to dense (mean pooling, all 6 FFNs routed, training-free)\n\n"
               + markdown_table(["density", "router", "mean cosine", "min cosine"], rows) + "\n")
    print(out[-1], flush=True)
    if not args.no_write:
        print("wrote", write_result("router", "\n".join(out)))


if __name__ == "__main__":
    main()
