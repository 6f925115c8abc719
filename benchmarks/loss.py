#!/usr/bin/env python
"""Loss benchmark: lipfast's loss ops and the full SCHP criterion against the
eager formulations they replace (formulas: README, "Parsing losses").

Rows (each: lipfast vs reference, forward + backward):

  generate_edge  lipfast.losses.generate_edge (CPU: the C++ kernel; CUDA:
                 the Triton kernel) vs SCHP's generate_edge_tensor (float copy
                 of the labels, four masked writes, 3x3 all-ones float conv).
                 No backward (integer output).
  upsample_ce    lipfast.losses.upsample_cross_entropy vs F.interpolate +
                 F.cross_entropy, on the C-class parsing logits.
  lovasz         lipfast.losses.lovasz_softmax (CPU: the C++ kernel; CUDA:
                 torch.sort + the Triton Jaccard kernel) on the upsampled logits vs the
                 per-class Python loop of Berman et al. (softmax, one sort per
                 class), same upsampled input (upsample not timed in this row).
  edge_loss      lipfast.losses.edge_loss vs F.interpolate + F.cross_entropy
                 with weights built on the host (SCHP's torch.tensor([...])).
  schp           edges from the labels + the whole SCHP criterion (cycle 0)
                 on [[parsing, fusion], [edge]]: lipfast.losses.SCHPCriterion
                 vs SCHP's CriterionAll as written upstream (one upsample per
                 term, consistency term computed: argmax, edges of the
                 prediction, smooth-L1 over the positive union).

Shapes: --full (GPU): LIP training, B=8, C=20, 119x119 logits, 473x473 labels.
Default (CPU, about a minute on 2 cores): B=2, C=20, 30x30 logits, 119x119 labels.
--quick: B=1, C=20, 15x15 logits, 60x60 labels, 1 warm-up and 3 rounds per row,
the Lovász memory rows at B=1, 60x60 (a smoke run, seconds; not for quoting).

Measured: forward + backward time, median [20th-80th percentile] of the timed
rounds, and the number of rounds (benchmarks/_timing.py, shared by every
benchmark: warm-up until each implementation's last two steps agree within 10%,
then rounds in which lipfast and the reference step once each, in alternating
order, until the row has its minimum rounds and minimum time; CUDA:
synchronised; a wide spread or a busy machine is warned about); memory: "saved
MB" = bytes of the unique storages saved for backward (torch.autograd.graph
.saved_tensors_hooks; on every device), and on CUDA also "peak MB" =
torch.cuda.max_memory_allocated during the step above the inputs. A
correctness check (values within 1e-4 relative, float32) runs first.
``--json PATH`` writes the rows and the environment. On a CPU where other
processes keep half the cores or more busy at the start, the run uses one
thread unless --threads says otherwise.

Floor (benchmarks/_roofline.py, shared by every benchmark): per row, the bytes
that must move and the FLOPs counted, the floor max(bytes / bandwidth, FLOPs /
rate) with the ceilings measured in the same run (CPU: a large memory copy and a
float32 matmul; CUDA: benchmarks/gpu_ceilings.py) and the fraction achieved
(floor / median; the lipfast and reference columns). Logits are float32 (4
bytes), labels int64 (8 bytes); B x C x h x w logits, H x W labels:

  generate_edge  labels read, edges (int64) written: 16*B*H*W bytes; 0 FLOPs
  upsample_ce    logits read, labels read, the logits' gradient written:
                 2*4*B*C*h*w + 8*B*H*W bytes; FLOPs 16*B*C*H*W (8 per upsampled
                 logit for the bilinear interpolation, forward and backward;
                 exp/log not counted)
  lovasz         the upsampled logits read and their gradient written, labels
                 read: 2*4*B*C*H*W + 8*B*H*W bytes; 0 FLOPs counted (the sort's
                 comparisons are not FLOPs)
  edge_loss      as upsample_ce with the 2 edge channels: 2*4*B*2*h*w + 8*B*H*W
                 bytes, 16*B*2*H*W FLOPs
  schp           parsing, fusion and edge logits read and their gradients
                 written, labels read: 2*4*B*(2C+2)*h*w + 8*B*H*W bytes,
                 16*B*(2C+2)*H*W FLOPs
``--datasheet h200`` adds the floor by the H200's data sheet.

Lovász memory (CPU; every device unless --no-rss): peak resident memory of one
``lovasz_softmax`` forward + backward on B x C x H x W logits already at label
size, above the process's memory with the inputs allocated (peak RSS, VmHWM
after a reset, in a fresh child process per implementation; it includes the
B x C x H x W gradient itself). Implementations: lipfast's op (C++ kernel on
CPU), lipfast's vectorised PyTorch path (the CUDA float64 / no-Triton path,
run on CPU), the per-class eager loop. Default B=2, C=20, 119x119;
``--full``: B=8, C=20, 473x473 (LIP training).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _roofline  # noqa: E402
import _timing  # noqa: E402
from _common import run_environment, saved_bytes  # noqa: E402

import lipfast  # noqa: E402,F401
from lipfast.losses import SCHPCriterion, edge_loss, generate_edge  # noqa: E402

IGN = 255


# ----------------------------------------------------------------- references
def schp_generate_edge_tensor(label, edge_width=3):
    """SCHP's generate_edge_tensor (float labels + conv), batch axis kept."""
    label = label.float()
    n, h, w = label.shape
    edge = torch.zeros(label.shape, dtype=torch.float, device=label.device)
    e = edge[:, 1:h, :]
    e[(label[:, 1:h, :] != label[:, :h - 1, :]) & (label[:, 1:h, :] != 255)
      & (label[:, :h - 1, :] != 255)] = 1
    e = edge[:, :, :w - 1]
    e[(label[:, :, :w - 1] != label[:, :, 1:w]) & (label[:, :, :w - 1] != 255)
      & (label[:, :, 1:w] != 255)] = 1
    e = edge[:, :h - 1, :w - 1]
    e[(label[:, :h - 1, :w - 1] != label[:, 1:h, 1:w]) & (label[:, :h - 1, :w - 1] != 255)
      & (label[:, 1:h, 1:w] != 255)] = 1
    e = edge[:, :h - 1, 1:w]
    e[(label[:, :h - 1, 1:w] != label[:, 1:h, :w - 1]) & (label[:, :h - 1, 1:w] != 255)
      & (label[:, 1:h, :w - 1] != 255)] = 1
    kernel = torch.ones((1, 1, edge_width, edge_width), dtype=torch.float, device=label.device)
    with torch.no_grad():
        edge = F.conv2d(edge.unsqueeze(1), kernel, stride=1, padding=1)
    edge[edge != 0] = 1
    return edge.squeeze(1)


def lovasz_loop(probs, labels):
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    y = labels.reshape(-1)
    keep = y != IGN
    p, y = p[keep], y[keep]
    losses = []
    for k in range(c):
        fg = (y == k).float()
        if fg.sum() == 0:
            continue
        err = (fg - p[:, k]).abs()
        err_sorted, perm = torch.sort(err, 0, descending=True)
        g = fg[perm]
        gts = g.sum()
        inter = gts - g.cumsum(0)
        union = gts + (1 - g).cumsum(0)
        jac = 1.0 - inter / union
        jac[1:] = jac[1:] - jac[:-1]
        losses.append(torch.dot(err_sorted, jac))
    return torch.stack(losses).mean() if losses else probs.sum() * 0


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def edge_loss_eager(e, edges):
    pos = torch.sum(edges == 1, dtype=torch.float)
    neg = torch.sum(edges == 0, dtype=torch.float)
    w = torch.tensor([(pos / (pos + neg)).item(), (neg / (pos + neg)).item()], device=e.device)
    return F.cross_entropy(up(e, edges.shape[-2:]), edges, w, ignore_index=IGN)


def schp_eager(preds, labels, edges):
    """SCHP CriterionAll (cycle 0) as upstream: one upsample per term."""
    size = labels.shape[-2:]
    loss = 0
    for p in preds[0]:
        sp = up(p, size)
        loss = loss + 0.5 * lovasz_loop(F.softmax(sp, 1), labels)
        loss = loss + 0.5 * F.cross_entropy(sp, labels, ignore_index=IGN)
    for e in preds[1]:
        loss = loss + edge_loss_eager(e, edges)
    for p in preds[0]:  # consistency term (always 0, computed upstream)
        sp, se = up(p, size), up(preds[1][0], size)
        pre = torch.argmax(sp, 1)
        pre[labels == IGN] = IGN
        gen = schp_generate_edge_tensor(pre)
        epre = torch.argmax(se, 1).float()
        vg, ve = gen[labels != IGN], epre[labels != IGN]
        pu = (vg == 1) & (ve == 1)
        if pu.any():
            loss = loss + 0.1 * F.smooth_l1_loss(vg[pu], ve[pu])
    return loss


# ----------------------------------------------------------------- harness
def loss_work(name: str, b: int, c: int, h: int, H: int) -> tuple[float, float]:
    """(bytes, FLOPs) of a loss row (see the Floor section of the docstring)."""
    labels = 8 * b * H * H
    if name == "generate_edge":
        return float(2 * labels), 0.0
    if name == "upsample_ce":
        return float(2 * 4 * b * c * h * h + labels), float(16 * b * c * H * H)
    if name == "lovasz":
        return float(2 * 4 * b * c * H * H + labels), 0.0
    if name == "edge_loss":
        return float(2 * 4 * b * 2 * h * h + labels), float(16 * b * 2 * H * H)
    if name == "schp":
        ch = 2 * c + 2
        return float(2 * 4 * b * ch * h * h + labels), float(16 * b * ch * H * H)
    raise ValueError(name)


def step(fn, leaves):
    for t in leaves:
        t.grad = None
    out = fn()
    if leaves and out.requires_grad:
        out.backward()
    return out


def measure(impls, leaves, settings, device):
    """Memory (saved bytes; CUDA: peak) of one step per implementation, then the
    timed rounds, implementations interleaved (benchmarks/_timing.py). Returns
    ({name: {saved_MB, value, [peak_MB], ms (median), p20_ms, p80_ms, min_ms, rounds,
    times_ms, warmup_ms}}, the Measurement)."""
    res = {name: {} for name in impls}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, fn in impls.items():
        out, sb = saved_bytes(fn)
        res[name]["saved_MB"] = sb / 2**20
        res[name]["value"] = float(out.detach().float().sum())
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fn, leaves)
            sync()
            res[name]["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    m = _timing.measure({name: (lambda fn=fn: step(fn, leaves)) for name, fn in impls.items()},
                        device, settings)
    for name in impls:
        t = m[name]
        res[name].update(ms=t.median, p20_ms=t.p20, p80_ms=t.p80, min_ms=t.min,
                         rounds=t.rounds, times_ms=list(t.times_ms),
                         warmup_ms=list(t.warmup_ms))
    return res, m


def labels_like(b, H, W, c, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, c, (b, 1, 12, 12), generator=g).float()
    lab = F.interpolate(coarse, size=(H, W), mode="nearest").squeeze(1).long()
    ign = F.interpolate((torch.rand(b, 1, 8, 8, generator=g) < 0.1).float(), size=(H, W),
                        mode="nearest").squeeze(1).bool()
    lab[ign] = IGN
    return lab.to(device)


# ----------------------------------------------------------------- Lovász peak memory
RSS_IMPLS = ("lipfast", "lipfast-pytorch-path", "eager-loop")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM; Linux >= 4.0). Needed because
    getrusage's max RSS survives fork + exec: a child of a large parent starts
    with the parent's mark."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _rss_child(spec: str) -> None:
    """Child process: print the peak RSS (MiB) of one Lovász forward + backward
    above the RSS with the inputs allocated."""
    impl, b, c, hw = spec.split(",")
    b, c, hw = int(b), int(c), int(hw)
    torch.manual_seed(0)
    x = torch.randn(b, c, hw, hw).requires_grad_()
    labels = labels_like(b, hw, hw, c, "cpu").to(torch.uint8)
    from lipfast.losses.lovasz import lovasz_softmax
    from lipfast.ops.lovasz import _lovasz_forward

    small_x = torch.randn(1, c, 8, 8, requires_grad=True)  # load code paths first
    small_y = torch.randint(0, c, (1, 8, 8), dtype=torch.uint8)
    if impl == "lipfast":
        def fn(z, y):
            return lovasz_softmax(z, y)
    elif impl == "lipfast-pytorch-path":
        def fn(z, y):
            loss, dz = _lovasz_forward(z.detach(), y, list(range(c)), True, False, IGN, True)
            z.grad = dz
            return None
    else:
        def fn(z, y):
            return lovasz_loop(F.softmax(z, 1), y.long())
    out = fn(small_x, small_y)
    if out is not None:
        out.backward()
    base = _rss_bytes()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    out = fn(x, labels)
    if out is not None:
        out.backward()
    ms = (time.perf_counter() - t0) * 1e3
    peak = _peak_rss_bytes(reset)
    print(json.dumps({"peak_extra_MB": max(0, peak - base) / 2**20, "ms": ms,
                      "inputs_MB": (x.numel() * 4 + labels.numel()) / 2**20}))


def lovasz_memory(b: int, c: int, hw: int) -> dict:
    res = {}
    for impl in RSS_IMPLS:
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        r = subprocess.run([sys.executable, __file__, "--_rss-child", f"{impl},{b},{c},{hw}"],
                           capture_output=True, text=True, check=True, env=env)
        res[impl] = json.loads(r.stdout.strip().splitlines()[-1])
    return res


# Timing defaults (benchmarks/_timing.py): the CPU rows take 1-100 ms a step.
CPU_TIMING = _timing.Settings(warmup=2, max_warmup=10, max_warmup_seconds=10.0, min_rounds=20,
                              min_seconds=2.0, max_rounds=500, max_seconds=30.0)
CUDA_TIMING = _timing.Settings(warmup=3, max_warmup=20, min_rounds=30, min_seconds=1.0,
                               max_rounds=1000, max_seconds=30.0)
QUICK_TIMING = _timing.QUICK


def timing_defaults_help() -> str:
    return _timing.defaults_help(CPU_TIMING, CUDA_TIMING, QUICK_TIMING, 'row',
                                 '--reps is --min-rounds.')


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="LIP training shapes (for GPUs; the Lovász memory rows at B=8, "
                           "473x473)")
    size.add_argument("--quick", action="store_true",
                      help="small shapes (B=1, 15x15 logits, 60x60 labels; Lovász memory "
                           "rows at 60x60) and quick timing (1 warm-up, 3 rounds): a smoke "
                           "run, figures not for quoting")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if "
                                                   "available)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="write the rows and the environment")
    ap.add_argument("--no-rss", action="store_true", help="skip the Lovász peak-memory rows")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (default: torch's choice, but 1 on CPU "
                        "when other processes keep half the cores or more busy at the start: "
                        "multi-threaded kernels then stall)")
    ap.add_argument("--_rss-child", default=None, help=argparse.SUPPRESS)
    _timing.add_arguments(ap, timing_defaults_help())
    _roofline.add_arguments(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args._rss_child:
        _rss_child(args._rss_child)
        return 0
    _timing.exit_if_parse_only(args, __file__)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.full:
        b, c, h, H = 8, 20, 119, 473
    elif args.quick:
        b, c, h, H = 1, 20, 15, 60
    else:
        b, c, h, H = 2, 20, 30, 119
    settings = _timing.settings_from_args(
        args, QUICK_TIMING if args.quick else (CUDA_TIMING if device.type == "cuda"
                                               else CPU_TIMING))
    env, machine, threads_note = run_environment(device, __file__, argv, args.threads)
    print(f"lipfast loss benchmark on {device} ({env['device_name']}), B={b} C={c} logits "
          f"{h}x{h} labels {H}x{H}")
    _timing.print_run_header(env, settings)
    _timing.print_machine_notes(machine, threads_note)
    roof = _roofline.announce(args, device, args.quick)
    g = torch.Generator().manual_seed(0)
    labels = labels_like(b, H, H, c, device)
    edges = generate_edge(labels)
    par, fus = (torch.randn(b, c, h, h, generator=g).mul(2).to(device).requires_grad_()
                for _ in range(2))
    edg = torch.randn(b, 2, h, h, generator=g).to(device).requires_grad_()
    size = (H, H)

    from lipfast.losses import lovasz_softmax, upsample_cross_entropy

    rows = []
    ok = True

    def row(name, impls, leaves):
        nonlocal ok
        vals = {}
        for k, fn in impls.items():
            with torch.no_grad():
                vals[k] = fn().double()
        ref = vals["reference"]
        err = float((vals["lipfast"] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        good = err < 1e-4
        ok &= good
        res, m = measure(impls, leaves, settings, device)
        nbytes, flops = loss_work(name, b, c, h, H)
        floor = roof.row(nbytes, flops, "fp32", res["lipfast"]["ms"])
        if floor.get("floor_ms") is not None:
            for k in res:
                res[k]["floor_fraction"] = floor["floor_ms"] / res[k]["ms"]
        print(f"  {name:<14} lipfast {m['lipfast'].fmt()} ms, reference {m['reference'].fmt()} "
              f"ms; {m.rounds} rounds after {m.warmup_rounds} warm-up; rel err {err:.1e}"
              + ("" if good else "  MISMATCH"), flush=True)
        _timing.print_warnings(m)
        rows.append({"row": name, "rel_err": err, "ok": good, **{k: v for k, v in res.items()},
                     "floor": floor, "timing": m.summary(times=False)})

    with torch.no_grad():
        upar = up(par, size).detach().requires_grad_()
    row("generate_edge", {"lipfast": lambda: generate_edge(labels),
                          "reference": lambda: schp_generate_edge_tensor(labels).long()}, [])
    row("upsample_ce", {"lipfast": lambda: upsample_cross_entropy(par, labels),
                        "reference": lambda: F.cross_entropy(up(par, size), labels,
                                                             ignore_index=IGN)}, [par])
    row("lovasz", {"lipfast": lambda: lovasz_softmax(upar, labels),
                   "reference": lambda: lovasz_loop(F.softmax(upar, 1), labels)}, [upar])
    row("edge_loss", {"lipfast": lambda: edge_loss(edg, edges),
                      "reference": lambda: edge_loss_eager(edg, edges)}, [edg])
    crit = SCHPCriterion(num_classes=c)
    row("schp", {"lipfast": lambda: crit([[par, fus], [edg]], [labels, generate_edge(labels)]),
                 "reference": lambda: schp_eager(
                     [[par, fus], [edg]], labels, schp_generate_edge_tensor(labels).long())},
        [par, fus, edg])

    mem = "saved MB" + (" / peak MB" if device.type == "cuda" else "")
    print(f"\ndevice {device} ({env['device_name']}), B={b} C={c} logits {h}x{h} labels "
          f"{H}x{H}; times: median [20th-80th percentile] of the timed rounds; memory: {mem}")
    mcols = [(f"{mo} floor", 10) for mo in roof.models]
    print(f"{'row':<14} {'lipfast ms [p20-p80]':>22} {'ref ms [p20-p80]':>22} {'speedup':>8} "
          f"{'rounds':>6} {'lipfast mem':>12} {'ref mem':>12} {'rel err':>9} "
          f"{'bytes':>9} {'FLOPs':>9} {'floor ms':>9} {'lf of fl':>8} {'ref of fl':>9}"
          + "".join(f" {n:>{w}}" for n, w in mcols))
    for r in rows:
        L, R = r["lipfast"], r["reference"]

        def m(x):
            return f"{x['saved_MB']:.1f}" + (f"/{x['peak_MB']:.0f}" if "peak_MB" in x else "")

        def t(x):
            return _timing.fmt_spread(x["ms"], x["p20_ms"], x["p80_ms"])
        fl = r["floor"]
        cells = roof.cells(fl)
        print(f"{r['row']:<14} {t(L):>22} {t(R):>22} {R['ms'] / L['ms']:>7.2f}x "
              f"{L['rounds']:>6} {m(L):>12} {m(R):>12} {r['rel_err']:>9.1e} "
              f"{_roofline.fmt_count(fl['bytes'], 'B'):>9} {_roofline.fmt_count(fl['flops']):>9} "
              f"{cells[0]:>9} {cells[1]:>8} "
              f"{_roofline.fmt_fraction(R.get('floor_fraction')):>9}"
              + "".join(f" {v:>{w}}" for v, (n, w) in zip(cells[2:], mcols))
              + f"{'' if r['ok'] else '  MISMATCH'}")
    for line in roof.describe():
        print(line)
    warned = [r["row"] for r in rows if r["timing"]["warnings"]]
    if warned:
        print(f"timing warnings (see above) in rows {', '.join(warned)}")
    lov_mem = None
    if not args.no_rss:
        lb, lhw = (8, 473) if args.full else ((1, 60) if args.quick else (2, 119))
        lov_mem = {"shape": dict(b=lb, c=c, H=lhw, W=lhw), **lovasz_memory(lb, c, lhw)}
        print(f"\nLovász forward+backward on CPU, B={lb} C={c} {lhw}x{lhw} logits (inputs "
              f"{lov_mem['lipfast']['inputs_MB']:.0f} MB, {torch.get_num_threads()} threads): "
              "peak RSS above the inputs, one run")
        for impl in RSS_IMPLS:
            r = lov_mem[impl]
            print(f"  {impl:<22} {r['peak_extra_MB']:>8.0f} MB {r['ms']:>9.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"env": env, "shape": dict(b=b, c=c, h=h, H=H),
             "timing": _timing.settings_summary(settings),
             "roofline": roof.summary(),
             "lovasz_cpu_peak_rss": lov_mem,
             "memory": "saved-tensor bytes (saved_tensors_hooks)" + (
                 "; peak_MB = cuda max_memory_allocated above inputs"
                 if device.type == "cuda" else ""),
             "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
