"""lipfast.models.PoseHRNet (SPEC section 10, "Model") against
tests/pose_hrnet_reference.py (deep-high-resolution-net.pytorch's pose HRNet
written from the SPEC in plain PyTorch): the key / shape table of W32 and W48
(meta device), heatmap sizes, outputs and gradients against the reference with
the same weights (float64, eval and train, odd and non-contiguous inputs), strict
loading of a pose-layout state dict, the in-place norms against BatchNorm, the
ImageNet init, the ReLU -> conv fusion, channels_last, CPU autocast,
torch.compile, for_inference, and the errors.

Inputs are tiny (branch 0 of 8 x 8 or 16 x 8): W32 at 256 x 256 is far too slow
for CI on the CPU; the large sizes are checked on the meta device."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from lipfast.models import (Checkpoint, CheckpointMismatchError, PoseHRNet, load_checkpoint,
                            load_imagenet, model_from_checkpoint, read_checkpoint)
from lipfast.models.pose_hrnet import pose_input_ok
from lipfast.nn.abn import InPlaceABN
from lipfast.pose import NUM_LIP_JOINTS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fold_helpers import calibrate_norms, lipfast_ops_called, randomize  # noqa: E402
from pose_hrnet_reference import PoseHRNetRef, RefHRModule  # noqa: E402

# one torch thread: the tiny maps do not parallelise, and the CI jobs share 2 cores
pytestmark = pytest.mark.usefixtures("one_thread")

J = NUM_LIP_JOINTS
# (H, W) with ceil(n / 4) a multiple of 8, odd: branch 0 16 x 8, branch 3 2 x 1
ODD = (61, 29)
SMALL = (29, 31)      # branch 0 8 x 8, branch 3 1 x 1 (batch 2 in train mode)
# train-mode float32 comparisons of different norm implementations need more than
# 2 values per channel at branch 3: with 2, a channel's batch variance is often far
# below eps and each norm amplifies rounding differences ~1 / sqrt(eps) times
TRAIN32 = (61, 61)    # branch 3 2 x 2


@pytest.fixture(autouse=True)
def _no_group_warning(monkeypatch):
    from lipfast.ops import abn as abn_ops
    monkeypatch.setattr(abn_ops, "_warned_no_group", True)


def _no_counter(sd):
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def _input(size, batch=1, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g, dtype=torch.float64).to(dtype)


def _positive_norm_weights(model, seed=5):
    """Norm weights in [0.5, 1.5] (the in-place norms scale by |w| + eps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, InPlaceABN)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64)
                               + 0.5)
    return model


@pytest.fixture(scope="module")
def ref_state():
    """A randomised, calibrated reference W32 (float64) and its state_dict."""
    torch.manual_seed(0)
    ref = randomize(PoseHRNetRef(J, 32), seed=1).double()
    _positive_norm_weights(ref)
    calibrate_norms(ref, _input(ODD, batch=2, seed=99))
    return ref, {k: v.clone() for k, v in ref.state_dict().items()}


def _ours(state, norm="batchnorm", dtype=torch.float64, **kw):
    model = PoseHRNet(J, 32, norm=norm, **kw).to(dtype)   # the dtype first: no rounding
    model.load_state_dict(state, strict=True)
    return model.eval()


def _assert_grads_close(got: dict, want: dict, rtol: float):
    """Per parameter: max |got - want| <= rtol * max |want| (+ 1e-300), vectorised over
    the 880 parameters (28.5 M values) with torch._foreach ops."""
    assert got.keys() == want.keys()
    names = list(want)
    a = [got[n] for n in names]
    b = [want[n] for n in names]
    assert all(t is not None for t in a + b)
    err = torch.stack(torch._foreach_norm(torch._foreach_sub(a, b), float("inf")))
    scale = torch.stack(torch._foreach_norm(b, float("inf")))
    bad = (err > rtol * scale + 1e-300).nonzero().flatten().tolist()
    assert not bad, [(names[i], float(err[i]), float(scale[i])) for i in bad[:5]]
    assert float(scale.min()) > 0      # every parameter got a gradient


def _fwd_bwd(model, x, train, seed=11):
    model.train(train)
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True) if x.is_contiguous() else \
        x.detach().requires_grad_(True)
    out = model(xi)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64).to(out.dtype)
    (out * g).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.detach(), xi.grad, grads


# ------------------------------------------------------------------ structure

@pytest.fixture(scope="module")
def meta_w32():
    """(PoseHRNet, PoseHRNetRef), W32, J = 16, on the meta device."""
    with torch.device("meta"):
        return PoseHRNet(J, 32), PoseHRNetRef(J, 32)


def test_w32_key_and_shape_table(meta_w32):
    ours, ref = meta_w32
    with torch.device("meta"):
        abn = PoseHRNet(J, 32, norm="inplace_abn_sync")
    a, b = _no_counter(ours.state_dict()), _no_counter(ref.state_dict())
    assert len(a) == 1462
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert list(a) == list(b)            # same registration order too
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(28.54e6, abs=0.005e6)
    for key, shape in {"final_layer.weight": (16, 32, 1, 1), "final_layer.bias": (16,),
                       "conv1.weight": (64, 3, 3, 3), "layer1.0.downsample.0.weight":
                       (256, 64, 1, 1), "transition1.0.0.weight": (32, 256, 3, 3),
                       "transition1.1.0.0.weight": (64, 256, 3, 3),
                       "transition3.3.0.0.weight": (256, 128, 3, 3),
                       "stage4.2.fuse_layers.0.3.0.weight": (32, 256, 1, 1),
                       "stage4.2.fuse_layers.0.3.1.running_var": (32,),
                       "stage4.1.fuse_layers.3.0.2.0.weight": (256, 32, 3, 3),
                       "stage4.2.branches.3.3.conv2.weight": (256, 256, 3, 3)}.items():
        assert tuple(a[key].shape) == shape, key
    assert not any(k.startswith("stage4.2.fuse_layers.1.") for k in a)
    assert not any(k.startswith(("stage4.2.fuse_layers.2.", "stage4.2.fuse_layers.3."))
                   for k in a)
    assert any(k.startswith("stage4.1.fuse_layers.3.") for k in a)
    assert not any(k.startswith(("last_layer", "incre_modules", "classifier")) for k in a)
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.1 for m in norms)
    assert set(_no_counter(abn.state_dict())) == set(a)
    assert all(m.momentum == 0.1 for m in abn.modules() if isinstance(m, InPlaceABN))
    assert ours.channels == [32, 64, 128, 256]
    n_head = ours.final_layer.weight.numel() + ours.final_layer.bias.numel()
    assert sum(p.numel() for p in ours.backbone_parameters()) == \
        sum(p.numel() for p in ours.parameters()) - n_head


def test_w48_key_and_shape_table():
    with torch.device("meta"):
        ours = PoseHRNet(17, 48)
        ref = PoseHRNetRef(17, 48)
    a, b = _no_counter(ours.state_dict()), _no_counter(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert len(a) == 1462 and tuple(a["final_layer.weight"].shape) == (17, 48, 1, 1)


def test_heatmaps_at_a_quarter_of_the_input(meta_w32):
    model, ref = meta_w32
    for hw in ((256, 256), (256, 192), (384, 288), (512, 384)):
        x = torch.empty(2, 3, *hw, device="meta")
        want = (2, J, hw[0] // 4, hw[1] // 4)
        assert tuple(model(x).shape) == want, hw
        if hw == (256, 192):
            assert tuple(ref(x).shape) == want


def test_upstream_initialisation():
    torch.manual_seed(0)
    m = PoseHRNet(J, 32)
    w = m.stage3[1].branches[2][0].conv1.weight.detach()
    assert float(w.std()) == pytest.approx(0.001, rel=0.05)
    assert float(m.final_layer.weight.detach().std()) == pytest.approx(0.001, rel=0.2)
    assert torch.equal(m.final_layer.bias, torch.zeros(J))
    assert torch.equal(m.bn1.weight, torch.ones(64)) and torch.equal(m.bn1.bias, torch.zeros(64))


# ------------------------------------------------------------------ numerics

@pytest.mark.parametrize("train", [False, True])
def test_outputs_and_gradients_match_reference(ref_state, train):
    ref, state = ref_state
    ours = _ours(state)
    if train:   # batch statistics: batch 2, branch 3 is 1 x 1
        x = _input(SMALL, batch=2)
    else:       # odd sizes, a non-contiguous (transposed) input
        x = _input(ODD[::-1], batch=1).transpose(2, 3)
        assert not x.is_contiguous() and x.shape[-2:] == ODD
    a, ga, pa = _fwd_bwd(ours, x, train)
    try:
        b, gb, pb = _fwd_bwd(ref, x, train)
        after = {k: v.clone() for k, v in ref.state_dict().items()}
    finally:    # the module-scoped reference back as it was
        ref.load_state_dict(state)
        ref.eval().zero_grad(set_to_none=True)
    size = ODD if not train else SMALL
    assert a.shape == (x.shape[0], J, (size[0] + 3) // 4, (size[1] + 3) // 4)
    scale = float(b.abs().max())
    assert scale > 1e-3      # the randomised model gives O(1) heatmaps, not ~0
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * scale)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10 * float(gb.abs().max()))
    _assert_grads_close(pa, pb, 1e-8)
    if train:   # running statistics moved the same way (momentum 0.1)
        sa = ours.state_dict()
        for k in ("bn1.running_mean", "stage4.2.fuse_layers.0.3.1.running_var",
                  "layer1.0.downsample.1.running_mean"):
            assert not torch.equal(sa[k], state[k]), k
            torch.testing.assert_close(sa[k], after[k], rtol=1e-10, atol=1e-12)


def test_inplace_norms_match_batchnorm(ref_state):
    """inplace_abn_sync (without a process group: inplace_abn's kernels) with the
    ReLU -> conv fusion on against BatchNorm, float64 (eval and train: values,
    input and parameter gradients, running statistics) and float32 (eval values;
    float32 gradients of this deep ReLU network are not compared elementwise: a
    pre-ReLU sum within rounding of 0 flips its mask between two correct float32
    implementations, which moves some input-gradient entries by O(1%)). inplace_abn
    is in the fusion, fold and channels_last tests."""
    _, state = ref_state
    for dtype in (torch.float64, torch.float32):
        bn = _ours(state, dtype=dtype)
        ours = _ours(state, norm="inplace_abn_sync", dtype=dtype)
        assert ours.fuse_relu_conv is True
        with torch.no_grad():   # the in-place layers scale by |w| + eps: give them w - eps
            for m in ours.modules():
                if isinstance(m, InPlaceABN):
                    m.weight.sub_(m.eps)
        runs = ((False, ODD, 1), (True, TRAIN32, 2)) if dtype == torch.float64 else \
            ((False, ODD, 1),)
        rtol = 1e-9 if dtype == torch.float64 else 1e-4
        for train, size, batch in runs:
            x = _input(size, batch=batch, dtype=dtype)
            a, ga, pa = _fwd_bwd(ours, x, train)
            b, gb, pb = _fwd_bwd(bn, x, train)
            torch.testing.assert_close(a, b, rtol=0, atol=rtol * float(b.abs().max()))
            if dtype == torch.float64:
                torch.testing.assert_close(ga, gb, rtol=0, atol=10 * rtol * float(gb.abs().max()))
                _assert_grads_close(pa, pb, 100 * rtol)
        if dtype == torch.float64:  # running statistics updated alike (unbiased variance)
            sa, sb = ours.state_dict(), bn.state_dict()
            for k in ("bn1.running_var", "stage4.2.fuse_layers.0.3.1.running_mean",
                      "stage4.1.branches.3.0.bn2.running_var"):
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-9, atol=1e-12, msg=k)


def test_fuse_relu_conv_on_off_identical(ref_state):
    _, state = ref_state
    model = _ours(state, norm="inplace_abn")
    x = _input(ODD, batch=2)
    assert any("relu_conv" in op for op in lipfast_ops_called(model.eval(), x))
    oa, xa, ga = _fwd_bwd(model, x, True)
    model.load_state_dict(state)
    model.fuse_relu_conv = False
    assert not any(getattr(m, "fuse_relu_conv", False) for m in model.modules())
    assert not any("relu_conv" in op for op in lipfast_ops_called(model.eval(), x))
    ob, xb, gb = _fwd_bwd(model, x, True)
    torch.testing.assert_close(oa, ob, rtol=1e-12, atol=1e-12 * float(ob.abs().max()))
    torch.testing.assert_close(xa, xb, rtol=1e-11, atol=1e-12 * float(xb.abs().max()))
    _assert_grads_close(ga, gb, 1e-10)
    model.fuse_relu_conv = True
    assert all(m.fuse_relu_conv for m in model.modules() if hasattr(m, "fuse_relu_conv"))


def test_for_inference_equals_eval(ref_state):
    _, state = ref_state
    model = _ours(state, norm="inplace_abn")
    with torch.no_grad():   # mixed signs, so that |w| + eps matters in the fold
        model.stage3[2].branches[1][0].bn1.weight[::2].neg_()
    x = _input(ODD)
    assert lipfast_ops_called(model, x)
    folded = model.for_inference()
    assert not folded.training and folded.fuse_relu_conv is False
    assert not any(isinstance(m, (InPlaceABN, torch.nn.BatchNorm2d)) for m in folded.modules())
    assert lipfast_ops_called(folded, x) == set()
    with torch.no_grad():
        a, b = folded(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * float(b.abs().max()))
    assert model.fuse_relu_conv is True
    with pytest.raises(ValueError, match="training mode"):
        model.train().for_inference()


def test_channels_last_and_autocast(ref_state):
    _, state = ref_state
    model = _ours(state, norm="inplace_abn")
    x = _input(ODD)
    with torch.no_grad():
        want = model(x)
        cl = model.to(memory_format=torch.channels_last)
        got = cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    model = model.float().to(memory_format=torch.contiguous_format)
    x = _input(SMALL, batch=2, dtype=torch.float32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    # bfloat16 rounding compounds through the depth; a wiring or dtype error is O(100%)
    rel = float((out.float() - ref).norm() / ref.norm())
    assert rel < 0.2, rel
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.to(memory_format=torch.channels_last))
        loss = out.float().square().mean()
    loss.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_matches_eager(ref_state):
    """One fullgraph dynamo trace of the whole model (relu_conv2d on, as an opaque
    custom op); BatchNorm, backend "eager" and no_grad keep it short."""
    _, state = ref_state
    model = _ours(state, dtype=torch.float32, fuse_relu_conv=True)
    x = _input(SMALL, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        want = model(x)
        got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    torch._dynamo.reset()


# ------------------------------------------------------------------ loading

def test_pose_layout_state_dict_loads_strictly(ref_state, tmp_path):
    """Their released pose weights: a bare state dict (num_batches_tracked included)."""
    ref, state = ref_state
    sd = {k: v.float() for k, v in state.items()}
    path = tmp_path / "pose_hrnet_w32_256x256.pth"
    torch.save(sd, path)
    ck = read_checkpoint(path)          # torch.load(weights_only=True)
    assert ck.kind == "state_dict" and ck.state_dict.keys() == sd.keys()
    net, cfg = model_from_checkpoint(ck, task="pose")
    assert isinstance(net, PoseHRNet) and not net.training
    assert cfg == {"model": "pose_hrnet_w32", "num_joints": J, "norm": "batchnorm"}
    assert torch.equal(net.final_layer.weight, sd["final_layer.weight"])
    x = _input(SMALL)
    with torch.no_grad():
        want = ref(x)
        got = net(x.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the parsing tools' default refuses it
    with pytest.raises(CheckpointMismatchError, match="pose model.*pose_hrnet_w32"):
        model_from_checkpoint(ck)
    # load_checkpoint into a built model: strict, everything loaded
    report = load_checkpoint(net, ck)
    assert report.ok and len(report.loaded) == len(sd)
    # a missing key is an error naming it, before anything is copied
    bad = {k: v for k, v in sd.items() if k != "stage4.2.fuse_layers.0.3.1.weight"}
    with torch.no_grad():
        net.conv1.weight.zero_()
    with pytest.raises(CheckpointMismatchError, match=r"stage4\.2\.fuse_layers\.0\.3\.1\.weight"):
        load_checkpoint(net, Checkpoint("bad.pth", "state_dict", bad))
    assert not net.conv1.weight.any()


def test_imagenet_init_skips_and_reports(ref_state, tmp_path):
    """hrnet_w32-36af842e.pth (HRNet-Image-Classification's layout): the backbone keys,
    stage 4's last module with all four fuse rows, and the classifier-only modules."""
    _, state = ref_state
    backbone = {k: v.float() for k, v in _no_counter(state).items()
                if not k.startswith("final_layer")}
    full_last = RefHRModule([32, 64, 128, 256])      # multi-scale output: fuse rows 0-3
    rows = {f"stage4.2.{k}": v for k, v in full_last.state_dict().items()
            if k.startswith(("fuse_layers.1.", "fuse_layers.2.", "fuse_layers.3."))}
    classifier = {"incre_modules.0.0.conv1.weight": torch.zeros(32, 32, 1, 1),
                  "downsamp_modules.0.0.weight": torch.zeros(256, 128, 3, 3),
                  "final_layer.0.weight": torch.zeros(2048, 1024, 1, 1),
                  "final_layer.1.running_var": torch.ones(2048),
                  "classifier.weight": torch.zeros(1000, 2048),
                  "classifier.bias": torch.zeros(1000)}
    torch.save({**backbone, **rows, **classifier}, tmp_path / "hrnet_w32-36af842e.pth")
    torch.manual_seed(4)
    model = PoseHRNet(J, 32)
    head = model.final_layer.weight.detach().clone()
    report = load_imagenet(model, tmp_path / "hrnet_w32-36af842e.pth")
    assert rows and sorted(report.skipped) == sorted([*rows, *classifier])
    assert not report.missing and not report.unexpected and not report.mismatched
    assert sorted(report.loaded) == sorted(backbone)
    assert torch.equal(model.final_layer.weight, head)
    assert torch.equal(model.stage4[2].fuse_layers[0][3][0].weight,
                       backbone["stage4.2.fuse_layers.0.3.0.weight"])
    assert "skipped" in str(report) and "classifier.weight" in str(report)
    bad = dict(backbone)
    bad["stage5.0.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="stage5.0.weight"):
        load_imagenet(PoseHRNet(J, 32), tmp_path / "bad.pth")


# ------------------------------------------------------------------ sizes and errors

def test_odd_sizes_refused_like_the_reference():
    """72 x 56: branch 0 is 18 x 14, branch 1 9 x 7, branch 2 5 x 4; nearest upsampling
    by 4 gives 20 x 16: the reference fails in the fuse sum, PoseHRNet says why."""
    assert pose_input_ok(256, 192) and pose_input_ok(*ODD) and pose_input_ok(*SMALL)
    assert not pose_input_ok(72, 56) and not pose_input_ok(256, 250) and not pose_input_ok(28, 32)
    torch.manual_seed(0)
    small = PoseHRNetRef(J, 32).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="size"):
        small(torch.zeros(1, 3, 72, 56))
    model = PoseHRNet(J, 32).eval()
    with pytest.raises(ValueError, match=r"72 x 56.*18 x 14.*multiples of 8"):
        model(torch.zeros(1, 3, 72, 56))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(0, 3, 32, 32))


def test_bad_constructor_arguments():
    for kw, text in ((dict(width=18), "width must be one of.*18"), (dict(width=True), "True"),
                     (dict(width=40), "40"), (dict(num_joints=0), "num_joints.*0"),
                     (dict(num_joints=True), "True"), (dict(num_joints=2.0), "2.0"),
                     (dict(norm="gn"), "'gn'"), (dict(norm="BatchNorm"), "'BatchNorm'"),
                     (dict(fuse_relu_conv="yes"), "'yes'")):
        with pytest.raises(ValueError, match=text):
            with torch.device("meta"):
                PoseHRNet(**kw)
    with torch.device("meta"):
        m = PoseHRNet()
        assert m.num_joints == 16 and m.width == 32 and m.norm == "batchnorm"
        assert m.fuse_relu_conv is False
        assert PoseHRNet(norm="inplace_abn").fuse_relu_conv is True
        assert PoseHRNet(norm="batchnorm", fuse_relu_conv=True).fuse_relu_conv is True
    with pytest.raises(ValueError, match="1"):
        m.fuse_relu_conv = 1
    assert (m.input_order, m.input_mean, m.input_std) == (
        "RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
