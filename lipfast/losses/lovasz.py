"""Lovász-Softmax loss (Berman et al. 2018) as one op: ``lipfast.losses.lovasz_softmax``.

``lovasz_softmax(x, labels, classes="present", per_image=False, ignore_index=255,
from_logits=True)``: the exact loss of SPEC section 3, one op
(``lipfast::lovasz_softmax_loss``) with no Python loop over classes and no host
synchronisation on the GPU path:

- ``x``: B x C x H x W logits (the softmax over C is taken inside the op) or,
  with ``from_logits=False``, probabilities; ``labels``: B x H x W integer
  labels (uint8/int8/int16/int32/int64). float32 math for half, bfloat16 and
  float32 inputs, float64 for float64.
- ``per_image=False`` (SCHP's setting): one pixel set, the whole batch;
  ``per_image=True``: one set per image.
- classes used: 'present' (classes with at least one valid pixel in the set),
  'all', or a list of class ids (taken as given, duplicates counted twice, as
  Berman's code).
- ``loss`` = mean over the classes used of each set (0 if none), then the mean
  over sets (per_image: every image counts, an image with no valid pixel or no
  present class contributes 0, as Berman's ``mean`` of per-image losses).

Pixels equal to ``ignore_index`` are left out; a set with every pixel ignored
has loss 0 and zero gradients (no NaN). Labels outside [0, C) other than
``ignore_index``: ValueError on CPU, ``torch._assert_async`` on CUDA (no host
sync). Second derivatives raise NotImplementedError.

The algorithm, the CPU kernel (C++), the CUDA path (PyTorch + Triton), the fake
kernel and the autograd formula are in :mod:`lipfast.ops.lovasz`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from ..ops.lovasz import check_lovasz_args


def _normalize_classes(classes, num_classes: int | None) -> tuple[list[int], bool]:
    """(class ids, present) for classes = 'present' | 'all' | sequence of ids
    (``num_classes=None``: only the structure and the sign of the ids are checked)."""
    if isinstance(classes, str):
        if classes == "present":
            return list(range(num_classes or 0)), True
        if classes == "all":
            return list(range(num_classes or 0)), False
        raise ValueError(f"lovasz_softmax: classes must be 'present', 'all' or a list of class "
                         f"ids, got {classes!r}")
    if isinstance(classes, torch.Tensor):
        if classes.dim() > 1 or classes.is_floating_point() or classes.is_complex():
            raise TypeError("lovasz_softmax: a classes tensor must be a 1-D integer tensor")
        classes = classes.tolist()
    if not isinstance(classes, Sequence):
        raise TypeError(f"lovasz_softmax: classes must be 'present', 'all' or a list of class "
                        f"ids, got {type(classes).__name__}")
    ids = []
    for c in classes:
        if isinstance(c, bool):
            raise TypeError(f"lovasz_softmax: class ids must be integers, got {c!r}")
        try:
            c = operator.index(c)
        except TypeError:
            raise TypeError(f"lovasz_softmax: class ids must be integers, got {c!r}") from None
        if c < 0 or (num_classes is not None and c >= num_classes):
            where = "(class ids are >= 0)" if num_classes is None else (
                f"for {num_classes} classes")
            raise ValueError(f"lovasz_softmax: class id {c} is out of range {where}")
        ids.append(c)
    return ids, False


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool):
        raise TypeError(f"lovasz_softmax: ignore_index must be an int, got {ignore_index!r}")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"lovasz_softmax: ignore_index must be an int, got "
                        f"{ignore_index!r}") from None


def lovasz_softmax(logits_or_probs: torch.Tensor, labels: torch.Tensor, classes="present",
                   per_image: bool = False, ignore_index: int = 255,
                   from_logits: bool = True) -> torch.Tensor:
    """Lovász-Softmax loss (exact, SPEC section 3), one vectorised op.

    Args:
        logits_or_probs: B x C x H x W logits (``from_logits=True``: softmax over C
            is applied inside, float32 math for half inputs) or probabilities.
        labels: B x H x W integer labels (uint8 or int64 typically) in [0, C) or
            ``ignore_index``.
        classes: 'present' (classes with at least one valid pixel), 'all', or a
            list of class ids (each counted, present or not).
        per_image: mean of per-image losses instead of one loss over the batch.
        ignore_index: label of pixels to drop.
        from_logits: apply the softmax over C first.

    Returns:
        scalar loss in the input's dtype (0, with the graph kept, when no class
        is used or every pixel is ignored).
    """
    check_lovasz_args(logits_or_probs, labels)
    ignore_index = _check_ignore_index(ignore_index)
    ids, present = _normalize_classes(classes, logits_or_probs.shape[1])
    loss, _ = torch.ops.lipfast.lovasz_softmax_loss(
        logits_or_probs, labels, ids, present, bool(per_image), ignore_index,
        bool(from_logits))
    return loss


class LovaszSoftmax(torch.nn.Module):
    """Module wrapper of :func:`lovasz_softmax`."""

    def __init__(self, classes="present", per_image: bool = False, ignore_index: int = 255,
                 from_logits: bool = True):
        super().__init__()
        _normalize_classes(classes, None)  # the string, or the list's structure and signs
        self.classes = classes
        self.per_image = per_image
        self.ignore_index = _check_ignore_index(ignore_index)
        self.from_logits = from_logits

    def forward(self, logits_or_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lovasz_softmax(logits_or_probs, labels, self.classes, self.per_image,
                              self.ignore_index, self.from_logits)

    def extra_repr(self) -> str:
        return (f"classes={self.classes!r}, per_image={self.per_image}, "
                f"ignore_index={self.ignore_index}, from_logits={self.from_logits}")
