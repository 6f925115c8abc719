"""lipfast.pose.heatmap_loss / generate_heatmaps / HeatmapLoss against the
float64 reference of tests/heatmap_reference.py (deep-high-resolution-net's
generate_target + JointsMSELoss, SPEC section 10): values and gradients on
random joints with the window's edge cases, sigma 2, 3 and non-integer values,
odd map sizes, non-square images, strided heatmaps, low precision; gradcheck,
opcheck, torch.compile, bad input; the PyTorch path (CUDA float64 / no Triton)
and the Triton kernels run on CPU tensors (TRITON_INTERPRET=1, conftest.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lipfast.ops.heatmap_loss as hl_mod
from lipfast.pose import HeatmapLoss, generate_heatmaps, heatmap_loss
from heatmap_reference import reference_heatmap_loss, reference_targets

# (image_size (W, H), heatmap_size (w, h))
GEOMS = {
    "256x256->64x64": ((256, 256), (64, 64)),
    "192x256->48x64": ((192, 256), (48, 64)),
    "odd-17x13": ((68, 52), (17, 13)),
    "odd-fractional-stride": ((50, 37), (17, 13)),
}
EXACT_STRIDE = ("256x256->64x64", "192x256->48x64", "odd-17x13")


def _axis_edges(size, stride, sigma):
    """Joint coordinates on one axis hitting the window's edges (integer sigma):
    ul = size (off the map), ul = size - 1 (one line drawn), br = 0 (weight kept,
    nothing drawn), br = -1 (off the map)."""
    t = 3 * sigma
    mus = [size + t, size - 1 + t, -(t + 1), -(t + 2)]
    # x / stride + 0.5 == mu exactly: mu * stride for mu >= 0, (mu - 0.5) * stride below
    return [mu * stride if mu >= 0 else (mu - 0.5) * stride for mu in mus]


def make_case(b, j, image_size, heatmap_size, sigma, seed=0, edges=True, dtype=torch.float64):
    """(heatmaps B x J x h x w, joints B x J x 2 float32, visible B x J float32)."""
    g = torch.Generator().manual_seed(seed)
    (iw, ih), (w, h) = image_size, heatmap_size
    sx, sy = iw / w, ih / h
    u = torch.rand(b, j, 2, generator=g, dtype=torch.float64)
    joints = torch.stack([u[..., 0] * 1.5 * iw - 0.25 * iw, u[..., 1] * 1.5 * ih - 0.25 * ih], -1)
    # a third on half-pixel ties (x / stride + 0.5 an integer), some slightly negative
    # (int() truncates toward zero there)
    tie = torch.rand(b, j, generator=g) < 0.3
    joints[tie] = torch.round(joints[tie] / torch.tensor([sx / 2, sy / 2], dtype=torch.float64)) \
        * torch.tensor([sx / 2, sy / 2], dtype=torch.float64)
    neg = torch.rand(b, j, generator=g) < 0.15
    joints[neg] = -torch.rand(int(neg.sum()), 2, generator=g, dtype=torch.float64) * 1.2 \
        * torch.tensor([sx, sy], dtype=torch.float64)
    if edges and float(sigma).is_integer() and j >= 8:
        ex = _axis_edges(w, sx, sigma)
        ey = _axis_edges(h, sy, sigma)
        for k in range(4):
            joints[0, k] = torch.tensor([ex[k], ih / 2], dtype=torch.float64)
            joints[0, 4 + k] = torch.tensor([iw / 3, ey[k]], dtype=torch.float64)
    visible = (torch.rand(b, j, generator=g) > 0.25).float()
    if edges and j >= 8:
        visible[0, :8] = 1.0
    if b > 1 and j >= 3:
        visible[1, :3] = torch.tensor([0.3, 0.7, 2.0])  # weight < 0.5 (not drawn), > 0.5, > 1
    joints = joints.to(torch.float32)
    heatmaps = (torch.rand(b, j, h, w, generator=g, dtype=torch.float64) * 1.2 - 0.1).to(dtype)
    return heatmaps, joints, visible


def _check_edges_present(joints, image_size, heatmap_size, sigma):
    """The crafted joints do hit ul = size and br = 0 (so the edge tests are live)."""
    (iw, _), (w, _) = image_size, heatmap_size
    t = 3 * sigma
    mus = [int(float(x) / (iw / w) + 0.5) for x in joints[0, :4, 0]]
    assert [int(mu - t) for mu in mus[:2]] == [w, w - 1]
    assert [int(mu + t + 1) for mu in mus[2:]] == [0, -1]


def check_loss(heatmaps, joints, visible, image_size, sigma, atol=1e-12, rtol=1e-10,
               gatol=None, grtol=None):
    """Loss and d loss / d heatmaps against the float64 reference on the same
    (rounded) values; inputs untouched."""
    h0, j0, v0 = heatmaps.clone(), joints.clone(), visible.clone()
    xa = heatmaps.detach().clone().requires_grad_()
    got = heatmap_loss(xa, joints, visible, image_size, sigma)
    acc = torch.float64 if heatmaps.dtype == torch.float64 else torch.float32
    assert got.dtype == acc and got.dim() == 0
    xr = heatmaps.detach().double().requires_grad_()
    ref = reference_heatmap_loss(xr, joints, visible, image_size, sigma)
    torch.testing.assert_close(got.double(), ref.detach(), atol=atol, rtol=rtol)
    ga, = torch.autograd.grad(got * 1.7, xa)
    gr, = torch.autograd.grad(ref * 1.7, xr)
    assert ga.dtype == heatmaps.dtype and ga.shape == heatmaps.shape
    s = max(float(gr.abs().max()), 1e-30)
    torch.testing.assert_close(ga.double() / s, gr / s, atol=gatol or atol * 10,
                               rtol=grtol or rtol)
    assert torch.equal(heatmaps, h0) and torch.equal(joints, j0) and torch.equal(visible, v0)
    return got, ref


# ---------------------------------------------------------------------------
# targets


@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("sigma", [2, 3, 1.5, 2.5])
def test_generate_heatmaps_matches_reference(geom, sigma):
    image_size, heatmap_size = GEOMS[geom]
    _, joints, visible = make_case(2, 16, image_size, heatmap_size, sigma, seed=int(2 * sigma))
    if geom in EXACT_STRIDE and float(sigma).is_integer():
        _check_edges_present(joints, image_size, heatmap_size, sigma)
    target, weight = generate_heatmaps(joints, visible, image_size, heatmap_size, sigma)
    w, h = heatmap_size
    assert target.shape == (2, 16, h, w) and target.dtype == torch.float32
    assert weight.shape == (2, 16) and weight.dtype == torch.float32
    rt, rw = reference_targets(joints, visible, image_size, heatmap_size, sigma)
    np.testing.assert_array_equal(weight.numpy(), rw.astype(np.float32))
    # float32 Gaussian (as the reference's numpy patch) vs float64: ~1 ulp
    np.testing.assert_allclose(target.numpy(), rt, rtol=2e-6, atol=1e-7)
    assert torch.equal(target == 0, torch.from_numpy(rt == 0))  # the same support
    assert float(target.max()) == 1.0  # some peak drawn exactly


def test_generate_heatmaps_edge_cases_by_hand():
    # 256x256 -> 64x64, sigma 2 (t = 6): one joint per rule, checked by hand
    img, hm = (256, 256), (64, 64)
    j = torch.tensor([[[32 * 4.0, 32 * 4.0],     # centre: full 13 x 13 patch
                       [(64 + 6) * 4.0, 100.0],  # ul_x = 64 = w: weight 0
                       [(63 + 6) * 4.0, 100.0],  # ul_x = 63: one column (x = 63)
                       [-7.5 * 4.0, 100.0],      # mu_x = -7, br_x = 0: weight 1, nothing drawn
                       [-8.5 * 4.0, 100.0],      # mu_x = -8, br_x = -1: weight 0
                       [-0.7 * 4.0, 100.0],      # -0.7 + 0.5 = -0.2 -> int() = 0 (not -1)
                       [10.0, 10.0]]])           # invisible
    v = torch.tensor([[1.0, 1, 1, 1, 1, 1, 0]])
    t, w = generate_heatmaps(j, v, img, hm, 2)
    assert w.tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]]
    assert t[0, 0, 32, 32] == 1.0 and int((t[0, 0] > 0).sum()) == 169
    assert int((t[0, 1] != 0).sum()) == 0
    cols = (t[0, 2] != 0).any(0).nonzero().flatten().tolist()
    assert cols == [63]
    assert int((t[0, 3] != 0).sum()) == 0
    assert int((t[0, 4] != 0).sum()) == 0
    assert t[0, 5, 25, 0] == 1.0  # centred at mu = 0, y = 100 / 4 + 0.5 -> 25
    assert int((t[0, 6] != 0).sum()) == 0
    rt, rw = reference_targets(j, v, img, hm, 2)
    np.testing.assert_allclose(t.numpy(), rt, rtol=2e-6, atol=1e-7)


def test_non_integer_sigma_slicing():
    # sigma 2.5: tmp 7.5, patch of 16 entries centred at index 8; for ul < 0 the
    # reference's truncation puts the peak off mu (followed exactly)
    img, hm = (64, 64), (64, 64)
    j = torch.tensor([[[20.0, 20.0], [0.0, 20.0], [3.0, 40.0]]])
    v = torch.ones(1, 3)
    t, _ = generate_heatmaps(j, v, img, hm, 2.5)
    # mu 20: ul = int(12.5) = 12, peak at 12 + 8 = 20
    assert t[0, 0, 20, 20] == 1.0
    # mu 0: ul = int(-7.5) = -7, peak at -7 + 8 = 1, not 0
    assert t[0, 1, 20, 1] == 1.0 and t[0, 1, 20, 0] < 1.0
    rt, _ = reference_targets(j, v, img, hm, 2.5)
    np.testing.assert_allclose(t.numpy(), rt, rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# loss: values and gradients


@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("sigma", [2, 3, 2.5])
def test_loss_matches_reference(geom, sigma):
    image_size, heatmap_size = GEOMS[geom]
    x, joints, visible = make_case(2, 16, image_size, heatmap_size, sigma, seed=7)
    check_loss(x, joints, visible, image_size, sigma)


def test_loss_near_target_and_weights():
    # predictions close to the targets (the trained regime), fractional weights
    img, hm = (192, 256), (48, 64)
    _, joints, visible = make_case(3, 9, img, hm, 2, seed=3)
    target, _ = generate_heatmaps(joints, visible, img, hm, 2)
    x = target.double() + 0.01 * torch.randn(target.shape, dtype=torch.float64,
                                             generator=torch.Generator().manual_seed(1))
    got, ref = check_loss(x, joints, visible, img, 2)
    assert float(ref.detach()) < 1e-3  # really the near-target regime
    # float32 there too (no cancellation: the difference is summed, not p^2 - 2pg + g^2)
    check_loss(x.float(), joints, visible, img, 2, atol=1e-10, rtol=2e-6, gatol=2e-6,
               grtol=2e-6)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded"])
def test_non_contiguous_heatmaps(layout):
    img, hm = (68, 52), (17, 13)
    x, joints, visible = make_case(2, 9, img, hm, 2, seed=11)
    if layout == "transposed":
        xs = x.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        xs = torch.stack([x, -x], 1).flatten(1, 2)[:, ::2]
    elif layout == "channels_last":
        xs = x.contiguous(memory_format=torch.channels_last)
    else:
        xs = x[:1].expand(2, -1, -1, -1)
    assert not xs.is_contiguous()
    check_loss(xs, joints, visible, img, 2)


def test_joints_visible_dtypes_and_strides():
    img, hm = (68, 52), (17, 13)
    x, joints, visible = make_case(2, 9, img, hm, 2, seed=5)
    ref = heatmap_loss(x, joints, visible, img, 2)
    vb = visible > 0.5
    vf = vb.double()
    for jj, vv in [(joints.double(), vb), (joints, vb.long()), (joints.half().float(), vf),
                   (torch.stack([joints, joints], -1)[..., 0], vf.t().contiguous().t())]:
        got = heatmap_loss(x, jj, vv, img, 2)
        r = reference_heatmap_loss(x, jj, vv, img, 2)
        torch.testing.assert_close(got, r.detach(), atol=1e-12, rtol=1e-10)
    # integer pixel joints
    ji = joints.round().long()
    torch.testing.assert_close(heatmap_loss(x, ji, visible, img, 2),
                               reference_heatmap_loss(x, ji, visible, img, 2).detach())
    # image_size as a tensor / numpy ints
    torch.testing.assert_close(heatmap_loss(x, joints, visible, torch.tensor(img), 2), ref)
    torch.testing.assert_close(heatmap_loss(x, joints, visible, np.array(img), 2), ref)


def test_float32_and_low_precision():
    img, hm = (192, 256), (48, 64)
    x, joints, visible = make_case(2, 16, img, hm, 3, seed=2, dtype=torch.float32)
    check_loss(x, joints, visible, img, 3, atol=1e-9, rtol=2e-6, gatol=1e-6, grtol=1e-5)
    for dt in (torch.bfloat16, torch.float16):
        xl = x.to(dt)
        # loss in float32 of the rounded values; gradient rounded to 8/11 mantissa bits
        check_loss(xl, joints, visible, img, 3, atol=1e-8, rtol=1e-5, gatol=1e-2, grtol=1e-2)


def test_all_invisible_and_all_off_map():
    img, hm = (68, 52), (17, 13)
    x, joints, _ = make_case(2, 5, img, hm, 2, seed=4)
    zero = torch.zeros(2, 5)
    # every weight 0: loss 0, zero gradient (zero-weight joints count in 1/J only)
    check_loss(x, joints, zero, img, 2)
    xa = x.clone().requires_grad_()
    loss = heatmap_loss(xa, joints, zero, img, 2)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(xa.grad) == 0
    far = torch.full((2, 5, 2), 1e6)
    check_loss(x, far, torch.ones(2, 5), img, 2)
    _, w = generate_heatmaps(far, torch.ones(2, 5), img, hm, 2)
    assert torch.count_nonzero(w) == 0


def test_non_finite_joints():
    img, hm = (68, 52), (17, 13)
    x, joints, visible = make_case(1, 6, img, hm, 2, seed=9, edges=False)
    visible[0, :] = 1
    visible[0, 2] = 0
    bad = joints.clone()
    bad[0, 2] = float("nan")  # invisible: ignored (the reference would need any number)
    bad[0, 3, 1] = float("inf")
    bad[0, 3] = joints[0, 3]
    fine = joints.clone()
    fine[0, 2] = 0.0
    torch.testing.assert_close(heatmap_loss(x, bad, visible, img, 2),
                               reference_heatmap_loss(x, fine, visible, img, 2).detach())
    t, w = generate_heatmaps(bad, visible, img, hm, 2)
    assert w[0, 2] == 0 and torch.count_nonzero(t[0, 2]) == 0
    for v in (float("nan"), float("inf"), -float("inf")):
        b2 = joints.clone()
        b2[0, 4, 0] = v
        with pytest.raises(ValueError, match="joint 4 of image 0 has non-finite"):
            heatmap_loss(x, b2, visible, img, 2)
        with pytest.raises(ValueError, match="non-finite"):
            generate_heatmaps(b2, visible, img, hm, 2)
        with pytest.raises(ValueError, match="joint 4 of image 0 has non-finite"):
            hl_mod._torch_forward(x, b2, visible, img, 2.0)


def test_module():
    img, hm = (68, 52), (17, 13)
    x, joints, visible = make_case(2, 9, img, hm, 3, seed=6)
    m = HeatmapLoss(sigma=3)
    assert "sigma=3" in repr(m)
    torch.testing.assert_close(m(x, joints, visible, img),
                               reference_heatmap_loss(x, joints, visible, img, 3).detach())
    torch.testing.assert_close(HeatmapLoss()(x, joints, visible, img),
                               reference_heatmap_loss(x, joints, visible, img, 2).detach())
    with pytest.raises(ValueError, match="sigma"):
        HeatmapLoss(sigma=0)


def test_gradcheck():
    img, hm = (24, 28), (6, 7)
    x, joints, visible = make_case(2, 3, img, hm, 1, seed=8, edges=False)
    visible[0, 1] = 0.7
    xa = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: heatmap_loss(t, joints, visible, img, 1), (xa,))
    assert torch.autograd.gradcheck(lambda t: heatmap_loss(t, joints, visible, img, 1.5), (xa,))


def test_cpu_kernel_deterministic_and_thread_independent():
    img, hm = (192, 256), (48, 64)
    x, joints, visible = make_case(4, 16, img, hm, 2, seed=12, dtype=torch.float32)
    l1, w1, win1 = torch.ops.lipfast.heatmap_loss(x, joints, visible, list(img), 2.0)
    g = torch.tensor(1.3)
    d1 = torch.ops.lipfast.heatmap_loss_backward(g, x, w1, win1, 2.0)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        l2, _, _ = torch.ops.lipfast.heatmap_loss(x, joints, visible, list(img), 2.0)
        d2 = torch.ops.lipfast.heatmap_loss_backward(g, x, w1, win1, 2.0)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(l1, l2) and torch.equal(d1, d2)


def test_table_matches_torch_rule():
    # the C++ kernel's per-joint table equals the vectorised float64 rule (which the
    # PyTorch and Triton paths use / mirror)
    for geom, sigma in [("odd-fractional-stride", 2.5), ("192x256->48x64", 3),
                        ("odd-17x13", 2), ("256x256->64x64", 0.4)]:
        image_size, (w, h) = GEOMS[geom]
        x, joints, visible = make_case(2, 16, image_size, (w, h), sigma, seed=1)
        _, wt, win = torch.ops.lipfast.heatmap_loss(x, joints, visible, list(image_size),
                                                    float(sigma))
        rw, rwin, bad = hl_mod.joint_table(joints, visible, image_size, (w, h), float(sigma))
        assert torch.equal(wt, rw) and torch.equal(win, rwin) and not bad.any()


def test_torch_path():
    # the PyTorch path (CUDA float64 / no Triton) run on CPU tensors
    for geom, sigma, dt in [("odd-17x13", 2, torch.float64), ("192x256->48x64", 3, torch.float64),
                            ("odd-fractional-stride", 2.5, torch.float32)]:
        image_size, hm = GEOMS[geom]
        x, joints, visible = make_case(2, 16, image_size, hm, sigma, seed=3, dtype=dt)
        xs = x.transpose(2, 3).contiguous().transpose(2, 3)
        loss, wt, win = hl_mod._torch_forward(xs, joints, visible, image_size, float(sigma))
        cl, cw, cwin = torch.ops.lipfast.heatmap_loss(x, joints, visible, list(image_size),
                                                      float(sigma))
        tol = dict(atol=1e-12, rtol=1e-10) if dt == torch.float64 else dict(atol=1e-8,
                                                                             rtol=2e-6)
        torch.testing.assert_close(loss, cl, **tol)
        assert torch.equal(wt, cw) and torch.equal(win, cwin)
        xr = x.double().requires_grad_()
        ref = reference_heatmap_loss(xr, joints, visible, image_size, sigma)
        torch.testing.assert_close(loss.double(), ref.detach(), **tol)
        gr, = torch.autograd.grad(ref, xr, torch.tensor(0.8, dtype=torch.float64))
        got = hl_mod._torch_backward(torch.tensor(0.8, dtype=loss.dtype), xs, wt, win,
                                     float(sigma))
        assert got.dtype == dt and got.is_contiguous()
        s = float(gr.abs().max())
        torch.testing.assert_close(got.double() / s, gr / s, **tol)
        t, tw = hl_mod._torch_targets(joints, visible, image_size, hm, float(sigma))
        ct, ctw = generate_heatmaps(joints, visible, image_size, hm, sigma)
        torch.testing.assert_close(t, ct, atol=1e-7, rtol=2e-6)
        assert torch.equal(tw, ctw)


def test_opcheck():
    img, hm = (24, 28), (6, 7)
    x, joints, visible = make_case(2, 3, img, hm, 1, seed=8, edges=False)
    for xx, vv in [(x, visible), (x.float(), visible > 0.5)]:
        torch.library.opcheck(torch.ops.lipfast.heatmap_loss.default,
                              (xx.clone().requires_grad_(), joints, vv, list(img), 1.0))
    _, wt, win = torch.ops.lipfast.heatmap_loss(x, joints, visible, list(img), 1.0)
    torch.library.opcheck(torch.ops.lipfast.heatmap_loss_backward.default,
                          (torch.tensor(0.5, dtype=torch.float64), x, wt, win, 1.0))
    torch.library.opcheck(torch.ops.lipfast.heatmap_loss_targets.default,
                          (joints, visible, list(img), list(hm), 1.0))


def test_torch_compile():
    img, hm = (192, 256), (48, 64)
    x, joints, visible = make_case(2, 16, img, hm, 2, seed=13)

    def f(t, jt, vis):
        return heatmap_loss(t, jt, vis, img, 2.0) + 0.5 * heatmap_loss(t * 2, jt, vis, img, 3.0)

    xa = x.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xa, joints, visible)
    got.backward()
    xr = x.clone().requires_grad_()
    ref = (reference_heatmap_loss(xr, joints, visible, img, 2)
           + 0.5 * reference_heatmap_loss(xr * 2, joints, visible, img, 3))
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(xa.grad, xr.grad)

    def g(jt, vis):
        return generate_heatmaps(jt, vis, img, hm, 2.0)

    t, w = torch.compile(g, fullgraph=True, backend="aot_eager")(joints, visible)
    t0, w0 = generate_heatmaps(joints, visible, img, hm, 2.0)
    assert torch.equal(t, t0) and torch.equal(w, w0)


def test_double_backward_raises():
    img, hm = (24, 28), (6, 7)
    x, joints, visible = make_case(2, 3, img, hm, 1, seed=8, edges=False)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(heatmap_loss(xr, joints, visible, img, 1), xr, create_graph=True)
    xs = x.clone().requires_grad_()
    (gs,) = torch.autograd.grad(reference_heatmap_loss(xs, joints, visible, img, 1), xs)
    torch.testing.assert_close(g.detach(), gs)
    with pytest.raises(NotImplementedError, match="heatmap_loss_backward"):
        torch.autograd.grad(g.square().sum(), xr)


def test_bad_input():
    img, hm = (24, 28), (6, 7)
    x, joints, visible = make_case(2, 3, img, hm, 2, seed=8, edges=False)
    with pytest.raises(ValueError, match="heatmaps must be B x J x h x w"):
        heatmap_loss(x[0], joints, visible, img)
    with pytest.raises(ValueError, match="disagree on B x J"):
        heatmap_loss(x[:, :2], joints, visible, img)  # J mismatch
    with pytest.raises(ValueError, match="disagree on B x J"):
        heatmap_loss(x[:1], joints, visible, img)  # B mismatch
    with pytest.raises(ValueError, match="disagree on B x J"):
        heatmap_loss(x, joints, visible[:, :2], img)
    with pytest.raises(ValueError, match="joints must be B x J x 2"):
        heatmap_loss(x, joints[..., :1], visible, img)
    with pytest.raises(ValueError, match="joints must be B x J x 2"):
        heatmap_loss(x, torch.cat([joints, joints[..., :1]], -1), visible, img)
    with pytest.raises(ValueError, match="visible must be B x J"):
        heatmap_loss(x, joints, visible[..., None], img)
    with pytest.raises(TypeError, match="heatmaps must be floating point"):
        heatmap_loss(x.long(), joints, visible, img)
    with pytest.raises(TypeError, match="joints must be a real"):
        heatmap_loss(x, joints > 0, visible, img)
    with pytest.raises(ValueError, match="empty heatmaps"):
        heatmap_loss(x[..., :0], joints, visible, img)
    with pytest.raises(ValueError, match="no joints"):
        heatmap_loss(x[:, :0], joints[:, :0], visible[:, :0], img)
    for s in (0, -1.0, float("nan"), float("inf"), 1e-9):
        with pytest.raises(ValueError, match="sigma must be a finite number"):
            heatmap_loss(x, joints, visible, img, s)
    for s in ("2", None, True, torch.tensor(2.0)):
        with pytest.raises(TypeError, match="sigma must be a real number"):
            heatmap_loss(x, joints, visible, img, s)
    for size in [(24,), (24, 28, 3), (0, 28), (24, -1)]:
        with pytest.raises(ValueError, match="image_size must be 2 positive ints"):
            heatmap_loss(x, joints, visible, size)
    for size in [24, (24.0, 28), (True, 28), "ab", None]:
        with pytest.raises(TypeError, match="image_size must be 2 positive ints"):
            heatmap_loss(x, joints, visible, size)
    with pytest.raises(ValueError, match="heatmap_size must be 2 positive ints"):
        generate_heatmaps(joints, visible, img, (6, 0))
    with pytest.raises(TypeError, match="joints and visible must be tensors"):
        generate_heatmaps(joints.tolist(), visible, img, hm)
    with pytest.raises(ValueError, match="disagree on B x J"):
        generate_heatmaps(joints, visible[:1], img, hm)
    # the C++ ops check too (direct calls)
    with pytest.raises(ValueError, match="sigma must be a finite number"):
        torch.ops.lipfast.heatmap_loss(x, joints, visible, list(img), -2.0)
    with pytest.raises(ValueError, match="image_size must be 2 positive ints"):
        torch.ops.lipfast.heatmap_loss(x, joints, visible, [24, 0], 2.0)
    with pytest.raises(ValueError, match="disagree on B x J"):
        torch.ops.lipfast.heatmap_loss(x[:, :2], joints, visible, list(img), 2.0)
    with pytest.raises(TypeError, match="floating point"):
        torch.ops.lipfast.heatmap_loss(x.int(), joints, visible, list(img), 2.0)
    _, wt, win = torch.ops.lipfast.heatmap_loss(x, joints, visible, list(img), 2.0)
    bad_win = win.clone()
    bad_win[0, 0, 1] = 99  # x_hi beyond the map: refused, never read out of bounds
    with pytest.raises(ValueError, match="window row 0 is not inside"):
        torch.ops.lipfast.heatmap_loss_backward(torch.tensor(1.0), x, wt, bad_win, 2.0)
    with pytest.raises(ValueError, match="window must be B x J x 6"):
        torch.ops.lipfast.heatmap_loss_backward(torch.tensor(1.0), x, wt, win[..., :5], 2.0)
    with pytest.raises(ValueError, match="weight must be B x J"):
        torch.ops.lipfast.heatmap_loss_backward(torch.tensor(1.0), x, wt.double(), win, 2.0)


# ---------------------------------------------------------------------------
# Triton kernels, called directly (CPU tensors under the interpreter, or CUDA)


def _kernel_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", [("odd-17x13", 2, torch.float64, 64),
                                  ("192x256->48x64", 3, torch.float32, None),
                                  ("odd-fractional-stride", 2.5, torch.float64, 128)])
def test_triton_kernels(case):
    kernels = pytest.importorskip("lipfast.kernels.heatmap_loss")
    geom, sigma, dt, block = case
    image_size, hm = GEOMS[geom]
    dev = _kernel_device()
    x, joints, visible = make_case(2, 16, image_size, hm, sigma, seed=21, dtype=dt)
    xs = x.to(dev).transpose(2, 3).contiguous().transpose(2, 3)  # strided read
    jd = joints.to(dev)
    vd = (visible > 0.5).to(dev) if dt == torch.float32 else visible.to(dev)
    loss, wt, win, bad = kernels.forward(xs, jd, vd, image_size, float(sigma), block=block)
    assert int(bad.item()) == 0
    cl, cw, cwin = torch.ops.lipfast.heatmap_loss(x, joints, vd.cpu(), list(image_size),
                                                  float(sigma))
    assert torch.equal(wt.cpu(), cw) and torch.equal(win.cpu(), cwin)
    tol = dict(atol=1e-12, rtol=1e-10) if dt == torch.float64 else dict(atol=1e-8, rtol=2e-6)
    xr = x.double().requires_grad_()
    ref = reference_heatmap_loss(xr, joints, vd.cpu(), image_size, sigma)
    assert loss.dtype == dt and loss.dim() == 0
    torch.testing.assert_close(loss.cpu().double(), ref.detach(), **tol)
    gr, = torch.autograd.grad(ref, xr, torch.tensor(1.5, dtype=torch.float64))
    dx = kernels.backward(torch.tensor(1.5, dtype=dt, device=dev), xs, wt, win, float(sigma),
                          block=block)
    assert dx.dtype == dt and dx.is_contiguous() and dx.shape == x.shape
    s = float(gr.abs().max())
    gtol = tol if dt == torch.float64 else dict(atol=2e-7, rtol=1e-5)  # one float32 rounding
    torch.testing.assert_close(dx.cpu().double() / s, gr / s, **gtol)
    # deterministic
    assert torch.equal(kernels.backward(torch.tensor(1.5, dtype=dt, device=dev), xs, wt, win,
                                        float(sigma), block=block), dx)


def test_triton_edges_low_precision_and_bad_joint():
    kernels = pytest.importorskip("lipfast.kernels.heatmap_loss")
    dev = _kernel_device()
    image_size, hm = GEOMS["256x256->64x64"]
    x, joints, visible = make_case(1, 8, image_size, hm, 2, seed=22, dtype=torch.float32)
    _check_edges_present(joints, image_size, hm, 2)
    xb = x.to(dev, torch.bfloat16)
    loss, wt, win, bad = kernels.forward(xb, joints.to(dev), visible.to(dev), image_size, 2.0)
    cl, cw, cwin = torch.ops.lipfast.heatmap_loss(xb.cpu(), joints, visible, list(image_size),
                                                  2.0)
    assert torch.equal(wt.cpu(), cw) and torch.equal(win.cpu(), cwin)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.cpu(), cl, atol=1e-8, rtol=2e-6)
    dx = kernels.backward(torch.tensor(1.0, device=dev), xb, wt, win, 2.0)
    ref_dx = torch.ops.lipfast.heatmap_loss_backward(torch.tensor(1.0), xb.cpu(), cw, cwin, 2.0)
    assert dx.dtype == torch.bfloat16
    torch.testing.assert_close(dx.cpu().float(), ref_dx.float(), atol=1e-6, rtol=1e-2)
    b2 = joints.clone().to(dev)
    b2[0, 5, 1] = float("nan")
    _, _, _, bad = kernels.forward(x.to(dev), b2, visible.to(dev), image_size, 2.0)
    assert int(bad.item()) == 1
    if dev == "cpu":
        # the op's Triton path: the flag goes to torch._assert_async (raises at once here)
        with pytest.raises(RuntimeError, match="non-finite coordinates"):
            hl_mod._triton_forward(kernels, x, b2, visible, image_size, 2.0)
        visible2 = visible.clone()
        visible2[0, 5] = 0  # invisible: ignored
        loss, wt, _ = hl_mod._triton_forward(kernels, x, b2, visible2, image_size, 2.0)
        assert wt[0, 5] == 0


# ---------------------------------------------------------------------------
# CUDA: the registered ops against the float64 CPU reference


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_matches_reference(dtype):
    for geom, sigma in [("256x256->64x64", 2), ("192x256->48x64", 3), ("odd-17x13", 2),
                        ("odd-fractional-stride", 2.5)]:
        image_size, hm = GEOMS[geom]
        x, joints, visible = make_case(4, 16, image_size, hm, sigma, seed=31)
        xc = x.to("cuda", dtype)
        tol = {torch.float64: (1e-12, 1e-10, None, None),
               torch.float32: (1e-9, 2e-6, 1e-6, 1e-5)}.get(dtype, (1e-8, 1e-5, 1e-2, 1e-2))
        check_loss(xc, joints.cuda(), visible.cuda(), image_size, sigma, atol=tol[0],
                   rtol=tol[1], gatol=tol[2], grtol=tol[3])
        xt = xc.transpose(2, 3).contiguous().transpose(2, 3)
        check_loss(xt, joints.cuda(), (visible > 0.5).cuda(), image_size, sigma, atol=tol[0],
                   rtol=tol[1], gatol=tol[2], grtol=tol[3])
        t, w = generate_heatmaps(joints.cuda(), visible.cuda(), image_size, hm, sigma)
        ct, cw = generate_heatmaps(joints, visible, image_size, hm, sigma)
        torch.testing.assert_close(t.cpu(), ct, atol=1e-7, rtol=2e-6)
        assert torch.equal(w.cpu(), cw)


@pytest.mark.cuda
def test_cuda_no_host_sync_and_compile():
    image_size, hm = GEOMS["256x256->64x64"]
    x, joints, visible = make_case(32, 16, image_size, hm, 2, seed=32, dtype=torch.float32)
    x, joints, visible = x.cuda(), joints.cuda(), visible.cuda()

    def step():
        xa = x.clone().requires_grad_()
        loss = heatmap_loss(xa, joints, visible, image_size)
        loss.backward()
        return loss, xa.grad

    from cuda_checks import twice_without_sync

    (ref_loss, ref_grad), (loss, grad) = twice_without_sync(step)
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(grad, ref_grad)
    f = torch.compile(lambda t: heatmap_loss(t, joints, visible, image_size), fullgraph=True)
    xa = x.clone().requires_grad_()
    out = f(xa)
    out.backward()
    torch.testing.assert_close(out, ref_loss)
    torch.testing.assert_close(xa.grad, ref_grad)
    torch.library.opcheck(torch.ops.lipfast.heatmap_loss.default,
                          (x[:2, :3].clone().requires_grad_(), joints[:2, :3], visible[:2, :3],
                           list(image_size), 2.0))


@pytest.mark.cuda
def test_cuda_bad_joint_in_child_process():
    from cuda_checks import assert_device_assert

    code = (
        "import torch, lipfast\n"
        "from lipfast.pose import heatmap_loss\n"
        "x = torch.rand(2, 16, 64, 64, device='cuda')\n"
        "j = torch.rand(2, 16, 2, device='cuda') * 256\n"
        "v = torch.ones(2, 16, device='cuda')\n"
        "heatmap_loss(x, j, v, (256, 256))\n"
        "torch.cuda.synchronize()\n"
        "j[1, 3, 0] = float('nan')\n"
        "torch.cuda.set_sync_debug_mode('error')\n"
        "loss = heatmap_loss(x, j, v, (256, 256))\n"
        "torch.cuda.set_sync_debug_mode(0)\n"
        "print('launched', flush=True)\n"
        "loss.item()\n"
    )
    assert_device_assert(code)


def test_math_of_scale():
    # 1/J counts zero-weight joints: one visible joint of J=4 gives a quarter of
    # the single-joint loss
    img, hm = (24, 28), (6, 7)
    x, joints, _ = make_case(1, 4, img, hm, 1, seed=3, edges=False)
    joints[0, 0] = torch.tensor([12.0, 14.0])
    v = torch.tensor([[1.0, 0, 0, 0]])
    l4 = heatmap_loss(x, joints, v, img, 1)
    l1 = heatmap_loss(x[:, :1], joints[:, :1], v[:, :1], img, 1)
    torch.testing.assert_close(l4 * 4, l1)
    t, _ = generate_heatmaps(joints[:, :1], v[:, :1], img, hm, 1)
    torch.testing.assert_close(l1, 0.5 * ((x[:, :1] - t.double()) ** 2).mean(), rtol=1e-7,
                               atol=1e-12)
    assert math.isfinite(float(l4))


def test_saves_no_target_for_backward():
    # backward keeps the heatmaps (the input itself) and the B x J table only
    img, hm = (192, 256), (48, 64)
    x, joints, visible = make_case(2, 16, img, hm, 2, seed=14, dtype=torch.float32)
    xa = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = heatmap_loss(xa, joints, visible, img, 2)
    big = [t for t in saved if t.numel() > 2 * 16 * 6]
    assert len(saved) == 3 and len(big) == 1
    assert big[0].untyped_storage().data_ptr() == xa.untyped_storage().data_ptr()
    loss.backward()
    assert xa.grad.shape == x.shape
