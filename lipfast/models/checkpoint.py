"""Reading local checkpoints, and building the model (:class:`lipfast.models.CE2P`,
:class:`lipfast.models.HRNetV2` or the pose model :class:`lipfast.models.PoseHRNet`)
from one.

Nothing is ever downloaded: every function takes a local path. There is one
reader, :func:`read_checkpoint`, under :func:`load_checkpoint`,
:func:`load_imagenet`, :func:`model_from_checkpoint`, ``python -m
lipfast.evaluate`` and ``python -m lipfast.train`` (``--resume``, ``--init``).
Files are read with ``torch.load(path, map_location="cpu", weights_only=True)``
(no arbitrary pickles).

Formats accepted (``Checkpoint.kind``):

- ``"lipfast.train"``: what ``python -m lipfast.train`` writes: a dict with
  ``model`` (the state_dict), ``hparams`` (the model's hyper-parameters and the
  crop size), ``schp_model`` (the self-correction model, or None) and the
  training state.
- ``"schp"``: SCHP's released checkpoints (``exp-schp-201908261155-lip.pth``
  and its ATR / Pascal-Person-Part siblings): a dict whose ``state_dict`` entry
  holds the weights, keys prefixed ``module.`` (saved from DataParallel), plus
  ``epoch`` / ``cycle_n`` / others, which are ignored.
- ``"wrapped"``: any other dict holding the state_dict under ``model``.
- ``"state_dict"``: a plain state_dict (``torch.save(model.state_dict(), path)``).

A ``module.`` prefix (DataParallel / DDP) carried by every key is stripped.

Choosing the model (:func:`infer_config`, :func:`checkpoint_config`): a
lipfast.train checkpoint says its hyper-parameters; for the others they are read
from the keys: ``num_classes`` from the classifier ``fushion.3.weight``
(classes x 256 x 1 x 1), ``context`` from which keys exist
(``context_encoding.stages.*``: PSP; ``context_encoding.2.context.*``: ASP-OC;
``context_encoding.2.up_dr.*``: Pyramid-OC; ``context_encoding.2.stages.0.*``
alone: Base-OC), ``layers`` from the number of Bottlenecks
``layer<i>.<j>.conv1.weight`` in each stage, ``width_mult`` from the channel
counts (stem, layer3/4, decoder). HRNet checkpoints (keys ``stage4.*``,
HRNet-Semantic-Segmentation's or lipfast's ``HRNetV2``): the width from
``transition1.0.0.weight`` (w x 256 x 3 x 3), the head from the classifier
(``last_layer.3.weight``: ``"seg"``; ``fushion.3.weight``: ``"ce2p"``), an OC
context from the same ``context_encoding.2.*`` keys, ``align_corners`` False
(upstream's LIP setting). Pose HRNet checkpoints (deep-high-resolution-net.pytorch's
released bare state dicts, or lipfast's ``PoseHRNet``): an HRNet with the pose
head ``final_layer.weight`` (J x w x 1 x 1: the number of joints J) whose stage-4
last module fuses into branch 0 only (``stage4.<last>.fuse_layers.0.*`` alone);
the width from ``transition1.0.0.weight``; model ``pose_hrnet_w<w>``, norm
``batchnorm`` (upstream's, which their weights were trained with). ImageNet
classification HRNets (``classifier.weight``, no head) are refused with a pointer
to :func:`load_imagenet`. ``output_stride`` and ``norm`` leave no
trace in the keys: they come from the arguments (default 16, SCHP's; norm
``inplace_abn``, whose keys and numerics are those of SCHP's
``InPlaceABNSync`` in one process). An argument that contradicts the keys (or
the stored hyper-parameters) is a :class:`CheckpointMismatchError` naming the
command-line flag and both values.

Pose and parsing models are kept apart: :func:`checkpoint_config` and
:func:`model_from_checkpoint` take ``task="parsing"`` (default: what
``lipfast.evaluate``, ``lipfast.parse``, ``lipfast.export`` and
``lipfast.train --init`` use) or ``task="pose"``; a checkpoint of the other kind
is a :class:`CheckpointMismatchError` saying what it holds.

Errors are Python exceptions naming the file and the offending keys:
``FileNotFoundError`` for a missing file, ``IsADirectoryError`` for a folder,
``ValueError`` for a file that holds no state_dict or a norm statistic
``*.running_var`` that is negative or not finite (refused at load time: it
would turn the outputs into NaN), and :class:`CheckpointMismatchError` (a
``ValueError``) listing missing keys, unexpected keys and shape mismatches
under ``strict``.

``num_batches_tracked`` buffers absent from a checkpoint (the vendored In-Place
ABN of SCHP/CE2P/OCNet has none) are never reported as missing.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["Checkpoint", "CheckpointMismatchError", "LoadReport", "checkpoint_config",
           "infer_config", "load_checkpoint", "load_imagenet", "model_from_checkpoint",
           "read_checkpoint", "read_state_dict"]

_COUNTER = "num_batches_tracked"
_FLAGS = {"num_classes": "--num-classes", "context": "--context", "layers": "--layers",
          "width_mult": "--width-mult", "output_stride": "--output-stride", "norm": "--norm",
          "model": "--model", "head": "--head", "num_joints": "--num-joints"}
KIND_NAMES = {"lipfast.train": "lipfast.train checkpoint", "schp": "SCHP release layout",
              "wrapped": "state_dict under 'model'", "state_dict": "plain state_dict"}


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model (strict loading),
    or whose keys contradict a model hyper-parameter given as an argument."""


@dataclass
class LoadReport:
    """What a load did: ``loaded`` keys, and the ``missing`` / ``unexpected`` /
    ``mismatched`` (key, checkpoint shape, model shape) / ``skipped`` ones."""

    path: str
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"{self.path}: loaded {len(self.loaded)} tensors"]
        if self.skipped:
            lines.append(f"  skipped ({len(self.skipped)}): {_short(self.skipped)}")
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)}): "
                         f"{_short(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}): "
                         f"{_short(self.unexpected)}")
        if self.mismatched:
            lines.append(f"  shape mismatches ({len(self.mismatched)}): " + ", ".join(
                f"{k} checkpoint {tuple(a)} vs model {tuple(b)}"
                for k, a, b in self.mismatched[:20]) + (" ..." if len(self.mismatched) > 20
                                                       else ""))
        return "\n".join(lines)


def _short(keys, n: int = 20) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


@dataclass
class Checkpoint:
    """A checkpoint file, read: ``kind`` (see the module docstring),
    ``state_dict`` (the model's tensors, ``module.`` stripped), ``hparams``
    (lipfast.train's stored hyper-parameters, else None), ``schp_state`` (the
    self-correction model of a lipfast.train checkpoint, else None) and ``raw``
    (the whole object torch.load returned: a lipfast.train checkpoint's
    optimizer, schedule and RNG state for ``--resume``)."""

    path: str
    kind: str
    state_dict: dict
    hparams: dict | None = None
    schp_state: dict | None = None
    raw: object = None

    @property
    def description(self) -> str:
        return KIND_NAMES[self.kind]


def _check_state(obj, path: str, what: str = "") -> dict:
    """``obj`` as a state_dict (str -> tensor), a ``module.`` (DataParallel) or
    ``model.`` (HRNet-Semantic-Segmentation's FullModel) prefix on every key
    stripped, norm variances checked."""
    where = f"{path!r}" + (f" ({what})" if what else "")
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"checkpoint {where} holds no state_dict (expected a dict of tensors, "
                         "or one under 'state_dict' or 'model')")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {where} is not a state_dict: entries that are not "
                         f"tensors: {_short(map(str, bad))}")
    for prefix in ("module.", "model."):  # DataParallel's; HRNet's FullModel wrapper's
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
            break
    for k, v in obj.items():
        if not k.endswith("running_var") or not v.numel():
            continue
        vf = v.detach().double()
        if not bool(torch.isfinite(vf).all()) or bool((vf < 0).any()):
            worst = "not finite" if not bool(torch.isfinite(vf).all()) else "negative"
            n = int((~torch.isfinite(vf) | (vf < 0)).sum())
            raise ValueError(f"checkpoint {where}: norm statistic {k} is {worst} "
                             f"({n} of {v.numel()} values; a variance must be finite and "
                             ">= 0): the file is corrupt or not a trained model")
    return obj


def read_checkpoint(path) -> Checkpoint:
    """Reads the checkpoint at ``path`` (``weights_only=True``) and tells its
    format (see the module docstring); the state_dicts in it are checked."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a folder, not a file (pass the path "
                                "of the .pth file, e.g. <out>/checkpoint.pth)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} (lipfast never downloads "
                                "weights; pass the path of a local file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text suggests weights_only=False: lipfast never does that
        why = str(exc).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        why = " ".join(why.split()) or type(exc).__name__
        raise ValueError(
            f"cannot read checkpoint {path!r}: torch.load(weights_only=True) refused it ({why}): "
            "it is not a PyTorch checkpoint, it is damaged, or it holds pickled Python objects, "
            "which lipfast never loads (loading them could run code)") from exc
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "hparams" in obj:
        hp = obj["hparams"]
        if not isinstance(hp, dict):
            raise ValueError(f"checkpoint {path!r}: 'hparams' is not a dict")
        schp = obj.get("schp_model")
        return Checkpoint(path, "lipfast.train", _check_state(obj["model"], path, "model"),
                          hparams=dict(hp),
                          schp_state=None if schp is None else _check_state(schp, path,
                                                                             "schp_model"),
                          raw=obj)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return Checkpoint(path, "schp", _check_state(obj["state_dict"], path), raw=obj)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return Checkpoint(path, "wrapped", _check_state(obj["model"], path), raw=obj)
    return Checkpoint(path, "state_dict", _check_state(obj, path), raw=obj)


def read_state_dict(path) -> dict:
    """The state_dict in the file at ``path`` (see the module docstring), with a
    ``module.`` prefix stripped (a lipfast.train checkpoint: its ``model``)."""
    return read_checkpoint(path).state_dict


# ----------------------------------------------------------------- model from keys

_CLASSIFIER = "fushion.3.weight"
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.conv1\.weight$")
# width of the model's layers at width_mult 1 -> key whose dim 0 has that width
_WIDTH_KEYS = ((512, "layer4.0.conv1.weight"), (256, "layer3.0.conv1.weight"),
               (128, "conv3.weight"), (64, "conv1.weight"), (48, "decoder.conv2.0.weight"))


def _width(c: int, mult: float) -> int:
    return max(1, int(round(c * mult)))  # as CE2P


def _context_of(keys) -> str | None:
    if "context_encoding.stages.0.1.weight" in keys:
        return "psp"
    if any(k.startswith("context_encoding.2.context.") for k in keys):
        return "asp_oc"
    if any(k.startswith("context_encoding.2.up_dr.") for k in keys):
        return "pyramid_oc"
    if any(k.startswith("context_encoding.2.stages.0.") for k in keys):
        return "base_oc"
    return None


def infer_config(state_dict: dict, path: str = "checkpoint") -> dict:
    """The model a state_dict belongs to, read from its keys (see the module
    docstring): ``model`` (a :data:`lipfast.models.MODEL_NAMES` or
    :data:`~lipfast.models.POSE_MODEL_NAMES` entry) with, for CE2P,
    ``num_classes``, ``context``, ``layers`` and ``width_mult``, for HRNetV2,
    ``num_classes``, ``head`` and ``context``, for PoseHRNet ``num_joints``.
    ``ValueError`` naming what is missing for a state_dict of another network."""
    keys = set(state_dict)
    if _HRNET_WIDTH_KEY in keys or any(k.startswith("stage4.") for k in keys):
        return _infer_hrnet(state_dict, path)
    if _CLASSIFIER not in keys or state_dict[_CLASSIFIER].dim() != 4:
        raise ValueError(f"{path}: not a CE2P/SCHP, HRNetV2 or pose HRNet state_dict: no "
                         f"classifier "
                         f"{_CLASSIFIER} (classes x C x 1 x 1) among its {len(keys)} keys "
                         f"({_short(sorted(keys), 5)})")
    num_classes = int(state_dict[_CLASSIFIER].shape[0])
    context = _context_of(keys)
    if context is None:
        ctx = sorted(k for k in keys if k.startswith("context_encoding."))
        raise ValueError(f"{path}: cannot tell the context module from the keys "
                         f"(context_encoding keys: {_short(ctx, 5) or 'none'}); expected PSP "
                         "(context_encoding.stages.*) or an OC head (context_encoding.2.*)")
    blocks = {i: set() for i in range(1, 5)}
    for k in keys:
        m = _BLOCK.match(k)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    layers = []
    for i in range(1, 5):
        n = len(blocks[i])
        if n == 0 or blocks[i] != set(range(n)):
            raise ValueError(f"{path}: layer{i} Bottlenecks are not numbered 0..n-1 "
                             f"(found {sorted(blocks[i])}): not a CE2P/SCHP state_dict")
        layers.append(n)
    widths = {}
    for base, key in _WIDTH_KEYS:
        if key not in state_dict:
            raise ValueError(f"{path}: not a CE2P/SCHP state_dict: no {key}")
        widths[base] = int(state_dict[key].shape[0])
    for base, _ in _WIDTH_KEYS:
        mult = widths[base] / base
        if all(_width(b, mult) == w for b, w in widths.items()):
            break
    else:
        raise ValueError(f"{path}: no width_mult gives the channel counts "
                         + ", ".join(f"{k} {widths[b]}" for b, k in _WIDTH_KEYS))
    return {"model": "ce2p", "num_classes": num_classes, "context": context, "layers": layers,
            "width_mult": mult}


_HRNET_WIDTH_KEY = "transition1.0.0.weight"   # width x 256 x 3 x 3
_POSE_HEAD = "final_layer.weight"              # joints x width x 1 x 1
_STAGE4_FUSE = re.compile(r"^stage4\.(\d+)\.fuse_layers\.(\d+)\.")
_STAGE4_MODULE = re.compile(r"^stage4\.(\d+)\.")


def _infer_pose(state_dict: dict, path: str, width: int) -> dict:
    from .pose_hrnet import POSE_HRNET_WIDTHS

    head = state_dict[_POSE_HEAD]
    if head.dim() != 4 or tuple(head.shape[1:]) != (width, 1, 1):
        raise ValueError(f"{path}: pose head {_POSE_HEAD} has shape {tuple(head.shape)}; a pose "
                         f"HRNet of width {width} ({_HRNET_WIDTH_KEY} "
                         f"{tuple(state_dict[_HRNET_WIDTH_KEY].shape)}) has joints x {width} "
                         "x 1 x 1")
    if width not in POSE_HRNET_WIDTHS:
        raise ValueError(f"{path}: pose HRNet of width {width} ({_HRNET_WIDTH_KEY} "
                         f"{tuple(state_dict[_HRNET_WIDTH_KEY].shape)}); lipfast builds "
                         f"widths {', '.join(map(str, POSE_HRNET_WIDTHS))}")
    modules = {int(m.group(1)) for m in map(_STAGE4_MODULE.match, state_dict) if m}
    if not modules:
        raise ValueError(f"{path}: a pose head {_POSE_HEAD} but no stage4.* keys: not a pose "
                         "HRNet state_dict")
    last = max(modules)
    rows = sorted({int(m.group(2)) for m in map(_STAGE4_FUSE.match, state_dict)
                   if m and int(m.group(1)) == last})
    if rows != [0]:
        raise ValueError(f"{path}: a pose head {_POSE_HEAD}, but stage 4's last module "
                         f"stage4.{last} fuses into branches {rows}; the pose HRNet's last "
                         f"module outputs branch 0 only (stage4.{last}.fuse_layers.0.* alone)")
    return {"model": f"pose_hrnet_w{width}", "num_joints": int(head.shape[0])}


def _infer_hrnet(state_dict: dict, path: str) -> dict:
    from .hrnet import HRNET_WIDTHS

    keys = set(state_dict)
    if _HRNET_WIDTH_KEY not in keys:
        raise ValueError(f"{path}: an HRNet state_dict without {_HRNET_WIDTH_KEY} "
                         "(the first branch's transition): cannot tell its width")
    width = int(state_dict[_HRNET_WIDTH_KEY].shape[0])
    if _POSE_HEAD in keys:
        return _infer_pose(state_dict, path, width)
    if ("classifier.weight" in keys and "last_layer.3.weight" not in keys
            and _CLASSIFIER not in keys):
        raise ValueError(f"{path}: an ImageNet classification HRNet (classifier.weight "
                         f"{tuple(state_dict['classifier.weight'].shape)}, no segmentation or "
                         "pose head): it initialises a backbone through "
                         "lipfast.models.load_imagenet; it is not a model to build")
    if width not in HRNET_WIDTHS:
        raise ValueError(f"{path}: HRNet of width {width} ({_HRNET_WIDTH_KEY} "
                         f"{tuple(state_dict[_HRNET_WIDTH_KEY].shape)}); lipfast builds "
                         f"widths {', '.join(map(str, HRNET_WIDTHS))}")
    if "last_layer.3.weight" in keys:
        head, cls_key = "seg", "last_layer.3.weight"
    elif _CLASSIFIER in keys:
        head, cls_key = "ce2p", _CLASSIFIER
    else:
        raise ValueError(f"{path}: HRNet state_dict with neither head: no last_layer.3.weight "
                         f"(head 'seg') nor {_CLASSIFIER} (head 'ce2p')")
    context = _context_of(keys)
    if context is None and any(k.startswith("context_encoding.") for k in keys):
        ctx = sorted(k for k in keys if k.startswith("context_encoding."))
        raise ValueError(f"{path}: cannot tell the OC context from the keys ({_short(ctx, 5)})")
    if context == "psp":
        raise ValueError(f"{path}: an HRNet with a PSP context: lipfast's HRNetV2 takes "
                         "OC contexts only")
    return {"model": f"hrnetv2_w{width}", "num_classes": int(state_dict[cls_key].shape[0]),
            "head": head, "context": context}


def _eval_norm(norm: str) -> str:
    return "inplace_abn" if norm == "inplace_abn_sync" else norm


def _mismatch_reason(name: str, have, sd: dict) -> str:
    if name == "num_classes":
        for key in (_CLASSIFIER, "last_layer.3.weight"):
            if key in sd:
                return f"its classifier {key} has {have} classes (shape {tuple(sd[key].shape)})"
        return f"it has {have} classes"
    if name == "model":
        return f"it holds a {have} model"
    if name == "context":
        return f"its keys are those of a {have} context"
    if name == "head":
        return f"its keys are those of the {have!r} head"
    if name == "num_joints":
        if _POSE_HEAD in sd:
            return f"its {_POSE_HEAD} has {have} joints (shape {tuple(sd[_POSE_HEAD].shape)})"
        return f"it has {have} joints"
    if name == "layers":
        return f"it has {', '.join(map(str, have))} Bottlenecks in layer1..4"
    if name == "width_mult":
        return f"its channel counts are those of width_mult {float(have):g}"
    return f"it was trained with output stride {have}"


#: flags that only CE2P / only HRNetV2 has
_CE2P_ONLY = ("layers", "width_mult", "output_stride")
_HRNET_ONLY = ("head",)
#: flags of the parsing models only / of the pose models only
_PARSING_ONLY = ("num_classes", "context", "head") + _CE2P_ONLY
_POSE_ONLY = ("num_joints",)
TASKS = ("parsing", "pose")


def _option_of(name: str) -> str:
    if name in _POSE_ONLY:
        return "pose model (PoseHRNet)"
    if name in _HRNET_ONLY:
        return "HRNetV2"
    if name in _CE2P_ONLY:
        return "CE2P"
    return "parsing model"


def _check_task(cfg: dict, task: str, path: str, description: str, source: str) -> bool:
    """True for a pose config; CheckpointMismatchError if it is not of ``task``."""
    from .registry import POSE_MODEL_NAMES

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    pose = cfg["model"] in POSE_MODEL_NAMES
    if pose and task == "parsing":
        raise CheckpointMismatchError(
            f"checkpoint {path!r} ({description}) holds a pose model by its {source} "
            f"({cfg['model']}, {cfg['num_joints']} joint heatmaps), not a parsing model: the "
            "parsing tools take ce2p / hrnetv2_w* checkpoints (load a pose model with "
            "task='pose')")
    if not pose and task == "pose":
        raise CheckpointMismatchError(
            f"checkpoint {path!r} ({description}) holds a parsing model by its {source} "
            f"({cfg['model']}, {cfg['num_classes']} classes), not a pose model "
            "(pose_hrnet_w32 / pose_hrnet_w48)")
    return pose


def checkpoint_config(ckpt: Checkpoint, num_classes=None, context=None, layers=None,
                      width_mult=None, output_stride=None, norm=None, model=None,
                      head=None, num_joints=None, task: str = "parsing") -> dict:
    """The model and its hyper-parameters for the checkpoint: ``model`` (a
    :data:`lipfast.models.MODEL_NAMES` entry) and what
    :func:`lipfast.models.build_from_hparams` takes (CE2P: ``num_classes``,
    ``context``, ``output_stride``, ``layers``, ``width_mult``, ``norm``;
    HRNetV2: ``num_classes``, ``head``, ``context``, ``norm``,
    ``align_corners``): lipfast.train's stored ones, else those read from the
    keys (:func:`infer_config`) with ``output_stride`` (default 16) and
    ``norm`` from the arguments (HRNetV2: ``align_corners`` False, upstream's).
    An argument given (not None) must agree with the stored / inferred value
    (:class:`CheckpointMismatchError` naming the flag); so must the model kind
    of a CE2P-only (``layers``, ``width_mult``, ``output_stride``) or
    HRNet-only (``head``) argument. ``norm`` is free (all norms share keys and
    numerics; default: the stored one, ``inplace_abn_sync`` as
    ``inplace_abn``).

    ``task``: ``"parsing"`` (default) or ``"pose"``; a checkpoint of the other kind
    is a :class:`CheckpointMismatchError`. A pose checkpoint gives ``model``
    (``pose_hrnet_w32`` / ``pose_hrnet_w48``), ``num_joints`` and ``norm``
    (default from the keys: ``batchnorm``, upstream's); ``num_joints`` must agree
    with it, and the parsing arguments do not apply (nor ``num_joints`` to a
    parsing checkpoint)."""
    from .registry import required_hparams

    given = {"model": model, "num_classes": num_classes, "context": context, "head": head,
             "layers": None if layers is None else [int(v) for v in layers],
             "width_mult": width_mult, "output_stride": output_stride,
             "num_joints": num_joints}
    if ckpt.hparams is not None:
        name = ckpt.hparams.get("model", "ce2p")
        try:
            keys = required_hparams(name)
        except ValueError as err:
            raise ValueError(f"{ckpt.path}: lipfast.train checkpoint of an {err}") from None
        missing = [k for k in keys if k not in ckpt.hparams]
        if missing:
            raise ValueError(f"{ckpt.path}: lipfast.train checkpoint whose hparams lack "
                             f"{missing}")
        cfg = {"model": name, **{k: ckpt.hparams[k] for k in keys}}
        source = "stored hyper-parameters"
    else:
        cfg = infer_config(ckpt.state_dict, ckpt.path)
        if cfg["model"] == "ce2p":
            cfg["output_stride"] = 16 if output_stride is None else output_stride
            cfg["norm"] = "inplace_abn"
        elif "num_joints" in cfg:   # a pose HRNet: upstream's BatchNorm
            cfg["norm"] = "batchnorm"
        else:
            cfg["align_corners"] = False
            cfg["norm"] = "inplace_abn"
        source = "keys"
    pose = _check_task(cfg, task, ckpt.path, ckpt.description, source)
    is_ce2p = cfg["model"] == "ce2p"
    sd = ckpt.state_dict
    if pose:
        not_here = _PARSING_ONLY
    else:
        not_here = (_HRNET_ONLY if is_ce2p else _CE2P_ONLY) + _POSE_ONLY
    for name, value in given.items():
        if value is None:
            continue
        if name in not_here:
            raise CheckpointMismatchError(
                f"{_FLAGS[name]} does not apply to checkpoint {ckpt.path!r} ({ckpt.description},"
                f" a {cfg['model']} model by its {source}): it is a "
                + _option_of(name) + " option; drop the flag")
        have = cfg[name]
        if name == "width_mult":
            same = all(_width(b, float(value)) == _width(b, float(have)) for b, _ in _WIDTH_KEYS)
        elif name == "layers":
            same = [int(v) for v in value] == [int(v) for v in have]
        else:
            same = value == have
        if same:
            continue
        why = _mismatch_reason(name, have, sd)
        shown = ", ".join(map(str, value)) if name == "layers" else value
        raise CheckpointMismatchError(
            f"{_FLAGS[name]} {shown} does not match checkpoint {ckpt.path!r} "
            f"({ckpt.description}, by its {source}): {why}; drop the flag or pass "
            "the checkpoint's value")
    cfg["norm"] = norm if norm is not None else _eval_norm(str(cfg["norm"]))
    if pose:
        cfg["num_joints"] = int(cfg["num_joints"])
        return cfg
    cfg["num_classes"] = int(cfg["num_classes"])
    if is_ce2p:
        cfg["layers"] = [int(v) for v in cfg["layers"]]
        cfg["width_mult"] = float(cfg["width_mult"])
        cfg["output_stride"] = int(cfg["output_stride"])
    else:
        cfg["align_corners"] = bool(cfg["align_corners"])
    return cfg


def model_from_checkpoint(path, *, which: str = "model", num_classes=None, context=None,
                          layers=None, width_mult=None, output_stride=None, norm=None,
                          model=None, head=None, num_joints=None, task: str = "parsing"):
    """``(model in eval mode on the CPU, config)`` for the checkpoint at ``path``
    (any format of the module docstring): a CE2P or an HRNetV2 (``task="parsing"``,
    default) or a PoseHRNet (``task="pose"``) as :func:`checkpoint_config`
    chooses, loaded strictly. ``which="schp_model"`` takes the self-correction
    model of a lipfast.train checkpoint."""
    from .registry import build_from_hparams

    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    cfg = checkpoint_config(ckpt, num_classes=num_classes, context=context, layers=layers,
                            width_mult=width_mult, output_stride=output_stride, norm=norm,
                            model=model, head=head, num_joints=num_joints, task=task)
    if which == "model":
        state = ckpt.state_dict
    elif which == "schp_model":
        if ckpt.schp_state is None:
            raise ValueError(
                f"{ckpt.path} holds no self-correction (SCHP) model: "
                + ("train with --cycles" if ckpt.kind == "lipfast.train" else
                   f"a {ckpt.description} holds one model, evaluate it without --schp "
                   "(SCHP's released weights are already the self-corrected model)"))
        state = ckpt.schp_state
    else:
        raise ValueError(f"which must be 'model' or 'schp_model', got {which!r}")
    net = build_from_hparams(cfg)
    _load(net, state, ckpt.path, True, [])
    return net.eval(), cfg


# ----------------------------------------------------------------- loading into a model

def _load(model: nn.Module, state: dict, path: str, strict: bool, skipped: list,
          only_prefixes: tuple | None = None) -> LoadReport:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    own = model.state_dict(keep_vars=True)
    if only_prefixes is not None:
        own = {k: v for k, v in own.items() if k.split(".", 1)[0] in only_prefixes}
    report = LoadReport(path=path, skipped=list(skipped))
    report.unexpected = sorted(k for k in state if k not in own)
    report.missing = sorted(k for k in own if k not in state and not k.endswith(_COUNTER))
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
    if strict and not report.ok:
        raise CheckpointMismatchError(
            f"checkpoint does not match {type(model).__name__}:\n{report}")
    bad = {k for k, _, _ in report.mismatched}
    usable = {k: v for k, v in state.items() if k in own and k not in bad}
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    return report


def load_checkpoint(model: nn.Module, path, strict: bool = True) -> LoadReport:
    """Loads the checkpoint at ``path`` (any format of the module docstring; a
    lipfast.train checkpoint gives its ``model``) into ``model`` (in place) and
    returns a :class:`LoadReport`. ``strict=True`` raises
    :class:`CheckpointMismatchError` listing missing / unexpected keys and shape
    mismatches before anything is copied; ``strict=False`` loads the matching
    tensors and reports the rest. ``path`` may also be a :class:`Checkpoint`
    already read."""
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    return _load(model, ckpt.state_dict, ckpt.path, strict, [])


_BACKBONE = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "layer1", "layer2", "layer3",
             "layer4")


def load_imagenet(model: nn.Module, path, strict: bool = True) -> LoadReport:
    """Initialises the backbone of ``model`` (a :class:`CE2P`) from an ImageNet
    ResNet checkpoint with the deep-stem key names (``resnet101-imagenet.pth``):
    keys starting with ``fc`` are skipped (reported as ``skipped``), every other
    key must be a backbone key of the model (stem, ``layer1..4``) and every
    backbone key must be present, with equal shapes, under ``strict``. The heads
    keep their initialisation.

    For an :class:`~lipfast.models.HRNetV2`, HRNet-Semantic-Segmentation's
    ``hrnetv2_w48_imagenet_pretrained.pth``: its classifier-only keys
    (``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``)
    are skipped (and reported), every other key must be one of the model's
    backbone (stem, ``layer1``, ``transition1..3``, ``stage2..4``) and, under
    ``strict``, every backbone key present; the heads (``last_layer``, or CE2P's
    edge / decoder / fusion) and a context keep their initialisation.

    For a :class:`~lipfast.models.PoseHRNet`, deep-high-resolution-net.pytorch's
    ``hrnet_w32-36af842e.pth`` (HRNet-Image-Classification's layout): only keys
    under the backbone (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``layer1``,
    ``transition1..3``, ``stage2..4``) are copied; the classifier-only ones
    (``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``)
    and stage 4's last-module fuse layers into branches 1-3
    (``stage4.<last>.fuse_layers.{1,2,3}.*``, which the pose model does not have:
    its last module outputs branch 0 only) are skipped and reported; the pose
    head ``final_layer`` keeps its initialisation."""
    from .hrnet import HRNET_BACKBONE, HRNET_IMAGENET_ONLY, HRNetV2
    from .pose_hrnet import PoseHRNet

    state = read_state_dict(path)
    if isinstance(model, PoseHRNet):
        last = len(model.stage4) - 1

        def unused(k):
            m = _STAGE4_FUSE.match(k)
            return (k.split(".", 1)[0] in HRNET_IMAGENET_ONLY
                    or (m is not None and int(m.group(1)) == last and int(m.group(2)) > 0))

        skipped = sorted(k for k in state if unused(k))
        state = {k: v for k, v in state.items() if not unused(k)}
        return _load(model, state, os.fspath(path), strict, skipped,
                     only_prefixes=HRNET_BACKBONE)
    if isinstance(model, HRNetV2):
        skipped = sorted(k for k in state if k.split(".", 1)[0] in HRNET_IMAGENET_ONLY)
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in HRNET_IMAGENET_ONLY}
        return _load(model, state, os.fspath(path), strict, skipped,
                     only_prefixes=HRNET_BACKBONE)
    skipped = sorted(k for k in state if k.split(".", 1)[0] == "fc")
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] != "fc"}
    return _load(model, state, os.fspath(path), strict, skipped, only_prefixes=_BACKBONE)
