"""Evaluate a parsing model on a LIP-layout split (SPEC sections 4 and 6).

``python -m lipfast.evaluate --data ROOT --checkpoint PATH [--split val] [--flip]
[--scales 0.75,1,1.25] [--ensemble CKPT ...] [--save-pred DIR] [--vis N] [--out DIR]
[--json PATH] [--batch-size B] [--device cpu|cuda] [--schp]``

- The model is rebuilt from the hyper-parameters ``lipfast.train`` stores in the
  checkpoint (``context``, ``output_stride``, ``layers``, ``width_mult``,
  ``num_classes``, ``norm``, ``crop_size``) and loaded with
  ``torch.load(weights_only=True)``. ``--schp`` evaluates the self-correction
  (averaged) model a checkpoint holds instead of the trained one.
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
  prediction) to ``--out`` (default ``eval_vis``).

Precision: the model runs in float32 (``--amp bf16`` on CUDA for autocast);
averaging and the warp back are float32.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

from lipfast._io import atomic_file
from lipfast._train_utils import Progress, build_model, eval_norm, load_training_checkpoint
from lipfast.data import LIPDataset, collate, lip_palette, warp_back


def _fusion_fn(model, autocast=None):
    """``images -> float32 fusion logits`` of a CE2P model (optionally under autocast)."""
    from lipfast.metrics.tta import ce2p_fusion

    def run(x):
        if autocast is not None:
            with autocast():
                out = ce2p_fusion(model(x))
        else:
            out = ce2p_fusion(model(x))
        return out.float()

    return run


@torch.no_grad()
def model_logits(model, images: torch.Tensor, flip: bool = False, scales=(1.0,),
                 autocast=None) -> torch.Tensor:
    """Fusion logits of ``model`` at the size of ``images`` (B x C x H_c x W_c),
    averaged over ``scales`` and, with ``flip``, over the mirrored input
    (SPEC 4; ``lipfast.metrics.tta.multi_scale_logits``)."""
    from lipfast.metrics.tta import multi_scale_logits

    return multi_scale_logits(_fusion_fn(model, autocast), images, scales=tuple(scales),
                              flip=flip, size=tuple(images.shape[-2:]))


@torch.no_grad()
def predict_crop(models, images, flip=False, scales=(1.0,), autocast=None) -> torch.Tensor:
    """Crop-size scores of one model (logits) or an ensemble (mean softmax,
    ``lipfast.metrics.tta.ensemble_probs``)."""
    from lipfast.metrics.tta import ensemble_probs, multi_scale_logits

    if len(models) == 1:
        return model_logits(models[0], images, flip, scales, autocast)
    tta = functools.partial(multi_scale_logits, scales=tuple(scales), flip=flip)
    return ensemble_probs([_fusion_fn(m, autocast) for m in models], images, tta=tta)


def _palette_png(pred, path: str) -> None:
    from PIL import Image

    im = Image.fromarray(pred.to(torch.uint8).cpu().numpy(), "P")
    im.putpalette(lip_palette())
    with atomic_file(path) as f:
        im.save(f, format="PNG")


def _colour(label: torch.Tensor) -> torch.Tensor:
    pal = torch.tensor(lip_palette(), dtype=torch.uint8).view(256, 3)
    return pal[label.clamp(0, 255).long().cpu()]


def _side_by_side(meta, label, pred, path: str) -> None:
    """input | ground truth | prediction, at the original size."""
    from PIL import Image

    from lipfast.data import read_image

    rgb = read_image(meta["image_path"]).flip(0).permute(1, 2, 0)
    panel = torch.cat([rgb, _colour(label), _colour(pred)], dim=1)
    with atomic_file(path) as f:
        Image.fromarray(panel.numpy(), "RGB").save(f, format="PNG")


@torch.no_grad()
def evaluate_loader(models, loader, num_classes: int, device, flip=False, scales=(1.0,),
                    autocast=None, save_pred: str | None = None, vis: int = 0,
                    vis_dir: str | None = None, progress=None, ignore_index: int = 255,
                    reduce: bool = False):
    """Runs the models over ``loader`` (a ``LIPDataset(train=False)`` loader
    with :func:`lipfast.data.collate`) and returns the filled
    ``ParsingMetrics`` (``reduce=True`` all-reduces it across ranks)."""
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
        scores = predict_crop(models, images, flip, scales, autocast)
        for i, meta in enumerate(metas):
            size = (int(meta["height"]), int(meta["width"]))
            pred = warp_back(scores[i], meta["affine"], size).argmax(0)
            lab = labels[i].to(pred.device)
            metrics.update(pred.unsqueeze(0), lab.unsqueeze(0))
            if save_pred:
                _palette_png(pred, os.path.join(save_pred, f"{meta['id']}.png"))
            if shown < vis and vis_dir:
                _side_by_side(meta, labels[i], pred.cpu(),
                              os.path.join(vis_dir, f"{meta['id']}_vis.png"))
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


def load_model(path, device, use_schp: bool = False):
    """(model in eval mode on ``device``, checkpoint hparams) from a
    ``lipfast.train`` checkpoint."""
    ckpt = load_training_checkpoint(path)
    hp = ckpt["hparams"]
    model = build_model(hp, norm=eval_norm(hp["norm"]))
    state = ckpt["model"]
    if use_schp:
        if ckpt.get("schp_model") is None:
            raise ValueError(f"{path} holds no self-correction (SCHP) model; train with --cycles")
        state = ckpt["schp_model"]
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), hp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lipfast.evaluate",
                                description="mIoU of a lipfast.train checkpoint on a LIP split.")
    p.add_argument("--data", required=True, help="LIP-layout data root")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by lipfast.train")
    p.add_argument("--split", default="val")
    p.add_argument("--flip", action="store_true", help="average with the mirrored input")
    p.add_argument("--scales", type=_parse_scales, default=(1.0,),
                   help="comma-separated input scales, e.g. 0.75,1,1.25")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="CKPT",
                   help="more checkpoints; softmax maps are averaged")
    p.add_argument("--schp", action="store_true",
                   help="evaluate the self-correction model stored in the checkpoints")
    p.add_argument("--save-pred", default=None, metavar="DIR", help="write palette PNGs here")
    p.add_argument("--vis", type=int, default=0, metavar="N",
                   help="write N side-by-side pictures (input | truth | prediction)")
    p.add_argument("--out", default="eval_vis", help="folder of the --vis pictures")
    p.add_argument("--json", default=None, metavar="PATH", help="write the metrics as JSON")
    p.add_argument("--crop-size", type=int, default=None,
                   help="network input size (default: the training crop size)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="autocast dtype on CUDA")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N only")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("lipfast.evaluate: --batch-size must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models, hps = [], []
    for path in [args.checkpoint] + list(args.ensemble):
        m, hp = load_model(path, device, args.schp)
        models.append(m)
        hps.append(hp)
    ncls = {int(h["num_classes"]) for h in hps}
    if len(ncls) != 1:
        raise ValueError(f"ensemble members disagree on num_classes: {sorted(ncls)}")
    num_classes = ncls.pop()
    crop = args.crop_size or hps[0].get("crop_size") or 473
    crop = tuple(crop) if isinstance(crop, (list, tuple)) else int(crop)
    ds = LIPDataset(args.data, args.split, crop_size=crop, train=False, num_classes=num_classes)
    if args.max_images is not None:
        ds = torch.utils.data.Subset(ds, range(min(len(ds), args.max_images)))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, collate_fn=collate)
    autocast = None
    if device.type == "cuda" and args.amp != "off":
        dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
        autocast = functools.partial(torch.autocast, "cuda", dtype=dtype)

    t0 = time.perf_counter()
    prog = Progress(len(loader), prefix="evaluate", every=10)
    metrics = evaluate_loader(models, loader, num_classes, device, args.flip, args.scales,
                              autocast, args.save_pred, args.vis, args.out, prog)
    prog.close()
    res = metrics.compute()
    print(metrics.table())
    print(f"lipfast.evaluate: {len(ds)} images, mIoU {float(res['miou']):.2f}, pixel acc "
          f"{float(res['pixel_acc']):.2f}, mean acc {float(res['mean_acc']):.2f} "
          f"(flip={args.flip}, scales={list(args.scales)}, models={len(models)}, "
          f"{time.perf_counter() - t0:.1f} s)")
    out = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in res.items()}
    out.update(images=len(ds), flip=args.flip, scales=list(args.scales),
               checkpoints=[args.checkpoint] + list(args.ensemble))
    if args.json:
        with atomic_file(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"lipfast.evaluate: error: {err}", file=sys.stderr)
        sys.exit(2)
