"""lipfast.data.CIHPPersonCrops: one sample per person, SCHP's box rule (SPEC 11),
other people, the class map, LIPDataset's augmentation on the crop, errors.

The box reference below is written from SPEC 11 independently of lipfast's
``person_box``; hand-made data sets put persons on the image border, a 1-pixel
person inside another person's crop, and a 5 x 5 person whose enlarged box
lands on half pixels.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lipfast.data import CIHPPersonCrops, LIPDataset, box_to_center_scale, read_image
from lipfast.data.lip import LIP_MEAN_BGR, LIP_STD_BGR
from lipfast.data.synthetic import make_synthetic

FOLDERS = {"train": ("Training", "train_id.txt"), "val": ("Validation", "val_id.txt")}


# ----------------------------------------------------------------- references

def ref_box(human, person):
    """SPEC 11: tight box [x, y, w, h] with w = x_max - x_min + 1; x1 = x + w,
    y1 = y + h; 0.1 * w / h added on each side; rounded; clamped; inclusive."""
    ys, xs = np.nonzero(human == person)
    x, y = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) - x + 1, int(ys.max()) - y + 1
    H, W = human.shape
    corners = np.array([x - 0.1 * w, y - 0.1 * h, x + w + 0.1 * w, y + h + 0.1 * h])
    x0, y0, x1, y1 = np.rint(corners).astype(int).tolist()  # round half to even
    return (int(np.clip(x0, 0, W - 1)), int(np.clip(y0, 0, H - 1)),
            int(np.clip(x1, 0, W - 1)), int(np.clip(y1, 0, H - 1)))


def ref_crop_label(cat, human, person, box, others="ignore", class_map=None):
    x0, y0, x1, y1 = box
    lab = cat[y0:y1 + 1, x0:x1 + 1].astype(np.int64).copy()
    hum = human[y0:y1 + 1, x0:x1 + 1]
    mapped = lab.copy()
    for k, v in (class_map or {}).items():
        mapped[lab == k] = v
    other = (hum != 0) & (hum != person)
    if others == "ignore":
        mapped[other] = 255
    elif others == "background":
        mapped[other] = 0
    return mapped


# ----------------------------------------------------------------- fixtures

def write_cihp(root, split, samples, id_list=None):
    """samples: (id, rgb H x W x 3 or None, category H x W or None, human H x W or None)."""
    folder, id_name = FOLDERS[split]
    base = root / folder
    for d in ("Images", "Category_ids", "Human_ids", "Instance_ids"):
        os.makedirs(base / d, exist_ok=True)
    for sid, rgb, cat, hum in samples:
        if rgb is not None:
            Image.fromarray(rgb, "RGB").save(base / "Images" / f"{sid}.jpg", quality=100,
                                            subsampling=0)
        if cat is not None:
            Image.fromarray(cat, "L").save(base / "Category_ids" / f"{sid}.png")
        if hum is not None:
            Image.fromarray(hum, "L").save(base / "Human_ids" / f"{sid}.png")
    ids = id_list if id_list is not None else [s[0] for s in samples]
    (base / id_name).write_text("\n".join(ids) + "\n")
    return base


def hand_image():
    """40 x 50: person 1 touches the top-left corner, person 2 is one pixel inside
    person 1's crop, person 3 an L touching the bottom-right corner, person 4 a
    5 x 5 square (its box edges fall on half pixels: Python's round, halves to even)."""
    H, W = 40, 50
    hum = np.zeros((H, W), np.uint8)
    cat = np.zeros((H, W), np.uint8)
    hum[0:10, 0:8] = 1
    cat[0:5, 0:8] = 10  # Torso-skin
    cat[5:10, 0:8] = 14
    hum[11, 9] = 2
    cat[11, 9] = 5
    hum[25:40, 47:50] = 3
    hum[37:40, 40:50] = 3
    cat[25:40, 47:50] = 9
    cat[37:40, 40:50] = 18
    hum[10:15, 13:18] = 4  # x0 = round(12.5) = 12 (half to even), x1 = round(18.5) = 18
    cat[10:15, 13:18] = 13
    cat[12, 14] = 10
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    return rgb, cat, hum


EXPECTED_BOXES = {1: (0, 0, 9, 11), 2: (9, 11, 10, 12), 3: (39, 24, 49, 39), 4: (12, 10, 18, 16)}


@pytest.fixture
def hand_root(tmp_path):
    rgb, cat, hum = hand_image()
    rng = np.random.default_rng(1)
    hum2 = np.zeros((30, 20), np.uint8)
    hum2[5:25, 4:15] = 1
    cat2 = np.where(hum2 == 1, 5, 0).astype(np.uint8)
    cat2[5:8, 4:15] = 13
    rgb2 = rng.integers(0, 256, size=(30, 20, 3), dtype=np.uint8)
    samples = [("0000001", rgb, cat, hum), ("0000002", rgb2, cat2, hum2)]
    write_cihp(tmp_path, "train", samples)
    write_cihp(tmp_path, "val", samples[:1])
    return tmp_path, samples


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cihp_synth")
    make_synthetic(root, 4, size=64, seed=2, val=2, layout="cihp")
    return root


def _arrays(base, sid):
    return (np.array(Image.open(base / "Category_ids" / f"{sid}.png")),
            np.array(Image.open(base / "Human_ids" / f"{sid}.png")))


# ----------------------------------------------------------------- persons and boxes

def test_one_sample_per_person(synth_root):
    ds = CIHPPersonCrops(synth_root, "train", crop_size=33)
    base = synth_root / "Training"
    ids = (base / "train_id.txt").read_text().split()
    want = []
    for sid in ids:
        _, hum = _arrays(base, sid)
        want += [(sid, p) for p in np.unique(hum).tolist() if p != 0]
    got = [(ds[i][2]["image_id"], ds[i][2]["person"]) for i in range(len(ds))]
    assert got == want and len(ds) == len(want) >= 2 * len(ids)
    assert ds.ids == [f"{s}_{p}" for s, p in want]
    assert CIHPPersonCrops(synth_root, "val", crop_size=33).split_dir.endswith("Validation")


def test_box_rule_matches_spec(hand_root, synth_root):
    root, samples = hand_root
    ds = CIHPPersonCrops(root, "train", crop_size=17, train=False)
    boxes = {(m["image_id"], m["person"]): m["box"] for m in (ds[i][2] for i in range(len(ds)))}
    # hand-computed: border clamping, the 1-pixel person (2 x 2 crop: x1 = x + w), halves to even
    for p, box in EXPECTED_BOXES.items():
        assert boxes[("0000001", p)] == box
    checked = 0
    for r, split in ((root, "train"), (synth_root, "train"), (synth_root, "val")):
        ds = CIHPPersonCrops(r, split, crop_size=17, train=False)
        base = r / FOLDERS[split][0]
        for i in range(len(ds)):
            meta = ds[i][2]
            _, hum = _arrays(base, meta["image_id"])
            assert meta["box"] == ref_box(hum, meta["person"]), meta["id"]
            checked += 1
    assert checked > 10


def test_crop_contents_and_others(hand_root):
    """Eval mode returns the crop's own label: category inside the box, class map
    applied, other people's pixels per ``others``; the image is the crop itself."""
    root, samples = hand_root
    _, rgb, cat, hum = samples[0]
    full = read_image(str(root / "Training" / "Images" / "0000001.jpg"))
    for others in ("ignore", "background", "keep"):
        ds = CIHPPersonCrops(root, "train", crop_size=21, train=False, others=others,
                             class_map=None)
        for i in range(4):
            img, lab, meta = ds[i]
            box = meta["box"]
            want = ref_crop_label(cat, hum, meta["person"], box, others)
            np.testing.assert_array_equal(lab.numpy(), want)
            x0, y0, x1, y1 = box
            assert (meta["height"], meta["width"]) == (y1 - y0 + 1, x1 - x0 + 1)
            raw, _ = ds.load(i)
            assert torch.equal(raw, full[:, y0:y1 + 1, x0:x1 + 1])
        # person 1's crop holds person 2's pixel (class 5) at crop (11, 9)
        lab = ds[0][1]
        assert int(lab[11, 9]) == {"ignore": 255, "background": 0, "keep": 5}[others]
    with pytest.raises(ValueError, match="others"):
        CIHPPersonCrops(root, "train", others="drop")


def test_class_map(hand_root):
    root, samples = hand_root
    _, _, cat, hum = samples[0]
    box = EXPECTED_BOXES[1]
    kw = dict(crop_size=15, train=False)
    lip = CIHPPersonCrops(root, "train", **kw)[0][1].numpy()  # default "lip"
    np.testing.assert_array_equal(lip, ref_crop_label(cat, hum, 1, box, class_map={10: 255}))
    assert (lip[0:5, 0:8] == 255).all() and (lip[5:10, 0:8] == 14).all()
    keep = CIHPPersonCrops(root, "train", class_map=None, **kw)[0][1].numpy()
    assert (keep[0:5, 0:8] == 10).all()
    custom = CIHPPersonCrops(root, "train", class_map={10: 5, 14: 255}, **kw)[0][1].numpy()
    assert (custom[0:5, 0:8] == 5).all() and (custom[5:10, 0:8] == 255).all()
    # a smaller label set: classes >= num_classes must be mapped
    small = {c: (c if c < 5 else 255) for c in range(20)}
    lab = CIHPPersonCrops(root, "train", class_map=small, num_classes=5, flip_pairs=(),
                          **kw)[3][1]
    assert set(lab.unique().tolist()) <= {0, 255}
    for bad, err in (({20: 1}, ValueError), ({10: 20}, ValueError), ({"10": 1}, ValueError),
                     ({10: 1.5}, ValueError), ("atr", ValueError), (3, TypeError)):
        with pytest.raises(err, match="class_map"):
            CIHPPersonCrops(root, "train", class_map=bad, **kw)
    with pytest.raises(ValueError, match="num_classes=19"):
        CIHPPersonCrops(root, "train", class_map=None, num_classes=19, flip_pairs=(), **kw)


def test_augmentation_is_lipdatasets_on_the_crop(hand_root, tmp_path):
    """The CIHP sample equals LIPDataset's sample (same seed, index, epoch) of a
    LIP data set whose images are the crops."""
    root, _ = hand_root
    ds = CIHPPersonCrops(root, "train", crop_size=(23, 19), seed=4)
    lip_root = tmp_path / "lip"
    os.makedirs(lip_root / "train_images")
    os.makedirs(lip_root / "train_segmentations")
    ev = CIHPPersonCrops(root, "train", crop_size=(23, 19), train=False)
    for i in range(len(ev)):
        raw, lab = ev.load(i)
        rgb = raw.flip(0).permute(1, 2, 0).numpy()
        # lossless: PNG data under the .jpg name (PIL reads by content)
        Image.fromarray(rgb, "RGB").save(lip_root / "train_images" / f"c{i}.jpg", format="PNG")
        Image.fromarray(lab.numpy().astype(np.uint8), "L").save(
            lip_root / "train_segmentations" / f"c{i}.png")
    (lip_root / "train_id.txt").write_text("".join(f"c{i}\n" for i in range(len(ev))))
    lip = LIPDataset(lip_root, "train", crop_size=(23, 19), seed=4)
    flips = rots = 0
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        lip.set_epoch(epoch)
        for i in range(len(ds)):
            a, b = ds[i], lip[i]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for k in ("rotation", "flip", "height", "width"):
                assert a[2][k] == b[2][k]
            assert torch.equal(a[2]["affine"], b[2]["affine"])
            flips += a[2]["flip"]
            rots += a[2]["rotation"] != 0
    assert flips and rots


def test_eval_mode_geometry(hand_root):
    root, _ = hand_root
    ds = CIHPPersonCrops(root, "val", crop_size=(25, 31), train=False)
    img, lab, meta = ds[2]  # person 3: 11 x 16 crop
    assert lab.shape == (16, 11) and img.shape == (3, 25, 31)
    c, s = box_to_center_scale(11, 16, 31 / 25)
    assert tuple(meta["center"].tolist()) == c and tuple(meta["scale"].tolist()) == s
    assert meta["rotation"] == 0.0 and meta["flip"] is False
    assert meta["source"] == "cihp" and meta["image_path"].endswith("0000001.jpg")
    torch.testing.assert_close(ds[2][0], img, rtol=0, atol=0)


@pytest.mark.parametrize("size", [473, 512, 576])
def test_crop_sizes(synth_root, size):
    ds = CIHPPersonCrops(synth_root, "train", crop_size=size, seed=1)
    img, lab, _ = ds[1]
    assert img.shape == (3, size, size) and img.dtype == torch.float32
    assert lab.shape == (size, size) and lab.dtype == torch.int64
    assert set(lab.unique().tolist()) <= set(range(20)) - {10} | {255}
    ev = CIHPPersonCrops(synth_root, "val", crop_size=size, train=False)
    img, lab, meta = ev[0]
    assert img.shape == (3, size, size) and lab.shape == (meta["height"], meta["width"])


def test_rgb_is_bgr_flipped(synth_root):
    mean_rgb, std_rgb = LIP_MEAN_BGR[::-1], LIP_STD_BGR[::-1]
    for train in (True, False):
        bgr = CIHPPersonCrops(synth_root, "train", crop_size=29, train=train, seed=3)
        rgb = CIHPPersonCrops(synth_root, "train", crop_size=29, train=train, seed=3,
                              channel_order="RGB", mean=mean_rgb, std=std_rgb)
        for i in (0, 3):
            a, b = bgr[i], rgb[i]
            assert torch.equal(b[0], a[0].flip(0)) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="channel_order"):
        CIHPPersonCrops(synth_root, "train", channel_order="BRG")


def test_works_in_a_dataloader(synth_root):
    from lipfast.data import collate

    ds = CIHPPersonCrops(synth_root, "train", crop_size=21, seed=2)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate)
    images, labels, metas = next(iter(loader))
    assert images.shape == (3, 3, 21, 21) and labels.shape == (3, 21, 21)
    assert torch.equal(images[2], ds[2][0]) and metas[1]["person"] == ds[1][2]["person"]


# ----------------------------------------------------------------- errors and warnings

def test_missing_root_split_and_id_list(tmp_path, hand_root):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CIHPPersonCrops(tmp_path / "nowhere")
    root, samples = hand_root
    other = tmp_path / "only_train"
    write_cihp(other, "train", samples)
    with pytest.raises(FileNotFoundError, match="Validation"):
        CIHPPersonCrops(other, "val")
    os.remove(other / "Training" / "train_id.txt")
    with pytest.raises(FileNotFoundError, match=r"Training.train_id\.txt"):
        CIHPPersonCrops(other, "train")
    with pytest.raises(ValueError, match="Testing.*no labels"):
        CIHPPersonCrops(root, "test")
    with pytest.raises(ValueError, match="split"):
        CIHPPersonCrops(root, "trainval")
    with pytest.raises(TypeError, match="root"):
        CIHPPersonCrops(5)


@pytest.mark.parametrize("folder,ext", [("Images", "jpg"), ("Category_ids", "png"),
                                        ("Human_ids", "png")])
def test_missing_listed_file_names_it(hand_root, folder, ext):
    root, _ = hand_root
    os.remove(root / "Training" / folder / f"0000002.{ext}")
    with pytest.raises(FileNotFoundError, match=rf"{folder}.0000002\.{ext}"):
        CIHPPersonCrops(root, "train")


def test_missing_files_unchecked_fail_when_read(hand_root):
    root, _ = hand_root
    (root / "Training" / "train_id.txt").write_text("0000001\nghost\n")
    with pytest.raises(FileNotFoundError, match="ghost"):
        CIHPPersonCrops(root, "train")
    (root / "Training" / "train_id.txt").write_text("0000001\n")
    os.remove(root / "Training" / "Category_ids" / "0000001.png")
    ds = CIHPPersonCrops(root, "train", check_files=False)
    with pytest.raises(FileNotFoundError, match=r"Category_ids.0000001\.png"):
        ds[0]


def test_size_mismatch_names_the_files(hand_root):
    root, _ = hand_root
    path = root / "Training" / "Category_ids" / "0000002.png"
    Image.fromarray(np.zeros((30, 21), np.uint8), "L").save(path)
    with pytest.raises(ValueError, match=r"0000002\.jpg is 20x30.*0000002\.png is 21x30"):
        CIHPPersonCrops(root, "train")
    ds = CIHPPersonCrops(root, "train", check_files=False)  # found when the item is read
    with pytest.raises(ValueError, match=r"Category_ids.0000002\.png is 21x30"):
        ds[len(ds) - 1]
    Image.fromarray(np.zeros((31, 20), np.uint8), "L").save(
        root / "Training" / "Human_ids" / "0000002.png")
    with pytest.raises(ValueError, match=r"Human_ids.0000002\.png is 20x31"):
        CIHPPersonCrops(root, "train")


def test_person_gap_warns_and_uses_present(hand_root):
    root, samples = hand_root
    _, rgb, cat, hum = samples[0]
    hum = hum.copy()
    hum[hum == 2] = 0  # persons 1, 3, 4
    write_cihp(root, "train", [("0000009", rgb, cat, hum)])
    with pytest.warns(UserWarning, match=r"Human_ids.0000009\.png: person\(s\) 2 missing"):
        ds = CIHPPersonCrops(root, "train", crop_size=9)
    assert [ds[i][2]["person"] for i in range(len(ds))] == [1, 3, 4]


def test_image_without_person_warns(hand_root):
    root, samples = hand_root
    _, rgb, cat, hum = samples[1]
    write_cihp(root, "train", [("0000003", rgb, cat, np.zeros_like(hum))] + samples,
               id_list=["0000003", "0000001", "0000002"])
    with pytest.warns(UserWarning, match=r"Human_ids.0000003\.png.*no person"):
        ds = CIHPPersonCrops(root, "train", crop_size=9)
    assert len(ds) == 5 and "0000003" not in {ds[i][2]["image_id"] for i in range(len(ds))}
    # the clean data set builds without any warning
    write_cihp(root, "train", samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CIHPPersonCrops(root, "train", crop_size=9)


def test_bad_category_values_and_modes(hand_root):
    root, samples = hand_root
    _, _, cat, hum = samples[1]
    bad = cat.copy()
    bad[6, 6] = 25
    Image.fromarray(bad, "L").save(root / "Training" / "Category_ids" / "0000002.png")
    ds = CIHPPersonCrops(root, "train", crop_size=9)
    ds[0]
    with pytest.raises(ValueError, match=r"Category_ids.0000002\.png.*\[25\]"):
        ds[len(ds) - 1]
    Image.fromarray(np.stack([hum] * 3, -1), "RGB").save(
        root / "Training" / "Human_ids" / "0000002.png")
    with pytest.raises(ValueError, match=r"Human_ids.0000002\.png.*one channel"):
        CIHPPersonCrops(root, "train", crop_size=9)


def test_inputs_untouched(hand_root):
    root, _ = hand_root
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    ds = CIHPPersonCrops(root, "train", crop_size=9)
    for i in range(len(ds)):
        ds[i]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
