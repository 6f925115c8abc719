"""Reference parsing models (SPEC section 5): :class:`CE2P` (CE2P / SCHP's
AugmentCE2P, with PSP or OCNet object-context heads) and local checkpoint loading.
See :mod:`lipfast.models.ce2p` and :mod:`lipfast.models.checkpoint`."""

from .ce2p import CE2P, CONTEXTS, LIP_MEAN, LIP_STD, NORMS, BatchNormAct, Bottleneck
from .checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    load_checkpoint,
    load_imagenet,
    read_state_dict,
)

__all__ = [
    "CE2P",
    "CONTEXTS",
    "NORMS",
    "LIP_MEAN",
    "LIP_STD",
    "BatchNormAct",
    "Bottleneck",
    "CheckpointMismatchError",
    "LoadReport",
    "load_checkpoint",
    "load_imagenet",
    "read_state_dict",
]
