"""Bilinear tap tables (pure torch, no Triton), as ``F.interpolate`` computes
them: shared by the Triton kernels that read bilinearly resized logits
(:mod:`lipfast.kernels.upsample_ce`, :mod:`lipfast.kernels.confusion_matrix`)
and the PyTorch path of :mod:`lipfast.ops.upsample_ce`. The Triton side of the
tables (loading them in a kernel) is :mod:`lipfast.kernels._bilinear`."""

from __future__ import annotations

import torch


def bilinear_taps(n_out: int, n_in: int, align_corners: bool, dtype, device):
    """(i0, i1, lam) of the 1-D bilinear map n_in -> n_out as F.interpolate
    computes it: out[d] = (1 - lam[d]) * in[i0[d]] + lam[d] * in[i1[d]]."""
    d = torch.arange(n_out, dtype=torch.float64, device=device)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        src = d * scale
    else:
        scale = n_in / n_out
        src = ((d + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam = (src - i0).to(dtype)
    return i0, i1, lam
