"""lipfast.pose.decode / flip_back / ensemble and the op lipfast::pose_decode
against the numpy float64 reference (tests/pose_decode_reference.py: HRNet's
get_final_preds, transform_preds through the solved affine, flip_back + shift):
random maps, ties (first index wins), maps whose maximum is <= 0, peaks on the
borders, odd sizes, non-contiguous inputs, float32 / float64, NaN / inf, the
fused flip path against flip_back + average + the reference decode; the CPU
kernel, the PyTorch path (the CUDA fallback) and the Triton kernel under the
interpreter; opcheck, torch.compile, no autograd, bad inputs."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import pose_decode_reference as ref
from lipfast.pose import LIP_POSE_FLIP_PAIRS, decode, ensemble, flip_back, flip_permutation

OPM = importlib.import_module("lipfast.ops.pose_decode")
OP = torch.ops.lipfast.pose_decode


def _boxes(b, g):
    center = torch.rand(b, 2, generator=g, dtype=torch.float64) * 300 + 20
    scale = torch.rand(b, 2, generator=g, dtype=torch.float64) * 2 + 0.5
    return center, scale


def _ref(hm, center, scale, flipped=None, pairs=LIP_POSE_FLIP_PAIRS):
    """Reference decode; with flipped, the average is formed in the heatmaps' own
    dtype (as the op and HRNet's validate do) and then decoded in float64."""
    if flipped is not None:
        fb = torch.from_numpy(ref.flip_back(flipped.numpy(), pairs).copy())
        hm = (hm + fb) * 0.5
    return ref.get_final_preds(hm.double().numpy(), center.numpy(), scale.numpy())


def _check(got, want, dtype):
    coords, maxv = got
    rc, rm = want
    tol = dict(rtol=1e-12, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-7, atol=1e-4)
    assert coords.dtype == dtype and maxv.dtype == dtype
    np.testing.assert_allclose(coords.double().numpy(), rc, **tol, equal_nan=True)
    np.testing.assert_array_equal(maxv.double().numpy(), rm)


def _cpu_op(hm, c, s, fl=None, pairs=LIP_POSE_FLIP_PAIRS):
    return decode(hm, c, s, flipped=fl, flip_pairs=pairs)


def _torch_path(hm, c, s, fl=None, pairs=LIP_POSE_FLIP_PAIRS):
    perm = flip_permutation(hm.shape[1], pairs) if fl is not None else []
    return OPM._pose_decode_torch(hm, fl, c, s, perm)


def _triton(hm, c, s, fl=None, pairs=LIP_POSE_FLIP_PAIRS):
    pytest.importorskip("triton")
    from lipfast.kernels import pose_decode as KD

    perm = flip_permutation(hm.shape[1], pairs) if fl is not None else []
    return KD.pose_decode(hm, fl, c, s, perm)


IMPLS = {"cpu": _cpu_op, "torch": _torch_path}


def _tricky(b, j, h, w, dtype, g):
    """Random maps with every case mixed in: small-integer maps (ties and zero
    neighbour differences), all-negative and all-zero maps, peaks on the border
    rows/columns 0, 1, h-2 / w-2, h-1 / w-1."""
    hm = torch.randn(b, j, h, w, generator=g, dtype=torch.float64)
    hm[:, 0] = torch.randint(0, 3, (b, h, w), generator=g).double()  # many ties
    if j > 1:
        hm[0, 1] = -hm[0, 1].abs() - 0.1  # max < 0
    if j > 2:
        hm[0, 2] = 0.0  # max == 0
    k = 0
    for y in (0, 1, h - 2, h - 1, h // 2):
        for x in (0, 1, w - 2, w - 1, w // 2):
            bb, jj = k % b, 3 + (k // b) % max(j - 3, 1)
            if jj < j:
                hm[bb, jj] = torch.rand(h, w, generator=g, dtype=torch.float64)
                hm[bb, jj, y, x] = 5.0
            k += 1
    return hm.to(dtype)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 16, 17, 13), (2, 16, 64, 48), (1, 5, 3, 4), (2, 3, 1, 7)])
def test_decode_vs_reference(impl, dtype, shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    hm = _tricky(*shape, dtype, g)
    c, s = _boxes(shape[0], g)
    _check(IMPLS[impl](hm, c, s), ref.get_final_preds(hm.double().numpy(), c.numpy(),
                                                       s.numpy()), dtype)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 16, 17, 13), (2, 16, 64, 48)])
def test_flip_fused_vs_reference(impl, dtype, shape):
    g = torch.Generator().manual_seed(7 + shape[2])
    hm = _tricky(*shape, dtype, g)
    fl = _tricky(*shape, dtype, g).flip(0)
    c, s = _boxes(shape[0], g)
    _check(IMPLS[impl](hm, c, s, fl), _ref(hm, c, s, fl), dtype)
    # the same as decoding flip_back's average
    avg = (hm + flip_back(fl)) * 0.5
    got, want = IMPLS[impl](hm, c, s, fl), IMPLS[impl](avg, c, s)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_flip_other_pairs_and_joint_counts():
    g = torch.Generator().manual_seed(3)
    pairs = ((0, 2),)
    hm = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    fl = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    c, s = _boxes(2, g)
    _check(decode(hm, c, s, flipped=fl, flip_pairs=pairs), _ref(hm, c, s, fl, pairs),
           torch.float64)
    _check(decode(hm, c, s, flipped=fl, flip_pairs=()), _ref(hm, c, s, fl, ()), torch.float64)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_non_contiguous(impl):
    g = torch.Generator().manual_seed(11)
    b, j, h, w = 2, 16, 13, 17
    base = torch.randn(b, h, j, 2 * w, generator=g)
    hm = base.transpose(1, 2)[..., ::2]
    flb = torch.randn(j, b, h, w + 3, generator=g)
    fl = flb.transpose(0, 1)[..., 3:]
    cb = torch.rand(2, b, dtype=torch.float64, generator=g) * 100
    c = cb.t()
    s = (torch.rand(b, 4, dtype=torch.float64, generator=g) + 0.5)[:, ::2]
    assert not (hm.is_contiguous() or fl.is_contiguous() or c.is_contiguous()
                or s.is_contiguous())
    _check(IMPLS[impl](hm, c, s), ref.get_final_preds(hm.double().numpy(), c.numpy(),
                                                       s.numpy()), torch.float32)
    _check(IMPLS[impl](hm, c, s, fl), _ref(hm.contiguous(), c, s, fl.contiguous()),
           torch.float32)
    # expanded (zero-stride) maps
    one = torch.rand(1, 1, h, w, generator=g).expand(b, j, h, w)
    _check(IMPLS[impl](one, c, s), ref.get_final_preds(one.double().numpy(), c.numpy(),
                                                        s.numpy()), torch.float32)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_ties_first_index_and_borders(impl):
    h, w = 9, 8
    hm = torch.zeros(1, 6, h, w, dtype=torch.float64)
    hm[0, 0, 4, 5] = hm[0, 0, 6, 2] = hm[0, 0, 4, 6] = 2.0  # first in row-major: (4, 5)
    hm[0, 1, 1, 1] = 1.0  # px = 1: no refinement
    hm[0, 1, 1, 2] = 0.5
    hm[0, 2, 3, w - 2] = 1.0  # px = w - 2: refined
    hm[0, 2, 3, w - 1] = 0.7
    hm[0, 2, 4, w - 2] = 0.2
    hm[0, 3, h - 1, 3] = 1.0  # py = h - 1: no refinement
    hm[0, 3, h - 1, 4] = 0.9
    hm[0, 4, 0, 0] = 1.0  # corner
    hm[0, 5] = 1.0  # constant map: index 0
    c = torch.tensor([[100.0, 50.0]], dtype=torch.float64)
    s = torch.tensor([[1.5, 2.5]], dtype=torch.float64)
    coords, maxv = IMPLS[impl](hm, c, s)
    _check((coords, maxv), ref.get_final_preds(hm.numpy(), c.numpy(), s.numpy()), torch.float64)
    r = 200 * 1.5 / w  # the width ratio, for y too
    want = [(5.25, 4), (1, 1), (w - 2 + 0.25, 3 + 0.25), (3, h - 1), (0, 0), (0, 0)]
    for jj, (x, y) in enumerate(want):
        assert coords[0, jj].tolist() == pytest.approx([100 + (x - w / 2) * r,
                                                        50 + (y - h / 2) * r])


def test_reference_affine_is_the_closed_form():
    """The reference's solved affine (both directions from the widths) equals
    x_img = c_x + (x - w/2) 200 s_w / w, y_img = c_y + (y - h/2) 200 s_w / w, for
    non-square maps and s_h != s_w; and inv=False is its inverse."""
    c, s, size = np.array([123.0, 45.0]), np.array([1.7, 0.3]), [48, 64]
    t = ref.get_affine_transform(c, s, size, inv=True)
    r = 200 * 1.7 / 48
    np.testing.assert_allclose(t, [[r, 0, c[0] - 24 * r], [0, r, c[1] - 32 * r]], rtol=1e-12,
                               atol=1e-9)
    fwd = ref.get_affine_transform(c, s, size, inv=False)
    np.testing.assert_allclose(np.vstack([fwd, [0, 0, 1]]) @ np.vstack([t, [0, 0, 1]]),
                               np.eye(3), atol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("w", [9, 37])  # rows shorter / longer than the CPU kernel's 16 lanes
def test_non_finite_follow_numpy(impl, w):
    h = 7
    hm = torch.rand(1, 7, h, w, dtype=torch.float64) + 0.1
    hm[0, 5, 1, w - 4] = float("inf")  # an infinity in an earlier row, then a NaN
    hm[0, 5, 4, w - 2] = float("nan")
    hm[0, 6, 2, w // 2] = float("inf")  # infinities but no NaN: inf wins
    hm[0, 6, 5, 1] = float("-inf")
    hm[0, 0, 2, 3] = float("nan")  # first NaN is the maximum: maxval NaN, coords zeroed
    hm[0, 0, 5, 5] = float("nan")
    hm[0, 1, 3, 4] = float("inf")  # inf is an ordinary maximum
    hm[0, 2, 3, 4] = 9.0  # -inf on both sides: inf - inf = NaN difference -> NaN x
    hm[0, 2, 3, 3] = hm[0, 2, 3, 5] = float("-inf")
    hm[0, 3] = float("-inf")  # all -inf: index 0, zeroed
    hm[0, 4, 0, 0] = float("nan")  # NaN at index 0
    c = torch.tensor([[10.0, 20.0]], dtype=torch.float64)
    s = torch.ones(1, 2, dtype=torch.float64)
    with np.errstate(invalid="ignore"):
        want = ref.get_final_preds(hm.numpy(), c.numpy(), s.numpy())
    coords, maxv = IMPLS[impl](hm, c, s)
    np.testing.assert_allclose(coords.numpy(), want[0], rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(maxv.numpy(), want[1])
    # a NaN coordinate makes both NaN: the reference's affine multiplies it by 0
    assert torch.isnan(maxv[0, 0]) and torch.isnan(coords[0, 2]).all()
    assert torch.isnan(maxv[0, 5]) and maxv[0, 6] == float("inf")


# ---------------------------------------------------------------- Triton (interpreter)

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 4, 17, 13), (1, 3, 40, 30), (1, 2, 1, 5)])
def test_triton_kernel(shape, dtype):
    g = torch.Generator().manual_seed(5)
    hm = _tricky(*shape, dtype, g)
    fl = _tricky(*shape, dtype, g)
    if shape[2] == 40:  # ties across the 1024-element blocks: the first wins
        hm[0, 0] = 0.0
        hm[0, 0, 35, 7] = hm[0, 0, 5, 7] = 3.0
        hm[0, 1] = 0.0
        hm[0, 1, 39, 29] = 3.0  # last element, second block
        hm[0, 2, 3, 3] = float("inf")  # inf in the first block, NaN in the second
        hm[0, 2, 38, 1] = float("nan")
    c, s = _boxes(shape[0], g)
    pairs = ((0, 1),)
    _check(_triton(hm, c, s), ref.get_final_preds(hm.double().numpy(), c.numpy(), s.numpy()),
           dtype)
    _check(_triton(hm, c, s, fl, pairs), _ref(hm, c, s, fl, pairs), dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_triton_non_contiguous_and_non_finite():
    g = torch.Generator().manual_seed(9)
    b, j, h, w = 2, 3, 7, 9
    hm = torch.rand(b, h, j, 2 * w, generator=g, dtype=torch.float64).transpose(1, 2)[..., ::2]
    hm[0, 0, 2, 3] = float("nan")
    hm[0, 1, 3, 4] = 9.0
    hm[0, 1, 3, 3] = hm[0, 1, 3, 5] = float("-inf")
    hm[1, 2] = float("-inf")
    c, s = _boxes(b, g)
    with np.errstate(invalid="ignore"):
        want = ref.get_final_preds(hm.numpy(), c.numpy(), s.numpy())
    coords, maxv = _triton(hm, c, s)
    np.testing.assert_allclose(coords.numpy(), want[0], rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(maxv.numpy(), want[1])


# ---------------------------------------------------------------- flip_back, ensemble

@pytest.mark.parametrize("shift", [True, False])
def test_flip_back_vs_reference(shift):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, 16, 6, 2 * 11, generator=g)
    fl = base.transpose(2, 3)[:, :, ::2].transpose(2, 3)
    before = fl.clone()
    got = flip_back(fl, shift=shift)
    assert torch.equal(fl, before)  # input untouched
    want = ref.flip_back(fl.numpy(), LIP_POSE_FLIP_PAIRS, shift)
    np.testing.assert_array_equal(got.numpy(), want)


def test_ensemble():
    g = torch.Generator().manual_seed(4)
    a, b, c = (torch.randn(2, 16, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    before = a.clone()
    torch.testing.assert_close(ensemble([a, b, c]), (a + b + c) / 3, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ensemble([a, b], weights=[3, 1]), 0.75 * a + 0.25 * b,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ensemble((a, b), weights=torch.tensor([1.0, 1.0])), (a + b) / 2,
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(ensemble([a]), a) and ensemble([a]) is not a
    assert torch.equal(a, before)
    for bad, err, msg in [
        ([], ValueError, "empty"),
        (a, TypeError, "list or tuple"),
        ([a, b[:, :3]], ValueError, "shape"),
        ([a, b.float()], TypeError, "float32"),
        ([a, 1.0], TypeError, "not a tensor"),
        ([a, b.long()], TypeError, "floating"),
    ]:
        with pytest.raises(err, match=msg):
            ensemble(bad)
    for w, err in [([1.0], ValueError), ([1.0, 0.0], ValueError), ([1.0, -1.0], ValueError),
                   ([1.0, float("nan")], ValueError), ([1.0, float("inf")], ValueError),
                   ([1.0, "x"], TypeError), ("ab", TypeError), ([True, 1], TypeError)]:
        with pytest.raises(err, match="weights"):
            ensemble([a, b], weights=w)


# ---------------------------------------------------------------- API details

def test_scale_vector_half_input_empty_and_detach():
    g = torch.Generator().manual_seed(6)
    hm = torch.randn(2, 16, 9, 7, generator=g)
    c, s = _boxes(2, g)
    s1 = s[:, 0].clone()
    a = decode(hm, c, s1)
    b = decode(hm, c, torch.stack([s1, s1 * 3], 1))
    assert torch.equal(a[0], b[0])  # only scale[:, 0] is used
    h16 = decode(hm.half(), c, s)
    want = decode(hm.half().float(), c, s)
    assert h16[0].dtype == torch.float32 and torch.equal(h16[0], want[0])
    np_in = decode(hm, c.numpy(), s.tolist())
    assert torch.equal(np_in[0], decode(hm, c, s)[0])
    e = decode(torch.zeros(0, 16, 8, 8), torch.zeros(0, 2), torch.zeros(0, 2))
    assert e[0].shape == (0, 16, 2) and e[1].shape == (0, 16)
    e = decode(torch.zeros(2, 0, 8, 8), c, s)
    assert e[0].shape == (2, 0, 2)
    hr = hm.clone().requires_grad_()
    out = decode(hr, c, s, flipped=hr)
    assert not out[0].requires_grad
    before = hm.clone()
    decode(hm, c, s, flipped=hm)
    assert torch.equal(hm, before)


def test_op_has_no_derivative():
    hm = torch.rand(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(1, 2, dtype=torch.float64)
    coords, maxv = OP(hm, None, c, torch.ones(1, 2, dtype=torch.float64), [])
    assert maxv.requires_grad
    with pytest.raises(NotImplementedError, match="pose_decode"):
        maxv.sum().backward()


def test_opcheck():
    g = torch.Generator().manual_seed(8)
    hm = torch.rand(2, 4, 6, 5, generator=g, dtype=torch.float64)
    fl = torch.rand(2, 4, 6, 5, generator=g, dtype=torch.float64)
    c, s = _boxes(2, g)
    perm = [1, 0, 2, 3]
    torch.library.opcheck(OP.default, (hm, None, c, s, []))
    torch.library.opcheck(OP.default, (hm, fl, c, s, perm))
    torch.library.opcheck(OP.default, (hm.float(), fl.float(), c, s, perm))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    g = torch.Generator().manual_seed(10)
    hm = torch.rand(2, 16, 8, 6, generator=g)
    fl = torch.rand(2, 16, 8, 6, generator=g)
    c, s = _boxes(2, g)

    def f(hm, fl, c, s):
        return decode(hm * 2, c, s, flipped=fl)

    got = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")(hm, fl, c, s)
    want = f(hm, fl, c, s)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_inputs():
    hm = torch.rand(2, 16, 8, 6)
    c = torch.zeros(2, 2)
    s = torch.ones(2, 2)
    cases = [
        (lambda: decode(hm[0], c, s), ValueError, "B x J x h x w"),
        (lambda: decode(hm.long(), c, s), TypeError, "floating"),
        (lambda: decode(hm.numpy(), c, s), TypeError, "tensor"),
        (lambda: decode(hm, c[:1], s), ValueError, "center"),
        (lambda: decode(hm, c, s[:, :1]), ValueError, "scale"),
        (lambda: decode(hm, c, "ab"), TypeError, "scale"),
        (lambda: decode(hm, c, s, flipped=hm[:, :, :, :5]), ValueError, "shape"),
        (lambda: decode(hm, c, s, flipped=hm.double()), TypeError, "dtype"),
        (lambda: decode(hm, c, s, flipped=hm, flip_pairs=((0, 16),)), ValueError, "out of range"),
        (lambda: decode(hm[:, :, :0], c, s), ValueError, "empty"),
        (lambda: decode(hm, c.bool(), s), TypeError, "center"),
    ]
    for fn, err, msg in cases:
        with pytest.raises(err, match=msg):
            fn()
    cd, sd = c.double(), s.double()
    op_cases = [
        ((hm, hm, cd, sd, [0] * 16), "flip_perm"),
        ((hm, hm, cd, sd, [1, 0]), "flip_perm"),
        ((hm, hm, cd, sd, list(range(1, 17))), "flip_perm"),
        ((hm, None, c, sd, []), "float64"),
        ((hm, None, cd[:1], sd, []), "center"),
        ((hm.half(), None, cd, sd, []), "float32 or float64"),
        ((hm[0], None, cd, sd, []), "B x J x h x w"),
    ]
    for args, msg in op_cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            OPM.check_args(*args)
        with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
            OP(*args)  # the C++ kernel's own checks


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_dispatch_vs_reference(dtype):
    """The op's CUDA kernel (Triton for float32, the PyTorch path for float64) on
    the tricky maps, plain and flip-fused, non-contiguous, against the reference."""
    g = torch.Generator().manual_seed(12)
    shape = (3, 16, 64, 48)
    hm = _tricky(*shape, dtype, g)
    fl = _tricky(*shape, dtype, g)
    c, s = _boxes(shape[0], g)
    got = decode(hm.cuda(), c.cuda(), s.cuda())
    _check(tuple(t.cpu() for t in got), ref.get_final_preds(hm.double().numpy(), c.numpy(),
                                                            s.numpy()), dtype)
    hmc = hm.cuda().to(memory_format=torch.channels_last)
    flc = fl.cuda().transpose(2, 3).contiguous().transpose(2, 3)
    cc, sc = c.cuda(), s.cuda()
    decode(hmc, cc, sc, flipped=flc)  # warm-up (compiles, caches the permutation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync in the decode raises
    try:
        got = decode(hmc, cc, sc, flipped=flc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check(tuple(t.cpu() for t in got), _ref(hm, c, s, fl), dtype)


@pytest.mark.cuda
def test_cuda_torch_path_and_compile():
    g = torch.Generator().manual_seed(13)
    hm = torch.rand(2, 16, 17, 13, generator=g).cuda()
    fl = torch.rand(2, 16, 17, 13, generator=g).cuda()
    c, s = (t.cuda() for t in _boxes(2, g))
    perm = flip_permutation(16)
    want = OPM._pose_decode_torch(hm, fl, c, s, perm)
    got = OP(hm, fl, c, s, perm)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    comp = torch.compile(lambda a, b: decode(a, c, s, flipped=b), fullgraph=True)(hm, fl)
    assert torch.equal(comp[0], want[0])
