"""Hypothesis: over random transformer configs, backend="spt" in exact mode (densities 1.0) equals eager —
output and every parameter gradient — within the dtype's tolerance (tests/helpers.py explains the numbers);
and at op level, exact-mode pq_sparse_attention equals eager attention for every gradient incl. a trainable
mask's, with fully masked rows."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import compare_with_eager
from tests.toy_transformer import ToyConfig, ToyTransformer


@st.composite
def configs(draw):
    head_dim = draw(st.sampled_from([8, 16]))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    attention = draw(st.sampled_from(["sdpa", "eager_div", "eager_mul_after_mask", "eager_prescaled",
                                      "eager_where", "eager_masked_fill"]))
    masks = ["causal", "padding"] + (["none"] if attention not in ("eager_where", "eager_masked_fill") else []) \
        + (["bool_padding"] if attention == "sdpa" else [])
    ffn_kind = draw(st.sampled_from(["plain", "gated", "conv1d"]))
    cfg = ToyConfig(hidden=heads * head_dim, heads=heads, kv_heads=kv_heads,
                    ffn_hidden=16 * draw(st.integers(1, 4)), ffn_kind=ffn_kind,
                    activation=draw(st.sampled_from(["relu", "gelu", "gelu_tanh", "silu", "swish", "new_gelu"])),
                    attention=attention, mask=draw(st.sampled_from(masks)),
                    softmax_fp32=draw(st.booleans()), layers=draw(st.integers(1, 2)))
    return cfg, draw(st.integers(4, 24)), draw(st.sampled_from([torch.float32, torch.bfloat16]))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(configs(), st.integers(0, 2**16))
def test_exact_mode_equals_eager(case, seed):
    cfg, n, dtype = case
    torch.manual_seed(seed)
    model = ToyTransformer(cfg).to(dtype).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, cfg.hidden, generator=g).to(dtype)
    # a finite finfo.min padding bias (not -inf / bool, where eager gives NaN rows) may pad a whole sequence:
    # eager then attends uniformly over the padding and exact mode must match it, forward and gradients
    finite_pad = cfg.mask == "padding" and cfg.attention != "eager_masked_fill"
    lengths = torch.tensor([n, int(torch.randint(0 if finite_pad else 1, n + 1, (), generator=g))])
    report = compare_with_eager(model, (x, lengths))
    assert len(report.rewritten("attention")) == cfg.layers, str(report)
    assert len(report.rewritten("ffn")) == cfg.layers, str(report)


# ------------------------------------------------------------------------------------------------------------
# op level: exact-mode pq_sparse_attention == eager attention, forward and every gradient (q, k, v and a
# trainable additive mask), with fully masked rows (docs/OPS.md: a finfo.min row attends uniformly as in eager;
# a row with no allowed key gives zeros and no gradient, where eager gives NaN)
# ------------------------------------------------------------------------------------------------------------

import math  # noqa: E402

from spt_compile.lowering.attention import pq_sparse_attention  # noqa: E402

BIAS_SHAPES = ("full", "heads", "alibi", "keys", "shared")


def _eager_attention(q, k, v, mask, is_causal, scale, rowkeep):
    grp = q.shape[1] // k.shape[1]
    s = scale * q @ k.repeat_interleave(grp, 1).transpose(-1, -2)
    if mask is not None:
        s = s + mask if mask.dtype != torch.bool else s.masked_fill(~mask, -math.inf)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    return (s.softmax(-1) @ v.repeat_interleave(grp, 1)) * rowkeep


@st.composite
def attention_cases(draw):
    hkv, grp = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    b, nq, nk = draw(st.integers(1, 2)), draw(st.integers(1, 12)), draw(st.integers(1, 14))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    kind = draw(st.sampled_from(["none", "causal", "bool", "pad_inf", "pad_finfo_min", "bias", "bias_causal"]))
    shape = draw(st.sampled_from(BIAS_SHAPES))
    full_row = draw(st.booleans())  # make one row (or broadcast slice) fully masked
    return b, hkv, grp, nq, nk, draw(st.sampled_from([8, 16])), dtype, kind, shape, full_row


def _build_mask(kind, shape, full_row, b, h, nq, nk, dtype, g):
    """(mask, is_causal, trainable): the mask in the op's convention (bool True = attend, or additive)."""
    if kind in ("none", "causal"):
        return None, kind == "causal", False
    fmin = torch.finfo(dtype).min
    if kind == "bool":
        m = torch.rand(b, 1, nq, nk, generator=g) < 0.6
        m[..., 0] = True
        if full_row:
            m[0, :, nq // 2] = False
        return m, False, False
    if kind.startswith("pad"):
        lens = torch.randint(1, nk + 1, (b,), generator=g)
        if full_row:
            lens[0] = 0  # a fully padded sequence: every row of batch 0 is fully masked
        m = torch.zeros(b, 1, 1, nk, dtype=dtype)
        m[(torch.arange(nk)[None, :] >= lens[:, None])[:, None, None, :]] = -math.inf if kind == "pad_inf" else fmin
        return m, False, False
    sizes = {"full": (b, h, nq, nk), "heads": (1, h, nq, nk), "alibi": (1, h, 1, nk), "keys": (b, 1, 1, nk),
             "shared": (1, 1, nq, nk)}[shape]
    m = torch.randn(sizes, generator=g, dtype=torch.float64).to(dtype)
    if full_row:
        m[0, 0, sizes[2] // 2] = fmin  # a learned bias can push a whole row to finfo.min, still trainable
    return m, kind == "bias_causal", True


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases(), st.integers(0, 2**16))
def test_op_exact_mode_equals_eager_with_fully_masked_rows(case, seed):
    b, hkv, grp, nq, nk, d, dtype, kind, shape, full_row = case
    h = hkv * grp
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in
               ((b, h, nq, d), (b, hkv, nk, d), (b, hkv, nk, d)))
    dout = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    mask, causal, trainable = _build_mask(kind, shape, full_row, b, h, nq, nk, dtype, g)
    # rows with no allowed key follow the op's zero-row convention: eager sees every key there, output x 0
    allowed = torch.ones(b, h, nq, nk, dtype=torch.bool)
    if mask is not None:
        allowed &= mask if mask.dtype == torch.bool else torch.isfinite(mask)
    if causal:
        allowed &= torch.ones(nq, nk, dtype=torch.bool).tril()
    rowkeep = allowed.any(-1, keepdim=True)
    emask = mask
    if mask is not None and not bool(rowkeep.all()):
        emask = mask.expand(b, h, nq, nk).clone()
        emask.masked_fill_(~rowkeep, True if mask.dtype == torch.bool else 0.0)
    scale = 1.0 / math.sqrt(d)

    def run(fn, dt, m):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        if trainable:
            leaves.append(m.to(dt if dt == torch.float64 else m.dtype).detach().requires_grad_())
        mm = leaves[3] if trainable else (None if m is None else m if m.dtype == torch.bool or dt != torch.float64
                                          else m.double())
        out = fn(*leaves[:3], mm)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, dout.to(dt)))

    def op(qq, kk, vv, mm):
        return pq_sparse_attention(qq, kk, vv, mask=mm, is_causal=causal, scale=scale, density=1.0)

    def ref(qq, kk, vv, mm):
        if mm is not None and emask is not mask:  # same values as the op's mask except at empty rows
            fix = emask if emask.dtype == torch.bool else emask.to(mm.dtype)
            mm = torch.where(rowkeep, mm, fix) if mm.dtype != torch.bool else fix
        return _eager_attention(qq, kk, vv, mm, causal, scale, rowkeep)

    mine, base, truth = run(op, dtype, mask), run(ref, dtype, mask), run(ref, torch.float64, mask)
    names = ["out", "dq", "dk", "dv", "dmask"]
    for name, a, s_, t in zip(names, mine, base, truth):
        assert torch.isfinite(a).all(), name
        assert a.dtype == s_.dtype and a.shape == s_.shape, name
        err = (a.double() - t).abs().max().item() if a.numel() else 0.0
        if dtype == torch.float64:
            assert err <= 1e-10 * max(1.0, t.abs().max().item()), (name, err)
            continue
        base_err = (s_.double() - t).abs().max().item() if a.numel() else 0.0
        floor = 8 * torch.finfo(dtype).eps * max(1.0, t.abs().max().item())
        assert err <= 2 * base_err + floor, (name, err, base_err)
