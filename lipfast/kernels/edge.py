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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load(lab, b_off, r, c, H, W, s_h, s_w, IGNORE: tl.constexpr):
    inb = (r >= 0) & (r < H) & (c >= 0) & (c < W)
    return tl.load(lab + b_off + r * s_h + c * s_w, mask=inb, other=IGNORE).to(tl.int64)


@triton.jit
def _pair(a, lab, b_off, r, c, H, W, s_h, s_w, IGNORE: tl.constexpr):
    n = _load(lab, b_off, r, c, H, W, s_h, s_w, IGNORE)
    return (a != n) & (a != IGNORE) & (n != IGNORE)


@triton.jit
def _edge_kernel(lab, out, H, W, s_b, s_h, s_w,
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


def generate_edge(labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """B x H x W integer labels (any strides) -> B x H x W int64 0/1 edges."""
    b, h, w = labels.shape
    out = torch.empty((b, h, w), dtype=torch.int64, device=labels.device)
    if out.numel() == 0:
        return out
    block_h, block_w = 16, 64
    grid = (triton.cdiv(w, block_w), triton.cdiv(h, block_h), b)
    _edge_kernel[grid](labels, out, h, w, labels.stride(0), labels.stride(1), labels.stride(2),
                       IGNORE=ignore_index, BLOCK_H=block_h, BLOCK_W=block_w)
    return out
