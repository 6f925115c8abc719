"""The op behind :func:`lipfast.losses.generate_edge`: ``lipfast::generate_edge``,
SCHP's edge labels (int64 0/1, four neighbour rules then a 3x3 box dilation;
the rules and the differences from SCHP are in :mod:`lipfast.losses.edge`).

Kernels (schema ``lipfast::generate_edge(Tensor labels, int edge_width)`` in
C++, ``csrc/ops/edge.cpp``):

- CPU: C++ (``csrc/ops/cpu/edge_kernel.cpp``), one pass over the labels in
  their own dtype read through their strides (no float copy, no contiguous
  copy), parallel over (image, output row) in chunks; each chunk keeps the
  horizontally dilated raw-edge rows y-1, y, y+1 in a ring of three W-byte
  buffers; the int64 output is written once.
- CUDA: the Triton kernel in :mod:`lipfast.kernels.edge` (one pass, labels read
  once per tile through strides), registered from here; without Triton the
  vectorised PyTorch path ``_edge_torch`` (slices, boolean ops, separable
  dilation by shifted ORs; also the reference the tests compare against).

No autograd (integer output); a fake kernel for ``torch.compile``.
"""

from __future__ import annotations

import torch

from .. import _ext

IGNORE = 255
_INT_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def check_generate_edge_args(labels: torch.Tensor, edge_width: int) -> None:
    """B x H x W integer labels (uint8/int16/int32/int64) and edge_width == 3."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError("generate_edge expects a tensor of labels")
    if labels.dim() != 3:
        raise ValueError(f"generate_edge expects B x H x W labels, got shape {tuple(labels.shape)}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"generate_edge expects integer labels (uint8/int16/int32/int64), got "
                        f"{labels.dtype}")
    if edge_width != 3:
        raise ValueError(f"generate_edge: only edge_width=3 (SCHP's 3x3 dilation) is supported, "
                         f"got {edge_width}")


def _edge_torch(labels: torch.Tensor) -> torch.Tensor:
    """Vectorised reference path: boolean ops on slices, separable 3x3 dilation."""
    L = labels
    v = L != IGNORE
    raw = torch.zeros(L.shape, dtype=torch.bool, device=L.device)
    # (y, x), y >= 1: differs from the pixel above
    raw[:, 1:, :] |= (L[:, 1:, :] != L[:, :-1, :]) & v[:, 1:, :] & v[:, :-1, :]
    # (y, x), x < W-1: differs from the pixel to the right
    raw[:, :, :-1] |= (L[:, :, :-1] != L[:, :, 1:]) & v[:, :, :-1] & v[:, :, 1:]
    # (y, x), y < H-1, x < W-1: differs from the pixel below-right
    raw[:, :-1, :-1] |= (L[:, :-1, :-1] != L[:, 1:, 1:]) & v[:, :-1, :-1] & v[:, 1:, 1:]
    # (y, x), y < H-1, x >= 1: differs from the pixel below-left
    raw[:, :-1, 1:] |= (L[:, :-1, 1:] != L[:, 1:, :-1]) & v[:, :-1, 1:] & v[:, 1:, :-1]
    # 3x3 box dilation = OR of horizontal shifts, then of vertical shifts
    row = raw.clone()
    row[:, :, 1:] |= raw[:, :, :-1]
    row[:, :, :-1] |= raw[:, :, 1:]
    out = row.clone()
    out[:, 1:, :] |= row[:, :-1, :]
    out[:, :-1, :] |= row[:, 1:, :]
    return out.to(torch.int64)


# The op's schema is C++ (csrc/ops/edge.cpp), as is the CPU kernel
# (csrc/ops/cpu/edge_kernel.cpp); registered here: the CUDA kernel (Triton, or
# the vectorised PyTorch path without Triton) and the fake kernel.
_ext.load()


@torch.library.register_kernel("lipfast::generate_edge", "cuda")
def _generate_edge_cuda(labels, edge_width):
    from .. import kernels as triton_kernels

    check_generate_edge_args(labels, edge_width)
    kernels = triton_kernels.load("edge", "lipfast.generate_edge")
    if kernels is None:
        return _edge_torch(labels)
    return kernels.generate_edge(labels, IGNORE)


@torch.library.register_fake("lipfast::generate_edge")
def _generate_edge_fake(labels, edge_width):
    check_generate_edge_args(labels, edge_width)
    return labels.new_empty(labels.shape, dtype=torch.int64)
