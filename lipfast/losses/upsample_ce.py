"""Cross-entropy of bilinearly upsampled logits, without the upsampled tensor.

``upsample_cross_entropy(logits, labels, ...)`` equals::

    F.cross_entropy(F.interpolate(logits, labels.shape[-2:], mode="bilinear",
                                  align_corners=align_corners),
                    labels.long(), weight=weight, ignore_index=ignore_index,
                    reduction=reduction)

(SPEC section 3: every prediction is upsampled to the label size with
align_corners=True before the loss), but neither the forward nor the backward
materialises the B x C x H x W upsampled logits. The reductions ('mean',
'sum', 'none') are plain torch ops on the per-pixel losses of the op
``lipfast::upsample_ce``; the ops, their CPU and CUDA kernels, fake kernels
and autograd are in :mod:`lipfast.ops.upsample_ce`.

Precision: float16/bfloat16 logits are computed in float32 (under autocast too;
the loss is float32 like ``F.cross_entropy`` under autocast, the gradient has
the logits' dtype).

Differences from the reference:

- reduction='mean' with every pixel ignored (or every non-ignored pixel of
  weight 0) returns 0 with zero gradients; ``F.cross_entropy`` returns nan.
- labels outside [0, C) other than ``ignore_index`` are an error. CPU: found by
  the forward kernel, ValueError at once with the first bad value. CUDA (Triton
  path): the forward kernel sets a one-element device flag that goes to
  ``torch._assert_async`` -- no host synchronisation per call; a device-side
  assert fires asynchronously and surfaces at the next synchronising call as a
  CUDA "device-side assert triggered" error carrying the message
  "upsample_cross_entropy: a label is outside [0, C) ...", after which the CUDA
  context is unusable (as with any device-side assert). The PyTorch path on CUDA
  (float64 or no Triton) checks on the host (one sync) and raises ValueError.
- second derivatives are not implemented: differentiating through the backward
  (``create_graph=True`` then a second backward) raises NotImplementedError
  naming ``lipfast::upsample_ce_backward``.
- the class weight gets no gradient (``F.cross_entropy`` does not give one either).
- class weights must be finite and >= 0 (``F.cross_entropy`` takes any): a CPU
  weight is checked on the host (ValueError naming the class); a CUDA weight goes
  to ``torch._assert_async`` (no host sync, a device-side assert at the next
  synchronising call). ``ignore_index`` must be an int (TypeError otherwise).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import nn

from ..kernels._taps import bilinear_taps  # noqa: F401  (re-export; home: lipfast.kernels._taps)
from ..ops import upsample_ce as _op
from ..ops.upsample_ce import bilinear_matrix  # noqa: F401  (re-export)

_REDUCTIONS = ("mean", "sum", "none")


def check_upsample_ce_args(logits, labels, weight, ignore_index, align_corners=True,
                           reduction="mean") -> None:
    """The op's argument checks (:func:`lipfast.ops.upsample_ce.check_upsample_ce_args`)
    and the reduction's."""
    _op.check_upsample_ce_args(logits, labels, weight, ignore_index, align_corners)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"upsample_cross_entropy: reduction must be one of {_REDUCTIONS}, got "
                         f"{reduction!r}")


def check_ignore_index(ignore_index, owner: str) -> int:
    """``ignore_index`` as an int; TypeError naming ``owner`` otherwise (255.0, None, ...)."""
    if isinstance(ignore_index, bool):
        raise TypeError(f"{owner}: ignore_index must be an int, got {ignore_index!r}")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"{owner}: ignore_index must be an int, got {ignore_index!r}") from None


def check_weight_values(weight: torch.Tensor, owner: str) -> None:
    """Class weights must be finite and >= 0. A CPU weight is read on the host
    (ValueError naming the first bad class); a CUDA weight goes to
    ``torch._assert_async`` (no host sync: a device-side assert fires at the next
    synchronising call), as does any weight under ``torch.compile``."""
    if weight.device.type == "meta":
        return
    ok = torch.isfinite(weight) & (weight >= 0)
    if weight.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0, 0])
            raise ValueError(f"{owner}: weight must be finite and >= 0, got "
                             f"{float(weight[i])} at class {i}")
        return
    torch._assert_async(ok.all(), f"{owner}: weight must be finite and >= 0")


def class_weight_buffer(weight, owner: str) -> Optional[torch.Tensor]:
    """A module's class-weight argument (None, a sequence or a tensor) as a 1-D
    float tensor, checked once at construction (finite, >= 0)."""
    if weight is None:
        return None
    try:
        t = torch.as_tensor(weight)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{owner}: weight must be a 1-D tensor or sequence of class weights, "
                        f"got {type(weight).__name__}") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{owner}: weight must be a 1-D tensor of class weights, got shape "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.device.type == "cpu":
        check_weight_values(t, owner)
    else:  # construction time: one host read is fine here
        check_weight_values(t.cpu(), owner)
    return t


# ---------------------------------------------------------------------------
# public API


def upsample_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    weight: Optional[torch.Tensor] = None,
    align_corners: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B x C x h x w) bilinearly upsampled to the
    size of ``labels`` (B x H x W, uint8 or int64), without materialising the
    upsampled logits. Same value and gradient as
    ``F.cross_entropy(F.interpolate(logits, (H, W), mode="bilinear",
    align_corners=align_corners), labels.long(), weight, ignore_index=...,
    reduction=...)``, except that 'mean' over no (weighted) pixels is 0, not nan.

    Returns a float32 loss (float64 for float64 logits): a scalar for 'mean' and
    'sum', B x H x W (0 at ignored pixels) for 'none'.
    """
    name = "upsample_cross_entropy"
    ignore_index = check_ignore_index(ignore_index, name)
    check_upsample_ce_args(logits, labels, weight, ignore_index, align_corners, reduction)
    if weight is not None:
        check_weight_values(weight, name)
    return _upsample_cross_entropy(logits, labels, ignore_index, weight, align_corners,
                                   reduction)


def _upsample_cross_entropy(logits, labels, ignore_index, weight, align_corners, reduction):
    """:func:`upsample_cross_entropy` without the checks of ``ignore_index`` and of the
    weight values (callers with weights known to be fine: the edge loss, the criteria)."""
    check_upsample_ce_args(logits, labels, weight, ignore_index, align_corners, reduction)
    nll, _, wsum = torch.ops.lipfast.upsample_ce(logits, labels, weight, int(ignore_index),
                                                 bool(align_corners))
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    return total / torch.where(wsum > 0, wsum, torch.ones_like(wsum))


class UpsampleCrossEntropy(nn.Module):
    """Module form of :func:`upsample_cross_entropy`: ``forward(logits, labels)``."""

    def __init__(self, ignore_index: int = 255, weight: Optional[torch.Tensor] = None,
                 align_corners: bool = True, reduction: str = "mean"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"UpsampleCrossEntropy: reduction must be one of {_REDUCTIONS}, "
                             f"got {reduction!r}")
        name = "UpsampleCrossEntropy"
        self.ignore_index = check_ignore_index(ignore_index, name)
        self.align_corners = bool(align_corners)
        self.reduction = reduction
        self.register_buffer("weight", class_weight_buffer(weight, name))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return upsample_cross_entropy(logits, labels, self.ignore_index, self.weight,
                                      self.align_corners, self.reduction)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, align_corners={self.align_corners}, "
                f"reduction={self.reduction!r}, weighted={self.weight is not None}")
