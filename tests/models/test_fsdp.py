"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on CPU (gloo, 2 processes) with backend="spt".

Each block and the root are sharded (parameters become DTensors sharded on dim 0; FSDP2 all-gathers a block's
parameters before its forward and reduce-scatters its gradients after its backward). The compiled graphs see
the all-gathered, plain tensors, so the spt custom ops run on ordinary tensors.
- Exact mode: the ranks' mean loss and the gathered final weights equal one process on the global batch up to
  fp32 summation order (the reduce-scatter averages the ranks' gradients; rtol 1e-5).
- Default densities (low-rank router refreshed every 2 calls): likewise, and the ranks route alike (the router
  statistic is all-reduced, lowering/router_sync.py). FSDP2 re-allocates an unsharded parameter's memory around
  every forward; the router keys its factors on the storage object, not the data pointer, so the ranks' refresh
  schedules (and so their collectives) stay in step: keyed on the pointer this test hung.
A collective that never pairs up fails after the process group's 60 s timeout instead of hanging.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.models.test_ddp import (CFG, LOCAL, MODES, WORLD, _data, _model, _one_process, _rewritten, _train,
                                   init_gloo)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _train_sharded(rank: int, options: dict) -> dict:
    import spt_compile
    from torch.distributed.fsdp import fully_shard
    torch._dynamo.reset()
    model = _model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    n0 = len(spt_compile.last_reports())
    fn = torch.compile(model, backend="spt", options=options)
    x, y, lengths = _data()
    mine = slice(rank * LOCAL, (rank + 1) * LOCAL)

    def mean_over_ranks(t):
        dist.all_reduce(t)
        return t / WORLD

    losses = _train(fn, model.parameters(), x[mine], y[mine], lengths[mine], mean_over_ranks)
    rewritten = _rewritten(spt_compile.last_reports()[n0:])
    probe = fn(x[:LOCAL], lengths[:LOCAL]).detach()                            # the same batch on both ranks
    params = {k: v.full_tensor().detach() for k, v in model.state_dict().items()}  # DTensor shards -> gathered
    return dict(losses=losses, probe=probe, rewritten=rewritten, params=params)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, init_file)
    try:  # both modes in one pair of processes: the interpreter start-ups cost more than the training
        found = {mode: _train_sharded(rank, options) for mode, options in MODES.items()}
        torch.save(found, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn",
                       join=True)
    found = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for mode, options in MODES.items():
        ranks = [f[mode] for f in found]
        losses, params = _one_process(options)
        print(f"{mode} mode, FSDP2: 2 ranks {ranks[0]['losses']} vs 1 process {losses}; weights differ by at most "
              f"{max((ranks[0]['params'][k] - v).abs().max().item() for k, v in params.items()):.3g}")
        assert ranks[0]["rewritten"] == (CFG.layers, CFG.layers), (mode, ranks[0]["rewritten"])
        for r in ranks:
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-7)
            for k, v in params.items():
                torch.testing.assert_close(r["params"][k], v, rtol=1e-5, atol=1e-6, msg=f"{mode}: {k}")
        assert torch.equal(ranks[0]["probe"], ranks[1]["probe"]), mode  # the ranks route alike
