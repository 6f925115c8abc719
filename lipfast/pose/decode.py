"""Pose heatmap decoding, the flip test and heatmap ensembles (../shared/SPEC.md
section 10, "Decoding" and "Flip test"), following deep-high-resolution-net.pytorch
(``lib/core/inference.py``: get_max_preds, get_final_preds with
``TEST.POST_PROCESS``; ``lib/utils/transforms.py``: flip_back, transform_preds,
get_affine_transform; ``lib/core/function.py``: the flip test with
``TEST.SHIFT_HEATMAP``).

- :func:`decode`: heatmaps (and optionally the flipped-input heatmaps) to image
  coordinates and maxima, one fused op (``lipfast::pose_decode``, see
  :mod:`lipfast.ops.pose_decode`): one launch for the batch, no host sync;
- :func:`flip_back`: the flipped-input heatmaps flipped back and shifted (what
  the reference averages with the unflipped heatmaps);
- :func:`ensemble`: the weighted average of several models' heatmaps.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

from ..ops import pose_decode as _op
from .joints import LIP_POSE_FLIP_PAIRS, flip_permutation

__all__ = ["decode", "flip_back", "ensemble"]

_LOW = (torch.float16, torch.bfloat16)


def _maps(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pose.decode: {what} must be a B x J x h x w tensor, got "
                        f"{type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"pose.decode: {what} must be a floating tensor, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"pose.decode: {what} must be B x J x h x w, got shape {tuple(t.shape)}")
    t = t.detach()
    return t.float() if t.dtype in _LOW else t


def _box(v, what: str, b: int, device) -> torch.Tensor:
    """center / scale as a B x 2 float64 tensor on ``device`` (scale may be B:
    the same value for both axes, the reference's rule for a scalar scale)."""
    if isinstance(v, torch.Tensor):
        if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"pose.decode: {what} must be a real tensor, got {v.dtype}")
        t = v.detach().to(device=device, dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(v, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"pose.decode: {what} must be a tensor or an array of numbers, got "
                            f"{type(v).__name__}") from None
        t = t.to(device)
    if what == "scale" and t.dim() == 1 and t.shape[0] == b:
        t = t[:, None].expand(b, 2)
    if t.dim() != 2 or t.shape[0] != b or t.shape[1] != 2:
        extra = " (or B)" if what == "scale" else ""
        raise ValueError(f"pose.decode: {what} must be B x 2{extra} with B = {b}, got shape "
                         f"{tuple(t.shape)}")
    return t


def decode(heatmaps: torch.Tensor, center, scale, flipped: Optional[torch.Tensor] = None,
           flip_pairs=LIP_POSE_FLIP_PAIRS) -> tuple[torch.Tensor, torch.Tensor]:
    """Image coordinates and maxima of pose heatmaps: HRNet's ``get_final_preds``
    (with ``TEST.POST_PROCESS``), the flip test fused in when ``flipped`` is given.

    Args:
        heatmaps: B x J x h x w floating tensor (any strides; float16/bfloat16 are
            decoded in float32). Detached: decoding has no gradient.
        center: B x 2, (x, y) box centres in image pixels (tensor or array; pass
            float64 tensors on the heatmaps' device to avoid a host->device copy).
        scale: B x 2 (or B), box sizes in units of 200 px; only ``scale[:, 0]`` is
            used, as in the reference.
        flipped: None, or the heatmaps of the W-flipped input (same shape). Then the
            decoded map is ``(heatmaps + flip_back(flipped, flip_pairs)) * 0.5``
            (computed in the kernel, not stored).
        flip_pairs: the left/right channel pairs swapped by the flip
            (default LIP/MPII's); used only with ``flipped``.

    Returns:
        ``(coords, maxvals)``: B x J x 2 image (x, y) and B x J maxima of the
        decoded maps, float32 (float64 for float64 heatmaps).

    Rules (the reference's): the first maximum of each flattened map, x = idx % w,
    y = idx // w, both 0 where the maximum is <= 0; if 1 < x < w - 1 and
    1 < y < h - 1, x += 0.25 sign(V[y, x+1] - V[y, x-1]) and y += 0.25 sign(V[y+1, x] -
    V[y-1, x]); then ``x_img = c_x + (x - w/2) * 200 s_w / w`` and
    ``y_img = c_y + (y - h/2) * 200 s_w / w`` -- transform_preds inverts
    get_affine_transform(center, scale, 0, [w, h]), whose direction vectors both
    come from the widths, so the width ratio scales y too.

    Non-finite heatmaps follow numpy's semantics, as the reference does: the first
    NaN of a map is its maximum, so maxval is NaN and the coordinates are those of a
    non-positive maximum (``c + (0 - size/2) * ratio``); +inf is an ordinary
    maximum; a NaN neighbour difference (e.g. -inf - -inf) makes the joint's
    coordinates NaN (both: the reference's affine product multiplies each by 0).
    A NaN in ``maxvals`` therefore flags a map that held NaN. Centre and scale
    values are used as given (no check: that would need a host sync).
    """
    hm = _maps(heatmaps, "heatmaps")
    b, j = hm.shape[:2]
    fl = None
    perm: list[int] = []
    if flipped is not None:
        fl = _maps(flipped, "flipped")   # shape, dtype, device: checked by the op's checks
        perm = flip_permutation(j, flip_pairs)
    c = _box(center, "center", b, hm.device)
    s = _box(scale, "scale", b, hm.device)
    _op.check_args(hm, fl, c, s, perm)
    return torch.ops.lipfast.pose_decode(hm, fl, c, s, perm)


def flip_back(flipped: torch.Tensor, flip_pairs=LIP_POSE_FLIP_PAIRS,
              shift: bool = True) -> torch.Tensor:
    """The heatmaps of the W-flipped input mapped back to the unflipped frame:
    HRNet's ``flip_back`` (reverse W, swap each pair's channels) followed, when
    ``shift``, by ``TEST.SHIFT_HEATMAP`` (``out[..., 1:] = out[..., :-1]``, column 0
    kept). B x J x h x w (any floating dtype) -> a new tensor of the same shape and
    dtype; the input is not modified. Average it with the unflipped heatmaps
    (``(h + flip_back(f)) * 0.5``) for the flip test, or let :func:`decode` fuse it."""
    if not isinstance(flipped, torch.Tensor):
        raise TypeError(f"pose.flip_back: flipped must be a tensor, got {type(flipped).__name__}")
    if flipped.dim() != 4:
        raise ValueError(f"pose.flip_back: flipped must be B x J x h x w, got shape "
                         f"{tuple(flipped.shape)}")
    j = flipped.shape[1]
    perm = flip_permutation(j, flip_pairs)
    if j == 0 or flipped.shape[3] == 0:
        return flipped.clone()
    out = torch.stack([flipped[:, p] for p in perm], dim=1).flip(3)
    if shift:
        out = torch.cat([out[..., :1], out[..., :-1]], dim=3)
    return out


def _weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()  # a host sync for device tensors
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"pose.ensemble: weights must be a sequence of numbers, got "
                        f"{type(weights).__name__}")
    if len(weights) != n:
        raise ValueError(f"pose.ensemble: {len(weights)} weights for {n} heatmaps")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"pose.ensemble: weights must be real numbers, got {w!r}")
        w = float(w)
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"pose.ensemble: weights must be positive and finite, got {weights}")
        out.append(w)
    total = math.fsum(out)
    return [w / total for w in out]


def ensemble(heatmaps_list: Sequence[torch.Tensor], weights=None) -> torch.Tensor:
    """Weighted average of several models' heatmaps: ``sum_i w_i H_i / sum_i w_i``.

    Args:
        heatmaps_list: a non-empty sequence of tensors of one shape, dtype and
            device (e.g. each model's flip-averaged B x J x h x w heatmaps).
        weights: None (equal weights) or one positive finite number per tensor;
            normalised to sum 1 (a tensor of weights is read on the host).

    Returns a new tensor (shape and dtype of the inputs), computed in their dtype.
    """
    if isinstance(heatmaps_list, torch.Tensor) or not isinstance(heatmaps_list, Sequence):
        raise TypeError("pose.ensemble: heatmaps_list must be a list or tuple of tensors, got "
                        f"{type(heatmaps_list).__name__}")
    if len(heatmaps_list) == 0:
        raise ValueError("pose.ensemble: heatmaps_list is empty")
    first = heatmaps_list[0]
    for i, t in enumerate(heatmaps_list):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pose.ensemble: heatmaps_list[{i}] is a {type(t).__name__}, not a "
                            "tensor")
        if not t.is_floating_point():
            raise TypeError(f"pose.ensemble: heatmaps_list[{i}] must be floating, got {t.dtype}")
        if t.shape != first.shape:
            raise ValueError(f"pose.ensemble: heatmaps_list[{i}] has shape {tuple(t.shape)}, "
                             f"heatmaps_list[0] {tuple(first.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"pose.ensemble: heatmaps_list[{i}] is {t.dtype}, heatmaps_list[0] "
                            f"{first.dtype}")
        if t.device != first.device:
            raise ValueError(f"pose.ensemble: heatmaps_list[{i}] on {t.device}, "
                             f"heatmaps_list[0] on {first.device}")
    ws = _weights(weights, len(heatmaps_list))
    out = heatmaps_list[0] * ws[0]
    for t, w in zip(heatmaps_list[1:], ws[1:]):
        out.add_(t, alpha=w)
    return out
