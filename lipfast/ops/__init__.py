"""lipfast's compiled ops (``torch.ops.lipfast.*``) and their functional wrappers.

One file per op family: ``lipfast/ops/<name>.py`` registers fake kernels and
autograd for the ops whose schemas are in ``csrc/ops/<name>.cpp``, or defines
composite ops with ``torch.library.custom_op`` (``oc_attention``, ``relu_conv2d``).
"""

from .abn import inplace_abn, inplace_abn_sync
from .oc_attention import oc_attention, pyramid_regions
from .relu_conv import relu_conv2d

__all__ = ["inplace_abn", "inplace_abn_sync", "oc_attention", "pyramid_regions", "relu_conv2d"]
