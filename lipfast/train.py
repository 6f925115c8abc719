"""Train a parsing model (CE2P / SCHP, or HRNetV2) on LIP-layout and CIHP data
(SPEC sections 3, 5, 6, 9, 11).

Single process::

    python -m lipfast.train --data ROOT [--context asp_oc] [--epochs 150] [--out runs/x]
    python -m lipfast.train --model hrnetv2_w48 --crop-size 576 \
        --data lip:LIP:train --data lip:LIP:val --data cihp:CIHP:train ...

Several processes (DDP; gloo on CPU, NCCL on GPU; one process per GPU)::

    torchrun --nproc_per_node=K -m lipfast.train --data ROOT ...

What it does, as SCHP's ``train.py``:

- Model (``--model``, :func:`lipfast.models.build`): ``ce2p`` (default,
  :class:`lipfast.models.CE2P`: ``--context`` psp (default) or an OC context,
  ``--output-stride``, ``--layers``, ``--width-mult``) or ``hrnetv2_w18`` /
  ``hrnetv2_w32`` / ``hrnetv2_w48`` (:class:`lipfast.models.HRNetV2`:
  ``--head ce2p`` (default: CE2P's edge and fusion head, so the SCHP criterion
  and self-correction apply unchanged) or ``--head seg`` (HRNet's own head,
  trained with the fused upsampled cross-entropy, HRNet-Semantic-Segmentation's
  recipe; no self-correction), ``--context`` none (default) or an OC context on
  the concatenated features). The CE2P-only flags are refused with HRNet and
  ``--head`` with CE2P. The input follows the model: BGR with SCHP's mean/std
  for CE2P, RGB with ImageNet's for HRNetV2 (:func:`lipfast.models.input_format`).
  ``--norm`` defaults to ``inplace_abn_sync``
  under DDP, so the norms' statistics are synchronised across ranks, and to
  ``inplace_abn`` in one process. ``--imagenet PATH`` initialises the backbone;
  ``--init CKPT`` initialises the whole model from a checkpoint in any format
  :func:`lipfast.models.read_checkpoint` reads (a lipfast.train checkpoint's
  ``model``, SCHP's released ``exp-schp-*.pth``, a plain state_dict), e.g. to
  fine-tune SCHP's LIP model; ``--num-classes``, ``--context``, ``--layers``
  and ``--width-mult`` must match its keys (an error names the flag otherwise).
- Data: ``--data`` once per source (:func:`lipfast.data.parse_source`):
  ``ROOT`` (a LIP root's train split), ``lip:ROOT:SPLIT`` or
  ``cihp:ROOT:SPLIT`` (:class:`lipfast.data.CIHPPersonCrops`: one
  single-person sample per person of a CIHP image, other people ignored,
  CIHP's Torso-skin ignored for LIP's 20 classes), each optionally with
  ``:WEIGHT`` (a sampling weight). Several sources form one
  :class:`lipfast.data.MultiSourceDataset` (the epoch has as many samples as
  all sources together; with weights each source's share is weight x size);
  the per-source counts are printed at start. Every sample gets SCHP's
  augmentation at ``--crop-size`` (473, 512, 576 or any size >= 2). Each rank
  reads its shard of a shuffled order (``seed + epoch``; drop_last), edge
  labels are computed on the device with :func:`lipfast.losses.generate_edge`.
  Validation (``--val-every``) uses ``--val-data`` (default: the first
  source's root, split ``val``).
- Loss: :class:`lipfast.losses.SCHPCriterion` on the float32 outputs (HRNetV2
  with ``--head seg``: :func:`lipfast.losses.upsample_cross_entropy`, the logits
  upsampled with the model's ``align_corners`` inside the fused op).
- Optimiser: SGD (momentum 0.9, weight decay 5e-4, ``--lr`` 7e-3), learning rate
  by SCHP's schedule (linear warm-up, cosine, cyclical cosine restarts during
  self-correction) evaluated per iteration (SCHP steps it per epoch).
- AMP on CUDA (``--amp bf16`` default where supported, ``fp16`` with a gradient
  scaler, ``off``); CPU runs float32.
- Self-correction (``--cycles N --cycle-epochs K``): starts at epoch
  ``epochs - N*K``; at the end of that epoch and every K epochs after it the
  parameters are averaged into the SCHP model (cumulative moving average,
  alpha = 1 / (cycle + 1)), the SCHP model's norm statistics are re-estimated on
  the training data (``--bn-batches`` limits the batches), and from then on its
  fusion and edge logits (eval mode, no gradient) are the soft targets of the
  criterion with ``cycle_n``.
- Output in ``--out``: ``checkpoint.pth`` (written atomically at the end of every
  epoch and when stopping), ``metrics.csv`` (epoch, iters, loss, lr, val_miou,
  seconds; val_miou when ``--val-every`` runs validation), ``curves.png`` (loss
  and val mIoU per epoch, drawn with PIL: no matplotlib needed; rewritten every
  epoch) and progress on the console: a tqdm bar per epoch on a terminal, a
  plain line every ``--log-every`` iterations otherwise (logs, CI);
  ``--progress bar|lines|off`` forces one.

Pose (``--task pose``; every other command line is the parsing task, unchanged)::

    python -m lipfast.train --task pose --model pose_hrnet_w32 \
        --data lip-pose:LIP:train [--val-data lip-pose:LIP:val --val-every 10] \
        --image-size 256x256 [--sigma 2] [--lr-steps 170,200] ...

trains :class:`lipfast.models.PoseHRNet` with SPEC 10's recipe (Adam 1e-3, x0.1
at epochs 170 and 200, 210 epochs, batch 32 per process, the fused
:func:`lipfast.pose.heatmap_loss` with sigma 2, 3 for 288x384) on LIP's pose
track and validates with PCKh (``val_pckh`` in ``metrics.csv``): see
:mod:`lipfast._pose_train`. The flags whose default depends on the task
(:data:`TASK_DEFAULTS`) default per task; a flag of the other task
(``--crop-size``, ``--cycles``, ... with pose; ``--image-size``, ``--sigma``, ...
with parsing) is an error, and so are sources and models of the other task.
The loop, DDP, AMP, checkpoints, resume, progress and curves are this module's.

Checkpoint (``torch.load(weights_only=True)`` reads it): ``task``, ``model``,
``optimizer``, ``scheduler``, ``scaler``, ``epoch`` and ``iter_in_epoch`` (the
position: batches of ``epoch`` already done), ``iteration`` (global),
``cycle_n``, ``schp_model`` (when cycles run), the torch/CUDA/numpy/python RNG
states, the epoch's running loss, ``hparams`` (model hyper-parameters and crop
size, what ``lipfast.evaluate`` rebuilds the model from) and ``args``.

``--resume`` continues from ``--out``/checkpoint.pth (or the path given) exactly
where it stopped, mid-epoch included: the data order and the augmentation are
functions of (seed, epoch, index), the sampler skips the batches already done,
RNG states, optimiser momentum and schedule position are restored. A resumed run
ends with the same weights as an uninterrupted one (bitwise on CPU here; GPU
kernels with non-deterministic reductions may differ in the last bits).

Stopping: Ctrl-C (SIGINT) or SIGTERM finishes the current iteration, writes the
checkpoint of that iteration boundary (atomically: temporary file, then
``os.replace``), says where it stopped (epochs counted from 1, as the progress
shows: "interrupted in epoch 2/100 after 1/2 of its iterations") and exits with
status 130; the previous checkpoint stays intact
until the new one is complete. A second Ctrl-C aborts at once without saving
(the last complete checkpoint is still intact). ``--max-iters N`` stops the same
way after N iterations in total (status 0).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import csv
import datetime
import gc
import inspect
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from lipfast._io import atomic_file
from lipfast._train_utils import (CHECKPOINT_FORMAT, PROGRESS_MODES, Progress, SCHPSchedule,
                                  ShardSampler, StopFlag, atomic_save, bn_re_estimate,
                                  ignore_sigint_in_worker, load_training_checkpoint,
                                  layers_arg, model_hparams, moving_average, rng_state,
                                  set_rng_state)

CSV_FIELDS = ("epoch", "iters", "loss", "lr", "val_miou", "seconds")
CURVES_SIZE = (900, 340)  # curves.png: two panels, loss and val mIoU per epoch


#: ``--task``: parsing (default; CE2P / SCHP, HRNetV2) or pose (PoseHRNet, SPEC 10)
TASKS = ("parsing", "pose")
#: the defaults of the flags whose default depends on ``--task`` (parser default None);
#: a flag absent from a task's dict does not apply to that task (an error if given)
TASK_DEFAULTS = {
    "parsing": {"model": "ce2p", "epochs": 150, "batch_size": 16, "lr": 7e-3,
                "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 10.0,
                "crop_size": 473, "num_classes": 20, "cycles": 0, "cycle_epochs": 10,
                "head": None, "context": None, "output_stride": None, "layers": None,
                "width_mult": None, "bn_batches": None},
    # SPEC 10: Adam lr 1e-3, x0.1 at epochs 170 and 200, 210 epochs, batch 32 per GPU
    "pose": {"model": "pose_hrnet_w32", "epochs": 210, "batch_size": 32, "lr": 1e-3,
             "weight_decay": 0.0, "image_size": (256, 256), "sigma": None,
             "lr_steps": (170, 200), "lr_factor": 0.1, "head_size": "lip",
             "pckh_threshold": 0.5},
}


def resolve_task_args(args) -> argparse.Namespace:
    """Fills the task-dependent defaults of ``args`` (:data:`TASK_DEFAULTS`) in
    place and returns it; a flag of the other task that was given is a
    ``ValueError`` naming it. Idempotent."""
    task = getattr(args, "task", None) or "parsing"
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    args.task = task
    mine = TASK_DEFAULTS[task]
    other = TASK_DEFAULTS["pose" if task == "parsing" else "parsing"]
    given = sorted("--" + k.replace("_", "-") for k in other
                   if k not in mine and getattr(args, k, None) is not None)
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply "
                         f"to --task {task}" + (" (the pose input size is --image-size WxH)"
                                                if "--crop-size" in given else ""))
    for k, v in mine.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def _size_arg(text: str) -> tuple:
    """argparse type of ``--image-size``: ``WxH`` (width first, as the pose
    configs) or one number for a square, e.g. ``256x256``, ``288x384``, ``64``."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        vals = tuple(int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size must be WxH (e.g. 256x256), got {text!r}")
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 2:
        raise argparse.ArgumentTypeError(f"--image-size must be WxH with sides >= 2, got {text!r}")
    return vals


def _steps_arg(text: str) -> tuple:
    """argparse type of ``--lr-steps``: epochs, comma-separated (``170,200``; ``""``: none)."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr-steps must be comma-separated epochs, got "
                                         f"{text!r}")
    if any(v < 1 for v in vals) or list(vals) != sorted(vals):
        raise argparse.ArgumentTypeError(f"--lr-steps must be increasing epochs >= 1, got "
                                         f"{text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    from lipfast._pose_tools import head_size_arg
    from lipfast.models import MODEL_NAMES, POSE_MODEL_NAMES
    from lipfast.models.hrnet import HRNET_HEADS

    p = argparse.ArgumentParser(prog="python -m lipfast.train",
                                description="Train CE2P/SCHP or HRNetV2 on LIP / CIHP data "
                                            "(--task pose: PoseHRNet on LIP's pose track).")
    p.add_argument("--task", default="parsing", choices=TASKS,
                   help="parsing (default) or pose (heatmaps of LIP's 16 joints, PCKh)")
    p.add_argument("--data", required=True, action="append", metavar="SOURCE",
                   help="a data source, repeatable: ROOT (LIP layout, train split), "
                        "lip:ROOT:SPLIT or cihp:ROOT:SPLIT (--task pose: lip-pose:ROOT:SPLIT), "
                        "optionally :WEIGHT")
    p.add_argument("--val-data", default=None, metavar="SOURCE",
                   help="validation source (default: the first --data root, split val)")
    p.add_argument("--out", default="runs/lipfast", help="output folder")
    p.add_argument("--model", default=None, choices=MODEL_NAMES + POSE_MODEL_NAMES,
                   help="ce2p (ResNet-101 CE2P/SCHP, default) or HRNetV2 of width 18/32/48; "
                        "--task pose: pose_hrnet_w32 (default) or pose_hrnet_w48")
    p.add_argument("--head", default=None, choices=HRNET_HEADS,
                   help="HRNetV2's head: ce2p (edge + fusion, default) or seg (HRNet's)")
    p.add_argument("--context", default=None,
                   choices=("psp", "base_oc", "pyramid_oc", "asp_oc", "none"),
                   help="CE2P: psp (default) or an OC context; HRNetV2: none (default) or "
                        "an OC context")
    p.add_argument("--output-stride", type=int, default=None, choices=(8, 16),
                   help="CE2P only (default 16)")
    p.add_argument("--norm", default=None,
                   choices=("inplace_abn_sync", "inplace_abn", "batchnorm"),
                   help="default: inplace_abn_sync under DDP, inplace_abn otherwise (--task "
                        "pose: batchnorm, the reference's)")
    p.add_argument("--layers", type=layers_arg, default=None,
                   help="CE2P only: Bottleneck counts of layer1..4 (default 3,4,23,3 = "
                        "ResNet-101)")
    p.add_argument("--width-mult", type=float, default=None, help="CE2P only (default 1)")
    p.add_argument("--num-classes", type=int, default=None, help="parsing only (default 20)")
    p.add_argument("--imagenet", default=None, metavar="PATH",
                   help="ImageNet checkpoint for the backbone (CE2P: a deep-stem ResNet; "
                        "HRNetV2: hrnetv2_w48_imagenet_pretrained.pth and its siblings)")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="initial weights of the whole model: a lipfast.train checkpoint, "
                        "SCHP's release checkpoint or a plain state_dict")
    p.add_argument("--epochs", type=int, default=None, help="default 150 (pose: 210)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per process (default 16; pose: 32)")
    p.add_argument("--crop-size", type=int, default=None,
                   help="parsing: training crop (473, default; the seed's larger inputs: 512, 576)")
    p.add_argument("--lr", type=float, default=None, help="default 7e-3 (SGD; pose: Adam 1e-3)")
    p.add_argument("--momentum", type=float, default=None, help="parsing: SGD's (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="default 5e-4 (pose: 0, the reference's Adam)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="parsing only (default 10)")
    p.add_argument("--cycles", type=int, default=None,
                   help="self-correction cycles (SCHP: 5); they start at epochs - cycles*cycle_epochs")
    p.add_argument("--cycle-epochs", type=int, default=None, help="parsing only (default 10)")
    p.add_argument("--bn-batches", type=int, default=None,
                   help="batches for the SCHP model's BN re-estimation (default: a whole epoch)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="stop (and save) after this many iterations in total")
    p.add_argument("--val-every", type=int, default=0,
                   help="validate (--val-data) every N epochs (0: never)")
    p.add_argument("--val-batches", type=int, default=None, help="limit validation batches")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (default: OUT/checkpoint.pth)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="autocast on CUDA (auto: bf16 where supported); CPU runs float32")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20,
                   help="without a terminal: a progress line every N iterations")
    p.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                   help="auto: a tqdm bar on a terminal, plain lines otherwise")
    p.add_argument("--check-sync", action="store_true",
                   help="under DDP, verify after every epoch that all ranks hold equal weights")
    g = p.add_argument_group("pose (--task pose, SPEC 10)")
    g.add_argument("--image-size", type=_size_arg, default=None, metavar="WxH",
                   help="network input, width first (default 256x256; 288x384, 384x512, ...)")
    g.add_argument("--sigma", type=float, default=None,
                   help="Gaussian of the heatmap targets, heatmap pixels (default 2; 3 for "
                        "288x384)")
    g.add_argument("--lr-steps", type=_steps_arg, default=None, metavar="E1,E2",
                   help="epochs at which the learning rate is multiplied by --lr-factor "
                        "(default 170,200)")
    g.add_argument("--lr-factor", type=float, default=None, help="default 0.1")
    g.add_argument("--head-size", type=head_size_arg, default=None, metavar="RULE",
                   help="PCKh head size of the validation: lip (default: 0.5 x |upper_neck - "
                        "head_top| of the ground truth, unconfirmed LIP rule) or lip:FACTOR")
    g.add_argument("--pckh-threshold", type=float, default=None, help="default 0.5")
    return p


def _log(msg: str) -> None:
    if _rank() == 0:
        print(msg, flush=True)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg is None and torch.cuda.is_available() or (
        device_arg is not None and str(device_arg).startswith("cuda"))
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        return device, dist.get_rank(), dist.get_world_size()
    return torch.device("cuda" if want_cuda else "cpu"), 0, 1


def _autocast_factory(device, amp: str):
    if device.type != "cuda" or amp == "off":
        return None, None
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16

    def autocast():
        return torch.autocast("cuda", dtype=dtype)

    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return autocast, scaler


def _float_outputs(preds):
    return [[p.float() for p in preds[0]], [e.float() for e in preds[1]]]


def _sync_check(model) -> float:
    """Max over tensors of the difference between ranks of (sum, sum |x|): the
    parameters, and the norms' running statistics when they are synchronised
    (``inplace_abn_sync``; other norms update them per rank after DDP's broadcast
    from rank 0 at each forward, so they differ by the last step's update)."""
    sync_norms = getattr(model, "norm", None) == "inplace_abn_sync"
    sums = []
    tensors = list(model.parameters())
    if sync_norms:
        tensors += [b for b in model.buffers() if b.is_floating_point()]
    for t in tensors:
        d = t.detach().double()
        sums += [d.sum(), d.abs().sum()]
    local = torch.stack(sums)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def _write_csv_row(path: str, row: dict, fields=CSV_FIELDS) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow(row)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        lo, hi = lo - max(abs(lo) * 0.1, 0.5), hi + max(abs(hi) * 0.1, 0.5)
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v < hi + step * 0.999:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _draw_panel(draw, box, xs, ys, colour, title, font, empty_note="") -> None:
    """A line chart of ``ys`` over ``xs`` (epochs) in ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 58, x1 - 12, y0 + 28, y1 - 40
    draw.text((x0 + (x1 - x0) / 2 - draw.textlength(title, font=font) / 2, y0 + 4), title,
              fill=(0, 0, 0), font=font)
    label = "epoch"
    draw.text(((left + right) / 2 - draw.textlength(label, font=font) / 2, bottom + 20), label,
              fill=(0, 0, 0), font=font)
    if not ys:
        draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        draw.text((left + 10, (top + bottom) / 2 - 7), empty_note, fill=(120, 120, 120), font=font)
        return
    xt = _nice_ticks(min(xs), max(xs), 6)
    xt = [t for t in xt if float(t).is_integer()] or xt
    yt = _nice_ticks(min(ys), max(ys), 5)
    xlo, xhi = min(xt[0], min(xs)), max(xt[-1], max(xs))
    ylo, yhi = yt[0], yt[-1]

    def px(x):
        return left + (x - xlo) / (xhi - xlo or 1) * (right - left)

    def py(y):
        return bottom - (y - ylo) / (yhi - ylo or 1) * (bottom - top)

    for t in yt:
        y = py(t)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        text = f"{t:g}"
        draw.text((left - 6 - draw.textlength(text, font=font), y - 7), text, fill=(0, 0, 0),
                  font=font)
    for t in xt:
        x = px(t)
        draw.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
        text = f"{t:g}"
        draw.text((x - draw.textlength(text, font=font) / 2, bottom + 5), text, fill=(0, 0, 0),
                  font=font)
    pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
    if len(pts) > 1:
        draw.line(pts, fill=colour, width=2)
    for x, y in pts:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))  # the frame on top


def _plot_curves(csv_path: str, png_path: str, val_column: str = "val_miou",
                 val_title: str = "val mIoU (%)") -> bool:
    """``curves.png``: training loss and the validation metric (column
    ``val_column``: val mIoU, or the pose runs' val PCKh) per epoch from
    ``metrics.csv``, drawn with PIL (no matplotlib), written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    with open(csv_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return False
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    loss = [(int(r["epoch"]), float(r["loss"])) for r in rows
            if math.isfinite(float(r["loss"]))]
    vals = [(int(r["epoch"]), float(r[val_column])) for r in rows
            if r[val_column] not in ("", None) and math.isfinite(float(r[val_column]))]
    w, h = CURVES_SIZE
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    _draw_panel(d, (0, 0, w // 2, h), [e for e, _ in loss], [v for _, v in loss],
                (31, 119, 180), "training loss", font)
    _draw_panel(d, (w // 2, 0, w, h), [e for e, _ in vals], [v for _, v in vals],
                (255, 127, 14), val_title, font, "no validation yet (--val-every N)")
    with atomic_file(png_path) as f:
        im.save(f, format="PNG")
    return True


class Trainer:
    """The training loop of ``python -m lipfast.train`` (parsing; ``--task pose``:
    :class:`lipfast._pose_train.PoseTrainer`, a subclass). The steps of
    ``__init__`` (``_check_args``, ``_build_data``, ``_build_model``,
    ``_build_training``) and ``train_step`` / ``validate`` / ``_validation_result``
    / ``_describe_run`` are what a task defines; device and DDP setup,
    checkpoints, exact resume, the stop flag, progress, ``metrics.csv`` and
    ``curves.png`` are shared."""

    task = "parsing"
    #: the columns of metrics.csv, the validation column and its curve's title
    csv_fields = CSV_FIELDS
    val_column = "val_miou"
    val_title = "val mIoU (%)"
    val_label = "val mIoU"
    #: hparams entries that may change on --resume
    resume_free = ("norm", "crop_size")

    def __init__(self, args):
        self.args = resolve_task_args(args)
        if self.args.task != self.task:
            raise ValueError(f"{type(self).__name__} trains --task {self.task}, got --task "
                             f"{self.args.task}")
        self.device, self.rank, self.world = _setup_distributed(args.device)
        torch.manual_seed(args.seed)
        norm = args.norm or self._default_norm()
        self.model_kwargs = self._model_kwargs(norm)
        self._check_args()
        from lipfast.models import input_format

        self.input_format = input_format(args.model)
        self._build_data()
        model = self._build_model()
        if args.imagenet:
            from lipfast.models import load_imagenet

            load_imagenet(model, args.imagenet)
        if args.init:
            self._init_weights(model, args.init)
        self.model = model.to(self.device)
        self.hparams = self._hparams()
        self._wrap_ddp(norm)
        self._build_training()
        self.autocast, self.scaler = _autocast_factory(self.device, args.amp)
        self.cycle_n = 0
        self.epoch = 0
        self.iter_in_epoch = 0
        self.iteration = 0
        self.loss_sum = 0.0
        self.loss_count = 0
        self.losses = []  # per-iteration losses of this process (for callers / tests)
        self.lr = self.scheduler.get_last_lr()  # rate of the last step taken
        self.out = args.out
        self.ckpt_path = os.path.join(self.out, "checkpoint.pth")
        self.csv_path = os.path.join(self.out, "metrics.csv")
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)

    def _default_norm(self) -> str:
        return "inplace_abn_sync" if self.world > 1 else "inplace_abn"

    def _collate(self):
        from lipfast.data import collate

        return collate

    def _build_data(self) -> None:
        """``train_set`` (one source, or a MultiSourceDataset), ``sampler``,
        ``iters_per_epoch``, ``loader``, ``collate``; the validation source is
        built once when ``--val-every`` is on (fail now, not after an epoch)."""
        from lipfast.data import MultiSourceDataset
        from lipfast.data.multi import unique_names

        args = self.args
        self.collate = self._collate()
        # each source its own augmentation stream (the first keeps --seed's)
        sources = [self._source(spec, train=True, seed=args.seed + 7919 * i)
                   for i, spec in enumerate(self.specs)]
        weights = [spec.weight for spec in self.specs]
        if len(sources) == 1 and weights[0] == 1.0:
            self.train_set = sources[0]
        else:
            self.train_set = MultiSourceDataset(
                sources, weights=None if all(w == 1.0 for w in weights) else weights,
                seed=args.seed,
                names=unique_names(f"{sp.kind}:{sp.split}" for sp in self.specs))
        if args.val_every:  # fail now, not after the first epoch
            self._source(self.val_spec, train=False)
        n = len(self.train_set)
        if n < self.world * args.batch_size:
            raise ValueError(f"{', '.join(args.data)}: {n} training samples, fewer than one "
                             f"batch ({args.batch_size} per process x {self.world} processes)")
        self.sampler = ShardSampler(n, args.batch_size, self.rank, self.world, args.seed)
        self.iters_per_epoch = self.sampler.batches
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=args.batch_size, sampler=self.sampler,
            num_workers=args.workers, collate_fn=self.collate, drop_last=True,
            pin_memory=self.device.type == "cuda", worker_init_fn=ignore_sigint_in_worker,
            # own generator: starting an epoch must not draw from the global RNG
            # (a mid-epoch resume would otherwise shift the dropout stream)
            generator=torch.Generator().manual_seed(args.seed))

    def _build_model(self):
        from lipfast.models import build

        return build(self.args.model, num_classes=self.args.num_classes, **self.model_kwargs)

    def _hparams(self) -> dict:
        return dict(model_hparams(self.model), crop_size=self.args.crop_size)

    def _wrap_ddp(self, norm: str) -> None:
        self.ddp = None
        if self.world > 1:
            # the sync norms keep the buffers equal: no per-forward buffer broadcast;
            # other norms get DDP's broadcast from rank 0 (ranks would drift apart)
            ddp_cls = torch.nn.parallel.DistributedDataParallel
            no_sync = {}
            if norm == "inplace_abn_sync":
                no_sync = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(ddp_cls).parameters
                           else {"broadcast_buffers": False})
            self.ddp = ddp_cls(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **no_sync)
        self.net = self.ddp or self.model

    def _build_training(self) -> None:
        """criterion, optimizer, scheduler and the self-correction state."""
        from lipfast.losses import SCHPCriterion

        args = self.args
        self.ce2p_outputs = getattr(self.model, "head", "ce2p") == "ce2p"
        self.criterion = (SCHPCriterion(num_classes=args.num_classes) if self.ce2p_outputs
                          else None)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr,
                                         momentum=args.momentum, weight_decay=args.weight_decay)
        self.schp_start = args.epochs - args.cycles * args.cycle_epochs if args.cycles else None
        self.scheduler = SCHPSchedule(self.optimizer, args.lr, self.iters_per_epoch, args.epochs,
                                      warmup_epochs=args.warmup_epochs,
                                      cycle_start=self.schp_start, cycle_epochs=args.cycle_epochs)
        self.schp_model = copy.deepcopy(self.model) if args.cycles else None

    def _model_kwargs(self, norm: str) -> dict:
        """The constructor arguments of ``--model`` from the flags (CE2P-only
        flags refused with HRNet and ``--head`` with CE2P)."""
        a = self.args
        from lipfast.models import is_pose_model

        if is_pose_model(a.model):
            raise ValueError(f"--model {a.model} is a pose model: train it with --task pose")
        if a.model == "ce2p":
            if a.head is not None:
                raise ValueError("--head applies to the HRNetV2 models (--model hrnetv2_w48 "
                                 "...); CE2P has its own head")
            if a.context == "none":
                raise ValueError("--context none: CE2P needs a context (psp, base_oc, "
                                 "pyramid_oc or asp_oc)")
            return {"context": a.context or "psp", "output_stride": a.output_stride or 16,
                    "layers": tuple(a.layers or (3, 4, 23, 3)),
                    "width_mult": 1.0 if a.width_mult is None else a.width_mult, "norm": norm}
        given = [f for f, v in (("--output-stride", a.output_stride), ("--layers", a.layers),
                                ("--width-mult", a.width_mult)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} applies to --model ce2p only, not to "
                             f"{a.model}")
        if a.context == "psp":
            raise ValueError("--context psp is CE2P's; HRNetV2 takes none or an OC context "
                             "(base_oc, pyramid_oc, asp_oc)")
        return {"head": a.head or "ce2p",
                "context": None if a.context in (None, "none") else a.context, "norm": norm}

    def _source_kwargs(self) -> dict:
        """What :func:`lipfast.data.build_source` takes besides the spec, split
        mode, seed and input format (parsing: the crop size and classes)."""
        return {"crop_size": self.args.crop_size, "num_classes": self.args.num_classes}

    def _source(self, spec, train: bool, seed: int | None = None):
        from lipfast.data import build_source

        order, mean, std = self.input_format
        return build_source(spec, train=train, seed=self.args.seed if seed is None else seed,
                            channel_order=order, mean=mean, std=std, **self._source_kwargs())

    def _init_config(self, ckpt, model) -> None:
        """Checks ``--init``'s checkpoint against the model flags (errors name the
        flag): :func:`lipfast.models.checkpoint_config` of the task."""
        from lipfast.models import checkpoint_config

        kw = {k: v for k, v in self.model_kwargs.items() if k != "norm"}
        if "layers" in kw:
            kw["layers"] = list(kw["layers"])
        checkpoint_config(ckpt, model=self.args.model, num_classes=self.args.num_classes, **kw)

    def _init_weights(self, model, path: str) -> None:
        """``--init``: the whole model's weights from a checkpoint in any format,
        its keys checked against the model flags first (errors name the flag)."""
        from lipfast.models import load_checkpoint, read_checkpoint

        ckpt = read_checkpoint(path)
        self._init_config(ckpt, model)
        load_checkpoint(model, ckpt)
        _log(f"lipfast.train: weights initialised from {path} ({ckpt.description})")

    def _check_common_args(self, positive=("epochs", "batch_size")) -> None:
        """The checks of both tasks; parses ``--data`` / ``--val-data`` into
        ``specs`` / ``val_spec`` (sources of another task are refused)."""
        a = self.args
        if a.init and a.resume is not None:
            raise ValueError("--init and --resume both set the weights: pass one (--resume "
                             "continues a lipfast.train run, --init starts a new one)")
        if a.init and a.imagenet:
            raise ValueError("--init and --imagenet both set the backbone: pass one")
        for name in positive:
            if getattr(a, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
        if not a.lr > 0:
            raise ValueError(f"--lr must be positive, got {a.lr}")
        if a.max_iters is not None and a.max_iters < 0:
            raise ValueError("--max-iters must be >= 0")
        from lipfast.data import parse_source
        from lipfast.data.multi import POSE_KINDS

        self.specs = [parse_source(text) for text in a.data]
        for spec in self.specs:
            if not os.path.isdir(spec.root):
                raise FileNotFoundError(f"--data {spec.kind}:{spec.root}:{spec.split}: data "
                                        f"root not found: {spec.root}")
        if a.val_data is not None:
            self.val_spec = parse_source(a.val_data)
        else:
            self.val_spec = dataclasses.replace(self.specs[0], split="val", weight=1.0)
        pose = self.task == "pose"
        for flag, spec in [("--data", sp) for sp in self.specs] + [("--val-data", self.val_spec)]:
            if (spec.kind in POSE_KINDS) != pose:
                raise ValueError(
                    f"{flag} {spec}: a {spec.kind} source holds "
                    + ("pose annotations (joints): train on it with --task pose"
                       if not pose else "parsing labels; --task pose takes lip-pose:ROOT:SPLIT "
                       "sources (LIP's pose track)"))

    def _check_args(self):
        a = self.args
        self._check_common_args(("epochs", "batch_size", "cycle_epochs", "num_classes"))
        if a.crop_size < 2:
            raise ValueError(f"--crop-size must be >= 2, got {a.crop_size}")
        if a.cycles and self.model_kwargs.get("head") == "seg":
            raise ValueError("--cycles: self-correction needs the CE2P head's edge and fusion "
                             "outputs; HRNetV2 --head seg has neither (use --head ce2p)")
        if a.cycles < 0:
            raise ValueError(f"--cycles must be >= 0, got {a.cycles}")
        if a.cycles and a.cycles * a.cycle_epochs >= a.epochs:
            raise ValueError(f"--cycles {a.cycles} x --cycle-epochs {a.cycle_epochs} leaves no "
                             f"warm start in {a.epochs} epochs (SCHP: 150 epochs, 5 x 10)")
        if not (a.width_mult is None or a.width_mult > 0):
            raise ValueError("--lr and --width-mult must be positive")

    # -------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "task": self.task,
            "hparams": self.hparams,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "iter_in_epoch": self.iter_in_epoch,
            "iteration": self.iteration, "cycle_n": self.cycle_n,
            "schp_model": self.schp_model.state_dict() if self.schp_model is not None else None,
            "loss_sum": self.loss_sum, "loss_count": self.loss_count,
            "rng": rng_state(),
            "world_size": self.world,
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()},
        }

    def save(self) -> None:
        if self.rank == 0:
            atomic_save(self.state(), self.ckpt_path)
        if self.world > 1:
            dist.barrier()

    def resume(self, path: str) -> None:
        from lipfast.models import is_pose_model

        ckpt = load_training_checkpoint(path)
        stored = dict(ckpt["hparams"])
        stored.setdefault("model", "ce2p")   # checkpoints from before HRNetV2
        task = ckpt.get("task") or ("pose" if is_pose_model(stored) else "parsing")
        if task != self.task:
            raise ValueError(f"--resume {path}: a --task {task} checkpoint ({stored['model']}); "
                             f"this run is --task {self.task}")
        for k in self.hparams:
            if k in self.resume_free:
                continue
            if stored.get(k) != self.hparams[k]:
                raise ValueError(f"--resume {path}: checkpoint has {k}={stored.get(k)!r},"
                                 f" the command line {self.hparams[k]!r}")
        if ckpt.get("world_size", 1) != self.world:
            _log(f"lipfast.train: warning: checkpoint from {ckpt.get('world_size')} processes, "
                 f"resuming with {self.world}: the data order differs from an uninterrupted run")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.schp_model is not None and ckpt.get("schp_model") is not None:
            self.schp_model.load_state_dict(ckpt["schp_model"])
        self.epoch, self.iter_in_epoch = int(ckpt["epoch"]), int(ckpt["iter_in_epoch"])
        self.iteration, self.cycle_n = int(ckpt["iteration"]), int(ckpt["cycle_n"])
        self.loss_sum, self.loss_count = float(ckpt["loss_sum"]), int(ckpt["loss_count"])
        set_rng_state(ckpt["rng"])
        if self.epoch >= self.args.epochs:
            _log(f"lipfast.train: resumed from {path}: all {self.args.epochs} epochs are done "
                 f"(iteration {self.iteration}); raise --epochs to go on")
        else:
            _log(f"lipfast.train: resumed from {path} in epoch {self.epoch + 1}/"
                 f"{self.args.epochs} after {self.iter_in_epoch}/{self.iters_per_epoch} of its "
                 f"iterations (iteration {self.iteration} in all)")

    # -------------------------------------------------------------- steps
    def _to_device(self, images, labels):
        nb = self.device.type == "cuda"
        return images.to(self.device, non_blocking=nb), labels.to(self.device, non_blocking=nb)

    def train_step(self, images, labels) -> torch.Tensor:
        """One SGD step; returns the (detached) loss. ``self.lr`` is the step's rate."""
        from lipfast.losses import generate_edge

        images, labels = self._to_device(images, labels)
        if not self.ce2p_outputs:
            return self._seg_step(images, labels)
        edges = generate_edge(labels)
        target = [labels, edges]
        cycle_n = None
        if self.cycle_n >= 1:
            self.schp_model.eval()  # the teacher: running statistics, no dropout
            with torch.no_grad():
                if self.autocast is not None:
                    with self.autocast():
                        soft = self.schp_model(images)
                else:
                    soft = self.schp_model(images)
            target += [soft[0][-1].float(), soft[1][-1].float()]
            cycle_n = self.cycle_n
        preds = self._forward(images)
        loss = self.criterion(_float_outputs(preds), target, cycle_n=cycle_n)
        return self._backward_and_step(loss)

    def _seg_step(self, images, labels) -> torch.Tensor:
        """One SGD step of a model with a single logits output (HRNetV2 ``head="seg"``):
        the fused upsampled cross-entropy, as HRNet-Semantic-Segmentation trains it."""
        from lipfast.losses import upsample_cross_entropy

        logits = self._forward(images)
        loss = upsample_cross_entropy(logits.float(), labels, ignore_index=255,
                                      align_corners=bool(self.model.align_corners))
        return self._backward_and_step(loss)

    def _forward(self, images):
        """The training forward (train mode, under autocast when it is on)."""
        self.net.train()
        if self.autocast is not None:
            with self.autocast():
                return self.net(images)
        return self.net(images)

    def _backward_and_step(self, loss) -> torch.Tensor:
        """Backward (through the gradient scaler with fp16), SGD and schedule
        steps; ``self.lr`` becomes the step's rate. Returns the detached loss."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.lr = self.scheduler.get_last_lr()
        self.scheduler.step()
        return loss.detach()

    def _stop_requested(self, flag: StopFlag) -> bool:
        stop = flag.requested
        if self.world > 1:
            t = torch.tensor([1.0 if stop else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            stop = bool(t.item() > 0)
        return stop

    def self_correct(self) -> None:
        """Averages the weights into the SCHP model and re-estimates its norms."""
        moving_average(self.schp_model, self.model, 1.0 / (self.cycle_n + 1))
        self.cycle_n += 1
        limit = self.args.bn_batches

        total = self.iters_per_epoch if limit is None else min(limit, self.iters_per_epoch)
        prog = Progress(total, prefix=f"self-correction {self.cycle_n}: norm statistics",
                        every=self.args.log_every, enabled=self.rank == 0,
                        mode=self.args.progress)

        def batches():
            self.sampler.set_epoch(self.epoch, 0)
            for i, (images, _, _) in enumerate(self.loader):
                if limit is not None and i >= limit:
                    break
                yield images.to(self.device)
                prog.update(i + 1)

        try:
            n = bn_re_estimate(self.schp_model, batches(), self.autocast)
        finally:
            prog.close()
        if self.world > 1 and self.model.norm != "inplace_abn_sync":
            for b in self.schp_model.buffers():
                dist.broadcast(b, 0)
        self.schp_model.eval()
        _log(f"lipfast.train: self-correction cycle {self.cycle_n}: weights averaged, norm "
             f"statistics re-estimated on {n * self.world} images")

    def _val_loader(self):
        """This rank's shard of the validation source (``--val-batches`` batches
        at most) and a progress for it. Under DDP with norms whose running
        statistics are per rank (all but ``inplace_abn_sync``: DDP broadcasts rank
        0's at each forward, then each rank's step updates its own), rank 0's
        buffers -- the checkpoint's -- are first copied to every rank, so that all
        shards are evaluated with the model the checkpoint holds."""
        if self.world > 1 and getattr(self.model, "norm", None) != "inplace_abn_sync":
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        val = self._source(self.val_spec, train=False)
        idx = list(range(self.rank, len(val), self.world))
        if self.args.val_batches is not None:
            idx = idx[:self.args.val_batches * self.args.batch_size]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val, idx),
                                             batch_size=self.args.batch_size,
                                             num_workers=self.args.workers,
                                             collate_fn=self.collate)
        prog = Progress(len(loader), prefix="validate", every=max(1, self.args.log_every),
                        enabled=self.rank == 0, mode=self.args.progress)
        return loader, prog

    def validate(self):
        from lipfast.evaluate import evaluate_loader

        loader, prog = self._val_loader()
        try:
            metrics = evaluate_loader([self.model], loader, self.args.num_classes, self.device,
                                      autocast=self.autocast, reduce=self.world > 1,
                                      progress=prog)
        finally:
            prog.close()
        self.model.train()
        return metrics

    def _validation_result(self):
        """(the CSV's validation value as text, the table to print)."""
        metrics = self.validate()
        res = metrics.compute()
        return f"{float(res['miou']):.4f}", metrics.table()

    def _describe_run(self) -> str:
        a = self.args
        head = f", head {self.model.head}" if a.model != "ce2p" else ""
        return (f"model {a.model}{head}, norm {self.model.norm}, context "
                f"{self.model.context or 'none'}, crop {a.crop_size}")

    # -------------------------------------------------------------- loop
    def run(self) -> int:
        a = self.args
        if a.resume is not None:
            self.resume(a.resume or self.ckpt_path)
        describe = getattr(self.train_set, "describe", None)
        if describe is not None:
            _log("lipfast.train: data sources:\n" + "\n".join("  " + line
                                                             for line in describe()))
        _log(f"lipfast.train: {len(self.train_set)} training samples, {self.world} process(es), "
             f"batch {a.batch_size}/process, {self.iters_per_epoch} iterations/epoch, "
             f"{a.epochs} epochs, device {self.device}, {self._describe_run()}, "
             f"amp {'off' if self.autocast is None else a.amp}")
        status = 0
        with StopFlag() as flag:
            while self.epoch < a.epochs:
                t0 = time.perf_counter()
                self.train_set.set_epoch(self.epoch)
                self.sampler.set_epoch(self.epoch, self.iter_in_epoch)
                prog = Progress(self.iters_per_epoch, prefix=f"epoch {self.epoch + 1}/{a.epochs}",
                                every=a.log_every, enabled=self.rank == 0, mode=a.progress)
                stopped = False
                for batch in self.loader:  # (inputs..., metas)
                    if a.max_iters is not None and self.iteration >= a.max_iters:
                        stopped = True
                        break
                    loss = self.train_step(*batch[:-1])
                    self.iteration += 1
                    self.iter_in_epoch += 1
                    lv = float(loss)
                    if not math.isfinite(lv):
                        raise FloatingPointError(f"loss is {lv} at iteration {self.iteration}")
                    self.losses.append(lv)
                    self.loss_sum += lv
                    self.loss_count += 1
                    prog.update(self.iter_in_epoch, f"loss {lv:.4f} lr {self.lr:.2e}")
                    if self._stop_requested(flag):
                        status = 130
                        stopped = True
                        break
                    if a.max_iters is not None and self.iteration >= a.max_iters and (
                            self.iter_in_epoch < self.iters_per_epoch):
                        stopped = True
                        break
                prog.close()
                if stopped:
                    self.save()
                    why = "interrupted" if status else f"--max-iters {a.max_iters} reached"
                    # epochs counted from 1, as the progress shows them
                    _log(f"lipfast.train: {why} in epoch {self.epoch + 1}/{a.epochs} after "
                         f"{self.iter_in_epoch}/{self.iters_per_epoch} of its iterations "
                         f"(iteration {self.iteration} in all); state saved to "
                         f"{self.ckpt_path} (continue with --resume)")
                    break
                self._end_epoch(t0)
                if a.max_iters is not None and self.iteration >= a.max_iters \
                        and self.epoch < a.epochs:
                    _log(f"lipfast.train: --max-iters {a.max_iters} reached at the end of epoch "
                         f"{self.epoch}; state saved to {self.ckpt_path}")
                    break
        if self.world > 1 and a.check_sync:
            diff = _sync_check(self.model)
            _log(f"lipfast.train: sync check: ranks agree (max |diff| = {diff:.3g})" if diff == 0
                 else f"lipfast.train: sync check: ranks DIFFER (max |diff| = {diff:.3g})")
            if diff != 0:
                raise RuntimeError(f"DDP ranks hold different weights (max |diff| = {diff})")
        if status == 0 and self.epoch >= a.epochs:
            _log(f"lipfast.train: done, {self.iteration} iterations; checkpoint {self.ckpt_path}")
        return status

    def _end_epoch(self, t0: float) -> None:
        a = self.args
        total = torch.tensor([self.loss_sum, float(self.loss_count)], dtype=torch.float64,
                             device=self.device)
        if self.world > 1:
            dist.all_reduce(total)
        mean_loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        epoch_done = self.epoch + 1
        if self.schp_start is not None and epoch_done >= self.schp_start and (
                epoch_done - self.schp_start) % a.cycle_epochs == 0:
            self.self_correct()
        val = ""
        if a.val_every and epoch_done % a.val_every == 0:
            val, table = self._validation_result()
            if self.rank == 0:
                print(table, flush=True)
        if self.world > 1 and a.check_sync:
            diff = _sync_check(self.model)
            if diff != 0:
                raise RuntimeError(f"DDP ranks hold different weights after epoch {epoch_done} "
                                   f"(max |diff| = {diff})")
        self.epoch = epoch_done
        self.iter_in_epoch = 0
        self.loss_sum, self.loss_count = 0.0, 0
        self.save()
        if self.rank == 0:
            row = {"epoch": epoch_done, "iters": self.iteration, "loss": f"{mean_loss:.6f}",
                   "lr": f"{self.lr:.6g}", self.val_column: val,
                   "seconds": f"{time.perf_counter() - t0:.1f}"}
            _write_csv_row(self.csv_path, row, self.csv_fields)
            _log(f"lipfast.train: epoch {epoch_done}/{a.epochs} loss {mean_loss:.4f} "
                 f"lr {row['lr']}" + (f" {self.val_label} {val}" if val else ""))
            _plot_curves(self.csv_path, os.path.join(self.out, "curves.png"), self.val_column,
                         self.val_title)


def main(argv=None):
    """Runs training; returns the :class:`Trainer` (its ``losses`` list holds
    this process's per-iteration losses) and exits 130 when interrupted."""
    args = build_parser().parse_args(argv)
    resolve_task_args(args)
    cls = Trainer
    if args.task == "pose":
        from lipfast._pose_train import PoseTrainer

        cls = PoseTrainer
    trainer = None
    ok = False
    try:
        trainer = cls(args)
        status = trainer.run()
        ok = True
    finally:
        if dist.is_available() and dist.is_initialized():
            if ok:
                dist.barrier()
            # release DDP's reducer (and its hooks on the process group) before
            # the group goes away; tearing them down in the other order can
            # abort the process at exit
            if trainer is not None:
                trainer.ddp = trainer.net = None
            gc.collect()
            dist.destroy_process_group()
    trainer.status = status
    return trainer


if __name__ == "__main__":
    try:
        t = main()
    except (OSError, ValueError, TypeError) as err:
        print(f"lipfast.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(t.status)
