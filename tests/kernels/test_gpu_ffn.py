"""@pytest.mark.gpu: the routed-FFN kernels (routing prologue, grouped GEMMs forward and backward) against the
plain-PyTorch reference and an fp64 ground truth on CUDA, in fp32 / bf16 / fp16, and opcheck of the op on CUDA.

Tested through torch.ops.spt.routed_ffn (its launchers' signatures belong to the FFN kernels' owner), against an
independent fp64 truth: the dense FFN with every hidden neuron outside the token's kept blocks masked to 0, for
the block_ids the op chose, differentiated by autograd. Skipped without CUDA (reason given); SPT_GPU_TESTS_ON_CPU=1
runs it on CPU through the interpreter (_gpu.py)."""
import pytest
import torch
import torch.nn.functional as F

import spt_compile.lowering  # noqa: F401  registers the ops
from spt_compile.lowering.neuron_blocks import compute_block_perm
from spt_compile.lowering.reference import routed_ffn as ref
from tests.kernels._gpu import DEVICE, GPU, kernel_path, size  # noqa: F401  (kernel_path is a fixture)

pytestmark = GPU
OP = torch.ops.spt.routed_ffn.default
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}
ULP = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}
ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "silu": F.silu}


def problem(T, d, H, gated, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)

    w = dict(x=rnd(T, d), w1=rnd(H, d, scale=d ** -0.5), b1=rnd(H, scale=0.1), w2=rnd(d, H, scale=H ** -0.5),
             b2=rnd(d, scale=0.1), w_up=rnd(H, d, scale=d ** -0.5) if gated else None,
             b_up=rnd(H, scale=0.1) if gated else None)
    return w, rnd(T, d)


NAMES = ("x", "w1", "b1", "w_up", "b_up", "w2", "b2")


def run(w, dy, perm, activation, E, top_k, router, needs=None):
    """(y, block_ids, grads by name) of the op on DEVICE; needs: names that require grad (default all)."""
    leaves = {n: (None if w[n] is None else
                  w[n].detach().to(DEVICE, copy=True).requires_grad_(needs is None or n in needs)) for n in NAMES}
    outs = OP(*(leaves[n] for n in NAMES), perm.to(DEVICE), activation, E, top_k, router, 8, 200, 7)
    y, block_ids = outs[0], outs[1]
    y.backward(dy.to(DEVICE))
    return y.detach().cpu(), block_ids.cpu(), {n: (t.grad.cpu() if t is not None and t.grad is not None else None)
                                               for n, t in leaves.items()}


def neuron_mask(block_ids, perm, E, H):
    """[T, H] 1.0 where neuron n belongs to one of token t's kept blocks."""
    Hb = H // E
    blocks = perm.view(E, Hb)                                   # neurons of each block
    m = torch.zeros(block_ids.shape[0], H, dtype=torch.float64)
    for s in range(block_ids.shape[1]):
        m.scatter_(1, blocks[block_ids[:, s].long()], 1.0)
    return m


def truth(w, dy, mask, activation, dtype):
    """(y, grads) of the masked dense FFN by autograd, in `dtype` (fp64: the ground truth)."""
    leaves = {n: (None if w[n] is None else w[n].detach().to(dtype, copy=True).requires_grad_()) for n in NAMES}
    h = ACT[activation](leaves["x"] @ leaves["w1"].T + leaves["b1"])
    if leaves["w_up"] is not None:
        h = h * (leaves["x"] @ leaves["w_up"].T + leaves["b_up"])
    y = (h * mask.to(dtype)) @ leaves["w2"].T + leaves["b2"]
    y.backward(dy.to(dtype))
    return y.detach(), {n: (t.grad if t is not None else None) for n, t in leaves.items()}


def check(name, got, same, gt, dtype):
    eg, es = (got.double() - gt).abs().max().item(), (same.double() - gt).abs().max().item()
    top = gt.abs().max().item()
    assert eg <= 2 * es + FLOOR[dtype] + 2 * top * ULP[dtype], f"{name}: kernels err {eg:.3g}, torch {es:.3g}"


CASES = [  # dtype, activation, gated, density, router
    (torch.bfloat16, "silu", True, 0.5, "lowrank"),
    (torch.bfloat16, "gelu_tanh", False, 0.25, "oracle"),
    (torch.float32, "gelu", False, 0.5, "oracle"),
    (torch.float32, "silu", True, 0.25, "lowrank"),
    (torch.float16, "relu", False, 0.5, "oracle"),
]


@pytest.mark.parametrize("dtype,activation,gated,density,router", CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}-{'gated' if c[2] else 'plain'}-{c[3]}" for c in CASES])
def test_routed_ffn_op_vs_reference_and_fp64(dtype, activation, gated, density, router, kernel_path):
    T, d, H, E = size(512, 24), size(256, 32), size(1024, 64), 16
    top_k = max(1, round(density * E))
    w, dy = problem(T, d, H, gated, dtype, seed=T)
    perm = compute_block_perm(w["w1"].float(), E, cluster=True)
    y, block_ids, grads = run(w, dy, perm, activation, E, top_k, router)
    assert block_ids.shape == (T, top_k) and block_ids.dtype == torch.int32
    assert bool((block_ids.sort(1).values.diff(1) > 0).all()), "a token kept a block twice"
    mask = neuron_mask(block_ids, perm, E, H)
    y64, g64 = truth(w, dy, mask, activation, torch.float64)
    ys, gs = truth(w, dy, mask, activation, dtype)
    check("y", y, ys, y64, dtype)
    for n in NAMES:
        if g64[n] is not None:
            assert grads[n] is not None and grads[n].dtype == dtype, n
            check(f"d{n}", grads[n], gs[n], g64[n], dtype)
    # the reference path given the same blocks: within a few output roundings of the kernels
    with torch.no_grad():
        ry, _, _, _ = ref.routed_ffn_forward(w["x"], w["w1"], w["b1"], w["w_up"], w["b_up"], w["w2"], w["b2"], perm,
                                             block_ids, activation, E)[:4]
    torch.testing.assert_close(y.double(), ry.double(), rtol=8 * ULP[dtype] + 1e-6,
                               atol=8 * ULP[dtype] * y64.abs().max().item() + FLOOR[dtype])


def test_frozen_weights_only_dx(kernel_path):
    """Frozen base weights (LoRA-style fine-tuning): only dx is asked for, and it is right."""
    T, d, H, E = size(256, 16), size(128, 32), size(512, 64), 8
    w, dy = problem(T, d, H, True, torch.bfloat16, seed=1)
    perm = compute_block_perm(w["w1"].float(), E, cluster=False)
    y, block_ids, grads = run(w, dy, perm, "silu", E, 4, "oracle", needs=("x",))
    assert all(grads[n] is None for n in NAMES if n != "x")
    mask = neuron_mask(block_ids, perm, E, H)
    _, g64 = truth(w, dy, mask, "silu", torch.float64)
    _, gs = truth(w, dy, mask, "silu", torch.bfloat16)
    check("dx", grads["x"], gs["x"], g64["x"], torch.bfloat16)


def test_routing_prologue_vs_reference(kernel_path):
    from spt_compile.kernels.routing import routing_prologue
    g = torch.Generator().manual_seed(2)
    for T, k, E in ((size(4096, 40), 4, 16), (size(1000, 7), 3, 5), (1, 1, 1)):
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
        order, offsets = routing_prologue(ids.to(DEVICE), E)
        rorder, roffsets = ref.routing_prologue(ids, E)
        assert torch.equal(order.cpu(), rorder) and torch.equal(offsets.cpu(), roffsets)


def test_opcheck_routed_ffn_on_device(kernel_path):
    T, d, H, E = 32, 32, 64, 8
    w, _ = problem(T, d, H, True, torch.float32, seed=3)
    perm = compute_block_perm(w["w1"], E, cluster=False).to(DEVICE)
    args = tuple(None if w[n] is None else w[n].to(DEVICE).requires_grad_() for n in NAMES)
    torch.library.opcheck(OP, args + (perm, "silu", E, 4, "oracle", 8, 200, 11))
