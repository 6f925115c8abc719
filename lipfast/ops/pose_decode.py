"""The op ``lipfast::pose_decode``: deep-high-resolution-net.pytorch's
``get_final_preds`` (``get_max_preds``, the quarter-pixel post-processing,
``transform_preds``) with the flip test (``flip_back``, the one-pixel shift, the
average) optionally fused in front of it. ../shared/SPEC.md section 10.

Schema (C++, ``csrc/ops/pose_decode.cpp``): ``lipfast::pose_decode(Tensor
heatmaps, Tensor? flipped, Tensor center, Tensor scale, int[] flip_perm) ->
(Tensor coords, Tensor maxvals)``:

- ``heatmaps``: B x J x h x w float32/float64, any strides;
- ``flipped``: None, or the heatmaps of the W-flipped input (same shape and
  dtype); the map decoded is then ``(H[b, j, y, x] + F[b, perm[j], y,
  w - max(x, 1)]) * 0.5`` in the heatmaps dtype (flip_back reverses W and swaps
  the pair channels, the shift right by one pixel keeps column 0), never stored;
- ``center``, ``scale``: B x 2 float64, (x, y) in image pixels and the box size
  in units of 200 px; only ``scale[:, 0]`` is used (the reference's
  get_affine_transform builds both directions from the widths);
- ``flip_perm``: J ints, a permutation (``lipfast.pose.flip_permutation``);
  ignored (may be empty) without ``flipped``.

Returns ``coords`` B x J x 2 (image x, y) and ``maxvals`` B x J, in the heatmaps
dtype. Rules (both kernels): first maximum in row-major order (numpy's argmax:
the first NaN wins and maxval is NaN), x = idx % w, y = idx // w, both 0 unless
maxval > 0; if 1 < x < w - 1 and 1 < y < h - 1 add 0.25 * sign of the horizontal
and vertical neighbour differences (np.sign: NaN for a NaN difference; a NaN in
one coordinate makes both NaN, as the reference's affine product does); then
``x_img = c_x + (x - w/2) * 200 s_w / w`` and ``y_img = c_y + (y - h/2) * 200 s_w / w``
in float64. Values of center and scale are not checked (no host sync): the
formula is applied as is.

Kernels:

- CPU: C++ (``csrc/ops/cpu/pose_decode_kernel.cpp``), parallel over the maps,
  strides respected;
- CUDA: the Triton kernel of :mod:`lipfast.kernels.pose_decode` (one program per
  map, one launch, no host sync); float64, or no Triton: the PyTorch path
  :func:`_pose_decode_torch` (materialises the averaged maps).

No autograd: the outputs (integer positions plus quarter steps, maxima) are not
differentiable in any useful sense; outputs computed from heatmaps that require
grad require grad too, and a backward through them raises NotImplementedError
naming the op (instead of silently zero gradients). A fake kernel for
``torch.compile``.
"""

from __future__ import annotations

import torch

from .. import _ext

_FLOATS = (torch.float32, torch.float64)


def check_perm(flip_perm, num_joints: int, what: str = "pose_decode") -> list[int]:
    """``flip_perm`` as a list of ints, checked to be a permutation of
    ``range(num_joints)`` (ValueError / TypeError naming the problem)."""
    try:
        perm = [int(p) for p in flip_perm]
    except (TypeError, ValueError):
        raise TypeError(f"{what}: flip_perm must be a sequence of ints, got {flip_perm!r}") \
            from None
    if any(isinstance(p, bool) for p in flip_perm):
        raise TypeError(f"{what}: flip_perm must be a sequence of ints, got {flip_perm!r}")
    if len(perm) != num_joints or sorted(perm) != list(range(num_joints)):
        raise ValueError(f"{what}: flip_perm must be a permutation of 0..{num_joints - 1} "
                         f"(J = {num_joints}), got {perm}")
    return perm


def check_args(heatmaps, flipped, center, scale, flip_perm) -> None:
    """Raises TypeError/ValueError naming the problem (the op's arguments)."""
    if not isinstance(heatmaps, torch.Tensor):
        raise TypeError(f"pose_decode: heatmaps must be a tensor, got {type(heatmaps).__name__}")
    if heatmaps.dim() != 4:
        raise ValueError(f"pose_decode expects B x J x h x w heatmaps, got shape "
                         f"{tuple(heatmaps.shape)}")
    if heatmaps.dtype not in _FLOATS:
        raise TypeError(f"pose_decode expects float32 or float64 heatmaps, got {heatmaps.dtype}")
    b, j, h, w = heatmaps.shape
    if h < 1 or w < 1:
        raise ValueError(f"pose_decode: empty heatmaps {tuple(heatmaps.shape)}")
    for name, t in (("center", center), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pose_decode: {name} must be a B x 2 tensor, got {type(t).__name__}")
        if t.dtype != torch.float64:
            raise TypeError(f"pose_decode: {name} must be float64, got {t.dtype}")
        if t.dim() != 2 or t.shape[0] != b or t.shape[1] != 2:
            raise ValueError(f"pose_decode: {name} must be B x 2 = {b} x 2, got "
                             f"{tuple(t.shape)}")
        if t.device != heatmaps.device:
            raise ValueError(f"pose_decode: heatmaps on {heatmaps.device}, {name} on {t.device}")
    if flipped is not None:
        if not isinstance(flipped, torch.Tensor):
            raise TypeError(f"pose_decode: flipped must be a tensor or None, got "
                            f"{type(flipped).__name__}")
        if flipped.shape != heatmaps.shape:
            raise ValueError(f"pose_decode: flipped must have the heatmaps' shape "
                             f"{tuple(heatmaps.shape)}, got {tuple(flipped.shape)}")
        if flipped.dtype != heatmaps.dtype:
            raise TypeError(f"pose_decode: flipped must have the heatmaps' dtype "
                            f"{heatmaps.dtype}, got {flipped.dtype}")
        if flipped.device != heatmaps.device:
            raise ValueError(f"pose_decode: heatmaps on {heatmaps.device}, flipped on "
                             f"{flipped.device}")
        check_perm(flip_perm, j)


def _np_sign(d: torch.Tensor) -> torch.Tensor:
    """np.sign: -1, 0, 1, and NaN for NaN (torch.sign gives NaN too; kept explicit)."""
    return torch.where(torch.isnan(d), d, torch.sign(d))


def _pose_decode_torch(heatmaps, flipped, center, scale, flip_perm):
    """PyTorch path (CUDA float64, or no Triton; also tested on CPU): forms the
    decoded maps (flip test averaged when ``flipped`` is given), then the same
    rules as the kernels with tensor ops (no host sync)."""
    b, j, h, w = heatmaps.shape
    if b * j == 0:
        return heatmaps.new_empty((b, j, 2)), heatmaps.new_empty((b, j))
    v = heatmaps
    if flipped is not None:
        # channel j reads flipped channel perm[j] (views + stack: no host->device copy)
        fb = torch.stack([flipped[:, p] for p in flip_perm], dim=1).flip(3)
        fb = torch.cat([fb[..., :1], fb[..., :-1]], dim=3)
        v = (heatmaps + fb) * 0.5
    flat = v.reshape(b, j, h * w)
    isn = torch.isnan(flat)
    any_nan = isn.any(-1)
    idx = torch.where(any_nan, isn.to(torch.uint8).argmax(-1),
                      torch.where(isn, float("-inf"), flat).argmax(-1))
    maxv = torch.gather(flat, 2, idx[..., None])[..., 0]
    pos = maxv > 0
    ix = torch.where(pos, idx % w, 0)
    iy = torch.where(pos, idx // w, 0)
    inner = (ix > 1) & (ix < w - 1) & (iy > 1) & (iy < h - 1)

    def at(yy, xx):
        k = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1))[..., None]
        return torch.gather(flat, 2, k)[..., 0]

    dx = _np_sign(at(iy, ix + 1) - at(iy, ix - 1))
    dy = _np_sign(at(iy + 1, ix) - at(iy - 1, ix))
    x = ix.to(v.dtype) + torch.where(inner, 0.25 * dx, torch.zeros_like(dx))
    y = iy.to(v.dtype) + torch.where(inner, 0.25 * dy, torch.zeros_like(dy))
    bad = torch.isnan(x) | torch.isnan(y)  # NaN in one makes both NaN (the reference)
    x = torch.where(bad, float("nan"), x)
    y = torch.where(bad, float("nan"), y)
    ratio = (scale[:, 0] * 200.0 / w)[:, None]
    xo = center[:, 0:1] + (x.double() - 0.5 * w) * ratio
    yo = center[:, 1:2] + (y.double() - 0.5 * h) * ratio
    return torch.stack([xo, yo], dim=-1).to(v.dtype), maxv


# The op's schema is C++ (csrc/ops/pose_decode.cpp), as is the CPU kernel
# (csrc/ops/cpu/pose_decode_kernel.cpp); registered here: the CUDA kernel
# (Triton, or the PyTorch path for float64 / without Triton) and the fake kernel.
_ext.load()


@torch.library.register_kernel("lipfast::pose_decode", "cuda")
def _pose_decode_cuda(heatmaps, flipped, center, scale, flip_perm):
    from .. import kernels as triton_kernels

    check_args(heatmaps, flipped, center, scale, flip_perm)
    kernels = triton_kernels.load("pose_decode", "lipfast.pose_decode", heatmaps.dtype)
    if kernels is None:
        return _pose_decode_torch(heatmaps, flipped, center, scale, flip_perm)
    return kernels.pose_decode(heatmaps, flipped, center, scale, flip_perm)


@torch.library.register_fake("lipfast::pose_decode")
def _pose_decode_fake(heatmaps, flipped, center, scale, flip_perm):
    check_args(heatmaps, flipped, center, scale, flip_perm)
    b, j = heatmaps.shape[:2]
    return heatmaps.new_empty((b, j, 2)), heatmaps.new_empty((b, j))


def _pose_decode_setup_context(ctx, inputs, output):
    pass


def _pose_decode_backward(ctx, *grads):
    raise NotImplementedError("lipfast::pose_decode is an inference op: it has no derivative "
                              "(decode detached heatmaps; compute the loss on the heatmaps)")


torch.library.register_autograd("lipfast::pose_decode", _pose_decode_backward,
                                setup_context=_pose_decode_setup_context)
