"""pytest-benchmark micro-benchmarks of the upsampled cross-entropy on small CPU shapes.

Run: ``python -m pytest benchmarks/test_bench_upsample_ce.py --benchmark-only``
(``python -m pytest tests`` does not collect this folder: testpaths = tests).

Groups (compare within a group), one per shape and pass:
- ``upce-fwd-bwd-*``: forward + backward of the loss, for
  ``lipfast.losses.upsample_cross_entropy`` (the B x C x H x W upsampled logits
  never stored) and the reference ``F.cross_entropy(F.interpolate(...))``.
- ``upce-fwd-*``: the forward alone, under ``torch.no_grad()``.

Each benchmark first checks its result against the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lipfast.losses import upsample_cross_entropy


def reference(x, y, align_corners=True):
    up = F.interpolate(x, y.shape[-2:], mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(up, y.long(), ignore_index=255)


IMPLS = {"lipfast": upsample_cross_entropy, "reference": reference}
# name: (B, C, h, w, H, W)
SHAPES = {
    "B2-C20-31x31-to-121x121": (2, 20, 31, 31, 121, 121),
    "B1-C20-60x60-to-237x237": (1, 20, 60, 60, 237, 237),
    "B4-C2-31x31-to-121x121": (4, 2, 31, 31, 121, 121),
}
ROUNDS = 10
WARMUP = 2


def _data(shape, seed=0):
    b, c, h, w, hh, ww = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    y = torch.randint(0, c, (b, hh, ww), generator=g)
    y[torch.rand(b, hh, ww, generator=g) < 0.1] = 255
    return x, y.to(torch.uint8)


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def shape_name(request):
    return request.param


@pytest.mark.parametrize("impl", list(IMPLS))
def test_upsample_ce_fwd_bwd(benchmark, shape_name, impl):
    benchmark.group = f"upce-fwd-bwd-{shape_name}"
    x0, y = _data(SHAPES[shape_name])
    fn = IMPLS[impl]
    x = x0.clone().requires_grad_()

    def run():
        x.grad = None
        fn(x, y).backward()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    xr = x0.clone().requires_grad_()
    reference(xr, y).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_upsample_ce_fwd(benchmark, shape_name, impl):
    benchmark.group = f"upce-fwd-{shape_name}"
    x, y = _data(SHAPES[shape_name])
    fn = IMPLS[impl]

    def run():
        with torch.no_grad():
            return fn(x, y)

    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    torch.testing.assert_close(out, reference(x, y), rtol=1e-5, atol=1e-5)
