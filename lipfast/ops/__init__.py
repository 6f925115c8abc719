"""lipfast's ops (``torch.ops.lipfast.*``): one file per op family, every op's
Python registration in one place.

``lipfast/ops/<op>.py`` holds everything the dispatcher needs for its ops:
the ``_ext.load()`` of the C++ schemas (``csrc/ops/<op>.cpp``) and CPU kernels,
or the ``torch.library.custom_op`` definition; the CUDA dispatch to the Triton
kernels of ``lipfast/kernels/<op>.py`` with the PyTorch fallback (float64, no
Triton); the fake kernels; the autograd formula; the checks the op itself needs.

- :mod:`.abn`: ``abn_stats``, ``abn_forward_``, ``abn_backward_reduce``,
  ``abn_backward_elemt`` and the functional ``inplace_abn`` / ``inplace_abn_sync``
  (modules: :mod:`lipfast.nn.abn`);
- :mod:`.oc_attention`: ``oc_attention``, ``oc_attention_backward`` and the
  functional ``oc_attention`` (modules: :mod:`lipfast.nn.oc`);
- :mod:`.relu_conv`: ``relu_conv2d`` and the functional ``relu_conv2d``;
- :mod:`.upsample_ce`: ``upsample_ce``, ``upsample_ce_backward`` (user API:
  :mod:`lipfast.losses.upsample_ce`);
- :mod:`.edge`: ``generate_edge`` (user API: :mod:`lipfast.losses.edge`);
- :mod:`.lovasz`: ``lovasz_softmax_loss`` (user API: :mod:`lipfast.losses.lovasz`);
- :mod:`.confusion_matrix`: ``confusion_matrix``, ``confusion_matrix_accumulate``
  (user API: :mod:`lipfast.metrics.confusion`);
- :mod:`.parse_postprocess`: ``parse_postprocess`` (SCHP's upsample + affine warp
  + argmax/softmax post-processing, fused) and the functional ``parse_postprocess``;
- :mod:`.heatmap_loss`: ``heatmap_loss``, ``heatmap_loss_backward``,
  ``heatmap_loss_targets`` (user API: :mod:`lipfast.pose.heatmap`);
- :mod:`.pose_decode`: ``pose_decode`` (heatmap argmax, quarter-pixel refinement,
  transform back to the image, the flip test fused in; user API:
  :mod:`lipfast.pose.decode`).

Importing this package registers all of them. ``pyramid_regions`` (OCNet's
pyramid region table) lives in :mod:`lipfast.kernels._regions`, re-exported here.
"""

from . import (confusion_matrix, edge, heatmap_loss, lovasz,  # noqa: F401  (register the ops)
               pose_decode, upsample_ce)
from .abn import inplace_abn, inplace_abn_sync
from .oc_attention import oc_attention, pyramid_regions
from .parse_postprocess import parse_postprocess
from .relu_conv import relu_conv2d

__all__ = ["inplace_abn", "inplace_abn_sync", "oc_attention", "parse_postprocess",
           "pyramid_regions", "relu_conv2d"]
