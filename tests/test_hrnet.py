"""lipfast.models.HRNetV2 against HRNet-Semantic-Segmentation's segmentation HRNet
(tests/hrnet_reference.py, written from its description): the key and shape
table at width 48, strict loading of an HRNet-layout state dict, outputs and
gradients against the reference with the same weights (float64, width 18), the
in-place norms against BatchNorm."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from lipfast.models import HRNetV2, fold_norms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hrnet_reference import HRNetRef  # noqa: E402


def _no_counter(sd):
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def test_w48_key_and_shape_table():
    with torch.device("meta"):
        ours = HRNetV2(20, 48, norm="batchnorm")
        ref = HRNetRef(20, 48)
    a, b = _no_counter(ours.state_dict()), _no_counter(ref.state_dict())
    assert len(a) == 1533
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(65.86e6, abs=0.01e6)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules()) == 306
    for key, shape in {"transition1.0.0.weight": (48, 256, 3, 3),
                       "transition1.1.0.0.weight": (96, 256, 3, 3),
                       "last_layer.0.weight": (720, 720, 1, 1),
                       "last_layer.3.weight": (20, 720, 1, 1)}.items():
        assert tuple(a[key].shape) == shape
    # lipfast's norms keep the keys
    with torch.device("meta"):
        abn = HRNetV2(20, 48)
    assert set(_no_counter(abn.state_dict())) == set(a)


def _randomized_pair(width=18, classes=7, seed=0):
    torch.manual_seed(seed)
    ref = HRNetRef(classes, width).double()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ours = HRNetV2(classes, width, norm="batchnorm").double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("train", [False, True])
def test_outputs_and_gradients_match_reference(train):
    ours, ref = _randomized_pair()
    ours.train(train)
    ref.train(train)
    x = torch.randn(2, 3, 67, 45, dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    a, b = ours(xa), ref(xb)
    assert a.shape == (2, 7, 17, 12)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    ga = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ga[name].grad, p.grad, rtol=1e-8, atol=1e-9, msg=name)


@pytest.mark.parametrize("norm", ["inplace_abn", "inplace_abn_sync"])
def test_inplace_norms_match_batchnorm(norm):
    bn, _ = _randomized_pair(seed=1)
    bn = bn.float()
    ours = HRNetV2(7, 18, norm=norm)
    ours.load_state_dict(bn.state_dict(), strict=True)
    with torch.no_grad():  # the in-place layers scale by |w| + eps: give them w - eps
        for m in ours.modules():
            if hasattr(m, "running_var") and m.weight is not None:
                m.weight.sub_(m.eps)
    x = torch.randn(2, 3, 61, 53)
    for train in (False, True):
        bn.train(train)
        ours.train(train)
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        a, b = ours(xa), bn(xb)
        scale = float(b.detach().abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * max(1.0, scale))
        a.sum().backward()
        b.sum().backward()
        # train mode: float32 rounding amplified by the batch statistics of the
        # 2 x 2 maps of the last branch (8 values per channel)
        gs = float(xb.grad.abs().max())
        tol = (1e-2 if train else 1e-3) * max(1.0, gs)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=tol)


def test_hrnet_layout_checkpoint_loads_strictly(tmp_path):
    ours, ref = _randomized_pair(classes=20)
    sd = ref.state_dict()
    # their released checkpoints: a FullModel wrapper's "model." prefix, in a state_dict
    torch.save({"state_dict": {"model." + k: v for k, v in _no_counter(sd).items()}},
               tmp_path / "hrnet_lip.pth")
    loaded = torch.load(tmp_path / "hrnet_lip.pth", weights_only=True)["state_dict"]
    model = HRNetV2(20, 18)
    model.load_state_dict({k[len("model."):]: v for k, v in loaded.items()}, strict=True)
    model.double().eval()
    ref.eval()
    x = torch.randn(1, 3, 41, 39, dtype=torch.float64)
    with torch.no_grad():
        # in-place norms scale by |w| + eps: equal to BatchNorm's w + eps-level shift
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-3)


def test_fold_and_errors():
    ours, _ = _randomized_pair(seed=2)
    ours.eval()
    folded = fold_norms(ours)
    x = torch.randn(1, 3, 37, 33, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ours(x), rtol=0, atol=1e-10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with pytest.raises(ValueError, match="width must be one of"):
        HRNetV2(20, 40)
    with pytest.raises(ValueError, match="head must be 'seg'"):
        HRNetV2(20, 18, head="ce2p")
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        HRNetV2(20, 18)(torch.zeros(1, 4, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        HRNetV2(20, 18)(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("width", [18])
def test_shapes_at_lip_size(width):
    model = HRNetV2(20, width).eval()
    with torch.no_grad():
        xs = model.features(torch.randn(1, 3, 473, 473))
        assert [t.shape[-1] for t in xs] == [119, 60, 30, 15]
        assert [t.shape[1] for t in xs] == [width, 2 * width, 4 * width, 8 * width]


def test_imagenet_init_skips_classifier_keys(tmp_path):
    """Their ImageNet file: the segmentation keys plus classifier-only modules; the
    classifier keys are skipped and reported, last_layer keeps its initialisation."""
    from lipfast.models import load_imagenet

    _, ref = _randomized_pair(seed=3)
    sd = {k: v.float() for k, v in _no_counter(ref.state_dict()).items()
          if not k.startswith("last_layer")}
    extra = {"incre_modules.0.0.conv1.weight": torch.zeros(32, 18, 1, 1),
             "downsamp_modules.0.0.weight": torch.zeros(256, 128, 3, 3),
             "final_layer.0.weight": torch.zeros(2048, 1024, 1, 1),
             "classifier.weight": torch.zeros(1000, 2048)}
    torch.save({**sd, **extra}, tmp_path / "hrnetv2_w18_imagenet_pretrained.pth")
    model = HRNetV2(7, 18, norm="batchnorm")
    head_before = model.last_layer[0].weight.detach().clone()
    report = load_imagenet(model, tmp_path / "hrnetv2_w18_imagenet_pretrained.pth")
    assert sorted(report.skipped) == sorted(extra)
    assert not report.missing and not report.unexpected
    torch.testing.assert_close(model.stage4[2].fuse_layers[3][0][2][0].weight,
                               sd["stage4.2.fuse_layers.3.0.2.0.weight"])
    assert torch.equal(model.last_layer[0].weight, head_before)
    # a key the model does not have (another width) is an error under strict
    bad = dict(sd)
    bad["stage5.0.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="stage5.0.weight"):
        load_imagenet(HRNetV2(7, 18, norm="batchnorm"), tmp_path / "bad.pth")


def test_load_checkpoint_strips_fullmodel_prefix(tmp_path):
    from lipfast.models import load_checkpoint

    _, ref = _randomized_pair(seed=4, classes=20)
    sd = {"model." + k: v.float() for k, v in _no_counter(ref.state_dict()).items()}
    torch.save({"state_dict": sd, "epoch": 150}, tmp_path / "wrapped.pth")
    torch.save(sd, tmp_path / "bare.pth")
    for name in ("wrapped.pth", "bare.pth"):
        model = HRNetV2(20, 18, norm="batchnorm")
        report = load_checkpoint(model, tmp_path / name)
        assert report.ok and len(report.loaded) == len(sd)
        torch.testing.assert_close(model.last_layer[3].weight,
                                   sd["model.last_layer.3.weight"])
