"""Folding eval-mode norms into the convolutions before them: :func:`fold_norms`.

For inference and export. Each norm ``y = act(w~ * (x - mean) / sqrt(var + eps) + b)``
that follows a convolution ``x = conv(z)`` is removed: the convolution gets the
weight ``weight * s`` (``s = w~ / sqrt(running_var + eps)`` per output channel)
and the bias ``(bias_conv - running_mean) * s + b`` (``bias_conv = 0`` where the
convolution had none), and the norm module is replaced by its activation as a
plain module (``identity`` -> ``nn.Identity``, ``leaky_relu`` ->
``nn.LeakyReLU(slope)``, ``elu`` -> ``nn.ELU(alpha)``, ``relu`` -> ``nn.ReLU``), under
the same name, so the remaining state_dict keys and ``nn.Sequential`` indices
stay as they were. The arithmetic is done in float64 and cast back to the
convolution's dtype.

Norms folded:

- :class:`lipfast.InPlaceABN` / :class:`lipfast.InPlaceABNSync`:
  ``w~ = |weight| + eps`` (mapillary's invertible affine map, what lipfast's
  kernels compute);
- :class:`lipfast.ABN`: ``w~ = weight``;
- ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` (identity activation) and
  :class:`lipfast.models.ce2p.BatchNormAct` (leaky_relu kept);
- ``affine=False``: ``w~ = 1``, ``b = 0``.

Other modules (including other subclasses of ``nn.BatchNorm2d``, whose forward
may differ) are left as they are.

Which convolution: the ``nn.Conv2d`` registered immediately before the norm in
the same parent module (``conv1``/``bn1``, ``Sequential(conv, norm, ...)``), as
in every CE2P / SCHP / OCNet module; its ``out_channels`` must equal the norm's
``num_features``. The structure is read off the registration order, not off
``forward``: the fold assumes that the convolution's output feeds only that norm,
and that the norm is applied to nothing else (true for lipfast's models).

Refused with a ``ValueError`` naming the module path, before anything is
changed: a norm in training mode, a norm without running statistics (it would
use batch statistics in eval), a norm with no ``nn.Conv2d`` right before it (or
one of another width), a convolution followed by two different norms.

Shared modules (the OC blocks' ``f_query`` is ``f_key``) are folded once and
stay shared. Forward hooks on a folded norm go with it (the CPU-autocast
hooks CE2P and HRNetV2 put on their in-place norms are not needed any more: the
folded model has no lipfast norm kernels); any other hook on a folded norm is
dropped with a warning.

After folding, every lipfast module that would call a lipfast op is switched
to its plain-PyTorch path: :class:`CE2P` and its Bottlenecks, :class:`HRNetV2`
and its blocks and modules get ``fuse_relu_conv = False`` (no
:func:`lipfast.ops.relu_conv2d`) and the OC attention blocks ``attention =
"torch"`` (:func:`lipfast.nn.oc.attention_torch` instead of
:func:`lipfast.ops.oc_attention`). The result calls no ``torch.ops.lipfast`` op,
so ``torch.export``, ``torch.onnx.export`` and ``torch.jit.trace`` take it as it
is. It is in eval mode.

Numerics: the folded model equals the unfolded eval model up to float rounding
(the tests check float32 outputs to ``1e-4 * max|out|`` and float64 to
``1e-10 * max|out|``).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from ..nn.abn import ABN, InPlaceABN
from ..nn.oc import _SelfAttentionBase
from .ce2p import CE2P, BatchNormAct, Bottleneck, _back_to_autocast_dtype, _float_on_cpu
from .hrnet import FUSING_MODULES as _HRNET_FUSING
from .hrnet import HRNetV2

__all__ = ["fold_norms"]

# Hooks that CE2P and HRNetV2 register on their in-place norms (only needed around
# lipfast's float32 CPU norm kernels); they go with the norms silently.
_OWN_HOOKS = (_float_on_cpu, _back_to_autocast_dtype)


def _is_norm(m: nn.Module) -> bool:
    return (isinstance(m, (ABN, BatchNormAct))
            or type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm))


def _has_running_stats(m: nn.Module) -> bool:
    if m.running_mean is None or m.running_var is None:
        return False
    # lipfast's ABN uses batch statistics in eval when track_running_stats is off
    # (nn.BatchNorm2d uses the buffers whenever they exist).
    return not isinstance(m, ABN) or bool(m.track_running_stats)


def _activation(m: nn.Module) -> nn.Module:
    if isinstance(m, BatchNormAct):
        return nn.LeakyReLU(m.activation_param)
    if not isinstance(m, ABN):
        return nn.Identity()
    act = m.activation
    if act == "identity":
        return nn.Identity()
    if act == "leaky_relu":
        return nn.LeakyReLU(m.activation_param)
    if act == "elu":
        return nn.ELU(m.activation_param)
    if act == "relu":
        return nn.ReLU()
    raise ValueError(f"fold_norms: unknown activation {act!r} of {type(m).__name__}")


def _scale_shift(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with ``norm(x) = act(s * x + t)`` per channel."""
    mean = m.running_mean.detach().double()
    var = m.running_var.detach().double()
    if m.weight is None:
        w = torch.ones_like(mean)
    else:
        w = m.weight.detach().double()
        if isinstance(m, InPlaceABN):
            w = w.abs() + m.eps
    b = torch.zeros_like(mean) if m.bias is None else m.bias.detach().double()
    s = w / torch.sqrt(var + m.eps)
    return s, b - mean * s


def _hooks(m: nn.Module) -> list:
    found = []
    for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                 "_backward_pre_hooks"):
        found += [h for h in getattr(m, attr, {}).values() if h not in _OWN_HOOKS]
    return found


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plan(model: nn.Module) -> list:
    """[(norm, conv, norm path, [(parent, name), ...])] for every norm, validated."""
    plan = {}           # id(norm) -> [norm, conv, path, slots]
    conv_owner = {}     # id(conv) -> (norm, path of the norm)
    for ppath, parent in model.named_modules():       # each module once (shared: once)
        prev = None
        for name, child in parent._modules.items():
            path = _join(ppath, name)
            if child is not None and _is_norm(child):
                what = f"{type(child).__name__} at {path!r}"
                if child.training:
                    raise ValueError(f"fold_norms: {what} is in training mode (it would use "
                                     "batch statistics); call model.eval() first")
                if not _has_running_stats(child):
                    raise ValueError(f"fold_norms: {what} has no running statistics "
                                     "(track_running_stats=False), so it normalises with "
                                     "batch statistics and cannot be folded")
                if not isinstance(prev, nn.Conv2d):
                    before = ("nothing" if prev is None else
                              f"a {type(prev).__name__}")
                    raise ValueError(
                        f"fold_norms: {what} has no convolution to fold into: the child "
                        f"registered before it in {ppath or 'the model'!r} is {before}, not an "
                        "nn.Conv2d")
                if prev.out_channels != child.num_features:
                    raise ValueError(
                        f"fold_norms: {what} has {child.num_features} features but the "
                        f"nn.Conv2d before it has {prev.out_channels} output channels")
                entry = plan.get(id(child))
                if entry is None:
                    owner = conv_owner.get(id(prev))
                    if owner is not None and owner[0] is not child:
                        raise ValueError(
                            f"fold_norms: the nn.Conv2d before {what} is followed by another "
                            f"norm too ({owner[1]!r}); it cannot be folded into both")
                    conv_owner[id(prev)] = (child, path)
                    plan[id(child)] = [child, prev, path, [(parent, name)]]
                elif entry[1] is not prev:
                    raise ValueError(
                        f"fold_norms: {what} is the same module as {entry[2]!r} but follows "
                        "a different convolution there; it cannot be folded")
                else:
                    entry[3].append((parent, name))
            prev = child
    return list(plan.values())


def fold_norms(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Folds every eval-mode norm of ``model`` into the convolution before it and
    switches lipfast's modules to their plain-PyTorch paths (see the module
    docstring); returns the folded model, in eval mode.

    ``inplace=False`` (default) folds a deep copy and leaves ``model`` untouched;
    ``inplace=True`` changes ``model`` itself (after checking every norm, so an
    error leaves it unchanged). Raises ``ValueError`` naming the module path for
    a norm in training mode, without running statistics, or with no matching
    ``nn.Conv2d`` registered right before it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_norms expects an nn.Module, got {type(model).__name__}")
    if _is_norm(model):
        raise ValueError(f"fold_norms: the model itself is a {type(model).__name__}; there is "
                         "no convolution to fold it into")
    if not inplace:
        model = copy.deepcopy(model)
    plan = _plan(model)
    with torch.no_grad():
        for norm, conv, path, slots in plan:
            dropped = _hooks(norm)
            if dropped:
                warnings.warn(f"fold_norms: {len(dropped)} hook(s) on {path!r} are dropped with "
                              "the norm", stacklevel=2)
            s, t = _scale_shift(norm)
            w = conv.weight
            s_w = s.to(w.device).view(-1, *([1] * (w.dim() - 1)))
            w.copy_((w.double() * s_w).to(w.dtype))
            bias = t.to(w.device)
            if conv.bias is not None:
                bias = conv.bias.double() * s.to(w.device) + bias
                conv.bias.copy_(bias.to(conv.bias.dtype))
            else:
                conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=w.requires_grad)
            act = _activation(norm)
            for parent, name in slots:
                setattr(parent, name, act)
    for m in model.modules():
        if isinstance(m, (CE2P, Bottleneck, HRNetV2) + _HRNET_FUSING):
            m.fuse_relu_conv = False
        if isinstance(m, _SelfAttentionBase):
            m.attention = "torch"
    return model.eval()
