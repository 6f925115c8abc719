#!/usr/bin/env python
"""End-to-end training-step benchmark on LIP-shaped batches, the reference stack
against the lipfast stack, for CE2P (``--model ce2p``, the default) or HRNetV2
(``--model hrnetv2_w18``, ``hrnetv2_w32``, ``hrnetv2_w48``).

Configurations (``--configs``; default: all of the model's):

  ce2p:
    asp_oc8    CE2P with OCNet's ASP-OC context, output stride 8 (the seed's
               CE2P-OCNet)
    psp16      CE2P with the PSP context, output stride 16 (CE2P / SCHP)
  hrnetv2_w18 / w32 / w48:
    hrnet_seg  lipfast.models.HRNetV2 (width 18, 32 or 48) with its "seg" head
               (HRNet-Semantic-Segmentation's last_layer: logits at 1/4 of the
               input), no context

Stacks, same initial weights (the lipfast model loads the reference model's
state_dict), same batch, same dropout masks at step 0:

  CE2P:
  reference  norm="batchnorm" (nn.BatchNorm2d + LeakyReLU(0.01) / ReLU), OCNet's
             eager attention (materialised softmax(Q K^T) V, Python loop over
             pyramid regions; swapped in for lipfast.ops.oc_attention), and SCHP's
             eager criterion as upstream writes it (benchmarks/loss.py: per-term
             F.interpolate + F.cross_entropy, per-class Lovasz loop, host-side edge
             weights, the consistency term computed, conv-based edge labels).
  lipfast    norm="inplace_abn" (In-Place ABN; the Sync variant without a process
             group is the same layer), lipfast's fused OC attention,
             lipfast.losses.SCHPCriterion with lipfast.losses.generate_edge.

  HRNetV2 (the HRNet-Semantic-Segmentation recipe):
  reference  HRNetV2(norm="batchnorm") (nn.BatchNorm2d + ReLU, upstream's), loss
             F.cross_entropy(F.interpolate(logits, label size, bilinear,
             align_corners=False), labels, ignore_index=255) on the logits cast
             to float32.
  lipfast    HRNetV2(norm="inplace_abn") (In-Place ABN, ReLU -> conv pairs fused
             as lipfast.ops.relu_conv2d, the model's default), loss
             lipfast.losses.upsample_cross_entropy(logits, labels,
             align_corners=False): the upsampling fused into the loss, the
             full-resolution logits never materialised (bf16 logits are taken as
             they are and computed in float32).

A step is: (CE2P: edge labels from the label map,) forward (under bf16 autocast
on CUDA), the loss in float32, backward, SGD (momentum 0.9, weight decay 5e-4).
Reported per stack: step-0 loss (the two must agree within --tol relative; the
script prints the difference and exits with status 1 when it does not), the
step time as median [20th-80th percentile] and best of the timed rounds, with
the number of rounds (benchmarks/_timing.py, shared by every benchmark: both
stacks in one process, warm-up steps until each stack's last two agree within
10%, then rounds in which each stack steps once, in alternating order, so that
load from other processes hits both alike; a wide spread or a busy machine is
warned about), and peak memory (one stack per fresh process, one measured step):

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
fraction achieved is floor / median step time. ``--datasheet h200`` adds the
floor by the H200's data sheet (this option was called --model before --model
picked the network).

``--max-batch`` (CUDA) also searches the largest batch that fits (doubling,
then bisection, one step each). Shapes: CUDA default 473x473, B=8, bf16
autocast, for every model (the issue-14 targets for HRNetV2-W48 on an H100/H200:
lipfast's peak memory <= 0.6x and step time <= 0.8x the reference's); CPU
default float32, CE2P 129x129, B=2 with the full ResNet-101, HRNetV2 193x193,
B=2 (the CPU sizes keep a run to a few minutes on 2 cores; the table's
heading says which were used); ``--quick``: 65x65, B=2, 1 warm-up and 3 rounds,
CE2P reduced (one Bottleneck per stage, width x0.25), HRNetV2 at the width
asked for (seconds; what the tests run; figures not for quoting). ``--json
PATH`` writes the rows and the environment record, rewritten after every
configuration (``"partial": true`` until the run ends). On a CPU where other
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

import torch.nn.functional as F  # noqa: E402

import lipfast.nn.oc as _oc  # noqa: E402
from lipfast.losses import SCHPCriterion, generate_edge, upsample_cross_entropy  # noqa: E402
from lipfast.models import CE2P, HRNetV2  # noqa: E402

# Models (--model) and their configurations (--configs). CE2P: (context, output
# stride); HRNetV2: the head (the width comes from the model's name).
MODELS = {
    "ce2p": {"asp_oc8": ("asp_oc", 8), "psp16": ("psp", 16)},
    "hrnetv2_w18": {"hrnet_seg": "seg"},
    "hrnetv2_w32": {"hrnet_seg": "seg"},
    "hrnetv2_w48": {"hrnet_seg": "seg"},
}
CONFIGS = MODELS["ce2p"]
HRNET_WIDTH = {"hrnetv2_w18": 18, "hrnetv2_w32": 32, "hrnetv2_w48": 48}
NUM_CLASSES = 20
IGNORE_INDEX = 255
# Default shapes: CUDA (size, batch) for every model; CPU by model family.
CUDA_SHAPE = (473, 8)
CPU_SHAPE = {"ce2p": (129, 2), "hrnet": (193, 2)}
QUICK_SHAPE = (65, 2)


def family(model: str) -> str:
    return "ce2p" if model == "ce2p" else "hrnet"


def describe_model(model: str, quick: bool) -> str:
    if model == "ce2p":
        return "reduced CE2P (--quick)" if quick else "CE2P, ResNet-101"
    return f"HRNetV2-W{HRNET_WIDTH[model]}, seg head"


def _model_name(value: str) -> str:
    """--model's type: a model name; a GPU data-sheet name (the option's old meaning)
    gets a pointer to --datasheet."""
    if value in _roofline.DATASHEETS and value not in MODELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is a GPU data sheet: use --datasheet {value} (--model picks the "
            f"network: {', '.join(MODELS)})")
    return value


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
def build(config: str, stack: str, quick: bool, device, seed: int = 0, model: str = "ce2p"):
    """The stack's model, initialised from the reference model's weights (seeded)."""
    torch.manual_seed(seed)
    if model == "ce2p":
        context, os_ = MODELS[model][config]
        kw = dict(layers=(1, 1, 1, 1), width_mult=0.25) if quick else {}

        def make(norm):
            return CE2P(NUM_CLASSES, context=context, output_stride=os_, norm=norm, **kw)
    else:
        head, width = MODELS[model][config], HRNET_WIDTH[model]

        def make(norm):
            return HRNetV2(NUM_CLASSES, width=width, head=head, norm=norm, align_corners=False)
    ref = make("batchnorm")
    if stack == "reference":
        return ref.to(device)
    fast = make("inplace_abn")
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

    def __init__(self, config, stack, quick, batch, size, device, amp, seed=0, model="ce2p"):
        self.stack, self.device, self.amp, self.family = stack, device, amp, family(model)
        self.model = build(config, stack, quick, device, seed, model).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9,
                                   weight_decay=5e-4)
        self.images, self.labels = make_batch(batch, size, device, seed)
        self.crit = SCHPCriterion(num_classes=NUM_CLASSES)

    def step(self, step_seed: int) -> torch.Tensor:
        if self.family == "hrnet":
            return self._step_hrnet(step_seed)
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

    def _step_hrnet(self, step_seed: int) -> torch.Tensor:
        torch.manual_seed(step_seed)
        self.opt.zero_grad(set_to_none=False)   # gradients stay allocated between steps
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(self.images)
        if self.stack == "reference":   # HRNet-Semantic-Segmentation's CrossEntropy
            up = F.interpolate(logits.float(), size=self.labels.shape[-2:], mode="bilinear",
                               align_corners=False)
            loss = F.cross_entropy(up, self.labels, ignore_index=IGNORE_INDEX)
        else:
            loss = upsample_cross_entropy(logits, self.labels, ignore_index=IGNORE_INDEX,
                                          align_corners=False)
        loss.backward()
        self.opt.step()
        return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stack(config, stack, quick, batch, size, reps, warmup, device, amp, seed=0,
              model="ce2p"):
    """Builds one stack alone and measures its memory; returns a dict (loss0, peak_MB,
    ...). Memory is the peak during the ``reps`` steps (after ``warmup`` steps) above
    what exists before them. (Times come from time_interleaved.)"""
    st = Stack(config, stack, quick, batch, size, device, amp, seed, model)
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


def time_interleaved(config, quick, batch, size, settings, device, amp, seed=0, count=False,
                     model="ce2p"):
    """Both stacks in this process, timed by benchmarks/_timing.py: steps alternating
    (order flipped every round) so that load from other processes hits both alike;
    the k-th step of either stack uses step seed 1001 + k (the same dropout masks).
    Returns ({stack: {loss0, ms (median), p20_ms, p80_ms, best_ms, rounds, times_ms,
    warmup_ms}}, the Measurement)."""
    stacks = {s: Stack(config, s, quick, batch, size, device, amp, seed, model)
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
# takes 1-2 s, an HRNetV2-W48 step at 193x193 1.5-2 s, so a round (both stacks) 2-4 s.
CPU_TIMING = _timing.Settings(warmup=1, max_warmup=4, max_warmup_seconds=20.0, min_rounds=10,
                              min_seconds=0.0, max_rounds=100, max_seconds=120.0)
CUDA_TIMING = _timing.Settings(warmup=3, max_warmup=20, min_rounds=20, min_seconds=2.0,
                               max_rounds=500, max_seconds=60.0)
QUICK_TIMING = _timing.QUICK


def timing_defaults_help() -> str:
    return _timing.defaults_help(CPU_TIMING, CUDA_TIMING, QUICK_TIMING, 'config',
                                 '--reps is --min-rounds. The step-0 loss step comes before the warm-up.')


def max_batch(config, stack, quick, size, device, amp, limit=256, model="ce2p"):
    """Largest batch (<= limit) for which one training step fits (CUDA)."""
    def fits(b):
        try:
            run_stack(config, stack, quick, b, size, 0, 0, device, amp, model=model)
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
                    args.min_rounds, args.warmup, device, args.amp, model=args.model)
    if args.max_batch:
        res["max_batch"] = max_batch(args.worker_config, args.worker_stack, args.quick,
                                     args.size, device, args.amp, model=args.model)
    print("RESULT " + json.dumps(res))
    return 0


def _spawn(args, config, stack) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model,
           "--worker-config", config,
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
        raise RuntimeError(f"benchmark worker {args.model} {config}/{stack} failed "
                           f"(exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=_model_name, choices=list(MODELS), default="ce2p",
                    help="the network: ce2p (default; configs asp_oc8, psp16) or hrnetv2_w18, "
                         "hrnetv2_w32, hrnetv2_w48 (config hrnet_seg). GPU data sheets are "
                         "--datasheet")
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset of the model's configurations (default: all): "
                         + "; ".join(f"{m}: {', '.join(c)}" for m, c in MODELS.items()
                                     if m in ("ce2p", "hrnetv2_w48")).replace(
                             "hrnetv2_w48", "hrnetv2_w*"))
    ap.add_argument("--device", default=None,
                    help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--quick", action="store_true",
                    help="65x65, quick timing (1 warm-up, 3 rounds), CE2P reduced: seconds")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default: 8 on CUDA, 2 on CPU and with --quick)")
    ap.add_argument("--size", type=int, default=None,
                    help="square input size (default: 473 on CUDA; CPU: 129 for ce2p, 193 for "
                         "HRNetV2; 65 with --quick)")
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


def _configs(ap, args) -> list[str]:
    known = MODELS[args.model]
    if args.configs is None:
        return list(known)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in known]
    if bad or not configs:
        ap.error(f"unknown config(s) {bad} for --model {args.model}; choose from "
                 f"{', '.join(known)}")
    return configs


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.worker_config:
        configs = _configs(ap, args)
        _timing.exit_if_parse_only(args, __file__)

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.amp is None:
        args.amp = gpu
    size, batch = QUICK_SHAPE if args.quick else (
        CUDA_SHAPE if gpu else CPU_SHAPE[family(args.model)])
    shape_note = None
    if not gpu and not args.quick and (args.size is None or args.batch is None):
        shape_note = (f"CPU default shape for --model {args.model}: "
                      f"B={args.batch or batch}, {args.size or size}x{args.size or size} "
                      f"(CUDA default: B={CUDA_SHAPE[1]}, {CUDA_SHAPE[0]}x{CUDA_SHAPE[0]}, bf16; "
                      f"--batch / --size override)")
    args.batch = batch if args.batch is None else args.batch
    args.size = size if args.size is None else args.size
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
    if shape_note:
        print("note: " + shape_note)
    tol = args.tol if args.tol is not None else (3e-2 if args.amp else 2e-3)
    roof = _roofline.announce(args, device, args.quick)
    rate = "bf16" if args.amp else _roofline.compute_dtype(device, "fp32", "conv")
    mem = ("cuda max_memory_allocated above model, gradients and optimizer state" if gpu else
           "peak RSS growth above model, gradients and optimizer state")
    mem += "" if args.in_process else ", one fresh process per stack"
    model_desc = describe_model(args.model, args.quick)

    rows, ok = [], True

    def write_json(partial: bool):
        if not args.json:
            return
        tmp = Path(str(args.json) + ".tmp")
        tmp.write_text(json.dumps(
            {"env": env, "args": {k: v for k, v in vars(args).items()
                                  if not k.startswith("worker")},
             "model": args.model, "model_description": model_desc, "shape_note": shape_note,
             "batch": args.batch, "size": args.size, "amp": args.amp,
             "timing": _timing.settings_summary(settings),
             "tolerance": tol, "memory": mem, "roofline": roof.summary(),
             "partial": partial, "rows": rows}, indent=1))
        os.replace(tmp, args.json)

    for config in configs:
        # Time: both stacks in this process, steps interleaved.
        pair, m = time_interleaved(config, args.quick, args.batch, args.size, settings,
                                   device, args.amp, count=True, model=args.model)
        nbytes = (7 * pair["reference"]["param_bytes"] + 4 * args.batch * 3 * args.size ** 2
                  + 8 * args.batch * args.size ** 2)
        for s in pair:
            pair[s]["floor"] = roof.row(nbytes, pair[s]["flops_step"], rate, pair[s]["ms"])
        print(f"{config}: step ms, median [p20-p80]: reference {m['reference'].fmt()}, lipfast "
              f"{m['lipfast'].fmt()}; {m.rounds} rounds after {m.warmup_rounds} warm-up",
              flush=True)
        _timing.print_warnings(m, "  ")
        ref, fast = pair["reference"], pair["lipfast"]
        rel = abs(fast["loss0"] - ref["loss0"]) / max(abs(ref["loss0"]), 1e-12)
        good = rel <= tol
        ok &= good
        row = {"model": args.model, "config": config, "reference": ref, "lipfast": fast,
               "loss0_rel_diff": rel, "loss0_ok": good, "speedup": ref["ms"] / fast["ms"],
               "best_speedup": ref["best_ms"] / fast["best_ms"],
               "step_time_ratio": fast["ms"] / ref["ms"], "memory_ratio": None,
               "timing": m.summary(times=False)}
        rows.append(row)
        write_json(partial=True)   # the times, before the memory runs
        # Memory (and the largest batch): one stack at a time, each in a fresh process
        # unless --in-process.
        for stack in ("reference", "lipfast"):
            if args.in_process:
                mem_ = run_stack(config, stack, args.quick, args.batch, args.size, 1, 1,
                                 device, args.amp, model=args.model)
                if args.max_batch:
                    mem_["max_batch"] = max_batch(config, stack, args.quick, args.size,
                                                  device, args.amp, model=args.model)
            else:
                mem_ = _spawn(args, config, stack)
            if mem_["loss0"] != pair[stack]["loss0"]:
                print(f"note: {config}/{stack}: step-0 loss {mem_['loss0']!r} in the memory run "
                      f"vs {pair[stack]['loss0']!r} in the timing run", file=sys.stderr)
            pair[stack]["peak_MB"] = mem_["peak_MB"]
            for k in ("peak_how", "max_batch"):
                if k in mem_:
                    pair[stack][k] = mem_[k]
            write_json(partial=True)
        row["memory_ratio"] = (fast["peak_MB"] / ref["peak_MB"] if ref["peak_MB"] > 0 else None)

    print(f"device {device} ({env['device_name']}), B={args.batch}, {args.size}x{args.size}, "
          f"{model_desc}, "
          f"{'bf16 autocast' if args.amp else 'float32'}, {torch.get_num_threads()} threads; "
          f"time: step ms, median [20th-80th percentile] and best of the timed rounds, "
          f"stacks interleaved in one process; peak memory: {mem}")
    fcols = roof.headers()
    cw = max([9] + [len(r["config"]) for r in rows])
    head = (f"{'config':<{cw}} {'stack':<10} {'step-0 loss':>12} {'step ms [p20-p80]':>20} "
            f"{'best ms':>9} {'rounds':>6} {'peak MB':>9}"
            + (f" {'max B':>6}" if args.max_batch else "")
            + f" {'bytes':>9} {'FLOPs':>10}" + "".join(f" {n:>{w}}" for n, w in fcols))
    print(head)
    for r in rows:
        for stack in ("reference", "lipfast"):
            s = r[stack]
            print(f"{r['config']:<{cw}} {stack:<10} {s['loss0']:>12.6f} "
                  f"{_timing.fmt_spread(s['ms'], s['p20_ms'], s['p80_ms']):>20} "
                  f"{_timing.fmt_ms(s['best_ms']):>9} {s['rounds']:>6} {s['peak_MB']:>9.1f}"
                  + (f" {s['max_batch']:>6}" if args.max_batch else "")
                  + f" {_roofline.fmt_count(s['floor']['bytes'], 'B'):>9}"
                  f" {_roofline.fmt_count(s['floor']['flops']):>10}"
                  + "".join(f" {v:>{w}}" for v, (n, w) in zip(roof.cells(s["floor"]), fcols)))
        mr = r["memory_ratio"]
        diff = "diff " + format(r["loss0_rel_diff"], ".1e")
        print(f"{r['config']:<{cw}} {'ratio':<10} {diff:>12} "
              f"{r['speedup']:>19.2f}x {r['best_speedup']:>8.2f}x {'':>6} "
              f"{('-' if mr is None else format(mr, '.2f') + 'x'):>9}"
              + ("" if r["loss0_ok"] else f"   STEP-0 LOSS MISMATCH (tolerance {tol:g})"))
    print("ratio row: speed-up (reference / lipfast step time, median and best) and peak "
          "memory lipfast / reference")
    warned = [r["config"] for r in rows if r["timing"]["warnings"]]
    if warned:
        print(f"timing warnings (see above) in: {', '.join(warned)}")
    for line in roof.describe():
        print(line)
    if shape_note:
        print("note: " + shape_note)
    if args.json:
        write_json(partial=False)
        print(f"wrote {args.json}")
    if not ok:
        print("FAIL: the step-0 losses of the two stacks differ by more than the tolerance",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
