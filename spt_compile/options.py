"""The options of `torch.compile(model, backend="spt", options={...})`, validated when compiling.

Every key is documented in OPTION_DOCS (shown by `python -m spt_compile options`). A bad key or value raises
ValueError naming it, before any graph is touched.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

# The default query tile T (issue #9): the ONE place it lives. Everything else (the docs string below, the plan,
# the tests) reads it from here, so the final default is a one-line change. Provisional: the lead sets it from the
# CPU speed / MiniLM quality measurements (bench/attention_tiles.py).
DEFAULT_ATTENTION_QUERY_TILE = 64
DEFAULT_ATTENTION_MIN_KEYS = 64
# every s-th query of a tile scores keys in the selection (README "query tiles": MiniLM cosine and CPU time per s)
DEFAULT_ATTENTION_SELECT_STRIDE = 4

_ROUTERS = ("lowrank", "oracle")
_INNER_BACKENDS = ("inductor", "aot_eager")

OPTION_DOCS = {
    "attention": '"pq" (default): rewrite attention into PQ-sparse attention; "dense": leave attention alone',
    "attention_density": "fraction of the keys kept, in (0, 1]: with attention_query_tile T >= 1 of the keys a query "
                         "tile may see (L_tile = min(allowed, max(attention_min_keys, ceil(density * allowed)))), "
                         "with T = 0 of all Nk keys per query (L = ceil(density * Nk)); 1.0 is exact mode (default 0.25)",
    "attention_query_tile": "T: tiles of T consecutive queries share one PQ-selected key list (the estimated softmax "
                            "mass summed over their scored queries, attention_select_stride); 1 = per-query "
                            "selection with the tile formula for L; 0 = the per-query op "
                            "of before (fixed L = ceil(density * Nk), attention_min_keys unused), an integer >= 0 "
                            f"(default {DEFAULT_ATTENTION_QUERY_TILE})",
    "attention_min_keys": "L_min: no query tile keeps fewer keys than this (unless it may see fewer), so early causal "
                          "tiles do not starve; only with attention_query_tile >= 1; min_seq_len still decides "
                          f"whether a site is sparse at all, an integer >= 1 (default {DEFAULT_ATTENTION_MIN_KEYS})",
    "attention_select_stride": "s: only every s-th query of a tile (counted back from its last) scores keys when the "
                               "tile's list is chosen, dividing the selection's N x N work by s; every query still "
                               "attends exactly over the list; 1 = all queries score; only with attention_query_tile "
                               f">= 1 (capped at T), an integer >= 1 (default {DEFAULT_ATTENTION_SELECT_STRIDE})",
    "attention_share_kv_lists": "GQA: the query heads of one kv head keep ONE key list per tile (the estimated mass "
                                "summed over them too), so the CPU path gathers each kept key once per kv head "
                                "(bench/attention_tiles.py gqa: faster selection and attention); costs quality "
                                "(MiniLM cosine -0.015 at density 0.125 with 4 heads per list, README); no effect "
                                "without GQA or with attention_query_tile 0 (default False)",
    "pq_subspaces": "PQ sub-spaces per head (M); must divide the head dim, else the largest divisor <= M is used and reported (default 8)",
    "pq_centroids": "k-means centroids per sub-space (C), 2..256 (default 16)",
    "pq_kmeans_iters": "Lloyd iterations when fitting the key codebooks, 0..20 (default 3)",
    "min_seq_len": "attention with fewer keys than this runs exact: decided when compiling for a static length, "
                   "by the op on every call for a symbolic one (default 128)",
    "ffn": '"routed" (default): rewrite FFNs into routed FFNs; "dense": leave FFNs alone',
    "ffn_blocks": "number of neuron blocks E per FFN; must divide the hidden width, else the largest divisor <= E is used and reported (default 16)",
    "ffn_density": "fraction of blocks each token uses, in (0, 1]; top-k = max(1, round(density * E)); 1.0 is exact mode (default 0.5)",
    "ffn_router": '"lowrank" (default): rank-r SVD predictor of the first projection; "oracle": exact scores (dense first GEMM)',
    "ffn_router_rank": "rank r of the low-rank router, >= 1 (default 32)",
    "ffn_router_refresh": "refresh the low-rank router from the current weights every this many calls, >= 1 (default 200)",
    "ffn_cluster": "group co-activating neurons into blocks by balanced k-means of the first projection's rows (default True)",
    "inner_backend": '"inductor" (default) compiles the rewritten graph with inductor; "aot_eager" runs it eagerly through AOTAutograd (debugging)',
}


@dataclasses.dataclass(frozen=True)
class SptOptions:
    attention: str = "pq"
    attention_density: float = 0.25
    attention_query_tile: int = DEFAULT_ATTENTION_QUERY_TILE
    attention_min_keys: int = DEFAULT_ATTENTION_MIN_KEYS
    attention_select_stride: int = DEFAULT_ATTENTION_SELECT_STRIDE
    attention_share_kv_lists: bool = False
    pq_subspaces: int = 8
    pq_centroids: int = 16
    pq_kmeans_iters: int = 3
    min_seq_len: int = 128
    ffn: str = "routed"
    ffn_blocks: int = 16
    ffn_density: float = 0.5
    ffn_router: str = "lowrank"
    ffn_router_rank: int = 32
    ffn_router_refresh: int = 200
    ffn_cluster: bool = True
    inner_backend: str = "inductor"

    def __post_init__(self) -> None:
        _check_choice("attention", self.attention, ("pq", "dense"))
        _check_fraction("attention_density", self.attention_density)
        _check_int("attention_query_tile", self.attention_query_tile, 0, None,
                   "(queries per tile sharing one key list; 0 = per-query op with L = ceil(density * Nk))")
        _check_int("attention_min_keys", self.attention_min_keys, 1, None)
        _check_int("attention_select_stride", self.attention_select_stride, 1, None)
        _check_int("pq_subspaces", self.pq_subspaces, 1, 1024)
        _check_int("pq_centroids", self.pq_centroids, 2, 256)
        _check_int("pq_kmeans_iters", self.pq_kmeans_iters, 0, 20)
        _check_int("min_seq_len", self.min_seq_len, 0, None)
        _check_choice("ffn", self.ffn, ("routed", "dense"))
        _check_int("ffn_blocks", self.ffn_blocks, 1, 4096)
        _check_fraction("ffn_density", self.ffn_density)
        _check_choice("ffn_router", self.ffn_router, _ROUTERS)
        _check_int("ffn_router_rank", self.ffn_router_rank, 1, None)
        _check_int("ffn_router_refresh", self.ffn_router_refresh, 1, None)
        for key in ("attention_share_kv_lists", "ffn_cluster"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"spt option {key!r} must be a bool, got {getattr(self, key)!r}")
        _check_choice("inner_backend", self.inner_backend, _INNER_BACKENDS)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | "SptOptions" | None) -> "SptOptions":
        if options is None:
            return cls()
        if isinstance(options, SptOptions):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"spt options must be a dict, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown spt option(s) {', '.join(map(repr, unknown))}; "
                             f"valid keys: {', '.join(sorted(known))}")
        return cls(**dict(options))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"spt option {key!r} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_fraction(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (0.0 < value <= 1.0):
        raise ValueError(f"spt option {key!r} must be a number in (0, 1], got {value!r}")


def _check_int(key: str, value: Any, lo: int, hi: int | None, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"spt option {key!r} must be an integer {rng}{' ' + meaning if meaning else ''}, "
                         f"got {value!r}")
