"""Router scores for the routed FFN: which blocks each token keeps.

"oracle":  score_e(x) = ||hidden_e(x)||, the exact block output magnitude before w2
           (ungated: act(W1_e x + b1_e); gated: act(Wg_e x + bg_e) * (Wu_e x + bu_e)). Costs the dense first GEMM.
"lowrank": the same formula with W1 (and W_up) replaced by rank-r factors W ≈ A Vᵀ, A [H, r], V [d, r]:
           cost O(T r (d + H)) instead of O(T d H). The factors are the truncated SVD of W weighted by the
           input second moment C = E[x xᵀ] of the tokens seen at (re)fresh time (`lowrank_factors`): plain
           SVD of W1 at rank 32 keeps 0.847 of the oracle's energy on MiniLM, the data-aware one more.
           Gated FFNs score ||act(Ĝ x + bg) * (Û x + bu)||, i.e. both projections are predicted, because the
           up projection's sign and size change a block's output as much as the gate does.

LoRA (docs/OPS.md): with adapters the first projection is W1 + s1·B1·A1 (and W_up + s_up·B_up·A_up). The
adapter is rank r and the op receives u = A·x, so its term s·B_e·u joins the base's low-rank prediction
exactly, read from the current A and B on every call; the periodic refresh re-fits only the base's factors.
"oracle" adds the same exact term.

The factors are computed from the current weights on a site's first call and recomputed every
`router_refresh` calls (training moves the weights; the op is opaque to inductor, so no recompile is needed).
They live in a small LRU cache keyed by (site_id, device, dtype, weight storage, shape): the call
counter is a Python int, so the hot path never syncs with the device.
Under torch.distributed the refresh's C is averaged over the ranks (lowering/router_sync.py): ranks route alike.
"""
from __future__ import annotations

import collections
import dataclasses
import weakref

import torch

from spt_compile.kernels.cpu_tunables import router_chunk
from spt_compile.lowering import router_sync as _sync
from spt_compile.lowering.reference.routed_ffn import NO_LORA, Lora, activation_forward

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
    weights: tuple = ()        # weakrefs to the w1 (and w_up) the entry was last called with (see _adopt)
    rank: int = 0              # the router rank it was fit for


_CACHE: "collections.OrderedDict[tuple, _Factors]" = collections.OrderedDict()


def clear_router_cache() -> None:
    _CACHE.clear()


def router_cache_entries(site_id: int) -> list[_Factors]:
    """The cached factor sets of one site (tests and reports read `refreshes` / `calls`)."""
    return [f for key, f in _CACHE.items() if key[0] == site_id]


def input_second_moment(x2d: torch.Tensor, max_tokens: int = 4096) -> torch.Tensor:
    """C = E[x xᵀ] [d, d] float64 over (the first max_tokens of) the tokens of this call, this rank only."""
    return _sync.second_moment(x2d, max_tokens, sync=False)


def lowrank_factors(w: torch.Tensor, rank: int, c: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors W [H, d] ≈ A Vᵀ, A [H, r], V [d, r] (r = min(rank, H, d)), deterministic.

    c=None: truncated SVD (best for isotropic x), via the eigendecomposition of the small Gram matrix WᵀW
    [d, d] in float64: its top-r eigenvectors are the top right-singular vectors and A = W V = U_r S_r.
    c = E[x xᵀ] (data-aware, the default of the op): minimises E||(W - A Vᵀ) x||² instead, i.e. the
    truncated SVD of W C^½ mapped back: V = C^-½ Q_r, A = W C^½ Q_r with Q_r the top eigenvectors of
    C^½ WᵀW C^½. Real FFN inputs (post-LayerNorm hidden states) are strongly anisotropic, so spending the
    rank on the directions x actually takes is what makes rank 32 good enough (see bench/router_quality.py).
    With r = min(H, d) either way reproduces W exactly (up to rounding): lowrank scores equal the oracle's.
    """
    r = max(1, min(rank, w.shape[0], w.shape[1]))
    w64 = w.detach().to(torch.float64)
    if c is None:
        _, vecs = torch.linalg.eigh(w64.t() @ w64)                             # ascending eigenvalues
        v = vecs[:, -r:]                                                       # [d, r]
        a = w64 @ v                                                            # [H, r]
    else:
        d = c.shape[0]
        ev, evec = torch.linalg.eigh(c.to(w64.device))
        ev = ev.clamp_min(1e-6 * ev.max().clamp_min(1e-30))                   # regularise a rank-deficient C
        c_half = (evec * ev.sqrt()) @ evec.t()                                 # C^½ [d, d]
        c_mhalf = (evec * ev.rsqrt()) @ evec.t()                               # C^-½
        b = w64 @ c_half                                                       # [H, d]
        _, q = torch.linalg.eigh(b.t() @ b)
        q = q[:, -r:]                                                          # [d, r]
        v = c_mhalf @ q
        a = b @ q
        assert v.shape == (d, r)
    return a.to(torch.float32).contiguous(), v.to(torch.float32).contiguous()


def _storage_key(w):
    # the storage object (StorageImpl address), not its data pointer: FSDP2 frees and re-allocates an unsharded
    # parameter's memory in place (storage resize_) around every forward, so the data pointer changes per call
    # and may repeat on one rank only; keyed on it, the ranks would refresh on different calls (a collective
    # mismatch under router_sync) and refresh on every call
    if w is None:
        return None
    return (w.untyped_storage()._cdata, w.storage_offset(), tuple(w.shape), tuple(w.stride()))


def _key(site_id, w1, w_up, block_perm):
    # the storage pointers separate layers that share a site_id; block_perm's pointer because the factors
    # are stored in block order
    return (site_id, w1.device, w1.dtype, _storage_key(w1), _storage_key(w_up), _storage_key(block_perm))


def _fit(w1, w_up, block_perm, rank, x2d, data_aware, sync, refreshes) -> _Factors:
    # sync: average C over the ranks of the process group (router_sync.py), so that every rank routes alike;
    # the tag lets the ranks check that they are refreshing the same kind of site
    tag = (w1.shape[0], rank, refreshes)
    c = _sync.second_moment(x2d, sync=sync, tag=tag) if data_aware else None
    a, v = lowrank_factors(w1, rank, c)
    a_up = v_up = None
    if w_up is not None:
        a_up, v_up = lowrank_factors(w_up, rank, c)
        a_up = a_up.index_select(0, block_perm)
    return _Factors(v=v, a=a.index_select(0, block_perm), v_up=v_up, a_up=a_up, refreshes=refreshes, rank=rank)


def _weakrefs(w1, w_up) -> tuple:
    return tuple(weakref.ref(w) for w in (w1, w_up) if w is not None)


def _adopt(key: tuple, w1, w_up, rank: int) -> _Factors | None:
    """The entry of the same site, dtype and block order whose weights no longer exist, re-keyed to these.

    Under autocast the graph casts an fp32 parameter to bf16 on every call, so the op sees a fresh tensor each
    time: keyed on its storage alone, the router would refit (an eigendecomposition per site) on every call
    and ignore router_refresh. A dead weakref tells that fresh copy apart from another live layer sharing the
    site_id (whose weights still exist and keep their own entry)."""
    for k, f in _CACHE.items():
        if (k[:3], k[5]) == (key[:3], key[5]) and (k[4] is None) == (key[4] is None) and f.rank == rank \
                and f.weights and all(r() is None for r in f.weights) \
                and f.a.shape[0] == w1.shape[0] and f.v.shape[0] == w1.shape[1]:
            del _CACHE[k]
            _CACHE[key] = f
            return f
    return None


def _get_factors(site_id, w1, w_up, block_perm, rank, refresh, x2d, data_aware) -> _Factors:
    key = _key(site_id, w1, w_up, block_perm)
    f = _CACHE.get(key)
    if f is None:
        f = _adopt(key, w1, w_up, rank)
    if _sync.is_local():
        # a call on some ranks only: it must not move the shared refresh schedule (nor start a collective)
        return f if f is not None else _fit(w1, w_up, block_perm, rank, x2d, data_aware, False, 0)
    if f is not None and f.calls >= refresh:
        f = None  # due: recompute from the current weights
    if f is None:
        old = _CACHE.pop(key, None)
        f = _fit(w1, w_up, block_perm, rank, x2d, data_aware, True, (old.refreshes if old is not None else 0) + 1)
        _CACHE[key] = f
        while len(_CACHE) > _MAX_ENTRIES:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    f.calls += 1
    f.weights = _weakrefs(w1, w_up)
    return f


_CHUNK_BYTES = 1 << 21  # [chunk, H] fp32 score buffers of ~2 MB: cache-resident, reused by the allocator


def _chunked_block_norms(n_tokens: int, num_blocks: int, width: int, device, hidden_of, chunk=None) -> torch.Tensor:
    """[T, E] float32 block norms of hidden_of(lo, hi) -> [hi-lo, H], over token chunks.

    The router's [T, H] intermediates would be as large as the FFN's own hidden activations (fresh, page-
    faulting allocations every call); chunks of ~2 MB keep the elementwise work in cache and the memory
    flat. A loop over token chunks, not tokens."""
    chunk = chunk or router_chunk(n_tokens, width, device, lambda c: _chunked_block_norms(
        n_tokens, num_blocks, width, device, hidden_of, c)) or max(1, _CHUNK_BYTES // (4 * width))
    scores = torch.empty(n_tokens, num_blocks, dtype=torch.float32, device=device)
    for lo in range(0, n_tokens, chunk):
        hi = min(n_tokens, lo + chunk)
        h = hidden_of(lo, hi)                                                  # [c, H] block order
        torch.linalg.vector_norm(h.float().view(hi - lo, num_blocks, -1), dim=-1, out=scores[lo:hi])
    return scores


def _permuted(t, block_perm, dtype=None):
    if t is None:
        return None
    t = t.index_select(0, block_perm)
    return t.to(dtype) if dtype is not None else t


def _with_adapter(pre, u, lb_p, s, lo, hi):
    """pre += s·u[lo:hi]·lb_pᵀ (lb_p: the adapter's B rows in block order); pre as it is without an adapter."""
    if u is not None:
        pre = pre.addmm_(u[lo:hi].to(pre.dtype), lb_p.t(), alpha=s)
    return pre


def oracle_scores(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks, lora: Lora = NO_LORA
                  ) -> torch.Tensor:
    """[T, E] float32: exact ||hidden_e(x)||."""
    w1p, b1p = _permuted(w1, block_perm), _permuted(b1, block_perm)
    wup, bup = _permuted(w_up, block_perm), _permuted(b_up, block_perm)
    lb1, lbup = _permuted(lora.b1, block_perm), _permuted(lora.b_up, block_perm)

    def hidden_of(lo, hi):
        xc = x2d[lo:hi]
        pre = _with_adapter(torch.nn.functional.linear(xc, w1p, b1p), lora.u1, lb1, lora.s1, lo, hi)
        h = activation_forward(pre, activation)                                 # [c, H] block order
        if wup is None:
            return h
        return h * _with_adapter(torch.nn.functional.linear(xc, wup, bup), lora.u_up, lbup, lora.s_up, lo, hi)

    return _chunked_block_norms(x2d.shape[0], num_blocks, w1.shape[0], x2d.device, hidden_of)


def lowrank_scores(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks, rank, refresh,
                   site_id, data_aware: bool = True, lora: Lora = NO_LORA) -> torch.Tensor:
    """[T, E] float32: ||hidden_e(x)|| with low-rank predicted projections (float32 throughout).

    Cost O(T r (d + H)) for the two thin GEMMs (x V once, then (x V) Aᵀ per chunk) plus O(T H) elementwise.
    data_aware: factors weighted by the input second moment of the tokens of the (re)fresh call."""
    f = _get_factors(site_id, w1, w_up, block_perm, rank, refresh, x2d, data_aware)
    xf = x2d.to(torch.float32)
    xv = xf @ f.v                                                              # [T, r]
    xvu = xf @ f.v_up if w_up is not None else None                            # [T, r]
    b1p = _permuted(b1, block_perm, torch.float32)
    bup = _permuted(b_up, block_perm, torch.float32)
    # the adapters' current B rows (block order, fp32): exact rank-r terms next to the base's factors
    lb1 = _permuted(lora.b1, block_perm, torch.float32)
    lbup = _permuted(lora.b_up, block_perm, torch.float32)

    def hidden_of(lo, hi):
        pre = _with_adapter(torch.nn.functional.linear(xv[lo:hi], f.a, b1p), lora.u1, lb1, lora.s1, lo, hi)
        h = activation_forward(pre, activation)                                 # [c, H]
        if xvu is not None:
            up = torch.nn.functional.linear(xvu[lo:hi], f.a_up, bup)
            h = h.mul_(_with_adapter(up, lora.u_up, lbup, lora.s_up, lo, hi))
        return h

    return _chunked_block_norms(x2d.shape[0], num_blocks, w1.shape[0], x2d.device, hidden_of)


def route(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks, top_k, router, rank, refresh,
          site_id, data_aware: bool = True, lora: Lora = NO_LORA) -> torch.Tensor:
    """block_ids [T, top_k] int32: each token's top_k blocks by router score (all blocks when top_k == E)."""
    T = x2d.shape[0]
    if top_k == num_blocks:
        # exact mode: every block is kept, no scoring needed (and the router cache is left alone)
        return torch.arange(num_blocks, device=x2d.device, dtype=torch.int32).expand(T, num_blocks).contiguous()
    if router == "oracle":
        scores = oracle_scores(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks, lora)
    elif router == "lowrank":
        scores = lowrank_scores(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks, rank, refresh,
                                site_id, data_aware, lora)
    else:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    return scores.topk(top_k, dim=-1).indices.to(torch.int32)
