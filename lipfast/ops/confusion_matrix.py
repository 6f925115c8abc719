"""The ops behind :func:`lipfast.metrics.confusion_matrix`: ``lipfast::confusion_matrix``
(a new C x C int64 matrix) and ``lipfast::confusion_matrix_accumulate`` (added in
place to ``out``); what they count, and the errors, are described in
:mod:`lipfast.metrics.confusion`.

Kernels (registered ops ``lipfast::confusion_matrix`` and
``lipfast::confusion_matrix_accumulate``, schemas in
``csrc/ops/confusion_matrix.cpp``):

- CPU: C++ (``csrc/ops/cpu/confusion_matrix_kernel.cpp``): parallel over output
  rows, one private C x C histogram per thread, summed at the end
  (deterministic).
- CUDA: Triton (:mod:`lipfast.kernels.confusion_matrix`): per-program int32
  histograms (``tl.histogram``) added to the int64 matrix with int64 atomics
  (per-pixel atomics when C*C > 4096). float64 logits, or no Triton: a PyTorch
  path (``F.interpolate``, ``argmax``, ``scatter_add_``), with the same device-side
  check.

No host synchronisation on either device except the CPU's own error path.

Registered here: the CUDA kernels (Triton, or the PyTorch path
``torch_confusion_matrix``) and the fake kernels; no autograd (integer output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext

_ext.load()


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_args(input, labels, num_classes, ignore_index, out, resize) -> bool:
    """Raises ValueError/TypeError for bad arguments; True when ``input`` holds logits."""
    if not isinstance(input, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("confusion_matrix expects tensors for the input and the labels, got "
                        f"{type(input).__name__} and {type(labels).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be an int >= 1, got {num_classes!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"confusion_matrix: ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(resize, bool):
        raise TypeError(f"confusion_matrix: resize must be a bool, got {resize!r}")
    if labels.dim() != 3:
        raise ValueError(f"confusion_matrix: labels must be B x H x W, got {tuple(labels.shape)}")
    if not _is_int(labels):
        raise TypeError(f"confusion_matrix: labels must be an integer tensor (uint8 or int64), "
                        f"got {labels.dtype}")
    if input.device != labels.device:
        raise ValueError(f"confusion_matrix: input on {input.device}, labels on {labels.device}")
    logits = input.is_floating_point()
    if logits:
        if input.dim() != 4:
            raise ValueError(f"confusion_matrix: logits must be B x C x h x w, got "
                             f"{tuple(input.shape)}")
        if input.shape[1] != num_classes:
            raise ValueError(f"confusion_matrix: logits have {input.shape[1]} channels but "
                             f"num_classes={num_classes}")
        if input.shape[0] != labels.shape[0]:
            raise ValueError(f"confusion_matrix: batch mismatch, logits {tuple(input.shape)} vs "
                             f"labels {tuple(labels.shape)}")
        same = tuple(input.shape[2:]) == tuple(labels.shape[1:])
        if not same and not resize:
            raise ValueError(f"confusion_matrix: logits {tuple(input.shape)} and labels "
                             f"{tuple(labels.shape)} differ in size; pass resize=True to resize "
                             "the logits bilinearly")
        if not same and labels.numel() > 0 and 0 in input.shape[2:]:
            raise ValueError(f"confusion_matrix: cannot resize empty logits {tuple(input.shape)}")
    else:
        if not _is_int(input):
            raise TypeError("confusion_matrix: input must be floating-point logits or integer "
                            f"predictions, got {input.dtype}")
        if input.shape != labels.shape:
            raise ValueError(f"confusion_matrix: predictions {tuple(input.shape)} and labels "
                             f"{tuple(labels.shape)} differ in shape")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"confusion_matrix: out must be a tensor, got {type(out).__name__}")
        if out.dtype != torch.int64:
            raise TypeError(f"confusion_matrix: out must be int64, got {out.dtype}")
        if tuple(out.shape) != (num_classes, num_classes):
            raise ValueError(f"confusion_matrix: out must be {num_classes} x {num_classes}, got "
                             f"{tuple(out.shape)}")
        if out.device != input.device:
            raise ValueError(f"confusion_matrix: out on {out.device}, input on {input.device}")
    return logits


_ASSERT_MSG = "confusion matrix: label or prediction outside [0, num_classes)"


def torch_confusion_matrix(input, labels, num_classes, ignore_index, resize):
    """PyTorch path (CUDA float64 logits, or no Triton): (cm, bad) with ``bad``
    a 0-d bool device tensor, True when a label/prediction is out of range."""
    c = num_classes
    if input.is_floating_point():
        x = input
        if resize and tuple(x.shape[2:]) != tuple(labels.shape[1:]):
            x = F.interpolate(x, labels.shape[1:], mode="bilinear", align_corners=True)
        pred = x.argmax(1)
    else:
        pred = input.long()
    lab = labels.long()
    valid = lab != ignore_index
    okl = valid & (lab >= 0) & (lab < c)
    okp = (pred >= 0) & (pred < c)
    cnt = okl & okp
    # out-of-range and ignored pixels go to an extra bin; scatter_add_ (not
    # bincount, which reads the maximum back to the host on CUDA)
    idx = torch.where(cnt, lab * c + pred, torch.full_like(lab, c * c)).flatten()
    cm = torch.zeros(c * c + 1, dtype=torch.int64, device=lab.device)
    cm.scatter_add_(0, idx, torch.ones_like(idx))
    cm = cm[: c * c]
    bad = (valid & ~okl).any() | (okl & ~okp).any()
    return cm.view(c, c), bad


def _cuda_count(input, labels, num_classes, ignore_index, resize, out):
    from .. import kernels

    k = kernels.load("confusion_matrix", "lipfast.metrics.confusion_matrix",
                     input.dtype if input.is_floating_point() else None)
    if k is None:
        cm, bad = torch_confusion_matrix(input, labels, num_classes, ignore_index, resize)
        torch._assert_async(~bad, _ASSERT_MSG)
        if out is None:
            return cm
        out.add_(cm)
        return out
    res, bad = k.confusion_matrix(input, labels, num_classes, ignore_index, resize, out=out)
    torch._assert_async(bad.sum() == 0, _ASSERT_MSG)
    return res


@torch.library.register_kernel("lipfast::confusion_matrix", "cuda")
def _cm_cuda(input, labels, num_classes, ignore_index, resize):
    check_args(input, labels, num_classes, ignore_index, None, resize)
    return _cuda_count(input, labels, num_classes, ignore_index, resize, None)


@torch.library.register_kernel("lipfast::confusion_matrix_accumulate", "cuda")
def _cm_acc_cuda(input, labels, num_classes, ignore_index, resize, out):
    check_args(input, labels, num_classes, ignore_index, out, resize)
    _cuda_count(input, labels, num_classes, ignore_index, resize, out)


@torch.library.register_fake("lipfast::confusion_matrix")
def _cm_fake(input, labels, num_classes, ignore_index, resize):
    return labels.new_empty((num_classes, num_classes), dtype=torch.int64)


@torch.library.register_fake("lipfast::confusion_matrix_accumulate")
def _cm_acc_fake(input, labels, num_classes, ignore_index, resize, out):
    return None
