#!/usr/bin/env python
"""Evaluation benchmark: logits + labels -> confusion matrix, per batch (the
LIP evaluation: cm[gt, pred] over pixels with gt != 255), lipfast against the ways evaluation code does it.

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
Time per batch: median [20th-80th percentile] of the timed rounds, and the
number of rounds (benchmarks/_timing.py, shared by every benchmark: warm-up until
each implementation's last two batches agree within 10%, then rounds in which
every implementation counts one batch, in an order rotated every round, until
the case has its minimum rounds and minimum time; CUDA: synchronised; a wide
spread or a busy machine is warned about). --quick also times 1 warm-up and 3
rounds (a smoke run; figures not for quoting). The matrices of all implementations are compared
first (identical at full resolution; with resize, lipfast's fused
interpolation may move a near-tie pixel through FMA contraction: reported).
Floor (benchmarks/_roofline.py, shared by every benchmark): per case, the bytes
that must move, logits read once (float32, 4*B*C*h*w) and labels read once
(uint8, B*H*W; the C x C matrix is negligible), and the FLOPs counted (0 at full
resolution: argmax comparisons are not counted; with resize 8*B*C*H*W for the
bilinear interpolation); the floor max(bytes / bandwidth, FLOPs / rate) with the
ceilings measured in the same run (CPU: a large memory copy and a float32 matmul;
CUDA: benchmarks/gpu_ceilings.py) and the fraction achieved (floor / median).
``--datasheet h200`` adds the floor by the H200's data sheet.
``--json PATH`` writes the rows and the environment (benchmarks/_common.py).
On a CPU where other processes keep half the cores or more busy at the start,
the run uses one thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _roofline  # noqa: E402
import _timing  # noqa: E402
from _common import run_environment  # noqa: E402

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


def case_work(b: int, c: int, h: int, hh: int) -> tuple[float, float]:
    """(bytes, FLOPs) of one batch (see the Floor section of the docstring)."""
    nbytes = 4 * b * c * h * h + b * hh * hh
    return float(nbytes), float(8 * b * c * hh * hh if h != hh else 0)


def run_case(name, b, c, h, hh, device, settings, roof=None):
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
    # Timed: each implementation accumulates one batch into its own matrix per round.
    m = _timing.measure({k: (lambda k=k, fn=fn: fn(states[k])) for k, fn in impls.items()},
                        device, settings)
    print(f"{name}: " + ", ".join(f"{k} {m[k].fmt()} ms" for k in impls)
          + f"; {m.rounds} rounds after {m.warmup_rounds} warm-up", flush=True)
    _timing.print_warnings(m, "  ")
    rows = []
    base = m["numpy"].median
    nbytes, flops = case_work(b, c, h, hh)
    for k in impls:
        t = m[k]
        floor = roof.row(nbytes, flops, "fp32", t.median) if roof is not None else None
        rows.append(dict(case=name, impl=k, ms=t.median, p20_ms=t.p20, p80_ms=t.p80,
                         min_ms=t.min, rounds=t.rounds, times_ms=list(t.times_ms),
                         warmup_ms=list(t.warmup_ms), speedup_vs_numpy=base / t.median,
                         syncs_per_batch=syncs[k], matrix_diff_vs_numpy=diff[k],
                         logits_bytes=logits.numel() * logits.element_size(), floor=floor))
    return rows, m.summary(times=False)


# Timing defaults (benchmarks/_timing.py): a full CPU round (4 implementations, B=8,
# 473x473) takes about 2.6 s, so rounds matter more than time.
CPU_TIMING = _timing.Settings(warmup=1, max_warmup=4, max_warmup_seconds=15.0, min_rounds=10,
                              min_seconds=3.0, max_rounds=300, max_seconds=60.0)
CUDA_TIMING = _timing.Settings(warmup=3, max_warmup=20, min_rounds=30, min_seconds=1.0,
                               max_rounds=1000, max_seconds=60.0)
QUICK_TIMING = _timing.QUICK


def timing_defaults_help() -> str:
    return _timing.defaults_help(CPU_TIMING, CUDA_TIMING, QUICK_TIMING, 'case',
                                 '--reps is --min-rounds.')


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small shapes and quick timing (1 warm-up, 3 rounds): seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: torch's choice, but 1 on CPU "
                        "when other processes keep half the cores or more busy at the start: "
                        "multi-threaded kernels then stall)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="write the rows and the environment")
    _timing.add_arguments(ap, timing_defaults_help())
    _roofline.add_arguments(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    _timing.exit_if_parse_only(args, __file__)
    device = torch.device(args.device)
    if args.quick:
        b, c, hh, cases = 2, 20, 119, [("119x119 logits", 119), ("30x30 logits, resize", 30)]
    else:
        b, c, hh, cases = 8, 20, 473, [("473x473 logits", 473), ("119x119 logits, resize", 119)]
    settings = _timing.settings_from_args(
        args, QUICK_TIMING if args.quick else (CUDA_TIMING if device.type == "cuda"
                                               else CPU_TIMING))
    env, machine, threads_note = run_environment(device, __file__, argv, args.threads)
    print(f"device {device} ({env['device_name']}), threads {env['num_threads']}, B={b} C={c} "
          f"labels {hh}x{hh}")
    _timing.print_run_header(env, settings)
    _timing.print_machine_notes(machine, threads_note)
    roof = _roofline.announce(args, device, args.quick)
    rows, timing = [], {}
    for name, h in cases:
        case_rows, timing[name] = run_case(name, b, c, h, hh, device, settings, roof)
        rows += case_rows
    sync_note = "counted" if device.type == "cuda" else "as written"
    models = "".join(f" {mo} floor |" for mo in roof.models)
    print(f"\n| case | impl | ms / batch, median [p20-p80] | x numpy | rounds | "
          f"host syncs / batch ({sync_note}) | matrix diff vs numpy | bytes | FLOPs | "
          f"floor ms | of floor |{models}")
    print("|---" * (11 + len(roof.models)) + "|")
    for r in rows:
        fl = r["floor"]
        print(f"| {r['case']} | {r['impl']} | "
              f"{_timing.fmt_spread(r['ms'], r['p20_ms'], r['p80_ms'])} | "
              f"{r['speedup_vs_numpy']:.2f} | {r['rounds']} | {r['syncs_per_batch']} | "
              f"{r['matrix_diff_vs_numpy']} | {_roofline.fmt_count(fl['bytes'], 'B')} | "
              f"{_roofline.fmt_count(fl['flops'])} | " + " | ".join(roof.cells(fl)) + " |")
    for line in roof.describe():
        print(line)
    warned = [k for k, t in timing.items() if t["warnings"]]
    if warned:
        print(f"timing warnings (see above) in: {', '.join(warned)}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"env": env, "shape": dict(b=b, c=c, labels=hh),
             "timing_settings": _timing.settings_summary(settings), "timing": timing,
             "roofline": roof.summary(),
             "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
