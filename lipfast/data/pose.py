"""LIP's pose track data (SPEC section 10, "LIP pose data"): one sample per
annotated person, cropped and augmented as deep-high-resolution-net's
``JointsDataset``.

Layout (``root`` is the LIP root of SPEC section 6)::

    <root>/TrainVal_pose_annotations/lip_<split>_set.csv   the joints
    <root>/<split>_images/<ImageID_PersonID>.jpg           the images (the parsing
                                                            track's, same names)

``csv_path`` and ``image_dir`` replace either path. Each CSV row is one person:
the image file name (``ImageID_PersonID.jpg``), then 16 x ``(x, y, v)`` in MPII's
joint order (:data:`lipfast.pose.LIP_JOINTS`), ``x`` the column and ``y`` the
row in 0-based pixel coordinates, ``nan`` for a missing joint. No header line.
Blank lines are skipped.

**Visibility.** What ``v`` means is not confirmed (SPEC 10), so it is not used:
a joint is *visible* (weight 1 for training, counted by the PCKh) when both of
its coordinates are present (not ``nan``); ``v`` is kept, unchanged (``nan``
allowed), in ``meta["v"]``. A joint with only one of ``x``, ``y`` present is
missing. Visibility is not changed by the crop: a joint that the augmentation
moves off the input keeps ``visible = 1`` (the heatmap target of the loss
zeroes joints off the heatmap, SPEC 10 "Targets").

**Person box.** LIP's images are already single-person crops, so the default
box (``box="image"``) is the whole image: centre ``((W-1)/2, (H-1)/2)`` (the
middle of pixels ``0..W-1``), size ``W x H``, widened or heightened to the
input aspect ratio ``W_in / H_in`` (:func:`pose_box_to_center_scale`), scale in
units of 200 px, *not* enlarged (the image is the box). It needs no joints, so
it is the same at test time. ``box="joints"``: the tight box of the present
joints (``w = x_max - x_min``, ``h = y_max - y_min``, as the reference's
``box_to_center_scale`` of two corners), the same aspect rule, times 1.25 (the
reference's enlargement for a box that is not the image); a row whose present
joints span a single point falls back to the image box.

**Augmentation** (``train=True``; SPEC 10, the reference's order):
``scale *= clip(1 + 0.25 N, 0.75, 1.25)``; with probability 0.6 a rotation by
``clip(30 N, -60, 60)`` degrees (``rotation_factor`` = 30, LIP's and MPII's);
with probability 0.5 a horizontal flip: the image's ``x -> W - 1 - x``, the
joints' the same with the left/right pairs swapped
(:data:`lipfast.pose.LIP_POSE_FLIP_PAIRS`), the centre mirrored too
(``c_x -> W - 1 - c_x``). Then one affine warp
(:func:`lipfast.data.transforms.pose_affine_matrix`, the reference's
``get_affine_transform``: the centre goes to ``(W_in/2, H_in/2)``, the box width
``200 s_w`` to ``W_in`` pixels) of the image (bilinear, zero border, float, as
:func:`lipfast.data.warp_image`; OpenCV would round to uint8 first) and of the
joints (the same matrix). Evaluation (``train=False``): the box, no jitter.
The image becomes RGB, ``/ 255``, normalised with ImageNet's mean and std
(``mean`` / ``std``, RGB order).

Randomness: as :class:`lipfast.data.LIPDataset` (the same scheme, the same
code): every sample draws from a ``numpy`` generator seeded by ``(seed, epoch,
index)``, in the order scale normal, rotation normal, rotation uniform, flip
uniform (all four always drawn); ``set_epoch`` picks the epoch.

Item ``ds[i]`` = ``(image, joints, visible, meta)``:

- ``image``: float32 ``3 x H_in x W_in``, normalised RGB;
- ``joints``: float32 ``J x 2``, ``(x, y)`` in input pixels (missing joints 0);
- ``visible``: float32 ``J``, 1 where the joint is present, else 0;
- ``meta``: ``id`` (file name without extension), ``image`` (the CSV's name),
  ``index``, ``row`` (1-based line of the CSV), ``image_path``, ``source``
  (``"lip_pose"``), ``width``, ``height`` (the image's), ``center`` (float64
  ``(2,)``, image pixels; after a flip the mirrored centre, i.e. in the flipped
  image's frame, as the reference), ``scale`` (float64 ``(2,)``, 200 px units,
  jitter included), ``rotation`` (degrees), ``flip`` (bool), ``affine`` (float64
  ``3 x 3``: *original* image pixels -> input pixels, flip included:
  ``joints = affine_points(meta["joints"], meta["affine"])`` before the pair
  swap and zeroing), ``joints`` (float64 ``J x 2``, original image pixels, ``nan``
  where missing, in the CSV's order), ``v`` (float64 ``J``, the CSV's third
  values). For evaluation (no flip, no rotation), a heatmap-resolution
  prediction maps back to the image by ``c + (x - W_hm / 2) * 200 s / W_hm``
  (SPEC 10 "Decoding").

Every field of ``meta`` has a fixed shape, so torch's default collate batches
the items (:func:`pose_collate` is that, as a tuple).

Errors and warnings name the file and the row: a missing root, CSV or image
folder, a listed image that does not exist (``FileNotFoundError``, all checked
when the data set is built with ``check_files=True``); a row with a number of
fields other than ``1 + 3 J``, an empty image name or one with a path
separator, an empty or non-numeric value, or an infinite one (``ValueError``);
a CSV without rows (``ValueError``). A row whose joints are all missing is
skipped with a warning naming the file and its rows (``keep_empty=True`` keeps
such rows: ``visible`` all 0); a CSV with no usable row is a ``ValueError``. An
unreadable image is a ``ValueError`` when its item is read.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from typing import Sequence

import numpy as np
import torch

from ..pose.joints import LIP_POSE_FLIP_PAIRS, NUM_LIP_JOINTS, flip_permutation
from .lip import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, ParsingDataset, read_image
from .transforms import (affine_points, flip_matrix, pose_affine_matrix,
                         pose_box_to_center_scale, warp_image)

POSE_CSV_DIR = "TrainVal_pose_annotations"
SCALE_FACTOR = 0.25
ROTATION_FACTOR = 30.0
ROTATION_PROB = 0.6
FLIP_PROB = 0.5
BOX_ENLARGE = 1.25
BOX_MODES = ("image", "joints")

__all__ = ["LIPPoseDataset", "read_pose_csv", "pose_collate", "pose_image_size",
           "pose_csv_path", "POSE_CSV_DIR", "BOX_MODES"]


def pose_csv_path(root, split: str) -> str:
    """``<root>/TrainVal_pose_annotations/lip_<split>_set.csv``."""
    return os.path.join(os.fspath(root), POSE_CSV_DIR, f"lip_{split}_set.csv")


def pose_image_size(image_size) -> tuple[int, int]:
    """``256`` or ``(W, H)`` (width first, as the reference) -> ``(W, H)``, validated."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if is_int(image_size):
        wh = (int(image_size), int(image_size))
    elif isinstance(image_size, Sequence) and not isinstance(image_size, str) and \
            len(image_size) == 2 and all(is_int(v) for v in image_size):
        wh = (int(image_size[0]), int(image_size[1]))
    else:
        raise TypeError(f"image_size must be an int or a pair of ints (W, H), "
                        f"got {image_size!r}")
    if wh[0] < 2 or wh[1] < 2:
        raise ValueError(f"image_size must be at least 2 x 2, got {wh}")
    return wh


def _number(text: str, path: str, line: int, what: str) -> float:
    t = text.strip()
    if not t:
        raise ValueError(f"LIP pose CSV {path} row {line}: {what} is empty")
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"LIP pose CSV {path} row {line}: {what} is not a number: "
                         f"{text!r}") from None
    if math.isinf(value):
        raise ValueError(f"LIP pose CSV {path} row {line}: {what} is infinite: {text!r}")
    return value


def read_pose_csv(path, num_joints: int = NUM_LIP_JOINTS):
    """Parses a LIP pose CSV (see the module docstring).

    Returns ``(names, joints, v, lines)``: the image names (list of str),
    ``joints`` float64 ``N x J x 2`` (``nan`` where missing: both coordinates
    are ``nan`` if either is), ``v`` float64 ``N x J`` (as written, ``nan``
    allowed) and the 1-based line of each row (int64 ``N``). Errors name the
    file and the row."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LIP pose CSV not found: {path}")
    j = int(num_joints)
    want = 1 + 3 * j
    names, rows, lines = [], [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            for fields in reader:
                line = reader.line_num
                if not fields or all(not x.strip() for x in fields):
                    continue
                if len(fields) != want:
                    raise ValueError(f"LIP pose CSV {path} row {line}: {len(fields)} fields, "
                                     f"expected {want} (the image name and {j} x (x, y, v))")
                name = fields[0].strip()
                if not name:
                    raise ValueError(f"LIP pose CSV {path} row {line}: empty image name")
                if "/" in name or "\\" in name or name in (".", ".."):
                    raise ValueError(f"LIP pose CSV {path} row {line}: image name {name!r} "
                                     f"must be a file name (no folders)")
                vals = []
                for k in range(j):
                    for c, axis in enumerate("xyv"):
                        vals.append(_number(fields[1 + 3 * k + c], path, line,
                                            f"{axis} of joint {k}"))
                names.append(name)
                rows.append(vals)
                lines.append(line)
        except csv.Error as err:
            raise ValueError(f"LIP pose CSV {path} row {reader.line_num}: {err}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"LIP pose CSV {path} is not UTF-8 text: {err}") from None
    if not rows:
        raise ValueError(f"LIP pose CSV {path} has no rows")
    arr = np.asarray(rows, dtype=np.float64).reshape(len(rows), j, 3)
    joints = arr[:, :, :2].copy()
    joints[np.isnan(joints).any(-1)] = np.nan
    return names, joints, arr[:, :, 2].copy(), np.asarray(lines, dtype=np.int64)


class LIPPoseDataset(torch.utils.data.Dataset):
    """LIP's pose annotations as single-person samples with the reference's
    crop and augmentation (see the module docstring for the layout, the
    visibility and box rules, the item and the errors).

    ``image_size``: ``(W, H)`` of the network input (width first; 256 x 256 for
    LIP / MPII, 192 x 256, 288 x 384, 384 x 512, ...). ``box``: ``"image"``
    (default) or ``"joints"``. ``scale_factor``, ``rotation_factor``,
    ``flip``: the augmentation's parameters (SPEC: 0.25, 30, on).
    ``keep_empty``: keep rows whose joints are all missing (default: skipped
    with a warning). ``check_files``: check that every listed image exists
    when the data set is built."""

    source = "lip_pose"

    def __init__(self, root, split: str = "train", image_size=(256, 256), train: bool = True,
                 seed: int = 0, box: str = "image", image_dir=None, csv_path=None,
                 mean: Sequence[float] = IMAGENET_MEAN_RGB,
                 std: Sequence[float] = IMAGENET_STD_RGB, scale_factor: float = SCALE_FACTOR,
                 rotation_factor: float = ROTATION_FACTOR, flip: bool = True,
                 keep_empty: bool = False, check_files: bool = True,
                 num_joints: int = NUM_LIP_JOINTS, flip_pairs=LIP_POSE_FLIP_PAIRS):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"LIPPoseDataset: root must be a path, got {type(root).__name__}")
        if not isinstance(split, str) or not split or "/" in split or os.sep in split:
            raise ValueError(f"LIPPoseDataset: split must be a name like 'train' or 'val', "
                             f"got {split!r}")
        if box not in BOX_MODES:
            raise ValueError(f"LIPPoseDataset: box must be one of {BOX_MODES}, got {box!r}")
        for name, value in (("scale_factor", scale_factor), ("rotation_factor", rotation_factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 <= value < math.inf:
                raise ValueError(f"LIPPoseDataset: {name} must be a finite number >= 0, "
                                 f"got {value!r}")
        if not scale_factor < 1:
            raise ValueError(f"LIPPoseDataset: scale_factor must be < 1 (scale stays positive), "
                             f"got {scale_factor}")
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"LIP data root not found (or not a directory): {self.root}")
        self.split = split
        self.image_size = pose_image_size(image_size)
        self.aspect_ratio = self.image_size[0] / self.image_size[1]
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        self.box = box
        self.scale_factor = float(scale_factor)
        self.rotation_factor = float(rotation_factor)
        self.flip = bool(flip)
        self.num_joints = int(num_joints)
        self.flip_perm = torch.tensor(flip_permutation(self.num_joints, flip_pairs))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.csv_path = os.fspath(csv_path) if csv_path is not None else pose_csv_path(
            self.root, split)
        self.image_dir = (os.fspath(image_dir) if image_dir is not None
                          else os.path.join(self.root, f"{split}_images"))

        names, joints, v, lines = read_pose_csv(self.csv_path, self.num_joints)
        present = ~np.isnan(joints).any(-1)  # N x J
        empty = ~present.any(1)
        if empty.any() and not keep_empty:
            rows = lines[empty].tolist()
            shown = ", ".join(str(r) for r in rows[:10]) + (
                f" and {len(rows) - 10} more" if len(rows) > 10 else "")
            warnings.warn(f"LIP pose CSV {self.csv_path}: {len(rows)} row(s) with every joint "
                          f"missing skipped (rows {shown})", stacklevel=2)
            keep = ~empty
            names = [n for n, k in zip(names, keep) if k]
            joints, v, lines = joints[keep], v[keep], lines[keep]
            if not names:
                raise ValueError(f"LIP pose CSV {self.csv_path} has no row with a joint")
        self.names = names
        self.ids = [os.path.splitext(n)[0] for n in names]
        self.joints = joints  # N x J x 2 float64, nan where missing
        self.v = v
        self.lines = lines
        if check_files:
            if not os.path.isdir(self.image_dir):
                raise FileNotFoundError(f"LIP pose image folder not found: {self.image_dir} "
                                        f"(images of {self.csv_path})")
            missing = [(n, r) for n, r in zip(self.names, self.lines.tolist())
                       if not os.path.isfile(os.path.join(self.image_dir, n))]
            if missing:
                n, r = missing[0]
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise FileNotFoundError(f"LIP pose image not found: "
                                        f"{os.path.join(self.image_dir, n)} (named by "
                                        f"{self.csv_path} row {r}){more}")

    # ------------------------------------------------------------ randomness
    set_epoch = ParsingDataset.set_epoch  # the same per-sample streams as LIPDataset
    rng = ParsingDataset.rng

    def __len__(self) -> int:
        return len(self.names)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.names[index])

    def person_box(self, index: int, width: int, height: int):
        """``(center, scale)`` of sample ``index`` in a ``width`` x ``height``
        image, before any augmentation (the box rule of the module docstring)."""
        if self.box == "joints":
            pts = self.joints[index]
            pts = pts[~np.isnan(pts).any(-1)]
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0)
            if x1 - x0 > 0 or y1 - y0 > 0:
                return pose_box_to_center_scale(x0, y0, x1 - x0, y1 - y0, self.aspect_ratio,
                                                enlarge=BOX_ENLARGE)
        return pose_box_to_center_scale(-0.5, -0.5, width, height, self.aspect_ratio,
                                        enlarge=1.0)

    def sample_params(self, index: int, width: int, height: int):
        """``(center, scale, rotation, flip)`` of sample ``index`` in the current
        epoch; ``center`` is in the frame of the (flipped) image, as the
        reference's."""
        center, scale = self.person_box(index, width, height)
        if not self.train:
            return center, scale, 0.0, False
        g = self.rng(index)
        sf, rf = self.scale_factor, self.rotation_factor
        s = float(np.clip(g.standard_normal() * sf + 1.0, 1.0 - sf, 1.0 + sf))
        scale = (scale[0] * s, scale[1] * s)
        rot_draw = float(g.standard_normal())
        rotation = float(np.clip(rot_draw * rf, -2.0 * rf, 2.0 * rf)) \
            if g.random() <= ROTATION_PROB else 0.0
        flip = bool(g.random() <= FLIP_PROB) and self.flip
        if flip:
            center = (width - 1.0 - center[0], center[1])
        return center, scale, rotation, flip

    def __getitem__(self, index: int):
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"LIPPoseDataset index must be an int, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"LIPPoseDataset index {index} out of range for {len(self)} "
                             f"samples")
        index = int(index) % len(self)
        path = self.image_path(index)
        img = read_image(path, what=f"LIP pose image (row {int(self.lines[index])} of "
                                    f"{self.csv_path})")
        h, w = img.shape[-2:]
        center, scale, rotation, flip = self.sample_params(index, w, h)
        m = pose_affine_matrix(center, scale, rotation, self.image_size)
        if flip:
            m = m @ flip_matrix(w)
        out_hw = (self.image_size[1], self.image_size[0])
        image = warp_image(img.to(torch.float32).div_(255.0), m, out_hw).flip(0)  # BGR -> RGB
        image = (image - self.mean) / self.std

        orig = torch.from_numpy(self.joints[index])  # J x 2 float64, nan where missing
        vis = ~torch.isnan(orig).any(-1)
        pts = affine_points(orig, m)
        pts = torch.where(vis[:, None], pts, torch.zeros_like(pts))
        if flip:  # the mirrored left joint is the right one, and so on
            pts, vis = pts[self.flip_perm], vis[self.flip_perm]
        meta = {
            "id": self.ids[index], "image": self.names[index], "index": index,
            "row": int(self.lines[index]), "image_path": path, "source": self.source,
            "width": int(w), "height": int(h),
            "center": torch.tensor(center, dtype=torch.float64),
            "scale": torch.tensor(scale, dtype=torch.float64),
            "rotation": float(rotation), "flip": bool(flip), "affine": m,
            "joints": orig.clone(), "v": torch.from_numpy(self.v[index].copy()),
        }
        return (image.contiguous(), pts.to(torch.float32), vis.to(torch.float32), meta)


def pose_collate(batch):
    """Batches :class:`LIPPoseDataset` items: ``(images B x 3 x H x W, joints
    B x J x 2, visible B x J, meta)`` with ``meta`` one dict of batched fields
    (tensors stacked: ``center`` B x 2, ``joints`` B x J x 2, ...; numbers as
    tensors; strings as lists). The same as torch's default collate."""
    images, joints, visible, meta = torch.utils.data.default_collate(batch)
    return images, joints, visible, meta
