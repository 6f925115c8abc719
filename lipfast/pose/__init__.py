"""lipfast's pose track (SPEC section 10): LIP's 16 joints, fused heatmap loss
and decoding, PCKh."""

from .heatmap import HeatmapLoss, generate_heatmaps, heatmap_loss
from .joints import (HEAD_TOP, LIP_JOINTS, LIP_POSE_FLIP_PAIRS, NUM_LIP_JOINTS, PCKH_GROUPS,
                     PCKH_MEAN_EXCLUDES, UPPER_NECK, flip_permutation)

__all__ = [
    "LIP_JOINTS",
    "NUM_LIP_JOINTS",
    "LIP_POSE_FLIP_PAIRS",
    "UPPER_NECK",
    "HEAD_TOP",
    "PCKH_GROUPS",
    "PCKH_MEAN_EXCLUDES",
    "flip_permutation",
    "heatmap_loss",
    "generate_heatmaps",
    "HeatmapLoss",
]
