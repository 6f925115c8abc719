"""lipfast.ops.oc_attention against the eager reference (SPEC section 1):
the op on the CPU path, and the Triton kernels directly (on a GPU, or on CPU
tensors through TRITON_INTERPRET=1, which conftest.py switches on without a GPU)."""

import sys

import pytest
import torch

import lipfast
from lipfast.ops import oc_attention, pyramid_regions

from oc_reference import oc_attention_reference
from cuda_checks import twice_without_sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP_MODULE = sys.modules["lipfast.ops.oc_attention"]  # the module (the package re-exports the function)


@pytest.fixture(params=["flash", "tiled"])
def cpu_impl(request, monkeypatch):
    """Runs a test on each PyTorch implementation of the op: ATen's CPU flash
    kernel (the default on CPU) and the tiled path (CUDA float64, older torch)."""
    if request.param == "tiled":
        monkeypatch.setattr(OP_MODULE, "_cpu_flash", None)
    elif OP_MODULE._cpu_flash is None:
        pytest.skip("this torch has no CPU flash-attention kernel")
    return request.param


def tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-10)
    if dtype == torch.float32:
        return dict(rtol=2e-4, atol=2e-5)
    return dict(rtol=3e-2, atol=3e-2)


def inputs(b, dk, dv, h, w, dtype, device="cpu", seed=0, layout=None):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(b, dk, h, w, generator=g, dtype=torch.float64) * 0.8
    v = torch.randn(b, dv, h, w, generator=g, dtype=torch.float64)
    do = torch.randn(b, dv, h, w, generator=g, dtype=torch.float64)
    qk, v, do = (t.to(device, dtype) for t in (qk, v, do))
    if layout == "channels_last":
        qk = qk.contiguous(memory_format=torch.channels_last)
        v = v.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        qk = torch.cat([qk, qk], 3)[..., ::2]
        v = torch.cat([v, v], 1)[:, ::2]
    return qk, v, do


def reference_grads(qk, v, do, scale, regions):
    q = qk.detach().double().requires_grad_()
    vv = v.detach().double().requires_grad_()
    out = oc_attention_reference(q, vv, scale, regions)
    dq, dvv = torch.autograd.grad(out, (q, vv), do.double())
    return out.detach(), dq, dvv


CASES = [
    # b, dk, dv, h, w, regions
    (2, 6, 6, 7, 9, 0),
    (1, 5, 11, 13, 11, 0),  # batch 1, dk != dv
    (2, 4, 7, 13, 11, 3),  # pyramid regions of unequal size
    (1, 3, 5, 17, 17, 6),  # 6 x 6 regions, remainder in the last row/column
    (2, 8, 4, 5, 6, 1),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_cpu_matches_reference(case, dtype, cpu_impl):
    b, dk, dv, h, w, regions = case
    qk, v, do = inputs(b, dk, dv, h, w, dtype)
    scale = dk ** -0.5
    ref_out, ref_dq, ref_dv = reference_grads(qk, v, do, scale, regions)
    q = qk.clone().requires_grad_()
    vv = v.clone().requires_grad_()
    out = oc_attention(q, vv, scale, regions)
    assert out.dtype == dtype and out.shape == (b, dv, h, w)
    dq, dvv = torch.autograd.grad(out, (q, vv), do)
    for got, ref in ((out, ref_out), (dq, ref_dq), (dvv, ref_dv)):
        torch.testing.assert_close(got.double(), ref, **tol(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_op_non_contiguous_inputs(layout, cpu_impl):
    qk, v, do = inputs(2, 4, 6, 9, 7, torch.float64, layout=layout)
    assert not qk.is_contiguous() or not v.is_contiguous()
    ref_out, ref_dq, ref_dv = reference_grads(qk, v, do, 0.5, 2)
    q = qk.clone().requires_grad_()
    vv = v.clone().requires_grad_()
    out = oc_attention(q, vv, 0.5, 2)
    dq, dvv = torch.autograd.grad(out, (q, vv), do)
    for got, ref in ((out, ref_out), (dq, ref_dq), (dvv, ref_dv)):
        torch.testing.assert_close(got, ref, **tol(torch.float64))


def test_op_default_scale_is_key_channels_inverse_sqrt():
    qk, v, _ = inputs(1, 9, 3, 4, 5, torch.float64)
    torch.testing.assert_close(oc_attention(qk, v), oc_attention_reference(qk, v, 9 ** -0.5))


@pytest.mark.parametrize("regions", [0, 2])
def test_op_tiled_path_with_several_tiles(monkeypatch, regions):
    # Force several query tiles per region in the tiled path.
    monkeypatch.setattr(OP_MODULE, "_cpu_flash", None)
    monkeypatch.setattr(OP_MODULE, "_CPU_TILE_ELEMS", 40)
    qk, v, do = inputs(1, 3, 4, 9, 8, torch.float64)
    ref_out, ref_dq, ref_dv = reference_grads(qk, v, do, 0.7, regions)
    q = qk.clone().requires_grad_()
    vv = v.clone().requires_grad_()
    out = oc_attention(q, vv, 0.7, regions)
    dq, dvv = torch.autograd.grad(out, (q, vv), do)
    for got, ref in ((out, ref_out), (dq, ref_dq), (dvv, ref_dv)):
        torch.testing.assert_close(got, ref, **tol(torch.float64))


@pytest.mark.parametrize("regions", [0, 2])
def test_op_gradcheck(regions, cpu_impl):
    qk, v, _ = inputs(2, 3, 2, 4, 5, torch.float64, seed=4)
    assert torch.autograd.gradcheck(
        lambda a, b: oc_attention(a, b, 0.6, regions),
        (qk.requires_grad_(), v.requires_grad_()),
    )


def test_pyramid_regions_follow_ocnet():
    regs = pyramid_regions(97, 97, 6)
    assert len(regs) == 36
    heights = sorted({r1 - r0 for r0, r1, _, _ in regs})
    assert heights == [16, 17]
    assert regs[0] == (0, 16, 0, 16) and regs[5] == (0, 16, 80, 97) and regs[-1] == (80, 97, 80, 97)
    assert pyramid_regions(5, 7, 1) == [(0, 5, 0, 7)]
    covered = torch.zeros(61, 47, dtype=torch.int64)
    for r0, r1, c0, c1 in pyramid_regions(61, 47, 3):
        covered[r0:r1, c0:c1] += 1
    assert bool((covered == 1).all())


def test_opcheck():
    qk, v, _ = inputs(2, 4, 6, 5, 7, torch.float64)
    for regions in (0, 2):
        torch.library.opcheck(torch.ops.lipfast.oc_attention.default,
                              (qk.clone().requires_grad_(), v.clone().requires_grad_(), 0.5,
                               regions))
    out, lse = torch.ops.lipfast.oc_attention(qk, v, 0.5, 2)
    torch.library.opcheck(torch.ops.lipfast.oc_attention_backward.default,
                          (torch.randn_like(out), qk, v, out, lse, 0.5, 2))


def test_torch_compile_fullgraph():
    qk, v, do = inputs(2, 4, 6, 7, 5, torch.float32)

    def f(a, b):
        return oc_attention(a * 2, b, 0.3, 2).sin()

    q1, v1 = qk.clone().requires_grad_(), v.clone().requires_grad_()
    q2, v2 = qk.clone().requires_grad_(), v.clone().requires_grad_()
    expect = f(q1, v1)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q2, v2)
    torch.testing.assert_close(got, expect)
    (expect * do).sum().backward()
    (got * do).sum().backward()
    torch.testing.assert_close(q2.grad, q1.grad)
    torch.testing.assert_close(v2.grad, v1.grad)


def test_bad_input():
    qk, v, _ = inputs(1, 4, 5, 6, 6, torch.float32)
    with pytest.raises(ValueError, match="B x C x H x W"):
        oc_attention(qk[0], v[0])
    with pytest.raises(ValueError, match="share batch and spatial size"):
        oc_attention(qk, v[:, :, :5])
    with pytest.raises(TypeError, match="dtype"):
        oc_attention(qk, v.double())
    with pytest.raises(ValueError, match="do not fit"):
        oc_attention(qk, v, regions=7)
    with pytest.raises(ValueError, match="is on meta"):
        oc_attention(qk, v.to("meta"))
    with pytest.raises(TypeError, match="floating-point"):
        oc_attention(qk.long(), v.long())


# ------------------------------------------------- Triton kernels (GPU or interpreter)

triton = pytest.importorskip("triton")


def kernels():
    from lipfast.kernels import oc_attention as k

    return k


TRITON_CASES = [
    # b, dk, dv, h, w, regions, block (query/key tile, channel chunk)
    (2, 5, 7, 7, 9, 0, 16),  # N = 63: not a multiple of the tile
    (1, 20, 33, 13, 11, 3, 16),  # unequal regions, dk != dv, channel chunks
    (2, 8, 8, 6, 6, 2, 16),
    (1, 16, 40, 9, 10, 0, 32),
    (1, 4, 6, 11, 13, 6, 16),  # 6 x 6 regions smaller than a tile
]


@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_kernels_forward_backward(case, dtype):
    if DEVICE == "cuda" and dtype == torch.float64:
        pytest.skip("float64 on the GPU is served by the PyTorch path")
    b, dk, dv, h, w, regions, block = case
    qk, v, do = inputs(b, dk, dv, h, w, dtype, device=DEVICE)
    scale = dk ** -0.5
    k = kernels()
    torch.backends.cuda.matmul.allow_tf32 = False
    out, lse = k.forward(qk, v, scale, regions, block_m=block, block_n=block, block_d=16)
    dq, dvv = k.backward(do, qk, v, out, lse, scale, regions, block_m=block, block_n=block,
                         block_d=16)
    ref_out, ref_dq, ref_dv = reference_grads(qk.cpu(), v.cpu(), do.cpu(), scale, regions)
    for got, ref in ((out, ref_out), (dq, ref_dq), (dvv, ref_dv)):
        torch.testing.assert_close(got.double().cpu(), ref, **tol(dtype))
    # lse is the log-sum-exp of the scaled scores of each query's region
    x = qk.double().cpu()
    for r0, r1, c0, c1 in pyramid_regions(h, w, regions)[:2]:
        xr = x[:, :, r0:r1, c0:c1].flatten(2)
        ref_lse = torch.logsumexp(torch.einsum("bcn,bcm->bnm", xr, xr) * scale, -1)
        got_lse = lse.double().cpu().reshape(b, h, w)[:, r0:r1, c0:c1].flatten(1)
        torch.testing.assert_close(got_lse, ref_lse, **tol(dtype))


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_triton_kernels_strided_inputs(layout):
    qk, v, do = inputs(2, 6, 5, 9, 7, torch.float32, device=DEVICE, layout=layout)
    do = do.transpose(2, 3).contiguous().transpose(2, 3)  # strided grad too
    k = kernels()
    torch.backends.cuda.matmul.allow_tf32 = False
    out, lse = k.forward(qk, v, 0.4, 2, block_m=16, block_n=16, block_d=16)
    dq, dvv = k.backward(do, qk, v, out, lse, 0.4, 2, block_m=16, block_n=16, block_d=16)
    ref_out, ref_dq, ref_dv = reference_grads(qk.cpu(), v.cpu(), do.cpu(), 0.4, 2)
    for got, ref in ((out, ref_out), (dq, ref_dq), (dvv, ref_dv)):
        torch.testing.assert_close(got.double().cpu(), ref, **tol(torch.float32))


def test_triton_kernels_extreme_scores_stay_finite():
    # Large scores: the online softmax must not overflow.
    qk, v, do = inputs(1, 8, 4, 6, 5, torch.float32, device=DEVICE)
    qk = qk * 30
    k = kernels()
    out, lse = k.forward(qk, v, 1.0, 0, block_m=16, block_n=16, block_d=16)
    ref = oc_attention_reference(qk.double().cpu(), v.double().cpu(), 1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_op_matches_reference(dtype):
    qk, v, do = inputs(2, 64, 96, 23, 19, dtype, device="cuda")
    for regions in (0, 3):
        ref_out, ref_dq, ref_dv = reference_grads(qk.cpu(), v.cpu(), do.cpu(), 0.125, regions)
        q = qk.clone().requires_grad_()
        vv = v.clone().requires_grad_()
        out = oc_attention(q, vv, 0.125, regions)
        dq, dvv = torch.autograd.grad(out, (q, vv), do)
        t = tol(dtype) if dtype != torch.float32 else dict(rtol=2e-2, atol=2e-2)  # tf32
        for got, ref in ((out, ref_out), (dq, ref_dq), (dvv, ref_dv)):
            scale = max(1.0, ref.abs().max().item())
            torch.testing.assert_close(got.double().cpu() / scale, ref / scale, **t)


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtypes", [(90, ["bf16", "fp16", "fp32"]), (80, ["bf16"])])
def test_triton_kernels_compile_for_gpu(arch, dtypes, tmp_path):
    # The interpreter checks the kernels' logic; this checks that every
    # configuration that survives lipfast's pruning for the architecture compiles
    # to a cubin (Triton's ahead-of-time path, no GPU needed) within the block's
    # shared memory and without register spills (tests/triton_compile_check.py).
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lipfast.kernels import KERNEL_NAMES

    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "LIPFAST_TRITON_CONFIG")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    script = Path(__file__).with_name("triton_compile_check.py")
    res = subprocess.run([sys.executable, str(script), str(arch), *dtypes], env=env,
                         capture_output=True, text=True, timeout=900)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [[c.strip() for c in ln.split("|")] for ln in res.stdout.splitlines()
            if ln.startswith(f"sm_{arch} ")]
    assert rows and all(r[5].isdigit() for r in rows), res.stdout
    for name in KERNEL_NAMES:
        assert any(r[1] == name for r in rows), (name, res.stdout)
    # the pose kernels (one fixed configuration each, not autotuned)
    for name in ("heatmap_loss.fwd", "heatmap_loss.bwd", "pose_decode"):
        assert any(r[1] == name for r in rows), (name, res.stdout)
    for dtype in dtypes:
        assert any(r[1] == "heatmap_loss.fwd" and r[3] == dtype for r in rows), dtype
    # float kernels: every input dtype (oc_attention float32: both precisions)
    for dtype in dtypes:
        for name in ("oc_attention.fwd", "oc_attention.bwd_dv", "oc_attention.bwd_dx",
                     "upsample_ce.fwd", "upsample_ce.bwd", "confusion_matrix"):
            assert any(r[1] == name and r[3] == dtype for r in rows), (dtype, name, res.stdout)
        if dtype == "fp32":
            assert any(r[1] == "oc_attention.fwd" and r[3] == "fp32/tf32" for r in rows)
    # every configuration the pruning keeps for the main cases is compiled: more
    # than one configuration per kernel
    for name in KERNEL_NAMES:
        assert len({r[4] for r in rows if r[1] == name}) > 1, (name, res.stdout)


@pytest.mark.parametrize("regions", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_lse_output(regions, dtype, cpu_impl):
    qk, v, _ = inputs(2, 5, 3, 10, 9, dtype)
    qk = qk * 4  # peaked rows
    _, lse = torch.ops.lipfast.oc_attention(qk, v, 0.5, regions)
    x = qk.double()
    ref = torch.empty(2, 10, 9, dtype=torch.float64)
    for r0, r1, c0, c1 in pyramid_regions(10, 9, regions):
        xr = x[:, :, r0:r1, c0:c1].flatten(2)
        ref[:, r0:r1, c0:c1] = torch.logsumexp(torch.einsum("bcn,bcm->bnm", xr, xr) * 0.5,
                                               -1).reshape(2, r1 - r0, c1 - c0)
    torch.testing.assert_close(lse.double(), ref.flatten(1), **tol(dtype))


# ---------------------------------------------------------------------------
# CUDA: the registered op (Triton kernels; float64 -> tiled PyTorch path)
# against the float64 reference. float32 with TF32 off (tl.dot in "ieee"
# precision, see lipfast.kernels.oc_attention.dot_precision): tol(float32);
# half types: tol(float16/bfloat16), relative to the tensor's largest entry.


@pytest.fixture
def _cuda_no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _cuda_check_op(qk, v, do, scale, regions, dtype):
    q = qk.clone().requires_grad_()
    vv = v.clone().requires_grad_()
    out = oc_attention(q, vv, scale, regions)
    assert out.dtype == v.dtype and out.device.type == "cuda"
    assert out.shape == (qk.shape[0], v.shape[1], *qk.shape[2:])
    dq, dvv = torch.autograd.grad(out, (q, vv), do)
    assert dq.dtype == dtype and dvv.dtype == dtype
    ref_out, ref_dq, ref_dv = reference_grads(qk.cpu(), v.cpu(), do.cpu(), scale, regions)
    for name, got, ref in (("out", out, ref_out), ("dqk", dq, ref_dq), ("dv", dvv, ref_dv)):
        s = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got.detach().double().cpu() / s, ref / s, **tol(dtype),
                                   msg=lambda m, name=name: f"{name}: {m}")


CUDA_CASES = [
    # b, dk, dv, h, w, regions
    (2, 6, 6, 7, 9, 0),
    (1, 5, 11, 13, 11, 0),  # dk != dv, N not a multiple of a tile
    (2, 4, 7, 13, 11, 3),  # unequal pyramid regions
    (1, 3, 5, 17, 17, 6),  # 6 x 6 regions, remainder in the last row/column
    (2, 8, 4, 5, 6, 1),
    (2, 64, 128, 30, 30, 0),  # CE2P/ASP-OC-like widths, N = 900
    (1, 32, 64, 37, 41, 2),
    (1, 256, 256, 9, 11, 0),  # wide channels (several channel chunks)
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_op_cases(case, dtype, _cuda_no_tf32):
    b, dk, dv, h, w, regions = case
    qk, v, do = inputs(b, dk, dv, h, w, dtype, device="cuda", seed=h)
    _cuda_check_op(qk, v, do, dk ** -0.5, regions, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_strided_inputs(layout, dtype, _cuda_no_tf32):
    qk, v, do = inputs(2, 24, 40, 19, 17, dtype, device="cuda", layout=layout)
    assert not qk.is_contiguous() or not v.is_contiguous()
    do = do.transpose(2, 3).contiguous().transpose(2, 3)  # strided output gradient too
    for regions in (0, 3):
        _cuda_check_op(qk, v, do, 0.2, regions, dtype)


@pytest.mark.cuda
def test_cuda_op_tf32_default_close():
    # with TF32 allowed (a common training setting) the float32 result stays close
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        qk, v, do = inputs(2, 64, 96, 23, 19, torch.float32, device="cuda")
        ref_out = oc_attention_reference(qk.double().cpu(), v.double().cpu(), 0.125)
        out = oc_attention(qk, v, 0.125)
        torch.testing.assert_close(out.double().cpu(), ref_out, rtol=2e-2, atol=2e-2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_no_host_sync(dtype):
    qk, v, do = inputs(2, 32, 48, 29, 31, dtype, device="cuda")

    def step():
        q = qk.clone().requires_grad_()
        vv = v.clone().requires_grad_()
        out = oc_attention(q, vv, None, 0) + oc_attention(q, vv, None, 3)
        out.backward(do)
        return out, q.grad, vv.grad

    ref, got = twice_without_sync(step)  # warm-up: Triton compile, region tables built and cached
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_cuda_op_bad_input():
    qk, v, _ = inputs(1, 4, 6, 5, 7, torch.float32, device="cuda")
    with pytest.raises(TypeError, match="dtype"):
        oc_attention(qk, v.double())
    with pytest.raises(ValueError, match="on"):
        oc_attention(qk, v.cpu())
    with pytest.raises(ValueError, match="do not fit"):
        oc_attention(qk, v, 0.5, 6)
    with pytest.raises(ValueError, match="finite"):
        oc_attention(qk, v, float("nan"))


@pytest.mark.cuda
def test_cuda_opcheck_and_compile(_cuda_no_tf32):
    qk, v, do = inputs(2, 5, 6, 7, 9, torch.float32, device="cuda")
    for regions in (0, 3):
        torch.library.opcheck(torch.ops.lipfast.oc_attention.default,
                              (qk.clone().requires_grad_(), v.clone().requires_grad_(), 0.4,
                               regions))
    out, lse = torch.ops.lipfast.oc_attention(qk, v, 0.4, 3)
    torch.library.opcheck(torch.ops.lipfast.oc_attention_backward.default,
                          (do, qk, v, out, lse, 0.4, 3))

    def f(a, b):
        return oc_attention(a, b, 0.4, 0) + oc_attention(a, b, 0.4, 2)

    q1, v1 = qk.clone().requires_grad_(), v.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q1, v1)
    got.backward(do)
    q2, v2 = qk.clone().requires_grad_(), v.clone().requires_grad_()
    ref = f(q2, v2)
    ref.backward(do)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(q1.grad, q2.grad)
    torch.testing.assert_close(v1.grad, v2.grad)
