"""lipfast.losses.generate_edge / edge_loss against references written from
SPEC section 3 (SCHP's generate_edge_tensor: float labels, four rules, a 3x3
all-ones float conv). The Triton kernel runs on CPU tensors under
TRITON_INTERPRET=1 (conftest.py) when there is no GPU."""

import pytest
import torch
import torch.nn.functional as F

from lipfast.losses import edge_loss, generate_edge

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
    from lipfast.losses.edge import _edge_torch

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
