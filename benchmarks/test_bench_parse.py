"""Smoke run of benchmarks/parse.py in --quick mode (reduced CE2P, 4 small JPEGs, in
process): SCHP's extractor pipeline (tests/schp_reference.py) and lipfast.Parser at
batch 1 and 8 parse the same files with the same weights; their label maps agree,
and the post-processing row compares SCHP's and lipfast's on the same logits.

Run: ``python -m pytest benchmarks/test_bench_parse.py`` (``python -m pytest tests``
does not collect this folder: testpaths = tests).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parse  # noqa: E402


# --quick with 2 images, no warm-up, 1 round: about ten 473x473 forwards of the
# reduced model in all (seconds on 2 cores).
FAST = ["--quick", "--images", "2", "--warmup", "0", "--reps", "1"]


def _check(data, n_images=2, memory_how=None, check_exact=False):
    rows = {r["pipeline"]: r for r in data["rows"]}
    assert list(rows) == ["schp", "lipfast-b1", "lipfast-b8"]
    assert len(data["images"]) == n_images
    for r in rows.values():
        assert r["ms_per_image"] > 0 and r["images_per_s"] > 0 and r["rounds"] == 1
        # same weights, same images: lipfast's exact warps and PIL decoding move near-ties only
        assert r["label_agreement_vs_schp"] >= 0.95, r
        if check_exact and r["pipeline"].startswith("lipfast"):
            # lipfast's warps are exact: against SCHP's pipeline with exact warps only
            # float rounding is left
            assert r["label_agreement_vs_schp_exact"] >= 0.999, r
        if memory_how:
            assert r["peak_MiB"] is not None and r["peak_MiB"] >= 0
            assert memory_how in r["memory_how"]
    assert rows["schp"]["label_agreement_vs_schp"] == 1.0
    fwd = data["forward"]
    assert fwd["batch_images"] == n_images and 0 < fwd["share_of_lipfast_batch"]
    pp = data["postprocess"]
    assert pp["out_hw"] == [90, 120] and pp["logits_shape"] == [20, 119, 119]
    assert pp["label_agreement"] >= 0.99
    assert {r["impl"] for r in pp["rows"]} == {"schp", "lipfast"}
    assert data["model"]["layers"] == [1, 1, 1, 1] and data["env"]["opencv"]


def test_parse_quick(benchmark, tmp_path):
    out = tmp_path / "parse.json"
    argv = FAST + ["--memory", "inprocess", "--check-exact", "--json", str(out)]
    rc = benchmark.pedantic(parse.main, args=(argv,), rounds=1, iterations=1)
    assert rc == 0
    _check(json.loads(out.read_text()), memory_how="RSS peak", check_exact=True)


@pytest.mark.slow
def test_parse_quick_memory_subprocess(tmp_path):
    """The default CPU memory method: one fresh process per pipeline."""
    out = tmp_path / "parse.json"
    assert parse.main(FAST + ["--no-postprocess", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for r in data["rows"]:
        assert "fresh process" in r["memory_how"] and r["peak_MiB"] > 0


def test_parse_only_exits_before_measuring(monkeypatch, capsys):
    monkeypatch.setattr(parse._timing, "measure", None)
    with pytest.raises(SystemExit) as e:
        parse.main(["--quick", "--parse-only", "--dtype", "bf16", "--batch", "4"])
    assert e.value.code == 0
    assert "parse-only: parse.py arguments ok" in capsys.readouterr().out
