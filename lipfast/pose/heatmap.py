"""The pose heatmap loss of deep-high-resolution-net.pytorch (SPEC section 10),
fused: Gaussian joint targets + ``JointsMSELoss(use_target_weight=True)``
without the B x J x h x w target tensor.

``heatmap_loss(heatmaps, joints, visible, image_size, sigma)`` equals::

    target, target_weight = generate_heatmaps(joints, visible, image_size,
                                              (w, h), sigma)
    JointsMSELoss(use_target_weight=True)(heatmaps, target, target_weight)

i.e. ``(1/J) sum_j 0.5 * mean over B x h x w of ((pred_j - target_j) * w_j)^2``
(zero-weight joints still count in 1/J), where the targets and weights follow
``JointsDataset.generate_target`` (target_type 'gaussian') per joint:
``feat_stride = image_size / heatmap_size`` per axis,
``mu = int(x / stride + 0.5)``, ``ul = int(mu - 3 sigma)``,
``br = int(mu + 3 sigma + 1)`` (Python ``int()``: truncation toward zero, also for
negative values); the weight is ``visible``, set to 0 where ``ul >= size`` or
``br < 0`` on either axis; where the weight is > 0.5 the reference's
(6 sigma + 1)-wide Gaussian patch (peak 1 at its index ``size // 2``) is drawn
at ``ul``, clipped to the map. The ops and kernels (and the exact rule) are in
:mod:`lipfast.ops.heatmap_loss`.

Inputs: heatmaps B x J x h x w (float32, float64, bfloat16, float16; any
strides); joints B x J x 2 (x = column, y = row, pixels of the network input of
size ``image_size = (W, H)``; floating or integer); visible B x J (bool, integer
or float; the reference's 0/1 visibility, used as the target weight). sigma: the
Gaussian's standard deviation in heatmap pixels (MPII/LIP 2, COCO 384 x 288: 3),
any value in [1e-6, 1e6] (non-integer values follow the reference's slicing
exactly).

Differences from the reference:

- non-finite joint coordinates are accepted where ``visible == 0`` (weight 0;
  the reference's ``int()`` raises on them); where ``visible != 0`` they are a
  ValueError (CPU), a device-side assert (CUDA Triton path, no host sync);
- heatmaps of float16/bfloat16 are computed in float32 and the loss is
  float32 (float64 for float64 heatmaps); the gradient has the heatmaps' dtype;
- no gradient for joints or visible (the reference's targets are constants);
  second derivatives raise NotImplementedError.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import heatmap_loss as _op


def heatmap_loss(heatmaps: torch.Tensor, joints: torch.Tensor, visible: torch.Tensor,
                 image_size, sigma: float = 2.0) -> torch.Tensor:
    """JointsMSELoss (target weights on) of ``heatmaps`` (B x J x h x w) against
    the Gaussian targets of ``joints`` (B x J x 2, pixels of the ``image_size =
    (W, H)`` input) with visibilities ``visible`` (B x J), the targets evaluated
    inside the kernel (never stored). Returns the 0-d loss, float32 (float64 for
    float64 heatmaps), differentiable in ``heatmaps``."""
    image_size, sigma = _op.check_heatmap_loss_args(heatmaps, joints, visible, image_size, sigma)
    loss, _, _ = torch.ops.lipfast.heatmap_loss(heatmaps, joints, visible, list(image_size), sigma)
    return loss


def generate_heatmaps(joints: torch.Tensor, visible: torch.Tensor, image_size, heatmap_size,
                      sigma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's targets materialised: ``(target, target_weight)``, target
    B x J x h x w float32 with ``heatmap_size = (w, h)``, target_weight B x J
    float32 (``visible``, 0 where the Gaussian misses the map). Same rule as
    :func:`heatmap_loss`; the float32 Gaussian is computed as the reference's
    numpy patch (``exp(-(dx^2 + dy^2) / float32(2 sigma^2))``)."""
    image_size, heatmap_size, sigma = _op.check_targets_args(joints, visible, image_size,
                                                             heatmap_size, sigma)
    return torch.ops.lipfast.heatmap_loss_targets(joints, visible, list(image_size),
                                                  list(heatmap_size), sigma)


class HeatmapLoss(nn.Module):
    """Module form of :func:`heatmap_loss`: ``forward(heatmaps, joints, visible,
    image_size)`` with ``sigma`` fixed at construction."""

    def __init__(self, sigma: float = 2.0):
        super().__init__()
        self.sigma = _op.check_sigma(sigma, "HeatmapLoss")

    def forward(self, heatmaps: torch.Tensor, joints: torch.Tensor, visible: torch.Tensor,
                image_size) -> torch.Tensor:
        return heatmap_loss(heatmaps, joints, visible, image_size, self.sigma)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}"
