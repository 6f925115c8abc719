"""Triton kernels of ``lipfast::heatmap_loss`` and ``lipfast::heatmap_loss_backward``
(forward and backward of the fused pose heatmap loss, SPEC section 10).

Heatmaps B x J x h x w (any strides; float32, float16, bfloat16, and float64 under
the interpreter) against deep-high-resolution-net.pytorch's Gaussian targets of
joints B x J x 2 (pixels of the image_size = (W, H) input), never stored:

- forward, one program per map (b, j): the joint's table entry in float64
  exactly as the reference computes it (``mu = trunc(x / stride + 0.5)``,
  ``ul = trunc(mu - 3 sigma)``, ``br = trunc(mu + 3 sigma + 1)``, the weight
  zeroed where the window misses the map, drawn where weight > 0.5; sigma is
  passed as the bits of its float64 value, so non-integer values are exact),
  written to the ``weight`` (float32) and ``window`` (int64 x 6: x_lo, x_hi,
  y_lo, y_hi, cx, cy) tables; then the map in blocks of BLOCK pixels, the target
  ``exp(-((X - cx)^2 + (Y - cy)^2) / (2 sigma^2))`` evaluated in registers inside
  the window (0 outside), the squared difference accumulated in the accumulation
  type (float32; float64 for float64 heatmaps) and stored per map as
  ``w^2 * S * 0.5 / (J B h w)``; the loss is the sum of the B*J partials (one
  torch reduction, deterministic). A joint with visible != 0 and a non-finite
  coordinate sets a one-element device flag (a plain store of 1).
- backward, one program per (map, block of BLOCK pixels): reads the table and the
  0-d d loss, writes ``dloss * w^2 / (J B h w) * (p - target)`` contiguous in the
  heatmaps' dtype. Deterministic (no atomics).

Configuration: BLOCK (pixels per step, default 1024) and num_warps (default 4),
fixed (both kernels are memory-bound streams over the maps); the launchers take
``block`` / ``num_warps`` to override them (the tests use small blocks).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK = 1024
DEFAULT_WARPS = 4


def _bits(x: float) -> int:
    """The int64 with the bits of float64 ``x`` (float64 scalars reach the kernels so)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _acc_torch(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _acc_tl(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


@triton.jit
def _f64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _trunc(v):
    return tl.where(v < 0, -tl.floor(-v), tl.floor(v))


@triton.jit
def _diff_to_target(base, offs, H, W, s_h, s_w, xlo, xhi, ylo, yhi, cx, cy, den,
                    ACC: tl.constexpr):
    """(p - target) for the pixels offs of one map (0 beyond the map)."""
    mk = offs < H * W
    y = (offs // W).to(tl.int64)
    x = (offs % W).to(tl.int64)
    p = tl.load(base + y * s_h + x * s_w, mask=mk, other=0.0).to(ACC)
    inw = (x >= xlo) & (x < xhi) & (y >= ylo) & (y < yhi)
    dx = (x - cx).to(ACC)
    dy = (y - cy).to(ACC)
    g = tl.exp(-(dx * dx + dy * dy) / den)
    return tl.where(mk, p - tl.where(inw, g, 0.0), 0.0)


@triton.jit(do_not_specialize=["SIGMA_BITS", "SCALE_BITS"])
def _fwd_kernel(HM, JT, VIS, PART, WEIGHT, WIN, BAD,
                s_b, s_j, s_h, s_w, j_sb, j_sj, j_sc, v_sb, v_sj,
                J, H, W, IMG_W, IMG_H, SIGMA_BITS, SCALE_BITS,
                ACC: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    b = m // J
    j = m % J
    sigma = _f64(SIGMA_BITS)
    tmp = sigma * 3.0
    centre = tl.floor((2.0 * tmp + 1.0) / 2.0)
    wf = W.to(tl.float64)
    hf = H.to(tl.float64)
    stride_x = IMG_W.to(tl.float64) / wf
    stride_y = IMG_H.to(tl.float64) / hf
    jp = JT + b.to(tl.int64) * j_sb + j.to(tl.int64) * j_sj
    jx = tl.load(jp).to(tl.float64)
    jy = tl.load(jp + j_sc).to(tl.float64)
    v = tl.load(VIS + b.to(tl.int64) * v_sb + j.to(tl.int64) * v_sj).to(tl.float32)
    active = v != 0.0
    finite = (tl.abs(jx) < float("inf")) & (tl.abs(jy) < float("inf"))
    mu_x = _trunc(jx / stride_x + 0.5)
    mu_y = _trunc(jy / stride_y + 0.5)
    ul_x = _trunc(mu_x - tmp)
    ul_y = _trunc(mu_y - tmp)
    br_x = _trunc(mu_x + tmp + 1.0)
    br_y = _trunc(mu_y + tmp + 1.0)
    off = (ul_x >= wf) | (ul_y >= hf) | (br_x < 0.0) | (br_y < 0.0)
    wt = tl.where(off, 0.0, v)
    drawn = active & finite & (wt > 0.5)
    x_lo = tl.maximum(ul_x, 0.0)
    y_lo = tl.maximum(ul_y, 0.0)
    x_hi = tl.maximum(tl.minimum(br_x, wf), x_lo)
    y_hi = tl.maximum(tl.minimum(br_y, hf), y_lo)
    xlo = tl.where(drawn, x_lo, 0.0).to(tl.int64)
    xhi = tl.where(drawn, x_hi, 0.0).to(tl.int64)
    ylo = tl.where(drawn, y_lo, 0.0).to(tl.int64)
    yhi = tl.where(drawn, y_hi, 0.0).to(tl.int64)
    cx = tl.where(drawn, ul_x + centre, 0.0).to(tl.int64)
    cy = tl.where(drawn, ul_y + centre, 0.0).to(tl.int64)
    tl.store(WEIGHT + m, wt)
    wp = WIN + m.to(tl.int64) * 6
    tl.store(wp, xlo)
    tl.store(wp + 1, xhi)
    tl.store(wp + 2, ylo)
    tl.store(wp + 3, yhi)
    tl.store(wp + 4, cx)
    tl.store(wp + 5, cy)
    tl.store(BAD, 1, mask=active & (finite == 0))

    den = (2.0 * sigma * sigma).to(ACC)
    base = HM + b.to(tl.int64) * s_b + j.to(tl.int64) * s_j
    acc = tl.zeros([BLOCK], dtype=ACC)
    for p0 in range(0, H * W, BLOCK):
        d = _diff_to_target(base, p0 + tl.arange(0, BLOCK), H, W, s_h, s_w, xlo, xhi, ylo, yhi,
                          cx, cy, den, ACC)
        acc += d * d
    s = tl.sum(acc, axis=0)
    wa = wt.to(ACC)
    tl.store(PART + m, wa * wa * s * _f64(SCALE_BITS).to(ACC))


@triton.jit(do_not_specialize=["SIGMA_BITS", "INV_N_BITS"])
def _bwd_kernel(DL, HM, WEIGHT, WIN, DX, s_b, s_j, s_h, s_w,
                J, H, W, SIGMA_BITS, INV_N_BITS,
                ACC: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    blk = tl.program_id(1)
    b = m // J
    j = m % J
    sigma = _f64(SIGMA_BITS)
    den = (2.0 * sigma * sigma).to(ACC)
    wp = WIN + m.to(tl.int64) * 6
    xlo = tl.load(wp)
    xhi = tl.load(wp + 1)
    ylo = tl.load(wp + 2)
    yhi = tl.load(wp + 3)
    cx = tl.load(wp + 4)
    cy = tl.load(wp + 5)
    wt = tl.load(WEIGHT + m).to(tl.float64)
    c = (tl.load(DL).to(tl.float64) * wt * wt * _f64(INV_N_BITS)).to(ACC)
    base = HM + b.to(tl.int64) * s_b + j.to(tl.int64) * s_j
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    d = _diff_to_target(base, offs, H, W, s_h, s_w, xlo, xhi, ylo, yhi, cx, cy, den, ACC)
    out = DX + m.to(tl.int64) * H * W + offs
    tl.store(out, (c * d).to(DX.dtype.element_ty), mask=offs < H * W)


def forward(heatmaps, joints, visible, image_size, sigma, block=None, num_warps=None):
    """(loss 0-d, weight B x J float32, window B x J x 6 int64, bad-joint flag
    (int32, 1 element)); see the module docstring. ``image_size`` = (W, H)."""
    b, j, h, w = heatmaps.shape
    dev = heatmaps.device
    acc = _acc_torch(heatmaps)
    part = torch.empty((b * j,), dtype=acc, device=dev)
    weight = torch.empty((b, j), dtype=torch.float32, device=dev)
    window = torch.empty((b, j, 6), dtype=torch.int64, device=dev)
    bad = torch.zeros(1, dtype=torch.int32, device=dev)
    block = block or min(DEFAULT_BLOCK, triton.next_power_of_2(h * w))
    _fwd_kernel[(b * j,)](
        heatmaps, joints, visible, part, weight, window, bad,
        *heatmaps.stride(), *joints.stride(), *visible.stride(),
        j, h, w, int(image_size[0]), int(image_size[1]), _bits(sigma),
        _bits(0.5 / (j * b * h * w)),
        ACC=_acc_tl(heatmaps), BLOCK=block, num_warps=num_warps or DEFAULT_WARPS)
    return part.sum(), weight, window, bad


def backward(grad, heatmaps, weight, window, sigma, block=None, num_warps=None):
    """d heatmaps (contiguous, the heatmaps' dtype) from the 0-d d loss ``grad``
    and the forward's table."""
    b, j, h, w = heatmaps.shape
    dx = torch.empty((b, j, h, w), dtype=heatmaps.dtype, device=heatmaps.device)
    block = block or min(DEFAULT_BLOCK, triton.next_power_of_2(h * w))
    grid = (b * j, triton.cdiv(h * w, block))
    _bwd_kernel[grid](
        grad, heatmaps, weight.contiguous(), window.contiguous(), dx, *heatmaps.stride(),
        j, h, w, _bits(sigma), _bits(1.0 / (j * b * h * w)),
        ACC=_acc_tl(heatmaps), BLOCK=block, num_warps=num_warps or DEFAULT_WARPS)
    return dx
