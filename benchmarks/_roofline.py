"""The physical floor beside every benchmark row (shared by attn, abn, loss, miou and
train_step).

Each row states the bytes that must move through memory (its inputs read once and
its outputs written once, at the row's dtype) and the floating-point operations
its math needs (formulas in each benchmark's docstring). With the device's two
ceilings, memory bandwidth B (GB/s) and arithmetic rate R (GFLOP/s) for the row's
dtype, the floor is

    floor = max(bytes / B, FLOPs / R)

no implementation runs much faster; "bound" names the larger term (memory or
compute), and the fraction achieved is floor / measured median (1 = at the floor).
A fraction above 1 says the ceiling measured is below what the kernel reached (a
small --quick matmul, a busy machine, a kernel faster than torch's matmul): read
it against the ceilings printed with the table.

Ceilings, measured in the same run:

  CPU   a large memory copy (dst.copy_(src), 256 MiB; --quick 64 MiB; GB/s counting
        bytes read + written) and a large float32 matmul (2048^3; --quick 1536^3;
        2 n^3 FLOPs), timed by benchmarks/_timing.py with this run's threads; the
        rate at the best round (a ceiling: on a shared machine the median is the
        load's, not the CPU's; the median is kept in the JSON's details)
  CUDA  benchmarks/gpu_ceilings.py: a 1 GiB device-to-device copy and 8192^3
        matmuls in bf16, fp16, tf32 and fp32 (tensor cores off), or the figures of
        an earlier ``gpu_ceilings.py --json PATH`` given with ``--ceilings PATH``

``--datasheet h200`` adds the floor an H200 (SXM) would have by its data sheet (HBM3e
4.8 TB/s; dense bf16/fp16 989 TFLOP/s, tf32 494, plain fp32 67), so a CPU table
says now what the GPU table should approach. Rates by dtype: fp32 rows use the
fp32 rate (CUDA: tf32 where the row's kernels may use TF32: cuDNN convolutions with
torch.backends.cudnn.allow_tf32, matmuls with torch.backends.cuda.matmul.allow_tf32),
bf16 rows the bf16 rate; a CPU has one measured rate (float32 matmul) for all.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field

import _timing

# Data-sheet ceilings (leads, not measurements): bandwidth GB/s, dense rates GFLOP/s.
DATASHEETS = {
    "h200": dict(name="NVIDIA H200 SXM (data sheet)", bandwidth_GBps=4800.0,
                 compute_GFLOPs={"bf16": 989e3, "fp16": 989e3, "tf32": 494e3, "fp32": 67e3}),
}

CPU_COPY_BYTES = 256 << 20
CPU_COPY_BYTES_QUICK = 64 << 20
CPU_MATMUL_N = 2048
CPU_MATMUL_N_QUICK = 1536
CPU_TIMING = _timing.Settings(warmup=1, max_warmup=3, min_rounds=5, max_rounds=20,
                              min_seconds=0.5, max_seconds=5.0)
QUICK_TIMING = _timing.Settings(warmup=1, max_warmup=1, min_rounds=3, max_rounds=3)
CUDA_QUICK_TIMING = _timing.Settings(warmup=2, max_warmup=5, min_rounds=5, max_rounds=50,
                                     min_seconds=0.1, max_seconds=5.0)


@dataclass
class Ceilings:
    """A device's memory bandwidth and arithmetic rates (GFLOP/s by dtype name)."""

    source: str
    bandwidth_GBps: float
    compute_GFLOPs: dict
    details: dict = field(default_factory=dict)

    def rate(self, dtype: str) -> float:
        """GFLOP/s for a dtype name (fp32, tf32, bf16, fp16); a CPU's single measured
        rate serves every dtype."""
        c = self.compute_GFLOPs
        if dtype in c:
            return c[dtype]
        return c.get("fp32") or next(iter(c.values()))

    def summary(self) -> dict:
        return asdict(self)


def datasheet(model: str) -> Ceilings:
    d = DATASHEETS[model]
    return Ceilings(source=d["name"], bandwidth_GBps=d["bandwidth_GBps"],
                    compute_GFLOPs=dict(d["compute_GFLOPs"]))


def measure_cpu(quick: bool = False, settings: _timing.Settings | None = None) -> Ceilings:
    """Copy bandwidth and float32 matmul rate of this CPU (this process's threads)."""
    import torch

    st = settings or (QUICK_TIMING if quick else CPU_TIMING)
    nbytes = CPU_COPY_BYTES_QUICK if quick else CPU_COPY_BYTES
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    m = _timing.measure({"copy": lambda: dst.copy_(src)}, None, st, probe=False)
    copy = m["copy"]
    bw = 2 * nbytes / (copy.min * 1e-3) / 1e9
    del src, dst
    n = CPU_MATMUL_N_QUICK if quick else CPU_MATMUL_N
    a, b = torch.randn(n, n), torch.randn(n, n)
    m = _timing.measure({"matmul": lambda: a @ b}, None, st, probe=False)
    mm = m["matmul"]
    rate = 2 * n ** 3 / (mm.min * 1e-3) / 1e9
    return Ceilings(
        source=f"measured here (CPU, {torch.get_num_threads()} threads): copy of "
               f"{nbytes >> 20} MiB, float32 matmul {n}^3",
        bandwidth_GBps=bw, compute_GFLOPs={"fp32": rate},
        details=dict(copy_bytes=nbytes, copy_best_ms=copy.min, copy_ms=copy.median,
                     copy_p20_ms=copy.p20, copy_p80_ms=copy.p80, matmul_n=n,
                     matmul_best_ms=mm.min, matmul_ms=mm.median, matmul_p20_ms=mm.p20,
                     matmul_p80_ms=mm.p80, rounds=mm.rounds,
                     threads=torch.get_num_threads()))


def from_gpu_ceilings(res: dict, source: str) -> Ceilings:
    """Ceilings from benchmarks/gpu_ceilings.py's result (measure() or its --json)."""
    rates = {}
    for k in ("bf16", "fp16", "tf32", "fp32"):
        v = res.get(f"matmul_{k}_TFLOPs")
        if v:
            rates[k] = v * 1e3
    return Ceilings(source=source, bandwidth_GBps=res["copy_GBps"], compute_GFLOPs=rates,
                    details={k: v for k, v in res.items() if not isinstance(v, dict)})


def measure_cuda(device, quick: bool = True, path: str | None = None) -> Ceilings:
    """The GPU's ceilings: read from ``path`` (gpu_ceilings.py --json) when it exists,
    else measured now through gpu_ceilings.measure (short timing)."""
    if path and os.path.exists(path):
        with open(path) as f:
            return from_gpu_ceilings(json.load(f), f"benchmarks/gpu_ceilings.py ({path})")
    import gpu_ceilings

    res = gpu_ceilings.measure(CUDA_QUICK_TIMING if quick else gpu_ceilings.TIMING)
    note = "" if not path else f" ({path} not found)"
    return from_gpu_ceilings(res, "benchmarks/gpu_ceilings.py, measured in this run" + note)


def measure(device, quick: bool = False, path: str | None = None) -> Ceilings:
    if getattr(device, "type", str(device)) == "cuda":
        return measure_cuda(device, True, path)
    return measure_cpu(quick)


# --------------------------------------------------------------------------- floors


def floor(nbytes: float, flops: float, ceil: Ceilings, dtype: str = "fp32") -> dict:
    """{bytes, flops, memory_ms, compute_ms, floor_ms, bound} of one row."""
    mem_ms = nbytes / (ceil.bandwidth_GBps * 1e9) * 1e3
    cmp_ms = flops / (ceil.rate(dtype) * 1e9) * 1e3
    return dict(bytes=float(nbytes), flops=float(flops), memory_ms=mem_ms,
                compute_ms=cmp_ms, floor_ms=max(mem_ms, cmp_ms),
                bound="memory" if mem_ms >= cmp_ms else "compute")


class Roofline:
    """The run's ceilings (measured) and the data sheets asked for (--datasheet)."""

    def __init__(self, measured: Ceilings | None, models=()):
        self.measured = measured
        self.models = {m: datasheet(m) for m in models}

    def row(self, nbytes: float, flops: float, dtype: str, measured_ms: float | None,
            **extra) -> dict:
        """The row's floor on this device (and on each model), with the fraction
        achieved (floor / measured median)."""
        out = dict(bytes=float(nbytes), flops=float(flops), dtype=dtype, **extra)
        if self.measured is not None:
            f = floor(nbytes, flops, self.measured, dtype)
            out.update(f)
            out["fraction"] = (f["floor_ms"] / measured_ms) if measured_ms else None
        out["models"] = {m: floor(nbytes, flops, c, dtype) for m, c in self.models.items()}
        return out

    def summary(self) -> dict:
        return dict(measured=None if self.measured is None else self.measured.summary(),
                    models={m: c.summary() for m, c in self.models.items()})

    def describe(self) -> list[str]:
        lines = []
        if self.measured is not None:
            c = self.measured
            rates = ", ".join(f"{k} {fmt_rate(v)}" for k, v in c.compute_GFLOPs.items())
            lines.append(f"ceilings: {fmt_bw(c.bandwidth_GBps)}, {rates} ({c.source})")
        for m, c in self.models.items():
            rates = ", ".join(f"{k} {fmt_rate(v)}" for k, v in c.compute_GFLOPs.items())
            lines.append(f"data sheet {m}: {fmt_bw(c.bandwidth_GBps)}, {rates} ({c.source})")
        lines.append("floor = max(bytes / bandwidth, FLOPs / rate); 'of floor' = floor / "
                     "median (1 = at the floor); m/c = memory- or compute-bound")
        return lines

    def headers(self) -> list[tuple[str, int]]:
        cols = [("floor ms", 9), ("of floor", 8)]
        cols += [(f"{m} floor", 10) for m in self.models]
        return cols

    def cells(self, r: dict | None) -> list[str]:
        """Table cells for a row from row(): floor ms (+ m/c), fraction, model floors."""
        if r is None:
            return ["-"] * (2 + len(self.models))
        out = [fmt_floor(r.get("floor_ms"), r.get("bound")), fmt_fraction(r.get("fraction"))]
        for m in self.models:
            f = r["models"].get(m)
            out.append(fmt_floor(f["floor_ms"], f["bound"]) if f else "-")
        return out


def fmt_bw(gbps: float) -> str:
    return f"{gbps / 1e3:.2f} TB/s" if gbps >= 1e3 else f"{gbps:.1f} GB/s"


def fmt_rate(gflops: float) -> str:
    return f"{gflops / 1e3:.1f} TFLOP/s" if gflops >= 1e3 else f"{gflops:.1f} GFLOP/s"


def fmt_floor(ms: float | None, bound: str | None = None) -> str:
    if ms is None:
        return "-"
    if ms >= 0.01:
        s = _timing.fmt_ms(ms)
    else:
        s = f"{ms:.1e}"
    return s + ("" if bound is None else " " + bound[0])


def fmt_fraction(f: float | None) -> str:
    if f is None:
        return "-"
    return f"{f:.3f}" if f >= 0.001 else f"{f:.1e}"


def fmt_count(x: float | None, unit: str = "") -> str:
    """1.23e9 -> '1.23 G' (bytes: 'GB'; FLOPs: 'GFLOP')."""
    if x is None:
        return "n/a"
    for p, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}".rstrip()


# --------------------------------------------------------------------------- options


class _RenamedToDatasheet(argparse.Action):
    """The old name of --datasheet: refused with a pointer to the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"--model {values} is now --datasheet {values} (GPU data sheets: "
                     f"{', '.join(sorted(DATASHEETS))})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "floor (benchmarks/_roofline.py)",
        "  per row: floor = max(bytes / bandwidth, FLOPs / rate) with the ceilings "
        "measured in this\n  run, and the fraction achieved (floor / median)")
    g.add_argument("--datasheet", action="append", choices=sorted(DATASHEETS), default=None,
                   metavar="GPU",
                   help="also print the floor this GPU would have by its data sheet, one of "
                        f"{', '.join(sorted(DATASHEETS))} (h200: 4.8 TB/s, bf16 989 / tf32 494 "
                        "/ fp32 67 TFLOP/s); repeatable (formerly --model)")
    if "--model" not in parser._option_string_actions:   # train_step.py's --model is the network
        g.add_argument("--model", action=_RenamedToDatasheet, help=argparse.SUPPRESS)
    g.add_argument("--ceilings", metavar="PATH", default=None,
                   help="CUDA: read the ceilings from gpu_ceilings.py --json PATH instead of "
                        "measuring them (measured when the file is missing)")
    g.add_argument("--no-floor", action="store_true",
                   help="do not measure the ceilings (no floor column; --datasheet still works)")


def from_args(args, device, quick: bool) -> Roofline:
    """The run's Roofline: ceilings measured (after the thread count is set) unless
    --no-floor, and the --datasheet data sheets."""
    measured = None if getattr(args, "no_floor", False) else measure(
        device, quick, getattr(args, "ceilings", None))
    return Roofline(measured, getattr(args, "datasheet", None) or ())


def announce(args, device, quick: bool) -> Roofline:
    """:func:`from_args`, with the ceilings and models it uses printed."""
    roof = from_args(args, device, quick)
    for line in roof.describe():
        print(line)
    return roof


def compute_dtype(device, dtype: str, op: str = "matmul") -> str:
    """The rate that applies to a row: bf16/fp16 as given; fp32 on CUDA is tf32 where
    torch lets that op use TF32 (op 'conv': cudnn.allow_tf32; 'matmul':
    cuda.matmul.allow_tf32), else fp32."""
    if dtype in ("bf16", "fp16") or getattr(device, "type", str(device)) != "cuda":
        return "bf16" if dtype == "bf16" else ("fp16" if dtype == "fp16" else "fp32")
    import torch

    tf32 = (torch.backends.cudnn.allow_tf32 if op == "conv"
            else torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if tf32 else "fp32"


def count_flops(fn) -> float:
    """FLOPs of fn() (and whatever backward it runs) by torch.utils.flop_counter
    (matmuls, convolutions, attention; element-wise ops count 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def esize(dtype: str) -> int:
    """Bytes per element of a dtype name."""
    return {"fp32": 4, "float32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "float64": 8,
            "fp64": 8}[dtype]
