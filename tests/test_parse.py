"""lipfast.Parser and python -m lipfast.parse against SCHP's extractor
(tests/schp_reference.py, written from the SPEC with cv2 for its warps), on
random-weight models of the three dataset settings and images of odd sizes.

- cv2's warps (OpenCV 4.x rounds sampling positions to 1/32 px): label maps
  agree on >= 99.9% of pixels;
- the exact-bilinear version of the same pipeline (float64): label maps equal,
  logits equal to float32 rounding (SCHP's logits are float32);
- flip and multi-scale against lipfast.metrics.tta's definitions;
- boxes (one, several, overlapping, partly outside, degenerate) against a
  per-box reference;
- image inputs (paths, PIL, arrays, tensors, gray, RGBA, palette, 16-bit)
  against cv2.imread(IMREAD_COLOR);
- the command line tool: SCHP's files, atomic writes, skipped files, errors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lipfast
from lipfast.data.settings import DATASETS, dataset_setting
from lipfast.metrics.tta import ce2p_fusion, flip_logits, multi_scale_logits
from lipfast.models import CE2P
from lipfast.parse import Parser, Parsing, box_affine, load_image, main, warp_to_input

cv2 = pytest.importorskip("cv2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import schp_reference as ref  # noqa: E402

SIZES = [(37, 53), (61, 29), (48, 48), (2, 31)]   # (h, w): odd, tall, square, a thin strip


def _random_model(num_classes: int, seed: int = 0, dtype=torch.float32) -> CE2P:
    torch.manual_seed(seed)
    m = CE2P(num_classes=num_classes, layers=(1, 1, 1, 1), width_mult=0.125)
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "running_var") and mod.running_var is not None:
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
        # class logits with a spread well above float32 noise
        m.fushion[3].weight.mul_(8.0)
    return m.eval().to(dtype)


def _schp_checkpoint(model, path) -> str:
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()
                               if not k.endswith("num_batches_tracked")}, "epoch": 150}, path)
    return str(path)


def _image(h, w, seed=0) -> np.ndarray:
    """A smooth-ish random BGR uint8 image (blobs, so the model sees structure)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, size=(max(2, h // 6), max(2, w // 6), 3)).astype(np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    noise = g.integers(-20, 21, size=img.shape)
    return np.clip(img.astype(np.int64) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def models():
    return {name: _random_model(s.num_classes, seed=i) for i, (name, s) in
            enumerate(DATASETS.items())}


# ----------------------------------------------------------------- settings and geometry

def test_dataset_settings():
    assert {k: (v.input_size, v.num_classes) for k, v in DATASETS.items()} == {
        "lip": ((473, 473), 20), "atr": ((512, 512), 18), "pascal": ((512, 512), 7)}
    assert DATASETS["lip"].flip_pairs == ((14, 15), (16, 17), (18, 19))
    assert DATASETS["atr"].flip_pairs == ((9, 10), (12, 13), (14, 15))
    assert DATASETS["pascal"].flip_pairs == ()
    assert dataset_setting("LIP").name == "lip"
    with pytest.raises(ValueError, match="unknown dataset 'mhp'"):
        dataset_setting("mhp")


def test_box_affine_matches_spec_example():
    # SPEC: 640 x 480 gives M = [[0.738654, 0, 0], [0, 0.738654, 59.0923]]
    ax, bx, ay, by = box_affine((0, 0, 639, 479), (473, 473))
    assert ax == ay
    np.testing.assert_allclose([ax, bx, ay, by], [0.738654, 0.0, 0.738654, 59.0923], atol=1e-4)
    m = ref.exact_affine(*ref.schp_center_scale(640, 480, (473, 473)), (473, 473))
    np.testing.assert_allclose([m[0, 0], m[0, 2], m[1, 1], m[1, 2]], [ax, bx, ay, by], rtol=1e-12,
                               atol=1e-9)


@pytest.mark.parametrize("h,w", [(37, 53), (61, 29), (480, 640), (1, 7)])
def test_warp_to_input_is_exact_bilinear(h, w):
    img = _image(h, w, seed=h)
    aff = box_affine((0, 0, w - 1, h - 1), (473, 473))
    got = warp_to_input(torch.from_numpy(img), aff, (473, 473)).permute(1, 2, 0).numpy()
    m = np.array([[aff[0], 0, aff[1]], [0, aff[2], aff[3]]], dtype=np.float64)
    want = ref.warp_affine_exact(img, m, (473, 473))
    np.testing.assert_array_equal(got, want)
    # cv2 itself: close (OpenCV 4.x samples at positions rounded to 1/32 px and uses
    # fixed-point weights: a few grey levels where the image is steep)
    c = cv2.warpAffine(img, m, (473, 473), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    diff = np.abs(got.astype(int) - c.astype(int))
    assert diff.max() <= 8 and diff.mean() < 0.5, (cv2.__version__, diff.max(), diff.mean())


# ----------------------------------------------------------------- against SCHP's extractor

def _agreement(a, b) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


@pytest.mark.parametrize("dataset", ["lip", "atr", "pascal"])
def test_against_schp_extractor_cv2(models, dataset, tmp_path):
    setting = dataset_setting(dataset)
    model = models[dataset]
    ckpt = _schp_checkpoint(model, tmp_path / "schp.pth")
    parser = Parser(ckpt, dataset=dataset, device="cpu")
    images = [_image(h, w, seed=k) for k, (h, w) in enumerate(SIZES[:3] + [(300, 217)])]
    got = parser(images, bgr=True)
    assert isinstance(got, list) and len(got) == len(images)
    total = agree = 0
    for img, lab in zip(images, got):
        want, _ = ref.schp_extract(model, img, setting, warp="cv2")
        assert lab.dtype == torch.uint8 and tuple(lab.shape) == img.shape[:2]
        total += want.size
        agree += int((lab.numpy() == want).sum())
    assert agree / total >= 0.999, (agree / total, cv2.__version__)


@pytest.mark.parametrize("dataset", ["lip", "atr", "pascal"])
def test_exact_pipeline_float64(models, dataset):
    setting = dataset_setting(dataset)
    model = models[dataset].double()
    try:
        parser = Parser(model, dataset=dataset, device="cpu", dtype=torch.float64)
        for k, (h, w) in enumerate(SIZES):
            img = _image(h, w, seed=10 + k)
            want, want_logits = ref.schp_extract(model, img, setting, warp="exact",
                                                 dtype=torch.float64)
            res = parser(img, bgr=True, return_logits=True, return_probs=True)
            assert isinstance(res, Parsing)
            np.testing.assert_array_equal(res.labels.numpy(), want)
            assert res.logits.shape == (h, w, setting.num_classes)
            # the reference keeps SCHP's float32 logits at the input size (then warps
            # them): equal to float32 rounding of those
            assert res.logits.dtype == torch.float64
            tol = 1e-6 * float(np.abs(want_logits).max())
            np.testing.assert_allclose(res.logits.numpy(), want_logits, rtol=0, atol=tol)
            torch.testing.assert_close(res.probs, torch.softmax(res.logits.permute(2, 0, 1), 0),
                                       rtol=0, atol=1e-12)
    finally:
        model.float()


def test_float32_parser_matches_float64(models):
    model = models["lip"]
    p32 = Parser(model, dataset="lip", device="cpu")
    img = _image(123, 87, seed=3)
    want, _ = ref.schp_extract(model.double(), img, dataset_setting("lip"), warp="exact",
                               dtype=torch.float64)
    model.float()
    assert _agreement(p32(img, bgr=True).numpy(), want) >= 0.999


def test_unfolded_parser_equals_folded(models):
    model = models["atr"]
    img = _image(71, 45, seed=4)
    a = Parser(model, dataset="atr", device="cpu", fold=True)(img, bgr=True, return_logits=True)
    b = Parser(model, dataset="atr", device="cpu", fold=False)(img, bgr=True, return_logits=True)
    assert _agreement(a.labels, b.labels) >= 0.999
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------- flip and scales

def _warp64(v, aff, size):
    """C x H x W float64 maps sampled at (ax x + bx, ay y + by) for every output pixel
    of ``size``, bilinear, taps outside the map contribute 0 (cv2's border 0)."""
    c, hh, ww = v.shape
    h, w = size
    qx = aff[0] * np.arange(w) + aff[1]
    qy = aff[2] * np.arange(h) + aff[3]
    x0, y0 = np.floor(qx).astype(int), np.floor(qy).astype(int)
    fx, fy = qx - x0, qy - y0
    out = np.zeros((c, h, w))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            ok = ((yy >= 0) & (yy < hh))[:, None] & ((xx >= 0) & (xx < ww))[None, :]
            tap = v[:, yy.clip(0, hh - 1)][:, :, xx.clip(0, ww - 1)]
            out += np.where(ok, wy[:, None] * wx[None, :], 0.0) * tap
    return out


def _reference_post(logits, aff, input_size, size):
    """The unfused post-processing in float64: upsample to the input size
    (align_corners=True), exact warp back."""
    up = F.interpolate(logits.double(), size=tuple(input_size), mode="bilinear",
                       align_corners=True)
    return _warp64(up[0].numpy(), aff, size)


def _prep(img, aff, input_size, dtype=torch.float64):
    x = warp_to_input(torch.from_numpy(img), aff, input_size).to(dtype) / 255.0
    mean = torch.tensor(lipfast.models.LIP_MEAN, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(lipfast.models.LIP_STD, dtype=dtype).view(3, 1, 1)
    return ((x - mean) / std)[None]


@pytest.mark.parametrize("flip,scales", [(True, (1.0,)), (False, (0.75, 1.0, 1.25)),
                                         (True, (0.5, 1.0))])
def test_flip_and_scales_follow_their_definitions(models, flip, scales):
    setting = dataset_setting("lip")
    model = models["lip"].double()
    try:
        parser = Parser(model, dataset="lip", device="cpu", dtype=torch.float64, flip=flip,
                        scales=scales)
        img = _image(59, 41, seed=5)
        aff = box_affine((0, 0, 40, 58), setting.input_size)
        x = _prep(img, aff, setting.input_size)
        fusion = lambda t: ce2p_fusion(model(t))  # noqa: E731
        with torch.no_grad():
            if scales == (1.0,):
                logits = flip_logits(fusion, x, setting.flip_pairs)
            else:
                logits = multi_scale_logits(fusion, x, scales, flip, setting.flip_pairs)
        want = _reference_post(logits, aff, setting.input_size, (59, 41))
        res = parser(img, bgr=True, return_logits=True)
        np.testing.assert_allclose(res.logits.permute(2, 0, 1).numpy(), want, atol=1e-9, rtol=0)
        np.testing.assert_array_equal(res.labels.numpy(), want.argmax(0))
    finally:
        model.float()


def test_flip_swaps_the_datasets_pairs(models):
    # a mirrored image parsed with flip=True gives the mirrored, left/right-swapped map
    model = models["atr"].double()
    try:
        parser = Parser(model, dataset="atr", device="cpu", dtype=torch.float64, flip=True)
        img = _image(50, 50, seed=6)
        a = parser(img, bgr=True, return_logits=True).logits.permute(2, 0, 1)
        b = parser(np.ascontiguousarray(img[:, ::-1]), bgr=True,
                   return_logits=True).logits.permute(2, 0, 1)
        perm = list(range(18))
        for i, j in dataset_setting("atr").flip_pairs:
            perm[i], perm[j] = j, i
        torch.testing.assert_close(b[perm].flip(-1), a, rtol=0, atol=1e-9)
    finally:
        model.float()


# ----------------------------------------------------------------- boxes

def _reference_boxes(model, img, boxes, setting):
    """Per box: the exact pipeline with the box's centre/scale, its map pasted
    into the image frame (inside the box only); each pixel to the box with the
    highest foreground probability."""
    h, w = img.shape[:2]
    persons, fgs = [], []
    for b in boxes:
        aff = box_affine(b, setting.input_size)
        x = _prep(img, aff, setting.input_size)
        with torch.no_grad():
            logits = ce2p_fusion(model(x))
        v = _reference_post(logits, aff, setting.input_size, (h, w))
        p = torch.softmax(torch.from_numpy(v), 0).numpy()
        ys, xs = np.mgrid[0:h, 0:w]
        inside = (xs >= b[0]) & (xs <= b[2]) & (ys >= b[1]) & (ys <= b[3])
        persons.append(np.where(inside, v.argmax(0), 0))
        fgs.append(np.where(inside, 1.0 - p[0], -1.0))
    persons, fgs = np.stack(persons), np.stack(fgs)
    best = fgs.argmax(0)
    covered = (fgs >= 0).any(0)
    labels = np.take_along_axis(persons, best[None], 0)[0] * covered
    inst = np.where(labels > 0, best + 1, 0)
    return labels, inst, persons


@pytest.mark.parametrize("boxes", [
    [[0, 0, 40, 58]],                                   # the whole image
    [[3, 4, 20, 30]],                                   # one person
    [[0, 0, 25, 40], [15, 10, 40, 58], [5, 20, 12, 50]],  # overlapping
    [[-10, -5, 18, 70], [30, 40, 60, 90]],              # partly outside the image
    [[10, 5, 10, 40], [2, 30, 35, 30]],                 # degenerate: zero width, zero height
])
def test_boxes_against_reference(models, boxes):
    setting = dataset_setting("lip")
    model = models["lip"].double()
    try:
        parser = Parser(model, dataset="lip", device="cpu", dtype=torch.float64)
        img = _image(59, 41, seed=7)
        res = parser(img, boxes=boxes, bgr=True)
        labels, inst, persons = _reference_boxes(model, img, boxes, setting)
        np.testing.assert_array_equal(res.persons.numpy(), persons)
        np.testing.assert_array_equal(res.labels.numpy(), labels)
        np.testing.assert_array_equal(res.instances.numpy(), inst)
        assert res.instances.dtype == torch.uint8 and res.persons.shape == (len(boxes), 59, 41)
        if boxes == [[0, 0, 40, 58]]:
            whole = parser(img, bgr=True)
            np.testing.assert_array_equal(res.labels.numpy(), whole.numpy())
    finally:
        model.float()


def test_boxes_of_several_images_batch_together(models):
    model = models["pascal"]
    parser = Parser(model, dataset="pascal", device="cpu")
    imgs = [_image(40, 30, seed=8), _image(25, 60, seed=9)]
    boxes = [[[0, 0, 20, 30], [10, 5, 29, 39]], []]
    calls = []
    orig = parser._logits
    parser._logits = lambda b: calls.append(b.shape[0]) or orig(b)
    res = parser(imgs, boxes=boxes, bgr=True, return_probs=True)
    assert calls == [2]   # both boxes of the first image in one batch; none for the second
    assert res[0].persons.shape == (2, 40, 30) and res[0].probs.shape == (2, 7, 40, 30)
    assert res[1].persons.shape == (0, 25, 60) and not res[1].labels.any()
    single = [parser(imgs[0], boxes=[b], bgr=True).persons[0] for b in boxes[0]]
    for k in range(2):
        assert _agreement(res[0].persons[k], single[k]) == 1.0


@pytest.mark.parametrize("boxes,match", [
    ([[0, 0, 10]], "K x 4"),
    ([[5, 5, 5, 5]], "single point"),
    ([[10, 0, 5, 8]], "x1 < x0"),
    ([[0, 0, float("nan"), 5]], "non-finite"),
    ("abc", "K x 4"),
])
def test_bad_boxes(models, boxes, match):
    parser = Parser(models["lip"], dataset="lip", device="cpu")
    with pytest.raises((ValueError, TypeError), match=match):
        parser(_image(20, 20), boxes=boxes, bgr=True)


def test_box_lists_must_match_images(models):
    parser = Parser(models["lip"], dataset="lip", device="cpu")
    with pytest.raises(ValueError, match="2 box lists for 1 images"):
        parser([_image(20, 20)], boxes=[[], []])


# ----------------------------------------------------------------- inputs

def _write(path, arr, mode=None):
    from PIL import Image

    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)


def test_image_inputs_agree(models, tmp_path):
    from PIL import Image

    bgr = _image(33, 47, seed=11)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), bgr)
    np.testing.assert_array_equal(load_image(path), bgr)
    np.testing.assert_array_equal(load_image(str(path)), cv2.imread(str(path), cv2.IMREAD_COLOR))
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb)), bgr)
    np.testing.assert_array_equal(load_image(rgb), bgr)
    np.testing.assert_array_equal(load_image(torch.from_numpy(rgb)), bgr)
    np.testing.assert_array_equal(load_image(bgr, bgr=True), bgr)
    parser = Parser(models["lip"], dataset="lip", device="cpu")
    outs = parser([str(path), Image.fromarray(rgb), rgb, torch.from_numpy(rgb)])
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert torch.equal(parser(bgr, bgr=True), outs[0])


@pytest.mark.parametrize("kind", ["gray", "rgba", "palette", "gray16", "rgb16", "la"])
def test_image_modes_like_cv2_imread(tmp_path, kind):
    g = np.random.default_rng(12)
    path = str(tmp_path / f"{kind}.png")
    if kind == "gray":
        _write(path, g.integers(0, 256, (21, 17), dtype=np.uint8))
    elif kind == "rgba":
        _write(path, g.integers(0, 256, (21, 17, 4), dtype=np.uint8))
    elif kind == "la":
        from PIL import Image

        Image.fromarray(g.integers(0, 256, (21, 17), dtype=np.uint8)).convert("LA").save(path)
    elif kind == "palette":
        from PIL import Image

        im = Image.fromarray(g.integers(0, 256, (21, 17, 3), dtype=np.uint8)).convert(
            "P", palette=Image.ADAPTIVE, colors=16)
        im.save(path)
    elif kind == "gray16":
        cv2.imwrite(path, g.integers(0, 65536, (21, 17), dtype=np.uint16))
    else:
        cv2.imwrite(path, g.integers(0, 65536, (21, 17, 3), dtype=np.uint16))
    want = cv2.imread(path, cv2.IMREAD_COLOR)
    got = load_image(path)
    assert got.shape == want.shape and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_exif_orientation_applied_like_cv2(tmp_path):
    from PIL import Image

    bgr = _image(30, 50, seed=13)
    im = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = str(tmp_path / "rot.jpg")
    im.save(path, exif=exif, quality=95)
    want = cv2.imread(path, cv2.IMREAD_COLOR)
    got = load_image(path)
    assert got.shape == want.shape == (50, 30, 3)
    assert np.abs(got.astype(int) - want.astype(int)).mean() < 2.0  # two JPEG decoders


@pytest.mark.parametrize("image,err,match", [
    (np.zeros((10, 10, 3), np.float32), TypeError, "must be uint8"),
    (np.zeros((10, 10, 4), np.uint8), ValueError, "drop the alpha"),
    (np.zeros((10,), np.uint8), ValueError, "H x W x 3"),
    (np.zeros((1, 1, 3), np.uint8), ValueError, "1 x 1 pixels"),
    (12, TypeError, "expected a path"),
    ("/nonexistent/x.jpg", FileNotFoundError, "no such file"),
])
def test_bad_images(models, image, err, match):
    parser = Parser(models["lip"], dataset="lip", device="cpu")
    with pytest.raises(err, match=match):
        parser(image)


def test_corrupt_and_float_files(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="bad.jpg: not a readable image"):
        load_image(bad)
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="floating-point image"):
        load_image(tmp_path / "f.tif")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_image(tmp_path)


# ----------------------------------------------------------------- checkpoints

def test_checkpoint_class_count_refused(models, tmp_path):
    ckpt = _schp_checkpoint(models["lip"], tmp_path / "lip.pth")
    with pytest.raises(ValueError, match=r"has 20 classes, but dataset 'atr' has 18"):
        Parser(ckpt, dataset="atr", device="cpu")
    with pytest.raises(ValueError, match=r"has 20 classes, but dataset 'pascal' has 7"):
        Parser(models["lip"], dataset="pascal", device="cpu")


def test_checkpoint_formats_and_user_model_untouched(models, tmp_path):
    model = models["pascal"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    img = _image(31, 29, seed=14)
    a = Parser(model, dataset="pascal", device="cpu")(img, bgr=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    b = Parser(str(plain), dataset="pascal", device="cpu")(img, bgr=True)
    c = Parser(_schp_checkpoint(model, tmp_path / "s.pth"), dataset="pascal", device="cpu")(
        img, bgr=True)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_parser_arguments(models):
    with pytest.raises(ValueError, match="scales must be positive"):
        Parser(models["lip"], dataset="lip", device="cpu", scales=(0.0,))
    with pytest.raises(TypeError, match="dtype"):
        Parser(models["lip"], dataset="lip", device="cpu", dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown dataset"):
        Parser(models["lip"], dataset="coco", device="cpu")
    parser = Parser(models["lip"], dataset="lip", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        parser([_image(9, 9)], batch_size=0)
    assert parser.labels[13] == "Face" and len(parser.palette) == 768


def test_batch_size_does_not_change_results(models):
    parser = Parser(models["lip"], dataset="lip", device="cpu")
    imgs = [_image(h, w, seed=20 + k) for k, (h, w) in enumerate(SIZES)]
    a = parser(imgs, batch_size=1, bgr=True)
    b = parser(imgs, batch_size=3, bgr=True)
    whole = Parser(models["lip"], dataset="lip", device="cpu", forward_batch=0,
                   channels_last=False)
    assert parser.forward_batch == 1 and parser.channels_last   # the CPU defaults
    c = whole(imgs, batch_size=4, bgr=True)
    for x, y, z in zip(a, b, c):
        assert _agreement(x, y) >= 0.999 and _agreement(x, z) >= 0.999
    with pytest.raises(ValueError, match="forward_batch"):
        Parser(models["lip"], dataset="lip", device="cpu", forward_batch=-1)


def test_lipfast_parser_attribute():
    assert lipfast.Parser is Parser


# ----------------------------------------------------------------- the command line tool

def _folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    sizes = {"b.jpg": (45, 33), "a.png": (20, 64), "c.jpeg": (50, 50)}
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(d / name), _image(h, w, seed=len(name) + h))
    (d / "notes.txt").write_text("not an image")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (d / "sub").mkdir()
    return d, sizes


@pytest.mark.parametrize("workers", [0, 2])
def test_cli_writes_schp_files(models, tmp_path, workers, capsys):
    from PIL import Image

    d, sizes = _folder(tmp_path)
    ckpt = _schp_checkpoint(models["lip"], tmp_path / "m.pth")
    out = tmp_path / "out"
    rc = main(["--dataset", "lip", "--checkpoint", ckpt, "--input-dir", str(d),
               "--output-dir", str(out), "--logits", "--batch-size", "2", "--device", "cpu",
               "--workers", str(workers), "--progress", "lines"])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert "parsed 3 of 5 files" in text and "skipped 2" in text
    assert "notes.txt: " in text and "broken.jpg: " in text and "not a readable image" in text
    parser = Parser(ckpt, dataset="lip", device="cpu")
    assert sorted(os.listdir(out)) == ["a.npy", "a.png", "b.npy", "b.png", "c.npy", "c.png"]
    for name, (h, w) in sizes.items():
        stem = os.path.splitext(name)[0]
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            assert im.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
            labels = np.asarray(im)
        want = parser(str(d / name), return_logits=True)
        np.testing.assert_array_equal(labels, want.labels.numpy())
        logits = np.load(out / f"{stem}.npy")
        assert logits.dtype == np.float32 and logits.shape == (h, w, 20)
        np.testing.assert_allclose(logits, want.logits.numpy(), rtol=1e-5, atol=1e-5)
    assert not [n for n in os.listdir(out) if n.startswith(".")]   # no temporary files left


def test_cli_errors(models, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt = _schp_checkpoint(models["lip"], tmp_path / "m.pth")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", ckpt, "--input-dir", str(empty), "--output-dir", str(out)])
    assert e.value.code == 2 and "holds no files" in capsys.readouterr().err
    d, _ = _folder(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "atr", "--checkpoint", ckpt, "--input-dir", str(d),
              "--output-dir", str(out)])
    assert e.value.code == 2 and "has 20 classes, but dataset 'atr' has 18" in (
        capsys.readouterr().err)
    assert not out.exists()   # nothing written
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "missing.pth"), "--input-dir", str(d),
              "--output-dir", str(out)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", ckpt, "--input-dir", str(d), "--output-dir", str(out),
              "--scales", "1,-1"])
    assert e.value.code == 2 and "scales" in capsys.readouterr().err


def test_cli_same_stem_not_overwritten(models, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    cv2.imwrite(str(d / "x.jpg"), _image(20, 20, seed=1))
    cv2.imwrite(str(d / "x.png"), _image(20, 20, seed=2))
    ckpt = _schp_checkpoint(models["lip"], tmp_path / "m.pth")
    rc = main(["--checkpoint", ckpt, "--input-dir", str(d), "--output-dir", str(tmp_path / "o"),
               "--device", "cpu", "--workers", "0", "--progress", "off"])
    text = capsys.readouterr().out
    assert rc == 1 and "x.png: its output x.png would overwrite that of x.jpg" in text


@pytest.mark.slow
def test_cli_as_module(models, tmp_path):
    d, _ = _folder(tmp_path)
    ckpt = _schp_checkpoint(models["pascal"], tmp_path / "m.pth")
    r = subprocess.run([sys.executable, "-m", "lipfast.parse", "--dataset", "pascal",
                        "--checkpoint", ckpt, "--input-dir", str(d), "--output-dir",
                        str(tmp_path / "o"), "--device", "cpu", "--workers", "0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "parsed 3 of 5 files" in r.stdout and "RuntimeWarning" not in r.stderr


# ----------------------------------------------------------------- on a GPU

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_parser_matches_cpu(models, dtype):
    """The device pipeline (float32 warps, channels_last, Triton post-processing)
    against the CPU one: float32 to near-ties, bf16 to its precision."""
    model = models["lip"]
    imgs = [_image(h, w, seed=30 + k) for k, (h, w) in enumerate(SIZES + [(480, 640)])]
    cpu = Parser(model, dataset="lip", device="cpu")(imgs, bgr=True)
    gpu = Parser(model, dataset="lip", device="cuda", dtype=dtype)(imgs, bgr=True)
    need = 0.999 if dtype == torch.float32 else 0.97
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cpu" and b.dtype == torch.uint8
        assert _agreement(a, b) >= need
    boxes = [[[0, 0, 20, 30], [10, 5, 28, 60]]] + [[]] * (len(imgs) - 1)
    rc = Parser(model, dataset="lip", device="cpu")(imgs, boxes=boxes, bgr=True)
    rg = Parser(model, dataset="lip", device="cuda", dtype=dtype)(imgs, boxes=boxes, bgr=True)
    assert _agreement(rc[0].instances, rg[0].instances) >= need


@pytest.mark.slow
def test_compiled_parser_agrees(models):
    """compile=True (inductor, with freezing on the CPU) gives the eager labels."""
    imgs = [_image(37, 53, seed=40), _image(61, 29, seed=41)]
    eager = Parser(models["pascal"], dataset="pascal", device="cpu")(imgs, bgr=True)
    compiled = Parser(models["pascal"], dataset="pascal", device="cpu", compile=True)
    for a, b in zip(eager, compiled(imgs, bgr=True)):
        assert _agreement(a, b) >= 0.999


def test_cli_one_bad_image_does_not_sink_its_batch(models, tmp_path, capsys):
    """A file that decodes but cannot be parsed (1 x 1 pixel) fails alone: the other
    images of its batch are parsed one by one and written."""
    d = tmp_path / "in"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), _image(20, 30, seed=1))
    cv2.imwrite(str(d / "b.png"), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(d / "c.png"), _image(25, 18, seed=2))
    ckpt = _schp_checkpoint(models["lip"], tmp_path / "m.pth")
    out = tmp_path / "o"
    rc = main(["--checkpoint", ckpt, "--input-dir", str(d), "--output-dir", str(out),
               "--device", "cpu", "--workers", "0", "--batch-size", "3", "--progress", "off"])
    text = capsys.readouterr().out
    assert rc == 1 and "parsed 2 of 3 files" in text and "b.png: " in text and "1 x 1" in text
    assert sorted(os.listdir(out)) == ["a.png", "c.png"]
