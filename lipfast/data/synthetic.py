"""A small synthetic data set in the LIP (or CIHP, or LIP pose) layout, for smoke
tests and demos.

``python -m lipfast.data.synthetic OUT --images N [--size 96] [--seed 0] [--val M]
[--progress auto|bar|lines|off] [--layout lip|cihp|lip-pose]`` writes (default layout
``lip``) ``OUT/{train,val}_images/<id>.jpg``,
``OUT/{train,val}_segmentations/<id>.png`` and ``OUT/{train,val}_id.txt`` (SPEC
section 6): N training and M validation images (M defaults to max(2, N // 4)),
nothing downloaded. Progress: a tqdm bar on a terminal, a plain line per
quarter of a split otherwise.

Every image is one drawn, front-facing figure on a noisy background: head with
hair and face, torso, arms, legs and shoes, plus an outfit (upper-clothes and
pants, coat and skirt, dress, or jumpsuit, cycling with the image index) and
accessories (hat, sunglasses, scarf, gloves, socks; each present with
probability 0.5, and forced on alternately in consecutive images). Any 4
consecutive images of a split therefore contain all 20 LIP classes. Left/right
follow LIP: the figure faces the camera, so its *left* arm, leg and shoe
(classes 14, 16, 18) are on the image's right. Each class has its own colour
(with a per-image jitter and per-pixel noise), so a small model can learn the
task; image sizes vary around ``--size`` (height) and are mostly portrait, so
the data set's aspect-ratio handling is exercised.

``--layout cihp`` writes the CIHP layout instead (SPEC section 11):
``OUT/Training/{Images,Category_ids,Human_ids,Instance_ids}/<id>`` (7-digit ids,
``.jpg`` / ``.png``) with ``OUT/Training/train_id.txt``, and ``OUT/Validation/``
with ``val_id.txt``. Each image holds 2 or 3 of the figures above side by side,
of different sizes and heights in the image, consecutive ones often
overlapping a little (the later one in front); ``Human_ids`` numbers them 1..N
from left to right, ``Instance_ids`` is ``20 * (person - 1) + class`` on
labelled pixels and 0 elsewhere. Classes follow CIHP: no jumpsuits (outfits
cycle through the other three), class 10 is Torso-skin (a neck and a V of chest
skin on every figure).

``--layout lip-pose`` writes LIP's pose layout (SPEC section 10):
``OUT/{train,val}_images/<ImageID>_<PersonID>.jpg`` (names ``10000_1.jpg``,
``10001_2.jpg``, ...) and ``OUT/TrainVal_pose_annotations/lip_{train,val}_set.csv``,
one row per image: the name, then 16 x ``(x, y, v)`` in MPII order with two
decimals. The images are the LIP layout's figures (the same pixels as
``--layout lip`` with the same seed and index); the joints are derived from the
drawn figure (hips, knees, ankles along the legs, shoulders, elbows, wrists along
the arms, pelvis, thorax, neck and head top on the midline; the person's left on
the image's right), so a model can learn them. Each joint is missing
(``nan,nan,nan``) with probability 0.12, at least 4 present per row; ``v`` is
0 or 1 (random) on present joints. No segmentations or id lists are written.

Deterministic: the same arguments write the same files (each image draws from a
generator seeded by (seed, split, index)).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .._io import atomic_file

# Class colours (RGB), one per LIP class; left/right parts share a colour (a
# horizontal flip swaps their labels, so only the position tells them apart).
CLASS_COLOURS = np.array([
    (0, 0, 0),        # 0 Background (replaced by a textured background)
    (200, 40, 40),    # 1 Hat
    (70, 40, 20),     # 2 Hair
    (240, 240, 80),   # 3 Glove
    (20, 20, 20),     # 4 Sunglasses
    (40, 90, 200),    # 5 Upper-clothes
    (210, 80, 170),   # 6 Dress
    (110, 70, 40),    # 7 Coat
    (250, 250, 250),  # 8 Socks
    (30, 40, 90),     # 9 Pants
    (60, 150, 80),    # 10 Jumpsuits
    (230, 130, 20),   # 11 Scarf
    (150, 30, 110),   # 12 Skirt
    (235, 190, 160),  # 13 Face
    (220, 170, 140),  # 14 Left-arm
    (220, 170, 140),  # 15 Right-arm
    (205, 155, 125),  # 16 Left-leg
    (205, 155, 125),  # 17 Right-leg
    (90, 60, 120),    # 18 Left-shoe
    (90, 60, 120),    # 19 Right-shoe
], dtype=np.float32)

OUTFITS = ("upper+pants", "coat+skirt", "dress", "jumpsuit")
CIHP_OUTFITS = OUTFITS[:3]  # CIHP has no Jumpsuits class
TORSO_SKIN = 10  # CIHP's class 10
CIHP_COLOURS = CLASS_COLOURS.copy()
CIHP_COLOURS[TORSO_SKIN] = (240, 200, 175)  # Torso-skin instead of LIP's Jumpsuits
ACCESSORIES = ("hat", "sunglasses", "scarf", "gloves", "socks")


def _figure_label(rng: np.random.Generator, width: int, height: int, outfit: str,
                  accessories: set, torso_skin: bool = False, keypoints: dict | None = None):
    """Draws the label map (mode 'L' PIL image) of one figure. ``torso_skin``:
    adds CIHP's class 10 (Torso-skin) as a neck and a V of chest skin (no random
    draws: the figure is otherwise the same). ``keypoints``: a dict that gets
    the figure's 16 LIP joints (joint index -> (x, y), see :func:`_joints`); no
    random draws either, so the drawing does not change."""
    from PIL import Image, ImageDraw

    lab = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(lab)
    top = height * rng.uniform(0.02, 0.08)
    bottom = height * rng.uniform(0.93, 0.99)
    fh = bottom - top  # figure height
    cx = width * 0.5 + width * rng.uniform(-0.08, 0.08)
    bw = min(fh * rng.uniform(0.20, 0.26), width * 0.42)  # shoulder half-width * 2

    def y(f):
        return top + f * fh

    def lw(f):
        return max(2, int(round(f * fh)))

    sh_y, hip_y, ankle_y = y(0.22), y(0.52), y(0.92)
    leg_dx = bw * 0.22
    # legs (person's left = image right)
    spread = bw * rng.uniform(0.0, 0.25)
    for cls, sgn in ((16, 1), (17, -1)):
        d.line([(cx + sgn * leg_dx, hip_y), (cx + sgn * (leg_dx + spread), ankle_y)],
               fill=cls, width=lw(0.085))
    hand_at = {}
    if "socks" in accessories:
        for sgn in (1, -1):
            x0 = cx + sgn * (leg_dx + spread * 0.9)
            d.line([(x0, y(0.86)), (cx + sgn * (leg_dx + spread), ankle_y)], fill=8,
                   width=lw(0.085))
    for cls, sgn in ((18, 1), (19, -1)):
        fx = cx + sgn * (leg_dx + spread)
        d.ellipse([fx - fh * 0.055, ankle_y - fh * 0.01, fx + fh * 0.055 + sgn * fh * 0.02,
                   min(y(1.0), ankle_y + fh * 0.05)], fill=cls)
    # lower clothes
    if outfit == "upper+pants":
        for sgn in (1, -1):
            d.line([(cx + sgn * leg_dx, hip_y - fh * 0.02),
                    (cx + sgn * (leg_dx + spread * 0.75), y(0.80))], fill=9, width=lw(0.10))
        d.rectangle([cx - bw * 0.42, hip_y - fh * 0.03, cx + bw * 0.42, hip_y + fh * 0.04],
                    fill=9)
    elif outfit == "coat+skirt":
        d.polygon([(cx - bw * 0.42, hip_y - fh * 0.03), (cx + bw * 0.42, hip_y - fh * 0.03),
                   (cx + bw * 0.65, y(0.68)), (cx - bw * 0.65, y(0.68))], fill=12)
    # arms (person's left = image right), hanging outward from the shoulders
    hand_y = y(rng.uniform(0.45, 0.55))
    for cls, sgn in ((14, 1), (15, -1)):
        sx = cx + sgn * bw * 0.5
        hx = sx + sgn * bw * rng.uniform(0.25, 0.7)
        d.line([(sx, sh_y + fh * 0.02), (hx, hand_y)], fill=cls, width=lw(0.06))
        hand_at[sgn] = (sx, hx)
        if "gloves" in accessories:
            d.ellipse([hx - fh * 0.035, hand_y - fh * 0.035, hx + fh * 0.035, hand_y + fh * 0.035],
                      fill=3)
    # torso
    torso = [(cx - bw * 0.5, sh_y), (cx + bw * 0.5, sh_y), (cx + bw * 0.42, hip_y),
             (cx - bw * 0.42, hip_y)]
    if outfit == "upper+pants":
        d.polygon(torso, fill=5)
    elif outfit == "coat+skirt":
        d.polygon([(cx - bw * 0.55, sh_y), (cx + bw * 0.55, sh_y), (cx + bw * 0.5, y(0.58)),
                   (cx - bw * 0.5, y(0.58))], fill=7)
    elif outfit == "dress":
        d.polygon([(cx - bw * 0.5, sh_y), (cx + bw * 0.5, sh_y), (cx + bw * 0.42, hip_y),
                   (cx + bw * 0.75, y(0.76)), (cx - bw * 0.75, y(0.76)), (cx - bw * 0.42, hip_y)],
                  fill=6)
    else:  # jumpsuit: torso and both legs down to the shins
        d.polygon(torso, fill=10)
        for sgn in (1, -1):
            d.line([(cx + sgn * leg_dx, hip_y - fh * 0.02),
                    (cx + sgn * (leg_dx + spread * 0.8), y(0.80))], fill=10, width=lw(0.10))
    if torso_skin:  # CIHP's Torso-skin: the neck and a V-neckline
        d.rectangle([cx - bw * 0.1, y(0.15), cx + bw * 0.1, sh_y], fill=TORSO_SKIN)
        d.polygon([(cx - bw * 0.25, sh_y), (cx + bw * 0.25, sh_y), (cx, y(0.33))],
                  fill=TORSO_SKIN)
    # scarf
    if "scarf" in accessories:
        d.rectangle([cx - bw * 0.3, y(0.17), cx + bw * 0.3, y(0.23)], fill=11)
        d.rectangle([cx + bw * 0.05, y(0.17), cx + bw * 0.2, y(0.33)], fill=11)
    # head: hair behind, face in front
    hr = fh * 0.075
    hy = y(0.10)
    d.ellipse([cx - hr, hy - hr, cx + hr, hy + hr * 1.05], fill=2)
    fr = hr * 0.78
    d.ellipse([cx - fr, hy - fr * 0.8, cx + fr, hy + fr * 1.25], fill=13)
    if "sunglasses" in accessories:
        d.rectangle([cx - fr * 0.85, hy - fr * 0.15, cx + fr * 0.85, hy + fr * 0.2], fill=4)
    if "hat" in accessories:
        d.polygon([(cx - hr * 1.3, hy - hr * 0.45), (cx + hr * 1.3, hy - hr * 0.45),
                   (cx + hr * 0.8, hy - hr * 1.5), (cx - hr * 0.8, hy - hr * 1.5)], fill=1)
    if keypoints is not None:
        keypoints.update(_joints(cx, y, fh, bw, leg_dx, spread, hip_y, ankle_y, sh_y, hand_y,
                                 hand_at, hy, hr))
    return lab


def _joints(cx, y, fh, bw, leg_dx, spread, hip_y, ankle_y, sh_y, hand_y, hand_at, hy, hr):
    """The 16 LIP joints (MPII order, lipfast.pose.LIP_JOINTS) of a figure drawn by
    :func:`_figure_label`, each a little inside the part it belongs to (so the
    label map there is not background): hips at the top of the legs, knees half
    way, ankles in the shoes; pelvis and thorax on the body's midline just inside
    the torso; upper neck at the bottom of the face, head top at the top of the
    hair; shoulders at the top of the arms, elbows half way, wrists near the
    hands. The person's left (joints 3-5, 13-15) is on the image's right."""
    pts = {}

    def lerp(a, b, t):
        return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)

    for sgn, (hip, knee, ankle) in ((-1, (2, 1, 0)), (1, (3, 4, 5))):
        top = (cx + sgn * leg_dx, hip_y)
        bottom = (cx + sgn * (leg_dx + spread), ankle_y)
        pts[hip] = lerp(top, bottom, 0.06)
        pts[knee] = lerp(top, bottom, 0.5)
        pts[ankle] = bottom
    pts[6] = (cx, hip_y - fh * 0.01)   # pelvis
    pts[7] = (cx, sh_y + fh * 0.02)    # thorax
    pts[8] = (cx, hy + hr * 0.9)       # upper neck
    pts[9] = (cx, hy - hr * 0.9)       # head top
    arm_y = sh_y + fh * 0.02
    for sgn, (sho, elb, wri) in ((-1, (12, 11, 10)), (1, (13, 14, 15))):
        sx, hx = hand_at[sgn]
        start, hand = (sx, arm_y), (hx, hand_y)
        pts[sho] = lerp(start, hand, 0.06)
        pts[elb] = lerp(start, hand, 0.5)
        pts[wri] = lerp(start, hand, 0.85)
    return {k: (float(v[0]), float(v[1])) for k, v in pts.items()}


def _render(rng: np.random.Generator, label: np.ndarray,
            class_colours: np.ndarray = CLASS_COLOURS) -> np.ndarray:
    """Colours a label map: class colours with jitter and noise on a textured background."""
    h, w = label.shape
    colours = class_colours + rng.uniform(-20, 20, size=(1, 3)).astype(np.float32)
    img = colours[label]
    # background: a random two-colour gradient plus blobs
    c0 = rng.uniform(40, 200, size=3)
    c1 = rng.uniform(40, 200, size=3)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    bg = (c0 * (1 - t) + c1 * t) * np.ones((1, w, 1), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(3):
        by, bx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.05, 0.2) * max(h, w)
        blob = ((yy - by) ** 2 + (xx - bx) ** 2) < r * r
        bg[blob] = bg[blob] * 0.5 + rng.uniform(40, 200, size=3) * 0.5
    img = np.where((label == 0)[:, :, None], bg, img)
    img = img + rng.normal(0, 8, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_sample(seed: int, split: str, index: int, size: int = 96,
                keypoints: dict | None = None):
    """(RGB uint8 H x W x 3 image, uint8 H x W label) of one synthetic sample.
    ``keypoints``: a dict that gets the figure's 16 joints (see :func:`_joints`);
    the sample is the same with or without it."""
    split_key = sum(split.encode())  # stable across processes (unlike hash())
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_key, int(index)]))
    height = max(16, int(round(size * rng.uniform(0.85, 1.15))))
    width = max(12, int(round(size * rng.uniform(0.6, 1.0))))
    outfit = OUTFITS[index % len(OUTFITS)]
    forced = set(ACCESSORIES[:2]) if index % 2 == 0 else set(ACCESSORIES[2:])
    acc = {a for a in ACCESSORIES if a in forced or rng.random() < 0.5}
    lab = np.asarray(_figure_label(rng, width, height, outfit, acc, keypoints=keypoints),
                     dtype=np.uint8)
    img = _render(rng, lab.astype(np.int64))
    return img, lab


POSE_MISSING_PROB = 0.12  # each joint of a --layout lip-pose row is nan with this probability
POSE_MIN_PRESENT = 4


def make_pose_sample(seed: int, split: str, index: int, size: int = 96):
    """One synthetic LIP-pose sample: ``(RGB uint8 H x W x 3 image, uint8 H x W
    label, joints float64 16 x 2 with nan where missing, v float64 16)``. The
    image and label are :func:`make_sample`'s for the same arguments; the joints
    are the drawn figure's (:func:`_joints`), each missing (nan, nan, nan) with
    probability 0.12 but at least 4 present, from a separate random stream.
    ``v`` (whose meaning LIP does not document) is 0 or, with probability 0.2, 1
    on present joints, only to exercise it being read and kept."""
    kp: dict = {}
    img, lab = make_sample(seed, split, index, size, keypoints=kp)
    joints = np.array([kp[j] for j in range(len(kp))], dtype=np.float64)
    split_key = sum(split.encode())
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_key, int(index), 16]))
    missing = rng.random(len(joints)) < POSE_MISSING_PROB
    flags = (rng.random(len(joints)) < 0.2).astype(np.float64)
    if (~missing).sum() < POSE_MIN_PRESENT:
        missing[:] = False
        missing[rng.permutation(len(joints))[:len(joints) - POSE_MIN_PRESENT]] = True
    joints[missing] = np.nan
    v = np.where(missing, np.nan, flags)
    return img, lab, joints, v


def pose_csv_row(name: str, joints: np.ndarray, v: np.ndarray) -> str:
    """One LIP pose CSV line: ``name`` then ``x,y,v`` per joint (``nan`` when missing)."""
    fields = [name]
    for (x, y), f in zip(joints, v):
        if np.isnan(x) or np.isnan(y):
            fields += ["nan", "nan", "nan"]
        else:
            fields += [f"{x:.2f}", f"{y:.2f}", "nan" if np.isnan(f) else f"{int(f)}"]
    return ",".join(fields)


def make_cihp_sample(seed: int, split: str, index: int, size: int = 96):
    """(RGB uint8 H x W x 3 image, uint8 Category_ids, uint8 Human_ids) of one
    synthetic CIHP image: 2 or 3 figures side by side (consecutive ones often
    overlapping a little, the later in front), persons numbered 1..N from left
    to right, class 10 = Torso-skin, no jumpsuits."""
    split_key = sum(split.encode())
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_key, int(index), 11]))
    height = max(16, int(round(size * rng.uniform(0.85, 1.15))))
    n = 2 + int(rng.random() < 0.5)
    figures = []
    for k in range(n):
        fh = min(height, max(16, int(round(height * rng.uniform(0.6, 1.0)))))
        fw = max(12, int(round(fh * rng.uniform(0.45, 0.65))))
        outfit = CIHP_OUTFITS[(index * 3 + k) % len(CIHP_OUTFITS)]
        acc = {a for a in ACCESSORIES if rng.random() < 0.4}
        figures.append(np.asarray(_figure_label(rng, fw, fh, outfit, acc, torso_skin=True),
                                  dtype=np.uint8))
    xs = [0]
    for k in range(1, n):
        xs.append(xs[-1] + int(round(figures[k - 1].shape[1] * rng.uniform(0.55, 0.95))))
    width = xs[-1] + figures[-1].shape[1]
    category = np.zeros((height, width), dtype=np.uint8)
    human = np.zeros((height, width), dtype=np.uint8)
    for k, (x, lab) in enumerate(zip(xs, figures)):
        fh, fw = lab.shape
        y = int(rng.integers(0, height - fh + 1))
        on = lab != 0
        category[y:y + fh, x:x + fw][on] = lab[on]
        human[y:y + fh, x:x + fw][on] = k + 1
    # renumber 1..M in case a figure ended up fully hidden
    present = [p for p in range(1, n + 1) if (human == p).any()]
    lut = np.zeros(256, dtype=np.uint8)
    lut[present] = np.arange(1, len(present) + 1)
    human = lut[human]
    img = _render(rng, category.astype(np.int64), CIHP_COLOURS)
    return img, category, human


def cihp_instance_ids(category: np.ndarray, human: np.ndarray) -> np.ndarray:
    """CIHP's Instance_ids as observed on its validation set: ``20 * (person - 1)
    + class`` on labelled pixels, 0 elsewhere."""
    inst = 20 * (human.astype(np.int64) - 1) + category.astype(np.int64)
    return np.where((category != 0) & (human != 0), inst, 0).astype(np.uint8)


def _write_text_atomic(path: str, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


LAYOUTS = ("lip", "cihp", "lip-pose")


def make_synthetic(out, images: int, size: int = 96, seed: int = 0, val: int | None = None,
                   quiet: bool = True, progress: str = "auto", layout: str = "lip") -> dict:
    """Writes the data set (see the module docstring); returns {split: [ids]}
    (splits ``train`` and ``val``). ``layout``: ``"lip"`` or ``"cihp"``.
    ``quiet=False`` reports progress (``progress``: ``auto``, ``bar``, ``lines``
    or ``off``, see :class:`lipfast._train_utils.Progress`) and a line per split."""
    from PIL import Image

    from .._train_utils import PROGRESS_MODES, Progress

    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    if progress not in PROGRESS_MODES:
        raise ValueError(f"--progress must be one of {PROGRESS_MODES}, got {progress!r}")

    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"--images must be a positive integer, got {images!r}")
    if val is None:
        val = max(2, images // 4)
    if isinstance(val, bool) or not isinstance(val, int) or val < 0:
        raise ValueError(f"--val must be a non-negative integer, got {val!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"--size must be an integer >= 16, got {size!r}")
    out = os.fspath(out)
    if layout == "cihp":
        return _write_cihp(out, images, size, seed, val, quiet, progress)
    if layout == "lip-pose":
        return _write_lip_pose(out, images, size, seed, val, quiet, progress)
    result = {}
    for split, n in (("train", images), ("val", val)):
        if n == 0:
            continue
        img_dir = os.path.join(out, f"{split}_images")
        seg_dir = os.path.join(out, f"{split}_segmentations")
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(seg_dir, exist_ok=True)
        ids = []
        prog = Progress(n, prefix=f"synthetic {split}", every=max(1, n // 4),
                        mode="off" if quiet else progress)
        for i in range(n):
            sid = f"synth_{split}_{i:05d}"
            img, lab = make_sample(seed, split, i, size)
            Image.fromarray(img, "RGB").save(os.path.join(img_dir, sid + ".jpg"), quality=95)
            Image.fromarray(lab, "L").save(os.path.join(seg_dir, sid + ".png"))
            ids.append(sid)
            prog.update(i + 1)
        prog.close()
        _write_text_atomic(os.path.join(out, f"{split}_id.txt"), "\n".join(ids) + "\n")
        result[split] = ids
        if not quiet:
            print(f"synthetic: wrote {n} {split} images to {out}")
    return result


def _write_cihp(out: str, images: int, size: int, seed: int, val: int, quiet: bool,
                progress: str) -> dict:
    from PIL import Image

    from .._train_utils import Progress
    from .cihp import CIHP_SPLITS

    result = {}
    for split, n in (("train", images), ("val", val)):
        if n == 0:
            continue
        folder, id_name = CIHP_SPLITS[split]
        base = os.path.join(out, folder)
        dirs = {k: os.path.join(base, k)
                for k in ("Images", "Category_ids", "Human_ids", "Instance_ids")}
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
        ids = []
        prog = Progress(n, prefix=f"synthetic {folder}", every=max(1, n // 4),
                        mode="off" if quiet else progress)
        for i in range(n):
            sid = f"{i:07d}"
            img, cat, hum = make_cihp_sample(seed, split, i, size)
            Image.fromarray(img, "RGB").save(os.path.join(dirs["Images"], sid + ".jpg"),
                                             quality=95)
            Image.fromarray(cat, "L").save(os.path.join(dirs["Category_ids"], sid + ".png"))
            Image.fromarray(hum, "L").save(os.path.join(dirs["Human_ids"], sid + ".png"))
            Image.fromarray(cihp_instance_ids(cat, hum), "L").save(
                os.path.join(dirs["Instance_ids"], sid + ".png"))
            ids.append(sid)
            prog.update(i + 1)
        prog.close()
        _write_text_atomic(os.path.join(base, id_name), "\n".join(ids) + "\n")
        result[split] = ids
        if not quiet:
            print(f"synthetic: wrote {n} {folder} images to {out} (CIHP layout)")
    return result


def _write_lip_pose(out: str, images: int, size: int, seed: int, val: int, quiet: bool,
                    progress: str) -> dict:
    from PIL import Image

    from .._train_utils import Progress
    from .pose import POSE_CSV_DIR

    result = {}
    csv_dir = os.path.join(out, POSE_CSV_DIR)
    os.makedirs(csv_dir, exist_ok=True)
    for split, n in (("train", images), ("val", val)):
        if n == 0:
            continue
        img_dir = os.path.join(out, f"{split}_images")
        os.makedirs(img_dir, exist_ok=True)
        names, rows = [], []
        prog = Progress(n, prefix=f"synthetic {split}", every=max(1, n // 4),
                        mode="off" if quiet else progress)
        for i in range(n):
            name = f"{10000 + i}_{1 + i % 3}.jpg"  # ImageID_PersonID.jpg
            img, _, joints, v = make_pose_sample(seed, split, i, size)
            Image.fromarray(img, "RGB").save(os.path.join(img_dir, name), quality=95)
            names.append(name)
            rows.append(pose_csv_row(name, joints, v))
            prog.update(i + 1)
        prog.close()
        _write_text_atomic(os.path.join(csv_dir, f"lip_{split}_set.csv"), "\n".join(rows) + "\n")
        result[split] = names
        if not quiet:
            print(f"synthetic: wrote {n} {split} images to {out} (LIP pose layout)")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lipfast.data.synthetic",
                                description="Write a small synthetic LIP- or CIHP-layout "
                                            "data set.")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--images", type=int, required=True, help="number of training images")
    p.add_argument("--size", type=int, default=96, help="nominal image height (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val", type=int, default=None,
                   help="number of validation images (default max(2, images // 4))")
    p.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default="auto",
                   help="auto: a tqdm bar on a terminal, plain lines otherwise")
    p.add_argument("--layout", choices=LAYOUTS, default="lip",
                   help="lip (default): one figure per image, LIP layout; cihp: 2-3 figures "
                        "per image, CIHP layout (Training/, Validation/); lip-pose: one "
                        "figure per image with its 16 joints in LIP's pose layout "
                        "(TrainVal_pose_annotations/lip_{train,val}_set.csv)")
    args = p.parse_args(argv)
    try:
        make_synthetic(args.out, args.images, args.size, args.seed, args.val, quiet=False,
                       progress=args.progress, layout=args.layout)
    except ValueError as err:
        p.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
