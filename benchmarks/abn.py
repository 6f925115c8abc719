#!/usr/bin/env python
"""In-Place ABN benchmark: time and activation memory of a ResNet-style stack.

Each variant is ``depth`` blocks of ``Conv2d(C, C, 3, padding=1, bias=False) ->
norm -> activation`` (leaky_relu, slope 0.01), trained one step at a time
(forward + backward of the whole stack). Variants:

  bn+leaky            nn.BatchNorm2d + nn.LeakyReLU(0.01)            (the reference)
  bn+leaky(inplace)   nn.BatchNorm2d + nn.LeakyReLU(0.01, inplace=True)
  syncbn+leaky        nn.SyncBatchNorm + nn.LeakyReLU(0.01)          (CUDA only)
  lipfast InPlaceABN  lipfast.InPlaceABN(C, "leaky_relu", 0.01)
  lipfast InPlaceABNSync  the same; single process: no sync, acts as InPlaceABN
  lipfast ABN         lipfast.ABN (out of place, plain torch ops)

Reported per variant and shape: the forward+backward time, median [20th-80th
percentile] of the timed rounds, and the number of rounds (benchmarks/_timing.py,
shared by every benchmark: warm-up until each variant's last two steps agree
within 10%, then rounds in which every variant steps once, in an order rotated
every round so that load on a shared machine hits them alike, until the shape has
its minimum rounds and minimum time; CUDA is synchronised around each step; a
wide spread or a busy machine is warned about), the
memory of the tensors saved for backward (unique storages seen by
``torch.autograd.graph.saved_tensors_hooks``, parameters and buffers excluded:
the activation memory a training step keeps alive; under --dtype bf16 it also
holds autocast's bf16 copies of the conv weights), and on CUDA also the peak
of ``torch.cuda.max_memory_allocated`` above the memory allocated before the
step. Ratios are to ``bn+leaky`` on the same shape.

Before timing, one step of every variant is checked against the reference with
identical weights (lipfast's in-place layers use ``|w| + eps`` as the scale, so
the reference gets ``|w| + eps`` where lipfast gets ``w``).

Floor (benchmarks/_roofline.py, shared by every benchmark): per shape, the bytes
the stack's tensors must move and the FLOPs its convolutions need, the floor
max(bytes / bandwidth, FLOPs / rate) with the ceilings measured in the same run
(CPU: a large memory copy and a float32 matmul; CUDA: benchmarks/gpu_ceilings.py)
and the fraction achieved (floor / median). With A = e*B*C*H*W bytes (one
activation at the dtype, e = 4 float32, 2 bf16) and Wt = e*9*C^2 (one conv weight),
per block and training step:

  FLOPs  conv forward 2*9*B*H*W*C^2, backward 2 x that (input and weight
         gradients): 3 * 18*B*H*W*C^2 per block; the norm and activation
         (element-wise) are not counted
  bytes  each layer's inputs read once and outputs written once: forward, conv
         reads x and Wt and writes y, norm+activation reads y and writes z
         (4A + Wt); backward, the norm+activation reads dz and z and writes dy,
         the conv reads dy, x and Wt and writes dx and dWt (6A + 2Wt): 10A + 3Wt
         per block

The rate: bf16 under --dtype bf16; float32 on CUDA is tf32 when
torch.backends.cudnn.allow_tf32 (the default) lets cuDNN use TF32, else fp32.
``--datasheet h200`` adds the floor by the H200's data sheet.

Run: ``python benchmarks/abn.py [--device cuda] [--full] [--json out.json]``;
``--quick``: the small shapes, 1 warm-up and 3 rounds (a smoke run, seconds).
On a CPU where other processes keep half the cores or more busy at the start,
the run uses one thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

import lipfast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _roofline  # noqa: E402
import _timing  # noqa: E402

SLOPE = 0.01
EPS = 1e-5

# (batch, channels, sizes) presets; sizes are square H = W.
SMALL = dict(batch=4, channels=64, sizes=(60, 30))
FULL = dict(batch=8, channels=256, sizes=(119, 60))

VARIANTS = (
    "bn+leaky",
    "bn+leaky(inplace)",
    "syncbn+leaky",
    "lipfast InPlaceABN",
    "lipfast InPlaceABNSync",
    "lipfast ABN",
)
REFERENCE = "bn+leaky"


# --------------------------------------------------------------------------- models


class Block(nn.Module):
    def __init__(self, conv: nn.Conv2d, norm: nn.Module, act: nn.Module | None):
        super().__init__()
        self.conv, self.norm = conv, norm
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


@dataclass
class Spec:
    """The weights every variant is built from, so their results are comparable."""

    conv: list[torch.Tensor]
    weight: list[torch.Tensor]  # the lipfast in-place weight w (some entries negative)
    bias: list[torch.Tensor]


def make_spec(channels: int, depth: int, seed: int = 0) -> Spec:
    g = torch.Generator().manual_seed(seed)
    conv, weight, bias = [], [], []
    for _ in range(depth):
        c = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        bound = 1.0 / (channels * 9) ** 0.5
        conv.append(torch.empty_like(c.weight).uniform_(-bound, bound, generator=g))
        w = torch.rand(channels, generator=g) + 0.5
        sign = torch.where(torch.rand(channels, generator=g) < 0.25, -1.0, 1.0)
        weight.append(w * sign)  # negative entries exercise the |w| + eps path
        bias.append(0.1 * torch.randn(channels, generator=g))
    return Spec(conv, weight, bias)


def sync_note() -> str:
    if dist.is_available() and dist.is_initialized():
        ws = dist.get_world_size()
        return (f"process group of {ws} rank(s)"
                + ("" if ws > 1 else ": world size 1, no collective runs"))
    return "no process group: acts as InPlaceABN (warning suppressed)"


def build(variant: str, spec: Spec, device: torch.device) -> nn.Module:
    blocks = []
    for cw, w, b in zip(spec.conv, spec.weight, spec.bias):
        c = cw.shape[0]
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        act = None
        if variant in ("bn+leaky", "bn+leaky(inplace)", "syncbn+leaky"):
            norm = nn.SyncBatchNorm(c, eps=EPS) if variant == "syncbn+leaky" else nn.BatchNorm2d(
                c, eps=EPS)
            norm_w = w.abs() + EPS
            act = nn.LeakyReLU(SLOPE, inplace=variant == "bn+leaky(inplace)")
        elif variant == "lipfast InPlaceABN":
            norm, norm_w = lipfast.InPlaceABN(c, eps=EPS, activation="leaky_relu",
                                              activation_param=SLOPE), w
        elif variant == "lipfast InPlaceABNSync":
            norm, norm_w = lipfast.InPlaceABNSync(c, eps=EPS, activation="leaky_relu",
                                                  activation_param=SLOPE), w
        elif variant == "lipfast ABN":
            # lipfast.ABN is plain F.batch_norm: it uses w as is, like nn.BatchNorm2d.
            norm, norm_w = lipfast.ABN(c, eps=EPS, activation="leaky_relu",
                                       activation_param=SLOPE), w.abs() + EPS
        else:
            raise ValueError(variant)
        with torch.no_grad():
            conv.weight.copy_(cw)
            norm.weight.copy_(norm_w)
            norm.bias.copy_(b)
        blocks.append(Block(conv, norm, act))
    return nn.Sequential(*blocks).to(device).train()


SYNCBN_CPU_NOTE = (
    "nn.SyncBatchNorm is not benchmarked on CPU: it supports CUDA inputs only. Without a "
    "process group it silently runs plain F.batch_norm (so the row would repeat bn+leaky), "
    "and with one it raises 'SyncBatchNorm expected input tensor to be on GPU'.")


def skip_reason(variant: str, device: torch.device) -> str | None:
    if variant == "syncbn+leaky" and device.type != "cuda":
        return "skipped: needs CUDA (see note)"
    return None


def row_note(variant: str, device: torch.device) -> str:
    if variant == "lipfast InPlaceABNSync":
        return sync_note()
    if variant == "syncbn+leaky":
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return "single process: SyncBatchNorm runs plain F.batch_norm"
        return f"process group of {dist.get_world_size()} ranks"
    if variant == REFERENCE:
        return "reference"
    return ""


# --------------------------------------------------------------------------- measurement


def autocast_ctx(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def step(model: nn.Module, x: torch.Tensor, gout: torch.Tensor, device, dtype: str):
    for p in model.parameters():
        p.grad = None
    with autocast_ctx(device, dtype):
        out = model(x)
    out.backward(gout.to(out.dtype))
    return out


def saved_bytes(model: nn.Module, x, gout, device, dtype) -> int:
    """Bytes of the unique storages saved for backward in one step, parameters and
    buffers excluded."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(
        model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, x, gout, device, dtype)
    return sum(seen.values())


def peak_bytes(model, x, gout, device, dtype) -> int | None:
    if device.type != "cuda":
        return None
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = step(model, x, gout, device, dtype)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def check(variants, spec, x, gout, device) -> dict:
    """One float32 step of each variant against the reference: output, loss
    sum(out * g), conv weight gradients and norm weight/bias gradients (lipfast's
    in-place weight gradient is d/dw of |w| + eps, i.e. the reference's times sign(w)).
    TF32 is switched off for the check so that CUDA convolutions compare exactly."""
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _check(variants, spec, x, gout, device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _check(variants, spec, x, gout, device) -> dict:
    results = {}
    multi_rank = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    ref = build(REFERENCE, spec, device)
    out_ref = step(ref, x, gout, device, "float32").detach().clone()
    loss_ref = float((out_ref.double() * gout.double()).sum())
    scale = out_ref.abs().max().item()
    for v in variants:
        if v == REFERENCE:
            continue
        if multi_rank and (v == "syncbn+leaky" or v == "lipfast InPlaceABNSync"):
            results[v] = dict(ok=True, skipped="statistics synchronised across ranks differ "
                                                "from the local reference")
            continue
        m = build(v, spec, device)
        out = step(m, x, gout, device, "float32").detach()
        loss = float((out.double() * gout.double()).sum())
        out_err = (out - out_ref).abs().max().item() / scale
        grad_err = 0.0
        for blk_r, blk, w in zip(ref, m, spec.weight):
            pairs = [(blk_r.conv.weight.grad, blk.conv.weight.grad),
                     (blk_r.norm.bias.grad, blk.norm.bias.grad)]
            gw_ref = blk_r.norm.weight.grad
            if v.startswith("lipfast InPlace"):
                gw_ref = gw_ref * torch.sign(w).to(device)
            pairs.append((gw_ref, blk.norm.weight.grad))
            for a, b in pairs:
                err = (a - b).abs().max() / a.abs().max().clamp_min(1e-12)
                grad_err = max(grad_err, err.item())
        rel_loss = abs(loss - loss_ref) / max(abs(loss_ref), 1e-12)
        ok = out_err < 1e-4 and grad_err < 1e-3 and rel_loss < 1e-4
        results[v] = dict(loss=loss, loss_ref=loss_ref, loss_rel_diff=rel_loss,
                          out_max_rel_diff=out_err, grad_max_rel_diff=grad_err, ok=ok)
    return results


# --------------------------------------------------------------------------- driver


@dataclass
class Row:
    shape: tuple
    depth: int
    variant: str
    dtype: str
    time_ms: float | None = None  # median
    p20_ms: float | None = None
    p80_ms: float | None = None
    min_ms: float | None = None
    rounds: int | None = None
    times_ms: list = field(default_factory=list)
    warmup_ms: list = field(default_factory=list)
    saved_mb: float | None = None
    peak_mb: float | None = None
    time_ratio: float | None = None
    saved_ratio: float | None = None
    peak_ratio: float | None = None
    floor: dict | None = None  # benchmarks/_roofline.py: bytes, flops, floor_ms, fraction
    note: str = ""


def stack_work(batch: int, channels: int, hw: int, depth: int, dtype: str) -> tuple[float, float]:
    """(bytes, FLOPs) of one training step of the stack (see the Floor section)."""
    e = 2 if dtype == "bf16" else 4
    act = e * batch * channels * hw * hw
    wt = e * 9 * channels ** 2
    flops = 3 * 18 * batch * hw * hw * channels ** 2
    return float(depth * (10 * act + 3 * wt)), float(depth * flops)


def environment(device: torch.device, argv=None) -> dict:
    env = _common.environment(device, __file__, argv)
    env["distributed_initialized"] = dist.is_available() and dist.is_initialized()
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"Shapes: small (default on CPU): B={SMALL['batch']}, C={SMALL['channels']}, "
            f"H=W in {SMALL['sizes']}; full (--full, default on CUDA; the issue's sizes): "
            f"B={FULL['batch']}, C={FULL['channels']}, H=W in {FULL['sizes']}. "
            "Depth 3 by default. The small CPU defaults take about a minute on 2 cores "
            "(--quick: seconds)."
        ),
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the issue's full sizes (CUDA default)")
    size.add_argument("--small", action="store_true", help="the small sizes (CPU default)")
    size.add_argument("--quick", action="store_true",
                      help="the small sizes and quick timing (1 warm-up, 3 rounds): a smoke "
                           "run, figures not for quoting")
    p.add_argument("--batch", type=int, help="override the batch size")
    p.add_argument("--channels", type=int, help="override the channel count")
    p.add_argument("--sizes", type=int, nargs="+", help="override the spatial sizes (H = W)")
    p.add_argument("--depth", type=int, default=3, help="conv+norm+act blocks (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) first (default: torch's choice, but 1 on CPU "
                        "when other processes keep half the cores or more busy at the start: "
                        "multi-threaded kernels then stall)")
    p.add_argument("--dtype", choices=("float32", "bf16"), default="float32",
                   help="float32, or bf16 through torch.autocast (CUDA only: lipfast's CPU "
                        "kernels support float32/float64)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   metavar="NAME", help="subset of variants, quoted (the reference "
                   f"{REFERENCE!r} always runs); names: {', '.join(VARIANTS)}")
    p.add_argument("--json", metavar="PATH", help="write all measurements and the environment")
    _timing.add_arguments(p, timing_defaults_help())
    _roofline.add_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# Timing defaults (benchmarks/_timing.py); one round steps every variant once.
CPU_TIMING = _timing.Settings(warmup=2, max_warmup=5, max_warmup_seconds=10.0, min_rounds=15,
                              min_seconds=5.0, max_rounds=300, max_seconds=30.0)
CUDA_TIMING = _timing.Settings(warmup=5, max_warmup=20, min_rounds=30, min_seconds=1.0,
                               max_rounds=1000, max_seconds=60.0)
QUICK_TIMING = _timing.QUICK


def timing_defaults_help() -> str:
    return _timing.defaults_help(CPU_TIMING, CUDA_TIMING, QUICK_TIMING, 'shape',
                                 '--repeats is --min-rounds, --budget is --max-time.')


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def print_table(rows: list[Row], cuda: bool, roof=None) -> None:
    head = f"{'shape (B,C,H,W)':<18} {'variant':<23} {'fwd+bwd ms [p20-p80]':>21} " \
           f"{'x ref':>6} {'rounds':>6} {'saved MB':>9} {'x ref':>6}"
    if cuda:
        head += f" {'peak MB':>9} {'x ref':>6}"
    fcols = roof.headers() if roof is not None else []
    head += "".join(f" {n:>{w}}" for n, w in fcols)
    head += "  notes"
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        shape = "x".join(map(str, r.shape)) if r.shape != last else ""
        last = r.shape
        line = (f"{shape:<18} {r.variant:<23} "
                f"{_timing.fmt_spread(r.time_ms, r.p20_ms, r.p80_ms):>21} "
                f"{fmt(r.time_ratio, '6.2f'):>6} {fmt(r.rounds, 'd'):>6} "
                f"{fmt(r.saved_mb, '9.1f'):>9} {fmt(r.saved_ratio, '6.2f'):>6}")
        if cuda:
            line += f" {fmt(r.peak_mb, '9.1f'):>9} {fmt(r.peak_ratio, '6.2f'):>6}"
        if roof is not None:
            line += "".join(f" {v:>{w}}" for v, (n, w) in zip(roof.cells(r.floor), fcols))
        print(line + ("  " + r.note if r.note else ""))


def main(argv=None) -> dict:
    args = parse_args(argv)
    _timing.exit_if_parse_only(args, __file__)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available (torch {torch.__version__})")
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    if args.dtype == "bf16" and not cuda:
        sys.exit("--dtype bf16 needs CUDA: lipfast's CPU kernels support float32 and float64")
    preset = FULL if (args.full or (cuda and not (args.small or args.quick))) else SMALL
    batch = args.batch or preset["batch"]
    channels = args.channels or preset["channels"]
    sizes = tuple(args.sizes or preset["sizes"])
    settings = _timing.settings_from_args(
        args, QUICK_TIMING if args.quick else (CUDA_TIMING if cuda else CPU_TIMING))
    machine = _timing.machine_check()
    threads_note = _timing.choose_threads(args.threads, device, machine)
    variants = [REFERENCE] + [v for v in args.variants if v != REFERENCE]
    variants = [v for v in VARIANTS if v in variants]
    env = environment(device, argv)
    env["machine_check"] = machine
    warnings.filterwarnings("ignore", message="InPlaceABNSync: torch.distributed is not "
                            "initialised")

    print(f"lipfast In-Place ABN benchmark on {device} ({env['device_name']}), torch "
          f"{torch.__version__}, {env['num_threads']} threads, dtype {args.dtype}")
    print(f"stack: {args.depth} x [Conv2d(C, C, 3, padding=1, bias=False) -> norm -> "
          f"leaky_relu({SLOPE})], batch {batch}, {channels} channels, sizes {sizes}")
    _timing.print_run_header(env, settings)
    print("memory: 'saved MB' = unique storages saved for backward (activations; parameters "
          "and buffers excluded)" + ("; 'peak MB' = max_memory_allocated above the "
                                     "pre-step allocation" if cuda else ""))

    _timing.print_machine_notes(machine, threads_note)
    if "syncbn+leaky" in variants and not cuda:
        print("note: " + SYNCBN_CPU_NOTE)
    roof = _roofline.announce(args, device, args.quick)
    rate = "bf16" if args.dtype == "bf16" else _roofline.compute_dtype(device, "fp32", "conv")

    rows: list[Row] = []
    checks = {}
    timing: dict[str, dict] = {}
    t_start = time.perf_counter()
    n_rows = len(sizes) * len(variants)
    i_row = 0
    for hw in sizes:
        shape = (batch, channels, hw, hw)
        spec = make_spec(channels, args.depth, seed=hw)
        g = torch.Generator().manual_seed(1000 + hw)
        x = torch.randn(shape, generator=g).to(device)
        gout = torch.randn(shape, generator=g).to(device)
        runnable = [v for v in variants if skip_reason(v, device) is None]
        ck = check(runnable, spec, x, gout, device)
        checks["x".join(map(str, shape))] = ck
        for v, c in ck.items():
            if "skipped" in c:
                print(f"  check {'x'.join(map(str, shape))} {v:<23} not checked: {c['skipped']}")
                continue
            print(f"  check {'x'.join(map(str, shape))} {v:<23} loss {c['loss']:.6f} vs "
                  f"{c['loss_ref']:.6f} (rel {c['loss_rel_diff']:.1e}), output rel "
                  f"{c['out_max_rel_diff']:.1e}, grads rel {c['grad_max_rel_diff']:.1e}"
                  f"  {'ok' if c['ok'] else 'MISMATCH'}")
        bad = [v for v, c in ck.items() if not c["ok"]]
        if bad:
            raise SystemExit(f"correctness check failed for {bad} at shape {shape}")
        # Memory first, one variant at a time; then the timed steps interleaved
        # (round-robin over the variants) so that a load spike on a shared machine
        # hits every variant alike instead of whichever row was running.
        models: dict[str, nn.Module] = {}
        shape_rows: dict[str, Row] = {}
        for v in variants:
            i_row += 1
            row = Row(shape=shape, depth=args.depth, variant=v, dtype=args.dtype)
            rows.append(row)
            reason = skip_reason(v, device)
            if reason:
                row.note = reason
                print(f"[{i_row}/{n_rows}] {v} {shape}: {reason}", flush=True)
                continue
            row.note = row_note(v, device)
            model = build(v, spec, device)
            step(model, x, gout, device, args.dtype)  # first call: not measured
            row.saved_mb = saved_bytes(model, x, gout, device, args.dtype) / 2**20
            pk = peak_bytes(model, x, gout, device, args.dtype)
            row.peak_mb = None if pk is None else pk / 2**20
            models[v], shape_rows[v] = model, row
            print(f"[{i_row}/{n_rows}] {v} {shape}: saved {row.saved_mb:.1f} MB"
                  + (f", peak {row.peak_mb:.1f} MB" if row.peak_mb is not None else ""),
                  flush=True)
        print(f"  timing {len(models)} variants at {shape}, interleaved", flush=True)
        m = _timing.measure(
            {v: (lambda model=model: step(model, x, gout, device, args.dtype))
             for v, model in models.items()}, device, settings)
        timing["x".join(map(str, shape))] = m.summary(times=False)
        ref_row = shape_rows[REFERENCE]
        for v, row in shape_rows.items():
            t = m[v]
            row.times_ms, row.warmup_ms = list(t.times_ms), list(t.warmup_ms)
            row.time_ms, row.p20_ms, row.p80_ms, row.min_ms = t.median, t.p20, t.p80, t.min
            row.rounds = t.rounds
        nbytes, flops = stack_work(batch, channels, hw, args.depth, args.dtype)
        for v, row in shape_rows.items():
            row.floor = roof.row(nbytes, flops, rate, row.time_ms)
            row.time_ratio = row.time_ms / ref_row.time_ms
            row.saved_ratio = row.saved_mb / ref_row.saved_mb if ref_row.saved_mb else None
            if row.peak_mb is not None and ref_row.peak_mb:
                row.peak_ratio = row.peak_mb / ref_row.peak_mb
            print(f"  {v:<23} {m[v].fmt():>21} ms  (x{row.time_ratio:.2f} of {REFERENCE})",
                  flush=True)
        print(f"  {m.rounds} rounds after {m.warmup_rounds} warm-up ({m.elapsed_s:.1f} s)",
              flush=True)
        fl = ref_row.floor
        if fl.get("floor_ms") is not None:
            print(f"  floor: {_roofline.fmt_count(nbytes, 'B')}, "
                  f"{_roofline.fmt_count(flops, 'FLOP')} -> {_roofline.fmt_floor(fl['floor_ms'])} "
                  f"ms ({fl['bound']}-bound)", flush=True)
        _timing.print_warnings(m, "  ")
        del models
        if cuda:
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t_start
    print()
    print_table(rows, cuda, roof)
    for line in roof.describe():
        print(line)
    print(f"\n{len(rows)} rows in {elapsed:.1f} s; times: median [20th-80th percentile] of "
          "the timed rounds (benchmarks/_timing.py)")
    warned = [k for k, t in timing.items() if t["warnings"]]
    if warned:
        print(f"timing warnings (see above) at {', '.join(warned)}")
    if "syncbn+leaky" in variants and not cuda:
        print("note: " + SYNCBN_CPU_NOTE)

    result = {
        "benchmark": "abn",
        "environment": env,
        "config": dict(device=str(device), batch=batch, channels=channels, sizes=list(sizes),
                       depth=args.depth, quick=args.quick, dtype=args.dtype,
                       slope=SLOPE, eps=EPS, threads=torch.get_num_threads(),
                       threads_note=threads_note,
                       timing=_timing.settings_summary(settings)),
        "roofline": roof.summary(),
        "timing": timing,
        "checks": checks,
        "rows": [asdict(r) for r in rows],
        "elapsed_s": elapsed,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
