"""SCHP/CE2P edge labels and the class-balanced edge loss (SPEC section 3).

``generate_edge(labels, edge_width=3)`` -> int64 0/1 edge map, the op
``lipfast::generate_edge``. SCHP's ``generate_edge_tensor`` rules: e[y, x] = 1 where

- y >= 1 and L[y, x] != L[y-1, x];
- x < W-1 and L[y, x] != L[y, x+1];
- y < H-1, x < W-1 and L[y, x] != L[y+1, x+1];
- y < H-1, x >= 1 and L[y, x] != L[y+1, x-1];

each only where both compared labels are != 255; then a 3x3 box dilation (SCHP:
a 3x3 all-ones float conv with padding 1, nonzero -> 1). Differences from
SCHP's function, all deliberate:

- the output is int64 (SCHP returns float32 and train.py casts it to
  ``LongTensor`` before the edge cross-entropy; int64 is what the loss takes);
- the batch axis is kept for B == 1 (SCHP ``squeeze()``s it away); a 2-D H x W
  input gives an H x W output;
- labels are compared in their own integer dtype (uint8, int16, int32, int64);
  no float copy of the labels and no conv;
- ``edge_width`` must be 3: SCHP's conv uses padding 1 whatever the kernel size,
  so other widths change the output size there; the SPEC fixes 3x3, and any
  other value raises ValueError.

The op ``lipfast::generate_edge``, its CPU and CUDA kernels and its fake kernel
are in :mod:`lipfast.ops.edge`.

``edge_loss(edge_logits, edge_labels, ignore_index=255)``: class-balanced
cross-entropy of CE2P/SCHP on the B x 2 x h x w edge logits upsampled
(bilinear, align_corners=True) to the label size: with pos = #(edge == 1),
neg = #(edge == 0), weight = [pos, neg] / (pos + neg) (i.e. w_neg, w_pos),
loss = sum_i w[y_i] nll_i / sum_i w[y_i]. The weights stay on the device (no
host sync; SCHP builds them with ``torch.tensor([...])``, which syncs). A batch
without edge pixels (or without non-edge pixels) has all weights 0: upstream
(``F.cross_entropy``) gives 0 / 0 = NaN there, lipfast gives 0 (the convention
of the fused ``upsample_cross_entropy``, which this uses when present).
Edge labels other than 0, 1 and ``ignore_index`` raise ValueError naming
``edge_loss`` on CPU; on CUDA they go to ``torch._assert_async`` (no host sync;
a device-side assert at the next synchronising call).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ..ops import edge as _op
from ..ops.edge import IGNORE


def generate_edge(labels: torch.Tensor, edge_width: int = 3) -> torch.Tensor:
    """SCHP edge labels: B x H x W (or H x W) integer labels, 255 = ignore ->
    int64 0/1 edges of the same shape (see the module docstring)."""
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        return generate_edge(labels.unsqueeze(0), edge_width).squeeze(0)
    _op.check_generate_edge_args(labels, int(edge_width))
    return torch.ops.lipfast.generate_edge(labels, int(edge_width))


def edge_weights(edge_labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[w_neg, w_pos] = [pos, neg] / (pos + neg) as a device tensor (no host sync);
    [0, 0] when no pixel is 0 or 1 (every pixel ignored)."""
    pos = (edge_labels == 1).sum()
    neg = (edge_labels == 0).sum()
    counts = torch.stack([pos, neg]).to(dtype)
    return counts / (pos + neg).clamp_min(1).to(dtype)


def _upsample_ce():
    try:
        from .upsample_ce import _upsample_cross_entropy
    except ImportError:
        return None
    return _upsample_cross_entropy


def upsample_ce_or_eager(logits, labels, weight=None, ignore_index=IGNORE):
    """Mean CE of ``logits`` bilinearly upsampled (align_corners=True) to the
    label size: lipfast's fused ``upsample_cross_entropy`` when present, else
    F.interpolate + F.cross_entropy."""
    if labels.dtype != torch.int64:
        labels = labels.long()
    fused = _upsample_ce()
    if fused is not None:  # weights and ignore_index are checked by the callers
        return fused(logits, labels, ignore_index, weight, True, "mean")
    if weight is not None and weight.dtype != logits.dtype:
        weight = weight.to(logits.dtype)  # F.cross_entropy wants matching dtypes
    up = logits
    if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    return mean_ce(up, labels, weight=weight, ignore_index=ignore_index)


def mean_ce(logits, labels, weight=None, ignore_index=IGNORE):
    """``F.cross_entropy(..., reduction='mean')`` on full-resolution logits, except
    that a mean over no (weighted) pixels is 0 rather than NaN (the convention of
    lipfast's fused ``upsample_cross_entropy``); no host sync."""
    total = F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index,
                            reduction="sum")
    valid = labels != ignore_index
    if weight is None:
        wsum = valid.sum().to(total.dtype)
    else:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        wsum = (weight[safe] * valid).sum().to(total.dtype)
    return total / torch.where(wsum > 0, wsum, torch.ones_like(wsum))


def _check_edge_values(edge_labels: torch.Tensor, ignore_index: int) -> None:
    """Edge labels are 0, 1 or ignore_index. CPU: ValueError naming the first bad
    value. CUDA (and under torch.compile): ``torch._assert_async``, no host sync."""
    if edge_labels.device.type == "meta" or edge_labels.numel() == 0:
        return
    lab = edge_labels
    bad = (lab != 0) & (lab != 1) & (lab != ignore_index)
    msg = f"edge_loss: edge labels must be 0, 1 or ignore_index={ignore_index}"
    if lab.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            raise ValueError(f"{msg}, found {int(lab[bad][0])}")
        return
    torch._assert_async(~bad.any(), msg)


def edge_loss(edge_logits: torch.Tensor, edge_labels: torch.Tensor,
              ignore_index: int = IGNORE) -> torch.Tensor:
    """Class-balanced edge cross-entropy of CE2P/SCHP (SPEC section 3).

    Args:
        edge_logits: B x 2 x h x w edge logits (any resolution; upsampled to the
            label size, bilinear, align_corners=True).
        edge_labels: B x H x W 0/1 edge labels (e.g. from :func:`generate_edge`);
            pixels equal to ``ignore_index`` are skipped, as in SCHP's call.
    """
    from .upsample_ce import check_ignore_index

    if not isinstance(edge_logits, torch.Tensor) or not isinstance(edge_labels, torch.Tensor):
        raise TypeError(f"edge_loss expects tensors for edge_logits and edge_labels, got "
                        f"{type(edge_logits).__name__} and {type(edge_labels).__name__}")
    if edge_logits.dim() != 4 or edge_logits.shape[1] != 2:
        raise ValueError(f"edge_loss expects B x 2 x h x w logits, got {tuple(edge_logits.shape)}")
    if edge_labels.dim() != 3 or edge_labels.shape[0] != edge_logits.shape[0]:
        raise ValueError(f"edge_loss expects B x H x W labels matching the logits' batch, got "
                         f"{tuple(edge_labels.shape)}")
    if edge_labels.is_floating_point() or edge_labels.is_complex() or (
            edge_labels.dtype == torch.bool):
        raise TypeError(f"edge_loss: edge_labels must be an integer tensor (e.g. from "
                        f"generate_edge), got {edge_labels.dtype}")
    ignore_index = check_ignore_index(ignore_index, "edge_loss")
    _check_edge_values(edge_labels, ignore_index)
    wdtype = edge_logits.dtype if edge_logits.dtype == torch.float64 else torch.float32
    weight = edge_weights(edge_labels, wdtype)
    return upsample_ce_or_eager(edge_logits, edge_labels, weight=weight, ignore_index=ignore_index)
