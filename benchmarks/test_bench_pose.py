"""pytest-benchmark micro-benchmarks of the pose heatmap loss and of decode + PCKh
on small CPU shapes, and a smoke run of benchmarks/pose.py's decode section.

Run: ``python -m pytest benchmarks/test_bench_pose.py --benchmark-only``
(``python -m pytest tests`` does not collect this folder: testpaths = tests).

Groups (compare within a group), one per shape: forward + backward of the
heatmap loss for the implementations of ``benchmarks/pose.py`` (lipfast's fused
op, torch-generated targets + JointsMSELoss, upstream's numpy targets +
JointsMSELoss, JointsMSELoss alone on targets made beforehand). Each benchmark
first checks its loss and gradient against a float64 evaluation of the
reference rule. Decode + PCKh: one group per shape and flip setting, the
implementations of pose.py's decode section (lipfast.pose.decode with the flip
test fused and PCKh on the device; flip_back + average, then decode; upstream's
numpy path), each checked against the float64 numpy reference of the tests
(tests/pose_decode_reference.py: coordinates within 1e-3 px, the same PCKh
counts and Mean).
"""

from __future__ import annotations

import sys
from pathlib import Path

import json
import math
import subprocess
import types

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))
import _roofline  # noqa: E402
import _timing  # noqa: E402
import pose  # noqa: E402
import pose_decode_reference as ref  # noqa: E402

from lipfast.pose import PCKH_GROUPS  # noqa: E402

# name: (B, J, image_size, heatmap_size, sigma)
SHAPES = {
    "B4-J16-64x64-sigma2": (4, 16, (256, 256), (64, 64), 2.0),
    "B4-J16-96x72-sigma3": (4, 16, (288, 384), (72, 96), 3.0),
}
ROUNDS = 10
WARMUP = 2


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", list(pose.LOSS_IMPLS))
def test_heatmap_loss_fwd_bwd(benchmark, shape_name, impl):
    benchmark.group = f"pose-loss-fwd-bwd-{shape_name}"
    b, j, image_size, heatmap_size, sigma = SHAPES[shape_name]
    x, joints, visible = pose.make_inputs(b, j, image_size, heatmap_size)
    x.requires_grad_()
    fn = pose.loss_impls(x, joints, visible, image_size, heatmap_size, sigma,
                         torch.device("cpu"))[impl]
    benchmark.pedantic(lambda: pose.step(fn, x), rounds=ROUNDS, warmup_rounds=WARMUP,
                       iterations=1)
    out = pose.step(fn, x)
    xr = x.detach().double().requires_grad_()
    t, w = pose.torch_targets(joints, visible, image_size, heatmap_size, sigma)
    ref = pose.joints_mse_loss(xr, t.double(), w.double())
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-9)


# name: (pose.DECODE_CASES key, B)
DECODE_SHAPES = {"B4-J16-64x64": ("256x256 -> 64x64", 4), "B3-J16-96x72": ("384x288 -> 96x72", 3)}
DECODE_PARAMS = [(shape, impl, flip) for shape in DECODE_SHAPES for flip in (False, True)
                 for impl in pose.DECODE_IMPLS if flip or impl != "lipfast-unfused"]


def _float64_reference(inp):
    """tests/pose_decode_reference.py on the inputs: (coords B x J x 2, PCKh table,
    correct counts)."""
    hm = inp["heatmaps"].double().numpy()
    if "flipped" in inp:
        hm = (hm + ref.flip_back(inp["flipped"].double().numpy(), pose.LIP_POSE_FLIP_PAIRS)) * 0.5
    coords, _ = ref.get_final_preds(hm, inp["center"].numpy(), inp["scale"].numpy())
    gt = inp["gt"].numpy()
    hs = 0.5 * np.linalg.norm(gt[:, pose.UPPER_NECK] - gt[:, pose.HEAD_TOP], axis=1)
    _, table, _, correct, _ = ref.pckh(coords, gt, inp["visible"].numpy(), hs, pose.PCKH_THRESHOLD,
                                       PCKH_GROUPS, pose.PCKH_MEAN_EXCLUDES)
    return coords, table, correct.tolist()


@pytest.mark.parametrize("shape_name,impl,flip", DECODE_PARAMS)
def test_decode_pckh(benchmark, shape_name, impl, flip):
    benchmark.group = f"pose-decode-pckh-{shape_name}-{'flip' if flip else 'noflip'}"
    case, b = DECODE_SHAPES[shape_name]
    _, j, image_size, heatmap_size = pose.DECODE_CASES[case]
    inp = pose.make_decode_inputs(b, j, image_size, heatmap_size, flip, seed=1)
    before = {k: v.clone() for k, v in inp.items()}
    fn = pose.decode_impls(inp, torch.device("cpu"))[impl]
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    mean, coords, correct = fn()
    want, table, want_correct = _float64_reference(inp)
    got = torch.as_tensor(np.asarray(coords)).double()
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=1e-3)
    assert correct == want_correct
    assert mean == pytest.approx(table["Mean"], rel=0, abs=1e-9)
    assert 0 < mean < 100  # the inputs put joints on both sides of the threshold
    for k, v in inp.items():  # inputs untouched
        assert torch.equal(v, before[k]), k


def _section_args(**kw):
    return types.SimpleNamespace(quick=True, no_rss=True, **kw)


def test_decode_section_rows():
    """The decode section in-process at the quick shapes: every row correct against
    the numpy path, the rows and the timing summaries complete."""
    roof = _roofline.Roofline(None)
    rows, timing = pose.section_decode(_section_args(), torch.device("cpu"), _timing.QUICK, roof)
    assert len(rows) == 2 * (2 + 3) and len(timing) == 4
    for r in rows:
        assert r["section"] == "decode" and r["ok"] and r["pckh_equal"], r["case"]
        assert r["max_abs_diff_px"] <= pose.COORD_TOL_PX
        assert r["rounds"] == 3 and r["p20_ms"] <= r["ms"] <= r["p80_ms"]
        assert r["pckh_mean"] == r["pckh_mean_numpy"] or math.isclose(
            r["pckh_mean"], r["pckh_mean_numpy"], abs_tol=1e-9)
        w, h = pose.DECODE_CASES[r["case"].split(" B=")[0]][3]
        assert r["floor"]["bytes"] == 4 * pose.QUICK_B * 16 * h * w * (2 if r["flip"] else 1)
    assert {r["impl"] for r in rows if r["flip"]} == set(pose.DECODE_IMPLS)
    assert {r["impl"] for r in rows if not r["flip"]} == {"lipfast", "numpy"}


def test_decode_section_flags_a_mismatch(monkeypatch):
    """Coordinates off by 0.01 px (more than COORD_TOL_PX) and a changed PCKh are
    reported as such (ok False), not passed."""
    real = pose.decode

    def off(*args, **kw):
        coords, maxvals = real(*args, **kw)
        return coords + 0.01, maxvals

    monkeypatch.setattr(pose, "DECODE_CASES", {"256x256 -> 64x64": pose.DECODE_CASES[
        "256x256 -> 64x64"]})
    monkeypatch.setattr(pose, "decode", off)
    rows, _ = pose.section_decode(_section_args(), torch.device("cpu"),
                                  _timing.QUICK.with_(min_rounds=1, max_rounds=1),
                                  _roofline.Roofline(None))
    lip = [r for r in rows if r["impl"] != "numpy"]
    assert lip and all(not r["ok"] and r["max_abs_diff_px"] == pytest.approx(0.01, rel=1e-3)
                       for r in lip)
    assert all(r["ok"] for r in rows if r["impl"] == "numpy")
    # a wrong count shows as a PCKh mismatch
    monkeypatch.setattr(pose, "decode", lambda *a, **k: (real(*a, **k)[0] + 1e3, None))
    rows, _ = pose.section_decode(_section_args(), torch.device("cpu"),
                                  _timing.QUICK.with_(min_rounds=1, max_rounds=1),
                                  _roofline.Roofline(None))
    assert all(not r["pckh_equal"] and not r["ok"] for r in rows if r["impl"] != "numpy")


@pytest.mark.slow
def test_decode_section_smoke(tmp_path):
    """python benchmarks/pose.py --quick --sections decode: the table, --json, exit 0;
    and one peak-RSS child (the numpy flip path copies the maps: > 0.5 MB)."""
    out = tmp_path / "pose.json"
    r = subprocess.run([sys.executable, str(HERE / "pose.py"), "--quick", "--sections", "decode",
                        "--threads", "1", "--no-rss", "--no-floor", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| max abs diff px | PCKh Mean |" in r.stdout and "= numpy" in r.stdout
    assert "MISMATCH" not in r.stdout
    data = json.loads(out.read_text())
    assert data["sections"] == ["decode"] and data["quick"]
    assert len(data["rows"]) == 10 and all(row["ok"] for row in data["rows"])
    assert data["env"]["command"].startswith("python benchmarks/pose.py --quick")
    peak = pose.rss_child_mb("decode", "numpy", "256x256 -> 64x64", 1, 1)
    assert peak > 0.5
