from spt_compile.lowering import ffn as _ffn  # noqa: F401  registers torch.ops.spt.routed_ffn
