"""The three dataset settings of SCHP's released models (its in-the-wild
extractor): input size, classes and their names, and the left/right class pairs
that a horizontal flip swaps.

====== ============= ======= =========================================
name   input (H x W) classes checkpoint released by SCHP
====== ============= ======= =========================================
lip    473 x 473     20      ``exp-schp-201908261155-lip.pth``
atr    512 x 512     18      ``exp-schp-201908301523-atr.pth``
pascal 512 x 512     7       ``exp-schp-201908270938-pascal-person-part.pth``
====== ============= ======= =========================================

The flip pairs are read off the class names (``Left-x`` <-> ``Right-x``);
Pascal-Person-Part has no left/right classes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DatasetSetting", "DATASETS", "dataset_setting"]


@dataclass(frozen=True)
class DatasetSetting:
    """One dataset setting: ``name``, ``input_size`` (H, W), ``labels`` (class
    names in index order), ``flip_pairs`` ((left, right) class indices)."""

    name: str
    input_size: tuple
    labels: tuple
    flip_pairs: tuple

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def check_num_classes(self, have: int, source: str) -> None:
        """ValueError naming both counts when ``source`` (e.g. ``"checkpoint 'x.pth'"``)
        has ``have`` classes and this setting another number."""
        if have != self.num_classes:
            raise ValueError(
                f"{source} has {have} classes, but dataset {self.name!r} has "
                f"{self.num_classes} ({', '.join(self.labels[:4])}, ...): pass the dataset "
                "the checkpoint was trained on")


def _pairs(labels) -> tuple:
    index = {name: i for i, name in enumerate(labels)}
    return tuple((i, index["Right-" + name[5:]]) for i, name in enumerate(labels)
                 if name.startswith("Left-"))


_LIP = ("Background", "Hat", "Hair", "Glove", "Sunglasses", "Upper-clothes", "Dress", "Coat",
        "Socks", "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm",
        "Left-leg", "Right-leg", "Left-shoe", "Right-shoe")
_ATR = ("Background", "Hat", "Hair", "Sunglasses", "Upper-clothes", "Skirt", "Pants", "Dress",
        "Belt", "Left-shoe", "Right-shoe", "Face", "Left-leg", "Right-leg", "Left-arm",
        "Right-arm", "Bag", "Scarf")
_PASCAL = ("Background", "Head", "Torso", "Upper Arms", "Lower Arms", "Upper Legs",
           "Lower Legs")

DATASETS = {
    name: DatasetSetting(name, size, labels, _pairs(labels))
    for name, size, labels in (("lip", (473, 473), _LIP), ("atr", (512, 512), _ATR),
                               ("pascal", (512, 512), _PASCAL))
}


def dataset_setting(name) -> DatasetSetting:
    """The setting called ``name`` (``"lip"``, ``"atr"`` or ``"pascal"``, any case)."""
    if isinstance(name, DatasetSetting):
        return name
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[key]
