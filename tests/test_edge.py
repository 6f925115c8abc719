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


def test_generate_edge_opcheck():
    lab = blobby_labels(2, 9, 10, seed=1, dtype=torch.uint8)
    torch.library.opcheck(torch.ops.lipfast.generate_edge.default, (lab, 3))


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
