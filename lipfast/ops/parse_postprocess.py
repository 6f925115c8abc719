"""The op ``lipfast::parse_postprocess``: SCHP's in-the-wild post-processing
(``simple_extractor.py``: upsample, ``transform_logits``, argmax) fused.

SCHP upsamples the model's fusion logits L (K x C x h x w, e.g. 20 x 119 x 119)
bilinearly with ``align_corners=True`` to the model input size ``in_h x in_w``
(U), warps every channel back to the original image frame with
``cv2.warpAffine(channel, M_inv, (out_w, out_h), INTER_LINEAR, BORDER_CONSTANT, 0)``
(output pixel (x, y) samples U bilinearly at ``M (x, y, 1)^T``, ``M`` the forward
original->input affine; taps outside ``[0, in_w-1] x [0, in_h-1]`` are 0) and takes
the argmax over the classes. Here ``M = [[ax, 0, bx], [0, ay, by]]`` (no rotation),
one row ``(ax, bx, ay, by)`` of ``affine`` per map k; all K maps share the output
size. The op computes V (the warped logits) without storing U or V, and returns

- ``labels``: K x out_h x out_w uint8, argmax_c V (first maximum; C <= 256);
- maps: ``"probs"``: softmax_c V, ``"logits"``: V (K x C x out_h x out_w, the
  logits dtype), None: nothing;
- ``fg=True``: K x out_h x out_w ``1 - softmax_c(V)[0]`` (foreground probability).

``in_size == logits size`` skips the upsample (multi-scale averaged logits).
Pixels whose taps all fall outside the input frame have V = 0: label 0,
probabilities 1/C. float32 logits are accumulated in float32, float64 in float64.

Kernels (schema ``lipfast::parse_postprocess(Tensor logits, Tensor affine, SymInt
in_h, SymInt in_w, SymInt out_h, SymInt out_w, int maps, bool fg) -> (Tensor
labels, Tensor maps, Tensor fg)`` in C++, ``csrc/ops/parse_postprocess.cpp``;
``maps`` 0/1/2 = none/probs/logits, unused outputs are empty tensors of shape (0,)):

- CPU: C++ (``csrc/ops/cpu/parse_postprocess_kernel.cpp``): composite row and
  column tap tables (<= 4 logits rows / columns per output row / column), logits
  packed channel-last once, parallel over output rows: the row's logits rows are
  combined into one w x C buffer, each pixel sums its column taps of C-vectors;
  vectorised (AVX2 + FMA picked at run time on x86-64).
- CUDA: the Triton kernel of :mod:`lipfast.kernels.parse_postprocess` (composite
  taps from host tables, running argmax and online softmax over channel blocks;
  a second pass writes the probabilities), registered from here; float64, or no
  Triton: the PyTorch path :func:`_parse_postprocess_torch` (materialises U and V).

No autograd: an inference op. Outputs computed from logits that require grad
require grad too, and a backward through them raises NotImplementedError naming
the op (instead of silently wrong zero gradients). A fake kernel for
``torch.compile``.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .. import _ext

_MAPS = {None: 0, "probs": 1, "logits": 2}
_FLOATS = (torch.float32, torch.float64)
_AFFINE_MSG = "parse_postprocess: affine has a non-finite value"


def _as_int(v):
    """v as an int (Python and numpy integers, SymInts kept), or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, torch.SymInt)):
        return v
    try:
        return operator.index(v)
    except TypeError:
        return None


def _size(v, what: str) -> tuple:
    one = _as_int(v)
    if one is not None:
        v = (one, one)
    if not isinstance(v, (tuple, list, torch.Size)) or len(v) != 2:
        raise TypeError(f"parse_postprocess: {what} must be an int or a pair of ints (h, w), "
                        f"got {v!r}")
    out = tuple(_as_int(e) for e in v)
    if any(e is None for e in out):
        raise TypeError(f"parse_postprocess: {what} must be an int or a pair of ints (h, w), "
                        f"got {v!r}")
    if out[0] < 1 or out[1] < 1:
        raise ValueError(f"parse_postprocess: {what} must be positive, got {out}")
    return out


def check_args(logits, affine, in_h, in_w, out_h, out_w, maps, fg) -> None:
    """Raises TypeError/ValueError naming the problem (the op's arguments; maps
    as 0/1/2). Values of ``affine`` are checked by the kernels (CPU: an error;
    CUDA: a device-side assert)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(affine, torch.Tensor):
        raise TypeError("parse_postprocess expects tensors for logits and affine, got "
                        f"{type(logits).__name__} and {type(affine).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"parse_postprocess expects K x C x h x w logits, got shape "
                         f"{tuple(logits.shape)}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"parse_postprocess expects float32 or float64 logits, got {logits.dtype}")
    k, c, h, w = logits.shape
    if not 1 <= c <= 256:
        raise ValueError(f"parse_postprocess: the number of classes C must be in [1, 256] "
                         f"(uint8 labels), got {c}")
    if h < 1 or w < 1:
        raise ValueError(f"parse_postprocess: empty logits map {tuple(logits.shape)}")
    if affine.dtype != torch.float64:
        raise TypeError(f"parse_postprocess: affine must be float64, got {affine.dtype}")
    if affine.dim() != 2 or affine.shape[0] != k or affine.shape[1] != 4:
        raise ValueError(f"parse_postprocess: affine must be K x 4 = {k} x 4 (ax, bx, ay, by), "
                         f"got {tuple(affine.shape)}")
    if affine.device != logits.device:
        raise ValueError(f"parse_postprocess: logits on {logits.device}, affine on {affine.device}")
    for name, v in (("in_h", in_h), ("in_w", in_w), ("out_h", out_h), ("out_w", out_w)):
        if v < 1:
            raise ValueError(f"parse_postprocess: {name} must be positive, got {v}")
    if maps not in (0, 1, 2):
        raise ValueError(f"parse_postprocess: maps must be 0, 1 or 2, got {maps!r}")
    if not isinstance(fg, bool):
        raise TypeError(f"parse_postprocess: fg must be a bool, got {fg!r}")


def parse_postprocess(logits: torch.Tensor, affine, in_size, out_size, maps=None,
                      fg: bool = False):
    """SCHP's post-processing fused: ``(labels, maps, fg)``.

    Args:
        logits: K x C x h x w float32/float64 (any strides; K may be 0; C <= 256).
        affine: K x 4 ``(ax, bx, ay, by)`` per map, the forward original->input
            affine ``[[ax, 0, bx], [0, ay, by]]``; a floating tensor (converted to
            float64) on the logits' device.
        in_size: ``(in_h, in_w)`` (or an int) the logits are upsampled to
            (``align_corners=True``); the logits size skips the upsample.
        out_size: ``(out_h, out_w)`` (or an int) of the original image frame.
        maps: None, ``"probs"`` (softmax over C) or ``"logits"`` (the warped logits).
        fg: also return ``1 - softmax(V)[0]``.

    Returns:
        ``labels`` (K x out_h x out_w uint8), the maps (K x C x out_h x out_w in the
        logits dtype) or None, the foreground probability (K x out_h x out_w) or None.
        No autograd (a backward raises NotImplementedError).
    """
    if not isinstance(affine, torch.Tensor):
        raise TypeError(f"parse_postprocess: affine must be a K x 4 tensor, got "
                        f"{type(affine).__name__}")
    if not affine.is_floating_point():
        raise TypeError(f"parse_postprocess: affine must be a floating tensor, got {affine.dtype}")
    if isinstance(maps, str) or maps is None:
        if maps not in _MAPS:
            raise ValueError(f"parse_postprocess: maps must be None, 'probs' or 'logits', got "
                             f"{maps!r}")
    else:
        raise ValueError(f"parse_postprocess: maps must be None, 'probs' or 'logits', got {maps!r}")
    in_h, in_w = _size(in_size, "in_size")
    out_h, out_w = _size(out_size, "out_size")
    m = _MAPS[maps]
    if affine.dtype != torch.float64:
        affine = affine.to(torch.float64)
    check_args(logits, affine, in_h, in_w, out_h, out_w, m, fg)
    labels, mp, f = torch.ops.lipfast.parse_postprocess(logits, affine, in_h, in_w, out_h, out_w,
                                                        m, fg)
    return labels, (mp if m else None), (f if fg else None)


def _axis_taps(q, n_u):
    """The two U taps (clamped index, weight; weight 0 outside [0, n_u)) of the
    samples ``q`` (K x n float64) along an axis of size n_u."""
    q = q.clamp(-2.0, n_u + 1.0)
    f = q.floor()
    fr = q - f
    x0 = f.long()
    out = []
    for d, wt in ((0, 1.0 - fr), (1, fr)):
        x = x0 + d
        ok = (x >= 0) & (x < n_u)
        out.append((x.clamp(0, n_u - 1), torch.where(ok, wt, torch.zeros_like(wt))))
    return out


def _parse_postprocess_torch(logits, affine, in_h, in_w, out_h, out_w, maps, fg):
    """PyTorch path (CUDA float64, or no Triton; also used by the tests):
    F.interpolate to the input size, then a separable gather-based bilinear warp
    with zero border, argmax / softmax. Materialises U and V."""
    k, c, h, w = logits.shape
    dt = logits.dtype
    empty = logits.new_empty((0,))
    if k == 0:
        return (logits.new_empty((0, out_h, out_w), dtype=torch.uint8),
                logits.new_empty((0, c, out_h, out_w)) if maps else empty,
                logits.new_empty((0, out_h, out_w)) if fg else empty)
    u = logits
    if (in_h, in_w) != (h, w):
        u = F.interpolate(logits, (in_h, in_w), mode="bilinear", align_corners=True)
    aff = affine.to(torch.float64)
    ys = torch.arange(out_h, dtype=torch.float64, device=logits.device)
    xs = torch.arange(out_w, dtype=torch.float64, device=logits.device)
    qy = aff[:, 2:3] * ys + aff[:, 3:4]  # K x out_h
    qx = aff[:, 0:1] * xs + aff[:, 1:2]  # K x out_w
    rows = None
    for yi, wy in _axis_taps(qy, in_h):
        g = torch.gather(u, 2, yi[:, None, :, None].expand(k, c, out_h, in_w))
        term = g * wy.to(dt)[:, None, :, None]
        rows = term if rows is None else rows + term
    v = None
    for xi, wx in _axis_taps(qx, in_w):
        g = torch.gather(rows, 3, xi[:, None, None, :].expand(k, c, out_h, out_w))
        term = g * wx.to(dt)[:, None, None, :]
        v = term if v is None else v + term
    labels = v.argmax(1).to(torch.uint8)
    p = torch.softmax(v, 1) if (maps == 1 or fg) else None
    out_maps = (p if maps == 1 else v) if maps else empty
    out_fg = (1 - p[:, 0]) if fg else empty
    return labels, out_maps, out_fg


# The op's schema is C++ (csrc/ops/parse_postprocess.cpp), as is the CPU kernel
# (csrc/ops/cpu/parse_postprocess_kernel.cpp); registered here: the CUDA kernel
# (Triton, or the PyTorch path for float64 / without Triton) and the fake kernel.
_ext.load()


@torch.library.register_kernel("lipfast::parse_postprocess", "cuda")
def _parse_postprocess_cuda(logits, affine, in_h, in_w, out_h, out_w, maps, fg):
    from .. import kernels as triton_kernels

    check_args(logits, affine, in_h, in_w, out_h, out_w, maps, fg)
    if affine.numel():
        torch._assert_async(torch.isfinite(affine).all(), _AFFINE_MSG)
    kernels = triton_kernels.load("parse_postprocess", "lipfast.parse_postprocess", logits.dtype)
    if kernels is None:
        return _parse_postprocess_torch(logits, affine, in_h, in_w, out_h, out_w, maps, fg)
    return kernels.parse_postprocess(logits, affine, in_h, in_w, out_h, out_w, maps, fg)


@torch.library.register_fake("lipfast::parse_postprocess")
def _parse_postprocess_fake(logits, affine, in_h, in_w, out_h, out_w, maps, fg):
    check_args(logits, affine, in_h, in_w, out_h, out_w, maps, fg)
    k, c = logits.shape[:2]
    labels = logits.new_empty((k, out_h, out_w), dtype=torch.uint8)
    out_maps = logits.new_empty((k, c, out_h, out_w)) if maps else logits.new_empty((0,))
    out_fg = logits.new_empty((k, out_h, out_w)) if fg else logits.new_empty((0,))
    return labels, out_maps, out_fg



def _parse_postprocess_setup_context(ctx, inputs, output):
    pass


def _parse_postprocess_backward(ctx, *grads):
    raise NotImplementedError("lipfast::parse_postprocess is an inference op: it has no "
                              "derivative (compute a loss on the logits before the op)")


torch.library.register_autograd("lipfast::parse_postprocess", _parse_postprocess_backward,
                                setup_context=_parse_postprocess_setup_context)
