"""lipfast.losses.upsample_cross_entropy against F.interpolate + F.cross_entropy
(values and gradients), the op's registration (opcheck, torch.compile), bad
input, and the Triton kernels run directly (on CPU tensors through
TRITON_INTERPRET=1, which conftest.py switches on without a GPU)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lipfast.ops.upsample_ce as uce_mod
from lipfast.losses import UpsampleCrossEntropy, upsample_cross_entropy
from cuda_checks import assert_device_assert, twice_without_sync

IGN = 255


def reference(x, y, ignore_index=IGN, weight=None, align_corners=True, reduction="mean"):
    up = F.interpolate(x, y.shape[-2:], mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(up, y.long(), weight=weight, ignore_index=ignore_index,
                           reduction=reduction)


def make(b=2, c=5, h=7, w=5, hh=25, ww=19, dtype=torch.float64, ignore_frac=0.2, seed=0,
         label_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b, hh, ww), generator=g)
    y[torch.rand(b, hh, ww, generator=g) < ignore_frac] = IGN
    return x, y.to(label_dtype)


def check(x, y, atol=1e-10, rtol=1e-8, **kw):
    xa = x.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    got = upsample_cross_entropy(xa, y, **kw)
    ref = reference(xr, y, **kw)
    torch.testing.assert_close(got, ref.to(got.dtype), atol=atol, rtol=rtol)
    gout = torch.randn_like(ref)
    ga, = torch.autograd.grad(got, xa, gout.to(got.dtype))
    gr, = torch.autograd.grad(ref, xr, gout)
    torch.testing.assert_close(ga, gr, atol=atol, rtol=rtol)


SHAPES = [
    (2, 5, 7, 5, 25, 19),   # odd, non-square
    (2, 4, 4, 6, 13, 17),   # non-integer upsample factor
    (1, 3, 1, 3, 5, 9),     # single low-res row
    (2, 3, 5, 5, 5, 5),     # no resize
    (2, 4, 9, 8, 5, 6),     # downsampling
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(shape, align_corners, reduction, weighted):
    b, c, h, w, hh, ww = shape
    x, y = make(b, c, h, w, hh, ww)
    weight = torch.rand(c, dtype=torch.float64) + 0.1 if weighted else None
    check(x, y, weight=weight, align_corners=align_corners, reduction=reduction)


def test_torch_fallback_multiple_tiles(monkeypatch):
    # the tiled PyTorch path (CUDA float64 / no Triton), run on CPU tensors with
    # many row tiles, against the reference and the C++ CPU kernel
    monkeypatch.setattr(uce_mod, "_TILE_ELEMS", 64)
    x, y = make(2, 5, 7, 5, 25, 19)
    for ac in (True, False):
        wt = torch.rand(5, dtype=torch.float64)
        nll, lse, wsum = uce_mod._torch_forward(x, y, wt, IGN, ac)
        cn, cl, cw = torch.ops.lipfast.upsample_ce(x, y, wt, IGN, ac)
        torch.testing.assert_close(nll, cn)
        torch.testing.assert_close(lse, cl)
        torch.testing.assert_close(wsum, cw)
        xr = x.clone().requires_grad_()
        ref = reference(xr, y, weight=wt, align_corners=ac, reduction="none")
        torch.testing.assert_close(nll, ref)
        dnll = torch.randn_like(ref)
        gr, = torch.autograd.grad(ref, xr, dnll)
        got = uce_mod._torch_backward(dnll, x, y, wt, lse, IGN, ac)
        torch.testing.assert_close(got, gr)
        torch.testing.assert_close(
            torch.ops.lipfast.upsample_ce_backward(dnll, x, y, wt, lse, IGN, ac), gr)


def test_cpu_kernel_deterministic_and_thread_independent():
    x, y = make(3, 7, 9, 8, 37, 29, dtype=torch.float32)
    dnll = torch.randn(3, 37, 29)
    _, lse, _ = torch.ops.lipfast.upsample_ce(x, y, None, IGN, True)
    g1 = torch.ops.lipfast.upsample_ce_backward(dnll, x, y, None, lse, IGN, True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g2 = torch.ops.lipfast.upsample_ce_backward(dnll, x, y, None, lse, IGN, True)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(g1, g2)
    assert torch.equal(torch.ops.lipfast.upsample_ce_backward(dnll, x, y, None, lse, IGN, True),
                       g1)


def test_cpu_baseline_isa_variant():
    # the kernel's loops without AVX2 (picked at run time), in a fresh process
    code = (
        "import torch, torch.nn.functional as F, lipfast.losses as L\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dt in (torch.float32, torch.float64):\n"
        "    x = torch.randn(2, 6, 9, 7, generator=g, dtype=dt, requires_grad=True)\n"
        "    y = torch.randint(0, 6, (2, 33, 29), generator=g); y[:, :4] = 255\n"
        "    w = torch.rand(6, generator=g, dtype=dt)\n"
        "    for ac in (True, False):\n"
        "        a, = torch.autograd.grad(L.upsample_cross_entropy(x, y, weight=w, align_corners=ac), x)\n"
        "        r = F.cross_entropy(F.interpolate(x, (33, 29), mode='bilinear', align_corners=ac),\n"
        "                            y, weight=w, ignore_index=255)\n"
        "        b, = torch.autograd.grad(r, x)\n"
        "        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)\n"
    )
    env = dict(os.environ, LIPFAST_CPU_NO_AVX2="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_float32_matches_interpolate_values():
    # same bilinear indices and weights as ATen: lse agrees to float rounding
    x, y = make(2, 6, 13, 11, 50, 47, dtype=torch.float32)
    for ac in (True, False):
        _, lse, _ = torch.ops.lipfast.upsample_ce(x, y, None, IGN, ac)
        up = F.interpolate(x.double(), (50, 47), mode="bilinear", align_corners=ac)
        torch.testing.assert_close(lse.double(), torch.logsumexp(up, 1), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("align_corners", [True, False])
def test_gradcheck(align_corners):
    x, y = make(2, 3, 3, 4, 7, 6)
    x.requires_grad_()
    wt = torch.rand(3, dtype=torch.float64) + 0.5
    for red in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda t: upsample_cross_entropy(t, y, weight=wt, align_corners=align_corners,
                                             reduction=red), (x,))


def test_all_ignored():
    x, y = make(2, 4, 3, 3, 8, 8)
    y.fill_(IGN)
    xa = x.clone().requires_grad_()
    loss = upsample_cross_entropy(xa, y)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(xa.grad, torch.zeros_like(x))
    # documented difference: F.cross_entropy returns nan here
    assert torch.isnan(reference(x, y))
    assert upsample_cross_entropy(x, y, reduction="sum").item() == 0.0
    assert torch.equal(upsample_cross_entropy(x, y, reduction="none"),
                       torch.zeros(2, 8, 8, dtype=torch.float64))
    wt = torch.rand(4, dtype=torch.float64)
    assert upsample_cross_entropy(x, y, weight=wt).item() == 0.0


def test_one_valid_pixel():
    x, y = make(2, 4, 3, 3, 8, 8)
    y.fill_(IGN)
    y[1, 5, 2] = 3
    for red in ("mean", "sum", "none"):
        check(x, y, reduction=red)
        check(x, y, reduction=red, weight=torch.rand(4, dtype=torch.float64))


def test_single_image_and_last_class():
    x, y = make(1, 6, 5, 4, 17, 11)
    y[:, ::2] = 5  # labels at C - 1
    check(x, y)
    check(x, y, align_corners=False, weight=torch.rand(6, dtype=torch.float64))


def test_uint8_labels():
    x, y = make(2, 5, 7, 5, 25, 19, label_dtype=torch.uint8)
    assert y.dtype == torch.uint8
    check(x, y)
    check(x, y, reduction="none", weight=torch.rand(5, dtype=torch.float64))


def test_half_ignored():
    x, y = make(2, 5, 7, 5, 25, 19, ignore_frac=0.5)
    check(x, y)
    check(x, y, align_corners=False, reduction="sum")


def test_custom_ignore_index():
    x, y = make(2, 5, 7, 5, 25, 19, ignore_frac=0.0)
    y[:, :3] = -100
    check(x, y, ignore_index=-100)


def test_non_contiguous_logits():
    x, y = make(2, 5, 7, 5, 25, 19)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # channels/space strides permuted
    assert not xt.is_contiguous()
    check(xt, y)
    xs = torch.randn(2, 10, 7, 10, dtype=torch.float64)[:, ::2, :, ::2]
    check(xs, y, align_corners=False)
    check(x.to(memory_format=torch.channels_last), y)


def test_float32_and_low_precision():
    x, y = make(2, 5, 7, 5, 25, 19, dtype=torch.float32)
    check(x, y, atol=1e-5, rtol=1e-5)
    for dt in (torch.float16, torch.bfloat16):
        xl = x.to(dt).requires_grad_()
        got = upsample_cross_entropy(xl, y)
        assert got.dtype == torch.float32
        xr = xl.detach().float().requires_grad_()
        ref = reference(xr, y)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        got.backward()
        ref.backward()
        assert xl.grad.dtype == dt
        torch.testing.assert_close(xl.grad.float(), xr.grad, atol=1e-2, rtol=1e-2)


def test_autocast_cpu():
    x, y = make(2, 5, 7, 5, 25, 19, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.to(torch.bfloat16)
        got = upsample_cross_entropy(xb, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference(xb.float(), y), atol=1e-5, rtol=1e-5)


def test_module():
    x, y = make(2, 5, 7, 5, 25, 19)
    wt = torch.rand(5, dtype=torch.float64)
    m = UpsampleCrossEntropy(weight=wt, align_corners=False, reduction="sum")
    torch.testing.assert_close(m(x, y), reference(x, y, weight=wt, align_corners=False,
                                                  reduction="sum"))
    assert torch.equal(m.weight, wt)
    torch.testing.assert_close(UpsampleCrossEntropy()(x, y), reference(x, y))
    with pytest.raises(ValueError):
        UpsampleCrossEntropy(reduction="avg")


def test_bad_input():
    x, y = make(2, 5, 3, 3, 8, 8)
    bad = y.clone()
    bad[0, 0, 0] = 5  # == C
    with pytest.raises(ValueError, match="label 5"):
        upsample_cross_entropy(x, bad)
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError):
        upsample_cross_entropy(x, bad)
    with pytest.raises(ValueError):
        upsample_cross_entropy(x, torch.full_like(y, IGN), ignore_index=-100)  # 255 >= C
    with pytest.raises(ValueError, match="batch"):
        upsample_cross_entropy(x, y[:1])
    with pytest.raises(TypeError):
        upsample_cross_entropy(x, y.double())
    with pytest.raises(ValueError, match="weight"):
        upsample_cross_entropy(x, y, weight=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        upsample_cross_entropy(x[0], y)
    with pytest.raises(ValueError):
        upsample_cross_entropy(x, y[0])
    with pytest.raises(TypeError):
        upsample_cross_entropy(x.long(), y)
    with pytest.raises(ValueError):
        upsample_cross_entropy(x, y, reduction="avg")


def test_opcheck():
    x, y = make(2, 3, 3, 4, 7, 6)
    x.requires_grad_()
    wt = torch.rand(3, dtype=torch.float64)
    for weight in (None, wt):
        for ac in (True, False):
            torch.library.opcheck(torch.ops.lipfast.upsample_ce.default, (x, y, weight, IGN, ac))
    _, lse, _ = torch.ops.lipfast.upsample_ce(x.detach(), y, wt, IGN, True)
    dnll = torch.randn(2, 7, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lipfast.upsample_ce_backward.default,
                          (dnll, x.detach(), y, wt, lse, IGN, True))


def test_torch_compile():
    x, y = make(2, 5, 7, 5, 25, 19)
    wt = torch.rand(5, dtype=torch.float64)

    def f(t, lab):
        return upsample_cross_entropy(t, lab, weight=wt) + 0.5 * upsample_cross_entropy(
            t, lab, reduction="sum", align_corners=False)

    xa = x.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xa, y)
    got.backward()
    xr = x.clone().requires_grad_()
    ref = reference(xr, y, weight=wt) + 0.5 * reference(xr, y, reduction="sum",
                                                        align_corners=False)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(xa.grad, xr.grad)


# ---------------------------------------------------------------------------
# Triton kernels, called directly (CPU tensors under the interpreter, or CUDA)

def _kernel_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 7, 5, 25, 19), (1, 20, 4, 6, 13, 17),
                                   (2, 3, 9, 8, 5, 6)])
@pytest.mark.parametrize("weighted", [False, True])
def test_triton_kernels(align_corners, shape, weighted):
    kernels = pytest.importorskip("lipfast.kernels.upsample_ce")
    dev = _kernel_device()
    b, c, h, w, hh, ww = shape
    x, y = make(b, c, h, w, hh, ww, ignore_frac=0.3, label_dtype=torch.uint8)
    x = x.to(dev).transpose(2, 3).contiguous().transpose(2, 3)  # strided read
    y = y.to(dev)
    wt = (torch.rand(c, dtype=torch.float64) + 0.1).to(dev) if weighted else None
    nll, lse, bad = kernels.forward(x, y, wt, IGN, align_corners, block_p=16, block_c=4)
    up = F.interpolate(x, (hh, ww), mode="bilinear", align_corners=align_corners)
    ref = F.cross_entropy(up, y.long(), weight=wt, ignore_index=IGN, reduction="none")
    torch.testing.assert_close(nll, ref)
    torch.testing.assert_close(lse, torch.logsumexp(up, 1))
    assert bad.item() == 0
    dnll = torch.randn(b, hh, ww, dtype=torch.float64, device=dev)
    dx = kernels.backward(dnll, x, y, wt, lse, IGN, align_corners)
    xr = x.clone().requires_grad_()
    rr = F.cross_entropy(F.interpolate(xr, (hh, ww), mode="bilinear",
                                       align_corners=align_corners),
                         y.long(), weight=wt, ignore_index=IGN, reduction="none")
    gr, = torch.autograd.grad(rr, xr, dnll)
    torch.testing.assert_close(dx, gr)
    # deterministic: a second run is bitwise identical
    assert torch.equal(kernels.backward(dnll, x, y, wt, lse, IGN, align_corners), dx)


def test_triton_kernels_float32_and_bad_label():
    kernels = pytest.importorskip("lipfast.kernels.upsample_ce")
    dev = _kernel_device()
    x, y = make(2, 5, 7, 5, 25, 19, dtype=torch.float32)
    x, y = x.to(dev), y.to(dev)
    nll, lse, bad = kernels.forward(x, y, None, IGN, True)
    torch.testing.assert_close(nll, reference(x, y, reduction="none"), atol=1e-5, rtol=1e-5)
    assert bad.item() == 0
    y[1, 3, 4] = 9
    _, _, bad = kernels.forward(x, y, None, IGN, True)
    assert bad.item() == 1


@pytest.mark.cuda
def test_cuda_op_matches_reference():
    x, y = make(2, 19, 31, 29, 121, 117, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    check(x, y, atol=1e-5, rtol=1e-5)
    check(x.half(), y, atol=2e-2, rtol=2e-2)
    wt = torch.rand(19, device="cuda")
    check(x, y, atol=1e-5, rtol=1e-5, weight=wt, align_corners=False)
    # the device-side label check (torch._assert_async) poisons the CUDA context:
    # checked in a child process, with no host sync per call before the error
    code = (
        "import torch, lipfast\n"
        "from lipfast.losses import upsample_cross_entropy\n"
        "x = torch.randn(2, 19, 31, 29, device='cuda')\n"
        "y = torch.randint(0, 19, (2, 121, 117), device='cuda')\n"
        "upsample_cross_entropy(x, y)\n"
        "torch.cuda.synchronize()\n"
        "torch.cuda.set_sync_debug_mode('error')\n"
        "y[0, 0, 0] = 19\n"
        "loss = upsample_cross_entropy(x, y)\n"
        "torch.cuda.set_sync_debug_mode(0)\n"
        "print('launched', flush=True)\n"
        "loss.item()\n"
    )
    assert_device_assert(code)


def test_triton_forward_label_check_without_sync():
    """The CUDA path's label check: the Triton forward's flag goes to
    torch._assert_async (no host sync on a GPU; on CPU tensors under the
    interpreter it raises at once)."""
    kernels = pytest.importorskip("lipfast.kernels.upsample_ce")
    dev = _kernel_device()
    x, y = make(2, 5, 7, 5, 25, 19, dtype=torch.float32)
    x, y = x.to(dev), y.to(dev)
    wt = torch.rand(5, device=dev) + 0.1
    nll, lse, wsum = uce_mod._triton_forward(kernels, x, y, wt, IGN, True)
    ref_nll, ref_lse, ref_wsum = torch.ops.lipfast.upsample_ce(x.cpu(), y.cpu(), wt.cpu(), IGN,
                                                                True)
    torch.testing.assert_close(nll.cpu(), ref_nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wsum.cpu(), ref_wsum, atol=1e-4, rtol=1e-6)
    if dev == "cpu":
        for v in (5, 200):
            bad = y.clone()
            bad[1, 3, 4] = v
            with pytest.raises(RuntimeError, match=r"a label is outside \[0, 5\) and not "
                                                   r"ignore_index=255"):
                uce_mod._triton_forward(kernels, x, bad, wt, IGN, True)


@pytest.mark.parametrize("weighted", [False, True])
def test_double_backward_raises(weighted):
    x, y = make(2, 4, 5, 6, 11, 9)
    wt = torch.rand(4, dtype=torch.float64) + 0.1 if weighted else None
    xr = x.clone().requires_grad_()
    loss = upsample_cross_entropy(xr, y, weight=wt)
    (g,) = torch.autograd.grad(loss, xr, create_graph=True)
    # the first derivative is still right under create_graph=True
    xs = x.clone().requires_grad_()
    (gs,) = torch.autograd.grad(reference(xs, y, weight=wt), xs)
    torch.testing.assert_close(g.detach(), gs)
    assert g.requires_grad
    with pytest.raises(NotImplementedError, match="upsample_ce_backward"):
        torch.autograd.grad(g.square().sum(), xr)
    # without create_graph the backward op builds no graph
    (g2,) = torch.autograd.grad(upsample_cross_entropy(xr, y, weight=wt), xr)
    assert not g2.requires_grad


# ---------------------------------------------------------------------------
# CUDA: the registered op (Triton kernels; float64 -> tiled PyTorch path)
# against the float64 CPU reference on the same (rounded) input values.
# Tolerances: float32 math inside the op for float32/float16/bfloat16 logits,
# so the loss is good to ~1e-6 relative whatever the input dtype; the gradient
# has the logits' dtype, compared relative to its largest entry (1e-5 for
# float32, 1e-2 for half types: one rounding to 8/11 mantissa bits).


def _cuda_rel_close(got, ref, tol, name=""):
    s = max(float(ref.abs().max()), 1e-30)
    torch.testing.assert_close(got.detach().cpu().double() / s, ref.detach().double() / s,
                               atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def _cuda_check(x, y, weight=None, align_corners=True, reduction="mean", seed=0):
    """CUDA op vs reference(float64 CPU copy): value, output dtype, gradient dtype and
    value, inputs untouched."""
    x0, y0 = x.clone(), y.clone()
    xa = x.detach().clone().requires_grad_()
    got = upsample_cross_entropy(xa, y, weight=weight, align_corners=align_corners,
                                 reduction=reduction)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert got.device.type == "cuda" and got.dtype == acc
    xr = x.detach().cpu().double().requires_grad_()
    wr = None if weight is None else weight.cpu().double()
    ref = reference(xr, y.cpu(), weight=wr, align_corners=align_corners, reduction=reduction)
    ltol = 1e-10 if x.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.detach().cpu().double(), ref.detach(), atol=ltol, rtol=ltol)
    gout = torch.randn(ref.shape, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))
    ga, = torch.autograd.grad(got, xa, gout.to("cuda", got.dtype))
    gr, = torch.autograd.grad(ref, xr, gout)
    assert ga.dtype == x.dtype and ga.shape == x.shape
    gtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(x.dtype, 1e-2)
    _cuda_rel_close(ga, gr, gtol, "grad")
    assert torch.equal(x, x0) and torch.equal(y, y0)


def _cuda_layouts(x):
    """Contiguous, channels_last and a sliced (non-contiguous) view of the same values."""
    sliced = torch.stack([x, x], -1)[..., 0]
    assert not sliced.is_contiguous()
    return {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
            "sliced": sliced}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
def test_cuda_dtypes_layouts_labels(dtype, label_dtype):
    for shape in [(2, 19, 31, 29, 121, 117), (1, 5, 7, 5, 25, 19), (2, 3, 9, 8, 5, 6),
                  (1, 20, 1, 3, 5, 9)]:
        b, c, h, w, hh, ww = shape
        x, y = make(b, c, h, w, hh, ww, dtype=torch.float32, seed=h,
                    label_dtype=label_dtype)
        x, y = x.to("cuda", dtype), y.cuda()
        for name, xx in _cuda_layouts(x).items():
            _cuda_check(xx, y)
        # non-contiguous labels
        yt = y.transpose(1, 2).contiguous().transpose(1, 2)
        assert not yt.is_contiguous()
        _cuda_check(x, yt, align_corners=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_weights_and_reductions(dtype, reduction):
    x, y = make(2, 7, 13, 11, 50, 43, dtype=torch.float32, seed=3, ignore_frac=0.4)
    x, y = x.to("cuda", dtype), y.cuda()
    wt = torch.rand(7, device="cuda") + 0.1
    if dtype == torch.float64:
        wt = wt.double()
    for ac in (True, False):
        _cuda_check(x, y, weight=wt, align_corners=ac, reduction=reduction)


@pytest.mark.cuda
def test_cuda_all_ignored_and_autocast():
    x, y = make(2, 5, 7, 5, 25, 19, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    xa = x.clone().requires_grad_()
    loss = upsample_cross_entropy(xa, torch.full_like(y, IGN))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(xa.grad).item() == 0
    # under autocast the op still computes in float32 and returns a float32 loss
    ref = upsample_cross_entropy(x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = upsample_cross_entropy(x, y)
        got_h = upsample_cross_entropy(x.bfloat16(), y)
    assert got.dtype == torch.float32 and got_h.dtype == torch.float32
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_h.double().cpu(), reference(x.bfloat16().double().cpu(),
                                                                y.cpu()), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_no_host_sync(dtype):
    """Forward and backward (Triton path) under sync debug mode 'error'."""
    x, y = make(2, 19, 31, 29, 121, 117, dtype=torch.float32, label_dtype=torch.uint8)
    x, y = x.to("cuda", dtype), y.cuda()
    wt = torch.rand(19, device="cuda") + 0.1

    def step():
        xa = x.clone().requires_grad_()
        loss = (upsample_cross_entropy(xa, y, weight=wt)
                + upsample_cross_entropy(xa, y, align_corners=False, reduction="sum"))
        loss.backward()
        return loss, xa.grad

    ref_loss, ref_grad, loss, grad = twice_without_sync(step)  # warm-up: compiles, caches the bilinear tables
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(grad, ref_grad)  # deterministic backward


@pytest.mark.cuda
def test_cuda_float64_bad_label_is_value_error():
    # float64 runs the PyTorch path on CUDA: host check (documented sync), ValueError,
    # no device assert (the CUDA context stays usable)
    x, y = make(1, 4, 5, 6, 11, 9)
    x, y = x.cuda(), y.cuda()
    y[0, 2, 3] = 4
    with pytest.raises(ValueError, match=r"label 4 outside \[0, 4\)"):
        upsample_cross_entropy(x, y)
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_bad_label_uint8_in_child_process():
    # uint8 labels, a label above C (200) on the Triton path: device-side assert
    code = (
        "import torch, lipfast\n"
        "from lipfast.losses import upsample_cross_entropy\n"
        "x = torch.randn(2, 5, 7, 5, device='cuda', dtype=torch.bfloat16)\n"
        "y = torch.randint(0, 5, (2, 25, 19), device='cuda', dtype=torch.uint8)\n"
        "y[1, 3, 4] = 200\n"
        "loss = upsample_cross_entropy(x, y)\n"
        "print('launched', flush=True)\n"
        "torch.cuda.synchronize()\n"
        "print('no error', flush=True)\n"
    )
    assert_device_assert(code)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    x, y = make(2, 3, 3, 4, 7, 6, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    wt = torch.rand(3, device="cuda")
    for weight in (None, wt):
        torch.library.opcheck(torch.ops.lipfast.upsample_ce.default,
                              (x.clone().requires_grad_(), y, weight, IGN, True))
    _, lse, _ = torch.ops.lipfast.upsample_ce(x, y, wt, IGN, False)
    dnll = torch.randn(2, 7, 6, device="cuda")
    torch.library.opcheck(torch.ops.lipfast.upsample_ce_backward.default,
                          (dnll, x, y, wt, lse, IGN, False))

    def f(t, lab):
        return upsample_cross_entropy(t, lab, weight=wt) + 0.5 * upsample_cross_entropy(
            t, lab, reduction="sum", align_corners=False)

    xa = x.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xa, y)
    got.backward()
    xr = x.clone().requires_grad_()
    f(xr, y).backward()
    torch.testing.assert_close(got, f(x, y))
    torch.testing.assert_close(xa.grad, xr.grad)
