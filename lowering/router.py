"""Router scores for the routed FFN: which blocks each token keeps.

"oracle":  score_e(x) = ||hidden_e(x)||, the exact block output magnitude before w2
           (ungated: act(W1_e x + b1_e); gated: act(Wg_e x + bg_e) * (Wu_e x + bu_e)). Costs the dense first GEMM.
"lowrank": the same formula with W1 (and W_up) replaced by their rank-r truncated SVDs, W ≈ A Vᵀ with
           A = W V [H, r] and V [d, r] the top right-singular vectors: cost O(T r (d + H)) instead of O(T d H).
           Gated FFNs score ||act(Ĝ x + bg) * (Û x + bu)||, i.e. both projections are predicted, because the
           up projection's sign and size change a block's output as much as the gate does.

The factors are computed from the current weights on a site's first call and recomputed every
`router_refresh` calls (training moves the weights; the op is opaque to inductor, so no recompile is needed).
They live in a small LRU cache keyed by (site_id, device, dtype, weight storage pointer, shape): the call
counter is a Python int, so the hot path never syncs with the device.
"""
from __future__ import annotations

import collections
import dataclasses

import torch

from spt_compile.lowering.reference.routed_ffn import activation_forward

ROUTERS = ("lowrank", "oracle")
_MAX_ENTRIES = 512


@dataclasses.dataclass
class _Factors:
    v: torch.Tensor            # [d, r] shared right factor for w1 (and w_up if gated: its own v_up)
    a: torch.Tensor            # [H, r] left factor (= w1[block_perm] @ v), rows in block order
    v_up: torch.Tensor | None
    a_up: torch.Tensor | None
    calls: int = 0             # calls served since the last refresh
    refreshes: int = 0         # how many times the factors were computed (for tests / reports)


_CACHE: "collections.OrderedDict[tuple, _Factors]" = collections.OrderedDict()


def clear_router_cache() -> None:
    _CACHE.clear()


def router_cache_entries(site_id: int) -> list[_Factors]:
    """The cached factor sets of one site (tests and reports read `refreshes` / `calls`)."""
    return [f for key, f in _CACHE.items() if key[0] == site_id]


def lowrank_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD W [H, d] ≈ A Vᵀ, A [H, r], V [d, r] (r = min(rank, H, d)), deterministic.

    Via the eigendecomposition of the small Gram matrix WᵀW [d, d] (in float64 for accuracy): its top-r
    eigenvectors are the top right-singular vectors, and A = W V = U_r S_r. With r = min(H, d) the product
    A Vᵀ reproduces W exactly (up to rounding), so lowrank scores equal the oracle's.
    """
    r = max(1, min(rank, w.shape[0], w.shape[1]))
    wf = w.detach().to(torch.float32)
    gram = (wf.t() @ wf).to(torch.float64)                                     # [d, d]
    _, vecs = torch.linalg.eigh(gram)                                          # ascending eigenvalues
    v = vecs[:, -r:].flip(1).to(torch.float32).contiguous()                    # [d, r]
    a = (wf @ v).contiguous()                                                  # [H, r]
    return a, v


def _storage_key(w):
    if w is None:
        return None
    return (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))


def _key(site_id, w1, w_up, block_perm):
    # the storage pointers separate layers that share a site_id; block_perm's pointer because the factors
    # are stored in block order
    return (site_id, w1.device, w1.dtype, _storage_key(w1), _storage_key(w_up), _storage_key(block_perm))


def _get_factors(site_id, w1, w_up, block_perm, rank, refresh) -> _Factors:
    key = _key(site_id, w1, w_up, block_perm)
    f = _CACHE.get(key)
    if f is not None and f.calls >= refresh:
        f = None  # due: recompute from the current weights
    if f is None:
        old = _CACHE.pop(key, None)
        a, v = lowrank_factors(w1, rank)
        a_up = v_up = None
        if w_up is not None:
            a_up, v_up = lowrank_factors(w_up, rank)
            a_up = a_up.index_select(0, block_perm)
        f = _Factors(v=v, a=a.index_select(0, block_perm), v_up=v_up, a_up=a_up,
                     refreshes=(old.refreshes if old is not None else 0) + 1)
        _CACHE[key] = f
        while len(_CACHE) > _MAX_ENTRIES:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    f.calls += 1
    return f


def _block_norms(hidden: torch.Tensor, num_blocks: int) -> torch.Tensor:
    T, H = hidden.shape
    return hidden.float().view(T, num_blocks, H // num_blocks).norm(dim=-1)   # [T, E]


def oracle_scores(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks) -> torch.Tensor:
    """[T, E] float32: exact ||hidden_e(x)||."""
    w1p = w1.index_select(0, block_perm)
    b1p = b1.index_select(0, block_perm) if b1 is not None else None
    pre = torch.nn.functional.linear(x2d, w1p, b1p)                           # [T, H] block order
    hidden = activation_forward(pre, activation)
    if w_up is not None:
        bup = b_up.index_select(0, block_perm) if b_up is not None else None
        hidden = hidden * torch.nn.functional.linear(x2d, w_up.index_select(0, block_perm), bup)
    return _block_norms(hidden, num_blocks)


def lowrank_scores(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks, rank, refresh,
                   site_id) -> torch.Tensor:
    """[T, E] float32: ||hidden_e(x)|| with low-rank predicted projections (float32 throughout)."""
    f = _get_factors(site_id, w1, w_up, block_perm, rank, refresh)
    xf = x2d.to(torch.float32)
    b1p = b1.index_select(0, block_perm).float() if b1 is not None else None
    pre = torch.nn.functional.linear(xf @ f.v, f.a, b1p)                      # [T, H] block order
    hidden = activation_forward(pre, activation)
    if w_up is not None:
        bup = b_up.index_select(0, block_perm).float() if b_up is not None else None
        hidden = hidden * torch.nn.functional.linear(xf @ f.v_up, f.a_up, bup)
    return _block_norms(hidden, num_blocks)


def route(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks, top_k, router, rank, refresh,
          site_id) -> torch.Tensor:
    """block_ids [T, top_k] int32: each token's top_k blocks by router score (all blocks when top_k == E)."""
    T = x2d.shape[0]
    if top_k == num_blocks:
        # exact mode: every block is kept, no scoring needed (and the router cache is left alone)
        return torch.arange(num_blocks, device=x2d.device, dtype=torch.int32).expand(T, num_blocks).contiguous()
    if router == "oracle":
        scores = oracle_scores(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks)
    elif router == "lowrank":
        scores = lowrank_scores(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks, rank, refresh,
                                site_id)
    else:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    return scores.topk(top_k, dim=-1).indices.to(torch.int32)
