"""Reference parsing models (SPEC section 5): :class:`CE2P` (CE2P / SCHP's
AugmentCE2P, with PSP or OCNet object-context heads) and local checkpoint
reading: lipfast.train checkpoints, SCHP's released checkpoints and plain
state_dicts, the model chosen from the keys (:func:`model_from_checkpoint`);
:func:`fold_norms` (norms folded into the convolutions, for inference and
export); :class:`HRNetV2` (HRNet-Semantic-Segmentation's segmentation HRNet,
key for key, with lipfast's norms, and CE2P's edge and fusion head;
:mod:`lipfast.models.hrnet`); :class:`PoseHRNet` (deep-high-resolution-net.pytorch's
pose HRNet, key for key; :mod:`lipfast.models.pose_hrnet`); :func:`build` (a model
by the name the tools use: ``ce2p``, ``hrnetv2_w18/32/48``; the pose models
``pose_hrnet_w32/48``, :data:`POSE_MODEL_NAMES`), :func:`model_hparams` /
:func:`build_from_hparams` (what checkpoints store), :func:`input_format`
(BGR/RGB and mean/std of a model's input; :mod:`lipfast.models.registry`).
See :mod:`lipfast.models.ce2p` and :mod:`lipfast.models.checkpoint`."""

from .ce2p import CE2P, CONTEXTS, LIP_MEAN, LIP_STD, NORMS, BatchNormAct, Bottleneck
from .checkpoint import (
    Checkpoint,
    CheckpointMismatchError,
    LoadReport,
    checkpoint_config,
    infer_config,
    load_checkpoint,
    load_imagenet,
    model_from_checkpoint,
    read_checkpoint,
    read_state_dict,
)
from .fold import fold_norms
from .hrnet import HRNET_MEAN, HRNET_STD, HRNetV2
from .pose_hrnet import PoseHRNet
from .registry import (MODEL_NAMES, POSE_MODEL_NAMES, build, build_from_hparams, convert_input,
                       input_format, is_pose_model, model_hparams, model_name, parsing_logits)

__all__ = [
    "CE2P",
    "CONTEXTS",
    "NORMS",
    "LIP_MEAN",
    "LIP_STD",
    "BatchNormAct",
    "Bottleneck",
    "Checkpoint",
    "CheckpointMismatchError",
    "LoadReport",
    "checkpoint_config",
    "infer_config",
    "load_checkpoint",
    "load_imagenet",
    "fold_norms",
    "HRNetV2",
    "HRNET_MEAN",
    "HRNET_STD",
    "PoseHRNet",
    "POSE_MODEL_NAMES",
    "is_pose_model",
    "model_from_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "MODEL_NAMES",
    "build",
    "build_from_hparams",
    "convert_input",
    "input_format",
    "model_hparams",
    "model_name",
    "parsing_logits",
]
