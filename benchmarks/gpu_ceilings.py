#!/usr/bin/env python
"""Measures the GPU's own ceilings once, so every benchmark can be reported as a
fraction of them: device-to-device copy bandwidth (large tensor, GB/s counting
read + write) and dense bf16 / fp16 / tf32 matmul throughput (TFLOP/s).
Medians of CUDA-event timings. Usage: python benchmarks/gpu_ceilings.py --json PATH
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def _time(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def measure() -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ceilings.py needs a CUDA GPU")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src))
    res["copy_GBps"] = 2 * n / t / 1e9
    del src, dst
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", torch.float32)):
        m = 8192
        a = torch.randn(m, m, device="cuda", dtype=dtype)
        b = torch.randn(m, m, device="cuda", dtype=dtype)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        t = _time(lambda: a @ b, repeats=10)
        torch.backends.cuda.matmul.allow_tf32 = prev
        res[f"matmul_{name}_TFLOPs"] = 2 * m**3 / t / 1e12
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    res = measure()
    for k, v in res.items():
        print(f"{k:>22}: {v:.1f}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
