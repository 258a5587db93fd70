"""The one place for the sizing formulas every layer shares: the compiler's plan, the ops, their fake impls
and the report all call these, so they agree bit for bit (docs/OPS.md).

- attention: L, the number of key slots per query (or per query tile), and when attention is exact;
- routed FFN: k, the number of blocks per token, and when the FFN is exact.
"""
from __future__ import annotations

import math


def attention_keys_kept(nk: int, density: float) -> int:
    """L = max(1, ceil(density * Nk)): key slots per query."""
    return max(1, math.ceil(density * nk))


def attention_is_exact(nk: int, density: float, min_seq_len: int = 0) -> bool:
    """Exact mode: every allowed key is kept (no PQ, equals scaled_dot_product_attention). It holds when L
    covers every key, and below the run-time threshold Nk < min_seq_len (the op decides per call, so one
    graph with a symbolic length serves short and long sequences)."""
    return nk < min_seq_len or attention_keys_kept(nk, density) >= nk


def ffn_top_k(num_blocks: int, density: float) -> int:
    """k = max(1, round(density * E)), at most E: blocks per token."""
    return max(1, min(num_blocks, round(density * num_blocks)))


def ffn_is_exact(num_blocks: int, top_k: int) -> bool:
    """Exact mode: every block is kept (the op runs the dense FFN)."""
    return top_k >= num_blocks
