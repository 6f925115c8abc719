"""The tools with HRNetV2 and several data sources (CPU, tiny synthetic data):
``python -m lipfast.train --model hrnetv2_w18`` with both heads, LIP + CIHP
person crops in one run whose loss goes down, the stored hyper-parameters,
resume checks, the flags refused per model; ``lipfast.evaluate`` and
``lipfast.Parser`` on the checkpoints it writes, the RGB input of HRNetV2 and
the align_corners=False upsampling of its seg head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipfast.data.synthetic import make_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["--workers", "0", "--log-every", "1", "--warmup-epochs", "0", "--device", "cpu"]
TINY_CE2P = ["--layers", "1,1,1,1", "--width-mult", "0.125"]


@pytest.fixture(scope="module")
def lip(tmp_path_factory):
    root = tmp_path_factory.mktemp("lip")
    make_synthetic(root, 4, size=40, seed=3, val=2)
    return root


@pytest.fixture(scope="module")
def cihp(tmp_path_factory):
    root = tmp_path_factory.mktemp("cihp")
    make_synthetic(root, 2, size=48, seed=4, val=1, layout="cihp")
    return root


@pytest.fixture(scope="module")
def hrnet_seg_run(lip, tmp_path_factory):
    from lipfast.train import main

    out = tmp_path_factory.mktemp("hrseg")
    t = main(["--data", str(lip), "--out", str(out), "--model", "hrnetv2_w18", "--head", "seg",
              "--epochs", "1", "--batch-size", "2", "--crop-size", "41", "--lr", "0.01",
              *COMMON])
    return t, out


def test_hrnet_seg_training_and_checkpoint(hrnet_seg_run):
    from lipfast.models import HRNetV2

    t, out = hrnet_seg_run
    assert t.status == 0 and len(t.losses) == 2 and all(np.isfinite(t.losses))
    assert isinstance(t.model, HRNetV2) and t.model.head == "seg" and t.criterion is None
    # the data set follows the model's input: RGB, ImageNet mean / std
    assert t.train_set.channel_order == "RGB"
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["hparams"] == {"model": "hrnetv2_w18", "num_classes": 20, "head": "seg",
                               "context": None, "norm": "inplace_abn", "align_corners": False,
                               "crop_size": 41}


def test_hrnet_seg_step_is_the_upsampled_cross_entropy(hrnet_seg_run):
    """The loss of a seg-head step is CE on logits upsampled with align_corners=False."""
    import torch.nn.functional as F

    t, _ = hrnet_seg_run
    torch.manual_seed(0)
    images = torch.randn(2, 3, 41, 41)
    labels = torch.randint(0, 20, (2, 41, 41))
    labels[0, :5] = 255
    state = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.model.train()
    with torch.no_grad():
        # the same forward as the step takes (train mode: batch statistics)
        want = F.cross_entropy(F.interpolate(t.model(images), size=(41, 41), mode="bilinear",
                                             align_corners=False), labels, ignore_index=255)
    t.model.load_state_dict(state)
    got = t.train_step(images, labels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_evaluate_and_parse_hrnet_checkpoint(hrnet_seg_run, lip, tmp_path):
    from lipfast import Parser
    from lipfast.data import read_image
    from lipfast.evaluate import main as evaluate

    _, out = hrnet_seg_run
    res = evaluate(["--data", str(lip), "--checkpoint", str(out / "checkpoint.pth"),
                    "--workers", "0", "--device", "cpu", "--json", str(tmp_path / "m.json")])
    assert res["images"] == 2 and 0 <= res["miou"] <= 100
    assert res["model"]["model"] == "hrnetv2_w18"
    with pytest.raises(ValueError, match="--model ce2p does not match"):
        evaluate(["--data", str(lip), "--checkpoint", str(out / "checkpoint.pth"),
                  "--model", "ce2p", "--device", "cpu"])
    # the parser takes the checkpoint too (RGB input and upsampling: the test below)
    parser = Parser(str(out / "checkpoint.pth"), device="cpu", input_size=(41, 41))
    sid = (lip / "val_id.txt").read_text().split()[0]
    labels = parser(str(lip / "val_images" / f"{sid}.jpg"))
    img = read_image(str(lip / "val_images" / f"{sid}.jpg"))
    assert labels.shape == img.shape[1:] and labels.dtype == torch.uint8
    assert int(labels.max()) < 20


def test_parser_rgb_input_and_seg_upsampling_on_a_square_image(tmp_path):
    """Parser on an HRNetV2 (seg head) with an image already at the input size:
    the warp is the identity, so the probabilities are softmax(upsample(model(x)))
    with x the RGB image normalised by HRNET_MEAN / HRNET_STD."""
    import torch.nn.functional as F

    from lipfast import Parser
    from lipfast.models import HRNET_MEAN, HRNET_STD, HRNetV2

    torch.manual_seed(0)
    model = HRNetV2(20, 18, head="seg", norm="batchnorm").eval()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 37, 3), dtype=np.uint8)
    parser = Parser(model, device="cpu", input_size=(37, 37), fold=False, channels_last=False,
                    dtype=torch.float64)
    res = parser(rgb, return_probs=True)
    x = torch.from_numpy(rgb).permute(2, 0, 1).double().div(255)
    x = (x - torch.tensor(HRNET_MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        HRNET_STD, dtype=torch.float64).view(3, 1, 1)
    with torch.no_grad():
        ref = F.interpolate(model.double()(x[None]), size=(37, 37), mode="bilinear",
                            align_corners=False).softmax(1)[0]
    torch.testing.assert_close(res.probs.double(), ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(res.labels.long(), ref.argmax(0))


def test_multi_source_run_loss_goes_down(lip, cihp, tmp_path, capsys):
    """LIP train + LIP val + CIHP person crops (weighted) in one run: the epoch has
    all their samples, the per-source counts are printed, and the loss goes down."""
    from lipfast.train import main

    out = tmp_path / "multi"
    t = main(["--data", f"lip:{lip}:train", "--data", f"lip:{lip}:val",
              "--data", f"cihp:{cihp}:train:2", "--out", str(out), "--epochs", "6",
              "--batch-size", "2", "--crop-size", "45", "--lr", "0.02", *TINY_CE2P, *COMMON])
    text = capsys.readouterr()
    logs = text.out + text.err
    assert "data sources" in logs and "cihp" in logs
    n_lip, n_val = 4, 2
    n = len(t.train_set)
    assert n == n_lip + n_val + len(t.train_set.datasets[2])
    counts = t.train_set.counts()
    assert sum(counts.values() if isinstance(counts, dict) else counts) == n
    first, last = np.mean(t.losses[:4]), np.mean(t.losses[-4:])
    assert last < first - 0.05, t.losses


def test_hrnet_ce2p_head_with_cihp_source_and_resume_checks(lip, cihp, tmp_path):
    from lipfast.train import main

    out = tmp_path / "hrce2p"
    args = ["--data", f"cihp:{cihp}:train", "--out", str(out), "--model", "hrnetv2_w18",
            "--context", "base_oc", "--epochs", "1", "--batch-size", "2", "--crop-size", "33",
            "--max-iters", "1", *COMMON]
    t = main(args)
    assert t.model.head == "ce2p" and t.model.context == "base_oc" and len(t.losses) == 1
    assert np.isfinite(t.losses[0])
    # resuming with another model / context is refused, naming the entry
    with pytest.raises(ValueError, match="checkpoint has context='base_oc'"):
        main([*args[:-4], "--context", "asp_oc", "--max-iters", "1", "--resume"])


@pytest.mark.parametrize("flags,match", [
    (["--model", "hrnetv2_w18", "--layers", "1,1,1,1"], "--layers applies to --model ce2p"),
    (["--model", "hrnetv2_w18", "--context", "psp"], "psp is CE2P's"),
    (["--head", "seg"], "--head applies to the HRNetV2 models"),
    (["--context", "none"], "CE2P needs a context"),
    (["--model", "hrnetv2_w18", "--head", "seg", "--cycles", "1", "--epochs", "3"],
     "self-correction needs the CE2P head"),
    (["--data", "cihp:/nonexistent/cihp:train"], "data root not found"),
    (["--data", "foo:x:train"], "unknown kind"),
])
def test_bad_model_and_data_flags(lip, tmp_path, flags, match):
    from lipfast.train import main

    data = [] if "--data" in flags else ["--data", str(lip)]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        main([*data, "--out", str(tmp_path / "x"), *flags, *COMMON])


def test_seed_crop_sizes_train_and_evaluate(lip, tmp_path, monkeypatch):
    """The seed's input sizes: one training step at 576 x 576, evaluation at 512 and 576
    (the crop size is stored in the checkpoint and used by default)."""
    from lipfast.evaluate import main as evaluate
    from lipfast.train import main

    out = tmp_path / "c576"
    t = main(["--data", str(lip), "--out", str(out), "--epochs", "1", "--batch-size", "2",
              "--crop-size", "576", "--max-iters", "1", *TINY_CE2P, *COMMON])
    images, labels, _ = next(iter(t.loader))
    assert images.shape[-2:] == (576, 576) and labels.shape[-2:] == (576, 576)
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["hparams"]["crop_size"] == 576
    seen = {}
    import lipfast.evaluate as ev

    orig = ev.predict_crop

    def spy(models, images, *a, **k):
        seen.setdefault("shape", tuple(images.shape[-2:]))
        return orig(models, images, *a, **k)

    monkeypatch.setattr(ev, "predict_crop", spy)
    res = evaluate(["--data", str(lip), "--checkpoint", str(out / "checkpoint.pth"),
                    "--device", "cpu"])
    assert seen["shape"] == (576, 576) and res["images"] == 2
    seen.clear()
    evaluate(["--data", str(lip), "--checkpoint", str(out / "checkpoint.pth"),
              "--device", "cpu", "--crop-size", "512"])
    assert seen["shape"] == (512, 512)
