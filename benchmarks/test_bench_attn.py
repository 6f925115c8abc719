"""pytest-benchmark micro-benchmarks of the OCNet attention core on small CPU shapes.

Run: ``python -m pytest benchmarks/test_bench_attn.py --benchmark-only`` (``python -m
pytest tests`` and a bare ``python -m pytest`` do not collect this folder:
testpaths = tests).

Groups (compare within a group), one per shape and pass:
- ``attn-fwd-bwd-*``: forward + backward of the attention core alone (q = k), for
  ``lipfast.ops.oc_attention`` (fused: the N x N map never stored), the eager
  OCNet reference of ``benchmarks/attn.py`` (the B x N x N similarity map
  materialised; pyramid regions by a Python loop) and
  ``F.scaled_dot_product_attention`` (default CPU dispatch; pyramid regions
  through a dense block-diagonal boolean mask).
- ``attn-fwd-*``: the forward alone, under ``torch.no_grad()``.

Each benchmark first checks its result against the eager reference.
The full comparison (modules, memory, GPU) is ``python benchmarks/attn.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import lipfast  # noqa: F401  (loads the extension)

_spec = importlib.util.spec_from_file_location(
    "lipfast_bench_attn", Path(__file__).resolve().parent / "attn.py")
_attn = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _attn  # dataclasses look their module up there
_spec.loader.exec_module(_attn)

IMPLS = {
    "lipfast": _attn.lipfast_attention,
    "reference": _attn.eager_attention,
    "sdpa": _attn.sdpa_attention,
}
# name: (B, dk, dv, H, W, pyramid regions)
SHAPES = {
    "B2-d32-30x30": (2, 32, 32, 30, 30, 1),
    "B1-dk32-dv64-48x48": (1, 32, 64, 48, 48, 1),
    "B2-d32-30x30-regions3": (2, 32, 32, 30, 30, 3),
}
ROUNDS = 15
WARMUP = 2


def _data(shape, seed=0):
    b, dk, dv, h, w, _ = shape
    g = torch.Generator().manual_seed(seed)
    qk = 0.5 * torch.randn(b, dk, h, w, generator=g)
    v = torch.randn(b, dv, h, w, generator=g)
    gout = torch.randn(b, dv, h, w, generator=g)
    return qk, v, gout


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def shape_name(request):
    return request.param


@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_fwd_bwd(benchmark, shape_name, impl):
    shape = SHAPES[shape_name]
    benchmark.group = f"attn-fwd-bwd-{shape_name}"
    qk0, v0, gout = _data(shape)
    regions = shape[-1]
    scale = shape[1] ** -0.5
    fn = IMPLS[impl]
    qk, v = qk0.clone().requires_grad_(), v0.clone().requires_grad_()

    def run():
        qk.grad = v.grad = None
        fn(qk, v, scale, regions).backward(gout)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)

    rq, rv = qk0.clone().requires_grad_(), v0.clone().requires_grad_()
    _attn.eager_attention(rq, rv, scale, regions).backward(gout)
    torch.testing.assert_close(qk.grad, rq.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v.grad, rv.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_fwd(benchmark, shape_name, impl):
    shape = SHAPES[shape_name]
    benchmark.group = f"attn-fwd-{shape_name}"
    qk, v, _ = _data(shape)
    regions = shape[-1]
    scale = shape[1] ** -0.5
    fn = IMPLS[impl]

    def run():
        with torch.no_grad():
            return fn(qk, v, scale, regions)

    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    torch.testing.assert_close(out, _attn.eager_attention(qk, v, scale, regions), rtol=1e-4,
                               atol=1e-5)
