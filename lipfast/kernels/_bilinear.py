"""Triton helpers shared by the kernels that read bilinearly resized logits
(``upsample_ce``, ``confusion_matrix``).

The resize is described by per-row and per-column tap tables computed on the
host with ATen's align_corners arithmetic (:func:`lipfast.kernels._taps.bilinear_taps`,
pure torch, so that the PyTorch paths use it without Triton): output row ``y``
reads input rows ``RI0[y]`` and ``RI1[y]`` with weight ``RA[y]`` on the second;
output column ``x`` reads columns ``CJ0[x]`` and ``CJ1[x]`` with weight ``CB[x]``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_taps(RI0, RI1, RA, CJ0, CJ1, CB, y, x, mask, ACC: tl.constexpr):
    """(i0, i1, a, j0, j1, b) for output pixels (y, x): int64 indices and ``ACC``
    weights; masked-off lanes read index 0 and weight 0."""
    i0 = tl.load(RI0 + y, mask=mask, other=0).to(tl.int64)
    i1 = tl.load(RI1 + y, mask=mask, other=0).to(tl.int64)
    a = tl.load(RA + y, mask=mask, other=0.0).to(ACC)
    j0 = tl.load(CJ0 + x, mask=mask, other=0).to(tl.int64)
    j1 = tl.load(CJ1 + x, mask=mask, other=0).to(tl.int64)
    b = tl.load(CB + x, mask=mask, other=0.0).to(ACC)
    return i0, i1, a, j0, j1, b
