"""Several training sources in one run (LIP splits, CIHP person crops; LIP's pose
track).

- :class:`SourceSpec` / :func:`parse_source`: a source as text, for a command line:

  ===================================  =============================================
  ``ROOT``                             ``lip:ROOT:train``
  ``lip:ROOT:SPLIT``                   a LIP-layout split (``LIPDataset``)
  ``cihp:ROOT:SPLIT``                  CIHP person crops, SPLIT ``train`` or ``val``
  any of these ``+ ":WEIGHT"``         a positive float (default 1)
  ===================================  =============================================

  The kind is read from the left and the split and weight from the right, so a
  ROOT may contain ``:`` (``lip:/data/a:b:train``); a bare ROOT is taken whole
  (``C:\\data\\lip``), except that a trailing ``:NUMBER`` is its weight. A text
  starting with a word of two or more letters and ``:`` is read as
  ``KIND:...`` (``foo:x:train`` is an unknown kind, not a root; ``data:2`` is
  the root ``data`` with weight 2): write such a root as ``lip:foo:x:train`` or
  ``./foo:x``. ``lip-pose:`` (the one kind with a ``-``) is read as that kind.
  After a known split name (train, val, test, trainval) the last part must be a
  weight (``lip:/x:train:val`` is refused as ambiguous).
- :func:`build_source`: the data set of a spec.
- :data:`POSE_KINDS`: the kinds whose items are pose samples ``(image, joints,
  visible, meta)``; the others give parsing samples ``(image, label, meta)``.
- :class:`MultiSourceDataset`: one epoch over several data sets, optionally
  weighted per sample.

Epoch composition: the epoch has ``N = sum of the sources' lengths`` positions.
Without weights each source's samples appear once each. With per-sample weights
``w_s``, source ``s`` gets ``n_s = round(N w_s len_s / sum_t w_t len_t)``
positions (largest rounding errors adjusted so that they sum to N): ``n_s //
len_s`` whole passes over the source plus ``n_s % len_s`` of its samples drawn
without replacement, from a generator seeded by ``(seed, epoch, source)``.
The mapping is deterministic for a given ``(seed, epoch)``; :meth:`set_epoch`
recomputes it and forwards the epoch to the sources (a sample shown twice in one
epoch gets an independent augmentation for its second showing, see
:meth:`lipfast.data.lip.ParsingDataset.item`). The data set carries the
epoch in its state, so loader workers started after ``set_epoch`` see it.
The positions are ordered source by source; the training sampler shuffles.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from .lip import LIP_MEAN_BGR, LIP_NUM_CLASSES, LIP_STD_BGR, LIPDataset

SOURCE_KINDS = ("lip", "cihp", "lip-pose")
#: the kinds of pose sources (:class:`lipfast.data.LIPPoseDataset` items)
POSE_KINDS = ("lip-pose",)
_CIHP_ONLY = ("others", "class_map")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
_KIND = re.compile(r"(lip-pose|[A-Za-z]{2,}):", re.IGNORECASE)
_KNOWN_SPLITS = ("train", "val", "test", "trainval")

__all__ = ["SourceSpec", "parse_source", "build_source", "MultiSourceDataset", "SOURCE_KINDS",
           "POSE_KINDS"]


@dataclass(frozen=True)
class SourceSpec:
    """One training source: ``kind`` (``"lip"``, ``"cihp"`` or ``"lip-pose"``), ``root``,
    ``split`` and ``weight`` (per-sample weight, positive)."""

    kind: str
    root: str
    split: str = "train"
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"source kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"source root must be a non-empty path, got {self.root!r}")
        if not isinstance(self.split, str) or not _WORD.match(self.split):
            raise ValueError(f"source split must be a name like 'train', got {self.split!r}")
        if self.kind == "cihp" and self.split not in ("train", "val"):
            raise ValueError(f"cihp source split must be 'train' or 'val' (CIHP's Testing has no "
                             f"labels), got {self.split!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                or w <= 0:
            raise ValueError(f"source weight must be a positive number, got {w!r}")

    def __str__(self) -> str:
        text = f"{self.kind}:{self.root}:{self.split}"
        return text if self.weight == 1.0 else f"{text}:{self.weight:g}"


def _weight(text: str, source: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise ValueError(f"source {source!r}: bad weight {text!r} (a positive number)") from None
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"source {source!r}: bad weight {text!r} (a positive number)")
    return w


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_source(text: str) -> SourceSpec:
    """``"ROOT"``, ``"lip:ROOT:SPLIT"``, ``"cihp:ROOT:SPLIT"`` or
    ``"lip-pose:ROOT:SPLIT"``, each optionally
    followed by ``":WEIGHT"`` -> :class:`SourceSpec` (see the module docstring);
    ValueError naming the text for an unknown kind, an empty part, a bad weight
    or split."""
    if not isinstance(text, str):
        raise TypeError(f"source must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("source is empty: give ROOT, lip:ROOT:SPLIT or cihp:ROOT:SPLIT")
    m = _KIND.match(text)
    if m is None:  # a bare LIP root, perhaps ROOT:WEIGHT
        root, sep, last = text.rpartition(":")
        if sep and _is_number(last):
            if not root:
                raise ValueError(f"source {text!r}: empty ROOT")
            return SourceSpec("lip", root, "train", _weight(last, text))
        return SourceSpec("lip", text, "train")
    kind = m.group(1).lower()
    rest = text[m.end():]
    if kind not in SOURCE_KINDS and ":" not in rest and _is_number(rest):
        return SourceSpec("lip", m.group(1), "train", _weight(rest, text))  # ROOT:WEIGHT
    if kind not in SOURCE_KINDS:
        raise ValueError(f"source {text!r}: unknown kind {m.group(1)!r} (one of "
                         f"{', '.join(SOURCE_KINDS)}; a bare path is a LIP root)")
    parts = rest.rsplit(":", 2)
    weight = 1.0
    if len(parts) == 3 and (_is_number(parts[2]) or parts[2] == ""
                            or parts[1] in _KNOWN_SPLITS or not _WORD.match(parts[2])):
        # KIND:ROOT:SPLIT:WEIGHT (a known split before the last part: that part is a weight)
        if parts[2] == "":
            raise ValueError(f"source {text!r}: empty WEIGHT after the last ':'")
        weight = _weight(parts[2], text)
        root, split = parts[0], parts[1]
    elif len(parts) == 1:
        raise ValueError(f"source {text!r}: expected {kind}:ROOT:SPLIT[:WEIGHT]")
    else:
        root, split = ":".join(parts[:-1]), parts[-1]
    if not root:
        raise ValueError(f"source {text!r}: empty ROOT")
    if not split:
        raise ValueError(f"source {text!r}: empty SPLIT")
    if not _WORD.match(split):
        raise ValueError(f"source {text!r}: bad SPLIT {split!r} (a name like 'train'; "
                         f"expected {kind}:ROOT:SPLIT[:WEIGHT])")
    if kind == "cihp" and split not in ("train", "val"):
        raise ValueError(f"source {text!r}: CIHP split must be 'train' or 'val' (Testing has no "
                         f"labels), got {split!r}")
    return SourceSpec(kind, root, split, weight)


def build_source(spec, crop_size=473, train: bool = True, seed: int = 0,
                 num_classes: int = LIP_NUM_CLASSES, channel_order: str = "BGR",
                 mean=LIP_MEAN_BGR, std=LIP_STD_BGR, **kw):
    """The data set of ``spec`` (a :class:`SourceSpec` or its text):
    :class:`lipfast.data.LIPDataset` or :class:`lipfast.data.CIHPPersonCrops`.
    ``kw`` goes to the constructor (``check_files``, ``ignore_index``,
    ``flip_pairs``; for CIHP also ``others`` and ``class_map``, which LIP
    sources ignore).

    ``lip-pose`` sources: :class:`lipfast.data.LIPPoseDataset` with
    ``image_size=kw.pop("image_size", crop_size)`` (an int or ``(W, H)``),
    ``train`` and ``seed``; its input is always RGB: ``mean`` / ``std`` are used
    when ``channel_order="RGB"``, otherwise ImageNet's (the dataset's default);
    ``num_classes`` and the parsing-only ``kw`` (``ignore_index``, ``others``,
    ``class_map``) do not apply and are ignored; other ``kw`` (``box``,
    ``check_files``, ``flip``, ...) go to the constructor."""
    if isinstance(spec, str):
        spec = parse_source(spec)
    if not isinstance(spec, SourceSpec):
        raise TypeError(f"build_source: spec must be a SourceSpec or a string, got "
                        f"{type(spec).__name__}")
    if spec.kind in POSE_KINDS:
        from .pose import LIPPoseDataset

        pose_kw = {k: v for k, v in kw.items() if k not in _CIHP_ONLY + ("ignore_index",)}
        image_size = pose_kw.pop("image_size", crop_size)
        if channel_order == "RGB":
            pose_kw.update(mean=mean, std=std)
        return LIPPoseDataset(spec.root, spec.split, image_size=image_size, train=train,
                              seed=seed, **pose_kw)
    common = dict(crop_size=crop_size, train=train, seed=seed, num_classes=num_classes,
                  channel_order=channel_order, mean=mean, std=std)
    if spec.kind == "lip":
        lip_kw = {k: v for k, v in kw.items() if k not in _CIHP_ONLY}
        return LIPDataset(spec.root, spec.split, **common, **lip_kw)
    from .cihp import CIHPPersonCrops

    return CIHPPersonCrops(spec.root, spec.split, **common, **kw)


def unique_names(bases) -> list[str]:
    """``bases`` with the repeated ones numbered (``lip``, ``lip`` -> ``lip1``, ``lip2``)."""
    bases = [str(b) for b in bases]
    names, seen = [], {}
    for b in bases:
        seen[b] = seen.get(b, 0) + 1
        names.append(b if bases.count(b) == 1 else f"{b}{seen[b]}")
    return names


def _default_names(datasets) -> list[str]:
    return unique_names(getattr(d, "source", type(d).__name__.lower()) for d in datasets)


def _apportion(total: int, quotas: np.ndarray) -> np.ndarray:
    """Rounded quotas adjusted to sum to ``total`` (largest errors first)."""
    n = np.array([int(round(q)) for q in quotas], dtype=np.int64)
    diff = total - int(n.sum())
    err = quotas - n  # > 0: rounded down
    order = sorted(range(len(n)), key=lambda s: (-err[s], s))
    while diff > 0:
        for s in order:
            if diff == 0:
                break
            n[s] += 1
            diff -= 1
    order = sorted(range(len(n)), key=lambda s: (err[s], s))
    while diff < 0:
        for s in order:
            if diff == 0:
                break
            if n[s] > 0:
                n[s] -= 1
                diff += 1
    return n


class MultiSourceDataset(torch.utils.data.Dataset):
    """One epoch over several sources (see the module docstring).

    ``datasets``: the sources (each with ``__len__``, ``__getitem__`` returning
    ``(image, label, meta)`` -- or any tuple whose last item is the meta dict,
    e.g. pose samples ``(image, joints, visible, meta)`` --, ``set_epoch``;
    ``crop_size`` and ``num_classes`` must agree); ``weights``: per-sample
    weight of each source (None: every
    sample once per epoch); ``names``: the sources' names (default their
    ``source`` attribute, ``"lip"`` / ``"cihp"``, numbered when repeated), put
    into each item's ``meta["source"]``."""

    def __init__(self, datasets, weights=None, seed: int = 0, names=None):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("MultiSourceDataset: no source given")
        for d in self.datasets:
            if len(d) == 0:
                raise ValueError(f"MultiSourceDataset: source {_where(d)} is empty")
        for attr in ("crop_size", "num_classes", "channel_order"):
            values = [getattr(d, attr, None) for d in self.datasets]
            if any(v != values[0] for v in values):
                raise ValueError(f"MultiSourceDataset: the sources' {attr} differ: " + ", ".join(
                    f"{_where(d)}: {v}" for d, v in zip(self.datasets, values)))
        self.crop_size = getattr(self.datasets[0], "crop_size", None)
        self.num_classes = getattr(self.datasets[0], "num_classes", None)
        self.channel_order = getattr(self.datasets[0], "channel_order", None)
        k = len(self.datasets)
        if weights is not None:
            weights = list(weights)
            if len(weights) != k:
                raise ValueError(f"MultiSourceDataset: {len(weights)} weights for {k} sources")
            for w in weights:
                if isinstance(w, bool) or not isinstance(w, (int, float, np.floating)) \
                        or not math.isfinite(w) or w <= 0:
                    raise ValueError(f"MultiSourceDataset: weights must be positive numbers, "
                                     f"got {weights}")
            weights = [float(w) for w in weights]
        self.weights = weights
        if names is None:
            names = _default_names(self.datasets)
        names = [str(n) for n in names]
        if len(names) != k or len(set(names)) != k:
            raise ValueError(f"MultiSourceDataset: need {k} distinct names, got {names}")
        self.names = names
        self.seed = int(seed)
        self.epoch = 0
        self.lengths = [len(d) for d in self.datasets]
        self._build()

    # ------------------------------------------------------------------ mapping
    def _build(self) -> None:
        n_total = sum(self.lengths)
        lengths = np.asarray(self.lengths, dtype=np.float64)
        if self.weights is None:
            counts = np.asarray(self.lengths, dtype=np.int64)
        else:
            mass = np.asarray(self.weights) * lengths
            counts = _apportion(n_total, n_total * mass / mass.sum())
        src, idx, rep = [], [], []
        for s, (n, length) in enumerate(zip(counts.tolist(), self.lengths)):
            passes, extra = divmod(n, length)
            parts = [np.arange(length, dtype=np.int64)] * passes
            reps = [np.full(length, r, dtype=np.int64) for r in range(passes)]
            if extra:
                g = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, s]))
                parts.append(np.sort(g.choice(length, size=extra, replace=False)))
                reps.append(np.full(extra, passes, dtype=np.int64))
            if parts:
                src.append(np.full(n, s, dtype=np.int64))
                idx.append(np.concatenate(parts))
                rep.append(np.concatenate(reps))
        self._source = np.concatenate(src)
        self._index = np.concatenate(idx)
        self._repeat = np.concatenate(rep)
        self._counts = counts

    def set_epoch(self, epoch: int) -> None:
        """Forwards ``epoch`` to the sources and recomputes the epoch's mapping."""
        self.epoch = int(epoch)
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(self.epoch)
        self._build()

    def __len__(self) -> int:
        return int(self._source.shape[0])

    def locate(self, index: int):
        """(source number, index in that source, repeat) of position ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"MultiSourceDataset index {index} out of range for "
                             f"{len(self)} samples")
        index = index % len(self)
        return int(self._source[index]), int(self._index[index]), int(self._repeat[index])

    def __getitem__(self, index: int):
        s, j, r = self.locate(index)
        d = self.datasets[s]
        *fields, meta = d.item(j, r) if hasattr(d, "item") else d[j]
        meta = dict(meta)
        meta["source"] = self.names[s]
        return (*fields, meta)

    # ------------------------------------------------------------------ reports
    def counts(self) -> dict:
        """{source name: samples in this epoch}."""
        return {n: int(c) for n, c in zip(self.names, self._counts)}

    def describe(self) -> list[str]:
        """One line per source: name, root, split, samples this epoch (of its
        length) and weight."""
        lines = []
        for name, d, n, length, w in zip(self.names, self.datasets, self._counts, self.lengths,
                                         self.weights or [None] * len(self.datasets)):
            root = getattr(d, "root", "?")
            split = getattr(d, "split", "?")
            weight = "-" if w is None else f"{w:g}"
            lines.append(f"{name}: root {root}, split {split}, {int(n)} samples per epoch "
                         f"(of {length}), weight {weight}")
        return lines


def _where(d) -> str:
    root = getattr(d, "root", None)
    return f"{type(d).__name__}({os.fspath(root)!r})" if root is not None else type(d).__name__
