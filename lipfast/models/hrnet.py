"""HRNetV2 for parsing: HRNet-Semantic-Segmentation's segmentation HRNet (its
``seg_hrnet.py``, LIP configuration) with lipfast's norms, its ``last_layer``
head or CE2P's edge and fusion head, and optionally an OC context.

:class:`HRNetV2` with ``head="seg"``, ``context=None`` and ``norm="batchnorm"``
has their module names, ``Sequential`` indices and state_dict keys (``conv1``,
``bn1``, ``conv2``, ``bn2``, ``layer1``, ``transition1..3``, ``stage2..4`` with
``branches`` and ``fuse_layers``, ``last_layer.{0,1,3}``), so their
ImageNet-pretrained ``hrnetv2_w48_imagenet_pretrained.pth`` (the keys the
model has) and their LIP checkpoints (``model.`` prefix stripped) load into
it. With lipfast's in-place norms the keys are the same (``num_batches_tracked``
optional).

Structure (width w = 18, 32 or 48; branch channels w, 2w, 4w, 8w):

- stem: two 3x3 stride-2 convolutions 3 -> 64 -> 64, each norm + ReLU;
- ``layer1``: 4 Bottlenecks, 64 -> 256;
- ``transition1..3``: a 3x3 conv + norm + ReLU where a branch's width changes,
  a 3x3 stride-2 conv + norm + ReLU from the last branch for each new one;
- ``stage2`` (1 module, 2 branches), ``stage3`` (4 modules, 3 branches),
  ``stage4`` (3 modules, 4 branches): 4 BasicBlocks per branch, then every branch
  gets the sum of all branches (higher resolutions through stride-2 3x3
  convolutions, lower ones through a 1x1 conv + norm and a bilinear resize),
  followed by a ReLU;
- the four branches resized to the first (1/4 of the input) and concatenated
  (15 w channels): the *concatenated features*.

Context (``context=``, default ``None``): an OCNet object-context module on the
concatenated features, ``context_encoding`` = ``Sequential(Conv2d(15w, 512, 3,
padding=1, bias=True), act(512), <OC module>)`` built as CE2P builds its OC
contexts (:mod:`lipfast.models.ce2p`; ``act`` = CE2P's norm + leaky_relu(0.01)):
``"base_oc"``: ``BaseOCModule(512, 512, 256, 256, 0.05, [1])``;
``"pyramid_oc"``: ``PyramidOCModule(512, 512, 0.05, [1, 2, 3, 6])``;
``"asp_oc"``: ``ASPOCModule(512, 256, (12, 24, 36), head="current")``. All three
give 512 channels (``context_channels``; 15 w without a context).

Heads (``head=``):

- ``"seg"`` (default): ``last_layer`` = 1x1 conv (bias) C -> C + norm + ReLU,
  1x1 conv (bias) C -> classes, on the concatenated features (C = 15 w) or on the
  context's output (C = 512). ``forward(x)`` returns the B x classes x
  ceil(H/4) x ceil(W/4) logits (a tensor).
- ``"ce2p"``: CE2P's edge branch and fusion head (:class:`~lipfast.models.ce2p.EdgeModule`,
  :class:`~lipfast.models.ce2p.DecoderModule` and ``fushion``, built as in CE2P
  with its norm + leaky_relu(0.01) norms and its align_corners=True resizes inside
  them): ``edge`` on branches 0, 1, 2 (w, 2w, 4w channels; 256 mid channels);
  ``decoder`` with the context's output (or the concatenated features) as its
  high-level input and branch 0 as its low-level input (256 / 48 mid channels);
  ``fushion`` = (1x1 conv 1024 -> 256, norm, Dropout2d(0.1), 1x1 conv (bias) to
  the classes) on the decoder's and the edge branch's features. No
  ``last_layer``. ``forward(x)`` returns ``[[parsing, fusion], [edge]]`` at
  branch 0's size, CE2P's output format (``lipfast.losses.SCHPCriterion`` takes
  it; evaluation uses ``fusion``).

Bilinear resizes of the backbone and of the concatenation use
``align_corners=False`` by default (their pytorch-v1.1 branch and the HRNet-OCR
LIP configuration). Backbone and ``last_layer`` norm momentum 0.01, as theirs;
the CE2P head and the context keep CE2P's norms (momentum 0.1).

Norms (``norm=``): ``"inplace_abn_sync"`` (default), ``"inplace_abn"`` (lipfast's
In-Place ABN; in the backbone and ``last_layer`` with the identity activation,
followed where upstream has one by a separate out-of-place ReLU; in the CE2P
head and the context with leaky_relu(0.01)), or ``"batchnorm"``
(``nn.BatchNorm2d``, upstream's; :class:`~lipfast.models.ce2p.BatchNormAct` in
the CE2P head and the context). The in-place layers scale by ``|w| + eps``, and
their outputs are never modified in place afterwards: every residual and fuse
sum makes a new tensor. state_dict keys are the same for all three norms. Under
CPU autocast each in-place norm gets a float32 copy of its input and its output
goes back to the autocast dtype (hooks, as in CE2P).

Memory (``fuse_relu_conv``, on by default with the in-place norms, a settable
attribute): where a ReLU output feeds only a convolution the pair runs as
:func:`lipfast.ops.relu_conv2d` (saves the norm's output, which the in-place
norm keeps anyway, instead of the ReLU's): the stem's relu(bn1) -> conv2, every
Bottleneck's relu(bn1) -> conv2 and relu(bn2) -> conv3, every BasicBlock's
relu(bn1) -> conv2, the intermediate steps of the fuse layers (conv + norm +
ReLU, then the next stride-2 conv) and of multi-step transitions, and
``last_layer``'s ReLU -> ``last_layer.3``. The same values and gradients;
module names and state_dict keys stay; only ``forward`` changes (forward hooks
on those ReLU modules do not fire while fused).

Input: B x 3 x H x W, **RGB** in [0, 1] normalised with :data:`HRNET_MEAN` /
:data:`HRNET_STD` (ImageNet's, RGB order; unlike SCHP's BGR); the class
attributes ``input_order``, ``input_mean``, ``input_std`` say so.

Loading: :func:`lipfast.models.load_imagenet` takes their ImageNet file
(classifier-only keys skipped and reported, ``last_layer`` left as it is);
:func:`lipfast.models.load_checkpoint` their LIP checkpoints (the ``model.``
prefix of their FullModel wrapper, inside a ``state_dict`` entry or not, is
stripped).

Inference and export: :meth:`HRNetV2.for_inference` (a
:func:`lipfast.models.fold_norms` copy: norms folded, ``fuse_relu_conv`` off, OC
attention in plain PyTorch).

The tools take it by name (:func:`lipfast.models.build`: ``hrnetv2_w18``,
``hrnetv2_w32``, ``hrnetv2_w48``): ``python -m lipfast.train --model
hrnetv2_w48 [--head seg] [--context asp_oc]``, and ``lipfast.evaluate``,
``lipfast.parse`` and ``lipfast.export`` build it from its checkpoints.

The blocks (:class:`BasicBlock`, :class:`Bottleneck`, :class:`HighResolutionModule`,
whose ``upsample="nearest"`` and ``multi_scale_output=False`` options HRNetV2 does
not use) and the transitions are shared with :class:`lipfast.models.PoseHRNet`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.abn import InPlaceABN, InPlaceABNSync
from .ce2p import (DecoderModule, EdgeModule, _norms, _relu_conv, add_cpu_autocast_hooks,
                   fusion_head, oc_context)

__all__ = ["HRNetV2", "HRNET_MEAN", "HRNET_STD", "HRNET_WIDTHS", "HRNET_HEADS",
           "HRNET_BACKBONE", "HRNET_CONTEXTS", "HRNET_IMAGENET_ONLY"]

#: ImageNet normalisation, RGB order (HRNet-Semantic-Segmentation's).
HRNET_MEAN = (0.485, 0.456, 0.406)
HRNET_STD = (0.229, 0.224, 0.225)
HRNET_WIDTHS = (18, 32, 48)
HRNET_HEADS = ("seg", "ce2p")
HRNET_CONTEXTS = (None, "base_oc", "pyramid_oc", "asp_oc")
#: top-level modules of the ImageNet classification HRNet that the segmentation
#: network does not have (skipped by :func:`lipfast.models.load_imagenet`)
HRNET_IMAGENET_ONLY = ("incre_modules", "downsamp_modules", "final_layer", "classifier")
_NORMS = ("inplace_abn_sync", "inplace_abn", "batchnorm")
_MOMENTUM = 0.01
#: top-level modules of the backbone (:meth:`HRNetV2.backbone_parameters`; what
#: :func:`lipfast.models.load_imagenet` initialises)
HRNET_BACKBONE = ("conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "stage2",
             "transition2", "stage3", "transition3", "stage4")
# CE2P's head and context widths (CE2P at width_mult 1)
_CTX, _MID, _LOW_MID = 512, 256, 48


def _norm_factory(norm: str, momentum: float = _MOMENTUM) -> Callable[[int], nn.Module]:
    """``c -> norm layer`` without activation (``nn.BatchNorm2d`` or lipfast's in-place
    norm with the identity activation), running-statistics momentum ``momentum``."""
    if norm == "batchnorm":
        return lambda c: nn.BatchNorm2d(c, momentum=momentum)
    cls = {"inplace_abn_sync": InPlaceABNSync, "inplace_abn": InPlaceABN}[norm]
    return lambda c: cls(c, momentum=momentum, activation="identity")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _chain(fuse: bool, steps: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``steps(x)`` for a Sequential of ``Sequential(conv, norm[, ReLU])`` steps; with
    ``fuse`` each ReLU that feeds the next step's convolution runs with it as
    :func:`lipfast.ops.relu_conv2d` (the last step's ReLU, if any, stays plain)."""
    if not fuse:
        return steps(x)
    pending = None          # a ReLU not applied to x yet (it goes into the next conv)
    last = len(steps) - 1
    for k, step in enumerate(steps):
        conv = step[0]
        x = conv(x) if pending is None else _relu_conv(True, pending, conv, x)
        x = step[1](x)
        pending = None
        if len(step) > 2:
            if k < last:
                pending = step[2]
            else:
                x = step[2](x)
    return x


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with norms, the input added, ReLU (out of place).
    ``fuse_relu_conv``: relu(bn1) -> conv2 as :func:`lipfast.ops.relu_conv2d`."""

    expansion = 1

    def __init__(self, cin: int, cout: int, norm: Callable[[int], nn.Module],
                 fuse_relu_conv: bool = False):
        super().__init__()
        self.fuse_relu_conv = bool(fuse_relu_conv)
        self.conv1 = _conv3x3(cin, cout)
        self.bn1 = norm(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _relu_conv(self.fuse_relu_conv, self.relu, self.conv2, self.bn1(self.conv1(x)))
        out = self.bn2(out)
        return self.relu(out + x)


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 (x4 channels) with norms, the (downsampled) input added, ReLU.
    ``fuse_relu_conv``: relu(bn1) -> conv2 and relu(bn2) -> conv3 as
    :func:`lipfast.ops.relu_conv2d`."""

    expansion = 4

    def __init__(self, cin: int, planes: int, norm: Callable[[int], nn.Module],
                 downsample: nn.Module | None = None, fuse_relu_conv: bool = False):
        super().__init__()
        self.fuse_relu_conv = bool(fuse_relu_conv)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fuse = self.fuse_relu_conv
        out = _relu_conv(fuse, self.relu, self.conv2, self.bn1(self.conv1(x)))
        out = _relu_conv(fuse, self.relu, self.conv3, self.bn2(out))
        out = self.bn3(out)
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class HighResolutionModule(nn.Module):
    """One multi-resolution module: ``branches`` (4 BasicBlocks each) then
    ``fuse_layers`` (every branch receives the sum of all, ReLU).
    ``fuse_relu_conv``: the ReLUs inside the fuse layers' stride-2 chains go into
    the next convolution as :func:`lipfast.ops.relu_conv2d` (the BasicBlocks have
    their own flag).

    ``upsample``: how a lower-resolution branch j > i reaches branch i after its
    1x1 conv + norm: ``"bilinear"`` (default; HRNetV2: resized to branch i's size
    with ``align_corners``) or ``"nearest"`` (the pose HRNet: nearest upsampling
    by the factor ``2 ** (j - i)``; the sizes must then agree exactly).
    ``multi_scale_output=False`` (the pose HRNet's last module): only branch 0 is
    fused and returned (only ``fuse_layers.0`` exists); ``forward`` returns a
    one-element list."""

    def __init__(self, channels: Sequence[int], norm: Callable[[int], nn.Module],
                 align_corners: bool, blocks: int = 4, fuse_relu_conv: bool = False,
                 upsample: str = "bilinear", multi_scale_output: bool = True):
        super().__init__()
        if upsample not in ("bilinear", "nearest"):
            raise ValueError(f"HighResolutionModule: upsample must be 'bilinear' or 'nearest', "
                             f"got {upsample!r}")
        self.fuse_relu_conv = bool(fuse_relu_conv)
        self.align_corners = align_corners
        self.upsample = upsample
        self.multi_scale_output = bool(multi_scale_output)
        self.channels = list(channels)
        self.branches = nn.ModuleList([
            nn.Sequential(*[BasicBlock(c, c, norm, fuse_relu_conv) for _ in range(blocks)])
            for c in channels])
        n = len(channels)
        fuse = []
        for i in range(n if self.multi_scale_output else 1):
            row = []
            for j in range(n):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(channels[j], channels[i], 1, bias=False),
                                             norm(channels[i])))
                elif j == i:
                    row.append(None)
                else:
                    steps = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            steps.append(nn.Sequential(_conv3x3(channels[j], channels[i], 2),
                                                       norm(channels[i])))
                        else:
                            steps.append(nn.Sequential(_conv3x3(channels[j], channels[j], 2),
                                                       norm(channels[j]), nn.ReLU(inplace=False)))
                    row.append(nn.Sequential(*steps))
            fuse.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse)
        self.relu = nn.ReLU(inplace=False)

    def _up(self, y: torch.Tensor, i: int, j: int, size) -> torch.Tensor:
        if self.upsample == "nearest":
            return F.interpolate(y, scale_factor=float(2 ** (j - i)), mode="nearest")
        return F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, xs: list) -> list:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        fuse = self.fuse_relu_conv
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            y = xs[0] if i == 0 else _chain(fuse, row[0], xs[0])
            for j in range(1, len(xs)):
                if j == i:
                    y = y + xs[j]
                elif j > i:
                    y = y + self._up(row[j](xs[j]), i, j, size)
                else:
                    y = y + _chain(fuse, row[j], xs[j])
            out.append(self.relu(y))
        return out


def _transition(pre: Sequence[int], cur: Sequence[int], norm) -> nn.ModuleList:
    layers = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(None if c == pre[i] else nn.Sequential(
                _conv3x3(pre[i], c), norm(c), nn.ReLU(inplace=False)))
        else:
            steps = []
            for k in range(i + 1 - len(pre)):
                cout = c if k == i - len(pre) else pre[-1]
                steps.append(nn.Sequential(_conv3x3(pre[-1], cout, 2), norm(cout),
                                           nn.ReLU(inplace=False)))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


def _apply_transition(fuse: bool, transition: nn.ModuleList, ys: list) -> list:
    """The branches after a ``transition*`` ModuleList (built by :func:`_transition`):
    ``None`` keeps a branch, a ``Sequential(conv, norm, ReLU)`` changes its width, a
    chain of stride-2 steps makes a new branch from the last one (its inner ReLUs
    fused into the next conv with ``fuse``)."""
    out = []
    for i, t in enumerate(transition):
        if t is None:
            out.append(ys[i])
        elif i < len(ys):   # Sequential(conv, norm, ReLU): the ReLU feeds a block
            out.append(t(ys[i]))
        else:               # a new branch: a chain of stride-2 steps from the last one
            out.append(_chain(fuse, t, ys[-1]))
    return out


def _check_image(x, name: str, mean: str = "HRNET_MEAN / HRNET_STD") -> None:
    """ValueError / TypeError unless ``x`` is a non-empty floating B x 3 x H x W tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} expects a B x 3 x H x W image, got "
                         + (f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                            else type(x).__name__))
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point image (RGB in [0, 1] normalised "
                        f"with {mean}), got {x.dtype}")
    if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name} got an empty input of shape {tuple(x.shape)}")


#: the module classes with a ``fuse_relu_conv`` flag (set off by fold_norms)
FUSING_MODULES = (BasicBlock, Bottleneck, HighResolutionModule)


def add_stem(net: nn.Module, nf: Callable[[int], nn.Module], fuse: bool) -> None:
    """The stem and ``layer1`` that HRNetV2 and the pose HRNet share, as attributes
    of ``net`` under upstream's names (``conv1``, ``bn1``, ``conv2``, ``bn2``,
    ``relu``, ``layer1``: two 3x3 stride-2 convs 3 -> 64 -> 64 with norms, then 4
    Bottlenecks 64 -> 256)."""
    net.conv1 = _conv3x3(3, 64, 2)
    net.bn1 = nf(64)
    net.conv2 = _conv3x3(64, 64, 2)
    net.bn2 = nf(64)
    net.relu = nn.ReLU(inplace=False)
    down = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nf(256))
    net.layer1 = nn.Sequential(Bottleneck(64, 64, nf, down, fuse),
                               *[Bottleneck(256, 64, nf, None, fuse) for _ in range(3)])


def run_stem(net: nn.Module, fuse: bool, x: torch.Tensor) -> torch.Tensor:
    """The forward of :func:`add_stem`'s layers (relu(bn1) -> conv2 fused when
    ``fuse``): B x 256 x H/4 x W/4."""
    x = _relu_conv(fuse, net.relu, net.conv2, net.bn1(net.conv1(x)))
    x = net.relu(net.bn2(x))
    return net.layer1(x)


class HRNetV2(nn.Module):
    """HRNetV2 segmentation network (see the module docstring).

    Args:
        num_classes: parsing classes (LIP: 20).
        width: 18, 32 or 48 (HRNetV2-W48: the seed's parsing backbone).
        head: ``"seg"`` (HRNet-Semantic-Segmentation's ``last_layer``; forward returns
            the logits) or ``"ce2p"`` (CE2P's edge branch, decoder and fusion head;
            forward returns ``[[parsing, fusion], [edge]]``).
        context: ``None`` or an OCNet context on the concatenated features:
            ``"base_oc"``, ``"pyramid_oc"``, ``"asp_oc"`` (as in CE2P; 512 channels).
        norm: ``"inplace_abn_sync"``, ``"inplace_abn"`` or ``"batchnorm"``.
        align_corners: of the backbone's and the concatenation's bilinear resizes
            (default False, upstream's LIP setting; CE2P's head modules keep their
            own align_corners=True).
        fuse_relu_conv: run the ReLU -> conv pairs as :func:`lipfast.ops.relu_conv2d`
            (same values and gradients, less saved memory after an in-place norm).
            ``None`` (default): on for the in-place norms, off for ``"batchnorm"``.
            Also a settable attribute.

    Outputs are at branch 0's size, ``ceil(ceil(H / 2) / 2)`` x ``ceil(ceil(W / 2) / 2)``.
    Attributes: the constructor values ``num_classes``, ``width``, ``head``,
    ``context``, ``norm``, ``align_corners``, ``fuse_relu_conv``; ``channels`` (the
    four branch widths), ``context_channels`` (what the head gets: 15 w or 512).
    """

    input_order = "RGB"
    input_mean = HRNET_MEAN
    input_std = HRNET_STD

    def __init__(self, num_classes: int = 20, width: int = 48, head: str = "seg",
                 context: str | None = None, norm: str = "inplace_abn_sync",
                 align_corners: bool = False, fuse_relu_conv: bool | None = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"HRNetV2: num_classes must be an int >= 1, got {num_classes!r}")
        if isinstance(width, bool) or width not in HRNET_WIDTHS:
            raise ValueError(f"HRNetV2: width must be one of {HRNET_WIDTHS}, got {width!r}")
        if not isinstance(head, str) or head not in HRNET_HEADS:
            raise ValueError(f"HRNetV2: head must be one of {HRNET_HEADS}, got {head!r}")
        if context is not None and (not isinstance(context, str)
                                    or context not in HRNET_CONTEXTS):
            raise ValueError(f"HRNetV2: context must be one of {HRNET_CONTEXTS}, got "
                             f"{context!r}")
        if not isinstance(norm, str) or norm not in _NORMS:
            raise ValueError(f"HRNetV2: norm must be one of {_NORMS}, got {norm!r}")
        if not isinstance(align_corners, bool):
            raise ValueError(f"HRNetV2: align_corners must be a bool, got {align_corners!r}")
        if fuse_relu_conv is not None and not isinstance(fuse_relu_conv, bool):
            raise ValueError(f"HRNetV2: fuse_relu_conv must be None, True or False, got "
                             f"{fuse_relu_conv!r}")
        fuse = norm != "batchnorm" if fuse_relu_conv is None else fuse_relu_conv
        self._fuse_relu_conv = fuse
        self.num_classes, self.width, self.head, self.context = num_classes, width, head, context
        self.norm, self.align_corners = norm, align_corners
        nf = _norm_factory(norm)
        _, act = _norms(norm)   # CE2P's norm + leaky_relu(0.01), for the head and context
        add_stem(self, nf, fuse)
        ch = [width * 2 ** i for i in range(4)]
        self.channels = ch
        self.transition1 = _transition([256], ch[:2], nf)
        self.stage2 = nn.Sequential(HighResolutionModule(ch[:2], nf, align_corners,
                                                         fuse_relu_conv=fuse))
        self.transition2 = _transition(ch[:2], ch[:3], nf)
        self.stage3 = nn.Sequential(*[HighResolutionModule(ch[:3], nf, align_corners,
                                                           fuse_relu_conv=fuse)
                                      for _ in range(4)])
        self.transition3 = _transition(ch[:3], ch, nf)
        self.stage4 = nn.Sequential(*[HighResolutionModule(ch, nf, align_corners,
                                                           fuse_relu_conv=fuse)
                                      for _ in range(3)])
        last = sum(ch)
        if context is None:
            self.context_channels = last
        else:
            self.context_encoding, self.context_channels = oc_context(context, last, _CTX,
                                                                      _MID, act)
        c = self.context_channels
        if head == "seg":
            self.last_layer = nn.Sequential(
                nn.Conv2d(c, c, 1, bias=True), nf(c), nn.ReLU(inplace=False),
                nn.Conv2d(c, num_classes, 1, bias=True))
        else:
            self.edge = EdgeModule(ch[:3], _MID, 2, norm=act)
            self.decoder = DecoderModule(c, ch[0], num_classes, _MID, _LOW_MID, norm=act)
            self.fushion = fusion_head(_MID, num_classes, act)
        add_cpu_autocast_hooks(self)

    @property
    def fuse_relu_conv(self) -> bool:
        """Whether the ReLU -> conv pairs run as :func:`lipfast.ops.relu_conv2d` (see
        the module docstring). Settable; the blocks and modules follow."""
        return self._fuse_relu_conv

    @fuse_relu_conv.setter
    def fuse_relu_conv(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"HRNetV2: fuse_relu_conv must be True or False, got {value!r}")
        self._fuse_relu_conv = value
        for m in self.modules():
            if isinstance(m, FUSING_MODULES):
                m.fuse_relu_conv = value

    def _next(self, transition: nn.ModuleList, ys: list) -> list:
        return _apply_transition(self._fuse_relu_conv, transition, ys)

    def features(self, x: torch.Tensor) -> list:
        """The four branch outputs of stage 4 (1/4, 1/8, 1/16 and 1/32 of the input)."""
        _check_image(x, "HRNetV2")
        x = run_stem(self, self._fuse_relu_conv, x)
        ys = self.stage2(self._next(self.transition1, [x]))
        ys = self.stage3(self._next(self.transition2, ys))
        return self.stage4(self._next(self.transition3, ys))

    def concat(self, xs: list) -> torch.Tensor:
        """The branches resized (bilinear) to branch 0 and concatenated: 15 w channels."""
        size = xs[0].shape[-2:]
        up = [xs[0]] + [F.interpolate(t, size=size, mode="bilinear",
                                      align_corners=self.align_corners) for t in xs[1:]]
        return torch.cat(up, 1)

    def forward(self, x: torch.Tensor):
        xs = self.features(x)
        feats = self.concat(xs)
        if self.context is not None:
            feats = self.context_encoding(feats)
        if self.head == "seg":
            ll = self.last_layer
            y = ll[1](ll[0](feats))
            return _relu_conv(self._fuse_relu_conv, ll[2], ll[3], y)
        parsing, parsing_fea = self.decoder(feats, xs[0])
        edge, edge_fea = self.edge(xs[0], xs[1], xs[2])
        fusion = self.fushion(torch.cat([parsing_fea, edge_fea], 1))
        return [[parsing, fusion], [edge]]

    def backbone_parameters(self):
        """Parameters of the HRNet backbone (stem, ``layer1``, transitions, stages): all
        but the head and the context, e.g. for per-group learning rates."""
        for n in HRNET_BACKBONE:
            yield from getattr(self, n).parameters()

    def for_inference(self) -> "HRNetV2":
        """A folded copy for inference and export: :func:`lipfast.models.fold_norms`
        of this model (which must be in eval mode): every norm folded into its
        convolution, ``fuse_relu_conv`` off, the OC attention in plain PyTorch; the
        same outputs within float rounding. This model is left unchanged."""
        from .fold import fold_norms

        return fold_norms(self)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, width={self.width}, head={self.head!r}, "
                f"context={self.context!r}, norm={self.norm!r}, "
                f"align_corners={self.align_corners}, fuse_relu_conv={self.fuse_relu_conv}")
