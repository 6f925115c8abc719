"""Segmentation metrics of the human-parsing papers (SPEC section 4), accumulated
on the device.

``ParsingMetrics(num_classes=20, ignore_index=255, class_names=LIP_CLASSES)``
keeps one int64 C x C confusion matrix ``cm[gt, pred]`` (on the device of the
first batch it sees, or ``device=``) and a count of images. ``class_names``
are used by ``table()``; the default LIP names are replaced by the class
indices when ``num_classes != 20``, ``None`` gives the indices.

- ``update(logits_or_pred, labels, resize=True)``: adds one batch through
  :func:`lipfast.metrics.confusion_matrix` (argmax fused; logits of another
  size than the labels are bilinearly resized, align_corners=True, inside the
  kernel). No host synchronisation.
- ``reduce(group=None)``: sums the matrix and the image count over the ranks of
  ``torch.distributed`` (one all-reduce; every rank of the group must call it,
  also a rank that saw no image: its matrix is zeros). Without an initialised
  process group it does nothing. It replaces the local counts with the global
  ones, so it is done once: a second ``reduce()`` is a no-op and ``update()``
  afterwards raises (``reset()`` starts over). With NCCL a CPU matrix is moved
  to the current CUDA device first.
- ``compute()`` -> dict (host floats, one device-to-host copy of the matrix):
  ``pixel_acc`` = sum tp / sum pos, ``mean_acc`` = mean_c tp / max(1, pos),
  ``iou`` (C float64 tensor) = tp / max(1, pos + res - tp), ``miou`` = mean of
  ``iou`` over all classes (absent ones count as 0, background included), all
  x 100; ``pos = cm.sum(1)``, ``res = cm.sum(0)``, ``tp = diag(cm)``. Also
  ``confusion_matrix`` (CPU int64) and ``num_images``. With no counted pixel,
  ``pixel_acc`` is nan (0/0, like the reference's numpy), the others 0.
- ``table()`` / ``str(metrics)``: per-class IoU and accuracy with the class
  names, then the summary.
- ``reset()``; ``state_dict()`` / ``load_state_dict()`` (plain tensors and
  ints: ``torch.load(..., weights_only=True)`` reads them) to resume a long
  evaluation; ``save(path)`` writes it atomically (temporary file +
  ``os.replace``), ``load(path)`` reads it with ``weights_only=True``.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from .._io import atomic_file
from .confusion import confusion_matrix

LIP_CLASSES = (
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat",
    "Socks", "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm",
    "Left-leg", "Right-leg", "Left-shoe", "Right-shoe",
)
LIP_FLIP_PAIRS = ((14, 15), (16, 17), (18, 19))


def metrics_from_matrix(cm: torch.Tensor) -> dict:
    """SPEC section 4's formulas on a C x C confusion matrix (x100)."""
    if not isinstance(cm, torch.Tensor):
        raise TypeError(f"metrics_from_matrix: cm must be a C x C tensor, got "
                        f"{type(cm).__name__}")
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"metrics_from_matrix: cm must be a square C x C matrix, got shape "
                         f"{tuple(cm.shape)}")
    cm = cm.detach().to("cpu", torch.float64)
    if bool((cm < 0).any()) or not bool(torch.isfinite(cm).all()):
        raise ValueError("metrics_from_matrix: cm has negative counts (or non-finite values)")
    pos = cm.sum(1)
    res = cm.sum(0)
    tp = cm.diagonal()
    total = float(pos.sum())
    pixel_acc = float(tp.sum()) / total * 100 if total > 0 else math.nan
    acc = tp / pos.clamp(min=1)
    iou = tp / (pos + res - tp).clamp(min=1)
    return {
        "pixel_acc": pixel_acc,
        "mean_acc": float(acc.mean()) * 100,
        "acc": acc * 100,
        "iou": iou * 100,
        "miou": float(iou.mean()) * 100,
    }


class ParsingMetrics:
    """Confusion-matrix metrics (pixel accuracy, mean accuracy, per-class IoU,
    mIoU), accumulated on the device, reducible across ranks, resumable."""

    def __init__(self, num_classes: int = 20, ignore_index: int = 255,
                 class_names: Optional[Sequence[str]] = LIP_CLASSES,
                 device: Optional[torch.device | str] = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ParsingMetrics: num_classes must be an int >= 1, got "
                             f"{num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ParsingMetrics: ignore_index must be an int, got {ignore_index!r}")
        if class_names is None:
            class_names = [str(i) for i in range(num_classes)]
        elif class_names is LIP_CLASSES and num_classes != len(LIP_CLASSES):
            class_names = [str(i) for i in range(num_classes)]
        class_names = [str(n) for n in class_names]
        if len(class_names) != num_classes:
            raise ValueError(f"ParsingMetrics: {len(class_names)} class names for "
                             f"{num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self._device = torch.device(device) if device is not None else None
        self.reset()

    # ------------------------------------------------------------ accumulation
    def reset(self) -> None:
        dev = self._device if self._device is not None else torch.device("cpu")
        self.matrix = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64,
                                  device=dev)
        self.num_images = 0
        self.reduced = False

    @torch.no_grad()
    def update(self, logits_or_pred: torch.Tensor, labels: torch.Tensor,
               resize: bool = True) -> None:
        """Adds a batch: B x C x h x w logits (argmax fused; resized to the label
        size when the sizes differ and ``resize``) or B x H x W predictions,
        against B x H x W labels."""
        if self.reduced:
            raise RuntimeError("ParsingMetrics.update after reduce(): the matrix already holds "
                               "every rank's counts; call reset() to start a new evaluation")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"ParsingMetrics.update: labels must be a tensor, got "
                            f"{type(labels).__name__}")
        if self.matrix.device != labels.device:
            self.matrix = self.matrix.to(labels.device)
        confusion_matrix(logits_or_pred, labels, self.num_classes, self.ignore_index,
                         out=self.matrix, resize=resize)
        self.num_images += int(labels.shape[0])

    def reduce(self, group=None) -> "ParsingMetrics":
        """All-reduce (sum) of the matrix and the image count over ``group``
        (default: WORLD); a no-op without an initialised process group or when
        already reduced. Collective: every rank of the group must call it."""
        import torch.distributed as dist

        if self.reduced or not (dist.is_available() and dist.is_initialized()):
            return self
        buf = torch.cat([self.matrix.flatten(),
                         torch.tensor([self.num_images], dtype=torch.int64,
                                      device=self.matrix.device)])
        if dist.get_backend(group) == "nccl" and buf.device.type != "cuda":
            buf = buf.cuda()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        c = self.num_classes
        self.matrix = buf[: c * c].view(c, c).to(self.matrix.device)
        self.num_images = int(buf[c * c])
        self.reduced = True
        return self

    # ------------------------------------------------------------ results
    def compute(self) -> dict:
        out = metrics_from_matrix(self.matrix)
        out["confusion_matrix"] = self.matrix.cpu()
        out["num_images"] = self.num_images
        return out

    def table(self, digits: int = 2) -> str:
        m = self.compute()
        width = max(10, max(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'acc':>7}"]
        for name, iou, acc in zip(self.class_names, m["iou"].tolist(), m["acc"].tolist()):
            lines.append(f"{name:<{width}}  {iou:7.{digits}f}  {acc:7.{digits}f}")
        lines.append(f"{'mIoU':<{width}}  {m['miou']:7.{digits}f}")
        lines.append(f"{'pixel acc':<{width}}  {m['pixel_acc']:7.{digits}f}")
        lines.append(f"{'mean acc':<{width}}  {m['mean_acc']:7.{digits}f}")
        lines.append(f"({m['num_images']} images)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"ParsingMetrics(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"num_images={self.num_images}, device={self.matrix.device})")

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"matrix": self.matrix.detach().cpu().clone(), "num_images": self.num_images,
                "num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "reduced": self.reduced}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "matrix" not in state:
            raise ValueError("ParsingMetrics.load_state_dict: not a ParsingMetrics state "
                             "(no 'matrix')")
        m = state["matrix"]
        c = self.num_classes
        if not isinstance(m, torch.Tensor) or m.dtype != torch.int64 or tuple(m.shape) != (c, c):
            raise ValueError(f"ParsingMetrics.load_state_dict: matrix must be an int64 {c} x {c} "
                             f"tensor, got {getattr(m, 'dtype', type(m))} "
                             f"{tuple(getattr(m, 'shape', ()))}")
        if int(state.get("num_classes", c)) != c:
            raise ValueError(f"ParsingMetrics.load_state_dict: state has "
                             f"{state['num_classes']} classes, metrics {c}")
        if int(state.get("ignore_index", self.ignore_index)) != self.ignore_index:
            raise ValueError(f"ParsingMetrics.load_state_dict: state has ignore_index="
                             f"{state['ignore_index']}, metrics {self.ignore_index}")
        if bool((m < 0).any()):
            raise ValueError("ParsingMetrics.load_state_dict: negative counts in the matrix")
        self.matrix = m.to(self.matrix.device).clone()
        self.num_images = int(state.get("num_images", 0))
        self.reduced = bool(state.get("reduced", False))

    def save(self, path: str | os.PathLike) -> None:
        """Writes state_dict() to ``path`` atomically (temporary file + os.replace)."""
        with atomic_file(path) as f:
            torch.save(self.state_dict(), f)

    def load(self, path: str | os.PathLike) -> None:
        """Loads a file written by :meth:`save` (``torch.load(weights_only=True)``)."""
        self.load_state_dict(torch.load(os.fspath(path), map_location="cpu", weights_only=True))
