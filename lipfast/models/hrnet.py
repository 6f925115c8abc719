"""HRNetV2 for parsing: HRNet-Semantic-Segmentation's segmentation HRNet (its
``seg_hrnet.py``, LIP configuration) with lipfast's norms.

:class:`HRNetV2` with ``head="seg"`` and ``norm="batchnorm"`` has their module
names, ``Sequential`` indices and state_dict keys (``conv1``, ``bn1``, ``conv2``,
``bn2``, ``layer1``, ``transition1..3``, ``stage2..4`` with ``branches`` and
``fuse_layers``, ``last_layer.{0,1,3}``), so their ImageNet-pretrained
``hrnetv2_w48_imagenet_pretrained.pth`` (the keys the model has) and their
LIP checkpoints (``model.`` prefix stripped) load into it. With lipfast's
in-place norms the keys are the same (``num_batches_tracked`` optional).

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
- ``last_layer``: the four branches resized to the first (1/4 of the input) and
  concatenated (15 w channels), 1x1 conv (bias) + norm + ReLU, 1x1 conv to the
  classes. ``forward(x)`` returns the B x classes x ceil(H/4) x ceil(W/4) logits.

Bilinear resizes use ``align_corners=False`` by default (their pytorch-v1.1
branch and the HRNet-OCR LIP configuration). Norm momentum 0.01, as theirs.

Norms (``norm=``): ``"inplace_abn_sync"`` (default), ``"inplace_abn"`` (lipfast's
In-Place ABN with the identity activation, followed where upstream has one by
a separate out-of-place ReLU: the in-place layers scale by ``|w| + eps``, and
their outputs are never modified in place afterwards: every residual and fuse
sum makes a new tensor), or ``"batchnorm"`` (``nn.BatchNorm2d``, upstream's).

Input: B x 3 x H x W, **RGB** in [0, 1] normalised with :data:`HRNET_MEAN` /
:data:`HRNET_STD` (ImageNet's, RGB order; unlike SCHP's BGR).

Loading: :func:`lipfast.models.load_imagenet` takes their ImageNet file
(classifier-only keys skipped and reported, ``last_layer`` left as it is);
:func:`lipfast.models.load_checkpoint` their LIP checkpoints (the ``model.``
prefix of their FullModel wrapper, inside a ``state_dict`` entry or not, is
stripped).

Not yet here (the rest of the HRNetV2 work): the CE2P edge/fusion head
(``head="ce2p"``) and OC contexts on the concatenated features, ``relu_conv2d``
fusion, the training and evaluation tools' ``--model`` option.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.abn import InPlaceABN, InPlaceABNSync
from .ce2p import _back_to_autocast_dtype, _float_on_cpu

__all__ = ["HRNetV2", "HRNET_MEAN", "HRNET_STD", "HRNET_WIDTHS", "HRNET_IMAGENET_ONLY"]

#: ImageNet normalisation, RGB order (HRNet-Semantic-Segmentation's).
HRNET_MEAN = (0.485, 0.456, 0.406)
HRNET_STD = (0.229, 0.224, 0.225)
HRNET_WIDTHS = (18, 32, 48)
#: top-level modules of the ImageNet classification HRNet that the segmentation
#: network does not have (skipped by :func:`lipfast.models.load_imagenet`)
HRNET_IMAGENET_ONLY = ("incre_modules", "downsamp_modules", "final_layer", "classifier")
_NORMS = ("inplace_abn_sync", "inplace_abn", "batchnorm")
_MOMENTUM = 0.01


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm == "batchnorm":
        return lambda c: nn.BatchNorm2d(c, momentum=_MOMENTUM)
    cls = {"inplace_abn_sync": InPlaceABNSync, "inplace_abn": InPlaceABN}[norm]
    return lambda c: cls(c, momentum=_MOMENTUM, activation="identity")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with norms, the input added, ReLU (out of place)."""

    expansion = 1

    def __init__(self, cin: int, cout: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout)
        self.bn1 = norm(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Bottleneck(nn.Module):
    """1x1, 3x3, 1x1 (x4 channels) with norms, the (downsampled) input added, ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, norm: Callable[[int], nn.Module],
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class HighResolutionModule(nn.Module):
    """One multi-resolution module: ``branches`` (4 BasicBlocks each) then
    ``fuse_layers`` (every branch receives the sum of all, ReLU)."""

    def __init__(self, channels: Sequence[int], norm: Callable[[int], nn.Module],
                 align_corners: bool, blocks: int = 4):
        super().__init__()
        self.align_corners = align_corners
        self.channels = list(channels)
        self.branches = nn.ModuleList([
            nn.Sequential(*[BasicBlock(c, c, norm) for _ in range(blocks)]) for c in channels])
        n = len(channels)
        fuse = []
        for i in range(n):
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

    def forward(self, xs: list) -> list:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            size = xs[i].shape[-2:]
            y = xs[0] if i == 0 else row[0](xs[0])
            for j in range(1, len(xs)):
                if j == i:
                    y = y + xs[j]
                elif j > i:
                    y = y + F.interpolate(row[j](xs[j]), size=size, mode="bilinear",
                                          align_corners=self.align_corners)
                else:
                    y = y + row[j](xs[j])
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


class HRNetV2(nn.Module):
    """HRNetV2 segmentation network (see the module docstring).

    Args:
        num_classes: parsing classes (LIP: 20).
        width: 18, 32 or 48 (HRNetV2-W48: the seed's parsing backbone).
        head: ``"seg"`` (HRNet-Semantic-Segmentation's ``last_layer``).
        context: ``None`` (OC contexts on the HRNet features are not written yet).
        norm: ``"inplace_abn_sync"``, ``"inplace_abn"`` or ``"batchnorm"``.
        align_corners: of the bilinear resizes (default False, upstream's LIP setting).
    """

    def __init__(self, num_classes: int = 20, width: int = 48, head: str = "seg",
                 context: str | None = None, norm: str = "inplace_abn_sync",
                 align_corners: bool = False):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"HRNetV2: num_classes must be an int >= 1, got {num_classes!r}")
        if width not in HRNET_WIDTHS or isinstance(width, bool):
            raise ValueError(f"HRNetV2: width must be one of {HRNET_WIDTHS}, got {width!r}")
        if head != "seg":
            raise ValueError(f"HRNetV2: head must be 'seg' (the CE2P head is not written yet), "
                             f"got {head!r}")
        if context is not None:
            raise ValueError(f"HRNetV2: context must be None (OC contexts on HRNet are not "
                             f"written yet), got {context!r}")
        if norm not in _NORMS:
            raise ValueError(f"HRNetV2: norm must be one of {_NORMS}, got {norm!r}")
        if not isinstance(align_corners, bool):
            raise ValueError(f"HRNetV2: align_corners must be a bool, got {align_corners!r}")
        self.num_classes, self.width, self.head, self.context = num_classes, width, head, context
        self.norm, self.align_corners = norm, align_corners
        nf = _norm_factory(norm)
        self.conv1 = _conv3x3(3, 64, 2)
        self.bn1 = nf(64)
        self.conv2 = _conv3x3(64, 64, 2)
        self.bn2 = nf(64)
        self.relu = nn.ReLU(inplace=False)
        down = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nf(256))
        self.layer1 = nn.Sequential(Bottleneck(64, 64, nf, down),
                                    *[Bottleneck(256, 64, nf) for _ in range(3)])
        ch = [width * 2 ** i for i in range(4)]
        self.transition1 = _transition([256], ch[:2], nf)
        self.stage2 = nn.Sequential(HighResolutionModule(ch[:2], nf, align_corners))
        self.transition2 = _transition(ch[:2], ch[:3], nf)
        self.stage3 = nn.Sequential(*[HighResolutionModule(ch[:3], nf, align_corners)
                                      for _ in range(4)])
        self.transition3 = _transition(ch[:3], ch, nf)
        self.stage4 = nn.Sequential(*[HighResolutionModule(ch, nf, align_corners)
                                      for _ in range(3)])
        last = sum(ch)
        self.last_layer = nn.Sequential(
            nn.Conv2d(last, last, 1, bias=True), nf(last), nn.ReLU(inplace=False),
            nn.Conv2d(last, num_classes, 1, bias=True))
        for m in self.modules():
            if isinstance(m, InPlaceABN):
                m.register_forward_pre_hook(_float_on_cpu)
                m.register_forward_hook(_back_to_autocast_dtype)

    @staticmethod
    def _next(transition: nn.ModuleList, ys: list) -> list:
        out = []
        for i, t in enumerate(transition):
            if t is None:
                out.append(ys[i])
            else:
                out.append(t(ys[i] if i < len(ys) else ys[-1]))
        return out

    def features(self, x: torch.Tensor) -> list:
        """The four branch outputs of stage 4 (1/4, 1/8, 1/16 and 1/32 of the input)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError("HRNetV2 expects a B x 3 x H x W image, got "
                             + (f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                                else type(x).__name__))
        if not x.is_floating_point():
            raise TypeError(f"HRNetV2 expects a floating-point image (RGB in [0, 1] normalised "
                            f"with HRNET_MEAN / HRNET_STD), got {x.dtype}")
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        ys = self.stage2(self._next(self.transition1, [x]))
        ys = self.stage3(self._next(self.transition2, ys))
        return self.stage4(self._next(self.transition3, ys))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.features(x)
        size = xs[0].shape[-2:]
        up = [xs[0]] + [F.interpolate(t, size=size, mode="bilinear",
                                      align_corners=self.align_corners) for t in xs[1:]]
        return self.last_layer(torch.cat(up, 1))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, width={self.width}, head={self.head!r}, "
                f"norm={self.norm!r}, align_corners={self.align_corners}")
