"""Model names, as the command-line tools use them, and the hyper-parameters
that rebuild a model.

Names (:data:`MODEL_NAMES`):

- ``"ce2p"``: :class:`lipfast.models.CE2P` (ResNet-101 CE2P / SCHP, PSP or OC
  context; ``context``, ``output_stride``, ``layers``, ``width_mult``).
- ``"hrnetv2_w18"``, ``"hrnetv2_w32"``, ``"hrnetv2_w48"``:
  :class:`lipfast.models.HRNetV2` of that width (``head``, ``context``,
  ``align_corners``).

Pose models (:data:`POSE_MODEL_NAMES`, kept apart from the parsing models of
:data:`MODEL_NAMES`, which the parsing tools' ``--model`` choices are):

- ``"pose_hrnet_w32"``, ``"pose_hrnet_w48"``: :class:`lipfast.models.PoseHRNet`
  of that width (``num_joints`` instead of ``num_classes``, ``norm``,
  ``fuse_relu_conv``).

:func:`build`, :func:`model_name`, :func:`model_hparams`,
:func:`build_from_hparams`, :func:`required_hparams`, :func:`describe_hparams`
and :func:`input_format` take both kinds; the parsing-only helpers
(:func:`logits_align_corners`, :func:`full_size_logits`, :func:`parsing_logits`
given the model) refuse a pose model with a ``TypeError``, and
:func:`lipfast.models.model_from_checkpoint` / ``checkpoint_config`` refuse a
pose checkpoint unless asked for one (``task="pose"``). :func:`is_pose_model`
tells them apart.

:func:`build` makes one: ``build("hrnetv2_w48", num_classes=20, head="ce2p")``.
``build("pose_hrnet_w32", num_joints=16)``.
Keyword arguments go to the constructor; one the model does not take is a
``TypeError`` naming the model and the arguments it takes.

:func:`model_hparams` / :func:`build_from_hparams`: the dict a lipfast.train
checkpoint stores under ``hparams`` (``model`` plus the constructor arguments)
and the model rebuilt from it. Checkpoints written before HRNet existed carry
no ``model`` entry: they are CE2P.

:func:`input_format`: ``(channel order, mean, std)`` of a model's input
(CE2P: BGR with SCHP's mean/std; HRNetV2 and PoseHRNet: RGB with ImageNet's, as
HRNet-Semantic-Segmentation and deep-high-resolution-net.pytorch), which the data
sets, ``lipfast.evaluate`` and ``lipfast.parse`` follow; :func:`convert_input`
re-normalises a batch from one format to another (ensembles of both kinds).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

__all__ = ["MODEL_NAMES", "POSE_MODEL_NAMES", "is_pose_model", "build", "model_name",
           "model_hparams", "build_from_hparams",
           "input_format", "convert_input", "parsing_logits", "describe_hparams",
           "logits_align_corners", "full_size_logits", "required_hparams", "HPARAMS"]

#: the parsing models (what the parsing tools' ``--model`` takes)
MODEL_NAMES = ("ce2p", "hrnetv2_w18", "hrnetv2_w32", "hrnetv2_w48")
#: the pose models (heatmaps of joints, not parsing logits)
POSE_MODEL_NAMES = ("pose_hrnet_w32", "pose_hrnet_w48")
_ALL_NAMES = MODEL_NAMES + POSE_MODEL_NAMES
#: the entries of ``hparams`` that rebuild each kind of model (besides ``model``)
HPARAMS = {
    "ce2p": ("num_classes", "context", "output_stride", "layers", "width_mult", "norm"),
    "hrnetv2": ("num_classes", "head", "context", "norm", "align_corners"),
    "pose_hrnet": ("num_joints", "norm"),
}
_DEFAULT_CLASSES = 20


def _kind(name: str) -> str:
    if not isinstance(name, str) or name not in _ALL_NAMES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(_ALL_NAMES)}")
    if name == "ce2p":
        return "ce2p"
    return "pose_hrnet" if name in POSE_MODEL_NAMES else "hrnetv2"


def _classes():
    from .ce2p import CE2P
    from .hrnet import HRNetV2
    from .pose_hrnet import PoseHRNet

    return {"ce2p": CE2P, "hrnetv2": HRNetV2, "pose_hrnet": PoseHRNet}


def is_pose_model(model) -> bool:
    """Whether ``model`` (a built model, possibly torch.compile'd, a model name or a
    hyper-parameter dict) is a pose model (:data:`POSE_MODEL_NAMES`)."""
    if isinstance(model, nn.Module):
        from .pose_hrnet import PoseHRNet

        return isinstance(getattr(model, "_orig_mod", model), PoseHRNet)
    if isinstance(model, dict):
        model = model.get("model", "ce2p")
    return model in POSE_MODEL_NAMES


def _refuse_pose(model, what: str) -> None:
    if is_pose_model(model):
        inner = getattr(model, "_orig_mod", model)
        raise TypeError(f"{what} takes a parsing model; got a pose model "
                        f"({type(inner).__name__}, {model_name(inner)}), whose output is "
                        f"{inner.num_joints} joint heatmaps, not parsing logits")


def build(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """The model called ``name`` (see the module docstring), in train mode on the CPU.
    ``num_classes`` (parsing models; default 20) does not apply to the pose models,
    which take ``num_joints`` (default 16)."""
    kind = _kind(name)
    cls = _classes()[kind]
    if kind != "ce2p":
        if "width" in kwargs and kwargs["width"] != int(name.rsplit("w", 1)[1]):
            raise ValueError(f"{name}: width={kwargs['width']!r} contradicts the model name")
        kwargs["width"] = int(name.rsplit("w", 1)[1])
    if kind == "pose_hrnet":
        takes = list(inspect.signature(cls).parameters)
        if num_classes is not None:
            raise TypeError(f"model {name!r} ({cls.__name__}) is a pose model: it takes no "
                            f"argument num_classes (pass num_joints); it takes "
                            f"{', '.join(takes)}")
    else:
        takes = [p for p in inspect.signature(cls).parameters if p != "num_classes"]
    unknown = sorted(set(kwargs) - set(takes))
    if unknown:
        raise TypeError(f"model {name!r} ({cls.__name__}) takes no argument "
                        f"{', '.join(unknown)}; it takes {', '.join(takes)}")
    if kind == "pose_hrnet":
        return cls(**kwargs)
    return cls(num_classes=_DEFAULT_CLASSES if num_classes is None else num_classes, **kwargs)


def model_name(model: nn.Module) -> str:
    """The :data:`MODEL_NAMES` (or :data:`POSE_MODEL_NAMES`) entry of a built model."""
    from .ce2p import CE2P
    from .hrnet import HRNetV2
    from .pose_hrnet import PoseHRNet

    if isinstance(model, CE2P):
        return "ce2p"
    if isinstance(model, HRNetV2):
        return f"hrnetv2_w{model.width}"
    if isinstance(model, PoseHRNet):
        return f"pose_hrnet_w{model.width}"
    raise TypeError(f"not a lipfast parsing model (nor a pose model): {type(model).__name__}")


def model_hparams(model: nn.Module) -> dict:
    """``{"model": name, <constructor arguments>}`` of a built model (what
    :func:`build_from_hparams` takes)."""
    name = model_name(model)
    if name == "ce2p":
        return {"model": name, "num_classes": int(model.num_classes),
                "context": str(model.context), "output_stride": int(model.output_stride),
                "layers": [int(v) for v in model.layers],
                "width_mult": float(model.width_mult), "norm": str(model.norm)}
    if name in POSE_MODEL_NAMES:
        return {"model": name, "num_joints": int(model.num_joints), "norm": str(model.norm)}
    return {"model": name, "num_classes": int(model.num_classes), "head": str(model.head),
            "context": None if model.context is None else str(model.context),
            "norm": str(model.norm), "align_corners": bool(model.align_corners)}


def required_hparams(name: str) -> tuple:
    """The ``hparams`` entries (besides ``model``) that rebuild the model ``name``."""
    return HPARAMS[_kind(name)]


def build_from_hparams(hparams: dict, norm: str | None = None) -> nn.Module:
    """The model of stored hyper-parameters; ``norm`` overrides the stored norm
    (all norms share keys and numerics). No ``model`` entry: CE2P."""
    if not isinstance(hparams, dict):
        raise ValueError(f"model hyper-parameters must be a dict, got {type(hparams).__name__}")
    name = hparams.get("model", "ce2p")
    keys = required_hparams(name)
    missing = [k for k in keys if k not in hparams]
    if missing:
        raise ValueError(f"checkpoint hyper-parameters of a {name} model lack {missing}")
    hp = {k: hparams[k] for k in keys}
    if norm is not None:
        hp["norm"] = norm
    if name == "ce2p":
        hp["layers"] = tuple(int(v) for v in hp["layers"])
        hp["width_mult"] = float(hp["width_mult"])
        hp["output_stride"] = int(hp["output_stride"])
    if name in POSE_MODEL_NAMES:
        hp["num_joints"] = int(hp["num_joints"])
    else:
        hp["num_classes"] = int(hp["num_classes"])
    return build(name, **hp)


def describe_hparams(hp: dict) -> str:
    """One line naming the model of a hyper-parameter dict (for the tools' logs)."""
    name = hp.get("model", "ce2p")
    if name == "ce2p":
        return (f"CE2P {hp['context']}, {hp['num_classes']} classes, layers "
                f"{','.join(map(str, hp['layers']))}, width {float(hp['width_mult']):g}, "
                f"output stride {hp['output_stride']}, norm {hp['norm']}")
    if name in POSE_MODEL_NAMES:
        return (f"PoseHRNet-W{name.rsplit('w', 1)[1]}, {hp['num_joints']} joints, "
                f"norm {hp['norm']}")
    return (f"HRNetV2-W{name.rsplit('w', 1)[1]}, head {hp['head']}, context "
            f"{hp['context'] or 'none'}, {hp['num_classes']} classes, norm {hp['norm']}, "
            f"align_corners {hp['align_corners']}")


def input_format(model) -> tuple:
    """``(order, mean, std)`` of the input ``model`` expects: a built model, a
    model name or a hyper-parameter dict. ``order`` is ``"BGR"`` or ``"RGB"``;
    the image in [0, 1] in that order is normalised with ``mean`` / ``std``."""
    if isinstance(model, nn.Module):
        inner = getattr(model, "_orig_mod", model)   # torch.compile's wrapper
        if not hasattr(inner, "input_order"):
            model_name(inner)                        # TypeError naming the class
        src = inner
    else:
        src = _classes()[_kind(model.get("model", "ce2p") if isinstance(model, dict)
                               else model)]
    return str(src.input_order), tuple(src.input_mean), tuple(src.input_std)


def convert_input(x: torch.Tensor, src: tuple, dst: tuple) -> torch.Tensor:
    """A B x 3 x H x W batch normalised as ``src`` (an :func:`input_format`
    triple) re-normalised as ``dst`` (the channel order swapped if they differ)."""
    if tuple(src) == tuple(dst):
        return x
    (so, sm, ss), (do, dm, ds) = src, dst

    def col(v):
        return torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)

    y = x * col(ss) + col(sm)
    if so != do:
        y = y.flip(1)
    return (y - col(dm)) / col(ds)


def parsing_logits(output, model: nn.Module | None = None) -> torch.Tensor:
    """The final parsing logits of a model's output: the fusion logits of the
    CE2P layout (``[[parsing, fusion], [edge]]``), or the tensor itself (HRNetV2
    with ``head="seg"``). ``model`` (optional): the model that gave ``output``; a
    pose model (whose tensor output is heatmaps) is refused with a ``TypeError``."""
    if model is not None:
        _refuse_pose(model, "parsing_logits")
    if isinstance(output, torch.Tensor):
        return output
    from ..metrics.tta import ce2p_fusion

    return ce2p_fusion(output)


def logits_align_corners(model: nn.Module) -> bool:
    """How the model's parsing logits are upsampled to the input size, as it
    was trained: ``True`` for the CE2P layout (SCHP's criterion and test
    transform), the model's ``align_corners`` for HRNetV2 with ``head="seg"``
    (HRNet-Semantic-Segmentation: False). The tools upsample such logits
    themselves (``F.interpolate(..., align_corners=False)``) before SCHP's
    align_corners=True steps, which are then the identity."""
    _refuse_pose(model, "logits_align_corners")
    inner = getattr(model, "_orig_mod", model)
    if getattr(inner, "head", "ce2p") == "seg":
        return bool(inner.align_corners)
    return True


def full_size_logits(model: nn.Module, output, size) -> torch.Tensor:
    """:func:`parsing_logits` of ``output``; for a model whose logits are
    upsampled with ``align_corners=False`` (:func:`logits_align_corners`),
    already upsampled so to ``size`` (H, W)."""
    _refuse_pose(model, "full_size_logits")
    out = parsing_logits(output)
    if not logits_align_corners(model) and tuple(out.shape[-2:]) != tuple(size):
        out = torch.nn.functional.interpolate(out, size=tuple(size), mode="bilinear",
                                              align_corners=False)
    return out
