"""spt-compile: a torch.compile backend that rewrites attention into PQ-sparse attention and FFNs into routed FFNs.

    model = torch.compile(model, backend="spt", options={"attention_density": 0.25, "ffn_density": 0.5})
    print(spt_compile.explain(model_eager, input_ids))
"""
from spt_compile.explain import explain
from spt_compile.options import OPTION_DOCS, SptOptions
from spt_compile.report import Report, SiteRecord, last_report, last_reports

__version__ = "0.1.0"
__all__ = ["explain", "SptOptions", "OPTION_DOCS", "Report", "SiteRecord", "last_report", "last_reports", "__version__"]
