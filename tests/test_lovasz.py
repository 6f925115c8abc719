"""Tests of lipfast.losses.lovasz (Lovász-Softmax, SPEC section 3) against a
step-by-step reference written here from the SPEC, as Berman's code does it
(Python loop over classes, boolean masking of ignored pixels, one torch.sort per
class, Jaccard differences by subtraction)."""

from __future__ import annotations

import pytest
import torch

from lipfast.losses.lovasz import LovaszSoftmax, lovasz_softmax
from cuda_checks import assert_device_assert, twice_without_sync


# --------------------------------------------------------------------------- reference
def _ref_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    p = len(gt_sorted)
    gts = gt_sorted.sum()
    inter = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jac = 1.0 - inter / union
    if p > 1:
        jac[1:p] = jac[1:p] - jac[0:-1]
    return jac


def _ref_flat(probas, labels, classes):
    """probas: N x C, labels: N (ignored pixels already dropped)."""
    if probas.numel() == 0:
        return probas.sum() * 0.0
    c_total = probas.shape[1]
    losses = []
    to_sum = list(range(c_total)) if classes in ("all", "present") else classes
    for c in to_sum:
        fg = (labels == c).to(probas.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probas[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        losses.append(torch.dot(errors_sorted, _ref_grad(fg[perm]).detach()))
    if not losses:
        return probas.sum() * 0.0
    return torch.stack(losses).mean()


def _ref_flatten(probas, labels, ignore):
    c = probas.shape[1]
    probas = probas.permute(0, 2, 3, 1).reshape(-1, c)
    labels = labels.reshape(-1).long()
    valid = labels != ignore
    return probas[valid], labels[valid]


def ref_lovasz(x, labels, classes="present", per_image=False, ignore_index=255, from_logits=True):
    p = torch.softmax(x, 1) if from_logits else x
    if per_image:
        losses = [_ref_flat(*_ref_flatten(p[i : i + 1], labels[i : i + 1], ignore_index), classes)
                  for i in range(x.shape[0])]
        return torch.stack(losses).mean()
    return _ref_flat(*_ref_flatten(p, labels, ignore_index), classes)


# --------------------------------------------------------------------------- helpers
def _data(b, c, h, w, ignore_frac=0.2, seed=0, dtype=torch.float64, label_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b, h, w), generator=g)
    y[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    return x.to(dtype), y.to(label_dtype)


def _compare(x, y, atol=1e-10, **kw):
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    la = lovasz_softmax(xa, y, **kw)
    lb = ref_lovasz(xb, y, **kw)
    assert la.dtype == x.dtype and la.shape == ()
    torch.testing.assert_close(la, lb, atol=atol, rtol=0)
    gout = torch.tensor(1.7, dtype=x.dtype)
    (ga,) = torch.autograd.grad(la, xa, gout)
    (gb,) = torch.autograd.grad(lb, xb, gout)
    torch.testing.assert_close(ga, gb, atol=atol, rtol=0)
    return la, ga


CLASSES = ["present", "all", [0, 2], [3, 1, 1]]


# --------------------------------------------------------------------------- values + grads
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", CLASSES, ids=str)
@pytest.mark.parametrize("from_logits", [True, False])
def test_matches_reference(per_image, classes, from_logits):
    x, y = _data(2, 5, 7, 9, seed=1)  # odd, non-square
    if not from_logits:
        x = torch.softmax(x, 1)
    _compare(x, y, classes=classes, per_image=per_image, from_logits=from_logits)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 4, 5, 3), (3, 2, 4, 6), (2, 20, 11, 13)])
@pytest.mark.parametrize("per_image", [False, True])
def test_shapes(shape, per_image):
    x, y = _data(*shape, seed=2)
    _compare(x, y, per_image=per_image)
    _compare(x, y, per_image=per_image, classes="all")


def test_absent_class_and_upper_index():
    x, y = _data(2, 6, 8, 5, ignore_frac=0.1, seed=3)
    y[y == 2] = 5  # class 2 absent, upper index 5 present
    y[0, 0, 0] = 5
    for classes in ("present", "all", [2], [2, 5]):
        for per_image in (False, True):
            _compare(x, y, classes=classes, per_image=per_image)


def test_all_ignored():
    x, y = _data(2, 4, 5, 6, seed=4)
    y.fill_(255)
    for classes in ("present", "all", [1, 3]):
        for per_image in (False, True):
            xr = x.clone().requires_grad_(True)
            loss = lovasz_softmax(xr, y, classes=classes, per_image=per_image)
            assert loss.item() == 0.0 and loss.requires_grad
            loss.backward()
            assert torch.isfinite(xr.grad).all() and (xr.grad == 0).all()


def test_one_image_fully_ignored_per_image():
    x, y = _data(3, 4, 5, 6, seed=5)
    y[1] = 255
    for classes in CLASSES[:3]:
        _compare(x, y, classes=classes, per_image=True)
        _compare(x, y, classes=classes, per_image=False)


def test_one_valid_pixel():
    x, y = _data(2, 4, 5, 6, seed=6)
    y.fill_(255)
    y[1, 3, 2] = 3
    for classes in CLASSES:
        for per_image in (False, True):
            _compare(x, y, classes=classes, per_image=per_image)


def test_single_image_uint8_labels_and_no_ignore():
    x, y = _data(1, 5, 9, 4, ignore_frac=0.0, seed=7)
    l64, g64 = _compare(x, y)
    l8, g8 = _compare(x, y.to(torch.uint8))
    torch.testing.assert_close(l8, l64, atol=0, rtol=0)
    torch.testing.assert_close(g8, g64, atol=0, rtol=0)
    x2, y2 = _data(2, 5, 6, 6, seed=8, label_dtype=torch.uint8)
    _compare(x2, y2, per_image=True)


def test_ignore_index_inside_class_range():
    x, y = _data(2, 4, 5, 6, ignore_frac=0.0, seed=9)
    _compare(x, y, ignore_index=0)
    _compare(x, y, ignore_index=0, classes="all", per_image=True)


def test_empty_class_list():
    x, y = _data(2, 4, 5, 6, seed=10)
    xr = x.clone().requires_grad_(True)
    loss = lovasz_softmax(xr, y, classes=[])
    assert loss.item() == 0.0
    loss.backward()
    assert (xr.grad == 0).all()


def test_float32_and_half():
    x, y = _data(2, 5, 16, 12, seed=11)
    _, g_ref = _compare(x, y)
    x32 = x.float().requires_grad_(True)
    l32 = lovasz_softmax(x32, y)
    l32.backward()
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), ref_lovasz(x, y), atol=1e-5, rtol=0)
    torch.testing.assert_close(x32.grad.double(), g_ref / 1.7, atol=1e-6, rtol=0)
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt).requires_grad_(True)
        lh = lovasz_softmax(xh, y)
        lh.backward()
        assert lh.dtype == dt and xh.grad.dtype == dt
        torch.testing.assert_close(lh.double(), ref_lovasz(x.to(dt).double(), y), atol=1e-2,
                                   rtol=0)
        assert torch.isfinite(xh.grad).all()


def test_float32_large_set_precise():
    # many pixels: the closed-form Jaccard differences keep float32 close to float64
    x, y = _data(1, 3, 128, 160, seed=12)
    l64 = lovasz_softmax(x, y)
    xr = x.float().requires_grad_(True)
    l32 = lovasz_softmax(xr, y)
    l32.backward()
    x64 = x.clone().requires_grad_(True)
    lovasz_softmax(x64, y).backward()
    torch.testing.assert_close(l32.double(), l64, atol=1e-6, rtol=0)
    torch.testing.assert_close(xr.grad.double(), x64.grad, atol=1e-8, rtol=1e-4)


# --------------------------------------------------------------------------- gradcheck / opcheck / compile
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("classes", ["present", "all", [1, 2]], ids=str)
def test_gradcheck(per_image, from_logits, classes):
    x, y = _data(2, 3, 3, 4, seed=13)
    if not from_logits:
        x = torch.softmax(x, 1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: lovasz_softmax(t, y, classes=classes, per_image=per_image,
                                 from_logits=from_logits), (x,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(per_image, from_logits, dtype):
    x, y = _data(2, 4, 5, 3, seed=14, dtype=dtype)
    x.requires_grad_(True)
    for classes, present in ((list(range(4)), True), ([0, 3], False)):
        torch.library.opcheck(torch.ops.lipfast.lovasz_softmax_loss.default,
                              (x, y, classes, present, per_image, 255, from_logits))
    torch.library.opcheck(torch.ops.lipfast.lovasz_softmax_loss.default,
                          (x, y.to(torch.uint8), [1, 2, 3], True, per_image, 255, from_logits))


@pytest.mark.parametrize("per_image", [False, True])
def test_compile_fullgraph(per_image):
    torch._dynamo.reset()
    crit = LovaszSoftmax(per_image=per_image)

    def f(z, lab):
        return crit(z * 1.5, lab) + 0.5 * lovasz_softmax(z, lab, classes="all")

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, y = _data(2, 4, 6, 5, seed=15, dtype=torch.float32)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    la, lb = cf(xa, y), f(xb, y)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_module():
    m = LovaszSoftmax(classes="all", per_image=True, ignore_index=255, from_logits=True)
    assert "classes='all'" in repr(m)
    x, y = _data(2, 4, 5, 6, seed=16)
    torch.testing.assert_close(m(x, y), ref_lovasz(x, y, classes="all", per_image=True))
    with pytest.raises(ValueError):
        LovaszSoftmax(classes="some")


# --------------------------------------------------------------------------- errors
def test_errors():
    x, y = _data(2, 4, 5, 6, seed=17)
    bad = y.clone()
    bad[0, 0, 0] = 4  # == C
    with pytest.raises(ValueError, match="labels must be in"):
        lovasz_softmax(x, bad)
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="labels must be in"):
        lovasz_softmax(x, bad)
    with pytest.raises(TypeError, match="integer labels"):
        lovasz_softmax(x, y.float())
    with pytest.raises(TypeError, match="floating-point"):
        lovasz_softmax(x.long(), y)
    with pytest.raises(ValueError, match="do not match"):
        lovasz_softmax(x, y[:, :4])
    with pytest.raises(ValueError, match="do not match"):
        lovasz_softmax(x, y[:1])
    with pytest.raises(ValueError, match="B x C x H x W"):
        lovasz_softmax(x[0], y[0])
    with pytest.raises(ValueError, match="out of range"):
        lovasz_softmax(x, y, classes=[0, 4])
    with pytest.raises(ValueError, match="out of range"):
        lovasz_softmax(x, y, classes=[-1])
    with pytest.raises(TypeError, match="integers"):
        lovasz_softmax(x, y, classes=[0.5])
    with pytest.raises(ValueError, match="'present', 'all'"):
        lovasz_softmax(x, y, classes="none")


# --------------------------------------------------------------------------- Triton kernel
def _triton():
    pytest.importorskip("triton")
    from lipfast.kernels import lovasz as kernels

    return kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,block", [(1, 16), (37, 16), (64, 16), (50, 64)])
def test_triton_jaccard_grad(dtype, n, block):
    from lipfast.ops.lovasz import _jaccard_grad_torch

    kernels = _triton()
    g = torch.Generator().manual_seed(n)
    rows = 5
    e = torch.rand(rows, n, generator=g, dtype=torch.float64)
    fg = torch.rand(rows, n, generator=g) < 0.4
    fg[1] = False  # a class with no foreground
    ign = torch.rand(rows, n, generator=g) < 0.3
    ign[2] = True  # every pixel ignored
    fg &= ~ign
    e = torch.where(ign, -1.0, e).to(dtype)
    e_sorted, perm = torch.sort(e, -1, descending=True)
    gs = torch.gather(fg, -1, perm)
    gsum = fg.sum(-1, keepdim=True, dtype=torch.int32)
    grad_k, loss_k = kernels.jaccard_grad(e_sorted, gs, gsum, block=block)
    grad_t, loss_t = _jaccard_grad_torch(e_sorted, gs, gsum)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(grad_k, grad_t, atol=tol, rtol=0)
    torch.testing.assert_close(loss_k, loss_t, atol=tol, rtol=0)
    assert (grad_k[2] == 0).all() and (loss_k[2] == 0)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", CLASSES, ids=str)
def test_triton_forward_matches_reference(per_image, classes):
    from lipfast.losses.lovasz import _normalize_classes
    from lipfast.ops.lovasz import _lovasz_forward

    kernels = _triton()
    x, y = _data(2, 5, 7, 9, seed=18)
    y[1, :3] = 255
    ids, present = _normalize_classes(classes, 5)
    loss, dx = _lovasz_forward(x, y, ids, present, per_image, 255, True, kernels=kernels)
    xr = x.clone().requires_grad_(True)
    ref = ref_lovasz(xr, y, classes=classes, per_image=per_image)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(dx, xr.grad, atol=1e-10, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cuda_matches_cpu(dtype):
    x, y = _data(2, 6, 33, 31, seed=19, dtype=dtype, label_dtype=torch.uint8)
    for per_image in (False, True):
        xc = x.clone().requires_grad_(True)
        xg = x.cuda().requires_grad_(True)
        lc = lovasz_softmax(xc, y, per_image=per_image)
        lg = lovasz_softmax(xg, y.cuda(), per_image=per_image)
        lc.backward()
        lg.backward()
        tol = 1e-2 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(lg.cpu(), lc, atol=tol, rtol=0)
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, atol=tol, rtol=0)


# --------------------------------------------------------------------------- C++ CPU kernel
def _op(x, y, ids, present, per_image, ignore=255, from_logits=True):
    return torch.ops.lipfast.lovasz_softmax_loss(x, y, ids, present, per_image, ignore,
                                                 from_logits)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_cpp_kernel_matches_vectorised_path(per_image, label_dtype):
    """The C++ kernel against the vectorised PyTorch path (the one CUDA float64
    uses), every classes mode, several label dtypes."""
    from lipfast.ops.lovasz import _lovasz_forward

    x, y = _data(3, 6, 9, 7, seed=20)
    y[2, :4] = 255
    y = y.to(label_dtype) if label_dtype != torch.int8 else torch.where(y == 255, -3, y).to(
        torch.int8)
    ign = -3 if label_dtype == torch.int8 else 255
    for ids, present in ((list(range(6)), True), (list(range(6)), False), ([5, 0, 5], False),
                         ([4, 2], True), ([], True)):
        for from_logits in (True, False):
            xin = x if from_logits else torch.softmax(x, 1)
            la, ga = _op(xin, y, ids, present, per_image, ign, from_logits)
            lb, gb = _lovasz_forward(xin, y, ids, present, per_image, ign, from_logits)
            torch.testing.assert_close(la, lb, atol=1e-12, rtol=0)
            torch.testing.assert_close(ga, gb, atol=1e-12, rtol=0)


def test_cpp_kernel_probabilities_outside_unit_interval():
    # from_logits=False takes any values: d|fg - p| / dp = sign(p - fg), also for
    # p > 1 with fg = 1 and p < 0 with fg = 0 (and for an absent class)
    x, y = _data(2, 4, 5, 6, seed=21)
    p = torch.softmax(x, 1) * 1.6 - 0.3
    for classes in ("present", "all", [0, 1, 1]):
        _compare(p, y, classes=classes, from_logits=False)
        _compare(p, y, classes=classes, per_image=True, from_logits=False)


def test_cpp_kernel_non_contiguous_inputs_untouched():
    x, y = _data(2, 5, 8, 7, seed=22)
    xs = x.permute(0, 1, 3, 2)  # B x C x 7 x 8, strided
    ys = y.transpose(1, 2)
    x0, y0 = xs.clone(), ys.clone()
    la, ga = _compare(xs, ys)
    lb, gb = _compare(xs.contiguous(), ys.contiguous())
    torch.testing.assert_close(la, lb, atol=0, rtol=0)
    torch.testing.assert_close(ga, gb, atol=0, rtol=0)
    assert torch.equal(xs, x0) and torch.equal(ys, y0)
    # channels-last float32
    xc = x.float().contiguous(memory_format=torch.channels_last)
    l1, g1 = _op(xc, y, list(range(5)), True, False)
    l2, g2 = _op(x.float(), y, list(range(5)), True, False)
    torch.testing.assert_close(l1, l2, atol=0, rtol=0)
    torch.testing.assert_close(g1, g2, atol=0, rtol=0)


def test_cpp_kernel_thread_count_independent():
    x, y = _data(2, 7, 23, 19, seed=23, dtype=torch.float32)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(_op(x, y, list(range(7)), True, False))
            outs.append(_op(x, y, [1, 1, 3], False, True))
    finally:
        torch.set_num_threads(old)
    for i in range(2, len(outs)):
        ref = outs[i % 2]
        assert torch.equal(outs[i][0], ref[0]) and torch.equal(outs[i][1], ref[1])


def test_cpp_kernel_ties_and_constant_errors():
    # many equal errors (uniform logits, uint8 labels): the loss is tie-order free
    x = torch.zeros(2, 3, 6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 6, 5), generator=torch.Generator().manual_seed(24))
    for classes in ("present", "all"):
        la = lovasz_softmax(x, y.to(torch.uint8), classes=classes)
        lb = ref_lovasz(x, y, classes=classes)
        torch.testing.assert_close(la, lb, atol=1e-12, rtol=0)


def test_cpp_kernel_bad_input_direct():
    x, y = _data(2, 4, 5, 6, seed=25)
    with pytest.raises(ValueError, match="class id 4 is out of range"):
        _op(x, y, [0, 4], False, False)
    with pytest.raises(ValueError, match="class id -1 is out of range"):
        _op(x, y, [-1], False, False)
    bad = y.clone()
    bad[1, 4, 5] = 77
    with pytest.raises(ValueError, match="labels must be in \\[0, 4\\).*found 77"):
        _op(x, bad, [0, 1], True, True)
    with pytest.raises(ValueError, match="do not match"):
        _op(x, y[:, 1:], [0], True, False)
    with pytest.raises(TypeError, match="integer labels"):
        _op(x, y.bool(), [0], True, False)
    with pytest.raises(TypeError, match="floating-point"):
        _op(x.int(), y, [0], True, False)
    with pytest.raises(ValueError, match="no classes"):
        _op(x[:, :0], y, [], True, False)


def test_double_backward_raises():
    x, y = _data(2, 4, 5, 6, seed=26)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(lovasz_softmax(xr, y), xr, create_graph=True)
    xs = x.clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(ref_lovasz(xs, y), xs)
    torch.testing.assert_close(g.detach(), gs, atol=1e-10, rtol=0)  # first order still right
    with pytest.raises(NotImplementedError, match="lovasz_softmax_loss"):
        torch.autograd.grad((g * g).sum(), xr)
    (g2,) = torch.autograd.grad(lovasz_softmax(xr, y), xr)
    assert not g2.requires_grad


# --------------------------------------------------------------------------- CUDA
# The CUDA op (torch.sort + the Triton Jaccard kernel; float64: the PyTorch
# path) against ref_lovasz on a float64 CPU copy of the same (rounded) inputs.
# Tolerances: float32 math for every non-float64 input; the loss has the
# input's dtype (1e-5 for float32, 1e-2 for half types: one rounding), the
# gradient is compared relative to its largest entry (1e-4 float32: float32
# errors may reorder near-tied pixels; 1e-2 half types).


def _cuda_compare(x, y, **kw):
    """x, y on CUDA; returns (loss, grad) after checking them against the reference."""
    x0, y0 = x.clone(), y.clone()
    xa = x.detach().clone().requires_grad_(True)
    la = lovasz_softmax(xa, y, **kw)
    assert la.dtype == x.dtype and la.shape == () and la.device.type == "cuda"
    xr = x.detach().cpu().double().requires_grad_(True)
    lr = ref_lovasz(xr, y.cpu(), **kw)
    (ga,) = torch.autograd.grad(la, xa, torch.tensor(1.7, device="cuda", dtype=la.dtype))
    (gr,) = torch.autograd.grad(lr, xr, torch.tensor(1.7, dtype=torch.float64))
    assert ga.dtype == x.dtype and ga.shape == x.shape
    ltol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(x.dtype, 1e-2)
    torch.testing.assert_close(la.detach().cpu().double(), lr.detach(), atol=ltol, rtol=0)
    gtol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(x.dtype, 1e-2)
    s = max(float(gr.abs().max()), 1e-30)
    torch.testing.assert_close(ga.cpu().double() / s, gr / s, atol=gtol, rtol=0)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    return la, ga


def _cuda_tie_free_probs(y, c, seed=0):
    """B x C x H x W 'probabilities' k/256 (exact in float16/bfloat16) whose errors
    |fg - p| are distinct within each class: no ties in the sort (<= 255 pixels)."""
    g = torch.Generator().manual_seed(seed)
    lab = y.long().reshape(-1)
    assert lab.numel() <= 255
    cols = []
    for k in range(c):
        e = (torch.randperm(255, generator=g)[: lab.numel()] + 1).double() / 256
        cols.append(torch.where(lab == k, 1 - e, e))
    b, h, w = y.shape
    return torch.stack(cols, 0).reshape(c, b, h, w).transpose(0, 1).contiguous()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
def test_cuda_matches_reference(dtype, label_dtype):
    for shape in [(2, 6, 33, 31), (1, 20, 41, 37), (3, 2, 5, 7), (1, 3, 1, 1)]:
        x, y = _data(*shape, seed=sum(shape), label_dtype=label_dtype)
        x, y = x.to("cuda", dtype), y.cuda()
        for per_image in (False, True):
            for classes in CLASSES:
                if max(c for c in (classes if isinstance(classes, list) else [0])) >= shape[1]:
                    continue
                _cuda_compare(x, y, classes=classes, per_image=per_image)
        if dtype in (torch.float32, torch.float64):  # probabilities
            p = torch.softmax(x.float(), 1).to(dtype)
            _cuda_compare(p, y, from_logits=False)
            _cuda_compare(p, y, from_logits=False, per_image=True, classes="all")
    # half-type probabilities: rounded softmax values tie, and tied errors may be
    # ordered differently from torch.sort (same loss, different per-pixel gradient);
    # exact tie-free probabilities instead
    _, y = _data(2, 4, 7, 9, seed=5, label_dtype=label_dtype)
    p = _cuda_tie_free_probs(y, 4).to("cuda", dtype)
    for per_image in (False, True):
        for classes in ("present", "all", [3, 1, 1]):
            _cuda_compare(p, y.cuda(), from_logits=False, per_image=per_image, classes=classes)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_strided_inputs(dtype):
    x, y = _data(2, 7, 19, 23, seed=3)
    x, y = x.to("cuda", dtype), y.cuda()
    ref = _cuda_compare(x, y)
    for xx in (x.contiguous(memory_format=torch.channels_last), torch.stack([x, x], -1)[..., 0]):
        for yy in (y, y.transpose(1, 2).contiguous().transpose(1, 2)):
            got = _cuda_compare(xx, yy)
            torch.testing.assert_close(got[0], ref[0])
            torch.testing.assert_close(got[1], ref[1])


@pytest.mark.cuda
def test_cuda_ignored_pixels_edge_cases():
    x, y = _data(2, 4, 9, 8, seed=21)
    x, y = x.cuda().float(), y.cuda()
    # every pixel ignored: 0, zero gradient, no NaN
    xa = x.clone().requires_grad_(True)
    loss = lovasz_softmax(xa, torch.full_like(y, 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(xa.grad).item() == 0
    # one image fully ignored, per_image: it contributes 0 to the mean
    y2 = y.clone()
    y2[1] = 255
    _cuda_compare(x, y2, per_image=True)
    _cuda_compare(x, y2, per_image=False)
    # a single valid pixel; ignore_index inside the class range
    y3 = torch.full_like(y, 255)
    y3[0, 4, 4] = 2
    _cuda_compare(x, y3)
    _cuda_compare(x, y.clamp(max=3), ignore_index=1)


@pytest.mark.cuda
def test_cuda_gradcheck_float64():
    x, y = _data(2, 3, 3, 4, seed=13)
    x, y = x.cuda().requires_grad_(True), y.cuda()
    for per_image in (False, True):
        for classes in ("present", [1, 2]):
            assert torch.autograd.gradcheck(
                lambda t: lovasz_softmax(t, y, classes=classes, per_image=per_image), (x,),
                eps=1e-7, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_no_host_sync(dtype):
    """'present' and 'all' (an explicit class list is copied to the device once per
    call and is not covered here), forward and backward under sync debug mode."""
    x, y = _data(2, 20, 61, 59, seed=4, label_dtype=torch.uint8)
    x, y = x.to("cuda", dtype), y.cuda()

    def step():
        xa = x.clone().requires_grad_(True)
        loss = (lovasz_softmax(xa, y) + lovasz_softmax(xa, y, classes="all", per_image=True)
                + lovasz_softmax(torch.softmax(xa.float(), 1), y, from_logits=False))
        loss.backward()
        return loss, xa.grad

    ref, got = twice_without_sync(step)  # warm-up (Triton compile)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


@pytest.mark.cuda
def test_cuda_autocast_and_opcheck():
    x, y = _data(2, 4, 5, 3, seed=14, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        la = lovasz_softmax(x, y)
    assert la.dtype == torch.float32
    torch.testing.assert_close(la, lovasz_softmax(x, y))
    xg = x.clone().requires_grad_(True)
    for classes, present in ((list(range(4)), True), ([0, 3], False)):
        for per_image in (False, True):
            torch.library.opcheck(torch.ops.lipfast.lovasz_softmax_loss.default,
                                  (xg, y.to(torch.uint8), classes, present, per_image, 255,
                                   True))

    def f(t, lab):
        return lovasz_softmax(t, lab) + lovasz_softmax(t, lab, per_image=True)

    xa = x.clone().requires_grad_(True)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xa, y)
    got.backward()
    xb = x.clone().requires_grad_(True)
    f(xb, y).backward()
    torch.testing.assert_close(got, f(x, y))
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.cuda
def test_cuda_bad_label_in_child_process():
    # device-side assert (torch._assert_async): poisons the CUDA context, so in a child
    code = (
        "import torch, lipfast\n"
        "from lipfast.losses import lovasz_softmax\n"
        "x = torch.randn(2, 5, 9, 7, device='cuda')\n"
        "y = torch.randint(0, 5, (2, 9, 7), device='cuda', dtype=torch.uint8)\n"
        "lovasz_softmax(x, y)\n"
        "torch.cuda.synchronize()\n"
        "y[1, 2, 3] = 7\n"
        "torch.cuda.set_sync_debug_mode('error')\n"
        "loss = lovasz_softmax(x, y)\n"
        "torch.cuda.set_sync_debug_mode(0)\n"
        "print('launched', flush=True)\n"
        "loss.item()\n"
        "print('no error', flush=True)\n"
    )
    assert_device_assert(code)
