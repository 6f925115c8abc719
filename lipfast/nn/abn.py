"""Activated BatchNorm modules, API-compatible with mapillary inplace_abn 1.x.

- :class:`ABN`: BatchNorm followed by an activation, out of place (plain torch ops).
- :class:`InPlaceABN`: the same computed in place with lipfast's kernels; the
  input's storage holds the output afterwards and backward recovers the input
  from it, so the layer keeps one tensor for backward instead of two.
- :class:`InPlaceABNSync`: :class:`InPlaceABN` with statistics synchronised across
  the processes of a ``torch.distributed`` group.

The spellings of the older vendored copies in SCHP, CE2P and OCNet are accepted
too: ``slope=0.01``, ``activation="none"``, the old positional order
``(num_features, eps, momentum, affine, activation, slope)`` and the unused
``devices=`` argument, so replacing their import line is enough.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import abn as _abn


def _legacy_args(track_running_stats, activation, activation_param, legacy: dict):
    """Maps the older vendored signatures onto the inplace_abn 1.x one."""
    slope = legacy.pop("slope", None)
    if "devices" in legacy:  # DataParallel-era InPlaceABNSync(devices=...); synchronisation
        legacy.pop("devices")  # now comes from torch.distributed
        warnings.warn("InPlaceABNSync(devices=...) is ignored: lipfast synchronises across "
                      "torch.distributed processes", stacklevel=3)
    if legacy:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(legacy))}")
    if isinstance(track_running_stats, str):
        # Old positional order (num_features, eps, momentum, affine, activation, slope).
        if not isinstance(activation, str):
            slope = activation if slope is None else slope
        activation, track_running_stats = track_running_stats, True
    if slope is not None:
        activation_param = slope
    return bool(track_running_stats), activation, float(activation_param)


class ABN(nn.Module):
    """Activated Batch Normalization: ``act(batch_norm(x))`` on (N, C, *) inputs.

    Args:
        num_features: C.
        eps: added to the variance; finite, >= 0 (> 0 for the in-place variants,
            whose scale ``|w| + eps`` must stay invertible).
        momentum: running-statistics factor in [0, 1]; ``None`` for a cumulative average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep ``running_mean`` / ``running_var`` (otherwise batch
            statistics are used in eval mode too).
        activation: ``"leaky_relu"``, ``"elu"``, ``"identity"`` (alias ``"none"``), or
            ``"relu"`` (this class only: it cannot be inverted).
        activation_param: the leaky_relu slope or the elu alpha.

    state_dict keys are those of ``nn.BatchNorm2d``; checkpoints without
    ``num_batches_tracked`` (the vendored copies') load too.
    """

    _inplace = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        **legacy,
    ):
        super().__init__()
        track_running_stats, activation, activation_param = _legacy_args(
            track_running_stats, activation, activation_param, legacy
        )
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        _abn.check_eps_momentum(eps, momentum, self._inplace, type(self).__name__)
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = track_running_stats
        self.activation_param = activation_param
        self.activation = _abn.normalize_activation(activation, activation_param, self._inplace)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _factor_and_mode(self) -> tuple[bool, float]:
        """(use batch statistics, running-average factor), as nn.BatchNorm decides them."""
        factor = 0.0 if self.momentum is None else float(self.momentum)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or not self.track_running_stats
        return use_batch, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _abn.check_input(x, self.num_features)
        use_batch, factor = self._factor_and_mode()
        running = (self.running_mean, self.running_var) if (
            not self.training or self.track_running_stats) else (None, None)
        x = F.batch_norm(x, running[0], running[1], self.weight, self.bias, use_batch, factor,
                         self.eps)
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, negative_slope=self.activation_param)
        if self.activation == "elu":
            return F.elu(x, alpha=self.activation_param)
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            # Checkpoints of the vendored In-Place ABN (SCHP, CE2P, OCNet) have no counter.
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        rep = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
               f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
               f"activation={self.activation}")
        if self.activation in ("leaky_relu", "elu"):
            rep += f", activation_param={self.activation_param}"
        return rep


class InPlaceABN(ABN):
    """:class:`ABN` computed in place (documented in-place op).

    ``forward(x)`` writes the result into ``x``'s storage and returns it; ``x`` must
    not be a leaf that requires grad, and the result must not be modified in place
    by a later op before backward (a clear RuntimeError says so if it is). Uses
    ``w~ = |weight| + eps`` so the affine map stays invertible. ``relu`` and a
    non-positive leaky_relu slope are rejected (not invertible). Non-contiguous
    and channels_last inputs work; they are processed through one contiguous
    temporary (an extra read and write of the tensor), then written back.
    """

    _inplace = True

    def _running(self):
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _abn.check_input(x, self.num_features)
        use_batch, factor = self._factor_and_mode()
        rm, rv = self._running()
        return _abn._inplace_abn(x, self.weight, self.bias, rm, rv, use_batch, factor, self.eps,
                                 self.activation, self.activation_param, False, None,
                                 type(self).__name__)


class InPlaceABNSync(InPlaceABN):
    """:class:`InPlaceABN` with batch statistics merged across ``group``
    (``None``: the default process group) in training.

    Exact for unequal per-rank batch sizes, including ranks with an empty batch
    (every rank must still call forward and backward). One all_gather in forward
    and one all_reduce in backward; weight and bias gradients stay local (DDP
    averages them). Without an initialised process group it warns once and
    behaves as :class:`InPlaceABN`. It refuses to run inside ``nn.DataParallel``
    replicas, whose statistics it could not synchronise.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "leaky_relu", activation_param: float = 0.01, group=None,
                 **legacy):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation,
                         activation_param, **legacy)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _abn.check_input(x, self.num_features)
        if self.training and getattr(self, "_is_replica", False):
            raise RuntimeError(
                "InPlaceABNSync cannot synchronise statistics across nn.DataParallel replicas; "
                "use DistributedDataParallel (one process per GPU), or InPlaceABN"
            )
        use_batch, factor = self._factor_and_mode()
        rm, rv = self._running()
        sync = use_batch and _abn.sync_active(self.group)
        return _abn._inplace_abn(x, self.weight, self.bias, rm, rv, use_batch, factor, self.eps,
                                 self.activation, self.activation_param, sync, self.group,
                                 type(self).__name__)
