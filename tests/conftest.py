import os
import warnings

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


@pytest.fixture
def no_process_group_warnings():
    """Silences InPlaceABNSync's one-time warning when it runs without a process group
    (it then acts as InPlaceABN), for tests that build whole models with it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*process group.*")
        warnings.filterwarnings("ignore", message=".*distributed.*")
        yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: the tiny models of the tool tests
    run faster so, and do not fight the other CI jobs for the two cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
