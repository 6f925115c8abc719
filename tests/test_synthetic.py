"""lipfast.data.synthetic: layout, class coverage, determinism, loadability; the
CIHP layout (--layout cihp); the LIP layout's output pinned."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
from PIL import Image

from lipfast.data import CIHPPersonCrops, LIPDataset
from lipfast.data.synthetic import main, make_cihp_sample, make_sample, make_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    main([str(root), "--images", "6", "--val", "4", "--size", "48", "--seed", "3"])
    return root


def _labels(root, split):
    ids = (root / f"{split}_id.txt").read_text().split()
    return ids, [np.array(Image.open(root / f"{split}_segmentations" / f"{i}.png")) for i in ids]


def test_layout(synth):
    for split, n in (("train", 6), ("val", 4)):
        ids = (synth / f"{split}_id.txt").read_text().splitlines()
        assert len(ids) == n and len(set(ids)) == n
        for sid in ids:
            img = Image.open(synth / f"{split}_images" / f"{sid}.jpg")
            lab = Image.open(synth / f"{split}_segmentations" / f"{sid}.png")
            assert img.format == "JPEG" and img.mode == "RGB"
            assert lab.format == "PNG" and lab.mode == "L"
            assert img.size == lab.size
            arr = np.array(lab)
            assert arr.max() <= 19
    # sizes vary (aspect-ratio handling is exercised)
    sizes = {Image.open(p).size for p in (synth / "train_images").iterdir()}
    assert len(sizes) > 1


def test_all_20_classes_in_every_4_images(synth):
    for split in ("train", "val"):
        _, labels = _labels(synth, split)
        present = set()
        for lab in labels[:4]:
            present |= set(np.unique(lab).tolist())
        assert present == set(range(20)), (split, sorted(set(range(20)) - present))


def test_left_parts_on_image_right(synth):
    """LIP convention: the figure faces the camera, its left side is on the image's right."""
    _, labels = _labels(synth, "train")
    checked = 0
    for lab in labels:
        cols = np.arange(lab.shape[1])[None, :].repeat(lab.shape[0], 0)
        for left, right in ((14, 15), (16, 17), (18, 19)):
            if (lab == left).sum() >= 3 and (lab == right).sum() >= 3:
                assert cols[lab == left].mean() > cols[lab == right].mean()
                checked += 1
    assert checked >= 2 * len(labels)


def test_image_colours_follow_labels(synth):
    """Each class is drawn with its own colour: the per-class mean colour
    differs between classes far more than the noise inside a class."""
    ids = (synth / "train_id.txt").read_text().split()
    img = np.array(Image.open(synth / "train_images" / f"{ids[0]}.jpg")).astype(float)
    lab = np.array(Image.open(synth / "train_segmentations" / f"{ids[0]}.png"))
    means = {c: img[lab == c].mean(0) for c in (0, 5, 9, 13) if (lab == c).sum() > 20}
    assert len(means) >= 3
    keys = list(means)
    gaps = [np.abs(means[a] - means[b]).max() for i, a in enumerate(keys) for b in keys[i + 1:]]
    assert min(gaps) > 30


def test_deterministic(tmp_path):
    a = make_sample(5, "train", 3, 40)
    b = make_sample(5, "train", 3, 40)
    c = make_sample(6, "train", 3, 40)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not (a[0].shape == c[0].shape and np.array_equal(a[0], c[0]))
    make_synthetic(tmp_path / "x", 2, size=32, seed=1, val=1)
    make_synthetic(tmp_path / "y", 2, size=32, seed=1, val=1)
    for rel in ("train_segmentations/synth_train_00001.png", "val_images/synth_val_00000.jpg"):
        assert (tmp_path / "x" / rel).read_bytes() == (tmp_path / "y" / rel).read_bytes()


def test_loadable_by_lipdataset(synth):
    ds = LIPDataset(synth, "train", crop_size=33, seed=0)
    img, lab, meta = ds[0]
    assert img.shape == (3, 33, 33) and lab.shape == (33, 33)
    assert set(lab.unique().tolist()) <= set(range(20)) | {255}
    ev = LIPDataset(synth, "val", crop_size=33, train=False)
    img, lab, meta = ev[1]
    assert lab.shape == (meta["height"], meta["width"])


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--images", "0"])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--images", "2", "--size", "4"])
    with pytest.raises(ValueError, match="--val"):
        make_synthetic(tmp_path, 2, val=-1)


def test_progress_lines_and_off(tmp_path, capsys):
    """Generation reports progress through tqdm's status line: plain lines when
    stderr is no terminal (as under pytest), none with --progress off."""
    main([str(tmp_path / "a"), "--images", "8", "--val", "2", "--size", "24"])
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if ln.startswith("synthetic train:")]
    assert [ln.split("|")[2].split()[0] for ln in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert "\r" not in out.out and "synthetic val: 100%" in out.out
    main([str(tmp_path / "b"), "--images", "8", "--val", "2", "--size", "24",
          "--progress", "off"])
    out = capsys.readouterr()
    assert out.out.splitlines() == [f"synthetic: wrote 8 train images to {tmp_path / 'b'}",
                                    f"synthetic: wrote 2 val images to {tmp_path / 'b'}"]
    assert out.err == ""
    with pytest.raises(ValueError, match="--progress"):
        make_synthetic(tmp_path / "c", 2, quiet=False, progress="fancy")


# ----------------------------------------------------------------- LIP output pinned

def test_lip_layout_output_unchanged(tmp_path):
    """The drawn LIP samples are pinned (hash of the arrays, computed before the
    CIHP layout was added): the default layout must not change."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        for i in range(4):
            img, lab = make_sample(3, split, i, 48)
            h.update(img.tobytes())
            h.update(lab.tobytes())
            h.update(str(img.shape).encode())
    assert h.hexdigest() == "2f2f14ec676fc2c2cdc005f0a43453bf6f2e49156ed7a29e2fd43f1afc7c4f11"
    # the default layout writes the LIP layout only, as before
    main([str(tmp_path / "d"), "--images", "2", "--val", "1", "--size", "24", "--progress",
          "off"])
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "train_id.txt", "train_images", "train_segmentations", "val_id.txt", "val_images",
        "val_segmentations"]


def test_keypoints_do_not_change_the_drawing():
    """make_sample(..., keypoints={}) (what --layout lip-pose uses) draws the same
    pixels and fills the 16 joints, inside the image."""
    for i in range(4):
        kp = {}
        img, lab = make_sample(3, "train", i, 48, keypoints=kp)
        ref_img, ref_lab = make_sample(3, "train", i, 48)
        assert np.array_equal(img, ref_img) and np.array_equal(lab, ref_lab)
        assert sorted(kp) == list(range(16))
        h, w = lab.shape
        assert all(0 <= x <= w - 1 and 0 <= y <= h - 1 for x, y in kp.values())


def test_lip_pose_layout_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--layout", "lip-pose", "--images", "0"])
    with pytest.raises(ValueError, match="lip-pose"):
        make_synthetic(tmp_path, 2, layout="pose")


# ----------------------------------------------------------------- CIHP layout

@pytest.fixture(scope="module")
def cihp(tmp_path_factory):
    root = tmp_path_factory.mktemp("cihp")
    main([str(root), "--layout", "cihp", "--images", "6", "--val", "2", "--size", "64",
          "--seed", "4", "--progress", "off"])
    return root


def _cihp_arrays(root, folder, sid):
    return {k: np.array(Image.open(root / folder / k / f"{sid}.png"))
            for k in ("Category_ids", "Human_ids", "Instance_ids")}


def test_cihp_layout(cihp):
    overlapping = 0
    for folder, id_name, n in (("Training", "train_id.txt", 6), ("Validation", "val_id.txt", 2)):
        ids = (cihp / folder / id_name).read_text().splitlines()
        assert ids == [f"{i:07d}" for i in range(n)]
        for sid in ids:
            img = Image.open(cihp / folder / "Images" / f"{sid}.jpg")
            assert img.format == "JPEG" and img.mode == "RGB"
            for k in ("Category_ids", "Human_ids", "Instance_ids"):
                lab = Image.open(cihp / folder / k / f"{sid}.png")
                assert lab.format == "PNG" and lab.mode == "L" and lab.size == img.size
            a = _cihp_arrays(cihp, folder, sid)
            cat, hum, inst = a["Category_ids"], a["Human_ids"], a["Instance_ids"]
            persons = sorted(set(np.unique(hum).tolist()) - {0})
            assert persons in ([1, 2], [1, 2, 3])  # 2-3 figures, numbered without a gap
            assert cat.max() <= 19
            assert ((cat != 0) == (hum != 0)).all()  # every labelled pixel belongs to a person
            want = np.where(cat != 0, 20 * (hum.astype(int) - 1) + cat, 0)
            np.testing.assert_array_equal(inst, want)
            # Torso-skin on every person (neck / chest), within the persons
            for p in persons:
                assert ((hum == p) & (cat == 10)).sum() > 0
            # figures overlap a little: a person's tight box holds another's pixels
            for p in persons:
                ys, xs = np.nonzero(hum == p)
                box = hum[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
                overlapping += bool(((box != 0) & (box != p)).any())
    assert overlapping >= 2


def test_cihp_deterministic_and_readable(cihp, tmp_path):
    make_synthetic(tmp_path / "x", 2, size=48, seed=1, val=1, layout="cihp")
    make_synthetic(tmp_path / "y", 2, size=48, seed=1, val=1, layout="cihp")
    files = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*")
                   if p.is_file())
    assert len(files) == (2 + 1) * 4 + 2  # 3 images x 4 files, 2 id lists
    for rel in files:
        assert (tmp_path / "x" / rel).read_bytes() == (tmp_path / "y" / rel).read_bytes()
    a, b = make_cihp_sample(1, "train", 0, 48), make_cihp_sample(2, "train", 0, 48)
    assert not (a[0].shape == b[0].shape and np.array_equal(a[0], b[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CIHPPersonCrops(cihp, "train", crop_size=33)
    assert len(ds) >= 12
    img, lab, meta = ds[0]
    assert img.shape == (3, 33, 33) and meta["source"] == "cihp"
    assert set(lab.unique().tolist()) <= set(range(20)) - {10} | {255}
    ev = CIHPPersonCrops(cihp, "val", crop_size=33, train=False, class_map=None)
    assert any((ev[i][1] == 10).any() for i in range(len(ev)))  # Torso-skin kept


def test_cihp_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--layout", "mhp", "--images", "2"])
    with pytest.raises(ValueError, match="--layout"):
        make_synthetic(tmp_path, 2, layout="atr")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--layout", "cihp", "--images", "0"])
