"""lipfast.losses.generate_edge / edge_loss against references written from
SPEC section 3 (SCHP's generate_edge_tensor: float labels, four rules, a 3x3
all-ones float conv). The Triton kernel runs on CPU tensors under
TRITON_INTERPRET=1 (conftest.py) when there is no GPU."""

import pytest
import torch
import torch.nn.functional as F

from lipfast.losses import edge_loss, generate_edge
from cuda_checks import twice_without_sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def edge_reference(labels):
    """Step by step from the SPEC, the way SCHP's code does it (float copy + conv)."""
    L = labels.double()
    n, h, w = L.shape
    e = torch.zeros_like(L)
    for y in range(h):
        for x in range(w):
            a = L[:, y, x]
            def mark(b):
                m = (a != b) & (a != 255) & (b != 255)
                e[:, y, x][m] = 1
            if y >= 1:
                mark(L[:, y - 1, x])
            if x < w - 1:
                mark(L[:, y, x + 1])
            if y < h - 1 and x < w - 1:
                mark(L[:, y + 1, x + 1])
            if y < h - 1 and x >= 1:
                mark(L[:, y + 1, x - 1])
    d = F.conv2d(e.unsqueeze(1), torch.ones(1, 1, 3, 3, dtype=torch.float64), padding=1)
    return (d.squeeze(1) != 0).long()


def blobby_labels(b, h, w, k=4, p_ignore=0.15, seed=0, dtype=torch.int64):
    """Piecewise-constant labels (blocks) with speckle and ignore regions."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, k, (b, 1, (h + 2) // 3, (w + 2) // 3), generator=g).float()
    lab = F.interpolate(coarse, size=(h, w), mode="nearest").squeeze(1).long()
    speck = torch.rand(b, h, w, generator=g) < 0.05
    lab[speck] = torch.randint(0, k, (int(speck.sum()),), generator=g)
    ign = F.interpolate((torch.rand(b, 1, (h + 3) // 4, (w + 3) // 4, generator=g) < p_ignore)
                        .float(), size=(h, w), mode="nearest").squeeze(1).bool()
    lab[ign] = 255
    return lab.to(dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 2, 1), (2, 7, 5), (3, 13, 17), (1, 1, 9)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32])
def test_generate_edge_cpu(shape, dtype):
    lab = blobby_labels(*shape, seed=sum(shape), dtype=dtype)
    out = generate_edge(lab)
    assert out.dtype == torch.int64 and out.shape == lab.shape
    torch.testing.assert_close(out, edge_reference(lab), rtol=0, atol=0)


def test_generate_edge_special_cases():
    lab = torch.full((2, 6, 7), 255, dtype=torch.uint8)
    assert generate_edge(lab).sum() == 0  # all ignored
    lab = torch.full((2, 6, 7), 3, dtype=torch.int64)
    assert generate_edge(lab).sum() == 0  # uniform
    # a single differing pixel against ignore only: no edge
    lab = torch.full((1, 5, 5), 255, dtype=torch.int64)
    lab[0, 2, 2] = 1
    assert generate_edge(lab).sum() == 0
    # 2-D input, strided (non-contiguous) input
    lab = blobby_labels(1, 11, 12, seed=3)[0]
    torch.testing.assert_close(generate_edge(lab), edge_reference(lab[None])[0])
    big = blobby_labels(2, 10, 24, seed=4)
    torch.testing.assert_close(generate_edge(big[:, ::2, 1::2]),
                               edge_reference(big[:, ::2, 1::2]))
    with pytest.raises(ValueError):
        generate_edge(big, edge_width=5)
    with pytest.raises(TypeError):
        generate_edge(big.float())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("shape", [(1, 17, 66), (2, 5, 3)])
def test_generate_edge_triton(shape, dtype):
    from lipfast.kernels import edge as kernels

    lab = blobby_labels(*shape, seed=7, dtype=dtype).to(DEVICE)
    out = kernels.generate_edge(lab)
    torch.testing.assert_close(out.cpu(), edge_reference(lab.cpu()), rtol=0, atol=0)
    strided = lab.transpose(1, 2)  # non-contiguous
    torch.testing.assert_close(kernels.generate_edge(strided).cpu(),
                               edge_reference(strided.cpu()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_generate_edge_opcheck(dtype):
    lab = blobby_labels(2, 9, 10, seed=1, dtype=dtype)
    torch.library.opcheck(torch.ops.lipfast.generate_edge.default, (lab, 3))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_vectorised_fallback_path(dtype):
    # the PyTorch path CUDA uses without Triton
    from lipfast.ops.edge import _edge_torch

    lab = blobby_labels(2, 13, 17, seed=17, dtype=dtype)
    torch.testing.assert_close(_edge_torch(lab), edge_reference_steps(lab), rtol=0, atol=0)
    torch.testing.assert_close(_edge_torch(lab[:, ::2].transpose(1, 2)),
                               edge_reference_steps(lab[:, ::2].transpose(1, 2)), rtol=0, atol=0)


def edge_loss_reference(logits, edges):
    up = F.interpolate(logits, size=edges.shape[-2:], mode="bilinear", align_corners=True)
    pos = (edges == 1).sum().item()
    neg = (edges == 0).sum().item()
    w = torch.tensor([pos / (pos + neg), neg / (pos + neg)], dtype=logits.dtype)
    nll = -F.log_softmax(up, 1).gather(1, edges.unsqueeze(1)).squeeze(1)
    wi = w[edges]
    return (wi * nll).sum() / wi.sum()


def test_edge_loss_value_and_grad():
    g = torch.Generator().manual_seed(0)
    lab = blobby_labels(2, 23, 21, seed=2)
    edges = generate_edge(lab)
    z = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    got = edge_loss(z, edges)
    (gg,) = torch.autograd.grad(got, z)
    z2 = z.detach().clone().requires_grad_()
    ref = edge_loss_reference(z2, edges)
    (gr,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gg, gr)
    # SCHP's call: F.cross_entropy with weight=[w_neg, w_pos], ignore_index=255
    pos, neg = (edges == 1).sum().item(), (edges == 0).sum().item()
    w = torch.tensor([pos, neg], dtype=torch.float64) / (pos + neg)
    up = F.interpolate(z.detach(), size=edges.shape[-2:], mode="bilinear", align_corners=True)
    torch.testing.assert_close(got.detach(), F.cross_entropy(up, edges, w, ignore_index=255))


def test_edge_loss_no_edges_is_zero():
    z = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    edges = torch.zeros(1, 9, 9, dtype=torch.int64)
    loss = edge_loss(z, edges)
    assert loss.item() == 0.0  # upstream: NaN (0 / 0)
    loss.backward()
    assert torch.isfinite(z.grad).all()


# --------------------------------------------------------------------------- C++ CPU kernel
def edge_reference_steps(labels):
    """SPEC section 3 step by step on int64 numbers (no conv): the four rules,
    then the 3x3 box dilation as an explicit neighbourhood OR."""
    L = labels.long().tolist()
    n, h, w = labels.shape
    out = torch.zeros((n, h, w), dtype=torch.int64)
    for i in range(n):
        raw = [[0] * w for _ in range(h)]
        for y in range(h):
            for x in range(w):
                a = L[i][y][x]
                for yy, xx, ok in ((y - 1, x, y >= 1), (y, x + 1, x < w - 1),
                                   (y + 1, x + 1, y < h - 1 and x < w - 1),
                                   (y + 1, x - 1, y < h - 1 and x >= 1)):
                    if ok and a != 255 and L[i][yy][xx] != 255 and a != L[i][yy][xx]:
                        raw[y][x] = 1
        for y in range(h):
            for x in range(w):
                out[i, y, x] = int(any(raw[yy][xx] for yy in range(max(0, y - 1), min(h, y + 2))
                                       for xx in range(max(0, x - 1), min(w, x + 2))))
    return out


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 13), (2, 11, 1), (3, 9, 14), (2, 17, 23),
                                   (1, 40, 3)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_cpp_kernel_matches_steps(shape, dtype):
    lab = blobby_labels(*shape, seed=11 + sum(shape), dtype=dtype)
    before = lab.clone()
    out = torch.ops.lipfast.generate_edge(lab, 3)
    assert out.dtype == torch.int64 and out.shape == lab.shape and out.is_contiguous()
    torch.testing.assert_close(out, edge_reference_steps(lab), rtol=0, atol=0)
    torch.testing.assert_close(lab, before, rtol=0, atol=0)  # input untouched


def test_cpp_kernel_special_inputs():
    # all ignored, single differing pixel surrounded by ignore, uniform
    for lab in (torch.full((2, 7, 9), 255, dtype=torch.uint8),
                torch.full((1, 1, 5), 255, dtype=torch.int64),
                torch.full((2, 6, 5), 7, dtype=torch.int64)):
        assert torch.ops.lipfast.generate_edge(lab, 3).sum() == 0
    lab = torch.full((1, 5, 6), 255, dtype=torch.int64)
    lab[0, 2, 2], lab[0, 2, 3] = 1, 2  # raw edge at (2, 2) only (rule "x < W-1")
    expect = torch.zeros(1, 5, 6, dtype=torch.int64)
    expect[0, 1:4, 1:4] = 1
    torch.testing.assert_close(torch.ops.lipfast.generate_edge(lab, 3), expect)
    # labels beyond uint8 range and negative values compare as integers
    lab = torch.tensor([[[300, 300, -1], [300, 44, 255]]], dtype=torch.int64)
    torch.testing.assert_close(torch.ops.lipfast.generate_edge(lab, 3),
                               edge_reference_steps(lab), rtol=0, atol=0)
    # empty image
    for shape, dt in (((0, 4, 4), torch.uint8), ((2, 0, 4), torch.int64), ((1, 3, 0), torch.int32)):
        out = torch.ops.lipfast.generate_edge(torch.zeros(shape, dtype=dt), 3)
        assert out.shape == shape and out.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_cpp_kernel_non_contiguous(dtype):
    big = blobby_labels(3, 26, 31, seed=12, dtype=dtype)
    for view in (big.transpose(1, 2), big[:, 1::3, ::2], big[::2, :, 5:], big.flip(2)[:, :, :-1]):
        ref = edge_reference_steps(view.contiguous())
        torch.testing.assert_close(torch.ops.lipfast.generate_edge(view, 3), ref, rtol=0, atol=0)
    # expanded (stride 0) batch
    one = blobby_labels(1, 9, 10, seed=13, dtype=dtype).expand(3, 9, 10)
    torch.testing.assert_close(torch.ops.lipfast.generate_edge(one, 3),
                               edge_reference_steps(one.contiguous()), rtol=0, atol=0)


def test_cpp_kernel_threads_and_large():
    # many rows, chunks of rows per thread: the result must not depend on threads
    lab = blobby_labels(2, 97, 61, seed=14, dtype=torch.uint8)
    ref = edge_reference(lab)
    old = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            torch.testing.assert_close(torch.ops.lipfast.generate_edge(lab, 3), ref, rtol=0,
                                       atol=0)
    finally:
        torch.set_num_threads(old)


def test_cpp_kernel_bad_input():
    lab = blobby_labels(1, 5, 6, seed=15)
    with pytest.raises(ValueError, match="edge_width=3"):
        torch.ops.lipfast.generate_edge(lab, 5)
    with pytest.raises(ValueError, match="B x H x W"):
        torch.ops.lipfast.generate_edge(lab[0], 3)
    with pytest.raises(TypeError, match="integer labels"):
        torch.ops.lipfast.generate_edge(lab.float(), 3)
    with pytest.raises(TypeError, match="integer labels"):
        torch.ops.lipfast.generate_edge(lab.bool(), 3)
    with pytest.raises(TypeError, match="integer labels"):
        generate_edge(lab.to(torch.int8))


@pytest.mark.parametrize("dynamic", [False, True])
def test_generate_edge_compile(dynamic):
    torch._dynamo.reset()

    def f(lab):
        return generate_edge(lab).sum(dim=(1, 2))

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for shape in ((2, 9, 13), (1, 12, 7)):
        lab = blobby_labels(*shape, seed=16, dtype=torch.uint8)
        torch.testing.assert_close(cf(lab), edge_reference(lab).sum(dim=(1, 2)))


def test_edge_loss_double_backward_raises():
    lab = blobby_labels(2, 15, 13, seed=18)
    z = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(edge_loss(z, generate_edge(lab)), z, create_graph=True)
    with pytest.raises(NotImplementedError, match="upsample_ce_backward"):
        torch.autograd.grad(g.square().sum(), z)


# --------------------------------------------------------------------------- CUDA
# generate_edge: the Triton kernel against the C++ CPU kernel (itself checked
# against the SPEC steps above) and, on small inputs, the steps directly; exact.
# edge_loss: against edge_loss_reference on a float64 CPU copy of the same
# (rounded) logits; float32 math inside for every non-float64 dtype, so the
# loss is good to 1e-5; the gradient (logits' dtype) to 1e-5 (float32) / 1e-2
# (half types) of its largest entry.


def _cuda_edge_views(lab):
    """Non-contiguous views of a CUDA label tensor (and their CPU copies)."""
    views = [lab.transpose(1, 2), lab[:, 1::3, ::2], lab[::2, :, 5:], lab.flip(2)[:, :, :-1]]
    return [v for v in views if v.numel() > 0]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_cuda_generate_edge_matches_cpu(dtype):
    for shape in [(1, 1, 1), (1, 1, 13), (2, 11, 1), (3, 9, 14), (2, 17, 23), (1, 40, 3),
                  (2, 119, 121), (1, 473, 473)]:
        lab = blobby_labels(*shape, seed=sum(shape), dtype=dtype)
        before = lab.clone()
        out = generate_edge(lab.cuda())
        assert out.device.type == "cuda" and out.dtype == torch.int64 and out.shape == lab.shape
        ref = generate_edge(lab)
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)
        if lab.numel() <= 2000:
            torch.testing.assert_close(out.cpu(), edge_reference_steps(lab), rtol=0, atol=0)
        torch.testing.assert_close(lab, before, rtol=0, atol=0)
    big = blobby_labels(3, 26, 31, seed=12, dtype=dtype)
    bigc = big.cuda()
    for view in _cuda_edge_views(bigc):
        torch.testing.assert_close(generate_edge(view).cpu(),
                                   edge_reference_steps(view.cpu().contiguous()), rtol=0, atol=0)
    one = blobby_labels(1, 9, 10, seed=13, dtype=dtype).cuda().expand(3, 9, 10)
    torch.testing.assert_close(generate_edge(one).cpu(),
                               edge_reference_steps(one.cpu().contiguous()), rtol=0, atol=0)
    # 2-D input keeps its shape
    torch.testing.assert_close(generate_edge(bigc[0]).cpu(), generate_edge(big[0]), rtol=0,
                               atol=0)


@pytest.mark.cuda
def test_cuda_generate_edge_special_inputs():
    for lab in (torch.full((2, 7, 9), 255, dtype=torch.uint8),
                torch.full((2, 6, 5), 7, dtype=torch.int64)):
        assert generate_edge(lab.cuda()).sum().item() == 0
    lab = torch.full((1, 5, 6), 255, dtype=torch.int64)
    lab[0, 2, 2], lab[0, 2, 3] = 1, 2
    expect = torch.zeros(1, 5, 6, dtype=torch.int64)
    expect[0, 1:4, 1:4] = 1
    torch.testing.assert_close(generate_edge(lab.cuda()).cpu(), expect, rtol=0, atol=0)
    lab = torch.tensor([[[300, 300, -1], [300, 44, 255]]], dtype=torch.int64)
    torch.testing.assert_close(generate_edge(lab.cuda()).cpu(), edge_reference_steps(lab),
                               rtol=0, atol=0)
    for shape, dt in (((0, 4, 4), torch.uint8), ((2, 0, 4), torch.int64),
                      ((1, 3, 0), torch.int32)):
        out = generate_edge(torch.zeros(shape, dtype=dt, device="cuda"))
        assert out.shape == shape and out.dtype == torch.int64 and out.device.type == "cuda"
    with pytest.raises(TypeError, match="integer labels"):
        generate_edge(torch.zeros(1, 4, 4, device="cuda"))
    with pytest.raises(ValueError, match="edge_width=3"):
        generate_edge(torch.zeros(1, 4, 4, dtype=torch.uint8, device="cuda"), 5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
def test_cuda_edge_loss_matches_reference(dtype, label_dtype):
    g = torch.Generator().manual_seed(1)
    lab = blobby_labels(2, 119, 97, seed=3)
    edges = generate_edge(lab)
    z = torch.randn(2, 2, 31, 25, generator=g).to(dtype)
    zr = z.double().requires_grad_()
    ref = edge_loss_reference(zr, edges)
    gr, = torch.autograd.grad(ref, zr)
    e_cuda = edges.to("cuda", label_dtype)
    for layout in ("contiguous", "channels_last", "sliced"):
        zc = z.cuda()
        if layout == "channels_last":
            zc = zc.contiguous(memory_format=torch.channels_last)
        elif layout == "sliced":
            zc = torch.stack([zc, zc], -1)[..., 0]  # same values, strided
        za = zc.clone().requires_grad_()
        got = edge_loss(za, e_cuda)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got.detach().cpu().double(), ref.detach(), atol=tol, rtol=tol)
        ga, = torch.autograd.grad(got, za)
        assert ga.dtype == dtype
        gtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
        s = float(gr.abs().max())
        torch.testing.assert_close(ga.cpu().double() / s, gr / s, atol=gtol, rtol=gtol)


@pytest.mark.cuda
def test_cuda_edge_loss_no_edges_is_zero():
    z = torch.randn(1, 2, 4, 4, device="cuda", requires_grad=True)
    loss = edge_loss(z, torch.zeros(1, 9, 9, dtype=torch.int64, device="cuda"))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


@pytest.mark.cuda
def test_cuda_generate_edge_and_edge_loss_no_host_sync():
    lab = blobby_labels(2, 121, 117, seed=5, dtype=torch.uint8).cuda()
    z = torch.randn(2, 2, 31, 30, device="cuda")

    def step():
        edges = generate_edge(lab)
        za = z.clone().requires_grad_()
        loss = edge_loss(za, edges)
        loss.backward()
        return edges, loss, za.grad

    ref, got = twice_without_sync(step)  # warm-up (Triton compile, bilinear tables)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_generate_edge_opcheck_and_compile():
    for dtype in (torch.uint8, torch.int64):
        lab = blobby_labels(2, 9, 10, seed=1, dtype=dtype).cuda()
        torch.library.opcheck(torch.ops.lipfast.generate_edge.default, (lab, 3))
    torch._dynamo.reset()

    def f(lab):
        return generate_edge(lab).sum(dim=(1, 2))

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    lab = blobby_labels(2, 12, 7, seed=16, dtype=torch.uint8)
    torch.testing.assert_close(cf(lab.cuda()).cpu(), edge_reference(lab).sum(dim=(1, 2)))
