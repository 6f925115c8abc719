"""``python -m lipfast.evaluate --task pose`` (CPU, tiny synthetic LIP pose set,
the real PoseHRNet-W32 on 64 x 64 inputs): the PCKh table and JSON against a
direct computation in the test (the model's heatmaps, lipfast.pose.decode, a
numpy PCKh with the 0.5 x |upper_neck - head_top| head size), the flip test and
the heatmap ensemble against the same computation with the flip averaged by hand
(lipfast.pose.flip_back), the skeleton pictures, and the errors for a checkpoint
or flags of the other task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lipfast.data.synthetic import make_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = ["--task", "pose", "--image-size", "64x64", "--batch-size", "2", "--workers", "0",
         "--device", "cpu", "--progress", "off"]
EVAL = ["--task", "pose", "--device", "cpu", "--progress", "off", "--batch-size", "4"]


@pytest.fixture(scope="module")
def pose_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lippose_eval")
    make_synthetic(root, 4, size=64, seed=5, val=3, layout="lip-pose")
    return root


@pytest.fixture(scope="module")
def ckpt(pose_data, tmp_path_factory):
    """A lipfast.train pose checkpoint (2 Adam steps)."""
    from lipfast.train import main

    out = tmp_path_factory.mktemp("pose_eval_run")
    t = main(["--data", f"lip-pose:{pose_data}:train", "--out", str(out), "--epochs", "1",
              "--lr", "3e-4", *TRAIN])
    assert t.status == 0
    return out / "checkpoint.pth"


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A bare PoseHRNet state dict (the released weights' format), other weights."""
    from lipfast.models import build

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("bare") / "pose_hrnet_w32_64x64.pth"
    torch.save(build("pose_hrnet_w32").state_dict(), path)
    return path


def _reference(paths, data, flip: bool, threshold: float, factor: float = 0.5):
    """Per-sample coordinates and per-joint (visible, correct) counts computed
    directly: the models' heatmaps of the val images (one batch), averaged with
    lipfast.pose.ensemble, the flip test averaged here with flip_back, decoded
    with lipfast.pose.decode; PCKh in numpy (a person whose head size is not
    finite and positive is skipped)."""
    from lipfast.data import LIPPoseDataset, pose_collate
    from lipfast.models import model_from_checkpoint
    from lipfast.pose import decode, ensemble, flip_back

    ds = LIPPoseDataset(data, "val", image_size=(64, 64), train=False)
    images, _, _, meta = pose_collate([ds[i] for i in range(len(ds))])
    models = [model_from_checkpoint(str(p), task="pose")[0] for p in paths]
    with torch.no_grad():
        h = ensemble([m(images) for m in models])
        if flip:
            f = ensemble([m(images.flip(3)) for m in models])
            h = (h + flip_back(f)) * 0.5
    coords, _ = decode(h, meta["center"], meta["scale"])
    vis, cor = np.zeros(16, np.int64), np.zeros(16, np.int64)
    for i in range(len(ds)):
        gt = meta["joints"][i].numpy()
        present = ~np.isnan(gt).any(1)
        head = factor * np.linalg.norm(gt[8] - gt[9])
        if not (np.isfinite(head) and head > 0):
            continue
        d = np.linalg.norm(coords[i].numpy().astype(np.float64) - gt, axis=1) / head
        vis += present
        cor += present & (d <= threshold)
    return dict(zip(meta["id"], coords)), vis, cor


def _check_against(res, ref, paths=None):
    preds, vis, cor = ref
    assert sorted(res["predictions"]) == sorted(preds)
    for sid, c in preds.items():
        torch.testing.assert_close(res["predictions"][sid][0], c)
    assert res["visible"] == vis.tolist() and res["correct"] == cor.tolist()
    inc = [j for j in range(16) if j not in (6, 7)]
    mean = 100.0 * cor[inc].sum() / vis[inc].sum()
    assert res["table"]["Mean"] == pytest.approx(mean)
    per = [100.0 * c / v if v else float("nan") for c, v in zip(cor, vis)]
    assert res["table"]["Head"] == pytest.approx(per[9], nan_ok=True)
    assert res["table"]["Wrist"] == pytest.approx((per[10] + per[15]) / 2, nan_ok=True)


def test_evaluate_pose_table_json_and_pictures(ckpt, pose_data, tmp_path, capsys):
    from lipfast._pose_tools import SIDE_COLOURS, skeleton_layout
    from lipfast.evaluate import main as evaluate

    # a generous threshold, so that both right and wrong joints occur
    res = evaluate(["--checkpoint", str(ckpt), "--data", str(pose_data), "--split", "val",
                    "--pckh-threshold", "3", "--json", str(tmp_path / "m.json"),
                    "--vis-dir", str(tmp_path / "vis"), "--vis", "2", *EVAL])
    text = capsys.readouterr().out
    header = text.splitlines()[[i for i, ln in enumerate(text.splitlines())
                                if ln.split()[:1] == ["Head"]][0]]
    assert header.split() == ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle",
                              "Mean"]
    assert "PCKh@3 Mean" in text and "r_ankle" in text and "(PCKh@3)" in text
    ref = _reference([ckpt], pose_data, flip=False, threshold=3.0)
    _check_against(res, ref)
    assert 0 < sum(res["correct"]) < sum(res["visible"])  # the comparison is not trivial
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["task"] == "pose" and saved["image_size"] == [64, 64] and not saved["flip"]
    assert saved["correct"] == res["correct"] and saved["head_size"] == "lip"
    assert saved["model"] == {"model": "pose_hrnet_w32", "num_joints": 16, "norm": "batchnorm"}
    # pictures: ground truth | prediction over the (upscaled) image
    pics = sorted((tmp_path / "vis").iterdir())
    assert [p.name for p in pics] == ["10000_1_pose.png", "10001_2_pose.png"]
    im = np.asarray(Image.open(pics[0]).convert("RGB"))
    src = np.asarray(Image.open(pose_data / "val_images" / "10000_1.jpg"))
    lay = skeleton_layout(src.shape[0], src.shape[1], 2)
    assert im.shape[1::-1] == lay["size"] and lay["scale"] * src.shape[0] >= 384
    for x0, y0, x1, y1 in lay["panels"]:
        panel = im[y0:y1, x0:x1]
        for colour in SIDE_COLOURS.values():
            assert (panel == np.array(colour, np.uint8)).all(-1).sum() > 10, colour


def test_evaluate_pose_flip_and_ensemble_match_direct_computation(ckpt, bare, pose_data,
                                                                  capsys):
    from lipfast.evaluate import main as evaluate

    data = ["--data", f"lip-pose:{pose_data}:val"]
    flip = evaluate(["--checkpoint", str(ckpt), *data, "--flip", *EVAL])
    assert flip["flip"] and flip["checkpoints"] == [str(ckpt)]
    _check_against(flip, _reference([ckpt], pose_data, flip=True, threshold=0.5))
    ens = evaluate(["--checkpoint", str(ckpt), "--ensemble", str(bare), *data, "--flip",
                    *EVAL])
    _check_against(ens, _reference([ckpt, bare], pose_data, flip=True, threshold=0.5))
    # the members differ: the ensemble is not one of them
    assert any(not torch.equal(ens["predictions"][k][0], flip["predictions"][k][0])
               for k in flip["predictions"])
    out = capsys.readouterr().out
    assert "plain state_dict; PoseHRNet-W32, 16 joints, norm batchnorm" in out


def test_skeleton_picture_draws_the_present_limbs():
    from lipfast._pose_tools import LIP_SKELETON, SIDE_COLOURS, panel_point, skeleton_picture

    assert len(LIP_SKELETON) == 15 and {s for _, _, s in LIP_SKELETON} == set(SIDE_COLOURS)
    rgb = torch.full((40, 30, 3), 128, dtype=torch.uint8)
    coords = torch.zeros(16, 2, dtype=torch.float64)
    coords[0], coords[1] = torch.tensor([5.0, 35.0]), torch.tensor([5.0, 25.0])    # right shin
    coords[2] = torch.tensor([5.0, 15.0])                                           # r_hip
    coords[6], coords[7] = torch.tensor([15.0, 30.0]), torch.tensor([15.0, 10.0])  # midline
    coords[13], coords[14] = torch.tensor([25.0, 5.0]), torch.tensor([25.0, 20.0])  # left arm
    coords[15] = torch.tensor([float("nan"), 3.0])
    present = torch.zeros(16, dtype=torch.bool)
    present[[0, 1, 6, 7, 13, 14, 15]] = True   # r_hip not present; l_wrist NaN
    im = np.asarray(skeleton_picture(rgb, [("prediction", coords, present)]))
    from lipfast._pose_tools import skeleton_layout

    lay = skeleton_layout(40, 30, 1)
    box, k = lay["panels"][0], lay["scale"]
    assert im.shape[1::-1] == lay["size"] and k == 10

    def pixel(a, b):
        x, y = panel_point(box, k, *((coords[a] + coords[b]) / 2).tolist())
        return tuple(im[int(round(y)), int(round(x))])

    assert pixel(0, 1) == SIDE_COLOURS["right"]
    assert pixel(6, 7) == SIDE_COLOURS["centre"]
    assert pixel(13, 14) == SIDE_COLOURS["left"]
    assert pixel(13, 7) == SIDE_COLOURS["left"]   # l_shoulder - thorax
    assert pixel(1, 2) == (128, 128, 128)          # r_hip not present: no limb
    assert pixel(0, 6) == (128, 128, 128)          # no such limb
    x, y = panel_point(box, k, *coords[14].tolist())
    assert tuple(im[int(round(y)), int(round(x))]) == SIDE_COLOURS["left"]  # the joint dot
    x, y = panel_point(box, k, *coords[2].tolist())
    assert tuple(im[int(round(y)), int(round(x))]) == (128, 128, 128)      # no dot


def test_pose_and_parsing_checkpoints_and_flags_are_kept_apart(ckpt, pose_data, tmp_path):
    from lipfast.evaluate import main as evaluate
    from lipfast.models import build

    parsing = tmp_path / "ce2p.pth"
    torch.save(build("ce2p", layers=(1, 1, 1, 1), width_mult=0.125).state_dict(), parsing)
    with pytest.raises(ValueError, match="holds a pose model .*evaluate it with --task pose"):
        evaluate(["--checkpoint", str(ckpt), "--data", str(pose_data)])
    with pytest.raises(ValueError, match="holds a parsing model .*with --task parsing"):
        evaluate(["--checkpoint", str(parsing), "--data", f"lip-pose:{pose_data}:val", *EVAL])
    with pytest.raises(ValueError, match="holds a parsing model"):
        evaluate(["--checkpoint", str(ckpt), "--ensemble", str(parsing), "--data",
                  f"lip-pose:{pose_data}:val", *EVAL])
    with pytest.raises(ValueError, match="--scales, --schp do not apply to --task pose"):
        evaluate(["--checkpoint", str(ckpt), "--data", str(pose_data), "--scales", "0.75,1",
                  "--schp", *EVAL])
    with pytest.raises(ValueError, match="--head-size does not apply to --task parsing"):
        evaluate(["--checkpoint", str(parsing), "--data", str(pose_data), "--head-size", "lip"])
    with pytest.raises(ValueError, match="--task pose takes lip-pose:ROOT:SPLIT"):
        evaluate(["--checkpoint", str(ckpt), "--data", f"lip:{pose_data}:val", *EVAL])
    with pytest.raises(ValueError, match="--task parsing takes a LIP root"):
        evaluate(["--checkpoint", str(parsing), "--data", f"lip-pose:{pose_data}:val"])
    with pytest.raises(ValueError, match="--model pose_hrnet_w32 is a pose model"):
        evaluate(["--checkpoint", str(parsing), "--data", str(pose_data), "--model",
                  "pose_hrnet_w32"])


def test_head_size_rules():
    import argparse

    from lipfast._pose_tools import head_size_arg, head_sizes

    assert head_size_arg("lip") == "lip" and head_size_arg("LIP:0.5") == "lip"
    assert head_size_arg("lip:0.6") == "lip:0.6"
    for bad in ("mpii", "lip:0", "lip:-1", "lip:x", "lip:nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            head_size_arg(bad)
    gt = torch.zeros(2, 16, 2, dtype=torch.float64)
    gt[:, 8] = torch.tensor([10.0, 20.0])
    gt[:, 9] = torch.tensor([13.0, 24.0])    # |neck - head| = 5
    gt[1, 9] = float("nan")
    hs = head_sizes("lip", gt)
    assert hs[0].item() == pytest.approx(2.5) and torch.isnan(hs[1])
    assert head_sizes("lip:1", gt)[0].item() == pytest.approx(5.0)


# ----------------------------------------------------------------- CUDA
# One epoch of the pose recipe on the GPU with AMP (bf16; fp16 with the gradient
# scaler) and a validation pass (the Triton heatmap loss and decoding, PCKh on
# CUDA), then the evaluation of the checkpoint on the GPU with the flip test.


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_pose_train_and_evaluate(amp, pose_data, tmp_path):
    from lipfast.evaluate import main as evaluate
    from lipfast.train import main

    out = tmp_path / "run"
    t = main(["--data", f"lip-pose:{pose_data}:train", "--out", str(out), "--epochs", "1",
              "--lr", "3e-4", "--val-every", "1", "--amp", amp, *TRAIN, "--device", "cuda"])
    assert t.status == 0 and len(t.losses) == 2 and all(np.isfinite(t.losses)), t.losses
    assert t.device.type == "cuda"
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ck["task"] == "pose" and ck["iteration"] == 2
    assert (ck["scaler"] is not None) == (amp == "fp16")
    rows = (out / "metrics.csv").read_text().splitlines()
    assert 0 <= float(rows[1].split(",")[4]) <= 100
    res = evaluate(["--task", "pose", "--checkpoint", str(out / "checkpoint.pth"), "--data",
                    f"lip-pose:{pose_data}:val", "--device", "cuda", "--amp", amp, "--flip",
                    "--progress", "off"])
    assert res["images"] == 3 and sum(res["visible"]) > 0
