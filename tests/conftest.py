import os

import pytest
import torch

# Tests must not depend on each other's compiled-code caches or on leftover Dynamo state.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
