import pytest

import spt_compile
from tests.inspect.tiny_models import OPTIONS, factory


@pytest.fixture
def tiny_report():
    """The explain report of a 2-block tiny model (2 eager attentions + 2 GELU FFNs, all rewritten)."""
    model, args = factory()
    return spt_compile.explain(model, *args, options=OPTIONS)
