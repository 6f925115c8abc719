#!/usr/bin/env python
"""Measures the GPU's own ceilings once, so every benchmark can be reported as a
fraction of them: device-to-device copy bandwidth (1 GiB tensor, GB/s counting
read + write) and dense bf16 / fp16 / tf32 matmul throughput, and float32 with
TF32 off (the CUDA cores' rate), 8192^3, TFLOP/s. benchmarks/_roofline.py reads
these (or measures them through measure()) for every benchmark's floor column.

Timing: benchmarks/_timing.py (shared by every benchmark) with CUDA events around
each call: warm-up calls until two agree within 10%, then at least --min-rounds
calls and --min-time seconds; the rate is computed from the median time and
reported with the rates at the 20th and 80th percentiles of the times, and the
number of calls. Usage: python benchmarks/gpu_ceilings.py [--quick] [--json PATH]
(needs a CUDA GPU; about 10 s, --quick about 3 s: at least 5 calls and 0.1 s each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _timing  # noqa: E402

TIMING = _timing.Settings(warmup=3, max_warmup=20, min_rounds=20, min_seconds=0.5,
                          max_rounds=1000, max_seconds=20.0)


def _rate(fn, work: float, settings: _timing.Settings, scale: float) -> dict:
    """Times fn; the rate (work / time / scale) at the median, p20 and p80 times."""
    m = _timing.measure({"op": fn}, torch.device("cuda"), settings, timer="events")
    t = m["op"]

    def rate(ms):
        return work / (ms * 1e-3) / scale

    for w in m.warnings:
        print(f"WARNING: {w}")
    # A longer time is a lower rate: the time's p80 gives the rate's p20.
    return dict(median=rate(t.median), p20=rate(t.p80), p80=rate(t.p20), rounds=t.rounds,
                median_ms=t.median, p20_ms=t.p20, p80_ms=t.p80, warnings=m.warnings)


def measure(settings: _timing.Settings = TIMING) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ceilings.py needs a CUDA GPU")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    r = _rate(lambda: dst.copy_(src), 2 * n, settings, 1e9)
    res["copy_GBps"] = r["median"]
    res["copy"] = r
    del src, dst
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", torch.float32),
                        ("fp32", torch.float32)):
        m = 8192
        a = torch.randn(m, m, device="cuda", dtype=dtype)
        b = torch.randn(m, m, device="cuda", dtype=dtype)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = name != "fp32"
        try:
            r = _rate(lambda: a @ b, 2 * m**3, settings, 1e12)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        res[f"matmul_{name}_TFLOPs"] = r["median"]
        res[f"matmul_{name}"] = r
        del a, b
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write the figures here")
    ap.add_argument("--quick", action="store_true",
                    help="short timing (benchmarks/_roofline.py's CUDA settings): seconds")
    _timing.add_arguments(ap, f"Defaults: --warmup {TIMING.warmup} --max-warmup "
                              f"{TIMING.max_warmup} --min-rounds {TIMING.min_rounds} "
                              f"--min-time {TIMING.min_seconds:g} --max-rounds "
                              f"{TIMING.max_rounds} --max-time {TIMING.max_seconds:g}.")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    _timing.exit_if_parse_only(args, __file__)
    import _roofline

    settings = _timing.settings_from_args(args, _roofline.CUDA_QUICK_TIMING if args.quick
                                          else TIMING)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ceilings.py needs a CUDA GPU")
    env = _common.environment(torch.device("cuda"), __file__, argv)
    print(f"command: {env['command']}\nmachine: {env['machine']}\ntiming: "
          f"{settings.describe()}, CUDA events; rate at the median time [rates at the "
          "80th-20th percentile times]")
    res = measure(settings)
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"{k:>22}: {_timing.fmt_spread(v['median'], v['p20'], v['p80'])} "
                  f"({v['rounds']} calls)")
        elif not isinstance(v, float):
            print(f"{k:>22}: {v}")
    if args.json:
        res["env"] = env
        res["timing"] = _timing.settings_summary(settings)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
