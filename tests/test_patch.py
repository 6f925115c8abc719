"""lipfast.patch: swapping lipfast's layers into models built with the originals'
structure. The "original" classes below are written here from the SPEC (sections
1 and 2): mapillary-style In-Place ABN (|w| + eps), the vendored pure-PyTorch
copy of SCHP (plain w, ``slope``), mapillary's ABN, and OCNet's OC modules with
their eager attention (materialised similarity map, loop over pyramid regions).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipfast
from lipfast.patch import PatchReport

from abn_reference import activation as apply_activation


# InPlaceABNSync without a process group warns once and acts as InPlaceABN.
pytestmark = pytest.mark.usefixtures("no_process_group_warnings")


# ----------------------------------------------------------------- original norms
class _MapillaryBase(nn.Module):
    """mapillary inplace_abn 1.x attributes; ``_abs`` picks the in-place classes'
    |w| + eps scaling."""

    _abs = True

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 activation="leaky_relu", activation_param=0.01):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.momentum, self.affine = momentum, affine
        self.activation, self.activation_param = activation, activation_param
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        w = self.weight.abs() + self.eps if self._abs else self.weight
        z = F.batch_norm(x, self.running_mean, self.running_var, w, self.bias, self.training,
                         self.momentum, self.eps)
        return apply_activation(z, self.activation, self.activation_param)


class InPlaceABN(_MapillaryBase):  # mapillary's name
    pass


class InPlaceABNSync(_MapillaryBase):
    pass


class ABN(_MapillaryBase):
    _abs = False


def _schp_vendored():
    class InPlaceABNSync(nn.Module):  # SCHP's pure-PyTorch copy: slope, no counter, plain w
        def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                     activation="leaky_relu", slope=0.01):
            super().__init__()
            self.num_features, self.affine, self.eps, self.momentum = (num_features, affine,
                                                                       eps, momentum)
            self.activation, self.slope = activation, slope
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

        def forward(self, x):
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training, self.momentum, self.eps)
            if self.activation == "leaky_relu":
                return F.leaky_relu(x, self.slope, inplace=True)
            if self.activation == "elu":
                return F.elu(x, inplace=True)
            return x

    return InPlaceABNSync


VendoredSync = _schp_vendored()


# ----------------------------------------------------------------- OCNet modules
def _eager_attention(q, v, key_channels):
    """q: B x Ck x N (query == key), v: B x Cv x N -> B x Cv x N."""
    sim = torch.softmax(torch.matmul(q.transpose(1, 2), q) * key_channels ** -0.5, dim=-1)
    return torch.matmul(sim, v.transpose(1, 2)).transpose(1, 2)


class SelfAttentionBlock2D(nn.Module):
    def __init__(self, in_channels, key_channels, value_channels, out_channels=None, scale=1,
                 norm=InPlaceABNSync, share=True):
        super().__init__()
        self.scale, self.in_channels = scale, in_channels
        self.out_channels = out_channels or in_channels
        self.key_channels, self.value_channels = key_channels, value_channels
        self.pool = nn.MaxPool2d(kernel_size=(scale, scale))
        self.f_key = nn.Sequential(nn.Conv2d(in_channels, key_channels, 1), norm(key_channels))
        self.f_query = self.f_key if share else nn.Sequential(
            nn.Conv2d(in_channels, key_channels, 1), norm(key_channels))
        self.f_value = nn.Conv2d(in_channels, value_channels, 1)
        self.W = nn.Conv2d(value_channels, self.out_channels, 1)
        nn.init.zeros_(self.W.weight)
        nn.init.zeros_(self.W.bias)

    def forward(self, x):
        b, h, w = x.size(0), x.size(2), x.size(3)
        if self.scale > 1:
            x = self.pool(x)
        hp, wp = x.shape[2:]
        v = self.f_value(x).reshape(b, self.value_channels, -1)
        q = self.f_query(x).reshape(b, self.key_channels, -1)
        k = self.f_key(x).reshape(b, self.key_channels, -1)
        sim = torch.softmax(torch.matmul(q.transpose(1, 2), k) * self.key_channels ** -0.5, -1)
        ctx = torch.matmul(sim, v.transpose(1, 2)).transpose(1, 2).reshape(
            b, self.value_channels, hp, wp)
        ctx = self.W(ctx)
        if self.scale > 1:
            ctx = F.interpolate(ctx, size=(h, w), mode="bilinear", align_corners=True)
        return ctx


class PyramidSelfAttentionBlock2D(SelfAttentionBlock2D):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.pool

    def forward(self, x):
        b, h, w = x.size(0), x.size(2), x.size(3)
        v, q = self.f_value(x), self.f_query(x)
        s = self.scale
        sh, sw = h // s, w // s
        out = torch.zeros(b, self.value_channels, h, w, dtype=x.dtype, device=x.device)
        for i in range(s):
            r0, r1 = i * sh, (h if i == s - 1 else (i + 1) * sh)
            for j in range(s):
                c0, c1 = j * sw, (w if j == s - 1 else (j + 1) * sw)
                qq = q[:, :, r0:r1, c0:c1].reshape(b, self.key_channels, -1)
                vv = v[:, :, r0:r1, c0:c1].reshape(b, self.value_channels, -1)
                out[:, :, r0:r1, c0:c1] = _eager_attention(qq, vv, self.key_channels).reshape(
                    b, self.value_channels, r1 - r0, c1 - c0)
        return self.W(out)


class BaseOC_Module(nn.Module):  # noqa: N801 - OCNet's name
    def __init__(self, in_channels, out_channels, key_channels, value_channels, dropout,
                 sizes=(1,), norm=InPlaceABNSync):
        super().__init__()
        self.stages = nn.ModuleList([SelfAttentionBlock2D(
            in_channels, key_channels, value_channels, out_channels, s, norm=norm)
            for s in sizes])
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(2 * in_channels, out_channels, 1),
                                             norm(out_channels), nn.Dropout2d(dropout))

    def forward(self, feats):
        ctx = sum(stage(feats) for stage in self.stages)
        return self.conv_bn_dropout(torch.cat([ctx, feats], 1))


class BaseOC_Context_Module(BaseOC_Module):  # noqa: N801
    def __init__(self, in_channels, out_channels, key_channels, value_channels, dropout,
                 sizes=(1,), norm=InPlaceABNSync):
        super().__init__(in_channels, out_channels, key_channels, value_channels, dropout,
                         sizes, norm)
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1),
                                             norm(out_channels))

    def forward(self, feats):
        return self.conv_bn_dropout(sum(stage(feats) for stage in self.stages))


class Pyramid_OC_Module(nn.Module):  # noqa: N801
    def __init__(self, in_channels, out_channels, dropout, sizes=(1,), norm=InPlaceABNSync):
        super().__init__()
        g = len(sizes)
        self.group = g
        self.stages = nn.ModuleList([PyramidSelfAttentionBlock2D(
            in_channels, in_channels // 2, in_channels, out_channels, s, norm=norm)
            for s in sizes])
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(2 * in_channels * g, out_channels, 1),
                                             norm(out_channels), nn.Dropout2d(dropout))
        self.up_dr = nn.Sequential(nn.Conv2d(in_channels, in_channels * g, 1),
                                   norm(in_channels * g))

    def forward(self, feats):
        priors = [self.up_dr(feats)] + [stage(feats) for stage in self.stages]
        return self.conv_bn_dropout(torch.cat(priors, 1))


class ASP_OC_Module(nn.Module):  # noqa: N801
    def __init__(self, features, out_features=8, dilations=(2, 3, 4), norm=InPlaceABNSync,
                 legacy=False):
        super().__init__()
        o = out_features
        self.context = nn.Sequential(
            nn.Conv2d(features, o, 3, padding=1), norm(o),
            BaseOC_Context_Module(o, o, o // 2, o, 0, [2], norm=norm))
        self.conv2 = nn.Sequential(nn.Conv2d(features, o, 1, bias=False), norm(o))
        for name, d in zip(("conv3", "conv4", "conv5"), dilations):
            setattr(self, name, nn.Sequential(
                nn.Conv2d(features, o, 3, padding=d, dilation=d, bias=False), norm(o)))
        h = o if legacy else 2 * o
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(5 * o, h, 1, bias=False), norm(h),
                                             nn.Dropout2d(0.1))

    def forward(self, x):
        return self.conv_bn_dropout(torch.cat(
            [self.context(x), self.conv2(x), self.conv3(x), self.conv4(x), self.conv5(x)], 1))


class Mystery(nn.Module):
    """Unknown to lipfast: must be left alone."""

    def __init__(self, c):
        super().__init__()
        self.gn = nn.GroupNorm(2, c)

    def forward(self, x):
        return self.gn(x) * 0.5


class Net(nn.Module):
    """An OCNet/CE2P-like network mixing every kind of candidate."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.LeakyReLU(0.2))
        self.lone_bn = nn.BatchNorm2d(c)
        self.vendored = nn.Sequential(nn.Conv2d(c, c, 1), VendoredSync(c),
                                      nn.Conv2d(c, c, 1), VendoredSync(c, activation="none"))
        self.mapillary = nn.Sequential(nn.Conv2d(c, c, 1), InPlaceABN(c),
                                       nn.Conv2d(c, c, 1), ABN(c, activation="elu",
                                                               activation_param=0.7))
        self.asp = ASP_OC_Module(c, 4, norm=InPlaceABNSync)
        self.base = BaseOC_Module(c, c, 4, 6, 0.05, [1, 2], norm=VendoredSync)
        self.pyramid = Pyramid_OC_Module(c, c, 0.05, [1, 2, 3], norm=InPlaceABNSync)
        self.mystery = Mystery(c)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.lone_bn(x)
        x = self.vendored(x)
        x = self.mapillary(x)
        x = self.asp(x)
        x = self.base(x)
        x = self.pyramid(x)
        return self.head(self.mystery(x))


def _randomise(model, seed=0):
    """Trained-looking parameters and statistics: random signs on the norm weights,
    non-zero W projections."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
    return model


def _net(seed=0):
    torch.manual_seed(seed)
    return _randomise(Net()).double()


X = None


def _x(seed=1):
    return torch.randn(2, 3, 13, 14, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- tests
def test_patch_swaps_everything_and_outputs_match_eval():
    model = _net().eval()
    x = _x()
    with torch.no_grad():
        want = model(x)
    before_params = {n: p for n, p in model.named_parameters()}
    before_keys = {k: v.clone() for k, v in model.state_dict().items()}
    report = lipfast.patch(model)
    assert isinstance(report, PatchReport) and report.model is model
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # The very same parameter objects.
    for n, p in model.named_parameters():
        assert p is before_params[n], n
    # What went where.
    assert isinstance(model.stem[1], lipfast.ABN) and model.stem[1].activation == "relu"
    assert isinstance(model.stem[2], nn.Identity)
    assert model.stem[4].activation == "leaky_relu" and model.stem[4].activation_param == 0.2
    assert type(model.lone_bn) is nn.BatchNorm2d
    # SCHP's vendored copy computes with plain w -> out-of-place ABN; mapillary's
    # in-place classes use |w| + eps -> lipfast's in-place classes.
    assert type(model.vendored[1]) is lipfast.ABN and model.vendored[3].activation == "identity"
    assert type(model.mapillary[1]) is lipfast.InPlaceABN
    assert type(model.mapillary[3]) is lipfast.ABN and model.mapillary[3].activation == "elu"
    assert type(model.asp) is lipfast.ASPOCModule
    assert type(model.asp.context[2]) is lipfast.BaseOCContextModule
    assert type(model.asp.context[1]) is lipfast.InPlaceABNSync
    assert type(model.base) is lipfast.BaseOCModule
    assert type(model.base.stages[1]) is lipfast.SelfAttentionBlock2D
    assert model.base.stages[1].f_query is model.base.stages[1].f_key
    assert type(model.pyramid) is lipfast.PyramidOCModule
    assert type(model.mystery) is Mystery and type(model.mystery.gn) is nn.GroupNorm
    # Report.
    text = str(report)
    assert "lone_bn" in text and "not followed by ReLU/LeakyReLU" in text
    assert "asp -> " not in text and "swapped asp: ASP_OC_Module -> ASPOCModule" in text
    swapped = {n for n, _, _ in report.swapped}
    assert {"stem.1", "stem.4", "vendored.1", "vendored.3", "mapillary.1", "mapillary.3",
            "asp", "asp.context.2", "base", "pyramid", "pyramid.stages.2"} <= swapped
    assert not any(n.startswith("mystery") for n in swapped)
    # Same state_dict keys and values.
    after = model.state_dict()
    assert list(after) == list(before_keys)
    for k, v in before_keys.items():
        assert torch.equal(after[k], v), k


def test_state_dict_round_trip_both_ways():
    original = _net(seed=3)
    patched = lipfast.patch(copy.deepcopy(original)).model
    fresh_patched = lipfast.patch(_net(seed=4)).model
    fresh_patched.load_state_dict(original.state_dict())        # strict
    fresh_original = _net(seed=5)
    fresh_original.load_state_dict(patched.state_dict())        # strict, no extra counters
    x = _x(2)
    with torch.no_grad():
        ref = original.eval()(x)
        torch.testing.assert_close(fresh_patched.eval()(x), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fresh_original.eval()(x), ref, rtol=1e-10, atol=1e-10)


def test_second_patch_is_a_no_op_and_inplace_false_copies():
    model = _net()
    copy_report = lipfast.patch(model, inplace=False)
    assert copy_report.model is not model
    assert isinstance(model.asp, ASP_OC_Module) and isinstance(model.vendored[1], VendoredSync)
    patched = copy_report.model
    x = _x(4)
    with torch.no_grad():
        torch.testing.assert_close(patched.eval()(x), model.eval()(x), rtol=1e-10, atol=1e-10)
    again = lipfast.patch(patched)
    assert again.swapped == []
    with torch.no_grad():
        torch.testing.assert_close(patched(x), model(x), rtol=1e-10, atol=1e-10)


def test_training_outputs_and_gradients_match():
    ref = _net(seed=7).train()
    fast = lipfast.patch(copy.deepcopy(ref)).model.train()
    x = _x(5)
    grads = []
    for m in (ref, fast):
        torch.manual_seed(11)   # same dropout masks
        out = m(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-8, atol=1e-8)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-7, atol=1e-8, msg=n)


def test_flags_select_what_is_swapped():
    model = _net()
    rep = lipfast.patch(model, norms=False)
    assert type(model.asp) is lipfast.ASPOCModule
    assert isinstance(model.asp.conv2[1], InPlaceABNSync) and isinstance(model.stem[1],
                                                                         nn.BatchNorm2d)
    model = _net()
    rep = lipfast.patch(model, context=False)
    assert isinstance(model.asp, ASP_OC_Module) and type(model.asp.conv2[1]) is (
        lipfast.InPlaceABNSync)
    assert rep.counts()


def test_non_ocnet_attention_left_alone():
    blk = SelfAttentionBlock2D(6, 3, 4, share=False).double()
    holder = nn.Sequential(blk)
    rep = lipfast.patch(holder, norms=False)
    assert holder[0] is blk
    assert any("f_query is not the same module" in why for _, _, why in rep.left)


def test_oc_module_with_different_math_is_left_alone():
    class SelfAttentionBlock2D_(SelfAttentionBlock2D):   # noqa: N801
        def forward(self, x):   # not OCNet's: no key scaling
            return super().forward(x) * 2

    SelfAttentionBlock2D_.__name__ = "SelfAttentionBlock2D"
    blk = _randomise(SelfAttentionBlock2D_(6, 3, 4)).double()
    holder = nn.Sequential(blk)
    rep = lipfast.patch(holder)
    assert isinstance(holder[0], SelfAttentionBlock2D_)
    assert any("different outputs" in why for _, _, why in rep.left)


def test_root_module_and_bad_input():
    norm = _randomise(InPlaceABN(5)).double()
    rep = lipfast.patch(norm)
    assert rep.model is norm and rep.swapped == [] and "root module" in str(rep)
    rep = lipfast.patch(norm, inplace=False)
    assert type(rep.model) is lipfast.InPlaceABN
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rep.model.eval()(x.clone()), norm.eval()(x.clone()))
    with pytest.raises(TypeError, match="nn.Module"):
        lipfast.patch("model")


# ----------------------------------------------------------------- float32 / bfloat16 models
# Real models run in float32 (or bfloat16): the probe compares in the model's dtype,
# with that dtype's tolerance (max error <= tol * max(1, max |output|)).
_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}

_OC_NAMES_ALL = {"asp", "asp.context.2", "asp.context.2.stages.0", "base", "base.stages.0",
                 "base.stages.1", "pyramid", "pyramid.stages.0", "pyramid.stages.1",
                 "pyramid.stages.2"}


def _assert_agree(got, want, dtype):
    got, want = got.double(), want.double()
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= _TOL[dtype] * scale, (err, scale)


def _oc_left(report):
    return [(n, c, why) for n, c, why in report.left if c != "BatchNorm2d"]


def test_float32_model_swaps_every_oc_module_and_outputs_agree():
    torch.manual_seed(0)
    model = _randomise(Net()).float().eval()
    x = _x().float()
    with torch.no_grad():
        want = model(x)
    report = lipfast.patch(model)
    assert _oc_left(report) == [], str(report)
    swapped = {n for n, _, _ in report.swapped}
    assert _OC_NAMES_ALL <= swapped
    assert {"stem.1", "vendored.1", "mapillary.1", "mapillary.3"} <= swapped
    assert type(model.asp) is lipfast.ASPOCModule and type(model.base) is lipfast.BaseOCModule
    assert type(model.pyramid) is lipfast.PyramidOCModule
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.float32
    _assert_agree(got, want, torch.float32)


def _oc_module(kind):
    torch.manual_seed(3)
    return {
        "attention": lambda: SelfAttentionBlock2D(8, 4, 6),
        "attention_pooled": lambda: SelfAttentionBlock2D(8, 4, 6, 5, scale=2),
        "pyramid_attention": lambda: PyramidSelfAttentionBlock2D(8, 4, 8, 8, scale=3),
        "base_oc": lambda: BaseOC_Module(8, 8, 4, 6, 0.05, [1, 2]),
        "base_oc_context": lambda: BaseOC_Context_Module(8, 8, 4, 6, 0.0, [2]),
        "pyramid_oc": lambda: Pyramid_OC_Module(8, 8, 0.05, [1, 2, 3]),
        "asp_oc": lambda: ASP_OC_Module(8, 4),
        "asp_oc_legacy": lambda: ASP_OC_Module(8, 4, legacy=True, norm=VendoredSync),
    }[kind]()


_OC_EXPECT = {
    "attention": "SelfAttentionBlock2D", "attention_pooled": "SelfAttentionBlock2D",
    "pyramid_attention": "PyramidSelfAttentionBlock2D", "base_oc": "BaseOCModule",
    "base_oc_context": "BaseOCContextModule", "pyramid_oc": "PyramidOCModule",
    "asp_oc": "ASPOCModule", "asp_oc_legacy": "ASPOCModule",
}


@pytest.mark.parametrize("kind", sorted(_OC_EXPECT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_oc_module_type_is_swapped_in_float32_and_bfloat16(kind, dtype):
    holder = nn.Sequential(_randomise(_oc_module(kind)).to(dtype).eval())
    x = torch.randn(2, 8, 9, 10, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        want = holder(x)
    # lipfast's in-place norms have float32/float64 CPU kernels: bfloat16 models are
    # patched with norms=False here (the original norms stay inside the OC modules).
    report = lipfast.patch(holder, norms=dtype != torch.bfloat16)
    assert report.left == [], str(report)
    assert ("0", type(_oc_module(kind)).__name__, _OC_EXPECT[kind]) in report.swapped
    assert type(holder[0]).__name__ == _OC_EXPECT[kind]
    assert type(holder[0]).__module__ == "lipfast.nn.oc"
    with torch.no_grad():
        got = holder(x)
    assert got.dtype == dtype
    _assert_agree(got, want, dtype)


class SchpNet(nn.Module):
    """SCHP's AugmentCE2P layout in miniature with SCHP's vendored pure-PyTorch norm:
    backbone norms ``InPlaceABNSync(activation='none')`` then a ReLU, an ASP-OC context
    (SCHP's copy: the legacy 5*out -> out head), decoder / edge / fusion heads with
    leaky_relu norms; returns ``[[parsing, fusion], [edge]]``."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        plain = functools.partial(VendoredSync, activation="none")
        self.conv1 = nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False)
        self.bn1 = plain(c)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = plain(c)
        self.relu2 = nn.ReLU(inplace=False)
        self.context_encoding = ASP_OC_Module(c, 4, dilations=(1, 2, 3), norm=VendoredSync,
                                              legacy=True)
        self.decoder = nn.Sequential(nn.Conv2d(4, c, 1, bias=False), VendoredSync(c))
        self.cls = nn.Conv2d(c, classes, 1)
        self.edge = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), VendoredSync(c),
                                  nn.Conv2d(c, 2, 3, padding=1))
        self.fushion = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), VendoredSync(c),
                                     nn.Dropout2d(0.1), nn.Conv2d(c, classes, 1))

    def forward(self, x):
        x1 = self.relu1(self.bn1(self.conv1(x)))
        x2 = self.relu2(self.bn2(self.conv2(x1)))
        dec = self.decoder(self.context_encoding(x2))
        edge_fea = self.edge[1](self.edge[0](x2))
        fusion = self.fushion(torch.cat([dec, edge_fea], 1))
        return [[self.cls(dec), fusion], [self.edge[2](edge_fea)]]


def _schp_net():
    torch.manual_seed(5)
    return _randomise(SchpNet(), seed=5).float().eval()


_SCHP_SWAPS = {
    "bn1": "ABN (by its measured arithmetic)", "bn2": "ABN (by its measured arithmetic)",
    "context_encoding": "ASPOCModule", "context_encoding.context.2": "BaseOCContextModule",
    "context_encoding.context.2.stages.0": "SelfAttentionBlock2D",
    "context_encoding.conv_bn_dropout.1": "ABN (by its measured arithmetic)",
    "decoder.1": "ABN (by its measured arithmetic)", "edge.1": "ABN (by its measured arithmetic)",
    "fushion.1": "ABN (by its measured arithmetic)",
}


def _flat(out):
    return torch.cat([t.flatten() for t in (out[0][0], out[0][1], out[1][0])])


def test_schp_layout_float32_swaps_and_agrees_also_under_bf16_autocast():
    model = _schp_net()
    x = torch.randn(2, 3, 17, 19, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = _flat(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want_bf16 = _flat(model(x))
    report = lipfast.patch(model)
    assert report.left == [], str(report)
    swapped = {n: new for n, _, new in report.swapped}
    for name, new in _SCHP_SWAPS.items():
        assert swapped.get(name) == new, (name, str(report))
    assert type(model.context_encoding) is lipfast.ASPOCModule
    assert model.context_encoding.head == "legacy"
    assert type(model.bn1) is lipfast.ABN and model.bn1.activation == "identity"
    assert "swapped context_encoding: ASP_OC_Module -> ASPOCModule" in str(report)
    with torch.no_grad():
        _assert_agree(_flat(model(x)), want, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = _flat(model(x))
    assert got_bf16.dtype == want_bf16.dtype
    _assert_agree(got_bf16, want_bf16, torch.bfloat16)


def test_patch_under_autocast_probes_in_the_model_dtype():
    model = _schp_net()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = lipfast.patch(model)
    assert report.left == [], str(report)
    assert type(model.context_encoding) is lipfast.ASPOCModule


def test_float32_probe_still_rejects_different_math():
    class SelfAttentionBlock2D_(SelfAttentionBlock2D):   # noqa: N801
        def forward(self, x):   # not OCNet's: no key scaling
            return super().forward(x) * 1.01

    SelfAttentionBlock2D_.__name__ = "SelfAttentionBlock2D"
    holder = nn.Sequential(_randomise(SelfAttentionBlock2D_(6, 3, 4)).float())
    rep = lipfast.patch(holder)
    assert isinstance(holder[0], SelfAttentionBlock2D_)
    assert any("different outputs" in why and "float32 tolerance" in why
               for _, _, why in rep.left), str(rep)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_abn_probe_measures_float32_and_bfloat16_norms(dtype):
    from lipfast.patch import _abn_config, _probe_abn_math

    cases = [(InPlaceABN(7), "abs"), (InPlaceABNSync(7, activation="elu", activation_param=0.5),
                                      "abs"),
             (ABN(7, activation="identity"), "plain"), (VendoredSync(7), "plain"),
             (VendoredSync(7, activation="none"), "plain")]
    for norm, want in cases:
        norm = _randomise(norm).to(dtype)
        assert _probe_abn_math(norm, _abn_config(norm)) == want, (type(norm).__name__, dtype)
