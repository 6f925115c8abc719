"""Triton kernel of ``lipfast::pose_decode`` (HRNet's get_final_preds, with the
flip test's flip_back + shift + average fused in; GPU, and CPU tensors under
``TRITON_INTERPRET=1`` in the tests). ../shared/SPEC.md section 10.

One program per (b, j) map, all B x J maps in one launch, no host sync. The map
V that is decoded is read on the fly and never stored: ``V = H[b, j]`` or, with
the flipped heatmaps F, ``V[y, x] = (H[b, j, y, x] + F[b, perm[j], y, w - max(x,
1)]) * 0.5`` (flip_back reverses W and swaps the pair channels through ``perm``;
the shift right by one pixel keeps column 0). The program walks the flattened
map in blocks of BLOCK elements (strided loads) keeping the running first
maximum (a block's maximum replaces the running one only when strictly larger;
within a block the smallest index among the maxima) and the first NaN index
(numpy's argmax: the first NaN wins, maxval NaN). Then, like the CPU kernel
(``csrc/ops/cpu/pose_decode_kernel.cpp``): coordinates zeroed unless maxval > 0,
the quarter-pixel step ``0.25 sign(neighbour difference)`` when ``1 < x < w-1``
and ``1 < y < h-1`` (4 masked scalar loads; sign of NaN is NaN), and the
transform back to the image in float64: ``x_img = c_x + (x - w/2) * 200 s_w / w``,
``y_img = c_y + (y - h/2) * 200 s_w / w``.

Configuration: BLOCK = min(1024, next power of two of h * w) with num_warps 4
(a decode reads a few thousand values per map; no autotuning).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BIG = tl.constexpr(1 << 62)


@triton.jit
def _value(H, F, hy, hx, fy, fx, y, x, W, mask, FLIP: tl.constexpr):
    a = tl.load(H + y * hy + x * hx, mask=mask, other=0.0)
    if FLIP:
        xf = W - tl.maximum(x, 1)
        f = tl.load(F + y * fy + xf * fx, mask=mask, other=0.0)
        a = (a + f) * 0.5
    return a


@triton.jit
def _np_sign(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, tl.where(d == d, 0.0, float("nan"))))


@triton.jit(do_not_specialize=["J", "Hh", "W"])
def _pose_decode_kernel(H, F, PERM, C, S, OUTC, OUTM, J, Hh, W, hb, hj, hy, hx, fb, fj, fy, fx,
                        FLIP: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    b = m // J
    j = m % J
    hbase = H + b * hb + j * hj
    fbase = F
    if FLIP:
        pj = tl.load(PERM + j).to(tl.int64)
        fbase = F + b * fb + pj * fj
    n = Hh * W
    best_v = tl.full([], float("-inf"), dtype=H.dtype.element_ty)
    best_i = tl.zeros([], dtype=tl.int64)
    nan_i = tl.full([], BIG, dtype=tl.int64)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK).to(tl.int64)
        valid = idx < n
        y = idx // W
        x = idx % W
        v = _value(hbase, fbase, hy, hx, fy, fx, y, x, W, valid, FLIP)
        isn = valid & (v != v)
        nan_i = tl.minimum(nan_i, tl.min(tl.where(isn, idx, BIG), axis=0))
        ok = valid & (v == v)
        vv = tl.where(ok, v, float("-inf"))
        bm = tl.max(vv, axis=0)
        bi = tl.min(tl.where(ok & (vv == bm), idx, BIG), axis=0)
        upd = bm > best_v
        best_v = tl.where(upd, bm, best_v)
        best_i = tl.where(upd, bi, best_i)
    has_nan = nan_i < BIG
    best_i = tl.where(has_nan, nan_i, best_i)
    best_v = tl.where(has_nan, float("nan"), best_v)
    pos = best_v > 0
    ix = tl.where(pos, best_i % W, 0)
    iy = tl.where(pos, best_i // W, 0)
    fxv = ix.to(best_v.dtype)
    fyv = iy.to(best_v.dtype)
    inner = (ix > 1) & (ix < W - 1) & (iy > 1) & (iy < Hh - 1)
    r = _value(hbase, fbase, hy, hx, fy, fx, iy, ix + 1, W, inner, FLIP)
    lft = _value(hbase, fbase, hy, hx, fy, fx, iy, ix - 1, W, inner, FLIP)
    dn = _value(hbase, fbase, hy, hx, fy, fx, iy + 1, ix, W, inner, FLIP)
    up = _value(hbase, fbase, hy, hx, fy, fx, iy - 1, ix, W, inner, FLIP)
    fxv = tl.where(inner, fxv + 0.25 * _np_sign(r - lft).to(best_v.dtype), fxv)
    fyv = tl.where(inner, fyv + 0.25 * _np_sign(dn - up).to(best_v.dtype), fyv)
    # a NaN in one coordinate makes both NaN (the reference's affine product)
    bad = (fxv != fxv) | (fyv != fyv)
    fxv = tl.where(bad, float("nan"), fxv)
    fyv = tl.where(bad, float("nan"), fyv)
    cx = tl.load(C + 2 * b)
    cy = tl.load(C + 2 * b + 1)
    ratio = tl.load(S + 2 * b) * 200.0 / W.to(tl.float64)
    xo = cx + (fxv.to(tl.float64) - 0.5 * W.to(tl.float64)) * ratio
    yo = cy + (fyv.to(tl.float64) - 0.5 * Hh.to(tl.float64)) * ratio
    tl.store(OUTC + 2 * m, xo.to(OUTC.dtype.element_ty))
    tl.store(OUTC + 2 * m + 1, yo.to(OUTC.dtype.element_ty))
    tl.store(OUTM + m, best_v.to(OUTM.dtype.element_ty))


_perms: dict = {}


def _perm_tensor(perm: tuple, device: torch.device) -> torch.Tensor:
    """The flip permutation as an int64 tensor on ``device``, cached per (device,
    perm); on CUDA copied from pinned memory without blocking (no host sync)."""
    key = (str(device), perm)
    t = _perms.get(key)
    if t is None:
        host = torch.tensor(perm, dtype=torch.int64)
        if device.type == "cuda":
            t = host.pin_memory().to(device, non_blocking=True)
        else:
            t = host.to(device)
        _perms[key] = t
    return t


def pose_decode(heatmaps: torch.Tensor, flipped, center: torch.Tensor, scale: torch.Tensor,
                perm) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the decode (arguments checked by the op): heatmaps B x J x h x w
    (float32/float64, any strides), flipped None or the same shape/dtype, center
    and scale B x 2 float64, perm a list of J ints (ignored without flipped).
    Returns coords B x J x 2 and maxvals B x J in the heatmaps dtype."""
    bsz, nj, h, w = heatmaps.shape
    coords = heatmaps.new_empty((bsz, nj, 2))
    maxvals = heatmaps.new_empty((bsz, nj))
    if bsz * nj == 0:
        return coords, maxvals
    flip = flipped is not None
    f = flipped if flip else heatmaps
    p = _perm_tensor(tuple(perm) if flip else (0,), heatmaps.device)
    c = center.contiguous()
    s = scale.contiguous()
    block = min(1024, triton.next_power_of_2(h * w))
    _pose_decode_kernel[(bsz * nj,)](
        heatmaps, f, p, c, s, coords, maxvals, nj, h, w, *heatmaps.stride(), *f.stride(),
        FLIP=flip, BLOCK=block, num_warps=4)
    return coords, maxvals
