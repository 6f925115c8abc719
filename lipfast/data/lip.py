"""The LIP data set with SCHP's augmentation (SPEC section 6).

Layout (one data set root)::

    <root>/<split>_id.txt              one id per line, no extension
    <root>/<split>_images/<id>.jpg     RGB (or grayscale) image
    <root>/<split>_segmentations/<id>.png   one channel, 0..19 and 255 (ignore)

``LIPDataset(root, split, crop_size=473, train=True, seed=0)`` returns per item
``(image, label, meta)``:

- ``image``: float32 3 x H_c x W_c, **BGR** in [0, 1] normalised with mean
  (0.406, 0.456, 0.485) and std (0.225, 0.224, 0.229) (SPEC 5; what SCHP's
  ``cv2.imread`` + ``ToTensor`` + ``Normalize`` give). ``channel_order="RGB"``
  returns RGB instead, normalised with the ``mean`` / ``std`` given (in RGB
  order: HRNetV2 takes ImageNet's ``IMAGENET_MEAN_RGB`` / ``IMAGENET_STD_RGB``);
  with the same statistics reversed it is exactly the BGR image's channels
  reversed.
- ``label``: int64. Training: the warped H_c x W_c label (255 outside the image).
  Evaluation (``train=False``): the *original* H x W label, unwarped, what the
  metrics compare against.
- ``meta``: dict with ``id``, ``index``, ``source`` (``"lip"``), ``image_path``, ``height``,
  ``width`` (original size),
  ``center``, ``scale`` (the person box as SCHP's ``_box2cs``), ``rotation``
  (degrees), ``flip`` (bool) and ``affine`` (3 x 3 float64, original pixel ->
  crop pixel coordinates, flip included).

Training augmentation (SCHP's ``LIPDataSet``): person box = the whole image
``[0, 0, W-1, H-1]`` expanded to the crop aspect ratio; ``scale *= clip(1 + 0.25
N(0,1), 0.75, 1.25)``; with probability 0.6 a rotation by ``clip(30 N(0,1), -60,
60)`` degrees; with probability 0.5 a horizontal flip with the labels 14<->15,
16<->17, 18<->19 swapped; one affine warp to the crop (image bilinear with a
black border, label nearest with border 255; see :mod:`lipfast.data.transforms`
for the two small differences from OpenCV). Evaluation: the same box, no
jitter, no rotation, no flip (SCHP's validation transform): the whole image is
letter-boxed into the crop. Map network outputs back to the original size with
:func:`lipfast.data.warp_back` (``meta["affine"]``, ``(meta["height"],
meta["width"])``).

Randomness: every sample draws from its own ``numpy`` generator seeded by
``(seed, epoch, index)`` (``set_epoch`` picks the epoch), so the augmentation of
a sample does not depend on the number of loader workers, on the process, or on
what was drawn before: a resumed run sees the same samples as an uninterrupted
one.

The augmentation lives in :class:`ParsingDataset`, shared with
:class:`lipfast.data.CIHPPersonCrops` (which feeds it one person crop of a
CIHP image per sample): a subclass provides the sample list and ``load``.

Edge labels are not made here: the training loop computes them on the device
from the warped labels with :func:`lipfast.losses.generate_edge`
(:func:`lipfast.data.collate` batches samples for that).

Errors name the file: a missing root, id list, image or segmentation
(``FileNotFoundError``, all missing files checked when the data set is built);
an empty id list, an unreadable image or label, a label with more than one
channel, label values outside 0..19 / 255, an image and label of different
sizes (``ValueError``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from ..metrics.parsing import LIP_FLIP_PAIRS
from ..models.ce2p import LIP_MEAN, LIP_STD
from .transforms import (IGNORE, affine_matrix, box_to_center_scale, warp_image, warp_label)

LIP_MEAN_BGR = LIP_MEAN  # SPEC 5: BGR in [0, 1]
LIP_STD_BGR = LIP_STD
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)  # the same statistics in RGB order (HRNetV2's input)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
LIP_NUM_CLASSES = 20
FLIP_PAIRS = LIP_FLIP_PAIRS  # left/right labels swapped by a horizontal flip

SCALE_FACTOR = 0.25
ROTATION_FACTOR = 30.0
ROTATION_PROB = 0.6
FLIP_PROB = 0.5


def _flip_lut(pairs, num_classes: int) -> torch.Tensor:
    """Label lookup table of a horizontal flip: swaps each (left, right) pair."""
    lut = torch.arange(256, dtype=torch.int64)
    for a, b in pairs:
        if not (0 <= a < num_classes and 0 <= b < num_classes):
            raise ValueError(f"LIPDataset: flip pair {(a, b)} outside 0..{num_classes - 1}")
        lut[a], lut[b] = b, a
    return lut


def crop_hw(crop_size) -> tuple[int, int]:
    """``473`` or ``(h, w)`` -> ``(h, w)``, validated."""
    if isinstance(crop_size, bool):
        raise TypeError(f"crop_size must be an int or a pair of ints, got {crop_size!r}")
    if isinstance(crop_size, int):
        hw = (crop_size, crop_size)
    elif isinstance(crop_size, Sequence) and len(crop_size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in crop_size):
        hw = (int(crop_size[0]), int(crop_size[1]))
    else:
        raise TypeError(f"crop_size must be an int or a pair of ints, got {crop_size!r}")
    if hw[0] < 2 or hw[1] < 2:
        raise ValueError(f"crop_size must be at least 2 x 2, got {hw}")
    return hw


def read_image(path: str, what: str = "LIP image") -> torch.Tensor:
    """Image file -> uint8 3 x H x W tensor in **BGR** order. ``what`` names the
    file's role in the error messages."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None
    return torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)))


def read_label(path: str, num_classes: int = LIP_NUM_CLASSES,
               ignore_index: int = IGNORE, what: str = "LIP label") -> torch.Tensor:
    """Segmentation PNG -> int64 H x W tensor, checked: one channel (mode L, P
    or I), values in 0..num_classes-1 or ``ignore_index`` (``ignore_index=None``:
    any value >= 0). ``what`` names the file's role in the error messages."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"{what} {path} must have one channel (mode L or P), "
                                 f"got mode {mode}")
            arr = np.array(im, dtype=np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None
    if ignore_index is None:
        return torch.from_numpy(arr)
    bad = (arr >= num_classes) & (arr != ignore_index) | (arr < 0)
    if bad.any():
        values = sorted(set(np.unique(arr[bad]).tolist()))[:10]
        raise ValueError(f"{what} {path} has values outside 0..{num_classes - 1} and "
                         f"{ignore_index}: {values}")
    return torch.from_numpy(arr)


CHANNEL_ORDERS = ("BGR", "RGB")


def _channel_order(order) -> str:
    if not isinstance(order, str) or order.upper() not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be 'BGR' or 'RGB', got {order!r}")
    return order.upper()


class ParsingDataset(torch.utils.data.Dataset):
    """The part shared by :class:`LIPDataset` and
    :class:`lipfast.data.CIHPPersonCrops`: SCHP's training augmentation or
    evaluation centring of one (image, label) pair per sample, normalisation,
    per-sample random streams and the ``(image, label, meta)`` item.

    A subclass calls :meth:`_setup` from its ``__init__``, fills ``self.ids``
    (one entry per sample) and implements :meth:`load` (the raw BGR uint8 image
    and int64 label of a sample) and :meth:`sample_meta` (the entries it adds to
    ``meta``)."""

    source = "lip"  # meta["source"]; MultiSourceDataset replaces it with the source name

    def _setup(self, crop_size, train, seed, num_classes, ignore_index, mean, std, flip_pairs,
               channel_order) -> None:
        self.crop_size = crop_hw(crop_size)
        self.aspect_ratio = self.crop_size[1] / self.crop_size[0]
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # data sets other than LIP (other num_classes) name their own pairs, () for none
        self.flip_lut = _flip_lut(flip_pairs, self.num_classes)
        self.channel_order = _channel_order(channel_order)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation stream of ``epoch`` (see the module docstring)."""
        self.epoch = int(epoch)

    def rng(self, index: int, repeat: int = 0) -> np.random.Generator:
        """The generator of sample ``index`` in the current epoch; ``repeat > 0``
        gives the independent stream of the sample's ``repeat``-th extra draw in
        the epoch (a weighted :class:`lipfast.data.MultiSourceDataset` showing it
        more than once)."""
        key = [self.seed, self.epoch, int(index)] + ([int(repeat)] if repeat else [])
        return np.random.default_rng(np.random.SeedSequence(key))

    def load(self, index: int):
        """The raw (BGR uint8 3 x H x W image, int64 H x W label) pair of ``index``."""
        raise NotImplementedError

    def sample_meta(self, index: int) -> dict:
        """Entries of ``meta`` beyond the geometry (``id``, paths, ...)."""
        return {}

    def sample_params(self, index: int, width: int, height: int, repeat: int = 0):
        """(center, scale, rotation, flip) of ``index`` for the current epoch."""
        center, scale = box_to_center_scale(width, height, self.aspect_ratio)
        if not self.train:
            return center, scale, 0.0, False
        g = self.rng(index, repeat)
        s = float(np.clip(g.standard_normal() * SCALE_FACTOR + 1.0, 1.0 - SCALE_FACTOR,
                          1.0 + SCALE_FACTOR))
        scale = (scale[0] * s, scale[1] * s)
        rot_draw = float(g.standard_normal())
        rotation = float(np.clip(rot_draw * ROTATION_FACTOR, -2 * ROTATION_FACTOR,
                                 2 * ROTATION_FACTOR)) if g.random() <= ROTATION_PROB else 0.0
        flip = bool(g.random() <= FLIP_PROB)
        return center, scale, rotation, flip

    def __getitem__(self, index: int):
        return self.item(index)

    def item(self, index: int, repeat: int = 0):
        """``self[index]``; ``repeat > 0`` draws the augmentation from the
        sample's ``repeat``-th extra stream of the epoch (see :meth:`rng`)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range for "
                             f"{len(self)} samples")
        index = index % len(self)
        img, lab = self.load(index)
        h, w = lab.shape
        # (subclasses overriding sample_params with the three-argument form still work)
        params = (self.sample_params(index, w, h) if not repeat
                  else self.sample_params(index, w, h, repeat=repeat))
        center, scale, rotation, flip = params
        m = affine_matrix(center, scale, rotation, self.crop_size, flip_width=w if flip else None)
        image = warp_image(img.to(torch.float32).div_(255.0), m, self.crop_size)
        if self.channel_order == "RGB":
            image = image.flip(0)
        image = (image - self.mean) / self.std
        if self.train:
            label = warp_label(lab, m, self.crop_size, border=self.ignore_index)
            if flip:
                label = self.flip_lut[label]
        else:
            label = lab
        meta = {
            "id": self.ids[index], "index": index, "height": h, "width": w,
            "source": self.source,
            "center": torch.tensor(center, dtype=torch.float64),
            "scale": torch.tensor(scale, dtype=torch.float64),
            "rotation": rotation, "flip": flip, "affine": m,
        }
        meta.update(self.sample_meta(index))
        return image.contiguous(), label, meta


class LIPDataset(ParsingDataset):
    """LIP split with SCHP's training augmentation or evaluation centring (see
    the module docstring). ``flip_pairs``: the (left, right) labels a horizontal flip
    swaps, LIP's by default; another label set (``num_classes != 20``) passes its own
    (``()`` for none): pairs outside ``0..num_classes-1`` raise ValueError.
    ``channel_order``: ``"BGR"`` (default, SCHP's input) or ``"RGB"`` (e.g. HRNetV2,
    with ImageNet's RGB ``mean`` / ``std``); ``mean`` and ``std`` are in that order."""

    def __init__(self, root, split: str = "train", crop_size=473, train: bool = True,
                 seed: int = 0, num_classes: int = LIP_NUM_CLASSES, ignore_index: int = IGNORE,
                 mean: Sequence[float] = LIP_MEAN_BGR, std: Sequence[float] = LIP_STD_BGR,
                 check_files: bool = True, flip_pairs=FLIP_PAIRS, channel_order: str = "BGR"):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"LIPDataset: root must be a path, got {type(root).__name__}")
        if not isinstance(split, str) or not split or os.sep in split:
            raise ValueError(f"LIPDataset: split must be a name like 'train' or 'val', "
                             f"got {split!r}")
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"LIP data root not found (or not a directory): {self.root}")
        self.split = split
        self._setup(crop_size, train, seed, num_classes, ignore_index, mean, std, flip_pairs,
                    channel_order)
        self.image_dir = os.path.join(self.root, f"{split}_images")
        self.label_dir = os.path.join(self.root, f"{split}_segmentations")
        id_file = os.path.join(self.root, f"{split}_id.txt")
        if not os.path.isfile(id_file):
            raise FileNotFoundError(f"LIP id list not found: {id_file}")
        with open(id_file, encoding="utf-8") as f:
            ids = [line.strip() for line in f]
        self.ids = [i for i in ids if i]
        if not self.ids:
            raise ValueError(f"LIP id list {id_file} is empty")
        if check_files:
            for d in (self.image_dir, self.label_dir):
                if not os.path.isdir(d):
                    raise FileNotFoundError(f"LIP folder not found: {d} (listed by {id_file})")
            missing = [p for i in self.ids for p in (self.image_path(i), self.label_path(i))
                       if not os.path.isfile(p)]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise FileNotFoundError(f"LIP file not found: {missing[0]}{more} "
                                        f"(ids from {id_file})")

    # ------------------------------------------------------------------ paths
    def image_path(self, sample_id: str) -> str:
        return os.path.join(self.image_dir, sample_id + ".jpg")

    def label_path(self, sample_id: str) -> str:
        return os.path.join(self.label_dir, sample_id + ".png")

    # ------------------------------------------------------------------ items
    def load(self, index: int):
        """The raw (BGR uint8 image, int64 label) pair of ``index``, checked."""
        sid = self.ids[index]
        img = read_image(self.image_path(sid))
        lab = read_label(self.label_path(sid), self.num_classes, self.ignore_index)
        if tuple(img.shape[-2:]) != tuple(lab.shape):
            raise ValueError(
                f"LIP image {self.image_path(sid)} is {img.shape[2]}x{img.shape[1]} (WxH) but "
                f"its label {self.label_path(sid)} is {lab.shape[1]}x{lab.shape[0]}")
        return img, lab

    def sample_meta(self, index: int) -> dict:
        return {"image_path": self.image_path(self.ids[index])}


def collate(batch):
    """Batches ``LIPDataset`` items: images stacked (B x 3 x H_c x W_c), labels
    stacked when they share a size (training crops) else a list (evaluation:
    original sizes), metas as a list of dicts."""
    images = torch.stack([b[0] for b in batch])
    labels = [b[1] for b in batch]
    if all(lab.shape == labels[0].shape for lab in labels):
        labels = torch.stack(labels)
    return images, labels, [b[2] for b in batch]


def denormalize(image: torch.Tensor, mean: Sequence[float] = LIP_MEAN_BGR,
                std: Sequence[float] = LIP_STD_BGR, channel_order: str = "BGR") -> torch.Tensor:
    """Normalised 3 x H x W image in ``channel_order`` (``"BGR"``, the default, or
    ``"RGB"``; ``mean`` / ``std`` in the same order) -> uint8 H x W x 3 **RGB**
    (for pictures)."""
    order = _channel_order(channel_order)
    m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    x = (image * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    if order == "BGR":
        x = x.flip(0)
    return x.permute(1, 2, 0).contiguous()


__all__ = ["LIPDataset", "ParsingDataset", "collate", "read_image", "read_label", "denormalize",
           "crop_hw", "LIP_MEAN_BGR", "LIP_STD_BGR", "IMAGENET_MEAN_RGB", "IMAGENET_STD_RGB",
           "FLIP_PAIRS", "LIP_NUM_CLASSES", "CHANNEL_ORDERS"]
