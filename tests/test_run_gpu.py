"""benchmarks/run_gpu.sh cannot rot between GPU windows: its --dry-run (no GPU) resolves
every stage's commands (scripts, test files, pytest selections, python -c imports) and
parses every benchmark command's flags through the script's own main(); a broken flag
makes it fail. Also: the plan's budget arithmetic, stage names and the results README
generated from a run's files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
STAGES = ("build", "tests_first", "ceilings", "bench_quick", "tests_rest", "bench_full",
          "resources", "memcheck")


def run(*args, env=None, timeout=600):
    e = dict(os.environ, **(env or {}))
    e.pop("LIPFAST_BENCH_PARSE_ONLY", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e)


def plan(*args, env=None) -> list[tuple[str, str, int, str]]:
    r = run(*args, "--plan", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^(\w+)\s+(\w+)\s+cap\s+(\d+)s\s+(.*)$", r.stdout, re.M)
    return [(a, b, int(c), d) for a, b, c, d in rows]


@pytest.mark.slow
def test_dry_run_resolves_every_stage():
    r = run("--dry-run")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "dry run: ok" in out
    assert "DRY-RUN FAIL" not in out
    for stage in STAGES:
        assert re.search(rf"DRY-RUN ok {stage}/", out), (stage, out[-3000:])
    # every benchmark command went through its script's parse-only main()
    for name in ("attn_quick", "abn_quick", "loss_quick", "miou_quick", "train_step_quick",
                 "parse_quick", "pose_quick", "ceilings", "attn_bf16", "attn_fp32", "abn",
                 "abn_bf16", "loss", "miou", "train_step", "train_step_hrnet", "parse",
                 "train_step_max_batch"):
        assert re.search(rf"DRY-RUN ok \w+/{name}: flags parse", out), name
    n_plan = len(plan())
    assert f"{n_plan} steps resolve" in out


@pytest.mark.slow
def test_dry_run_fails_on_a_broken_flag():
    r = run("--dry-run", "bench_quick", env={"RUN_GPU_BENCH_ARGS": "--no-such-flag"})
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "DRY-RUN FAIL" in out and "--no-such-flag" in out
    assert "dry run: FAILED" in out


@pytest.mark.slow
def test_dry_run_fails_on_a_missing_test_file():
    r = run("--dry-run", "tests_first", env={"RUN_GPU_PYTEST_ARGS": "tests/test_no_such_file.py"})
    assert r.returncode == 1
    assert "tests/test_no_such_file.py not found" in r.stdout


def test_plan_order_stages_and_budget():
    rows = plan()
    stages = [s for s, *_ in rows]
    # the plan's order: every stage once, in blocks, most valuable first
    assert list(dict.fromkeys(stages)) == list(STAGES)
    names = [n for _, n, _, _ in rows]
    assert names.index("tests_first") < names.index("attn_quick") < names.index("tests_rest")
    assert names.index("attn_quick") < names.index("attn_bf16")
    first = next(c for s, n, _, c in rows if n == "tests_first")
    assert "tests/test_oc_attention.py" in first and "tests/test_upsample_ce.py" in first
    build = next(c for _, n, _, c in rows if n == "build")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    assert f"MAX_JOBS={nproc}" in build and "pip install" in build
    caps = {n: c for _, n, c, _ in rows}
    half = {n: c for _, n, c, _ in plan(env={"RUN_GPU_BUDGET": "240"})}
    assert all(half[n] == caps[n] * 240 // 480 for n in caps)
    # legacy stage names still select their stages
    assert {s for s, *_ in plan("tests")} == {"tests_first", "tests_rest"}
    assert {s for s, *_ in plan("bench")} == {"ceilings", "bench_quick", "bench_full"}
    assert {s for s, *_ in plan("OUTDIR", "build", "memcheck")} == {"build", "memcheck"}
    assert {s for s, *_ in plan("tests_cpu")} == {"tests_cpu"}


def test_unknown_stage_and_bad_budget():
    r = run("OUT", "nonsense", "--plan", timeout=60)
    assert r.returncode == 2 and "unknown stage 'nonsense'" in r.stderr
    r = run("--plan", env={"RUN_GPU_BUDGET": "ten"}, timeout=60)
    assert r.returncode == 2 and "RUN_GPU_BUDGET" in r.stderr


def test_bench_args_reach_every_benchmark_command():
    rows = plan("bench", env={"RUN_GPU_BENCH_ARGS": "--max-time 5"})
    bench = [c for _, _, _, c in rows if "benchmarks/" in c]
    assert bench and all(c.endswith("--max-time 5") for c in bench)


def test_report_from_a_partial_run(tmp_path):
    """_gpu_report.py builds README.md and summary.json from whatever a run left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "env.json").write_text(json.dumps(dict(
        gpu="NVIDIA H200", driver="580.1", cuda="13.0", torch="2.11.0", triton="3.6.0",
        nvcc="release 13.0", commit="0123456789abcdef", dirty=False, date="2026-12-01",
        nproc=16, max_jobs="16", stages=["build", "tests_first"])))
    (out / "steps.tsv").write_text("build\tbuild\t0\t60\t200\tok\n"
                                   "tests_first\ttests_first\t124\t100\t100\ttimeout\n")
    (out / "ceilings.json").write_text(json.dumps(dict(copy_GBps=4300.0,
                                                       matmul_bf16_TFLOPs=780.0)))
    fl = dict(floor_ms=0.5, bound="compute", fraction=0.25,
              models={"h200": dict(floor_ms=0.4, bound="compute")})
    (out / "attn_bf16.json").write_text(json.dumps(dict(partial=True, results=[dict(
        row="lip-os8", dtype="bf16", method="lipfast", fwdbwd_ms=2.0, floor_fwdbwd=fl)])))
    (out / "abn.json").write_text("{not json")  # being written when the run was cut off
    (out / "pose_quick.json").write_text(json.dumps(dict(rows=[dict(
        section="decode", case="64x64 flip test", impl="lipfast", ms=0.75, floor=fl)])))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_gpu_report.py"),
                        str(out), str(out), "480"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (out / "README.md").read_text()
    for s in ("NVIDIA H200", "580.1", "13.0", "2.11.0", "3.6.0", "0123456789ab",
              "2026-12-01", "timeout", "4.30 TB/s", "lip-os8 bf16 f+b", "0.250",
              "0.4 c", "Partial", "decode 64x64 flip test | lipfast | 0.75"):
        assert s in md, s
    summary = json.loads((out / "summary.json").read_text())
    assert [s["state"] for s in summary["steps"]] == ["ok", "timeout"]
    assert summary["benchmarks"] == {"attn_bf16": "partial", "pose_quick": "complete"}


def test_a_real_run_records_every_step(tmp_path):
    """Run mode on this machine: the ceilings step fails without a GPU, and the run
    still leaves env.json, status.txt, summary.json, README.md and the bundle."""
    import tarfile

    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the step would run for real")
    out, logs = tmp_path / "out", tmp_path / "logs"
    r = run(str(out), "ceilings", env={"RUN_GPU_LOGS": str(logs)}, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "ceilings rc=1" in (out / "status.txt").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["state"]) for s in summary["steps"]] == [("ceilings", "failed")]
    assert summary["env"]["budget_s"] == 480 and summary["env"]["stages"] == ["ceilings"]
    md = (out / "README.md").read_text()
    assert "| ceilings | ceilings | failed | 1 |" in md
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "./ceilings.log" in names and "./steps.tsv" in names
    assert "needs a CUDA GPU" in (logs / "ceilings.log").read_text()
