"""Triton kernel of ``lipfast::confusion_matrix`` (GPU; runs on CPU tensors under
``TRITON_INTERPRET=1`` in the tests).

One kernel, persistent-style: a grid of at most ``programs`` programs, each
walking blocks of BLOCK_P pixels of the flattened B x H x W label map (block
``pid``, ``pid + P``, ``pid + 2P``, ...). Per pixel it finds the prediction

- MODE 0: read from the integer prediction map (any strides, any integer dtype);
- MODE 1: argmax over the channels of B x C x H x W logits read through their
  strides, in chunks of BLOCK_C channels (first maximum wins; a NaN wins, the
  first NaN over later ones: torch.argmax's rule);
- MODE 2: the same on logits bilinearly resized (align_corners=True) from
  h x w to H x W on the fly: the 4 taps of each pixel are gathered and combined
  in ATen's order (width, then height) with host-made tap tables
  (:func:`lipfast.kernels._taps.bilinear_taps`), never storing the resized
  logits;

and counts ``label * C + pred`` over the pixels whose label is not ignore_index:

- HIST > 0 (C * C <= 4096): into a per-program int32 histogram of HIST bins
  (``tl.histogram``, masked), added to the global int64 matrix once at the end
  with one int64 atomic add per non-empty bin;
- HIST == 0 (large C): one int64 atomic add per counted pixel.

Labels outside [0, C) other than ignore_index, and predictions outside [0, C)
at counted pixels, are not counted (no out-of-bounds access); they set
``bad[0]`` (label) / ``bad[1]`` (prediction), a 2-element int32 device flag
(plain stores of 1, no atomics) that the op checks with
``torch._assert_async`` (no host synchronisation).

Precision: float16/bfloat16 logits are compared (and resized) in float32,
float64 in float64 (the op sends float64 to its PyTorch path on a GPU; the
tests run it here under the interpreter).

Configuration (``lipfast.kernels._tuning``, kernel name ``confusion_matrix``):
BLOCK_P, BLOCK_C, num_warps (num_stages 1); key: MODE, HIST and power-of-two
buckets of C and of the pixel count, and the dtypes. Predictions (MODE 0) use no
channel block: only BLOCK_C = 8 configurations are kept; logits drop channel
blocks wider than max(8, C padded); registers are estimated from the
[BLOCK_P, BLOCK_C] tiles (four taps in MODE 2) and the histogram. The kernel
adds to the matrix with atomics, and the matrix is the caller's accumulator, so
trials restore it (``restore_value``) and only the final launch counts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from ._bilinear import load_taps

BIG = tl.constexpr(1 << 30)
HIST_MAX = 4096  # largest per-program histogram (bins); larger C*C: per-pixel atomics


def _acc_tl(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


# (BLOCK_P, BLOCK_C, num_warps); the first valid one that fits is the default
SPACE = [(1024, 8, 4), (128, 8, 4), (256, 8, 8), (2048, 8, 8), (64, 16, 4), (128, 16, 8)]
CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w, num_stages=1)
           for p, c, w in SPACE]


def _valid(kw, warps, args):
    if args["MODE"] == 0:
        return kw["BLOCK_C"] == 8
    return kw["BLOCK_C"] <= max(8, triton.next_power_of_2(args["C"]))


def _res(kw, warps, stages, args):
    """Registers: 6 per pixel per thread (int64 offsets) and, per element of
    [BLOCK_P, BLOCK_C] per thread, 12 (logits) or 20 (four resize taps), plus the
    histogram (calibrated with ptxas: 8 elements fit, 16 spill with taps)."""
    bp, bc, th = kw["BLOCK_P"], kw["BLOCK_C"], 32 * warps
    per = {0: 0, 1: 12, 2: 20}[args["MODE"]]
    regs = 40 + (6 * bp + per * bp * bc + args["HIST"]) // th
    return regs, 4 * args["HIST"] + 8 * bp


@_tuning.autotuned("confusion_matrix", CONFIGS, ["MODE", "HIST", "C_B", "N_B"], _valid, _res,
                   restore_value=["CM"])
@triton.jit(do_not_specialize=["C_B", "N_B"])
def _cm_kernel(X, LAB, CM, BAD, RI0, RI1, RA, CJ0, CJ1, CB,
               x_sb, x_sc, x_sh, x_sw, l_sb, l_sh, l_sw,
               N, C, HH, WW, IGNORE, C_B, N_B,
               MODE: tl.constexpr, HIST: tl.constexpr, ACC: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if HIST > 0:
        hist = tl.zeros([HIST], dtype=tl.int32)
    zero_i = tl.zeros([BLOCK_P], dtype=tl.int32)
    # blocks pid, pid + nprog, ... below cdiv(N, BLOCK_P) (the grid has at most that many)
    iters = tl.cdiv(tl.cdiv(N, BLOCK_P) - pid, nprog)
    for it in range(0, iters):
        blk = (pid + it * nprog).to(tl.int64)
        offs = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = offs < N
        b = offs // (HH * WW)
        rem = offs % (HH * WW)
        y = rem // WW
        x = rem % WW
        lab = tl.load(LAB + b * l_sb + y * l_sh + x * l_sw, mask=mp, other=IGNORE).to(tl.int64)
        valid = mp & (lab != IGNORE)
        okl = valid & (lab >= 0) & (lab < C)
        if MODE == 0:
            pred = tl.load(X + b * x_sb + y * x_sh + x * x_sw, mask=okl, other=0).to(tl.int64)
        else:
            bo = b * x_sb
            if MODE == 2:
                i0, i1, a, j0, j1, bb = load_taps(RI0, RI1, RA, CJ0, CJ1, CB, y, x, mp, ACC)
                p00 = bo + i0 * x_sh + j0 * x_sw
                p01 = bo + i0 * x_sh + j1 * x_sw
                p10 = bo + i1 * x_sh + j0 * x_sw
                p11 = bo + i1 * x_sh + j1 * x_sw
                a0 = 1 - a
                b0 = 1 - bb
            else:
                p = bo + y * x_sh + x * x_sw
            best_v = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
            best_i = tl.zeros([BLOCK_P], dtype=tl.int32)
            nan_i = tl.full([BLOCK_P], BIG, dtype=tl.int32)
            for c0 in range(0, C, BLOCK_C):
                oc = c0 + tl.arange(0, BLOCK_C)
                mc = oc < C
                m2 = mp[:, None] & mc[None, :]
                cc = oc[None, :].to(tl.int64) * x_sc
                if MODE == 2:
                    v00 = tl.load(X + p00[:, None] + cc, mask=m2, other=0.0).to(ACC)
                    v01 = tl.load(X + p01[:, None] + cc, mask=m2, other=0.0).to(ACC)
                    v10 = tl.load(X + p10[:, None] + cc, mask=m2, other=0.0).to(ACC)
                    v11 = tl.load(X + p11[:, None] + cc, mask=m2, other=0.0).to(ACC)
                    r0 = v00 * b0[:, None] + v01 * bb[:, None]
                    r1 = v10 * b0[:, None] + v11 * bb[:, None]
                    v = r0 * a0[:, None] + r1 * a[:, None]
                else:
                    v = tl.load(X + p[:, None] + cc, mask=m2, other=0.0).to(ACC)
                isn = (v != v) & m2
                nan_i = tl.minimum(nan_i, tl.min(tl.where(isn, oc[None, :], BIG), axis=1))
                vv = tl.where(isn | (~m2), float("-inf"), v)
                cm = tl.max(vv, axis=1)
                hit = m2 & (~isn) & (vv == cm[:, None])
                ci = tl.min(tl.where(hit, oc[None, :], BIG), axis=1)
                upd = cm > best_v
                best_v = tl.where(upd, cm, best_v)
                best_i = tl.where(upd, ci, best_i)
            pred = tl.where(nan_i < BIG, nan_i, best_i).to(tl.int64)
        okp = (pred >= 0) & (pred < C)
        cnt = okl & okp
        idx = lab * C + pred
        if HIST > 0:
            hist += tl.histogram(idx.to(tl.int32), HIST, mask=cnt)
        else:
            tl.atomic_add(CM + tl.where(cnt, idx, 0), tl.full([BLOCK_P], 1, tl.int64), mask=cnt)
        tl.store(BAD + zero_i, zero_i + 1, mask=valid & (~okl))
        tl.store(BAD + 1 + zero_i, zero_i + 1, mask=okl & (~okp))
    if HIST > 0:
        bins = tl.arange(0, HIST)
        tl.atomic_add(CM + bins, hist.to(tl.int64), mask=(bins < C * C) & (hist > 0))


def _mode(input: torch.Tensor, labels: torch.Tensor, resize: bool) -> int:
    if not input.is_floating_point():
        return 0
    same = tuple(input.shape[2:]) == tuple(labels.shape[1:])
    return 1 if (same or not resize) else 2


def confusion_matrix(input, labels, num_classes, ignore_index, resize, out=None,
                     block_p=None, block_c=None, hist=None, programs=None, config=None):
    """Adds the confusion matrix of (input, labels) to ``out`` (int64 C x C,
    allocated as zeros when None). Returns ``(out, bad)``: ``bad`` is the int32
    2-element device flag (label, prediction out of range). Arguments are
    assumed checked (lipfast.ops.confusion_matrix does it)."""
    c = int(num_classes)
    dev = labels.device
    if out is None:
        out = torch.zeros((c, c), dtype=torch.int64, device=dev)
    bad = torch.zeros(2, dtype=torch.int32, device=dev)
    b, hh, ww = labels.shape
    n = b * hh * ww
    if n == 0:
        return out, bad
    mode = _mode(input, labels, resize)
    acc_t = torch.float64 if input.dtype == torch.float64 else torch.float32
    if mode == 2:
        from ._taps import bilinear_taps

        h, w = input.shape[2:]
        ri0, ri1, ra = bilinear_taps(hh, h, True, acc_t, dev)
        cj0, cj1, cb = bilinear_taps(ww, w, True, acc_t, dev)
        ri0, ri1, cj0, cj1 = (t.to(torch.int32).contiguous() for t in (ri0, ri1, cj0, cj1))
        ra, cb = ra.contiguous(), cb.contiguous()
    else:
        ri0 = ri1 = cj0 = cj1 = torch.zeros(1, dtype=torch.int32, device=dev)
        ra = cb = torch.zeros(1, dtype=acc_t, device=dev)
    if mode == 0:
        x_sb, x_sh, x_sw = input.stride()
        x_sc = 0
    else:
        x_sb, x_sc, x_sh, x_sw = input.stride()
    l_sb, l_sh, l_sw = labels.stride()
    if hist is None:
        hist = triton.next_power_of_2(c * c) if c * c <= HIST_MAX else 0
    explicit = dict(config or {})
    explicit.update({k: v for k, v in (("BLOCK_P", block_p), ("BLOCK_C", block_c)) if v})
    if programs is None:
        sms = (torch.cuda.get_device_properties(dev).multi_processor_count
               if dev.type == "cuda" else 4)
        programs = 8 * sms
    # int32 per-program histogram: at most 2^30 pixels per program
    programs = max(int(programs), triton.cdiv(n, 1 << 30))

    def grid(meta):
        return (min(programs, triton.cdiv(n, meta["BLOCK_P"])),)

    _tuning.launch("confusion_matrix", grid, (
        input, labels, out, bad, ri0, ri1, ra, cj0, cj1, cb,
        x_sb, x_sc, x_sh, x_sw, l_sb, l_sh, l_sw,
        n, c, hh, ww, int(ignore_index), _tuning.bucket(c), _tuning.bucket(n)),
        dict(MODE=mode, HIST=hist, ACC=_acc_tl(input) if mode else tl.float32), explicit)
    return out, bad
