"""lipfast.train / lipfast.evaluate on a tiny synthetic data set (CPU).

Tiny model: CE2P with layers=(1, 1, 1, 1), width_mult=0.125, crops of 33-57
pixels. Covers: the loss goes down; exact resume (mid-epoch, with a
self-correction cycle in between) against an uninterrupted run; atomic
checkpoints under an interrupted write and under SIGINT; 2-rank gloo DDP
(``torch.distributed.run``) keeping the ranks' weights equal; evaluation with
its per-class table, checked against an independent mIoU of the saved
predictions; flip / multi-scale test-time augmentation against hand-made
references; clear errors for a missing data root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import lipfast
from lipfast import _train_utils
from lipfast.data.synthetic import make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lipfast.__file__)))  # for subprocesses
pytestmark = pytest.mark.usefixtures("one_thread")
# CPU even where a GPU is visible (the resume test is bitwise; cuDNN is not); the CUDA
# tests at the end pass --device cuda after these (argparse keeps the last).
TINY = ["--layers", "1,1,1,1", "--width-mult", "0.125", "--workers", "0", "--log-every", "1",
        "--warmup-epochs", "0", "--device", "cpu"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn8")
    make_synthetic(root, 8, size=48, seed=0, val=3)
    return root


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn4")
    make_synthetic(root, 4, size=40, seed=1, val=2)
    return root


@pytest.fixture(scope="module")
def trained(data8, tmp_path_factory):
    """8 iterations (2 epochs of 4) of a tiny model."""
    from lipfast.train import main

    out = tmp_path_factory.mktemp("run")
    t = main(["--data", str(data8), "--out", str(out), "--epochs", "2", "--batch-size", "2",
              "--crop-size", "57", "--lr", "0.02", "--val-every", "2", *TINY])
    return t, out


def test_loss_goes_down_and_outputs(trained):
    t, out = trained
    assert t.status == 0 and len(t.losses) == 8
    first, last = np.mean(t.losses[:3]), np.mean(t.losses[-3:])
    assert last < first - 0.1, t.losses
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,iters,loss,lr,val_miou,seconds" and len(rows) == 3
    assert [r.split(",")[1] for r in rows[1:]] == ["4", "8"]
    assert rows[1].split(",")[4] == "" and 0 <= float(rows[2].split(",")[4]) <= 100  # val mIoU
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 8 and ckpt["iter_in_epoch"] == 0
    assert ckpt["hparams"] == {"model": "ce2p", "num_classes": 20, "context": "psp",
                               "output_stride": 16,
                               "layers": [1, 1, 1, 1], "width_mult": 0.125,
                               "norm": "inplace_abn", "crop_size": 57}
    for key in ("model", "optimizer", "scheduler", "rng"):
        assert ckpt[key]
    _check_curves(out / "curves.png")
    # the checkpoint also loads with the model package's plain loader
    from lipfast.models import load_checkpoint

    load_checkpoint(_train_utils.build_model(ckpt["hparams"], "inplace_abn"),
                    out / "checkpoint.pth")


def _check_curves(path):
    """curves.png: written without matplotlib (drawn with PIL), both panels
    hold their line (loss: blue, val mIoU: orange)."""
    from lipfast.train import CURVES_SIZE

    im = Image.open(path)
    assert im.size == CURVES_SIZE and im.mode == "RGB"
    px = np.asarray(im)
    half = CURVES_SIZE[0] // 2
    blue = (px[..., 0] == 31) & (px[..., 1] == 119) & (px[..., 2] == 180)
    orange = (px[..., 0] == 255) & (px[..., 1] == 127) & (px[..., 2] == 14)
    assert blue[:, :half].sum() > 20 and not blue[:, half:].any()
    assert orange[:, half:].sum() > 20 and not orange[:, :half].any()


def test_curves_drawn_without_matplotlib(tmp_path, monkeypatch):
    """Before: no curves.png at all without matplotlib (no requirements file installs it)."""
    import lipfast.train as train

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,iters,loss,lr,val_miou,seconds\n1,4,3.2,0.01,,1.0\n"
                        "2,8,2.5,0.01,12.5,1.0\n3,12,2.1,0.01,,1.0\n4,16,1.7,0.01,30.25,1.0\n")
    assert train._plot_curves(str(csv_path), str(tmp_path / "curves.png"))
    _check_curves(tmp_path / "curves.png")
    # one epoch, no validation yet: still a picture
    csv_path.write_text("epoch,iters,loss,lr,val_miou,seconds\n1,4,3.2,0.01,,1.0\n")
    assert train._plot_curves(str(csv_path), str(tmp_path / "one.png"))
    assert Image.open(tmp_path / "one.png").size == train.CURVES_SIZE


def test_nice_ticks():
    from lipfast.train import _nice_ticks

    assert _nice_ticks(0.3, 9.7) == [0, 2.5, 5, 7.5, 10]
    assert _nice_ticks(1, 4, 6) == [1, 2, 3, 4]  # step 0.6 rounds up to 1
    assert _nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1]
    t = _nice_ticks(2.0, 2.0)
    assert t[0] < 2.0 < t[-1]


# ----------------------------------------------------------------- progress

def test_progress_lines_mode_is_readable(capsys):
    """Without a terminal: tqdm's status line as a plain line every N steps and
    at the end (no carriage returns in the log); off prints nothing."""
    p = _train_utils.Progress(7, prefix="epoch 1/3", every=3, mode="lines")
    for i in range(1, 8):
        p.update(i, f"loss {1.0 / i:.4f}")
    p.close()
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert "\r" not in out.out and out.err == ""
    assert [ln.split("|")[2].split()[0] for ln in lines] == ["3/7", "6/7", "7/7"]
    assert lines[0].startswith("epoch 1/3:") and "loss 0.3333" in lines[0]
    assert lines[-1].startswith("epoch 1/3: 100%") and "it/s" in lines[-1]
    q = _train_utils.Progress(7, prefix="x", every=1, mode="off")
    q.update(1, "y")
    q.close()
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="progress mode"):
        _train_utils.Progress(3, mode="fancy")


def test_progress_auto_and_bar_mode(capsys):
    # pytest's stderr is no terminal: auto writes lines
    assert _train_utils.Progress(3).mode == "lines"
    assert _train_utils.Progress(3, enabled=False).mode == "off"
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    bar_stream = Tty()
    p = _train_utils.Progress(4, prefix="evaluate", mode="bar", stream=bar_stream)
    from tqdm import tqdm

    for i in range(3, 5):  # a resumed epoch starts at step 3
        p.update(i, "loss 1.5")
        assert isinstance(p.bar, tqdm) and p.bar.n == i and p.bar.initial == 2
        assert 0 <= p.bar.format_dict["elapsed"] < 60  # on tqdm's clock, from the start
    p.close()
    text = bar_stream.getvalue()
    assert "evaluate" in text and "4/4" in text and "loss 1.5" in text and "\r" in text


def _state(path):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck


def _assert_same_state(a, b):
    for part in ("model", "schp_model"):
        if a[part] is None:
            assert b[part] is None
            continue
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])
    for k in ("epoch", "iter_in_epoch", "iteration", "cycle_n", "scheduler"):
        assert a[k] == b[k], k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_resume_is_exact_mid_epoch_with_self_correction(data4, tmp_path):
    """3 epochs of 2 iterations with one self-correction cycle (weights averaged
    and norms re-estimated after epoch 2, soft targets in epoch 3): 6 straight
    iterations vs 5 + resume + 1 (stop inside epoch 3, after the cycle)."""
    from lipfast.train import main

    common = ["--data", str(data4), "--epochs", "3", "--batch-size", "2", "--crop-size", "33",
              "--cycles", "1", "--cycle-epochs", "1", *TINY]
    a = main(common + ["--out", str(tmp_path / "a")])
    assert a.status == 0 and a.cycle_n == 2 and len(a.losses) == 6
    b1 = main(common + ["--out", str(tmp_path / "b"), "--max-iters", "5"])
    mid = _state(tmp_path / "b" / "checkpoint.pth")
    assert (mid["epoch"], mid["iter_in_epoch"], mid["iteration"], mid["cycle_n"]) == (2, 1, 5, 1)
    assert mid["schp_model"] is not None
    b2 = main(common + ["--out", str(tmp_path / "b"), "--resume"])
    assert b2.status == 0 and len(b2.losses) == 1
    assert b1.losses + b2.losses == a.losses  # bitwise-equal losses
    _assert_same_state(_state(tmp_path / "a" / "checkpoint.pth"),
                       _state(tmp_path / "b" / "checkpoint.pth"))
    # the averaged (SCHP) model of the checkpoint evaluates with --schp
    from lipfast.evaluate import main as evaluate

    res = evaluate(["--data", str(data4), "--checkpoint", str(tmp_path / "a" / "checkpoint.pth"),
                    "--schp"])
    assert res["images"] == 2 and 0 <= float(res["miou"]) <= 100


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    _train_utils.atomic_save({"x": torch.arange(5)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def interrupted_save(obj, f, *a, **k):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        _train_utils.atomic_save({"x": torch.arange(7)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temp left


def test_rng_state_round_trip_weights_only(tmp_path):
    import random

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = _train_utils.rng_state()
    _train_utils.atomic_save(state, tmp_path / "rng.pth")
    expect = (torch.rand(3), np.random.rand(3), random.random())
    _train_utils.set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1])
    assert expect[2] == got[2]


def test_schedule_matches_schp():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = _train_utils.SCHPSchedule(opt, 7e-3, iters_per_epoch=10, epochs=150, warmup_epochs=10,
                                  cycle_start=100, cycle_epochs=10)
    lo, base = 7e-5, 7e-3
    assert s.lr_at(0) == pytest.approx(lo)
    assert s.lr_at(50) == pytest.approx(lo + 5 * (base - lo) / 10)  # epoch 5 of warm-up
    assert s.lr_at(100) == pytest.approx(base)  # end of warm-up
    assert s.lr_at(550) == pytest.approx(lo + (base - lo) / 2)  # half-way through the cosine
    assert s.lr_at(1000) == pytest.approx(base / 2)  # cycle restart at lr / 2
    assert s.lr_at(1050) == pytest.approx(lo + (base / 2 - lo) / 2)
    assert s.lr_at(1100) == pytest.approx(base / 2)
    s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(s.lr_at(1))


def test_sampler_shards_and_skips():
    full = [list(_train_utils.ShardSampler(11, 2, r, 2, seed=1)) for r in (0, 1)]
    assert len(full[0]) == len(full[1]) == 4  # 11 // (2 * 2) = 2 batches of 2 per rank
    assert not set(full[0]) & set(full[1])
    s = _train_utils.ShardSampler(11, 2, 0, 2, seed=1)
    s.set_epoch(0, skip_batches=1)
    assert list(s) == full[0][2:] and len(s) == 2
    s.set_epoch(1)
    assert list(s) != full[0]


def test_self_correction_helpers():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    wa = a.weight.detach().clone()
    _train_utils.moving_average(a, b, 0.25)
    torch.testing.assert_close(a.weight, 0.75 * wa + 0.25 * b.weight)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.1))
    xs = [torch.randn(2, 3, 4, 4) + 2, torch.randn(3, 3, 4, 4) - 1]
    n = _train_utils.bn_re_estimate(bn, iter(xs))
    assert n == 5 and bn[0].momentum == 0.1
    allx = torch.cat(xs)
    # size-weighted mean of the batch means (SCHP: momentum b / (n + b))
    torch.testing.assert_close(bn[0].running_mean, allx.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_missing_data_root_is_a_clear_error(tmp_path):
    from lipfast.train import main

    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *TINY])
    from lipfast.evaluate import main as evaluate

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        evaluate(["--data", str(tmp_path), "--checkpoint", str(tmp_path / "nope.pth")])


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lipfast.train", "--data", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and "data root not found" in r.stderr and "Traceback" not in r.stderr


def test_sigint_stops_at_iteration_boundary_and_resumes(data4, tmp_path, monkeypatch, capsys):
    """Ctrl-C (a real SIGINT to this process) during iteration 3: the iteration
    finishes, its state is written atomically, status 130; --resume goes on."""
    from lipfast.train import Trainer, main

    real_step = Trainer.train_step
    calls = []

    def step_with_ctrl_c(self, images, labels):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the step runs
        return real_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", step_with_ctrl_c)
    out = tmp_path / "run"
    args = ["--data", str(data4), "--out", str(out), "--epochs", "100", "--batch-size", "2",
            "--crop-size", "33", *TINY]
    capsys.readouterr()
    t = main(args)
    assert t.status == 130 and len(t.losses) == 3
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert (ck["epoch"], ck["iter_in_epoch"], ck["iteration"]) == (1, 1, 3)
    # epochs counted from 1 in the message, as in the progress lines (epoch index 1 = the 2nd)
    log = capsys.readouterr().out
    assert "interrupted in epoch 2/100 after 1/2 of its iterations (iteration 3 in all)" in log
    assert "epoch 2/100:" in log and "epoch 1/100: 100%" in log
    assert "epoch 1," not in log and "at epoch" not in log
    for k, v in t.model.state_dict().items():
        assert torch.equal(ck["model"][k], v)
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "curves.png", "metrics.csv"] or \
        sorted(os.listdir(out)) == ["checkpoint.pth", "metrics.csv"]
    # the handler is removed afterwards, and the run resumes from iteration 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    t2 = main(args[:5] + ["2"] + args[6:] + ["--resume"])  # --epochs 2
    assert t2.status == 0 and t2.iteration == 4 and len(t2.losses) == 1
    log = capsys.readouterr().out
    assert "in epoch 2/2 after 1/2 of its iterations (iteration 3 in all)" in log, log


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["inplace_abn_sync", "inplace_abn"])
def test_ddp_two_ranks_gloo_stay_in_sync(norm, data8, tmp_path):
    # inplace_abn_sync: the norms keep the statistics equal (no DDP buffer broadcast);
    # inplace_abn: DDP broadcasts rank 0's buffers, so --check-sync must agree too
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lipfast.train", "--data", str(data8), "--out", str(out), "--epochs", "1",
           "--batch-size", "2", "--crop-size", "41", "--check-sync", "--val-every", "1",
           "--norm", norm, *TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    assert "2 process(es)" in r.stdout and f"norm {norm}" in r.stdout, log
    assert "sync check: ranks agree" in r.stdout, log
    assert "val mIoU" in r.stdout, log  # validation sharded over the ranks, all-reduced
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ck["iteration"] == 2 and ck["world_size"] == 2  # 8 images / (2 ranks x 2)


# ----------------------------------------------------------------- evaluation

def _confusion_miou(pred_dir, data, split="val"):
    ids = (data / f"{split}_id.txt").read_text().split()
    cm = np.zeros((20, 20), dtype=np.int64)
    for sid in ids:
        gt = np.array(Image.open(data / f"{split}_segmentations" / f"{sid}.png")).astype(np.int64)
        pr = np.array(Image.open(pred_dir / f"{sid}.png")).astype(np.int64)
        assert pr.shape == gt.shape  # mapped back to the original size
        v = gt != 255
        np.add.at(cm, (gt[v], pr[v]), 1)
    tp = np.diag(cm)
    iou = tp / np.maximum(1, cm.sum(0) + cm.sum(1) - tp)
    return 100 * iou.mean(), 100 * tp.sum() / cm.sum()


def test_evaluate_table_and_saved_predictions(trained, data8, tmp_path, capsys):
    from lipfast.evaluate import main as evaluate

    _, out = trained
    pred = tmp_path / "pred"
    res = evaluate(["--data", str(data8), "--checkpoint", str(out / "checkpoint.pth"),
                    "--save-pred", str(pred), "--vis", "2", "--out", str(tmp_path / "vis"),
                    "--json", str(tmp_path / "m.json")])
    text = capsys.readouterr().out
    assert "Left-arm" in text and "Right-shoe" in text and "mIoU" in text
    miou, acc = _confusion_miou(pred, data8)
    assert float(res["miou"]) == pytest.approx(miou, abs=1e-6)
    assert float(res["pixel_acc"]) == pytest.approx(acc, abs=1e-6)
    im = Image.open(next(pred.iterdir()))
    assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]
    vis = sorted((tmp_path / "vis").iterdir())
    assert len(vis) == 2
    _check_vis(vis[0], data8, pred)
    assert (tmp_path / "m.json").exists()


def _check_vis(path, data, pred_dir):
    """The --vis picture: panels upscaled (nearest for the label maps) to at
    least VIS_MIN_HEIGHT, titled, and a legend whose swatches carry the palette
    colours of the 20 classes."""
    from lipfast.data import lip_palette
    from lipfast.evaluate import VIS_MIN_HEIGHT, vis_layout

    im = np.asarray(Image.open(path).convert("RGB"))
    sid = path.name[:-len("_vis.png")]
    gt = np.array(Image.open(data / "val_segmentations" / f"{sid}.png"))
    pr = np.array(Image.open(pred_dir / f"{sid}.png"))
    gh, gw = gt.shape
    lay = vis_layout(gh, gw, 20)
    k = lay["scale"]
    assert k == -(-VIS_MIN_HEIGHT // gh) and k * gh >= VIS_MIN_HEIGHT  # 48-px images: 8x
    assert im.shape[1::-1] == lay["size"]
    pal = np.array(lip_palette(), dtype=np.uint8).reshape(256, 3)
    for (x0, y0, x1, y1), lab in zip(lay["panels"][1:], (gt, pr)):
        assert (x1 - x0, y1 - y0) == (k * gw, k * gh)
        want = pal[lab.repeat(k, 0).repeat(k, 1)]
        assert np.array_equal(im[y0:y1, x0:x1], want)
    x0, y0, x1, y1 = lay["legend"]
    assert y0 >= lay["panels"][0][3] and y1 <= im.shape[0] and x1 - x0 > 3 * gw
    assert set(lay["swatches"]) == set(range(20)) | {255}
    for c in range(20):
        sx0, sy0, sx1, sy1 = lay["swatches"][c]
        assert tuple(im[(sy0 + sy1) // 2, (sx0 + sx1) // 2]) == tuple(pal[c]), c
        # the class name beside the swatch: dark pixels on white
        text = im[sy0:sy1, sx1 + 4:sx0 + lay["cell"] - 8]
        assert (text.min(-1) < 200).sum() > 10, c
    # titles above the panels
    title = im[:lay["panels"][0][1], lay["panels"][0][0]:lay["panels"][2][2]]
    assert (title.min(-1) < 100).sum() > 30


def test_side_by_side_legend_names_and_large_images():
    from lipfast.evaluate import side_by_side, vis_layout

    big = vis_layout(500, 300, 20)
    assert big["scale"] == 1 and big["size"][0] == 2 * 8 + 3 * 300 + 2 * 8
    small = vis_layout(40, 30, 3, ["bg", "a", "b"])
    assert small["scale"] == 10 and set(small["swatches"]) == {0, 1, 2, 255}
    rgb = torch.zeros(40, 30, 3, dtype=torch.uint8)
    lab = torch.zeros(40, 30, dtype=torch.long)
    lab[10:20, 5:15] = 1
    im = side_by_side(rgb, lab, lab, 3, ["bg", "a", "b"])
    assert im.size == small["size"]


def test_evaluate_flip_scales_ensemble(trained, data8, capsys):
    from lipfast.evaluate import main as evaluate

    _, out = trained
    ck = str(out / "checkpoint.pth")
    base = evaluate(["--data", str(data8), "--checkpoint", ck])
    tta = evaluate(["--data", str(data8), "--checkpoint", ck, "--flip", "--scales", "0.75,1,1.25"])
    assert tta["flip"] and tta["scales"] == [0.75, 1.0, 1.25]
    assert 0 <= float(tta["miou"]) <= 100
    # an ensemble of a model with itself predicts what the model alone predicts
    # (up to float32 rounding of the softmax between nearly tied logits)
    ens = evaluate(["--data", str(data8), "--checkpoint", ck, "--ensemble", ck])
    assert float(ens["miou"]) == pytest.approx(float(base["miou"]), abs=0.05)
    capsys.readouterr()


class _Toy(torch.nn.Module):
    """A deterministic, not mirror-symmetric stand-in returning CE2P's output layout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 20, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)[..., ::2, ::2] + torch.linspace(0, 1, (x.shape[-1] + 1) // 2)
        return [[y * 0.5, y], [y[:, :2]]]


def test_flip_and_multiscale_match_references():
    import torch.nn.functional as F

    from lipfast.evaluate import model_logits, predict_crop

    m = _Toy()
    x = torch.randn(2, 3, 13, 11)
    perm = list(range(20))
    for a, b in ((14, 15), (16, 17), (18, 19)):
        perm[a], perm[b] = b, a

    def up(t):
        return F.interpolate(t, size=(13, 11), mode="bilinear", align_corners=True)

    plain = up(m(x)[0][1])
    torch.testing.assert_close(model_logits(m, x), plain)
    mirrored = up(m(x.flip(-1))[0][1])[:, perm].flip(-1)
    torch.testing.assert_close(model_logits(m, x, flip=True), (plain + mirrored) / 2)
    xs = F.interpolate(x, size=(10, 8), mode="bilinear", align_corners=True)  # 0.75 x
    small = up(m(xs)[0][1])
    torch.testing.assert_close(model_logits(m, x, scales=(0.75, 1.0)), (small + plain) / 2)
    # ensembles average the softmax maps of their members
    m2 = _Toy()
    with torch.no_grad():
        m2.conv.weight.mul_(-2)
    other = up(m2(x)[0][1])
    torch.testing.assert_close(predict_crop([m, m2], x),
                               (plain.softmax(1) + other.softmax(1)) / 2)
    torch.testing.assert_close(predict_crop([m], x), plain)


# ----------------------------------------------------------------- CUDA
# One epoch (2 iterations) of the tiny model on the GPU with AMP (bf16; fp16
# with the gradient scaler) and a validation pass (ParsingMetrics on CUDA),
# then evaluation of the checkpoint on the GPU. Checks: finite losses, the
# checkpoint reads back with weights_only=True and rebuilds, the scaler state
# is saved for fp16 only. (Loss decrease is covered by the CPU test.)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_train_step_and_evaluate(amp, data4, tmp_path):
    from lipfast.evaluate import main as evaluate
    from lipfast.train import main

    out = tmp_path / "run"
    t = main(["--data", str(data4), "--out", str(out), "--epochs", "1", "--batch-size", "2",
              "--crop-size", "33", "--lr", "0.01", "--val-every", "1",
              "--amp", amp, *TINY, "--device", "cuda"])
    assert t.status == 0 and len(t.losses) == 2, t.losses
    assert all(np.isfinite(t.losses)), t.losses
    assert t.device.type == "cuda"
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 2 and ckpt["epoch"] == 1
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    for k, v in ckpt["model"].items():
        assert v.device.type == "cpu", k  # map_location honoured, loadable anywhere
        if v.is_floating_point():
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    from lipfast.models import load_checkpoint

    load_checkpoint(_train_utils.build_model(ckpt["hparams"], "inplace_abn"),
                    out / "checkpoint.pth")
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and 0 <= float(rows[1].split(",")[4]) <= 100  # val mIoU
    res = evaluate(["--data", str(data4), "--checkpoint", str(out / "checkpoint.pth"),
                    "--device", "cuda", "--amp", amp, "--flip"])
    assert res["images"] == 2 and 0 <= float(res["miou"]) <= 100
