from spt_compile.lowering import ffn as _ffn  # noqa: F401  registers torch.ops.spt.routed_ffn
from spt_compile.lowering import attention as _attention  # registers torch.ops.spt.pq_sparse_attention
