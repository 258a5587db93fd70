"""@pytest.mark.gpu: the query-tile attention kernels (kernels/attention_tiled_*.py: tile selection, forward,
backward) against their plain-PyTorch reference (lowering/reference/tiled_attention.py) and an fp64 truth on CUDA,
in fp32 / bf16 / fp16. Skipped without CUDA (reason given); SPT_GPU_TESTS_ON_CPU=1 runs it on CPU (_gpu.py).
The stage tests of these kernels under the interpreter are test_attention_tiled_kernels.py (their owner's); the
op-level tests at the end run torch.ops.spt.pq_sparse_attention (query_tile > 0) itself on the device, as
test_op_kernel_path_attention_tiled.py does under the interpreter."""
import pytest
import torch

from spt_compile.lowering.formulas import attention_num_tiles, attention_tile_slots
from spt_compile.lowering.reference import pq_attention as ref
from spt_compile.lowering.reference import tiled_attention as ta
from tests.kernels._attention_truth import (FLOOR, ULP, allowed_dense, check_vs_truth, dense_grads, make_problem,
                                            max_err)
from tests.kernels._gpu import DEVICE, GPU, MODE, kernel_path, size  # noqa: F401  (kernel_path is a fixture)

pytestmark = GPU
TILE = 16


def dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def tile_keep(idx, nq, nk):
    """[B, H, Nq, Nk] bool: key j listed for query i's tile."""
    b, h, nt, _ = idx.shape
    ii = idx.long()
    keep = torch.zeros(b, h, nt, nk + 1, dtype=torch.bool)
    keep.scatter_(-1, torch.where(ii >= 0, ii, nk), True)
    return keep[..., :nk].repeat_interleave(TILE, 2)[:, :, :nq]


CASES = [(torch.bfloat16, "causal"), (torch.float32, "pad_finfo"), (torch.float16, "bool"),
         (torch.bfloat16, "bias")]


@pytest.mark.parametrize("dtype,kind", CASES, ids=[f"{str(d)[6:]}-{k}" for d, k in CASES])
def test_tiled_forward_backward_vs_reference_and_fp64(dtype, kind, kernel_path):
    from spt_compile.kernels.attention_tiled_bwd import tiled_attention_backward
    from spt_compile.kernels.attention_tiled_fwd import tiled_attention_forward
    B, H, Hkv, N, D = 1, 4, 2, size(256, 40), 64
    q, k, v, mask, causal, dout = make_problem(B, H, Hkv, N, N, D, D, dtype, kind, seed=11)
    L = attention_tile_slots(N, N, 1.0, 1, causal)
    idx = ta.tile_allowed_indices(mask, causal, (B, H, N, N), TILE, L, q.device)  # exact lists per tile
    scale = D ** -0.5
    out, lse = tiled_attention_forward(*dev(q, k, v, idx, mask), causal, scale, TILE, 0.0, None)
    grads = tiled_attention_backward(*dev(dout, q, k, v, out, lse, idx, mask), causal, scale, TILE, 0.0, None)[:3]
    rout, rlse = ta.tiled_attention_forward(q, k, v, idx, mask, causal, scale, TILE, 0.0, None)
    rgrads = ta.tiled_attention_backward(dout, q, k, v, rout, rlse, idx, mask, causal, scale, TILE, 0.0, None)[:3]
    keep = tile_keep(idx, N, N) & allowed_dense(None if mask is None else mask, causal, (B, H, N, N))
    m64 = None if mask is None else mask.double()
    truth = dense_grads(q.double(), k.double(), v.double(), keep, m64, scale, dout.double())
    same = dense_grads(q, k, v, keep, mask, scale, dout)
    for name, g, r, s_, t in zip(("out", "dq", "dk", "dv"), (out, *grads), (rout, *rgrads), same, truth):
        g = g.cpu()
        assert g.dtype == dtype and g.shape == t.shape, name
        check_vs_truth(name, g, s_, t, dtype)
        top = t.abs().max().item()
        assert max_err(g, r) <= 8 * ULP[dtype] * top + FLOOR[dtype], f"{name} vs reference"


@pytest.mark.parametrize("stride,group", [(1, 1), (4, 1), (4, 2)], ids=["stride1", "stride4", "stride4-shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiled_select_vs_reference(dtype, stride, group, kernel_path):
    from spt_compile.kernels.attention_tiled_select import select_tiles
    B, H, Hkv, N, D = 1, 4, 2, size(512, 48), 64
    q, k, _, mask, causal, _ = make_problem(B, H, Hkv, N, N, D, D, dtype, "causal", seed=12)
    cb, codes = ref.pq_quantize(k, 8, 16, 2)
    density, min_keys = 0.25, 4
    L = attention_tile_slots(N, N, density, min_keys, causal)
    idx = select_tiles(*dev(q, cb, codes, mask), causal, D ** -0.5, TILE, density, min_keys, L, stride=stride,
                       group=group).cpu()
    ridx = ta.select_tiles(q, cb, codes, mask, causal, D ** -0.5, TILE, density, min_keys, L, stride=stride,
                           group=group)
    assert idx.shape == ridx.shape == (B, H, attention_num_tiles(N, TILE), L) and idx.dtype == torch.int32
    assert torch.equal((idx >= 0).sum(-1), (ridx >= 0).sum(-1))      # the same number of keys per tile
    keep = tile_keep(idx, N, N)
    assert torch.equal(keep.sum(-1), tile_keep(ridx, N, N).sum(-1))  # distinct keys
    # PQ mass ties (and tf32 dots on the GPU) may swap boundary keys: most kept keys agree
    agree = (keep & tile_keep(ridx, N, N)).sum().item() / max(1, keep.sum().item())
    assert agree > 0.9, agree


# ------------------------------------------------------------------------------------------------------------
# the dispatched op (torch.ops.spt.pq_sparse_attention with query_tile > 0) on DEVICE: the op -> launcher wiring
# of lowering/attention.py on CUDA, checked like test_op_kernel_path_attention_tiled.py does under the interpreter
# ------------------------------------------------------------------------------------------------------------

OP_CASES = [(torch.bfloat16, "causal", 0.25), (torch.float32, "pad_finfo_min", 0.25), (torch.bfloat16, "bias", 1.0)]


def _op_problem(dtype, kind, seed):
    from tests.kernels.test_op_kernel_path_attention_tiled import make
    B, H, Hkv, N, D = 1, 4, 2, size(1024, 40), 64
    return make(B, H, Hkv, N, N, D, D, dtype, kind, seed=seed, full_row=kind != "bias")


@pytest.mark.parametrize("dtype,kind,density", OP_CASES, ids=[f"{str(d)[6:]}-{k}-{p}" for d, k, p in OP_CASES])
def test_op_tile_kernel_path_vs_plain_and_fp64(dtype, kind, density, kernel_path, monkeypatch):
    from spt_compile.kernels import attention_tiled_bwd as kbwd
    from spt_compile.kernels import attention_tiled_fwd as kfwd
    from tests.kernels.test_op_kernel_path_attention_tiled import check, run_op
    calls = {"fwd": 0, "bwd": 0, "plain": 0}

    def count(mod, name, key):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, **kw: (calls.__setitem__(key, calls[key] + 1), orig(*a, **kw))[1])
    count(kfwd, "tiled_attention_forward", "fwd")
    count(kbwd, "tiled_attention_backward", "bwd")
    from spt_compile.lowering import attention_tiled_cpu
    count(ta, "tiled_attention_forward", "plain")
    count(attention_tiled_cpu, "tiled_attention_forward", "plain")
    tile = size(64, 16)
    q, k, v, mask, causal, dout = _op_problem(dtype, kind, seed=21)
    res = run_op(*dev(q, k, v, mask), causal, dev(dout)[0], density, MODE, tile)
    assert calls == {"fwd": 1, "bwd": 1, "plain": 0}  # the tile kernels ran, no silent fallback
    res = tuple(t.cpu() for t in res)
    nq, nk = q.shape[2], k.shape[2]
    assert res[1].shape == (1, 4, attention_num_tiles(nq, tile), attention_tile_slots(nq, nk, density, 4, causal))
    if density == 1.0:  # exact: every allowed key of the tile
        idx = ta.tile_allowed_indices(mask, causal, (1, 4, nq, nk), tile, res[1].shape[3], torch.device("cpu"))
        assert torch.equal(res[1], idx)
    check(res, q, k, v, mask, causal, dout, tile, dtype)


def test_op_tile_head_dim_over_the_limit_runs_the_plain_path_on_device(kernel_path, monkeypatch):
    from spt_compile.kernels import attention_tiled_fwd as kfwd
    from spt_compile.kernels._tiled_common import MAX_HEAD_DIM
    from tests.kernels.test_op_kernel_path_attention_tiled import make, run_op
    monkeypatch.setattr(kfwd, "tiled_attention_forward", lambda *a, **kw: pytest.fail("kernel called past its limit"))
    q, k, v, mask, causal, dout = make(1, 2, 1, 24, 24, 2 * MAX_HEAD_DIM, 16, torch.bfloat16, "causal", seed=2)
    res = run_op(*dev(q, k, v, mask), causal, dev(dout)[0], 0.5, MODE, 8, min_keys=2)
    plain = run_op(q, k, v, mask, causal, dout, 0.5, "reference", 8, min_keys=2)
    assert torch.equal((res[1].cpu() >= 0).sum(-1), (plain[1] >= 0).sum(-1))
    assert res[0].device.type == kernel_path and res[0].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_op_tile_trainable_mask_gradient_on_device(dtype, kernel_path):
    """mask_grad on the device's kernel path: dmask from the tile backward's dS kernel vs fp64."""
    from tests.kernels.test_op_kernel_path_attention_tiled import check, mask_grad_truth, run_op
    from tests.kernels._tiled_truth import tile_kept
    q, k, v, mask, causal, dout = _op_problem(dtype, "bias", seed=23)
    tile = size(64, 16)
    res = run_op(*dev(q, k, v, mask), causal, dev(dout)[0], 0.25, MODE, tile, mask_grad=True)
    res = tuple(t.cpu() for t in res)
    check(res[:6], q, k, v, mask, causal, dout, tile, dtype)
    b, h, nq, nk = 1, 4, q.shape[2], k.shape[2]
    keep = tile_kept(res[1], tile, nq, nk) & allowed_dense(mask, causal, (b, h, nq, nk))
    want = mask_grad_truth(q, k, v, mask, keep, dout)
    got = torch.where(torch.isfinite(mask), res[6].double(), 0.0)
    assert res[6].shape == mask.shape and res[6].dtype == dtype
    assert max_err(got, want) <= 8 * ULP[dtype] * want.abs().max().item() + 4 * FLOOR[dtype]
