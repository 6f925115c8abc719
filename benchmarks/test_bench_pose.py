"""pytest-benchmark micro-benchmarks of the pose heatmap loss on small CPU shapes.

Run: ``python -m pytest benchmarks/test_bench_pose.py --benchmark-only``
(``python -m pytest tests`` does not collect this folder: testpaths = tests).

Groups (compare within a group), one per shape: forward + backward of the
heatmap loss for the implementations of ``benchmarks/pose.py`` (lipfast's fused
op, torch-generated targets + JointsMSELoss, upstream's numpy targets +
JointsMSELoss, JointsMSELoss alone on targets made beforehand). Each benchmark
first checks its loss and gradient against a float64 evaluation of the
reference rule.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pose  # noqa: E402

# name: (B, J, image_size, heatmap_size, sigma)
SHAPES = {
    "B4-J16-64x64-sigma2": (4, 16, (256, 256), (64, 64), 2.0),
    "B4-J16-96x72-sigma3": (4, 16, (288, 384), (72, 96), 3.0),
}
ROUNDS = 10
WARMUP = 2


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", list(pose.LOSS_IMPLS))
def test_heatmap_loss_fwd_bwd(benchmark, shape_name, impl):
    benchmark.group = f"pose-loss-fwd-bwd-{shape_name}"
    b, j, image_size, heatmap_size, sigma = SHAPES[shape_name]
    x, joints, visible = pose.make_inputs(b, j, image_size, heatmap_size)
    x.requires_grad_()
    fn = pose.loss_impls(x, joints, visible, image_size, heatmap_size, sigma,
                         torch.device("cpu"))[impl]
    benchmark.pedantic(lambda: pose.step(fn, x), rounds=ROUNDS, warmup_rounds=WARMUP,
                       iterations=1)
    out = pose.step(fn, x)
    xr = x.detach().double().requires_grad_()
    t, w = pose.torch_targets(joints, visible, image_size, heatmap_size, sigma)
    ref = pose.joints_mse_loss(xr, t.double(), w.double())
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-9)
