"""The autotuner: argmin of the timed candidates, cache hits without timing, export -> wipe -> import round
trip through real launchers (the CPU attention path, a Triton launcher under the interpreter, torch.compile),
foreign entries never applied, progress line only on a TTY. Timing is faked: no timing asserts."""
import io
import json

import pytest
import torch

from spt_compile.kernels import autotune, cache
from spt_compile.kernels.autotune import KernelConfig
from spt_compile.lowering.reference import pq_attention as ref

C = KernelConfig.make
TOY = [C(num_warps=1, num_stages=1, tile=t) for t in (8, 16, 32, 64)]


class FakeTimer:
    """Returns a recorded time per config (ms) and runs each candidate once; counts its calls."""

    def __init__(self, times, run=True):
        self.times, self.run, self.calls = times, run, []

    def __call__(self, fn, cfg):
        self.calls.append(cfg)
        if self.run:
            fn()
        return self.times(cfg) if callable(self.times) else self.times[cfg["tile"]]


def _no_timing(fn, cfg):
    raise AssertionError(f"nothing may be timed here (asked to time {cfg})")


def _toy(kind="cpu", fits=None):
    autotune.register_candidates("toy", TOY, fits=fits, kind=kind)


def test_fake_timer_picks_argmin_and_caches_it(autotune_on):
    _toy()
    seen = []
    timer = FakeTimer({8: 3.0, 16: 1.5, 32: 0.7, 64: 2.0})
    autotune.set_timer(timer)
    cfg = autotune.get_config("toy", ("fp32", 1024), bench=seen.append)
    assert cfg["tile"] == 32 and seen == TOY and len(timer.calls) == 4
    assert autotune.stats()["benchmarks"] == 4 and autotune.stats()["tunes"] == 1
    e = autotune.lookup("toy", ("fp32", 1024))
    assert e["config"]["meta"] == {"tile": 32} and e["time_ms"] == 0.7 and e["candidates"] == 4
    assert e["device"] == autotune.cpu_model() and e["capability"] == f"threads={torch.get_num_threads()}"
    # the same key again: memo; a fresh process state: the file; neither times anything
    autotune.set_timer(_no_timing)
    assert autotune.get_config("toy", ("fp32", 1024), bench=seen.append)["tile"] == 32
    autotune.reset()
    assert autotune.get_config("toy", ("fp32", 1024), bench=seen.append)["tile"] == 32
    assert autotune.stats()["benchmarks"] == 0 and autotune.used()[0]["source"] == "cache"


def test_pruned_configs_are_never_timed_and_key_buckets_apart(autotune_on):
    _toy(fits=lambda cfg, key: cfg["tile"] <= key[1])
    timer = FakeTimer({8: 2.0, 16: 1.0, 32: 0.5, 64: 0.1})
    autotune.set_timer(timer)
    assert autotune.get_config("toy", ("fp32", 16), bench=lambda c: None)["tile"] == 16
    assert [c["tile"] for c in timer.calls] == [8, 16]
    assert autotune.get_config("toy", ("fp32", 64), bench=lambda c: None)["tile"] == 64
    assert len(cache.read_entries(autotune_on / cache.FILE_NAME)[0]) == 2
    with pytest.raises(ValueError, match="no candidate config fits"):
        autotune.get_config("toy", ("fp32", 4))


def test_failing_candidate_is_skipped_nan_never_wins(autotune_on):
    _toy()

    def bench(cfg):
        if cfg["tile"] == 8:
            raise RuntimeError("out of resources")

    autotune.set_timer(FakeTimer({8: 0.1, 16: float("nan"), 32: 0.9, 64: 0.4}))
    assert autotune.get_config("toy", ("fp32", 1), bench=bench)["tile"] == 64


def test_tuning_off_or_no_bench_gives_first_fit_untuned(autotune_on, monkeypatch):
    _toy()
    autotune.set_timer(_no_timing)
    assert autotune.get_config("toy", ("a",))["tile"] == 8  # no bench closure
    monkeypatch.setenv("SPT_AUTOTUNE", "0")
    assert autotune.get_config("toy", ("b",), bench=lambda c: None)["tile"] == 8
    assert autotune.lookup("toy", ("b",)) is None and autotune.describe("toy", ("b",)) == "untuned"
    assert {r["source"] for r in autotune.used()} == {"default"}


def test_triton_configs_are_not_timed_under_the_interpreter(autotune_on, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _toy(kind="triton")
    autotune.set_timer(_no_timing)
    assert autotune.get_config("toy", ("fp16",), bench=lambda c: None)["tile"] == 8
    assert autotune.environment("triton")["device"] == "triton-interpreter"


def test_cpu_entries_are_keyed_by_thread_count(autotune_on):
    _toy()
    autotune.set_timer(FakeTimer({8: 2.0, 16: 1.0, 32: 3.0, 64: 4.0}))
    autotune.get_config("toy", ("k",), bench=lambda c: None)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(n + 1)
        assert autotune.lookup("toy", ("k",)) is None
    finally:
        torch.set_num_threads(n)
    assert autotune.lookup("toy", ("k",)) is not None


def test_foreign_entries_in_the_cache_are_never_applied(autotune_on):
    _toy()
    autotune.set_timer(FakeTimer({8: 2.0, 16: 1.0, 32: 3.0, 64: 4.0}))
    autotune.get_config("toy", ("k",), bench=lambda c: None)
    path = autotune_on / cache.FILE_NAME
    (e,), _ = cache.read_entries(path)
    for field, value in (("device", "NVIDIA H200"), ("kernel_hash", "0" * 16), ("torch", "2.0.0")):
        path.write_text(cache.render_document([{**e, field: value}]))
        autotune.reset()
        autotune.set_timer(_no_timing)
        cfg = autotune.get_config("toy", ("k",))  # no bench: the default unless the entry applied
        assert cfg["tile"] == 8, field
        assert autotune.foreign_reason({**e, field: value}) is not None


def test_progress_is_one_updating_line_on_a_tty_only(autotune_on, monkeypatch):
    _toy()
    autotune.set_timer(FakeTimer({8: 2.0, 16: 1.0, 32: 3.0, 64: 4.0}))
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", tty)
    autotune.get_config("toy", ("tty",), bench=lambda c: None)
    out = tty.getvalue()
    assert "\n" not in out and out.count("\r") >= 4 and "4/4 configs" in out and out.endswith("\r\x1b[2K")
    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    autotune.get_config("toy", ("quiet",), bench=lambda c: None)
    assert quiet.getvalue() == ""


# ------------------------------------------------------------------------- real launchers


def _attention_inputs(n=256, d=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, d, generator=g) for _ in range(3))
    L = ref.num_kept(n, 0.25)
    cb, codes = ref.pq_quantize(k, 4, 8, 2)
    return q, k, v, ref.select_topk(q, cb, codes, None, True, d ** -0.5, L, chunk=n)


def _chunks_used(monkeypatch):
    """Spy on the chunk the CPU attention stages pass to query_chunk (None = the reference default)."""
    seen = []
    real = ref.query_chunk

    def spy(nq, elems, chunk=None):
        seen.append(chunk)
        return real(nq, elems, chunk)

    monkeypatch.setattr(ref, "query_chunk", spy)
    return seen


def test_cpu_attention_tunes_its_chunk_and_matches_untuned(autotune_on, monkeypatch):
    q, k, v, idx = _attention_inputs(n=512)
    expect, expect_lse = ref.sparse_attention_forward(q, k, v, idx, None, True, 0.25, 0.0, None, chunk=512)
    # elements per query row = B*H*Nk = 1024: the default budget 2^22 gives one 512-row chunk, 2^18 256-row
    # chunks, the others 512 rows again (not timed twice); make the small chunks the faster
    timer = FakeTimer(lambda cfg: cfg["budget"] / 1e6)
    autotune.set_timer(timer)
    seen = _chunks_used(monkeypatch)
    out, lse = ref.sparse_attention_forward(q, k, v, idx, None, True, 0.25, 0.0, None)
    assert [c["budget"] for c in timer.calls] == [1 << 22, 1 << 18]
    assert seen[-1] == 256  # the real run used the tuned chunk, not the reference default
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(lse, expect_lse)
    e = autotune.lookup("attention_cpu_forward", ("float32", 16, 512, 1024))
    assert e["kind"] == "cpu" and e["candidates"] == 2 and e["config"]["meta"] == {"budget": 1 << 18}


def test_round_trip_export_wipe_import_uses_imported_config_without_timing(autotune_on, monkeypatch, tmp_path):
    q, k, v, idx = _attention_inputs(n=512)
    key = ("float32", 16, 512, 1024)
    # make the smallest budget the fastest: 2^18 // 1024 = 256 rows, unlike the default (all 512 rows)
    autotune.set_timer(FakeTimer(lambda cfg: cfg["budget"] / 1e6))
    ref.sparse_attention_forward(q, k, v, idx, None, True, 0.25, 0.0, None)
    tuned = autotune.lookup("attention_cpu_forward", key)
    assert tuned["config"]["meta"] == {"budget": 1 << 18}
    shipped = tmp_path / "shipped.json"
    assert autotune.export(shipped) == 1
    assert autotune.clear() == 1 and autotune.lookup("attention_cpu_forward", key) is None
    autotune.reset()
    summary = autotune.import_(shipped)
    assert len(summary.added) == 1 and not summary.foreign and not summary.conflicting
    autotune.set_timer(_no_timing)
    seen = _chunks_used(monkeypatch)
    ref.sparse_attention_forward(q, k, v, idx, None, True, 0.25, 0.0, None)
    assert seen == [256] and autotune.stats()["benchmarks"] == 0
    (rec,) = [r for r in autotune.used() if r["kernel"] == "attention_cpu_forward"]
    assert rec["source"] == "cache" and rec["entry"]["tuned_at"] == tuned["tuned_at"]


def test_torch_compile_run_picks_imported_entries_up(autotune_on, monkeypatch, tmp_path):
    q, k, v, idx = _attention_inputs(n=512)
    autotune.set_timer(FakeTimer(lambda cfg: cfg["budget"] / 1e6))
    ref.sparse_attention_forward(q, k, v, idx, None, True, 0.25, 0.0, None)
    ref.select_topk(q, *ref.pq_quantize(k, 4, 8, 2), None, True, 0.25, idx.shape[-1])
    autotune.export(tmp_path / "t.json")
    autotune.clear()
    autotune.reset()
    autotune.import_(tmp_path / "t.json")
    autotune.set_timer(_no_timing)

    def attn(q, k, v):
        return torch.ops.spt.pq_sparse_attention(q, k, v, None, True, 0.25, 0.25, 4, 8, 2, 0.0, None)[0]

    out = torch.compile(attn, backend="aot_eager", fullgraph=True)(q, k, v)
    assert out.shape == q.shape and autotune.stats()["benchmarks"] == 0
    sources = {r["kernel"]: r["source"] for r in autotune.used()}
    assert sources["attention_cpu_forward"] == "cache" and sources["attention_cpu_select"] == "cache"


def test_triton_launcher_bench_closure_runs_every_candidate(autotune_on, monkeypatch):
    """The pq_assign launcher's closure under the interpreter (timing forced on): every candidate runs on the
    real inputs, the fake timer's argmin is kept, and the final codes equal the reference."""
    from spt_compile.kernels import pq
    monkeypatch.setattr(autotune, "_can_time", lambda entry: True)
    cands = autotune.fitting(pq.KERNEL, (4, 8, "fp32", 256))
    order = {c: i for i, c in enumerate(cands)}
    timer = FakeTimer(lambda cfg: 1.0 + (order[cfg] == len(cands) - 1) * -0.5)
    autotune.set_timer(timer)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 128, 16, generator=g)
    cb, codes_ref = ref.pq_quantize(k, 4, 8, 1)
    codes = pq.pq_assign(k, cb)
    assert len(timer.calls) == len(cands) >= 2
    assert torch.equal(codes, codes_ref)
    (rec,) = [r for r in autotune.used() if r["kernel"] == pq.KERNEL]
    assert rec["source"] == "tuned" and rec["entry"]["config"] == cands[-1].to_json()
    assert json.loads(json.dumps(rec["key"])) == [4, 8, "fp32", 256]


def test_router_chunk_is_a_cpu_tunable(autotune_on, monkeypatch):
    from spt_compile.lowering import router
    g = torch.Generator().manual_seed(2)
    x, w1 = torch.randn(600, 32, generator=g), torch.randn(256, 32, generator=g)
    perm = torch.randperm(256, generator=g)
    monkeypatch.setenv("SPT_AUTOTUNE", "0")
    expect = router.oracle_scores(x, w1, None, None, None, perm, "gelu", 8)
    monkeypatch.setenv("SPT_AUTOTUNE", "1")
    autotune.invalidate()  # the key was resolved untuned above; the environment is read for new keys only
    # 256 fp32 neurons = 1 KiB per token row: the default 2^21 bytes -> all 600 rows, 2^19 -> 512-row chunks
    timer = FakeTimer(lambda cfg: cfg["budget"] / 1e6)
    autotune.set_timer(timer)
    torch.testing.assert_close(router.oracle_scores(x, w1, None, None, None, perm, "gelu", 8), expect)
    assert [c["budget"] for c in timer.calls] == [1 << 21, 1 << 19]
    e = autotune.lookup("ffn_cpu_router", (256, 1024, 1024))
    assert e["config"]["meta"] == {"budget": 1 << 19} and e["device"] == autotune.cpu_model()


def test_tune_stage_times_a_whole_stage_per_forced_candidate(autotune_on):
    """For launchers without a bench closure: the stage runs with each candidate forced for one (kernel, key)."""
    _toy()
    autotune.register_candidates("toy2", TOY[:2], kind="cpu")
    launched = []

    def stage():  # two launches of "toy" with different keys, one of "toy2"
        for key in (("a",), ("b",)):
            launched.append(("toy", key, autotune.get_config("toy", key)["tile"]))
        launched.append(("toy2", ("c",), autotune.get_config("toy2", ("c",))["tile"]))

    fastest = {("a",): 32, ("b",): 16, ("c",): 16}

    def timer(fn, cfg):  # a stage's "time": each launch costs 1 with its key's fastest tile, else 2
        launched.clear()
        fn()
        return sum(1.0 if tile == fastest[key] else 2.0 for _, key, tile in launched)

    autotune.set_timer(timer)
    made = autotune.tune_stage(stage)
    assert sorted((e["kernel"], tuple(e["key"]), e["config"]["meta"]["tile"]) for e in made) == [
        ("toy", ("a",), 32), ("toy", ("b",), 16), ("toy2", ("c",), 16)]
    assert all(e["time_ms"] == e["default_ms"] - 1.0 for e in made)  # one launch got faster each time
    autotune.set_timer(_no_timing)
    assert autotune.tune_stage(stage) == []  # everything applies now: nothing timed again
    assert [autotune.get_config("toy", k)["tile"] for k in (("a",), ("b",))] == [32, 16]
    with autotune.forced({"toy": TOY[3]}):
        assert autotune.get_config("toy", ("a",))["tile"] == 64
    assert autotune.get_config("toy", ("a",))["tile"] == 32


def test_site_keys_match_the_keys_the_cpu_stages_tune(autotune_on):
    from spt_compile.kernels import cpu_tunables
    q, k, v, idx = _attention_inputs(n=512)
    autotune.set_timer(FakeTimer(lambda cfg: cfg["budget"] / 1e6))
    ref.sparse_attention_forward(q, k, v, idx, None, True, 0.25, 0.0, None)
    keys = cpu_tunables.attention_site_keys(1, 2, 512, 512, 16, idx.shape[-1], torch.float32)
    assert autotune.lookup("attention_cpu_forward", keys["attention_cpu_forward"]) is not None
    assert autotune.describe("attention_cpu_forward", keys["attention_cpu_forward"]).startswith("budget=262144")
    assert autotune.describe("attention_cpu_select", keys["attention_cpu_select"]) == "untuned"


def test_site_kernel_keys_from_snapshot_arguments(autotune_on):
    """The keys the inspection report looks up, from op arguments as graph_snapshot records them."""
    t = lambda *shape: {"shape": list(shape), "dtype": "float32", "itemsize": 4, "device": "cpu"}  # noqa: E731
    attn = {"op": "spt.pq_sparse_attention.default", "q": t(1, 2, 512, 16), "k": t(1, 2, 512, 16),
            "v": t(1, 2, 512, 16), "density": 0.25, "min_seq_len": 128}
    keys = dict(autotune.site_kernel_keys("spt.pq_sparse_attention", attn))
    assert keys == {"attention_cpu_select": ("float32", 16, 512, 1024),
                    "attention_cpu_forward": ("float32", 16, 512, 1024),
                    "attention_cpu_backward": ("float32", 16, 512, 1024)}
    q, k, v, idx = _attention_inputs(n=512)
    assert idx.shape[-1] == 128  # the same L as the site's density
    autotune.set_timer(FakeTimer(lambda cfg: cfg["budget"] / 1e6))
    ref.sparse_attention_forward(q, k, v, idx, None, True, 0.25, 0.0, None)
    assert autotune.lookup("attention_cpu_forward", keys["attention_cpu_forward"]) is not None
    exact = dict(autotune.site_kernel_keys("spt.pq_sparse_attention", {**attn, "density": 1.0}))
    assert "attention_cpu_select" not in exact and "attention_cpu_forward" in exact
    ffn = {"op": "spt.routed_ffn.default", "x": t(2, 300, 32), "w1": t(256, 32), "num_blocks": 8, "top_k": 4}
    assert autotune.site_kernel_keys("spt.routed_ffn", ffn) == [("ffn_cpu_router", (256, 1024, 1024))]
    assert autotune.site_kernel_keys("spt.routed_ffn", {**ffn, "top_k": 8}) == []
    symbolic = {**attn, "q": {**attn["q"], "shape": [1, 2, "s0", 16]}}
    assert autotune.site_kernel_keys("spt.pq_sparse_attention", symbolic) == []


def test_shared_memory_pruning_on_a_gpu(autotune_on, monkeypatch):
    autotune.register_candidates("toy", TOY, kind="triton", smem=lambda cfg, key: cfg["tile"] * 1024)
    monkeypatch.setattr(autotune, "_smem_limit", lambda: 20 * 1024)  # what a small GPU would report
    assert [c["tile"] for c in autotune.fitting("toy", ("fp16",))] == [8, 16]
    monkeypatch.setattr(autotune, "_smem_limit", lambda: None)       # CPU / interpreter: no device limit
    assert len(autotune.fitting("toy", ("fp16",))) == 4
