"""lipfast.models.registry (model names, stored hyper-parameters, input formats)
and the checkpoint readers on HRNetV2 state dicts: the model chosen from the
keys (width, head, context), lipfast.train hyper-parameters, HRNet's FullModel
layout, flags that contradict the checkpoint."""

from __future__ import annotations

import pytest
import torch

from lipfast.models import (CE2P, HRNET_MEAN, HRNET_STD, LIP_MEAN, LIP_STD, MODEL_NAMES,
                            CheckpointMismatchError, HRNetV2, build, build_from_hparams,
                            checkpoint_config, convert_input, infer_config, input_format,
                            model_from_checkpoint, model_hparams, model_name, read_checkpoint)
from lipfast.models.registry import full_size_logits, logits_align_corners, parsing_logits


def _meta(name, **kw):
    with torch.device("meta"):
        return build(name, **kw)


def test_names_build_the_right_models():
    assert MODEL_NAMES == ("ce2p", "hrnetv2_w18", "hrnetv2_w32", "hrnetv2_w48")
    m = _meta("ce2p", num_classes=7, layers=(1, 1, 1, 1), width_mult=0.125)
    assert isinstance(m, CE2P) and m.num_classes == 7 and model_name(m) == "ce2p"
    for w in (18, 32, 48):
        h = _meta(f"hrnetv2_w{w}", num_classes=5, norm="batchnorm")
        assert isinstance(h, HRNetV2) and h.width == w and model_name(h) == f"hrnetv2_w{w}"
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*hrnetv2_w48"):
        build("resnet50")
    with pytest.raises(TypeError, match="hrnetv2_w18.*no argument layers.*head"):
        build("hrnetv2_w18", layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="width=32 contradicts"):
        build("hrnetv2_w18", width=32)
    with pytest.raises(TypeError, match="not a lipfast parsing model"):
        model_name(torch.nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("name,kw", [
    ("ce2p", {"context": "asp_oc", "layers": (1, 2, 1, 1), "width_mult": 0.25,
              "output_stride": 8, "norm": "batchnorm"}),
    ("hrnetv2_w18", {"head": "seg", "norm": "inplace_abn"}),
    ("hrnetv2_w32", {"head": "ce2p", "context": "base_oc", "norm": "batchnorm",
                     "align_corners": True}),
])
def test_hparams_round_trip(name, kw):
    m = _meta(name, num_classes=9, **kw)
    hp = model_hparams(m)
    assert hp["model"] == name and hp["num_classes"] == 9
    again = _meta_from(hp)
    assert type(again) is type(m) and model_hparams(again) == hp
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in m.state_dict().items()}
    other = _meta_from(hp, norm="inplace_abn_sync")
    assert other.norm == "inplace_abn_sync"


def _meta_from(hp, norm=None):
    with torch.device("meta"):
        return build_from_hparams(hp, norm)


def test_hparams_without_model_are_ce2p_and_missing_entries_named():
    hp = {"num_classes": 4, "context": "psp", "output_stride": 16, "layers": [1, 1, 1, 1],
          "width_mult": 0.125, "norm": "batchnorm"}
    assert isinstance(_meta_from(hp), CE2P)        # checkpoints from before HRNetV2
    with pytest.raises(ValueError, match=r"hrnetv2_w18 model lack \['head'"):
        build_from_hparams({"model": "hrnetv2_w18", "num_classes": 3, "context": None,
                            "norm": "batchnorm", "align_corners": False})


def test_input_formats_and_conversion():
    assert input_format("ce2p") == ("BGR", LIP_MEAN, LIP_STD)
    assert input_format({"model": "hrnetv2_w48"}) == ("RGB", HRNET_MEAN, HRNET_STD)
    assert input_format({"num_classes": 3})[0] == "BGR"
    assert input_format(_meta("hrnetv2_w18"))[0] == "RGB"
    torch.manual_seed(0)
    bgr01 = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    mean = torch.tensor(LIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(LIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = (bgr01 - mean) / std
    rgb_mean = torch.tensor(HRNET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    rgb_std = torch.tensor(HRNET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    want = (bgr01.flip(1) - rgb_mean) / rgb_std
    got = convert_input(x, input_format("ce2p"), input_format("hrnetv2_w18"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    back = convert_input(got, input_format("hrnetv2_w18"), input_format("ce2p"))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    assert convert_input(x, input_format("ce2p"), input_format("ce2p")) is x


def test_parsing_logits_and_upsampling_rule():
    t = torch.randn(1, 3, 4, 5)
    assert parsing_logits(t) is t
    assert parsing_logits([[t * 0, t], [t[:, :2]]]) is t
    seg = _meta("hrnetv2_w18", head="seg")
    assert logits_align_corners(seg) is False
    assert logits_align_corners(_meta("hrnetv2_w18", head="seg", align_corners=True)) is True
    assert logits_align_corners(_meta("ce2p")) is True
    up = full_size_logits(seg, t, (8, 10))
    torch.testing.assert_close(up, torch.nn.functional.interpolate(
        t, size=(8, 10), mode="bilinear", align_corners=False))
    assert full_size_logits(_meta("ce2p"), [[t, t], [t]], (8, 10)) is t


def _small_hrnet(head, context=None, classes=6):
    torch.manual_seed(0)
    return HRNetV2(classes, 18, head=head, context=context, norm="batchnorm").eval()


@pytest.mark.parametrize("head,context", [("seg", None), ("ce2p", None), ("ce2p", "asp_oc"),
                                          ("seg", "pyramid_oc"), ("ce2p", "base_oc")])
def test_hrnet_config_inferred_from_keys(head, context):
    with torch.device("meta"):
        m = HRNetV2(6, 32, head=head, context=context, norm="batchnorm")
    sd = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert infer_config(sd) == {"model": "hrnetv2_w32", "num_classes": 6, "head": head,
                                "context": context}


def test_hrnet_fullmodel_checkpoint_builds_and_loads(tmp_path):
    """HRNet-Semantic-Segmentation's released layout: 'model.' prefix inside 'state_dict'."""
    m = _small_hrnet("seg")
    sd = {"model." + k: v for k, v in m.state_dict().items()
          if not k.endswith("num_batches_tracked")}
    path = tmp_path / "hrnet_lip.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    net, cfg = model_from_checkpoint(path)
    assert isinstance(net, HRNetV2) and cfg == {"model": "hrnetv2_w18", "num_classes": 6,
                                                "head": "seg", "context": None,
                                                "align_corners": False, "norm": "inplace_abn"}
    x = torch.randn(1, 3, 37, 29)
    with torch.no_grad():
        ref = m(x)
        got = net(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)   # in-place ABN vs BatchNorm


def test_hrnet_flags_checked_against_checkpoint(tmp_path):
    m = _small_hrnet("ce2p", "base_oc")
    path = tmp_path / "h.pth"
    torch.save(m.state_dict(), path)
    ck = read_checkpoint(path)
    cfg = checkpoint_config(ck, model="hrnetv2_w18", head="ce2p", context="base_oc",
                            num_classes=6)
    assert cfg["model"] == "hrnetv2_w18" and cfg["context"] == "base_oc"
    with pytest.raises(CheckpointMismatchError, match="--model hrnetv2_w48 does not match.*"
                                                      "hrnetv2_w18"):
        checkpoint_config(ck, model="hrnetv2_w48")
    with pytest.raises(CheckpointMismatchError, match="--head seg does not match.*'ce2p' head"):
        checkpoint_config(ck, head="seg")
    with pytest.raises(CheckpointMismatchError, match="--context asp_oc does not match"):
        checkpoint_config(ck, context="asp_oc")
    with pytest.raises(CheckpointMismatchError, match="--num-classes 20 does not match.*"
                                                      "fushion.3.weight has 6 classes"):
        checkpoint_config(ck, num_classes=20)
    with pytest.raises(CheckpointMismatchError, match="--layers does not apply.*CE2P option"):
        checkpoint_config(ck, layers=(3, 4, 23, 3))
    with pytest.raises(CheckpointMismatchError, match="--output-stride does not apply"):
        checkpoint_config(ck, output_stride=8)
    ce = CE2P(4, layers=(1, 1, 1, 1), width_mult=0.125)
    torch.save(ce.state_dict(), tmp_path / "c.pth")
    with pytest.raises(CheckpointMismatchError, match="--head does not apply.*HRNetV2 option"):
        checkpoint_config(read_checkpoint(tmp_path / "c.pth"), head="seg")
    with pytest.raises(CheckpointMismatchError, match="--model hrnetv2_w18 does not match.*"
                                                      "a ce2p model"):
        checkpoint_config(read_checkpoint(tmp_path / "c.pth"), model="hrnetv2_w18")


def test_hrnet_state_dict_errors_name_the_problem(tmp_path):
    sd = {k: v for k, v in _small_hrnet("seg").state_dict().items()}
    bad = dict(sd)
    del bad["last_layer.3.weight"]
    with pytest.raises(ValueError, match="neither head"):
        infer_config(bad, "x.pth")
    odd = dict(sd)
    odd["transition1.0.0.weight"] = torch.zeros(40, 256, 3, 3)
    with pytest.raises(ValueError, match="width 40.*18, 32, 48"):
        infer_config(odd, "x.pth")


def test_imagenet_init_of_hrnet_with_ce2p_head(tmp_path):
    """An ImageNet HRNet file initialises only the backbone of an HRNetV2 with the CE2P
    head and a context: classifier-only keys skipped, the heads left as they were."""
    from lipfast.models import load_imagenet

    src = _small_hrnet("seg")
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("last_layer.")}
    state["classifier.weight"] = torch.zeros(1000, 2048)
    state["incre_modules.0.0.conv1.weight"] = torch.zeros(32, 18, 1, 1)
    torch.save(state, tmp_path / "hrnet_w18_imagenet.pth")
    torch.manual_seed(5)
    dst = HRNetV2(6, 18, head="ce2p", context="asp_oc", norm="batchnorm")
    heads = {k: v.clone() for k, v in dst.state_dict().items()
             if k.split(".", 1)[0] in ("edge", "decoder", "fushion", "context_encoding")}
    report = load_imagenet(dst, tmp_path / "hrnet_w18_imagenet.pth")
    assert report.skipped == ["classifier.weight", "incre_modules.0.0.conv1.weight"]
    after = dst.state_dict()
    assert all(torch.equal(after[k], v) for k, v in heads.items())
    assert torch.equal(after["stage4.0.branches.3.0.conv1.weight"],
                       src.state_dict()["stage4.0.branches.3.0.conv1.weight"])
    with pytest.raises(CheckpointMismatchError, match="missing"):
        del state["conv1.weight"]
        torch.save(state, tmp_path / "bad.pth")
        load_imagenet(dst, tmp_path / "bad.pth")


def test_pose_names_build_pose_models_kept_apart_from_parsing():
    from lipfast.models import POSE_MODEL_NAMES, PoseHRNet, is_pose_model
    from lipfast.models.registry import describe_hparams, required_hparams

    assert POSE_MODEL_NAMES == ("pose_hrnet_w32", "pose_hrnet_w48")
    assert not set(POSE_MODEL_NAMES) & set(MODEL_NAMES)     # not a parsing tool's --model
    m = _meta("pose_hrnet_w48", num_joints=17)
    assert isinstance(m, PoseHRNet) and (m.width, m.num_joints, m.norm) == (48, 17, "batchnorm")
    assert model_name(m) == "pose_hrnet_w48"
    assert is_pose_model(m) and is_pose_model("pose_hrnet_w32")
    assert is_pose_model({"model": "pose_hrnet_w32"})
    assert not is_pose_model(_meta("hrnetv2_w18")) and not is_pose_model("ce2p")
    assert not is_pose_model({"num_classes": 3})
    hp = model_hparams(m)
    assert hp == {"model": "pose_hrnet_w48", "num_joints": 17, "norm": "batchnorm"}
    assert required_hparams("pose_hrnet_w32") == ("num_joints", "norm")
    again = _meta_from(hp, norm="inplace_abn")
    assert isinstance(again, PoseHRNet) and again.norm == "inplace_abn"
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert describe_hparams(hp) == "PoseHRNet-W48, 17 joints, norm batchnorm"
    assert input_format("pose_hrnet_w32") == ("RGB", HRNET_MEAN, HRNET_STD)
    assert input_format(m) == ("RGB", HRNET_MEAN, HRNET_STD)
    with pytest.raises(TypeError, match="pose model.*no argument num_classes.*num_joints"):
        build("pose_hrnet_w32", num_classes=20)
    with pytest.raises(TypeError, match="pose_hrnet_w32.*no argument head.*num_joints"):
        build("pose_hrnet_w32", head="seg")
    with pytest.raises(ValueError, match="width=48 contradicts"):
        build("pose_hrnet_w32", width=48)
    with pytest.raises(ValueError, match="unknown model 'pose_hrnet_w18'.*pose_hrnet_w48"):
        build("pose_hrnet_w18")
    with pytest.raises(ValueError, match=r"pose_hrnet_w32 model lack \['num_joints'"):
        build_from_hparams({"model": "pose_hrnet_w32", "norm": "batchnorm"})
    # the parsing-only helpers refuse a pose model (its output is heatmaps)
    t = torch.randn(1, 17, 4, 4)
    with pytest.raises(TypeError, match="logits_align_corners takes a parsing model.*17 joint"):
        logits_align_corners(m)
    with pytest.raises(TypeError, match="full_size_logits takes a parsing model"):
        full_size_logits(m, t, (8, 8))
    with pytest.raises(TypeError, match="parsing_logits takes a parsing model"):
        parsing_logits(t, model=m)
    assert parsing_logits(t, model=_meta("hrnetv2_w18")) is t
