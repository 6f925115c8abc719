"""The results README of a benchmarks/run_gpu.sh run, rewritten after every step.

Usage: python benchmarks/_gpu_report.py OUT [LOGS [BUDGET]]. Reads OUT/env.json,
LOGS/steps.tsv (one line per step: name, stage, rc, seconds, timeout, state), the
benchmarks' JSON and the tests' JUnit XML in LOGS, and writes OUT/summary.json and
OUT/README.md: the machine (GPU, driver, CUDA, torch, Triton, nvcc, commit, date),
the steps with their state and time, the measured ceilings against the H200 data
sheet, the tests' counts and, per benchmark row, the median time, the floor and
the fraction achieved. Reads what is there: a run cut off leaves a partial table.
Standard library only (no torch), so it costs nothing between steps.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - missing, partial or being written
        return None


def _f(x, spec=".3g", none="-"):
    return none if x is None else format(x, spec)


def _frac(x):
    return "-" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def _floor(fl: dict | None, key="floor_ms"):
    if not fl or fl.get(key) is None:
        return "-"
    return f"{fl[key]:.3g} {fl.get('bound', '?')[0]}"


def _model(fl: dict | None, model="h200"):
    m = (fl or {}).get("models", {}).get(model)
    return "-" if not m else f"{m['floor_ms']:.3g} {m['bound'][0]}"


def steps(logs: Path) -> list[dict]:
    out = []
    try:
        lines = (logs / "steps.tsv").read_text().splitlines()
    except OSError:
        return out
    for ln in lines:
        p = ln.split("\t")
        if len(p) >= 6:
            out.append(dict(name=p[0], stage=p[1], rc=p[2], seconds=p[3], timeout=p[4],
                            state=p[5]))
    return out


def junit(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except Exception:  # noqa: BLE001
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = dict(tests=0, failures=0, errors=0, skipped=0, time=0.0)
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            tot[k] += int(s.get(k, 0))
        tot["time"] += float(s.get("time", 0))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    tot["failed_tests"] = failed[:50]
    return tot


def bench_rows(name: str, data: dict) -> list[list[str]]:
    """Rows [benchmark, case, impl, median ms, floor ms, of floor, h200 floor]."""
    rows = []
    if name.startswith("attn"):
        for r in data.get("results", []):
            if r.get("fwdbwd_ms") is None:
                continue
            fl = r.get("floor_fwdbwd")
            rows.append([name, f"{r['row']} {r['dtype']} f+b", r["method"],
                         _f(r["fwdbwd_ms"]), _floor(fl), _frac((fl or {}).get("fraction")),
                         _model(fl)])
    elif name.startswith("abn"):
        for r in data.get("rows", []):
            if r.get("time_ms") is None:
                continue
            fl = r.get("floor")
            rows.append([name, "x".join(map(str, r["shape"])) + f" {r['dtype']}", r["variant"],
                         _f(r["time_ms"]), _floor(fl), _frac((fl or {}).get("fraction")),
                         _model(fl)])
    elif name.startswith("loss"):
        for r in data.get("rows", []):
            fl = r.get("floor")
            for impl in ("lipfast", "reference"):
                d = r.get(impl, {})
                rows.append([name, r["row"], impl, _f(d.get("ms")), _floor(fl),
                             _frac(d.get("floor_fraction")), _model(fl)])
    elif name.startswith("miou"):
        for r in data.get("rows", []):
            fl = r.get("floor")
            rows.append([name, r["case"], r["impl"], _f(r.get("ms")), _floor(fl),
                         _frac((fl or {}).get("fraction")), _model(fl)])
    elif name.startswith("train_step"):
        for r in data.get("rows", []):
            for st in ("reference", "lipfast"):
                d = r.get(st, {})
                fl = d.get("floor")
                case = r["config"] + (f" max B {d['max_batch']}" if "max_batch" in d else "")
                rows.append([name, case, st, _f(d.get("ms")), _floor(fl),
                             _frac((fl or {}).get("fraction")), _model(fl)])
    elif name.startswith("pose"):
        for r in data.get("rows", []):
            fl = r.get("floor")
            rows.append([name, f"{r['section']} {r['case']}", r["impl"], _f(r.get("ms")),
                         _floor(fl), _frac((fl or {}).get("fraction")), _model(fl)])
    elif name.startswith("parse"):  # no floor: whole pipelines
        n = len(data.get("images", []))
        for r in data.get("rows", []):
            rows.append([name, f"{n} images, ms / image", r["pipeline"],
                         _f(r.get("ms_per_image")), "-", "-", "-"])
        fw = data.get("forward")
        if fw and fw.get("forward_ms_per_image") is not None:
            rows.append([name, f"model forward alone, ms / image "
                               f"({100 * fw['share_of_lipfast_batch']:.0f}% of the batch row)",
                         "lipfast", _f(fw["forward_ms_per_image"]), "-", "-", "-"])
        pp = data.get("postprocess")
        for r in (pp or {}).get("rows", []):
            rows.append([name, f"post-processing {'x'.join(map(str, pp['logits_shape']))} -> "
                               f"{pp['out_hw'][0]}x{pp['out_hw'][1]}", r["impl"],
                         _f(r.get("ms")), "-", "-", "-"])
    return rows


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0])
    logs = Path(argv[1]) if len(argv) > 1 else out
    budget = argv[2] if len(argv) > 2 else "?"
    env = _json(out / "env.json") or {}
    st = steps(logs)
    ceil = _json(logs / "ceilings.json")
    tests = {p.stem: junit(p) for p in sorted(logs.glob("*.xml"))}
    benches = {}
    for p in sorted(logs.glob("*.json")):
        if p.stem in ("ceilings", "summary", "env"):
            continue
        d = _json(p)
        if isinstance(d, dict):
            benches[p.stem] = d
    rows = [r for name, d in benches.items() for r in bench_rows(name, d)]
    summary = dict(env=env, budget_s=budget, steps=st, ceilings=ceil and {
        k: v for k, v in ceil.items() if not isinstance(v, dict)}, tests=tests,
        benchmarks={k: ("partial" if d.get("partial") else "complete") for k, d in
                    benches.items()}, floor_rows=rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    md = ["# lipfast GPU validation (benchmarks/run_gpu.sh)", "",
          "Generated by benchmarks/_gpu_report.py from what this run measured "
          "(rewritten after every step).", ""]
    md += table(["GPU", "driver", "CUDA", "torch", "Triton", "nvcc", "commit", "date"],
                [[env.get("gpu", "?"), env.get("driver", "?"), env.get("cuda", "?"),
                  env.get("torch", "?"), env.get("triton", "?"), env.get("nvcc", "?"),
                  (env.get("commit") or "?")[:12] + (" (dirty)" if env.get("dirty") else ""),
                  env.get("date", "?")]])
    md += ["", f"Budget {budget} s, MAX_JOBS {env.get('max_jobs', '?')}, "
               f"{env.get('nproc', '?')} CPUs, stages: {' '.join(env.get('stages', []))}.", ""]
    md += ["## Steps", ""]
    md += table(["step", "stage", "state", "rc", "seconds", "timeout s"],
                [[s["name"], s["stage"], s["state"], s["rc"], s["seconds"], s["timeout"]]
                 for s in st])
    if ceil:
        md += ["", "## Ceilings (benchmarks/gpu_ceilings.py) against the H200 data sheet", ""]
        md += table(["quantity", "measured", "data sheet"],
                    [["copy (read + write)", f"{ceil.get('copy_GBps', 0) / 1e3:.2f} TB/s",
                      "4.8 TB/s"]] +
                    [[f"matmul {k}", _f(ceil.get(f"matmul_{k}_TFLOPs"), ".1f") + " TFLOP/s",
                      ref] for k, ref in (("bf16", "989"), ("fp16", "989"), ("tf32", "494"),
                                          ("fp32", "67"))])
    if not ceil:
        measured = next((d["roofline"]["measured"] for d in benches.values()
                         if (d.get("roofline") or {}).get("measured")), None)
        if measured:
            rates = ", ".join(f"{k} {v / 1e3:.3g} TFLOP/s"
                              for k, v in measured["compute_GFLOPs"].items())
            md += ["", "## Ceilings", "",
                   f"No ceilings.json: the benchmarks measured their own: copy "
                   f"{measured['bandwidth_GBps']:.4g} GB/s, {rates} ({measured['source']})."]
    if tests:
        md += ["", "## Tests (JUnit XML)", ""]
        md += table(["step", "passed", "failed", "errors", "skipped", "seconds"],
                    [[k, t["passed"], t["failures"], t["errors"], t["skipped"],
                      f"{t['time']:.0f}"] for k, t in tests.items() if t])
        for k, t in tests.items():
            if t and t["failed_tests"]:
                md += ["", f"{k} failures: " + ", ".join(t["failed_tests"])]
    if rows:
        md += ["", "## Benchmarks: median, floor and fraction achieved", "",
               "floor = max(bytes / bandwidth, FLOPs / rate) with the ceilings above (m: "
               "memory-, c: compute-bound); of floor = floor / median; h200 floor: by the "
               "data sheet (benchmarks/_roofline.py).", ""]
        md += table(["benchmark", "case", "impl", "ms", "floor ms", "of floor", "h200 floor"],
                    rows)
    partial = [k for k, d in benches.items() if d.get("partial")]
    if partial:
        md += ["", f"Partial (cut off while running): {', '.join(partial)}."]
    (out / "README.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
