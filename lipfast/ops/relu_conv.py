"""ReLU fused into the following convolution: ``lipfast.ops.relu_conv2d``.

``relu_conv2d(y, weight, bias, stride, padding, dilation, groups)`` computes
``F.conv2d(F.relu(y), weight, bias, stride, padding, dilation, groups)``, value
for value (the forward *is* that: ATen's ReLU, then ATen's convolution, i.e.
oneDNN on CPU and cuDNN on CUDA). What differs is what autograd keeps:

- the plain pair saves the ReLU output ``r = relu(y)`` twice over (ReLU's backward
  reads it, the convolution keeps it as its input for the weight gradient), so
  ``r`` stays alive until backward;
- ``relu_conv2d`` saves only ``y`` (the very tensor passed in, no copy) and the
  weight. In backward it recomputes ``r = relu(y)`` (one elementwise pass, no
  convolution is recomputed), runs ``aten.convolution_backward`` for the input,
  weight and bias gradients, and masks the input gradient with ``y > 0``
  (``aten.threshold_backward``: exactly torch's ReLU gradient, 0 at ``y == 0``
  and at NaN).

This pays off when ``y`` is kept alive anyway: in CE2P/SCHP's backbone ``y`` is
the output of an In-Place ABN with the identity activation, which the norm
saves for its own backward, so the fusion removes one activation-sized tensor
per norm -> ReLU -> conv (see :mod:`lipfast.models.ce2p`). After a norm that
saves its *input* (``nn.BatchNorm2d``) it saves nothing.

Registration: a C++ schema (``csrc/ops/relu_conv.cpp``) with a
CompositeExplicitAutograd forward (the same ATen calls on CPU and CUDA) and a C++
autograd kernel (``csrc/ops/autograd/relu_conv_autograd.cpp``), so a training
step pays no Python per call; the fake kernel is registered here
(``torch.compile`` traces the op as one opaque op). The backward is written with
differentiable ATen ops, so double backward works.

Autocast: :func:`relu_conv2d` casts ``y``, ``weight`` and ``bias`` to the autocast
dtype of ``y``'s device when autocast is on (float32 tensors and lower; float64
is left alone), as autocast does for ``conv2d``; the op itself runs with the
dtypes it is given. Precision is that of ``F.conv2d`` in the input dtype.

Differences from ``F.conv2d(F.relu(y), ...)``: none in values or gradients;
``padding`` must be integers (no ``"same"`` / ``"valid"`` strings); ``y`` must
not be modified in place between forward and backward (autograd's version
check raises if it is).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import _ext

__all__ = ["relu_conv2d"]


def _pair(value, name: str, low: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        vals = list(value)
        if len(vals) == 1:
            vals = vals * 2
    else:
        vals = [value, value]
    if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
        raise TypeError(f"relu_conv2d: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < low for v in vals):
        raise ValueError(f"relu_conv2d: {name} must be >= {low}, got {value!r}")
    return vals


def _check(y, weight, bias, groups) -> None:
    for t, name in ((y, "y"), (weight, "weight")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"relu_conv2d: {name} must be a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"relu_conv2d: bias must be a tensor or None, got {type(bias).__name__}")
    if y.dim() != 4:
        raise ValueError(f"relu_conv2d expects a B x C x H x W input y, got shape "
                         f"{tuple(y.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"relu_conv2d expects a C_out x C_in/groups x kH x kW weight, got "
                         f"shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"relu_conv2d: groups must be an int >= 1, got {groups!r}")
    if not y.is_floating_point():
        raise TypeError(f"relu_conv2d expects a floating-point y, got {y.dtype}")
    if weight.dtype != y.dtype or (bias is not None and bias.dtype != y.dtype):
        raise TypeError(
            f"relu_conv2d: y ({y.dtype}), weight ({weight.dtype})"
            + (f" and bias ({bias.dtype})" if bias is not None else "")
            + " must have the same dtype")
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None and t.device != y.device:
            raise ValueError(f"relu_conv2d: {name} is on {t.device} but y is on {y.device}")
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    if c_out % groups != 0:
        raise ValueError(f"relu_conv2d: {c_out} output channels are not divisible by "
                         f"groups={groups}")
    if y.shape[1] != c_in_g * groups:
        raise ValueError(
            f"relu_conv2d: y has {y.shape[1]} channels, but the weight {tuple(weight.shape)} "
            f"with groups={groups} expects {c_in_g * groups}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"relu_conv2d: bias has shape {tuple(bias.shape)}, expected "
                         f"({c_out},)")


def _compute(y, weight, bias, stride, padding, dilation, groups):
    # Autocast off: the op computes in the dtypes it is given (as its C++ kernel
    # does); :func:`relu_conv2d` does the autocast casting before calling it.
    if not torch.amp.is_autocast_available(y.device.type):   # e.g. meta: no autocast there
        return F.conv2d(torch.relu(y), weight, bias, stride, padding, dilation, groups)
    with torch.autocast(y.device.type, enabled=False):
        return F.conv2d(torch.relu(y), weight, bias, stride, padding, dilation, groups)


# The op's schema and kernels are C++: csrc/ops/relu_conv.cpp (schema and the
# CompositeExplicitAutograd forward) and csrc/ops/autograd/relu_conv_autograd.cpp
# (the autograd kernel: no Python runs per call in training). Registered here:
# the fake kernel.
_ext.load()


@torch.library.register_fake("lipfast::relu_conv2d")
def _relu_conv2d_fake(y, weight, bias, stride, padding, dilation, groups):
    # The same ATen calls on fake tensors: shapes and strides (memory format) as eager.
    return _compute(y, weight, bias, stride, padding, dilation, groups)


_relu_conv2d_op = torch.ops.lipfast.relu_conv2d.default


def relu_conv2d(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d(F.relu(y), weight, bias, stride, padding, dilation, groups)`` whose
    autograd keeps ``y`` (not ``relu(y)``) and recomputes the ReLU in backward.

    Args:
        y: B x C_in x H x W floating-point input (any strides; not modified).
        weight: C_out x C_in/groups x kH x kW, same dtype and device as ``y``.
        bias: None or (C_out,).
        stride, padding, dilation: ints or pairs of ints (padding integers only).
        groups: as ``F.conv2d``.

    Under autocast the inputs are cast to the autocast dtype first, as for
    ``conv2d``. Bad arguments raise ``TypeError`` / ``ValueError`` naming them.
    """
    if isinstance(padding, str):
        raise ValueError(f"relu_conv2d: padding must be integers, got {padding!r} "
                         "(string paddings are not supported)")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    if (isinstance(y, torch.Tensor) and y.is_floating_point()
            and torch.amp.is_autocast_available(y.device.type)   # not on meta
            and torch.is_autocast_enabled(y.device.type)):
        dt = torch.get_autocast_dtype(y.device.type)

        def cast(t):
            if (isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.dtype != torch.float64 and t.device == y.device):
                return t.to(dt)
            return t

        y, weight, bias = cast(y), cast(weight), cast(bias)
    _check(y, weight, bias, groups)
    return _relu_conv2d_op(y, weight, bias, stride, padding, dilation, groups)
