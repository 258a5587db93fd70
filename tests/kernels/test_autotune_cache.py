"""The cache file: bad files warn once and retune (never crash), an unwritable dir tunes in memory, imports
report foreign / conflicting / malformed entries, and two processes tuning at once keep both entries."""
import json
import multiprocessing as mp
import os
import warnings

import pytest

from spt_compile.kernels import autotune, cache
from spt_compile.kernels.autotune import KernelConfig
from spt_compile.kernels.cache import AutotuneCacheWarning

C = KernelConfig.make
TOY = [C(num_warps=1, num_stages=1, tile=t) for t in (8, 16, 32)]
TIMES = {8: 3.0, 16: 1.0, 32: 2.0}


def _timer(fn, cfg):
    return TIMES[cfg["tile"]]


def _tune(key=("k",)):
    return autotune.get_config("toy", key, bench=lambda c: None)


@pytest.fixture
def toy(autotune_on):
    autotune.register_candidates("toy", TOY, kind="cpu")
    autotune.set_timer(_timer)
    cache._warned.clear()
    yield autotune_on / cache.FILE_NAME
    cache._warned.clear()


def _valid_doc(path):
    entries, problems = cache.read_entries(path)
    assert not problems
    return entries


def _tune_twice_warns_once(path):
    with pytest.warns(AutotuneCacheWarning) as rec:
        assert _tune(("a",))["tile"] == 16
        autotune.reset()
        assert _tune(("b",))["tile"] == 16
    assert len(rec) == 1, [str(w.message) for w in rec]
    return str(rec[0].message)


@pytest.mark.parametrize("data", [
    b"{not json",                                                     # corrupt
    None,                                                             # truncated valid document (below)
    b"[1, 2, 3]",                                                     # wrong top-level type
    json.dumps({"format": "spt-autotune", "version": 1, "entries": {"a": 1}}).encode(),  # entries not a list
    json.dumps({"format": "something-else", "version": 1, "entries": []}).encode(),
    b"\xff\xfe\x00garbage",                                           # not UTF-8
], ids=["corrupt", "truncated", "toplevel-list", "entries-dict", "other-format", "binary"])
def test_bad_file_warns_once_and_retunes(toy, data):
    if data is None:  # a real document cut in half
        _tune(("x",))
        full = toy.read_bytes()
        data = full[: len(full) // 2]
        autotune.reset()
    toy.parent.mkdir(parents=True, exist_ok=True)
    toy.write_bytes(data)
    msg = _tune_twice_warns_once(toy)
    assert str(toy) in msg
    assert {e["key"][0] for e in _valid_doc(toy)} >= {"a", "b"}  # replaced by a valid document


def test_wrongly_typed_entries_are_dropped_with_one_warning(toy):
    _tune(("good",))
    (good,) = _valid_doc(toy)
    bad = [{**good, "key": {"not": "a list"}}, {**good, "config": {"meta": {"tile": "16"}, "num_warps": 1,
                                                                    "num_stages": 1}},
           {**good, "time_ms": "fast"}, "just a string", {**good, "device": None}]
    toy.write_text(json.dumps({"format": "spt-autotune", "version": 1, "entries": [good, *bad]}))
    autotune.reset()
    with pytest.warns(AutotuneCacheWarning, match="5 malformed entries"):
        autotune.set_timer(lambda fn, cfg: pytest.fail("the good entry must apply without timing"))
        assert _tune(("good",))["tile"] == 16


def test_unreadable_file_warns_once(toy):
    toy.mkdir(parents=True)  # a directory where the file should be: reading fails (even as root)
    with pytest.warns(AutotuneCacheWarning) as rec:
        assert _tune(("a",))["tile"] == 16
        assert _tune(("b",))["tile"] == 16
    assert len(rec) == 2 and {"cannot be read" in str(w.message) or "not writable" in str(w.message)
                              for w in rec} == {True}


def test_unwritable_dir_tunes_in_memory_with_one_warning(autotune_on, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("SPT_CACHE_DIR", str(blocker / "sub"))  # mkdir fails: a file is in the way
    autotune.register_candidates("toy", TOY, kind="cpu")
    autotune.set_timer(_timer)
    cache._warned.clear()
    with pytest.warns(AutotuneCacheWarning, match="not writable") as rec:
        assert _tune(("a",))["tile"] == 16
        assert _tune(("b",))["tile"] == 16
    assert len(rec) == 1
    autotune.set_timer(lambda fn, cfg: pytest.fail("in-memory entries must apply"))
    autotune.invalidate()
    assert _tune(("a",))["tile"] == 16 and autotune.lookup("toy", ("a",))["time_ms"] == 1.0


def test_import_reports_added_foreign_conflicting_and_malformed(toy, tmp_path):
    _tune(("mine",))
    (mine,) = _valid_doc(toy)
    ship = [
        {**mine, "key": ["new"]},                                              # added
        {**mine},                                                              # unchanged
        {**mine, "config": C(num_warps=1, num_stages=1, tile=32).to_json()},   # conflicting
        {**mine, "key": ["gpu"], "device": "NVIDIA H200", "capability": "sm_90"},
        {**mine, "key": ["old"], "kernel_hash": "f" * 16},
        {**mine, "key": ["ver"], "torch": "1.0"},
        {**mine, "key": ["gone"], "kernel": "no_such_kernel"},
        {**mine, "key": ["odd"], "config": C(num_warps=1, num_stages=1, tile=7).to_json()},
        {"kernel": 3},                                                         # malformed
    ]
    f = tmp_path / "ship.json"
    f.write_text(json.dumps({"format": "spt-autotune", "version": 1, "entries": ship}))
    s = autotune.import_(f)
    assert (len(s.added), len(s.unchanged), len(s.conflicting), len(s.foreign), len(s.invalid)) == (1, 1, 1, 5, 1)
    assert sorted(why for _, why in s.foreign) == ["config is not a candidate", "kernel source changed",
                                                   "other device", "other torch / triton version",
                                                   "unknown kernel"]
    text = str(s)
    assert "added        1" in text and "foreign      5 skipped" in text and "conflicting  1" in text
    # the conflict kept the local config; foreign entries were not merged
    assert autotune.lookup("toy", ("mine",))["config"]["meta"] == {"tile": 16}
    assert {e["key"][0] for e in _valid_doc(toy)} == {"mine", "new"}
    s2 = autotune.import_(f, overwrite=True)
    assert len(s2.replaced) == 1 and autotune.lookup("toy", ("mine",))["config"]["meta"] == {"tile": 32}


def test_import_of_a_broken_file_raises_a_clear_error(toy, tmp_path):
    f = tmp_path / "broken.json"
    f.write_text('{"format": "spt-autotune", "version": 1, "entries": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        autotune.import_(f)
    with pytest.raises(FileNotFoundError):
        autotune.import_(tmp_path / "missing.json")


def _worker(cache_dir, tag, barrier, n):
    """A separate process: registers the toy kernel and tunes n keys of its own."""
    os.environ["SPT_CACHE_DIR"] = cache_dir
    os.environ["SPT_AUTOTUNE"] = "1"
    from spt_compile.kernels import autotune as at
    at.reset()
    at.register_candidates("toy", TOY, kind="cpu")
    at.set_timer(_timer)
    barrier.wait()
    for i in range(n):
        at.get_config("toy", (tag, i), bench=lambda c: None)


def test_two_processes_tuning_at_once_keep_both_entries(toy):
    # fork: the children share nothing in memory after the fork (each has its own tuner state and file handles),
    # and start in milliseconds instead of re-importing torch (spawn elsewhere)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(2)
    n = 8
    procs = [ctx.Process(target=_worker, args=(str(toy.parent), tag, barrier, n)) for tag in ("p0", "p1")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file must be a valid document
        entries = _valid_doc(toy)
    assert sorted(tuple(e["key"]) for e in entries) == sorted((t, i) for t in ("p0", "p1") for i in range(n))
    assert not [p for p in toy.parent.iterdir() if p.suffix == ".tmp"]  # no temp file left behind
