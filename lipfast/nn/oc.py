"""OCNet's object-context modules on lipfast's fused attention op.

Drop-in versions of the modules of openseg-group/OCNet.pytorch (SPEC section 1):
same constructor signatures and defaults, same submodule names, ``nn.Sequential``
indices and state_dict keys, so OCNet / CE2P / SCHP checkpoints load unchanged
(they lack ``num_batches_tracked``; lipfast's ABN layers accept that).

- :class:`SelfAttentionBlock2D`: OCNet's self-attention block (optionally on a
  max-pooled map), attention by :func:`lipfast.ops.oc_attention`: the N x N
  similarity map is never materialised.
- :class:`BaseOCModule` (= :class:`OCModule`, OCNet's ``BaseOC_Module``) and
  :class:`BaseOCContextModule` (``BaseOC_Context_Module``).
- :class:`PyramidSelfAttentionBlock2D` and :class:`PyramidOCModule`
  (``Pyramid_OC_Module``): attention restricted to s x s pyramid regions, all
  regions in one op call.
- :class:`ASPOCModule` (``ASP_OC_Module``): the atrous-spatial-pyramid OC head,
  with OCNet's current (``5*out -> 2*out``) or the older (``5*out -> out``) head.

The attention blocks' ``attention`` attribute chooses how the attention runs:
``"fused"`` (default) calls :func:`lipfast.ops.oc_attention`; ``"torch"`` calls
:func:`attention_torch`, plain ``matmul`` / ``softmax`` / slicing that
``torch.export`` and the ONNX exporter handle (it materialises the N x N map of
each region; :func:`lipfast.models.fold_norms` switches folded models to it).

Every module takes ``norm_layer``: a callable ``num_features -> nn.Module``; ``None``
means :class:`lipfast.InPlaceABNSync` (leaky_relu, slope 0.01), OCNet's norm.
In-place norms are only ever applied to fresh convolution outputs.

Differences from OCNet, by design:

- The shared key/query projection (``f_key``; ``f_query`` is the same module) runs
  once per forward instead of twice. Outputs and gradients are the same; in
  training the norm's running statistics are updated once per step instead of
  twice (OCNet's behaviour is available with ``legacy_double_projection=True``).
- :class:`ASPOCModule` given a list/tuple runs on its first element (OCNet's
  result for such input is built from ``feat[0]`` of each branch).
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels._regions import pyramid_regions
from ..ops.oc_attention import oc_attention
from .abn import InPlaceABNSync

__all__ = [
    "attention_torch",
    "ATTENTION_PATHS",
    "SelfAttentionBlock2D",
    "PyramidSelfAttentionBlock2D",
    "BaseOCModule",
    "OCModule",
    "BaseOCContextModule",
    "PyramidOCModule",
    "ASPOCModule",
    "BaseOC_Module",
    "BaseOC_Context_Module",
    "Pyramid_OC_Module",
    "ASP_OC_Module",
]

NormLayer = Callable[[int], nn.Module]

#: values of the attention blocks' ``attention`` attribute
ATTENTION_PATHS = ("fused", "torch")


def _attend(q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """B x Cv x n: ``out[:, :, i] = sum_j softmax_j(scale * <q_i, q_j>) v[:, :, j]`` for
    B x C x n ``q`` and B x Cv x n ``v`` (float16/bfloat16: softmax in float32)."""
    sim = torch.matmul(q.transpose(1, 2), q) * scale            # B x n x n (query, key)
    if sim.dtype in (torch.float16, torch.bfloat16):
        p = torch.softmax(sim.float(), dim=-1).to(v.dtype)
    else:
        p = torch.softmax(sim, dim=-1)
    return torch.matmul(v, p.transpose(1, 2))                   # B x Cv x n


def _attend_tiles(qk: torch.Tensor, v: torch.Tensor, scale: float, nr: int,
                  nc: int) -> torch.Tensor:
    """Attention within each of the nr x nc equal tiles of B x C x H x W ``qk`` / ``v``
    (H = nr * th, W = nc * tw): the tiles go to the batch dimension, one batched
    attention, and back (reshape / permute only)."""
    h, w = qk.shape[2], qk.shape[3]
    th, tw = h // nr, w // nc

    def split(t):
        c = t.shape[1]
        return (t.reshape(-1, c, nr, th, nc, tw).permute(0, 2, 4, 1, 3, 5)
                .reshape(-1, c, th * tw))

    out = _attend(split(qk), split(v), scale)           # (B nr nc) x Cv x (th tw)
    cv = v.shape[1]
    return (out.reshape(-1, nr, nc, cv, th, tw).permute(0, 3, 1, 4, 2, 5)
            .reshape(-1, cv, h, w))


def attention_torch(qk: torch.Tensor, v: torch.Tensor, scale: float,
                    regions: int = 0) -> torch.Tensor:
    """:func:`lipfast.ops.oc_attention`'s output (not its log-sum-exp) in plain PyTorch:
    B x Cv x H x W with ``out[b, :, n] = sum_m softmax_m(scale * <qk_n, qk_m>) v[b, :, m]``
    over the H*W positions, or, for ``regions = s > 1``, within each of the s x s
    pyramid regions of :func:`lipfast.ops.pyramid_regions` (the regions of equal
    size are batched: at most four attention calls, the interior regions, the
    last row, the last column and the corner, reassembled with ``torch.cat``).

    Written with ``matmul`` / ``softmax`` / slicing / reshapes only, so
    ``torch.export`` and ``torch.onnx.export`` trace it (H, W and ``regions`` are
    Python ints in the graph; the batch may be dynamic). Unlike the fused op it
    builds each region's n x n score matrix (float32 for float16/bfloat16 inputs):
    meant for export and inference, not for large maps in training."""
    if qk.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention_torch expects B x C x H x W tensors, got qk "
                         f"{tuple(qk.shape)} and v {tuple(v.shape)}")
    h, w = qk.shape[2], qk.shape[3]
    if v.shape[2] != h or v.shape[3] != w:
        raise ValueError(f"attention_torch: qk {tuple(qk.shape)} and v {tuple(v.shape)} must "
                         "share the spatial size")
    if regions > 1 and (regions > h or regions > w):
        raise ValueError(f"attention_torch: {regions} x {regions} pyramid regions do not fit a "
                         f"{h} x {w} map")
    if regions <= 1:
        return _attend(qk.flatten(2), v.flatten(2), scale).reshape(v.shape)
    s = regions
    table = pyramid_regions(h, w, s)
    top, left = table[-1][0], table[-1][2]      # where the last row / column of regions start
    blocks = []
    for r0, r1, nr in ((0, top, s - 1), (top, h, 1)):
        row = [_attend_tiles(qk[:, :, r0:r1, c0:c1], v[:, :, r0:r1, c0:c1], scale, nr, nc)
               for c0, c1, nc in ((0, left, s - 1), (left, w, 1))]
        blocks.append(torch.cat(row, dim=3))
    return torch.cat(blocks, dim=2)


def _norm(norm_layer: NormLayer | None) -> NormLayer:
    return InPlaceABNSync if norm_layer is None else norm_layer


def _positive_int(value, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


def _dropout(value, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: dropout must be a number in [0, 1], got "
                        f"{type(value).__name__}")
    if not 0 <= value <= 1:
        raise ValueError(f"{owner}: dropout must be in [0, 1], got {float(value)}")
    return float(value)


def _sizes(sizes, owner: str) -> list[int]:
    if isinstance(sizes, int):
        sizes = [sizes]
    sizes = list(sizes)
    if not sizes:
        raise ValueError(f"{owner}: sizes must name at least one scale")
    return [_positive_int(s, "every entry of sizes", owner) for s in sizes]


def _check_input(x, in_channels: int, ref: torch.Tensor, owner: str) -> None:
    """4D, ``in_channels`` channels, and the dtype/device of the module's parameters
    (a dtype mismatch is allowed under autocast, which casts for the convolutions)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects a tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{owner} expects a 4D B x C x H x W input, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{owner} expects {in_channels} input channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )
    if x.device != ref.device:
        raise ValueError(
            f"{owner}: the input is on {x.device} but the module's parameters are on "
            f"{ref.device}"
        )
    if x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{owner}: the input has dtype {x.dtype} but the module's parameters have dtype "
            f"{ref.dtype}; convert the module or the input (or run under autocast)"
        )


class _SelfAttentionBase(nn.Module):
    """Shared layers of the OCNet attention blocks (``f_key``, ``f_query``,
    ``f_value``, ``W``); subclasses add ``pool`` first where they have one.

    ``attention`` (attribute, settable at any time): ``"fused"`` (default) runs
    :func:`lipfast.ops.oc_attention`, ``"torch"`` runs :func:`attention_torch`
    (plain PyTorch ops, for ``torch.export`` / ONNX; same values within rounding)."""

    @property
    def attention(self) -> str:
        return getattr(self, "_attention", "fused")

    @attention.setter
    def attention(self, value: str) -> None:
        if value not in ATTENTION_PATHS:
            raise ValueError(f"{type(self).__name__}: attention must be one of "
                             f"{ATTENTION_PATHS}, got {value!r}")
        self._attention = value

    def _attend(self, qk: torch.Tensor, v: torch.Tensor, regions: int = 0) -> torch.Tensor:
        scale = self.key_channels ** -0.5
        if self.attention == "torch":
            return attention_torch(qk, v, scale, regions)
        if regions:
            return oc_attention(qk, v, scale, regions=regions)
        return oc_attention(qk, v, scale)

    def _init_projections(self, in_channels, key_channels, value_channels, out_channels,
                          scale, legacy_double_projection):
        owner = type(self).__name__
        self.in_channels = _positive_int(in_channels, "in_channels", owner)
        self.key_channels = _positive_int(key_channels, "key_channels", owner)
        self.value_channels = _positive_int(value_channels, "value_channels", owner)
        self.out_channels = in_channels if out_channels is None else _positive_int(
            out_channels, "out_channels", owner)
        self.scale = _positive_int(scale, "scale", owner)
        self.legacy_double_projection = bool(legacy_double_projection)

    def _make_layers(self, norm_layer):
        norm = _norm(norm_layer)
        self.f_key = nn.Sequential(
            nn.Conv2d(self.in_channels, self.key_channels, kernel_size=1, stride=1, padding=0,
                      bias=True),
            norm(self.key_channels),
        )
        self.f_query = self.f_key
        self.f_value = nn.Conv2d(self.in_channels, self.value_channels, kernel_size=1, stride=1,
                                 padding=0, bias=True)
        self.W = nn.Conv2d(self.value_channels, self.out_channels, kernel_size=1, stride=1,
                           padding=0, bias=True)
        nn.init.constant_(self.W.weight, 0)
        nn.init.constant_(self.W.bias, 0)

    def _qk(self, x: torch.Tensor) -> torch.Tensor:
        if self.legacy_double_projection:
            # OCNet: query = f_query(x); key = f_key(x) -- the same module twice. The
            # values are identical; only the norm's running statistics see two updates.
            self.f_query(x)
            return self.f_key(x)
        return self.f_key(x)

    def extra_repr(self) -> str:
        rep = (f"in_channels={self.in_channels}, key_channels={self.key_channels}, "
               f"value_channels={self.value_channels}, out_channels={self.out_channels}, "
               f"scale={self.scale}")
        if self.legacy_double_projection:
            rep += ", legacy_double_projection=True"
        if self.attention != "fused":
            rep += f", attention={self.attention!r}"
        return rep


class SelfAttentionBlock2D(_SelfAttentionBase):
    """OCNet's object-context self-attention block.

    ``forward(x)``: if ``scale > 1`` max-pool ``x`` with kernel = stride = scale
    (floor: trailing rows/cols that do not fill a window are dropped); ``qk = f_key(x)``
    (conv 1x1 + norm), ``v = f_value(x)`` (conv 1x1); context =
    ``softmax(qk^T qk * key_channels**-0.5) v`` over all positions (fused op,
    no N x N map kept); ``W`` (conv 1x1, zero-initialised); if ``scale > 1``
    bilinear upsampling (``align_corners=True``) back to the input size.

    Args:
        in_channels, key_channels, value_channels: channel counts.
        out_channels: output channels, default ``in_channels``.
        scale: pooling factor (1: none). Must not exceed the input's height or width.
        norm_layer: callable ``num_features -> nn.Module`` for the key projection;
            default :class:`lipfast.InPlaceABNSync`.
        legacy_double_projection: OCNet calls the shared ``f_key``/``f_query`` twice
            per forward (query, then key). lipfast calls it once by default. Outputs
            and gradients are identical either way; only in training the norm's
            running statistics (and ``num_batches_tracked``) are updated twice per
            forward with ``True`` (as in OCNet: momentum m applied twice, i.e. an
            effective ``1 - (1 - m)**2``) and once with ``False``. Set it to
            reproduce OCNet's running statistics exactly.

    Attributes (OCNet's, in order): ``pool``, ``f_key``, ``f_query`` (the same module
    as ``f_key``: the state_dict carries both key sets), ``f_value``, ``W``.
    """

    def __init__(self, in_channels: int, key_channels: int, value_channels: int,
                 out_channels: int | None = None, scale: int = 1,
                 norm_layer: NormLayer | None = None, legacy_double_projection: bool = False):
        super().__init__()
        self._init_projections(in_channels, key_channels, value_channels, out_channels, scale,
                               legacy_double_projection)
        self.pool = nn.MaxPool2d(kernel_size=(self.scale, self.scale))
        self._make_layers(norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = type(self).__name__
        _check_input(x, self.in_channels, self.f_value.weight, owner)
        h, w = x.shape[2], x.shape[3]
        if self.scale > 1:
            if self.scale > h or self.scale > w:
                raise ValueError(
                    f"{owner}: pooling scale {self.scale} is larger than the {h} x {w} input "
                    "map (the scale must not exceed the map's height or width)"
                )
            x = self.pool(x)
        v = self.f_value(x)
        qk = self._qk(x)
        context = self._attend(qk, v)
        context = self.W(context)
        if self.scale > 1:
            context = F.interpolate(context, size=(h, w), mode="bilinear", align_corners=True)
        return context


class PyramidSelfAttentionBlock2D(_SelfAttentionBase):
    """OCNet's pyramid self-attention block: attention restricted to the
    ``scale x scale`` regions of the map (step ``H // scale`` rows and ``W // scale``
    columns; the last row/column of regions absorbs the remainder), computed for
    all regions in one fused op call; then ``W`` on the whole map. No pooling.

    Same arguments, attributes (except ``pool``) and ``legacy_double_projection``
    semantics as :class:`SelfAttentionBlock2D`; ``scale`` must not exceed the
    input's height or width.
    """

    def __init__(self, in_channels: int, key_channels: int, value_channels: int,
                 out_channels: int | None = None, scale: int = 1,
                 norm_layer: NormLayer | None = None, legacy_double_projection: bool = False):
        super().__init__()
        self._init_projections(in_channels, key_channels, value_channels, out_channels, scale,
                               legacy_double_projection)
        self._make_layers(norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = type(self).__name__
        _check_input(x, self.in_channels, self.f_value.weight, owner)
        h, w = x.shape[2], x.shape[3]
        if self.scale > h or self.scale > w:
            raise ValueError(
                f"{owner}: {self.scale} x {self.scale} pyramid regions do not fit a {h} x {w} "
                "map (the scale must not exceed the map's height or width)"
            )
        v = self.f_value(x)
        qk = self._qk(x)
        context = self._attend(qk, v, regions=self.scale)
        return self.W(context)


class _BaseOC(nn.Module):
    """Stages shared by :class:`BaseOCModule` and :class:`BaseOCContextModule`."""

    def __init__(self, in_channels: int, out_channels: int, key_channels: int,
                 value_channels: int, dropout: float, sizes: Sequence[int] = (1,),
                 norm_layer: NormLayer | None = None, legacy_double_projection: bool = False):
        super().__init__()
        owner = type(self).__name__
        self.in_channels = _positive_int(in_channels, "in_channels", owner)
        self.out_channels = _positive_int(out_channels, "out_channels", owner)
        sizes = _sizes(sizes, owner)
        dropout = _dropout(dropout, owner)
        self.stages = nn.ModuleList([
            SelfAttentionBlock2D(in_channels, key_channels, value_channels, out_channels, size,
                                 norm_layer=norm_layer,
                                 legacy_double_projection=legacy_double_projection)
            for size in sizes
        ])
        self.conv_bn_dropout = self._make_head(_norm(norm_layer), dropout)

    def _make_head(self, norm: NormLayer, dropout: float) -> nn.Sequential:
        raise NotImplementedError

    def _context(self, feats: torch.Tensor) -> torch.Tensor:
        _check_input(feats, self.in_channels, self.conv_bn_dropout[0].weight,
                     type(self).__name__)
        context = None
        for stage in self.stages:
            prior = stage(feats)
            context = prior if context is None else context + prior
        return context


class BaseOCModule(_BaseOC):
    """OCNet's ``BaseOC_Module``: ``conv_bn_dropout(cat([sum_s stage_s(x), x], 1))``.

    ``stages`` = one :class:`SelfAttentionBlock2D` ``(in, key, value, out, size)``
    per entry of ``sizes``; ``conv_bn_dropout`` = Conv2d(2*in, out, 1) -> norm(out)
    -> Dropout2d(dropout). Like OCNet's, it is only consistent when
    ``out_channels == in_channels`` (the stages produce ``out`` channels that are
    concatenated with the ``in``-channel input into a ``2*in``-channel conv).
    ``norm_layer`` and ``legacy_double_projection``: see :class:`SelfAttentionBlock2D`.
    """

    def _make_head(self, norm: NormLayer, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(2 * self.in_channels, self.out_channels, kernel_size=1, padding=0,
                      bias=True),
            norm(self.out_channels),
            nn.Dropout2d(dropout),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        context = self._context(feats)
        return self.conv_bn_dropout(torch.cat([context, feats], 1))


class BaseOCContextModule(_BaseOC):
    """OCNet's ``BaseOC_Context_Module``: ``conv_bn_dropout(sum_s stage_s(x))`` with
    ``conv_bn_dropout`` = Conv2d(in, out, 1) -> norm(out) (no dropout: the
    ``dropout`` argument is accepted and unused, as in OCNet, but must still be in
    [0, 1]). Same signature and
    stages as :class:`BaseOCModule`."""

    def _make_head(self, norm: NormLayer, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(self.in_channels, self.out_channels, kernel_size=1, padding=0, bias=True),
            norm(self.out_channels),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv_bn_dropout(self._context(feats))


class PyramidOCModule(nn.Module):
    """OCNet's ``Pyramid_OC_Module``.

    ``stages`` = :class:`PyramidSelfAttentionBlock2D` ``(in, in // 2, in, out, size)``
    per entry of ``sizes``; ``conv_bn_dropout`` = Conv2d(2*in*G, out, 1) -> norm(out)
    -> Dropout2d(dropout) with G = len(sizes); ``up_dr`` = Conv2d(in, in*G, 1) ->
    norm(in*G). ``forward(x) = conv_bn_dropout(cat([up_dr(x), stage_1(x), ...], 1))``
    (consistent when ``out_channels == in_channels``, as in OCNet).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float,
                 sizes: Sequence[int] = (1,), norm_layer: NormLayer | None = None,
                 legacy_double_projection: bool = False):
        super().__init__()
        owner = type(self).__name__
        self.in_channels = _positive_int(in_channels, "in_channels", owner)
        self.out_channels = _positive_int(out_channels, "out_channels", owner)
        sizes = _sizes(sizes, owner)
        dropout = _dropout(dropout, owner)
        if in_channels < 2:
            raise ValueError(f"{owner}: in_channels must be >= 2 (key channels = in // 2)")
        norm = _norm(norm_layer)
        self.group = len(sizes)
        self.stages = nn.ModuleList([
            PyramidSelfAttentionBlock2D(in_channels, in_channels // 2, in_channels, out_channels,
                                        size, norm_layer=norm_layer,
                                        legacy_double_projection=legacy_double_projection)
            for size in sizes
        ])
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(2 * in_channels * self.group, out_channels, kernel_size=1, padding=0,
                      bias=True),
            norm(out_channels),
            nn.Dropout2d(dropout),
        )
        self.up_dr = nn.Sequential(
            nn.Conv2d(in_channels, in_channels * self.group, kernel_size=1, padding=0, bias=True),
            norm(in_channels * self.group),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        owner = type(self).__name__
        _check_input(feats, self.in_channels, self.up_dr[0].weight, owner)
        h, w = feats.shape[2], feats.shape[3]
        largest = max(stage.scale for stage in self.stages)
        if largest > h or largest > w:
            raise ValueError(
                f"{owner}: {largest} x {largest} pyramid regions do not fit a {h} x {w} map "
                "(every entry of sizes must not exceed the map's height or width)"
            )
        priors = [self.up_dr(feats)] + [stage(feats) for stage in self.stages]
        return self.conv_bn_dropout(torch.cat(priors, 1))


class ASPOCModule(nn.Module):
    """OCNet's ``ASP_OC_Module``: object context plus atrous spatial pyramid.

    Branches: ``context`` = Conv2d(features, out, 3, padding=1) -> norm(out) ->
    :class:`BaseOCContextModule` ``(out, out, out // 2, out, 0, [2])``; ``conv2`` =
    Conv2d(features, out, 1) -> norm; ``conv3``/``conv4``/``conv5`` = 3x3 convs with
    dilation and padding ``d`` for ``d`` in ``dilations`` -> norm. ``conv_bn_dropout``
    = Conv2d(5*out, H, 1) -> norm(H) -> Dropout2d(0.1) with ``H = 2*out`` for
    ``head="current"`` (current OCNet) or ``H = out`` for ``head="legacy"`` (older
    OCNet and SCHP's copy); both layouts exist in released checkpoints.

    ``forward(x)`` concatenates the five branches and applies ``conv_bn_dropout``.
    A list/tuple input is accepted as OCNet does; OCNet's result is built from the
    first element's branch outputs (``feat[0]``), so lipfast runs on ``x[0]``.
    """

    def __init__(self, features: int, out_features: int = 256,
                 dilations: Sequence[int] = (12, 24, 36), head: str = "current",
                 norm_layer: NormLayer | None = None, legacy_double_projection: bool = False):
        super().__init__()
        owner = type(self).__name__
        if head not in ("current", "legacy"):
            raise ValueError(f"{owner}: head must be 'current' or 'legacy', got {head!r}")
        self.features = _positive_int(features, "features", owner)
        self.out_features = _positive_int(out_features, "out_features", owner)
        dilations = tuple(dilations)
        if len(dilations) != 3:
            raise ValueError(f"{owner}: dilations must have 3 entries, got {dilations!r}")
        for d in dilations:
            _positive_int(d, "every dilation", owner)
        if out_features < 2:
            raise ValueError(f"{owner}: out_features must be >= 2 (key channels = out // 2)")
        self.dilations = dilations
        self.head = head
        norm = _norm(norm_layer)
        out = out_features
        self.context = nn.Sequential(
            nn.Conv2d(features, out, kernel_size=3, padding=1, dilation=1, bias=True),
            norm(out),
            BaseOCContextModule(out, out, out // 2, out, 0, [2], norm_layer=norm_layer,
                                legacy_double_projection=legacy_double_projection),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(features, out, kernel_size=1, padding=0, dilation=1, bias=False),
            norm(out),
        )
        self.conv3 = nn.Sequential(
            nn.Conv2d(features, out, kernel_size=3, padding=dilations[0], dilation=dilations[0],
                      bias=False),
            norm(out),
        )
        self.conv4 = nn.Sequential(
            nn.Conv2d(features, out, kernel_size=3, padding=dilations[1], dilation=dilations[1],
                      bias=False),
            norm(out),
        )
        self.conv5 = nn.Sequential(
            nn.Conv2d(features, out, kernel_size=3, padding=dilations[2], dilation=dilations[2],
                      bias=False),
            norm(out),
        )
        head_out = 2 * out if head == "current" else out
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(out * 5, head_out, kernel_size=1, padding=0, dilation=1, bias=False),
            norm(head_out),
            nn.Dropout2d(0.1),
        )

    def forward(self, x) -> torch.Tensor:
        owner = type(self).__name__
        if isinstance(x, (list, tuple)):
            if len(x) == 0:
                raise ValueError(f"{owner}: got an empty {type(x).__name__} as input")
            x = x[0]
        _check_input(x, self.features, self.conv2[0].weight, owner)
        feat1 = self.context(x)
        feat2 = self.conv2(x)
        feat3 = self.conv3(x)
        feat4 = self.conv4(x)
        feat5 = self.conv5(x)
        return self.conv_bn_dropout(torch.cat([feat1, feat2, feat3, feat4, feat5], 1))

    def extra_repr(self) -> str:
        return f"head={self.head!r}"


# OCNet's names.
OCModule = BaseOCModule
BaseOC_Module = BaseOCModule
BaseOC_Context_Module = BaseOCContextModule
Pyramid_OC_Module = PyramidOCModule
ASP_OC_Module = ASPOCModule
