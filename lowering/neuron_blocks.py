"""Which hidden neurons form each routed-FFN block: balanced k-means over the rows of W1 (MoEfication).

Neurons whose input weight vectors point the same way tend to fire on the same tokens, so putting them in
one block concentrates each token's activation energy into few blocks, which is what top-k routing needs.
Clusters must all have exactly Hb = H // E members (equal block widths, tile-aligned kernels), hence the
*balanced* assignment step below. Deterministic: a local torch.Generator (fixed seed) seeds k-means++;
the global RNG is never touched.
"""
from __future__ import annotations

import torch

_SEED = 0x5EED


def _check(w1: torch.Tensor, num_blocks: int) -> None:
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2:
        raise ValueError(f"w1 must be a 2-D tensor [H, d], got {getattr(w1, 'shape', type(w1))}")
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    if w1.shape[0] % num_blocks:
        raise ValueError(f"num_blocks={num_blocks} must divide the hidden width H={w1.shape[0]}")


def _kmeans_pp_init(feats: torch.Tensor, E: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (a loop over the E centroids)."""
    H = feats.shape[0]
    first = int(torch.randint(H, (1,), generator=gen))
    centroids = [feats[first]]
    d2 = ((feats - feats[first]) ** 2).sum(1)                                  # [H]
    for _ in range(1, E):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / H)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        centroids.append(feats[nxt])
        d2 = torch.minimum(d2, ((feats - feats[nxt]) ** 2).sum(1))
    return torch.stack(centroids)                                              # [E, d]


def balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of H points to one of E clusters, each cluster taking exactly `capacity` points.

    dist [H, E] (H == E * capacity). Rounds of proposals: every unassigned point proposes to its nearest
    cluster that still has room; each cluster accepts its nearest proposers up to its room. A round either
    places every proposer or fills at least one cluster, so there are at most E rounds (vectorised inside).
    """
    H, E = dist.shape
    assign = torch.full((H,), -1, dtype=torch.int64)
    room = torch.full((E,), capacity, dtype=torch.int64)
    for _ in range(E + 1):
        free = (assign < 0).nonzero().squeeze(1)                               # [F]
        if free.numel() == 0:
            break
        dfree = dist[free].masked_fill((room == 0).unsqueeze(0), float("inf"))  # [F, E]
        choice = dfree.argmin(1)                                               # [F]
        best = dfree.gather(1, choice.unsqueeze(1)).squeeze(1)                 # [F]
        # rank of each proposer among those proposing to the same cluster, nearest first
        order = torch.argsort(best, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]               # sorted by (choice, dist)
        ch_sorted = choice[order]
        counts = torch.bincount(ch_sorted, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel()) - starts[ch_sorted]
        ok = rank < room[ch_sorted]
        assign[free[order[ok]]] = ch_sorted[ok]
        room -= torch.bincount(ch_sorted[ok], minlength=E)
    assert (assign >= 0).all() and (room == 0).all()
    return assign


def balanced_kmeans(feats: torch.Tensor, num_blocks: int, iters: int = 25) -> torch.Tensor:
    """Cluster the rows of feats [H, d] into num_blocks equal-size clusters -> assignment int64 [H]."""
    H = feats.shape[0]
    E, cap = num_blocks, H // num_blocks
    gen = torch.Generator().manual_seed(_SEED)
    cent = _kmeans_pp_init(feats, E, gen)                                      # [E, d]
    assign = None
    for _ in range(iters):
        # squared distances with one GEMM (cdist is far slower on CPU); the ||f||² term is kept because the
        # balanced assignment compares distances across rows, not just within one
        dist = (feats * feats).sum(1, keepdim=True) - 2 * feats @ cent.t() + (cent * cent).sum(1)  # [H, E]
        new = balanced_assign(dist, cap)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        # balanced: sorting by cluster gives E contiguous groups of exactly cap rows
        cent = feats[torch.sort(assign, stable=True).indices].view(E, cap, -1).mean(1)  # [E, d]
    return assign


def compute_block_perm(w1: torch.Tensor, num_blocks: int, cluster: bool = True) -> torch.Tensor:
    """int64 [H] permutation: block e is neurons perm[e*Hb:(e+1)*Hb] (members ascending within a block).

    cluster=False gives the identity (contiguous blocks). cluster=True runs balanced k-means on the
    unit-normalised rows of w1 (pass W_gate for gated FFNs): cosine geometry, because a neuron's firing
    pattern depends on its weight direction, and norms would otherwise dominate the distances.
    """
    _check(w1, num_blocks)
    H = w1.shape[0]
    if not cluster or num_blocks == 1:
        return torch.arange(H, dtype=torch.int64)
    feats = w1.detach().to(device="cpu", dtype=torch.float64)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)          # [H, d]
    assign = balanced_kmeans(feats, num_blocks)
    # stable sort by cluster id -> members of cluster 0 first, ascending neuron index within each cluster
    return torch.sort(assign, stable=True).indices.to(torch.int64)
