"""torch.distributed DDP on CPU (gloo, 2 processes) with backend="spt".

- Exact mode (densities 1.0): two ranks, each on half of the global batch, give the same per-step loss and the
  same final weights as one process on the whole batch (up to summation order: the gloo all-reduce averages the
  ranks' gradients, one process averages inside one batch; fp32, rtol 1e-5).
- Default densities: loss and weights match one process (rtol 1e-5, DEFAULT_RTOL), and ranks route alike: after
  training (weights identical on both ranks by DDP) both ranks run the same probe batch and give bit-identical
  outputs. The low-rank router fits its factors to the second moment of the inputs of the call that refreshes it;
  lowering/router_sync.py all-reduces that statistic (token-weighted) at each refresh, so every rank fits the
  one process's statistic on the global batch (unsynced, the probe outputs differed by 0.68 and the loss by 7e-4).
- The statistic alone (op level): the token-weighted mean over ranks with 10 and 30 tokens, collectives only at
  refresh calls, `local_routing()` calls on one rank leave the schedule alone, ranks out of step all raise.
- DDP's graph splits (DDPOptimizer, one graph per gradient bucket) must not drop rewrites silently: a site cut
  by a bucket boundary stays dense and the report says why; `torch._dynamo.config.optimize_ddp = False` (one
  graph) keeps every site whole.
Processes are spawned (not forked: forking after OpenMP has started can hang); small shapes, aot_eager inner
backend, so each test takes seconds of compute plus two interpreter start-ups.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.toy_transformer import ToyConfig, ToyTransformer

WORLD, LOCAL, N, STEPS = 2, 2, 32, 3
CFG = ToyConfig(hidden=32, heads=4, kv_heads=2, ffn_hidden=64, layers=2, mask="causal")
BASE = {"min_seq_len": 0, "inner_backend": "aot_eager"}
EXACT = {**BASE, "attention_density": 1.0, "ffn_density": 1.0}
# default densities (attention 0.25, FFN 0.5); 8 blocks of 8 neurons; router rank 4 < d = 32 (at rank >= d the
# low-rank router is exact whatever the data, and would hide a per-rank difference)
# low-rank router; refresh every 2 calls, so the ranks also re-fit (and all-reduce) in the middle of training
DEFAULT = {**BASE, "ffn_blocks": 8, "ffn_router_rank": 4, "ffn_router_refresh": 2}
# default mode vs one process: the ranks' averaged router statistic is the one process's up to float64 rounding,
# so every token takes the same blocks and the loss and weights agree as in exact mode (measured: equal to the
# printed digits); a tolerance, not equality, because a top-k tie within rounding could pick another block
DEFAULT_RTOL, DEFAULT_ATOL = 1e-5, 1e-6
MODES = {"exact": EXACT, "default": DEFAULT}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def init_gloo(rank: int, init_file: str) -> None:
    # a collective that never pairs up (ranks out of step) fails after a minute instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _model() -> ToyTransformer:
    torch.manual_seed(0)
    return ToyTransformer(CFG).train()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * LOCAL, N, CFG.hidden, generator=g)                       # [B, N, d] global batch
    y = torch.randn(WORLD * LOCAL, N, CFG.hidden, generator=g)
    return x, y, torch.full((WORLD * LOCAL,), N)


def _train(fn, params, x, y, lengths, reduce=lambda t: t):
    """STEPS of SGD on the mean squared error; returns the per-step loss (reduced over ranks by `reduce`)."""
    opt = torch.optim.SGD(params, lr=0.05)
    losses = []
    for _ in range(STEPS):
        loss = (fn(x, lengths) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(reduce(loss.detach().clone()).item())
    return losses


def _rewritten(reports) -> tuple[int, int]:
    return (sum(len(r.rewritten("attention")) for r in reports), sum(len(r.rewritten("ffn")) for r in reports))


def _train_replicated(rank: int, options: dict) -> dict:
    import spt_compile
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch._dynamo.reset()
    model = _model()
    n0 = len(spt_compile.last_reports())
    fn = torch.compile(DDP(model), backend="spt", options=options)
    x, y, lengths = _data()
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)

    def mean_over_ranks(t):
        dist.all_reduce(t)
        return t / WORLD

    losses = _train(fn, model.parameters(), x[mine], y[mine], lengths[mine], mean_over_ranks)
    rewritten = _rewritten(spt_compile.last_reports()[n0:])  # the training graph(s) only
    # the same batch on both ranks, through the training graph (no_grad would compile a new graph whose
    # router would be fit afresh, on this probe batch, alike on both ranks); no backward follows
    probe = fn(x[:LOCAL], lengths[:LOCAL]).detach()
    return dict(losses=losses, probe=probe, rewritten=rewritten,
                params={k: v.detach() for k, v in model.state_dict().items()})


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, init_file)
    try:  # both modes in one pair of processes: the interpreter start-ups cost more than the training
        found = {mode: _train_replicated(rank, options) for mode, options in MODES.items()}
        torch.save(found, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """{mode: [rank 0's result, rank 1's]} of one DDP run of both modes."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, start_method="spawn", join=True)
    found = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    return {mode: [f[mode] for f in found] for mode in MODES}


def _one_process(options):
    model = _model()
    fn = torch.compile(model, backend="spt", options=options)
    x, y, lengths = _data()
    return _train(fn, model.parameters(), x, y, lengths), model.state_dict()


@pytest.mark.slow
def test_exact_mode_two_ranks_equal_one_process_on_the_global_batch(ddp_runs):
    ranks = ddp_runs["exact"]
    losses, params = _one_process(EXACT)
    print(f"exact mode: 2 ranks {ranks[0]['losses']} vs 1 process {losses}; weights differ by at most "
          f"{max((ranks[0]['params'][k] - v).abs().max().item() for k, v in params.items()):.3g}")
    assert ranks[0]["rewritten"] == (CFG.layers, CFG.layers), ranks[0]["rewritten"]  # no rewrite lost to DDP
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-7)
        for k, v in params.items():
            torch.testing.assert_close(r["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_default_mode_two_ranks_close_to_one_process_and_route_alike(ddp_runs):
    ranks = ddp_runs["default"]
    losses, params = _one_process(DEFAULT)
    print(f"default mode: 2 ranks {ranks[0]['losses']} vs 1 process {losses}")
    assert ranks[0]["rewritten"] == (CFG.layers, CFG.layers), ranks[0]["rewritten"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), rtol=DEFAULT_RTOL, atol=0.0)
    for k, v in params.items():
        torch.testing.assert_close(ranks[0]["params"][k], v, rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, msg=k)
    for k, v in ranks[0]["params"].items():  # DDP keeps the replicas identical whatever each rank routed
        torch.testing.assert_close(ranks[1]["params"][k], v, rtol=0, atol=0, msg=k)
    diff = (ranks[0]["probe"] - ranks[1]["probe"]).abs().max().item()
    print(f"probe outputs of the two ranks differ by {diff:.3g} (max abs)")
    # same weights, same probe batch, and (lowering/router_sync.py) the same averaged router statistic: the
    # ranks' routers are the same function, so their outputs agree bit for bit (unsynced: 0.68 apart)
    assert diff == 0.0, f"ranks route differently: probe outputs differ by {diff:.3g}"


def _sync_worker(rank: int, init_file: str, out_dir: str) -> None:
    """The op alone (no compile): ranks with 10 and 30 tokens, refresh every 2 calls, collectives counted."""
    import spt_compile.lowering  # noqa: F401  registers torch.ops.spt.routed_ffn
    from spt_compile.lowering import router as R, router_sync as S
    torch.set_num_threads(1)
    init_gloo(rank, init_file)
    collectives = []
    reduce = dist.all_reduce

    def counted(t, *a, **k):
        collectives.append(t.numel())
        return reduce(t, *a, **k)
    dist.all_reduce = counted
    try:
        g = torch.Generator().manual_seed(0)
        d, H, E = 8, 32, 8
        w1, w2 = torch.randn(H, d, generator=g), torch.randn(d, H, generator=g)
        xs = [torch.randn(10, d, generator=g) * torch.linspace(0.1, 3, d), torch.randn(30, d, generator=g)]
        x = xs[rank]                                                           # [T_rank, d]

        perms = {n: torch.arange(n) for n in (H, H + 8)}  # one tensor each: the factor cache keys on its storage

        def call(x, w1=w1, w2=w2, site=7):
            return torch.ops.spt.routed_ffn(x, w1, None, None, None, w2, None, perms[w1.shape[0]], "relu",
                                            E, 2, "lowrank", 2, 2, site)[0]
        out = dict(c=S.second_moment(x), c_local=S.second_moment(x, sync=False))
        S.set_process_group(None)
        out["c_off"] = S.second_moment(x)
        S.set_process_group(S.WORLD)
        out["collectives_per_call"] = []
        for i in range(4):
            if rank == 0 and i == 1:
                with S.local_routing():  # rank 0 alone: no count, no refresh, no collective
                    for _ in range(3):
                        call(x)
            n0 = len(collectives)
            call(x)
            out["collectives_per_call"].append(collectives[n0:])
        (entry,) = R.router_cache_entries(7)
        out.update(v=entry.v, refreshes=entry.refreshes)
        try:  # a site whose width differs between the ranks: every rank must raise, none may hang
            w = torch.randn(H + 8 * rank, d, generator=g)
            call(x, w1=w, w2=torch.randn(d, w.shape[0], generator=g), site=8)
            out["error"] = None
        except RuntimeError as e:
            out["error"] = str(e)
        torch.save(out, os.path.join(out_dir, f"sync{rank}.pt"))
    finally:
        dist.all_reduce = reduce
        dist.destroy_process_group()


@pytest.mark.slow  # two interpreter start-ups on a busy 2-core machine: ~25 s, the compute is milliseconds
def test_router_statistic_is_the_token_weighted_mean_over_ranks_at_refresh_only(tmp_path):
    mp.start_processes(_sync_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn", join=True)
    r0, r1 = (torch.load(tmp_path / f"sync{r}.pt") for r in range(WORLD))
    from spt_compile.lowering import router_sync as S
    g = torch.Generator().manual_seed(0)
    d, H = 8, 32
    torch.randn(H, d, generator=g), torch.randn(d, H, generator=g)
    xs = [torch.randn(10, d, generator=g) * torch.linspace(0.1, 3, d), torch.randn(30, d, generator=g)]
    one_process = S.second_moment(torch.cat(xs), sync=False)                  # 40 tokens, weighted 10:30
    assert not torch.allclose(r0["c_local"], r1["c_local"], rtol=0.1)           # else the check proves nothing
    for r in (r0, r1):
        torch.testing.assert_close(r["c"], one_process, rtol=1e-12, atol=1e-12)
    assert torch.equal(r0["c"], r1["c"]) and torch.equal(r0["v"], r1["v"])     # the same bits on every rank
    assert torch.equal(r0["c_off"], r0["c_local"]) and torch.equal(r1["c_off"], r1["c_local"])  # sync off
    # 4 calls at refresh 2: the 1st and 3rd refresh (tag check of 2*4 values, then d*d+1), the others are free;
    # rank 0's 3 extra calls inside local_routing() moved nothing
    expected = [[8, d * d + 1], [], [8, d * d + 1], []]
    assert r0["collectives_per_call"] == expected and r1["collectives_per_call"] == expected
    assert r0["refreshes"] == r1["refreshes"] == 2
    print(r0["error"])
    for r in (r0, r1):
        assert r["error"] is not None and "out of step" in r["error"], r["error"]


def test_router_process_group_setting_checks_its_argument_and_is_off_without_distributed():
    from spt_compile.lowering import router_sync as S
    with pytest.raises(TypeError, match="ProcessGroup, WORLD or None"):
        S.set_process_group(3)
    assert not dist.is_initialized()  # one process, nothing initialised: the statistic is this process's own
    assert S.active_group() is None
    x = torch.randn(5, 4)
    assert torch.equal(S.second_moment(x), S.second_moment(x, sync=False))


WIDE = ToyConfig(hidden=256, heads=4, kv_heads=2, ffn_hidden=1024, layers=2, mask="causal")  # ~3 MB a layer


def _split_worker(rank: int, init_file: str, out_dir: str) -> None:
    import spt_compile
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    init_gloo(rank, init_file)
    try:
        x, lengths = torch.randn(LOCAL, N, WIDE.hidden), torch.full((LOCAL,), N)
        found = {}
        for optimize_ddp in (True, False):
            torch._dynamo.reset()
            torch._dynamo.config.optimize_ddp = optimize_ddp
            torch.manual_seed(0)
            model = ToyTransformer(WIDE).train()
            n0 = len(spt_compile.last_reports())
            fn = torch.compile(DDP(model, bucket_cap_mb=1), backend="spt", options=DEFAULT)
            fn(x, lengths).square().mean().backward()
            reports = spt_compile.last_reports()[n0:]
            found[optimize_ddp] = dict(graphs=len(reports), rewritten=_rewritten(reports),
                                       dense=[(d.kind, d.reason) for r in reports for d in r.dense()])
        torch.save(found, os.path.join(out_dir, f"split{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_graph_splits_are_reported_and_one_graph_keeps_every_site(tmp_path):
    mp.start_processes(_split_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn", join=True)
    found = torch.load(tmp_path / "split0.pt")
    split, whole = found[True], found[False]
    print(f"DDP buckets of 1 MB: {split}; optimize_ddp=False: {whole}")
    assert split["graphs"] > 1
    att, ffn = split["rewritten"]
    lost = 2 * WIDE.layers - att - ffn
    assert len(split["dense"]) == lost and all("split" in why or "break" in why for _, why in split["dense"]), split
    assert whole == dict(graphs=1, rewritten=(WIDE.layers, WIDE.layers), dense=[]), whole
