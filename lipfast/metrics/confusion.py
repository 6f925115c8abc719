"""Confusion matrix of a segmentation, from logits or predictions, on the device.

``confusion_matrix(input, labels, num_classes, ignore_index=255, out=None,
resize=False)`` returns the ``num_classes x num_classes`` int64 matrix

    cm[gt, pred] = #pixels with label gt and prediction pred, label != ignore_index

(SPEC section 4), where ``pred`` is

- ``input`` itself when it is an integer tensor (B x H x W predictions), or
- ``input.argmax(1)`` when it holds floating-point logits (B x C x h x w),
  computed inside the kernel (no prediction tensor is made). Ties: the first
  maximum, as ``torch.argmax``. NaN: as ``torch.argmax`` too -- a NaN counts
  as larger than every number, so a pixel with a NaN logit is predicted as the
  first channel holding a NaN (tested).
- with ``resize=True`` and logits whose h x w differs from the labels' H x W,
  the logits are bilinearly resized to H x W (``align_corners=True``, as the
  reference evaluation does) inside the kernel, without materialising the
  B x C x H x W resized logits; equal to
  ``F.interpolate(input, (H, W), mode="bilinear", align_corners=True).argmax(1)``
  up to floating-point rounding of the interpolation (same taps, weights and
  order as ATen; a near-tie may resolve differently only through FMA
  contraction). With ``resize=False`` the sizes must match.

``out``: an int64 C x C tensor on the input's device to add the counts to **in
place** (``out += cm``); it is also returned. Labels are uint8 or int64 (any
integer type works; others are converted); logits float32/float64/float16/
bfloat16 (half types are compared in float32); any strides, channels_last
included.

Bad input raises ``ValueError``/``TypeError`` naming the problem: wrong ranks or
shapes, channel count != num_classes, different devices, a non-int64 ``out``.
Labels outside [0, C) other than ``ignore_index`` and predictions outside
[0, C) at counted pixels are never counted (no out-of-bounds access):

- CPU: ValueError at once, naming the first bad value; ``out`` is unchanged.
- CUDA: the kernel raises a device flag and the op calls
  ``torch._assert_async`` on it -- no host synchronisation; a bad value fails
  the next synchronising CUDA call with a device-side assertion ("confusion
  matrix: label or prediction outside [0, num_classes)"), which, as every CUDA
  device assert, leaves the CUDA context unusable. Validate labels on the host
  beforehand when you want to recover from bad data. (Under
  ``torch.compile`` the assert is part of the graph as well.)

The ops ``lipfast::confusion_matrix`` and ``lipfast::confusion_matrix_accumulate``,
their CPU (C++) and CUDA (Triton) kernels and fake kernels are in
:mod:`lipfast.ops.confusion_matrix`. No host synchronisation on either device
except the CPU's own error path.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.confusion_matrix import check_args
from ..ops.confusion_matrix import torch_confusion_matrix  # noqa: F401  (re-export)


def confusion_matrix(
    input: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    out: Optional[torch.Tensor] = None,
    resize: bool = False,
) -> torch.Tensor:
    """``num_classes x num_classes`` int64 confusion matrix ``cm[label, pred]``
    of ``input`` (B x C x h x w logits, argmax fused, or B x H x W integer
    predictions) against ``labels`` (B x H x W, uint8/int64), skipping
    ``ignore_index``. ``resize=True``: logits of another size than the labels
    are bilinearly resized (align_corners=True) to the label size inside the
    kernel. ``out``: int64 C x C tensor the counts are added to in place (and
    returned). See the module docstring for NaN, errors and kernels."""
    check_args(input, labels, num_classes, ignore_index, out, resize)
    if out is None:
        return torch.ops.lipfast.confusion_matrix(input, labels, num_classes, ignore_index,
                                                  resize)
    torch.ops.lipfast.confusion_matrix_accumulate(input, labels, num_classes, ignore_index,
                                                  resize, out)
    return out
