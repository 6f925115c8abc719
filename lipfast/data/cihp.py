"""CIHP (multi-person parsing) as single-person samples, one per annotated person
(SPEC section 11).

Layout (``root`` is CIHP's ``instance-level_human_parsing`` folder)::

    <root>/Training/train_id.txt            one 7-digit id per line
    <root>/Training/Images/<id>.jpg
    <root>/Training/Category_ids/<id>.png   part classes 0..19 (class 10: Torso-skin)
    <root>/Training/Human_ids/<id>.png      0 background, 1..N persons
    <root>/Training/Instance_ids/<id>.png   (not read)
    <root>/Validation/...  val_id.txt       the same for split "val"

``split="train"`` reads ``Training``, ``split="val"`` ``Validation``; CIHP's
``Testing`` has no labels (ValueError).

``CIHPPersonCrops(root, split)`` turns every person of every image into one
sample. The person's crop follows SCHP's rule: the tight box ``[x, y, w, h]`` of
the person's pixels in ``Human_ids`` (``w = x_max - x_min + 1``), ``x1 = x + w``,
``y1 = y + h``, enlarged by 0.1 of ``w`` / ``h`` on each side, rounded (Python's
``round``: halves to even), clamped to ``[0, W-1]`` / ``[0, H-1]``; the crop is
rows ``y0..y1`` and columns ``x0..x1``, inclusive. Inside the crop:

- the label is ``Category_ids`` through the class map: ``class_map="lip"``
  (default) makes CIHP's class 10 (Torso-skin, which LIP does not have; LIP's 10
  is Jumpsuits) 255 (ignored); ``None`` keeps CIHP's classes; a dict
  ``{cihp_class: new_label}`` maps the classes named (new labels in
  ``0..num_classes-1`` or ``ignore_index``), the others stay;
- other people's pixels (``Human_ids`` neither 0 nor this person) get label
  255 (``others="ignore"``, default), 0 (``"background"``) or keep their part
  labels (``"keep"``); the image is not changed.

The crop then plays the role of a LIP image: the same augmentation or
evaluation centring as :class:`lipfast.data.LIPDataset` (this class shares its
code, :class:`lipfast.data.lip.ParsingDataset`), the same ``(image, label,
meta)`` item. In evaluation (``train=False``) the label is the crop's label at
its own size, and ``meta["height"]``, ``meta["width"]`` and ``meta["affine"]``
refer to the crop (what :func:`lipfast.data.warp_back` needs). ``meta`` adds
``source`` (``"cihp"``), ``image_id``, ``person`` (the ``Human_ids`` value) and
``box`` (``(x0, y0, x1, y1)``, inclusive, in the original image); ``id`` is
``"<image_id>_<person>"`` and ``image_path`` the whole original image.

Cost: the persons are enumerated when the data set is built, by reading every
``Human_ids`` PNG once (2-4 ms per 640 x 480 image on one CPU core, file header
checks included: one to two minutes for CIHP's 28,280 training images, 10-20 s
for the 5,000 validation images); the boxes are stored (a small integer array,
cheap to send to loader workers). Each item then decodes the whole image,
``Category_ids`` and ``Human_ids`` of its person's image (about 30 ms at 640 x
480) before the warp.

Errors and warnings name the file: a missing root, split folder, id list or
listed file (``FileNotFoundError``; with ``check_files`` every listed image,
``Category_ids`` and ``Human_ids`` file is checked at construction, and their
sizes are compared: the image's and ``Category_ids``' from their file headers,
``Human_ids``' when it is read for the persons); an image, ``Category_ids`` and
``Human_ids`` of different sizes (``ValueError``); category values outside
0..19 (``ValueError``, when the item is read, as :func:`lipfast.data.read_label`);
a ``Human_ids`` image whose persons have a gap (values 1 and 3 but no 2: a
warning naming the file and the missing persons, the present ones are used);
an image with no person (a warning; it gives no sample).
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import torch

from .lip import (FLIP_PAIRS, LIP_MEAN_BGR, LIP_NUM_CLASSES, LIP_STD_BGR, ParsingDataset,
                  read_image, read_label)
from .transforms import IGNORE

CIHP_NUM_CLASSES = 20
CIHP_TORSO_SKIN = 10
CIHP_SPLITS = {"train": ("Training", "train_id.txt"), "val": ("Validation", "val_id.txt")}
OTHERS_MODES = ("ignore", "background", "keep")
BOX_ENLARGE = 0.1  # of the tight box's width / height, on each side (SCHP's 1.2)

__all__ = ["CIHPPersonCrops", "person_box", "CIHP_SPLITS", "CIHP_NUM_CLASSES",
           "CIHP_TORSO_SKIN"]


def person_box(xmin: int, ymin: int, xmax: int, ymax: int, width: int, height: int):
    """SCHP's crop box (SPEC 11) of a person whose pixels span columns
    ``xmin..xmax`` and rows ``ymin..ymax`` of a ``width`` x ``height`` image:
    ``(x0, y0, x1, y1)``, inclusive."""
    x, y = int(xmin), int(ymin)
    w, h = int(xmax) - x + 1, int(ymax) - y + 1
    x1, y1 = x + w, y + h
    x0 = round(x - BOX_ENLARGE * w)
    y0 = round(y - BOX_ENLARGE * h)
    x1 = round(x1 + BOX_ENLARGE * w)
    y1 = round(y1 + BOX_ENLARGE * h)
    return (min(max(x0, 0), width - 1), min(max(y0, 0), height - 1),
            min(max(x1, 0), width - 1), min(max(y1, 0), height - 1))


def _class_lut(class_map, num_classes: int, ignore_index: int) -> torch.Tensor:
    """256-entry lookup table CIHP class -> training label."""
    lut = torch.arange(256, dtype=torch.int64)
    if isinstance(class_map, str):
        if class_map.lower() != "lip":
            raise ValueError(f"CIHPPersonCrops: class_map must be 'lip', None or a dict "
                             f"{{cihp_class: label}}, got {class_map!r}")
        mapping = {CIHP_TORSO_SKIN: ignore_index}
    elif class_map is None:
        mapping = {}
    elif isinstance(class_map, dict):
        mapping = {}
        for k, v in class_map.items():
            ok_k = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
            ok_v = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
            if not ok_k or not 0 <= int(k) < CIHP_NUM_CLASSES:
                raise ValueError(f"CIHPPersonCrops: class_map key {k!r} is not a CIHP class "
                                 f"(an int in 0..{CIHP_NUM_CLASSES - 1})")
            if not ok_v or not (0 <= int(v) < num_classes or int(v) == ignore_index):
                raise ValueError(f"CIHPPersonCrops: class_map[{k}] = {v!r} is not a label in "
                                 f"0..{num_classes - 1} or {ignore_index} (ignore)")
            mapping[int(k)] = int(v)
    else:
        raise TypeError(f"CIHPPersonCrops: class_map must be 'lip', None or a dict, got "
                        f"{type(class_map).__name__}")
    for k, v in mapping.items():
        lut[k] = v
    out = [c for c in range(CIHP_NUM_CLASSES)
           if not (0 <= int(lut[c]) < num_classes or int(lut[c]) == ignore_index)]
    if out:
        raise ValueError(f"CIHPPersonCrops: CIHP classes {out} give labels outside "
                         f"0..{num_classes - 1} with num_classes={num_classes}: map them "
                         "with class_map")
    return lut


def _read_ids_png(path: str) -> np.ndarray:
    """``Human_ids`` PNG -> H x W int64 array (one channel checked)."""
    return read_label(path, ignore_index=None, what="CIHP Human_ids").numpy()


def _image_size(path: str, what: str):
    """(width, height) from the file header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from None


class CIHPPersonCrops(ParsingDataset):
    """One single-person sample per annotated CIHP person (see the module
    docstring). ``channel_order``, ``mean``, ``std``, ``crop_size``, ``train``,
    ``seed``, ``num_classes``, ``ignore_index`` and ``flip_pairs`` as in
    :class:`lipfast.data.LIPDataset`."""

    source = "cihp"

    def __init__(self, root, split: str = "train", crop_size=473, train: bool = True,
                 seed: int = 0, others: str = "ignore", class_map="lip",
                 num_classes: int = LIP_NUM_CLASSES, channel_order: str = "BGR",
                 mean: Sequence[float] = LIP_MEAN_BGR, std: Sequence[float] = LIP_STD_BGR,
                 check_files: bool = True, ignore_index: int = IGNORE, flip_pairs=FLIP_PAIRS):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"CIHPPersonCrops: root must be a path, got {type(root).__name__}")
        if not isinstance(split, str) or split.lower() not in CIHP_SPLITS:
            if isinstance(split, str) and split.lower() in ("test", "testing"):
                raise ValueError("CIHPPersonCrops: CIHP's Testing split has no labels "
                                 "(no Category_ids / Human_ids): use 'train' or 'val'")
            raise ValueError(f"CIHPPersonCrops: split must be 'train' (Training) or 'val' "
                             f"(Validation), got {split!r}")
        if others not in OTHERS_MODES:
            raise ValueError(f"CIHPPersonCrops: others must be one of {OTHERS_MODES}, "
                             f"got {others!r}")
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"CIHP data root not found (or not a directory): "
                                    f"{self.root}")
        self.split = split.lower()
        folder, id_name = CIHP_SPLITS[self.split]
        self.split_dir = os.path.join(self.root, folder)
        if not os.path.isdir(self.split_dir):
            raise FileNotFoundError(f"CIHP split folder not found: {self.split_dir}")
        self._setup(crop_size, train, seed, num_classes, ignore_index, mean, std, flip_pairs,
                    channel_order)
        self.others = others
        self.class_lut = _class_lut(class_map, self.num_classes, self.ignore_index)
        self.image_dir = os.path.join(self.split_dir, "Images")
        self.category_dir = os.path.join(self.split_dir, "Category_ids")
        self.human_dir = os.path.join(self.split_dir, "Human_ids")
        id_file = os.path.join(self.split_dir, id_name)
        if not os.path.isfile(id_file):
            raise FileNotFoundError(f"CIHP id list not found: {id_file}")
        with open(id_file, encoding="utf-8") as f:
            self.image_ids = [i for i in (line.strip() for line in f) if i]
        if not self.image_ids:
            raise ValueError(f"CIHP id list {id_file} is empty")
        sizes = self._check_files(id_file) if check_files else None
        self._enumerate_persons(id_file, sizes)

    # ------------------------------------------------------------------ paths
    def image_path(self, image_id: str) -> str:
        return os.path.join(self.image_dir, image_id + ".jpg")

    def category_path(self, image_id: str) -> str:
        return os.path.join(self.category_dir, image_id + ".png")

    def human_path(self, image_id: str) -> str:
        return os.path.join(self.human_dir, image_id + ".png")

    def _paths(self, image_id: str):
        return (self.image_path(image_id), self.category_path(image_id),
                self.human_path(image_id))

    # ------------------------------------------------------------------ construction
    def _check_files(self, id_file: str) -> dict:
        """Every listed file exists; returns {image id: (image WxH, Category_ids WxH)}
        from the file headers (Human_ids' size is compared when it is read)."""
        for d in (self.image_dir, self.category_dir, self.human_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"CIHP folder not found: {d} (listed by {id_file})")
        missing = [p for i in self.image_ids for p in self._paths(i) if not os.path.isfile(p)]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise FileNotFoundError(f"CIHP file not found: {missing[0]}{more} "
                                    f"(ids from {id_file})")
        sizes = {}
        for i in self.image_ids:
            img_p, cat_p, _ = self._paths(i)
            sizes[i] = (_image_size(img_p, "CIHP image"), _image_size(cat_p, "CIHP Category_ids"))
        return sizes

    def _check_sizes(self, image_id, img_wh, cat_wh, hum_wh) -> None:
        if not img_wh == cat_wh == hum_wh:
            img_p, cat_p, hum_p = self._paths(image_id)
            raise ValueError(
                f"CIHP sizes differ (WxH): image {img_p} is {img_wh[0]}x{img_wh[1]}, "
                f"Category_ids {cat_p} is {cat_wh[0]}x{cat_wh[1]}, Human_ids {hum_p} is "
                f"{hum_wh[0]}x{hum_wh[1]}")

    def _enumerate_persons(self, id_file: str, sizes: dict | None = None) -> None:
        """Reads every Human_ids PNG once: the persons and their boxes, and (given
        ``sizes`` from :meth:`_check_files`) the three files' sizes compared."""
        rows = []
        empty = []
        for k, image_id in enumerate(self.image_ids):
            path = self.human_path(image_id)
            hum = _read_ids_png(path)
            h, w = hum.shape
            if sizes is not None:
                self._check_sizes(image_id, *sizes[image_id], (w, h))
            counts = np.bincount(hum.ravel())
            present = np.flatnonzero(counts)
            present = present[present > 0]
            if present.size == 0:
                empty.append(path)
                continue
            missing = sorted(set(range(1, int(present[-1]) + 1)) - set(present.tolist()))
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
                warnings.warn(f"CIHP Human_ids {path}: person(s) {shown} missing (persons "
                              f"{present.tolist()[:10]} present); using the present persons",
                              stacklevel=3)
            for p in present.tolist():
                mask = hum == p
                ys = np.flatnonzero(mask.any(1))
                xs = np.flatnonzero(mask.any(0))
                rows.append((k, p) + person_box(xs[0], ys[0], xs[-1], ys[-1], w, h))
        if empty:
            more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
            warnings.warn(f"CIHP Human_ids {empty[0]}{more}: no person (image skipped)",
                          stacklevel=3)
        if not rows:
            raise ValueError(f"CIHP split {self.split_dir} has no person (ids from {id_file})")
        # (image index, person, x0, y0, x1, y1) per sample
        self.persons = np.asarray(rows, dtype=np.int64)
        self.ids = [f"{self.image_ids[int(r[0])]}_{int(r[1])}" for r in self.persons]

    # ------------------------------------------------------------------ items
    def person(self, index: int):
        """(image_id, person, (x0, y0, x1, y1)) of sample ``index``."""
        k, p, x0, y0, x1, y1 = (int(v) for v in self.persons[index])
        return self.image_ids[k], p, (x0, y0, x1, y1)

    def load(self, index: int):
        """The crop's (BGR uint8 image, int64 label), class map and others applied."""
        image_id, person, (x0, y0, x1, y1) = self.person(index)
        img_p, cat_p, hum_p = self._paths(image_id)
        img = read_image(img_p, what="CIHP image")
        cat = read_label(cat_p, CIHP_NUM_CLASSES, self.ignore_index, what="CIHP Category_ids")
        hum = torch.from_numpy(_read_ids_png(hum_p))
        self._check_sizes(image_id, (img.shape[2], img.shape[1]), (cat.shape[1], cat.shape[0]),
                          (hum.shape[1], hum.shape[0]))
        rows, cols = slice(y0, y1 + 1), slice(x0, x1 + 1)
        image = img[:, rows, cols].contiguous()
        label = self.class_lut[cat[rows, cols]]
        if self.others != "keep":
            h = hum[rows, cols]
            other = (h != 0) & (h != person)
            label[other] = self.ignore_index if self.others == "ignore" else 0
        return image, label

    def sample_meta(self, index: int) -> dict:
        image_id, person, box = self.person(index)
        return {"image_id": image_id, "person": person, "box": box,
                "image_path": self.image_path(image_id)}
