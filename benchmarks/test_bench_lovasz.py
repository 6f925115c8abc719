"""pytest-benchmark micro-benchmarks of the Lovász-Softmax loss on small CPU shapes.

Run: ``python -m pytest benchmarks/test_bench_lovasz.py --benchmark-only`` (``python -m
pytest tests`` and a bare ``python -m pytest`` do not collect this folder:
testpaths = tests).

Groups (compare within a group), one per shape and setting:
- ``lovasz-fwd-bwd-*``: softmax + loss + backward to the logits, for
  ``lipfast.losses.lovasz_softmax`` (one op; on CPU the C++ kernel: per
  class a radix sort of the valid pixels' errors, the Jaccard gradient and the
  gradient written straight to the pixels, classes in parallel) and the eager reference (Berman's formulation: boolean
  masking of ignored pixels, a Python loop over classes with one sort each,
  autograd through the sorted errors).
- ``lovasz-fwd-*``: the forward alone, under ``torch.no_grad()``.

Each benchmark first checks its result against the eager reference.
"""

from __future__ import annotations

import pytest
import torch

import lipfast  # noqa: F401  (loads the extension)
from lipfast.losses.lovasz import lovasz_softmax


def _grad(gt_sorted):
    gts = gt_sorted.sum()
    inter = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jac = 1.0 - inter / union
    if len(gt_sorted) > 1:
        jac[1:] = jac[1:] - jac[:-1]
    return jac


def eager_lovasz(logits, labels, classes="present", per_image=False, ignore_index=255):
    """Berman et al.'s Lovász-Softmax (per-class loop), on logits."""
    probas = torch.softmax(logits, 1)

    def flat(p, y):
        c = p.shape[1]
        p = p.permute(0, 2, 3, 1).reshape(-1, c)
        y = y.reshape(-1).long()
        valid = y != ignore_index
        p, y = p[valid], y[valid]
        if p.numel() == 0:
            return p.sum() * 0.0
        losses = []
        for k in range(c):
            fg = (y == k).to(p.dtype)
            if classes == "present" and fg.sum() == 0:
                continue
            err = (fg - p[:, k]).abs()
            err_sorted, perm = torch.sort(err, 0, descending=True)
            losses.append(torch.dot(err_sorted, _grad(fg[perm])))
        return torch.stack(losses).mean() if losses else p.sum() * 0.0

    if per_image:
        return torch.stack([flat(probas[i : i + 1], labels[i : i + 1])
                            for i in range(logits.shape[0])]).mean()
    return flat(probas, labels)


def lipfast_lovasz(logits, labels, classes="present", per_image=False, ignore_index=255):
    return lovasz_softmax(logits, labels, classes=classes, per_image=per_image,
                          ignore_index=ignore_index)


IMPLS = {"lipfast": lipfast_lovasz, "reference": eager_lovasz}
# name: (B, C, H, W, per_image)
SHAPES = {
    "B2-C20-64x64": (2, 20, 64, 64, False),
    "B4-C20-65x47-per_image": (4, 20, 65, 47, True),
    "B1-C7-128x96": (1, 7, 128, 96, False),
}
ROUNDS = 15
WARMUP = 2


def _data(shape, seed=0):
    b, c, h, w, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(b, c, h, w, generator=g)
    y = torch.randint(0, c, (b, h, w), generator=g)
    y[torch.rand(b, h, w, generator=g) < 0.1] = 255
    return x, y.to(torch.uint8)


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def shape_name(request):
    return request.param


@pytest.mark.parametrize("impl", list(IMPLS))
def test_lovasz_fwd_bwd(benchmark, shape_name, impl):
    shape = SHAPES[shape_name]
    benchmark.group = f"lovasz-fwd-bwd-{shape_name}"
    x0, y = _data(shape)
    per_image = shape[-1]
    fn = IMPLS[impl]
    x = x0.clone().requires_grad_()

    def run():
        x.grad = None
        fn(x, y, per_image=per_image).backward()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)

    xr = x0.double().requires_grad_()
    eager_lovasz(xr, y, per_image=per_image).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_lovasz_fwd(benchmark, shape_name, impl):
    shape = SHAPES[shape_name]
    benchmark.group = f"lovasz-fwd-{shape_name}"
    x, y = _data(shape)
    per_image = shape[-1]
    fn = IMPLS[impl]

    def run():
        with torch.no_grad():
            return fn(x, y, per_image=per_image)

    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    torch.testing.assert_close(out.double(), eager_lovasz(x.double(), y, per_image=per_image),
                               rtol=1e-5, atol=1e-6)
