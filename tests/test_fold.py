"""lipfast.models.fold_norms / CE2P.for_inference: norms folded into the convolutions,
a model of plain PyTorch modules that calls no lipfast op, equal to the eval model
(float32: 1e-4 x max|out|, float64: 1e-10 x max|out|); OC attention in plain
PyTorch (lipfast.nn.oc.attention_torch) against the fused op."""

import warnings

import pytest
import torch
import torch.nn as nn
from fold_helpers import (
    FOLD_TOL,
    assert_close_rel,
    flat,
    lipfast_ops_called,
    randomize,
    small_ce2p,
)

import lipfast
from lipfast.models import CE2P, BatchNormAct, Bottleneck, fold_norms
from lipfast.nn import (
    ABN,
    ASPOCModule,
    BaseOCContextModule,
    BaseOCModule,
    InPlaceABN,
    InPlaceABNSync,
    PyramidOCModule,
    PyramidSelfAttentionBlock2D,
    SelfAttentionBlock2D,
    attention_torch,
)
from lipfast.nn.oc import _SelfAttentionBase

CONTEXTS = ("psp", "base_oc", "pyramid_oc", "asp_oc")
NORMS = ("inplace_abn_sync", "inplace_abn", "batchnorm")
NORM_TYPES = (ABN, nn.BatchNorm2d, nn.SyncBatchNorm)


@pytest.fixture(autouse=True)
def _no_group_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*process group.*")
        yield


def _hooks(model):
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            + len(m._backward_pre_hooks)
            for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks
            or m._backward_hooks or m._backward_pre_hooks}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------- CE2P, every context/norm

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_ce2p_folded_matches_eval_model(context, norm, dtype):
    model, (h, w) = small_ce2p(context, norm, dtype, seed=3)
    x = torch.randn(1, 3, h, w, dtype=dtype, generator=torch.Generator().manual_seed(5))
    before = _snapshot(model)
    hooks_before = _hooks(model)
    with torch.no_grad():
        expected = flat(model(x))
    folded = model.for_inference()
    with torch.no_grad():
        actual = flat(folded(x))
    for name, a, e in zip(("parsing", "fusion", "edge"), actual, expected):
        assert a.dtype == dtype
        assert_close_rel(a, e, FOLD_TOL[dtype], f"{context}/{norm}/{name}")

    # Plain PyTorch modules only: no norm left, no lipfast op reached, no hooks.
    assert not [n for n, m in folded.named_modules() if isinstance(m, NORM_TYPES)]
    assert lipfast_ops_called(folded, x) == set()
    assert _hooks(folded) == {}
    assert not folded.training
    assert folded.fuse_relu_conv is False
    assert all(not m.fuse_relu_conv for m in folded.modules() if isinstance(m, Bottleneck))
    blocks = [m for m in folded.modules() if isinstance(m, _SelfAttentionBase)]
    assert (len(blocks) > 0) == (context != "psp")
    for b in blocks:
        assert b.attention == "torch"
        assert b.f_query is b.f_key                   # still shared, folded once
        assert isinstance(b.f_key[1], (nn.Identity, nn.LeakyReLU))
        assert b.f_key[0].bias is not None

    # The user's model is untouched.
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _hooks(model) == hooks_before
    assert model.fuse_relu_conv == (norm != "batchnorm")
    assert all(b.attention == "fused" for b in model.modules()
               if isinstance(b, _SelfAttentionBase))
    with torch.no_grad():
        again = flat(model(x))
    assert all(torch.equal(a, e) for a, e in zip(again, expected))


def test_unfolded_model_calls_lipfast_ops():
    # The detector works: the eval model reaches lipfast's norm, ReLU -> conv and
    # attention ops.
    model, (h, w) = small_ce2p("base_oc", "inplace_abn")
    ops = lipfast_ops_called(model, torch.randn(1, 3, h, w))
    assert any("abn" in op for op in ops), ops
    assert {"lipfast::oc_attention", "lipfast::relu_conv2d"} <= ops, ops


def test_folded_model_under_cpu_autocast():
    # No autocast hooks needed any more: the folded model runs in bfloat16 as it is.
    # (psp: on these random weights the OC heads' softmax is too sharp for a bfloat16
    # comparison, for the unfolded model as much as for the folded one.)
    for context, rtol in (("psp", 0.05), ("pyramid_oc", None)):
        model, (h, w) = small_ce2p(context, "inplace_abn_sync")
        folded = fold_norms(model)
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            ref = flat(folded(x))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = flat(folded(x))
        for o, r in zip(out, ref):
            assert o.dtype == torch.bfloat16
            assert torch.isfinite(o).all()
            if rtol is not None:
                assert_close_rel(o.float(), r, rtol, context)


def test_fold_inplace_and_folded_weights():
    model, (h, w) = small_ce2p("psp", "inplace_abn")
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        expected = flat(model(x))
    conv1_w = model.conv1.weight.detach().clone()
    bn = model.bn1
    s = (bn.weight.detach().abs() + bn.eps) / torch.sqrt(bn.running_var + bn.eps)
    t = bn.bias.detach() - bn.running_mean * s
    out = fold_norms(model, inplace=True)
    assert out is model
    assert isinstance(model.bn1, nn.Identity)
    torch.testing.assert_close(model.conv1.weight, conv1_w * s.view(-1, 1, 1, 1))
    torch.testing.assert_close(model.conv1.bias, t)
    with torch.no_grad():
        for a, e in zip(flat(model(x)), expected):
            assert_close_rel(a, e, FOLD_TOL[torch.float32])
    # Folding a folded model changes nothing.
    again = fold_norms(model)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_state_dict_keys_of_the_folded_model():
    model, _ = small_ce2p("asp_oc", "inplace_abn_sync")
    keys = set(fold_norms(model).state_dict())
    conv_keys = {k for k in model.state_dict() if k.endswith(".weight")
                 and model.get_submodule(k.rsplit(".", 1)[0]).__class__ is nn.Conv2d}
    assert conv_keys <= keys
    assert not [k for k in keys if "running_" in k or "num_batches" in k]
    # Sequential indices are kept (fushion.{0,1,3}: the norm's slot is its activation).
    folded = fold_norms(model)
    assert isinstance(folded.fushion[1], nn.LeakyReLU)
    assert folded.fushion[1].negative_slope == 0.01
    assert isinstance(folded.fushion[3], nn.Conv2d)


# ----------------------------------------------------------------- every norm type

NORM_CASES = [
    ("abn_identity", lambda c: ABN(c, activation="identity"), nn.Identity),
    ("abn_leaky", lambda c: ABN(c, activation="leaky_relu", activation_param=0.2), nn.LeakyReLU),
    ("abn_elu", lambda c: ABN(c, activation="elu", activation_param=0.7), nn.ELU),
    ("abn_relu", lambda c: ABN(c, activation="relu"), nn.ReLU),
    ("abn_no_affine", lambda c: ABN(c, affine=False, activation="leaky_relu"), nn.LeakyReLU),
    ("inplace_identity", lambda c: InPlaceABN(c, activation="identity"), nn.Identity),
    ("inplace_elu", lambda c: InPlaceABN(c, activation="elu", activation_param=1.3), nn.ELU),
    ("inplace_no_affine", lambda c: InPlaceABN(c, affine=False, eps=1e-3), nn.LeakyReLU),
    ("inplace_sync", lambda c: InPlaceABNSync(c, eps=1e-2, activation_param=0.3),
     nn.LeakyReLU),
    ("batchnorm", lambda c: nn.BatchNorm2d(c, eps=1e-3), nn.Identity),
    ("batchnorm_no_affine", lambda c: nn.BatchNorm2d(c, affine=False), nn.Identity),
    ("syncbatchnorm", lambda c: nn.SyncBatchNorm(c), nn.Identity),
    ("batchnorm_act", lambda c: BatchNormAct(c, activation_param=0.05), nn.LeakyReLU),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("conv_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name,make,act_type", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_each_norm_type(name, make, act_type, conv_bias, dtype):
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=conv_bias, groups=1), make(6),
                          nn.Conv2d(6, 4, 1, groups=2), nn.Dropout2d(0.5))
    randomize(model, seed=11)
    model = model.to(dtype).eval()
    x = torch.randn(2, 3, 9, 7, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
        folded = fold_norms(model)
        actual = folded(x)
    assert type(folded[1]) is act_type
    if act_type is nn.LeakyReLU:
        assert folded[1].negative_slope == model[1].activation_param
    if act_type is nn.ELU:
        assert folded[1].alpha == model[1].activation_param
    assert folded[0].bias is not None and folded[0].bias.dtype == dtype
    assert_close_rel(actual, expected, FOLD_TOL[dtype], name)
    assert lipfast_ops_called(folded, x) == set()


def test_grouped_conv_and_negative_weights_matter():
    # |w| + eps for the in-place norms, w itself for ABN: the two fold differently.
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    a = nn.Sequential(conv, InPlaceABN(4, activation="identity"))
    b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), ABN(4, activation="identity"))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a[1].weight.copy_(torch.tensor([-1.0, 2.0, -0.5, 1.5]))
        b[1].weight.copy_(a[1].weight)
    a.eval(), b.eval()
    x = torch.randn(1, 4, 5, 5)
    fa, fb = fold_norms(a), fold_norms(b)
    with torch.no_grad():
        assert_close_rel(fa(x), a(x), 1e-5)
        assert_close_rel(fb(x), b(x), 1e-5)
        assert not torch.allclose(fa(x), fb(x))


# ----------------------------------------------------------------- OC modules alone

OC_CASES = [
    ("self_attention_s1", lambda: SelfAttentionBlock2D(8, 4, 6, 5, 1), (9, 11)),
    ("self_attention_s2", lambda: SelfAttentionBlock2D(8, 4, 6, None, 2), (9, 11)),
    ("pyramid_block_s3", lambda: PyramidSelfAttentionBlock2D(8, 4, 6, 5, 3), (10, 11)),
    ("base_oc", lambda: BaseOCModule(8, 8, 4, 4, 0.05, [1, 2]), (9, 7)),
    ("base_oc_context", lambda: BaseOCContextModule(8, 8, 4, 4, 0, [2]), (9, 7)),
    ("pyramid_oc", lambda: PyramidOCModule(8, 8, 0.05, [1, 2, 3, 6]), (13, 14)),
    ("asp_oc", lambda: ASPOCModule(8, 4, (2, 3, 4), head="legacy"), (9, 10)),
    ("legacy_projection", lambda: SelfAttentionBlock2D(8, 4, 6, 5, 1,
                                                       legacy_double_projection=True), (5, 6)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,make,size", OC_CASES, ids=[c[0] for c in OC_CASES])
def test_oc_modules_folded(name, make, size, dtype):
    module = randomize(make(), seed=4).to(dtype).eval()
    x = torch.randn(2, 8, *size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module(x)
        folded = fold_norms(module)
        actual = folded(x)
    assert_close_rel(actual, expected, FOLD_TOL[dtype], name)
    assert lipfast_ops_called(folded, x) == set()
    assert not [n for n, m in folded.named_modules() if isinstance(m, NORM_TYPES)]
    for b in folded.modules():
        if isinstance(b, _SelfAttentionBase):
            assert b.attention == "torch" and b.f_query is b.f_key
    assert all(b.attention == "fused" for b in module.modules()
               if isinstance(b, _SelfAttentionBase))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,regions", [
    ((2, 3, 5, 7, 9), 0), ((1, 4, 4, 6, 7), 1), ((2, 3, 2, 13, 11), 2), ((2, 3, 5, 7, 9), 3),
    ((1, 2, 3, 6, 7), 6), ((1, 5, 3, 12, 12), 6), ((3, 2, 4, 8, 5), 5),
])
def test_attention_torch_matches_fused_op(shape, regions, dtype):
    b, c, cv, h, w = shape
    g = torch.Generator().manual_seed(regions)
    qk = torch.randn(b, c, h, w, dtype=dtype, generator=g)
    v = torch.randn(b, cv, h, w, dtype=dtype, generator=g)
    out = attention_torch(qk, v, 0.8, regions)
    ref = lipfast.ops.oc_attention(qk, v, 0.8, regions=regions)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out, ref, **({} if dtype == torch.float64 else
                                            {"rtol": 1e-5, "atol": 1e-5}))


def test_attention_torch_half_inputs_and_errors():
    qk, v = torch.randn(1, 3, 6, 7), torch.randn(1, 2, 6, 7)
    out = attention_torch(qk.bfloat16(), v.bfloat16(), 0.5, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention_torch(qk, v, 0.5, 2), rtol=0.05,
                               atol=0.05)
    with pytest.raises(ValueError, match="do not fit"):
        attention_torch(qk, v, 0.5, 7)
    with pytest.raises(ValueError, match="spatial size"):
        attention_torch(qk, v[:, :, :5], 0.5)


def test_attention_attribute():
    block = randomize(PyramidSelfAttentionBlock2D(8, 4, 6, 5, 2), seed=1).eval()
    assert block.attention == "fused"
    x = torch.randn(1, 8, 7, 9)
    with torch.no_grad():
        fused = block(x)
        block.attention = "torch"
        plain = block(x)
    torch.testing.assert_close(plain, fused, rtol=1e-5, atol=1e-5)
    assert "attention='torch'" in repr(block)
    with pytest.raises(ValueError, match="attention must be one of"):
        block.attention = "flash"


# ----------------------------------------------------------------- errors

def test_train_mode_is_refused():
    model, _ = small_ce2p("psp", "inplace_abn")
    model.train()
    with pytest.raises(ValueError, match=r"InPlaceABN at 'bn1' is in training mode"):
        fold_norms(model)
    model.eval()
    model.decoder.conv3[3].train()
    with pytest.raises(ValueError, match=r"'decoder\.conv3\.3' is in training mode"):
        fold_norms(model, inplace=True)
    assert isinstance(model.bn1, InPlaceABN)       # nothing changed by the failed call


def test_norm_without_conv_is_refused():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ValueError, match=r"BatchNorm2d at '2' has no convolution.*ReLU"):
        fold_norms(m)

    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = ABN(3)
            self.conv = nn.Conv2d(3, 3, 1)

    with pytest.raises(ValueError, match=r"ABN at 'inner\.bn' has no convolution.*nothing"):
        fold_norms(nn.ModuleDict({"inner": First()}).eval())
    with pytest.raises(ValueError, match=r"the model itself is a BatchNorm2d"):
        fold_norms(nn.BatchNorm2d(3).eval())
    with pytest.raises(ValueError, match=r"5 features .* 4 output channels"):
        fold_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5)).eval())


def test_norm_without_running_stats_is_refused():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), InPlaceABN(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"InPlaceABN at '1' has no running statistics"):
        fold_norms(m)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="no running statistics"):
        fold_norms(m)


def test_conv_shared_by_two_norms_is_refused():
    conv = nn.Conv2d(3, 4, 1)
    m = nn.ModuleDict({"a": nn.Sequential(conv, nn.BatchNorm2d(4)),
                       "b": nn.Sequential(conv, nn.BatchNorm2d(4))}).eval()
    with pytest.raises(ValueError, match="cannot be folded into both"):
        fold_norms(m)


def test_shared_norm_slots_fold_once():
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct(4))
    m = nn.ModuleDict({"a": seq, "b": seq})
    randomize(m, seed=2).eval()
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        expected = m["a"](x)
        folded = fold_norms(m)
        assert folded["a"] is folded["b"]
        assert_close_rel(folded["b"](x), expected, 1e-5)


def test_other_hooks_on_a_norm_warn():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    m[1].register_forward_hook(lambda mod, args, out: None)
    with pytest.warns(UserWarning, match=r"hook\(s\) on '1' are dropped"):
        fold_norms(m)


def test_not_a_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fold_norms(lambda x: x)


def test_for_inference_is_fold_norms():
    model, (h, w) = small_ce2p("base_oc", "batchnorm")
    folded = model.for_inference()
    assert isinstance(folded, CE2P) and folded is not model
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        for a, e in zip(flat(folded(x)), flat(fold_norms(model)(x))):
            assert torch.equal(a, e)
