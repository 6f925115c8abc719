"""lipfast.ops.relu_conv2d: conv2d(relu(y)) that saves y instead of relu(y).

Reference: F.conv2d(F.relu(y), ...) in float64 (the op's definition), values and
gradients; plus what autograd keeps, opcheck, torch.compile and autocast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lipfast  # noqa: F401
from lipfast.ops import relu_conv2d

D = torch.float64


def _ref(y, w, b, stride, padding, dilation, groups):
    return F.conv2d(F.relu(y), w, b, stride, padding, dilation, groups)


def _grads(fn, y, w, b, g):
    out = fn(y, w, b)
    leaves = [t for t in (y, w, b) if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, g)


CASES = [
    # (B, Cin, H, W, Cout, k, stride, padding, dilation, groups, bias)
    (2, 5, 11, 13, 7, 3, 1, 1, 1, 1, True),
    (1, 4, 9, 10, 6, 3, 2, 1, 1, 2, False),
    (3, 6, 13, 8, 6, 3, 1, 2, 2, 3, True),
    (2, 3, 7, 7, 5, 1, 1, 0, 1, 1, False),
    (2, 4, 10, 9, 8, (3, 1), (2, 1), (1, 0), (1, 1), 4, True),   # depthwise-like, pairs
    (1, 8, 15, 11, 4, 3, 2, 4, 4, 1, False),
    (2, 3, 5, 6, 2, 5, 1, 0, 1, 1, True),                         # kernel as big as input
]


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_float64(case):
    b_, cin, h, w_, cout, k, stride, padding, dilation, groups, has_bias = case
    g = torch.Generator().manual_seed(hash(str(case)) % 1000)
    kh, kw = (k, k) if isinstance(k, int) else k
    y = torch.randn(b_, cin, h, w_, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(cout, cin // groups, kh, kw, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(cout, generator=g, dtype=D, requires_grad=True) if has_bias else None
    args = (stride, padding, dilation, groups)
    gout = torch.randn(_ref(y, w, b, *args).shape, generator=g, dtype=D)
    out, grads = _grads(lambda *t: relu_conv2d(*t, *args), y, w, b, gout)
    ref, rgrads = _grads(lambda *t: _ref(*t, *args), y, w, b, gout)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(rgrads) == (3 if has_bias else 2)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_gradgradcheck():
    g = torch.Generator().manual_seed(0)
    # Values kept away from 0 so finite differences do not straddle the ReLU kink.
    y = torch.randn(1, 4, 4, 3, generator=g, dtype=D)
    y = (y + 0.2 * y.sign()).requires_grad_()
    w = torch.randn(2, 2, 3, 3, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=D, requires_grad=True)
    fn = lambda a, c, d: relu_conv2d(a, c, d, 2, 1, 1, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (y, w, b), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (y, w, b), eps=1e-6, atol=1e-7)
    fn2 = lambda a, c: relu_conv2d(a, c, None, 1, 0, 1, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn2, (y, torch.randn(3, 4, 1, 1, generator=g, dtype=D,
                                                         requires_grad=True)))


def test_exact_zeros_and_partial_requires_grad():
    """ReLU's gradient at 0 is 0 in torch; the fused op must agree. Also only some
    inputs requiring grad."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 3, 8, 8, generator=g, dtype=D)
    y[y.abs() < 0.5] = 0.0
    y[0, 0] = 0.0
    y[1, :, 2] = -0.0
    assert (y == 0).sum() > 30
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=D)
    gout = torch.randn(2, 4, 8, 8, generator=g, dtype=D)
    for need in ((True, True), (True, False), (False, True)):
        yy = y.clone().requires_grad_(need[0])
        ww = w.clone().requires_grad_(need[1])
        out = relu_conv2d(yy, ww, None, 1, 1, 1, 1)
        leaves = [t for t in (yy, ww) if t.requires_grad]
        got = torch.autograd.grad(out, leaves, gout)
        ref = torch.autograd.grad(_ref(yy, ww, None, 1, 1, 1, 1), leaves, gout)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
        if need[0]:
            assert (got[0][y == 0] == 0).all()
    # Nothing requires grad: plain values, no graph.
    out = relu_conv2d(y, w, None, 1, 1, 1, 1)
    assert out.grad_fn is None
    torch.testing.assert_close(out, _ref(y, w, None, 1, 1, 1, 1), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_noncontiguous_inputs(layout):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 6, 11, 9, generator=g, dtype=D)
    if layout == "channels_last":
        y = base.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        y = base.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        y = torch.randn(2, 12, 11, 18, generator=g, dtype=D)[:, ::2, :, ::2]
    y = y.detach().requires_grad_()
    w = torch.randn(5, 6, 3, 3, generator=g, dtype=D)[:, :, :, :].requires_grad_()
    b = torch.randn(5, generator=g, dtype=D, requires_grad=True)
    before = y.detach().clone()
    out = relu_conv2d(y, w, b, 1, 1, 1, 1)
    ref = _ref(y, w, b, 1, 1, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gout = torch.randn(out.shape, generator=g, dtype=D)
    got = torch.autograd.grad(out, (y, w, b), gout)
    exp = torch.autograd.grad(ref, (y, w, b), gout)
    for a, r in zip(got, exp):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert torch.equal(y.detach(), before)   # input untouched


def test_float32_matches_unfused():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 8, 17, 15, generator=g, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, generator=g, requires_grad=True)
    out = relu_conv2d(y, w, None, 2, 2, 2, 1)
    ref = _ref(y, w, None, 2, 2, 2, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gout = torch.randn(out.shape, generator=g)
    for a, r in zip(torch.autograd.grad(out, (y, w), gout), torch.autograd.grad(ref, (y, w), gout)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


def _saved(fn):
    """Tensors autograd saves during fn() (packed by saved_tensors_hooks)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_saves_only_y_and_weight():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 10, 10, generator=g, requires_grad=True)
    y = x * 1.5            # a non-leaf activation, as after a norm
    w = torch.randn(6, 4, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    out, saved = _saved(lambda: relu_conv2d(y, w, b, 1, 1, 1, 1))
    assert len(saved) == 2
    assert saved[0] is y or saved[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    assert saved[0].shape == y.shape and saved[0].stride() == y.stride()
    assert saved[1].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    # The unfused pair keeps relu(y): a new activation-sized storage.
    _, ref_saved = _saved(lambda: F.conv2d(F.relu(y), w, b, 1, 1))
    ptrs = {t.untyped_storage().data_ptr() for t in ref_saved}
    assert y.untyped_storage().data_ptr() not in ptrs
    assert any(t.shape == y.shape for t in ref_saved)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None


def test_modifying_y_in_place_is_caught():
    y = torch.randn(1, 2, 5, 5) * 1.0
    y.requires_grad_()
    z = y * 2
    out = relu_conv2d(z, torch.randn(3, 2, 3, 3, requires_grad=True), None, 1, 1, 1, 1)
    z.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(bias):
    g = torch.Generator().manual_seed(5)
    y = torch.randn(2, 4, 7, 9, generator=g, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.lipfast.relu_conv2d.default,
                          (y, w, b, [2, 1], [1, 1], [1, 2], 2))
    ycl = torch.randn(2, 4, 7, 9, generator=g).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.lipfast.relu_conv2d.default,
                          (ycl.requires_grad_(), w, b, [1, 1], [0, 0], [1, 1], 2))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 9, 9, generator=g, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)

    def fn(x, w, b):
        return relu_conv2d(x * 2.0, w, b, 1, 1, 1, 1).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = compiled(x, w, b)
    gg = torch.autograd.grad(got, (x, w, b))
    ref = fn(x, w, b)
    rg = torch.autograd.grad(ref, (x, w, b))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(gg, rg):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # Under autocast too (the wrapper's casts are traced).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(lambda x, w: relu_conv2d(x, w, None, 1, 1, 1, 1),
                            backend="aot_eager", fullgraph=True)(x, w)
    assert out.dtype == torch.bfloat16


def test_autocast_bf16_cpu_matches_unfused():
    g = torch.Generator().manual_seed(7)
    y = torch.randn(2, 8, 12, 12, generator=g, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relu_conv2d(y, w, b, 1, 1, 1, 1)
        ref = F.conv2d(F.relu(y), w, b, 1, 1)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    gout = torch.randn(out.shape, generator=g).bfloat16()
    got = torch.autograd.grad(out, (y, w, b), gout)
    exp = torch.autograd.grad(ref, (y, w, b), gout)
    for a, r in zip(got, exp):
        assert a.dtype == r.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=5e-2)
    # float64 is not cast by autocast, as for conv2d.
    yd = y.detach().double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert relu_conv2d(yd, w.detach().double(), None, 1, 1).dtype == torch.float64
    # The op itself computes in the dtypes it is given, autocast or not (its fake
    # kernel says so).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = torch.ops.lipfast.relu_conv2d(y, w, b, [1, 1], [1, 1], [1, 1], 1)
    assert direct.dtype == torch.float32


def test_bad_inputs():
    y = torch.randn(2, 4, 8, 8)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="B x C x H x W"):
        relu_conv2d(torch.randn(4, 8, 8), w)
    with pytest.raises(ValueError, match="weight"):
        relu_conv2d(y, torch.randn(6, 4, 3))
    with pytest.raises(TypeError, match="same dtype"):
        relu_conv2d(y.double(), w)
    with pytest.raises(TypeError, match="same dtype"):
        relu_conv2d(y, w, torch.randn(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        relu_conv2d(torch.ones(2, 4, 8, 8, dtype=torch.long), w.long())
    with pytest.raises(ValueError, match="channels"):
        relu_conv2d(torch.randn(2, 5, 8, 8), w)
    with pytest.raises(ValueError, match="channels"):
        relu_conv2d(y, w, groups=2)
    with pytest.raises(ValueError, match="divisible"):
        relu_conv2d(y, torch.randn(5, 2, 3, 3), groups=2)
    with pytest.raises(ValueError, match="bias"):
        relu_conv2d(y, w, torch.randn(5))
    with pytest.raises(ValueError, match="groups"):
        relu_conv2d(y, w, groups=0)
    with pytest.raises(ValueError, match="stride"):
        relu_conv2d(y, w, stride=0)
    with pytest.raises(ValueError, match="padding"):
        relu_conv2d(y, w, padding=-1)
    with pytest.raises(ValueError, match="padding"):
        relu_conv2d(y, w, padding="same")
    with pytest.raises(TypeError, match="dilation"):
        relu_conv2d(y, w, dilation=(1, 2, 3))
    with pytest.raises(TypeError, match="stride"):
        relu_conv2d(y, w, stride=1.5)
    with pytest.raises(TypeError, match="tensor"):
        relu_conv2d(y.numpy(), w)
    with pytest.raises(TypeError, match="bias"):
        relu_conv2d(y, w, [0.0] * 6)
    with pytest.raises(ValueError, match="is on"):
        relu_conv2d(y, w.to("meta"))
    # Output too small for the kernel: torch's own error (a RuntimeError) names it.
    with pytest.raises(RuntimeError, match="[Kk]ernel size"):
        relu_conv2d(torch.randn(1, 4, 2, 2), w)


def test_empty_batch():
    y = torch.randn(0, 4, 6, 6, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    out = relu_conv2d(y, w, None, 1, 1)
    assert out.shape == (0, 3, 6, 6)
    out.sum().backward()
    assert y.grad.shape == y.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_meta_device():
    # shapes only (models built on the meta device with the fusion on)
    y = torch.randn(2, 4, 9, 7, device="meta")
    w = torch.randn(6, 4, 3, 3, device="meta")
    out = relu_conv2d(y, w, None, 2, 1)
    assert out.device.type == "meta" and out.shape == (2, 6, 5, 4)
