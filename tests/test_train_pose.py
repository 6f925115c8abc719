"""``python -m lipfast.train --task pose`` on a tiny synthetic LIP pose set (CPU).

PoseHRNet exists only at widths 32 and 48, so the model is the real W32
(28.5 M parameters) on 64 x 64 inputs (16 x 16 heatmaps), batches of 2 and a
handful of iterations. Covers: the loss goes down (below the loss of all-zero
heatmaps, which is where it starts); metrics.csv / curves.png with the val PCKh
column; the checkpoint read back with weights_only=True (task, hparams, Adam's
moments, the step schedule); exact resume mid-epoch across a learning-rate step
against the uninterrupted run; one training step is the fused heatmap loss of the
model's heatmaps; the step schedule; the flags and sources refused per task.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lipfast.data.synthetic import make_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["--task", "pose", "--image-size", "64x64", "--batch-size", "2", "--workers", "0",
          "--log-every", "1", "--device", "cpu", "--progress", "lines"]


@pytest.fixture(scope="module")
def pose_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lippose")
    make_synthetic(root, 4, size=64, seed=2, val=3, layout="lip-pose")
    return root


def _run_args(data, out):
    # 3 epochs of 2 iterations; the rate drops x0.1 at the third epoch (--lr-steps 2)
    return ["--data", f"lip-pose:{data}:train", "--out", str(out), "--epochs", "3",
            "--lr", "3e-4", "--lr-steps", "2", "--val-every", "3", *COMMON]


@pytest.fixture(scope="module")
def trained(pose_data, tmp_path_factory):
    from lipfast.train import main

    out = tmp_path_factory.mktemp("poserun")
    t = main(_run_args(pose_data, out))
    return t, out


def _zero_heatmap_losses(t):
    """The loss of all-zero heatmaps on each batch of the first epoch (where an
    untrained PoseHRNet, whose outputs are ~1e-3, starts)."""
    from lipfast.pose import heatmap_loss

    t.train_set.set_epoch(0)
    t.sampler.set_epoch(0)
    out = []
    for images, joints, visible, _ in t.loader:
        zeros = torch.zeros(images.shape[0], 16, 16, 16)
        out.append(float(heatmap_loss(zeros, joints, visible, (64, 64), 2.0)))
    return out


def test_pose_loss_goes_down_and_outputs(trained):
    from lipfast.models import PoseHRNet, model_from_checkpoint

    t, out = trained
    assert t.status == 0 and len(t.losses) == 6 and all(np.isfinite(t.losses))
    assert isinstance(t.model, PoseHRNet) and t.model.norm == "batchnorm"
    zero = _zero_heatmap_losses(t)
    assert t.losses[0] == pytest.approx(zero[0], rel=0.05)  # starts at the zero-map loss
    assert np.mean(t.losses[-2:]) < 0.7 * np.mean(zero), (t.losses, zero)
    assert np.mean(t.losses[-2:]) < 0.7 * np.mean(t.losses[:2]), t.losses
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,iters,loss,lr,val_pckh,seconds" and len(rows) == 4
    cols = [r.split(",") for r in rows[1:]]
    assert [c[1] for c in cols] == ["2", "4", "6"]
    assert [float(c[3]) for c in cols] == pytest.approx([3e-4, 3e-4, 3e-5])  # the step
    assert cols[0][4] == cols[1][4] == "" and 0 <= float(cols[2][4]) <= 100  # val PCKh Mean
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "curves.png", "metrics.csv"]  # no temp
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ck["task"] == "pose" and ck["format"] == "lipfast-train-1"
    assert ck["hparams"] == {"model": "pose_hrnet_w32", "num_joints": 16, "norm": "batchnorm",
                             "image_size": [64, 64], "sigma": 2.0}
    assert (ck["epoch"], ck["iter_in_epoch"], ck["iteration"]) == (3, 0, 6)
    assert ck["scheduler"] == {"last_iter": 6} and ck["schp_model"] is None
    adam = ck["optimizer"]["state"][0]
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(adam)
    assert ck["args"]["task"] == "pose" and ck["args"]["lr_steps"] == [2]
    # curves.png: loss (blue, left), val PCKh (orange, right)
    px = np.asarray(Image.open(out / "curves.png"))
    half = px.shape[1] // 2
    blue = (px[..., 0] == 31) & (px[..., 1] == 119) & (px[..., 2] == 180)
    orange = (px[..., 0] == 255) & (px[..., 1] == 127) & (px[..., 2] == 14)
    assert blue[:, :half].sum() > 20 and orange[:, half:].sum() > 10
    # the evaluation tools rebuild the model from it
    model, cfg = model_from_checkpoint(str(out / "checkpoint.pth"), task="pose")
    loaded = model.state_dict()
    for k, v in t.model.state_dict().items():
        assert torch.equal(loaded[k], v), k


def _assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for m in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[k][m]), torch.as_tensor(sb[k][m])), (k, m)
    for k in ("epoch", "iter_in_epoch", "iteration", "scheduler", "hparams", "task"):
        assert a[k] == b[k], k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_pose_resume_is_exact_mid_epoch(trained, pose_data, tmp_path):
    """3 iterations, stop (inside epoch 2), resume for the other 3 (the third
    epoch at the stepped rate, validation at the end): the same losses and the
    same final state as the uninterrupted run, bitwise."""
    from lipfast.train import main

    a, a_out = trained
    args = _run_args(pose_data, tmp_path / "b")
    b1 = main(args + ["--max-iters", "3"])
    mid = torch.load(tmp_path / "b" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert (mid["epoch"], mid["iter_in_epoch"], mid["iteration"]) == (1, 1, 3)
    assert mid["scheduler"] == {"last_iter": 3}
    b2 = main(args + ["--resume"])
    assert b2.status == 0 and len(b2.losses) == 3
    assert b1.losses + b2.losses == a.losses  # bitwise-equal losses
    _assert_same_state(torch.load(a_out / "checkpoint.pth", map_location="cpu",
                                  weights_only=True),
                       torch.load(tmp_path / "b" / "checkpoint.pth", map_location="cpu",
                                  weights_only=True))
    assert (tmp_path / "b" / "metrics.csv").read_text().splitlines()[1:] != []


def test_pose_step_is_the_fused_heatmap_loss(trained):
    """A training step's loss is JointsMSELoss (target weights) of the model's
    train-mode heatmaps against the Gaussian targets of the joints (SPEC 10)."""
    from lipfast.pose import generate_heatmaps

    t, _ = trained
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    joints = torch.rand(2, 16, 2) * 63
    visible = (torch.rand(2, 16) > 0.3).float()
    state = {k: v.clone() for k, v in t.model.state_dict().items()}
    opt_state = t.optimizer.state_dict()
    sched = t.scheduler.state_dict()
    t.model.train()
    with torch.no_grad():
        pred = t.model(images).double()
    target, weight = generate_heatmaps(joints, visible, (64, 64), (16, 16), 2.0)
    w = weight.double()[..., None, None]
    want = (0.5 * ((pred - target.double()) * w).pow(2).mean((0, 2, 3))).mean()
    t.model.load_state_dict(state)  # the forward above moved the BN statistics
    got = t.train_step(images, joints, visible)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    t.model.load_state_dict(state)
    t.optimizer.load_state_dict(opt_state)
    t.scheduler.load_state_dict(sched)


def test_step_schedule_and_default_sigma():
    from lipfast._pose_train import default_sigma
    from lipfast._train_utils import StepSchedule

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = StepSchedule(opt, 1e-3, iters_per_epoch=10, milestones=(170, 200), factor=0.1)
    assert s.lr_at(0) == 1e-3 and s.lr_at(1699) == 1e-3
    assert s.lr_at(1700) == pytest.approx(1e-4) and s.lr_at(1999) == pytest.approx(1e-4)
    assert s.lr_at(2000) == pytest.approx(1e-5) and s.lr_at(2099) == pytest.approx(1e-5)
    s.load_state_dict({"last_iter": 1700})
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4) and s.get_last_lr() == s.lr_at(1700)
    s.step()
    assert s.state_dict() == {"last_iter": 1701}
    assert default_sigma((288, 384)) == 3.0 and default_sigma((256, 256)) == 2.0
    assert default_sigma((384, 288)) == 2.0  # (W, H): only 288 wide x 384 high is COCO's sigma 3


def test_pose_defaults_and_refused_flags(pose_data, tmp_path):
    from lipfast.train import build_parser, main, resolve_task_args

    a = resolve_task_args(build_parser().parse_args(["--task", "pose", "--data", "x"]))
    assert (a.model, a.epochs, a.batch_size, a.lr, a.weight_decay, a.lr_steps, a.lr_factor,
            tuple(a.image_size)) == ("pose_hrnet_w32", 210, 32, 1e-3, 0.0, (170, 200), 0.1,
                                     (256, 256))
    assert a.crop_size is None and a.momentum is None and a.cycles is None
    p = resolve_task_args(build_parser().parse_args(["--data", "x"]))  # parsing: unchanged
    assert (p.model, p.epochs, p.batch_size, p.lr, p.momentum, p.weight_decay, p.crop_size,
            p.num_classes, p.cycles, p.cycle_epochs, p.warmup_epochs) == (
        "ce2p", 150, 16, 7e-3, 0.9, 5e-4, 473, 20, 0, 10, 10)
    assert p.image_size is None and p.lr_steps is None
    src = f"lip-pose:{pose_data}:train"
    out = ["--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="--crop-size does not apply to --task pose"):
        main(["--data", src, *out, *COMMON, "--crop-size", "64"])
    with pytest.raises(ValueError, match="--cycles, --layers do not apply to --task pose"):
        main(["--data", src, *out, *COMMON, "--cycles", "1", "--layers", "1,1,1,1"])
    with pytest.raises(ValueError, match="--image-size does not apply to --task parsing"):
        main(["--data", str(pose_data), *out, "--image-size", "64x64"])
    with pytest.raises(ValueError, match="is a pose model: train it with --task pose"):
        main(["--data", str(pose_data), *out, "--model", "pose_hrnet_w32"])
    with pytest.raises(ValueError, match="is a parsing model; --task pose trains"):
        main(["--data", src, *out, *COMMON, "--model", "hrnetv2_w18"])
    with pytest.raises(ValueError, match="takes lip-pose:ROOT:SPLIT"):
        main(["--data", f"lip:{pose_data}:train", *out, *COMMON])
    with pytest.raises(ValueError, match="train on it with --task pose"):
        main(["--data", src, *out, "--device", "cpu"])
    with pytest.raises(ValueError, match="ceil"):
        main(["--data", src, *out, *COMMON, "--image-size", "40x40"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data", "x", "--image-size", "64xq"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--data", "x", "--head-size", "mpii"])


def test_pose_resume_and_init_refuse_parsing_checkpoints(trained, pose_data, tmp_path):
    """--resume of a pose checkpoint by a parsing run (and the reverse) and
    --init of a pose model from a parsing state dict fail with clear messages."""
    from lipfast.models import build
    from lipfast.models.checkpoint import CheckpointMismatchError
    from lipfast.train import main

    _, out = trained
    lip = tmp_path / "lip"
    make_synthetic(lip, 2, size=40, seed=0, val=1)
    with pytest.raises(ValueError, match="a --task pose checkpoint .*this run is --task parsing"):
        main(["--data", str(lip), "--out", str(tmp_path / "p"), "--layers", "1,1,1,1",
              "--width-mult", "0.125", "--batch-size", "2", "--crop-size", "33", "--workers",
              "0", "--device", "cpu", "--resume", str(out / "checkpoint.pth")])
    parsing = tmp_path / "ce2p.pth"
    torch.save(build("ce2p", layers=(1, 1, 1, 1), width_mult=0.125).state_dict(), parsing)
    with pytest.raises(CheckpointMismatchError, match="not a pose model"):
        main(["--data", f"lip-pose:{pose_data}:train", "--out", str(tmp_path / "q"), *COMMON,
              "--init", str(parsing), "--epochs", "1"])


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__import__("lipfast").__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_pose_ddp_two_ranks_gloo(pose_data, tmp_path):
    """2 ranks (gloo): one iteration each (4 images / (2 x 2)), DDP broadcasting
    rank 0's BatchNorm buffers, --check-sync; the validation PCKh is all-reduced
    over the ranks' shards (3 val images split 2 + 1: the printed visible counts
    are those of all 3) and equals a one-process evaluation of the checkpoint."""
    import re
    import subprocess
    import sys

    from lipfast.data import LIPPoseDataset
    from lipfast.evaluate import main as evaluate

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lipfast.train", "--data", f"lip-pose:{pose_data}:train", "--out", str(out),
           "--epochs", "1", "--lr", "3e-4", "--check-sync", "--val-every", "1",
           "--pckh-threshold", "3", *COMMON]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    assert "2 process(es)" in r.stdout and "task pose" in r.stdout, log
    assert "sync check: ranks agree" in r.stdout, log
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ck["iteration"] == 1 and ck["world_size"] == 2 and ck["task"] == "pose"
    visible = {m.group(1): int(m.group(2)) for m in
               re.finditer(r"^(\w+)\s+[\d.na]+\s+(\d+)\s+\d+$", r.stdout, re.M)}
    val = LIPPoseDataset(pose_data, "val", image_size=(64, 64), train=False)
    assert len(val) == 3
    res = evaluate(["--task", "pose", "--checkpoint", str(out / "checkpoint.pth"), "--data",
                    f"lip-pose:{pose_data}:val", "--pckh-threshold", "3", "--device", "cpu",
                    "--progress", "off"])
    from lipfast.pose import LIP_JOINTS

    assert [visible[n] for n in LIP_JOINTS] == res["visible"], r.stdout
    row = (out / "metrics.csv").read_text().splitlines()[1].split(",")
    assert float(row[4]) == pytest.approx(res["table"]["Mean"], abs=1e-3)  # 4 decimals


def test_lip_pose_sources(pose_data):
    """``lip-pose:ROOT:SPLIT[:WEIGHT]`` sources (lipfast.data.multi): the other kinds
    read as before; pose sources mix in a MultiSourceDataset (4-field items)."""
    from lipfast.data import LIPPoseDataset, MultiSourceDataset, build_source, parse_source
    from lipfast.data.multi import POSE_KINDS, SourceSpec

    assert parse_source(f"lip-pose:{pose_data}:val") == SourceSpec("lip-pose", str(pose_data),
                                                                   "val")
    assert parse_source("LIP-POSE:/a:b:train:2") == SourceSpec("lip-pose", "/a:b", "train", 2.0)
    assert parse_source("lip-posex:/a:train").kind == "lip"   # a bare root, as before
    assert parse_source("my-data:2") == SourceSpec("lip", "my-data", "train", 2.0)
    assert POSE_KINDS == ("lip-pose",)
    ds = build_source(f"lip-pose:{pose_data}:train", image_size=(64, 64), train=False)
    assert isinstance(ds, LIPPoseDataset) and ds.image_size == (64, 64) and not ds.train
    ds2 = build_source(f"lip-pose:{pose_data}:val", image_size=(64, 64), train=True, seed=3)
    multi = MultiSourceDataset([ds, ds2], weights=[1.0, 2.0], names=["a", "b"])
    assert len(multi) == 7 and multi.counts() == {"a": 3, "b": 4}
    image, joints, visible, meta = multi[0]
    want = ds[multi.locate(0)[1]]
    assert torch.equal(image, want[0]) and torch.equal(joints, want[1])
    assert torch.equal(visible, want[2]) and meta["source"] == "a"
