"""Triton kernels (GPU; also run on the CPU under TRITON_INTERPRET=1 in the tests).

One module per op, named like the op: ``lipfast/kernels/<op>.py``. Imported lazily
by the ops in :mod:`lipfast.ops`, so lipfast works without Triton on CPU.
"""

from __future__ import annotations


import importlib
import warnings

_warned: set[str] = set()


def load(name: str, op: str, dtype=None):
    """``lipfast.kernels.<name>`` for a CUDA input, or None where the PyTorch path
    serves instead: float64 inputs, and any input when Triton is not installed
    (then with one warning per op)."""
    import torch

    if dtype == torch.float64:
        return None
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as err:
        if op not in _warned:
            _warned.add(op)
            warnings.warn(f"{op}: Triton is not available ({err}); using the slower PyTorch "
                          "path on the GPU", stacklevel=3)
        return None
