"""Evaluation metrics of human parsing (SPEC section 4), kept on the device.

- :func:`confusion_matrix` (``lipfast::confusion_matrix`` op): logits (argmax
  fused, optional fused bilinear resize to the label size) or predictions to an
  int64 C x C matrix, no host synchronisation; C++ on CPU, Triton on CUDA (the
  op's registration: :mod:`lipfast.ops.confusion_matrix`).
- :class:`ParsingMetrics`: accumulate, all-reduce across ranks, pixel
  accuracy / mean accuracy / per-class IoU / mIoU (x100), per-class table,
  resumable state.
- :mod:`lipfast.metrics.tta`: flip (left/right channel swap), multi-scale and
  ensemble test-time augmentation.
- ``LIP_CLASSES`` (20 names in label order) and ``LIP_FLIP_PAIRS``.
"""

from . import tta
from .confusion import confusion_matrix
from .parsing import LIP_CLASSES, LIP_FLIP_PAIRS, ParsingMetrics, metrics_from_matrix
from .tta import ce2p_fusion, ensemble_probs, flip_logits, multi_scale_logits, swap_channels

__all__ = [
    "LIP_CLASSES",
    "LIP_FLIP_PAIRS",
    "ParsingMetrics",
    "ce2p_fusion",
    "confusion_matrix",
    "ensemble_probs",
    "flip_logits",
    "metrics_from_matrix",
    "multi_scale_logits",
    "swap_channels",
    "tta",
]
