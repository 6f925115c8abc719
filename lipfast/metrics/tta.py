"""Test-time augmentation of SCHP's evaluation (SPEC section 4), as functions
taking a model callable.

The model: any callable ``model(images)`` with ``images`` B x 3 x H x W that
returns B x C x h x w logits (any h x w, e.g. CE2P's 1/4 resolution), or any
nested output from which ``output_fn(output)`` picks such a tensor -- e.g.
:func:`ce2p_fusion` for CE2P/SCHP's ``[[parsing, fusion], [edge]]``. Call these
under ``torch.no_grad()`` / ``torch.inference_mode()`` for evaluation (they do
not switch autograd off themselves) with the model in eval mode.

- :func:`flip_logits`: ``(f(x) + unflip(swap(f(flip(x))))) / 2``: run the
  mirrored image, swap the left/right channels (``pairs``, default LIP's
  14<->15, 16<->17, 18<->19), mirror back, average the logits.
- :func:`multi_scale_logits`: for each scale s, resize the input by s
  (bilinear, align_corners=True; size ``round(H * s) x round(W * s)``), run
  (with flip when ``flip=True``), resize the logits to ``size`` (default: the
  input's H x W; bilinear, align_corners=True), average over scales.
- :func:`ensemble_probs`: the average of the softmax maps of several models
  (each output resized to ``size`` first, default the input's H x W), with
  optional weights (normalised to sum 1). ``tta`` picks what each model runs
  through, e.g. ``functools.partial(multi_scale_logits, scales=(0.75, 1, 1.25),
  flip=True)``.

``scales`` must be positive finite numbers, ``size`` two positive ints, ensemble
``weights`` finite, >= 0, with a positive sum (ValueError/TypeError otherwise).
All compute in the dtype the model returns; :func:`swap_channels` returns a new
tensor (the model's output is not modified).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .parsing import LIP_FLIP_PAIRS


def ce2p_fusion(output):
    """The fusion logits of CE2P / SCHP's ``[[parsing, fusion], [edge]]`` output."""
    return output[0][-1]


def _pick(output, output_fn):
    out = output_fn(output) if output_fn is not None else output
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise TypeError("the model output (after output_fn) must be a B x C x h x w tensor, "
                        f"got {type(out).__name__}"
                        + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "")
                        + "; pass output_fn to pick the logits (e.g. lipfast.metrics.tta."
                        "ce2p_fusion for CE2P's [[parsing, fusion], [edge]])")
    return out


def _check_images(images):
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a B x 3 x H x W tensor, got "
                         + (str(tuple(images.shape)) if isinstance(images, torch.Tensor)
                            else type(images).__name__))


def _check_size(size, owner):
    """``size`` (H, W) as a tuple of two positive ints."""
    try:
        ok = len(size) == 2 and all(
            not isinstance(v, bool) and operator.index(v) > 0 for v in size)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{owner}: size must be two positive ints (H, W), got {size!r}")
    return tuple(operator.index(v) for v in size)


def _check_scales(scales, owner):
    try:
        scales = list(scales)
    except TypeError:
        raise TypeError(f"{owner}: scales must be a list of numbers, got "
                        f"{type(scales).__name__}") from None
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(f"{owner}: scales must be numbers, got {s!r}")
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"{owner}: scales must be a non-empty list of positive finite factors, "
                         f"got {tuple(scales)!r}")
    return [float(s) for s in scales]


def _check_pairs(pairs, c):
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"flip pairs must be (left, right) channel pairs, got {pair!r}")
        for i in pair:
            if not 0 <= int(i) < c:
                raise ValueError(f"flip pair {tuple(pair)} outside the {c} output channels")


def swap_channels(x: torch.Tensor, pairs: Sequence[tuple[int, int]] = LIP_FLIP_PAIRS,
                  dim: int = 1) -> torch.Tensor:
    """A copy of ``x`` with the channels of every (a, b) in ``pairs`` exchanged."""
    _check_pairs(pairs, x.shape[dim])
    perm = list(range(x.shape[dim]))
    for a, b in pairs:
        perm[a], perm[b] = perm[b], perm[a]
    return x.index_select(dim, torch.tensor(perm, device=x.device))


def flip_logits(model: Callable, images: torch.Tensor,
                pairs: Sequence[tuple[int, int]] = LIP_FLIP_PAIRS,
                output_fn: Optional[Callable] = None) -> torch.Tensor:
    """Average of the logits of ``images`` and of their mirror image (left/right
    channels swapped, mirrored back). Two model calls (one batch each)."""
    _check_images(images)
    out = _pick(model(images), output_fn)
    out_f = _pick(model(images.flip(-1)), output_fn)
    out_f = swap_channels(out_f, pairs).flip(-1)
    return (out + out_f) / 2


def _resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def multi_scale_logits(model: Callable, images: torch.Tensor,
                       scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5),
                       flip: bool = False, pairs: Sequence[tuple[int, int]] = LIP_FLIP_PAIRS,
                       output_fn: Optional[Callable] = None,
                       size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Mean over ``scales`` of the logits of the input resized by s, resized to
    ``size`` (default: the input's H x W); with ``flip``, each scale is itself
    flip-averaged (:func:`flip_logits`)."""
    _check_images(images)
    scales = _check_scales(scales, "multi_scale_logits")
    h, w = images.shape[-2:]
    size = (h, w) if size is None else _check_size(size, "multi_scale_logits")
    total = None
    for s in scales:
        hs, ws = max(1, int(round(h * s))), max(1, int(round(w * s)))
        x = _resize(images, (hs, ws))
        out = flip_logits(model, x, pairs, output_fn) if flip else _pick(model(x), output_fn)
        out = _resize(out, size)
        total = out if total is None else total + out
    return total / len(scales)


def ensemble_probs(models: Sequence[Callable], images: torch.Tensor,
                   weights: Optional[Sequence[float]] = None,
                   output_fn: Optional[Callable] = None,
                   tta: Optional[Callable] = None,
                   size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Weighted mean of ``softmax(logits, dim=1)`` over ``models`` (weights
    normalised to sum 1; default equal), each model's logits resized to
    ``size`` (default: the input's H x W) before the softmax. ``tta(model,
    images, output_fn=...)`` computes a model's logits (default: one plain call)."""
    _check_images(images)
    models = list(models)
    if not models:
        raise ValueError("ensemble_probs needs at least one model")
    if weights is None:
        weights = [1.0] * len(models)
    weights = [float(v) for v in weights]
    if len(weights) != len(models) or any(not math.isfinite(v) or v < 0 for v in weights) or (
            sum(weights) <= 0):
        raise ValueError(f"weights must be {len(models)} finite non-negative numbers with a "
                         f"positive sum, got {weights}")
    size = tuple(images.shape[-2:]) if size is None else _check_size(size, "ensemble_probs")
    norm = sum(weights)
    total = None
    for model, wt in zip(models, weights):
        if tta is None:
            logits = _pick(model(images), output_fn)
        else:
            logits = tta(model, images, output_fn=output_fn)
        p = torch.softmax(_resize(logits, size), dim=1) * (wt / norm)
        total = p if total is None else total + p
    return total
