"""lipfast.models: the CE2P / SCHP reference network and checkpoint loading (SPEC 5).

The SCHP key table below is written from SCHP's networks/AugmentCE2P.py (module
names, Sequential indices, channel counts), independently of lipfast's model.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

import lipfast
from lipfast.models import (
    CE2P,
    LIP_MEAN,
    LIP_STD,
    CheckpointMismatchError,
    load_checkpoint,
    load_imagenet,
)

TINY = dict(layers=(1, 1, 1, 1), width_mult=0.125)


# InPlaceABNSync without a process group warns once and acts as InPlaceABN.
pytestmark = pytest.mark.usefixtures("no_process_group_warnings")


# ----------------------------------------------------------------- SCHP's layout
def _bn(keys, name, c):
    # The vendored InPlaceABNSync has no num_batches_tracked.
    for k in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{name}.{k}"] = (c,)


def schp_keys(num_classes=20, layers=(3, 4, 23, 3)):
    """Key -> shape of SCHP's AugmentCE2P ResNet-101 (context = PSP, OS 16)."""
    k = {}
    k["conv1.weight"] = (64, 3, 3, 3)
    _bn(k, "bn1", 64)
    k["conv2.weight"] = (64, 64, 3, 3)
    _bn(k, "bn2", 64)
    k["conv3.weight"] = (128, 64, 3, 3)
    _bn(k, "bn3", 128)
    inplanes = 128
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), 1):
        for b in range(n):
            p = f"layer{li}.{b}"
            k[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            _bn(k, f"{p}.bn1", planes)
            k[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            _bn(k, f"{p}.bn2", planes)
            k[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            _bn(k, f"{p}.bn3", planes * 4)
            if b == 0:
                k[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                _bn(k, f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    for s in range(4):
        k[f"context_encoding.stages.{s}.1.weight"] = (512, 2048, 1, 1)
        _bn(k, f"context_encoding.stages.{s}.2", 512)
    k["context_encoding.bottleneck.0.weight"] = (512, 2048 + 4 * 512, 3, 3)
    _bn(k, "context_encoding.bottleneck.1", 512)
    for i, c in enumerate((256, 512, 1024), 1):
        k[f"edge.conv{i}.0.weight"] = (256, c, 1, 1)
        _bn(k, f"edge.conv{i}.1", 256)
    k["edge.conv4.weight"] = (2, 256, 3, 3)
    k["edge.conv4.bias"] = (2,)
    k["edge.conv5.weight"] = (2, 6, 1, 1)
    k["edge.conv5.bias"] = (2,)
    k["decoder.conv1.0.weight"] = (256, 512, 1, 1)
    _bn(k, "decoder.conv1.1", 256)
    k["decoder.conv2.0.weight"] = (48, 256, 1, 1)
    _bn(k, "decoder.conv2.1", 48)
    k["decoder.conv3.0.weight"] = (256, 304, 1, 1)
    _bn(k, "decoder.conv3.1", 256)
    k["decoder.conv3.2.weight"] = (256, 256, 1, 1)
    _bn(k, "decoder.conv3.3", 256)
    k["decoder.conv4.weight"] = (num_classes, 256, 1, 1)
    k["decoder.conv4.bias"] = (num_classes,)
    k["fushion.0.weight"] = (256, 1024, 1, 1)
    _bn(k, "fushion.1", 256)
    k["fushion.3.weight"] = (num_classes, 256, 1, 1)
    k["fushion.3.bias"] = (num_classes,)
    return k


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("norm", ["inplace_abn_sync", "batchnorm"])
def test_full_size_key_layout_matches_schp(norm):
    with torch.device("meta"):
        model = CE2P(norm=norm)
    assert _shapes(model) == schp_keys()
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(s).numel() for k, s in schp_keys().items()
        if not k.endswith(("running_mean", "running_var")))


def _fake_checkpoint(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in keys.items():
        t = torch.randn(s, generator=g)
        out[k] = t.abs() + 0.5 if k.endswith("running_var") else t
    return out


def _random_like(key, v):
    """Random values for a state_dict entry; variances stay positive (a negative
    running_var is refused at load time)."""
    if not v.is_floating_point():
        return v
    t = torch.randn_like(v)
    return t.abs() + 0.5 if key.endswith("running_var") else t


def test_strict_load_of_schp_layout_and_module_prefix(tmp_path):
    # Small Bottleneck counts keep this cheap; widths and names are the full model's.
    layers = (1, 1, 1, 1)
    sd = _fake_checkpoint(schp_keys(layers=layers))
    model = CE2P(layers=layers)
    path = tmp_path / "schp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    report = load_checkpoint(model, path)
    assert report.ok and sorted(report.loaded) == sorted(sd)
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    # Raw state_dict and {"model": ...} wrappers too, into the other norms.
    tiny = CE2P(**TINY)
    small = {k: _random_like(k, v)
             for k, v in tiny.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(small, tmp_path / "raw.pth")
    torch.save({"model": small}, tmp_path / "wrapped.pth")
    for name, norm in (("raw.pth", "batchnorm"), ("wrapped.pth", "inplace_abn")):
        m2 = CE2P(norm=norm, **TINY)
        assert load_checkpoint(m2, tmp_path / name).ok
        assert torch.equal(m2.fushion[3].weight, small["fushion.3.weight"])


def test_missing_file_and_bad_files(tmp_path):
    model = CE2P(**TINY)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(model, tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        load_imagenet(model, tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_checkpoint(model, tmp_path / "junk.pth")
    torch.save({"epoch": 1}, tmp_path / "nosd.pth")
    with pytest.raises(ValueError, match="not a state_dict|no state_dict"):
        load_checkpoint(model, tmp_path / "nosd.pth")


def test_mismatched_keys_are_listed(tmp_path):
    model = CE2P(**TINY)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["decoder.conv4.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["fushion.3.weight"] = torch.zeros(7, 32, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, tmp_path / "bad.pth")
    msg = str(info.value)
    assert "decoder.conv4.bias" in msg and "extra.weight" in msg and "fushion.3.weight" in msg
    assert "(7, 32, 1, 1)" in msg
    # Nothing was copied under strict.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    report = load_checkpoint(model, tmp_path / "bad.pth", strict=False)
    assert report.missing == ["decoder.conv4.bias"] and report.unexpected == ["extra.weight"]
    assert [m[0] for m in report.mismatched] == ["fushion.3.weight"]
    assert "fushion.3.weight" not in report.loaded and "fushion.1.weight" in report.loaded


def test_imagenet_init_skips_fc_and_loads_backbone_only(tmp_path):
    model = CE2P(**TINY)
    backbone = ("conv", "bn", "layer")
    sd = {k: _random_like(k, v) for k, v in model.state_dict().items()
          if k.startswith(backbone)}
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"] = torch.randn(1000, 256)
    sd["fc.bias"] = torch.randn(1000)
    torch.save(sd, tmp_path / "resnet101-imagenet.pth")
    head_before = model.decoder.conv4.weight.clone()
    report = load_imagenet(model, tmp_path / "resnet101-imagenet.pth")
    assert report.skipped == ["fc.bias", "fc.weight"] and report.ok
    assert torch.equal(model.layer3[0].conv2.weight, sd["layer3.0.conv2.weight"])
    assert torch.equal(model.bn1.running_var, sd["bn1.running_var"])
    assert torch.equal(model.decoder.conv4.weight, head_before)
    # A head key in an "ImageNet" file is unexpected; a missing backbone key is missing.
    bad = dict(sd)
    bad["decoder.conv4.weight"] = model.decoder.conv4.weight.clone()
    del bad["layer1.0.conv1.weight"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="layer1.0.conv1.weight") as info:
        load_imagenet(model, tmp_path / "bad.pth")
    assert "decoder.conv4.weight" in str(info.value)


# ----------------------------------------------------------------- shapes
@pytest.mark.parametrize("context", ["psp", "base_oc", "pyramid_oc", "asp_oc"])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_shapes(context, output_stride):
    torch.manual_seed(0)
    model = CE2P(num_classes=5, context=context, output_stride=output_stride,
                 norm="inplace_abn", **TINY)
    size = (99, 103) if context == "pyramid_oc" else (45, 53)   # odd sizes
    x = torch.randn(2, 3, *size)
    (parsing, fusion), (edge,) = model(x)
    h, w = (-(-(-(-s // 2)) // 2) for s in size)   # conv s2 then maxpool s2, both ceil
    assert parsing.shape == (2, 5, h, w) and fusion.shape == (2, 5, h, w)
    assert edge.shape == (2, 2, h, w)
    # The context runs at 1/output_stride (layer4's map).
    feats = {}

    def keep(name):
        def hook(module, inputs, output):
            feats[name] = output.shape
        return hook

    model.layer4.register_forward_hook(keep("l4"))
    model.context_encoding.register_forward_hook(keep("c"))
    model(x)
    l1 = (h, w)
    expect = tuple(-(-s // (output_stride // 4)) for s in l1)
    assert feats["l4"][2:] == expect
    assert feats["c"][1] == model.context_channels and feats["c"][2:] == expect
    (parsing.sum() + fusion.sum() + edge.sum()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_oc_context_layouts():
    with torch.device("meta"):
        asp = CE2P(context="asp_oc", output_stride=8)
        base = CE2P(context="base_oc")
        pyr = CE2P(context="pyramid_oc")
    a = _shapes(asp)
    assert a["context_encoding.0.weight"] == (512, 2048, 3, 3)
    assert a["context_encoding.0.bias"] == (512,)
    assert a["context_encoding.2.context.2.stages.0.f_key.0.weight"] == (128, 256, 1, 1)
    assert a["context_encoding.2.context.2.stages.0.f_query.1.running_var"] == (128,)
    assert a["context_encoding.2.conv_bn_dropout.0.weight"] == (512, 1280, 1, 1)
    assert a["decoder.conv1.0.weight"] == (256, 512, 1, 1)
    b = _shapes(base)
    assert b["context_encoding.2.stages.0.f_value.weight"] == (256, 512, 1, 1)
    assert b["context_encoding.2.conv_bn_dropout.0.weight"] == (512, 1024, 1, 1)
    p = _shapes(pyr)
    assert p["context_encoding.2.up_dr.0.weight"] == (2048, 512, 1, 1)
    assert p["context_encoding.2.stages.3.f_key.0.weight"] == (256, 512, 1, 1)
    assert p["context_encoding.2.conv_bn_dropout.0.weight"] == (512, 4096, 1, 1)
    # Backbone dilation at OS 8 (OCNet): layer3 stride 1 dilation 2, layer4 dilation 4.
    assert asp.layer3[0].conv2.stride == (1, 1) and asp.layer3[0].conv2.dilation == (2, 2)
    assert asp.layer4[0].conv2.dilation == (4, 4)
    assert base.layer3[0].conv2.stride == (2, 2) and base.layer4[0].conv2.dilation == (2, 2)


def test_bad_arguments_and_inputs():
    for kwargs in (dict(context="aspp"), dict(output_stride=32), dict(norm="gn"),
                   dict(layers=(1, 1, 1)), dict(layers=(1, 0, 1, 1)), dict(width_mult=0),
                   dict(width_mult=float("nan")), dict(num_classes=0)):
        with pytest.raises(ValueError):
            CE2P(**{**TINY, **kwargs})
    model = CE2P(**TINY).eval()
    with pytest.raises(ValueError, match="3 x H x W"):
        model(torch.randn(1, 1, 33, 33))
    with pytest.raises(TypeError):
        model([torch.randn(1, 3, 33, 33)])


# ----------------------------------------------------------------- norms
def test_batchnorm_keys_equal_and_eval_outputs_match():
    torch.manual_seed(0)
    abn = CE2P(num_classes=4, context="asp_oc", output_stride=8, norm="inplace_abn", **TINY)
    bn = CE2P(num_classes=4, context="asp_oc", output_stride=8, norm="batchnorm", **TINY)
    plain = CE2P(num_classes=4, context="asp_oc", output_stride=8, norm="inplace_abn_sync",
                 **TINY)
    assert list(abn.state_dict()) == list(bn.state_dict()) == list(plain.state_dict())
    # Trained-looking statistics; positive norm weights (the in-place layers scale by
    # |w| + eps, so they agree with BatchNorm to ~eps relative for w > 0).
    g = torch.Generator().manual_seed(1)
    sd = {}
    for k, v in abn.state_dict().items():
        if k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif v.is_floating_point() and v.dim() == 1 and k.endswith("weight"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif v.is_floating_point() and v.dim() > 1:   # conv weights, unit gain
            sd[k] = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
        elif v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        else:
            sd[k] = v
    for m in (abn, bn, plain):
        m.load_state_dict(sd)
        m.double().eval()
    x = torch.randn(2, 3, 41, 37, dtype=torch.float64)
    with torch.no_grad():
        ref = bn(x)
        for m in (abn, plain):
            out = m(x)
            for a, b in zip(out[0] + out[1], ref[0] + ref[1]):
                torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
    # Exact when the weights make |w| + eps == w + eps: compare against BatchNorm with
    # the norm weights shifted by eps.
    # (in float64: w + eps rounded to float32 would differ by ~1e-8 relative)
    sd2 = {k: (v.double() + 1e-5 if v.dim() == 1 and k.endswith("weight")
               and _is_norm_key(bn, k) else v) for k, v in sd.items()}
    bn.load_state_dict(sd2)
    with torch.no_grad():
        ref = bn(x)
        out = abn(x)
    for a, b in zip(out[0] + out[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _is_norm_key(model, key):
    mod = model.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(mod, nn.modules.batchnorm._BatchNorm)


def test_training_step_matches_between_norms():
    """One training forward/backward: the lipfast stack and the batchnorm stack agree
    (batch statistics, dropout with the same seed)."""
    torch.manual_seed(0)
    ref = CE2P(num_classes=4, context="base_oc", norm="batchnorm", **TINY).double()
    fast = CE2P(num_classes=4, context="base_oc", norm="inplace_abn", **TINY).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 49, 49, dtype=torch.float64)
    outs = []
    for m in (ref, fast):
        torch.manual_seed(5)
        o = m(x)
        loss = sum((t * t).mean() for t in o[0] + o[1])
        loss.backward()
        outs.append((loss.detach(), m.layer1[0].conv1.weight.grad.clone(),
                     m.context_encoding[2].conv_bn_dropout[0].weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ref.bn1.running_mean, fast.bn1.running_mean)


# ----------------------------------------------------------------- layouts, AMP, compile
def test_channels_last_and_noncontiguous_input():
    torch.manual_seed(0)
    model = CE2P(num_classes=3, context="psp", norm="inplace_abn", **TINY).double().eval()
    x = torch.randn(2, 3, 40, 44, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        nc = model(x.transpose(2, 3).contiguous().transpose(2, 3))
    for got in (cl, nc):
        for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # Training step in channels_last.
    model.train()
    out = model(x.to(memory_format=torch.channels_last))
    sum(o.sum() for o in out[0] + out[1]).backward()
    assert model.conv1.weight.grad is not None


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    model = CE2P(num_classes=3, context="asp_oc", output_stride=8, norm="inplace_abn", **TINY)
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        ref = model.eval()(x)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = sum(o.float().square().mean() for o in out[0] + out[1])
    loss.backward()
    assert torch.isfinite(loss) and model.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    for a, b in zip(out[0] + out[1], ref[0] + ref[1]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0.1, atol=0.1)


def test_torch_compile_tiny():
    torch.manual_seed(0)
    model = CE2P(num_classes=3, context="base_oc", norm="inplace_abn", **TINY).eval()
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        ref = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    # One compilation, forward and backward (grad mode on; eval keeps dropout out of
    # the comparison).
    out = compiled(x)
    for a, b in zip(out[0] + out[1], ref[0] + ref[1]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-5)
    sum(o.sum() for o in out[0] + out[1]).backward()
    grad = model.layer4[0].conv2.weight.grad.clone()
    model.zero_grad()
    out = model(x)
    sum(o.sum() for o in out[0] + out[1]).backward()
    torch.testing.assert_close(grad, model.layer4[0].conv2.weight.grad, rtol=1e-4, atol=1e-5)


def test_constants_and_exports():
    assert LIP_MEAN == (0.406, 0.456, 0.485) and LIP_STD == (0.225, 0.224, 0.229)
    assert lipfast.models.CE2P is CE2P
    assert callable(lipfast.patch)


# ----------------------------------------------------------------- fused ReLU -> conv
def _fused_pair(norm="inplace_abn", context="psp", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    fused = CE2P(num_classes=4, context=context, norm=norm, **TINY, **kw).to(dtype)
    plain = CE2P(num_classes=4, context=context, norm=norm, fuse_relu_conv=False, **TINY,
                 **kw).to(dtype)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_fuse_relu_conv_flag_defaults_and_keys():
    for norm, default in (("inplace_abn_sync", True), ("inplace_abn", True),
                          ("batchnorm", False)):
        m = CE2P(num_classes=3, norm=norm, **TINY)
        assert m.fuse_relu_conv is default
        assert all(b.fuse_relu_conv is default for b in m.modules()
                   if isinstance(b, lipfast.models.ce2p.Bottleneck))
        off = CE2P(num_classes=3, norm=norm, fuse_relu_conv=False, **TINY)
        assert list(off.state_dict()) == list(m.state_dict())
        # The conv and ReLU modules stay plain torch modules.
        assert type(m.conv2) is nn.Conv2d and type(m.layer1[0].conv3) is nn.Conv2d
        assert isinstance(m.relu1, nn.ReLU) and isinstance(m.layer1[0].relu, nn.ReLU)
    m.fuse_relu_conv = True
    assert all(b.fuse_relu_conv for b in m.modules()
               if isinstance(b, lipfast.models.ce2p.Bottleneck))
    with pytest.raises(ValueError, match="fuse_relu_conv"):
        CE2P(num_classes=3, fuse_relu_conv=1, **TINY)
    with pytest.raises(ValueError, match="fuse_relu_conv"):
        m.fuse_relu_conv = "yes"


@pytest.mark.parametrize("norm", ["inplace_abn", "batchnorm"])
def test_fused_relu_conv_matches_unfused_training(norm):
    """float64, train mode, same weights and dropout seed: outputs, every parameter
    gradient, the input gradient and the running statistics equal the unfused model."""
    fused, plain = _fused_pair(norm=norm)
    if norm == "batchnorm":
        fused.fuse_relu_conv = True     # numerically identical there too
    x = torch.randn(2, 3, 37, 43, dtype=torch.float64)
    res = []
    for m in (fused, plain):
        m.train()
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        out = m(xi)
        g = torch.Generator().manual_seed(4)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()
                   for t in out[0] + out[1])
        loss.backward()
        res.append((out, xi.grad, {n: p.grad for n, p in m.named_parameters()},
                    {n: b.clone() for n, b in m.named_buffers()}))
    (o1, gx1, gp1, b1), (o2, gx2, gp2, b2) = res
    for a, b in zip(o1[0] + o1[1], o2[0] + o2[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-12)
    assert gp1.keys() == gp2.keys()
    for n in gp1:
        assert gp1[n] is not None, n
        torch.testing.assert_close(gp1[n], gp2[n], rtol=1e-9, atol=1e-11, msg=n)
    for n in b1:
        torch.testing.assert_close(b1[n], b2[n], rtol=1e-12, atol=1e-12, msg=n)


def test_fused_relu_conv_autocast_bf16_cpu_matches_unfused():
    fused, plain = _fused_pair(dtype=torch.float32, context="base_oc")
    x = torch.randn(2, 3, 33, 33)
    res = []
    for m in (fused, plain.train()):
        m.train()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            loss = sum(o.float().square().mean() for o in out[0] + out[1])
        loss.backward()
        res.append((out, loss.detach(), m.layer2[0].conv2.weight.grad.clone(),
                    m.conv2.weight.grad.clone(), m.conv1.weight.grad.clone()))
    (o1, *r1), (o2, *r2) = res
    for a, b in zip(o1[0] + o1[1], o2[0] + o2[1]):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(r1, r2):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * float(b.abs().max()))


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while fn() runs (parameters
    included on both sides, each storage counted once)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def test_fused_relu_conv_saves_less_activation_memory():
    """The fused forward saves exactly the ReLU outputs of the fused pairs less."""
    fused, plain = _fused_pair(context="psp", dtype=torch.float32)
    x = torch.randn(2, 3, 49, 49)
    relu_bytes = []

    def record(module, args, out):
        relu_bytes.append(out.untyped_storage().nbytes())

    hooks = [plain.relu1.register_forward_hook(record),
             plain.relu2.register_forward_hook(record)]
    hooks += [b.relu.register_forward_hook(record) for b in plain.modules()
              if isinstance(b, lipfast.models.ce2p.Bottleneck)]
    torch.manual_seed(3)
    plain_bytes, out_p = _saved_bytes(lambda: plain.train()(x))
    for h in hooks:
        h.remove()
    torch.manual_seed(3)
    fused_bytes, out_f = _saved_bytes(lambda: fused.train()(x))
    n_blocks = sum(fused.layers)
    assert len(relu_bytes) == 2 + 2 * n_blocks
    assert sum(relu_bytes) > 0 and fused_bytes < plain_bytes
    assert fused_bytes == plain_bytes - sum(relu_bytes)
    for a, b in zip(out_f[0] + out_f[1], out_p[0] + out_p[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
