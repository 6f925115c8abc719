"""pytest-benchmark micro-benchmarks of In-Place ABN on small CPU shapes.

Run: ``python -m pytest benchmarks --benchmark-only`` (``python -m pytest tests``
and a bare ``python -m pytest`` do not collect this folder: testpaths = tests).

Groups (compare within a group):
- ``abn-fwd-bwd-*``: one training step of the layer alone, lipfast.InPlaceABN vs
  nn.BatchNorm2d + nn.LeakyReLU (out of place and inplace=True).
- ``op-*``: each compiled op forward only (the backward ops are ordinary forward
  calls too), beside the nearest ATen computation. ``op-backward-*`` holds
  abn_backward_reduce, abn_backward_elemt, both together, and as references the
  same two sums in ATen ops and leaky_relu_backward + native_batch_norm_backward
  (which, like reduce + elemt, is the whole backward).

Ops that write into their input get a fresh tensor every round through
``benchmark.pedantic(setup=...)`` (the copy is not timed).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipfast

ops = torch.ops.lipfast

SLOPE = 0.01
EPS = 1e-5
ACT = "leaky_relu"
SHAPES = {"4x64x32x32": (4, 64, 32, 32), "2x32x60x60": (2, 32, 60, 60)}
ROUNDS = 40
WARMUP = 3


def _data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.fixture(params=list(SHAPES), ids=list(SHAPES))
def shape(request):
    return SHAPES[request.param]


# --------------------------------------------------------------------------- layer, fwd + bwd


def _layer(kind: str, c: int) -> nn.Module:
    if kind == "lipfast InPlaceABN":
        return lipfast.InPlaceABN(c, eps=EPS, activation=ACT, activation_param=SLOPE).train()
    inplace = kind == "bn+leaky(inplace)"
    return nn.Sequential(nn.BatchNorm2d(c, eps=EPS), nn.LeakyReLU(SLOPE, inplace=inplace)).train()


@pytest.mark.parametrize("kind", ["bn+leaky", "bn+leaky(inplace)", "lipfast InPlaceABN"])
def test_layer_fwd_bwd(benchmark, shape, kind):
    benchmark.group = f"abn-fwd-bwd-{'x'.join(map(str, shape))}"
    base, gout = _data(shape)
    leaf = base.clone().requires_grad_()
    layer = _layer(kind, shape[1])

    def setup():
        # A fresh non-leaf input per round (in-place ABN overwrites it and refuses a
        # leaf that requires grad); the same for every kind so the graphs match.
        leaf.grad = None
        for p in layer.parameters():
            p.grad = None
        return (leaf.clone(),), {}

    def run(x):
        layer(x).backward(gout)

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


# --------------------------------------------------------------------------- ops, forward only


def _params(c):
    g = torch.Generator().manual_seed(1)
    w = torch.rand(c, generator=g) + 0.5
    b = 0.1 * torch.randn(c, generator=g)
    return w, b


def test_op_abn_stats(benchmark, shape):
    benchmark.group = f"op-stats-{'x'.join(map(str, shape))}"
    x, _ = _data(shape)
    mean, var = benchmark(ops.abn_stats, x)
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)


def test_aten_var_mean(benchmark, shape):
    """ATen reference for abn_stats."""
    benchmark.group = f"op-stats-{'x'.join(map(str, shape))}"
    x, _ = _data(shape)
    benchmark(torch.var_mean, x, dim=(0, 2, 3), unbiased=False)


def test_op_abn_forward_(benchmark, shape):
    benchmark.group = f"op-forward-{'x'.join(map(str, shape))}"
    base, _ = _data(shape)
    w, b = _params(shape[1])
    mean, var = ops.abn_stats(base)

    def setup():
        return (base.clone(), mean, var, w, b, EPS, ACT, SLOPE), {}

    benchmark.pedantic(ops.abn_forward_, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP,
                       iterations=1)


def test_aten_batch_norm_leaky_(benchmark, shape):
    """ATen reference for abn_forward_: batch_norm with given statistics, then an
    in-place leaky_relu (batch_norm itself allocates its output)."""
    benchmark.group = f"op-forward-{'x'.join(map(str, shape))}"
    base, _ = _data(shape)
    w, b = _params(shape[1])
    mean, var = ops.abn_stats(base)
    w_eff = w.abs() + EPS

    def run(x):
        F.leaky_relu_(F.batch_norm(x, mean, var, w_eff, b, False, 0.0, EPS), SLOPE)

    def setup():
        return (base.clone(),), {}

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


def _backward_inputs(shape):
    x, dy = _data(shape)
    w, b = _params(shape[1])
    mean, var = ops.abn_stats(x)
    y = x.clone()
    ops.abn_forward_(y, mean, var, w, b, EPS, ACT, SLOPE)
    return y, dy, var, w, b


def test_op_abn_backward_reduce(benchmark, shape):
    benchmark.group = f"op-backward-{'x'.join(map(str, shape))}"
    y, dy, _, w, b = _backward_inputs(shape)
    benchmark(ops.abn_backward_reduce, y, dy, w, b, EPS, ACT, SLOPE)


def test_aten_backward_reduce(benchmark, shape):
    """ATen reference for abn_backward_reduce: the same two per-channel sums
    (sum dz, sum x_hat dz) with the activation inverted elementwise."""
    benchmark.group = f"op-backward-{'x'.join(map(str, shape))}"
    y, dy, _, w, b = _backward_inputs(shape)
    w_eff = (w.abs() + EPS).view(1, -1, 1, 1)
    bv = b.view(1, -1, 1, 1)

    def run():
        neg = y < 0
        dz = torch.where(neg, dy * SLOPE, dy)
        z = torch.where(neg, y / SLOPE, y)
        return dz.sum((0, 2, 3)), ((z - bv) / w_eff * dz).sum((0, 2, 3))

    s_dz, s_xdz = benchmark(run)
    got = ops.abn_backward_reduce(y, dy, w, b, EPS, ACT, SLOPE)
    torch.testing.assert_close(got[0], s_dz, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[1], s_xdz, rtol=1e-3, atol=1e-3)


def test_op_abn_backward_elemt(benchmark, shape):
    benchmark.group = f"op-backward-{'x'.join(map(str, shape))}"
    y, dy, var, w, b = _backward_inputs(shape)
    s_dz, s_xdz = ops.abn_backward_reduce(y, dy, w, b, EPS, ACT, SLOPE)
    count = y.numel() // y.shape[1]
    benchmark(ops.abn_backward_elemt, y, dy, var, w, b, s_dz / count, s_xdz / count, EPS, ACT,
              SLOPE)


def test_op_abn_backward_reduce_and_elemt(benchmark, shape):
    """Both backward ops, as InPlaceABNFunction.backward runs them."""
    benchmark.group = f"op-backward-{'x'.join(map(str, shape))}"
    y, dy, var, w, b = _backward_inputs(shape)
    count = y.numel() // y.shape[1]

    def run():
        s_dz, s_xdz = ops.abn_backward_reduce(y, dy, w, b, EPS, ACT, SLOPE)
        return ops.abn_backward_elemt(y, dy, var, w, b, s_dz / count, s_xdz / count, EPS, ACT,
                                      SLOPE)

    benchmark(run)


def test_aten_native_batch_norm_backward(benchmark, shape):
    """ATen reference for the whole ABN backward (reduce + elemt): leaky_relu
    backward then native_batch_norm_backward from the saved input."""
    benchmark.group = f"op-backward-{'x'.join(map(str, shape))}"
    x, dy = _data(shape)
    w, b = _params(shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z, save_mean, save_invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, EPS)
    y = F.leaky_relu(z, SLOPE)

    def run():
        dz = torch.ops.aten.leaky_relu_backward(dy, y, SLOPE, True)
        return torch.ops.aten.native_batch_norm_backward(
            dz, x, w, None, None, save_mean, save_invstd, True, EPS, [True, True, True])

    benchmark(run)
