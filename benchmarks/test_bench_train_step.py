"""Smoke run of benchmarks/train_step.py in --quick mode (reduced CE2P, 65x65, one
config, in process): the reference and lipfast stacks run a training step each and
their step-0 losses agree (the script exits 1 otherwise).

Run: ``python -m pytest benchmarks --benchmark-only`` (or this file alone).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
