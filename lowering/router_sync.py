"""Ranks route alike: the low-rank router's refresh statistic, averaged over a process group (DDP, FSDP).

Why: the data-aware factors (lowering/router.py) are fit to C = E[x xᵀ] of the tokens of the call that
refreshes them. Under data parallelism each rank sees only its own tokens, so, left alone, each rank fits its
own router and the same token takes different FFN blocks on different ranks (measured: probe outputs 0.68
max-abs apart on a toy model, tests/models/test_ddp.py). At each refresh every rank of the group therefore
all-reduces the sum of x xᵀ over its tokens and its token count, and C = (Σ_ranks Σ x xᵀ) / (Σ_ranks tokens):
the token-weighted mean, i.e. the C one process would compute on the global batch (each rank contributes at
most `max_tokens` tokens). This runs at refresh time only (the first call of a site and every
`router_refresh` calls after), inside the routed_ffn op's body at run time, so a plain collective works under
torch.compile; it never runs on the hot path.

Contract: collectives pair up in the order they are issued, so every rank of the group must refresh on the
same calls, i.e. call each compiled site equally often on the same weights (DDP's training already requires
it). A first, tiny all-reduce checks that the ranks' refreshes agree in (d, H, router rank, the site's refresh
number); when they do not (a rank evicted or re-keyed its factors, ranks at different sites), every rank raises
the same error instead of averaging statistics of different sites. It cannot see a rank that runs ahead at the
same kind of site: calls made on some ranks only (evaluation on rank 0) belong inside `local_routing()`, where
the router neither counts the call nor refreshes; otherwise the ranks drift apart or hang.

The group: `set_process_group(group)`; default WORLD, i.e. torch.distributed's default group when it is
available and initialised; None turns the averaging off (each rank fits its own data, the old behaviour).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

WORLD = "WORLD"  # torch.distributed's default group, resolved at refresh time (it may be initialised later)
_group: object = WORLD
_local_depth = 0


def set_process_group(group=WORLD) -> None:
    """Average the router's statistic over `group` (a ProcessGroup), WORLD (the default group) or None (off)."""
    global _group
    if group is not None and group is not WORLD and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"set_process_group takes a torch.distributed ProcessGroup, WORLD or None, got {group!r}")
    _group = group


@contextlib.contextmanager
def local_routing():
    """Calls on this rank only (e.g. evaluation on rank 0): the router uses its current factors without counting
    the call, so no refresh (and no collective) is due; a site never seen before is fit on this rank's data
    and not cached. The ranks' refresh schedules stay in step."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def is_local() -> bool:
    return _local_depth > 0


def active_group():
    """The group to average over now, or None: off, torch.distributed not initialised, one rank, not a member."""
    if _group is None or not dist.is_available() or not dist.is_initialized():
        return None
    pg = dist.group.WORLD if _group is WORLD else _group
    if dist.get_rank(pg) < 0 or dist.get_world_size(pg) <= 1:
        return None
    return pg


def _check_in_step(pg, tag: tuple[int, ...], device) -> None:
    """All ranks of pg are at the same kind of refresh (tag: width d, hidden H, rank, refresh number of the
    site's factors), or all raise: a tiny all-reduce of the tag and its squares (zero variance <=> all equal),
    before the payload, whose size depends on d."""
    t = torch.tensor(tag, dtype=torch.float64, device=device)
    buf = torch.cat([t, t * t])                                                # [2 * len(tag)]
    dist.all_reduce(buf, group=pg)
    world = dist.get_world_size(pg)
    total, squares = buf[:len(tag)], buf[len(tag):]
    if not torch.equal(total * total, world * squares):
        mean = [round(v / world, 3) for v in total.tolist()]
        raise RuntimeError(
            f"spt router: the ranks are out of step at a low-rank router refresh ((d, H, rank, refresh number): "
            f"this rank {tuple(tag)}, mean over ranks {tuple(mean)}): every rank must call each compiled site "
            "equally often, on the same weights; wrap calls made on some ranks only in "
            "spt_compile.lowering.router_sync.local_routing(), or turn averaging off with set_process_group(None)")


def second_moment(x2d: torch.Tensor, max_tokens: int = 4096, sync: bool = True, tag: tuple[int, ...] = ()
                  ) -> torch.Tensor:
    """C = E[x xᵀ] [d, d] float64 over (the first max_tokens of) this call's tokens; when sync, averaged over the
    active group's ranks weighted by their token counts (one all-reduce of d² + 1 values, after the check of
    `tag` + d)."""
    xs = x2d[:max_tokens].detach().to(torch.float64)                            # [T, d]
    s = xs.t() @ xs                                                            # [d, d] sum over tokens
    n = torch.tensor([xs.shape[0]], dtype=torch.float64, device=s.device)
    pg = active_group() if sync else None
    if pg is not None:
        _check_in_step(pg, (s.shape[0], *tag), s.device)
        buf = torch.cat([s.flatten(), n])                                      # [d*d + 1]
        dist.all_reduce(buf, group=pg)
        s, n = buf[:-1].view_as(s), buf[-1:]
    return s / n.clamp_min(1)
