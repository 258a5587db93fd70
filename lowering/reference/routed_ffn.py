"""Plain-PyTorch reference for the routed FFN stages of docs/OPS.md (and the CPU path of the op).

Semantics: the H hidden neurons form E = num_blocks blocks of Hb = H // E neurons; block e is the neurons
block_perm[e*Hb:(e+1)*Hb]. Token t keeps the blocks block_ids[t, :] and
    y[t] = sum over kept e of w2[:, blk_e] @ hidden_blk_e(x[t]) + b2,
    hidden = act(w1 x + b1)                       (ungated)
    hidden = act(w1 x + b1) * (w_up x + b_up)     (gated; w1 is the gate projection).
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


_ALL = (True,) * 7  # needs: (x, w1, b1, w_up, b_up, w2, b2)


def _hidden(h_pre: torch.Tensor, h_up: torch.Tensor | None, activation: str) -> torch.Tensor:
    a = activation_forward(h_pre, activation)
    return a * h_up if h_up is not None else a


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------- exact mode: the dense FFN


def dense_ffn_forward(x2d, w1, b1, w_up, b_up, w2, b2, activation: str):
    """-> (y [T, d_out], pre [T, H], up [T, H] or None): the dense FFN, GEMMs exactly as nn.Linear runs them."""
    pre = torch.nn.functional.linear(x2d, w1, b1)                              # [T, H]
    up = torch.nn.functional.linear(x2d, w_up, b_up) if w_up is not None else None
    y = torch.nn.functional.linear(_hidden(pre, up, activation), w2, b2)      # [T, d_out]
    return y, pre, up


def dense_ffn_backward(dy2d, x2d, w1, w_up, w2, pre, up, activation: str, needs=_ALL):
    """Gradients of dense_ffn_forward -> (dx, dw1, db1, dw_up, db_up, dw2, db2); None where not needed
    (needs[i] False, e.g. frozen weights) or absent. The same GEMMs autograd runs through the dense FFN;
    the activation is recomputed from pre (the op saves pre-activations only)."""
    n_x, n_w1, n_b1, n_wup, n_bup, n_w2, n_b2 = needs
    gated = up is not None
    n_up = gated and (n_wup or n_bup)
    n_pre = n_x or n_w1 or n_b1 or n_up                                       # anything below the activation
    act = activation_forward(pre, activation) if (n_w2 or gated) else None    # [T, H]
    dw2 = dy2d.t().mm(act * up if gated else act) if n_w2 else None           # [d_out, H]
    db2 = dy2d.sum(0) if n_b2 else None
    dx = dw1 = db1 = dw_up = db_up = None
    if n_pre:
        dhidden = dy2d.mm(w2)                                                  # [T, H]
        dpre = activation_backward(dhidden * up if gated else dhidden, pre, activation)
        dup = dhidden * act if gated else None
        del dhidden, act
        dw1 = dpre.t().mm(x2d) if n_w1 else None                               # [H, d]
        db1 = dpre.sum(0) if n_b1 else None
        if n_x:
            dx = dpre.mm(w1)                                                   # [T, d]
            if gated:
                dx.addmm_(dup, w_up)
        if gated:
            dw_up = dup.t().mm(x2d) if n_wup else None
            db_up = dup.sum(0) if n_bup else None
    return dx, dw1, db1, dw_up, db_up, dw2, db2


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


def routed_ffn_forward(x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, activation: str,
                       num_blocks: int):
    """-> (y2d [T, d_out] contiguous x.dtype, h_pre [T*k, Hb], h_up [T*k, Hb] or empty [0])."""
    T, d = x2d.shape
    H = w1.shape[0]
    E = num_blocks
    Hb = H // E
    k = block_ids.shape[1]
    d_out = w2.shape[0]
    gated = w_up is not None

    if k == E:
        # Exact mode in the stage's block-grouped layout: the dense FFN with block-ordered weights, and the
        # grouped h_pre is a [T, E, Hb] -> [E, T, Hb] transpose. (The op itself uses dense_ffn_forward.)
        w1p, b1p, wup, bup = (_permuted_rows(t, block_perm) for t in (w1, b1, w_up, b_up))
        w2p = w2.index_select(1, block_perm)
        y, pre, up = dense_ffn_forward(x2d, w1p, b1p, wup, bup, w2p, b2, activation)
        return y, _tok_to_grouped(pre, E), (_tok_to_grouped(up, E) if gated else x2d.new_empty(0))

    # Per-block temporaries ([n_e, d] gathers, [n_e, d_out] outputs) stay small: glibc serves them from
    # its heap, whereas [T*k, d]-sized buffers would be fresh mmaps that page-fault on every call
    # (measured: a 50 MB fresh buffer costs ~5x a copy into warm memory).
    blocks = _Blocks(block_ids, block_perm, E)
    h_pre = x2d.new_empty(T * k, Hb)                                           # [T*k, Hb] grouped
    h_up = x2d.new_empty(T * k, Hb) if gated else x2d.new_empty(0)
    for nrn, lo, hi, tok in blocks.used:
        xe = x2d.index_select(0, tok)                                          # [n_e, d]
        _linear_into(h_pre[lo:hi], xe, _w_rows(w1, nrn), _w_rows(b1, nrn))
        if gated:
            _linear_into(h_up[lo:hi], xe, _w_rows(w_up, nrn), _w_rows(b_up, nrn))
    hidden = _hidden(h_pre, h_up if gated else None, activation)              # [T*k, Hb]
    # sum of the k per-pair outputs of each token, in fp32 for half types (as the GEMMs accumulate inside)
    acc = _acc_dtype(x2d.dtype)
    # (a fresh buffer, never b2.expand(...).contiguous(): for T == 1 that is a view of b2, which
    # index_add_ would then modify)
    y = x2d.new_zeros(T, d_out, dtype=acc) if b2 is None else x2d.new_empty(T, d_out, dtype=acc).copy_(b2)
    for nrn, lo, hi, tok in blocks.used:
        out_e = hidden[lo:hi].mm(_w_rows(w2, nrn, 1).t())                 # [n_e, d_out]
        y.index_add_(0, tok, out_e.to(acc))
    return y.to(x2d.dtype), h_pre, h_up


def _linear_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out = x @ w.T (+ b), written in place (out is a contiguous slice of a grouped buffer)."""
    if b is not None:
        torch.addmm(b, x, w.t(), out=out)
    else:
        torch.mm(x, w.t(), out=out)


def routed_ffn_backward(dy2d, x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, h_pre, h_up,
                        activation: str, num_blocks: int, needs=_ALL):
    """-> (dx, dw1, db1, dw_up, db_up, dw2, db2), None where the input is absent or needs[i] is False.

    Exact gradients of the routed expression (the selection carries no gradient). Weight-gradient rows
    (w1, w_up, b1, b_up) and columns (w2) of unused blocks are zero and never computed.
    needs (x, w1, b1, w_up, b_up, w2, b2): which gradients to compute (ctx.needs_input_grad).
    """
    E = num_blocks
    gated = w_up is not None
    present = (True, True, b1 is not None, gated, b_up is not None, True, b2 is not None)
    needs = tuple(bool(n) and p for n, p in zip(needs, present))
    dy2d = dy2d.contiguous()
    if block_ids.shape[1] != E:
        return _backward_sparse(dy2d, x2d, w1, w_up, w2, block_perm, block_ids, h_pre,
                                h_up if gated else None, activation, E, needs)
    # exact mode, block-grouped layout: dense backward in block order, then back to the user's order
    w1p, wup = _permuted_rows(w1, block_perm), _permuted_rows(w_up, block_perm)
    w2p = w2.index_select(1, block_perm)                                       # [d_out, H] block order
    pre = _grouped_to_tok(h_pre, E)                                            # [T, H] block order
    up = _grouped_to_tok(h_up, E) if gated else None
    dx, dw1p, db1p, dwupp, dbupp, dw2p, db2 = dense_ffn_backward(dy2d, x2d, w1p, wup, w2p, pre, up,
                                                                 activation, needs)

    # index_copy puts block-order row j at block_perm[j]
    def unperm(t, dim=0):
        return None if t is None else torch.empty_like(t).index_copy_(dim, block_perm, t)

    return dx, unperm(dw1p), unperm(db1p), unperm(dwupp), unperm(dbupp), unperm(dw2p, 1), db2


def _backward_sparse(dy2d, x2d, w1, w_up, w2, block_perm, block_ids, h_pre, h_up, activation, E, needs):
    """Per-block backward over the grouped pairs, written straight into the user's neuron order (each used
    block's gradient rows land at its neurons with index_copy_); unused blocks' rows are zero."""
    T, d = x2d.shape
    H, d_out = w1.shape[0], w2.shape[0]
    gated = h_up is not None
    n_x, n_w1, n_b1, n_wup, n_bup, n_w2, n_b2 = needs
    n_pre = n_x or n_w1 or n_b1 or n_wup or n_bup
    blocks = _Blocks(block_ids, block_perm, E)
    act = activation_forward(h_pre, activation) if (n_w2 or gated) else None  # [T*k, Hb]
    hidden = (act * h_up if gated else act) if n_w2 else None

    def zeros_for_unused(shape, dim=0):
        t = x2d.new_empty(shape)
        if blocks.unused_neurons is not None:
            t.index_fill_(dim, blocks.unused_neurons, 0)
        return t

    dw2 = zeros_for_unused((d_out, H), dim=1) if n_w2 else None
    dhidden = x2d.new_empty(h_pre.shape) if n_pre else None                   # [T*k, Hb] grouped
    for nrn, lo, hi, tok in blocks.used:
        dye = dy2d.index_select(0, tok)                                        # [n_e, d_out]
        w2e = _w_rows(w2, nrn, 1)                                              # [d_out, Hb]
        if n_w2:
            dw2.index_copy_(1, nrn, dye.t().mm(hidden[lo:hi]))                 # [d_out, Hb]
        if n_pre:
            torch.mm(dye, w2e, out=dhidden[lo:hi])                             # [n_e, Hb]
    del hidden
    db2 = dy2d.sum(0) if n_b2 else None
    if not n_pre:
        return None, None, None, None, None, dw2, db2

    dpre = activation_backward(dhidden * h_up if gated else dhidden, h_pre, activation)  # [T*k, Hb]
    dup = dhidden * act if gated else None
    del dhidden, act
    dw1 = zeros_for_unused((H, d)) if n_w1 else None
    dwup = zeros_for_unused((H, d)) if n_wup else None
    db1 = zeros_for_unused((H,)) if n_b1 else None
    dbup = zeros_for_unused((H,)) if n_bup else None
    acc = _acc_dtype(x2d.dtype)
    dx = x2d.new_zeros(T, d, dtype=acc) if n_x else None
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
    return (dx.to(x2d.dtype) if n_x else None), dw1, db1, dwup, dbup, dw2, db2
