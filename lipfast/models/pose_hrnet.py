"""The pose HRNet (SPEC section 10, "Model"): deep-high-resolution-net.pytorch's
``pose_hrnet`` (HRNet-W32 / W48 heatmap regression) with lipfast's norms.

:class:`PoseHRNet` with ``norm="batchnorm"`` has upstream's module names,
``Sequential`` indices and state_dict keys, so their released pose weights (bare
state dicts, e.g. ``pose_hrnet_w32_256x256.pth``) load into it strictly, and
their ImageNet file ``hrnet_w32-36af842e.pth`` initialises its backbone
(:func:`lipfast.models.load_imagenet`). With lipfast's in-place norms the keys
are the same (``num_batches_tracked`` optional).

Structure: the backbone of :class:`lipfast.models.HRNetV2` (SPEC section 9,
built from the same blocks of :mod:`lipfast.models.hrnet`) with branch channels
``[w, 2w, 4w, 8w]`` (w = 32 or 48), stage modules 1 / 4 / 3, and these
differences:

- every norm has momentum 0.1 (HRNetV2: 0.01);
- in the fuse layers a lower-resolution branch j > i reaches branch i through a
  1x1 conv + norm and **nearest** upsampling by ``2 ** (j - i)`` (HRNetV2:
  bilinear resize);
- stage 4's last module fuses and outputs branch 0 only, so only its
  ``fuse_layers.0.*`` exist (``stage4.2.fuse_layers.0.{1,2,3}.*``);
- the head ``final_layer`` is a 1x1 conv (bias) w -> J on branch 0.

W32 with J = 16 (LIP / MPII): 1462 state_dict entries without
``num_batches_tracked``, 28.54 M parameters.

Sizes: ``forward`` returns B x J x H/4 x W/4 heatmaps (256 x 256 -> 64 x 64,
256 x 192 -> 64 x 48, 384 x 288 -> 96 x 72, 512 x 384 -> 128 x 96). Because of
the exact-factor nearest upsampling, branch 0's size ``ceil(H / 4)`` (and
``ceil(W / 4)``) must be a multiple of 8 (every multiple of 32 is, and e.g. 61
or 93); other sizes are refused with a ``ValueError`` (upstream's model fails on
them with a shape mismatch in the fuse sum).

Initialisation (upstream's ``init_weights``): every convolution's weight
normal(0, 0.001), biases 0; norm weights 1, biases 0.

Norms (``norm=``): ``"batchnorm"`` (default: ``nn.BatchNorm2d``, upstream's; the
released weights were trained with it), ``"inplace_abn"`` or
``"inplace_abn_sync"`` (lipfast's In-Place ABN with the identity activation,
followed where upstream has a ReLU by a separate out-of-place ReLU; their outputs
are never modified in place: every residual and fuse sum makes a new tensor;
they scale by ``|w| + eps``, so weights trained with BatchNorm are exact in
them only where ``w > 0``, up to ``eps``). Under CPU autocast each in-place norm
gets a float32 copy of its input (hooks, as in HRNetV2).

Memory (``fuse_relu_conv``, default on with the in-place norms, off with
BatchNorm; a settable attribute): the ReLU -> conv pairs run as
:func:`lipfast.ops.relu_conv2d`, exactly as in :class:`~lipfast.models.HRNetV2`
(stem, Bottlenecks, BasicBlocks, the fuse layers' and transitions' stride-2
chains); the same values and gradients. The flag lives in the blocks, so
:func:`lipfast.models.fold_norms` switches it off for the whole model.

Input: B x 3 x H x W, **RGB** in [0, 1] normalised with ImageNet's mean / std
(:data:`lipfast.models.HRNET_MEAN` / :data:`~lipfast.models.HRNET_STD`); the
class attributes ``input_order``, ``input_mean``, ``input_std`` say so.

By name: :func:`lipfast.models.build` (``"pose_hrnet_w32"``,
``"pose_hrnet_w48"``, :data:`lipfast.models.POSE_MODEL_NAMES`); the parsing
tools refuse it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..nn.abn import InPlaceABN
from ..pose.joints import NUM_LIP_JOINTS
from .ce2p import add_cpu_autocast_hooks
from .hrnet import (HRNET_BACKBONE, HRNET_MEAN, HRNET_STD, HighResolutionModule,
                    _apply_transition, _check_image, _norm_factory, _transition, add_stem,
                    run_stem)

__all__ = ["PoseHRNet", "POSE_HRNET_WIDTHS", "POSE_HRNET_NORMS", "POSE_HRNET_MOMENTUM",
           "pose_input_ok"]

#: widths of the public pose configs (w32_256x256, w32_384x288, w48_384x288, ...)
POSE_HRNET_WIDTHS = (32, 48)
POSE_HRNET_NORMS = ("batchnorm", "inplace_abn", "inplace_abn_sync")
#: BN momentum of deep-high-resolution-net.pytorch
POSE_HRNET_MOMENTUM = 0.1
_INIT_STD = 0.001


def _branch0(n: int) -> int:
    """Branch 0's size for an input side ``n``: two 3x3 stride-2 convs (padding 1)."""
    return (((n + 1) // 2) + 1) // 2


def pose_input_ok(height: int, width: int) -> bool:
    """Whether :class:`PoseHRNet` takes an input of ``height`` x ``width``: branch 0's
    sides ``ceil(ceil(n / 2) / 2)`` are multiples of 8, so that the nearest
    upsampling by 2, 4 and 8 of branches 1-3 gives branch 0's size again."""
    return _branch0(int(height)) % 8 == 0 and _branch0(int(width)) % 8 == 0


class PoseHRNet(nn.Module):
    """deep-high-resolution-net.pytorch's pose HRNet (see the module docstring).

    Args:
        num_joints: heatmap channels J (LIP / MPII: 16).
        width: 32 or 48 (branch channels w, 2w, 4w, 8w).
        norm: ``"batchnorm"`` (default, upstream's), ``"inplace_abn"`` or
            ``"inplace_abn_sync"``.
        fuse_relu_conv: run the ReLU -> conv pairs as :func:`lipfast.ops.relu_conv2d`;
            ``None`` (default): on for the in-place norms, off for ``"batchnorm"``.

    ``forward(x)``: x B x 3 x H x W floating point (RGB, ImageNet-normalised), H and
    W with ``ceil(n / 4)`` a multiple of 8 (:func:`pose_input_ok`); returns the
    B x J x ceil(H/4) x ceil(W/4) heatmaps in x's dtype (the autocast dtype under
    autocast). Attributes: ``num_joints``, ``width``, ``norm``, ``channels`` (the
    four branch widths), ``fuse_relu_conv``.
    """

    input_order = "RGB"
    input_mean = HRNET_MEAN
    input_std = HRNET_STD

    def __init__(self, num_joints: int = NUM_LIP_JOINTS, width: int = 32,
                 norm: str = "batchnorm", fuse_relu_conv: bool | None = None):
        super().__init__()
        if isinstance(num_joints, bool) or not isinstance(num_joints, int) or num_joints < 1:
            raise ValueError(f"PoseHRNet: num_joints must be an int >= 1, got {num_joints!r}")
        if isinstance(width, bool) or width not in POSE_HRNET_WIDTHS:
            raise ValueError(f"PoseHRNet: width must be one of {POSE_HRNET_WIDTHS}, got "
                             f"{width!r}")
        if not isinstance(norm, str) or norm not in POSE_HRNET_NORMS:
            raise ValueError(f"PoseHRNet: norm must be one of {POSE_HRNET_NORMS}, got {norm!r}")
        if fuse_relu_conv is not None and not isinstance(fuse_relu_conv, bool):
            raise ValueError(f"PoseHRNet: fuse_relu_conv must be None, True or False, got "
                             f"{fuse_relu_conv!r}")
        fuse = norm != "batchnorm" if fuse_relu_conv is None else fuse_relu_conv
        self.num_joints, self.width, self.norm = num_joints, width, norm
        nf = _norm_factory(norm, POSE_HRNET_MOMENTUM)
        add_stem(self, nf, fuse)
        ch = [width * 2 ** i for i in range(4)]
        self.channels = ch

        def module(c, last=False):
            return HighResolutionModule(c, nf, False, fuse_relu_conv=fuse, upsample="nearest",
                                        multi_scale_output=not last)

        self.transition1 = _transition([256], ch[:2], nf)
        self.stage2 = nn.Sequential(module(ch[:2]))
        self.transition2 = _transition(ch[:2], ch[:3], nf)
        self.stage3 = nn.Sequential(*[module(ch[:3]) for _ in range(4)])
        self.transition3 = _transition(ch[:3], ch, nf)
        self.stage4 = nn.Sequential(module(ch), module(ch), module(ch, last=True))
        self.final_layer = nn.Conv2d(ch[0], num_joints, 1, bias=True)
        if self.final_layer.weight.device.type != "meta":   # values on meta: none to set
            self._init_weights()
        add_cpu_autocast_hooks(self)

    def _init_weights(self) -> None:
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=_INIT_STD)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.BatchNorm2d, InPlaceABN)):
                    if m.weight is not None:
                        nn.init.ones_(m.weight)
                        nn.init.zeros_(m.bias)

    @property
    def fuse_relu_conv(self) -> bool:
        """Whether the ReLU -> conv pairs run as :func:`lipfast.ops.relu_conv2d`.
        Settable; held by the blocks (``layer1[0]`` answers for all)."""
        return bool(self.layer1[0].fuse_relu_conv)

    @fuse_relu_conv.setter
    def fuse_relu_conv(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"PoseHRNet: fuse_relu_conv must be True or False, got {value!r}")
        from .hrnet import FUSING_MODULES

        for m in self.modules():
            if isinstance(m, FUSING_MODULES):
                m.fuse_relu_conv = value

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 4's branch-0 output: B x w x H/4 x W/4 (after the input checks)."""
        _check_image(x, "PoseHRNet", "ImageNet's mean / std")
        h, w = int(x.shape[2]), int(x.shape[3])
        if not pose_input_ok(h, w):
            raise ValueError(
                f"PoseHRNet: input {h} x {w} (H x W) gives a branch-0 map of "
                f"{_branch0(h)} x {_branch0(w)}; both sides must be multiples of 8 (H and W "
                "with ceil(n / 4) a multiple of 8, e.g. multiples of 32 such as 256 x 192 or "
                "384 x 288) so that the nearest upsampling by 2, 4, 8 of the lower branches "
                "matches it")
        fuse = self.fuse_relu_conv
        x = run_stem(self, fuse, x)
        ys = self.stage2(_apply_transition(fuse, self.transition1, [x]))
        ys = self.stage3(_apply_transition(fuse, self.transition2, ys))
        ys = self.stage4(_apply_transition(fuse, self.transition3, ys))
        return ys[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.features(x))

    def backbone_parameters(self):
        """Parameters of the HRNet backbone (stem, ``layer1``, transitions, stages):
        all but ``final_layer``."""
        for n in HRNET_BACKBONE:
            yield from getattr(self, n).parameters()

    def for_inference(self) -> "PoseHRNet":
        """A :func:`lipfast.models.fold_norms` copy (this model must be in eval mode):
        norms folded into their convolutions, ``fuse_relu_conv`` off; the same
        heatmaps within float rounding. This model is left unchanged."""
        from .fold import fold_norms

        return fold_norms(self)

    def extra_repr(self) -> str:
        return (f"num_joints={self.num_joints}, width={self.width}, norm={self.norm!r}, "
                f"fuse_relu_conv={self.fuse_relu_conv}")
