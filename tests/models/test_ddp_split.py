"""DDP's bucket splits cut FFNs between graphs: each cut FFN is still reported once (dense, near miss 'cut'),
under the user's module path, and the model's output and gradients are unchanged."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import spt_compile


class Block(nn.Module):
    def __init__(self, d=16, h=64):
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def test_ffns_cut_by_ddp_bucket_splits_are_reported(tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        # one parameter per bucket, so DDPOptimizer splits the graph between every pair of projections
        monkeypatch.setattr(torch.distributed, "_DEFAULT_FIRST_BUCKET_BYTES", 2000)
        torch.manual_seed(0)
        model = nn.Sequential(Block(), Block())
        ref = nn.Sequential(Block(), Block())
        ref.load_state_dict(model.state_dict())
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.004)
        spt_compile.report.clear_reports()
        compiled = torch.compile(ddp, backend="spt", options={"inner_backend": "aot_eager", "min_seq_len": 1})
        x = torch.randn(2, 4, 16)
        out = compiled(x)
        out.sum().backward()
        ref(x).sum().backward()
    finally:
        dist.destroy_process_group()
    assert len(spt_compile.last_reports()) > 1, "DDP did not split the graph"
    report = spt_compile.last_report()
    ffn = report.dense("ffn") + report.rewritten("ffn")
    assert sorted(s.module for s in ffn) == ["module.0", "module.1"], str(report)
    assert all(s.status == "dense" and s.near_miss == "cut" for s in ffn), str(report)
    torch.testing.assert_close(out.detach(), ref(x).detach(), rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
