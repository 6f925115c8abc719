"""Triton kernels of ``lipfast::oc_attention`` (forward and backward).

Flash-style single-head attention with query == key (OCNet), read and written in
place in the B x C x H x W layout through strides (no permute or copy), over
rectangular regions of the map (one region: plain attention; s x s regions:
Pyramid-OC's block-diagonal attention, all regions and images in one launch).

Work is cut into tiles of one region: an int32 table lists (region, first
position) per tile for each tile size of TILE_BLOCKS (concatenated; a small
directory gives the first row of each size, so the tile size can be chosen by
the autotuner after the tables are made), a second one (row0, col0, rows, cols)
per region; position t of a region is (row0 + t // cols, col0 + t % cols).

- forward, per (query tile, image, value pass): online softmax over the region's
  key tiles; writes the output block and, once, the per-query log-sum-exp
  (natural log). The N x N matrix never leaves registers. A program keeps the
  whole value width (padded to a power of two) for dv <= 256 (one pass: the
  score block is computed once per (query tile, key tile)); wider values take
  dv_p / 256 passes (two for dv = 512), each recomputing the score block.
- backward, with Delta_i = sum_c dO_ic O_ic (computed in torch), two kernels as
  the deterministic flash-attention backward:
  * dV kernel, per (key tile, image, value pass): dV_j = sum_i P_ij dO_i; one
    pass for dv <= 256 (score block once), dv_p / 256 passes beyond;
  * dX kernel, per (tile, image, key-width pass): because query and key are
    the same tensor X, dX_i = scale * sum_j (dS_ij + dS_ji) X_j with
    dS_ij = P_ij (dO_i . V_j - Delta_i); both terms come from one score block
    S_ij = X_i . X_j (shared loads, one output product); one pass for
    dk <= 256.
  Per (tile pair) that is S twice (dV, dX), dP twice (dO_i.V_j, dO_j.V_i), dV and
  dX: 6 (dk + dv) N^2 FLOPs against the 5 (dk + dv) N^2 of the five products a
  backward needs (1.2x), see :func:`executed_flops` / :func:`needed_flops`.
Score and dot-product blocks loop over channel chunks of BLOCK_D, so key and
value widths up to 512 (and beyond) work without large register tiles.

Configurations (``lipfast.kernels._tuning``; kernel names ``oc_attention.fwd``,
``oc_attention.bwd_dv``, ``oc_attention.bwd_dx``): BLOCK_M (query tile),
BLOCK_N (key tile), DV_SPLIT / DK_SPLIT (passes over the value / key width:
fixed by the width rule above), num_warps, num_stages; BLOCK_D (channel chunk)
is min(64, dk padded). Autotuning key: power-of-two buckets of the largest
region's size, dk, dv and the region count, PREC and the dtypes. Pruned by
an estimate of registers per thread (accumulators, score blocks, operand
tiles) and shared memory (pipelined operand tiles) against the device limits.
Pin one with ``LIPFAST_TRITON_CONFIG="oc_attention.fwd:BLOCK_M=64,BLOCK_N=64,num_warps=4"``,
``lipfast.kernels.pin_config`` or ``LIPFAST_TRITON_AUTOTUNE=0`` (defaults).

Precision: float16/bfloat16 inputs with float32 accumulation; float32 inputs
use full-precision products by default and TF32 tensor-core products when
``torch.backends.cuda.matmul.allow_tf32`` is True (as for PyTorch's matmuls). float64 is supported (used under
TRITON_INTERPRET=1 in the tests; on a GPU float64 goes to the PyTorch path).
"""

from __future__ import annotations


import math

import torch
import triton
import triton.language as tl

from . import _tuning

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_tables: dict = {}
TILE_BLOCKS = (16, 32, 64, 128, 256)  # tile sizes the tables cover (BLOCK_M / BLOCK_N)
MAX_WIDTH = 256  # widest value / key block one program keeps (wider: several passes)


def region_tables(h: int, w: int, regions: int, device):
    """(regions R x 4: row0, col0, rows, cols; tiles: for each tile size b of
    TILE_BLOCKS the rows (region, first position) of its tiles, concatenated;
    directory (int32, entry b // 16: the first row of size b's tiles);
    {b: number of tiles of size b}; [region sizes])."""
    key = (h, w, regions, str(device))
    hit = _tables.get(key)
    if hit is not None:
        return hit
    from ._regions import pyramid_regions

    regs, sizes, tiles, counts = [], [], [], {}
    directory = [0] * (TILE_BLOCKS[-1] // 16 + 1)
    for r0, r1, c0, c1 in pyramid_regions(h, w, regions):
        regs.append((r0, c0, r1 - r0, c1 - c0))
        sizes.append((r1 - r0) * (c1 - c0))
    for blk in TILE_BLOCKS:
        directory[blk // 16] = len(tiles)
        for idx, n in enumerate(sizes):
            tiles.extend((idx, t) for t in range(0, n, blk))
        counts[blk] = len(tiles) - directory[blk // 16]
    out = (
        torch.tensor(regs, dtype=torch.int32, device=device).reshape(-1, 4),
        torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, 2),
        torch.tensor(directory, dtype=torch.int32, device=device),
        counts,
        sizes,
    )
    _tables[key] = out
    return out


@triton.jit
def _region(regions, r):
    """(row0, col0, cols, size) of region r."""
    h0 = tl.load(regions + 4 * r)
    w0 = tl.load(regions + 4 * r + 1)
    rh = tl.load(regions + 4 * r + 2)
    rw = tl.load(regions + 4 * r + 3)
    return h0, w0, rw, rh * rw


@triton.jit
def _positions(h0, w0, rw, n_r, start, BLOCK: tl.constexpr):
    """Rows, columns and validity mask of positions start .. start + BLOCK of a region."""
    offs = start + tl.arange(0, BLOCK)
    return h0 + offs // rw, w0 + offs % rw, offs < n_r


@triton.jit
def _tile_positions(tiles, tdir, regions, tile, BLOCK: tl.constexpr):
    """The positions of one tile of size BLOCK, and its region's (row0, col0, cols, size)."""
    row = tl.load(tdir + BLOCK // 16) + tile
    r = tl.load(tiles + 2 * row)
    t0 = tl.load(tiles + 2 * row + 1)
    h0, w0, rw, n_r = _region(regions, r)
    h, w, m = _positions(h0, w0, rw, n_r, t0, BLOCK)
    return h, w, m, h0, w0, rw, n_r


@triton.jit
def _gram(A, a_base, a_sc, a_sh, a_sw, B, b_base, b_sc, b_sh, b_sw,
          hm, wm, mm, hn, wn, mn, C,
          ACC: tl.constexpr, PREC: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_M, BLOCK_N] block of sum_c A[c, m] * B[c, n] over C channels."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        a = tl.load(A + a_base + hm[:, None] * a_sh + wm[:, None] * a_sw + offs_c[None, :] * a_sc,
                    mask=mm[:, None] & mc[None, :], other=0.0)
        b = tl.load(B + b_base + hn[None, :] * b_sh + wn[None, :] * b_sw + offs_c[:, None] * b_sc,
                    mask=mc[:, None] & mn[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
    return acc


# ------------------------------------------------------------ configuration spaces

def _pad(n: int) -> int:
    """Channel width padded to a power of two >= 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def passes_for(width: int) -> int:
    """Passes over a value / key width: 1 up to MAX_WIDTH, then padded / MAX_WIDTH
    (at most 4: wider blocks beyond 1024)."""
    return min(4, max(1, _pad(width) // MAX_WIDTH))


def _tiles_space(tiles, split):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, split: s}, num_warps=w, num_stages=st)
            for s in (1, 2, 4) for bm, bn, w, st in tiles]


# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first that fits is the default.
# Chosen from ptxas runs (sm_80/sm_90, bf16, dk = dv = 64 and dk = 256, dv = 512):
# the strided loads need an address per element, so registers, not shared memory,
# bound the tiles; these tiles do not spill where the estimate below keeps them.
FWD_TILES = [(64, 64, 8, 1), (64, 64, 8, 3), (32, 64, 8, 1), (64, 32, 8, 1), (32, 32, 8, 1),
             (16, 32, 8, 1)]
DV_TILES = [(64, 64, 8, 1), (64, 64, 8, 3), (32, 64, 8, 1), (64, 32, 8, 1), (32, 32, 8, 1),
            (16, 64, 8, 1), (16, 32, 8, 1)]
DX_TILES = [(32, 64, 8, 1), (32, 32, 8, 1), (16, 64, 8, 1), (16, 32, 8, 1)]
FWD_CONFIGS = _tiles_space(FWD_TILES, "DV_SPLIT")
DV_CONFIGS = _tiles_space(DV_TILES, "DV_SPLIT")
DX_CONFIGS = _tiles_space(DX_TILES, "DK_SPLIT")
KEY = ["N_B", "DK_B", "DV_B", "R_B", "PREC"]
_BUCKETS = ["N_B", "DK_B", "DV_B", "R_B"]


def _es(args) -> int:
    return min(4, _tuning.elem_size(args["QK"]))  # float64 (interpreter only) costed as float32


def _valid_split(width_key, split_key):
    def valid(kw, warps, args):
        return kw[split_key] == passes_for(args[width_key])
    return valid


def _regs(pressure, budget, es):
    """Registers per thread from a tile-element pressure (elements per thread of
    the tiles that hold an address or a value per element): ``budget`` is the
    pressure at which ptxas reaches 255 registers for 2-byte inputs (calibrated on
    sm_80 and sm_90); 4-byte inputs count a third more."""
    return int(255 * pressure * (4 + es) / (6 * budget))


def _smem(kw, stages, rows, bd, wide, es):
    """Shared memory: pipelined operand tiles of the gram and the wide operand,
    and a float32 [BM, BN] layout conversion."""
    bm, bn = kw["BLOCK_M"], kw["BLOCK_N"]
    return max(1, stages) * ((bm + bn) * bd + rows * wide) * es + bm * bn * 4


def _res_fwd(kw, warps, stages, args):
    """Pressure: the query and key tiles times (value block + channel chunk)
    (accumulator, V tile, gram tiles)."""
    bm, bn, bd = kw["BLOCK_M"], kw["BLOCK_N"], args["BLOCK_D"]
    bdv = args["DV_P"] // kw["DV_SPLIT"]
    es = _es(args)
    regs = _regs((bm + bn) * (bdv + bd) / (32 * warps), 72, es)
    return regs, _smem(kw, stages, bn, bd, bdv, es)


def _res_dv(kw, warps, stages, args):
    """Pressure: (2 BM + BN) (value block + channel chunk): the dO and query
    tiles weigh twice."""
    bm, bn, bd = kw["BLOCK_M"], kw["BLOCK_N"], args["BLOCK_D"]
    bdv = args["DV_P"] // kw["DV_SPLIT"]
    es = _es(args)
    regs = _regs((2 * bm + bn) * (bdv + bd) / (32 * warps), 125, es)
    return regs, _smem(kw, stages, bm, bd, bdv, es)


def _res_dx(kw, warps, stages, args):
    """Pressure: (2 BM + BN) (key block + channel chunk) plus two [BM, BN] blocks
    (of the five: S, dP_q, dP_k, P, dS)."""
    bm, bn, bd = kw["BLOCK_M"], kw["BLOCK_N"], args["BLOCK_D"]
    bdo = args["DK_P"] // kw["DK_SPLIT"]
    es = _es(args)
    regs = _regs(((2 * bm + bn) * (bdo + bd) + 2 * bm * bn) / (32 * warps), 90, es)
    return regs, _smem(kw, stages, bn, bd, bdo, es)


@_tuning.autotuned("oc_attention.fwd", FWD_CONFIGS, KEY, _valid_split("DV_P", "DV_SPLIT"),
                   _res_fwd)
@triton.jit(do_not_specialize=_BUCKETS)
def _fwd_kernel(QK, V, O, LSE, tiles, tdir, regions, scale_log2,
                q_sb, q_sc, q_sh, q_sw, v_sb, v_sc, v_sh, v_sw, o_sb, o_sc, o_sh, o_sw,
                W, N, DK, DV, N_B, DK_B, DV_B, R_B,
                ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, DV_P: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DV_SPLIT: tl.constexpr):
    BLOCK_DV: tl.constexpr = DV_P // DV_SPLIT
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pdv = tl.program_id(2)
    hm, wm, mm, h0, w0, rw, n_r = _tile_positions(tiles, tdir, regions, tile, BLOCK_M)
    offs_v = pdv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mv = offs_v < DV
    q_base = b * q_sb
    v_base = b * v_sb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for n0 in range(0, n_r, BLOCK_N):
        hn, wn, mn = _positions(h0, w0, rw, n_r, n0, BLOCK_N)
        s = _gram(QK, q_base, q_sc, q_sh, q_sw, QK, q_base, q_sc, q_sh, q_sw,
                  hm, wm, mm, hn, wn, mn, DK, ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
        s = tl.where(mn[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + v_base + hn[:, None] * v_sh + wn[:, None] * v_sw + offs_v[None, :] * v_sc,
                     mask=mn[:, None] & mv[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * o_sb + hm[:, None] * o_sh + wm[:, None] * o_sw + offs_v[None, :] * o_sc,
             acc.to(O.dtype.element_ty), mask=mm[:, None] & mv[None, :])
    if pdv == 0:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(LSE + b * N + hm * W + wm, lse.to(LSE.dtype.element_ty), mask=mm)


@_tuning.autotuned("oc_attention.bwd_dv", DV_CONFIGS, KEY, _valid_split("DV_P", "DV_SPLIT"),
                   _res_dv)
@triton.jit(do_not_specialize=_BUCKETS)
def _bwd_dv_kernel(QK, DO, LSE, DVo, tiles, tdir, regions, scale_log2,
                   q_sb, q_sc, q_sh, q_sw, d_sb, d_sc, d_sh, d_sw, g_sb, g_sc, g_sh, g_sw,
                   W, N, DK, DV, N_B, DK_B, DV_B, R_B,
                   ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                   DV_P: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DV_SPLIT: tl.constexpr):
    BLOCK_DV: tl.constexpr = DV_P // DV_SPLIT
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pdv = tl.program_id(2)
    hn, wn, mn, h0, w0, rw, n_r = _tile_positions(tiles, tdir, regions, tile, BLOCK_N)  # keys
    offs_v = pdv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mv = offs_v < DV
    q_base = b * q_sb
    d_base = b * d_sb
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for m0 in range(0, n_r, BLOCK_M):
        hm, wm, mm = _positions(h0, w0, rw, n_r, m0, BLOCK_M)
        s = _gram(QK, q_base, q_sc, q_sh, q_sw, QK, q_base, q_sc, q_sh, q_sw,
                  hm, wm, mm, hn, wn, mn, DK, ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
        lse = tl.load(LSE + b * N + hm * W + wm, mask=mm, other=0.0).to(ACC) * 1.4426950408889634
        p = tl.exp2(s * scale_log2 - lse[:, None])
        p = tl.where(mm[:, None] & mn[None, :], p, 0.0)
        do = tl.load(DO + d_base + hm[:, None] * d_sh + wm[:, None] * d_sw + offs_v[None, :] * d_sc,
                     mask=mm[:, None] & mv[None, :], other=0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC, out_dtype=ACC)
    tl.store(DVo + b * g_sb + hn[:, None] * g_sh + wn[:, None] * g_sw + offs_v[None, :] * g_sc,
             dv.to(DVo.dtype.element_ty), mask=mn[:, None] & mv[None, :])


@_tuning.autotuned("oc_attention.bwd_dx", DX_CONFIGS, KEY, _valid_split("DK_P", "DK_SPLIT"),
                   _res_dx)
@triton.jit(do_not_specialize=_BUCKETS)
def _bwd_dx_kernel(QK, V, DO, LSE, DELTA, DX, tiles, tdir, regions, scale, scale_log2,
                   q_sb, q_sc, q_sh, q_sw, v_sb, v_sc, v_sh, v_sw, d_sb, d_sc, d_sh, d_sw,
                   x_sb, x_sc, x_sh, x_sw,
                   W, N, DK, DV, N_B, DK_B, DV_B, R_B,
                   ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                   DK_P: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK_SPLIT: tl.constexpr):
    BLOCK_DO: tl.constexpr = DK_P // DK_SPLIT
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pdo = tl.program_id(2)
    hm, wm, mm, h0, w0, rw, n_r = _tile_positions(tiles, tdir, regions, tile, BLOCK_M)
    offs_o = pdo * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mo = offs_o < DK
    q_base = b * q_sb
    v_base = b * v_sb
    d_base = b * d_sb
    lse_i = tl.load(LSE + b * N + hm * W + wm, mask=mm, other=0.0).to(ACC) * 1.4426950408889634
    delta_i = tl.load(DELTA + b * N + hm * W + wm, mask=mm, other=0.0).to(ACC)
    dx = tl.zeros([BLOCK_M, BLOCK_DO], dtype=ACC)
    for n0 in range(0, n_r, BLOCK_N):
        hn, wn, mn = _positions(h0, w0, rw, n_r, n0, BLOCK_N)
        valid = mm[:, None] & mn[None, :]
        s = _gram(QK, q_base, q_sc, q_sh, q_sw, QK, q_base, q_sc, q_sh, q_sw,
                  hm, wm, mm, hn, wn, mn, DK, ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_D) * scale_log2
        lse_j = tl.load(LSE + b * N + hn * W + wn, mask=mn, other=0.0).to(ACC) * 1.4426950408889634
        delta_j = tl.load(DELTA + b * N + hn * W + wn, mask=mn, other=0.0).to(ACC)
        # i as query: P_ij, dP_ij = dO_i . V_j ; i as key: P_ji, dP_ji = dO_j . V_i
        dp_q = _gram(DO, d_base, d_sc, d_sh, d_sw, V, v_base, v_sc, v_sh, v_sw,
                     hm, wm, mm, hn, wn, mn, DV, ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
        dp_k = _gram(V, v_base, v_sc, v_sh, v_sw, DO, d_base, d_sc, d_sh, d_sw,
                     hm, wm, mm, hn, wn, mn, DV, ACC, PREC, BLOCK_M, BLOCK_N, BLOCK_D)
        p_q = tl.exp2(s - lse_i[:, None])
        p_k = tl.exp2(s - lse_j[None, :])
        ds = p_q * (dp_q - delta_i[:, None]) + p_k * (dp_k - delta_j[None, :])
        ds = tl.where(valid, ds, 0.0)
        xj = tl.load(QK + q_base + hn[:, None] * q_sh + wn[:, None] * q_sw + offs_o[None, :] * q_sc,
                     mask=mn[:, None] & mo[None, :], other=0.0)
        dx += tl.dot(ds.to(xj.dtype), xj, input_precision=PREC, out_dtype=ACC)
    dx = dx * scale
    tl.store(DX + b * x_sb + hm[:, None] * x_sh + wm[:, None] * x_sw + offs_o[None, :] * x_sc,
             dx.to(DX.dtype.element_ty), mask=mm[:, None] & mo[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for float32 only when PyTorch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, off by default), else full precision."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _acc_torch(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _common(qk, dk, dv, sizes, block_d):
    """Constexprs and autotuning buckets shared by the three kernels."""
    acc = tl.float64 if qk.dtype == torch.float64 else tl.float32
    consts = dict(ACC=acc, PREC=dot_precision(qk.dtype),
                  BLOCK_D=block_d or min(64, _pad(dk)))
    buckets = (_tuning.bucket(max(sizes), 16), _pad(dk), _pad(dv), _tuning.bucket(len(sizes)))
    return consts, buckets


def _explicit(config, **blocks):
    out = dict(config or {})
    out.update({k: v for k, v in blocks.items() if v is not None})
    return out


def _sub(config, name):
    """The part of ``config`` for kernel ``name``: config[name] when config is keyed
    by kernel name (``{"fwd": {...}, "bwd_dv": {...}}``), else config itself."""
    if not config:
        return {}
    if any(k in config for k in ("fwd", "bwd_dv", "bwd_dx")):
        return dict(config.get(name) or {})
    return dict(config)


def forward(qk, v, scale, regions, block_m=None, block_n=None, block_d=None, config=None):
    """(out B x Cv x H x W, lse B x H*W) of OC attention; see the module docstring.
    ``config`` (dict of meta-parameters) or block_m/block_n force a configuration."""
    b, dk, h, w = qk.shape
    dv = v.shape[1]
    n = h * w
    out = torch.empty((b, dv, h, w), dtype=v.dtype, device=v.device)
    lse = torch.empty((b, n), dtype=_acc_torch(qk), device=qk.device)
    if b == 0 or n == 0:
        return out, lse
    regs, tiles, tdir, counts, sizes = region_tables(h, w, regions, qk.device)
    consts, buckets = _common(qk, dk, dv, sizes, block_d)
    consts["DV_P"] = _pad(dv)
    cfg = _explicit(_sub(config, "fwd"), BLOCK_M=block_m, BLOCK_N=block_n)

    def grid(meta):
        return (counts[meta["BLOCK_M"]], b, triton.cdiv(dv, meta["DV_P"] // meta["DV_SPLIT"]))

    _tuning.launch("oc_attention.fwd", grid, (
        qk, v, out, lse, tiles, tdir, regs, float(scale) * LOG2E,
        *qk.stride(), *v.stride(), *out.stride(), w, n, dk, dv, *buckets), consts, cfg)
    return out, lse


def backward(dout, qk, v, out, lse, scale, regions, block_m=None, block_n=None, block_d=None,
             config=None):
    """(dqk, dv) of OC attention. ``config``: one dict for both kernels or
    ``{"bwd_dv": {...}, "bwd_dx": {...}}``."""
    b, dk, h, w = qk.shape
    dv_ch = v.shape[1]
    n = h * w
    dqk = torch.empty_like(qk, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if b == 0 or n == 0:
        return dqk.zero_(), dv.zero_()
    at = _acc_torch(qk)
    delta = (dout.to(at) * out.to(at)).sum(1).reshape(b, n).contiguous()
    regs, tiles, tdir, counts, sizes = region_tables(h, w, regions, qk.device)
    consts, buckets = _common(qk, dk, dv_ch, sizes, block_d)

    def grid_dv(meta):
        return (counts[meta["BLOCK_N"]], b, triton.cdiv(dv_ch, meta["DV_P"] // meta["DV_SPLIT"]))

    _tuning.launch("oc_attention.bwd_dv", grid_dv, (
        qk, dout, lse, dv, tiles, tdir, regs, float(scale) * LOG2E,
        *qk.stride(), *dout.stride(), *dv.stride(), w, n, dk, dv_ch, *buckets),
        dict(consts, DV_P=_pad(dv_ch)),
        _explicit(_sub(config, "bwd_dv"), BLOCK_M=block_m, BLOCK_N=block_n))

    def grid_dx(meta):
        return (counts[meta["BLOCK_M"]], b, triton.cdiv(dk, meta["DK_P"] // meta["DK_SPLIT"]))

    _tuning.launch("oc_attention.bwd_dx", grid_dx, (
        qk, v, dout, lse, delta, dqk, tiles, tdir, regs, float(scale), float(scale) * LOG2E,
        *qk.stride(), *v.stride(), *dout.stride(), *dqk.stride(), w, n, dk, dv_ch, *buckets),
        dict(consts, DK_P=_pad(dk)),
        _explicit(_sub(config, "bwd_dx"), BLOCK_M=block_m, BLOCK_N=block_n))
    return dqk, dv


# -------------------------------------------------------------------------- FLOPs

def _region_sizes(n, regions):
    """Region sizes for ``n`` positions (an int: a square map when regions > 1; or an (h, w) pair)
    and ``regions`` (None/0/1: one region; s: OCNet's s x s pyramid regions; or a
    sequence of region sizes)."""
    if regions is not None and not isinstance(regions, int):
        return [int(r) for r in regions]
    if isinstance(n, (tuple, list)):
        h, w = (int(x) for x in n)
    else:
        h = w = math.isqrt(int(n))
    if not regions or regions == 1:
        return [int(n) if not isinstance(n, (tuple, list)) else h * w]
    if h * w != (int(n) if not isinstance(n, (tuple, list)) else h * w):
        raise ValueError(f"pyramid regions of {n} positions: not a square map, pass n as (h, w)")
    from ._regions import pyramid_regions as _pr

    return [(r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in _pr(h, w, regions)]


def needed_flops(batch, n, dk, dv, regions=None, backward=False) -> int:
    """FLOPs of attention itself: forward 2 B sum_r n_r^2 (dk + dv) (the score and
    output products; one region: 2 B N^2 (dk + dv)); backward 2.5x that (the five
    products of a backward: S, dP, dV, dQ, dK)."""
    f = 2 * int(batch) * sum(r * r for r in _region_sizes(n, regions)) * (int(dk) + int(dv))
    return int(f * 5 // 2) if backward else int(f)


def default_configs(dk, dv, dtype=torch.bfloat16, limits=None) -> dict:
    """{"fwd" | "bwd_dv" | "bwd_dx": the default configuration (kwargs with num_warps,
    num_stages)} for these widths under ``limits`` (sm_90's by default)."""
    limits = limits or _tuning.LIMITS[90]
    dummy = torch.empty(0, dtype=dtype)
    bd = min(64, _pad(dk))
    out = {}
    for key, name, extra in (("fwd", "oc_attention.fwd", dict(DV_P=_pad(dv))),
                             ("bwd_dv", "oc_attention.bwd_dv", dict(DV_P=_pad(dv))),
                             ("bwd_dx", "oc_attention.bwd_dx", dict(DK_P=_pad(dk)))):
        spec = _tuning.SPECS[name]
        cfg = _tuning.prune(spec, spec.configs, dict(QK=dummy, BLOCK_D=bd, **extra), limits)[0]
        out[key] = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def executed_flops(batch, n, dk, dv, regions=None, backward=False, config=None) -> int:
    """FLOPs the kernels execute (tensor-core products, padding of tiles and
    channel chunks and recomputation counted) for ``config``: None (the default
    configuration of each kernel for sm_90 bf16), one dict for all kernels or
    ``{"fwd": {...}, "bwd_dv": {...}, "bwd_dx": {...}}`` (keys BLOCK_M, BLOCK_N,
    BLOCK_D; pass counts follow the width rule). Forward: per pass over the value
    width, the score block and the output product; backward: the dV kernel (score
    block and P^T dO per value pass) and the dX kernel (score block, two dP blocks
    and dS X per key-width pass)."""
    dk, dv, batch = int(dk), int(dv), int(batch)
    cfgs = default_configs(dk, dv)
    for key in cfgs:
        cfgs[key].update(_sub(config, key))
    sizes = _region_sizes(n, regions)

    def pad(x, blk):
        return -(-x // blk) * blk

    def pair(cfg, nr):
        return pad(nr, cfg["BLOCK_M"]) * pad(nr, cfg["BLOCK_N"])

    def width(cfg, name):
        return cfg.get("BLOCK_D", min(64, _pad(dk)))

    total = 0
    if not backward:
        c = cfgs["fwd"]
        bdv = _pad(dv) // passes_for(dv)
        p = -(-dv // bdv)
        total = sum(p * 2 * pair(c, r) * (pad(dk, width(c, "fwd")) + bdv) for r in sizes)
    else:
        c = cfgs["bwd_dv"]
        bdv = _pad(dv) // passes_for(dv)
        p = -(-dv // bdv)
        total += sum(p * 2 * pair(c, r) * (pad(dk, width(c, "dv")) + bdv) for r in sizes)
        c = cfgs["bwd_dx"]
        bdo = _pad(dk) // passes_for(dk)
        p = -(-dk // bdo)
        bd = width(c, "dx")
        total += sum(p * 2 * pair(c, r) * (pad(dk, bd) + 2 * pad(dv, bd) + bdo) for r in sizes)
    return int(batch * total)
