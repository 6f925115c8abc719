"""Triton kernels of ``lipfast::oc_attention`` (forward and backward).

Flash-style single-head attention with query == key (OCNet), read and written in
place in the B x C x H x W layout through strides (no permute or copy), over
rectangular regions of the map (one region: plain attention; s x s regions:
Pyramid-OC's block-diagonal attention, all regions and images in one launch).

Work is cut into tiles of one region: a small int32 table lists (region, first
position) per tile, a second one (row0, col0, rows, cols) per region; position
t of a region is (row0 + t // cols, col0 + t % cols).

- forward: per (query tile, image, value-channel block): online softmax over the
  region's key tiles; writes the output block and, once, the per-query
  log-sum-exp (natural log). The N x N matrix never leaves registers.
- backward, with Delta_i = sum_c dO_ic O_ic (computed in torch):
  * dV kernel, per (key tile, image, value block): dV_j = sum_i P_ij dO_i.
  * dX kernel, per (tile, image, key-channel block): because query and key are
    the same tensor X, dX_i = scale * sum_j (dS_ij + dS_ji) X_j with
    dS_ij = P_ij (dO_i . V_j - Delta_i); both terms come from one score block
    S_ij = X_i . X_j (shared loads, one output product).
Score and dot-product blocks loop over channel chunks, so key and value widths
up to 512 (and beyond) work without large register tiles.

Precision: float16/bfloat16 inputs with float32 accumulation; float32 inputs
use full-precision products by default and TF32 tensor-core products when
``torch.backends.cuda.matmul.allow_tf32`` is True (as for PyTorch's matmuls). float64 is supported (used under
TRITON_INTERPRET=1 in the tests; on a GPU float64 goes to the PyTorch path).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_tables: dict = {}


def region_tables(h: int, w: int, regions: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(regions table R x 4: row0, col0, rows, cols; tiles table T x 2: region, first)."""
    key = (h, w, regions, block, str(device))
    hit = _tables.get(key)
    if hit is not None:
        return hit
    from ._regions import pyramid_regions

    regs, tiles = [], []
    for idx, (r0, r1, c0, c1) in enumerate(pyramid_regions(h, w, regions)):
        regs.append((r0, c0, r1 - r0, c1 - c0))
        n = (r1 - r0) * (c1 - c0)
        tiles.extend((idx, t) for t in range(0, n, block))
    out = (
        torch.tensor(regs, dtype=torch.int32, device=device).reshape(-1, 4),
        torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, 2),
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
def _tile_positions(tiles, regions, tile, BLOCK: tl.constexpr):
    """The positions of one tile, and its region's (row0, col0, cols, size)."""
    r = tl.load(tiles + 2 * tile)
    t0 = tl.load(tiles + 2 * tile + 1)
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


@triton.jit
def _fwd_kernel(QK, V, O, LSE, tiles, regions, scale_log2,
                q_sb, q_sc, q_sh, q_sw, v_sb, v_sc, v_sh, v_sw, o_sb, o_sc, o_sh, o_sw,
                W, N, DK, DV,
                ACC: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pdv = tl.program_id(2)
    hm, wm, mm, h0, w0, rw, n_r = _tile_positions(tiles, regions, tile, BLOCK_M)
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


@triton.jit
def _bwd_dv_kernel(QK, DO, LSE, DVo, tiles, regions, scale_log2,
                   q_sb, q_sc, q_sh, q_sw, d_sb, d_sc, d_sh, d_sw, g_sb, g_sc, g_sh, g_sw,
                   W, N, DK, DV,
                   ACC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pdv = tl.program_id(2)
    hn, wn, mn, h0, w0, rw, n_r = _tile_positions(tiles, regions, tile, BLOCK_N)  # keys
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


@triton.jit
def _bwd_dx_kernel(QK, V, DO, LSE, DELTA, DX, tiles, regions, scale, scale_log2,
                   q_sb, q_sc, q_sh, q_sw, v_sb, v_sc, v_sh, v_sw, d_sb, d_sc, d_sh, d_sw,
                   x_sb, x_sc, x_sh, x_sw,
                   W, N, DK, DV,
                   ACC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pdo = tl.program_id(2)
    hm, wm, mm, h0, w0, rw, n_r = _tile_positions(tiles, regions, tile, BLOCK_M)
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


def _config(qk: torch.Tensor, dk: int, dv: int, block_m, block_n, block_d):
    """Tile sizes and precision. Blocks are powers of two >= 16 (tl.dot's minimum)."""
    acc = tl.float64 if qk.dtype == torch.float64 else tl.float32
    prec = dot_precision(qk.dtype)
    bm = block_m or 64
    bn = block_n or 64
    bd = block_d or min(64, max(16, triton.next_power_of_2(dk)))
    bdv = min(128, max(16, triton.next_power_of_2(dv)))
    bdo = min(128, max(16, triton.next_power_of_2(dk)))
    return acc, prec, bm, bn, bd, bdv, bdo


def _acc_torch(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def forward(qk, v, scale, regions, block_m=None, block_n=None, block_d=None):
    """(out B x Cv x H x W, lse B x H*W) of OC attention; see the module docstring."""
    b, dk, h, w = qk.shape
    dv = v.shape[1]
    n = h * w
    acc, prec, bm, bn, bd, bdv, _ = _config(qk, dk, dv, block_m, block_n, block_d)
    out = torch.empty((b, dv, h, w), dtype=v.dtype, device=v.device)
    lse = torch.empty((b, n), dtype=_acc_torch(qk), device=qk.device)
    if b == 0 or n == 0:
        return out, lse
    regs, tiles = region_tables(h, w, regions, bm, qk.device)
    grid = (tiles.shape[0], b, triton.cdiv(dv, bdv))
    _fwd_kernel[grid](
        qk, v, out, lse, tiles, regs, float(scale) * LOG2E,
        *qk.stride(), *v.stride(), *out.stride(),
        w, n, dk, dv,
        ACC=acc, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv,
    )
    return out, lse


def backward(dout, qk, v, out, lse, scale, regions, block_m=None, block_n=None, block_d=None):
    """(dqk, dv) of OC attention."""
    b, dk, h, w = qk.shape
    dv_ch = v.shape[1]
    n = h * w
    acc, prec, bm, bn, bd, bdv, bdo = _config(qk, dk, dv_ch, block_m, block_n, block_d)
    dqk = torch.empty_like(qk, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if b == 0 or n == 0:
        return dqk.zero_(), dv.zero_()
    at = _acc_torch(qk)
    delta = (dout.to(at) * out.to(at)).sum(1).reshape(b, n).contiguous()
    regs, tiles_n = region_tables(h, w, regions, bn, qk.device)
    _bwd_dv_kernel[(tiles_n.shape[0], b, triton.cdiv(dv_ch, bdv))](
        qk, dout, lse, dv, tiles_n, regs, float(scale) * LOG2E,
        *qk.stride(), *dout.stride(), *dv.stride(),
        w, n, dk, dv_ch,
        ACC=acc, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv,
    )
    regs, tiles_m = region_tables(h, w, regions, bm, qk.device)
    _bwd_dx_kernel[(tiles_m.shape[0], b, triton.cdiv(dk, bdo))](
        qk, v, dout, lse, delta, dqk, tiles_m, regs, float(scale), float(scale) * LOG2E,
        *qk.stride(), *v.stride(), *dout.stride(), *dqk.stride(),
        w, n, dk, dv_ch,
        ACC=acc, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DO=bdo,
    )
    return dqk, dv
