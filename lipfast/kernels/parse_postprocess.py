"""Triton kernel of ``lipfast::parse_postprocess`` (SCHP's upsample + affine warp +
argmax/softmax, fused; GPU, and CPU tensors under ``TRITON_INTERPRET=1`` in the
tests).

The composition is separable: output row y of map k reads at most 4 logits rows
with composite weights (the two bilinear taps of the upsampled map U at
``ay * y + by``, zero outside the input frame, each the align_corners mix of two
logits rows), output column x at most 4 logits columns. The host builds these
tables (:func:`composite_taps`, pure torch, from
:func:`lipfast.kernels._taps.bilinear_taps`), K x out_h x 4 and K x out_w x 4
(int32 indices, weights in the accumulation dtype; equal indices merged, so most
weights are 0 and their loads are masked off).

One program per BLOCK_P output pixels of one map k. Channels in blocks of
BLOCK_C: the [BLOCK_P, BLOCK_C] tile of V is the sum over the 4 x 4 composite
taps of the weighted logits loads (a runtime loop over the taps, so one load tile
is live at a time; loads of zero-weight taps are masked off); a running argmax
(first maximum: the smallest channel among the block's maxima, replacing the
running one only when strictly larger) and, when the probabilities or fg are
asked, online softmax statistics (running max m and sum s of exp(V - m)); V[0] is
kept for fg. MAPS 2 stores V in the first pass; MAPS 1 recomputes V in a second
pass and stores exp(V - m) / s. Labels are stored as uint8.

Configuration (``lipfast.kernels._tuning``, kernel name ``parse_postprocess``):
BLOCK_P, BLOCK_C, num_warps (num_stages 1); key: power-of-two buckets of C and
of the pixel count, MAPS, FG and the dtypes; channel blocks wider than
max(8, C padded) and pixel blocks wider than max(64, pixels padded) are dropped;
registers are estimated from the per-pixel tables and the [BLOCK_P, BLOCK_C]
tiles. Plain stores only: trials need no reset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _tuning
from ._taps import bilinear_taps

BIG = tl.constexpr(1 << 30)

# (BLOCK_P, BLOCK_C, num_warps); the first valid one that fits is the default
# (no 32-channel blocks: ptxas spills them with the softmax statistics)
SPACE = [(128, 16, 4), (256, 8, 4), (256, 16, 8), (512, 8, 8), (64, 16, 2), (128, 8, 2),
         (32, 8, 1)]
CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w, num_stages=1)
           for p, c, w in SPACE]


def _valid(kw, warps, args):
    return (kw["BLOCK_C"] <= max(8, triton.next_power_of_2(args["C"]))
            and kw["BLOCK_P"] <= max(64, triton.next_power_of_2(args["N"])))


def _res(kw, warps, stages, args):
    """Registers: 16 per pixel per thread (table offsets, the running
    statistics) and 6 per element of the [BLOCK_P, BLOCK_C] tile per thread (the
    accumulator, one load and its int64 offset: the taps are a runtime loop),
    plus 40 with the softmax statistics (ptxas, sm_90: 100 / 165 registers for
    128 x 16 with 4 warps without / with them; estimated 152 / 192)."""
    bp, bc, th = kw["BLOCK_P"], kw["BLOCK_C"], 32 * warps
    stats = 40 if (args.get("MAPS") == 1 or args.get("FG")) else 0
    return 40 + (16 * bp + 6 * bp * bc) // th + stats, 0


def _acc_tl(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _axis_taps(q: torch.Tensor, n_u: int, n_l: int):
    """The 4 composite (logits index, float64 weight) taps, K x n x 4, of the
    samples ``q`` (K x n float64) of an upsampled axis of size n_u (from n_l,
    align_corners=True; zero border)."""
    i0, i1, lam = bilinear_taps(n_u, n_l, True, torch.float64, q.device)
    q = q.clamp(-2.0, n_u + 1.0)
    f = q.floor()
    fr = q - f
    x0 = f.long()
    idx, wts = [], []
    for d, wu in ((0, 1.0 - fr), (1, fr)):
        x = x0 + d
        ok = (x >= 0) & (x < n_u)
        xc = x.clamp(0, n_u - 1)
        wu = torch.where(ok, wu, torch.zeros_like(wu))
        lm = lam[xc]
        idx += [i0[xc], i1[xc]]
        wts += [wu * (1.0 - lm), wu * lm]
    return torch.stack(idx, -1), torch.stack(wts, -1)


def composite_taps(q: torch.Tensor, n_u: int, n_l: int, dtype):
    """(indices int32, weights ``dtype``), both K x n x 4: the composite taps of
    :func:`_axis_taps` with equal indices merged into their first slot (the other
    slots get weight 0)."""
    idx, w = _axis_taps(q, n_u, n_l)
    eq = idx[..., :, None] == idx[..., None, :]  # K x n x 4 x 4
    earlier = torch.tril(torch.ones(4, 4, dtype=torch.bool, device=q.device), -1)
    first = ~(eq & earlier).any(-1)  # no equal index in an earlier slot
    merged = (eq.to(w.dtype) * w[..., None, :]).sum(-1)
    merged = torch.where(first, merged, torch.zeros_like(merged))
    return idx.to(torch.int32).contiguous(), merged.to(dtype).contiguous()


@triton.jit
def _tile(base, cc, mc, mp, RI, RW, CI, CW, rb, cb, s_h, s_w, NTAPS, ACC: tl.constexpr,
          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The [BLOCK_P, BLOCK_C] tile of V: sum over the 4 x 4 composite taps
    (row tap t // 4, column tap t % 4) of the weighted logits loads. A runtime
    loop (NTAPS = 16 from the host), so that only one load tile is live at a
    time; the tap tables are re-read per tap (cached); zero weights mask the load."""
    v = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for t in range(0, NTAPS):
        ta = t // 4
        tb = t % 4
        ri = tl.load(RI + rb + ta, mask=mp, other=0).to(tl.int64)
        ci = tl.load(CI + cb + tb, mask=mp, other=0).to(tl.int64)
        wt = tl.load(RW + rb + ta, mask=mp, other=0.0).to(ACC) * tl.load(
            CW + cb + tb, mask=mp, other=0.0).to(ACC)
        m = (mp & (wt != 0))[:, None] & mc
        x = tl.load(base + (ri * s_h + ci * s_w)[:, None] + cc, mask=m, other=0.0).to(ACC)
        v += x * wt[:, None]
    return v


@_tuning.autotuned("parse_postprocess", CONFIGS, ["C_B", "N_B", "MAPS", "FG"], _valid, _res)
@triton.jit(do_not_specialize=["C_B", "N_B", "NTAPS"])
def _pp_kernel(X, RI, RW, CI, CW, LAB, MAP, FGO, s_k, s_c, s_h, s_w, C, OH, OW, N, NTAPS, C_B,
               N_B, MAPS: tl.constexpr, FG: tl.constexpr, ACC: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    offs = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = offs < N
    y = offs // OW
    x = offs % OW
    rb = (k * OH + y) * 4
    cb = (k * OW + x) * 4
    base = X + k * s_k
    best_v = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
    best_i = tl.zeros([BLOCK_P], dtype=tl.int32)
    m_run = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
    s_run = tl.zeros([BLOCK_P], dtype=ACC)
    v_0 = tl.zeros([BLOCK_P], dtype=ACC)
    for cs in range(0, C, BLOCK_C):
        oc = cs + tl.arange(0, BLOCK_C)
        mc = (oc < C)[None, :]
        cc = oc[None, :].to(tl.int64) * s_c
        v = _tile(base, cc, mc, mp, RI, RW, CI, CW, rb, cb, s_h, s_w, NTAPS, ACC, BLOCK_P,
                  BLOCK_C)
        vv = tl.where(mc, v, float("-inf"))
        bm = tl.max(vv, axis=1)
        hit = mc & (vv == bm[:, None])
        bi = tl.min(tl.where(hit, oc[None, :], BIG), axis=1)
        upd = bm > best_v
        best_v = tl.where(upd, bm, best_v)
        best_i = tl.where(upd, bi, best_i)
        if MAPS == 1 or FG:
            m_new = tl.maximum(m_run, bm)
            s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(vv - m_new[:, None]), axis=1)
            m_run = m_new
            v_0 += tl.sum(tl.where(oc[None, :] == 0, v, 0.0), axis=1)
        if MAPS == 2:
            o = (k * C + oc[None, :].to(tl.int64)) * N + offs[:, None]
            tl.store(MAP + o, v.to(MAP.dtype.element_ty), mask=mp[:, None] & mc)
    tl.store(LAB + k * N + offs, best_i.to(tl.uint8), mask=mp)
    if FG:
        fgv = 1.0 - tl.exp(v_0 - m_run) / s_run
        tl.store(FGO + k * N + offs, fgv.to(FGO.dtype.element_ty), mask=mp)
    if MAPS == 1:
        inv = 1.0 / s_run
        for cs in range(0, C, BLOCK_C):
            oc = cs + tl.arange(0, BLOCK_C)
            mc = (oc < C)[None, :]
            cc = oc[None, :].to(tl.int64) * s_c
            v = _tile(base, cc, mc, mp, RI, RW, CI, CW, rb, cb, s_h, s_w, NTAPS, ACC, BLOCK_P,
                      BLOCK_C)
            p = tl.exp(v - m_run[:, None]) * inv[:, None]
            o = (k * C + oc[None, :].to(tl.int64)) * N + offs[:, None]
            tl.store(MAP + o, p.to(MAP.dtype.element_ty), mask=mp[:, None] & mc)


def parse_postprocess(logits: torch.Tensor, affine: torch.Tensor, in_h: int, in_w: int,
                      out_h: int, out_w: int, maps: int, fg: bool, config=None):
    """(labels, maps, fg) of ``lipfast::parse_postprocess`` (arguments assumed
    checked: lipfast.ops.parse_postprocess does it); ``config`` (dict) forces a
    configuration."""
    k, c, h, w = logits.shape
    dev = logits.device
    labels = torch.empty((k, out_h, out_w), dtype=torch.uint8, device=dev)
    out_maps = (torch.empty((k, c, out_h, out_w), dtype=logits.dtype, device=dev) if maps
                else logits.new_empty((0,)))
    out_fg = (torch.empty((k, out_h, out_w), dtype=logits.dtype, device=dev) if fg
              else logits.new_empty((0,)))
    n = out_h * out_w
    if k == 0:
        return labels, out_maps, out_fg
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    aff = affine.to(torch.float64)
    ys = torch.arange(out_h, dtype=torch.float64, device=dev)
    xs = torch.arange(out_w, dtype=torch.float64, device=dev)
    ri, rw = composite_taps(aff[:, 2:3] * ys + aff[:, 3:4], in_h, h, acc)
    ci, cw = composite_taps(aff[:, 0:1] * xs + aff[:, 1:2], in_w, w, acc)
    map_arg = out_maps if maps else labels
    fg_arg = out_fg if fg else labels

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_P"]), k)

    s = logits.stride()
    _tuning.launch("parse_postprocess", grid, (
        logits, ri, rw, ci, cw, labels, map_arg, fg_arg, s[0], s[1], s[2], s[3],
        c, out_h, out_w, n, 16, _tuning.bucket(c), _tuning.bucket(n)),
        dict(MAPS=int(maps), FG=bool(fg), ACC=_acc_tl(logits)), config)
    return labels, out_maps, out_fg
