"""tests/schp_reference.py (SCHP's in-the-wild extractor, SPEC section 8) against the
SPEC's numbers and against OpenCV itself.

Warp tolerances (cv2.__version__ is printed with each comparison). OpenCV 4.x
rounds the INTER_LINEAR source position to 1/32 pixel: an error of at most 1/64
pixel per axis, so a warped value may differ from the exact bilinear one by up to
D / 32, D the largest difference between neighbouring source pixels (the zero
border counted as a neighbour): for float images in [0, 1], 1/32 (+1e-3); for
uint8, D / 32 + 1 grey level (random noise: D = 255, about 9 levels), and within
1 grey level on a smooth image that fades to black at its edges (D <= 8). OpenCV
5 computes in float32 without that rounding: 1e-3 for float (measured about
5e-5) and 1 grey level for uint8 in every case.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("schp_reference", HERE / "schp_reference.py")
ref = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("schp_reference", ref)
_spec.loader.exec_module(ref)

CV2_MAJOR = int(cv2.__version__.split(".")[0])
QUANTISED = CV2_MAJOR < 5  # OpenCV 4.x: source positions rounded to 1/32 pixel
LIP = (473, 473)

# SPEC section 8: the VOC colour map of classes 0-19.
SPEC_PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
                (0, 128, 128), (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0),
                (192, 128, 0), (64, 0, 128), (192, 0, 128), (64, 128, 128), (192, 128, 128),
                (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0)]


def _neighbour_diff(img) -> float:
    """D: the largest difference between 4-neighbours, the zero border included."""
    x = np.asarray(img, dtype=np.float64)
    x = x[:, :, None] if x.ndim == 2 else x
    x = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    return float(max(np.abs(np.diff(x, axis=0)).max(), np.abs(np.diff(x, axis=1)).max()))


def _tolerance(img) -> float:
    """max |cv2 - exact| allowed for this source (see the module docstring)."""
    d = _neighbour_diff(img)
    if np.asarray(img).dtype == np.uint8:
        return d / 32 + 1 if QUANTISED else 1
    return d / 32 + 1e-3 if QUANTISED else 1e-3


def _cv2_warp(img, m, dsize):
    return cv2.warpAffine(img, m, dsize, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def test_spec_example_640x480():
    c, s = ref.schp_center_scale(640, 480, LIP)
    np.testing.assert_array_equal(c, [319.5, 239.5])
    np.testing.assert_array_equal(s, [639, 639])
    m = ref.get_affine_transform(c, s, 0, LIP)
    assert m.shape == (2, 3) and m.dtype == np.float64
    # the SPEC's six significant digits
    np.testing.assert_allclose(m[:, :2], [[0.738654, 0], [0, 0.738654]], rtol=0, atol=5e-7)
    np.testing.assert_allclose(m[:, 2], [0, 59.0923], rtol=0, atol=5e-5)
    np.testing.assert_allclose(m[0, 0], 472 / 639, rtol=1e-12)
    np.testing.assert_allclose(m[1, 2], 236 - 239.5 * 472 / 639, rtol=1e-12)
    np.testing.assert_allclose(ref.exact_affine(c, s, LIP), m, atol=1e-9)
    # the long side maps pixel 0 to 0 and pixel w-1 to W-1
    np.testing.assert_allclose(m @ [639, 0, 1], [472, 59.0923], atol=1e-4)


@pytest.mark.parametrize("w,h,size", [(640, 480, LIP), (480, 640, LIP), (1000, 750, LIP),
                                      (333, 500, LIP), (512, 384, (512, 512)),
                                      (700, 300, (512, 384)), (300, 700, (384, 512))])
def test_center_scale_aspect(w, h, size):
    c, s = ref.schp_center_scale(w, h, size)
    assert c.dtype == np.float32 and s.dtype == np.float32
    np.testing.assert_allclose(c, [(w - 1) / 2, (h - 1) / 2])
    ar = size[1] / size[0]
    assert s[0] == pytest.approx(ar * s[1], rel=1e-6)
    assert s[0] >= w - 1 - 1e-3 and s[1] >= h - 1 - 1e-3
    assert s[0] == pytest.approx(w - 1, rel=1e-6) or s[1] == pytest.approx(h - 1, rel=1e-6)


def test_box_center_scale():
    c, s = ref.box_center_scale([10, 20, 110, 420], LIP)
    np.testing.assert_allclose(c, [60, 220])
    np.testing.assert_allclose(s, [400, 400])
    c, s = ref.box_center_scale([0, 0, 639, 479], LIP)
    c2, s2 = ref.schp_center_scale(640, 480, LIP)
    np.testing.assert_array_equal(c, c2)
    np.testing.assert_array_equal(s, s2)


@pytest.mark.parametrize("w,h,size,rot", [(640, 480, LIP, 0), (480, 640, LIP, 0),
                                          (1000, 750, LIP, 0), (333, 500, LIP, 0),
                                          (701, 299, (512, 384), 0), (640, 480, LIP, 17),
                                          (500, 333, LIP, -42)])
def test_exact_and_cv2_affine_agree(w, h, size, rot):
    c, s = ref.schp_center_scale(w, h, size)
    for inv in (False, True):
        a = ref.get_affine_transform(c, s, rot, size, inv=inv)
        b = ref.exact_affine(c, s, size, inv=inv, rot=rot)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    # the exact inverse is the inverse
    m = np.vstack([ref.exact_affine(c, s, size, rot=rot), [0, 0, 1]])
    mi = np.vstack([ref.exact_affine(c, s, size, inv=True, rot=rot), [0, 0, 1]])
    np.testing.assert_allclose(m @ mi, np.eye(3), atol=1e-12)


def _matrices():
    c, s = ref.schp_center_scale(640, 480, LIP)
    return {
        "schp-640x480": ref.get_affine_transform(c, s, 0, LIP),
        "schp-inverse": ref.get_affine_transform(c, s, 0, LIP, inv=True),
        "rot17": ref.exact_affine(c, s, LIP, rot=17),
        "shear": np.array([[1.3, 0.2, -5.3], [-0.1, 0.9, 7.7]]),
        "subpixel-shift": np.array([[1.0, 0, 0.3], [0, 1.0, -0.7]]),
    }


@pytest.mark.parametrize("name", list(_matrices()))
def test_warp_exact_vs_cv2_float32(name):
    m = _matrices()[name]
    rng = np.random.default_rng(0)
    img = rng.random((480, 640, 3), dtype=np.float32)
    a = _cv2_warp(img, m, (473, 473))
    b = ref.warp_affine_exact(img, m, (473, 473))
    assert b.dtype == np.float32 and b.shape == a.shape
    err = float(np.abs(a - b).max())
    tol = _tolerance(img)
    print(f"cv2 {cv2.__version__}: float32 warp {name}: max |cv2 - exact| = {err:.3g} "
          f"(tolerance {tol:.3g})")
    assert err <= tol
    # one channel (2-D) too
    a1 = _cv2_warp(img[:, :, 1].copy(), m, (473, 473))
    b1 = ref.warp_affine_exact(img[:, :, 1], m, (473, 473))
    assert b1.shape == (473, 473)
    assert float(np.abs(a1 - b1).max()) <= tol


def _smooth_uint8(h, w, seed):
    """A smooth colour field that fades to black at its edges (D <= 8)."""
    rng = np.random.default_rng(seed)
    low = rng.random((h // 80 + 2, w // 80 + 2, 3))
    field = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
    ramp = np.minimum(np.minimum(np.arange(w)[None, :] + 1, w - np.arange(w)[None, :]),
                      np.minimum(np.arange(h)[:, None] + 1, h - np.arange(h)[:, None]))
    fade = np.clip(ramp / 80.0, 0, 1)[:, :, None]
    return np.rint(255 * field * fade).astype(np.uint8)


@pytest.mark.parametrize("name", list(_matrices()))
@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_warp_exact_vs_cv2_uint8(name, kind):
    m = _matrices()[name]
    if kind == "noise":
        img = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    else:
        img = _smooth_uint8(480, 640, 1)
        assert _neighbour_diff(img) <= 8
    a = _cv2_warp(img, m, (473, 473))
    b = ref.warp_affine_exact(img, m, (473, 473))
    assert b.dtype == np.uint8
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    tol = int(_tolerance(img))
    print(f"cv2 {cv2.__version__}: uint8 {kind} warp {name}: max diff {d.max()} grey level(s) "
          f"(tolerance {tol}), {100 * (d > 0).mean():.3f}% of values differ")
    assert d.max() <= tol
    if kind == "smooth":
        assert tol == 1


def test_warp_exact_identity_and_rounding():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(ref.warp_affine_exact(img, np.eye(2, 3), (4, 3)), img)
    # dst x samples src x + 0.5: 0.5, 1.5, 2.5, 1.5 (the last tap is the 0 border),
    # rounded half to even: 0, 2, 2, 2
    row = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    out = ref.warp_affine_exact(row, np.array([[1.0, 0, -0.5], [0, 1.0, 0]]), (4, 1))
    np.testing.assert_array_equal(out, [[0, 2, 2, 2]])
    fl = ref.warp_affine_exact(row.astype(np.float32), np.array([[1.0, 0, -0.5], [0, 1, 0]]),
                               (4, 1))
    np.testing.assert_allclose(fl, [[0.5, 1.5, 2.5, 1.5]])  # x=3: 0.5*3 + 0.5*0 (border)


def test_palette_matches_spec():
    import lipfast.data

    pal = lipfast.data.lip_palette()
    mine = ref.get_palette(256)
    assert len(pal) == len(mine) == 768
    for j, rgb in enumerate(SPEC_PALETTE):
        assert tuple(pal[3 * j:3 * j + 3]) == rgb, j
        assert tuple(mine[3 * j:3 * j + 3]) == rgb, j
    assert pal == mine


def test_read_and_save(tmp_path):
    import lipfast.data
    from PIL import Image

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    np.testing.assert_array_equal(ref.schp_read(tmp_path / "a.png"), img)
    with pytest.raises(FileNotFoundError):
        ref.schp_read(tmp_path / "missing.jpg")
    labels = rng.integers(0, 20, (30, 40), dtype=np.uint8)
    logits = rng.standard_normal((30, 40, 20)).astype(np.float32)
    paths = ref.schp_save(labels, logits, tmp_path, "img.jpeg", lipfast.data.lip_palette())
    # name[:-4]: the last 4 characters are cut whatever the extension
    assert [Path(p).name for p in paths] == ["img..png", "img..npy"]
    png = Image.open(paths[0])
    assert png.mode == "P"
    np.testing.assert_array_equal(np.asarray(png), labels)
    assert png.getpalette()[:60] == [v for rgb in SPEC_PALETTE for v in rgb]
    np.testing.assert_array_equal(np.load(paths[1]), logits)


class _TinyModel(torch.nn.Module):
    """Returns [[parsing, fusion], [edge]] at 1/4 resolution, like CE2P."""

    def __init__(self, c=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(c, 3, 1, 1, generator=g))

    def forward(self, x):
        y = torch.nn.functional.avg_pool2d(x, 4, 4, ceil_mode=True)
        f = torch.nn.functional.conv2d(y, self.w)
        return [[f * 0.5, f], [f[:, :2]]]


def test_extract_pipeline_cv2_and_exact():
    from lipfast.data.settings import dataset_setting

    setting = dataset_setting("lip")
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = cv2.resize(small, (160, 120), interpolation=cv2.INTER_CUBIC)
    model = _TinyModel().eval()
    lab_cv, log_cv = ref.schp_extract(model, img, setting, warp="cv2")
    lab_ex, log_ex = ref.schp_extract(model, img, setting, warp="exact")
    for lab, log in ((lab_cv, log_cv), (lab_ex, log_ex)):
        assert lab.shape == (120, 160) and lab.dtype == np.uint8
        assert log.shape == (120, 160, 5) and log.dtype == np.float32
        np.testing.assert_array_equal(lab, log.argmax(2))
    assert float(np.abs(log_cv - log_ex).max()) < 0.05
    assert (lab_cv == lab_ex).mean() > 0.95
    # the same with the steps taken apart
    x, m, m_inv, (c, s) = ref.schp_preprocess(img, setting.input_size, "cv2")
    assert x.shape == (1, 3, 473, 473) and x.dtype == torch.float32
    with torch.no_grad():
        fusion = model(x)[0][-1][0]
    assert fusion.shape == (5, 119, 119)
    lab2, log2 = ref.schp_postprocess(fusion, m_inv, setting.input_size, (120, 160))
    np.testing.assert_array_equal(lab2, lab_cv)
    np.testing.assert_array_equal(log2, log_cv)
    # the normalisation: BGR, mean/std per channel
    warped = _cv2_warp(img, m, (473, 473)).astype(np.float32) / 255
    want = (warped - np.array(ref.SCHP_MEAN, np.float32)) / np.array(ref.SCHP_STD, np.float32)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.affine_rows(m), [m[0, 0], m[0, 2], m[1, 1], m[1, 2]])
