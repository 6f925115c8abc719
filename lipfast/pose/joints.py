"""LIP's pose joints (MPII order, ../shared/SPEC.md section 10) and the groups of
the PCKh table. Shared by the pose model, ops, metric, data and tools."""

from __future__ import annotations

# index -> name, MPII order (LIP uses the same 16 joints in the same order)
LIP_JOINTS: tuple[str, ...] = (
    "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle",
    "pelvis", "thorax", "upper_neck", "head_top",
    "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist",
)
NUM_LIP_JOINTS = len(LIP_JOINTS)

# left/right pairs swapped by a horizontal flip
LIP_POSE_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13),
)

# joints 8 and 9, used by the head-size rules of PCKh
UPPER_NECK = 8
HEAD_TOP = 9

# the PCKh table's groups (MPII's evaluation): the mean of a left/right pair,
# Head = head_top alone; "Mean" excludes pelvis and thorax and weights the joints
# by their visible counts
PCKH_GROUPS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("Head", (9,)),
    ("Shoulder", (12, 13)),
    ("Elbow", (11, 14)),
    ("Wrist", (10, 15)),
    ("Hip", (2, 3)),
    ("Knee", (1, 4)),
    ("Ankle", (0, 5)),
)
PCKH_MEAN_EXCLUDES: tuple[int, ...] = (6, 7)


def flip_permutation(num_joints: int = NUM_LIP_JOINTS,
                     pairs=LIP_POSE_FLIP_PAIRS) -> list[int]:
    """perm[j] = the joint that j becomes under a horizontal flip."""
    perm = list(range(num_joints))
    for a, b in pairs:
        if not (0 <= a < num_joints and 0 <= b < num_joints):
            raise ValueError(f"flip pair ({a}, {b}) is out of range for {num_joints} joints")
        perm[a], perm[b] = b, a
    return perm
