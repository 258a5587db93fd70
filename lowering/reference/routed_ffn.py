"""Plain-PyTorch reference for the routed FFN stages of docs/OPS.md (and the CPU path of the op).

Semantics: the H hidden neurons form E = num_blocks blocks of Hb = H // E neurons; block e is the neurons
block_perm[e*Hb:(e+1)*Hb]. Token t keeps the blocks block_ids[t, :] and
    y[t] = sum over kept e of w2[:, blk_e] @ hidden_blk_e(x[t]) + b2,
    hidden = act(w1 x + b1)                       (ungated)
    hidden = act(w1 x + b1) * (w_up x + b_up)     (gated; w1 is the gate projection).
LoRA adapters (`Lora`, docs/OPS.md) add s1·B1_e·u1 to the first projection (u1 = A1·x [T, r], computed once for
all blocks, B1_e the block's rows of B1), s_up·B_up_e·u_up to the up projection, and s2·B2·v2 to y, where
v2 = Σ_e A2_e·hidden_e [T, r2] over the kept blocks only. Each adapter term is one small extra GEMM per block.
Unused blocks are really skipped: the work is one loop over the E blocks (one GEMM per block and
projection), never over tokens. h_pre / h_up come back in *block-grouped order*: the rows of the
(token, slot) pairs p = t*k + s, stably sorted by block id (pair_order from `routing_prologue`).

Two entry points:
  * `routed_ffn_forward` / `routed_ffn_backward`: the OPS.md stages (block-grouped h_pre in every mode),
    what the Triton kernels are tested against;
  * `dense_ffn_forward` / `dense_ffn_backward`: exact mode (top_k == E) as the op runs it on every device:
    the plain dense FFN in the user's neuron order, no permutation, no copies; h_pre is then the dense
    pre-activation [T, H] (see docs/OPS.md, "exact-mode layout").

Speed (this is the CPU path of the op; measured with bench/ffn.py and torch.profiler):
  * one loop over the used blocks; each block gathers its token rows (index_select) and its weight rows /
    columns (w[block_perm slice]) and runs plain GEMMs, writing h_pre straight into its grouped slice
    (`out=`). Every temporary is per block ([n_e, d], [Hb, d]): on CPU, [T*k, d]-sized buffers or permuted
    copies of whole weights are fresh mmaps that page-fault on every call (a fresh 50 MB buffer measured
    ~5x the cost of a copy into warm memory), while block-sized ones are recycled by the heap;
  * per-pair outputs are summed per token with index_add_ (half types into an fp32 buffer);
  * tried and measured slower: one padded bmm over all blocks ([E, n_max, d] gathers): 1.8x vs dense at
    density 0.25 against 2.6x for this loop (GPT-2-small, 2 cores), CPU bmm being slower per FLOP than
    mm and its buffers page-faulting;
  * weight gradients are written straight into the user's neuron order (index_copy_ of each used block's
    rows/columns), unused blocks' rows are zero-filled, never computed;
  * the backward computes only the gradients autograd asks for (`needs`): frozen weights cost nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def activation_forward(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(h)
    if activation == "gelu":
        return torch.nn.functional.gelu(h)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(h, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_backward(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(h) / dh * grad, with the same aten kernels autograd uses (so exact mode matches dense bit-for-bit
    in the elementwise part)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, h, 0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h, approximate="none")
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def routing_prologue(block_ids: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """block_ids [T, k] int -> (pair_order [T*k] int32, block_offsets [E+1] int32).

    pair_order is the stable argsort of block_ids.flatten(); block e owns pair_order[offsets[e]:offsets[e+1]].
    """
    flat = block_ids.reshape(-1).long()                                        # [T*k]
    pair_order = torch.sort(flat, stable=True).indices                         # [T*k]
    counts = torch.bincount(flat, minlength=num_blocks)                        # [E]
    offsets = torch.zeros(num_blocks + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return pair_order.to(torch.int32), offsets.to(torch.int32)


class Lora(NamedTuple):
    """LoRA adapter inputs of one routed-FFN call; None where a projection has no adapter (docs/OPS.md).

    u1 [T, r1] = A1·dropout(x) (the first projection's adapter input, computed once for all blocks), b1 [H, r1];
    u_up, b_up the same for the up projection; a2 [r2, H], b2 [d_out, r2] the down projection's factors.
    The s* are the adapters' scalings (PEFT's lora_alpha / r)."""
    u1: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    s1: float = 1.0
    u_up: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    s_up: float = 1.0
    a2: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    s2: float = 1.0


NO_LORA = Lora()
# needs: (x, w1, b1, w_up, b_up, w2, b2, lora u1, lora b1, lora u_up, lora b_up, lora a2, lora b2)
_ALL = (True,) * 13
GRAD_NAMES = ("x", "w1", "b1", "w_up", "b_up", "w2", "b2", "lora_u1", "lora_b1", "lora_u_up", "lora_b_up",
              "lora_a2", "lora_b2")


def present(b1, w_up, b_up, b2, lora: Lora) -> tuple[bool, ...]:
    """Which of the 13 differentiable inputs exist (in GRAD_NAMES order)."""
    return (True, True, b1 is not None, w_up is not None, b_up is not None, True, b2 is not None,
            lora.u1 is not None, lora.u1 is not None, lora.u_up is not None, lora.u_up is not None,
            lora.a2 is not None, lora.a2 is not None)


def mask_needs(needs, b1, w_up, b_up, b2, lora: Lora) -> tuple[bool, ...]:
    needs = tuple(needs) + (False,) * (13 - len(needs))
    return tuple(bool(n) and p for n, p in zip(needs, present(b1, w_up, b_up, b2, lora)))


def _hidden(h_pre: torch.Tensor, h_up: torch.Tensor | None, activation: str) -> torch.Tensor:
    a = activation_forward(h_pre, activation)
    return a * h_up if h_up is not None else a


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------- exact mode: the dense FFN


def _dense_proj(x2d, w, b, u, lb, s):
    """w x + b (+ s·lb·u): a projection as nn.Linear (and PEFT's LoRA layer) runs it. [T, H]"""
    out = torch.nn.functional.linear(x2d, w, b)
    if u is not None:
        out.add_(torch.nn.functional.linear(u, lb), alpha=s)
    return out


def dense_ffn_forward(x2d, w1, b1, w_up, b_up, w2, b2, activation: str, lora: Lora = NO_LORA):
    """-> (y [T, d_out], pre [T, H], up [T, H] or None, v2 [T, r2] or None): the dense FFN, GEMMs exactly as
    nn.Linear runs them; v2 = A2·hidden is the down adapter's input (saved for its gradients)."""
    pre = _dense_proj(x2d, w1, b1, lora.u1, lora.b1, lora.s1)                # [T, H]
    up = _dense_proj(x2d, w_up, b_up, lora.u_up, lora.b_up, lora.s_up) if w_up is not None else None
    hidden = _hidden(pre, up, activation)
    y = torch.nn.functional.linear(hidden, w2, b2)                           # [T, d_out]
    v2 = None
    if lora.a2 is not None:
        v2 = torch.nn.functional.linear(hidden, lora.a2)                     # [T, r2]
        y.add_(torch.nn.functional.linear(v2, lora.b2), alpha=lora.s2)
    return y, pre, up, v2


def _down_adapter_grads(dy2d, lora: Lora, v2, need_dv2: bool, n_lb2: bool):
    """(dv2 [T, r2] = s2·dy·B2 or None, dB2 [d_out, r2] = s2·dyᵀ·v2 or None)."""
    if lora.a2 is None:
        return None, None
    dv2 = dy2d.mm(lora.b2).mul_(lora.s2) if need_dv2 else None
    dlb2 = dy2d.t().mm(v2).mul_(lora.s2) if n_lb2 else None
    return dv2, dlb2


def _adapter_input_grads(dpre, u, lb, s, n_u, n_lb):
    """Gradients of s·lb·u given d(pre) [n, Hb]: (du [n, r] = s·dpre·lb, dlb [Hb, r] = s·dpreᵀ·u)."""
    du = dpre.mm(lb).mul_(s) if n_u else None
    dlb = dpre.t().mm(u).mul_(s) if n_lb else None
    return du, dlb


def dense_ffn_backward(dy2d, x2d, w1, w_up, w2, pre, up, activation: str, needs=_ALL, lora: Lora = NO_LORA,
                       v2=None):
    """Gradients of dense_ffn_forward -> 13 values in GRAD_NAMES order (dx, dw1, db1, dw_up, db_up, dw2, db2,
    du1, dlb1, du_up, dlb_up, dla2, dlb2); None where not needed (needs[i] False, e.g. frozen weights) or
    absent. The same GEMMs autograd runs through the dense FFN; the activation is recomputed from pre (the op
    saves pre-activations only). A frozen base runs no [H, d] / [d_out, H] weight-gradient GEMM."""
    gated = up is not None
    has = (True, True, True, gated, gated, True, True) + (lora.u1 is not None,) * 2 + \
        (lora.u_up is not None,) * 2 + (lora.a2 is not None,) * 2   # (biases: the caller masks absent ones)
    n_x, n_w1, n_b1, n_wup, n_bup, n_w2, n_b2, n_u1, n_lb1, n_uup, n_lbup, n_la2, n_lb2 = \
        tuple(bool(n) and h for n, h in zip(tuple(needs) + (False,) * (13 - len(needs)), has))
    n_up = gated and (n_wup or n_bup or n_uup or n_lbup)
    n_pre = n_x or n_w1 or n_b1 or n_u1 or n_lb1 or n_up                       # anything below the activation
    n_hidden = n_w2 or n_la2
    act = activation_forward(pre, activation) if (n_hidden or (gated and n_pre)) else None   # [T, H]
    hidden = (act * up if gated else act) if n_hidden else None
    dv2, dlb2 = _down_adapter_grads(dy2d, lora, v2, n_pre or n_la2, n_lb2)
    dw2 = dy2d.t().mm(hidden) if n_w2 else None                               # [d_out, H]
    dla2 = dv2.t().mm(hidden) if n_la2 else None                               # [r2, H]
    db2 = dy2d.sum(0) if n_b2 else None
    del hidden
    grads = [None] * 13
    grads[5], grads[6], grads[11], grads[12] = dw2, db2, dla2, dlb2
    if not n_pre:
        return tuple(grads)
    dhidden = dy2d.mm(w2)                                                      # [T, H]
    if dv2 is not None:
        dhidden.addmm_(dv2, lora.a2)
    dpre = activation_backward(dhidden * up if gated else dhidden, pre, activation)
    dup = dhidden * act if gated else None
    del dhidden, act
    grads[1] = dpre.t().mm(x2d) if n_w1 else None                              # [H, d]
    grads[2] = dpre.sum(0) if n_b1 else None
    if n_x:
        dx = dpre.mm(w1)                                                       # [T, d]
        if gated:
            dx.addmm_(dup, w_up)
        grads[0] = dx
    if lora.u1 is not None:
        grads[7], grads[8] = _adapter_input_grads(dpre, lora.u1, lora.b1, lora.s1, n_u1, n_lb1)
    if gated:
        grads[3] = dup.t().mm(x2d) if n_wup else None
        grads[4] = dup.sum(0) if n_bup else None
        if lora.u_up is not None:
            grads[9], grads[10] = _adapter_input_grads(dup, lora.u_up, lora.b_up, lora.s_up, n_uup, n_lbup)
    return tuple(grads)


# ---------------------------------------------------------------- shared helpers of the sparse path


def _tok_to_grouped(t: torch.Tensor, E: int) -> torch.Tensor:
    """[T, H] token-major (block order) -> [E*T, Hb] block-grouped (exact mode: block e's pairs are all T tokens)."""
    T, H = t.shape
    return t.view(T, E, H // E).transpose(0, 1).reshape(E * T, H // E)


def _grouped_to_tok(g: torch.Tensor, E: int) -> torch.Tensor:
    """Inverse of _tok_to_grouped: [E*T, Hb] -> [T, H]."""
    Hb = g.shape[1]
    return g.view(E, -1, Hb).transpose(0, 1).reshape(-1, E * Hb)


def _permuted_rows(w: torch.Tensor | None, block_perm: torch.Tensor) -> torch.Tensor | None:
    """Rows (hidden neurons) of w in block order: block e is the contiguous slice [e*Hb, (e+1)*Hb)."""
    return None if w is None else w.index_select(0, block_perm)


class _Blocks:
    """The block loop's schedule, derived once from block_ids: for each used block e, its neurons
    (block_perm slice), its grouped pair range [lo, hi) and the tokens of those pairs."""

    def __init__(self, block_ids: torch.Tensor, block_perm: torch.Tensor, num_blocks: int):
        k = block_ids.shape[1]
        Hb = block_perm.numel() // num_blocks
        pair_order, offsets = routing_prologue(block_ids, num_blocks)
        tokens = pair_order.long() // k                                        # [T*k] token of each grouped pair
        off = offsets.tolist()  # host copy of E+1 ints: fine on the CPU path this reference serves
        self.tokens = tokens                                                   # [T*k] token of grouped row r
        self.used = [(block_perm[e * Hb:(e + 1) * Hb], off[e], off[e + 1], tokens[off[e]:off[e + 1]])
                     for e in range(num_blocks) if off[e + 1] > off[e]]       # (neurons, lo, hi, tokens)
        unused = [block_perm[e * Hb:(e + 1) * Hb] for e in range(num_blocks) if off[e + 1] == off[e]]
        self.unused_neurons = torch.cat(unused) if unused else None


def _w_rows(w: torch.Tensor | None, nrn: torch.Tensor, dim: int = 0) -> torch.Tensor | None:
    """The slices of weight w along its neuron dim `dim` for one block's neurons ([Hb, d] rows of w1, [d_out, Hb]
    columns of w2; biases too). A small gather: the whole loop copies each weight once, in cache-sized
    pieces, instead of materialising a permuted copy of every weight. A transposed view (GPT-2 Conv1D
    weight.t()) is gathered through its contiguous transpose and returned as a view of that gather (BLAS
    takes either layout); index_select on the strided view itself is ~20x slower."""
    if w is None:
        return None
    if w.dim() == 2 and not w.is_contiguous() and w.t().is_contiguous():
        return w.t().index_select(1 - dim, nrn).t()
    return w.index_select(dim, nrn)


# ---------------------------------------------------------------- OPS.md stages


def _permuted_lora(lora: Lora, block_perm: torch.Tensor) -> Lora:
    """The adapter factors with their neuron dim in block order (exact mode's block-grouped layout)."""
    return lora._replace(b1=_permuted_rows(lora.b1, block_perm), b_up=_permuted_rows(lora.b_up, block_perm),
                         a2=None if lora.a2 is None else lora.a2.index_select(1, block_perm))


def routed_ffn_forward(x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, activation: str,
                       num_blocks: int, lora: Lora = NO_LORA):
    """-> (y2d [T, d_out] contiguous x.dtype, h_pre [T*k, Hb], h_up [T*k, Hb] or empty [0],
    v2 [T, r2] (= Σ over kept blocks of A2_e·hidden_e, the down adapter's input) or empty [0])."""
    T, d = x2d.shape
    E = num_blocks
    Hb = w1.shape[0] // E
    k = block_ids.shape[1]
    d_out = w2.shape[0]
    gated = w_up is not None

    if k == E:
        # Exact mode in the stage's block-grouped layout: the dense FFN with block-ordered weights, and the
        # grouped h_pre is a [T, E, Hb] -> [E, T, Hb] transpose. (The op itself uses dense_ffn_forward.)
        w1p, b1p, wup, bup = (_permuted_rows(t, block_perm) for t in (w1, b1, w_up, b_up))
        w2p = w2.index_select(1, block_perm)
        y, pre, up, v2 = dense_ffn_forward(x2d, w1p, b1p, wup, bup, w2p, b2, activation,
                                           _permuted_lora(lora, block_perm))
        return (y, _tok_to_grouped(pre, E), (_tok_to_grouped(up, E) if gated else x2d.new_empty(0)),
                v2 if v2 is not None else x2d.new_empty(0))

    # Per-block temporaries ([n_e, d] gathers, [n_e, d_out] outputs) stay small: glibc serves them from
    # its heap, whereas [T*k, d]-sized buffers would be fresh mmaps that page-fault on every call
    # (measured: a 50 MB fresh buffer costs ~5x a copy into warm memory).
    blocks = _Blocks(block_ids, block_perm, E)
    h_pre = x2d.new_empty(T * k, Hb)                                           # [T*k, Hb] grouped
    h_up = x2d.new_empty(T * k, Hb) if gated else x2d.new_empty(0)
    for nrn, lo, hi, tok in blocks.used:
        xe = x2d.index_select(0, tok)                                          # [n_e, d]
        _linear_into(h_pre[lo:hi], xe, _w_rows(w1, nrn), _w_rows(b1, nrn))
        _add_adapter(h_pre[lo:hi], lora.u1, lora.b1, lora.s1, nrn, tok)
        if gated:
            _linear_into(h_up[lo:hi], xe, _w_rows(w_up, nrn), _w_rows(b_up, nrn))
            _add_adapter(h_up[lo:hi], lora.u_up, lora.b_up, lora.s_up, nrn, tok)
    hidden = _hidden(h_pre, h_up if gated else None, activation)              # [T*k, Hb]
    # sum of the k per-pair outputs of each token, in fp32 for half types (as the GEMMs accumulate inside)
    acc = _acc_dtype(x2d.dtype)
    # (a fresh buffer, never b2.expand(...).contiguous(): for T == 1 that is a view of b2, which
    # index_add_ would then modify)
    y = x2d.new_zeros(T, d_out, dtype=acc) if b2 is None else x2d.new_empty(T, d_out, dtype=acc).copy_(b2)
    # the down adapter's per-pair rows [T*k, r2] (small): one index_add_ for all blocks, not one per block
    v2_rows = x2d.new_empty(T * k, lora.a2.shape[0]) if lora.a2 is not None else None
    for nrn, lo, hi, tok in blocks.used:
        out_e = hidden[lo:hi].mm(_w_rows(w2, nrn, 1).t())                 # [n_e, d_out]
        y.index_add_(0, tok, out_e.to(acc))
        if v2_rows is not None:
            torch.mm(hidden[lo:hi], _w_rows(lora.a2, nrn, 1).t(), out=v2_rows[lo:hi])          # [n_e, r2]
    if v2_rows is None:
        return y.to(x2d.dtype), h_pre, h_up, x2d.new_empty(0)
    v2 = x2d.new_zeros(T, v2_rows.shape[1], dtype=acc).index_add_(0, blocks.tokens, v2_rows.to(acc))
    v2 = v2.to(x2d.dtype)  # rounded like the GEMM output it stands for, then the small B2 GEMM
    y.addmm_(v2.to(acc), lora.b2.to(acc).t(), alpha=lora.s2)
    return y.to(x2d.dtype), h_pre, h_up, v2


def _add_adapter(out, u, lb, s, nrn, tok) -> None:
    """out += s·u[tok]·lb[nrn]ᵀ: one block's share of a LoRA term (u = A·x is computed once for all blocks)."""
    if u is not None:
        out.addmm_(u.index_select(0, tok), _w_rows(lb, nrn).t(), alpha=s)


def _linear_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out = x @ w.T (+ b), written in place (out is a contiguous slice of a grouped buffer)."""
    if b is not None:
        torch.addmm(b, x, w.t(), out=out)
    else:
        torch.mm(x, w.t(), out=out)


def routed_ffn_backward(dy2d, x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, h_pre, h_up,
                        activation: str, num_blocks: int, needs=_ALL, lora: Lora = NO_LORA, v2=None):
    """-> 13 gradients in GRAD_NAMES order (dx, dw1, db1, dw_up, db_up, dw2, db2, du1, dlb1, du_up, dlb_up,
    dla2, dlb2), None where the input is absent or needs[i] is False.

    Exact gradients of the routed expression (the selection carries no gradient). Weight-gradient rows
    (w1, w_up, b1, b_up, LoRA b1/b_up) and columns (w2, LoRA a2) of unused blocks are zero and never computed.
    needs (GRAD_NAMES order, ctx.needs_input_grad): which gradients to compute; a frozen base runs no base
    weight-gradient GEMM. v2: the forward's v2 (needed for dlb2).
    """
    E = num_blocks
    gated = w_up is not None
    needs = mask_needs(needs, b1, w_up, b_up, b2, lora)
    dy2d = dy2d.contiguous()
    if block_ids.shape[1] != E:
        return _backward_sparse(dy2d, x2d, w1, w_up, w2, block_perm, block_ids, h_pre,
                                h_up if gated else None, activation, E, needs, lora, v2)
    # exact mode, block-grouped layout: dense backward in block order, then back to the user's order
    w1p, wup = _permuted_rows(w1, block_perm), _permuted_rows(w_up, block_perm)
    w2p = w2.index_select(1, block_perm)                                       # [d_out, H] block order
    pre = _grouped_to_tok(h_pre, E)                                            # [T, H] block order
    up = _grouped_to_tok(h_up, E) if gated else None
    g = dense_ffn_backward(dy2d, x2d, w1p, wup, w2p, pre, up, activation, needs,
                           _permuted_lora(lora, block_perm), v2)

    # index_copy puts block-order row j at block_perm[j]
    def unperm(t, dim=0):
        return None if t is None else torch.empty_like(t).index_copy_(dim, block_perm, t)

    return (g[0], unperm(g[1]), unperm(g[2]), unperm(g[3]), unperm(g[4]), unperm(g[5], 1), g[6],
            g[7], unperm(g[8]), g[9], unperm(g[10]), unperm(g[11], 1), g[12])


def _backward_sparse(dy2d, x2d, w1, w_up, w2, block_perm, block_ids, h_pre, h_up, activation, E, needs, lora,
                     v2):
    """Per-block backward over the grouped pairs, written straight into the user's neuron order (each used
    block's gradient rows land at its neurons with index_copy_); unused blocks' rows are zero."""
    n_pre = needs[0] or any(needs[i] for i in (1, 2, 3, 4, 7, 8, 9, 10))
    blocks = _Blocks(block_ids, block_perm, E)
    dv2, dlb2 = _down_adapter_grads(dy2d, lora, v2, n_pre or needs[11], needs[12])
    dhidden, dw2, dla2 = _sparse_down_grads(dy2d, w2, h_pre, h_up, activation, blocks, needs, n_pre, lora, dv2)
    grads = [None] * 13
    grads[5], grads[6], grads[11], grads[12] = dw2, (dy2d.sum(0) if needs[6] else None), dla2, dlb2
    if n_pre:
        grads[:5], grads[7:11] = _sparse_up_grads(x2d, w1, w_up, h_pre, h_up, dhidden, activation, blocks,
                                                  needs, lora)
    return tuple(grads)


def _zeros_for_unused(x2d, blocks, shape, dim=0):
    t = x2d.new_empty(shape)
    if blocks.unused_neurons is not None:
        t.index_fill_(dim, blocks.unused_neurons, 0)
    return t


def _sparse_down_grads(dy2d, w2, h_pre, h_up, activation, blocks, needs, n_pre, lora, dv2):
    """-> (dhidden [T*k, Hb] grouped or None, dw2 [d_out, H] or None, dla2 [r2, H] or None)."""
    n_w2, n_la2 = needs[5], needs[11]
    H = w2.shape[1]
    hidden = _hidden(h_pre, h_up, activation) if (n_w2 or n_la2) else None  # [T*k, Hb]
    dw2 = _zeros_for_unused(dy2d, blocks, (w2.shape[0], H), dim=1) if n_w2 else None
    dla2 = _zeros_for_unused(dy2d, blocks, (lora.a2.shape[0], H), dim=1) if n_la2 else None
    dhidden = dy2d.new_empty(h_pre.shape) if n_pre else None                   # [T*k, Hb] grouped
    for nrn, lo, hi, tok in blocks.used:
        dye = dy2d.index_select(0, tok)                                        # [n_e, d_out]
        dve = dv2.index_select(0, tok) if dv2 is not None else None            # [n_e, r2]
        if n_w2:
            dw2.index_copy_(1, nrn, dye.t().mm(hidden[lo:hi]))                 # [d_out, Hb]
        if n_la2:
            dla2.index_copy_(1, nrn, dve.t().mm(hidden[lo:hi]))                # [r2, Hb]
        if n_pre:
            torch.mm(dye, _w_rows(w2, nrn, 1), out=dhidden[lo:hi])             # [n_e, Hb]
            if dve is not None:
                dhidden[lo:hi].addmm_(dve, _w_rows(lora.a2, nrn, 1))
    return dhidden, dw2, dla2


def _sparse_up_grads(x2d, w1, w_up, h_pre, h_up, dhidden, activation, blocks, needs, lora):
    """-> ([dx, dw1, db1, dw_up, db_up], [du1, dlb1, du_up, dlb_up]) from dhidden, block by block."""
    T, d = x2d.shape
    H = w1.shape[0]
    gated = h_up is not None
    n_x, n_w1, n_b1, n_wup, n_bup = needs[:5]
    n_u1, n_lb1, n_uup, n_lbup = needs[7:11]
    act = activation_forward(h_pre, activation) if gated else None
    dpre = activation_backward(dhidden * h_up if gated else dhidden, h_pre, activation)  # [T*k, Hb]
    dup = dhidden * act if gated else None
    del dhidden, act
    acc = _acc_dtype(x2d.dtype)

    def zeros(shape, needed):
        return _zeros_for_unused(x2d, blocks, shape) if needed else None

    dw1, dwup, db1, dbup = zeros((H, d), n_w1), zeros((H, d), n_wup), zeros((H,), n_b1), zeros((H,), n_bup)
    r1 = lora.u1.shape[1] if lora.u1 is not None else 0
    rup = lora.u_up.shape[1] if lora.u_up is not None else 0
    dlb1, dlbup = zeros((H, r1), n_lb1), zeros((H, rup), n_lbup)
    dx = x2d.new_zeros(T, d, dtype=acc) if n_x else None
    # adapters' per-pair input-gradient rows [T*k, r] (small): summed per token once, after the loop
    du1 = x2d.new_empty(dpre.shape[0], r1) if n_u1 else None
    duup = x2d.new_empty(dpre.shape[0], rup) if n_uup else None
    for nrn, lo, hi, tok in blocks.used:
        if n_w1 or n_wup:
            xe = x2d.index_select(0, tok)                                      # [n_e, d]
            if n_w1:
                dw1.index_copy_(0, nrn, dpre[lo:hi].t().mm(xe))                # [Hb, d]
            if n_wup:
                dwup.index_copy_(0, nrn, dup[lo:hi].t().mm(xe))
        if n_b1:
            db1.index_copy_(0, nrn, dpre[lo:hi].sum(0))
        if n_bup:
            dbup.index_copy_(0, nrn, dup[lo:hi].sum(0))
        if n_x:
            dxe = dpre[lo:hi].mm(_w_rows(w1, nrn))                             # [n_e, d]
            if gated:
                dxe.addmm_(dup[lo:hi], _w_rows(w_up, nrn))
            dx.index_add_(0, tok, dxe.to(acc))
        _block_adapter_grads(dpre, lo, hi, lora.u1, lora.b1, lora.s1, nrn, tok, du1, dlb1)
        if gated:
            _block_adapter_grads(dup, lo, hi, lora.u_up, lora.b_up, lora.s_up, nrn, tok, duup, dlbup)

    def per_token(rows, s):  # [T*k, r] grouped rows -> s · their sum per token [T, r]
        if rows is None:
            return None
        out = x2d.new_zeros(T, rows.shape[1], dtype=acc).index_add_(0, blocks.tokens, rows.to(acc), alpha=s)
        return out.to(x2d.dtype)
    return ([dx.to(x2d.dtype) if n_x else None, dw1, db1, dwup, dbup],
            [per_token(du1, lora.s1), dlb1, per_token(duup, lora.s_up), dlbup])


def _block_adapter_grads(dpre, lo, hi, u, lb, s, nrn, tok, du_rows, dlb) -> None:
    """One block's share of an adapter's gradients: du_rows[lo:hi] = dpre_e·lb[nrn] (scaled by s and summed per
    token after the loop); dlb[nrn] = s·dpre_eᵀ·u[tok]."""
    if du_rows is not None:
        torch.mm(dpre[lo:hi], _w_rows(lb, nrn), out=du_rows[lo:hi])            # [n_e, r]
    if dlb is not None:
        dlb.index_copy_(0, nrn, dpre[lo:hi].t().mm(u.index_select(0, tok)).mul_(s))  # [Hb, r]
