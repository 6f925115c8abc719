"""Plain-PyTorch HRNetV2 for segmentation (HRNet-Semantic-Segmentation's
``seg_hrnet.py``, pytorch-v1.1 branch, LIP config), written from SPEC section 9: the
reference of ``lipfast.models.hrnet`` in the tests.

Layout (width ``w``, branch channels ``[w, 2w, 4w, 8w]``):

- stem: ``conv1`` (3->64, 3x3 s2) ``bn1`` ReLU, ``conv2`` (64->64, 3x3 s2) ``bn2`` ReLU;
- ``layer1``: 4 :class:`Bottleneck` (64 -> 256), the first with a 1x1 conv + BN
  ``downsample``;
- ``transition1`` / ``stage2`` (1 module, 2 branches), ``transition2`` / ``stage3``
  (4 modules, 3 branches), ``transition3`` / ``stage4`` (3 modules, 4 branches); each
  branch is 4 :class:`BasicBlock`, each :class:`HRModule` fuses all branches into all
  branches (sum, then ReLU);
- head: branches 1-3 resized (bilinear) to branch 0 and concatenated (15w channels),
  ``last_layer`` = 1x1 conv (bias) + BN + ReLU + 1x1 conv (bias) to the classes.

``forward`` returns the logits at 1/4 of the input (473 -> 119). Every BatchNorm2d
has momentum 0.01; every ReLU is out of place. ``align_corners`` applies to every
bilinear resize (the fuse layers and the head); the pytorch-v1.1 LIP model uses
False.

State-dict keys are those of the original (no prefix), e.g. ``transition1.0.0.weight``,
``transition1.1.0.0.weight``, ``stage4.2.fuse_layers.3.0.2.0.weight``,
``last_layer.3.bias``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.01
WIDTHS = (18, 32, 48)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=BN_MOMENTUM)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + residual, ReLU (expansion 1)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = _bn(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = _bn(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1-BN-ReLU, 3x3-BN-ReLU, 1x1 (to planes*4)-BN, + residual, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class HRModule(nn.Module):
    """One high-resolution module: ``branches[i]`` (4 BasicBlocks at ``channels[i]``)
    then ``fuse_layers[i][j]`` bringing branch j to branch i (all branches output)."""

    def __init__(self, channels, num_blocks: int = 4, align_corners: bool = False):
        super().__init__()
        self.num_branches = n = len(channels)
        self.channels = list(channels)
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c) for _ in range(num_blocks)]) for c in channels)
        fuse = []
        for i in range(n):
            row = []
            for j in range(n):
                if j > i:
                    row.append(nn.Sequential(
                        nn.Conv2d(channels[j], channels[i], 1, bias=False), _bn(channels[i])))
                elif j == i:
                    row.append(None)
                else:
                    steps = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            steps.append(nn.Sequential(
                                _conv3x3(channels[j], channels[i], 2), _bn(channels[i])))
                        else:
                            steps.append(nn.Sequential(
                                _conv3x3(channels[j], channels[j], 2), _bn(channels[j]),
                                nn.ReLU(inplace=False)))
                    row.append(nn.Sequential(*steps))
            fuse.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs):
        n = self.num_branches
        assert len(xs) == n, (len(xs), n)
        sizes = [tuple(x.shape[-2:]) for x in xs]
        xs = [self.branches[i](xs[i]) for i in range(n)]
        out = []
        for i in range(n):
            y = xs[0] if i == 0 else self.fuse_layers[i][0](xs[0])
            for j in range(1, n):
                if j == i:
                    y = y + xs[j]
                elif j > i:
                    y = y + F.interpolate(self.fuse_layers[i][j](xs[j]), size=sizes[i],
                                          mode="bilinear", align_corners=self.align_corners)
                else:
                    y = y + self.fuse_layers[i][j](xs[j])
            out.append(self.relu(y))
        return out


def _transition(pre, cur) -> nn.ModuleList:
    layers = []
    for i in range(len(cur)):
        if i < len(pre):
            if cur[i] != pre[i]:
                layers.append(nn.Sequential(
                    _conv3x3(pre[i], cur[i]), _bn(cur[i]), nn.ReLU(inplace=False)))
            else:
                layers.append(None)
        else:
            steps = []
            nsteps = i + 1 - len(pre)
            for k in range(nsteps):
                cin = pre[-1]
                cout = cur[i] if k == nsteps - 1 else cin
                steps.append(nn.Sequential(
                    _conv3x3(cin, cout, 2), _bn(cout), nn.ReLU(inplace=False)))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class HRNetRef(nn.Module):
    """HRNetV2-W``width`` segmentation network (SPEC section 9).

    ``forward(x)`` -> logits ``B x num_classes x ceil(H/4) x ceil(W/4)`` (for 473:
    119); :meth:`features` -> the four stage-4 branch outputs (473: 119, 60, 30, 15).
    """

    def __init__(self, num_classes: int = 20, width: int = 48, align_corners: bool = False):
        super().__init__()
        if width not in WIDTHS:
            raise ValueError(f"width must be one of {WIDTHS}, got {width}")
        self.num_classes = num_classes
        self.width = width
        self.align_corners = align_corners
        w = width
        self.channels = [w, 2 * w, 4 * w, 8 * w]

        # stem
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = _bn(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = _bn(64)
        self.relu = nn.ReLU(inplace=False)

        # stage 1
        down = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), _bn(256))
        self.layer1 = nn.Sequential(
            Bottleneck(64, 64, downsample=down), *[Bottleneck(256, 64) for _ in range(3)])

        c = self.channels
        self.transition1 = _transition([256], c[:2])
        self.stage2 = nn.Sequential(*[HRModule(c[:2], 4, align_corners) for _ in range(1)])
        self.transition2 = _transition(c[:2], c[:3])
        self.stage3 = nn.Sequential(*[HRModule(c[:3], 4, align_corners) for _ in range(4)])
        self.transition3 = _transition(c[:3], c[:4])
        self.stage4 = nn.Sequential(*[HRModule(c[:4], 4, align_corners) for _ in range(3)])

        last = sum(c)  # 15 w
        self.last_layer = nn.Sequential(
            nn.Conv2d(last, last, 1, bias=True), _bn(last), nn.ReLU(inplace=False),
            nn.Conv2d(last, num_classes, 1, bias=True))

    @staticmethod
    def _run_stage(stage: nn.Sequential, xs):
        for module in stage:
            xs = module(xs)
        return xs

    @staticmethod
    def _apply_transition(transition: nn.ModuleList, ys):
        xs = []
        for i, t in enumerate(transition):
            if t is None:
                xs.append(ys[i])
            elif i < len(ys):
                xs.append(t(ys[i]))
            else:
                xs.append(t(ys[-1]))
        return xs

    def features(self, x):
        """Stem, layer1 and stages 2-4: the list of the four branch outputs."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        ys = self._run_stage(self.stage2, self._apply_transition(self.transition1, [x]))
        ys = self._run_stage(self.stage3, self._apply_transition(self.transition2, ys))
        ys = self._run_stage(self.stage4, self._apply_transition(self.transition3, ys))
        return ys

    def head(self, ys):
        """Concatenation of the branches at branch 0's size, then ``last_layer``."""
        size = tuple(ys[0].shape[-2:])
        up = [ys[0]] + [F.interpolate(y, size=size, mode="bilinear",
                                      align_corners=self.align_corners) for y in ys[1:]]
        return self.last_layer(torch.cat(up, dim=1))

    def forward(self, x):
        return self.head(self.features(x))


# ------------------------------------------------------------- heads on HRNet (issue 14)


class BNLeaky(nn.BatchNorm2d):
    """CE2P's norm with activation, written out: BatchNorm2d (momentum 0.1, eps 1e-5)
    then leaky_relu(0.01)."""

    def forward(self, x):
        z = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.leaky_relu(z, 0.01)


def _up_true(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class HRNetHeadsRef(HRNetRef):
    """HRNetRef's backbone with an optional context on the concatenated branches and
    either ``last_layer`` (``head="seg"``) or CE2P's edge / decoder / fusion head
    (``head="ce2p"``, SPEC section 5, 256 / 48 mid channels, resizes inside the head
    with align_corners=True), written with plain torch ops.

    ``context``: ``None`` or a module (the OC module, e.g. the OCNet references of
    tests/test_oc_modules.py) giving ``context_channels`` channels from 512; it is put
    behind ``Conv2d(15w, 512, 3, padding=1, bias=True)`` + :class:`BNLeaky` as
    ``context_encoding``. Keys: HRNetRef's (without ``last_layer`` for the CE2P head)
    plus ``context_encoding.*``, ``edge.conv1..5``, ``decoder.conv1..4``,
    ``fushion.{0,1,3}``."""

    def __init__(self, num_classes: int = 20, width: int = 48, head: str = "ce2p",
                 context: nn.Module | None = None, context_channels: int = 512,
                 align_corners: bool = False):
        super().__init__(num_classes, width, align_corners)
        self.head_kind = head
        last = sum(self.channels)
        del self.last_layer
        if context is not None:
            self.context_encoding = nn.Sequential(
                nn.Conv2d(last, 512, 3, padding=1, bias=True), BNLeaky(512), context)
            c = context_channels
        else:
            c = last
        if head == "seg":
            self.last_layer = nn.Sequential(
                nn.Conv2d(c, c, 1, bias=True), _bn(c), nn.ReLU(inplace=False),
                nn.Conv2d(c, num_classes, 1, bias=True))
            return
        w0, w1, w2 = self.channels[:3]
        edge = nn.Module()
        edge.conv1 = nn.Sequential(nn.Conv2d(w0, 256, 1, bias=False), BNLeaky(256))
        edge.conv2 = nn.Sequential(nn.Conv2d(w1, 256, 1, bias=False), BNLeaky(256))
        edge.conv3 = nn.Sequential(nn.Conv2d(w2, 256, 1, bias=False), BNLeaky(256))
        edge.conv4 = nn.Conv2d(256, 2, 3, padding=1, bias=True)
        edge.conv5 = nn.Conv2d(6, 2, 1, bias=True)
        self.edge = edge
        dec = nn.Module()
        dec.conv1 = nn.Sequential(nn.Conv2d(c, 256, 1, bias=False), BNLeaky(256))
        dec.conv2 = nn.Sequential(nn.Conv2d(w0, 48, 1, bias=False), BNLeaky(48))
        dec.conv3 = nn.Sequential(nn.Conv2d(304, 256, 1, bias=False), BNLeaky(256),
                                  nn.Conv2d(256, 256, 1, bias=False), BNLeaky(256))
        dec.conv4 = nn.Conv2d(256, num_classes, 1, bias=True)
        self.decoder = dec
        self.fushion = nn.Sequential(nn.Conv2d(1024, 256, 1, bias=False), BNLeaky(256),
                                     nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1, bias=True))

    def forward(self, x):
        ys = self.features(x)
        size = tuple(ys[0].shape[-2:])
        cat = torch.cat([ys[0]] + [F.interpolate(y, size=size, mode="bilinear",
                                                 align_corners=self.align_corners)
                                   for y in ys[1:]], dim=1)
        high = self.context_encoding(cat) if hasattr(self, "context_encoding") else cat
        if self.head_kind == "seg":
            return self.last_layer(high)
        e = self.edge
        f1, f2, f3 = e.conv1(ys[0]), e.conv2(ys[1]), e.conv3(ys[2])
        e1, e2, e3 = e.conv4(f1), e.conv4(f2), e.conv4(f3)
        edge = e.conv5(torch.cat([e1, _up_true(e2, size), _up_true(e3, size)], dim=1))
        edge_fea = torch.cat([f1, _up_true(f2, size), _up_true(f3, size)], dim=1)
        d = self.decoder
        top = _up_true(d.conv1(high), size)
        parsing_fea = d.conv3(torch.cat([top, d.conv2(ys[0])], dim=1))
        parsing = d.conv4(parsing_fea)
        fusion = self.fushion(torch.cat([parsing_fea, edge_fea], dim=1))
        return [[parsing, fusion], [edge]]
