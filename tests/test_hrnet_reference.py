"""tests/hrnet_reference.py (HRNetV2 for segmentation, SPEC section 9) against the
SPEC's numbers: state-dict entries, BatchNorm layers, parameter count, key names and
shapes, and branch / output sizes of a 473 x 473 input. Big models are built on the
meta device; the one real forward is at width 18, batch 1.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("hrnet_reference", HERE / "hrnet_reference.py")
ref = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("hrnet_reference", ref)
_spec.loader.exec_module(ref)

SPEC_ENTRIES = 1533  # state-dict entries without num_batches_tracked
SPEC_BN = 306
SPEC_PARAMS_M = 65.86  # width 48, 20 classes
MODULES = {2: 1, 3: 4, 4: 3}  # stage -> number of HR modules


def _meta(width=48, num_classes=20):
    with torch.device("meta"):
        return ref.HRNetRef(num_classes=num_classes, width=width)


def _entries(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _expected_param_count(w: int, classes: int) -> int:
    """Counts the parameters from the SPEC's description alone (conv weights, conv
    biases of the head, BN weight + bias), without building anything."""
    def conv(cin, cout, k, bias=False):
        return cin * cout * k * k + (cout if bias else 0)

    def bn(c):
        return 2 * c

    c = [w, 2 * w, 4 * w, 8 * w]
    total = conv(3, 64, 3) + bn(64) + conv(64, 64, 3) + bn(64)
    # layer1: 4 bottlenecks, planes 64, the first from 64 channels with a downsample
    for inp in (64, 256, 256, 256):
        total += conv(inp, 64, 1) + bn(64) + conv(64, 64, 3) + bn(64) + conv(64, 256, 1) + bn(256)
    total += conv(64, 256, 1) + bn(256)
    # transitions
    total += conv(256, c[0], 3) + bn(c[0]) + conv(256, c[1], 3) + bn(c[1])
    total += conv(c[1], c[2], 3) + bn(c[2])
    total += conv(c[2], c[3], 3) + bn(c[3])
    for s, nmod in MODULES.items():
        ch = c[:s]
        per = 0
        for ci in ch:  # 4 basic blocks
            per += 4 * (2 * conv(ci, ci, 3) + 2 * bn(ci))
        for i in range(s):
            for j in range(s):
                if j > i:
                    per += conv(ch[j], ch[i], 1) + bn(ch[i])
                elif j < i:
                    per += (i - j - 1) * (conv(ch[j], ch[j], 3) + bn(ch[j]))
                    per += conv(ch[j], ch[i], 3) + bn(ch[i])
        total += nmod * per
    last = sum(c)
    total += conv(last, last, 1, bias=True) + bn(last) + conv(last, classes, 1, bias=True)
    return total


def _expected_keys(w: int) -> set:
    """The SPEC's key patterns, expanded (parameters and BN buffers)."""
    convk = lambda p: {f"{p}.weight"}  # noqa: E731
    bnk = lambda p: {f"{p}.{n}" for n in ("weight", "bias", "running_mean", "running_var")}  # noqa: E731
    keys = convk("conv1") | bnk("bn1") | convk("conv2") | bnk("bn2")
    for b in range(4):
        for n in (1, 2, 3):
            keys |= convk(f"layer1.{b}.conv{n}") | bnk(f"layer1.{b}.bn{n}")
    keys |= convk("layer1.0.downsample.0") | bnk("layer1.0.downsample.1")
    keys |= convk("transition1.0.0") | bnk("transition1.0.1")
    keys |= convk("transition1.1.0.0") | bnk("transition1.1.0.1")
    keys |= convk("transition2.2.0.0") | bnk("transition2.2.0.1")
    keys |= convk("transition3.3.0.0") | bnk("transition3.3.0.1")
    for s, nmod in MODULES.items():
        for m in range(nmod):
            p = f"stage{s}.{m}"
            for b in range(s):
                for k in range(4):
                    for n in (1, 2):
                        keys |= convk(f"{p}.branches.{b}.{k}.conv{n}")
                        keys |= bnk(f"{p}.branches.{b}.{k}.bn{n}")
            for i in range(s):
                for j in range(s):
                    if j > i:
                        keys |= convk(f"{p}.fuse_layers.{i}.{j}.0")
                        keys |= bnk(f"{p}.fuse_layers.{i}.{j}.1")
                    elif j < i:
                        for step in range(i - j):
                            keys |= convk(f"{p}.fuse_layers.{i}.{j}.{step}.0")
                            keys |= bnk(f"{p}.fuse_layers.{i}.{j}.{step}.1")
    keys |= {"last_layer.0.weight", "last_layer.0.bias", "last_layer.3.weight",
             "last_layer.3.bias"} | bnk("last_layer.1")
    return keys


def test_counts_w48():
    model = _meta(48, 20)
    entries = _entries(model)
    assert len(entries) == SPEC_ENTRIES
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == SPEC_BN
    assert all(m.momentum == 0.01 for m in bns)
    n = sum(p.numel() for p in model.parameters())
    print(f"HRNetRef W48, 20 classes: {n} parameters ({n / 1e6:.4f} M)")
    assert abs(n / 1e6 - SPEC_PARAMS_M) < 0.01
    assert n == _expected_param_count(48, 20)


@pytest.mark.parametrize("width", [18, 32, 48])
def test_keys_follow_spec_patterns(width):
    model = _meta(width, 20)
    assert set(_entries(model)) == _expected_keys(width)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_param_count(width, 20)


def test_key_shapes_w48():
    sd = _meta(48, 20).state_dict()
    shapes = {
        "conv1.weight": (64, 3, 3, 3),
        "conv2.weight": (64, 64, 3, 3),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.weight": (256,),
        "transition1.0.0.weight": (48, 256, 3, 3),
        "transition1.0.1.weight": (48,),
        "transition1.1.0.0.weight": (96, 256, 3, 3),
        "transition2.2.0.0.weight": (192, 96, 3, 3),
        "transition2.2.0.1.running_var": (192,),
        "transition3.3.0.0.weight": (384, 192, 3, 3),
        "transition3.3.0.1.bias": (384,),
        "stage2.0.branches.1.3.conv2.weight": (96, 96, 3, 3),
        "stage3.3.fuse_layers.0.2.0.weight": (48, 192, 1, 1),
        "stage3.3.fuse_layers.2.0.0.0.weight": (48, 48, 3, 3),
        "stage3.3.fuse_layers.2.0.1.0.weight": (192, 48, 3, 3),
        "stage4.2.fuse_layers.3.0.2.0.weight": (384, 48, 3, 3),
        "stage4.2.fuse_layers.3.0.2.1.weight": (384,),
        "stage4.2.fuse_layers.0.3.0.weight": (48, 384, 1, 1),
        "last_layer.0.weight": (720, 720, 1, 1),
        "last_layer.0.bias": (720,),
        "last_layer.1.weight": (720,),
        "last_layer.1.running_mean": (720,),
        "last_layer.3.weight": (20, 720, 1, 1),
        "last_layer.3.bias": (20,),
    }
    for k, shape in shapes.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, (k, tuple(sd[k].shape), shape)
    # Unchanged branches get no transition; only layer1.0 has a downsample.
    assert not any(re.match(r"transition[23]\.[01]\.", k) for k in sd)
    assert [k for k in sd if "downsample" in k and not k.startswith("layer1.0.")] == []


def test_structure_w48():
    model = _meta(48, 20)
    assert [len(model.stage2), len(model.stage3), len(model.stage4)] == [1, 4, 3]
    assert model.transition2[0] is None and model.transition2[1] is None
    assert model.transition3[0] is None and model.transition3[2] is None
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    assert sum(isinstance(m, ref.Bottleneck) for m in model.modules()) == 4
    assert sum(isinstance(m, ref.BasicBlock) for m in model.modules()) == 4 * (2 + 4 * 3 + 3 * 4)


def test_bad_width():
    with pytest.raises(ValueError):
        ref.HRNetRef(width=40)


def test_bottleneck_relu_after_sum():
    torch.manual_seed(0)
    block = ref.Bottleneck(256, 64).eval()
    nn.init.zeros_(block.bn3.weight)
    nn.init.zeros_(block.bn3.bias)  # the residual branch is exactly zero
    x = torch.randn(1, 256, 5, 5)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))


def test_fuse_of_one_module():
    """An HRModule with identity branches and fuse layers reduces to resize + sum."""
    torch.manual_seed(0)
    mod = ref.HRModule([2, 4], num_blocks=1).eval()
    with torch.no_grad():
        for blk in (mod.branches[0][0], mod.branches[1][0]):
            nn.init.zeros_(blk.bn2.weight)
            nn.init.zeros_(blk.bn2.bias)
        x0 = torch.rand(1, 2, 8, 7)
        x1 = torch.rand(1, 4, 4, 4)
        y0, y1 = mod([x0, x1])
        up = torch.nn.functional.interpolate(mod.fuse_layers[0][1](x1), size=(8, 7),
                                             mode="bilinear", align_corners=False)
        torch.testing.assert_close(y0, torch.relu(x0 + up))
        torch.testing.assert_close(y1, torch.relu(x1 + mod.fuse_layers[1][0](x0)))
    assert tuple(y0.shape) == (1, 2, 8, 7) and tuple(y1.shape) == (1, 4, 4, 4)


def test_forward_473_w18():
    """The one real forward (a few seconds on two CPU cores)."""
    torch.manual_seed(0)
    model = ref.HRNetRef(num_classes=20, width=18).eval()
    x = torch.randn(1, 3, 473, 473)
    with torch.inference_mode():
        ys = model.features(x)
        out = model.head(ys)
    assert [tuple(y.shape) for y in ys] == [(1, 18, 119, 119), (1, 36, 60, 60),
                                            (1, 72, 30, 30), (1, 144, 15, 15)]
    assert tuple(out.shape) == (1, 20, 119, 119)
    assert torch.isfinite(out).all()
