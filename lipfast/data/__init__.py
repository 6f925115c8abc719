"""Parsing data: LIP and CIHP with SCHP's augmentation, several sources in one
run, the affine warps, and a synthetic data generator
(``python -m lipfast.data.synthetic``).

- :class:`LIPDataset` (``lipfast/data/lip.py``): SPEC section 6 layout, SCHP's
  training augmentation and evaluation centring, BGR (default) or RGB input,
  errors naming the file.
- :class:`CIHPPersonCrops` (``lipfast/data/cihp.py``): CIHP (SPEC section 11) as
  one single-person sample per annotated person, cropped by SCHP's box rule,
  other people ignored, CIHP's Torso-skin mapped for LIP's class list; then the
  same augmentation and items as :class:`LIPDataset`.
- :class:`MultiSourceDataset`, :class:`SourceSpec`, :func:`parse_source`,
  :func:`build_source` (``lipfast/data/multi.py``): several sources (``lip:ROOT:SPLIT``,
  ``cihp:ROOT:SPLIT``, optionally ``:WEIGHT``) in one epoch, weighted per sample.
- :func:`collate`: batches their items for a ``DataLoader``.
- :func:`warp_back`: maps crop-resolution outputs back to the original image (or
  person crop).
- :func:`lip_palette`: the LIP colour palette for label PNGs.
- :class:`LIPPoseDataset`, :func:`pose_collate` (``lipfast/data/pose.py``): LIP's
  pose track (SPEC section 10): one sample per CSV row, the HRNet pose crop and
  augmentation, ``(image, joints, visible, meta)`` items.
- ``lipfast.data.synthetic``: drawn human-like figures with all 20 LIP classes,
  in the LIP layout, (``--layout cihp``) several per image in the CIHP layout, or
  (``--layout lip-pose``) with their 16 joints in LIP's pose layout.

Everything here runs on the CPU in the data-loader workers (PIL for decoding,
torch for the warps); edge labels are computed on the device by the training
loop with :func:`lipfast.losses.generate_edge`.
"""

from .cihp import CIHPPersonCrops
from .lip import (FLIP_PAIRS, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, LIP_MEAN_BGR,
                  LIP_NUM_CLASSES, LIP_STD_BGR, LIPDataset, collate, crop_hw, denormalize,
                  read_image, read_label)
from .multi import MultiSourceDataset, SourceSpec, build_source, parse_source
from .pose import LIPPoseDataset, pose_collate, read_pose_csv
from .transforms import (affine_matrix, affine_points, box_to_center_scale, flip_matrix,
                         lip_palette, pose_affine_matrix, pose_box_to_center_scale, warp_back,
                         warp_image, warp_label)

__all__ = ["LIPDataset", "CIHPPersonCrops", "MultiSourceDataset", "SourceSpec", "parse_source",
           "build_source", "collate", "crop_hw", "denormalize", "read_image", "read_label",
           "affine_matrix", "box_to_center_scale", "lip_palette", "warp_back", "warp_image",
           "warp_label", "FLIP_PAIRS", "LIP_MEAN_BGR", "LIP_STD_BGR", "IMAGENET_MEAN_RGB",
           "IMAGENET_STD_RGB", "LIP_NUM_CLASSES", "LIPPoseDataset", "pose_collate",
           "read_pose_csv", "pose_affine_matrix", "pose_box_to_center_scale", "flip_matrix",
           "affine_points"]
