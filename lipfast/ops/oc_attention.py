"""OCNet object-context attention as one op: ``lipfast.ops.oc_attention``.

Single-head, non-causal softmax attention in which query and key are the same
tensor (OCNet's shared ``f_key``/``f_query`` projection), read straight from the
B x C x H x W projections: ``out[b, :, n] = sum_m softmax_m(scale * <x_n, x_m>) v[b, :, m]``
with ``x = qk[b, :, :]`` flattened over H x W. ``regions=s`` restricts
attention to the s x s pyramid regions of Pyramid-OC (block-diagonal attention
over regions of unequal size: step = H // s rows each, the last row/column of
regions absorbing the remainder), all regions of all images in one call.

Registered ops (``torch.library.custom_op``):

- ``lipfast::oc_attention(qk, v, scale, regions) -> (out, lse)``: ``out`` is
  B x Cv x H x W in ``v``'s dtype, ``lse`` the float32 per-query log-sum-exp
  (B x H*W), the only thing saved besides the inputs and ``out``.
- ``lipfast::oc_attention_backward(dout, qk, v, out, lse, scale, regions) -> (dqk, dv)``.

Kernels: on CUDA the Triton kernels of :mod:`lipfast.kernels.oc_attention`
(flash-style: online softmax, the N x N matrix never stored); on CPU ATen's
tiled flash-attention kernel, regions batched by size (``_flash_cpu_*``); a tiled
PyTorch path (``_cpu_forward`` / ``_cpu_backward``, O(N * d + tile) memory) for
float64 on CUDA and torch builds without the CPU flash kernel. Autograd:
``torch.library.register_autograd``; fake kernels for ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..kernels._regions import pyramid_regions

# Scores per CPU tile, over the whole batch: a tile holds B x rows x n scores
# (16 MiB in float32), so memory stays O(N * d) plus a bounded tile.
_CPU_TILE_ELEMS = 1 << 22


def check_oc_attention_args(qk: torch.Tensor, v: torch.Tensor, scale: float, regions: int) -> None:
    if not isinstance(qk, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError("oc_attention expects tensors for qk and v")
    if qk.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"oc_attention expects B x C x H x W tensors, got qk {tuple(qk.shape)} and "
            f"v {tuple(v.shape)}"
        )
    if qk.shape[0] != v.shape[0] or qk.shape[2:] != v.shape[2:]:
        raise ValueError(
            f"oc_attention: qk {tuple(qk.shape)} and v {tuple(v.shape)} must share batch and "
            "spatial size"
        )
    if qk.device != v.device:
        raise ValueError(f"oc_attention: qk is on {qk.device} but v is on {v.device}")
    if qk.dtype != v.dtype:
        raise TypeError(f"oc_attention: qk has dtype {qk.dtype} but v has dtype {v.dtype}")
    if not qk.is_floating_point():
        raise TypeError(f"oc_attention expects floating-point inputs, got {qk.dtype}")
    if qk.shape[1] == 0 or v.shape[1] == 0:
        raise ValueError("oc_attention: key and value channel counts must be positive")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"oc_attention: scale must be a positive finite number, got {scale}")
    h, w = qk.shape[2], qk.shape[3]
    if regions < 0:
        raise ValueError(f"oc_attention: regions must be >= 0, got {regions}")
    if regions > 1 and (regions > h or regions > w):
        raise ValueError(
            f"oc_attention: {regions} x {regions} pyramid regions do not fit a {h} x {w} map "
            "(the pyramid scale must not exceed the map's height or width)"
        )


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _region_views(t: torch.Tensor, reg):
    """B x n x C (float accumulation dtype) of one region of a B x C x H x W tensor."""
    r0, r1, c0, c1 = reg
    return t[:, :, r0:r1, c0:c1].flatten(2).transpose(1, 2).to(_acc_dtype(t))


def _tile_rows(batch: int, n: int) -> int:
    return max(1, min(n, _CPU_TILE_ELEMS // max(1, batch * n)))


def _softmax_with_lse(s: torch.Tensor):
    """(softmax over the last axis, its log-sum-exp). The fused softmax does the
    work; the log-sum-exp is read off each row's largest probability
    (lse_i = s_ij - log p_ij at j = argmax, where p_ij >= 1 / n keeps it exact)."""
    p = torch.softmax(s, dim=-1)
    pmax, idx = p.max(dim=-1, keepdim=True)
    lse = (s.gather(-1, idx) - pmax.log()).squeeze(-1)
    return p, lse


def _cpu_forward(qk, v, scale, regions):
    """PyTorch path (CPU, and float64 on CUDA): per region, query tiles of at most
    _CPU_TILE_ELEMS scores; fused softmax; O(N * d + tile) memory."""
    b, _, h, w = qk.shape
    cv = v.shape[1]
    acc = _acc_dtype(qk)
    out = torch.empty((b, cv, h, w), dtype=v.dtype, device=v.device)
    lse = torch.empty((b, h, w), dtype=acc, device=qk.device)
    for reg in pyramid_regions(h, w, regions):  # the regions tile the whole map
        r0, r1, c0, c1 = reg
        x = _region_views(qk, reg)  # B x n x Ck
        xs = x * scale
        val = _region_views(v, reg)  # B x n x Cv
        n = x.shape[1]
        o = torch.empty((b, n, cv), dtype=acc, device=v.device)
        l = torch.empty((b, n), dtype=acc, device=v.device)
        step = _tile_rows(b, n)
        for i in range(0, n, step):
            p, l[:, i : i + step] = _softmax_with_lse(torch.bmm(xs[:, i : i + step], x.transpose(1, 2)))
            torch.bmm(p, val, out=o[:, i : i + step])
        out[:, :, r0:r1, c0:c1] = o.transpose(1, 2).reshape(b, cv, r1 - r0, c1 - c0)
        lse[:, r0:r1, c0:c1] = l.reshape(b, r1 - r0, c1 - c0)
    return out, lse.reshape(b, h * w)


def _cpu_backward(dout, qk, v, out, lse, scale, regions):
    """Backward of the PyTorch path: recomputes each tile's softmax and uses the
    fused softmax backward, dS = P * (dP - rowsum(dP * P)) with dP = dO V^T."""
    b, _, h, w = qk.shape
    dqk = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for reg in pyramid_regions(h, w, regions):
        r0, r1, c0, c1 = reg
        x, val, do = _region_views(qk, reg), _region_views(v, reg), _region_views(dout, reg)
        xs = x * scale
        n = x.shape[1]
        step = _tile_rows(b, n)
        if step >= n:
            # One tile holds the region: X is both query and key, so
            # dX = scale * (dS + dS^T) X in a single product.
            p = torch.softmax(torch.bmm(xs, x.transpose(1, 2)), dim=-1)
            dval = torch.bmm(p.transpose(1, 2), do)
            ds = torch.ops.aten._softmax_backward_data(
                torch.bmm(do, val.transpose(1, 2)), p, -1, p.dtype)
            del p
            dx = torch.bmm(ds.add_(ds.transpose(1, 2).clone()), xs)
        else:
            dx = torch.zeros_like(x)
            dval = torch.zeros_like(val)
            for i in range(0, n, step):
                p = torch.softmax(torch.bmm(xs[:, i : i + step], x.transpose(1, 2)), dim=-1)
                doi = do[:, i : i + step]
                dval += torch.bmm(p.transpose(1, 2), doi)
                ds = torch.ops.aten._softmax_backward_data(
                    torch.bmm(doi, val.transpose(1, 2)), p, -1, p.dtype)
                del p
                dx[:, i : i + step] += torch.bmm(ds, xs)  # as query
                dx += torch.bmm(ds.transpose(1, 2), xs[:, i : i + step])  # as key
        dqk[:, :, r0:r1, c0:c1] = dx.transpose(1, 2).reshape(b, -1, r1 - r0, c1 - c0)
        dv[:, :, r0:r1, c0:c1] = dval.transpose(1, 2).reshape(b, -1, r1 - r0, c1 - c0)
    return dqk, dv


_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_cpu_flash_bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                         None)


def _region_groups(h: int, w: int, regions: int):
    """The pyramid regions grouped by size: [(rows, cols, [(row0, col0), ...]), ...]
    (at most four groups), so equal-size regions run as one batched call."""
    groups: dict = {}
    for r0, r1, c0, c1 in pyramid_regions(h, w, regions):
        groups.setdefault((r1 - r0, c1 - c0), []).append((r0, c0))
    return [(rh, rw, starts) for (rh, rw), starts in groups.items()]


def _gather(t: torch.Tensor, rh: int, rw: int, starts, width: int) -> torch.Tensor:
    """B x k x (rh * rw) x width contiguous: the k regions of t (B x C x H x W) as
    'heads', channels last and zero-padded to ``width``."""
    parts = [t[:, :, r0 : r0 + rh, c0 : c0 + rw] for r0, c0 in starts]
    g = torch.stack(parts, 1).flatten(3).transpose(2, 3)  # B x k x n x C
    if g.shape[-1] < width:
        g = torch.nn.functional.pad(g, (0, width - g.shape[-1]))
    return g.contiguous()


def _scatter(dst: torch.Tensor, src: torch.Tensor, rh: int, rw: int, starts) -> None:
    """Inverse of _gather for the first dst.shape[1] channels of src."""
    b, c = dst.shape[0], dst.shape[1]
    for i, (r0, c0) in enumerate(starts):
        dst[:, :, r0 : r0 + rh, c0 : c0 + rw] = src[:, i, :, :c].transpose(1, 2).reshape(b, c, rh, rw)


def _flash_cpu_forward(qk, v, scale, regions):
    """CPU path on ATen's tiled flash-attention kernel (O(N * d) memory), one call
    per group of equal-size regions. It needs equal key and value widths, so the
    narrower of the two is zero-padded (zero key columns add nothing to the
    scores; zero value columns are dropped)."""
    b, dk, h, w = qk.shape
    dv = v.shape[1]
    width = max(dk, dv)
    out = torch.empty((b, dv, h, w), dtype=v.dtype, device=v.device)
    lse = torch.empty((b, 1, h, w), dtype=_acc_dtype(qk), device=qk.device)
    for rh, rw, starts in _region_groups(h, w, regions):
        x = _gather(qk, rh, rw, starts, width)
        o, l = _cpu_flash(x, x, _gather(v, rh, rw, starts, width), 0.0, False,
                          attn_mask=None, scale=scale)
        _scatter(out, o, rh, rw, starts)
        _scatter(lse, l.unsqueeze(-1).to(lse.dtype), rh, rw, starts)
    return out, lse.reshape(b, h * w)


def _flash_cpu_backward(dout, qk, v, out, lse, scale, regions):
    b, dk, h, w = qk.shape
    dv_ch = v.shape[1]
    width = max(dk, dv_ch)
    dqk = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    lse4 = lse.reshape(b, 1, h, w)
    for rh, rw, starts in _region_groups(h, w, regions):
        x = _gather(qk, rh, rw, starts, width)
        l = _gather(lse4, rh, rw, starts, 1).squeeze(-1)
        dq, dk_, dval = _cpu_flash_bwd(
            _gather(dout, rh, rw, starts, width), x, x, _gather(v, rh, rw, starts, width),
            _gather(out, rh, rw, starts, width), l, 0.0, False, attn_mask=None, scale=scale)
        _scatter(dqk, dq.add_(dk_), rh, rw, starts)  # X is both query and key
        _scatter(dv, dval, rh, rw, starts)
    return dqk, dv


def _cpu_impl_forward(qk, v, scale, regions):
    if _cpu_flash is not None and _cpu_flash_bwd is not None:
        return _flash_cpu_forward(qk, v, scale, regions)
    return _cpu_forward(qk, v, scale, regions)


def _cpu_impl_backward(dout, qk, v, out, lse, scale, regions):
    if _cpu_flash is not None and _cpu_flash_bwd is not None:
        return _flash_cpu_backward(dout, qk, v, out, lse, scale, regions)
    return _cpu_backward(dout, qk, v, out, lse, scale, regions)


@torch.library.custom_op("lipfast::oc_attention", mutates_args=())
def _oc_attention_op(
    qk: torch.Tensor, v: torch.Tensor, scale: float, regions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_oc_attention_args(qk, v, scale, regions)
    return _cpu_impl_forward(qk, v, scale, regions)


def _triton_kernels(t: torch.Tensor):
    """The Triton kernels for a CUDA tensor, or None for the PyTorch path (float64;
    Triton missing, with a one-time warning)."""
    from .. import kernels

    return kernels.load("oc_attention", "lipfast.oc_attention", t.dtype)


@_oc_attention_op.register_kernel("cuda")
def _oc_attention_cuda(qk, v, scale, regions):
    check_oc_attention_args(qk, v, scale, regions)
    kernels = _triton_kernels(qk)
    if kernels is None:
        return _cpu_forward(qk, v, scale, regions)
    return kernels.forward(qk, v, scale, regions)


@_oc_attention_op.register_fake
def _oc_attention_fake(qk, v, scale, regions):
    b, _, h, w = qk.shape
    out = qk.new_empty((b, v.shape[1], h, w), dtype=v.dtype)
    lse = qk.new_empty((b, h * w), dtype=_acc_dtype(qk))
    return out, lse


@torch.library.custom_op("lipfast::oc_attention_backward", mutates_args=())
def _oc_attention_backward_op(
    dout: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    regions: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _cpu_impl_backward(dout, qk, v, out, lse, scale, regions)


@_oc_attention_backward_op.register_kernel("cuda")
def _oc_attention_backward_cuda(dout, qk, v, out, lse, scale, regions):
    kernels = _triton_kernels(qk)
    if kernels is None:
        return _cpu_backward(dout, qk, v, out, lse, scale, regions)
    return kernels.backward(dout, qk, v, out, lse, scale, regions)


@_oc_attention_backward_op.register_fake
def _oc_attention_backward_fake(dout, qk, v, out, lse, scale, regions):
    return (torch.empty_like(qk, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    qk, v, scale, regions = inputs
    out, lse = output
    ctx.save_for_backward(qk, v, out, lse)
    ctx.scale = scale
    ctx.regions = regions


def _backward(ctx, dout, dlse):
    qk, v, out, lse = ctx.saved_tensors
    dqk, dv = _oc_attention_backward_op(dout.contiguous(), qk, v, out, lse, ctx.scale,
                                        ctx.regions)
    return dqk, dv, None, None


_oc_attention_op.register_autograd(_backward, setup_context=_setup_context)


def oc_attention(
    qk: torch.Tensor, v: torch.Tensor, scale: float | None = None, regions: int | None = None
) -> torch.Tensor:
    """Fused OCNet self-attention with shared query/key.

    Args:
        qk: B x Ck x H x W, the shared key/query projection (any strides).
        v: B x Cv x H x W values (Cv may differ from Ck).
        scale: score scale, a positive finite number; default ``Ck ** -0.5`` (OCNet's
            ``key_channels ** -0.5``).
        regions: ``None`` or 1 for attention over the whole map; ``s > 1`` for
            attention inside each of the s x s pyramid regions of Pyramid-OC.

    Returns:
        B x Cv x H x W context, in ``v``'s dtype.
    """
    if scale is None:
        scale = qk.shape[1] ** -0.5 if isinstance(qk, torch.Tensor) and qk.dim() == 4 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"oc_attention: scale must be a number, got {type(scale).__name__}")
    if regions is None:
        regions = 0
    elif isinstance(regions, bool) or not isinstance(regions, numbers.Integral):
        raise TypeError(f"oc_attention: regions must be an int, got {regions!r}")
    regions = int(regions)
    check_oc_attention_args(qk, v, float(scale), regions)
    out, _ = _oc_attention_op(qk, v, float(scale), regions)
    return out
