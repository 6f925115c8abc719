#!/usr/bin/env python
"""Evaluation benchmark: logits + labels -> confusion matrix, per batch (SPEC
section 4), lipfast against the ways evaluation code does it.

Implementations (each accumulates a C x C int64 matrix over batches):

  lipfast      lipfast.metrics.confusion_matrix(logits, labels, C, out=cm,
               resize=True): argmax (and, for low-res logits, the bilinear
               resize) fused into the counting kernel; nothing leaves the device.
  bincount     logits.argmax(1), boolean mask of the non-ignored pixels,
               torch.bincount(gt * C + pred) -- the usual PyTorch one-liner.
  tm-style     what torchmetrics' MulticlassJaccardIndex.update does per batch
               (written here, torchmetrics is not imported): validate the
               target values (torch.unique + a check read on the host), argmax,
               drop ignored pixels by boolean indexing, bincount.
  numpy        the reference's path (SCHP / CE2P evaluate): argmax on the
               device, prediction moved to the host, numpy boolean indexing and
               np.bincount of gt * C + pred, then SCHP's Python loop over the
               C x C cells to fill the matrix.

For low-res logits (the second case) every implementation but lipfast first
upsamples with F.interpolate(align_corners=True) (the reference evaluation
upsamples to the label size).

Host syncs per batch: on CUDA counted with torch.cuda.set_sync_debug_mode
(each synchronising call raises a warning, counted); on CPU there is no device
to wait for and the column shows the device-to-host points of each
implementation as written (declared per implementation, see SYNCS below:
boolean-mask indexing = 1 (size read back), torch.bincount on CUDA = 1 (its
maximum), .cpu() = 1, a Python bool() of a tensor = 1).

Shapes: default (full): B=8, C=20, labels 473x473; logits 473x473, and logits
119x119 with resize. --quick: B=2, labels 119x119; logits 119x119 and 30x30.
Median time per batch over --reps batches after --warmup (CUDA: synchronised),
implementations interleaved. The matrices of all implementations are compared
first (identical at full resolution; with resize, lipfast's fused
interpolation may move a near-tie pixel through FMA contraction: reported).
``--json PATH`` writes the rows and the environment (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

import lipfast  # noqa: E402,F401
from lipfast.metrics import confusion_matrix  # noqa: E402

IGN = 255

# Device-to-host points per batch of each implementation as written (CPU column).
SYNCS = {"lipfast": 0, "bincount": 2, "tm-style": 3, "numpy": 1}


def _up(logits, size):
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size, mode="bilinear", align_corners=True)


def impl_lipfast(logits, labels, c, cm):
    confusion_matrix(logits, labels, c, IGN, out=cm, resize=True)
    return cm


def impl_bincount(logits, labels, c, cm):
    pred = _up(logits, labels.shape[1:]).argmax(1)
    keep = labels != IGN
    gt = labels[keep].long()  # boolean indexing: 1 sync
    cm += torch.bincount(gt * c + pred[keep], minlength=c * c).view(c, c)  # CUDA: 1 sync
    return cm


def impl_tm_style(logits, labels, c, cm):
    # torchmetrics-style validation: the target's values must be in range
    uniq = torch.unique(labels)
    bad = (uniq != IGN) & ((uniq < 0) | (uniq >= c))
    if bool(bad.any()):  # 1 sync
        raise ValueError("target values out of range")
    pred = _up(logits, labels.shape[1:]).argmax(1)
    keep = labels != IGN
    pred, gt = pred[keep], labels[keep].long()  # 1 sync
    cm += torch.bincount(gt * c + pred, minlength=c * c).view(c, c)  # CUDA: 1 sync
    return cm


def impl_numpy(logits, labels_np, c, cm_np):
    # SCHP: prediction to the host, numpy counting with the labels already on the host
    pred = _up(logits, labels_np.shape[1:]).argmax(1).cpu().numpy()  # 1 sync
    keep = labels_np != IGN
    gt = labels_np[keep].astype(np.int32)
    pr = pred[keep].astype(np.int32)
    index = gt * c + pr
    count = np.bincount(index)
    for i in range(c):
        for j in range(c):
            k = i * c + j
            if k < len(count):
                cm_np[i, j] += count[k]
    return cm_np


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(fn, device) -> int:
    """Synchronising calls made by fn() (CUDA: torch's sync debug mode)."""
    if device.type != "cuda":
        return -1
    _sync(device)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(1 for w in rec if "synchroniz" in str(w.message).lower())


def run_case(name, b, c, h, hh, device, reps, warmup):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, c, h, h, generator=g).to(device)
    labels = torch.randint(0, c, (b, hh, hh), generator=g)
    labels[torch.rand(b, hh, hh, generator=g) < 0.1] = IGN
    labels_np = labels.to(torch.uint8).numpy()
    labels = labels.to(torch.uint8).to(device)

    def new():
        return torch.zeros(c, c, dtype=torch.int64, device=device)

    impls = {
        "lipfast": lambda st: impl_lipfast(logits, labels, c, st),
        "bincount": lambda st: impl_bincount(logits, labels, c, st),
        "tm-style": lambda st: impl_tm_style(logits, labels, c, st),
        "numpy": lambda st: impl_numpy(logits, labels_np, c, st),
    }
    states = {k: (np.zeros((c, c), dtype=np.int64) if k == "numpy" else new()) for k in impls}
    # correctness, one batch each
    mats = {}
    for k, fn in impls.items():
        st = np.zeros((c, c), dtype=np.int64) if k == "numpy" else new()
        out = fn(st)
        mats[k] = torch.as_tensor(out).cpu() if k == "numpy" else out.cpu()
    ref = mats["numpy"]
    diff = {k: int((m - ref).abs().sum()) for k, m in mats.items()}
    syncs = {k: (count_syncs(lambda: fn(states[k]), device) if device.type == "cuda"
                 else SYNCS[k]) for k, fn in impls.items()}
    for _ in range(warmup):
        for k, fn in impls.items():
            fn(states[k])
    _sync(device)
    times = {k: [] for k in impls}
    for _ in range(reps):
        for k, fn in impls.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(states[k])
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    rows = []
    base = statistics.median(times["numpy"])
    for k in impls:
        med = statistics.median(times[k])
        rows.append(dict(case=name, impl=k, ms=med * 1e3, speedup_vs_numpy=base / med,
                         syncs_per_batch=syncs[k], matrix_diff_vs_numpy=diff[k],
                         logits_bytes=logits.numel() * logits.element_size()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU shapes (seconds)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        b, c, hh, cases = 2, 20, 119, [("119x119 logits", 119), ("30x30 logits, resize", 30)]
    else:
        b, c, hh, cases = 8, 20, 473, [("473x473 logits", 473), ("119x119 logits, resize", 119)]
    reps = args.reps or (5 if args.quick else 7)
    env = environment(device)
    print(f"device {device} ({env['device_name']}), threads {env['num_threads']}, B={b} C={c} "
          f"labels {hh}x{hh}, median of {reps} batches")
    rows = []
    for name, h in cases:
        rows += run_case(name, b, c, h, hh, device, reps, args.warmup)
    sync_note = "counted" if device.type == "cuda" else "as written"
    print(f"\n| case | impl | ms / batch | x numpy | host syncs / batch ({sync_note}) | "
          f"matrix diff vs numpy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['impl']} | {r['ms']:.1f} | {r['speedup_vs_numpy']:.2f} | "
              f"{r['syncs_per_batch']} | {r['matrix_diff_vs_numpy']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"env": env, "shape": dict(b=b, c=c, labels=hh), "reps": reps, "rows": rows},
            indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
