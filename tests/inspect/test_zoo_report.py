"""Over the model zoo: the report names every site by a real module path of the user's model, each rewritten
site is found in the graph diff (so its picture, listing marks and savings exist), and the page renders."""
import pytest

import spt_compile
from spt_compile import zoo
from spt_compile.html_report import graph_groups, render, report_savings

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("bart", "t5") else n
                                  for n in zoo.names()])
def test_report_of_zoo_model(name):
    impl = "eager" if "eager" in zoo.attn_implementations(name) else zoo.attn_implementations(name)[0]
    zm = zoo.build(name, seq=16, attn_implementation=impl)
    report = spt_compile.explain(zm.model, **zm.inputs, options={"min_seq_len": 1})
    modules = dict(zm.model.named_modules())
    for s in report.sites:
        assert s.module in modules, f"{s.kind} site module {s.module!r} is not a module of the model\n{report}"
    for kind, n in zm.expected.items():
        assert len(report.rewritten(kind)) == n, str(report)
        # one site per module and kind (cross-attention and self-attention live in different modules)
        assert len({s.module for s in report.sites if s.kind == kind}) == n, str(report)
    assigned = {}
    for g in report.graphs:
        assigned.update(graph_groups(report, g)[1])
    rewritten = [i for i, s in enumerate(report.sites) if s.status == "rewritten"]
    assert sorted(assigned) == rewritten
    per_site, totals = report_savings(report)
    assert sorted(per_site) == rewritten
    flops = {t["quantity"]: t for t in totals}
    assert flops["FFN FLOPs (fwd+bwd)"]["spt"] < flops["FFN FLOPs (fwd+bwd)"]["dense"]
    if name in ("gpt2", "t5", "vit"):  # one per family is enough for the page (Graphviz runs take seconds)
        page = render(report)
        assert page.count("<svg") == 2 * len(report.graphs)
