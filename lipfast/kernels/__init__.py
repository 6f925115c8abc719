"""Triton kernels (GPU; also run on the CPU under TRITON_INTERPRET=1 in the tests).

One module per op, named like the op: ``lipfast/kernels/<op>.py``. Imported lazily
by the ops in :mod:`lipfast.ops`, so lipfast works without Triton on CPU.

Configurations (see :mod:`lipfast.kernels._tuning` for the details): every kernel
has a configuration space (block sizes, pass counts, ``num_warps``,
``num_stages``) searched by ``triton.autotune`` on a GPU, keyed on power-of-two
buckets of its sizes and on the dtypes, after dropping the configurations whose
estimated registers or shared memory exceed the device's limits. Kernel names:
``oc_attention.fwd``, ``oc_attention.bwd_dv``, ``oc_attention.bwd_dx``,
``upsample_ce.fwd``, ``upsample_ce.bwd``, ``lovasz``, ``edge``,
``confusion_matrix``, ``parse_postprocess``.

Reproducible runs pin configurations:

- ``LIPFAST_TRITON_AUTOTUNE=0``: every kernel uses its default configuration (the
  first of its space that fits the call and the device), no trials;
- ``LIPFAST_TRITON_CONFIG="oc_attention.fwd:BLOCK_M=64,BLOCK_N=32,num_warps=4;edge:BLOCK_H=16"``:
  the given keys for the named kernels (others keep the default's values);
- :func:`pin_config` (``pin_config("oc_attention.fwd", BLOCK_M=64, num_warps=4)``),
  which wins over the variable; :func:`unpin_config` removes pins.

``TRITON_PRINT_AUTOTUNING=1`` prints each configuration Triton's autotuner picks.
Under ``TRITON_INTERPRET=1`` (the CPU tests) no trials run: the default (or pinned)
configuration is used.
"""

from __future__ import annotations


import importlib
import warnings

_warned: set[str] = set()
_pins: dict[str, dict] = {}

KERNEL_NAMES = ("oc_attention.fwd", "oc_attention.bwd_dv", "oc_attention.bwd_dx",
                "upsample_ce.fwd", "upsample_ce.bwd", "lovasz", "edge", "confusion_matrix",
                "parse_postprocess")


def pin_config(kernel_name: str, **config) -> None:
    """Pins kernel ``kernel_name``'s configuration: the given meta-parameters
    (``BLOCK_M=64``, ..., ``num_warps=4``, ``num_stages=2``; integers) over its
    default, used from the next launch without autotuning. Unknown keys are an
    error at the next launch of that kernel (when its space is known)."""
    if kernel_name not in KERNEL_NAMES:
        raise ValueError(f"pin_config: unknown kernel {kernel_name!r}; kernels: "
                         f"{', '.join(KERNEL_NAMES)}")
    for k, v in config.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"pin_config: {k} must be an int, got {v!r}")
    _pins[kernel_name] = dict(config)


def unpin_config(kernel_name: str | None = None) -> None:
    """Removes the pin of ``kernel_name`` (all pins when None)."""
    if kernel_name is None:
        _pins.clear()
    else:
        _pins.pop(kernel_name, None)


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
