"""OCNet's pyramid regions (pure Python, no Triton): the region table shared by
the Triton kernels of :mod:`lipfast.kernels.oc_attention` and the CPU / PyTorch
paths of :mod:`lipfast.ops.oc_attention` (re-exported as
``lipfast.ops.pyramid_regions``)."""

from __future__ import annotations


def pyramid_regions(h: int, w: int, s: int) -> list[tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) of OCNet's s x s pyramid regions in row-major
    order: step = h // s (w // s), the last row (column) of regions ends at h (w)."""
    if s <= 1:
        return [(0, h, 0, w)]
    sh, sw = h // s, w // s
    out = []
    for i in range(s):
        r0, r1 = i * sh, (h if i == s - 1 else (i + 1) * sh)
        for j in range(s):
            c0, c1 = j * sw, (w if j == s - 1 else (j + 1) * sw)
            out.append((r0, r1, c0, c1))
    return out
