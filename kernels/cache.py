"""The autotune cache on disk: one JSON document, safe against corruption and concurrent writers.

Layout (`autotune.json` under `cache_dir()`):

    {"format": "spt-autotune", "version": 1, "entries": [ENTRY, ...]}
    ENTRY = {"kernel": str, "kernel_hash": str, "kind": "triton" | "cpu",
             "device": str, "capability": str, "torch": str, "triton": str,
             "key": [str | int | float | bool, ...], "config": {"meta": {str: int}, "num_warps": int,
             "num_stages": int}, "time_ms": float | null, "default_ms": float | null (the untuned default's
             time, optional), "candidates": int, "tuned_at": str}

An entry's identity (`entry_id`) is everything but its result (config, time, candidates, tuned_at): the same
kernel source on the same device and software for the same key. This module only stores and merges entries;
which ones apply to this machine is decided by kernels/autotune.py.

Failure policy (the cache is an optimisation, never a reason to crash):
- a missing file is an empty cache; a corrupt, truncated, unreadable or wrongly typed file gives one warning
  and is treated as empty (tuning starts over and the next save replaces it);
- entries with wrong types are dropped with one warning naming how many;
- an unwritable directory gives one warning, after which this store keeps its entries in memory only.
Saves take an exclusive lock (a `.lock` file beside the document), re-read the document, merge, write a temp
file in the same directory and `os.replace` it: readers never see a half-written file and two processes
tuning at once both keep their entries.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path

FORMAT = "spt-autotune"
VERSION = 1
FILE_NAME = "autotune.json"

# the identity fields of an entry, and the type of every field
ID_FIELDS = ("kernel", "kernel_hash", "kind", "device", "capability", "torch", "triton", "key")
_STR_FIELDS = ("kernel", "kernel_hash", "kind", "device", "capability", "torch", "triton")


class AutotuneCacheWarning(UserWarning):
    """The autotune cache could not be read or written; tuning goes on without it."""


_warned: set[tuple[str, str]] = set()


def warn_once(kind: str, where: str, message: str) -> None:
    """One warning per (kind, place) per process: a broken cache must not flood a training log."""
    if (kind, where) in _warned:
        return
    _warned.add((kind, where))
    warnings.warn(message, AutotuneCacheWarning, stacklevel=3)


def cache_dir() -> Path:
    """`SPT_CACHE_DIR`, else the user's cache dir (XDG_CACHE_HOME, ~/.cache, %LOCALAPPDATA%) / spt-compile."""
    env = os.environ.get("SPT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spt-compile"


def default_path() -> Path:
    return cache_dir() / FILE_NAME


def entry_id(entry: dict) -> str:
    """Stable identity of an entry (a hash of its identity fields)."""
    ident = json.dumps([entry[f] for f in ID_FIELDS], sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(ident.encode()).hexdigest()[:20]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_entry(e) -> str | None:
    """None if `e` is a well-formed entry, else what is wrong with it."""
    if not isinstance(e, dict):
        return f"entry is a {type(e).__name__}, not an object"
    for f in _STR_FIELDS:
        if not isinstance(e.get(f), str):
            return f"field {f!r} must be a string"
    key = e.get("key")
    if not isinstance(key, list) or not all(isinstance(x, (str, int, float, bool)) for x in key):
        return "field 'key' must be a list of strings / numbers"
    cfg = e.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("meta"), dict):
        return "field 'config' must be an object with a 'meta' object"
    if not all(isinstance(k, str) and _is_int(v) for k, v in cfg["meta"].items()):
        return "config.meta must map names to ints"
    if not (_is_int(cfg.get("num_warps")) and _is_int(cfg.get("num_stages"))):
        return "config.num_warps / num_stages must be ints"
    for f in ("time_ms", "default_ms"):
        t = e.get(f)
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t < float("inf")):
            return f"field {f!r} must be a non-negative number or null"
    if not _is_int(e.get("candidates", 0)) or not isinstance(e.get("tuned_at", ""), str):
        return "fields 'candidates' / 'tuned_at' have wrong types"
    return None


def parse_document(text: str, where: str) -> tuple[list[dict], list[str]]:
    """(valid entries, problems) of a document's text. Raises ValueError if the text is not a cache document."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{where} is not valid JSON (corrupt or truncated): {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{where} is not an spt autotune cache (expected an object with format={FORMAT!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"{where} has cache format version {doc.get('version')!r}; this spt reads {VERSION}")
    raw = doc.get("entries")
    if not isinstance(raw, list):
        raise ValueError(f"{where}: 'entries' must be a list")
    good, problems = [], []
    for i, e in enumerate(raw):
        why = validate_entry(e)
        if why is None:
            good.append(e)
        else:
            problems.append(f"entry {i}: {why}")
    return good, problems


def render_document(entries) -> str:
    ordered = sorted(entries, key=lambda e: (e["kernel"], e["device"], json.dumps(e["key"])))
    return json.dumps({"format": FORMAT, "version": VERSION, "entries": ordered}, indent=1, sort_keys=True) + "\n"


def read_entries(path: Path) -> tuple[list[dict], list[str]]:
    """Entries of the document at `path` for import: raises ValueError / OSError with a clear message."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file: {e}") from None
    return parse_document(text, str(path))


def better(a: dict, b: dict) -> dict:
    """Of two results for the same identity, the faster measured one (an untimed one loses)."""
    ta, tb = a.get("time_ms"), b.get("time_ms")
    if ta is None:
        return b
    if tb is None:
        return a
    return a if ta <= tb else b


@contextlib.contextmanager
def _file_lock(lock_path: Path):
    """An exclusive inter-process lock held for the body (fcntl on POSIX, msvcrt on Windows)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if sys.platform == "win32":
            import msvcrt
            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock on both platforms


class CacheStore:
    """The entries of one cache file, in memory, with merge-on-save persistence."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.memory_only = False
        self._stamp = None          # (mtime_ns, size) of the file when last read
        self._loaded = False
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ reading

    def _read_file(self) -> list[dict]:
        """Entries on disk; [] (with one warning) when the file is unreadable or broken."""
        where = str(self.path)
        try:
            st = self.path.stat()
            text = self.path.read_bytes().decode("utf-8")
        except (FileNotFoundError, NotADirectoryError):  # no file (yet): an empty cache, nothing to say
            self._stamp = None
            return []
        except (OSError, UnicodeDecodeError) as e:
            warn_once("unreadable", where, f"spt autotune cache {where} cannot be read ({e}); "
                      "configs are tuned again")
            return []
        self._stamp = (st.st_mtime_ns, st.st_size)
        try:
            good, problems = parse_document(text, where)
        except ValueError as e:
            warn_once("corrupt", where, f"spt autotune cache ignored: {e}; configs are tuned again and the "
                      "file is replaced at the next save")
            return []
        if problems:
            warn_once("entries", where, f"spt autotune cache {where}: {len(problems)} malformed entries "
                      f"ignored (first: {problems[0]})")
        return good

    def load(self) -> None:
        """Read the file once (later calls are free)."""
        with self._lock:
            if not self._loaded:
                self._loaded = True
                self._merge_in(self._read_file())

    def refresh(self) -> None:
        """Pick up entries other processes saved since our last read (a stat when nothing changed)."""
        with self._lock:
            self.load()
            try:
                st = self.path.stat()
            except OSError:
                return
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                self._merge_in(self._read_file())

    def _merge_in(self, entries) -> None:
        for e in entries:
            i = entry_id(e)
            self.entries[i] = better(self.entries[i], e) if i in self.entries else e

    # ------------------------------------------------------------------ writing

    def put(self, entry: dict, replace: bool = False) -> None:
        """Add an entry (replace=False keeps the faster of two for one identity) and persist it."""
        with self._lock:
            self.load()
            i = entry_id(entry)
            old = self.entries.get(i)
            self.entries[i] = entry if (replace or old is None) else better(old, entry)
            self.save(replace_ids={i} if replace else ())

    def remove_all(self) -> int:
        """Delete every entry (memory and file); returns how many were dropped."""
        with self._lock:
            self.load()
            n = len(self.entries)
            self.entries.clear()
            self.save(wipe=True)
            return n

    def save(self, replace_ids=(), wipe: bool = False) -> bool:
        """Merge our entries into the file under the lock and replace it atomically. False if memory-only."""
        if self.memory_only:
            return False
        where = str(self.path.parent)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                if not wipe:
                    for e in self._read_file():  # what other processes wrote meanwhile
                        i = entry_id(e)
                        if i not in self.entries:
                            self.entries[i] = e
                        elif i not in replace_ids:
                            self.entries[i] = better(self.entries[i], e)
                self._write(render_document(self.entries.values()))
        except OSError as e:
            self.memory_only = True
            warn_once("unwritable", where, f"spt autotune cache dir {where} is not writable ({e}); tuned "
                      "configs are kept in memory for this process only (set SPT_CACHE_DIR to change it)")
            return False
        return True

    def _write(self, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        st = self.path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size)
