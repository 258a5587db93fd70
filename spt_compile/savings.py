"""What a rewritten site saves: sympy formulas in the sequence length N and the token count n, dense vs spt.

The formulas follow the op contracts in docs/OPS.md (what each op saves for its backward, how many key pairs /
neuron blocks it computes) and what autograd saves for the dense spelling the site had:

attention (per site; s = bytes per element of q, B batch, H query heads, Hkv kv heads, D / Dv head dims)
- saved for backward beyond q, k, v and the mask:
    dense eager:  P = softmax(S)          B·H·Nq·Nk·s            (+ dropout: its bool mask and the dropped P)
    dense sdpa:   out + lse (flash-style) B·H·Nq·Dv·s + 4·B·H·Nq
    spt:          out + lse + idx         B·H·Nq·Dv·s + 4·B·H·Nq + 4·B·H·⌈Nq/T⌉·L   (+ 8-byte seed with dropout)
                  (T = 0, the per-query op: ⌈Nq/T⌉ reads Nq and L = ⌈density·Nk⌉; T ≥ 1: L = L_max)
- FLOPs of the attention math, forward + backward (S = QKᵀ and P·V forward, 4 GEMMs backward: 3x forward):
    dense: 6·B·H·Nq·Nk·(D + Dv);  spt: the same at the kept pairs, 6·B·H·pairs·(D + Dv), where
    T = 0:  pairs = Nq·L (bidirectional), Nq·L − L(L−1)/2 (causal: query i keeps min(i+1, L) keys);
    T ≥ 1:  pairs = Nq·L_max (bidirectional: every tile sees Nk keys), P (causal) = Σ over tiles t of
            rows_t · L_tile(min(Nk, end_t)) with L_tile from lowering/formulas.py: the (query, slot) pairs the
            tiled op computes (exact for T = 1; for T > 1 it includes the tile's diagonal block).
- spt overhead FLOPs (no dense counterpart): PQ k-means and codes 2·B·Hkv·Nk·C·D·(iters+1), query lookup
  tables 2·B·H·Nq·C·D, code scores B·H·(Nq/σ)·Nk·M (query tiles: only every σ-th query scores, the op's
  select_stride), and the backward's score recompute 2·B·H·pairs·D.
  Exact mode (every key kept) has no PQ.
ffn (n tokens, width d → H_ff → d_out, g = 1 when gated, E blocks, k kept per token, router rank r)
- FLOPs forward + backward (3x the forward GEMMs): dense 6·n·(d·H_ff·(1+g) + H_ff·d_out); spt the same × k/E.
- router FLOPs (forward only): lowrank 2·n·r·(d + H_ff)·(1+g); oracle 2·n·d·H_ff·(1+g); none in exact mode.
- activation bytes saved for backward (beyond x and the weights):
    dense: c·n·H_ff·s with c = 2 (act input, and its output for the second projection), 1 for ReLU (its
           output is both), gated 4 (gate pre-activation, act(gate), up, the product), gated ReLU 3;
    spt:   n·k·(H_ff/E)·s·(1+g) (h_pre, h_up) + 4·n·k (block_ids).
  A written-out activation (GPT-2's tanh formula) saves more than one tensor: the dense figure is then a
  lower bound, so the saving is understated, never overstated.

Sizes come from the arguments of the spt op call in the rewritten graph (the graph says what will run), L and k
from the site's plan or lowering/formulas.py; nothing here decides anything.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import sympy as sp

# attention symbols
B, H, HKV, NQ, NK, D, DV, L, TQ, S = sp.symbols("B H H_kv N_q N_k D D_v L T s", positive=True, integer=True)
PAIRS = sp.Symbol("P", positive=True, integer=True)     # causal query tiles: Σ_t rows_t·L_tile (tile_pairs)
C, M, ITERS = sp.symbols("C M iters", positive=True, integer=True)
SIGMA = sp.Symbol("sigma", positive=True, integer=True)  # select_stride: every σ-th query of a tile scores keys
N = sp.Symbol("N", positive=True, integer=True)          # the sequence length when Nq == Nk (self-attention)
# ffn symbols
NTOK, DM, DOUT, HFF, E, K, R = sp.symbols("n d d_out H_ff E k r", positive=True, integer=True)

INT32, FP32, INT64 = 4, 4, 8


@dataclasses.dataclass
class Estimate:
    """One quantity of one site: a dense and an spt formula, and their values at the traced sizes."""
    quantity: str                  # e.g. "attention FLOPs (fwd+bwd)"
    unit: str                      # "B" | "FLOP"
    dense: sp.Expr
    spt: sp.Expr
    values: dict[sp.Symbol, int]   # the traced sizes

    def dense_value(self) -> int:
        return int(sp.ceiling(self.dense.subs(self.values)))

    def spt_value(self) -> int:
        return int(sp.ceiling(self.spt.subs(self.values)))

    def saved(self) -> int:
        return self.dense_value() - self.spt_value()

    def ratio(self) -> float | None:
        dense = self.dense_value()
        return self.spt_value() / dense if dense else None

    def as_dict(self) -> dict[str, Any]:
        return {"quantity": self.quantity, "unit": self.unit, "dense": self.dense_value(), "spt": self.spt_value(),
                "saved": self.saved(), "ratio": self.ratio(), "dense_formula": str(self.dense),
                "spt_formula": str(self.spt), "sizes": {str(k): v for k, v in self.values.items()}}


# --- attention --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttentionSizes:
    batch: int
    heads: int
    kv_heads: int
    nq: int
    nk: int
    head_dim: int
    v_dim: int
    elem_bytes: int
    keys_kept: int                 # L: per query (T = 0), or L_max, the idx slots per query tile (T >= 1)
    exact: bool
    is_causal: bool = False
    dropout: bool = False
    spelling: str = "eager"        # the dense spelling: "eager" saves P, "sdpa" saves out + lse
    query_tile: int = 0            # T: queries sharing one key list (0 = the per-query op, docs/OPS.md)
    min_keys: int = 64             # L_min of the tile formula (T >= 1 only)
    select_stride: int = 1         # σ: every σ-th query of a tile scores keys (T >= 1 only)
    density: float | None = None   # needed for causal tiles only (their lists differ: tile_pairs)
    subspaces: int = 8
    centroids: int = 16
    kmeans_iters: int = 3


def _kept_pairs(z: AttentionSizes, nq, nk):
    if z.exact:  # every allowed key
        return nq * (nq + 1) / 2 if z.is_causal and z.nq == z.nk else nq * nk
    if z.is_causal and z.query_tile:
        return PAIRS                       # tile lists grow with the keys a tile may see (tile_pairs)
    if z.is_causal:
        return nq * L - L * (L - 1) / 2    # query i keeps min(i + 1, L) keys
    return nq * L                          # an upper bound when a mask hides keys


def tile_pairs(nq: int, nk: int, tile: int, density: float, min_keys: int, causal: bool) -> int:
    """Σ over query tiles of (its queries) x L_tile: the (query, slot) pairs the tiled op computes per head.
    Tile t holds queries [t*T, min((t+1)*T, Nq)); under top-left causality it may see min(Nk, its end) keys."""
    from spt_compile.lowering import formulas

    total = 0
    for start in range(0, nq, tile):
        end = min(start + tile, nq)
        allowed = min(nk, end) if causal else nk
        total += (end - start) * formulas.attention_tile_keys(allowed, density, min_keys)
    return total


def attention_estimates(z: AttentionSizes) -> list[Estimate]:
    self_attn = z.nq == z.nk
    nq, nk = (N, N) if self_attn else (NQ, NK)
    values = {B: z.batch, H: z.heads, HKV: z.kv_heads, D: z.head_dim, DV: z.v_dim, S: z.elem_bytes,
              L: z.keys_kept, TQ: max(1, z.query_tile), C: z.centroids, M: z.subspaces, ITERS: z.kmeans_iters,
              SIGMA: z.select_stride}
    if z.query_tile and z.is_causal and not z.exact:
        if z.density is None:
            raise ValueError("AttentionSizes.density is required for causal query tiles (T >= 1)")
        values[PAIRS] = tile_pairs(z.nq, z.nk, z.query_tile, z.density, z.min_keys, True)
    values.update({N: z.nq} if self_attn else {NQ: z.nq, NK: z.nk})
    out_lse = B * H * nq * DV * S + FP32 * B * H * nq
    if z.spelling == "sdpa":
        dense_bytes = out_lse
    else:
        dense_bytes = B * H * nq * nk * S * (2 if z.dropout else 1) + (B * H * nq * nk if z.dropout else 0)
    tiles = nq if z.query_tile <= 1 else sp.ceiling(nq / TQ)
    spt_bytes = out_lse + INT32 * B * H * tiles * L + (INT64 if z.dropout else 0)
    pairs = _kept_pairs(z, nq, nk)
    dense_pairs = nq * nk
    flops = lambda p: 6 * B * H * p * (D + DV)  # noqa: E731 - 2 GEMMs forward, 4 backward
    selection = 0 if z.exact else (2 * B * HKV * nk * C * D * (ITERS + 1) + 2 * B * H * nq * C * D
                                   + B * H * nq / SIGMA * nk * M)
    overhead = selection + 2 * B * H * pairs * D
    return [
        Estimate("attention saved for backward", "B", dense_bytes, spt_bytes, values),
        Estimate("attention FLOPs (fwd+bwd)", "FLOP", flops(dense_pairs), flops(pairs), values),
        Estimate("attention spt overhead FLOPs (PQ selection, bwd recompute)", "FLOP", sp.Integer(0),
                 overhead, values),
    ]


# --- ffn --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FfnSizes:
    tokens: int
    d_model: int
    hidden: int
    d_out: int
    elem_bytes: int
    num_blocks: int
    top_k: int
    gated: bool
    activation: str
    router: str = "lowrank"
    router_rank: int = 32


def ffn_estimates(z: FfnSizes) -> list[Estimate]:
    g = 1 if z.gated else 0
    values = {NTOK: z.tokens, DM: z.d_model, HFF: z.hidden, DOUT: z.d_out, S: z.elem_bytes, E: z.num_blocks,
              K: z.top_k, R: min(z.router_rank, z.hidden, z.d_model)}
    dense_flops = 6 * NTOK * (DM * HFF * (1 + g) + HFF * DOUT)
    spt_flops = dense_flops * K / E
    exact = z.top_k >= z.num_blocks
    if exact:
        router = sp.Integer(0)
    elif z.router == "oracle":
        router = 2 * NTOK * DM * HFF * (1 + g)
    else:
        router = 2 * NTOK * R * (DM + HFF) * (1 + g)
    relu = z.activation == "relu"
    saved_per_neuron = (3 if relu else 4) if z.gated else (1 if relu else 2)
    dense_bytes = saved_per_neuron * NTOK * HFF * S
    spt_bytes = NTOK * K * (HFF / E) * S * (1 + g) + INT32 * NTOK * K
    return [
        Estimate("FFN FLOPs (fwd+bwd)", "FLOP", dense_flops, spt_flops, values),
        Estimate("FFN router FLOPs", "FLOP", sp.Integer(0), router, values),
        Estimate("FFN activations saved for backward", "B", dense_bytes, spt_bytes, values),
    ]


# --- from the rewritten graph -----------------------------------------------------------------------------

def attention_sizes_from_op(op: dict[str, Any], plan: dict[str, Any], spelling: str) -> AttentionSizes:
    """AttentionSizes from the recorded arguments of a pq_sparse_attention call (graph_picture.op_arguments):
    the graph says what will run, so T and L_min come from the op's query_tile / min_keys arguments."""
    q, k, v = op["q"], op["k"], op["v"]   # {"shape": [...], "dtype": ..., "itemsize": ...}
    batch, heads, nq, head_dim = q["shape"]
    nk = k["shape"][2]
    if not all(isinstance(x, int) for x in (*q["shape"], *k["shape"], *v["shape"])):
        raise ValueError(f"symbolic sizes without a hint: q{q['shape']} k{k['shape']}")
    tile, min_keys = int(op.get("query_tile", 0)), int(op.get("min_keys", 64))
    keys, exact = _keys_and_exact(op, plan, nq, nk, tile, min_keys)
    return AttentionSizes(
        batch=batch, heads=heads, kv_heads=k["shape"][1], nq=nq, nk=nk, head_dim=head_dim, v_dim=v["shape"][3],
        elem_bytes=q["itemsize"], keys_kept=keys, exact=exact, is_causal=bool(op["is_causal"]),
        dropout=float(op.get("dropout_p", 0.0)) > 0, spelling="sdpa" if spelling == "sdpa" else "eager",
        query_tile=tile, min_keys=min_keys, select_stride=int(op.get("select_stride", 1)),
        density=float(op["density"]), subspaces=int(op["pq_subspaces"]),
        centroids=int(op["pq_centroids"]), kmeans_iters=int(op["kmeans_iters"]))


def _keys_and_exact(op: dict[str, Any], plan: dict[str, Any], nq: int, nk: int, tile: int,
                    min_keys: int) -> tuple[int, bool]:
    """(idx slots L, exact mode) by lowering/formulas.py: per query for T = 0, L_max per tile for T >= 1."""
    from spt_compile.lowering import formulas

    density, causal, threshold = float(op["density"]), bool(op["is_causal"]), int(op.get("min_seq_len", 0))
    if tile:
        return (formulas.attention_tile_slots(nq, nk, density, min_keys, causal),
                formulas.attention_tile_is_exact(nq, nk, density, min_keys, causal, threshold))
    planned = plan.get("L")
    # a symbolic length: the plan says "ceil(density*Nk)" and the op sizes L per call; evaluate at the trace
    keys = planned if isinstance(planned, int) else formulas.attention_keys_kept(nk, density)
    return keys, formulas.attention_is_exact(nk, density, threshold)


def ffn_sizes_from_op(op: dict[str, Any]) -> FfnSizes:
    """FfnSizes from the recorded arguments of a routed_ffn call."""
    x, w1, w2 = op["x"], op["w1"], op["w2"]
    if not all(isinstance(s, int) for s in (*x["shape"], *w1["shape"], *w2["shape"])):
        raise ValueError(f"symbolic sizes without a hint: x{x['shape']}")
    tokens = 1
    for s in x["shape"][:-1]:
        tokens *= s
    return FfnSizes(tokens=tokens, d_model=x["shape"][-1], hidden=w1["shape"][0], d_out=w2["shape"][0],
                    elem_bytes=x["itemsize"], num_blocks=int(op["num_blocks"]), top_k=int(op["top_k"]),
                    gated=op.get("w_up") is not None, activation=str(op["activation"]), router=str(op["router"]),
                    router_rank=int(op.get("router_rank", 32)))


def site_estimates(kind: str, op: dict[str, Any], plan: dict[str, Any] | None = None,
                   spelling: str = "") -> list[Estimate]:
    """The estimates of one rewritten site, from its op's recorded arguments."""
    if kind == "attention":
        return attention_estimates(attention_sizes_from_op(op, plan or {}, spelling))
    if kind == "ffn":
        return ffn_estimates(ffn_sizes_from_op(op))
    raise ValueError(f"unknown site kind {kind!r}: expected 'attention' or 'ffn'")


def totals(per_site: list[list[Estimate]]) -> list[dict[str, Any]]:
    """Dense and spt totals per quantity over all sites (values, not formulas: sites differ in sizes)."""
    out: dict[str, dict[str, Any]] = {}
    for estimates in per_site:
        for e in estimates:
            row = out.setdefault(e.quantity, {"quantity": e.quantity, "unit": e.unit, "dense": 0, "spt": 0})
            row["dense"] += e.dense_value()
            row["spt"] += e.spt_value()
    for row in out.values():
        row["saved"] = row["dense"] - row["spt"]
        row["ratio"] = row["spt"] / row["dense"] if row["dense"] else None
    return list(out.values())


def human(value: float, unit: str) -> str:
    """1.5 MiB, 3.2 GFLOP: for tables."""
    if unit == "B":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or suffix == "TiB":
                return f"{value:.0f} {suffix}" if suffix == "B" else f"{value:.1f} {suffix}"
            value /= 1024
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1000 or suffix == "P":
            return f"{value:.0f} {unit}" if not suffix else f"{value:.2f} {suffix}{unit}"
        value /= 1000
    return f"{value} {unit}"
