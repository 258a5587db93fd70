"""Plain-PyTorch reference for the routed FFN stages of docs/OPS.md.

Semantics: the H hidden neurons form E = num_blocks blocks of Hb = H // E neurons; block e is the neurons
block_perm[e*Hb:(e+1)*Hb]. Token t keeps the blocks block_ids[t, :] and
    y[t] = sum over kept e of w2[:, blk_e] @ hidden_blk_e(x[t]) + b2,
    hidden = act(w1 x + b1)                       (ungated)
    hidden = act(w1 x + b1) * (w_up x + b_up)     (gated; w1 is the gate projection).
Unused blocks are really skipped: the work is one loop over the E blocks (index_select + matmul per block),
never over tokens. h_pre / h_up come back in *block-grouped order*: the rows of the (token, slot) pairs
p = t*k + s, stably sorted by block id (pair_order from `routing_prologue`).

Speed matters here because this is the CPU path of the op:
  * weights are permuted once per call (w1[block_perm] etc.: O(H*d) copies, negligible next to the GEMMs)
    so that each block's weights are contiguous slices;
  * exact mode (k == E) never gathers: every block owns every token, in token order, so it runs the dense
    FFN's single GEMMs (block order) and h_pre is a [T, E, Hb] -> [E, T, Hb] transpose of the dense pre-activation;
  * sparse mode gathers each block's tokens once, writes GEMM results into preallocated grouped buffers
    (`out=`), applies the activation once over all pairs, and scatters back with one index_add_.
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


def _permuted(w1, b1, w_up, b_up, w2, block_perm):
    """Weights with hidden neurons in block order: block e's rows are the slice [e*Hb, (e+1)*Hb)."""
    w1p = w1.index_select(0, block_perm)                                       # [H, d]
    b1p = b1.index_select(0, block_perm) if b1 is not None else None           # [H]
    wup = w_up.index_select(0, block_perm) if w_up is not None else None       # [H, d]
    bup = b_up.index_select(0, block_perm) if b_up is not None else None       # [H]
    # w2 columns: index_select keeps [d_out, H] row-major, so a block's columns are a strided view whose
    # transpose BLAS reads directly (no copy per block).
    w2p = w2.index_select(1, block_perm)                                       # [d_out, H]
    return w1p, b1p, wup, bup, w2p


def _hidden(h_pre: torch.Tensor, h_up: torch.Tensor | None, activation: str) -> torch.Tensor:
    a = activation_forward(h_pre, activation)
    return a * h_up if h_up is not None else a


def _linear_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out = x @ w.T (+ b), written in place (out is a contiguous slice of a grouped buffer)."""
    if b is not None:
        torch.addmm(b, x, w.t(), out=out)
    else:
        torch.mm(x, w.t(), out=out)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tok_to_grouped(t: torch.Tensor, E: int) -> torch.Tensor:
    """[T, H] token-major (block order) -> [E*T, Hb] block-grouped (exact mode: block e's pairs are all T tokens)."""
    T, H = t.shape
    return t.view(T, E, H // E).transpose(0, 1).reshape(E * T, H // E)


def _grouped_to_tok(g: torch.Tensor, E: int) -> torch.Tensor:
    """Inverse of _tok_to_grouped: [E*T, Hb] -> [T, H]."""
    Hb = g.shape[1]
    return g.view(E, -1, Hb).transpose(0, 1).reshape(-1, E * Hb)


def _block_slices(offsets: torch.Tensor):
    off = offsets.tolist()  # host copy of E+1 ints: fine on the CPU path this reference serves
    return [(e, off[e], off[e + 1]) for e in range(len(off) - 1) if off[e + 1] > off[e]]


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
    w1p, b1p, wup, bup, w2p = _permuted(w1, b1, w_up, b_up, w2, block_perm)

    if k == E:
        # Exact mode: every block owns every token in token order, so this is the dense FFN (same GEMMs,
        # fp32 accumulation inside each) and the grouped layout is just a [T, E, Hb] -> [E, T, Hb] transpose.
        pre = torch.nn.functional.linear(x2d, w1p, b1p)                       # [T, H] block order
        up = torch.nn.functional.linear(x2d, wup, bup) if gated else None     # [T, H]
        hidden = _hidden(pre, up, activation)                                  # [T, H]
        y = torch.nn.functional.linear(hidden, w2p, b2)                        # [T, d_out]
        h_pre = _tok_to_grouped(pre, E)
        h_up = _tok_to_grouped(up, E) if gated else x2d.new_empty(0)
        return y, h_pre, h_up

    h_pre = x2d.new_empty(T * k, Hb)                                           # [T*k, Hb] grouped
    h_up = x2d.new_empty(T * k, Hb) if gated else x2d.new_empty(0)
    pair_order, offsets = routing_prologue(block_ids, E)
    tokens = pair_order.long() // k                                            # [T*k] token of each grouped pair
    blocks = _block_slices(offsets)
    x_blk = {}
    for e, lo, hi in blocks:
        rows = slice(e * Hb, (e + 1) * Hb)
        xe = x2d.index_select(0, tokens[lo:hi])                                # [n_e, d]
        x_blk[e] = xe
        _linear_into(h_pre[lo:hi], xe, w1p[rows], None if b1p is None else b1p[rows])
        if gated:
            _linear_into(h_up[lo:hi], xe, wup[rows], None if bup is None else bup[rows])
    hidden = _hidden(h_pre, h_up if gated else None, activation)              # [T*k, Hb]
    out_pairs = x2d.new_empty(T * k, d_out)                                    # [T*k, d_out] grouped
    for e, lo, hi in blocks:
        torch.mm(hidden[lo:hi], w2p[:, e * Hb:(e + 1) * Hb].t(), out=out_pairs[lo:hi])
    # accumulate the k contributions per token in fp32 for half types (as the GEMMs do internally)
    acc = _acc_dtype(x2d.dtype)
    y = torch.zeros(T, d_out, dtype=acc) if b2 is None else b2.to(acc).expand(T, d_out).contiguous()
    y.index_add_(0, tokens, out_pairs.to(acc))
    return y.to(x2d.dtype), h_pre, h_up


def routed_ffn_backward(dy2d, x2d, w1, b1, w_up, b_up, w2, b2, block_perm, block_ids, h_pre, h_up,
                        activation: str, num_blocks: int):
    """-> (dx, dw1, db1, dw_up, db_up, dw2, db2), None where the input is absent.

    Exact gradients of the routed expression (the selection carries no gradient). Weight-gradient rows
    (w1, w_up, b1, b_up) and columns (w2) of unused blocks are zero and never computed.
    """
    T, d = x2d.shape
    H = w1.shape[0]
    E = num_blocks
    Hb = H // E
    k = block_ids.shape[1]
    gated = w_up is not None
    dy2d = dy2d.contiguous()
    w1p, _, wup, _, w2p = _permuted(w1, None, w_up, None, w2, block_perm)
    if k == E:
        grads_p = _backward_exact(dy2d, x2d, w1p, wup, w2p, h_pre, h_up if gated else None, activation, E)
    else:
        grads_p = _backward_sparse(dy2d, x2d, w1p, wup, w2p, block_ids, h_pre, h_up if gated else None,
                                   activation, E)
    dw1p, db1p, dwupp, dbupp, dw2p, dx = grads_p

    # Back from block order to the user's neuron order: index_copy puts block-order row j at block_perm[j].
    def unperm(t, dim=0):
        return torch.empty_like(t).index_copy_(dim, block_perm, t)

    dw1 = unperm(dw1p)
    db1 = unperm(db1p) if b1 is not None else None
    dw_up = unperm(dwupp) if gated else None
    db_up = unperm(dbupp) if (gated and b_up is not None) else None
    dw2 = unperm(dw2p, 1)                                                      # [d_out, H]
    db2 = dy2d.sum(0) if b2 is not None else None
    return dx, dw1, db1, dw_up, db_up, dw2, db2


def _backward_exact(dy2d, x2d, w1p, wup, w2p, h_pre, h_up, activation, E):
    """Dense backward in block order (exact mode): single GEMMs, as autograd through the dense FFN does."""
    pre = _grouped_to_tok(h_pre, E)                                            # [T, H]
    up = _grouped_to_tok(h_up, E) if h_up is not None else None
    act = activation_forward(pre, activation)
    hidden = act * up if up is not None else act
    dw2p = dy2d.t() @ hidden                                                   # [d_out, H]
    del hidden
    dhidden = dy2d @ w2p                                                       # [T, H]
    dpre = activation_backward(dhidden * up if up is not None else dhidden, pre, activation)
    dup = dhidden * act if up is not None else None
    del dhidden, act, pre
    dw1p = dpre.t() @ x2d                                                      # [H, d]
    dx = dpre @ w1p                                                            # [T, d]
    dwupp = dbupp = None
    if dup is not None:
        dwupp = dup.t() @ x2d
        dx.addmm_(dup, wup)
        dbupp = dup.sum(0)
    return dw1p, dpre.sum(0), dwupp, dbupp, dw2p, dx


def _backward_sparse(dy2d, x2d, w1p, wup, w2p, block_ids, h_pre, h_up, activation, E):
    """Per-block backward over the grouped pairs; unused blocks' weight-grad rows stay zero, untouched."""
    T, d = x2d.shape
    H, d_out = w1p.shape[0], w2p.shape[0]
    Hb = H // E
    k = block_ids.shape[1]
    gated = h_up is not None
    pair_order, offsets = routing_prologue(block_ids, E)
    tokens = pair_order.long() // k                                            # [T*k]
    blocks = _block_slices(offsets)
    act = activation_forward(h_pre, activation)                                # [T*k, Hb]
    hidden = act * h_up if gated else act

    dw2pt = x2d.new_zeros(H, d_out)                                            # dw2 in block order, transposed
    dhidden = x2d.new_empty(T * k, Hb)                                         # [T*k, Hb] grouped
    for e, lo, hi in blocks:
        cols = slice(e * Hb, (e + 1) * Hb)
        dye = dy2d.index_select(0, tokens[lo:hi])                              # [n_e, d_out]
        torch.mm(hidden[lo:hi].t(), dye, out=dw2pt[cols])                      # [Hb, d_out]
        torch.mm(dye, w2p[:, cols], out=dhidden[lo:hi])                        # [n_e, Hb]
    del hidden
    dpre = activation_backward(dhidden * h_up if gated else dhidden, h_pre, activation)  # [T*k, Hb]
    dup = dhidden * act if gated else None
    del dhidden, act

    dw1p = x2d.new_zeros(H, d)
    dwupp = x2d.new_zeros(H, d) if gated else None
    db1p = x2d.new_zeros(H)
    dbupp = x2d.new_zeros(H) if gated else None
    dx_pairs = x2d.new_empty(T * k, d)                                         # [T*k, d] grouped
    for e, lo, hi in blocks:
        rows = slice(e * Hb, (e + 1) * Hb)
        xe = x2d.index_select(0, tokens[lo:hi])                                # [n_e, d]
        torch.mm(dpre[lo:hi].t(), xe, out=dw1p[rows])
        db1p[rows] = dpre[lo:hi].sum(0)
        torch.mm(dpre[lo:hi], w1p[rows], out=dx_pairs[lo:hi])
        if gated:
            torch.mm(dup[lo:hi].t(), xe, out=dwupp[rows])
            dbupp[rows] = dup[lo:hi].sum(0)
            dx_pairs[lo:hi].addmm_(dup[lo:hi], wup[rows])
    acc = _acc_dtype(x2d.dtype)
    dx = torch.zeros(T, d, dtype=acc).index_add_(0, tokens, dx_pairs.to(acc)).to(x2d.dtype)
    return dw1p, db1p, dwupp, dbupp, dw2pt.t(), dx
