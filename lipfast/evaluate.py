"""Evaluate a parsing model on a LIP-layout split or CIHP person crops (SPEC
sections 4, 6 and 11).

``python -m lipfast.evaluate --data ROOT --checkpoint PATH [--split val] [--flip]
[--scales 0.75,1,1.25] [--ensemble CKPT ...] [--save-pred DIR] [--vis N] [--out DIR]
[--json PATH] [--batch-size B] [--device cpu|cuda] [--schp] [--num-classes N]
[--model M] [--head H] [--context C] [--layers L] [--width-mult W]
[--output-stride S] [--norm N] [--crop-size S] [--progress auto|bar|lines|off]``

- Data: ``--data ROOT`` (a LIP-layout root, split ``--split``) or a source
  ``lip:ROOT:SPLIT`` / ``cihp:ROOT:SPLIT`` (:func:`lipfast.data.parse_source`;
  CIHP: :class:`lipfast.data.CIHPPersonCrops`, one sample per person, other
  people and CIHP's Torso-skin ignored).
- Models: CE2P / SCHP or HRNetV2 (either head), chosen from the checkpoint
  (:func:`lipfast.models.checkpoint_config`); ``--model`` / ``--head`` may be
  given and must agree. The images are normalised as the first model expects
  (:func:`lipfast.models.input_format`: BGR with SCHP's mean/std for CE2P, RGB
  with ImageNet's for HRNetV2); ensemble members expecting the other format get
  the batch re-normalised (:func:`lipfast.models.convert_input`).

- Checkpoints (read by :func:`lipfast.models.read_checkpoint`,
  ``torch.load(weights_only=True)``): a ``lipfast.train`` checkpoint (the
  model is rebuilt from its stored hyper-parameters and crop size), SCHP's
  released checkpoints (``{'state_dict': {'module.' + key: tensor}}``, e.g.
  ``exp-schp-201908261155-lip.pth``) or a plain state_dict: the model is
  chosen from the keys (classes from the classifier, context from the keys
  present, Bottleneck counts, width; :func:`lipfast.models.checkpoint_config`),
  output stride 16 and crop 473 unless ``--output-stride`` / ``--crop-size``
  say otherwise. ``--num-classes``, ``--context``, ``--layers``,
  ``--width-mult`` and ``--output-stride`` may be given; one that contradicts
  the checkpoint is an error naming both values. ``--norm`` picks the norm
  implementation (default ``inplace_abn``; keys and numerics are the same).
  ``--schp`` evaluates the self-correction (averaged) model a lipfast.train
  checkpoint holds instead of the trained one.
- Each image is centred in the crop as in SCHP's validation transform
  (:class:`lipfast.data.LIPDataset` with ``train=False``); the fusion logits
  are upsampled to the crop size (bilinear, align_corners=True), optionally
  averaged over scales (the input resized by each ``s``, logits resized back)
  and over the mirrored input (channels 14<->15, 16<->17, 18<->19 swapped back),
  then mapped back to the original image size by the inverse affine warp
  (bilinear, zero outside the crop; SCHP's ``transform_logits``) and
  arg-maxed. ``--ensemble`` adds models: their softmax maps are averaged (SPEC 4).
  The averaging is ``lipfast.metrics.tta`` (``multi_scale_logits``,
  ``ensemble_probs``).
- The confusion matrix over the whole split (``lipfast.metrics.ParsingMetrics``)
  gives pixel accuracy, mean accuracy and per-class IoU / mIoU (x100), printed
  as a table.
- ``--save-pred DIR`` writes ``<id>.png`` palette PNGs (LIP palette) at the
  original size; ``--vis N`` writes N side-by-side PNGs (input | ground truth |
  prediction, titled, upscaled by an integer factor to at least
  :data:`VIS_MIN_HEIGHT` pixels: labels nearest, the input bicubic) with a
  colour legend naming the classes (classes absent from both maps in grey) to
  ``--out`` (default ``eval_vis``).
- Progress: a tqdm bar on a terminal, a plain line every 10 batches otherwise
  (logs, CI); ``--progress`` forces ``bar``, ``lines`` or ``off``.

Precision: the model runs in float32 (``--amp bf16`` on CUDA for autocast);
averaging and the warp back are float32.

Pose (``--task pose``, SPEC 10; ``python -m lipfast.evaluate --task pose
--checkpoint CKPT --data lip-pose:ROOT:val [--flip] [--ensemble CKPT ...]
[--head-size lip|lip:FACTOR] [--pckh-threshold T] [--image-size WxH] [--vis-dir DIR
[--vis N]] [--json PATH]``):

- Checkpoints: a ``lipfast.train --task pose`` checkpoint (the model and the
  input size from its hyper-parameters) or a released bare state dict of
  deep-high-resolution-net.pytorch (``pose_hrnet_w32_256x256.pth``; BatchNorm,
  the input ``--image-size``, default 256x256), read by
  :func:`lipfast.models.model_from_checkpoint` with ``task="pose"``. A parsing
  checkpoint given to a pose evaluation, or a pose checkpoint to a parsing one,
  is an error saying which ``--task`` it needs; so are the flags of the other
  task (``--scales``, ``--schp``, ``--save-pred``, ``--crop-size`` and the parsing
  model flags are parsing's; ``--image-size``, ``--head-size``,
  ``--pckh-threshold`` pose's).
- Data: ``--data lip-pose:ROOT:SPLIT`` or a root (split ``--split``):
  :class:`lipfast.data.LIPPoseDataset` with ``train=False`` (the whole image as
  the person box, no augmentation).
- Heatmaps: one model's, or the ensemble's mean (:func:`lipfast.pose.ensemble`,
  ``--ensemble``); ``--flip`` adds the mirrored input's, fused into the decoding
  (:func:`lipfast.pose.decode` with ``flipped=``: flipped back, pairs swapped,
  shifted by one pixel, averaged). Decoded against each sample's box to the
  original image's pixels.
- PCKh (:class:`lipfast.pose.PCKh`, threshold ``--pckh-threshold`` 0.5) against
  the ground-truth joints, head sizes by ``--head-size`` (default ``lip``: 0.5 x
  |upper_neck - head_top| of the ground truth, an unconfirmed LIP rule, SPEC 10;
  ``lip:FACTOR`` another factor); the table (Head, Shoulder, Elbow, Wrist, Hip,
  Knee, Ankle, Mean, then per joint) is printed; ``--json`` writes it.
- ``--vis-dir DIR``: ``<id>_pose.png`` pictures, ground truth | prediction
  skeletons (:data:`lipfast._pose_tools.LIP_SKELETON`) over the image, of the
  first ``--vis N`` samples (all without ``--vis``); ``--vis N`` alone writes
  them to ``--out`` (default ``eval_vis``), as for parsing.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import torch

from lipfast._io import atomic_file
from lipfast._train_utils import PROGRESS_MODES, Progress, layers_arg
from lipfast.data import SourceSpec, build_source, collate, lip_palette, parse_source, warp_back
from lipfast.data.multi import POSE_KINDS, SOURCE_KINDS
from lipfast.models import (CONTEXTS, MODEL_NAMES, NORMS, POSE_MODEL_NAMES, Checkpoint,
                            input_format, model_from_checkpoint, read_checkpoint)
from lipfast.models.hrnet import HRNET_HEADS
from lipfast.models.registry import describe_hparams

#: ``--vis`` pictures: panels are upscaled (integer factor) to at least this height
VIS_MIN_HEIGHT = 384
_VIS_MARGIN, _VIS_GAP, _VIS_TITLE, _VIS_ROW, _VIS_SWATCH = 8, 8, 24, 22, 16


def _fusion_fn(model, autocast=None, src_format=None):
    """``images -> float32 parsing logits`` of a model (CE2P's fusion logits, or
    HRNetV2's ``seg`` logits, upsampled here to the input size when the model's
    are upsampled with align_corners=False; optionally under autocast). ``src_format``: the
    :func:`lipfast.models.input_format` of the images, converted to the model's
    when it differs (None: the images are already the model's)."""
    from lipfast.models import convert_input, input_format
    from lipfast.models.registry import full_size_logits

    dst = input_format(model) if src_format is not None else None

    def run(x):
        if dst is not None:
            x = convert_input(x, src_format, dst)
        if autocast is not None:
            with autocast():
                out = model(x)
        else:
            out = model(x)
        return full_size_logits(model, out, x.shape[-2:]).float()

    return run


@torch.no_grad()
def model_logits(model, images: torch.Tensor, flip: bool = False, scales=(1.0,),
                 autocast=None, src_format=None) -> torch.Tensor:
    """Fusion logits of ``model`` at the size of ``images`` (B x C x H_c x W_c),
    averaged over ``scales`` and, with ``flip``, over the mirrored input
    (SPEC 4; ``lipfast.metrics.tta.multi_scale_logits``)."""
    from lipfast.metrics.tta import multi_scale_logits

    return multi_scale_logits(_fusion_fn(model, autocast, src_format), images,
                              scales=tuple(scales), flip=flip, size=tuple(images.shape[-2:]))


@torch.no_grad()
def predict_crop(models, images, flip=False, scales=(1.0,), autocast=None,
                 src_format=None) -> torch.Tensor:
    """Crop-size scores of one model (logits) or an ensemble (mean softmax,
    ``lipfast.metrics.tta.ensemble_probs``). ``src_format``: the input format
    of ``images`` (see :func:`_fusion_fn`)."""
    from lipfast.metrics.tta import ensemble_probs, multi_scale_logits

    if len(models) == 1:
        return model_logits(models[0], images, flip, scales, autocast, src_format)
    tta = functools.partial(multi_scale_logits, scales=tuple(scales), flip=flip)
    return ensemble_probs([_fusion_fn(m, autocast, src_format) for m in models], images,
                          tta=tta)


def _palette_png(pred, path: str) -> None:
    from PIL import Image

    im = Image.fromarray(pred.to(torch.uint8).cpu().numpy(), "P")
    im.putpalette(lip_palette())
    with atomic_file(path) as f:
        im.save(f, format="PNG")


def _colour(label: torch.Tensor) -> torch.Tensor:
    pal = torch.tensor(lip_palette(), dtype=torch.uint8).view(256, 3)
    return pal[label.clamp(0, 255).long().cpu()]


def _font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _legend_entries(num_classes: int, class_names=None) -> list:
    from lipfast.metrics import LIP_CLASSES

    if class_names is None:
        class_names = LIP_CLASSES if num_classes == len(LIP_CLASSES) else [
            f"class {c}" for c in range(num_classes)]
    return [(c, str(class_names[c])) for c in range(num_classes)] + [(255, "ignore (255)")]


def vis_layout(height: int, width: int, num_classes: int, class_names=None,
               panels: int = 3) -> dict:
    """Geometry of a ``--vis`` picture for an ``height`` x ``width`` image:
    ``scale`` (integer upscaling of the panels), ``size`` (W, H of the picture),
    ``panels`` (``panels`` (x0, y0, x1, y1) boxes side by side; by default input,
    ground truth, prediction), ``legend`` (its box) and ``swatches`` ({class: box
    of its colour square})."""
    from PIL import Image, ImageDraw

    k = max(1, math.ceil(VIS_MIN_HEIGHT / max(1, int(height))))
    pw, ph = k * int(width), k * int(height)
    m, gap = _VIS_MARGIN, _VIS_GAP
    n = int(panels)
    total_w = 2 * m + n * pw + (n - 1) * gap
    top = m + _VIS_TITLE
    panels = [(m + i * (pw + gap), top, m + i * (pw + gap) + pw, top + ph) for i in range(n)]
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = _legend_entries(num_classes, class_names)
    text_w = max(int(measure.textlength(name, font=font)) for _, name in entries)
    cell = _VIS_SWATCH + 6 + text_w + 14
    cols = max(1, (total_w - 2 * m) // cell)
    rows = math.ceil(len(entries) / cols)
    ly = top + ph + m
    legend = (m, ly, total_w - m, ly + rows * _VIS_ROW)
    swatches = {}
    for i, (c, _) in enumerate(entries):
        x = m + (i % cols) * cell
        y = ly + (i // cols) * _VIS_ROW + (_VIS_ROW - _VIS_SWATCH) // 2
        swatches[c] = (x, y, x + _VIS_SWATCH, y + _VIS_SWATCH)
    return {"scale": k, "size": (total_w, legend[3] + m), "panels": panels, "legend": legend,
            "swatches": swatches, "cell": cell, "entries": entries}


def picture(rgb, maps, titles, num_classes: int, class_names=None):
    """A PIL RGB picture: ``rgb`` (H x W x 3 uint8) and the H x W class ``maps``
    side by side under ``titles`` (one per panel, the image's first), with a
    colour legend naming the classes (those in none of the maps in grey), see
    :func:`vis_layout`."""
    from PIL import Image, ImageDraw

    rgb = torch.as_tensor(rgb)
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    lay = vis_layout(h, w, num_classes, class_names, panels=1 + len(maps))
    k = lay["scale"]
    im = Image.new("RGB", lay["size"], (255, 255, 255))
    d = ImageDraw.Draw(im)
    font = _font()
    tiles = [Image.fromarray(rgb.numpy(), "RGB").resize((k * w, k * h), Image.BICUBIC)]
    tiles += [Image.fromarray(_colour(m).numpy(), "RGB").resize((k * w, k * h), Image.NEAREST)
              for m in maps]
    for tile, box, title in zip(tiles, lay["panels"], titles):
        im.paste(tile, box[:2])
        tw = d.textlength(title, font=font)
        d.text(((box[0] + box[2] - tw) / 2, _VIS_MARGIN + 3), title, fill=(0, 0, 0), font=font)
    present = set()
    for m in maps:
        present |= set(torch.as_tensor(m).unique().tolist())
    pal = lip_palette()
    for c, name in lay["entries"]:
        if c == 255 and 255 not in present:
            continue  # the ignore entry only where a map has it
        x0, y0, x1, y1 = lay["swatches"][c]
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=tuple(pal[3 * c:3 * c + 3]),
                    outline=(90, 90, 90))
        d.text((x1 + 6, y0 - 1), name, font=font,
               fill=(0, 0, 0) if c in present else (165, 165, 165))
    return im


def side_by_side(rgb, label, pred, num_classes: int, class_names=None):
    """The ``--vis`` picture (a PIL RGB image) of one sample: ``rgb`` (H x W x 3
    uint8), ``label`` and ``pred`` (H x W class maps): input | ground truth |
    prediction (:func:`picture`)."""
    return picture(rgb, [label, pred], ("input", "ground truth", "prediction"), num_classes,
                   class_names)


def _side_by_side(meta, label, pred, path: str, num_classes: int, class_names=None) -> None:
    """input | ground truth | prediction with a legend (:func:`side_by_side`)."""
    from lipfast.data import read_image

    rgb = read_image(meta["image_path"]).flip(0).permute(1, 2, 0)
    if "box" in meta:  # a person crop (CIHP): the label is the box's
        x0, y0, x1, y1 = (int(v) for v in meta["box"])
        rgb = rgb[y0:y1 + 1, x0:x1 + 1]
    im = side_by_side(rgb, label, pred, num_classes, class_names)
    with atomic_file(path) as f:
        im.save(f, format="PNG")


@torch.no_grad()
def evaluate_loader(models, loader, num_classes: int, device, flip=False, scales=(1.0,),
                    autocast=None, save_pred: str | None = None, vis: int = 0,
                    vis_dir: str | None = None, progress=None, ignore_index: int = 255,
                    reduce: bool = False, src_format=None):
    """Runs the models over ``loader`` (a ``LIPDataset(train=False)`` or
    ``CIHPPersonCrops(train=False)`` loader with :func:`lipfast.data.collate`)
    and returns the filled ``ParsingMetrics`` (``reduce=True`` all-reduces it
    across ranks). ``src_format``: the loader's input format, when a model
    expects another (:func:`lipfast.models.input_format`)."""
    from lipfast.metrics import LIP_CLASSES, ParsingMetrics

    names = LIP_CLASSES if num_classes == len(LIP_CLASSES) else None
    metrics = ParsingMetrics(num_classes=num_classes, ignore_index=ignore_index,
                             class_names=names)
    for m in models:
        m.eval()
    if save_pred:
        os.makedirs(save_pred, exist_ok=True)
    if vis and vis_dir:
        os.makedirs(vis_dir, exist_ok=True)
    shown = 0
    done = 0
    for images, labels, metas in loader:
        images = images.to(device, non_blocking=True)
        scores = predict_crop(models, images, flip, scales, autocast, src_format)
        for i, meta in enumerate(metas):
            size = (int(meta["height"]), int(meta["width"]))
            pred = warp_back(scores[i], meta["affine"], size).argmax(0)
            lab = labels[i].to(pred.device)
            metrics.update(pred.unsqueeze(0), lab.unsqueeze(0))
            if save_pred:
                _palette_png(pred, os.path.join(save_pred, f"{meta['id']}.png"))
            if shown < vis and vis_dir:
                _side_by_side(meta, labels[i], pred.cpu(),
                              os.path.join(vis_dir, f"{meta['id']}_vis.png"), num_classes,
                              names)
                shown += 1
        done += 1
        if progress is not None:
            progress.update(done)
    if reduce:
        metrics.reduce()
    return metrics


def _parse_scales(text: str):
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales must be comma-separated numbers, got {text!r}")
    if not scales or any(not s > 0 for s in scales):
        raise argparse.ArgumentTypeError(f"--scales must be positive numbers, got {text!r}")
    return scales


def load_model(path, device, use_schp: bool = False, **flags):
    """(model in eval mode on ``device``, hparams, checkpoint) from a
    checkpoint in any format :func:`lipfast.models.read_checkpoint` reads;
    ``flags``: ``num_classes``, ``context``, ``layers``, ``width_mult``,
    ``output_stride``, ``norm``, ``model``, ``head`` (checked against the checkpoint).
    ``path`` may be an already read :class:`lipfast.models.Checkpoint`."""
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    model, cfg = model_from_checkpoint(ckpt, which="schp_model" if use_schp else "model",
                                       **flags)
    hp = dict(cfg)
    if ckpt.hparams is not None and ckpt.hparams.get("crop_size"):
        hp["crop_size"] = ckpt.hparams["crop_size"]
    return model.to(device).eval(), hp, ckpt


def build_parser() -> argparse.ArgumentParser:
    from lipfast._pose_tools import head_size_arg
    from lipfast.train import _size_arg

    p = argparse.ArgumentParser(prog="python -m lipfast.evaluate",
                                description="mIoU of a parsing checkpoint (lipfast.train's, "
                                "SCHP's release layout or a plain state_dict) on a LIP split; "
                                "--task pose: PCKh of a pose checkpoint on LIP's pose track.")
    p.add_argument("--task", choices=("parsing", "pose"), default="parsing",
                   help="parsing (default) or pose")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="a LIP-layout root (split --split), or lip:ROOT:SPLIT / cihp:ROOT:SPLIT "
                        "(--task pose: lip-pose:ROOT:SPLIT)")
    p.add_argument("--checkpoint", required=True,
                   help="lipfast.train checkpoint, SCHP release checkpoint "
                        "({'state_dict': {'module.*': ...}}) or plain state_dict")
    p.add_argument("--split", default="val")
    p.add_argument("--flip", action="store_true", help="average with the mirrored input")
    p.add_argument("--scales", type=_parse_scales, default=(1.0,),
                   help="comma-separated input scales, e.g. 0.75,1,1.25")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="CKPT",
                   help="more checkpoints; softmax maps are averaged")
    p.add_argument("--schp", action="store_true",
                   help="evaluate the self-correction model stored in lipfast.train checkpoints")
    g = p.add_argument_group("model (default: from the checkpoint; a value that contradicts "
                             "it is an error)")
    g.add_argument("--num-classes", type=int, default=None)
    g.add_argument("--model", choices=MODEL_NAMES + POSE_MODEL_NAMES, default=None)
    g.add_argument("--head", choices=HRNET_HEADS, default=None, help="HRNetV2's head")
    g.add_argument("--context", choices=CONTEXTS, default=None)
    g.add_argument("--layers", type=layers_arg, default=None,
                   help="Bottleneck counts of layer1..4, e.g. 3,4,23,3")
    g.add_argument("--width-mult", type=float, default=None)
    g.add_argument("--output-stride", type=int, choices=(8, 16), default=None,
                   help="not visible in the keys: default the stored one, else 16 (SCHP)")
    g.add_argument("--norm", choices=NORMS, default=None,
                   help="norm implementation (default inplace_abn; same keys and numerics)")
    p.add_argument("--save-pred", default=None, metavar="DIR", help="write palette PNGs here")
    p.add_argument("--vis", type=int, default=0, metavar="N",
                   help="write N side-by-side pictures (input | truth | prediction)")
    p.add_argument("--out", default="eval_vis", help="folder of the --vis pictures")
    p.add_argument("--vis-dir", default=None, metavar="DIR",
                   help="folder of the pictures (replaces --out); --task pose: skeleton "
                        "pictures of the first --vis N samples, all without --vis")
    p.add_argument("--json", default=None, metavar="PATH", help="write the metrics as JSON")
    p.add_argument("--crop-size", type=int, default=None,
                   help="network input size (default: the training crop size, else 473)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="autocast dtype on CUDA")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N only")
    p.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                   help="auto: a tqdm bar on a terminal, plain lines otherwise")
    g = p.add_argument_group("pose (--task pose)")
    g.add_argument("--image-size", type=_size_arg, default=None, metavar="WxH",
                   help="network input (default: the training size, else 256x256)")
    g.add_argument("--head-size", type=head_size_arg, default=None, metavar="RULE",
                   help="PCKh head size: lip (default: 0.5 x |upper_neck - head_top| of the "
                        "ground truth, unconfirmed LIP rule) or lip:FACTOR")
    g.add_argument("--pckh-threshold", type=float, default=None, help="default 0.5")
    return p


#: flags (dest, default) of one task only; given with the other task they are an error
_PARSING_ONLY = (("scales", (1.0,)), ("schp", False), ("save_pred", None), ("crop_size", None),
                 ("num_classes", None), ("head", None), ("context", None), ("layers", None),
                 ("width_mult", None), ("output_stride", None))
_POSE_ONLY = (("image_size", None), ("head_size", None), ("pckh_threshold", None))


def _check_task_flags(args) -> None:
    other = _PARSING_ONLY if args.task == "pose" else _POSE_ONLY
    given = ["--" + k.replace("_", "-") for k, default in other if getattr(args, k) != default]
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply "
                         f"to --task {args.task}")
    if args.model is not None and (args.model in POSE_MODEL_NAMES) != (args.task == "pose"):
        kind = "pose" if args.task == "parsing" else "parsing"
        raise ValueError(f"--model {args.model} is a {kind} model; this is a --task "
                         f"{args.task} evaluation")


def _read_checkpoint_of_task(path, task: str):
    """The checkpoint at ``path``, refused (ValueError naming the flag to use) when
    it holds a model of the other task."""
    from lipfast._pose_tools import checkpoint_task

    ckpt = read_checkpoint(path)
    holds = checkpoint_task(ckpt)
    if holds != task:
        raise ValueError(f"checkpoint {path}: holds a {holds} model ({ckpt.description}); this "
                         f"is a --task {task} evaluation: evaluate it with --task {holds}")
    return ckpt


def _data_spec(args, task: str):
    """``--data`` as a source of ``task`` (a bare root: its ``--split``)."""
    kind, sep, _ = args.data.partition(":")
    if sep and kind in SOURCE_KINDS:
        spec = parse_source(args.data)
    else:
        spec = SourceSpec("lip-pose" if task == "pose" else "lip", args.data, args.split)
    if (spec.kind in POSE_KINDS) != (task == "pose"):
        raise ValueError(f"--data {args.data}: a {spec.kind} source; --task {task} takes "
                         + ("lip-pose:ROOT:SPLIT" if task == "pose" else
                            "a LIP root, lip:ROOT:SPLIT or cihp:ROOT:SPLIT"))
    return spec


def _autocast(args, device):
    if device.type == "cuda" and args.amp != "off":
        dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
        return functools.partial(torch.autocast, "cuda", dtype=dtype)
    return None


def _write_json(path, out: dict) -> None:
    if path:
        with atomic_file(path, "w") as f:
            json.dump(out, f, indent=1)


def pose_main(args) -> dict:
    """``--task pose`` (see the module docstring); returns the results dict
    (the JSON's content plus ``predictions``: {id: (coords J x 2, maxvals J)})."""
    from lipfast._pose_tools import check_image_size, evaluate_pose_loader
    from lipfast.data import pose_collate
    from lipfast.pose.pckh import LIP_HEAD_FACTOR

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models, hps = [], []
    for path in [args.checkpoint] + list(args.ensemble):
        ckpt = _read_checkpoint_of_task(path, "pose")
        model, cfg = model_from_checkpoint(ckpt, task="pose", norm=args.norm, model=args.model)
        models.append(model.to(device).eval())
        hp = dict(cfg)
        if ckpt.hparams is not None and ckpt.hparams.get("image_size"):
            hp["image_size"] = [int(v) for v in ckpt.hparams["image_size"]]
        hps.append(hp)
        print(f"lipfast.evaluate: {path}: {ckpt.description}; {describe_hparams(hp)}",
              flush=True)
    joints = {int(h["num_joints"]) for h in hps}
    if len(joints) != 1:
        raise ValueError(f"ensemble members disagree on num_joints: {sorted(joints)}")
    size = check_image_size(args.image_size or hps[0].get("image_size") or (256, 256))
    spec = _data_spec(args, "pose")
    fmt = input_format(models[0])
    ds = build_source(spec, image_size=size, train=False, seed=0, channel_order=fmt[0],
                      mean=fmt[1], std=fmt[2])
    print(f"lipfast.evaluate: {spec.kind} {spec.root} split {spec.split}: {len(ds)} samples, "
          f"input {size[0]}x{size[1]}", flush=True)
    if args.max_images is not None:
        ds = torch.utils.data.Subset(ds, range(min(len(ds), args.max_images)))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, collate_fn=pose_collate)
    head_size = args.head_size or "lip"
    threshold = 0.5 if args.pckh_threshold is None else float(args.pckh_threshold)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"--pckh-threshold must be a positive number, got {threshold}")
    vis_dir = args.vis_dir or (args.out if args.vis else None)
    vis = (args.vis or len(ds)) if vis_dir else 0
    t0 = time.perf_counter()
    prog = Progress(len(loader), prefix="evaluate", every=10, mode=args.progress)
    preds = []
    try:
        pckh = evaluate_pose_loader(models, loader, device, flip=args.flip,
                                    autocast=_autocast(args, device), head_size=head_size,
                                    threshold=threshold, progress=prog, vis=vis,
                                    vis_dir=vis_dir,
                                    src_format=fmt if len(models) > 1 else None,
                                    predictions=preds)
    finally:
        prog.close()
    res = pckh.compute()
    print(pckh.format_table())
    factor = head_size.partition(":")[2] or f"{LIP_HEAD_FACTOR:g}"
    print(f"lipfast.evaluate: {len(ds)} images, PCKh@{threshold:g} Mean "
          f"{res['table']['Mean']:.2f} (head size {factor} x |upper_neck - head_top|, "
          f"flip={args.flip}, models={len(models)}, {time.perf_counter() - t0:.1f} s)")
    out = dict(res, task="pose", images=len(ds), flip=args.flip, head_size=head_size,
               image_size=list(size), checkpoints=[args.checkpoint] + list(args.ensemble),
               model={k: v for k, v in hps[0].items() if k != "image_size"})
    _write_json(args.json, out)
    out["predictions"] = {sid: (c, m) for sid, c, m in preds}
    return out


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("lipfast.evaluate: --batch-size must be >= 1")
    _check_task_flags(args)
    if args.task == "pose":
        return pose_main(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    flags = {k: getattr(args, k) for k in ("num_classes", "context", "layers", "width_mult",
                                             "output_stride", "norm", "model", "head")}
    models, hps = [], []
    for path in [args.checkpoint] + list(args.ensemble):
        m, hp, ckpt = load_model(_read_checkpoint_of_task(path, "parsing"), device, args.schp,
                                 **flags)
        models.append(m)
        hps.append(hp)
        print(f"lipfast.evaluate: {path}: {ckpt.description}; {describe_hparams(hp)}",
              flush=True)
    ncls = {int(h["num_classes"]) for h in hps}
    if len(ncls) != 1:
        raise ValueError(f"ensemble members disagree on num_classes: {sorted(ncls)}")
    num_classes = ncls.pop()
    crop = args.crop_size or hps[0].get("crop_size") or 473
    crop = tuple(crop) if isinstance(crop, (list, tuple)) else int(crop)
    spec = _data_spec(args, "parsing")   # a plain root: --split
    fmt = input_format(models[0])
    ds = build_source(spec, crop_size=crop, train=False, seed=0, num_classes=num_classes,
                      channel_order=fmt[0], mean=fmt[1], std=fmt[2])
    print(f"lipfast.evaluate: {spec.kind} {spec.root} split {spec.split}: {len(ds)} samples, "
          f"crop {crop}", flush=True)
    if args.max_images is not None:
        ds = torch.utils.data.Subset(ds, range(min(len(ds), args.max_images)))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, collate_fn=collate)
    autocast = _autocast(args, device)

    t0 = time.perf_counter()
    prog = Progress(len(loader), prefix="evaluate", every=10, mode=args.progress)
    metrics = evaluate_loader(models, loader, num_classes, device, args.flip, args.scales,
                              autocast, args.save_pred, args.vis, args.vis_dir or args.out,
                              prog,
                              src_format=fmt if len(models) > 1 else None)
    prog.close()
    res = metrics.compute()
    print(metrics.table())
    print(f"lipfast.evaluate: {len(ds)} images, mIoU {float(res['miou']):.2f}, pixel acc "
          f"{float(res['pixel_acc']):.2f}, mean acc {float(res['mean_acc']):.2f} "
          f"(flip={args.flip}, scales={list(args.scales)}, models={len(models)}, "
          f"{time.perf_counter() - t0:.1f} s)")
    out = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in res.items()}
    out.update(images=len(ds), flip=args.flip, scales=list(args.scales),
               checkpoints=[args.checkpoint] + list(args.ensemble),
               model={k: v for k, v in hps[0].items() if k != "crop_size"})
    _write_json(args.json, out)
    return out


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, TypeError) as err:
        print(f"lipfast.evaluate: error: {err}", file=sys.stderr)
        sys.exit(2)
