"""Routers (lowering/router.py) and neuron clustering (lowering/neuron_blocks.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spt_compile.lowering  # noqa: F401
from spt_compile.lowering import router as R
from spt_compile.lowering.neuron_blocks import balanced_assign, compute_block_perm

OP = torch.ops.spt.routed_ffn


def call(x, w1, w2, perm, E, k, rank=4, refresh=3, site=42, router="lowrank"):
    return OP(x, w1, None, None, None, w2, None, perm, "relu", E, k, router, rank, refresh, site)


def test_refresh_every_router_refresh_calls_and_picks_up_new_weights():
    R.clear_router_cache()
    g = torch.Generator().manual_seed(0)
    T, d, H, E = 32, 16, 32, 8
    x = torch.randn(T, d, generator=g)
    w1 = torch.randn(H, d, generator=g)
    w2 = torch.randn(d, H, generator=g)
    perm = torch.arange(H)
    # full rank (rank >= min(H, d)): the lowrank router is then exact, so its choice must track the oracle's
    # on whatever weights it was last refreshed from
    ids0 = call(x, w1, w2, perm, E, 2, rank=d)[1]
    (entry,) = R.router_cache_entries(42)
    assert entry.refreshes == 1 and entry.calls == 1
    oracle_old = call(x, w1, w2, perm, E, 2, router="oracle")[1]
    assert torch.equal(ids0, oracle_old)

    with torch.no_grad():  # in place, like an optimizer step: same storage, new values
        w1.copy_(torch.randn(H, d, generator=g))
    oracle_new = call(x, w1, w2, perm, E, 2, router="oracle")[1]
    assert not torch.equal(oracle_new, oracle_old)  # otherwise the check below proves nothing
    ids = [call(x, w1, w2, perm, E, 2, rank=d)[1] for _ in range(2)]         # calls 2 and 3: stale factors
    assert R.router_cache_entries(42)[0].refreshes == 1
    ids.append(call(x, w1, w2, perm, E, 2, rank=d)[1])                       # call 4: refresh
    assert R.router_cache_entries(42)[0].refreshes == 2
    assert R.router_cache_entries(42)[0].calls == 1
    # before the refresh the (full-rank) factors still describe the old w1, after it the new one
    assert torch.equal(ids[0], oracle_old) and torch.equal(ids[1], oracle_old)
    assert torch.equal(ids[2], oracle_new)


@settings(max_examples=10, deadline=None)
@given(d=st.sampled_from([4, 8, 16]), H=st.sampled_from([8, 16, 32]), gated=st.booleans(),
       act=st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"]), seed=st.integers(0, 100))
def test_lowrank_equals_oracle_at_full_rank(d, H, gated, act, seed):
    g = torch.Generator().manual_seed(seed)
    E = 4
    x = torch.randn(10, d, generator=g, dtype=torch.float64).float()
    w1 = torch.randn(H, d, generator=g)
    b1 = torch.randn(H, generator=g)
    w_up = torch.randn(H, d, generator=g) if gated else None
    b_up = torch.randn(H, generator=g) if gated else None
    perm = torch.randperm(H, generator=g)
    rank = min(H, d)
    lr = R.lowrank_scores(x, w1, b1, w_up, b_up, perm, act, E, rank, 100, site_id=1000 + seed)
    orc = R.oracle_scores(x, w1, b1, w_up, b_up, perm, act, E)
    torch.testing.assert_close(lr, orc, rtol=1e-4, atol=1e-4 * orc.abs().max().item())
    # and a truncated rank is *not* exact (so the comparison above can fail)
    if rank > 1:
        lo = R.lowrank_scores(x, w1, b1, w_up, b_up, perm, act, E, 1, 100, site_id=2000 + seed)
        assert not torch.allclose(lo, orc, rtol=1e-4, atol=1e-4 * orc.abs().max().item())


def test_lowrank_factors_are_truncated_svd():
    w = torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
    a, v = R.lowrank_factors(w, 5)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close((a @ v.t()).double(), best, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("H, E", [(64, 4), (96, 16), (30, 3)])
def test_block_perm_is_balanced_deterministic_permutation(H, E):
    g = torch.Generator().manual_seed(H)
    # planted clusters: E groups of directions, shuffled, so clustering has something to find
    centers = torch.randn(E, 24, generator=g)
    labels = torch.randperm(H, generator=g) % E
    w1 = centers[labels] + 0.05 * torch.randn(H, 24, generator=g)
    state = torch.random.get_rng_state()
    perm = compute_block_perm(w1, E)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert perm.dtype == torch.int64 and perm.shape == (H,)
    assert torch.equal(torch.sort(perm).values, torch.arange(H))
    assert torch.equal(perm, compute_block_perm(w1.clone(), E))               # deterministic
    blocks = labels[perm].view(E, H // E)
    # balanced and it recovers the planted clusters: every block holds one label only
    assert (blocks == blocks[:, :1]).all()
    assert torch.equal(compute_block_perm(w1, E, cluster=False), torch.arange(H))


def test_balanced_assign_respects_capacity():
    dist = torch.rand(60, 6, generator=torch.Generator().manual_seed(0))
    dist[:, 0] = 0.0  # every point prefers cluster 0: capacity must push 50 of them elsewhere
    a = balanced_assign(dist, 10)
    assert torch.bincount(a, minlength=6).tolist() == [10] * 6


@pytest.mark.parametrize("bad, match", [((torch.randn(10, 4), 3), "num_blocks"), ((torch.randn(10), 2), "w1"),
                                        ((torch.randn(10, 4), 0), "num_blocks")])
def test_block_perm_bad_args(bad, match):
    with pytest.raises(ValueError, match=match):
        compute_block_perm(*bad)


def test_fresh_weight_copies_each_call_keep_one_entry_and_the_refresh_schedule():
    """Under autocast the compiled graph casts w1 to bf16 on every call: a fresh tensor (new storage) each time.
    The router must not refit on every call (an eigendecomposition per site), yet a second live layer sharing
    the site_id keeps its own factors."""
    R.clear_router_cache()
    g = torch.Generator().manual_seed(1)
    T, d, H, E = 32, 16, 32, 8
    x = torch.randn(T, d, generator=g).bfloat16()
    w1 = torch.randn(H, d, generator=g)
    w2 = torch.randn(d, H, generator=g).bfloat16()
    perm = torch.arange(H)
    for _ in range(5):
        call(x, w1.bfloat16(), w2, perm, E, 2, rank=4, refresh=200)  # a fresh copy per call, the last one freed
    (entry,) = R.router_cache_entries(42)
    assert entry.refreshes == 1 and entry.calls == 5
    other = torch.randn(H, d, generator=g).bfloat16()  # another layer, alive: its own entry
    keep = w1.bfloat16()
    call(x, keep, w2, perm, E, 2, rank=4, refresh=200)
    call(x, other, w2, perm, E, 2, rank=4, refresh=200)
    assert sorted(e.refreshes for e in R.router_cache_entries(42)) == [1, 1]
    assert len(R.router_cache_entries(42)) == 2


def test_a_fresh_copy_never_adopts_an_entry_of_another_structure():
    """Same site_id, dead weights, but gated vs not or another rank: a new fit, not the other's factors."""
    R.clear_router_cache()
    g = torch.Generator().manual_seed(2)
    T, d, H, E = 16, 16, 32, 8
    x = torch.randn(T, d, generator=g)
    w1, w_up, w2 = torch.randn(H, d, generator=g), torch.randn(H, d, generator=g), torch.randn(d, H, generator=g)
    perm = torch.arange(H)
    call(x, w1.clone(), w2, perm, E, 2, rank=4, refresh=200)
    gated = OP(x, w1.clone(), None, w_up.clone(), None, w2, None, perm, "silu", E, 2, "lowrank", 4, 200, 42)[1]
    assert gated.shape == (T, 2)
    call(x, w1.clone(), w2, perm, E, 2, rank=8, refresh=200)
    assert sorted((e.rank, e.v_up is None) for e in R.router_cache_entries(42)) == [(4, False), (4, True), (8, True)]
