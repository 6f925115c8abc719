"""lipfast.ops.parse_postprocess (``lipfast::parse_postprocess``, SCHP's in-the-wild
post-processing fused) against an unfused reference written here: F.interpolate
(align_corners=True) to the input size, then an explicit float64 bilinear warp
with zero border (4 taps per output pixel), then argmax / softmax. float64:
labels equal, maps to 1e-12; float32: labels equal except where the reference's
top-2 gap is < 1e-4, maps to 2e-5. Also the PyTorch path, the Triton kernel
(CPU tensors under TRITON_INTERPRET=1, conftest.py, without a GPU; on a GPU the
compiled kernel, and the op's CUDA dispatch in a ``cuda`` test), opcheck,
torch.compile (aot_eager, static and dynamic shapes; inductor in a ``slow``
test), bad inputs and SCHP's own composition with OpenCV.

``python tests/test_parse_postprocess.py`` prints CPU timings against SCHP's
composition (F.interpolate, then one cv2.warpAffine per channel, np.argmax).
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lipfast.ops import parse_postprocess

PP = importlib.import_module("lipfast.ops.parse_postprocess")
OP = torch.ops.lipfast.parse_postprocess
F32_GAP = 1e-4
F32_TOL = dict(rtol=2e-5, atol=2e-5)
F64_TOL = dict(rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- reference

def reference(logits, affine, in_size, out_size):
    """V (K x C x out_h x out_w, float64), step by step as SCHP does it."""
    x = logits.double()
    k, c = x.shape[:2]
    in_h, in_w = in_size
    out_h, out_w = out_size
    u = F.interpolate(x, (in_h, in_w), mode="bilinear", align_corners=True) if k else x
    v = torch.zeros(k, c, out_h, out_w, dtype=torch.float64)
    ys = torch.arange(out_h, dtype=torch.float64)[:, None].expand(out_h, out_w)
    xs = torch.arange(out_w, dtype=torch.float64)[None, :].expand(out_h, out_w)
    for i in range(k):
        ax, bx, ay, by = affine[i].tolist()
        qx, qy = ax * xs + bx, ay * ys + by
        x0, y0 = qx.floor(), qy.floor()
        fx, fy = qx - x0, qy - y0
        for dy in (0, 1):
            for dx in (0, 1):
                yy = y0.long() + dy
                xx = x0.long() + dx
                wgt = (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
                ok = (yy >= 0) & (yy < in_h) & (xx >= 0) & (xx < in_w)
                val = u[i][:, yy.clamp(0, in_h - 1), xx.clamp(0, in_w - 1)]
                v[i] += torch.where(ok, wgt, torch.zeros_like(wgt)) * val
    return v


def top2_gap(v):
    if v.shape[1] < 2:
        return torch.full((v.shape[0],) + v.shape[2:], float("inf"), dtype=v.dtype)
    t = v.topk(2, dim=1).values
    return t[:, 0] - t[:, 1]


def check(out, v, dtype, maps, fg):
    labels, m, f = out
    assert labels.dtype == torch.uint8 and labels.shape == (v.shape[0],) + v.shape[2:]
    ref_lab = v.argmax(1)
    if dtype == torch.float64:
        assert torch.equal(labels.long(), ref_lab)
    else:
        bad = (labels.long() != ref_lab) & (top2_gap(v) >= F32_GAP)
        assert not bad.any(), f"{int(bad.sum())} labels differ with a top-2 gap >= {F32_GAP}"
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    p = torch.softmax(v, 1)
    if maps is None:
        assert m is None
    else:
        assert m.dtype == dtype and m.shape == v.shape
        torch.testing.assert_close(m.double(), p if maps == "probs" else v, **tol)
    if fg:
        assert f.dtype == dtype and f.shape == labels.shape
        torch.testing.assert_close(f.double(), 1 - p[:, 0], **tol)
    else:
        assert f is None


def random_affines(k, in_size, out_size, g):
    """Rows (ax, bx, ay, by): scale-up, scale-down and offsets that put parts of
    the output outside the input frame (zero border)."""
    in_h, in_w = in_size
    out_h, out_w = out_size
    rows = []
    for i in range(k):
        s = [1.0, 0.45, 2.2, 1.3][i % 4] * (0.9 + 0.2 * torch.rand(1, generator=g).item())
        ax = (in_w - 1) / max(out_w - 1, 1) * s
        ay = (in_h - 1) / max(out_h - 1, 1) * s * (0.8 + 0.4 * torch.rand(1, generator=g).item())
        bx = (torch.rand(1, generator=g).item() - 0.5) * 0.8 * in_w
        by = (torch.rand(1, generator=g).item() - 0.5) * 0.8 * in_h
        rows.append([ax, bx, ay, by])
    return torch.tensor(rows, dtype=torch.float64).reshape(k, 4)


def logits_of(k, c, h, w, g, dtype):
    return (torch.randn(k, c, h, w, generator=g, dtype=torch.float64) * 3).to(dtype)


# (K, C, h, w, in size, out size)
SHAPES = [
    (1, 5, 7, 5, (13, 11), (17, 23)),  # odd sizes
    (3, 20, 9, 8, (9, 8), (15, 12)),  # in size == logits size: no upsample
    (3, 20, 11, 10, (37, 31), (24, 29)),
    (2, 2, 1, 1, (1, 1), (3, 4)),  # 1 x 1 everything
    (1, 1, 4, 6, (7, 1), (5, 1)),  # C = 1, in_w = 1, out_w = 1
    (2, 256, 3, 4, (5, 7), (4, 6)),  # C = 256
    (1, 3, 1, 5, (4, 9), (1, 1)),  # h = 1, out 1 x 1
    (3, 7, 6, 1, (1, 17), (8, 9)),  # w = 1, in_h = 1
    (0, 4, 5, 5, (9, 9), (6, 7)),  # K = 0
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_cpu_against_reference(shape, dtype):
    k, c, h, w, ins, outs = shape
    g = torch.Generator().manual_seed(k * 1000 + c * 10 + h + w)
    x = logits_of(k, c, h, w, g, dtype)
    aff = random_affines(k, ins, outs, g)
    v = reference(x, aff, ins, outs)
    for maps, fg in ((None, False), ("probs", True), ("logits", False)):
        check(parse_postprocess(x, aff, ins, outs, maps=maps, fg=fg), v, dtype, maps, fg)


def test_cpu_border_and_identity():
    g = torch.Generator().manual_seed(5)
    x = logits_of(3, 6, 8, 7, g, torch.float64)
    # wholly outside the frame: V = 0, label 0, probabilities 1/C
    aff = torch.tensor([[1.0, 100.0, 1.0, 0.0], [1.0, 0.0, 1.0, -50.0], [0.5, -2.0, 0.5, -3.0]],
                       dtype=torch.float64)
    lab, p, f = parse_postprocess(x, aff, (8, 7), (6, 5), maps="probs", fg=True)
    assert (lab[:2] == 0).all() and torch.allclose(p[:2], torch.full_like(p[:2], 1 / 6))
    assert torch.allclose(f[:2], torch.full_like(f[:2], 5 / 6))
    check((lab, p, f), reference(x, aff, (8, 7), (6, 5)), torch.float64, "probs", True)
    # the identity affine at the logits size gives the logits back
    ident = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    lab, v, _ = parse_postprocess(x, ident, (8, 7), (8, 7), maps="logits")
    assert torch.equal(v, x) and torch.equal(lab.long(), x.argmax(1))


def test_first_maximum_wins():
    x = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    x[0, 1] = 1.0
    x[0, 3] = 1.0
    x[0, 2, 0, 0] = 1.0
    ident = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    for dt in (torch.float64, torch.float32):
        lab, _, _ = parse_postprocess(x.to(dt), ident, 2, 2)
        assert lab.tolist() == [[[1, 1], [1, 1]]]
    # a channel count that is not a multiple of the SIMD width: the padding never wins
    x = torch.full((1, 3, 2, 2), -5.0)
    x[0, 2] = -4.0
    lab, _, _ = parse_postprocess(x, ident, 2, 2)
    assert (lab == 2).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layouts_give_the_same_result(dtype):
    g = torch.Generator().manual_seed(7)
    base = logits_of(2, 20, 13, 11, g, dtype)
    aff = random_affines(2, (29, 23), (19, 17), g)
    want = parse_postprocess(base, aff, (29, 23), (19, 17), maps="probs", fg=True)
    big = torch.zeros(2, 40, 26, 33, dtype=dtype)
    big[:, ::2, ::2, 1::3] = base
    variants = [base.to(memory_format=torch.channels_last), big[:, ::2, ::2, 1::3],
                base.transpose(2, 3).contiguous().transpose(2, 3)]
    for x in variants:
        assert not x.is_contiguous()
        got = parse_postprocess(x, aff, (29, 23), (19, 17), maps="probs", fg=True)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    check(want, reference(base, aff, (29, 23), (19, 17)), dtype, "probs", True)


@pytest.mark.slow
def test_baseline_isa_variant_matches():
    """The x86-64 baseline variant (LIPFAST_CPU_NO_AVX2=1) in a subprocess."""
    code = (
        "import torch, lipfast\n"
        "from lipfast.ops import parse_postprocess\n"
        "g = torch.Generator().manual_seed(3)\n"
        "x = torch.randn(2, 20, 9, 11, generator=g, dtype=torch.float64)\n"
        "a = torch.tensor([[0.7, -2., 0.9, 1.], [1.6, 3., 1.2, -4.]], dtype=torch.float64)\n"
        "out = [parse_postprocess(x.to(dt), a, (19, 23), (21, 17), maps=m, fg=True)\n"
        "       for dt in (torch.float64, torch.float32) for m in ('probs', 'logits')]\n"
        "torch.save([list(o) for o in out], __import__('sys').argv[1])\n")
    outs = []
    for flag in ("1", None):
        env = dict(os.environ)
        env.pop("LIPFAST_CPU_NO_AVX2", None)
        if flag:
            env["LIPFAST_CPU_NO_AVX2"] = flag
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pp_isa_{os.getpid()}_{flag}.pt")
        subprocess.run([sys.executable, "-c", code, path], check=True, env=env)
        outs.append(torch.load(path))
        os.remove(path)
    for (a, b) in zip(*outs):
        assert torch.equal(a[0], b[0])
        tol = F64_TOL if a[1].dtype == torch.float64 else F32_TOL
        torch.testing.assert_close(a[1], b[1], **tol)
        torch.testing.assert_close(a[2], b[2], **tol)


# ------------------------------------------------------ PyTorch path and Triton

@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[7], SHAPES[8]],
                         ids=lambda s: "x".join(map(str, s[:4])))
def test_torch_path(shape):
    k, c, h, w, ins, outs = shape
    g = torch.Generator().manual_seed(11 + c)
    x = logits_of(k, c, h, w, g, torch.float64)
    aff = random_affines(k, ins, outs, g)
    v = reference(x, aff, ins, outs)
    for maps, fg in ((0, True), (1, False), (2, True)):
        lab, m, f = PP._parse_postprocess_torch(x, aff, *ins, *outs, maps, fg)
        name = {0: None, 1: "probs", 2: "logits"}[maps]
        check((lab, m if maps else None, f if fg else None), v, torch.float64, name, fg)
        assert m.shape == ((0,) if not maps else v.shape)


TRITON_SHAPES = [(2, 20, 7, 5, (13, 11), (17, 23)), (1, 3, 1, 1, (1, 1), (2, 3)),
                 (3, 9, 6, 8, (6, 8), (9, 7)), (0, 4, 3, 3, (5, 5), (4, 4))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_triton_kernel(shape, dtype):
    pytest.importorskip("triton")
    from lipfast.kernels import parse_postprocess as KP

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    k, c, h, w, ins, outs = shape
    g = torch.Generator().manual_seed(c * 7 + h)
    x = logits_of(k, c, h, w, g, dtype)
    aff = random_affines(k, ins, outs, g)
    v = reference(x, aff, ins, outs)
    for maps, fg in ((1, True), (2, False), (0, False)):
        lab, m, f = KP.parse_postprocess(x.to(dev), aff.to(dev), *ins, *outs, maps, fg)
        name = {0: None, 1: "probs", 2: "logits"}[maps]
        check((lab.cpu(), m.cpu() if maps else None, f.cpu() if fg else None), v, dtype, name, fg)
    # a strided input through the same kernel
    xs = x.to(memory_format=torch.channels_last)
    lab2, m2, _ = KP.parse_postprocess(xs.to(dev), aff.to(dev), *ins, *outs, 2, False)
    check((lab2.cpu(), m2.cpu(), None), v, dtype, "logits", False)


def test_composite_taps_merge():
    pytest.importorskip("triton")
    from lipfast.kernels import parse_postprocess as KP

    q = torch.tensor([[-3.0, -0.5, 0.0, 2.25, 12.0, 12.5, 40.0]], dtype=torch.float64)
    idx, w = KP.composite_taps(q, 13, 4, torch.float64)
    assert idx.shape == w.shape == (1, 7, 4)
    # each output's weights sum to the weight of the U taps inside the frame
    torch.testing.assert_close(w.sum(-1), torch.tensor([[0.0, 0.5, 1, 1, 1, 0.5, 0]],
                                                       dtype=torch.float64))
    for j in range(7):  # merged: no index repeats among the nonzero weights
        nz = idx[0, j][w[0, j] != 0].tolist()
        assert len(nz) == len(set(nz))


# ------------------------------------------------------ opcheck, compile, errors

def test_opcheck():
    g = torch.Generator().manual_seed(2)
    x = logits_of(2, 5, 4, 3, g, torch.float64)
    aff = random_affines(2, (7, 5), (6, 4), g)
    for maps, fg in ((0, False), (1, True), (2, False)):
        torch.library.opcheck(OP.default, (x, aff, 7, 5, 6, 4, maps, fg))
    torch.library.opcheck(OP.default, (x.float(), aff, 4, 3, 3, 2, 1, True))


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(4)
    x = logits_of(2, 6, 5, 4, g, torch.float32)
    aff = random_affines(2, (9, 7), (8, 6), g)

    def f(x, aff):
        lab, p, fg = parse_postprocess(x * 2, aff, (9, 7), (8, 6), maps="probs", fg=True)
        return lab, p.sum(1), fg

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, aff)
    want = f(x, aff)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # dynamic shapes: the SymInt sizes go through the fake kernel
    dyn = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for size in ((5, 4), (7, 3)):
        xx = logits_of(2, 6, *size, g, torch.float32)
        for a, b in zip(dyn(xx, aff), f(xx, aff)):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_inductor():
    g = torch.Generator().manual_seed(6)
    x = logits_of(2, 6, 5, 4, g, torch.float32)
    aff = random_affines(2, (9, 7), (8, 6), g)

    def f(x, aff):
        lab, p, fg = parse_postprocess(x * 2, aff, (9, 7), (8, 6), maps="probs", fg=True)
        return lab, p.sum(1), fg

    got = torch.compile(f, fullgraph=True)(x, aff)
    for a, b in zip(got, f(x, aff)):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_dispatch_matches_cpu(dtype):
    """The CUDA kernel (Triton for float32, the PyTorch path for float64) through
    the op, against the CPU kernel; a non-finite affine is a device-side assert."""
    g = torch.Generator().manual_seed(9)
    x = logits_of(3, 20, 31, 29, g, dtype)
    aff = random_affines(3, (121, 117), (150, 97), g)
    want = parse_postprocess(x, aff, (121, 117), (150, 97), maps="probs", fg=True)
    got = parse_postprocess(x.cuda(), aff.cuda(), (121, 117), (150, 97), maps="probs", fg=True)
    v = reference(x, aff, (121, 117), (150, 97))
    check(tuple(t.cpu() for t in got), v, dtype, "probs", True)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    torch.testing.assert_close(got[1].cpu(), want[1], **tol)
    got2 = parse_postprocess(x.cuda().to(memory_format=torch.channels_last), aff.cuda(),
                             (121, 117), (150, 97), maps="logits")
    check((got2[0].cpu(), got2[1].cpu(), None), v, dtype, "logits", False)


G = torch.Generator().manual_seed(0)
X = torch.randn(2, 5, 4, 3, generator=G)
A = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 2, dtype=torch.float64)
BAD = [
    (dict(logits=X[0]), ValueError, "K x C x h x w"),
    (dict(logits=X.half()), TypeError, "float32 or float64"),
    (dict(logits=X.long()), TypeError, "float32 or float64"),
    (dict(logits=torch.zeros(2, 257, 2, 2)), ValueError, r"\[1, 256\]"),
    (dict(logits=torch.zeros(2, 0, 2, 2)), ValueError, r"\[1, 256\]"),
    (dict(logits=torch.zeros(2, 3, 0, 2)), ValueError, "empty logits"),
    (dict(affine=A[:1]), ValueError, "K x 4"),
    (dict(affine=A[:, :3]), ValueError, "K x 4"),
    (dict(affine=A.long()), TypeError, "floating"),
    (dict(affine=[[1.0, 0, 1, 0]] * 2), TypeError, "K x 4 tensor"),
    (dict(affine=A.clone().fill_(float("nan"))), ValueError, "non-finite"),
    (dict(affine=torch.tensor([[1.0, 0, 1, 0], [1, float("inf"), 1, 0]], dtype=torch.float64)),
     ValueError, "non-finite"),
    (dict(affine=A.to("meta")), ValueError, "affine on meta"),
    (dict(in_size=(0, 4)), ValueError, "in_size must be positive"),
    (dict(out_size=(4, -1)), ValueError, "out_size must be positive"),
    (dict(out_size=(4.0, 3)), TypeError, "out_size must be an int or a pair"),
    (dict(in_size=(1, 2, 3)), TypeError, "in_size must be an int or a pair"),
    (dict(in_size=(True, 4)), TypeError, "in_size must be an int or a pair"),
    (dict(maps="prob"), ValueError, "maps must be None, 'probs' or 'logits'"),
    (dict(maps=1), ValueError, "maps must be None, 'probs' or 'logits'"),
    (dict(fg=1), TypeError, "fg must be a bool"),
]


@pytest.mark.parametrize("kw,exc,match", BAD, ids=[f"{i}-{b[1].__name__}" for i, b in
                                                     enumerate(BAD)])
def test_bad_inputs(kw, exc, match):
    args = dict(logits=X, affine=A, in_size=(5, 4), out_size=(3, 3), maps=None, fg=False)
    args.update(kw)
    with pytest.raises(exc, match=match):
        parse_postprocess(**args)


def test_size_arguments():
    import numpy as np

    want = parse_postprocess(X, A, (5, 4), (3, 3), maps="logits")
    for ins, outs in (([5, 4], torch.Size([3, 3])), ((np.int64(5), np.int32(4)), 3),
                      (torch.Size([5, 4]), (np.int64(3), 3))):
        got = parse_postprocess(X, A, ins, outs, maps="logits")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_no_autograd():
    x = X.clone().requires_grad_()
    lab, p, f = parse_postprocess(x, A, (5, 4), (3, 3), maps="probs", fg=True)
    assert not lab.requires_grad
    with pytest.raises(NotImplementedError, match="parse_postprocess is an inference op"):
        (p.sum() + f.sum()).backward()
    with torch.no_grad():
        assert not parse_postprocess(x, A, (5, 4), (3, 3), maps="logits")[1].requires_grad


def test_bad_inputs_of_the_op_itself():
    with pytest.raises(ValueError, match="maps must be 0, 1 or 2"):
        OP(X, A, 5, 4, 3, 3, 3, False)
    with pytest.raises(TypeError, match="affine must be float64"):
        OP(X, A.float(), 5, 4, 3, 3, 0, False)
    with pytest.raises(ValueError, match="non-finite"):
        OP(X, A.clone().fill_(float("inf")), 5, 4, 3, 3, 0, False)
    with pytest.raises(ValueError, match="sizes must be positive"):
        OP(X, A, 5, 4, 0, 3, 0, False)


# ---------------------------------------------------------------- SCHP with cv2

def schp_composition(logits, m_fwd, in_size, out_size):
    """SCHP's simple_extractor: upsample, permute to HWC numpy, one
    cv2.warpAffine per (non-contiguous) channel slice with the inverse affine,
    stack, np.argmax."""
    import cv2
    import numpy as np

    up = F.interpolate(logits, in_size, mode="bilinear", align_corners=True)
    hwc = up[0].permute(1, 2, 0).numpy()
    m_inv = cv2.invertAffineTransform(m_fwd)
    chans = [cv2.warpAffine(hwc[:, :, i], m_inv, (out_size[1], out_size[0]),
                            flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=0) for i in range(hwc.shape[2])]
    return np.argmax(np.stack(chans, axis=2), axis=2)


def smooth_logits(c, h, w, g, coarse=8):
    x = torch.randn(1, c, coarse, coarse, generator=g)
    return F.interpolate(x, (h, w), mode="bicubic", align_corners=False) * 3


def schp_affine(in_size, out_size, scale=1.0, shift=(0.0, 0.0)):
    """Forward original -> input affine keeping the aspect ratio (SCHP's
    get_affine_transform without rotation), as (numpy 2 x 3, torch row)."""
    import numpy as np

    (ih, iw), (oh, ow) = in_size, out_size
    a = min(ih / oh, iw / ow) * scale
    bx = (iw - a * ow) / 2 + shift[0]
    by = (ih - a * oh) / 2 + shift[1]
    return (np.array([[a, 0, bx], [0, a, by]], dtype=np.float64),
            torch.tensor([[a, bx, a, by]], dtype=torch.float64))


@pytest.mark.parametrize("case", [((300, 225), 1.0, (0, 0)), ((240, 320), 0.8, (30, -20)),
                                  ((500, 410), 1.25, (-40, 10))])
def test_matches_schp_with_opencv(case):
    cv2 = pytest.importorskip("cv2")
    out_size, scale, shift = case
    g = torch.Generator().manual_seed(out_size[0])
    x = smooth_logits(20, 119, 119, g)
    m, row = schp_affine((473, 473), out_size, scale, shift)
    want = schp_composition(x, m, (473, 473), out_size)
    lab, _, _ = parse_postprocess(x, row, (473, 473), out_size)
    agree = (lab[0].numpy() == want).mean()
    assert agree >= 0.999, (f"labels agree with SCHP's cv2 composition on {agree:.5f} of the "
                            f"pixels (cv2 {cv2.__version__})")


# ------------------------------------------------------------------------ timing

def _timings(repeats=9):
    import time

    import cv2
    import numpy as np

    def med(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)) * 1e3

    g = torch.Generator().manual_seed(0)
    x = smooth_logits(20, 119, 119, g, coarse=15)
    print(f"torch threads {torch.get_num_threads()}, cv2 {cv2.__version__} "
          f"({cv2.getNumThreads()} threads); 20 x 119 x 119 logits, input 473 x 473")
    for out_size in ((1000, 750), (480, 640)):
        m, row = schp_affine((473, 473), out_size)
        t_schp = med(lambda: schp_composition(x, m, (473, 473), out_size))
        t_lab = med(lambda: parse_postprocess(x, row, (473, 473), out_size))
        t_fg = med(lambda: parse_postprocess(x, row, (473, 473), out_size, fg=True))
        t_p = med(lambda: parse_postprocess(x, row, (473, 473), out_size, maps="probs", fg=True))
        print(f"out {out_size[0]} x {out_size[1]}: SCHP {t_schp:.1f} ms; labels {t_lab:.1f} ms "
              f"({t_schp / t_lab:.1f}x); labels + fg {t_fg:.1f} ms; labels + probs + fg "
              f"{t_p:.1f} ms (medians of {repeats})")


if __name__ == "__main__":
    _timings()
