"""Salt inductor's FX-graph and AOT caches with a hash of our own sources.

Inductor caches compiled graphs by their content, and our ops are opaque to it: after a change to an op or a
kernel it could serve a stale compiled graph. A no-op post-grad pass whose uuid() is a hash of every .py file of
spt_compile (lowering and kernels included) makes any change of ours a cache miss.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from torch._inductor.custom_graph_pass import CustomGraphPass


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    import spt_compile
    import spt_compile.kernels
    import spt_compile.lowering

    h = hashlib.sha256()
    for pkg in (spt_compile, spt_compile.lowering, spt_compile.kernels):
        root = Path(pkg.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


class SptCacheSalt(CustomGraphPass):
    def __call__(self, graph) -> None:  # no-op: only the uuid matters
        return None

    def uuid(self) -> str:
        return "spt-" + source_hash()


def salted_config_patches() -> dict:
    return {"post_grad_custom_post_pass": SptCacheSalt()}
