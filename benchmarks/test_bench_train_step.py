"""Smoke runs of benchmarks/train_step.py in --quick mode (reduced CE2P, 65x65, one
config, in process; HRNetV2-W18 at 65x65, memory in fresh processes): the reference
and lipfast stacks run training steps and their step-0 losses agree (the script
exits 1 otherwise); the --model / --datasheet options.

Run: ``python -m pytest benchmarks --benchmark-only`` (or this file alone).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pytest  # noqa: E402
import train_step  # noqa: E402


def test_train_step_quick(benchmark, tmp_path):
    out = tmp_path / "train_step.json"
    argv = ["--quick", "--in-process", "--configs", "psp16", "--reps", "1", "--warmup", "0",
            "--json", str(out)]
    rc = benchmark.pedantic(train_step.main, args=(argv,), rounds=1, iterations=1)
    assert rc == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["config"] == "psp16" and row["loss0_ok"]
    assert row["loss0_rel_diff"] <= data["tolerance"]
    for stack in ("reference", "lipfast"):
        assert row[stack]["ms"] > 0 and row[stack]["loss0"] > 0
    assert data["env"]["torch"]


def test_train_step_hrnet_quick(benchmark, tmp_path, capsys):
    """--model hrnetv2_w18 --quick on CPU: HRNetV2(norm="batchnorm") with interpolate +
    F.cross_entropy against HRNetV2(norm="inplace_abn") with the fused
    upsample_cross_entropy; the step-0 losses agree, memory is measured in a fresh
    process per stack, and the JSON has every field the table shows."""
    out = tmp_path / "train_step_hrnet.json"
    argv = ["--model", "hrnetv2_w18", "--quick", "--device", "cpu", "--threads", "1",
            "--reps", "2", "--warmup", "0", "--json", str(out)]
    assert benchmark.pedantic(train_step.main, args=(argv,), rounds=1, iterations=1) == 0
    text = capsys.readouterr().out
    assert "HRNetV2-W18, seg head" in text and "hrnet_seg" in text
    data = json.loads(out.read_text())
    assert data["model"] == "hrnetv2_w18" and not data["partial"]
    assert (data["batch"], data["size"], data["amp"]) == (2, 65, False)
    (row,) = data["rows"]
    assert row["model"] == "hrnetv2_w18" and row["config"] == "hrnet_seg"
    assert row["loss0_ok"] and row["loss0_rel_diff"] <= data["tolerance"] == 2e-3
    assert row["speedup"] > 0 and row["step_time_ratio"] == pytest.approx(1 / row["speedup"])
    assert row["memory_ratio"] is not None and row["memory_ratio"] > 0
    for stack in ("reference", "lipfast"):
        s = row[stack]
        assert s["loss0"] > 0 and s["rounds"] == 2
        assert s["p20_ms"] <= s["ms"] <= s["p80_ms"] and s["best_ms"] == min(s["times_ms"])
        assert s["peak_MB"] > 0 and s["peak_how"] in ("VmHWM", "sampled")
        assert s["flops_step"] > 0 and s["param_bytes"] > 0
        fl = s["floor"]
        assert fl["floor_ms"] > 0 and fl["fraction"] > 0 and fl["bound"] in ("memory", "compute")
        assert fl["bytes"] == 7 * s["param_bytes"] + 4 * 2 * 3 * 65 ** 2 + 8 * 2 * 65 ** 2
    assert data["roofline"]["measured"]["bandwidth_GBps"] > 0


def test_train_step_model_option():
    """--model picks the network; an old `--model h200` (now --datasheet) is refused
    with a pointer, and a config of another model too."""
    ap = train_step.build_parser()
    args = ap.parse_args(["--model", "hrnetv2_w48", "--datasheet", "h200"])
    assert args.model == "hrnetv2_w48" and args.datasheet == ["h200"]
    assert ap.parse_args([]).model == "ce2p"
    with pytest.raises(SystemExit) as e:
        train_step.main(["--model", "h200", "--parse-only"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train_step.main(["--model", "hrnetv2_w32", "--configs", "psp16", "--parse-only"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train_step.main(["--model", "hrnetv2_w32", "--parse-only"])
    assert e.value.code == 0
