"""torch.ops.spt.routed_ffn: the routed (block-sparse) FFN custom op. Schema and semantics: docs/OPS.md.

An FFN with hidden width H computes y = W2·act(W1·x + b1) + b2, or gated y = W_down·(act(W_gate·x) ⊙ W_up·x).
The H hidden neurons form E = num_blocks blocks of equal width Hb = H // E; block e is the neurons
block_perm[e*Hb:(e+1)*Hb], a permutation fixed at compile time (by default balanced k-means of the rows of W1 /
W_gate, see lowering/neuron_blocks.py, so co-activating neurons share a block). The permutation only acts
through indices: user parameters, their layout and their gradients are unchanged.

Each token keeps its top_k blocks by router score (lowering/router.py):
  "lowrank" (default): ||act(U_e S Vᵀ x + b1_e)|| from a rank-`router_rank` SVD of W1, computed on the first
      call and refreshed from the current weights every `router_refresh` calls (no recompile); gated FFNs use
      low-rank predictors of both projections: ||act(Ĝ_e x + bg_e) ⊙ (Û_e x + bu_e)||.
  "oracle": ||act(W1_e x + b1_e)|| (gated: ||act(Wg_e x + bg_e) ⊙ (Wu_e x + bu_e)||), exact, dense first GEMM.
Output: y = Σ over kept blocks e of W2[:, e]·hidden_e(x) + b2. Backward: exact gradients of that expression
(the selection carries no gradient); weight-gradient rows/columns of unused blocks are zero, never computed.
top_k == num_blocks (density 1.0) is exact mode and equals the dense FFN: on every device the op then runs
the plain dense FFN (no routing, permutation or grouping copies) and saves h_pre / h_up in the exact-mode
layout of docs/OPS.md (dense [T, H] pre-activations viewed as [T*E, Hb]), which only its own backward reads.
The backward computes only the gradients autograd asks for (ctx.needs_input_grad: frozen weights are free).

LoRA (optional, per projection; docs/OPS.md): the gate/first and up projections add s·B_e·u with u = A·dropout(x)
given by the caller (computed once for all blocks by the graph, so dropout and A's gradient stay with
autograd); the down projection adds s2·B2·v2 with v2 = Σ_e A2_e·h_e over the kept blocks. Gradients are exact
for u, B and A2, B2; with a frozen base no base weight-gradient GEMM runs.

Outputs (y, block_ids, h_pre, h_up, v2): block_ids [T, top_k] int32, h_pre/h_up [T*top_k, Hb] pre-activations in
block-grouped order (saved for the backward; not differentiable), h_up empty [0] when ungated, v2 [T, r2] the
down adapter's input (empty [0] without one). Autocast: fp32 inputs run in the autocast dtype (bf16/fp16).
Dispatch (sparse mode): lowering/dispatch.py (CUDA fp16/bf16/fp32 → Triton kernels in spt_compile.kernels, and
CPU under SPT_KERNELS=triton; everything else → the plain-PyTorch reference in lowering/reference/routed_ffn.py).
"""
from __future__ import annotations

import torch

from spt_compile.lowering.formulas import ffn_top_k
from spt_compile.lowering import router as _router
from spt_compile.lowering.neuron_blocks import compute_block_perm
from spt_compile.lowering.reference import routed_ffn as _ref

ACTIVATIONS = _ref.ACTIVATIONS
ROUTERS = _router.ROUTERS
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(x, w1, b1, w_up, b_up, w2, b2, block_perm, activation, num_blocks, top_k, router,
              router_rank, router_refresh, lora=None):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., d], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be one of {_DTYPES}, got {x.dtype}")
    if w1.dim() != 2:
        raise ValueError(f"w1 must be 2-D [H, d], got shape {tuple(w1.shape)}")
    H, d = w1.shape
    if x.shape[-1] != d:
        raise ValueError(f"x last dim {x.shape[-1]} != w1 in-features d={d}")
    if w2.dim() != 2 or w2.shape[1] != H:
        raise ValueError(f"w2 must be [d_out, H={H}], got shape {tuple(w2.shape)}")
    d_out = w2.shape[0]
    for name, t, shape in (("b1", b1, (H,)), ("w_up", w_up, (H, d)), ("b_up", b_up, (H,)), ("b2", b2, (d_out,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if b_up is not None and w_up is None:
        raise ValueError("b_up given without w_up (b_up is only meaningful for gated FFNs)")
    for name, t in (("w1", w1), ("b1", b1), ("w_up", w_up), ("b_up", b_up), ("w2", w2), ("b2", b2)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must match x's dtype/device ({x.dtype}, {x.device}), "
                             f"got ({t.dtype}, {t.device})")
    if not isinstance(num_blocks, int) or num_blocks < 1 or H % num_blocks:
        raise ValueError(f"num_blocks must be a positive divisor of H={H}, got {num_blocks!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_blocks:
        raise ValueError(f"top_k must be in [1, num_blocks={num_blocks}], got {top_k!r}")
    if router_rank < 1:
        raise ValueError(f"router_rank must be >= 1, got {router_rank}")
    if router_refresh < 1:
        raise ValueError(f"router_refresh must be >= 1, got {router_refresh}")
    if block_perm.dtype != torch.int64 or tuple(block_perm.shape) != (H,) or block_perm.device != x.device:
        raise ValueError(f"block_perm must be an int64 [H={H}] tensor on {x.device}, got "
                         f"{block_perm.dtype} {tuple(block_perm.shape)} on {block_perm.device}")
    if lora is not None:
        if lora.u_up is not None and w_up is None:
            raise ValueError("lora_u_up given without w_up (the up adapter belongs to a gated FFN)")
        _validate_lora(x, H, d_out, lora)


def _check_perm(block_perm: torch.Tensor) -> None:
    # A host sync: only on the reference (CPU / fp64) path, where it is free. The compiler builds block_perm
    # with compute_block_perm, which is a permutation by construction.
    H = block_perm.numel()
    if not torch.equal(torch.sort(block_perm).values, torch.arange(H, device=block_perm.device)):
        raise ValueError(f"block_perm must be a permutation of range({H})")


def _use_kernels(x: torch.Tensor) -> bool:
    """Triton kernels or reference: the one decision in lowering/dispatch.py (SPT_KERNELS switch)."""
    from spt_compile.lowering.dispatch import use_kernels
    return use_kernels(x)


def _validate_lora(x, H, d_out, lora: _ref.Lora) -> None:
    """Adapter factors: u [..., r] (x's leading dims) with b [H, r] per input projection; a2 [r2, H] with
    b2 [d_out, r2] for the down projection; x's dtype and device."""
    for name, u, b in (("lora_u1", lora.u1, lora.b1), ("lora_u_up", lora.u_up, lora.b_up)):
        bname = name.replace("_u", "_b")
        if (u is None) != (b is None):
            raise ValueError(f"{name} and {bname} come together (got only one of them)")
        if u is None:
            continue
        if u.dim() != x.dim() or tuple(u.shape[:-1]) != tuple(x.shape[:-1]):
            raise ValueError(f"{name} must be [*x.shape[:-1], r] = [{', '.join(map(str, x.shape[:-1]))}, r], "
                             f"got {tuple(u.shape)}")
        if b.dim() != 2 or tuple(b.shape) != (H, u.shape[-1]):
            raise ValueError(f"{bname} must be [H={H}, r={u.shape[-1]}], got {tuple(b.shape)}")
    if (lora.a2 is None) != (lora.b2 is None):
        raise ValueError("lora_a2 and lora_b2 come together (got only one of them)")
    if lora.a2 is not None:
        if lora.a2.dim() != 2 or lora.a2.shape[1] != H:
            raise ValueError(f"lora_a2 must be [r2, H={H}], got {tuple(lora.a2.shape)}")
        if lora.b2.dim() != 2 or tuple(lora.b2.shape) != (d_out, lora.a2.shape[0]):
            raise ValueError(f"lora_b2 must be [d_out={d_out}, r2={lora.a2.shape[0]}], got {tuple(lora.b2.shape)}")
    for name, t in zip(("lora_u1", "lora_b1", "lora_u_up", "lora_b_up", "lora_a2", "lora_b2"),
                       (lora.u1, lora.b1, lora.u_up, lora.b_up, lora.a2, lora.b2)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must match x's dtype/device ({x.dtype}, {x.device}), got ({t.dtype}, {t.device})")


def _lora2d(lora: _ref.Lora) -> _ref.Lora:
    """The adapter inputs u [..., r] as contiguous [T, r]."""
    def flat(u):
        return None if u is None else u.reshape(-1, u.shape[-1]).contiguous()
    return lora._replace(u1=flat(lora.u1), u_up=flat(lora.u_up))


@torch.library.custom_op("spt::routed_ffn", mutates_args=())
def routed_ffn_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w_up: torch.Tensor | None,
                  b_up: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, block_perm: torch.Tensor,
                  activation: str, num_blocks: int, top_k: int, router: str, router_rank: int,
                  router_refresh: int, site_id: int,
                  lora_u1: torch.Tensor | None = None, lora_b1: torch.Tensor | None = None, lora_s1: float = 1.0,
                  lora_u_up: torch.Tensor | None = None, lora_b_up: torch.Tensor | None = None,
                  lora_s_up: float = 1.0, lora_a2: torch.Tensor | None = None, lora_b2: torch.Tensor | None = None,
                  lora_s2: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lora = _ref.Lora(lora_u1, lora_b1, lora_s1, lora_u_up, lora_b_up, lora_s_up, lora_a2, lora_b2, lora_s2)
    _validate(x, w1, b1, w_up, b_up, w2, b2, block_perm, activation, num_blocks, top_k, router, router_rank,
              router_refresh, lora)
    d = w1.shape[1]
    x2d = x.reshape(-1, d)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    lora = _lora2d(lora)
    block_ids = _router.route(x2d, w1, b1, w_up, b_up, block_perm, activation, num_blocks, top_k, router,
                              router_rank, router_refresh, site_id, lora=lora)   # [T, k] int32
    if not _use_kernels(x):
        _check_perm(block_perm)
    if top_k == num_blocks:
        # exact mode (any device): the dense FFN in the user's neuron order, no permutation or grouping
        # copies; h_pre / h_up are the dense pre-activations [T, H] viewed as [T*E, Hb] (OPS.md)
        y2d, pre, up, v2 = _ref.dense_ffn_forward(x2d, w1, b1, w_up, b_up, w2, b2, activation, lora)
        Hb = w1.shape[0] // num_blocks
        h_pre = pre.view(-1, Hb)
        h_up = up.view(-1, Hb) if up is not None else x2d.new_empty(0)
        v2 = v2 if v2 is not None else x2d.new_empty(0)
    else:
        if _use_kernels(x):
            from spt_compile.kernels.grouped_gemm import routed_ffn_forward
        else:
            routed_ffn_forward = _ref.routed_ffn_forward
        y2d, h_pre, h_up, v2 = routed_ffn_forward(x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids,
                                                  activation, num_blocks, lora)
    y = y2d.reshape(*x.shape[:-1], w2.shape[0])
    return y, block_ids, h_pre, h_up, v2


@routed_ffn_op.register_fake
def _(x, w1, b1, w_up, b_up, w2, b2, block_perm, activation, num_blocks, top_k, router, router_rank,
      router_refresh, site_id, lora_u1=None, lora_b1=None, lora_s1=1.0, lora_u_up=None, lora_b_up=None,
      lora_s_up=1.0, lora_a2=None, lora_b2=None, lora_s2=1.0):
    lora = _ref.Lora(lora_u1, lora_b1, lora_s1, lora_u_up, lora_b_up, lora_s_up, lora_a2, lora_b2, lora_s2)
    _validate(x, w1, b1, w_up, b_up, w2, b2, block_perm, activation, num_blocks, top_k, router, router_rank,
              router_refresh, lora)
    T = 1  # product of leading dims (symbolic-friendly: no division by d)
    for s in x.shape[:-1]:
        T = T * s
    Hb = w1.shape[0] // num_blocks
    y = x.new_empty(*x.shape[:-1], w2.shape[0])
    block_ids = x.new_empty(T, top_k, dtype=torch.int32)
    h_pre = x.new_empty(T * top_k, Hb)
    h_up = x.new_empty(T * top_k, Hb) if w_up is not None else x.new_empty(0)
    v2 = x.new_empty(T, lora_a2.shape[0]) if lora_a2 is not None else x.new_empty(0)
    return y, block_ids, h_pre, h_up, v2


_N_INPUTS = 24  # routed_ffn's arguments; the differentiable ones are _GRAD_INPUTS (GRAD_NAMES order)
_GRAD_INPUTS = (0, 1, 2, 3, 4, 5, 6, 15, 16, 18, 19, 21, 22)


def _setup_context(ctx, inputs, output):
    (x, w1, b1, w_up, b_up, w2, b2, block_perm, activation, num_blocks, top_k, router, router_rank,
     router_refresh, site_id, lu1, lb1, ls1, luup, lbup, lsup, la2, lb2, ls2) = inputs
    y, block_ids, h_pre, h_up, v2 = output
    ctx.save_for_backward(x, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, h_pre, h_up,
                          lu1, lb1, luup, lbup, la2, lb2, v2)
    ctx.activation = activation
    ctx.num_blocks = num_blocks
    ctx.scalings = (ls1, lsup, ls2)
    ctx.mark_non_differentiable(block_ids, h_pre, h_up, v2)
    # no zero-filled grads for the non-differentiable outputs (h_pre alone is as large as the hidden
    # activations): _backward receives None for them, and for y when y was unused
    ctx.set_materialize_grads(False)


@torch.library.custom_op("spt::routed_ffn_backward", mutates_args=())
def routed_ffn_backward_op(dy2d: torch.Tensor, x2d: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                           w_up: torch.Tensor | None, b_up: torch.Tensor | None, w2: torch.Tensor,
                           b2: torch.Tensor | None, block_perm: torch.Tensor, block_ids: torch.Tensor,
                           h_pre: torch.Tensor, h_up: torch.Tensor, activation: str, num_blocks: int,
                           needs: list[bool], lora_u1: torch.Tensor | None = None,
                           lora_b1: torch.Tensor | None = None, lora_s1: float = 1.0,
                           lora_u_up: torch.Tensor | None = None, lora_b_up: torch.Tensor | None = None,
                           lora_s_up: float = 1.0, lora_a2: torch.Tensor | None = None,
                           lora_b2: torch.Tensor | None = None, lora_s2: float = 1.0,
                           lora_v2: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The backward as its own opaque op: AOTAutograd traces the autograd formula, and the block loop is
    data-dependent, so it must sit behind a custom op with a fake impl. needs (13 bools, GRAD_NAMES order:
    x, w1, b1, w_up, b_up, w2, b2, lora u1, b1, u_up, b_up, a2, b2) is ctx.needs_input_grad: grads not needed
    (frozen weights) are not computed, on every path. Returns 13 tensors; absent or unneeded ones are [0]."""
    dy2d = dy2d.contiguous()
    x2d = x2d.contiguous()
    gated = w_up is not None
    lora = _ref.Lora(lora_u1, lora_b1, lora_s1, lora_u_up, lora_b_up, lora_s_up, lora_a2, lora_b2, lora_s2)
    wanted = _ref.mask_needs(needs, b1, w_up, b_up, b2, lora)
    if block_ids.shape[1] == num_blocks:
        # exact mode, any device: h_pre / h_up hold the dense pre-activations [T, H] (see the forward)
        H = w1.shape[0]
        grads = _ref.dense_ffn_backward(dy2d, x2d, w1, w_up, w2, h_pre.view(-1, H),
                                        h_up.view(-1, H) if gated else None, activation, wanted, lora, lora_v2)
    else:
        if _use_kernels(x2d):
            from spt_compile.kernels.grouped_gemm import routed_ffn_backward
        else:
            routed_ffn_backward = _ref.routed_ffn_backward
        grads = routed_ffn_backward(dy2d, x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, h_pre,
                                    h_up if gated else None, activation, num_blocks, wanted, lora, lora_v2)
    return [g.contiguous() if g is not None else x2d.new_empty(0) for g in grads]


def _lora_of(lu1, lb1, luup, lbup, la2, lb2, scalings) -> _ref.Lora:
    return _ref.Lora(lu1, lb1, scalings[0], luup, lbup, scalings[1], la2, lb2, scalings[2])


@routed_ffn_backward_op.register_fake
def _(dy2d, x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, h_pre, h_up, activation, num_blocks,
      needs, lora_u1=None, lora_b1=None, lora_s1=1.0, lora_u_up=None, lora_b_up=None, lora_s_up=1.0,
      lora_a2=None, lora_b2=None, lora_s2=1.0, lora_v2=None):
    lora = _lora_of(lora_u1, lora_b1, lora_u_up, lora_b_up, lora_a2, lora_b2, (lora_s1, lora_s_up, lora_s2))
    wanted = _ref.mask_needs(needs, b1, w_up, b_up, b2, lora)
    shapes = (x2d, w1, b1, w_up, b_up, w2, b2, lora_u1, lora_b1, lora_u_up, lora_b_up, lora_a2, lora_b2)
    return [x2d.new_empty(t.shape) if n else x2d.new_empty(0) for t, n in zip(shapes, wanted)]


def _backward(ctx, dy, _dblock_ids, _dh_pre, _dh_up, _dv2):
    (x, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, h_pre, h_up,
     lu1, lb1, luup, lbup, la2, lb2, v2) = ctx.saved_tensors
    if dy is None:  # y did not reach the loss
        return (None,) * _N_INPUTS
    d = w1.shape[1]
    lora = _lora_of(lu1, lb1, luup, lbup, la2, lb2, ctx.scalings)
    nig = ctx.needs_input_grad  # only as long as the arguments given (defaulted adapters absent)
    needs = _ref.mask_needs([i < len(nig) and nig[i] for i in _GRAD_INPUTS], b1, w_up, b_up, b2, lora)
    s1, sup, s2 = ctx.scalings

    def flat(u):
        return None if u is None else u.reshape(-1, u.shape[-1])
    grads = torch.ops.spt.routed_ffn_backward(
        dy.reshape(-1, w2.shape[0]), x.reshape(-1, d), w1, b1, w_up, b_up, w2, b2, block_perm, block_ids,
        h_pre, h_up, ctx.activation, ctx.num_blocks, list(needs), flat(lu1), lb1, s1, flat(luup), lbup, sup,
        la2, lb2, s2, v2 if la2 is not None else None)
    g = [gr if n else None for gr, n in zip(grads, needs)]
    if g[0] is not None:
        g[0] = g[0].reshape(x.shape)
    if g[7] is not None:
        g[7] = g[7].reshape(lu1.shape)
    if g[9] is not None:
        g[9] = g[9].reshape(luup.shape)
    out = [None] * _N_INPUTS
    for i, gr in zip(_GRAD_INPUTS, g):
        out[i] = gr
    return tuple(out)


routed_ffn_op.register_autograd(_backward, setup_context=_setup_context)


# autocast: under bf16/fp16 autocast the routed FFN runs in the autocast dtype, like the linears it replaces
# (every floating input of this op is an activation or a weight, so all fp32 inputs are cast; fp64 stays:
# reference mode). A hand-written Autocast kernel rather than torch.library.register_autocast, whose cast
# dtype is fixed at registration: this one reads the dtype of the autocast region in force.
_autocast_lib = torch.library.Library("spt", "FRAGMENT")


def _register_autocast(device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        args = [a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype == torch.float32
                and a.device.type == device_type else a for a in args]
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return torch.ops.spt.routed_ffn.default(*args)

    _autocast_lib.impl("routed_ffn", kernel, key_name, with_keyset=True)


for _dev in ("cpu", "cuda"):
    _register_autocast(_dev)


def routed_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, *, w_up: torch.Tensor | None = None, b_up: torch.Tensor | None = None,
               activation: str = "gelu", num_blocks: int = 16, density: float = 0.5, router: str = "lowrank",
               router_rank: int = 32, router_refresh: int = 200, block_perm: torch.Tensor | None = None,
               cluster: bool = True, site_id: int = 0, lora: _ref.Lora | None = None) -> torch.Tensor:
    """Convenience wrapper: y = routed FFN of x with top_k = max(1, round(density * num_blocks)).

    block_perm defaults to compute_block_perm(w1, num_blocks, cluster) (computed per call: pass it in when
    calling repeatedly). The router cache is keyed by site_id *and* the weight's storage, so distinct layers
    sharing the default site_id never share factors. lora: optional adapters (`Lora`, docs/OPS.md).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    top_k = ffn_top_k(num_blocks, density)
    if block_perm is None:
        if w1.dim() != 2:
            raise ValueError(f"w1 must be 2-D [H, d], got shape {tuple(w1.shape)}")
        block_perm = compute_block_perm(w1, num_blocks, cluster=cluster).to(w1.device)
    lo = lora if lora is not None else _ref.NO_LORA
    y, _, _, _, _ = torch.ops.spt.routed_ffn(x, w1, b1, w_up, b_up, w2, b2, block_perm, activation, num_blocks,
                                             top_k, router, router_rank, router_refresh, site_id, *lo)
    return y
