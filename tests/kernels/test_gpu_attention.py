"""@pytest.mark.gpu: every attention kernel against its plain-PyTorch reference on CUDA, in fp32 / bf16 / fp16, and
torch.library.opcheck of both attention ops on CUDA. Skipped without CUDA (the reason says so); see _gpu.py for
the CPU dry run (SPT_GPU_TESTS_ON_CPU=1)."""
import pytest
import torch

from spt_compile.lowering.reference import pq_attention as ref
from tests.kernels._attention_truth import (FLOOR, OP, ULP, allowed_dense, check_all, kept_dense, make_problem,
                                            max_err, run_op)
from tests.kernels._gpu import CUDA, DEVICE, GPU, MODE, kernel_path, size  # noqa: F401  (a fixture)

pytestmark = GPU
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]


def to_dev(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_pq_quantize_vs_reference(dtype, kernel_path):
    from spt_compile.kernels import pq as kpq
    g = torch.Generator().manual_seed(0)
    B, Hkv, Nk, D, M, C = 2, 2, size(1000, 40), 64, 8, 16
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    cb, codes = kpq.pq_quantize(k.to(DEVICE), M, C, 3)
    rcb, rcodes = ref.pq_quantize(k, M, C, 3)
    assert cb.dtype == torch.float32 and codes.dtype == torch.int32 and codes.shape == rcodes.shape
    # same init and Lloyd steps: codes agree but for fp32 near-ties (distance sums in another order)
    agree = (codes.cpu() == rcodes).double().mean().item()
    assert agree > 0.99, agree
    if agree == 1.0:
        torch.testing.assert_close(cb.cpu(), rcb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("kind", ["causal", "bias", "bool"])
def test_select_topk_vs_reference(dtype, kind, kernel_path):
    from spt_compile.kernels import attention_topk as ktopk
    B, H, Hkv, Nq, Nk, D = 1, 4, 2, size(256, 12), size(512, 30), 64
    q, k, _, mask, causal, _ = make_problem(B, H, Hkv, Nq, Nk, D, D, dtype, kind, seed=1)
    L = ref.num_kept(Nk, 0.25)
    cb, codes = ref.pq_quantize(k, 8, 16, 2)
    scale = D ** -0.5
    idx = ktopk.select_topk(*to_dev(q, cb, codes, mask), causal, scale, L).cpu()
    ridx = ref.select_topk(q, cb, codes, mask, causal, scale, L)
    nvalid = (idx >= 0).sum(-1)
    assert torch.equal(nvalid, (ridx >= 0).sum(-1))
    assert bool((kept_dense(idx, Nk) <= allowed_dense(mask, causal, (B, H, Nq, Nk))).all())
    # PQ scores tie often: compare the selected scores (fp64) as multisets, not the indices; on the GPU the
    # kernel's fp32 dot runs as tf32, so its k-th score may differ from the reference's by tf32 rounding
    khat = ref.reconstruct_keys(cb, codes).double().repeat_interleave(H // Hkv, 1)
    s = (q.double() @ khat.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        s = s + torch.where(torch.isfinite(mask), mask, 0).double()
    s = s.masked_fill(~allowed_dense(mask, causal, (B, H, Nq, Nk)), float("-inf"))

    def picked(ix):
        v = s.gather(-1, ix.long().clamp_min(0)).masked_fill(ix < 0, float("-inf"))
        return v.sort(-1, descending=True).values

    a, b = picked(idx), picked(ridx)
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin)
    tol = 5e-3 * s[torch.isfinite(s)].abs().max().item() if CUDA else 1e-5
    assert max_err(a[fin], b[fin]) <= tol


# every mask kind in bf16 (the training dtype), each other dtype once in each mode: each case is a few Triton
# compiles on a cold cache, and the whole GPU check has 5 minutes
OP_CASES = [(torch.bfloat16, "causal", 0.25), (torch.bfloat16, "bias", 0.25), (torch.bfloat16, "pad_finfo", 1.0),
            (torch.float32, "causal", 1.0), (torch.float32, "bias", 0.25), (torch.float16, "pad_finfo", 0.25),
            (torch.float16, "bool", 1.0)]


@pytest.mark.parametrize("dtype,kind,density", OP_CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}-{c[2]}" for c in OP_CASES])
def test_op_forward_backward_vs_reference_and_fp64(dtype, kind, density, kernel_path):
    """Both stages (forward, backward in the default dK/dV mode) through the op, against fp64 and the reference
    stages given the same kept keys."""
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, size(256, 10), size(256, 20), 64
    q, k, v, mask, causal, dout = make_problem(B, H, Hkv, Nq, Nk, D, D, dtype, kind, seed=2)
    res = run_op(*to_dev(q, k, v, mask), causal, dout.to(DEVICE), density, MODE, m=8, c=16, iters=3)
    assert res[0].device.type == DEVICE
    idx = res[1].cpu()
    scale = D ** -0.5
    rout, rlse = ref.sparse_attention_forward(q, k, v, idx, mask, causal, scale, 0.0, None)
    rg = ref.sparse_attention_backward(dout, q, k, v, rout, rlse, idx, mask, causal, scale, 0.0, None)
    check_all(res, q, k, v, mask, causal, dout, dtype, ref_res=(rout, *rg))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_backward_dkv_modes_agree(dtype, kernel_path):
    from spt_compile.kernels import attention_bwd as kbwd
    from spt_compile.kernels import attention_fwd as kfwd
    B, H, Hkv, Nq, Nk, D = 1, 4, 2, size(256, 9), size(256, 17), 64
    q, k, v, mask, causal, dout = make_problem(B, H, Hkv, Nq, Nk, D, D, dtype, "causal", seed=3)
    q, k, v, dout = to_dev(q, k, v, dout)
    idx = ref.allowed_indices(None, True, (B, H, Nq, Nk), q.device)
    out, lse = kfwd.sparse_attention_forward(q, k, v, idx, None, True, D ** -0.5, 0.1, torch.tensor(4))
    a = kbwd.sparse_attention_backward(dout, q, k, v, out, lse, idx, None, True, D ** -0.5, 0.1, torch.tensor(4),
                                       dkv_mode="sorted")
    b = kbwd.sparse_attention_backward(dout, q, k, v, out, lse, idx, None, True, D ** -0.5, 0.1, torch.tensor(4),
                                       dkv_mode="atomic")
    for name, x, y in zip(("dq", "dk", "dv"), a, b):
        top = y.abs().max().item()
        assert max_err(x, y) <= 4 * ULP[dtype] * top + FLOOR[dtype], name


def test_dropout_kept_fraction_and_replay(kernel_path):
    B, H, N, D, p = 1, 4, size(512, 16), 64, 0.25
    q, k, v, _, _, dout = make_problem(B, H, H, N, N, D, D, torch.float32, "none", seed=5)
    r1 = run_op(*to_dev(q, k, v), None, False, dout.to(DEVICE), 1.0, MODE, dropout_p=p, seed=9)
    r2 = run_op(*to_dev(q, k, v), None, False, dout.to(DEVICE), 1.0, MODE, dropout_p=p, seed=9)
    for a, b in zip(r1, r2):
        assert torch.equal(a, b)
    # kept fraction, read back with v = identity: out[.., j] = P_ij z_ij
    eye = torch.eye(N).expand(B, H, N, N).to(DEVICE)
    qd, kd = to_dev(q, k)
    zd = OP(qd, kd, eye, None, False, D ** -0.5, 1.0, 8, 16, 3, p, torch.tensor(9))[0]
    plain = OP(qd, kd, eye, None, False, D ** -0.5, 1.0, 8, 16, 3, 0.0, None)[0]
    kept = (zd > 0.5 * plain).double().mean().item()
    n = B * H * N * N
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5, kept


@pytest.mark.parametrize("case", ["sparse_bias_dropout", "exact_gqa_bool"])
def test_opcheck_on_device(case, kernel_path):
    if case == "sparse_bias_dropout":
        q, k, v, mask, causal, _ = make_problem(1, 2, 1, 16, 32, 32, 32, torch.float32, "bias", seed=6)
        density, dp, seed = 0.25, 0.1, torch.tensor(3)
    else:
        q, k, v, mask, causal, _ = make_problem(1, 4, 2, 16, 16, 32, 32, torch.bfloat16, "bool", seed=7)
        density, dp, seed = 1.0, 0.0, None
    q, k, v, mask = to_dev(q, k, v, mask)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, causal, 0.2, density, 4, 8, 2, dp,
            seed)
    torch.library.opcheck(OP, args)
    out, idx, lse = OP(*args)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, idx, mask, causal, 0.2,
             dp, seed)
    torch.library.opcheck(torch.ops.spt.pq_sparse_attention_backward.default, bargs)
