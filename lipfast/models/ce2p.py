"""The reference human-parsing network: CE2P / SCHP's "AugmentCE2P" (SPEC section 5).

:class:`CE2P` is a ResNet-101 with the deep stem, a context module on layer4
(PSP as in CE2P/SCHP, or one of OCNet's object-context heads), the parsing
decoder, the edge branch and the fusion head. ``forward(x)`` returns
``[[parsing, fusion], [edge]]`` at 1/4 of the input resolution, as upstream.

With ``context="psp"`` and ``output_stride=16`` the module names, ``Sequential``
indices and state_dict keys are those of SCHP's released ``AugmentCE2P``
(``conv1 .. relu3, maxpool, layer1..4, context_encoding.stages.k.{1,2},
context_encoding.bottleneck.{0,1}, decoder.conv1..4, edge.conv1..5,
fushion.{0,1,3}``), so SCHP's LIP checkpoint loads strictly through
:func:`lipfast.models.load_checkpoint` (checkpoints from the vendored ABN have
no ``num_batches_tracked``; lipfast's norms accept that).

OC contexts (OCNet's ResNet-101 heads, under ``context_encoding``; the head's
output, 512 channels, feeds the decoder as PSP's does):

- ``"base_oc"``: ``Sequential(Conv2d(2048, 512, 3, padding=1, bias=True), norm(512),
  BaseOC_Module(512, 512, 256, 256, 0.05, [1]))`` (OCNet's ``context.*`` keys as
  ``context_encoding.*``).
- ``"pyramid_oc"``: ``Sequential(Conv2d(2048, 512, 3, padding=1, bias=True), norm(512),
  Pyramid_OC_Module(512, 512, 0.05, [1, 2, 3, 6]))``; OCNet keeps the first two
  as ``layer5.{0,1}`` and the module as ``context``: they map to
  ``context_encoding.{0,1}`` and ``context_encoding.2``.
- ``"asp_oc"``: ``Sequential(Conv2d(2048, 512, 3, padding=1, bias=True), norm(512),
  ASP_OC_Module(512, 256, dilations=(12, 24, 36)))`` with the current
  ``5*256 -> 512`` head.

The OC modules are :mod:`lipfast.nn.oc`'s (fused attention, no N x N map).

Norms (``norm=``):

- ``"inplace_abn_sync"`` (default, SCHP's) / ``"inplace_abn"``: lipfast's
  In-Place ABN. In the backbone the norm has the identity activation and is
  followed by a plain ReLU (SCHP's ``partial(InPlaceABNSync, activation='none')``);
  everywhere else it is leaky_relu(0.01), SCHP's default. Note the in-place
  layers scale by ``|w| + eps`` (mapillary's invertible affine map).
- ``"batchnorm"``: ``nn.BatchNorm2d`` (a subclass applying LeakyReLU(0.01) where
  the ABN has that activation), the reference stack without lipfast's norm
  kernels. state_dict keys are identical for all three, so checkpoints move
  between norms.

``output_stride=16``: layer3 stride 2, layer4 stride 1 dilation 2 (CE2P/SCHP).
``output_stride=8``: layer3 stride 1 dilation 2, layer4 dilation 4 (OCNet).

``layers`` (Bottleneck counts, default ResNet-101's ``(3, 4, 23, 3)``) and
``width_mult`` (every hidden width multiplied and rounded, at least 1) make
small models for tests and smoke runs; the full-size defaults are SCHP's.

Mixed precision: under CUDA autocast the norms run on float16/bfloat16
activations directly; under CPU autocast (bfloat16) lipfast's CPU norm kernels
need float32, so hooks on each in-place norm hand it a float32 copy and cast
its output back to the autocast dtype (one extra copy each way).

Backbone memory (``fuse_relu_conv``, on by default with the in-place norms):
where a backbone ReLU feeds a convolution directly (the stem's relu1 -> conv2
and relu2 -> conv3, every Bottleneck's relu(bn1) -> conv2 and relu(bn2) ->
conv3) the pair runs as :func:`lipfast.ops.relu_conv2d`, which saves the norm's
output ``y`` (kept alive by the in-place norm anyway) instead of ``relu(y)`` and
recomputes the ReLU in backward: one activation-sized tensor less per pair, the
same values and gradients. The modules (``relu``, ``relu1``, ``relu2``,
``conv*``) and state_dict keys stay as they are; only ``forward`` changes (so
forward hooks on those ReLU modules do not fire while fused). relu3 feeds the
max-pool and stays a plain ReLU. With ``norm="batchnorm"`` the plain ReLU +
conv runs (BatchNorm saves its input, so the fusion would not save anything).

Inference and export: :meth:`CE2P.for_inference` returns a copy with every norm
folded into its convolution (:func:`lipfast.models.fold_norms`), the ReLU ->
conv fusion off and the OC attention in plain PyTorch: no lipfast op, the same
outputs within float rounding, ready for ``torch.export`` / ONNX
(``python -m lipfast.export``).

Input: B x 3 x H x W, BGR in [0, 1] normalised with :data:`LIP_MEAN` /
:data:`LIP_STD` (SCHP's ImageNet settings). Differences from upstream: none in
the computation; the ReLUs after the backbone norms are out of place (required
by the in-place norms' backward, which reads their output).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.abn import InPlaceABN, InPlaceABNSync
from ..nn.oc import ASPOCModule, BaseOCModule, PyramidOCModule
from ..ops.relu_conv import relu_conv2d

__all__ = ["CE2P", "Bottleneck", "BatchNormAct", "LIP_MEAN", "LIP_STD", "CONTEXTS", "NORMS"]

#: SCHP's input normalisation: BGR channel order, values in [0, 1].
LIP_MEAN = (0.406, 0.456, 0.485)
LIP_STD = (0.225, 0.224, 0.229)

CONTEXTS = ("psp", "base_oc", "pyramid_oc", "asp_oc")
NORMS = ("inplace_abn_sync", "inplace_abn", "batchnorm")


class BatchNormAct(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by leaky_relu (the ``norm="batchnorm"`` stand-in for
    an ABN with activation): one module, so the state_dict keys are the ABN's."""

    def __init__(self, num_features: int, activation_param: float = 0.01, **kwargs):
        super().__init__(num_features, **kwargs)
        self.activation_param = float(activation_param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(super().forward(x), self.activation_param)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", leaky_relu={self.activation_param}"


def _norms(norm: str) -> tuple[Callable[[int], nn.Module], Callable[[int], nn.Module]]:
    """(backbone norm without activation, norm + leaky_relu(0.01)) for ``norm``."""
    if norm == "batchnorm":
        return nn.BatchNorm2d, BatchNormAct
    cls = {"inplace_abn_sync": InPlaceABNSync, "inplace_abn": InPlaceABN}[norm]

    def plain(c):
        return cls(c, activation="identity")

    def act(c):
        return cls(c, activation="leaky_relu", activation_param=0.01)

    return plain, act


def _float_on_cpu(module: nn.Module, args):
    """Forward pre-hook on the in-place norms: lipfast's ABN CPU kernels take float32
    and float64, so bfloat16/float16 activations (CPU autocast) go in as float32 (the
    next convolution casts back under autocast). GPU inputs are left as they are."""
    x = args[0]
    if (isinstance(x, torch.Tensor) and x.device.type == "cpu"
            and x.dtype in (torch.bfloat16, torch.float16)):
        return (x.float(),) + tuple(args[1:])
    return None


def _back_to_autocast_dtype(module: nn.Module, args, output):
    """Forward hook paired with :func:`_float_on_cpu`: under CPU autocast the norm's
    float32 output goes back to the autocast dtype, as every other activation is
    (the OC attention takes its key and value projections in one dtype)."""
    if (isinstance(output, torch.Tensor) and output.device.type == "cpu"
            and output.dtype == torch.float32 and torch.is_autocast_enabled("cpu")):
        return output.to(torch.get_autocast_dtype("cpu"))
    return None


def _relu_conv(fuse: bool, relu: nn.Module, conv: nn.Conv2d, y: torch.Tensor) -> torch.Tensor:
    """``conv(relu(y))``; with ``fuse`` as :func:`lipfast.ops.relu_conv2d` (saves ``y``,
    which the in-place norm in front keeps anyway, instead of ``relu(y)``)."""
    if not fuse:
        return conv(relu(y))
    return relu_conv2d(y, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                       conv.groups)


def add_cpu_autocast_hooks(model: nn.Module) -> None:
    """:func:`_float_on_cpu` / :func:`_back_to_autocast_dtype` on every in-place norm
    of ``model`` (CE2P's and HRNetV2's constructors call it last)."""
    for m in model.modules():
        if isinstance(m, InPlaceABN):
            m.register_forward_pre_hook(_float_on_cpu)
            m.register_forward_hook(_back_to_autocast_dtype)


def oc_context(context: str, in_channels: int, ctx: int, mid: int,
               act: Callable[[int], nn.Module]) -> tuple[nn.Sequential, int]:
    """OCNet's context head as CE2P holds it under ``context_encoding``:
    ``Sequential(Conv2d(in_channels, ctx, 3, padding=1, bias=True), act(ctx), OC
    module)`` with the module of ``context`` (``"base_oc"``: Base-OC with key /
    value widths ``mid``; ``"pyramid_oc"``: Pyramid-OC over 1, 2, 3, 6 regions;
    ``"asp_oc"``: ASP-OC with ``mid`` channels per branch, dilations 12, 24, 36),
    and its output channels (``ctx``, or ``2 * mid`` for ASP-OC)."""
    if context == "base_oc":
        oc, out = BaseOCModule(ctx, ctx, mid, mid, 0.05, [1], norm_layer=act), ctx
    elif context == "pyramid_oc":
        oc, out = PyramidOCModule(ctx, ctx, 0.05, [1, 2, 3, 6], norm_layer=act), ctx
    elif context == "asp_oc":
        oc = ASPOCModule(ctx, mid, (12, 24, 36), head="current", norm_layer=act)
        out = 2 * mid
    else:
        raise ValueError(f"oc_context: context must be 'base_oc', 'pyramid_oc' or 'asp_oc', "
                         f"got {context!r}")
    return nn.Sequential(nn.Conv2d(in_channels, ctx, 3, padding=1, bias=True), act(ctx), oc), out


def fusion_head(mid: int, num_classes: int, act: Callable[[int], nn.Module]) -> nn.Sequential:
    """CE2P's ``fushion``: on the decoder's (``mid``) and the edge branch's (``3 mid``)
    features, 1x1 conv to ``mid``, norm, Dropout2d(0.1), 1x1 conv (bias) to the classes."""
    return nn.Sequential(
        nn.Conv2d(mid + 3 * mid, mid, 1, bias=False),
        act(mid),
        nn.Dropout2d(0.1),
        nn.Conv2d(mid, num_classes, 1, bias=True),
    )


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4) with SCHP's attribute names; the stride is on
    the 3x3 convolution, ``dilation`` on the 3x3 too. ``fuse_relu_conv`` (attribute,
    may be changed at any time): run relu -> conv2 and relu -> conv3 as
    :func:`lipfast.ops.relu_conv2d` (same values and gradients, less memory after an
    in-place norm)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm: Callable[[int], nn.Module] = None,
                 fuse_relu_conv: bool = False):
        super().__init__()
        self.fuse_relu_conv = bool(fuse_relu_conv)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=False)
        self.relu_inplace = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fuse = self.fuse_relu_conv
        out = _relu_conv(fuse, self.relu, self.conv2, self.bn1(self.conv1(x)))
        out = _relu_conv(fuse, self.relu, self.conv3, self.bn2(out))
        out = self.bn3(out)
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu_inplace(out + residual)  # the sum is a fresh tensor


class PSPModule(nn.Module):
    """CE2P/SCHP's pyramid pooling context: ``stages[k]`` = (AdaptiveAvgPool2d(s),
    Conv2d(features, out, 1), norm) for s in ``sizes``, each upsampled back
    (align_corners=True); ``bottleneck`` = (Conv2d(features + len(sizes)*out, out, 3,
    padding=1), norm) on ``cat(priors + [feats])``."""

    def __init__(self, features: int, out_features: int, sizes: Sequence[int] = (1, 2, 3, 6),
                 norm: Callable[[int], nn.Module] = None):
        super().__init__()
        self.stages = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d((s, s)),
                          nn.Conv2d(features, out_features, kernel_size=1, bias=False),
                          norm(out_features))
            for s in sizes
        ])
        self.bottleneck = nn.Sequential(
            nn.Conv2d(features + len(sizes) * out_features, out_features, kernel_size=3,
                      padding=1, bias=False),
            norm(out_features),
        )
        self.out_channels = out_features

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        size = feats.shape[2:]
        priors = [_up(stage(feats), size) for stage in self.stages] + [feats]
        return self.bottleneck(torch.cat(priors, 1))


class EdgeModule(nn.Module):
    """CE2P's edge branch: 1x1 conv + norm on layer1/2/3 features, one shared 3x3
    ``conv4`` to 2 edge logits on each, upsampled to layer1's size, ``conv5`` (1x1)
    fusing the three. Returns (edge logits, concatenated edge features)."""

    def __init__(self, in_fea: Sequence[int], mid_fea: int, out_fea: int = 2,
                 norm: Callable[[int], nn.Module] = None):
        super().__init__()
        for i, c in enumerate(in_fea, 1):
            setattr(self, f"conv{i}", nn.Sequential(
                nn.Conv2d(c, mid_fea, kernel_size=1, bias=False), norm(mid_fea)))
        self.conv4 = nn.Conv2d(mid_fea, out_fea, kernel_size=3, padding=1, bias=True)
        self.conv5 = nn.Conv2d(out_fea * 3, out_fea, kernel_size=1, bias=True)

    def forward(self, x1, x2, x3):
        size = x1.shape[2:]
        f1, f2, f3 = self.conv1(x1), self.conv2(x2), self.conv3(x3)
        e1, e2, e3 = self.conv4(f1), self.conv4(f2), self.conv4(f3)
        f2, f3, e2, e3 = _up(f2, size), _up(f3, size), _up(e2, size), _up(e3, size)
        edge = self.conv5(torch.cat([e1, e2, e3], 1))
        return edge, torch.cat([f1, f2, f3], 1)


class DecoderModule(nn.Module):
    """CE2P's parsing decoder: context -> ``conv1`` (1x1 + norm), upsampled to layer1's
    size; layer1 -> ``conv2`` (1x1 + norm); ``conv3`` = two (1x1 + norm) on the
    concatenation; ``conv4`` = 1x1 to the classes. Returns (logits, features)."""

    def __init__(self, in_channels: int, low_channels: int, num_classes: int, mid: int,
                 low_mid: int, norm: Callable[[int], nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), norm(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(low_channels, low_mid, 1, bias=False), norm(low_mid))
        self.conv3 = nn.Sequential(
            nn.Conv2d(mid + low_mid, mid, 1, bias=False), norm(mid),
            nn.Conv2d(mid, mid, 1, bias=False), norm(mid),
        )
        self.conv4 = nn.Conv2d(mid, num_classes, 1, bias=True)

    def forward(self, xt, xl):
        xt = _up(self.conv1(xt), xl.shape[2:])
        x = self.conv3(torch.cat([xt, self.conv2(xl)], 1))
        return self.conv4(x), x


def _int_arg(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"CE2P: {name} must be an int >= {low}, got {value!r}")
    return value


class CE2P(nn.Module):
    """CE2P / SCHP parsing network (see the module docstring).

    Args:
        num_classes: parsing classes (LIP: 20).
        context: ``"psp"`` (CE2P/SCHP), ``"base_oc"``, ``"pyramid_oc"`` or ``"asp_oc"`` (OCNet).
        output_stride: 16 (CE2P/SCHP) or 8 (OCNet).
        norm: ``"inplace_abn_sync"``, ``"inplace_abn"`` or ``"batchnorm"``.
        layers: Bottleneck counts of layer1..4 (ResNet-101: ``(3, 4, 23, 3)``).
        width_mult: factor on every hidden width (``max(1, round(c * width_mult))``).
        fuse_relu_conv: run the backbone's ReLU -> conv pairs as
            :func:`lipfast.ops.relu_conv2d` (same values and gradients; autograd keeps
            the in-place norm's output instead of the ReLU output). ``None``
            (default): on for the in-place norms, off for ``"batchnorm"`` (BatchNorm
            saves its input, so there it would save nothing). Also an attribute.

    ``forward(x)`` (B x 3 x H x W) returns ``[[parsing, fusion], [edge]]``:
    B x num_classes x h x w twice and B x 2 x h x w, h x w = layer1's size
    (``ceil(ceil(H / 2) / 2)``, about H / 4).
    """

    input_order = "BGR"
    input_mean = LIP_MEAN
    input_std = LIP_STD

    def __init__(self, num_classes: int = 20, context: str = "psp", output_stride: int = 16,
                 norm: str = "inplace_abn_sync", layers: Sequence[int] = (3, 4, 23, 3),
                 width_mult: float = 1.0, fuse_relu_conv: bool | None = None):
        super().__init__()
        num_classes = _int_arg(num_classes, "num_classes")
        if context not in CONTEXTS:
            raise ValueError(f"CE2P: context must be one of {CONTEXTS}, got {context!r}")
        if output_stride not in (8, 16) or isinstance(output_stride, bool):
            raise ValueError(f"CE2P: output_stride must be 16 or 8, got {output_stride!r}")
        if norm not in NORMS:
            raise ValueError(f"CE2P: norm must be one of {NORMS}, got {norm!r}")
        layers = tuple(layers)
        if len(layers) != 4:
            raise ValueError(f"CE2P: layers must give 4 Bottleneck counts, got {layers!r}")
        for n in layers:
            _int_arg(n, "every entry of layers")
        if (isinstance(width_mult, bool) or not isinstance(width_mult, (int, float))
                or not width_mult > 0 or width_mult != width_mult or width_mult == float("inf")):
            raise ValueError(
                f"CE2P: width_mult must be a positive finite number, got {width_mult!r}")
        if fuse_relu_conv is not None and not isinstance(fuse_relu_conv, bool):
            raise ValueError(f"CE2P: fuse_relu_conv must be None, True or False, got "
                             f"{fuse_relu_conv!r}")
        self._fuse_relu_conv = (norm != "batchnorm" if fuse_relu_conv is None
                                else fuse_relu_conv)
        self.num_classes = num_classes
        self.context = context
        self.output_stride = output_stride
        self.norm = norm
        self.layers = layers
        self.width_mult = float(width_mult)

        def w(c: int) -> int:
            return max(1, int(round(c * self.width_mult)))

        plain, act = _norms(norm)
        # Deep stem.
        self.conv1 = nn.Conv2d(3, w(64), 3, stride=2, padding=1, bias=False)
        self.bn1 = plain(w(64))
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(w(64), w(64), 3, stride=1, padding=1, bias=False)
        self.bn2 = plain(w(64))
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(w(64), w(128), 3, stride=1, padding=1, bias=False)
        self.bn3 = plain(w(128))
        self.relu3 = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self._inplanes = w(128)
        l3 = (2, 1) if output_stride == 16 else (1, 2)   # (stride, dilation)
        l4_dilation = 2 if output_stride == 16 else 4
        self.layer1 = self._make_layer(w(64), layers[0], 1, 1, plain)
        self.layer2 = self._make_layer(w(128), layers[1], 2, 1, plain)
        self.layer3 = self._make_layer(w(256), layers[2], l3[0], l3[1], plain)
        self.layer4 = self._make_layer(w(512), layers[3], 1, l4_dilation, plain)
        del self._inplanes
        c1, c2, c3, c4 = (4 * w(p) for p in (64, 128, 256, 512))

        ctx = w(512)
        if context == "psp":
            self.context_encoding = PSPModule(c4, ctx, (1, 2, 3, 6), norm=act)
            ctx_out = ctx
        else:
            if context == "pyramid_oc" and ctx < 2:
                raise ValueError("CE2P: pyramid_oc needs a context width >= 2 "
                                 "(raise width_mult)")
            if context == "asp_oc" and w(256) < 2:
                raise ValueError("CE2P: asp_oc needs a width >= 2 (raise width_mult)")
            self.context_encoding, ctx_out = oc_context(context, c4, ctx, w(256), act)
        self.context_channels = ctx_out

        self.edge = EdgeModule((c1, c2, c3), w(256), 2, norm=act)
        self.decoder = DecoderModule(ctx_out, c1, num_classes, w(256), w(48), norm=act)
        self.fushion = fusion_head(w(256), num_classes, act)
        add_cpu_autocast_hooks(self)

    def _make_layer(self, planes, blocks, stride, dilation, norm) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * 4, 1, stride=stride, bias=False),
                norm(planes * 4),
            )
        fuse = self._fuse_relu_conv
        mods = [Bottleneck(self._inplanes, planes, stride, dilation, downsample, norm, fuse)]
        self._inplanes = planes * 4
        mods += [Bottleneck(self._inplanes, planes, 1, dilation, None, norm, fuse)
                 for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    @property
    def fuse_relu_conv(self) -> bool:
        """Whether the backbone's ReLU -> conv pairs run as :func:`lipfast.ops.relu_conv2d`
        (stem relu1 -> conv2, relu2 -> conv3; each Bottleneck's relu(bn1) -> conv2,
        relu(bn2) -> conv3). Settable; the Bottlenecks follow."""
        return self._fuse_relu_conv

    @fuse_relu_conv.setter
    def fuse_relu_conv(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"CE2P: fuse_relu_conv must be True or False, got {value!r}")
        self._fuse_relu_conv = value
        for m in self.modules():
            if isinstance(m, Bottleneck):
                m.fuse_relu_conv = value

    def for_inference(self) -> "CE2P":
        """A folded copy for inference and export: :func:`lipfast.models.fold_norms`
        of this model (which must be in eval mode). Every norm is folded into its
        convolution, ``fuse_relu_conv`` is off and the OC attention runs in plain
        PyTorch, so the copy calls no lipfast op (``torch.export`` / ONNX take it);
        the same outputs within float rounding. This model is left unchanged."""
        from .fold import fold_norms

        return fold_norms(self)

    def backbone_parameters(self):
        """Parameters of the ResNet (stem and layer1..4), e.g. for per-group learning rates."""
        names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "layer1", "layer2", "layer3",
                 "layer4")
        for n in names:
            yield from getattr(self, n).parameters()

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CE2P expects a tensor input, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"CE2P expects a B x 3 x H x W image batch, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"CE2P expects a floating-point image batch, got {x.dtype}: convert "
                            "it with x.float() / 255 (BGR in [0, 1]) and normalise with "
                            "lipfast.models.LIP_MEAN / LIP_STD")
        if x.shape[2] < 1 or x.shape[3] < 1 or x.shape[0] < 1:
            raise ValueError(f"CE2P got an empty input of shape {tuple(x.shape)}")
        fuse = self._fuse_relu_conv
        x = _relu_conv(fuse, self.relu1, self.conv2, self.bn1(self.conv1(x)))
        x = _relu_conv(fuse, self.relu2, self.conv3, self.bn2(x))
        x = self.relu3(self.bn3(x))
        x = self.maxpool(x)
        x2 = self.layer1(x)
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        x5 = self.layer4(x4)
        ctx = self.context_encoding(x5)
        parsing, parsing_fea = self.decoder(ctx, x2)
        edge, edge_fea = self.edge(x2, x3, x4)
        fusion = self.fushion(torch.cat([parsing_fea, edge_fea], 1))
        return [[parsing, fusion], [edge]]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, context={self.context!r}, "
                f"output_stride={self.output_stride}, norm={self.norm!r}, "
                f"layers={self.layers}, width_mult={self.width_mult}, "
                f"fuse_relu_conv={self.fuse_relu_conv}")
