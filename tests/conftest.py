import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter;
# it must be switched on before the kernels are first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lipfast  # noqa: F401  (loads the extension once for every test)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
