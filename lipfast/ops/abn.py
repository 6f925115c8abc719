"""In-Place Activated BatchNorm: op registrations and the autograd composition.

Compiled ops (schemas: ``csrc/ops/abn.cpp``; CPU: ``csrc/ops/cpu/abn_kernel.cpp``;
CUDA: ``csrc/ops/cuda/abn_kernel.cu`` + ``abn_cuda.cpp``):

- ``torch.ops.lipfast.abn_stats(x) -> (mean, var)``
- ``torch.ops.lipfast.abn_forward_(x, mean, var, weight, bias, eps, activation, param)``
  (writes ``y`` into ``x``)
- ``torch.ops.lipfast.abn_backward_reduce(y, dy, weight, bias, eps, activation, param)
  -> (sum_dz, sum_xhat_dz)``
- ``torch.ops.lipfast.abn_backward_elemt(y, dy, var, weight, bias, mean_dz, mean_xhat_dz,
  eps, activation, param) -> dx``
- fused, for the unsynchronised layer (compositions of the four above, in C++:
  one call per layer and direction, no Python between the kernels):
  ``abn_train_forward_(x, weight, bias, running_mean, running_var, momentum, eps,
  activation, param) -> var`` (statistics, running-statistics update, forward into
  ``x``) and ``abn_backward(y, dy, var, weight, bias, count, eps, activation, param,
  training) -> (dx, dweight, dbias)``
- ``inplace_abn_train_(x, weight, bias, running_mean, running_var, momentum, eps,
  activation, param) -> x``: the unsynchronised layer in training as one
  differentiable op, with a C++ autograd kernel
  (``csrc/ops/autograd/abn_autograd.cpp``: ``abn_train_forward_`` forward,
  ``abn_backward`` backward), used in eager mode so that a training step pays no
  Python autograd per norm

This file registers their fake (meta) kernels and composes them, with the
process-group collectives of the synchronised variant, in an
:class:`torch.autograd.Function` (also used under ``torch.compile`` and in eval
mode with gradients; the unsynchronised training layer runs as
``inplace_abn_train_`` in eager mode). The composition is a Python autograd
function rather than ``torch.library.register_autograd`` because the forward
mutates its input, and ``register_autograd`` accepts functional ops only.
``torch.compile(fullgraph=True)`` traces through it.

Maths (``w~ = |w| + eps``): ``y = act(w~ (x - mean) / sqrt(var + eps) + b)``; backward
recovers ``z = act^-1(y)`` and ``x_hat = (z - b) / w~`` from the output, so ``x``
is never kept.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import _ext

_ext.load()

_ops = torch.ops.lipfast

ACTIVATIONS = ("leaky_relu", "elu", "identity")


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("lipfast::abn_stats")
def _abn_stats_fake(x):
    c = x.shape[1]
    dt = _stats_dtype(x)
    return x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)


@torch.library.register_fake("lipfast::abn_forward_")
def _abn_forward_fake(x, mean, var, weight, bias, eps, activation, activation_param):
    return None


@torch.library.register_fake("lipfast::abn_backward_reduce")
def _abn_backward_reduce_fake(y, dy, weight, bias, eps, activation, activation_param):
    c = y.shape[1]
    dt = _stats_dtype(y)
    return y.new_empty((c,), dtype=dt), y.new_empty((c,), dtype=dt)


@torch.library.register_fake("lipfast::abn_train_forward_")
def _abn_train_forward_fake(x, weight, bias, running_mean, running_var, momentum, eps, activation,
                            activation_param):
    return x.new_empty((x.shape[1],), dtype=_stats_dtype(x))


@torch.library.register_fake("lipfast::inplace_abn_train_")
def _inplace_abn_train_fake(x, weight, bias, running_mean, running_var, momentum, eps, activation,
                            activation_param):
    return x


@torch.library.register_fake("lipfast::abn_backward")
def _abn_backward_fake(y, dy, var, weight, bias, count, eps, activation, activation_param,
                       training):
    c = y.shape[1]
    dt = _stats_dtype(y)
    return (torch.empty_like(y, memory_format=torch.contiguous_format),
            y.new_empty((c,), dtype=dt), y.new_empty((c,), dtype=dt))


@torch.library.register_fake("lipfast::abn_backward_elemt")
def _abn_backward_elemt_fake(
    y, dy, var, weight, bias, mean_dz, mean_xhat_dz, eps, activation, activation_param
):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- checks


def normalize_activation(activation: str, activation_param: float, inplace: bool) -> str:
    """Canonical activation name; rejects what the in-place variants cannot invert."""
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string, got {type(activation).__name__}")
    act = activation.lower()
    if act == "none":  # spelling of the vendored copies in SCHP, CE2P and OCNet
        act = "identity"
    if act in ("leaky_relu", "elu") and not math.isfinite(activation_param):
        raise ValueError(f"activation_param must be finite, got {activation_param}")
    allowed = ACTIVATIONS + (("relu",) if not inplace else ())
    if act not in allowed:
        if act == "relu":
            raise ValueError(
                "activation='relu' is not invertible, so the in-place ABN variants cannot "
                "recover their input in backward; use 'leaky_relu' (with a positive slope), "
                "'elu' or 'identity' followed by a ReLU, or the non-in-place lipfast.ABN"
            )
        raise ValueError(f"unknown activation {activation!r}; expected one of {allowed}")
    if inplace and act == "leaky_relu" and not activation_param > 0:
        raise ValueError(
            "in-place ABN needs a positive leaky_relu slope (it divides by it in backward), "
            f"got activation_param={activation_param}"
        )
    if act == "elu" and not activation_param > 0:
        raise ValueError(f"elu needs a positive alpha, got activation_param={activation_param}")
    return act


def check_eps_momentum(eps, momentum, inplace: bool, owner: str,
                       allow_none: bool = True) -> None:
    """``eps``: a finite number, > 0 for the in-place variants (they scale by |w| + eps,
    which must stay invertible), >= 0 otherwise; ``momentum``: in [0, 1], or None
    (cumulative average) where ``allow_none``."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{owner}: eps must be a number, got {type(eps).__name__}")
    if inplace and not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{owner}: eps must be a positive finite number (the in-place layers "
                         f"scale by |w| + eps), got {float(eps)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{owner}: eps must be a finite number >= 0, got {float(eps)}")
    what = "None or " if allow_none else ""
    if momentum is None and allow_none:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"{owner}: momentum must be {what}a number in [0, 1], got "
                        f"{type(momentum).__name__}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"{owner}: momentum must be {what}in [0, 1], got {float(momentum)}")


def check_input(x: torch.Tensor, num_features: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"ABN expects an input of shape (N, C, *), got shape {tuple(x.shape)}")
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"ABN was built for {num_features} channels but the input has {x.shape[1]} "
            f"(shape {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        raise TypeError(f"ABN expects a floating-point input, got {x.dtype}")


def check_param(t: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    """weight, bias and running statistics: same device as x, one value per
    channel, and the input's dtype (float32 is also accepted for half/bfloat16
    inputs: mixed-precision models keep float32 parameters and statistics)."""
    if t is None:
        return
    if t.device != x.device:
        raise ValueError(f"ABN {name} is on {t.device} but the input is on {x.device}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(
            f"ABN {name} has shape {tuple(t.shape)}, expected ({x.shape[1]},) for an input "
            f"with {x.shape[1]} channels"
        )
    ok = t.dtype == x.dtype or (
        x.dtype in (torch.float16, torch.bfloat16) and t.dtype == torch.float32
    )
    if not ok:
        raise TypeError(
            f"ABN {name} has dtype {t.dtype} but the input has dtype {x.dtype}; convert one "
            "of them (half/bfloat16 inputs may keep float32 parameters)"
        )


_IN_PLACE_HINT = (
    "lipfast InPlaceABN: the output of this layer was modified in place by a later "
    "operation (for example nn.ReLU(inplace=True), `out += ...` or another in-place "
    "ABN applied to the same tensor) before backward ran. In-place ABN recovers its "
    "input from that output, so the gradient would be wrong. Make the following "
    "operation out of place (e.g. nn.ReLU(inplace=False), `out = out + ...`)."
)

_warned_no_group = False


def _warn_no_group() -> None:
    global _warned_no_group
    if not _warned_no_group:
        _warned_no_group = True
        warnings.warn(
            "InPlaceABNSync: torch.distributed is not initialised, so statistics are not "
            "synchronised; behaving as InPlaceABN",
            stacklevel=3,
        )


def sync_active(group) -> bool:
    """True when statistics must be merged across the processes of ``group``."""
    if not (dist.is_available() and dist.is_initialized()):
        _warn_no_group()
        return False
    return dist.get_world_size(group) > 1


def _merge_stats(mean, var, count: int, group):
    """Exact merge of per-rank (count, mean, biased var) with one all_gather:
    mean = sum n_r m_r / n, M2 = sum n_r v_r + sum n_r (m_r - mean)^2."""
    world = dist.get_world_size(group)
    c = mean.shape[0]
    local = torch.cat([mean.new_full((1,), float(count)), mean, var]).to(torch.float64)
    # all_gather into a list: gloo rejects all_gather_into_tensor's stacked
    # (world, k) output form, and torch 2.13 deprecates all_gather_into_tensor.
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    gathered = torch.stack(parts)
    n = gathered[:, :1]
    means, vars_ = gathered[:, 1 : c + 1], gathered[:, c + 1 :]
    total = n.sum(0)
    denom = total.clamp_min(1.0)
    g_mean = (n * means).sum(0) / denom
    g_var = ((n * vars_).sum(0) + (n * (means - g_mean) ** 2).sum(0)) / denom
    return g_mean.to(mean.dtype), g_var.to(var.dtype), total.to(mean.dtype)


def _too_few_values(shape) -> ValueError:
    return ValueError(
        "Expected more than 1 value per channel when training"
        + (f" (got input of shape {tuple(shape)})" if shape is not None else " across all ranks")
    )


def _normalize_in_place(x, weight, bias, running_mean, running_var, training, momentum, eps,
                        activation, activation_param, sync, group):
    """The forward: statistics (merged across ranks when ``sync``), running-stat
    update, then ``abn_forward_`` into ``x``. Returns (var used, count used)."""
    channels = x.shape[1]
    local_count = x.numel() // channels if channels else 0
    if training and not sync:
        # one fused op: statistics, running-statistics update, forward (csrc/ops/abn.cpp)
        if local_count < 2:
            raise _too_few_values(x.shape)
        var = _ops.abn_train_forward_(x, weight, bias, running_mean, running_var, momentum, eps,
                                      activation, activation_param)
        return var, local_count
    if training:   # synchronised: the kernels with the collective in between
        mean, var = _ops.abn_stats(x)
        mean, var, count = _merge_stats(mean, var, local_count, group)
        # A rank with >= 2 local values proves the global count is >= 2;
        # only ranks without read the merged count (a host sync, rare).
        if local_count < 2 and float(count) < 2:
            raise _too_few_values(None)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                running_mean.mul_(1.0 - momentum).add_(momentum * mean.to(running_mean.dtype))
                running_var.mul_(1.0 - momentum).add_(momentum * unbiased.to(running_var.dtype))
    else:
        mean, var, count = running_mean, running_var, local_count
    _ops.abn_forward_(x, mean, var, weight, bias, eps, activation, activation_param)
    return var, count


class InPlaceABNFunction(torch.autograd.Function):
    """Composes the ABN ops; ``sync=True`` merges statistics across ``group``."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        activation,
        activation_param,
        sync,
        group,
    ):
        var, count = _normalize_in_place(x, weight, bias, running_mean, running_var, training,
                                         momentum, eps, activation, activation_param, sync, group)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, var, weight, bias)
        ctx.count = count
        ctx.training = training
        ctx.sync = sync
        ctx.group = group
        ctx.eps = eps
        ctx.activation = activation
        ctx.activation_param = activation_param
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        try:
            y, var, weight, bias = ctx.saved_tensors
        except RuntimeError as err:
            if "modified by an inplace operation" in str(err):
                raise RuntimeError(_IN_PLACE_HINT) from err
            raise
        act, prm, eps = ctx.activation, ctx.activation_param, ctx.eps
        if not ctx.sync:   # one fused op (csrc/ops/abn.cpp)
            dx, dweight, dbias = _ops.abn_backward(y, dy, var, weight, bias, int(ctx.count), eps,
                                                   act, prm, ctx.training)
            needs = ctx.needs_input_grad
            return (dx if needs[0] else None,
                    dweight.to(weight.dtype) if weight is not None and needs[1] else None,
                    dbias.to(bias.dtype) if bias is not None and needs[2] else None,
                    None, None, None, None, None, None, None, None, None)
        # synchronised (training only): the kernels with the all_reduce in between
        y = y.contiguous()
        dy = dy.contiguous()
        sum_dz, sum_xhat_dz = _ops.abn_backward_reduce(y, dy, weight, bias, eps, act, prm)
        both = torch.cat([sum_dz, sum_xhat_dz])
        dist.all_reduce(both, group=ctx.group)
        g_dz, g_xdz = both.split(sum_dz.shape[0])
        mean_dz, mean_xhat_dz = g_dz / ctx.count, g_xdz / ctx.count
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _ops.abn_backward_elemt(
                y, dy, var, weight, bias, mean_dz, mean_xhat_dz, eps, act, prm
            )
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (sum_xhat_dz * torch.sign(weight).to(sum_xhat_dz.dtype)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = sum_dz.to(bias.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None, None, None


def _inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps,
                 activation, activation_param, sync, group, owner="inplace_abn"):
    check_input(x)
    check_eps_momentum(eps, momentum, True, owner, allow_none=False)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        check_param(t, x, name)
    act = normalize_activation(activation, activation_param, inplace=True)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("ABN in eval mode needs running_mean and running_var")
    args = (x, weight, bias, running_mean, running_var, bool(training), float(momentum),
            float(eps), act, float(activation_param), sync, group)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad and training and not sync and not torch.compiler.is_compiling():
        # the C++ autograd op (no Python autograd per call); torch.compile traces the
        # Function below instead, which composes the same kernels
        channels = x.shape[1]
        if (x.numel() // channels if channels else 0) < 2:
            raise _too_few_values(x.shape)
        return _ops.inplace_abn_train_(x, weight, bias, running_mean, running_var,
                                       float(momentum), float(eps), act, float(activation_param))
    if not needs_grad:
        # Nothing to differentiate (inference, frozen layers): skip the autograd
        # Function, whose mark_dirty torch.compile cannot trace without grad.
        _normalize_in_place(*args)
        return x
    return InPlaceABNFunction.apply(*args)


def inplace_abn(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
) -> torch.Tensor:
    """In-place activated batch norm (mapillary inplace_abn's functional form).

    Writes ``act(w~ * (x - mean) / sqrt(var + eps) + b)`` into ``x``'s storage and
    returns ``x``; ``w~ = |weight| + eps``. In training the batch statistics are
    used and the running statistics (if given) are updated with ``momentum``.
    ``x`` must not be a leaf that requires grad, and no later op may modify the
    result in place before backward (that raises a clear error). ``eps`` must be a
    positive finite number, ``momentum`` in [0, 1], ``activation_param`` finite
    (ValueError otherwise).
    """
    return _inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps,
                        activation, activation_param, False, None)


def inplace_abn_sync(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    group=None,
) -> torch.Tensor:
    """:func:`inplace_abn` with statistics merged across the processes of ``group``
    (``None``: the default group): one all_gather in forward, one all_reduce in
    backward, exact for unequal (also empty) per-rank batches. Without an
    initialised process group it warns once and behaves as :func:`inplace_abn`."""
    sync = bool(training) and sync_active(group)
    return _inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps,
                        activation, activation_param, sync, group, "inplace_abn_sync")
