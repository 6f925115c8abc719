"""lipfast.models.HRNetV2 against HRNet-Semantic-Segmentation's segmentation HRNet
(tests/hrnet_reference.py, written from its description): the key and shape
table at width 48, strict loading of an HRNet-layout state dict, outputs and
gradients against the reference with the same weights (float64, width 18), the
in-place norms against BatchNorm.

Issue 14 (second half of the file): the CE2P edge / fusion head and the OC
contexts against tests/hrnet_reference.py's HRNetHeadsRef (with the OCNet
references of tests/test_oc_modules.py), the ReLU -> conv fusion, norms,
channels_last, CPU bfloat16 autocast, torch.compile, for_inference and
SCHPCriterion on the CE2P-format output."""

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


# ----------------------------------------------------------- issue 14: heads, contexts, fusion

import lipfast.models.ce2p as _ce2p_mod  # noqa: E402
from fold_helpers import calibrate_norms, lipfast_ops_called, randomize  # noqa: E402
from hrnet_reference import HRNetHeadsRef  # noqa: E402
from lipfast.models import CE2P, LIP_MEAN, LIP_STD  # noqa: E402
from lipfast.models.ce2p import BatchNormAct, DecoderModule, EdgeModule  # noqa: E402
from lipfast.models.hrnet import HRNET_MEAN, HRNET_STD  # noqa: E402
from lipfast.nn.abn import InPlaceABN  # noqa: E402
from lipfast.nn.oc import ASPOCModule, BaseOCModule, PyramidOCModule  # noqa: E402
from test_oc_modules import RefASPOC, RefBaseOC, RefPyramidOC  # noqa: E402

W, K = 18, 5                 # width, classes
# odd sizes; the 512-channel contexts dominate the cost, so small maps:
# branch 0 (and the outputs) 9 x 8 (pyramid_oc's 6 x 6 regions fit), branch 3 2 x 1
SIZE = (33, 29)
OUT = (9, 8)


@pytest.fixture(autouse=True)
def _no_group_warning(monkeypatch):
    from lipfast.ops import abn as abn_ops
    monkeypatch.setattr(abn_ops, "_warned_no_group", True)


def _ref_context(context):
    """OCNet's modules (tests/test_oc_modules.py's eager references) with CE2P's
    constructor arguments and BatchNorm + leaky_relu norms."""
    from hrnet_reference import BNLeaky
    if context is None:
        return None, None
    if context == "base_oc":
        return RefBaseOC(512, 512, 256, 256, 0.05, [1], norm=BNLeaky), 512
    if context == "pyramid_oc":
        return RefPyramidOC(512, 512, 0.05, [1, 2, 3, 6], norm=BNLeaky), 512
    return RefASPOC(512, 256, (12, 24, 36), "current", norm=BNLeaky), 512


def _heads_pair(head, context, seed=0, dtype=torch.float64):
    ours = HRNetV2(K, W, head=head, context=context, norm="batchnorm")
    randomize(ours, seed)
    ours = calibrate_norms(ours.to(dtype), _input(dtype, seed=99))
    ctx, cc = _ref_context(context)
    ref = HRNetHeadsRef(K, W, head=head, context=ctx, context_channels=cc).to(dtype)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else [out[0][0], out[0][1], out[1][0]]


def _run(model, x, train, seed=7):
    """(outputs, input grad, {name: grad}) of one forward / backward with fixed
    output gradients; dropout masks from ``seed``."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    outs = _flat(model(xi))
    g = torch.Generator().manual_seed(11)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
               for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], xi.grad, grads


def _input(dtype=torch.float64, seed=3, size=SIZE, batch=2):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("head,context", [("ce2p", None), ("ce2p", "base_oc"),
                                          ("ce2p", "pyramid_oc"), ("ce2p", "asp_oc"),
                                          ("seg", "asp_oc")])
def test_heads_and_contexts_match_reference(head, context):
    """float64, train (batch statistics, identically seeded dropout) and eval: every
    output, the input gradient and every parameter gradient against the plain-torch
    reference (HRNetRef's backbone + the head and OCNet's modules written out)."""
    ours, ref = _heads_pair(head, context)
    x = _input()
    # eval first: in train mode OCNet's reference updates the shared key norm's
    # statistics twice per forward (lipfast's once), so they differ afterwards
    for train in (False, True):
        oa, xa, ga = _run(ours, x, train)
        ob, xb, gb = _run(ref, x, train)
        shapes = [(2, K, *OUT)] if head == "seg" else [(2, K, *OUT), (2, K, *OUT), (2, 2, *OUT)]
        assert [tuple(o.shape) for o in oa] == shapes
        for a, b in zip(oa, ob):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))
        torch.testing.assert_close(xa, xb, rtol=1e-8, atol=1e-9 * float(xb.abs().max()))
        assert ga.keys() == gb.keys()
        scale = max(float(g.abs().max()) for g in gb.values())
        for name in gb:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-7, atol=1e-9 * scale,
                                       msg=name)
        if train:   # the running statistics moved the same way (momenta 0.01 and 0.1)
            rb = dict(ref.named_buffers())
            for name, buf in ours.named_buffers():
                if not name.endswith("num_batches_tracked") and ".f_" not in name:
                    torch.testing.assert_close(buf, rb[name], rtol=1e-9, atol=1e-12, msg=name)


def test_ce2p_head_structure_and_attributes():
    m = HRNetV2(K, W, head="ce2p", context="asp_oc")
    assert (m.num_classes, m.width, m.head, m.context, m.norm, m.align_corners) == (
        K, W, "ce2p", "asp_oc", "inplace_abn_sync", False)
    assert not hasattr(m, "last_layer")
    assert isinstance(m.edge, EdgeModule) and isinstance(m.decoder, DecoderModule)
    assert [type(t).__name__ for t in m.fushion] == ["Conv2d", "InPlaceABNSync", "Dropout2d",
                                                     "Conv2d"]
    assert m.fushion[2].p == 0.1
    assert m.edge.conv1[0].in_channels == W and m.edge.conv3[0].in_channels == 4 * W
    assert m.decoder.conv1[0].in_channels == 512 and m.decoder.conv2[0].in_channels == W
    assert isinstance(m.context_encoding[2], ASPOCModule)
    assert m.context_encoding[0].in_channels == 15 * W and m.context_encoding[0].bias is not None
    # CE2P's "act" norms (leaky_relu 0.01) in the head and the context, HRNet's elsewhere
    assert m.fushion[1].activation == "leaky_relu" and m.fushion[1].activation_param == 0.01
    assert m.context_encoding[1].activation == "leaky_relu"
    assert m.bn1.activation == "identity" and m.bn1.momentum == 0.01
    keys = set(m.state_dict())
    assert {"edge.conv5.weight", "decoder.conv4.bias", "fushion.3.weight",
            "context_encoding.2.conv_bn_dropout.0.weight"} <= keys
    assert not any(k.startswith("last_layer") for k in keys)
    # context_channels and the seg head on a context
    for context, cc in ((None, 15 * W), ("base_oc", 512), ("pyramid_oc", 512), ("asp_oc", 512)):
        seg = HRNetV2(K, W, context=context, norm="batchnorm")
        assert seg.context_channels == cc
        assert seg.last_layer[0].in_channels == cc and seg.last_layer[3].out_channels == K
        assert isinstance(seg.last_layer[1], torch.nn.BatchNorm2d)
    assert isinstance(HRNetV2(K, W, context="base_oc").context_encoding[2], BaseOCModule)
    assert isinstance(HRNetV2(K, W, context="pyramid_oc").context_encoding[2], PyramidOCModule)
    bn = HRNetV2(K, W, head="ce2p", context="base_oc", norm="batchnorm")
    assert type(bn.fushion[1]) is BatchNormAct and type(bn.bn1) is torch.nn.BatchNorm2d
    # input format attributes (the tools read these)
    assert (HRNetV2.input_order, HRNetV2.input_mean, HRNetV2.input_std) == (
        "RGB", HRNET_MEAN, HRNET_STD)
    assert (CE2P.input_order, CE2P.input_mean, CE2P.input_std) == ("BGR", LIP_MEAN, LIP_STD)
    # CPU-autocast hooks on every in-place norm, the head's and the context's included
    norms = [n for n in m.modules() if isinstance(n, InPlaceABN)]
    assert len(norms) > 300
    for n in norms:
        assert _ce2p_mod._float_on_cpu in n._forward_pre_hooks.values()
        assert _ce2p_mod._back_to_autocast_dtype in n._forward_hooks.values()


def test_backbone_parameters():
    for head, context in (("ce2p", "base_oc"), ("seg", None)):
        m = HRNetV2(K, W, head=head, context=context, norm="batchnorm")
        back = {id(p) for p in m.backbone_parameters()}
        heads = ("last_layer.", "edge.", "decoder.", "fushion.", "context_encoding.")
        for name, p in m.named_parameters():
            assert (id(p) in back) == (not name.startswith(heads)), name
        assert len(back) == len(list(m.backbone_parameters()))


@pytest.mark.parametrize("norm", ["inplace_abn", "inplace_abn_sync"])
def test_state_dict_moves_between_norms(norm):
    bn = randomize(HRNetV2(K, W, head="ce2p", context="pyramid_oc", norm="batchnorm"), 4)
    abn = HRNetV2(K, W, head="ce2p", context="pyramid_oc", norm=norm)
    assert list(bn.state_dict()) == list(abn.state_dict())
    abn.load_state_dict(bn.state_dict(), strict=True)
    back = HRNetV2(K, W, head="ce2p", context="pyramid_oc", norm="batchnorm")
    back.load_state_dict(abn.state_dict(), strict=True)
    got = back.state_dict()
    for k, v in bn.state_dict().items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ce2p_head_inplace_norms_match_batchnorm(dtype):
    """The in-place norms (weights shifted by -eps for their |w| + eps) against
    BatchNorm / BatchNormAct with a context, eval and train: float64 to rounding
    (outputs and input gradients); float32 outputs within 2e-4 of their largest
    entry, input gradients within 2% (relative L2: where a leaky_relu input is
    within float32 rounding of 0 the two stacks may take different slopes)."""
    bn = randomize(HRNetV2(K, W, head="ce2p", context="base_oc", norm="batchnorm"), 5,
                   var_range=(0.5, 1.5)).to(dtype)
    with torch.no_grad():   # positive norm weights: |w| + eps == w + eps
        for m in bn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.abs_().add_(0.1)
    x = _input(dtype, size=(61, 53))
    calibrate_norms(bn, _input(dtype, seed=98, size=(61, 53)))
    ours = HRNetV2(K, W, head="ce2p", context="base_oc", norm="inplace_abn").to(dtype)
    ours.load_state_dict(bn.state_dict(), strict=True)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, InPlaceABN):
                m.weight.sub_(m.eps)
    exact = dtype == torch.float64
    for train in (False, True):
        oa, xa, _ = _run(ours, x, train)
        ob, xb, _ = _run(bn, x, train)
        for a, b in zip(oa, ob):
            scale = float(b.abs().max())
            torch.testing.assert_close(a, b, rtol=0, atol=(1e-11 if exact else 2e-4) * scale)
        if exact:
            torch.testing.assert_close(xa, xb, rtol=0, atol=1e-11 * float(xb.abs().max()))
        else:
            rel = float((xa - xb).norm() / xb.norm())
            assert rel < 2e-2, rel


# 1 stem + 4 x 2 Bottleneck + (8 + 48 + 48) BasicBlocks + (4 x 1 + 3 x 4) fuse-layer
# intermediate steps (+ 1 last_layer)
_FUSED_CALLS = {"ce2p": 129, "seg": 130}


def _count_relu_conv(monkeypatch):
    calls = []
    real = _ce2p_mod.relu_conv2d

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_ce2p_mod, "relu_conv2d", counting)
    return calls


@pytest.mark.parametrize("head,context", [("ce2p", "asp_oc"), ("seg", None)])
def test_fuse_relu_conv_on_off_identical(head, context, monkeypatch):
    calls = _count_relu_conv(monkeypatch)
    torch.manual_seed(0)
    model = HRNetV2(K, W, head=head, context=context, norm="inplace_abn").double()
    assert model.fuse_relu_conv is True
    x = _input()
    oa, xa, ga = _run(model, x, True)
    assert len(calls) == _FUSED_CALLS[head]
    model.fuse_relu_conv = False
    assert not any(getattr(m, "fuse_relu_conv", False) for m in model.modules())
    calls.clear()
    ob, xb, gb = _run(model, x, True)
    assert len(calls) == 0
    for a, b in zip(oa, ob):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
    torch.testing.assert_close(xa, xb, rtol=1e-11, atol=1e-12 * float(xb.abs().max()))
    assert ga.keys() == gb.keys()
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-10,
                                   atol=1e-12 * float(gb[name].abs().max()), msg=name)
    model.fuse_relu_conv = True
    assert all(m.fuse_relu_conv for m in model.modules() if hasattr(m, "fuse_relu_conv"))


def test_fuse_relu_conv_defaults_and_errors():
    assert HRNetV2(K, W, norm="inplace_abn").fuse_relu_conv is True
    assert HRNetV2(K, W).fuse_relu_conv is True
    assert HRNetV2(K, W, norm="batchnorm").fuse_relu_conv is False
    assert HRNetV2(K, W, norm="batchnorm", fuse_relu_conv=True).fuse_relu_conv is True
    m = HRNetV2(K, W, fuse_relu_conv=False)
    assert not m.layer1[0].fuse_relu_conv and not m.stage4[0].branches[0][0].fuse_relu_conv
    assert set(m.state_dict()) == set(HRNetV2(K, W).state_dict())
    with pytest.raises(ValueError, match="'yes'"):
        HRNetV2(K, W, fuse_relu_conv="yes")
    with pytest.raises(ValueError, match="1"):
        m.fuse_relu_conv = 1


def test_channels_last_input():
    model = randomize(HRNetV2(K, W, head="ce2p", context="base_oc", norm="inplace_abn"), 6)
    model = model.double().eval()
    x = _input()
    with torch.no_grad():
        ref = _flat(model(x))
        got = _flat(model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last)))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))
    model.train()
    out = _flat(model(x.to(memory_format=torch.channels_last)))
    sum(o.sum() for o in out).backward()
    assert model.conv1.weight.grad is not None


@pytest.mark.parametrize("head,context", [("ce2p", "asp_oc"), ("seg", "pyramid_oc")])
def test_autocast_bf16_cpu(head, context):
    torch.manual_seed(0)
    model = HRNetV2(K, W, head=head, context=context, norm="inplace_abn")
    x = _input(torch.float32)
    calibrate_norms(model, _input(torch.float32, seed=97))
    with torch.no_grad():
        ref = _flat(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _flat(model(x))
    # bfloat16 rounding compounds through HRNet's depth: about 9% relative L2 at
    # stage 4 for this random model, with BatchNorm (no hooks) as with the in-place
    # norms; a wiring or dtype error is off by O(100%)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        rel = float((a.float() - b).norm() / b.norm())
        assert rel < 0.2, rel
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _flat(model(x))
        loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    assert all(o.dtype == torch.bfloat16 for o in out)
    assert torch.isfinite(loss) and model.conv1.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """One fullgraph dynamo trace of the whole model (ce2p head, base_oc, the ReLU ->
    conv fusion on: relu_conv2d and oc_attention as opaque custom ops). BatchNorm,
    backend "eager" and no_grad keep it under ~10 s (HRNet has some 600 modules;
    the in-place norms' CPU-autocast hooks double the trace time, and CE2P's
    test_torch_compile_tiny covers them under fullgraph)."""
    torch.manual_seed(0)
    model = HRNetV2(K, W, head="ce2p", context="base_oc", norm="batchnorm",
                    fuse_relu_conv=True).eval()
    calibrate_norms(model, _input(torch.float32, seed=96))
    x = _input(torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        ref = _flat(model(x))
        out = _flat(compiled(x))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    torch._dynamo.reset()


@pytest.mark.parametrize("head,context", [("ce2p", "pyramid_oc"), ("seg", "asp_oc")])
def test_for_inference_equals_eval(head, context):
    model = randomize(HRNetV2(K, W, head=head, context=context, norm="inplace_abn"), 8,
                      var_range=(0.5, 1.5)).double().eval()
    x = _input()
    assert lipfast_ops_called(model, x)        # the unfolded model uses lipfast's ops
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = model.for_inference()
    assert not folded.training and folded.fuse_relu_conv is False
    assert not any(getattr(m, "fuse_relu_conv", False) for m in folded.modules())
    assert not any(isinstance(m, (InPlaceABN, torch.nn.BatchNorm2d)) for m in folded.modules())
    assert lipfast_ops_called(folded, x) == set()
    with torch.no_grad():
        a, b = _flat(folded(x)), _flat(model(x))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-10 * float(v.abs().max()))
    assert model.fuse_relu_conv is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="training mode"):
        model.train().for_inference()


def test_schp_criterion_takes_the_ce2p_output():
    from lipfast.losses import SCHPCriterion

    torch.manual_seed(0)
    model = HRNetV2(K, W, head="ce2p", context="asp_oc", norm="inplace_abn")
    x = _input(torch.float32)
    labels = torch.randint(0, K, (2, *SIZE))
    labels[:, :5] = 255
    edges = torch.zeros_like(labels)
    edges[:, :, 20:23] = 1
    out = model(x)
    loss = SCHPCriterion(num_classes=K)(out, [labels, edges])
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name in ("conv1.weight", "edge.conv1.0.weight", "fushion.3.weight",
                 "context_encoding.0.weight", "decoder.conv4.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_bad_head_context_width():
    for kw, text in ((dict(head="psp"), "'psp'"), (dict(head=None), "None"),
                     (dict(context="psp"), "'psp'"), (dict(context="oc"), "'oc'"),
                     (dict(width=40), "40"), (dict(width=True), "True"),
                     (dict(norm="gn"), "'gn'"), (dict(align_corners=1), "1")):
        with pytest.raises(ValueError, match=text):
            HRNetV2(K, **{"width": W, **kw})
    with pytest.raises(ValueError, match="head must be one of"):
        HRNetV2(K, W, head="CE2P")
    with pytest.raises(ValueError, match="context must be one of"):
        HRNetV2(K, W, context="ASP_OC")
