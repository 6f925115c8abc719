#!/usr/bin/env python
"""Pose benchmark (SPEC section 10): lipfast's pose ops against the eager
formulations of deep-high-resolution-net.pytorch they replace.

Sections (``--sections``, default all; each a list of cases, each case a row
per implementation, each section its own table; more plug into SECTIONS):

  loss   forward + backward of the heatmap loss (Gaussian targets +
         JointsMSELoss with target weights), heatmaps B x J x h x w float32:
           lipfast        lipfast.pose.heatmap_loss (the targets evaluated in the
                          kernel from the joints, never stored; CPU: the C++
                          kernel; CUDA: the Triton kernels)
           torch-targets  the targets generated on the device by vectorised torch
                          (the reference rule over B x J at once, B x J x h x w
                          float32 target) + JointsMSELoss as upstream (a Python
                          loop over the joints, MSE of the weighted maps)
           numpy-targets  upstream's pipeline: generate_target per image in numpy
                          on the host (as the data loader's __getitem__ does, one
                          joint at a time), targets copied to the device, then
                          JointsMSELoss
           mse-only       JointsMSELoss alone on targets made beforehand (what the
                          training step costs when data-loader workers make the
                          targets off the critical path)
         Cases: B=32, J=16, 64x64 heatmaps of 256x256 inputs (sigma 2) and 96x72
         heatmaps of 384x288 inputs (sigma 3). --quick: B=4, same maps.
  decode heatmaps (float32 B x J x h x w, like a trained network's: a Gaussian
         near each joint plus noise) to image coordinates to the batch's PCKh@0.5
         Mean (LIP head size: 0.5 x |upper neck - head top|), without and with
         the flip test (the flipped-input heatmaps given):
           lipfast          lipfast.pose.decode (the flip test fused: flip_back,
                            shift and average evaluated in the kernel) and
                            lipfast.pose.PCKh on the device (update + compute)
           lipfast-unfused  (flip cases) lipfast.pose.flip_back + average in torch,
                            then lipfast.pose.decode without flip, then PCKh
           numpy            upstream's path: (flip test: flip_back on the host,
                            the shift and average on the device, as HRNet's
                            validate() does) the maps copied to the host,
                            get_final_preds in numpy (argmax, the quarter-pixel
                            step in a Python loop over the joints, transform_preds
                            with the affine solved by numpy instead of cv2), then
                            MPII's PCKh counting in numpy; on CUDA the
                            device->host copies are part of the step
         Cases: B=32, J=16, 64x64 (256x256 inputs) and 96x72 (384x288) heatmaps,
         each without and with the flip test. --quick: B=4.

Correctness first: every implementation's loss against a float64 evaluation of
the reference rule (relative error reported, 1e-4 required, MISMATCH otherwise);
decode: lipfast's coordinates against the numpy path's (max abs difference in
image pixels, 1e-3 required) and the PCKh counts per joint and Mean equal to the
numpy path's; exit status 1 on a mismatch.

Measured per row: the time of one step (loss: forward + backward; decode: the
heatmaps to the PCKh Mean, head sizes and host copies of the annotations made
beforehand), median [20th-80th percentile] of the
timed rounds and the number of rounds (benchmarks/_timing.py, shared by every
benchmark: warm-up until each implementation's last two steps agree within 10%,
then rounds in which every implementation steps once, in an order rotated every
round; CUDA: synchronised; a wide spread or a busy machine is warned about);
"x torch" = the torch-targets median / this row's median. Memory: "saved MB" =
bytes of the unique storages saved for backward (torch.autograd.graph
.saved_tensors_hooks; every device); "peak MB" = on CUDA
torch.cuda.max_memory_allocated during one step above the inputs, on CPU the
peak resident memory (VmHWM after a reset) of one step above the memory with
the inputs allocated, in a fresh child process per implementation, glibc's
mmap threshold fixed at 64 KiB so that freed blocks leave the RSS (--no-rss
skips the CPU children). Both include the B x J x h x w gradient itself
(mse-only: its targets, made beforehand, count as inputs). Decode: peak MB only
(no backward; on CUDA device memory only, the numpy path's host arrays not
counted); "x numpy" = the numpy median / this row's median.

Floor (benchmarks/_roofline.py, shared by every benchmark): per row the bytes
that must move, the float32 heatmaps read by the forward and by the backward and
their gradient written, 12*B*J*h*w bytes (joints and weights negligible);
decode: the float32 heatmaps read once, 4*B*J*h*w bytes (twice that with the
flip test; coordinates and counts negligible); 0 FLOPs counted (element-wise
work); floor = bytes / bandwidth with the ceilings
measured in the same run (CPU: a large memory copy; CUDA:
benchmarks/gpu_ceilings.py) and the fraction achieved (floor / median).
``--datasheet h200`` adds the floor by the H200's data sheet.
``--json PATH`` writes the rows and the environment (benchmarks/_common.py).
On a CPU where other processes keep half the cores or more busy at the start,
the run uses one thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _roofline  # noqa: E402
import _timing  # noqa: E402
from _common import PeakRSS, run_environment, saved_bytes  # noqa: E402

import lipfast  # noqa: E402,F401
from lipfast.pose import (  # noqa: E402
    HEAD_TOP, LIP_POSE_FLIP_PAIRS, PCKH_MEAN_EXCLUDES, UPPER_NECK, PCKh, decode, flip_back,
    flip_permutation, head_size_lip, heatmap_loss)

# name: (B, J, image_size (W, H), heatmap_size (w, h), sigma)
LOSS_CASES = {
    "256x256 -> 64x64": (32, 16, (256, 256), (64, 64), 2.0),
    "384x288 -> 96x72": (32, 16, (288, 384), (72, 96), 3.0),
}
QUICK_B = 4
LOSS_IMPLS = ("lipfast", "torch-targets", "numpy-targets", "mse-only")


# ----------------------------------------------------------------- references
def numpy_generate_target(joints, visible, image_size, heatmap_size, sigma):
    """Upstream's generate_target for one image (J x 2 joints, J visibilities), in
    numpy, one joint at a time: (target J x h x w float32, target_weight J x 1)."""
    num = joints.shape[0]
    image_size, heatmap_size = np.array(image_size), np.array(heatmap_size)
    weight = np.ones((num, 1), dtype=np.float32)
    weight[:, 0] = visible
    target = np.zeros((num, heatmap_size[1], heatmap_size[0]), dtype=np.float32)
    tmp = sigma * 3
    stride = image_size / heatmap_size
    for k in range(num):
        mx = int(joints[k][0] / stride[0] + 0.5)
        my = int(joints[k][1] / stride[1] + 0.5)
        ul = [int(mx - tmp), int(my - tmp)]
        br = [int(mx + tmp + 1), int(my + tmp + 1)]
        if ul[0] >= heatmap_size[0] or ul[1] >= heatmap_size[1] or br[0] < 0 or br[1] < 0:
            weight[k] = 0
            continue
        side = 2 * tmp + 1
        xs = np.arange(0, side, 1, np.float32)
        ys = xs[:, None]
        c = side // 2
        g = np.exp(-((xs - c) ** 2 + (ys - c) ** 2) / (2 * sigma ** 2))
        gx = max(0, -ul[0]), min(br[0], heatmap_size[0]) - ul[0]
        gy = max(0, -ul[1]), min(br[1], heatmap_size[1]) - ul[1]
        ix = max(0, ul[0]), min(br[0], heatmap_size[0])
        iy = max(0, ul[1]), min(br[1], heatmap_size[1])
        if weight[k] > 0.5:
            target[k][iy[0]:iy[1], ix[0]:ix[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
    return target, weight


def torch_targets(joints, visible, image_size, heatmap_size, sigma):
    """The reference rule vectorised over B x J with torch on the joints' device:
    (target B x J x h x w float32, target_weight B x J x 1 float32)."""
    (iw, ih), (w, h) = image_size, heatmap_size
    dev = joints.device
    jt = joints.double()
    tmp = sigma * 3
    c = (2 * tmp + 1) // 2
    mu = torch.trunc(jt / torch.tensor([iw / w, ih / h], dtype=torch.float64, device=dev) + 0.5)
    ul, br = torch.trunc(mu - tmp), torch.trunc(mu + tmp + 1)
    off = (ul[..., 0] >= w) | (ul[..., 1] >= h) | (br[..., 0] < 0) | (br[..., 1] < 0)
    weight = torch.where(off, 0.0, visible.float())
    xs = torch.arange(w, device=dev, dtype=torch.float64)
    ys = torch.arange(h, device=dev, dtype=torch.float64)
    inx = (xs >= ul[..., 0:1]) & (xs < br[..., 0:1])
    iny = (ys >= ul[..., 1:2]) & (ys < br[..., 1:2])
    dx = (xs - ul[..., 0:1] - c).float()
    dy = (ys - ul[..., 1:2] - c).float()
    g = torch.exp(-(dx[..., None, :] ** 2 + dy[..., :, None] ** 2) / (2 * sigma ** 2))
    keep = iny[..., :, None] & inx[..., None, :] & (weight > 0.5)[..., None, None]
    return torch.where(keep, g, 0.0), weight[..., None]


def joints_mse_loss(output, target, target_weight):
    """Upstream's JointsMSELoss(use_target_weight=True)."""
    b, j = output.shape[:2]
    pred = output.reshape((b, j, -1)).split(1, 1)
    gt = target.reshape((b, j, -1)).split(1, 1)
    loss = 0
    for k in range(j):
        p, t = pred[k].squeeze(1), gt[k].squeeze(1)
        loss += 0.5 * torch.nn.functional.mse_loss(p.mul(target_weight[:, k]),
                                                   t.mul(target_weight[:, k]))
    return loss / j


def numpy_targets(joints_np, visible_np, image_size, heatmap_size, sigma, device):
    ts, ws = zip(*(numpy_generate_target(joints_np[i], visible_np[i], image_size, heatmap_size,
                                         sigma) for i in range(joints_np.shape[0])))
    return (torch.from_numpy(np.stack(ts)).to(device), torch.from_numpy(np.stack(ws)).to(device))


def make_inputs(b, j, image_size, heatmap_size, seed=0):
    """Heatmaps near a trained network's (targets + noise, float32), joints spread
    over the input with 10% outside it, 20% invisible."""
    g = torch.Generator().manual_seed(seed)
    (iw, ih), (w, h) = image_size, heatmap_size
    joints = torch.rand(b, j, 2, generator=g) * torch.tensor([iw * 1.2, ih * 1.2]) \
        - torch.tensor([iw * 0.1, ih * 0.1])
    visible = (torch.rand(b, j, generator=g) > 0.2).float()
    x = torch.rand(b, j, h, w, generator=g) * 0.1
    return x, joints, visible


def loss_impls(x, joints, visible, image_size, heatmap_size, sigma, device):
    jn, vn = joints.cpu().numpy(), visible.cpu().numpy()
    pre_t, pre_w = torch_targets(joints, visible, image_size, heatmap_size, sigma)
    return {
        "lipfast": lambda: heatmap_loss(x, joints, visible, image_size, sigma),
        "torch-targets": lambda: joints_mse_loss(
            x, *torch_targets(joints, visible, image_size, heatmap_size, sigma)),
        "numpy-targets": lambda: joints_mse_loss(
            x, *numpy_targets(jn, vn, image_size, heatmap_size, sigma, device)),
        "mse-only": lambda: joints_mse_loss(x, pre_t, pre_w),
    }


def loss_float64(x, joints, visible, image_size, heatmap_size, sigma) -> float:
    t, w = torch_targets(joints.cpu(), visible.cpu(), image_size, heatmap_size, sigma)
    return float(joints_mse_loss(x.detach().cpu().double(), t.double(), w.double()))


# ----------------------------------------------------------------- measuring
def step(fn, x):
    x.grad = None
    out = fn()
    out.backward()
    return out


def loss_work(b, j, h, w) -> tuple[float, float]:
    """(bytes, FLOPs) of a loss row (see the Floor section of the docstring)."""
    return float(12 * b * j * h * w), 0.0


def _rss_child_loss(impl, case, quick) -> dict:
    """Peak RSS (MiB) of one loss step of ``impl`` above the RSS with the inputs
    allocated, after a warm-up step on one image."""
    b, j, image_size, heatmap_size, sigma = LOSS_CASES[case]
    b = QUICK_B if quick else b
    x, joints, visible = make_inputs(b, j, image_size, heatmap_size)
    x.requires_grad_()
    cpu = torch.device("cpu")
    fn = loss_impls(x, joints, visible, image_size, heatmap_size, sigma, cpu)[impl]
    # warm-up (code paths, thread pool) on one image, so that the measured step
    # does not reuse the warm-up's freed memory
    xs = x[:1].detach().clone().requires_grad_()
    step(loss_impls(xs, joints[:1], visible[:1], image_size, heatmap_size, sigma, cpu)[impl], xs)
    peak = PeakRSS()  # from the RSS with the inputs allocated
    step(fn, x)
    return {"peak_extra_MB": peak.growth() / 2**20, "how": peak.how}


def _rss_child(spec: str) -> None:
    """Child process (``--_rss-child SECTION|IMPL|CASE|...``): prints the peak RSS
    of one step of one implementation as JSON."""
    section, impl, case, *rest = spec.split("|")
    if section == "loss":
        (quick,) = rest
        res = _rss_child_loss(impl, case, quick == "1")
    else:
        flip, quick = rest
        res = _rss_child_decode(impl, case, flip == "1", quick == "1")
    print(json.dumps(res))


def rss_child_mb(*fields) -> float:
    """The peak RSS (MiB) a fresh child process reports for one step (see _rss_child)."""
    # a fixed glibc mmap threshold: every large block is mapped on allocation and
    # unmapped when freed, so the peak RSS sees each step's own allocations (with
    # the default dynamic threshold, freed blocks stay resident and get reused)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
               MALLOC_MMAP_THRESHOLD_="65536")
    r = subprocess.run([sys.executable, __file__, "--_rss-child", "|".join(map(str, fields))],
                       capture_output=True, text=True, check=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_extra_MB"]


def cpu_peak_mb(impl, case, quick) -> float:
    return rss_child_mb("loss", impl, case, int(quick))


def measure_rows(section, case, impls, x, ref, settings, device, roof, work, rss):
    """One case: correctness, memory, interleaved timing; returns the rows."""
    rows = []
    vals = {}
    for k, fn in impls.items():
        with torch.no_grad():
            vals[k] = float(fn())
    mem = {}
    for k, fn in impls.items():
        out, sb = saved_bytes(fn)
        out.backward()
        x.grad = None
        mem[k] = {"saved_MB": sb / 2**20}
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fn, x)
            torch.cuda.synchronize()
            mem[k]["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        elif rss is not None:
            mem[k]["peak_MB"] = rss(k)
    m = _timing.measure({k: (lambda fn=fn: step(fn, x)) for k, fn in impls.items()}, device,
                        settings)
    print(f"  {section} {case}: " + ", ".join(f"{k} {m[k].fmt()} ms" for k in impls)
          + f"; {m.rounds} rounds after {m.warmup_rounds} warm-up", flush=True)
    _timing.print_warnings(m)
    base_ms = m["torch-targets"].median if "torch-targets" in impls else None
    nbytes, flops = work
    for k in impls:
        t = m[k]
        err = abs(vals[k] - ref) / max(abs(ref), 1e-30)
        rows.append(dict(section=section, case=case, impl=k, ms=t.median, p20_ms=t.p20,
                         p80_ms=t.p80, min_ms=t.min, rounds=t.rounds, times_ms=list(t.times_ms),
                         warmup_ms=list(t.warmup_ms),
                         speedup_vs_torch=(base_ms / t.median) if base_ms else None,
                         rel_err=err, ok=err < 1e-4, value=vals[k], **mem[k],
                         floor=roof.row(nbytes, flops, "fp32", t.median)))
    return rows, m.summary(times=False)


def section_loss(args, device, settings, roof):
    rows, timing = [], {}
    for case, (b, j, image_size, heatmap_size, sigma) in LOSS_CASES.items():
        b = QUICK_B if args.quick else b
        w, h = heatmap_size
        x, joints, visible = make_inputs(b, j, image_size, heatmap_size)
        x, joints, visible = x.to(device).requires_grad_(), joints.to(device), visible.to(device)
        impls = loss_impls(x, joints, visible, image_size, heatmap_size, sigma, device)
        ref = loss_float64(x, joints, visible, image_size, heatmap_size, sigma)
        rss = (functools.partial(cpu_peak_mb, case=case, quick=args.quick)
               if device.type == "cpu" and not args.no_rss else None)
        label = f"{case} B={b} J={j} sigma {sigma:g}"
        r, timing[label] = measure_rows("loss", label, impls, x, ref, settings, device, roof,
                                        loss_work(b, j, h, w), rss)
        rows += r
    return rows, timing


# ----------------------------------------------------------------- decode + PCKh
# name: (B, J, image_size (W, H), heatmap_size (w, h)); each case runs without and
# with the flip test
DECODE_CASES = {
    "256x256 -> 64x64": (32, 16, (256, 256), (64, 64)),
    "384x288 -> 96x72": (32, 16, (288, 384), (72, 96)),
}
DECODE_IMPLS = ("lipfast", "lipfast-unfused", "numpy")  # lipfast-unfused: flip cases only
PCKH_THRESHOLD = 0.5
COORD_TOL_PX = 1e-3  # float32 image coordinates of a few hundred pixels: ulp ~3e-5


def make_decode_inputs(b, j, image_size, heatmap_size, flip, seed=0):
    """Inputs of a decode case, heatmaps like a trained network's: per joint a
    Gaussian (sigma 2, peak 1) at the ground truth plus N(0, 1.5 px) jitter on the
    heatmap grid, plus noise U(0, 0.1); 5% of the maps entirely negative. Boxes:
    centres within 10% of the image centre, s_w = W / 200 x U(0.9, 1.1); the upper
    neck 6-10 heatmap px below the head top (LIP head size 0.5 x their distance:
    a PCKh@0.5 radius of about 2 heatmap px); 80% of the joints visible. With
    ``flip``, the maps of the W-flipped input too (an independent draw, laid out so
    that flip_back maps it onto the unflipped frame). Returns a dict of CPU tensors
    (float32 heatmaps, float64 boxes and ground truth)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    (iw, ih), (w, h) = image_size, heatmap_size
    size = torch.tensor([iw, ih], dtype=f64)
    center = size / 2 + (torch.rand(b, 2, generator=g, dtype=f64) - 0.5) * 0.2 * size
    sw = iw / 200 * (0.9 + 0.2 * torch.rand(b, generator=g, dtype=f64))
    scale = torch.stack([sw, sw * ih / iw], 1)
    gt_hm = torch.rand(b, j, 2, generator=g, dtype=f64) * torch.tensor([w - 1, h - 1],
                                                                          dtype=f64)
    if j > max(UPPER_NECK, HEAD_TOP):
        drop = 6 + 4 * torch.rand(b, generator=g, dtype=f64)
        gt_hm[:, UPPER_NECK, 0] = gt_hm[:, HEAD_TOP, 0]
        gt_hm[:, UPPER_NECK, 1] = (gt_hm[:, HEAD_TOP, 1] + drop).clamp(max=h - 1)
    ratio = 200 * sw / w  # image px per heatmap px (both axes: the reference's rule)
    gt = center[:, None] + (gt_hm - torch.tensor([w / 2, h / 2], dtype=f64)) * ratio[:, None, None]
    visible = torch.rand(b, j, generator=g) > 0.2
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)

    def maps():
        mu = (gt_hm + 1.5 * torch.randn(b, j, 2, generator=g, dtype=f64)).float()
        d2 = (xs - mu[..., 0:1])[..., None, :] ** 2 + (ys - mu[..., 1:2])[..., :, None] ** 2
        m = torch.exp(-d2 / 8.0) + 0.1 * torch.rand(b, j, h, w, generator=g)
        neg = torch.rand(b, j, 1, 1, generator=g) < 0.05
        return torch.where(neg, -m, m)

    out = dict(heatmaps=maps(), center=center, scale=scale, gt=gt, visible=visible)
    if flip:
        perm = flip_permutation(j, LIP_POSE_FLIP_PAIRS)
        out["flipped"] = torch.roll(maps(), -1, 3)[:, perm].flip(3).contiguous()
    return out


def numpy_flip_back(flipped, pairs):
    """Upstream's flip_back on a host array: reverse W, swap each pair's channels."""
    out = flipped[:, :, :, ::-1]
    for a, b in pairs:
        tmp = out[:, a].copy()
        out[:, a] = out[:, b]
        out[:, b] = tmp
    return out


def numpy_inverse_affine(center, scale, w, h):
    """get_affine_transform(center, scale, 0, [w, h], inv=1): the 2 x 3 affine from
    the heatmap to the image, from upstream's three point pairs (the centre, half a
    width above it, the third corner of the right angle; both directions from the
    widths), solved with numpy (upstream: cv2.getAffineTransform, same equations)."""
    src_w = scale[0] * 200.0
    src = np.array([center, center + [0.0, -0.5 * src_w], [0.0, 0.0]], dtype=np.float64)
    dst = np.array([[0.5 * w, 0.5 * h], [0.5 * w, 0.5 * h - 0.5 * w], [0.0, 0.0]])
    for p in (src, dst):
        d = p[0] - p[1]
        p[2] = p[1] + [-d[1], d[0]]
    return np.linalg.solve(np.concatenate([dst, np.ones((3, 1))], 1), src).T


def numpy_final_preds(hm, center, scale):
    """Upstream's get_final_preds with TEST.POST_PROCESS on host numpy heatmaps
    (B x J x h x w float32): first argmax, coordinates zeroed where the max <= 0,
    the quarter-pixel step towards the larger neighbour (a Python loop over the
    joints, as upstream), then transform_preds (the affine applied per image;
    upstream: per joint). Returns (coords B x J x 2, maxvals B x J), float32 as
    upstream's."""
    b, j, h, w = hm.shape
    flat = hm.reshape(b, j, -1)
    idx = np.argmax(flat, 2)
    maxvals = np.amax(flat, 2)
    coords = np.stack([idx % w, np.floor(idx / w)], -1).astype(np.float32)
    coords *= np.greater(maxvals, 0.0)[..., None]
    for n in range(b):
        for p in range(j):
            m = hm[n][p]
            px, py = int(math.floor(coords[n][p][0] + 0.5)), int(math.floor(coords[n][p][1] + 0.5))
            if 1 < px < w - 1 and 1 < py < h - 1:
                diff = np.array([m[py][px + 1] - m[py][px - 1], m[py + 1][px] - m[py - 1][px]])
                coords[n][p] += np.sign(diff) * .25
    preds = coords.copy()
    for n in range(b):
        t = numpy_inverse_affine(center[n], scale[n], w, h)
        preds[n] = coords[n].astype(np.float64) @ t[:, :2].T + t[:, 2]
    return preds, maxvals


def numpy_pckh(pred, gt, visible, head_size, threshold=PCKH_THRESHOLD):
    """MPII's evaluate (upstream lib/dataset/mpii.py) on host arrays: per joint
    100 x correct / visible, Mean = the PCKh weighted by the visible counts over
    the joints not in PCKH_MEAN_EXCLUDES. Returns (Mean, correct counts J)."""
    err = np.linalg.norm(pred.astype(np.float64) - gt, axis=2) / head_size[:, None]
    count = visible.sum(0)
    correct = ((err <= threshold) & visible).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = 100.0 * correct / count
    keep = np.ones(per.shape[0], dtype=bool)
    keep[list(PCKH_MEAN_EXCLUDES)] = False
    ratio = count[keep] / count[keep].sum().astype(np.float64)
    return float(np.sum(np.where(ratio > 0, per[keep], 0.0) * ratio)), correct


def decode_impls(inp, device, threshold=PCKH_THRESHOLD):
    """name -> step of one case (``inp``: make_decode_inputs' dict): heatmaps to
    image coordinates to the PCKh Mean of the batch. Each step returns (Mean,
    coords, per-joint correct counts)."""
    hm = inp["heatmaps"].to(device)
    fl = inp["flipped"].to(device) if "flipped" in inp else None
    c, s = inp["center"].to(device), inp["scale"].to(device)
    gt, vis = inp["gt"].to(device), inp["visible"].to(device)
    hs = head_size_lip(gt)
    metric = PCKh(threshold, device=device)
    # the reference's host side: boxes and annotations from the data set, numpy
    cn, sn = inp["center"].numpy(), inp["scale"].numpy()
    gtn, visn = inp["gt"].numpy(), inp["visible"].numpy()
    hsn = 0.5 * np.linalg.norm(gtn[:, UPPER_NECK] - gtn[:, HEAD_TOP], axis=1)
    j = hm.shape[1]
    pairs = [p for p in LIP_POSE_FLIP_PAIRS if max(p) < j]

    def finish(coords):
        metric.reset()
        metric.update(coords, gt, vis, hs)
        r = metric.compute()
        return r["table"]["Mean"], coords, r["correct"]

    def numpy_path():
        out = hm
        if fl is not None:  # upstream's validate(): flip_back on the host, shift on the device
            # the device->host copy (on CPU a copy too: flip_back swaps in place)
            host = fl.cpu().numpy() if fl.device.type != "cpu" else fl.numpy().copy()
            back = torch.from_numpy(numpy_flip_back(host, pairs).copy()).to(device)
            back[:, :, :, 1:] = back.clone()[:, :, :, 0:-1]
            out = (hm + back) * 0.5
        preds, _ = numpy_final_preds(out.clone().cpu().numpy(), cn, sn)
        mean, correct = numpy_pckh(preds, gtn, visn, hsn, threshold)
        return mean, preds, correct.tolist()

    impls = {"lipfast": lambda: finish(decode(hm, c, s, flipped=fl, flip_pairs=pairs)[0])}
    if fl is not None:
        impls["lipfast-unfused"] = lambda: finish(
            decode((hm + flip_back(fl, pairs)) * 0.5, c, s)[0])
    impls["numpy"] = numpy_path
    return impls


def decode_work(b, j, h, w, flip) -> tuple[float, float]:
    """(bytes, FLOPs) of a decode row: the float32 heatmaps read once (and the
    flipped ones), coordinates and counts negligible; 0 FLOPs counted."""
    return float(4 * b * j * h * w * (2 if flip else 1)), 0.0


def _decode_case(case, flip, quick):
    b, j, image_size, heatmap_size = DECODE_CASES[case]
    b = QUICK_B if quick else b
    return b, j, image_size, heatmap_size, make_decode_inputs(b, j, image_size, heatmap_size, flip)


def _rss_child_decode(impl, case, flip, quick) -> dict:
    b, j, image_size, heatmap_size, inp = _decode_case(case, flip, quick)
    cpu = torch.device("cpu")
    # warm-up on one image (code paths, thread pool), then the measured step
    decode_impls({k: v[:1] for k, v in inp.items()}, cpu)[impl]()
    fn = decode_impls(inp, cpu)[impl]
    peak = PeakRSS()
    fn()
    return {"peak_extra_MB": peak.growth() / 2**20, "how": peak.how}


def section_decode(args, device, settings, roof):
    """Decode + PCKh: lipfast (decode fused with the flip test, PCKh on the device)
    against upstream's numpy path; see the module docstring."""
    rows, timing = [], {}
    for case in DECODE_CASES:
        for flip in (False, True):
            b, j, image_size, (w, h), inp = _decode_case(case, flip, args.quick)
            impls = decode_impls(inp, device)
            label = f"{case} B={b} J={j} {'flip test' if flip else 'no flip'}"
            vals = {k: fn() for k, fn in impls.items()}
            ref_mean, ref_coords, ref_correct = vals["numpy"]
            ref_coords = torch.from_numpy(ref_coords).double()
            mem = {}
            for k, fn in impls.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn()
                    torch.cuda.synchronize()
                    mem[k] = {"peak_MB": (torch.cuda.max_memory_allocated() - base) / 2**20}
                elif not args.no_rss:
                    mem[k] = {"peak_MB": rss_child_mb("decode", k, case, int(flip),
                                                      int(args.quick))}
                else:
                    mem[k] = {}
            m = _timing.measure(impls, device, settings)
            print(f"  decode {label}: " + ", ".join(f"{k} {m[k].fmt()} ms" for k in impls)
                  + f"; {m.rounds} rounds after {m.warmup_rounds} warm-up", flush=True)
            _timing.print_warnings(m)
            nbytes, flops = decode_work(b, j, h, w, flip)
            for k in impls:
                t = m[k]
                mean, coords, correct = vals[k]
                if k == "numpy":
                    same_nan, max_diff = True, 0.0
                else:
                    got = coords.detach().cpu().double()
                    same_nan = bool((got.isnan() == ref_coords.isnan()).all())
                    diff = (got - ref_coords).abs().nan_to_num(nan=0.0)
                    max_diff = float(diff.max()) if diff.numel() else 0.0
                pckh_equal = correct == ref_correct and (
                    mean == ref_mean or abs(mean - ref_mean) <= 1e-9
                    or (math.isnan(mean) and math.isnan(ref_mean)))
                ok = same_nan and max_diff <= COORD_TOL_PX and pckh_equal
                rows.append(dict(section="decode", case=label, impl=k, flip=flip, ms=t.median,
                                 p20_ms=t.p20, p80_ms=t.p80, min_ms=t.min, rounds=t.rounds,
                                 times_ms=list(t.times_ms), warmup_ms=list(t.warmup_ms),
                                 speedup_vs_torch=None,
                                 speedup_vs_numpy=m["numpy"].median / t.median,
                                 max_abs_diff_px=max_diff, coord_tol_px=COORD_TOL_PX,
                                 pckh_mean=mean, pckh_mean_numpy=ref_mean,
                                 pckh_correct=list(correct), pckh_equal=bool(pckh_equal),
                                 ok=bool(ok), **mem[k],
                                 floor=roof.row(nbytes, flops, "fp32", t.median)))
            timing[label] = m.summary(times=False)
    return rows, timing


# Sections: name -> function(args, device, settings, roof) -> (rows, timing summaries).
# Every row carries section, case, impl, ms, p20_ms, p80_ms, min_ms, rounds, times_ms,
# warmup_ms, ok, [peak_MB], floor, speedup_vs_torch (None where the section has no
# torch row); loss rows also rel_err, value, saved_MB; decode rows also flip,
# speedup_vs_numpy, max_abs_diff_px, coord_tol_px, pckh_mean, pckh_mean_numpy,
# pckh_correct, pckh_equal. Each section prints its own table (TABLES).
SECTIONS = {"loss": section_loss, "decode": section_decode}


# Timing defaults (benchmarks/_timing.py): a CPU round of the loss (4 implementations,
# B=32) takes about 0.3 s.
CPU_TIMING = _timing.Settings(warmup=2, max_warmup=10, max_warmup_seconds=10.0, min_rounds=15,
                              min_seconds=2.0, max_rounds=300, max_seconds=30.0)
CUDA_TIMING = _timing.Settings(warmup=3, max_warmup=20, min_rounds=30, min_seconds=1.0,
                               max_rounds=1000, max_seconds=30.0)
QUICK_TIMING = _timing.QUICK


def timing_defaults_help() -> str:
    return _timing.defaults_help(CPU_TIMING, CUDA_TIMING, QUICK_TIMING, "case",
                                 "--reps is --min-rounds.")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"B={QUICK_B} and quick timing (1 warm-up, 3 rounds): a smoke run, "
                         "figures not for quoting")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run, of {', '.join(SECTIONS)} "
                         "(default: all)")
    ap.add_argument("--device", default=None,
                    help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: torch's choice, but 1 on CPU "
                        "when other processes keep half the cores or more busy at the start: "
                        "multi-threaded kernels then stall)")
    ap.add_argument("--no-rss", action="store_true",
                    help="CPU: skip the peak-RSS child processes (no peak MB column)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="write the rows and the environment")
    ap.add_argument("--_rss-child", default=None, help=argparse.SUPPRESS)
    _timing.add_arguments(ap, timing_defaults_help())
    _roofline.add_arguments(ap)
    return ap


def _mem_header(device) -> str:
    return "peak MB (CUDA allocator)" if device.type == "cuda" else "peak MB (RSS, child)"


def print_loss_table(rows, roof, device):
    models = "".join(f" {mo} floor |" for mo in roof.models)
    print(f"\n| section | case | impl | ms, median [p20-p80] | x torch | rounds | saved MB | "
          f"{_mem_header(device)} | rel err | bytes | floor ms | of floor |{models}")
    print("|---" * (12 + len(roof.models)) + "|")
    for r in rows:
        fl = r["floor"]
        sp = r["speedup_vs_torch"]
        peak = r.get("peak_MB")
        print(f"| {r['section']} | {r['case']} | {r['impl']} | "
              f"{_timing.fmt_spread(r['ms'], r['p20_ms'], r['p80_ms'])} | "
              f"{'-' if sp is None else f'{sp:.2f}'} | {r['rounds']} | {r['saved_MB']:.1f} | "
              f"{'-' if peak is None else f'{peak:.1f}'} | {r['rel_err']:.1e}"
              f"{'' if r['ok'] else ' MISMATCH'} | {_roofline.fmt_count(fl['bytes'], 'B')} | "
              + " | ".join(roof.cells(fl)) + " |")


def print_decode_table(rows, roof, device):
    models = "".join(f" {mo} floor |" for mo in roof.models)
    print(f"\n| section | case | impl | ms, median [p20-p80] | x numpy | rounds | "
          f"{_mem_header(device)} | max abs diff px | PCKh Mean | bytes | floor ms | "
          f"of floor |{models}")
    print("|---" * (12 + len(roof.models)) + "|")
    for r in rows:
        fl = r["floor"]
        peak = r.get("peak_MB")
        if r["impl"] == "numpy":
            diff, mean = "(reference)", f"{r['pckh_mean']:.2f}"
        else:
            diff = f"{r['max_abs_diff_px']:.1e}" + (
                "" if r["max_abs_diff_px"] <= r["coord_tol_px"] else " MISMATCH")
            mean = f"{r['pckh_mean']:.2f} " + (
                "= numpy" if r["pckh_equal"] else f"MISMATCH (numpy {r['pckh_mean_numpy']:.2f})")
        if not r["ok"] and "MISMATCH" not in diff + mean:
            diff += " MISMATCH (NaN pattern)"
        print(f"| {r['section']} | {r['case']} | {r['impl']} | "
              f"{_timing.fmt_spread(r['ms'], r['p20_ms'], r['p80_ms'])} | "
              f"{r['speedup_vs_numpy']:.2f} | {r['rounds']} | "
              f"{'-' if peak is None else f'{peak:.1f}'} | {diff} | {mean} | "
              f"{_roofline.fmt_count(fl['bytes'], 'B')} | " + " | ".join(roof.cells(fl)) + " |")


TABLES = {"loss": print_loss_table, "decode": print_decode_table}


def print_table(rows, roof, device):
    """One table per section present in ``rows`` (in SECTIONS' order), then the
    floor's legend."""
    for name, table in TABLES.items():
        sec = [r for r in rows if r["section"] == name]
        if sec:
            table(sec, roof, device)
    for line in roof.describe():
        print(line)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args._rss_child:
        _rss_child(args._rss_child)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        build_parser().error(f"--sections: unknown {bad or sections}; choose from "
                             f"{', '.join(SECTIONS)}")
    _timing.exit_if_parse_only(args, __file__)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = _timing.settings_from_args(
        args, QUICK_TIMING if args.quick else (CUDA_TIMING if device.type == "cuda"
                                               else CPU_TIMING))
    env, machine, threads_note = run_environment(device, __file__, argv, args.threads)
    print(f"lipfast pose benchmark on {device} ({env['device_name']}), threads "
          f"{env['num_threads']}, sections {', '.join(sections)}")
    _timing.print_run_header(env, settings)
    _timing.print_machine_notes(machine, threads_note)
    roof = _roofline.announce(args, device, args.quick)
    rows, timing = [], {}
    for s in sections:
        r, t = SECTIONS[s](args, device, settings, roof)
        rows += r
        timing.update({f"{s}: {k}": v for k, v in t.items()})
    print_table(rows, roof, device)
    warned = [k for k, t in timing.items() if t["warnings"]]
    if warned:
        print(f"timing warnings (see above) in: {', '.join(warned)}")
    ok = all(r["ok"] for r in rows)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"env": env, "sections": sections, "quick": bool(args.quick),
             "timing_settings": _timing.settings_summary(settings), "timing": timing,
             "roofline": roof.summary(), "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0 if ok and math.isfinite(sum(r["ms"] for r in rows)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
