"""Small helpers shared by the attention kernel launchers (no kernels here)."""
from __future__ import annotations

import torch

# torch dtype -> the Triton pointer element type name used in AOT signatures.
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOAT_DTYPES = tuple(TRITON_TYPE)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def block_d(d: int) -> int:
    """Head-dim tile: a power of two >= d and >= 16 (tl.dot needs every dim >= 16 on GPU)."""
    return max(16, next_power_of_2(d))


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return TRITON_TYPE[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; expected one of fp32, fp16, bf16") from None


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    """ValueError naming `name` unless `t` is a floating tensor of rank `ndim`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp32/fp16/bf16, got {t.dtype}")


def mask_as_bias(mask: torch.Tensor | None, shape: tuple[int, int, int, int]):
    """The attention mask as an fp32 additive bias broadcast (stride 0) to `shape` = [B, H, Nq, Nk].

    Returns (bias, strides) where strides are 4 ints (0 for broadcast dims), or (None, (0, 0, 0, 0)).
    Bool masks become 0 / -inf. The conversion happens on the mask's own (small, un-broadcast) shape
    before `expand`, so a [1, 1, Nq, Nk] mask is never materialised to [B, H, Nq, Nk]; one kernel
    signature (*fp32) then serves bool and bias masks of any dtype.
    """
    if mask is None:
        return None, (0, 0, 0, 0)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"mask must be a 4-D tensor broadcastable to {list(shape)}, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    for d, (m, s) in enumerate(zip(mask.shape, shape)):
        if m not in (1, s):
            raise ValueError(f"mask dim {d} is {m}; must be 1 or {s} to broadcast to {list(shape)}")
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias.masked_fill_(~mask, float("-inf"))
    elif mask.dtype.is_floating_point:
        # a finite bias stays finite (= allowed) in fp32, e.g. an fp64 finfo.min padding bias, as the reference
        fin = torch.finfo(torch.float32)
        bias = torch.where(torch.isfinite(mask), mask.to(torch.float32).clamp(fin.min, fin.max),
                           mask.to(torch.float32))
    else:
        raise ValueError(f"mask must be bool or floating, got {mask.dtype}")
    bias = bias.expand(shape)  # [B, H, Nq, Nk], stride 0 on broadcast dims
    return bias, tuple(bias.stride())


def check_pq_selection_args(q: torch.Tensor, codebooks, codes, L) -> None:
    """The arguments every PQ key-selection launcher shares: q [B, H, Nq, D], codebooks [B, Hkv, M, C, D//M],
    codes [B, Hkv, Nk, M], L >= 1 (per-query and tiled selection alike)."""
    check_float("q", q, 4)
    if not isinstance(codebooks, torch.Tensor) or codebooks.dim() != 5:
        raise ValueError(f"codebooks must be a 5-D tensor [B, Hkv, M, C, D//M], got "
                         f"{getattr(codebooks, 'shape', type(codebooks).__name__)}")
    if not isinstance(codes, torch.Tensor) or codes.dim() != 4:
        raise ValueError(f"codes must be a 4-D tensor [B, Hkv, Nk, M], got "
                         f"{getattr(codes, 'shape', type(codes).__name__)}")
    b, h, _, d = q.shape
    bc, hkv, m, _, ds = codebooks.shape
    if bc != b or m * ds != d:
        raise ValueError(f"codebooks shape {tuple(codebooks.shape)} does not match q {tuple(q.shape)}")
    if hkv < 1 or h % hkv:
        raise ValueError(f"q heads ({h}) must be a multiple of codebooks' kv heads ({hkv})")
    if codes.shape[0] != b or codes.shape[1] != hkv or codes.shape[3] != m:
        raise ValueError(f"codes shape {tuple(codes.shape)} does not match codebooks {tuple(codebooks.shape)}")
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be a positive int, got {L!r}")
