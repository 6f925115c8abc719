"""lipfast's OCNet modules (lipfast/nn/oc.py) against an eager OCNet reference
written here from SPEC section 1.

The reference modules below transcribe OCNet's code: materialised N x N
similarity map, the shared ``f_key``/``f_query`` called twice per forward, a
Python loop over the pyramid regions, and the vendored ABN (out of place, no
``num_batches_tracked``). Each test randomises every parameter and buffer of the
lipfast module (``W`` is zero-initialised, which would hide the attention) and
loads them into the reference through the OCNet checkpoint layout, strict.
"""

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipfast
import lipfast.nn.oc as oc
from lipfast.ops import abn as abn_ops

from abn_reference import inplace_abn_reference
from fold_helpers import randomize as _randomize


@pytest.fixture(autouse=True)
def _no_group_warning(monkeypatch):
    # InPlaceABNSync without a process group warns once; these tests run without one.
    monkeypatch.setattr(abn_ops, "_warned_no_group", True)


# ----------------------------------------------------------------- OCNet reference


class RefABN(nn.Module):
    """The vendored In-Place ABN of OCNet, out of place: no num_batches_tracked."""

    def __init__(self, num_features, activation="leaky_relu", slope=0.01):
        super().__init__()
        self.activation, self.slope = activation, slope
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        return inplace_abn_reference(x, self.weight, self.bias, self.running_mean,
                                     self.running_var, self.training, 0.1, 1e-5,
                                     self.activation, self.slope)


def ref_attention(query, key, value, key_channels):
    """OCNet: query B x N x Ck, key B x Ck x N, value B x N x Cv -> B x N x Cv."""
    sim_map = torch.matmul(query, key) * key_channels ** -0.5
    sim_map = F.softmax(sim_map, dim=-1)
    return torch.matmul(sim_map, value)


class RefSelfAttentionBlock2D(nn.Module):
    def __init__(self, in_channels, key_channels, value_channels, out_channels=None, scale=1,
                 norm=RefABN):
        super().__init__()
        self.scale, self.key_channels, self.value_channels = scale, key_channels, value_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.pool = nn.MaxPool2d(kernel_size=(scale, scale))
        self.f_key = nn.Sequential(nn.Conv2d(in_channels, key_channels, 1), norm(key_channels))
        self.f_query = self.f_key
        self.f_value = nn.Conv2d(in_channels, value_channels, 1)
        self.W = nn.Conv2d(value_channels, out_channels, 1)

    def forward(self, x):
        b, h, w = x.size(0), x.size(2), x.size(3)
        if self.scale > 1:
            x = self.pool(x)
        value = self.f_value(x).view(b, self.value_channels, -1).permute(0, 2, 1)
        query = self.f_query(x).view(b, self.key_channels, -1).permute(0, 2, 1)
        key = self.f_key(x).view(b, self.key_channels, -1)
        context = ref_attention(query, key, value, self.key_channels)
        context = context.permute(0, 2, 1).contiguous().view(b, self.value_channels,
                                                             *x.size()[2:])
        context = self.W(context)
        if self.scale > 1:
            context = F.interpolate(context, size=(h, w), mode="bilinear", align_corners=True)
        return context


class RefPyramidSelfAttentionBlock2D(RefSelfAttentionBlock2D):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.pool  # OCNet's pyramid block has none

    def forward(self, x):
        b, h, w = x.size(0), x.size(2), x.size(3)
        value, query, key = self.f_value(x), self.f_query(x), self.f_key(x)
        s = self.scale
        step_h, step_w = h // s, w // s
        local_x, local_y = [], []
        for i in range(s):
            for j in range(s):
                start_x, start_y = i * step_h, j * step_w
                end_x, end_y = min(start_x + step_h, h), min(start_y + step_w, w)
                if i == s - 1:
                    end_x = h
                if j == s - 1:
                    end_y = w
                local_x += [start_x, end_x]
                local_y += [start_y, end_y]
        local_list = []
        for i in range(s):
            for j in range(s):
                k = j + i * s
                sx, ex = local_x[2 * k], local_x[2 * k + 1]
                sy, ey = local_y[2 * k], local_y[2 * k + 1]
                v_l, q_l, k_l = (t[:, :, sx:ex, sy:ey] for t in (value, query, key))
                h_l, w_l = v_l.size(2), v_l.size(3)
                v_l = v_l.contiguous().view(b, self.value_channels, -1).permute(0, 2, 1)
                q_l = q_l.contiguous().view(b, self.key_channels, -1).permute(0, 2, 1)
                k_l = k_l.contiguous().view(b, self.key_channels, -1)
                c_l = ref_attention(q_l, k_l, v_l, self.key_channels)
                c_l = c_l.permute(0, 2, 1).contiguous().view(b, self.value_channels, h_l, w_l)
                local_list.append(c_l)
        rows = [torch.cat([local_list[j + i * s] for j in range(s)], 3) for i in range(s)]
        return self.W(torch.cat(rows, 2))


class RefBaseOC(nn.Module):
    def __init__(self, in_channels, out_channels, key_channels, value_channels, dropout,
                 sizes=(1,), norm=RefABN, context_only=False):
        super().__init__()
        self.context_only = context_only
        self.stages = nn.ModuleList([
            RefSelfAttentionBlock2D(in_channels, key_channels, value_channels, out_channels, s,
                                    norm=norm) for s in sizes])
        if context_only:
            self.conv_bn_dropout = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1),
                                                 norm(out_channels))
        else:
            self.conv_bn_dropout = nn.Sequential(nn.Conv2d(2 * in_channels, out_channels, 1),
                                                 norm(out_channels), nn.Dropout2d(dropout))

    def forward(self, feats):
        priors = [stage(feats) for stage in self.stages]
        context = priors[0]
        for i in range(1, len(priors)):
            context += priors[i]
        if self.context_only:
            return self.conv_bn_dropout(context)
        return self.conv_bn_dropout(torch.cat([context, feats], 1))


class RefPyramidOC(nn.Module):
    def __init__(self, in_channels, out_channels, dropout, sizes=(1,), norm=RefABN):
        super().__init__()
        self.group = len(sizes)
        self.stages = nn.ModuleList([
            RefPyramidSelfAttentionBlock2D(in_channels, in_channels // 2, in_channels,
                                           out_channels, s, norm=norm) for s in sizes])
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(2 * in_channels * self.group, out_channels, 1), norm(out_channels),
            nn.Dropout2d(dropout))
        self.up_dr = nn.Sequential(nn.Conv2d(in_channels, in_channels * self.group, 1),
                                   norm(in_channels * self.group))

    def forward(self, feats):
        priors = [stage(feats) for stage in self.stages]
        context = [self.up_dr(feats)]
        for p in priors:
            context += [p]
        return self.conv_bn_dropout(torch.cat(context, 1))


class RefASPOC(nn.Module):
    def __init__(self, features, out_features=256, dilations=(12, 24, 36), head="current",
                 norm=RefABN):
        super().__init__()
        o = out_features
        self.context = nn.Sequential(
            nn.Conv2d(features, o, 3, padding=1), norm(o),
            RefBaseOC(o, o, o // 2, o, 0, [2], norm=norm, context_only=True))
        self.conv2 = nn.Sequential(nn.Conv2d(features, o, 1, bias=False), norm(o))
        for name, d in zip(("conv3", "conv4", "conv5"), dilations):
            setattr(self, name, nn.Sequential(
                nn.Conv2d(features, o, 3, padding=d, dilation=d, bias=False), norm(o)))
        h = 2 * o if head == "current" else o
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(5 * o, h, 1, bias=False), norm(h),
                                             nn.Dropout2d(0.1))

    def forward(self, x):
        if isinstance(x, (list, tuple)):  # OCNet's result is built from feat[0]
            x = x[0]
        return self.conv_bn_dropout(torch.cat(
            [self.context(x), self.conv2(x), self.conv3(x), self.conv4(x), self.conv5(x)], 1))


# ----------------------------------------------------------------- helpers


def tol(dtype):
    return dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def assert_close(actual, expected, dtype, name="", scale=0.0):
    """float64: tight. float32: the materialised-softmax reference itself is only good to
    about 2e-5 of a tensor's largest entry (gradients reach ~500 here), so the absolute
    tolerance is 1e-4 of that, and at least 2e-5 of ``scale`` (the largest parameter
    gradient of the module: several bias gradients are exactly 0 in float64 -- a
    per-channel constant before a batch-statistics norm -- and float32 noise there
    scales with the module's gradients). A wiring error is off by O(100%)."""
    t = tol(dtype)
    if dtype != torch.float64:
        t["atol"] = max(t["atol"], 1e-4 * float(expected.abs().max()), 2e-5 * scale)
    torch.testing.assert_close(actual, expected, **t, msg=lambda m: f"{name}: {m}")


def ocnet_layout(state_dict):
    """An OCNet checkpoint: lipfast's state dict without num_batches_tracked."""
    return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def randomize(module, seed=0):
    """Every parameter and running statistic from a seeded generator (W included)."""
    return _randomize(module, seed, var_range=(0.5, 1.5))


def pair(lip_cls, ref_cls, args, kwargs=None, ref_kwargs=None, dtype=torch.float64, seed=0,
         keep_counters=False):
    """A randomised lipfast module and the reference loaded from it (OCNet layout, strict)."""
    lip = randomize(lip_cls(*args, **(kwargs or {})), seed).to(dtype)
    ref = ref_cls(*args, **(ref_kwargs or {})).to(dtype)
    sd = lip.state_dict() if keep_counters else ocnet_layout(lip.state_dict())
    ref.load_state_dict(sd, strict=True)
    return lip, ref


def run(module, x, training, seed=None):
    """(output, input grad, {param name: grad}, buffers after) of one forward/backward
    with a seeded random output gradient."""
    module.train(training)
    xi = [t.clone().requires_grad_() for t in x] if isinstance(x, list) else (
        x.clone().requires_grad_())
    if seed is not None:
        torch.manual_seed(seed)  # dropout masks
    out = module(xi)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(123),
                     dtype=torch.float64).to(out.dtype)
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(out, [xi[0] if isinstance(xi, list) else xi, *params], gy)
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()
               if not k.endswith("num_batches_tracked")}
    return out.detach(), grads[0], dict(zip(names, grads[1:])), buffers


def _is_key_norm(name):
    return ".f_key." in "." + name or ".f_query." in "." + name


def compare(lip, ref, x, training, dtype, legacy=False, seed=None):
    """Same output and gradients; running statistics as OCNet's (legacy) or with the
    key norm updated once instead of twice (default)."""
    before = {k: v.detach().clone() for k, v in ref.named_buffers()}
    o_l, dx_l, gp_l, buf_l = run(lip, x, training, seed)
    o_r, dx_r, gp_r, buf_r = run(ref, x, training, seed)
    assert_close(o_l, o_r, dtype, "output")
    assert_close(dx_l, dx_r, dtype, "input grad")
    assert gp_l.keys() == gp_r.keys()
    scale = max(float(g.abs().max()) for g in gp_r.values())
    for k in gp_r:
        assert_close(gp_l[k], gp_r[k], dtype, f"grad {k}", scale)
    assert buf_l.keys() == buf_r.keys()
    for k in buf_r:
        if not training or legacy or not _is_key_norm(k):
            assert_close(buf_l[k], buf_r[k], dtype, k)
        else:
            # momentum 0.1 applied once (lipfast) vs twice (OCNet) to the same batch stats:
            # ref - r0 = (1 - 0.9**2) / 0.1 * (lipfast - r0) = 1.9 * (lipfast - r0).
            assert_close(buf_r[k] - before[k], 1.9 * (buf_l[k] - before[k]), dtype, k)
            assert not torch.allclose(buf_r[k], buf_l[k])
    return o_l


def data(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


DTYPES = [torch.float64, torch.float32]
# Odd sizes: floor pooling drops rows/cols; the last pyramid regions are larger.
BIG = (61, 47)
SMALL = (31, 23)


# ----------------------------------------------------------------- against the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training,legacy", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_self_attention_block(scale, training, legacy, dtype):
    lip, ref = pair(oc.SelfAttentionBlock2D, RefSelfAttentionBlock2D, (8, 4, 6, 5, scale),
                    dict(legacy_double_projection=legacy), dtype=dtype, seed=scale)
    compare(lip, ref, data((2, 8, *SMALL), dtype), training, dtype, legacy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training,legacy", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("scale", [1, 3, 6])
def test_pyramid_self_attention_block(scale, training, legacy, dtype):
    lip, ref = pair(oc.PyramidSelfAttentionBlock2D, RefPyramidSelfAttentionBlock2D,
                    (8, 4, 6, 5, scale), dict(legacy_double_projection=legacy), dtype=dtype,
                    seed=scale)
    compare(lip, ref, data((2, 8, *SMALL), dtype), training, dtype, legacy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("context_only", [False, True])
def test_base_oc_modules(context_only, training, dtype):
    # sizes [1, 2]: full-map attention plus a pooled scale on an odd map; dropout seeded.
    cls = oc.BaseOCContextModule if context_only else oc.BaseOCModule
    args = (8, 8, 4, 6, 0.2, [1, 2])
    lip, ref = pair(cls, RefBaseOC, args, ref_kwargs=dict(context_only=context_only),
                    dtype=dtype)
    compare(lip, ref, data((1, 8, *BIG), dtype), training, dtype, seed=7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training,legacy", [(False, False), (True, False), (True, True)])
def test_pyramid_oc_module(training, legacy, dtype):
    lip, ref = pair(oc.PyramidOCModule, RefPyramidOC, (8, 8, 0.2, [1, 2, 3, 6]),
                    dict(legacy_double_projection=legacy), dtype=dtype)
    compare(lip, ref, data((1, 8, *BIG), dtype), training, dtype, legacy, seed=3)


def test_pyramid_oc_module_67x67_batch1():
    # A large map (N = 4489, many attention tiles; regions of 11 and 12 rows/cols at
    # scale 6), training. (The reference materialises N x N maps: kept below ~100 MB.)
    dtype = torch.float32
    lip, ref = pair(oc.PyramidOCModule, RefPyramidOC, (4, 4, 0.0, [1, 2, 3, 6]), dtype=dtype)
    compare(lip, ref, data((1, 4, 67, 67), dtype), True, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("head", ["current", "legacy"])
def test_asp_oc_module(head, training, dtype):
    args = (6, 4, (12, 24, 36), head)
    lip, ref = pair(oc.ASPOCModule, RefASPOC, args, dtype=dtype)
    out = compare(lip, ref, data((2, 6, 29, 23), dtype), training, dtype, seed=5)
    assert out.shape == (2, 8 if head == "current" else 4, 29, 23)


@pytest.mark.parametrize("container", [list, tuple])
def test_asp_oc_list_input(container):
    dtype = torch.float64
    lip, ref = pair(oc.ASPOCModule, RefASPOC, (6, 4, (2, 3, 5)), dtype=dtype)
    x0, x1 = data((2, 6, 13, 11), dtype, 1), data((1, 6, 9, 7), dtype, 2)
    lip.eval()
    ref.eval()
    with torch.no_grad():
        out = lip(container([x0, x1]))
        torch.testing.assert_close(out, lip(x0), rtol=0, atol=0)
        torch.testing.assert_close(out, ref(container([x0, x1])), **tol(dtype))
    compare(lip, ref, [x0, x1], True, dtype, seed=2)
    with pytest.raises(ValueError, match="empty"):
        lip(container())


# ----------------------------------------------------------------- legacy double projection


@pytest.mark.parametrize("cls,args", [
    (oc.SelfAttentionBlock2D, (8, 4, 6, 8, 2)),
    (oc.PyramidSelfAttentionBlock2D, (8, 4, 6, 8, 3)),
])
def test_legacy_double_projection(cls, args):
    x = data((2, 8, 17, 13), torch.float32)
    new = randomize(cls(*args))
    old = randomize(cls(*args, legacy_double_projection=True))
    calls = {"new": 0, "old": 0}
    new.f_key.register_forward_hook(lambda *a: calls.__setitem__("new", calls["new"] + 1))
    old.f_key.register_forward_hook(lambda *a: calls.__setitem__("old", calls["old"] + 1))
    new.eval()
    old.eval()
    with torch.no_grad():
        torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    assert calls == {"new": 1, "old": 2}
    new.train()
    old.train()
    norm_new, norm_old = new.f_key[1], old.f_key[1]
    rm0 = norm_new.running_mean.clone()
    for step in range(1, 3):
        gy = torch.randn(x.shape[0], args[3], *x.shape[2:])
        outs = []
        for m in (new, old):
            xi = x.clone().requires_grad_()
            y = m(xi)
            grads = torch.autograd.grad(y, [xi, *m.parameters()], gy)
            outs.append((y, grads))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
        for a, b in zip(outs[1][1], outs[0][1]):
            torch.testing.assert_close(a, b)
        assert int(norm_new.num_batches_tracked) == step
        assert int(norm_old.num_batches_tracked) == 2 * step
    # Counters shared through f_query (the same module).
    assert old.state_dict()["f_query.1.num_batches_tracked"] == 4
    assert not torch.allclose(norm_new.running_mean, norm_old.running_mean)
    assert not torch.allclose(norm_new.running_mean, rm0)


# ----------------------------------------------------------------- structure, state_dict


def test_structure_and_defaults():
    m = oc.SelfAttentionBlock2D(8, 4, 6, scale=2)
    assert list(m._modules) == ["pool", "f_key", "f_query", "f_value", "W"]
    assert m.f_query is m.f_key
    assert m.out_channels == 8 and m.W.out_channels == 8
    assert m.pool.kernel_size == (2, 2)
    assert torch.count_nonzero(m.W.weight) == 0 and torch.count_nonzero(m.W.bias) == 0
    norm = m.f_key[1]
    assert type(norm) is lipfast.InPlaceABNSync
    assert norm.activation == "leaky_relu" and norm.activation_param == 0.01
    p = oc.PyramidSelfAttentionBlock2D(8, 4, 6)
    assert list(p._modules) == ["f_key", "f_query", "f_value", "W"]
    # Zero W: the stages contribute nothing until trained.
    b = oc.BaseOCModule(8, 8, 4, 6, 0.0, [1, 2]).eval()
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        expect = b.conv_bn_dropout(torch.cat([torch.zeros_like(x), x], 1))
        torch.testing.assert_close(b(x), expect)
    assert lipfast.OCModule is lipfast.BaseOCModule is lipfast.BaseOC_Module
    assert lipfast.BaseOC_Context_Module is lipfast.BaseOCContextModule
    assert lipfast.Pyramid_OC_Module is lipfast.PyramidOCModule
    assert lipfast.ASP_OC_Module is lipfast.ASPOCModule
    for name in ("SelfAttentionBlock2D", "PyramidSelfAttentionBlock2D", "OCModule"):
        assert getattr(lipfast, name) is getattr(lipfast.nn, name) is getattr(oc, name)


def test_pyramid_block_one_op_call(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("regions"))
        return lipfast.ops.oc_attention(*args, **kwargs)

    monkeypatch.setattr(oc, "oc_attention", counting)
    m = oc.PyramidSelfAttentionBlock2D(8, 4, 6, scale=6).eval()
    m(torch.randn(1, 8, 25, 19))
    assert calls == [6]


SAB_KEYS = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]


def stage_keys(prefix):
    return ([f"{prefix}f_key.{k}" for k in SAB_KEYS] + [f"{prefix}f_query.{k}" for k in SAB_KEYS]
            + [f"{prefix}{k}" for k in ("f_value.weight", "f_value.bias", "W.weight", "W.bias")])


def seq_keys(prefix, conv_bias=True):
    return [f"{prefix}0.weight"] + ([f"{prefix}0.bias"] if conv_bias else []) + [
        f"{prefix}1.{k}" for k in ("weight", "bias", "running_mean", "running_var")]


def check_layouts(m, expect):
    """Key order as OCNet's; OCNet-layout dict loads strictly (and back)."""
    keys = list(m.state_dict().keys())
    assert [k for k in keys if not k.endswith("num_batches_tracked")] == expect
    extra = set(keys) - set(expect)
    assert extra and all(k.endswith(".num_batches_tracked") for k in extra)
    assert {k.rsplit(".", 1)[0] for k in extra} == {k.rsplit(".", 1)[0] for k in expect
                                                    if k.endswith("running_mean")}


def test_state_dict_base_oc_512():
    m = oc.BaseOCModule(512, 512, 256, 256, 0.05, [1])
    expect = stage_keys("stages.0.") + seq_keys("conv_bn_dropout.")
    check_layouts(m, expect)
    randomize(m)
    # lipfast -> OCNet layout: the OCNet keys are a subset; strict into the reference.
    ref = RefBaseOC(512, 512, 256, 256, 0.05, [1])
    ref.load_state_dict(ocnet_layout(m.state_dict()), strict=True)
    assert list(ref.state_dict().keys()) == expect
    # OCNet layout -> lipfast, strict; num_batches_tracked restarts at 0.
    fresh = oc.BaseOCModule(512, 512, 256, 256, 0.05, [1])
    fresh.stages[0].f_key[1].num_batches_tracked.fill_(5)
    assert fresh.load_state_dict(ref.state_dict(), strict=True).missing_keys == []
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert int(fresh.stages[0].f_query[1].num_batches_tracked) == 0
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**ref.state_dict(), "stages.0.bogus": torch.zeros(1)})


def test_state_dict_pyramid_oc_512():
    with torch.device("meta"):
        m = oc.PyramidOCModule(512, 512, 0.05, [1, 2, 3, 6])
    expect = []
    for i in range(4):
        expect += stage_keys(f"stages.{i}.")
    expect += seq_keys("conv_bn_dropout.") + seq_keys("up_dr.")
    check_layouts(m, expect)
    sd = m.state_dict()
    assert sd["stages.0.f_key.0.weight"].shape == (256, 512, 1, 1)
    assert sd["stages.3.f_value.weight"].shape == (512, 512, 1, 1)
    assert sd["conv_bn_dropout.0.weight"].shape == (512, 4096, 1, 1)
    assert sd["up_dr.0.weight"].shape == (2048, 512, 1, 1)
    assert m.load_state_dict(ocnet_layout(sd), strict=True, assign=True).missing_keys == []


@pytest.mark.parametrize("head,head_out", [("current", 1024), ("legacy", 512)])
def test_state_dict_asp_oc_2048(head, head_out):
    with torch.device("meta"):
        m = oc.ASPOCModule(2048, 512, head=head)
    expect = (seq_keys("context.") + stage_keys("context.2.stages.0.")
              + seq_keys("context.2.conv_bn_dropout.") + seq_keys("conv2.", False)
              + seq_keys("conv3.", False) + seq_keys("conv4.", False) + seq_keys("conv5.", False)
              + seq_keys("conv_bn_dropout.", False))
    check_layouts(m, expect)
    sd = m.state_dict()
    assert sd["conv_bn_dropout.0.weight"].shape == (head_out, 2560, 1, 1)
    assert sd["conv_bn_dropout.1.running_var"].shape == (head_out,)
    assert sd["conv3.0.weight"].shape == (512, 2048, 3, 3)
    assert sd["context.2.stages.0.f_key.0.weight"].shape == (256, 512, 1, 1)
    assert m.conv5[0].dilation == (36, 36) and m.conv5[0].padding == (36, 36)
    assert m.context[2].stages[0].scale == 2
    assert m.load_state_dict(ocnet_layout(sd), strict=True, assign=True).missing_keys == []
    # The other head's checkpoint does not load.
    with torch.device("meta"):
        other = oc.ASPOCModule(2048, 512, head="legacy" if head == "current" else "current")
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(ocnet_layout(sd), strict=True, assign=True)


def test_state_dict_small_modules_round_trip():
    for lip_cls, ref_cls, args, kw in [
        (oc.BaseOCContextModule, RefBaseOC, (8, 8, 4, 6, 0.1, [1, 2]), dict(context_only=True)),
        (oc.PyramidOCModule, RefPyramidOC, (8, 8, 0.1, [1, 3]), {}),
        (oc.ASPOCModule, RefASPOC, (6, 4), {}),
        (oc.ASPOCModule, RefASPOC, (6, 4, (12, 24, 36), "legacy"), {}),
    ]:
        lip, ref = pair(lip_cls, ref_cls, args, ref_kwargs=kw)  # lipfast -> OCNet, strict
        back = lip_cls(*args).double()
        back.load_state_dict(ref.state_dict(), strict=True)  # OCNet -> lipfast, strict
        for k, v in ocnet_layout(lip.state_dict()).items():
            assert torch.equal(back.state_dict()[k], v), k


# ----------------------------------------------------------------- norm_layer


def test_norm_layer_batchnorm():
    dtype = torch.float64
    kw = dict(norm_layer=nn.BatchNorm2d)
    lip, ref = pair(oc.BaseOCModule, RefBaseOC, (8, 8, 4, 6, 0.0, [1, 2]), kw,
                    dict(norm=nn.BatchNorm2d), dtype=dtype, keep_counters=True)
    assert all(type(m) is not lipfast.InPlaceABNSync for m in lip.modules())
    assert "stages.1.f_query.1.num_batches_tracked" in lip.state_dict()
    assert list(lip.state_dict()) == list(ref.state_dict())
    compare(lip, ref, data((2, 8, *BIG), dtype), True, dtype)
    lip, ref = pair(oc.ASPOCModule, RefASPOC, (6, 4, (2, 3, 5), "legacy"), kw,
                    dict(norm=nn.BatchNorm2d), dtype=dtype, keep_counters=True)
    assert isinstance(lip.context[2].stages[0].f_key[1], nn.BatchNorm2d)
    compare(lip, ref, data((2, 6, 15, 13), dtype), True, dtype, seed=1)
    lip, ref = pair(oc.PyramidOCModule, RefPyramidOC, (8, 8, 0.0, [2, 3]), kw,
                    dict(norm=nn.BatchNorm2d), dtype=dtype, keep_counters=True)
    compare(lip, ref, data((1, 8, 15, 13), dtype), True, dtype)


def test_norm_layer_partial_inplace_abn_identity():
    dtype = torch.float64
    norm = functools.partial(lipfast.InPlaceABN, activation="identity")
    for training in (True, False):
        lip, ref = pair(oc.BaseOCModule, RefBaseOC, (8, 8, 4, 6, 0.0, [1, 2]),
                        dict(norm_layer=norm),
                        dict(norm=functools.partial(RefABN, activation="identity")), dtype=dtype)
        norms = [m for m in lip.modules() if isinstance(m, lipfast.InPlaceABN)]
        assert len(norms) == 3 and all(
            type(m) is lipfast.InPlaceABN and m.activation == "identity" for m in norms)
        compare(lip, ref, data((2, 8, 21, 17), dtype), training, dtype)


# ----------------------------------------------------------------- bad input


ALL_MODULES = [
    (oc.SelfAttentionBlock2D, (8, 4, 6)),
    (oc.PyramidSelfAttentionBlock2D, (8, 4, 6)),
    (oc.BaseOCModule, (8, 8, 4, 6, 0.0)),
    (oc.BaseOCContextModule, (8, 8, 4, 6, 0.0)),
    (oc.PyramidOCModule, (8, 8, 0.0, [1, 2])),
    (oc.ASPOCModule, (8, 4, (1, 2, 3))),
]


@pytest.mark.parametrize("cls,args", ALL_MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_bad_input(cls, args):
    m = cls(*args).eval()
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"{name} expects 8 input channels, got 7"):
        m(torch.randn(2, 7, 6, 6))
    with pytest.raises(ValueError, match=rf"{name} expects a 4D .*got shape \(8, 6, 6\)"):
        m(torch.randn(8, 6, 6))
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 .* torch.float32"):
        m(torch.randn(2, 8, 6, 6, dtype=torch.float64))
    with torch.device("meta"):
        mm = cls(*args).eval()
    with pytest.raises(ValueError, match=r"input is on cpu .* parameters are on meta"):
        mm(torch.randn(2, 8, 6, 6))
    with pytest.raises(TypeError, match="tensor input"):
        m(None)


def test_scale_larger_than_map():
    with pytest.raises(ValueError, match=r"pooling scale 8 is larger than the 6 x 6"):
        oc.SelfAttentionBlock2D(8, 4, 6, scale=8).eval()(torch.randn(1, 8, 6, 6))
    with pytest.raises(ValueError, match=r"pooling scale 8 is larger than the 9 x 7"):
        oc.BaseOCModule(8, 8, 4, 6, 0.0, [1, 8]).eval()(torch.randn(1, 8, 9, 7))
    with pytest.raises(ValueError, match=r"6 x 6 pyramid regions do not fit a 5 x 5 map"):
        oc.PyramidOCModule(8, 8, 0.0, [6]).eval()(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match=r"6 x 6 pyramid regions do not fit a 9 x 5 map"):
        oc.PyramidSelfAttentionBlock2D(8, 4, 6, scale=6).eval()(torch.randn(1, 8, 9, 5))
    # The boundary: a scale equal to the map size works.
    assert oc.SelfAttentionBlock2D(8, 4, 6, scale=6).eval()(torch.randn(1, 8, 6, 9)).shape == (
        1, 8, 6, 9)
    assert oc.PyramidOCModule(8, 8, 0.0, [5]).eval()(torch.randn(1, 8, 5, 5)).shape == (
        1, 8, 5, 5)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="head must be 'current' or 'legacy'"):
        oc.ASPOCModule(8, 4, head="new")
    with pytest.raises(ValueError, match="dilations must have 3 entries"):
        oc.ASPOCModule(8, 4, dilations=(1, 2))
    with pytest.raises(ValueError, match="scale must be a positive int"):
        oc.SelfAttentionBlock2D(8, 4, 6, scale=0)
    with pytest.raises(ValueError, match="sizes must name at least one scale"):
        oc.BaseOCModule(8, 8, 4, 6, 0.0, [])
    with pytest.raises(ValueError, match="every entry of sizes"):
        oc.PyramidOCModule(8, 8, 0.0, [1, 2.5])


# ----------------------------------------------------------------- torch.compile


def _check_compile_fullgraph_matches_eager(device):
    """Two training steps (outputs, input and parameter gradients, running stats),
    then eval, of a compiled BaseOCModule against the eager one on ``device``."""
    eager = randomize(oc.BaseOCModule(8, 8, 4, 6, 0.0, [1, 2])).to(device)
    comp = copy.deepcopy(eager)
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    x = data((2, 8, 13, 11), torch.float32).to(device)
    gy = data((2, 8, 13, 11), torch.float32, seed=4).to(device)
    for step in range(2):
        for m in (eager, comp):
            m.train()
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye)
        ye.backward(gy)
        yc.backward(gy)
        torch.testing.assert_close(xc.grad, xe.grad)
    scale = max(float(p.grad.abs().max()) for p in eager.parameters())
    for (n, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        assert_close(pc.grad, pe.grad, torch.float32, n, scale)
    for (n, be), bc in zip(eager.named_buffers(), comp.buffers()):
        torch.testing.assert_close(bc, be, msg=lambda m, n=n: f"{n}: {m}")
    assert int(comp.stages[0].f_key[1].num_batches_tracked) == 2
    # Eval (grad mode on: see the no_grad case below).
    for m in (eager, comp):
        m.eval()
    torch.testing.assert_close(compiled(x), eager(x))


def test_torch_compile_fullgraph_matches_eager():
    _check_compile_fullgraph_matches_eager("cpu")


def test_torch_compile_fullgraph_no_grad():
    m = oc.BaseOCModule(8, 8, 4, 6, 0.0, [1]).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.5, 0.5)
        x = torch.randn(1, 8, 5, 5)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(got, m(x))


# ----------------------------------------------------------------- CUDA
# The lipfast modules on CUDA (Triton attention, CUDA ABN) in float32 with TF32
# off (matmul and cuDNN), against the float64 OCNet reference on CPU, with the
# float32 tolerances of ``assert_close`` above; and under
# torch.autocast("cuda", bfloat16) against the same reference with norm-wise
# relative errors: output < 0.1, input gradient < 0.25, each parameter
# gradient < 0.15 of max(its norm, the largest parameter-gradient norm) (several
# bias gradients are exactly 0 in float64). These bf16 bounds are about 2x the
# errors of a pessimistic CPU emulation (every op's output, backward included,
# rounded to bf16: up to 0.04 / 0.11 / 0.084 on these modules in training mode,
# where a batch norm after the attention sum amplifies rounding); they catch
# wiring errors (O(1)), the float32 test checks exactness. Dropout is set to p=0
# on both sides (CPU and CUDA dropout masks differ).


@pytest.fixture
def _cuda_fp32_exact():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cuda_no_dropout(*modules):
    for m in modules:
        for mod in m.modules():
            if isinstance(mod, nn.modules.dropout._DropoutNd):
                mod.p = 0.0


def _cuda_run(module, x, training):
    """``run`` for a module on any device: same output gradient values as ``run``."""
    module.train(training)
    xi = x.clone().requires_grad_()
    out = module(xi)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(123),
                     dtype=torch.float64).to(out.device, out.dtype)
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(out, [xi, *params], gy)
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()
               if not k.endswith("num_batches_tracked")}
    return out.detach(), grads[0], dict(zip(names, grads[1:])), buffers


CUDA_MODULES = [
    # (lipfast class, reference class, args, ref_kwargs, input shape)
    ("sab_scale3", oc.SelfAttentionBlock2D, RefSelfAttentionBlock2D, (8, 4, 6, 5, 3), {},
     (2, 8, *SMALL)),
    ("pyramid_sab_scale6", oc.PyramidSelfAttentionBlock2D, RefPyramidSelfAttentionBlock2D,
     (8, 4, 6, 5, 6), {}, (2, 8, *SMALL)),
    ("base_oc", oc.BaseOCModule, RefBaseOC, (8, 8, 4, 6, 0.2, [1, 2]), {}, (1, 8, *BIG)),
    ("base_oc_context", oc.BaseOCContextModule, RefBaseOC, (8, 8, 4, 6, 0.2, [1, 2]),
     dict(context_only=True), (1, 8, *BIG)),
    ("pyramid_oc", oc.PyramidOCModule, RefPyramidOC, (8, 8, 0.2, [1, 2, 3, 6]), {},
     (1, 8, *BIG)),
    ("asp_oc", oc.ASPOCModule, RefASPOC, (6, 4, (12, 24, 36), "current"), {}, (2, 6, 29, 23)),
    ("base_oc_wide", oc.BaseOCModule, RefBaseOC, (64, 64, 32, 64, 0.0, [1]), {},
     (2, 64, 30, 30)),
]


def _cuda_pair(cls, ref_cls, args, ref_kwargs, seed=0):
    lip, ref = pair(cls, ref_cls, args, ref_kwargs=ref_kwargs, dtype=torch.float64, seed=seed)
    _cuda_no_dropout(lip, ref)
    return copy.deepcopy(lip).to("cuda", torch.float32), ref


@pytest.mark.cuda
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("case", CUDA_MODULES, ids=lambda c: c[0])
def test_cuda_modules_float32_match_reference(case, training, _cuda_fp32_exact):
    _, cls, ref_cls, args, ref_kwargs, shape = case
    lip, ref = _cuda_pair(cls, ref_cls, args, ref_kwargs)
    x = data(shape, torch.float64)
    before = {k: v.detach().clone() for k, v in ref.named_buffers()}
    o_g, dx_g, gp_g, buf_g = _cuda_run(lip, x.to("cuda", torch.float32), training)
    o_r, dx_r, gp_r, buf_r = _cuda_run(ref, x, training)
    f32 = torch.float32
    assert o_g.device.type == "cuda" and o_g.dtype == f32
    assert_close(o_g.cpu().double(), o_r, f32, "output")
    assert_close(dx_g.cpu().double(), dx_r, f32, "input grad")
    assert gp_g.keys() == gp_r.keys()
    scale = max(float(g.abs().max()) for g in gp_r.values())
    for k in gp_r:
        assert_close(gp_g[k].cpu().double(), gp_r[k], f32, f"grad {k}", scale)
    assert buf_g.keys() == buf_r.keys()
    for k in buf_r:
        got = buf_g[k].cpu().double()
        if not training or not _is_key_norm(k):
            assert_close(got, buf_r[k], f32, k)
        else:  # key norm updated once (lipfast) vs twice (OCNet), see ``compare``
            assert_close(buf_r[k] - before[k], 1.9 * (got - before[k]), f32, k)


@pytest.mark.cuda
def test_cuda_legacy_double_projection_buffers(_cuda_fp32_exact):
    lip, ref = pair(oc.PyramidSelfAttentionBlock2D, RefPyramidSelfAttentionBlock2D,
                    (8, 4, 6, 5, 3), dict(legacy_double_projection=True), dtype=torch.float64)
    lip = copy.deepcopy(lip).to("cuda", torch.float32)
    x = data((2, 8, *SMALL), torch.float64)
    o_g, _, _, buf_g = _cuda_run(lip, x.to("cuda", torch.float32), True)
    o_r, _, _, buf_r = _cuda_run(ref, x, True)
    assert_close(o_g.cpu().double(), o_r, torch.float32, "output")
    for k in buf_r:
        assert_close(buf_g[k].cpu().double(), buf_r[k], torch.float32, k)


def _cuda_rel_norm(got, ref, floor=0.0):
    got = got.detach().cpu().double()
    return float((got - ref).norm()) / max(float(ref.norm()), floor, 1e-30)


@pytest.mark.cuda
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("case", CUDA_MODULES, ids=lambda c: c[0])
def test_cuda_modules_bf16_autocast(case, training):
    _, cls, ref_cls, args, ref_kwargs, shape = case
    lip, ref = _cuda_pair(cls, ref_cls, args, ref_kwargs, seed=1)
    x = data(shape, torch.float64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o_g, dx_g, gp_g, buf_g = _cuda_run(lip, x.to("cuda", torch.float32), training)
    o_r, dx_r, gp_r, _ = _cuda_run(ref, x, training)
    assert torch.isfinite(o_g).all() and torch.isfinite(dx_g).all()
    assert _cuda_rel_norm(o_g, o_r) < 0.1
    assert dx_g.dtype == torch.float32 and _cuda_rel_norm(dx_g, dx_r) < 0.25
    top = max(float(g.norm()) for g in gp_r.values())
    for k in gp_r:
        assert gp_g[k].dtype == torch.float32 and torch.isfinite(gp_g[k]).all(), k
        assert _cuda_rel_norm(gp_g[k], gp_r[k], top) < 0.15, k
    for k, v in buf_g.items():  # norm statistics stay float32 under autocast
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k


@pytest.mark.cuda
def test_cuda_compile_fullgraph_matches_eager(_cuda_fp32_exact):
    _check_compile_fullgraph_matches_eager("cuda")
