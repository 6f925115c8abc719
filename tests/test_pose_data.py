"""lipfast.data.LIPPoseDataset (SPEC section 10, "LIP pose data"): CSV parsing and
its errors, the HRNet pose crop, the augmentation, determinism, the item and its
collation, and the synthetic LIP-pose layout.

References are written here from the SPEC / deep-high-resolution-net's
definitions, independently of lipfast.data.transforms: ``get_affine_transform``'s
three-point construction (solved in float64, and cross-checked with
``cv2.getAffineTransform`` as the reference solves it), ``box_to_center_scale``'s
aspect rule, ``fliplr_joints``, a vectorised float64 bilinear sampler with a zero
border (OpenCV's BORDER_CONSTANT) and the per-sample random stream of
LIPDataset.
"""

from __future__ import annotations

import math
import os
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from lipfast.data import LIPPoseDataset, pose_collate, read_pose_csv
from lipfast.data.pose import POSE_CSV_DIR
from lipfast.data.synthetic import main as synth_main
from lipfast.data.synthetic import make_pose_sample, make_synthetic
from lipfast.data.transforms import affine_points, pose_box_to_center_scale
from lipfast.pose import LIP_POSE_FLIP_PAIRS, NUM_LIP_JOINTS

J = NUM_LIP_JOINTS
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
PERM = list(range(J))
for _a, _b in LIP_POSE_FLIP_PAIRS:
    PERM[_a], PERM[_b] = _b, _a


# ----------------------------------------------------------------- references

def ref_affine(center, scale, rot, output_size, solver="numpy"):
    """deep-high-resolution-net's get_affine_transform (shift 0), 2 x 3; scale in
    200 px units, output_size (W, H)."""
    src_w = scale[0] * 200.0
    dst_w, dst_h = output_size
    r = math.pi * rot / 180
    sn, cs = math.sin(r), math.cos(r)
    p = (0.0, src_w * -0.5)
    src_dir = np.array([p[0] * cs - p[1] * sn, p[0] * sn + p[1] * cs])
    dst_dir = np.array([0.0, dst_w * -0.5])

    def third(a, b):
        d = a - b
        return b + np.array([-d[1], d[0]])

    src = np.zeros((3, 2))
    dst = np.zeros((3, 2))
    src[0] = center
    src[1] = np.asarray(center, dtype=float) + src_dir
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + dst_dir
    src[2] = third(src[0], src[1])
    dst[2] = third(dst[0], dst[1])
    if solver == "cv2":
        return cv2.getAffineTransform(np.float32(src), np.float32(dst))
    return np.linalg.solve(np.concatenate([src, np.ones((3, 1))], 1), dst).T


def ref_box_to_center_scale(x, y, w, h, aspect_ratio, enlarge=True):
    """The reference's _xywh2cs: centre, aspect rule, / 200, * 1.25."""
    center = np.array([x + w * 0.5, y + h * 0.5])
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / 200.0, h / 200.0])
    return center, scale * 1.25 if enlarge else scale


def ref_fliplr_joints(joints, width):
    out = joints.copy()
    out[:, 0] = width - joints[:, 0] - 1
    return out[PERM]


def ref_bilinear(img, m, out_hw):
    """img C x H x W float64; m 2 x 3 src -> dst; zero border; vectorised."""
    c, h, w = img.shape
    full = np.vstack([m, [0, 0, 1]])
    inv = np.linalg.inv(full)
    yy, xx = np.mgrid[0:out_hw[0], 0:out_hw[1]].astype(np.float64)
    sx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    sy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    out = np.zeros((c,) + tuple(out_hw))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
            vals = img[:, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
            out += np.where(ok, wy * wx, 0.0) * vals
    return out


def ref_params(seed, epoch, index):
    """LIPDataset's per-sample stream, drawn in the documented order."""
    g = np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))
    s = float(np.clip(1 + 0.25 * g.standard_normal(), 0.75, 1.25))
    n = g.standard_normal()
    rot = float(np.clip(30 * n, -60, 60)) if g.random() <= 0.6 else 0.0
    flip = bool(g.random() <= 0.5)
    return s, rot, flip


def normalized_rgb(path):
    """The reference input before the warp: the file as RGB / 255 (C x H x W)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return rgb.transpose(2, 0, 1)


def denorm(image):
    """Normalised RGB item image -> float RGB 0..255, H x W x 3."""
    x = image.double().numpy().transpose(1, 2, 0)
    return (x * STD + MEAN) * 255.0


# ----------------------------------------------------------------- fixtures

# 16 distinct colours from {0, 128, 255}^3 (no black, no grey: the background)
PALETTE = np.array([c for c in np.ndindex(3, 3, 3) if len(set(c)) > 1][:J]) * 127.5
PALETTE = np.clip(np.round(PALETTE), 0, 255)
BACKGROUND = 60.0
DOT = 4  # half-size of the dot squares


def fmt(v):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:g}"


def csv_line(name, joints, v=None):
    fields = [name]
    for k in range(J):
        x, y = joints[k]
        fields += [fmt(float(x)), fmt(float(y)), fmt(0.0 if v is None else float(v[k]))]
    return ",".join(fields)


def dot_image(joints, h, w):
    """Background grey with a (2 DOT + 1)^2 square of joint k's colour at each
    present joint (integer coordinates)."""
    img = np.full((h, w, 3), BACKGROUND)
    for k, (x, y) in enumerate(joints):
        if np.isnan(x):
            continue
        xi, yi = int(x), int(y)
        img[max(0, yi - DOT):yi + DOT + 1, max(0, xi - DOT):xi + DOT + 1] = PALETTE[k]
    return img.astype(np.uint8)


def grid_joints(rng, h, w, missing=()):
    """16 well separated integer joints on a jittered 4 x 4 grid inside the image."""
    gx = np.linspace(0.12, 0.80, 4) * (w - 1)  # not symmetric: the joints' box is off-centre
    gy = np.linspace(0.15, 0.85, 4) * (h - 1)
    pts = np.array([(gx[k % 4], gy[k // 4]) for k in range(J)])
    pts = np.round(pts + rng.uniform(-2, 2, size=pts.shape))
    pts[list(missing)] = np.nan
    return pts


def write_pose_root(root, split, samples, extra_lines=()):
    """samples: list of (name, rgb uint8 or None, joints J x 2, v or None)."""
    img_dir = root / f"{split}_images"
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(root / POSE_CSV_DIR, exist_ok=True)
    lines = []
    for name, rgb, joints, v in samples:
        if rgb is not None:
            Image.fromarray(rgb, "RGB").save(img_dir / name, format="JPEG", quality=100,
                                            subsampling=0)
        lines.append(csv_line(name, joints, v))
    lines += list(extra_lines)
    path = root / POSE_CSV_DIR / f"lip_{split}_set.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


SIZES = [(161, 117), (120, 150), (140, 140), (96, 171)]  # (H, W)


@pytest.fixture(scope="module")
def dots_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose")
    rng = np.random.default_rng(0)
    samples = []
    for i, (h, w) in enumerate(SIZES):
        pts = grid_joints(rng, h, w, missing=(6,) if i == 1 else ())
        v = rng.integers(0, 2, size=J).astype(float)
        if i == 2:
            v[3] = np.nan
        samples.append((f"{100 + i}_{i + 1}.jpg", dot_image(pts, h, w), pts, v))
    write_pose_root(root, "train", samples)
    write_pose_root(root, "val", samples[:2])
    return root, samples


def nearest_colour(rgb):
    d = np.abs(PALETTE[None, :, :] - np.asarray(rgb)[:, None, :]).max(-1)
    return d.argmin(-1), d.min(-1)


def check_dots(image, joints, visible, source_of, size_wh, margin=DOT + 3):
    """For every visible joint well inside the input: the pixel at the joint has
    the colour of the source joint's dot, and the centroid of that colour's pixels
    near the joint is within a pixel of it. Returns the number checked."""
    rgb = denorm(image)
    w_in, h_in = size_wh
    checked = 0
    for j in range(J):
        if visible[j] == 0:
            continue
        x, y = joints[j].tolist()
        if not (margin <= x <= w_in - 1 - margin and margin <= y <= h_in - 1 - margin):
            continue
        want = PALETTE[source_of[j]]
        xi, yi = int(round(x)), int(round(y))
        assert np.abs(rgb[yi, xi] - want).max() < 45, (j, rgb[yi, xi], want)
        r = 3 * DOT
        y0, x0 = max(0, yi - r), max(0, xi - r)
        win = rgb[y0:yi + r + 1, x0:xi + r + 1]
        mask = np.abs(win - want).max(-1) < 64
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() + x0, ys.mean() + y0
        assert abs(cx - x) <= 1.0 and abs(cy - y) <= 1.0, (j, (cx, cy), (x, y))
        checked += 1
    return checked


# ----------------------------------------------------------------- CSV parsing

def test_read_pose_csv_nan_and_values(tmp_path):
    pts = np.arange(2 * J, dtype=float).reshape(J, 2) + 0.5
    pts[3] = np.nan
    v = np.ones(J)
    v[5] = np.nan
    row2 = csv_line("b_2.jpg", pts, v).split(",")
    row2[1 + 3 * 7 + 1] = "nan"  # only y of joint 7 missing: the joint is missing
    path = tmp_path / "p.csv"
    path.write_text(csv_line("a_1.jpg", pts, v) + "\n\n  \n" + ",".join(row2) + "\n")
    names, joints, vv, lines = read_pose_csv(path)
    assert names == ["a_1.jpg", "b_2.jpg"]
    assert lines.tolist() == [1, 4]  # blank lines skipped, rows keep their line numbers
    assert joints.shape == (2, J, 2) and joints.dtype == np.float64
    np.testing.assert_array_equal(joints[0], pts)
    assert np.isnan(joints[1, 7]).all() and np.isnan(joints[1, 3]).all()
    keep = [k for k in range(J) if k not in (3, 7)]
    np.testing.assert_array_equal(joints[1, keep], pts[keep])
    np.testing.assert_array_equal(vv[0], v)  # v kept as written, nan included


@pytest.mark.parametrize("edit,msg", [
    (lambda f: f[:-1], "48 fields, expected 49"),
    (lambda f: f + ["0"], "50 fields, expected 49"),
    (lambda f: f[:4] + ["abc"] + f[5:], "x of joint 1 is not a number: 'abc'"),
    (lambda f: f[:6] + [""] + f[7:], "v of joint 1 is empty"),
    (lambda f: f[:2] + ["inf"] + f[3:], "y of joint 0 is infinite"),
    (lambda f: ["  "] + f[1:], "empty image name"),
    (lambda f: ["../x_1.jpg"] + f[1:], "must be a file name"),
])
def test_malformed_rows_name_file_and_row(tmp_path, edit, msg):
    pts = np.full((J, 2), 10.0)
    good = csv_line("a_1.jpg", pts)
    bad = ",".join(edit(good.split(",")))
    path = tmp_path / "bad.csv"
    path.write_text(good + "\n" + good.replace("a_1", "b_1") + "\n" + bad + "\n")
    with pytest.raises(ValueError) as err:
        read_pose_csv(path)
    assert str(path) in str(err.value) and "row 3" in str(err.value)
    assert msg in str(err.value)
    # the dataset reports the same
    os.makedirs(tmp_path / POSE_CSV_DIR)
    os.replace(path, tmp_path / POSE_CSV_DIR / "lip_train_set.csv")
    with pytest.raises(ValueError, match="row 3"):
        LIPPoseDataset(tmp_path, "train", check_files=False)


def test_empty_and_binary_csv(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text("\n\n")
    with pytest.raises(ValueError, match=f"{p}.*no rows"):
        read_pose_csv(p)
    p.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ValueError, match=str(p)):
        read_pose_csv(p)


def test_missing_files_are_named(tmp_path, dots_root):
    with pytest.raises(FileNotFoundError, match="root not found"):
        LIPPoseDataset(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match=f"{POSE_CSV_DIR}/lip_train_set.csv"):
        LIPPoseDataset(tmp_path, "train")
    pts = np.full((J, 2), 5.0)
    img = dot_image(pts, 20, 20)
    write_pose_root(tmp_path, "train", [("1_1.jpg", img, pts, None),
                                        ("2_1.jpg", None, pts, None),
                                        ("3_1.jpg", None, pts, None)])
    with pytest.raises(FileNotFoundError) as err:
        LIPPoseDataset(tmp_path, "train")
    text = str(err.value)
    assert os.path.join(str(tmp_path), "train_images", "2_1.jpg") in text
    assert "row 2" in text and "and 1 more" in text and "lip_train_set.csv" in text
    ds = LIPPoseDataset(tmp_path, "train", check_files=False)  # fails only when read
    with pytest.raises(FileNotFoundError, match=r"2_1\.jpg"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        LIPPoseDataset(tmp_path, "train", image_dir=tmp_path / "elsewhere")
    root, _ = dots_root
    ds = LIPPoseDataset(tmp_path, "val", csv_path=root / POSE_CSV_DIR / "lip_val_set.csv",
                        image_dir=root / "train_images")  # both paths as parameters
    assert len(ds) == 2 and ds[0][0].shape == (3, 256, 256)


def test_unreadable_image_names_file_and_row(tmp_path):
    pts = np.full((J, 2), 5.0)
    write_pose_root(tmp_path, "train", [("1_1.jpg", None, pts, None)])
    (tmp_path / "train_images" / "1_1.jpg").write_bytes(b"not a jpeg")
    ds = LIPPoseDataset(tmp_path, "train")
    with pytest.raises(ValueError, match=r"cannot read LIP pose image \(row 1 of "
                                         r".*lip_train_set\.csv\) .*1_1\.jpg"):
        ds[0]


def test_rows_without_joints_warned_and_skipped(tmp_path):
    rng = np.random.default_rng(1)
    pts = grid_joints(rng, 40, 30)
    none = np.full((J, 2), np.nan)
    img = dot_image(pts, 40, 30)
    samples = [("1_1.jpg", img, pts, None), ("2_1.jpg", img, none, None),
               ("3_1.jpg", img, pts, None), ("4_1.jpg", img, none, None)]
    write_pose_root(tmp_path, "train", samples)
    with pytest.warns(UserWarning, match=r"lip_train_set\.csv: 2 row\(s\).*rows 2, 4"):
        ds = LIPPoseDataset(tmp_path, "train")
    assert len(ds) == 2 and ds.names == ["1_1.jpg", "3_1.jpg"]
    assert ds[1][3]["row"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = LIPPoseDataset(tmp_path, "train", keep_empty=True, train=False)
    assert len(kept) == 4
    image, joints, visible, meta = kept[1]
    assert visible.sum() == 0 and (joints == 0).all() and torch.isnan(meta["joints"]).all()
    write_pose_root(tmp_path, "val", samples[1:2])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no row with a joint"):
        LIPPoseDataset(tmp_path, "val")


def test_bad_arguments(tmp_path, dots_root):
    root, _ = dots_root
    for bad in ((256,), (256, 256, 3), "256", (256.0, 256), (True, 256)):
        with pytest.raises(TypeError, match="image_size"):
            LIPPoseDataset(root, "train", image_size=bad)
    with pytest.raises(ValueError, match="image_size"):
        LIPPoseDataset(root, "train", image_size=(1, 256))
    with pytest.raises(ValueError, match="box"):
        LIPPoseDataset(root, "train", box="person")
    with pytest.raises(ValueError, match="split"):
        LIPPoseDataset(root, "../train")
    with pytest.raises(ValueError, match="scale_factor"):
        LIPPoseDataset(root, "train", scale_factor=1.0)
    with pytest.raises(ValueError, match="rotation_factor"):
        LIPPoseDataset(root, "train", rotation_factor=-1)
    with pytest.raises(TypeError, match="root"):
        LIPPoseDataset(3, "train")
    ds = LIPPoseDataset(root, "val")
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(TypeError):
        ds[0.5]


# ----------------------------------------------------------------- geometry

def test_box_to_center_scale_matches_reference():
    for (x, y, w, h), ar in [((3, 4, 50, 80), 0.75), ((0, 0, 90, 40), 1.0),
                             ((-0.5, -0.5, 120, 161), 288 / 384), ((2, 2, 0, 30), 1.0)]:
        c, s = pose_box_to_center_scale(x, y, w, h, ar)
        rc, rs = ref_box_to_center_scale(x, y, w, h, ar)
        np.testing.assert_allclose(c, rc, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s, rs, rtol=1e-12)
        assert s[0] / s[1] == pytest.approx(ar)
        _, s1 = pose_box_to_center_scale(x, y, w, h, ar, enlarge=1.0)
        np.testing.assert_allclose(s1, ref_box_to_center_scale(x, y, w, h, ar, False)[1])
    with pytest.raises(ValueError, match="positive size"):
        pose_box_to_center_scale(0, 0, 0, 0, 1.0)


def test_affine_points_keeps_nan():
    m = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, -1.0], [0.0, 0.0, 1.0]])
    p = torch.tensor([[1.0, 1.0], [float("nan"), float("nan")]])
    out = affine_points(p, m)
    assert out[0].tolist() == [3.0, 2.0] and torch.isnan(out[1]).all()
    with pytest.raises(ValueError):
        affine_points(torch.zeros(3, 3), m)


@pytest.mark.parametrize("size_wh", [(256, 256), (192, 256), (288, 384), (384, 512)])
def test_eval_item_matches_reference(dots_root, size_wh):
    """Evaluation: box = the whole image (no 1.25), the reference affine, the
    reference bilinear warp of the RGB image, ImageNet normalisation, joints by
    the same affine; the sizes of SPEC 10."""
    root, samples = dots_root
    ds = LIPPoseDataset(root, "train", image_size=size_wh, train=False)
    w_in, h_in = size_wh
    for i in (0, 3):
        image, joints, visible, meta = ds[i]
        assert image.shape == (3, h_in, w_in) and image.dtype == torch.float32
        assert joints.shape == (J, 2) and joints.dtype == torch.float32
        assert visible.shape == (J,) and visible.dtype == torch.float32
        h, w = SIZES[i]
        assert (meta["height"], meta["width"]) == (h, w)
        c, s = ref_box_to_center_scale(-0.5, -0.5, w, h, w_in / h_in, enlarge=False)
        np.testing.assert_allclose(meta["center"].numpy(), [(w - 1) / 2, (h - 1) / 2])
        np.testing.assert_allclose(meta["scale"].numpy(), s, rtol=1e-12)
        assert meta["rotation"] == 0.0 and meta["flip"] is False
        m = ref_affine(c, s, 0.0, size_wh)
        np.testing.assert_allclose(meta["affine"][:2].numpy(), m, atol=1e-9)
        np.testing.assert_allclose(meta["affine"][:2].numpy(), ref_affine(c, s, 0, size_wh, "cv2"),
                                   atol=1e-4)
        want = ref_bilinear(normalized_rgb(meta["image_path"]), m, (h_in, w_in))
        want = (want - MEAN[:, None, None]) / STD[:, None, None]
        # float32 sampling grid: 1e-4 in normalised units (about 2.5e-5 of the 0..1 range)
        np.testing.assert_allclose(image.numpy(), want, atol=1e-4)
        pts = samples[i][2]
        np.testing.assert_array_equal(meta["joints"].numpy(), pts)
        ok = ~np.isnan(pts).any(1)
        np.testing.assert_array_equal(visible.numpy(), ok.astype(np.float32))
        np.testing.assert_allclose(joints.numpy()[ok], pts[ok] @ m[:, :2].T + m[:, 2], atol=1e-4)
        assert (joints.numpy()[~ok] == 0).all()
        # the whole image fits: the longer side spans the input (letter-boxed)
        assert check_dots(image, joints, visible, list(range(J)), size_wh) >= 10


def test_eval_item_meta_and_v(dots_root):
    root, samples = dots_root
    ds = LIPPoseDataset(root, "train", train=False)
    image, joints, visible, meta = ds[2]
    assert meta["id"] == "102_3" and meta["image"] == "102_3.jpg" and meta["index"] == 2
    assert meta["row"] == 3 and meta["source"] == "lip_pose"
    assert meta["image_path"] == os.path.join(str(root), "train_images", "102_3.jpg")
    np.testing.assert_array_equal(meta["v"].numpy(), samples[2][3])  # nan kept
    assert torch.isnan(meta["v"][3])
    assert meta["v"].dtype == torch.float64 and meta["joints"].dtype == torch.float64
    _, _, vis1, meta1 = ds[1]
    assert vis1[6] == 0 and vis1.sum() == J - 1 and torch.isnan(meta1["joints"][6]).all()
    # decoding back: c + (x - W/2) * 200 s / W at input resolution is the joint
    x_img = meta["center"] + (joints.double() - torch.tensor([128.0, 128.0])) * \
        200 * meta["scale"] / 256
    np.testing.assert_allclose(x_img.numpy(), samples[2][2], atol=1e-3)
    # the items are copies: changing one changes nothing in the data set
    meta["joints"].fill_(-1.0)
    meta["v"].fill_(-1.0)
    joints.fill_(-1.0)
    again = ds[2]
    np.testing.assert_array_equal(again[3]["joints"].numpy(), samples[2][2])
    np.testing.assert_array_equal(again[3]["v"].numpy(), samples[2][3])
    assert (again[1] >= 0).all()


def test_augmented_dots_land_on_joints(dots_root):
    """Training items over several epochs (scale, rotation and flip drawn): the
    image's dot of each joint's source sits at the returned joint; the matrix is
    the reference's for the drawn (centre, scale, rotation), flip composed."""
    root, samples = dots_root
    ds = LIPPoseDataset(root, "train", image_size=(192, 256), seed=7)
    seen_flip = seen_rot = checked = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, joints, visible, meta = ds[i]
            s, rot, flip = ref_params(7, epoch, i)
            h, w = SIZES[i]
            c, s0 = ref_box_to_center_scale(-0.5, -0.5, w, h, 192 / 256, enlarge=False)
            assert meta["rotation"] == pytest.approx(rot) and meta["flip"] == flip
            np.testing.assert_allclose(meta["scale"].numpy(), s0 * s, rtol=1e-12)
            pts = samples[i][2]
            if flip:
                c = np.array([w - 1 - c[0], c[1]])
                pts = ref_fliplr_joints(pts, w)
            np.testing.assert_allclose(meta["center"].numpy(), c, atol=1e-12)
            m = ref_affine(c, s0 * s, rot, (192, 256))
            ok = ~np.isnan(pts).any(1)
            np.testing.assert_allclose(joints.numpy()[ok], pts[ok] @ m[:, :2].T + m[:, 2],
                                       atol=1e-3)
            np.testing.assert_array_equal(visible.numpy(), ok.astype(np.float32))
            source_of = PERM if flip else list(range(J))
            checked += check_dots(image, joints, visible, source_of, (192, 256))
            seen_flip += flip
            seen_rot += rot != 0
    assert seen_flip >= 3 and seen_rot >= 3 and checked >= 100


def test_flip_mirrors_image_and_swaps_joints(dots_root):
    """Same draws with and without the flip (flip=False keeps the stream): the
    flipped input is the unflipped one mirrored about x = W_in / 2 (the centre
    maps to W_in / 2), the joints x -> W_in - x with the pairs swapped, the box
    centre mirrored (box="joints" is not symmetric)."""
    root, samples = dots_root
    kw = dict(image_size=(192, 256), seed=3, box="joints", scale_factor=0.0,
              rotation_factor=0.0)
    on = LIPPoseDataset(root, "train", **kw)
    off = LIPPoseDataset(root, "train", flip=False, **kw)
    flipped = 0
    for epoch in range(3):
        on.set_epoch(epoch)
        off.set_epoch(epoch)
        for i in range(len(on)):
            a, b = on[i], off[i]
            assert b[3]["flip"] is False
            if not a[3]["flip"]:
                torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
                continue
            flipped += 1
            w = a[3]["width"]
            assert a[3]["center"][0].item() == pytest.approx(w - 1 - b[3]["center"][0].item())
            assert a[3]["center"][0].item() != pytest.approx(b[3]["center"][0].item())
            torch.testing.assert_close(a[0][:, :, 1:], b[0][:, :, 1:].flip(-1), rtol=0,
                                       atol=1e-5)
            want = b[1][PERM].clone()
            want[:, 0] = 192 - want[:, 0]
            vis = b[2][PERM]
            torch.testing.assert_close(a[2], vis)
            torch.testing.assert_close(a[1][vis > 0], want[vis > 0], rtol=0, atol=1e-4)
    assert flipped >= 3


def test_joints_box_matches_reference(dots_root):
    root, samples = dots_root
    ds = LIPPoseDataset(root, "train", image_size=(288, 384), box="joints", train=False)
    for i in range(len(ds)):
        meta = ds[i][3]
        pts = samples[i][2]
        pts = pts[~np.isnan(pts).any(1)]
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        c, s = ref_box_to_center_scale(x0, y0, x1 - x0, y1 - y0, 288 / 384)
        np.testing.assert_allclose(meta["center"].numpy(), c)
        np.testing.assert_allclose(meta["scale"].numpy(), s, rtol=1e-12)


def test_single_joint_box_falls_back_to_image(tmp_path):
    pts = np.full((J, 2), np.nan)
    pts[4] = (10, 12)
    write_pose_root(tmp_path, "train", [("1_1.jpg", dot_image(pts, 30, 20), pts, None)])
    meta = LIPPoseDataset(tmp_path, "train", box="joints", train=False)[0][3]
    np.testing.assert_allclose(meta["center"].numpy(), [9.5, 14.5])
    np.testing.assert_allclose(meta["scale"].numpy(), [30 / 200, 30 / 200])


# ----------------------------------------------------------------- randomness

def test_augmentation_ranges_and_probabilities(dots_root):
    """Over 3000 draws: the scale factor in [0.75, 1.25] with the clip hit as
    often as |N| > 1 (31.7 %), rotations in [-60, 60] with probability 0.6 of
    being drawn and |N| > 2 clipped, flips with probability 0.5; every draw the
    documented stream's."""
    root, _ = dots_root
    ds = LIPPoseDataset(root, "train", seed=11)
    h, w = SIZES[0]
    _, base = ds.person_box(0, w, h)
    n = 3000
    factors, rots, flips = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
    for k in range(n):
        ds.set_epoch(k // len(ds))
        i = k % len(ds)
        _, scale, rot, flip = ds.sample_params(i, w, h)
        factors[k], rots[k], flips[k] = scale[0] / base[0], rot, flip
        s_ref, r_ref, f_ref = ref_params(11, k // len(ds), i)
        assert (factors[k], rot, flip) == (pytest.approx(s_ref, rel=1e-12), r_ref, f_ref)
        assert scale[1] / base[1] == pytest.approx(factors[k])
    assert factors.min() == pytest.approx(0.75) and factors.max() == pytest.approx(1.25)
    assert abs(np.isclose(np.abs(factors - 1), 0.25).mean() - 0.317) < 0.04
    assert rots.min() == -60 and rots.max() == 60
    drawn = rots != 0
    assert abs(drawn.mean() - 0.6) < 0.04
    assert abs((np.abs(rots[drawn]) == 60).mean() - 0.0455) < 0.025
    assert 25 < np.std(rots[drawn & (np.abs(rots) < 60)]) < 30  # 30 N, truncated at 2 sigma
    assert abs(flips.mean() - 0.5) < 0.04
    # evaluation draws nothing
    ev = LIPPoseDataset(root, "train", train=False)
    assert ev.sample_params(0, w, h)[2:] == (0.0, False)


def test_deterministic_by_seed_and_epoch(dots_root):
    root, _ = dots_root
    a = LIPPoseDataset(root, "train", seed=5)
    b = LIPPoseDataset(root, "train", seed=5)
    c = LIPPoseDataset(root, "train", seed=6)
    xa, xb, xc = a[1], b[1], c[1]
    torch.testing.assert_close(xa[0], xb[0], rtol=0, atol=0)
    torch.testing.assert_close(xa[1], xb[1], rtol=0, atol=0)
    assert a[1][3]["scale"].tolist() == xa[3]["scale"].tolist()  # reading again: the same
    differs = lambda p, q: not torch.equal(p[0], q[0]) or p[3]["scale"].tolist() != \
        q[3]["scale"].tolist()  # noqa: E731
    assert differs(xa, xc)
    a.set_epoch(1)
    assert differs(a[1], xb)
    a.set_epoch(0)
    torch.testing.assert_close(a[1][0], xb[0], rtol=0, atol=0)


def test_collate_default_and_pose_collate(dots_root):
    root, _ = dots_root
    ds = LIPPoseDataset(root, "train", image_size=(192, 256))
    batch = [ds[i] for i in range(3)]
    images, joints, visible, meta = pose_collate(batch)
    assert images.shape == (3, 3, 256, 192) and joints.shape == (3, J, 2)
    assert visible.shape == (3, J)
    assert meta["center"].shape == (3, 2) and meta["scale"].shape == (3, 2)
    assert meta["joints"].shape == (3, J, 2) and meta["v"].shape == (3, J)
    assert meta["affine"].shape == (3, 3, 3) and meta["flip"].shape == (3,)
    assert meta["id"] == [b[3]["id"] for b in batch] and meta["width"].tolist() == [117, 150,
                                                                                      140]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)
    li, lj, lv, lm = next(iter(loader))
    torch.testing.assert_close(li, images, rtol=0, atol=0)
    torch.testing.assert_close(lj, joints, rtol=0, atol=0)
    torch.testing.assert_close(lm["center"], meta["center"], rtol=0, atol=0)
    assert lm["image"] == meta["image"]


# ----------------------------------------------------------------- synthetic layout

@pytest.fixture(scope="module")
def synth_pose(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_pose")
    synth_main([str(root), "--layout", "lip-pose", "--images", "8", "--val", "3", "--size",
                "96", "--seed", "2", "--progress", "off"])
    return root


def test_synthetic_pose_layout_readable(synth_pose):
    root = synth_pose
    assert sorted(p.name for p in root.iterdir()) == [POSE_CSV_DIR, "train_images",
                                                     "val_images"]
    assert sorted(p.name for p in (root / POSE_CSV_DIR).iterdir()) == [
        "lip_train_set.csv", "lip_val_set.csv"]
    missing = 0
    for split, n in (("train", 8), ("val", 3)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = LIPPoseDataset(root, split, train=False)
        assert len(ds) == n
        for i in range(n):
            assert ds.names[i] == f"{10000 + i}_{1 + i % 3}.jpg"
            img, lab, pts, v = make_pose_sample(2, split, i, 96)
            image, joints, visible, meta = ds[i]
            assert (meta["height"], meta["width"]) == lab.shape
            got = meta["joints"].numpy()
            np.testing.assert_array_equal(np.isnan(got), np.isnan(pts))
            ok = ~np.isnan(pts).any(1)
            np.testing.assert_allclose(got[ok], pts[ok], atol=0.005 + 1e-9)
            np.testing.assert_array_equal(np.isnan(meta["v"].numpy()), ~ok)
            np.testing.assert_array_equal(meta["v"].numpy()[ok], v[ok])
            assert ok.sum() >= 4
            missing += (~ok).sum()
            # the image on disk is the drawn sample (JPEG quality 95)
            on_disk = np.asarray(Image.open(meta["image_path"]), dtype=float)
            hh, ww = (lab.shape[0] // 5) * 5, (lab.shape[1] // 5) * 5
            blocks = lambda a: a[:hh, :ww].reshape(hh // 5, 5, ww // 5, 5, 3).mean((1, 3))  # noqa: E731
            assert np.abs(blocks(on_disk) - blocks(img.astype(float))).mean() < 3
            # every joint lies on the drawn figure, and on its own part where that is clear
            for j in np.nonzero(ok)[0]:
                x, y = int(np.floor(pts[j, 0] + 0.5)), int(np.floor(pts[j, 1] + 0.5))
                assert lab[y, x] != 0, (split, i, j)
            for j, classes in ((0, {19}), (5, {18}), (9, {1, 2}), (10, {15, 3}),
                               (15, {14, 3})):
                if ok[j]:  # right ankle in the right shoe, head top in hair or hat, ...
                    x, y = int(np.floor(pts[j, 0] + 0.5)), int(np.floor(pts[j, 1] + 0.5))
                    assert lab[y, x] in classes, (split, i, j, lab[y, x])
            # the person's left on the image's right
            for a, b in LIP_POSE_FLIP_PAIRS:
                if ok[a] and ok[b]:
                    assert pts[b, 0] > pts[a, 0]
    assert missing >= 3  # some joints written as nan


def test_synthetic_pose_deterministic(tmp_path):
    make_synthetic(tmp_path / "x", 2, size=32, seed=1, val=1, layout="lip-pose")
    make_synthetic(tmp_path / "y", 2, size=32, seed=1, val=1, layout="lip-pose")
    files = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*")
                   if p.is_file())
    assert len(files) == 3 + 2
    for rel in files:
        assert (tmp_path / "x" / rel).read_bytes() == (tmp_path / "y" / rel).read_bytes()
    a, b = make_pose_sample(1, "train", 0, 48), make_pose_sample(2, "train", 0, 48)
    assert not (a[2].shape == b[2].shape and np.array_equal(a[2], b[2], equal_nan=True))
