"""Reading checkpoints (lipfast.models.checkpoint): the formats accepted by
load_checkpoint, lipfast.evaluate and lipfast.train (lipfast.train's own,
SCHP's release layout ``{'state_dict': {'module.' + key: tensor}}`` and a plain
state dict), the model chosen from the keys or from flags (with errors on a
mismatch), a folder given as a checkpoint, and bad norm statistics."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import pytest
import torch

import lipfast
from lipfast.data.synthetic import make_synthetic
from lipfast.models import (CE2P, CheckpointMismatchError, checkpoint_config, infer_config,
                            load_checkpoint, model_from_checkpoint, read_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lipfast.__file__)))
TINY = dict(layers=(1, 1, 1, 1), width_mult=0.125)
TINY_FLAGS = ["--workers", "0", "--device", "cpu", "--crop-size", "41", "--progress", "off"]

pytestmark = pytest.mark.usefixtures("no_process_group_warnings", "one_thread")


def _random_state(model, seed=0):
    """Random weights with valid norm statistics (running_var > 0), no
    num_batches_tracked (as the vendored In-Place ABN of SCHP saves)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        t = torch.randn(v.shape, generator=g)
        out[k] = t.abs() + 0.5 if k.endswith("running_var") else t * 0.5
    return out


def _save(state, path, fmt, hparams=None):
    if fmt == "schp":
        obj = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3,
               "cycle_n": 1}
    elif fmt == "plain":
        obj = state
    else:  # what lipfast.train writes (the parts evaluate reads)
        obj = {"format": "lipfast-train-1", "model": state, "schp_model": None,
               "hparams": dict(hparams, crop_size=41)}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    make_synthetic(root, 2, size=40, seed=2, val=3)
    return root


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """One random-weight tiny CE2P (PSP, 20 classes) saved in the three formats."""
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    model = CE2P(norm="inplace_abn", **TINY)
    state = _random_state(model)
    hp = {"num_classes": 20, "context": "psp", "output_stride": 16, "layers": [1, 1, 1, 1],
          "width_mult": 0.125, "norm": "inplace_abn"}
    return {fmt: _save(state, d / f"{fmt}.pth", fmt, hp) for fmt in ("schp", "plain", "train")}, \
        state


# ----------------------------------------------------------------- formats

def test_read_checkpoint_formats(tiny_files):
    files, state = tiny_files
    kinds = {fmt: read_checkpoint(p) for fmt, p in files.items()}
    assert {f: c.kind for f, c in kinds.items()} == {"schp": "schp", "plain": "state_dict",
                                                     "train": "lipfast.train"}
    for c in kinds.values():
        assert sorted(c.state_dict) == sorted(state)  # module. prefix stripped
        for k, v in state.items():
            assert torch.equal(c.state_dict[k], v)
    assert kinds["train"].hparams["crop_size"] == 41 and kinds["schp"].hparams is None


def test_evaluate_accepts_schp_plain_and_train_checkpoints(tiny_files, data):
    """Before: 'not a lipfast.train checkpoint' for the SCHP and the plain file."""
    from lipfast.evaluate import main as evaluate

    files, _ = tiny_files
    res = {fmt: evaluate(["--data", str(data), "--checkpoint", str(p), *TINY_FLAGS])
           for fmt, p in files.items()}
    for r in res.values():
        assert r["images"] == 3 and 0 <= r["miou"] <= 100
    # the same weights, the same model: identical results whatever the format
    assert res["schp"]["miou"] == res["plain"]["miou"] == res["train"]["miou"]
    assert res["schp"]["iou"] == res["train"]["iou"]
    assert res["schp"]["model"] == {"model": "ce2p", "num_classes": 20, "context": "psp",
                                    "output_stride": 16,
                                    "layers": [1, 1, 1, 1], "width_mult": 0.125,
                                    "norm": "inplace_abn"}


def test_evaluate_cli_on_schp_release_layout(tiny_files, data):
    files, _ = tiny_files
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "lipfast.evaluate", "--data", str(data),
                        "--checkpoint", str(files["schp"]), *TINY_FLAGS], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SCHP release" in r.stdout and "mIoU" in r.stdout


@pytest.mark.parametrize("context", ["psp", "base_oc", "pyramid_oc", "asp_oc"])
def test_config_inferred_from_keys(context):
    with torch.device("meta"):
        m = CE2P(num_classes=7, context=context, layers=(2, 1, 3, 1), width_mult=0.25)
    cfg = infer_config(m.state_dict())
    assert cfg == {"model": "ce2p", "num_classes": 7, "context": context,
                   "layers": [2, 1, 3, 1], "width_mult": 0.25}


def test_full_size_schp_config_inferred():
    with torch.device("meta"):
        m = CE2P()
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert infer_config(sd) == {"model": "ce2p", "num_classes": 20, "context": "psp",
                                "layers": [3, 4, 23, 3], "width_mult": 1.0}


def test_odd_width_mult_inferred():
    with torch.device("meta"):
        m = CE2P(width_mult=0.3, layers=(1, 1, 1, 1))
    cfg = infer_config(m.state_dict())
    with torch.device("meta"):
        m2 = CE2P(width_mult=cfg["width_mult"], layers=(1, 1, 1, 1))
    assert {k: v.shape for k, v in m2.state_dict().items()} == \
        {k: v.shape for k, v in m.state_dict().items()}


def test_model_from_checkpoint_loads_the_weights(tiny_files):
    files, state = tiny_files
    model, cfg = model_from_checkpoint(files["schp"])
    assert isinstance(model, CE2P) and not model.training
    assert cfg["context"] == "psp" and cfg["output_stride"] == 16
    for k, v in model.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k]), k
    bn, _ = model_from_checkpoint(files["plain"], norm="batchnorm")
    assert bn.norm == "batchnorm"


def test_flags_that_contradict_the_keys_are_errors(tiny_files, data):
    from lipfast.evaluate import main as evaluate

    files, _ = tiny_files
    ck = read_checkpoint(files["schp"])
    with pytest.raises(CheckpointMismatchError, match=r"--num-classes.*18.*20"):
        checkpoint_config(ck, num_classes=18)
    with pytest.raises(CheckpointMismatchError, match=r"--context.*asp_oc.*psp"):
        checkpoint_config(ck, context="asp_oc")
    with pytest.raises(CheckpointMismatchError, match=r"--layers.*3, 4, 23, 3.*1, 1, 1, 1"):
        checkpoint_config(ck, layers=(3, 4, 23, 3))
    with pytest.raises(CheckpointMismatchError, match=r"--width-mult.*0.25"):
        checkpoint_config(ck, width_mult=0.25)
    # flags that agree are fine; what the keys cannot tell comes from the flags
    cfg = checkpoint_config(ck, num_classes=20, context="psp", output_stride=8)
    assert cfg["output_stride"] == 8
    # a lipfast.train checkpoint's stored hyper-parameters are checked the same way
    with pytest.raises(CheckpointMismatchError, match=r"--output-stride.*8.*16"):
        checkpoint_config(read_checkpoint(files["train"]), output_stride=8)
    # and through the command line
    with pytest.raises(CheckpointMismatchError, match="--num-classes"):
        evaluate(["--data", str(data), "--checkpoint", str(files["plain"]), "--num-classes",
                  "18", *TINY_FLAGS])


def test_not_a_ce2p_state_dict_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(3, 3)}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=r"x.pth.*fushion.3.weight"):
        checkpoint_config(read_checkpoint(tmp_path / "x.pth"))


def test_unreadable_or_pickled_file_refused_without_unsafe_advice(tmp_path):
    """A file torch.load(weights_only=True) refuses (not a checkpoint, or pickled
    Python objects): a ValueError naming the file, never the advice to load it with
    weights_only=False."""
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")

    obj = tmp_path / "object.pth"  # training scripts often pickle their argparse options
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.01)}, obj)
    for path in (text, obj):
        with pytest.raises(ValueError, match="weights_only=True") as info:
            read_checkpoint(path)
        assert str(path) in str(info.value) and "weights_only=False" not in str(info.value)
        assert "never loads" in str(info.value)


def test_schp_flag_needs_a_lipfast_train_checkpoint(tiny_files, data):
    from lipfast.evaluate import main as evaluate

    files, _ = tiny_files
    with pytest.raises(ValueError, match="self-correction"):
        evaluate(["--data", str(data), "--checkpoint", str(files["schp"]), "--schp",
                  *TINY_FLAGS])


# ----------------------------------------------------------------- bad files

def test_folder_is_a_folder_not_not_found(tmp_path, data):
    """Before: 'checkpoint not found' for an existing folder."""
    from lipfast.evaluate import main as evaluate

    model = CE2P(**TINY)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_checkpoint(model, tmp_path)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        evaluate(["--data", str(data), "--checkpoint", str(tmp_path), *TINY_FLAGS])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(model, tmp_path / "nope.pth")


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
@pytest.mark.parametrize("fmt", ["schp", "plain", "train"])
def test_bad_running_var_refused_naming_the_key(bad, fmt, tiny_files, tmp_path):
    """Before: loaded silently (a negative variance gives NaN outputs)."""
    _, state = tiny_files
    state = dict(state)
    key = "layer2.0.bn2.running_var"
    v = state[key].clone()
    v[1] = bad
    state[key] = v
    hp = {"num_classes": 20, "context": "psp", "output_stride": 16, "layers": [1, 1, 1, 1],
          "width_mult": 0.125, "norm": "inplace_abn"}
    path = _save(state, tmp_path / "bad.pth", fmt, hp)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_checkpoint(CE2P(**TINY), path)
    with pytest.raises(ValueError, match="running_var"):
        model_from_checkpoint(path)


def test_bad_running_var_in_the_schp_model_of_a_train_checkpoint(tiny_files, tmp_path):
    _, state = tiny_files
    teacher = dict(state)
    teacher["bn1.running_var"] = -teacher["bn1.running_var"]
    torch.save({"model": state, "schp_model": teacher, "hparams": {}}, tmp_path / "t.pth")
    with pytest.raises(ValueError, match=r"schp_model.*bn1\.running_var"):
        read_checkpoint(tmp_path / "t.pth")


# ----------------------------------------------------------------- lipfast.train

def test_train_init_from_schp_release_and_resume_needs_train_checkpoint(tiny_files, data,
                                                                        tmp_path):
    from lipfast.train import main

    files, state = tiny_files
    args = ["--data", str(data), "--epochs", "1", "--batch-size", "2", "--crop-size", "33",
            "--layers", "1,1,1,1", "--width-mult", "0.125", "--workers", "0", "--device", "cpu",
            "--warmup-epochs", "0", "--max-iters", "0", "--progress", "off"]
    t = main(args + ["--out", str(tmp_path / "a"), "--init", str(files["schp"])])
    for k, v in state.items():
        assert torch.equal(t.model.state_dict()[k], v), k
    with pytest.raises(CheckpointMismatchError, match="--num-classes"):
        main(args + ["--out", str(tmp_path / "b"), "--init", str(files["schp"]),
                     "--num-classes", "21"])
    with pytest.raises(ValueError, match=r"--resume.*lipfast.train checkpoint.*--init"):
        main(args + ["--out", str(tmp_path / "c"), "--resume", str(files["schp"])])
    with pytest.raises(IsADirectoryError, match="is a folder"):
        main(args + ["--out", str(tmp_path / "d"), "--resume", str(tmp_path)])


# ----------------------------------------------------------- the pose HRNet (issue 15)

def _pose_state(num_joints=16, width=32):
    from lipfast.models import PoseHRNet

    with torch.device("meta"):
        m = PoseHRNet(num_joints, width)
    return {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_pose_hrnet_config_inferred_from_keys():
    """deep-high-resolution-net.pytorch's bare state dicts: final_layer.weight gives J,
    transition1.0.0.weight the width, stage 4's last module fuses into branch 0 only."""
    from lipfast.models import HRNetV2
    from lipfast.models.checkpoint import Checkpoint

    sd = _pose_state()
    assert infer_config(sd) == {"model": "pose_hrnet_w32", "num_joints": 16}
    assert infer_config(_pose_state(17, 48)) == {"model": "pose_hrnet_w48", "num_joints": 17}
    ck = Checkpoint("pose.pth", "state_dict", sd)
    assert checkpoint_config(ck, task="pose") == {"model": "pose_hrnet_w32", "num_joints": 16,
                                                  "norm": "batchnorm"}
    assert checkpoint_config(ck, task="pose", num_joints=16, model="pose_hrnet_w32",
                             norm="inplace_abn")["norm"] == "inplace_abn"
    # the parsing tools (task "parsing", the default) refuse it, saying what it is
    with pytest.raises(CheckpointMismatchError, match="pose.pth.*pose model.*pose_hrnet_w32.*16"):
        checkpoint_config(ck)
    with pytest.raises(CheckpointMismatchError, match="pose model"):
        model_from_checkpoint(ck)
    with pytest.raises(CheckpointMismatchError,
                       match="--num-joints 17 does not match.*final_layer.weight has 16 joints"):
        checkpoint_config(ck, task="pose", num_joints=17)
    with pytest.raises(CheckpointMismatchError, match="--num-classes does not apply.*parsing"):
        checkpoint_config(ck, task="pose", num_classes=16)
    with pytest.raises(CheckpointMismatchError, match="--model pose_hrnet_w48 does not match"):
        checkpoint_config(ck, task="pose", model="pose_hrnet_w48")
    with pytest.raises(ValueError, match="task must be one of"):
        checkpoint_config(ck, task="detection")
    # a parsing checkpoint asked for as a pose model, and a pose flag on it
    with torch.device("meta"):
        seg = HRNetV2(6, 32, norm="batchnorm")
    seg_ck = Checkpoint("seg.pth", "state_dict", dict(seg.state_dict()))
    with pytest.raises(CheckpointMismatchError, match="seg.pth.*parsing model.*hrnetv2_w32"):
        checkpoint_config(seg_ck, task="pose")
    with pytest.raises(CheckpointMismatchError, match="--num-joints does not apply.*pose model"):
        checkpoint_config(seg_ck, num_joints=16)


def test_pose_hrnet_key_errors_name_the_problem():
    sd = _pose_state()
    multi = dict(sd)
    multi["stage4.2.fuse_layers.1.0.0.weight"] = torch.zeros(64, 32, 1, 1)
    with pytest.raises(ValueError, match=r"x.pth.*stage4\.2 fuses into branches \[0, 1\].*"
                                         "branch 0 only"):
        infer_config(multi, "x.pth")
    head = dict(sd)
    head["final_layer.weight"] = torch.zeros(16, 48, 1, 1)
    with pytest.raises(ValueError, match=r"final_layer.weight has shape \(16, 48, 1, 1\).*"
                                         "joints x 32 x 1 x 1"):
        infer_config(head, "x.pth")
    # width 18 exists for HRNetV2, not for the pose configs
    w18 = dict(sd)
    w18["transition1.0.0.weight"] = torch.zeros(18, 256, 3, 3)
    w18["final_layer.weight"] = torch.zeros(16, 18, 1, 1)
    with pytest.raises(ValueError, match="pose HRNet of width 18.*32, 48"):
        infer_config(w18, "x.pth")
    # their ImageNet file is not a model to build
    imagenet = {k: v for k, v in sd.items() if not k.startswith("final_layer")}
    imagenet["final_layer.0.weight"] = torch.zeros(2048, 1024, 1, 1)
    imagenet["classifier.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ValueError, match="ImageNet classification HRNet.*load_imagenet"):
        infer_config(imagenet, "x.pth")
