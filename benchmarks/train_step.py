#!/usr/bin/env python
"""End-to-end training-step benchmark: CE2P on LIP-shaped batches, the reference
stack against the lipfast stack.

Configurations (``--configs``):

  asp_oc8   CE2P with OCNet's ASP-OC context, output stride 8 (the seed's CE2P-OCNet)
  psp16     CE2P with the PSP context, output stride 16 (CE2P / SCHP)

Stacks, same initial weights (the lipfast model loads the reference model's
state_dict), same batch, same dropout masks at step 0:

  reference  norm="batchnorm" (nn.BatchNorm2d + LeakyReLU(0.01) / ReLU), OCNet's
             eager attention (materialised softmax(Q K^T) V, Python loop over
             pyramid regions; swapped in for lipfast.ops.oc_attention), and SCHP's
             eager criterion as upstream writes it (benchmarks/loss.py: per-term
             F.interpolate + F.cross_entropy, per-class Lovasz loop, host-side edge
             weights, the consistency term computed, conv-based edge labels).
  lipfast    norm="inplace_abn" (In-Place ABN; the Sync variant without a process
             group is the same layer), lipfast's fused OC attention,
             lipfast.losses.SCHPCriterion with lipfast.losses.generate_edge.

A step is: edge labels from the label map, forward (under bf16 autocast on
CUDA), the SCHP criterion in float32, backward, SGD (momentum 0.9, weight decay
5e-4). Reported per stack: step-0 loss (the two must agree within --tol
relative; the script prints the difference and exits with status 1 when it does
not), the step time as median [20th-80th percentile] and best of the timed
rounds, with the number of rounds (benchmarks/_timing.py, shared by every
benchmark: both stacks in one process, warm-up steps until each stack's last two
agree within 10%, then rounds in which each stack steps once, in alternating
order, so that load from other processes hits both alike; a wide spread or a
busy machine is warned about), and peak memory (one stack per fresh process, one
measured step):

  Both: the peak during the timed steps above what is allocated before them
        (model, gradients, optimizer state and batch excluded: they are the same
        for both stacks; gradients are zeroed, not freed, between steps), i.e.
        activations kept for backward plus temporaries.
  CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the steps.
  CPU:  growth of the process's resident set: each stack runs in its own fresh
        process with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors go back to the
        OS, so RSS follows live memory); the kernel's peak-RSS mark (VmHWM, reset
        through /proc/self/clear_refs; a 1 ms sampling thread where that is
        refused) minus the RSS before the steps. It includes allocator overhead
        and kernel scratch, as `top` would.

Floor (benchmarks/_roofline.py, shared by every benchmark): per configuration,
the FLOPs of one reference step as counted by torch.utils.flop_counter
(convolutions, matmuls and the eager attention's bmm, forward and backward;
element-wise work, the norms and SGD count 0) and the bytes that must move at
least: the parameters P (float32 bytes) read in the forward, their gradients
written, SGD reading parameters, gradients and momentum and writing parameters
and momentum (7 P in all), the images read (4*B*3*S^2) and the labels read
(8*B*S^2); activations are not counted, so this is a lower bound. The floor is
max(bytes / bandwidth, FLOPs / rate) with the ceilings measured in the same run
(CPU: a large memory copy and a float32 matmul; CUDA: benchmarks/gpu_ceilings.py;
bf16 rate under autocast, else tf32 where cuDNN may use it, else fp32), and the
fraction achieved is floor / median step time. ``--model h200`` adds the floor by
the H200's data sheet.

``--max-batch`` (CUDA) also searches the largest batch that fits (doubling,
then bisection, one step each). Shapes: CUDA default 473x473, B=8; CPU default
129x129, B=2 with the full ResNet-101 (a few minutes on 2 cores); ``--quick``: a
reduced model (one Bottleneck per stage, width x0.25), 65x65, B=2, 1 warm-up
and 3 rounds (seconds; what the test runs; figures not for quoting). ``--json
PATH`` writes the rows and the environment record. On a CPU where other
processes keep half the cores or more busy at the start, the run uses one
thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _roofline  # noqa: E402
import _timing  # noqa: E402
from _common import PeakRSS, run_environment  # noqa: E402
from loss import labels_like, schp_eager, schp_generate_edge_tensor  # noqa: E402

import lipfast.nn.oc as _oc  # noqa: E402
from lipfast.losses import SCHPCriterion, generate_edge  # noqa: E402
from lipfast.models import CE2P  # noqa: E402

CONFIGS = {"asp_oc8": ("asp_oc", 8), "psp16": ("psp", 16)}
NUM_CLASSES = 20


# ----------------------------------------------------------------- reference attention
def eager_oc_attention(qk, v, scale=None, regions=None):
    """OCNet's attention as written upstream: the N x N similarity map is
    materialised and kept for backward; pyramid regions in a Python loop (the last
    row/column of regions absorbs the remainder)."""
    b, ck, h, w = qk.shape
    cv = v.shape[1]
    scale = ck ** -0.5 if scale is None else scale
    s = regions or 1
    sh, sw = h // s, w // s
    rows = []
    for i in range(s):
        r0, r1 = i * sh, (h if i == s - 1 else (i + 1) * sh)
        cols = []
        for j in range(s):
            c0, c1 = j * sw, (w if j == s - 1 else (j + 1) * sw)
            q = qk[:, :, r0:r1, c0:c1].reshape(b, ck, -1)
            val = v[:, :, r0:r1, c0:c1].reshape(b, cv, -1)
            sim = torch.softmax(torch.matmul(q.transpose(1, 2), q) * scale, dim=-1)
            ctx = torch.matmul(sim, val.transpose(1, 2)).transpose(1, 2)
            cols.append(ctx.reshape(b, cv, r1 - r0, c1 - c0))
        rows.append(torch.cat(cols, 3))
    return torch.cat(rows, 2)


@contextlib.contextmanager
def eager_attention():
    """Swaps OCNet's eager attention in for lipfast's inside lipfast.nn.oc."""
    saved = _oc.oc_attention
    _oc.oc_attention = eager_oc_attention
    try:
        yield
    finally:
        _oc.oc_attention = saved


# ----------------------------------------------------------------- one stack
def build(config: str, stack: str, quick: bool, device, seed: int = 0):
    context, os_ = CONFIGS[config]
    kw = dict(layers=(1, 1, 1, 1), width_mult=0.25) if quick else {}
    torch.manual_seed(seed)
    ref = CE2P(NUM_CLASSES, context=context, output_stride=os_, norm="batchnorm", **kw)
    if stack == "reference":
        return ref.to(device)
    fast = CE2P(NUM_CLASSES, context=context, output_stride=os_, norm="inplace_abn", **kw)
    fast.load_state_dict(ref.state_dict())
    return fast.to(device)


def make_batch(b: int, size: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, size, size, generator=g).to(device)
    labels = labels_like(b, size, size, NUM_CLASSES, device, seed=seed)
    return images, labels


class Stack:
    """One stack ready to train: model, SGD, batch and criterion; ``step(seed)`` runs
    one training step and returns the loss."""

    def __init__(self, config, stack, quick, batch, size, device, amp, seed=0):
        self.stack, self.device, self.amp = stack, device, amp
        self.model = build(config, stack, quick, device, seed).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9,
                                   weight_decay=5e-4)
        self.images, self.labels = make_batch(batch, size, device, seed)
        self.crit = SCHPCriterion(num_classes=NUM_CLASSES)

    def step(self, step_seed: int) -> torch.Tensor:
        attn = eager_attention() if self.stack == "reference" else contextlib.nullcontext()
        with attn:
            torch.manual_seed(step_seed)   # the same dropout masks in both stacks
            self.opt.zero_grad(set_to_none=False)   # gradients stay allocated between steps
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                preds = self.model(self.images)
            preds = [[p.float() for p in preds[0]], [e.float() for e in preds[1]]]
            if self.stack == "reference":
                edges = schp_generate_edge_tensor(self.labels).long()
                loss = schp_eager(preds, self.labels, edges)
            else:
                loss = self.crit(preds, [self.labels, generate_edge(self.labels)])
            loss.backward()
            self.opt.step()
        return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stack(config, stack, quick, batch, size, reps, warmup, device, amp, seed=0):
    """Builds one stack alone and measures its memory; returns a dict (loss0, peak_MB,
    ...). Memory is the peak during the ``reps`` steps (after ``warmup`` steps) above
    what exists before them. (Times come from time_interleaved.)"""
    st = Stack(config, stack, quick, batch, size, device, amp, seed)
    res = {"config": config, "stack": stack, "loss0": float(st.step(1000))}
    for i in range(warmup):
        st.step(1001 + i)
    # Memory is measured from here: gradients and optimizer state already exist.
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        rss = PeakRSS()
    for i in range(reps):
        st.step(2000 + i)
    _sync(device)
    if device.type == "cuda":
        res["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        res["peak_MB"] = rss.growth() / 2**20
        res["peak_how"] = rss.how
    return res


def time_interleaved(config, quick, batch, size, settings, device, amp, seed=0, count=False):
    """Both stacks in this process, timed by benchmarks/_timing.py: steps alternating
    (order flipped every round) so that load from other processes hits both alike;
    the k-th step of either stack uses step seed 1001 + k (the same dropout masks).
    Returns ({stack: {loss0, ms (median), p20_ms, p80_ms, best_ms, rounds, times_ms,
    warmup_ms}}, the Measurement)."""
    stacks = {s: Stack(config, s, quick, batch, size, device, amp, seed)
              for s in ("reference", "lipfast")}
    out = {s: {"loss0": float(st.step(1000))} for s, st in stacks.items()}
    if count:
        # One more reference step under torch.utils.flop_counter (an untimed warm-up).
        ref = stacks["reference"]
        flops = _roofline.count_flops(lambda: ref.step(999))
        pbytes = sum(p.numel() * p.element_size() for p in ref.model.parameters())
        for s in stacks:
            out[s].update(flops_step=flops, param_bytes=pbytes)
    seeds = {s: itertools.count(1001) for s in stacks}
    m = _timing.measure({s: st.step for s, st in stacks.items()}, device, settings,
                        setup={s: (lambda s=s: (next(seeds[s]),)) for s in stacks})
    for s in stacks:
        t = m[s]
        out[s].update(ms=t.median, p20_ms=t.p20, p80_ms=t.p80, best_ms=t.min, rounds=t.rounds,
                      times_ms=list(t.times_ms), warmup_ms=list(t.warmup_ms))
    return out, m


# Timing defaults (benchmarks/_timing.py). CPU: a full ResNet-101 step at 129x129
# takes 1-2 s, so a round (both stacks) 2-4 s.
CPU_TIMING = _timing.Settings(warmup=1, max_warmup=4, max_warmup_seconds=20.0, min_rounds=10,
                              min_seconds=0.0, max_rounds=100, max_seconds=120.0)
CUDA_TIMING = _timing.Settings(warmup=3, max_warmup=20, min_rounds=20, min_seconds=2.0,
                               max_rounds=500, max_seconds=60.0)
QUICK_TIMING = _timing.QUICK


def timing_defaults_help() -> str:
    return _timing.defaults_help(CPU_TIMING, CUDA_TIMING, QUICK_TIMING, 'config',
                                 '--reps is --min-rounds. The step-0 loss step comes before the warm-up.')


def max_batch(config, stack, quick, size, device, amp, limit=256):
    """Largest batch (<= limit) for which one training step fits (CUDA)."""
    def fits(b):
        try:
            run_stack(config, stack, quick, b, size, 0, 0, device, amp)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------- driver
def _worker(args) -> int:
    device = torch.device(args.device)
    res = run_stack(args.worker_config, args.worker_stack, args.quick, args.batch, args.size,
                    args.min_rounds, args.warmup, device, args.amp)
    if args.max_batch:
        res["max_batch"] = max_batch(args.worker_config, args.worker_stack, args.quick,
                                     args.size, device, args.amp)
    print("RESULT " + json.dumps(res))
    return 0


def _spawn(args, config, stack) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-config", config,
           "--worker-stack", stack, "--device", args.device, "--batch", str(args.batch),
           "--size", str(args.size), "--reps", "1", "--warmup", "1"]
    cmd += ["--threads", str(args.threads or torch.get_num_threads())]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--amp"] if args.amp else ["--no-amp"]
    cmd += ["--max-batch"] if args.max_batch else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {config}/{stack} failed "
                           f"(exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="asp_oc8,psp16",
                    help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--device", default=None,
                    help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--quick", action="store_true",
                    help="reduced model, 65x65, quick timing (1 warm-up, 3 rounds): seconds")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default: 8 on CUDA, 2 on CPU and with --quick)")
    ap.add_argument("--size", type=int, default=None,
                    help="square input size (default: 473 on CUDA, 129 on CPU, 65 with --quick)")
    ap.add_argument("--amp", dest="amp", action="store_true", default=None,
                    help="bf16 autocast (default on CUDA)")
    ap.add_argument("--no-amp", dest="amp", action="store_false",
                    help="float32 (default on CPU)")
    ap.add_argument("--tol", type=float, default=None,
                    help="relative step-0 loss tolerance (default 2e-3 fp32, 3e-2 bf16)")
    ap.add_argument("--max-batch", action="store_true", help="largest batch that fits (CUDA)")
    ap.add_argument("--in-process", action="store_true",
                    help="measure memory in this process too (not isolated; for tests)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: torch's choice, but 1 on CPU "
                        "when other processes keep half the cores or more busy at the start: "
                        "multi-threaded kernels then stall)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="write the rows and the environment")
    ap.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-stack", default=None, help=argparse.SUPPRESS)
    _timing.add_arguments(ap, timing_defaults_help())
    _roofline.add_arguments(ap)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.worker_config:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        bad = [c for c in configs if c not in CONFIGS]
        if bad or not configs:
            ap.error(f"unknown config(s) {bad}; choose from {', '.join(CONFIGS)}")
        _timing.exit_if_parse_only(args, __file__)

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.amp is None:
        args.amp = gpu
    if args.batch is None:
        args.batch = 8 if gpu and not args.quick else 2
    if args.size is None:
        args.size = 65 if args.quick else (473 if gpu else 129)
    if args.max_batch and not gpu:
        ap.error("--max-batch needs a CUDA device")
    if args.worker_config:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _worker(args)
    settings = _timing.settings_from_args(
        args, QUICK_TIMING if args.quick else (CUDA_TIMING if gpu else CPU_TIMING))
    env, machine, threads_note = run_environment(device, __file__, argv, args.threads)
    _timing.print_run_header(env, settings)
    _timing.print_machine_notes(machine, threads_note)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        ap.error(f"unknown config(s) {bad}; choose from {', '.join(CONFIGS)}")
    tol = args.tol if args.tol is not None else (3e-2 if args.amp else 2e-3)
    roof = _roofline.announce(args, device, args.quick)
    rate = "bf16" if args.amp else _roofline.compute_dtype(device, "fp32", "conv")

    rows, ok = [], True
    for config in configs:
        # Time: both stacks in this process, steps interleaved.
        pair, m = time_interleaved(config, args.quick, args.batch, args.size, settings,
                                   device, args.amp, count=True)
        nbytes = (7 * pair["reference"]["param_bytes"] + 4 * args.batch * 3 * args.size ** 2
                  + 8 * args.batch * args.size ** 2)
        for s in pair:
            pair[s]["floor"] = roof.row(nbytes, pair[s]["flops_step"], rate, pair[s]["ms"])
        print(f"{config}: step ms, median [p20-p80]: reference {m['reference'].fmt()}, lipfast "
              f"{m['lipfast'].fmt()}; {m.rounds} rounds after {m.warmup_rounds} warm-up",
              flush=True)
        _timing.print_warnings(m, "  ")
        # Memory (and the largest batch): one stack at a time, each in a fresh process
        # unless --in-process.
        for stack in ("reference", "lipfast"):
            if args.in_process:
                mem = run_stack(config, stack, args.quick, args.batch, args.size, 1, 1,
                                device, args.amp)
                if args.max_batch:
                    mem["max_batch"] = max_batch(config, stack, args.quick, args.size,
                                                 device, args.amp)
            else:
                mem = _spawn(args, config, stack)
            if mem["loss0"] != pair[stack]["loss0"]:
                print(f"note: {config}/{stack}: step-0 loss {mem['loss0']!r} in the memory run "
                      f"vs {pair[stack]['loss0']!r} in the timing run", file=sys.stderr)
            pair[stack]["peak_MB"] = mem["peak_MB"]
            for k in ("peak_how", "max_batch"):
                if k in mem:
                    pair[stack][k] = mem[k]
        ref, fast = pair["reference"], pair["lipfast"]
        rel = abs(fast["loss0"] - ref["loss0"]) / max(abs(ref["loss0"]), 1e-12)
        good = rel <= tol
        ok &= good
        rows.append({"config": config, "reference": ref, "lipfast": fast, "loss0_rel_diff": rel,
                     "loss0_ok": good, "speedup": ref["ms"] / fast["ms"],
                     "best_speedup": ref["best_ms"] / fast["best_ms"],
                     "memory_ratio": (fast["peak_MB"] / ref["peak_MB"]
                                      if ref["peak_MB"] > 0 else None),
                     "timing": m.summary(times=False)})

    mem = ("cuda max_memory_allocated above model, gradients and optimizer state" if gpu else
           "peak RSS growth above model, gradients and optimizer state")
    mem += "" if args.in_process else ", one fresh process per stack"
    print(f"device {device} ({env['device_name']}), B={args.batch}, {args.size}x{args.size}, "
          f"{'reduced model (--quick)' if args.quick else 'ResNet-101'}, "
          f"{'bf16 autocast' if args.amp else 'float32'}, {torch.get_num_threads()} threads; "
          f"time: step ms, median [20th-80th percentile] and best of the timed rounds, "
          f"stacks interleaved in one process; peak memory: {mem}")
    fcols = roof.headers()
    head = (f"{'config':<9} {'stack':<10} {'step-0 loss':>12} {'step ms [p20-p80]':>20} "
            f"{'best ms':>9} {'rounds':>6} {'peak MB':>9}"
            + (f" {'max B':>6}" if args.max_batch else "")
            + f" {'bytes':>9} {'FLOPs':>10}" + "".join(f" {n:>{w}}" for n, w in fcols))
    print(head)
    for r in rows:
        for stack in ("reference", "lipfast"):
            s = r[stack]
            print(f"{r['config']:<9} {stack:<10} {s['loss0']:>12.6f} "
                  f"{_timing.fmt_spread(s['ms'], s['p20_ms'], s['p80_ms']):>20} "
                  f"{_timing.fmt_ms(s['best_ms']):>9} {s['rounds']:>6} {s['peak_MB']:>9.1f}"
                  + (f" {s['max_batch']:>6}" if args.max_batch else "")
                  + f" {_roofline.fmt_count(s['floor']['bytes'], 'B'):>9}"
                  f" {_roofline.fmt_count(s['floor']['flops']):>10}"
                  + "".join(f" {v:>{w}}" for v, (n, w) in zip(roof.cells(s["floor"]), fcols)))
        mr = r["memory_ratio"]
        print(f"{r['config']:<9} {'ratio':<10} {'diff ' + format(r['loss0_rel_diff'], '.1e'):>12} "
              f"{r['speedup']:>19.2f}x {r['best_speedup']:>8.2f}x {'':>6} "
              f"{('-' if mr is None else format(mr, '.2f') + 'x'):>9}"
              + ("" if r["loss0_ok"] else f"   STEP-0 LOSS MISMATCH (tolerance {tol:g})"))
    warned = [r["config"] for r in rows if r["timing"]["warnings"]]
    if warned:
        print(f"timing warnings (see above) in: {', '.join(warned)}")
    for line in roof.describe():
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"env": env, "args": {k: v for k, v in vars(args).items()
                                  if not k.startswith("worker")},
             "timing": _timing.settings_summary(settings),
             "tolerance": tol, "memory": mem, "roofline": roof.summary(),
             "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    if not ok:
        print("FAIL: the step-0 losses of the two stacks differ by more than the tolerance",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
