"""Plain-PyTorch pose HRNet (deep-high-resolution-net.pytorch's ``pose_hrnet``),
written from SPEC section 10 ("Model", on section 9's skeleton): the reference of
``lipfast.models.PoseHRNet`` in the tests. Only nn.Conv2d, nn.BatchNorm2d
(momentum 0.1), out-of-place ReLUs and nn.Upsample; nothing from lipfast.

Layout (width ``w``, branch channels ``[w, 2w, 4w, 8w]``):

- stem ``conv1`` / ``bn1`` / ReLU / ``conv2`` / ``bn2`` / ReLU (3x3 stride 2, 3 -> 64 -> 64);
- ``layer1``: 4 bottlenecks 64 -> 256 (1x1 / 3x3 / 1x1, expansion 4; the first one
  with a 1x1 conv + BN ``downsample``);
- ``transition1..3``: an existing branch gets 3x3 conv + BN + ReLU only if its width
  changes (else nothing, ``None``); a new branch: 3x3 stride-2 conv from the last
  branch + BN + ReLU;
- ``stage2`` (1 module), ``stage3`` (4), ``stage4`` (3), 4 basic blocks per branch;
  fuse into branch i: j > i 1x1 conv + BN + nearest ``nn.Upsample(2 ** (j - i))``,
  j < i a chain of i - j 3x3 stride-2 convs (inner: c_j, BN, ReLU; last: c_i, BN);
  sum, ReLU. The very last module of stage 4 fuses into branch 0 only;
- ``final_layer``: 1x1 conv (bias) w -> J on branch 0.

The upsampling is by a fixed factor, so input sizes whose branch sizes do not
halve exactly fail here with PyTorch's size-mismatch RuntimeError in the sum.
"""

from __future__ import annotations

import torch.nn as nn

MOMENTUM = 0.1


def bn(c):
    return nn.BatchNorm2d(c, momentum=MOMENTUM)


def conv3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class RefBasic(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = conv3(c, c), bn(c)
        self.conv2, self.bn2 = conv3(c, c), bn(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + x)


class RefBottleneck(nn.Module):
    def __init__(self, cin, planes, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), bn(planes)
        self.conv2, self.bn2 = conv3(planes, planes), bn(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), bn(4 * planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(y + skip)


class RefHRModule(nn.Module):
    def __init__(self, chans, multi_scale_output=True):
        super().__init__()
        n = len(chans)
        self.branches = nn.ModuleList(
            nn.Sequential(*[RefBasic(c) for _ in range(4)]) for c in chans)
        rows = []
        for i in range(n if multi_scale_output else 1):
            row = []
            for j in range(n):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(chans[j], chans[i], 1, bias=False),
                                             bn(chans[i]),
                                             nn.Upsample(scale_factor=2 ** (j - i),
                                                         mode="nearest")))
                elif j == i:
                    row.append(None)
                else:
                    chain = []
                    for step in range(i - j):
                        if step == i - j - 1:
                            chain.append(nn.Sequential(conv3(chans[j], chans[i], 2),
                                                       bn(chans[i])))
                        else:
                            chain.append(nn.Sequential(conv3(chans[j], chans[j], 2),
                                                       bn(chans[j]), nn.ReLU()))
                    row.append(nn.Sequential(*chain))
            rows.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(rows)
        self.relu = nn.ReLU()

    def forward(self, xs):
        xs = [b(x) for b, x in zip(self.branches, xs)]
        outs = []
        for i, row in enumerate(self.fuse_layers):
            total = None
            for j, x in enumerate(xs):
                term = x if j == i else row[j](x)
                total = term if total is None else total + term
            outs.append(self.relu(total))
        return outs


def ref_transition(pre, cur):
    layers = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(None if c == pre[i] else
                          nn.Sequential(conv3(pre[i], c), bn(c), nn.ReLU()))
        else:
            steps = []
            for k in range(i + 1 - len(pre)):
                out = c if k == i - len(pre) else pre[-1]
                steps.append(nn.Sequential(conv3(pre[-1], out, 2), bn(out), nn.ReLU()))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class PoseHRNetRef(nn.Module):
    """forward(x) -> B x J x H/4 x W/4 heatmaps (SPEC section 10)."""

    def __init__(self, num_joints=16, width=32):
        super().__init__()
        self.conv1, self.bn1 = conv3(3, 64, 2), bn(64)
        self.conv2, self.bn2 = conv3(64, 64, 2), bn(64)
        self.relu = nn.ReLU()
        down = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), bn(256))
        self.layer1 = nn.Sequential(RefBottleneck(64, 64, down),
                                    *[RefBottleneck(256, 64) for _ in range(3)])
        c = [width, 2 * width, 4 * width, 8 * width]
        self.transition1 = ref_transition([256], c[:2])
        self.stage2 = nn.Sequential(RefHRModule(c[:2]))
        self.transition2 = ref_transition(c[:2], c[:3])
        self.stage3 = nn.Sequential(*[RefHRModule(c[:3]) for _ in range(4)])
        self.transition3 = ref_transition(c[:3], c)
        self.stage4 = nn.Sequential(RefHRModule(c), RefHRModule(c),
                                    RefHRModule(c, multi_scale_output=False))
        self.final_layer = nn.Conv2d(c[0], num_joints, 1, bias=True)

    @staticmethod
    def _through(transition, ys):
        out = []
        for i, t in enumerate(transition):
            if t is None:
                out.append(ys[i])
            else:
                out.append(t(ys[i] if i < len(ys) else ys[-1]))
        return out

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        ys = self.stage2(self._through(self.transition1, [x]))
        ys = self.stage3(self._through(self.transition2, ys))
        ys = self.stage4(self._through(self.transition3, ys))
        return self.final_layer(ys[0])
