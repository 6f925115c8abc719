"""Triton kernels (GPU; also run on the CPU under TRITON_INTERPRET=1 in the tests).

One module per op, named like the op: ``lipfast/kernels/<op>.py``. Imported lazily
by the ops in :mod:`lipfast.ops`, so lipfast works without Triton on CPU.
"""
