"""lipfast's pose track (SPEC section 10): LIP's 16 joints (:mod:`.joints`), the
fused heatmap loss (:mod:`.heatmap`: :func:`heatmap_loss`, :func:`generate_heatmaps`,
:class:`HeatmapLoss`), fused decoding with the flip test and heatmap ensembles
(:mod:`.decode`: :func:`decode`, :func:`flip_back`, :func:`ensemble`) and PCKh
accumulated on the device (:mod:`.pckh`: :class:`PCKh`, :func:`head_size_mpii`,
:func:`head_size_lip`)."""

from .decode import decode, ensemble, flip_back
from .heatmap import HeatmapLoss, generate_heatmaps, heatmap_loss
from .joints import (HEAD_TOP, LIP_JOINTS, LIP_POSE_FLIP_PAIRS, NUM_LIP_JOINTS, PCKH_GROUPS,
                     PCKH_MEAN_EXCLUDES, UPPER_NECK, flip_permutation)
from .pckh import PCKh, head_size_lip, head_size_mpii

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
    "decode",
    "flip_back",
    "ensemble",
    "PCKh",
    "head_size_mpii",
    "head_size_lip",
]
