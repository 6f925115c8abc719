"""Triton kernels of ``lipfast::upsample_ce`` (forward and backward).

Cross-entropy of logits (B x C x h x w, any strides) bilinearly upsampled to the
labels' H x W, the upsampled B x C x H x W tensor never stored. The 1-D bilinear
maps come as small host-made tables (rows: i0, i1, lambda per output row;
columns: j0, j1, lambda per output column) computed exactly as the PyTorch path
does (:func:`lipfast.kernels._taps.bilinear_taps`), for both
align_corners settings.

- forward, one program per (block of BLOCK_P output pixels, image): the 4 taps of
  each channel chunk are gathered and interpolated in registers; online
  log-sum-exp over channel chunks; the label's logit picked on the way. Writes
  per-pixel ``w[y] * (lse - up[y])`` (0 at ignored pixels) and ``lse``; a label
  outside [0, C) other than ignore_index sets a one-element device flag (plain
  stores of 1, no atomics) that the op reads after the launch.
- backward, one program per (block of BLOCK_J low-res columns x block of BLOCK_C
  channels, low-res row i, image), deterministic (each program owns its output
  block, fixed loop order, no atomics): it gathers from the output pixels whose
  bilinear stencil touches it -- output rows [ys[i], ye[i]) and, for the column
  block, output columns [xs[j_first], xe[j_last]) (contiguous because the tap
  indices are monotone in the output coordinate; host tables) -- recomputing
  ``G = (exp(up - lse) - onehot(y)) * w[y] * dnll`` per pixel from the saved
  log-sum-exp (one channel's softmax needs only that channel's taps), and
  applies the adjoint weights as a [BLOCK_C, BLOCK_X] x [BLOCK_X, BLOCK_J] dot.

Configurations (``lipfast.kernels._tuning``):

- ``upsample_ce.fwd``: BLOCK_P (pixels), BLOCK_C (channel chunk), num_warps,
  num_stages; key: power-of-two buckets of C and H*W, dtypes; a channel chunk
  wider than max(16, C padded) is dropped; registers estimated from the four
  [BLOCK_P, BLOCK_C] tap tiles and the interpolated block.
- ``upsample_ce.bwd``: BLOCK_C, BLOCK_J (low-res columns), BLOCK_X (output
  columns per step), num_warps, num_stages; key: buckets of C, w and the
  upsampling factor, dtypes; same channel rule; registers from the
  [BLOCK_C, BLOCK_X] tiles, shared memory from the pipelined dot operands.

Neither accumulates across launches (plain stores; the bad-label flag is set to
1 idempotently), so trials need no reset.

Precision: float16/bfloat16 logits accumulate in float32; float64 is supported
(the op sends it to the PyTorch path on a GPU; used under TRITON_INTERPRET=1 in
the tests). Dots use full-precision ("ieee") products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from ._bilinear import load_taps


def _acc_torch(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _acc_tl(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


_tables: dict = {}


def tables(hh: int, ww: int, h: int, w: int, align_corners: bool, dtype, device):
    """(row taps i0, i1 (int32), lam; column taps j0, j1, lam; low-res row ranges
    ys, ye; low-res column ranges xs, xe) for an h x w -> hh x ww upsampling."""
    key = (hh, ww, h, w, bool(align_corners), dtype, str(device))
    hit = _tables.get(key)
    if hit is not None:
        return hit
    from ._taps import bilinear_taps

    out = []
    for n_out, n_in in ((hh, h), (ww, w)):
        i0, i1, lam = bilinear_taps(n_out, n_in, align_corners, dtype, device)
        r = torch.arange(n_in, device=device)
        # output coordinates touching input index r: i0[d] <= r <= i1[d], contiguous
        start = torch.searchsorted(i1, r, right=False)
        end = torch.searchsorted(i0, r, right=True)
        out.append((i0.to(torch.int32).contiguous(), i1.to(torch.int32).contiguous(),
                    lam.contiguous(), start.to(torch.int32).contiguous(),
                    end.to(torch.int32).contiguous()))
    _tables[key] = tuple(out)
    return _tables[key]


def _chan_ok(kw, warps, args):
    return kw["BLOCK_C"] <= max(16, triton.next_power_of_2(args["C"]))


def _res_fwd(kw, warps, stages, args):
    """Registers: 26 per element of [BLOCK_P, BLOCK_C] per thread (four gathered
    taps with an address each; calibrated with ptxas: 8 elements fit, 16 spill)."""
    bp, bc, th = kw["BLOCK_P"], kw["BLOCK_C"], 32 * warps
    return 40 + 26 * bp * bc // th, 16 * bp


def _res_bwd(kw, warps, stages, args):
    bc, bj, bx, th = kw["BLOCK_C"], kw["BLOCK_J"], kw["BLOCK_X"], 32 * warps
    regs = 40 + (6 * bc * bx + bx * bj + bc * bj + 8 * bx) // th
    smem = (stages * (bc * bx + bx * bj) + bc * bj) * 4
    return regs, smem


# (BLOCK_P, BLOCK_C, num_warps, num_stages); the first valid one is the default
# (spaces checked with ptxas for spills, tests/triton_compile_check.py)
FWD_SPACE = [(64, 16, 4, 1), (128, 16, 8, 1), (64, 32, 8, 1), (256, 16, 16, 1)]
FWD_CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w, num_stages=st)
               for p, c, w, st in FWD_SPACE]
# (BLOCK_C, BLOCK_J, BLOCK_X, num_warps, num_stages)
BWD_SPACE = [(64, 16, 32, 4, 2), (16, 16, 32, 4, 2), (64, 32, 64, 8, 3), (16, 16, 16, 2, 1)]
BWD_CONFIGS = [triton.Config({"BLOCK_C": c, "BLOCK_J": j, "BLOCK_X": x}, num_warps=w,
                             num_stages=st) for c, j, x, w, st in BWD_SPACE]


@_tuning.autotuned("upsample_ce.fwd", FWD_CONFIGS, ["C_B", "P_B", "HAS_W"], _chan_ok, _res_fwd)
@triton.jit(do_not_specialize=["C_B", "P_B"])
def _fwd_kernel(X, LAB, WT, NLL, LSE, BAD,
                RI0, RI1, RA, CJ0, CJ1, CB,
                x_sb, x_sc, x_sh, x_sw, l_sb, l_sh, l_sw,
                C, HH, WW, IGNORE, C_B, P_B,
                HAS_W: tl.constexpr, ACC: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = offs < HH * WW
    y = offs // WW
    x = offs % WW
    i0, i1, a, j0, j1, bb = load_taps(RI0, RI1, RA, CJ0, CJ1, CB, y, x, mp, ACC)
    lab = tl.load(LAB + b * l_sb + y * l_sh + x * l_sw, mask=mp, other=IGNORE).to(tl.int32)
    valid = mp & (lab != IGNORE)
    bad = valid & ((lab < 0) | (lab >= C))
    ok = valid & (lab >= 0) & (lab < C)
    base = X + b * x_sb
    p00 = i0 * x_sh + j0 * x_sw
    p01 = i0 * x_sh + j1 * x_sw
    p10 = i1 * x_sh + j0 * x_sw
    p11 = i1 * x_sh + j1 * x_sw
    w00 = (1 - a) * (1 - bb)
    w01 = (1 - a) * bb
    w10 = a * (1 - bb)
    w11 = a * bb
    m = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
    s = tl.zeros([BLOCK_P], dtype=ACC)
    picked = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        oc = c0 + tl.arange(0, BLOCK_C)
        mc = oc < C
        m2 = mp[:, None] & mc[None, :]
        cc = oc[None, :].to(tl.int64) * x_sc
        up = w00[:, None] * tl.load(base + p00[:, None] + cc, mask=m2, other=0.0).to(ACC)
        up += w01[:, None] * tl.load(base + p01[:, None] + cc, mask=m2, other=0.0).to(ACC)
        up += w10[:, None] * tl.load(base + p10[:, None] + cc, mask=m2, other=0.0).to(ACC)
        up += w11[:, None] * tl.load(base + p11[:, None] + cc, mask=m2, other=0.0).to(ACC)
        picked += tl.sum(tl.where(oc[None, :] == lab[:, None], up, 0.0), axis=1)
        up = tl.where(mc[None, :], up, float("-inf"))
        m_new = tl.maximum(m, tl.max(up, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(up - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    if HAS_W:
        wv = tl.load(WT + tl.where(ok, lab, 0), mask=ok, other=0.0).to(ACC)
    else:
        wv = tl.where(ok, 1.0, 0.0).to(ACC)
    nll = tl.where(ok, (lse - picked) * wv, 0.0)
    out = b * HH * WW + offs
    tl.store(NLL + out, nll, mask=mp)
    tl.store(LSE + out, lse, mask=mp)
    tl.store(BAD + tl.zeros([BLOCK_P], dtype=tl.int32), tl.full([BLOCK_P], 1, tl.int32), mask=bad)


@_tuning.autotuned("upsample_ce.bwd", BWD_CONFIGS, ["C_B", "W_B", "S_B", "HAS_W"], _chan_ok,
                   _res_bwd)
@triton.jit(do_not_specialize=["C_B", "W_B", "S_B"])
def _bwd_kernel(X, LAB, WT, DNLL, LSE, DX,
                RI0, RI1, RA, YS, YE, CJ0, CJ1, CB, XS, XE,
                x_sb, x_sc, x_sh, x_sw, l_sb, l_sh, l_sw,
                C, h, w, HH, WW, IGNORE, C_B, W_B, S_B,
                HAS_W: tl.constexpr, ACC: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_X: tl.constexpr):
    pid0 = tl.program_id(0)
    i = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    njb = tl.cdiv(w, BLOCK_J)
    jb = pid0 % njb
    cb = pid0 // njb
    offs_j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    mj = offs_j < w
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    cc = offs_c[:, None].to(tl.int64) * x_sc
    ys = tl.load(YS + i)
    ye = tl.load(YE + i)
    xs = tl.load(XS + jb * BLOCK_J)
    xe = tl.load(XE + tl.minimum(jb * BLOCK_J + BLOCK_J, w) - 1)
    base = X + b * x_sb
    acc = tl.zeros([BLOCK_C, BLOCK_J], dtype=ACC)
    for y in range(ys, ye):
        i0 = tl.load(RI0 + y).to(tl.int64)
        i1 = tl.load(RI1 + y).to(tl.int64)
        a = tl.load(RA + y).to(ACC)
        wy = tl.where(i0 == i, 1 - a, 0.0) + tl.where(i1 == i, a, 0.0)
        for x0 in range(xs, xe, BLOCK_X):
            ox = x0 + tl.arange(0, BLOCK_X)
            mx = ox < xe
            j0 = tl.load(CJ0 + ox, mask=mx, other=0).to(tl.int64)
            j1 = tl.load(CJ1 + ox, mask=mx, other=0).to(tl.int64)
            bb = tl.load(CB + ox, mask=mx, other=0.0).to(ACC)
            lab = tl.load(LAB + b * l_sb + y * l_sh + ox * l_sw, mask=mx, other=IGNORE).to(tl.int32)
            ok = mx & (lab != IGNORE) & (lab >= 0) & (lab < C)
            pix = b * HH * WW + y * WW + ox
            lse = tl.load(LSE + pix, mask=mx, other=0.0).to(ACC)
            coef = tl.load(DNLL + pix, mask=mx, other=0.0).to(ACC) * wy
            if HAS_W:
                coef *= tl.load(WT + tl.where(ok, lab, 0), mask=ok, other=0.0).to(ACC)
            coef = tl.where(ok, coef, 0.0)
            m2 = mc[:, None] & mx[None, :]
            up = ((1 - a) * (1 - bb))[None, :] * tl.load(
                base + cc + (i0 * x_sh + j0 * x_sw)[None, :], mask=m2, other=0.0).to(ACC)
            up += ((1 - a) * bb)[None, :] * tl.load(
                base + cc + (i0 * x_sh + j1 * x_sw)[None, :], mask=m2, other=0.0).to(ACC)
            up += (a * (1 - bb))[None, :] * tl.load(
                base + cc + (i1 * x_sh + j0 * x_sw)[None, :], mask=m2, other=0.0).to(ACC)
            up += (a * bb)[None, :] * tl.load(
                base + cc + (i1 * x_sh + j1 * x_sw)[None, :], mask=m2, other=0.0).to(ACC)
            g = tl.exp(up - lse[None, :]) * coef[None, :]
            g -= tl.where(offs_c[:, None] == lab[None, :], coef[None, :], 0.0)
            g = tl.where(m2, g, 0.0)
            wx = tl.where(j0[:, None] == offs_j[None, :], (1 - bb)[:, None], 0.0)
            wx += tl.where(j1[:, None] == offs_j[None, :], bb[:, None], 0.0)
            acc += tl.dot(g, wx.to(ACC), input_precision="ieee", out_dtype=ACC)
    out = DX + b * C * h * w + offs_c[:, None].to(tl.int64) * (h * w) + i * w + offs_j[None, :]
    tl.store(out, acc.to(DX.dtype.element_ty), mask=mc[:, None] & mj[None, :])


def _prep(logits, labels, weight, align_corners):
    b, c, h, w = logits.shape
    hh, ww = labels.shape[1:]
    acc = _acc_torch(logits)
    tabs = tables(hh, ww, h, w, align_corners, acc, logits.device)
    wt = weight.contiguous() if weight is not None else logits  # dummy pointer
    return b, c, h, w, hh, ww, acc, tabs, wt


def forward(logits, labels, weight, ignore_index, align_corners, block_p=None, block_c=None,
            config=None):
    """(nll B x H x W, lse B x H x W, bad-label flag (int32, 1 element)); see the
    module docstring. ``nll`` is ``w[y] * -log softmax(up)[y]``, 0 at ignored.
    ``config`` (dict) or block_p/block_c force a configuration."""
    b, c, h, w, hh, ww, acc, tabs, wt = _prep(logits, labels, weight, align_corners)
    (ri0, ri1, ra, _, _), (cj0, cj1, cbb, _, _) = tabs
    nll = torch.empty((b, hh, ww), dtype=acc, device=logits.device)
    lse = torch.empty((b, hh, ww), dtype=acc, device=logits.device)
    bad = torch.zeros(1, dtype=torch.int32, device=logits.device)
    if b == 0 or hh * ww == 0:
        return nll, lse, bad
    explicit = dict(config or {})
    explicit.update({k: v for k, v in (("BLOCK_P", block_p), ("BLOCK_C", block_c)) if v})

    def grid(meta):
        return (triton.cdiv(hh * ww, meta["BLOCK_P"]), b)

    _tuning.launch("upsample_ce.fwd", grid, (
        logits, labels, wt, nll, lse, bad, ri0, ri1, ra, cj0, cj1, cbb,
        *logits.stride(), *labels.stride(), c, hh, ww, int(ignore_index),
        _tuning.bucket(c), _tuning.bucket(hh * ww)),
        dict(HAS_W=weight is not None, ACC=_acc_tl(logits)), explicit)
    return nll, lse, bad


def backward(dnll, logits, labels, weight, lse, ignore_index, align_corners,
             block_c=None, block_j=None, block_x=None, config=None):
    """d logits (contiguous, the logits' dtype) of the per-pixel loss ``nll``
    given its gradient ``dnll`` (B x H x W) and the saved ``lse``."""
    b, c, h, w, hh, ww, acc, tabs, wt = _prep(logits, labels, weight, align_corners)
    (ri0, ri1, ra, ys, ye), (cj0, cj1, cbb, xs, xe) = tabs
    dx = torch.empty((b, c, h, w), dtype=logits.dtype, device=logits.device)
    if b == 0:
        return dx
    if hh * ww == 0:
        return dx.zero_()
    dnll = dnll.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    explicit = dict(config or {})
    explicit.update({k: v for k, v in (("BLOCK_C", block_c), ("BLOCK_J", block_j),
                                       ("BLOCK_X", block_x)) if v})

    def grid(meta):
        return (triton.cdiv(w, meta["BLOCK_J"]) * triton.cdiv(c, meta["BLOCK_C"]), h, b)

    scale = max(triton.cdiv(hh, max(h, 1)), triton.cdiv(ww, max(w, 1)))
    _tuning.launch("upsample_ce.bwd", grid, (
        logits, labels, wt, dnll, lse, dx, ri0, ri1, ra, ys, ye, cj0, cj1, cbb, xs, xe,
        *logits.stride(), *labels.stride(), c, h, w, hh, ww, int(ignore_index),
        _tuning.bucket(c), _tuning.bucket(w), _tuning.bucket(scale)),
        dict(HAS_W=weight is not None, ACC=_acc_tl(logits)), explicit)
    return dx
