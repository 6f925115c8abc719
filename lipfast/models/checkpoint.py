"""Loading local checkpoints into :class:`lipfast.models.CE2P` (or any module).

Nothing is ever downloaded: both loaders take a local path. Files are read with
``torch.load(path, map_location="cpu", weights_only=True)`` (no arbitrary
pickles). Checkpoint layouts accepted: a raw state_dict, or a dict holding it
under ``"state_dict"`` or ``"model"`` (SCHP's ``exp-schp-*-lip.pth`` is the
former wrapped in the latter); a ``module.`` prefix (DataParallel / DDP) is
stripped. Errors are Python exceptions naming the file and the offending keys:
``FileNotFoundError`` for a missing file, ``ValueError`` for a file that holds
no state_dict, and :class:`CheckpointMismatchError` (a ``ValueError``) listing
missing keys, unexpected keys and shape mismatches under ``strict``.

``num_batches_tracked`` buffers absent from a checkpoint (the vendored In-Place
ABN of SCHP/CE2P/OCNet has none) are never reported as missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["CheckpointMismatchError", "LoadReport", "load_checkpoint", "load_imagenet",
           "read_state_dict"]

_COUNTER = "num_batches_tracked"


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model (strict loading)."""


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


def read_state_dict(path) -> dict:
    """The state_dict in the file at ``path`` (see the module docstring), with a
    ``module.`` prefix stripped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} (lipfast never downloads "
                                "weights; pass the path of a local file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read checkpoint {path!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"checkpoint {path!r} holds no state_dict (expected a dict of tensors, "
                         "or one under 'state_dict' or 'model')")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path!r} is not a state_dict: entries that are not "
                         f"tensors: {_short(map(str, bad))}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


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
    """Loads the checkpoint at ``path`` into ``model`` (in place) and returns a
    :class:`LoadReport`. ``strict=True`` raises :class:`CheckpointMismatchError`
    listing missing / unexpected keys and shape mismatches before anything is
    copied; ``strict=False`` loads the matching tensors and reports the rest."""
    state = read_state_dict(path)
    return _load(model, state, os.fspath(path), strict, [])


_BACKBONE = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "layer1", "layer2", "layer3",
             "layer4")


def load_imagenet(model: nn.Module, path, strict: bool = True) -> LoadReport:
    """Initialises the backbone of ``model`` (a :class:`CE2P`) from an ImageNet
    ResNet checkpoint with the deep-stem key names (``resnet101-imagenet.pth``):
    keys starting with ``fc`` are skipped (reported as ``skipped``), every other
    key must be a backbone key of the model (stem, ``layer1..4``) and every
    backbone key must be present, with equal shapes, under ``strict``. The heads
    keep their initialisation."""
    state = read_state_dict(path)
    skipped = sorted(k for k in state if k.split(".", 1)[0] == "fc")
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] != "fc"}
    return _load(model, state, os.fspath(path), strict, skipped, only_prefixes=_BACKBONE)
