"""The per-query attention launchers' bench closures (kernels/attention_topk.py, attention_fwd.py,
attention_bwd.py) under the interpreter with timing forced on and a fake timer: every fitting candidate is
launched once on the real inputs, the argmin is kept and used by the final launch, the outputs equal the untuned
ones (accumulators reset per run), a second call with the same bucketed key times nothing, and the site_key
hooks name exactly the keys the launchers use. No timing asserts: the timer is fake."""
import pytest
import torch

from spt_compile.kernels import attention_bwd as kbwd
from spt_compile.kernels import attention_fwd as kfwd
from spt_compile.kernels import attention_topk as ktopk
from spt_compile.kernels import autotune
from spt_compile.kernels import pq as kpq
from spt_compile.lowering.formulas import attention_keys_kept
from spt_compile.lowering.reference import pq_attention as ref

B, H, HKV, N, D = 1, 2, 1, 16, 16
SCALE = D ** -0.5
L0 = attention_keys_kept(N, 0.25)
SEED = torch.tensor(7)
FAST = 1  # index (among the fitting candidates) the fake timer makes fastest: not the default (index 0)


PER_QUERY = (kpq.KERNEL, ktopk.KERNEL, kfwd.KERNEL, kbwd.KERNEL_DQ, kbwd.KERNEL_DKV)


class Spy:
    """Wraps a @triton.jit kernel and records the config of every launch (`kernel[grid](...)`)."""

    def __init__(self, kernel, meta):
        self.kernel, self.meta, self.launches = kernel, meta, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kw):
            self.launches.append(autotune.KernelConfig.make(kw["num_warps"], kw["num_stages"],
                                                            **{m: kw[m] for m in self.meta}))
            return launch(*args, **kw)
        return call


class FakeTimer:
    """Runs each candidate once and reports 0.5 ms for the FAST-th fitting candidate, 2 ms for the others."""

    def __init__(self, cands):
        self.cands, self.calls = cands, []

    def __call__(self, fn, cfg):
        self.calls.append(cfg)
        fn()
        return 0.5 if cfg == self.cands[FAST] else 2.0


def _no_timing(fn, cfg):
    raise AssertionError(f"nothing may be timed here (asked to time {cfg})")


def _problem(nq=N, seed=0):
    """(q, k, v, idx, dout, out, lse, codebooks, codes): causal key lists with an empty slot; out / lse / PQ from
    the plain-PyTorch reference (only the launcher under test runs in the interpreter)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g)
    k, v = torch.randn(B, HKV, N, D, generator=g), torch.randn(B, HKV, N, D, generator=g)
    i = torch.arange(nq)[:, None]
    idx = (torch.rand(B, H, nq, L0, generator=g) * (i + 1)).long().clamp_max(i).int()  # [B, H, Nq, L]
    idx[..., -1] = -1
    out, lse = ref.sparse_attention_forward(q, k, v, idx, None, True, SCALE, 0.1, SEED)
    return (q, k, v, idx, torch.randn(B, H, nq, D, generator=g), out, lse) + ref.pq_quantize(k, 4, 8, 1)


def _topk(q, k, v, idx, dout, out, lse, cb, codes):
    return (ktopk.select_topk(q, cb, codes, None, True, SCALE, L0),)


def _fwd(q, k, v, idx, dout, out, lse, cb, codes):
    return kfwd.sparse_attention_forward(q, k, v, idx, None, True, SCALE, 0.1, SEED)


def _bwd(mode):
    def run(q, k, v, idx, dout, out, lse, cb, codes):
        return kbwd.sparse_attention_backward(dout, q, k, v, out, lse, idx, None, True, SCALE, 0.1, SEED,
                                              dkv_mode=mode)
    return run

# (launcher, module, kernel attribute, meta names, kernel name, its key for _problem())
CASES = {
    "topk": (_topk, ktopk, "_topk_kernel", ("BLOCK_M", "BLOCK_N"), ktopk.KERNEL,
             ktopk.tuning_key(D, torch.float32, B * H * N, N)),
    "fwd": (_fwd, kfwd, "_fwd_kernel", ("BLOCK_L",), kfwd.KERNEL,
            kfwd.tuning_key(D, D, torch.float32, B * H * N, L0)),
    "bwd_dq": (_bwd("sorted"), kbwd, "_bwd_dq_kernel", ("BLOCK_L",), kbwd.KERNEL_DQ,
               kbwd.dq_key(D, D, torch.float32, "sorted", B * H * N, L0)),
    "bwd_dq_atomic": (_bwd("atomic"), kbwd, "_bwd_dq_kernel", ("BLOCK_L",), kbwd.KERNEL_DQ,
                      kbwd.dq_key(D, D, torch.float32, "atomic", B * H * N, L0)),
    "bwd_dkv": (_bwd("sorted"), kbwd, "_bwd_dkv_kernel", ("BLOCK_P",), kbwd.KERNEL_DKV,
                kbwd.dkv_key(D, D, torch.float32, B * HKV * N, B * H * N * L0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bench_closure_times_each_fitting_candidate_and_keeps_the_argmin(case, autotune_on, monkeypatch):
    launcher, module, attr, meta, kernel, key = CASES[case]
    inputs = _problem()
    autotune.set_timer(_no_timing)  # tuning is on (fixture), but the interpreter refuses to time Triton configs
    untuned = launcher(*inputs)
    assert {r["source"] for r in autotune.used()} == {"default"} and autotune.stats()["benchmarks"] == 0
    others = {name: autotune.candidates(name)[0] for name in PER_QUERY if name != kernel}  # time one kernel

    cands = autotune.fitting(kernel, key)
    assert len(cands) >= 2
    spy = Spy(getattr(module, attr), meta)
    monkeypatch.setattr(module, attr, spy)
    monkeypatch.setattr(autotune, "_can_time", lambda entry: True)  # what a GPU allows
    autotune.invalidate()
    autotune.set_timer(timer := FakeTimer(cands))
    with autotune.forced(others):
        tuned = launcher(*inputs)
    assert timer.calls == cands and spy.launches == cands + [cands[FAST]]  # each candidate once, then the argmin
    (rec,) = [r for r in autotune.used() if r["kernel"] == kernel and tuple(r["key"]) == key]
    assert rec["source"] == "tuned" and rec["entry"]["config"] == cands[FAST].to_json()
    for got, want in zip(tuned, untuned):  # other block sizes only reorder fp32 sums
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with autotune.forced({kernel: cands[FAST], **others}):  # the tuned run's outputs are exactly one clean launch's
        for got, want in zip(tuned, launcher(*inputs)):
            assert torch.equal(got, want)

    # same key (Nq = 12 buckets with 16): the entry applies, nothing is timed again, even after the memo is gone
    benchmarks = autotune.stats()["benchmarks"]
    autotune.set_timer(_no_timing)
    autotune.invalidate()
    spy.launches.clear()
    with autotune.forced(others):
        launcher(*_problem(nq=N * 3 // 4, seed=1))
    assert autotune.stats()["benchmarks"] == benchmarks and spy.launches == [cands[FAST]]



def _site(density=0.25, **extra):
    t = lambda *shape: {"shape": list(shape), "dtype": "float32", "itemsize": 4, "device": "cuda:0"}  # noqa: E731
    return {"op": "spt.pq_sparse_attention.default", "q": t(B, H, N, D), "k": t(B, HKV, N, D),
            "v": t(B, HKV, N, D), "mask": None, "is_causal": True, "density": density, "pq_subspaces": 4,
            "pq_centroids": 8, "kmeans_iters": 1, "min_seq_len": 0, "query_tile": 0, **extra}


def _site_keys(args):
    pairs = autotune.site_kernel_keys("spt.pq_sparse_attention", args)
    return {name: key for name, key in pairs if name in PER_QUERY}


def test_site_keys_are_the_keys_the_launchers_use(autotune_on):
    q, k, v, idx, dout, out, lse, cb, codes = _problem()
    kpq.pq_quantize(k, 4, 8, 0)
    _topk(q, k, v, idx, dout, out, lse, cb, codes)
    _fwd(q, k, v, idx, dout, out, lse, cb, codes)
    _bwd("sorted")(q, k, v, idx, dout, out, lse, cb, codes)
    launched = {r["kernel"]: tuple(r["key"]) for r in autotune.used()}
    assert _site_keys(_site()) == {name: launched[name] for name in PER_QUERY}
    assert _site_keys(_site())[kfwd.KERNEL] == CASES["fwd"][5]

    exact = _site_keys(_site(density=1.0))  # every key listed: no PQ, no selection; L = Nk
    assert set(exact) == {kfwd.KERNEL, kbwd.KERNEL_DQ, kbwd.KERNEL_DKV}
    assert exact[kfwd.KERNEL] == kfwd.tuning_key(D, D, torch.float32, B * H * N, N)
    assert set(_site_keys(_site(min_seq_len=N + 1))) == set(exact)
    assert _site_keys(_site(query_tile=16)) == {}          # query tiles: other kernels
    symbolic = _site()
    symbolic["q"] = {**symbolic["q"], "shape": [B, H, "s0", D]}
    assert _site_keys(symbolic) == {}


def _tiled_problem():
    """A small query-tile problem (T = 32, Nq = 70: a short last tile), its selection, forward and dout."""
    from spt_compile.kernels import attention_tiled_fwd as tfwd, attention_tiled_select as tsel
    from spt_compile.lowering.formulas import attention_tile_slots
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (70, 50, 50))
    cb, codes = ref.pq_quantize(k, 2, 8, 1)
    L = attention_tile_slots(70, 50, 0.3, 4, True)
    idx = tsel.select_tiles(q, cb, codes, None, True, SCALE, TILE, 0.3, 4, L)
    out, lse = tfwd.tiled_attention_forward(q, k, v, idx, None, True, SCALE, TILE, 0.1, SEED)
    return q, k, v, cb, codes, L, idx, out, lse, torch.randn(1, 2, 70, 16, generator=g)


TILE = 32


@pytest.mark.parametrize("stage", ["stats", "fwd", "dq", "dkv"])
def test_tiled_launchers_time_each_fitting_candidate_and_keep_the_argmin(stage, autotune_on, monkeypatch):
    """The query-tile launchers tune on their own launches too (not only through tune_stage): every fitting
    candidate runs once, the fake timer's argmin is recorded as tuned, and the outputs equal the untuned ones."""
    from spt_compile.kernels import attention_tiled_bwd as tbwd, attention_tiled_fwd as tfwd
    from spt_compile.kernels import attention_tiled_select as tsel
    kernel = {"stats": tsel.KERNEL_STATS, "fwd": tfwd.KERNEL, "dq": tbwd.KERNEL_DQ, "dkv": tbwd.KERNEL_DKV}[stage]
    q, k, v, cb, codes, L, idx, out, lse, dout = _tiled_problem()

    def launch():
        if stage == "stats":
            return (tsel.select_tiles(q, cb, codes, None, True, SCALE, TILE, 0.3, 4, L),)
        if stage == "fwd":
            return tfwd.tiled_attention_forward(q, k, v, idx, None, True, SCALE, TILE, 0.1, SEED)
        return tbwd.tiled_attention_backward(dout, q, k, v, out, lse, idx, None, True, SCALE, TILE, 0.1, SEED)[:3]

    autotune.set_timer(_no_timing)  # the interpreter refuses to time Triton configs
    untuned = launch()
    key = tuple([r for r in autotune.used() if r["kernel"] == kernel][-1]["key"])
    cands = autotune.fitting(kernel, key)
    assert len(cands) >= 2, (kernel, key)
    tiled = (tsel.KERNEL_STATS, tsel.KERNEL_MASS, tsel.KERNEL_TOPL, tfwd.KERNEL, tbwd.KERNEL_DQ, tbwd.KERNEL_DKV)
    others = {name: autotune.candidates(name)[0] for name in tiled if name != kernel}  # time one kernel
    monkeypatch.setattr(autotune, "_can_time", lambda entry: True)  # what a GPU allows
    autotune.invalidate()
    autotune.set_timer(timer := FakeTimer(cands))
    with autotune.forced(others):
        tuned = launch()
    assert timer.calls == cands
    (rec,) = [r for r in autotune.used() if r["kernel"] == kernel and r["source"] == "tuned"]
    assert tuple(rec["key"]) == key and rec["entry"]["config"] == cands[FAST].to_json()
    for got, want in zip(tuned, untuned):  # other block sizes only reorder fp32 sums
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
