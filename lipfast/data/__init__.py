"""LIP data: the data set with SCHP's augmentation, its affine warps, and a
synthetic LIP-layout generator (``python -m lipfast.data.synthetic``).

- :class:`LIPDataset` (``lipfast/data/lip.py``): SPEC section 6 layout, SCHP's
  training augmentation and evaluation centring, errors naming the file.
- :func:`collate`: batches its items for a ``DataLoader``.
- :func:`warp_back`: maps crop-resolution outputs back to the original image.
- :func:`lip_palette`: the LIP colour palette for label PNGs.
- ``lipfast.data.synthetic``: drawn human-like figures with all 20 LIP classes.

Everything here runs on the CPU in the data-loader workers (PIL for decoding,
torch for the warps); edge labels are computed on the device by the training
loop with :func:`lipfast.losses.generate_edge`.
"""

from .lip import (FLIP_PAIRS, LIP_MEAN_BGR, LIP_NUM_CLASSES, LIP_STD_BGR, LIPDataset, collate,
                  crop_hw, denormalize, read_image, read_label)
from .transforms import (affine_matrix, box_to_center_scale, lip_palette, warp_back, warp_image,
                         warp_label)

__all__ = ["LIPDataset", "collate", "crop_hw", "denormalize", "read_image", "read_label",
           "affine_matrix", "box_to_center_scale", "lip_palette", "warp_back", "warp_image",
           "warp_label", "FLIP_PAIRS", "LIP_MEAN_BGR", "LIP_STD_BGR", "LIP_NUM_CLASSES"]
