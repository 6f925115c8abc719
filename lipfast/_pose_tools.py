"""The pose track's evaluation pieces shared by ``python -m lipfast.train --task
pose`` (validation) and ``python -m lipfast.evaluate --task pose`` (SPEC section 10):

- :func:`pose_heatmaps`: the heatmaps of one model or an ensemble (averaged with
  :func:`lipfast.pose.ensemble`), and with the flip test those of the mirrored
  input, left raw for :func:`lipfast.pose.decode`'s fused ``flipped=``;
- :func:`evaluate_pose_loader`: decode against each sample's box (``meta``
  ``center`` / ``scale``: image pixels) and accumulate :class:`lipfast.pose.PCKh`
  against the ground-truth joints of the original image, head sizes by a
  :func:`head_size_arg` rule (default ``lip``: :func:`lipfast.pose.head_size_lip`,
  0.5 x |upper_neck - head_top| of the ground truth; NOT a confirmed LIP rule,
  see SPEC 10), optionally writing skeleton pictures;
- :data:`LIP_SKELETON` (the limbs drawn), :func:`skeleton_layout`,
  :func:`skeleton_picture`: ground truth | prediction skeletons over the image
  (PIL);
- :func:`checkpoint_task`: whether a checkpoint holds a pose or a parsing model.

Why the ensemble is averaged before the flip: :func:`lipfast.pose.flip_back` is
linear, so ``(mean_i h_i + flip_back(mean_i f_i)) / 2`` equals the mean over the
models of each one's flip-test map ``(h_i + flip_back(f_i)) / 2``; one fused
decode then does the flip test of the whole ensemble.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os

import torch

from lipfast._io import atomic_file
from lipfast.pose import (LIP_JOINTS, LIP_POSE_FLIP_PAIRS, PCKh, decode, ensemble,
                          head_size_lip)
from lipfast.pose.pckh import LIP_HEAD_FACTOR

__all__ = ["LIP_SKELETON", "SIDE_COLOURS", "HEAD_SIZE_RULES", "head_size_arg", "head_sizes",
           "pose_heatmaps", "evaluate_pose_loader", "skeleton_layout", "skeleton_picture",
           "checkpoint_task"]

#: the limbs of LIP's (MPII's) 16-joint skeleton drawn on the pictures:
#: (joint a, joint b, side) with joint indices of :data:`lipfast.pose.LIP_JOINTS`
#: (0 r_ankle ... 15 l_wrist); side picks the colour (:data:`SIDE_COLOURS`)
LIP_SKELETON: tuple[tuple[int, int, str], ...] = (
    (0, 1, "right"), (1, 2, "right"), (2, 6, "right"),        # right leg to the pelvis
    (5, 4, "left"), (4, 3, "left"), (3, 6, "left"),           # left leg to the pelvis
    (6, 7, "centre"), (7, 8, "centre"), (8, 9, "centre"),     # pelvis, thorax, neck, head top
    (10, 11, "right"), (11, 12, "right"), (12, 7, "right"),   # right arm to the thorax
    (15, 14, "left"), (14, 13, "left"), (13, 7, "left"),      # left arm to the thorax
)
#: limb and joint colours by side (the person's right / left)
SIDE_COLOURS = {"right": (230, 40, 40), "left": (40, 90, 230), "centre": (250, 190, 0)}
#: ``--head-size`` rules: ``lip`` (``lip:FACTOR``): FACTOR (default 0.5) x
#: |upper_neck - head_top| of the ground truth (:func:`lipfast.pose.head_size_lip`)
HEAD_SIZE_RULES = ("lip",)

_MARGIN, _GAP, _TITLE = 8, 8, 24
_LIMB_WIDTH = 3
_DOT = 4


def check_image_size(size) -> tuple[int, int]:
    """``--image-size`` (W, H) as ints, refused when PoseHRNet cannot take it
    (:func:`lipfast.models.pose_hrnet.pose_input_ok`); shared by train and evaluate."""
    from lipfast.models.pose_hrnet import pose_input_ok

    w, h = (int(v) for v in size)
    if not pose_input_ok(h, w):
        raise ValueError(f"--image-size {w}x{h}: PoseHRNet needs sides whose ceil(n / 4) is "
                         "a multiple of 8 (e.g. multiples of 32: 256x256, 192x256, 288x384)")
    return w, h


def head_size_arg(text: str) -> str:
    """argparse type of ``--head-size``: ``lip`` or ``lip:FACTOR`` (a positive
    number) -> the canonical text (``lip`` for the default factor 0.5)."""
    rule, sep, factor = str(text).strip().partition(":")
    rule = rule.lower()
    if rule not in HEAD_SIZE_RULES:
        raise argparse.ArgumentTypeError(
            f"--head-size must be lip or lip:FACTOR (FACTOR x |upper_neck - head_top|), got "
            f"{text!r}")
    if not sep:
        return rule
    try:
        f = float(factor)
    except ValueError:
        f = math.nan
    if not (math.isfinite(f) and f > 0):
        raise argparse.ArgumentTypeError(f"--head-size {text!r}: FACTOR must be a positive "
                                         f"number")
    return rule if f == LIP_HEAD_FACTOR else f"{rule}:{f:g}"


def head_sizes(rule: str, gt_joints: torch.Tensor) -> torch.Tensor:
    """The B head sizes of rule ``rule`` (:func:`head_size_arg`) for ground-truth
    joints B x J x 2 (NaN where missing: a NaN head size, whose joints PCKh skips)."""
    rule = head_size_arg(rule)
    name, _, factor = rule.partition(":")
    return head_size_lip(gt_joints, float(factor) if factor else LIP_HEAD_FACTOR)


@torch.no_grad()
def pose_heatmaps(models, images: torch.Tensor, flip: bool = False, autocast=None,
                  src_format=None):
    """``(heatmaps, flipped)`` of ``models`` (one PoseHRNet, or several: their
    float32 heatmaps averaged with :func:`lipfast.pose.ensemble`, equal weights)
    for ``images`` (B x 3 x H x W); ``flipped``: the same for the W-mirrored
    images when ``flip``, else None -- raw, to be passed to
    :func:`lipfast.pose.decode` (``flipped=``), which flips it back, swaps the
    pairs, shifts it and averages. ``src_format``: the input format of
    ``images`` when a member expects another (:func:`lipfast.models.input_format`)."""
    from lipfast.models import convert_input, input_format

    def run(model, x):
        if src_format is not None:
            x = convert_input(x, src_format, input_format(model))
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = model(x)
        return out.float()

    def average(x):
        maps = [run(m, x) for m in models]
        return maps[0] if len(maps) == 1 else ensemble(maps)

    return average(images), (average(images.flip(3)) if flip else None)


def _joint_names(num_joints: int):
    return LIP_JOINTS if num_joints == len(LIP_JOINTS) else [f"joint {j}"
                                                            for j in range(num_joints)]


@torch.no_grad()
def evaluate_pose_loader(models, loader, device, flip: bool = False, autocast=None,
                         head_size: str = "lip", threshold: float = 0.5, progress=None,
                         reduce: bool = False, vis: int = 0, vis_dir: str | None = None,
                         src_format=None, flip_pairs=LIP_POSE_FLIP_PAIRS,
                         predictions: list | None = None) -> PCKh:
    """PCKh of ``models`` (eval mode is set) over ``loader`` (a
    ``LIPPoseDataset(train=False)`` loader with :func:`lipfast.data.pose_collate`).

    Per batch: :func:`pose_heatmaps` (flip test and ensemble), one
    :func:`lipfast.pose.decode` against ``meta["center"]`` / ``meta["scale"]``
    (image pixels of the original image), then ``PCKh.update`` with the ground
    truth ``meta["joints"]`` (original image pixels; a joint is visible where
    both coordinates are present) and :func:`head_sizes` of ``head_size``.
    ``reduce``: all-reduce the counts across ranks (``PCKh.sync``). ``vis`` /
    ``vis_dir``: write the first ``vis`` samples' pictures
    (:func:`skeleton_picture`: ground truth | prediction) as
    ``<vis_dir>/<id>_pose.png``. ``predictions``: a list to which
    ``(meta id, coords J x 2, maxvals J)`` (CPU) is appended per sample."""
    num_joints = int(getattr(models[0], "num_joints", len(LIP_JOINTS)))
    pckh = PCKh(threshold=threshold, joint_names=_joint_names(num_joints))
    for m in models:
        m.eval()
    if vis and vis_dir:
        os.makedirs(vis_dir, exist_ok=True)
    shown = 0
    for done, (images, _, _, meta) in enumerate(loader, 1):
        images = images.to(device, non_blocking=True)
        heat, flipped = pose_heatmaps(models, images, flip, autocast, src_format)
        coords, maxvals = decode(heat, meta["center"].to(device, torch.float64),
                                 meta["scale"].to(device, torch.float64), flipped=flipped,
                                 flip_pairs=flip_pairs)
        gt = meta["joints"].to(device, torch.float64)
        pckh.update(coords, gt, torch.isfinite(gt).all(-1), head_sizes(head_size, gt))
        if predictions is not None or (vis and vis_dir and shown < vis):
            c_cpu, m_cpu = coords.cpu(), maxvals.cpu()
            for i, sid in enumerate(meta["id"]):
                if predictions is not None:
                    predictions.append((sid, c_cpu[i], m_cpu[i]))
                if vis and vis_dir and shown < vis:
                    _write_picture(meta["image_path"][i], meta["joints"][i], c_cpu[i],
                                   m_cpu[i], os.path.join(vis_dir, f"{sid}_pose.png"))
                    shown += 1
        if progress is not None:
            progress.update(done)
    if reduce:
        pckh.sync()
    return pckh


# ----------------------------------------------------------------- pictures

def skeleton_layout(height: int, width: int, panels: int = 2) -> dict:
    """Geometry of a skeleton picture of an ``height`` x ``width`` image:
    ``scale`` (integer upscaling, to at least ``lipfast.evaluate.VIS_MIN_HEIGHT``
    pixels, as the parsing pictures), ``size`` (W, H) and ``panels`` (x0, y0,
    x1, y1 boxes side by side under their titles)."""
    from lipfast.evaluate import VIS_MIN_HEIGHT

    k = max(1, math.ceil(VIS_MIN_HEIGHT / max(1, int(height))))
    pw, ph = k * int(width), k * int(height)
    boxes = [(_MARGIN + i * (pw + _GAP), _MARGIN + _TITLE,
              _MARGIN + i * (pw + _GAP) + pw, _MARGIN + _TITLE + ph) for i in range(panels)]
    size = (2 * _MARGIN + panels * pw + (panels - 1) * _GAP, 2 * _MARGIN + _TITLE + ph)
    return {"scale": k, "size": size, "panels": boxes}


def panel_point(box, k: int, x: float, y: float) -> tuple[float, float]:
    """Where image pixel coordinates (x, y) land in a panel upscaled by ``k``
    (pixel centres map to pixel centres)."""
    return box[0] + (x + 0.5) * k - 0.5, box[1] + (y + 0.5) * k - 0.5


def skeleton_picture(rgb, panels, skeleton=LIP_SKELETON):
    """A PIL RGB picture: the image ``rgb`` (H x W x 3 uint8) once per panel,
    upscaled (:func:`skeleton_layout`, bicubic), with a skeleton drawn over each.

    ``panels``: a list of ``(title, coords, present)``: ``coords`` J x 2 (x, y)
    in image pixels, ``present`` J bools; a limb of ``skeleton`` is drawn when
    both its joints are present and finite (a line of its side's colour,
    :data:`SIDE_COLOURS`), then every present joint as a dot of its side's
    colour with a black outline."""
    from PIL import Image, ImageDraw

    from lipfast.evaluate import _font

    rgb = torch.as_tensor(rgb)
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    lay = skeleton_layout(h, w, len(panels))
    k = lay["scale"]
    im = Image.new("RGB", lay["size"], (255, 255, 255))
    d = ImageDraw.Draw(im)
    font = _font()
    tile = Image.fromarray(rgb.numpy(), "RGB").resize((k * w, k * h), Image.BICUBIC)
    side_of = {}
    for a, b, side in skeleton:
        side_of.setdefault(a, side)
        side_of.setdefault(b, side)
    for (title, coords, present), box in zip(panels, lay["panels"]):
        im.paste(tile, box[:2])
        tw = d.textlength(title, font=font)
        d.text(((box[0] + box[2] - tw) / 2, _MARGIN + 3), title, fill=(0, 0, 0), font=font)
        pts = torch.as_tensor(coords, dtype=torch.float64)
        ok = torch.as_tensor(present, dtype=torch.bool) & torch.isfinite(pts).all(-1)
        xy = [panel_point(box, k, float(px), float(py)) for px, py in pts.tolist()]
        sub = ImageDraw.Draw(im)
        for a, b, side in skeleton:
            if ok[a] and ok[b]:
                sub.line([xy[a], xy[b]], fill=SIDE_COLOURS[side], width=_LIMB_WIDTH)
        for j in range(len(xy)):
            if ok[j]:
                x, y = xy[j]
                sub.ellipse([x - _DOT, y - _DOT, x + _DOT, y + _DOT],
                            fill=SIDE_COLOURS[side_of.get(j, "centre")], outline=(0, 0, 0))
        d.rectangle(list(box), outline=(90, 90, 90))  # panel frame (after the paste)
    return im


def _write_picture(image_path: str, gt, coords, maxvals, path: str) -> None:
    """ground truth | prediction over the original image; predicted joints whose
    heatmap maximum is not positive (decoded at the box's corner) are left out."""
    from lipfast.data import read_image

    rgb = read_image(image_path).flip(0).permute(1, 2, 0)  # BGR CHW -> RGB HWC
    gt = torch.as_tensor(gt, dtype=torch.float64)
    im = skeleton_picture(rgb, [("ground truth", gt, torch.isfinite(gt).all(-1)),
                                ("prediction", coords, maxvals > 0)])
    with atomic_file(path) as f:
        im.save(f, format="PNG")


# ----------------------------------------------------------------- checkpoints

def checkpoint_task(ckpt) -> str:
    """``"pose"`` or ``"parsing"``: what a :class:`lipfast.models.Checkpoint`
    holds (lipfast.train's stored task or hyper-parameters; else the keys,
    :func:`lipfast.models.checkpoint.infer_config`, whose errors name the file)."""
    from lipfast.models import is_pose_model
    from lipfast.models.checkpoint import infer_config

    if ckpt.hparams is not None:
        raw = ckpt.raw if isinstance(ckpt.raw, dict) else {}
        task = raw.get("task")
        if task in ("pose", "parsing"):
            return task
        return "pose" if is_pose_model(ckpt.hparams) else "parsing"
    return "pose" if is_pose_model(infer_config(ckpt.state_dict, ckpt.path)) else "parsing"
