"""lipfast.data: LIP layout, SCHP augmentation, warps, determinism, errors.

References are written here from the SPEC / SCHP's definitions, independently
of lipfast.data.transforms: SCHP's three-point construction of the affine
matrix, a per-pixel float64 bilinear sampler with a zero border (OpenCV's
BORDER_CONSTANT semantics) and a per-pixel nearest sampler with border 255.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lipfast.data import (LIPDataset, affine_matrix, box_to_center_scale, collate, lip_palette,
                          warp_back, warp_image, warp_label)
from lipfast.data.lip import FLIP_PAIRS, LIP_MEAN_BGR, LIP_STD_BGR

FLIP_LUT = np.arange(256)
for _a, _b in FLIP_PAIRS:
    FLIP_LUT[_a], FLIP_LUT[_b] = _b, _a


# ----------------------------------------------------------------- references

def ref_affine(center, scale, rot, crop_hw):
    """SCHP's get_affine_transform (three point pairs, solved exactly), 2 x 3."""
    hc, wc = crop_hw
    r = math.radians(rot)
    sn, cs = math.sin(r), math.cos(r)
    p = np.array([0.0, -scale[0] * 0.5])
    src_dir = np.array([p[0] * cs - p[1] * sn, p[0] * sn + p[1] * cs])
    dst_dir = np.array([0.0, (wc - 1) * -0.5])

    def third(a, b):
        d = a - b
        return b + np.array([-d[1], d[0]])

    src = np.zeros((3, 2))
    dst = np.zeros((3, 2))
    src[0] = center
    src[1] = np.asarray(center) + src_dir
    dst[0] = [(wc - 1) * 0.5, (hc - 1) * 0.5]
    dst[1] = dst[0] + dst_dir
    src[2] = third(src[0], src[1])
    dst[2] = third(dst[0], dst[1])
    a = np.concatenate([src, np.ones((3, 1))], 1)  # 3 x 3
    return np.linalg.solve(a, dst).T  # 2 x 3: dst = M @ [x, y, 1]


def ref_bilinear(img, m, out_hw):
    """img C x H x W float64 numpy; m 3 x 3 src->dst; zero border."""
    c, h, w = img.shape
    inv = np.linalg.inv(m)
    out = np.zeros((c,) + tuple(out_hw))
    for yy in range(out_hw[0]):
        for xx in range(out_hw[1]):
            sx, sy, _ = inv @ np.array([xx, yy, 1.0])
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            acc = np.zeros(c)
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    yi, xi = y0 + dy, x0 + dx
                    if 0 <= yi < h and 0 <= xi < w:
                        acc += wy * wx * img[:, yi, xi]
            out[:, yy, xx] = acc
    return out


def ref_nearest(lab, m, out_hw, border=255):
    h, w = lab.shape
    inv = np.linalg.inv(m)
    out = np.full(tuple(out_hw), border, dtype=np.int64)
    for yy in range(out_hw[0]):
        for xx in range(out_hw[1]):
            sx, sy, _ = inv @ np.array([xx, yy, 1.0])
            xi, yi = math.floor(sx + 0.5), math.floor(sy + 0.5)
            if 0 <= yi < h and 0 <= xi < w:
                out[yy, xx] = lab[yi, xi]
    return out


# ----------------------------------------------------------------- fixtures

def write_split(root, split, samples):
    """samples: list of (id, rgb uint8 HxWx3 or None, label uint8 HxW or None)."""
    os.makedirs(root / f"{split}_images", exist_ok=True)
    os.makedirs(root / f"{split}_segmentations", exist_ok=True)
    for sid, rgb, lab in samples:
        if rgb is not None:
            Image.fromarray(rgb, "RGB").save(root / f"{split}_images" / f"{sid}.jpg", quality=100,
                                            subsampling=0)
        if lab is not None:
            Image.fromarray(lab, "L").save(root / f"{split}_segmentations" / f"{sid}.png")
    (root / f"{split}_id.txt").write_text("\n".join(s[0] for s in samples) + "\n\n")


def block_sample(rng, h, w, block=8):
    """Label made of constant blocks; the image colour encodes the label
    (R = 12 * label + 10, G = 255 - R, B = 128), so it can be decoded after the warp."""
    lab_small = rng.integers(0, 20, size=(math.ceil(h / block), math.ceil(w / block)))
    lab = np.kron(lab_small, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)
    r = (12 * lab.astype(np.int64) + 10).astype(np.uint8)
    rgb = np.stack([r, 255 - r, np.full_like(r, 128)], axis=-1)
    return rgb, lab


@pytest.fixture
def blocks_root(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i, (h, w) in enumerate([(41, 29), (30, 47), (37, 37), (52, 24)]):
        rgb, lab = block_sample(rng, h, w)
        samples.append((f"img{i}", rgb, lab))
    write_split(tmp_path, "train", samples)
    write_split(tmp_path, "val", samples[:2])
    return tmp_path


def decode(image):
    """Normalised BGR crop -> (label decoded from the red channel, R value)."""
    mean = torch.tensor(LIP_MEAN_BGR).view(3, 1, 1)
    std = torch.tensor(LIP_STD_BGR).view(3, 1, 1)
    bgr = (image * std + mean) * 255
    red = bgr[2]
    return torch.round((red - 10) / 12).long(), red


class FixedParams(LIPDataset):
    """LIPDataset with chosen (scale factor, rotation, flip)."""

    def __init__(self, *a, factor=1.0, rotation=0.0, flip=False, **k):
        super().__init__(*a, **k)
        self.fixed = (factor, rotation, flip)

    def sample_params(self, index, width, height):
        c, s = box_to_center_scale(width, height, self.aspect_ratio)
        f, r, fl = self.fixed
        return c, (s[0] * f, s[1] * f), r, fl


# ----------------------------------------------------------------- geometry

@pytest.mark.parametrize("rot", [0.0, 17.0, -43.5])
@pytest.mark.parametrize("crop", [(33, 33), (25, 41)])
def test_affine_matches_schp_three_point_construction(rot, crop):
    c, s = box_to_center_scale(29, 41, crop[1] / crop[0])
    m = affine_matrix(c, s, rot, crop).numpy()
    np.testing.assert_allclose(m[:2], ref_affine(c, s, rot, crop), rtol=0, atol=1e-9)
    np.testing.assert_allclose(m[2], [0, 0, 1])


def test_box_to_center_scale_expands_to_aspect_ratio():
    c, s = box_to_center_scale(30, 60, 1.0)  # tall image in a square crop
    assert c == (14.5, 29.5) and s == (59.0, 59.0)
    c, s = box_to_center_scale(81, 21, 0.5)  # wide image in a tall crop
    assert s == (80.0, 160.0)


def test_flip_composed_into_matrix():
    c, s = box_to_center_scale(13, 9, 1.0)
    m = affine_matrix(c, s, 10.0, (11, 11))
    mf = affine_matrix(c, s, 10.0, (11, 11), flip_width=13)
    p = torch.tensor([3.0, 5.0, 1.0], dtype=torch.float64)
    pf = torch.tensor([13 - 1 - 3.0, 5.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(mf @ pf, m @ p)


@pytest.mark.parametrize("rot", [0.0, 25.0])
def test_warp_image_matches_reference(rot):
    rng = np.random.default_rng(1)
    img = rng.random((3, 13, 9))
    c, s = box_to_center_scale(9, 13, 1.0)
    m = affine_matrix(c, (s[0] * 0.9, s[1] * 0.9), rot, (11, 11))
    out = warp_image(torch.from_numpy(img), m, (11, 11))
    np.testing.assert_allclose(out.numpy(), ref_bilinear(img, m.numpy(), (11, 11)),
                               rtol=0, atol=1e-9)
    # batched and non-contiguous input give the same result
    nc = torch.from_numpy(img).transpose(1, 2).contiguous().transpose(1, 2)
    assert not nc.is_contiguous()
    torch.testing.assert_close(warp_image(nc.unsqueeze(0).repeat(2, 1, 1, 1), m, (11, 11))[1],
                               out)


@pytest.mark.parametrize("rot", [0.0, -31.0])
def test_warp_label_matches_reference(rot):
    rng = np.random.default_rng(2)
    lab = rng.integers(0, 20, size=(10, 15))
    c, s = box_to_center_scale(15, 10, 7 / 9)
    m = affine_matrix(c, (s[0] * 1.2, s[1] * 1.2), rot, (9, 7))
    out = warp_label(torch.from_numpy(lab), m, (9, 7))
    want = ref_nearest(lab, m.numpy(), (9, 7))
    # a source coordinate within 1e-9 of a half pixel is a tie that the last bit of
    # the matrix inverse decides (it differs between CPUs and BLAS builds)
    inv = np.linalg.inv(m.numpy())
    yy, xx = np.mgrid[0:9, 0:7]
    sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    tie = (np.abs((sx % 1) - 0.5) < 1e-9) | (np.abs((sy % 1) - 0.5) < 1e-9)
    assert tie.mean() < 0.25
    np.testing.assert_array_equal(out.numpy()[~tie], want[~tie])
    assert (out == 255).any()  # scale 1.2 leaves a border


def test_warp_back_is_inverse_warp():
    rng = np.random.default_rng(3)
    logits = rng.random((4, 11, 11))
    c, s = box_to_center_scale(9, 14, 1.0)
    m = affine_matrix(c, s, 0.0, (11, 11))
    out = warp_back(torch.from_numpy(logits), m, (14, 9))
    ref = ref_bilinear(logits, np.linalg.inv(m.numpy()), (14, 9))
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-9)


def test_palette_is_voc_bit_pattern():
    pal = lip_palette()
    assert len(pal) == 768
    assert pal[0:3] == [0, 0, 0] and pal[3:6] == [128, 0, 0] and pal[6:9] == [0, 128, 0]
    assert pal[3 * 19:3 * 20] == [128, 192, 0] and pal[3 * 13:3 * 14] == [192, 0, 128]


# ----------------------------------------------------------------- data set

def test_layout_parsing(blocks_root):
    ds = LIPDataset(blocks_root, "train", crop_size=33)
    assert ds.ids == ["img0", "img1", "img2", "img3"]  # trailing blank lines skipped
    assert len(ds) == 4
    assert ds.image_path("img1") == os.path.join(str(blocks_root), "train_images", "img1.jpg")
    img, lab, meta = ds[1]
    assert img.shape == (3, 33, 33) and img.dtype == torch.float32
    assert lab.shape == (33, 33) and lab.dtype == torch.int64
    assert meta["id"] == "img1" and (meta["height"], meta["width"]) == (30, 47)
    ds_rect = LIPDataset(blocks_root, "train", crop_size=(21, 17))
    assert ds_rect[0][0].shape == (3, 21, 17)


def test_eval_mode_returns_original_label_and_centring(blocks_root):
    ds = LIPDataset(blocks_root, "val", crop_size=(25, 31), train=False)
    img, lab, meta = ds[0]
    raw = np.array(Image.open(blocks_root / "val_segmentations" / "img0.png"))
    np.testing.assert_array_equal(lab.numpy(), raw)
    assert img.shape == (3, 25, 31)
    assert meta["rotation"] == 0.0 and meta["flip"] is False
    c, s = box_to_center_scale(29, 41, 31 / 25)
    np.testing.assert_allclose(meta["affine"].numpy()[:2], ref_affine(c, s, 0.0, (25, 31)),
                               atol=1e-9)
    # the same on every call (no augmentation)
    torch.testing.assert_close(ds[0][0], img)


def test_image_normalisation_bgr(tmp_path):
    rgb = np.zeros((9, 9, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    write_split(tmp_path, "val", [("a", rgb, np.zeros((9, 9), dtype=np.uint8))])
    img = LIPDataset(tmp_path, "val", crop_size=9, train=False)[0][0]
    # channel 0 is blue: (50/255 - 0.406) / 0.225; JPEG quality 100 is within 2 levels
    expect = [(50 / 255 - 0.406) / 0.225, (100 / 255 - 0.456) / 0.224, (200 / 255 - 0.485) / 0.229]
    for ch, e in enumerate(expect):
        assert abs(float(img[ch, 4, 4]) - e) < 2.5 / 255 / 0.22


def test_augmented_image_and_label_stay_aligned(blocks_root):
    """The colour of each crop pixel encodes the label it was drawn with: where the
    label is constant around a pixel, the decoded image label equals the warped
    label (after undoing the flip swap)."""
    ds = LIPDataset(blocks_root, "train", crop_size=(37, 29), seed=5)
    checked = flips = rots = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            img, lab, meta = ds[i]
            flips += meta["flip"]
            rots += meta["rotation"] != 0
            dec, _ = decode(img)
            lab_np = lab.numpy()
            orig = FLIP_LUT[lab_np] if meta["flip"] else lab_np  # label before the swap
            pad = np.pad(orig, 1, constant_values=255)
            same = np.ones_like(orig, dtype=bool)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    same &= pad[1 + dy:1 + dy + orig.shape[0], 1 + dx:1 + dx + orig.shape[1]] == orig
            inner = same & (orig != 255)
            assert inner.sum() > 20
            np.testing.assert_array_equal(dec.numpy()[inner], orig[inner])
            checked += int(inner.sum())
    assert flips > 0 and rots > 0  # the check covered flipped and rotated samples


def test_flip_mirrors_and_swaps_labels(blocks_root):
    kw = dict(crop_size=(23, 19), train=True)
    plain = FixedParams(blocks_root, "train", factor=1.1, rotation=0.0, flip=False, **kw)
    flipped = FixedParams(blocks_root, "train", factor=1.1, rotation=0.0, flip=True, **kw)
    for i in range(len(plain)):
        img, lab, _ = plain[i]
        img_f, lab_f, meta = flipped[i]
        assert meta["flip"]
        # box centred at (W-1)/2: the flipped crop is the mirror of the plain crop
        torch.testing.assert_close(img_f, img.flip(-1), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(lab_f.numpy(), FLIP_LUT[lab.flip(-1).numpy()])
    # a label map with all the pairs: every left class becomes the right one
    lab = torch.tensor([[14, 15, 16, 17, 18, 19, 3, 255]])
    swapped = torch.from_numpy(FLIP_LUT[lab.numpy()])
    assert swapped.tolist() == [[15, 14, 17, 16, 19, 18, 3, 255]]


def test_border_is_ignore_label_and_black_image(blocks_root):
    ds = FixedParams(blocks_root, "train", crop_size=31, factor=1.25, rotation=30.0, flip=False)
    img, lab, _ = ds[3]  # 52 x 24: wide letter-box margins
    border = lab == 255
    assert border.any() and (~border).any()
    black = -(torch.tensor(LIP_MEAN_BGR) / torch.tensor(LIP_STD_BGR))
    # pixels whose bilinear neighbourhood is entirely outside are exactly black
    far = border.clone()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            far &= torch.roll(border, (dy, dx), (0, 1))
    sel = img[:, far]
    torch.testing.assert_close(sel, black.view(3, 1).expand_as(sel), rtol=0, atol=1e-6)
    assert set(lab[~border].unique().tolist()) <= set(range(20))


def test_augmentation_parameter_distribution(blocks_root):
    ds = LIPDataset(blocks_root, "train", crop_size=33, seed=3)
    base = box_to_center_scale(100, 200, 1.0)[1][0]
    factors, rots, flips = [], [], []
    for i in range(3000):
        _, s, r, f = ds.sample_params(i, 100, 200)
        factors.append(s[0] / base)
        rots.append(r)
        flips.append(f)
    factors, rots, flips = np.array(factors), np.array(rots), np.array(flips)
    assert factors.min() >= 0.75 - 1e-12 and factors.max() <= 1.25 + 1e-12
    assert (factors == 0.75).any() and (factors == 1.25).any()  # clipped tails
    assert abs(np.mean(rots != 0) - 0.6) < 0.04
    assert np.abs(rots).max() <= 60 and (np.abs(rots) == 60).any()
    assert abs(flips.mean() - 0.5) < 0.04


def test_deterministic_with_seed(blocks_root):
    a = LIPDataset(blocks_root, "train", crop_size=21, seed=7)
    b = LIPDataset(blocks_root, "train", crop_size=21, seed=7)
    for i in (3, 0, 2):  # order of access does not matter
        xa, la, ma = a[i]
        xb, lb, mb = b[i]
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        assert torch.equal(la, lb) and ma["rotation"] == mb["rotation"]
    params = [a.sample_params(i, 40, 40) for i in range(4)]
    a.set_epoch(1)
    assert [a.sample_params(i, 40, 40) for i in range(4)] != params
    c = LIPDataset(blocks_root, "train", crop_size=21, seed=8)
    assert [c.sample_params(i, 40, 40) for i in range(4)] != params
    # a DataLoader with workers yields the same batch as the dataset itself
    loader = torch.utils.data.DataLoader(b, batch_size=2, num_workers=1, collate_fn=collate)
    images, labels, metas = next(iter(loader))
    torch.testing.assert_close(images[1], b[1][0], rtol=0, atol=0)
    assert labels.shape == (2, 21, 21) and metas[1]["id"] == "img1"


def test_collate_keeps_original_sizes_as_list(blocks_root):
    ds = LIPDataset(blocks_root, "val", crop_size=17, train=False)
    images, labels, metas = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 17, 17)
    assert isinstance(labels, list) and labels[0].shape == (41, 29) and labels[1].shape == (30, 47)
    assert [m["id"] for m in metas] == ["img0", "img1"]


# ----------------------------------------------------------------- errors

def _good(tmp_path, n=2, h=12, w=10):
    rng = np.random.default_rng(0)
    samples = [(f"s{i}",) + block_sample(rng, h, w, block=4) for i in range(n)]
    write_split(tmp_path, "train", samples)
    return samples


def test_missing_root_and_id_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LIPDataset(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="val_id.txt"):
        _good(tmp_path)
        LIPDataset(tmp_path, "val")


def test_missing_image_or_label_names_the_file(tmp_path):
    _good(tmp_path)
    os.remove(tmp_path / "train_images" / "s1.jpg")
    with pytest.raises(FileNotFoundError, match=r"train_images.s1\.jpg"):
        LIPDataset(tmp_path, "train")
    _good(tmp_path)
    os.remove(tmp_path / "train_segmentations" / "s0.png")
    with pytest.raises(FileNotFoundError, match=r"train_segmentations.s0\.png"):
        LIPDataset(tmp_path, "train")
    # an id listed but absent
    _good(tmp_path)
    (tmp_path / "train_id.txt").write_text("s0\ns1\nghost\n")
    with pytest.raises(FileNotFoundError, match="ghost"):
        LIPDataset(tmp_path, "train")


def test_empty_id_file(tmp_path):
    _good(tmp_path)
    (tmp_path / "train_id.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        LIPDataset(tmp_path, "train")


def test_unreadable_image_names_the_file(tmp_path):
    _good(tmp_path)
    (tmp_path / "train_images" / "s1.jpg").write_bytes(b"not a jpeg at all")
    ds = LIPDataset(tmp_path, "train", crop_size=9)
    ds[0]
    with pytest.raises(ValueError, match=r"s1\.jpg"):
        ds[1]


def test_unreadable_label_names_the_file(tmp_path):
    _good(tmp_path)
    (tmp_path / "train_segmentations" / "s0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"s0\.png"):
        LIPDataset(tmp_path, "train", crop_size=9)[0]


def test_label_values_out_of_range(tmp_path):
    samples = _good(tmp_path)
    bad = samples[1][2].copy()
    bad[0, 0] = 20
    bad[1, 1] = 254
    Image.fromarray(bad, "L").save(tmp_path / "train_segmentations" / "s1.png")
    ds = LIPDataset(tmp_path, "train", crop_size=9)
    with pytest.raises(ValueError, match=r"s1\.png.*\[20, 254\]"):
        ds[1]
    ok = samples[0][2].copy()
    ok[0, 0] = 255  # ignore is fine
    Image.fromarray(ok, "L").save(tmp_path / "train_segmentations" / "s0.png")
    ds[0]


def test_rgb_label_rejected(tmp_path):
    samples = _good(tmp_path)
    Image.fromarray(np.stack([samples[0][2]] * 3, -1), "RGB").save(
        tmp_path / "train_segmentations" / "s0.png")
    with pytest.raises(ValueError, match=r"s0\.png.*one channel"):
        LIPDataset(tmp_path, "train", crop_size=9)[0]


def test_size_mismatch_names_both_files(tmp_path):
    _good(tmp_path)
    Image.fromarray(np.zeros((12, 11), dtype=np.uint8), "L").save(
        tmp_path / "train_segmentations" / "s0.png")
    with pytest.raises(ValueError, match=r"s0\.jpg.*10x12.*s0\.png.*11x12"):
        LIPDataset(tmp_path, "train", crop_size=9)[0]


def test_bad_arguments(tmp_path):
    _good(tmp_path)
    with pytest.raises(TypeError, match="crop_size"):
        LIPDataset(tmp_path, "train", crop_size=9.5)
    with pytest.raises(ValueError, match="crop_size"):
        LIPDataset(tmp_path, "train", crop_size=(1, 9))
    with pytest.raises(ValueError, match="split"):
        LIPDataset(tmp_path, "")
    with pytest.raises(TypeError, match="root"):
        LIPDataset(3, "train")
    ds = LIPDataset(tmp_path, "train", crop_size=9)
    with pytest.raises(IndexError):
        ds[2]


def test_inputs_untouched(tmp_path):
    _good(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    ds = LIPDataset(tmp_path, "train", crop_size=9)
    ds[0], ds[1]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------- channel order, sizes

def test_rgb_channel_order_is_bgr_flipped(blocks_root):
    """channel_order="RGB" with the statistics in RGB order gives exactly the BGR
    image's channels reversed; the default is BGR, unchanged."""
    mean_rgb, std_rgb = LIP_MEAN_BGR[::-1], LIP_STD_BGR[::-1]
    for train in (True, False):
        bgr = LIPDataset(blocks_root, "train", crop_size=(19, 23), train=train, seed=2)
        explicit = LIPDataset(blocks_root, "train", crop_size=(19, 23), train=train, seed=2,
                              channel_order="BGR")
        rgb = LIPDataset(blocks_root, "train", crop_size=(19, 23), train=train, seed=2,
                         channel_order="rgb", mean=mean_rgb, std=std_rgb)
        assert rgb.channel_order == "RGB" and bgr.channel_order == "BGR"
        for i in range(len(bgr)):
            a, b, c = bgr[i], rgb[i], explicit[i]
            assert torch.equal(b[0], a[0].flip(0)) and torch.equal(a[1], b[1])
            assert torch.equal(a[0], c[0])
            assert b[2]["rotation"] == a[2]["rotation"] and b[2]["flip"] == a[2]["flip"]
    for bad in ("BRG", "", None, 3):
        with pytest.raises(ValueError, match="channel_order"):
            LIPDataset(blocks_root, "train", channel_order=bad)


def test_rgb_with_imagenet_statistics(tmp_path):
    from lipfast.data import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

    rgb = np.zeros((9, 9, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    write_split(tmp_path, "val", [("a", rgb, np.zeros((9, 9), dtype=np.uint8))])
    img = LIPDataset(tmp_path, "val", crop_size=9, train=False, channel_order="RGB",
                     mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB)[0][0]
    # channel 0 is red: (200/255 - 0.485) / 0.229
    expect = [(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225]
    for ch, e in enumerate(expect):
        assert abs(float(img[ch, 4, 4]) - e) < 2.5 / 255 / 0.22


def test_denormalize_channel_order(blocks_root):
    from lipfast.data import denormalize

    mean_rgb, std_rgb = LIP_MEAN_BGR[::-1], LIP_STD_BGR[::-1]
    bgr = LIPDataset(blocks_root, "val", crop_size=15, train=False)[0][0]
    rgb = LIPDataset(blocks_root, "val", crop_size=15, train=False, channel_order="RGB",
                     mean=mean_rgb, std=std_rgb)[0][0]
    a = denormalize(bgr)
    b = denormalize(rgb, mean_rgb, std_rgb, channel_order="RGB")
    assert a.shape == (15, 15, 3) and a.dtype == torch.uint8 and torch.equal(a, b)
    # the picture is RGB: block_sample's blue is 128 and green 255 - red
    centre = a[5:10, 5:10].float()
    assert (centre[..., 2] - 128).abs().max() <= 3
    assert (centre[..., 0] + centre[..., 1] - 255).abs().max() <= 4
    with pytest.raises(ValueError, match="channel_order"):
        denormalize(bgr, channel_order="XYZ")


@pytest.mark.parametrize("size", [473, 512, 576])
def test_standard_crop_sizes(blocks_root, size):
    img, lab, meta = LIPDataset(blocks_root, "train", crop_size=size, seed=1)[2]
    assert img.shape == (3, size, size) and lab.shape == (size, size)
    assert meta["source"] == "lip"
    img, lab, meta = LIPDataset(blocks_root, "val", crop_size=size, train=False)[1]
    assert img.shape == (3, size, size) and lab.shape == (30, 47)


def test_repeat_streams(blocks_root):
    """item(i, 0) is ds[i]; item(i, r > 0) draws the sample's own extra stream."""
    ds = LIPDataset(blocks_root, "train", crop_size=17, seed=9)
    assert torch.equal(ds.item(1)[0], ds[1][0])
    base = [ds.sample_params(i, 40, 50) for i in range(4)]
    again = [ds.sample_params(i, 40, 50, repeat=1) for i in range(4)]
    assert again != base and again == [ds.sample_params(i, 40, 50, repeat=1) for i in range(4)]
    a, b = ds.item(2, 1), ds.item(2, 1)
    assert torch.equal(a[0], b[0]) and a[2]["index"] == 2
    # repeat 0 calls sample_params with three arguments: subclasses overriding it still work
    fixed = FixedParams(blocks_root, "train", crop_size=17, factor=1.0, rotation=5.0)
    assert fixed.item(0, 0)[2]["rotation"] == 5.0
