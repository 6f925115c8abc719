"""In-Place ABN against the plain PyTorch reference of SPEC section 2."""

import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipfast
from lipfast.ops import abn as abn_ops

from abn_reference import activation, inplace_abn_reference

ACTS = [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 1.0), ("elu", 0.5), ("identity", 0.0)]
SHAPES = [(3, 5, 7, 9), (6, 4), (2, 3, 11), (1, 2, 13, 1)]


def tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)


def make(shape, dtype, seed=0, affine=True, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 1.7 + offset
    w = torch.randn(c, generator=g, dtype=dtype) if affine else None  # mixed signs
    b = torch.randn(c, generator=g, dtype=dtype) if affine else None
    gy = torch.randn(shape, generator=g, dtype=dtype)
    return x, w, b, gy


def run_both(x, w, b, gy, training, act, param, rm=None, rv=None, momentum=0.1, eps=1e-5,
             layout=lambda t: t):
    """(reference outputs, lipfast outputs): y, dx, dw, db, running_mean, running_var."""
    res = []
    for impl in ("ref", "lipfast"):
        xl = x.clone().requires_grad_()
        wl = w.clone().requires_grad_() if w is not None else None
        bl = b.clone().requires_grad_() if b is not None else None
        rml = rm.clone() if rm is not None else None
        rvl = rv.clone() if rv is not None else None
        h = layout(xl * 1.0)  # non-leaf; possibly non-contiguous view
        if impl == "ref":
            y = inplace_abn_reference(h, wl, bl, rml, rvl, training, momentum, eps, act, param)
        else:
            ptr = h.data_ptr()
            y = lipfast.inplace_abn(h, wl, bl, rml, rvl, training, momentum, eps, act, param)
            assert y.data_ptr() == ptr and y is h, "output must live in the input's storage"
        inputs = [t for t in (xl, wl, bl) if t is not None]
        grads = torch.autograd.grad(y, inputs, gy)
        res.append((y.detach().clone(), *grads, rml, rvl))
    return res


@pytest.mark.parametrize("act,param", ACTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(act, param, dtype, shape, training):
    x, w, b, gy = make(shape, dtype)
    c = shape[1]
    rm = torch.randn(c, dtype=dtype) * 0.3
    rv = torch.rand(c, dtype=dtype) + 0.5
    ref, out = run_both(x, w, b, gy, training, act, param, rm, rv)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, **tol(dtype))


@pytest.mark.parametrize("training", [True, False])
def test_no_affine_and_no_running_stats(training):
    x, _, _, gy = make((4, 3, 5, 6), torch.float64, affine=False)
    rm = torch.zeros(3, dtype=torch.float64) if not training else None
    rv = torch.ones(3, dtype=torch.float64) if not training else None
    ref, out = run_both(x, None, None, gy, training, "leaky_relu", 0.01, rm, rv)
    for r, o in zip(ref, out):
        if r is None:
            assert o is None
        else:
            torch.testing.assert_close(o, r, **tol(torch.float64))


LAYOUTS = {
    "transposed_spatial": lambda t: t.transpose(2, 3),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "sliced": lambda t: t[:, :, 1:, ::2],
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("training", [True, False])
def test_non_contiguous_inputs(name, training):
    layout = LAYOUTS[name]
    x, w, b, gy = make((3, 4, 9, 8), torch.float64)
    gy = layout(gy.clone())
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    ref, out = run_both(x, w, b, gy, training, "elu", 1.0, rm, rv, layout=layout)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, **tol(torch.float64))


def test_in_place_on_a_view_writes_through_to_the_base():
    x, w, b, _ = make((2, 3, 6, 6), torch.float64)
    base = x.clone()
    view = base[:, :, ::2, :]
    lipfast.inplace_abn(view, w, b, None, None, True, 0.1, 1e-5, "leaky_relu", 0.01)
    expected = inplace_abn_reference(x[:, :, ::2, :], w, b, None, None, True, 0.1, 1e-5,
                                     "leaky_relu", 0.01)
    torch.testing.assert_close(base[:, :, ::2, :], expected)
    torch.testing.assert_close(base[:, :, 1::2, :], x[:, :, 1::2, :])  # untouched rows


@pytest.mark.parametrize("act,param", [("leaky_relu", 0.1), ("elu", 1.0), ("identity", 0.0)])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(act, param, training):
    x, w, b, _ = make((3, 2, 3, 2), torch.float64, seed=3)
    rm = torch.randn(2, dtype=torch.float64) * 0.1 if not training else None
    rv = torch.rand(2, dtype=torch.float64) + 0.5 if not training else None

    def fn(x, w, b):
        return lipfast.inplace_abn(x.clone(), w, b, rm, rv, training, 0.1, 1e-5, act, param)

    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_float32_statistics_with_large_offset():
    # mean >> std: naive float32 sum-of-squares would lose the variance entirely.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 61, 47, generator=g) * 0.01 + 1000.0
    mean, var = torch.ops.lipfast.abn_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)


# ----------------------------------------------------------------- modules


def test_module_training_running_stats_and_eval():
    torch.manual_seed(0)
    m = lipfast.InPlaceABN(4, momentum=0.2)
    ref = nn.BatchNorm2d(4, momentum=0.2).double()
    m.double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, -1.5, 2.0, 1.0]))
        m.bias.uniform_(-1, 1)
        ref.weight.copy_(m.weight.abs() + m.eps)
        ref.bias.copy_(m.bias)
    for _ in range(3):
        x = torch.randn(5, 4, 6, 7, dtype=torch.float64) * 3 + 2
        y = m(x.clone())
        expect = F.leaky_relu(ref(x), 0.01)
        torch.testing.assert_close(y, expect)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert int(m.num_batches_tracked) == 3 == int(ref.num_batches_tracked)
    m.eval()
    ref.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x.clone()), F.leaky_relu(ref(x), 0.01))


def test_module_momentum_none_is_cumulative_average():
    m = lipfast.InPlaceABN(3, momentum=None, activation="identity").double()
    ref = nn.BatchNorm2d(3, momentum=None).double()
    with torch.no_grad():
        ref.weight.fill_(1 + m.eps)
    for i in range(4):
        x = torch.randn(3, 3, 4, 5, dtype=torch.float64) * (i + 1)
        m(x.clone())
        ref(x)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)


def test_module_without_running_stats_uses_batch_stats_in_eval():
    m = lipfast.InPlaceABN(3, track_running_stats=False, affine=False).double().eval()
    assert m.running_mean is None and "running_mean" not in m.state_dict()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    expect = F.leaky_relu(F.batch_norm(x, None, None, training=True, eps=m.eps), 0.01)
    torch.testing.assert_close(m(x.clone()), expect)


def test_abn_is_out_of_place_with_plain_weight():
    m = lipfast.ABN(3, activation="relu").double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    x0 = x.clone()
    y = m(x)
    torch.testing.assert_close(x, x0)
    expect = F.relu(F.batch_norm(x0, None, None, m.weight, m.bias, True, 0.0, m.eps))
    torch.testing.assert_close(y, expect)
    for act, fn in [("leaky_relu", lambda z: F.leaky_relu(z, 0.01)), ("elu", lambda z: F.elu(z, 0.01)),
                    ("identity", lambda z: z)]:
        m2 = lipfast.ABN(3, activation=act).double().eval()
        torch.testing.assert_close(m2(x0), fn(F.batch_norm(x0, m2.running_mean, m2.running_var,
                                                            m2.weight, m2.bias, False, 0.0, m2.eps)))


def test_inplace_abn_sync_without_process_group_warns_once_and_matches():
    abn_ops._warned_no_group = False
    a = lipfast.InPlaceABNSync(3).double()
    b = lipfast.InPlaceABN(3).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not initialised"):
        ya = a(x.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a(x.clone())  # second call: no warning
    torch.testing.assert_close(ya, b(x.clone()))
    b(x.clone())
    torch.testing.assert_close(a.running_var, b.running_var)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 2


def test_dataparallel_replicas_are_refused():
    m = lipfast.InPlaceABNSync(3)
    m._is_replica = True  # what nn.parallel.replicate sets on each replica
    with pytest.raises(RuntimeError, match="DataParallel"):
        m(torch.randn(2, 3, 4, 4))


# ----------------------------------------------------------------- API compatibility


def test_mapillary_signature_and_defaults():
    m = lipfast.InPlaceABNSync(8, 1e-3, 0.05, True, True, "elu", 0.5, group=None)
    assert (m.eps, m.momentum, m.affine, m.track_running_stats) == (1e-3, 0.05, True, True)
    assert (m.activation, m.activation_param, m.group) == ("elu", 0.5, None)
    d = lipfast.InPlaceABN(8)
    assert (d.eps, d.momentum, d.activation, d.activation_param) == (1e-5, 0.1, "leaky_relu", 0.01)


def test_legacy_spellings():
    m = lipfast.InPlaceABNSync(8, slope=0.02)
    assert (m.activation, m.activation_param) == ("leaky_relu", 0.02)
    m = lipfast.InPlaceABNSync(8, activation="none")
    assert m.activation == "identity"
    # old positional order (num_features, eps, momentum, affine, activation, slope)
    m = lipfast.InPlaceABN(8, 1e-5, 0.1, True, "leaky_relu", 0.05)
    assert (m.activation, m.activation_param, m.track_running_stats) == ("leaky_relu", 0.05, True)
    # SCHP's backbone norm
    BatchNorm2d = functools.partial(lipfast.InPlaceABNSync, activation="none")
    m = BatchNorm2d(16)
    assert m.activation == "identity" and m.num_features == 16
    with pytest.warns(UserWarning, match="devices"):
        lipfast.InPlaceABNSync(8, devices=[0, 1])
    with pytest.raises(TypeError, match="bogus"):
        lipfast.InPlaceABN(8, bogus=1)


def test_state_dict_matches_batchnorm_and_round_trips():
    m = lipfast.InPlaceABNSync(5)
    bn = nn.BatchNorm2d(5)
    assert list(m.state_dict().keys()) == list(bn.state_dict().keys())
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
    m.load_state_dict(bn.state_dict(), strict=True)
    m2 = lipfast.InPlaceABN(5)
    m2.load_state_dict(m.state_dict(), strict=True)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v)


def test_loads_vendored_checkpoint_without_num_batches_tracked(tmp_path):
    sd = {"weight": torch.rand(4) + 0.5, "bias": torch.randn(4), "running_mean": torch.randn(4),
          "running_var": torch.rand(4) + 0.5}
    path = tmp_path / "vendored.pth"
    torch.save(sd, path)
    m = lipfast.InPlaceABNSync(4)
    m.load_state_dict(torch.load(path, weights_only=True), strict=True)
    torch.testing.assert_close(m.running_var, sd["running_var"])
    assert int(m.num_batches_tracked) == 0
    # nested, as inside a model
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), lipfast.InPlaceABNSync(4))
    nested = {"0.weight": torch.randn(4, 3, 1, 1), "0.bias": torch.randn(4)}
    nested.update({f"1.{k}": v for k, v in sd.items()})
    seq.load_state_dict(nested, strict=True)


# ----------------------------------------------------------------- errors


def test_errors_are_clear():
    m = lipfast.InPlaceABN(4)
    with pytest.raises(ValueError, match="4 channels but the input has 3"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match=r"shape \(N, C, \*\)"):
        m(torch.randn(4))
    with pytest.raises(ValueError, match="not invertible"):
        lipfast.InPlaceABN(4, activation="relu")
    with pytest.raises(ValueError, match="not invertible"):
        lipfast.InPlaceABNSync(4, activation="relu")
    with pytest.raises(ValueError, match="positive leaky_relu slope"):
        lipfast.InPlaceABN(4, activation_param=0.0)
    with pytest.raises(ValueError, match="positive leaky_relu slope"):
        lipfast.InPlaceABN(4, slope=-0.1)
    with pytest.raises(ValueError, match="unknown activation"):
        lipfast.InPlaceABN(4, activation="gelu")
    lipfast.ABN(4, activation="relu")  # fine out of place
    with pytest.raises(TypeError, match="dtype torch.float64 but the input has dtype torch.float32"):
        lipfast.InPlaceABN(4).double()(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="is on meta but the input is on cpu"):
        lipfast.InPlaceABN(4).to("meta")(torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match="float32 and float64"):
        x = torch.randn(2, 4, 3, 3).half()
        lipfast.inplace_abn(x, None, None, None, None)
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, 4, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="eval mode needs running_mean"):
        lipfast.inplace_abn(torch.randn(2, 4), None, None, None, None, training=False)


def test_following_in_place_op_is_explained():
    m = lipfast.InPlaceABN(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = m(x * 1)
    y.relu_()  # destroys the saved output
    with pytest.raises(RuntimeError, match="modified in place by a later operation"):
        y.sum().backward()


def test_leaf_requiring_grad_is_rejected_by_autograd():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        lipfast.InPlaceABN(3)(x)


def test_input_with_zero_values_per_channel_raises():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        lipfast.InPlaceABN(3)(torch.randn(0, 3, 4, 4))


# ----------------------------------------------------------------- torch.library / compile


def _op_samples(dtype):
    x, w, b, gy = make((3, 4, 5, 7), dtype, seed=5)
    mean, var = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    mean, var = mean.to(dtype), var.to(dtype)
    y = inplace_abn_reference(x, w, b, None, None, True, 0.1, 1e-5, "leaky_relu", 0.01)
    nc = x.transpose(2, 3)  # non-contiguous
    return x, nc, w, b, gy, mean, var, y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    x, nc, w, b, gy, mean, var, y = _op_samples(dtype)
    ops = torch.ops.lipfast
    for t in (x, nc):
        torch.library.opcheck(ops.abn_stats.default, (t,))
    for t in (x.clone(), nc.clone()):
        torch.library.opcheck(ops.abn_forward_.default,
                              (t, mean, var, w, b, 1e-5, "leaky_relu", 0.01))
    torch.library.opcheck(ops.abn_forward_.default, (x.clone(), mean, var, None, None, 1e-5,
                                                     "elu", 1.0))
    for yy, gg in ((y, gy), (y.transpose(2, 3), gy.transpose(2, 3))):
        torch.library.opcheck(ops.abn_backward_reduce.default,
                              (yy, gg, w, b, 1e-5, "leaky_relu", 0.01))
        s1, s2 = ops.abn_backward_reduce(yy, gg, w, b, 1e-5, "leaky_relu", 0.01)
        torch.library.opcheck(ops.abn_backward_elemt.default,
                              (yy, gg, var, w, b, s1 / 105, s2 / 105, 1e-5, "leaky_relu", 0.01))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_ops_match_the_kernels_they_compose(dtype):
    # abn_train_forward_ = abn_stats + running-stat update + abn_forward_;
    # abn_backward = abn_backward_reduce + means + abn_backward_elemt + the
    # parameter gradients; the same values as the unfused calls, and opcheck.
    x, nc, w, b, gy, mean, var, y = _op_samples(dtype)
    ops = torch.ops.lipfast
    count = x.numel() // x.shape[1]
    for t in (x, nc):
        rm, rv = torch.randn(4, dtype=dtype), torch.rand(4, dtype=dtype) + 0.5
        rm0, rv0 = rm.clone(), rv.clone()
        got = t.clone()
        v = ops.abn_train_forward_(got, w, b, rm, rv, 0.3, 1e-5, "leaky_relu", 0.01)
        m_ref, v_ref = ops.abn_stats(t)
        exp = t.clone()
        ops.abn_forward_(exp, m_ref, v_ref, w, b, 1e-5, "leaky_relu", 0.01)
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
        torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
        torch.testing.assert_close(rm, 0.7 * rm0 + 0.3 * m_ref)
        torch.testing.assert_close(rv, 0.7 * rv0 + 0.3 * v_ref * count / (count - 1))
        torch.library.opcheck(ops.abn_train_forward_.default,
                              (t.clone(), w, b, rm.clone(), rv.clone(), 0.1, 1e-5, "leaky_relu",
                               0.01))
        # no running statistics: nothing to update
        got2 = t.clone()
        ops.abn_train_forward_(got2, None, None, None, None, 0.1, 1e-5, "identity", 0.0)
        exp2 = t.clone()
        ops.abn_forward_(exp2, m_ref, v_ref, None, None, 1e-5, "identity", 0.0)
        torch.testing.assert_close(got2, exp2, rtol=0, atol=0)
    for training in (True, False):
        for yy, gg in ((y, gy), (y.transpose(2, 3), gy.transpose(2, 3))):
            dx, dw, db = ops.abn_backward(yy, gg, var, w, b, count, 1e-5, "leaky_relu",
                                          0.01, training)
            s1, s2 = ops.abn_backward_reduce(yy, gg, w, b, 1e-5, "leaky_relu", 0.01)
            m1, m2 = (s1 / count, s2 / count) if training else (s1 * 0, s2 * 0)
            dx_ref = ops.abn_backward_elemt(yy, gg, var, w, b, m1, m2, 1e-5, "leaky_relu", 0.01)
            torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
            torch.testing.assert_close(dw, s2 * torch.sign(w), rtol=0, atol=0)
            torch.testing.assert_close(db, s1, rtol=0, atol=0)
            torch.library.opcheck(ops.abn_backward.default,
                                  (yy, gg, var, w, b, count, 1e-5, "leaky_relu", 0.01,
                                   training))
    # the differentiable op (C++ autograd kernel) that eager training uses
    for t in (x, nc):
        rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
        h = (t * 1.0).requires_grad_()
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        torch.library.opcheck(ops.inplace_abn_train_.default,
                              (h * 1.0, wg, bg, rm, rv, 0.1, 1e-5, "leaky_relu", 0.01))
        torch.library.opcheck(ops.inplace_abn_train_.default,
                              (h * 1.0, None, None, None, None, 0.1, 1e-5, "elu", 1.0))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.abn_train_forward_(torch.randn(1, 3, 1), None, None, None, None, 0.1, 1e-5,
                               "identity", 0.0)
    with pytest.raises(ValueError, match="positive count"):
        ops.abn_backward(y, gy, var, w, b, 0, 1e-5, "leaky_relu", 0.01, True)


def test_op_level_errors():
    ops = torch.ops.lipfast
    x = torch.randn(2, 3, 4)
    m, v = ops.abn_stats(x)
    with pytest.raises(ValueError, match="not invertible"):
        ops.abn_forward_(x, m, v, None, None, 1e-5, "relu", 0.0)
    with pytest.raises(ValueError, match="mean must have shape"):
        ops.abn_forward_(x, m[:2], v, None, None, 1e-5, "identity", 0.0)
    with pytest.raises(ValueError, match="grad_output has shape"):
        ops.abn_backward_reduce(x, x[:1], None, None, 1e-5, "identity", 0.0)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), lipfast.InPlaceABN(8),
                             nn.Conv2d(8, 4, 1), lipfast.InPlaceABNSync(4, activation="elu",
                                                                        activation_param=1.0))

    x = torch.randn(2, 3, 9, 7)
    eager, comp = build(), build()
    abn_ops._warned_no_group = True  # no process group here: silence the one-time warning
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        le = eager(x).square().mean()
        lc = compiled(x).square().mean()
        le.backward()
        lc.backward()
    torch.testing.assert_close(lc, le)
    for (n, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, msg=n)
    torch.testing.assert_close(comp[1].running_mean, eager[1].running_mean)
    torch.testing.assert_close(comp[3].running_var, eager[3].running_var)
    eager.eval()
    comp.eval()
    torch.testing.assert_close(compiled(x), eager(x))


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_fullgraph_without_grad(training):
    # Inference and BN re-estimation run under no_grad: no autograd Function then.
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3), lipfast.InPlaceABNSync(6)).train(training)

    abn_ops._warned_no_group = True
    eager, comp = build(), build()
    x = torch.randn(2, 3, 8, 7)
    with torch.no_grad():
        expect = eager(x)
        got = torch.compile(comp, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(comp[1].running_mean, eager[1].running_mean)
    torch.testing.assert_close(comp[1].running_var, eager[1].running_var)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), lipfast.InPlaceABN(8))
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), lipfast.InPlaceABN(8))
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 9, 7)
    out = torch.compile(m, fullgraph=True)(x)
    expect = ref(x)
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    expect.sum().backward()
    torch.testing.assert_close(m[0].weight.grad, ref[0].weight.grad)


# ----------------------------------------------------------------- CUDA (run on a GPU only)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("act,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.0)])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_matches_float64_reference(dtype, act, param, training):
    x, w, b, gy = make((4, 6, 33, 17), torch.float64, seed=2)
    rm, rv = torch.randn(6, dtype=torch.float64) * 0.2, torch.rand(6, dtype=torch.float64) + 0.5
    ref = run_both(x, w, b, gy, training, act, param, rm, rv)[0]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    xl = x.to("cuda", dtype).requires_grad_()
    wl = w.to("cuda", pdt).requires_grad_()
    bl = b.to("cuda", pdt).requires_grad_()
    rml, rvl = rm.to("cuda", pdt), rv.to("cuda", pdt)
    y = lipfast.inplace_abn(xl * 1, wl, bl, rml, rvl, training, 0.1, 1e-5, act, param)
    assert y.dtype == dtype
    grads = torch.autograd.grad(y, (xl, wl, bl), gy.to("cuda", dtype))
    low = dtype in (torch.float16, torch.bfloat16)
    t = dict(rtol=3e-2, atol=3e-2) if low else tol(dtype)
    # weight/bias grads sum over many elements: compare relative to their scale
    for r, o in zip(ref, (y, *grads, rml, rvl)):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(o.double().cpu() / scale, r / scale, **t)


@pytest.mark.cuda
def test_cuda_autocast_keeps_float32_statistics():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), lipfast.InPlaceABNSync(8)).cuda()
    abn_ops._warned_no_group = True
    x = torch.randn(2, 3, 17, 19, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    assert m[1].running_mean.dtype == torch.float32 and m[1].weight.dtype == torch.float32
    y.float().sum().backward()
    assert m[1].weight.grad.dtype == torch.float32 and torch.isfinite(m[1].weight.grad).all()


@pytest.mark.cuda
def test_cuda_large_grid_and_channels_last():
    # more rows than the kernels' grid.y cap (65535) and a channels_last input
    x = torch.randn(70000, 3, device="cuda") * 2 + 1
    mean, var = torch.ops.lipfast.abn_stats(x)
    rv, rm = torch.var_mean(x.double(), dim=0, unbiased=False)
    torch.testing.assert_close(mean.double(), rm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), rv, rtol=1e-5, atol=1e-5)
    x4 = torch.randn(3, 5, 9, 7, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.rand(5, device="cuda") + 0.5
    expect = inplace_abn_reference(x4.clone(), w, None, None, None, True, 0.1, 1e-5,
                                   "leaky_relu", 0.01)
    torch.testing.assert_close(lipfast.inplace_abn(x4, w, None, None, None), expect)


@pytest.mark.parametrize("training", [True, False])   # C++ autograd op / Python Function
def test_differentiable_once_raises_on_double_backward(training):
    # A second derivative through the layer's backward must raise, not silently
    # treat the layer's gradient as a constant (here another path, x ** 3, keeps
    # the first-order gradient differentiable).
    g = torch.Generator().manual_seed(12)
    abn = lipfast.InPlaceABN(3, activation="leaky_relu").train(training)
    x = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    grad, = torch.autograd.grad(((abn(x * 2.0) + x ** 3) ** 2).sum(), x, create_graph=True)
    assert grad.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
    # create_graph does not change the first-order gradient
    x2 = x.detach().clone().requires_grad_()
    plain, = torch.autograd.grad(((abn(x2 * 2.0) + x2 ** 3) ** 2).sum(), x2)
    torch.testing.assert_close(grad.detach(), plain, rtol=0, atol=0)
