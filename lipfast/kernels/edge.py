"""Triton kernel of ``lipfast::generate_edge`` (SCHP edge labels, SPEC section 3).

One program per BLOCK_H x BLOCK_W tile of one image. A pixel p is an edge after
the 3x3 box dilation iff some pixel q of its 3x3 neighbourhood (inside the
image) is a raw edge, and q is a raw edge iff for one of the four directions
d in {(-1, 0), (0, +1), (+1, +1), (+1, -1)} the pair (q, q + d) has different
labels, both != ignore (255). Each raw-edge predicate is computed on the fly
from label loads (9 neighbours x 5 loads, all hitting cache); out-of-image loads
read 255, so the "both != 255" test also handles the image border (the
zero padding of SCHP's conv). Labels are read in their own integer dtype
through strides (no float copy, no conv); the output is int64 0/1.

Configuration (``lipfast.kernels._tuning``, kernel name ``edge``): BLOCK_H,
BLOCK_W, num_warps (num_stages 1); key: power-of-two buckets of H and W and the
label dtype; tiles wider than max(32, W padded) or taller than max(4, H padded)
are dropped; registers estimated from the int64 neighbourhood tiles. Plain
stores only: trials need no reset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning

# (BLOCK_H, BLOCK_W, num_warps); the first valid one is the default
SPACE = [(8, 64, 4), (16, 64, 8), (4, 128, 4), (8, 128, 8), (32, 32, 8), (16, 32, 4),
         (4, 32, 2)]
CONFIGS = [triton.Config({"BLOCK_H": bh, "BLOCK_W": bw}, num_warps=w, num_stages=1)
           for bh, bw, w in SPACE]


def _valid(kw, warps, args):
    return (kw["BLOCK_W"] <= max(32, triton.next_power_of_2(args["W"]))
            and kw["BLOCK_H"] <= max(4, triton.next_power_of_2(args["H"])))


def _res(kw, warps, stages, args):
    """Registers: 40 per pixel per thread (int64 neighbourhood values and masks;
    ptxas: 4 pixels per thread stay below 255, 8 reach it)."""
    return 40 + 40 * kw["BLOCK_H"] * kw["BLOCK_W"] // (32 * warps), 0


@triton.jit
def _load(lab, b_off, r, c, H, W, s_h, s_w, IGNORE: tl.constexpr):
    inb = (r >= 0) & (r < H) & (c >= 0) & (c < W)
    return tl.load(lab + b_off + r * s_h + c * s_w, mask=inb, other=IGNORE).to(tl.int64)


@triton.jit
def _pair(a, lab, b_off, r, c, H, W, s_h, s_w, IGNORE: tl.constexpr):
    n = _load(lab, b_off, r, c, H, W, s_h, s_w, IGNORE)
    return (a != n) & (a != IGNORE) & (n != IGNORE)


@_tuning.autotuned("edge", CONFIGS, ["H_B", "W_B"], _valid, _res)
@triton.jit(do_not_specialize=["H_B", "W_B"])
def _edge_kernel(lab, out, H, W, s_b, s_h, s_w, H_B, W_B,
                 IGNORE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_w = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    b_off = b * s_b
    edge = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.int1)
    for dy in tl.static_range(-1, 2):
        for dx in tl.static_range(-1, 2):
            r = rows + dy
            c = cols + dx
            a = _load(lab, b_off, r, c, H, W, s_h, s_w, IGNORE)
            raw = _pair(a, lab, b_off, r - 1, c, H, W, s_h, s_w, IGNORE)
            raw = raw | _pair(a, lab, b_off, r, c + 1, H, W, s_h, s_w, IGNORE)
            raw = raw | _pair(a, lab, b_off, r + 1, c + 1, H, W, s_h, s_w, IGNORE)
            raw = raw | _pair(a, lab, b_off, r + 1, c - 1, H, W, s_h, s_w, IGNORE)
            edge = edge | raw
    mask = (rows < H) & (cols < W)
    tl.store(out + b * H * W + rows * W + cols, edge.to(tl.int64), mask=mask)


def generate_edge(labels: torch.Tensor, ignore_index: int = 255, config=None) -> torch.Tensor:
    """B x H x W integer labels (any strides) -> B x H x W int64 0/1 edges;
    ``config`` (dict) forces a configuration."""
    b, h, w = labels.shape
    out = torch.empty((b, h, w), dtype=torch.int64, device=labels.device)
    if out.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(w, meta["BLOCK_W"]), triton.cdiv(h, meta["BLOCK_H"]), b)

    _tuning.launch("edge", grid, (labels, out, h, w, labels.stride(0), labels.stride(1),
                                  labels.stride(2), _tuning.bucket(h), _tuning.bucket(w)),
                   dict(IGNORE=ignore_index), config)
    return out
