#!/usr/bin/env python
"""OCNet object-context attention benchmark: lipfast's main benchmark command.

Every row compares three implementations of the same computation:

  lipfast    the fused op ``lipfast.ops.oc_attention(qk, v, scale, regions)``
             (attention-core rows) or the lipfast module (module rows)
  reference  OCNet's eager formulation, written here from OCNet's code: q = k
             from the same B x N x Ck tensor (view + permute, as OCNet), the
             B x N x N map ``sim = softmax((q @ k^T) * dk**-0.5)`` materialised,
             ``context = sim @ v``, permute + contiguous back to B x Cv x H x W;
             pyramid regions by a Python loop (slices, per-region matmuls,
             torch.cat back, as OCNet's PyramidSelfAttentionBlock2D). Module rows:
             a copy of the lipfast module (identical weights and norm layers)
             whose forward is OCNet's, written here, with this eager attention
             in place of the fused op (f_key runs once, q = k, as in lipfast;
             OCNet runs it twice, which costs a second conv + norm not counted)
  sdpa       torch.nn.functional.scaled_dot_product_attention with q = k
             (B x 1 x N x d, one head; the transposes to and from that layout are
             timed). CUDA: the flash, efficient, cudnn and math backends are each
             tried alone (torch.nn.attention.sdpa_kernel) and the fastest
             forward+backward is used and named; CPU: the default dispatch
             ("cpu-default"). Pyramid regions: a block-diagonal boolean
             attn_mask (a dense N x N mask). Module rows: the reference module
             with SDPA as its attention.

Core rows take random qk, v leaves (requires_grad); pyramid rows sum one call per
scale. Module rows build the lipfast module with OCNet's constructor arguments;
its zero-initialised W convs get a random init (else the attention would not
reach the output) and the key norms weight 3 (a less flat softmax, see
build_lipfast_module). bf16: core inputs in bf16, module rows under autocast.

Before timing, a correctness check runs one forward+backward of every
implementation (dropout off) and of the reference in float64, and compares the
output and every gradient (inputs and parameters) with that float64 result: a
tensor passes when its max error is within a tolerance (relative to the float64
result's max |value|: 1e-4 CPU fp32, 1e-3 CUDA fp32, 3e-2 bf16; gradients 10x in
fp32, 2x in bf16) or within 4x the error of the eager reference run in the same
dtype (for quantities that are ill-conditioned or exactly zero, such as the
gradient of a conv bias in front of a batch norm). It prints the max
lipfast - reference difference and the errors. A lipfast mismatch aborts the row
(the exit status is then 1); an sdpa mismatch drops sdpa from the row.

Measured per row and implementation:

  fwd ms      forward time (autograd recording, as in training), median
              [20th-80th percentile] of the timed rounds
  f+b ms      forward + backward time, likewise (CUDA: synchronised; CPU: wall)
  rounds      timed rounds. Timing (benchmarks/_timing.py, shared by every
              benchmark): warm-up rounds until each step's last two times agree
              within 10%, then rounds in which every implementation's forward and
              forward + backward steps run once each, in an order rotated every
              round, until the row has its minimum rounds and minimum time; a
              wide spread or a busy machine (other processes' CPU time, from
              /proc/stat) is warned about under the row and in --json
  speedup     reference time / this time (> 1: faster than the reference)
  saved MB    bytes of the unique storages saved for backward
              (torch.autograd.graph.saved_tensors_hooks), the row's inputs,
              parameters and buffers excluded: the activation memory a training
              step keeps alive between forward and backward
  peak MB     peak memory of one forward+backward step above what was allocated
              before it. CUDA: torch.cuda.max_memory_allocated. CPU: the
              running sum of every allocation and free made through PyTorch's
              CPU allocator during the step, recorded by torch.profiler
              (profile_memory=True), maximum taken; 'largest MB' is the
              single largest allocation in that trace (the reference's is the
              B x N x N similarity map; lipfast's CPU path allocates score tiles)
  mem x       reference MB / this MB (> 1: less memory than the reference)
  TF/s        (CUDA, attention-core rows) achieved attention TFLOP/s:
              forward 2*n^2*(dk+dv) per image and region (summed over regions
              and pyramid scales), forward+backward = 3.5 x forward; '% bf16'
              relates it to this device's bf16 matmul rate measured here
              (median of 8192^3 bf16 matmuls)

Floor (benchmarks/_roofline.py, shared by every benchmark): per row and
implementation, the bytes that must move and the FLOPs the math needs, the floor
max(bytes / bandwidth, FLOPs / rate) with the ceilings measured in the same run
(CPU: a large memory copy and a float32 matmul through benchmarks/_timing.py;
CUDA: benchmarks/gpu_ceilings.py, or its --json through --ceilings), and the
fraction achieved (floor / median). Core rows, N = H*W positions, per image:

  FLOPs  forward 2*B*n^2*(dk+dv) summed over every region (n its positions) of
         every pyramid scale; backward 2.5 x forward (the flash-attention
         convention: the score matrix is recomputed), forward+backward 3.5 x
  bytes  at the row's dtype (e bytes per element), inputs read once and outputs
         written once: forward e*B*N*(dk + 2*dv) (read qk and v, write the
         output); backward e*B*N*(2*dk + 3*dv) (read qk, v and the output's
         gradient, write the gradients of qk and v); one pyramid row reads its
         inputs once for all its scales

FLOPs executed (recomputation counted) are printed beside the FLOPs needed:
lipfast on CUDA from lipfast.kernels.oc_attention.executed_flops (n/a when the
kernels do not provide it); lipfast on CPU runs ATen's flash kernel, which
recomputes nothing beyond the flash backward counted in the 2.5 x, so executed =
needed there; reference and sdpa as counted by torch.utils.flop_counter over one
forward+backward step. Module rows: FLOPs counted by torch.utils.flop_counter over
the eager reference module (convolutions and matmuls; matmul backward counted as
2 x its forward, element-wise work 0), bytes = the module's input, output and
parameters (forward) plus the output's gradient, the input's gradient and the
parameters' gradients (backward): a lower bound, activations in between not
counted. ``--datasheet h200`` adds the floor by the H200's data sheet (4.8 TB/s; bf16
989, fp32 67 TFLOP/s).

Run: ``python benchmarks/attn.py`` (CPU: small shapes, a few minutes on 2
cores; CUDA: the full shapes, fp32 and bf16); ``--quick``: the small shapes,
3 rounds, for a smoke run (figures not for quoting). ``--json PATH`` writes every
number and the environment, ``--plot PATH`` a bar chart of the speedups
(needs matplotlib), ``--also-abn`` runs benchmarks/abn.py (In-Place ABN) too.
On a CPU where other processes keep half the cores or more busy at the start
(/proc/stat over 0.5 s) the run uses one thread unless --threads says otherwise:
multi-threaded kernels stall at every barrier when a thread is descheduled.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import lipfast
from lipfast.ops import oc_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _roofline  # noqa: E402
import _timing  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("lipfast", "reference", "sdpa")
REFERENCE = "reference"

# --------------------------------------------------------------------------- rows
#
# Attention-core rows: (B, H, W, dk, dv, pyramid scales); scale 1 = the whole map.
# Module rows: (module kind, constructor kwargs, input B x C x H x W).
# "full" are the sizes (CUDA default, or --full); "cpu" the reduced CPU
# shapes (None: full size only).


@dataclass(frozen=True)
class RowSpec:
    name: str
    kind: str  # "core" or "module"
    full: dict
    cpu: dict | None
    about: str


def _core(b, h, w, dk, dv, scales=(1,)):
    return dict(batch=b, h=h, w=w, dk=dk, dv=dv, scales=tuple(scales))


def _mod(module, kwargs, b, c, h, w):
    return dict(module=module, kwargs=kwargs, batch=b, channels=c, h=h, w=w)


ROWS = (
    RowSpec("lip-os16", "core", _core(16, 30, 30, 256, 256), _core(2, 30, 30, 64, 64),
            "LIP, output stride 16 (473 input), OC head k = v = 256"),
    RowSpec("lip-os8", "core", _core(8, 60, 60, 256, 256), _core(2, 60, 60, 64, 64),
            "LIP, output stride 8 (473 input)"),
    RowSpec("lip576-os8", "core", _core(8, 72, 72, 256, 256), None,
            "LIP at 576 x 576, output stride 8"),
    RowSpec("cityscapes", "core", _core(2, 97, 97, 256, 256), None,
            "Cityscapes OCNet, 769 crop, output stride 8"),
    RowSpec("pyramid-oc", "core", _core(8, 60, 60, 256, 512, (1, 2, 3, 6)),
            _core(1, 60, 60, 64, 128, (1, 2, 3, 6)),
            "Pyramid-OC attention: one call per scale 1, 2, 3, 6 (k = in/2, v = in)"),
    RowSpec("asp-oc-context", "core", _core(8, 30, 30, 128, 256), _core(2, 30, 30, 32, 64),
            "ASP-OC context branch: sizes [2] on 60 x 60, i.e. the pooled 30 x 30 map"),
    RowSpec("dk256-dv512", "core", _core(8, 60, 60, 256, 512), None,
            "dk != dv at 60 x 60 (SDPA's flash backend needs dk == dv)"),
    RowSpec("OCModule-30", "module",
            _mod("OCModule", dict(in_channels=512, out_channels=512, key_channels=256,
                                  value_channels=256, dropout=0.05, sizes=[1]), 16, 512, 30, 30),
            _mod("OCModule", dict(in_channels=128, out_channels=128, key_channels=64,
                                  value_channels=64, dropout=0.05, sizes=[1]), 2, 128, 30, 30),
            "BaseOC_Module(in, in, in/2, in/2, 0.05, [1]) at 30 x 30"),
    RowSpec("OCModule-60", "module",
            _mod("OCModule", dict(in_channels=512, out_channels=512, key_channels=256,
                                  value_channels=256, dropout=0.05, sizes=[1]), 8, 512, 60, 60),
            _mod("OCModule", dict(in_channels=128, out_channels=128, key_channels=64,
                                  value_channels=64, dropout=0.05, sizes=[1]), 2, 128, 60, 60),
            "BaseOC_Module(in, in, in/2, in/2, 0.05, [1]) at 60 x 60"),
    RowSpec("PyramidOCModule-60", "module",
            _mod("PyramidOCModule", dict(in_channels=512, out_channels=512, dropout=0.05,
                                         sizes=[1, 2, 3, 6]), 8, 512, 60, 60),
            _mod("PyramidOCModule", dict(in_channels=128, out_channels=128, dropout=0.05,
                                         sizes=[1, 2, 3, 6]), 1, 128, 60, 60),
            "Pyramid_OC_Module(in, in, 0.05, [1, 2, 3, 6]) at 60 x 60"),
    RowSpec("ASPOCModule-context", "module",
            _mod("ASPOCModule", dict(features=512, out_features=256), 8, 512, 60, 60),
            _mod("ASPOCModule", dict(features=128, out_features=64), 2, 128, 60, 60),
            "ASP_OC_Module(features, out).context (3x3 conv, ABN, BaseOC_Context_Module "
            "sizes [2]) at 60 x 60"),
)


def describe(spec: RowSpec, cfg: dict) -> str:
    if spec.kind == "core":
        sc = "" if cfg["scales"] == (1,) else f" scales {list(cfg['scales'])}"
        return (f"B={cfg['batch']} {cfg['h']}x{cfg['w']} dk={cfg['dk']} dv={cfg['dv']}{sc}")
    kw = ", ".join(f"{k}={v}" for k, v in cfg["kwargs"].items())
    return (f"{cfg['module']}({kw}) on B={cfg['batch']} x {cfg['channels']} x "
            f"{cfg['h']}x{cfg['w']}")


def shapes_help() -> str:
    lines = ["Rows (name: full shape | CPU shape):"]
    for r in ROWS:
        cpu = describe(r, r.cpu) if r.cpu else "full size only (skipped on CPU without --full)"
        lines.append(f"  {r.name}: {describe(r, r.full)}\n      CPU: {cpu}\n      ({r.about})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- attention


def eager_attention(qk: torch.Tensor, v: torch.Tensor, scale: float, regions: int = 1):
    """OCNet's attention, eagerly (the reference): the B x N x N map materialised."""
    b, ck, h, w = qk.shape
    cv = v.shape[1]
    if regions <= 1:
        # SelfAttentionBlock2D: query = f_query(x).view(b, ck, -1).permute(0, 2, 1),
        # key = f_key(x).view(b, ck, -1), value likewise permuted (query is key here).
        value = v.reshape(b, cv, -1).permute(0, 2, 1)
        query = qk.reshape(b, ck, -1).permute(0, 2, 1)
        key = qk.reshape(b, ck, -1)
        sim = torch.matmul(query, key) * scale
        sim = F.softmax(sim, dim=-1)
        context = torch.matmul(sim, value)
        return context.permute(0, 2, 1).contiguous().view(b, cv, h, w)
    # PyramidSelfAttentionBlock2D: a Python loop over the s x s regions.
    local = []
    for r0, r1, c0, c1 in lipfast.ops.pyramid_regions(h, w, regions):
        value_l = v[:, :, r0:r1, c0:c1]
        qk_l = qk[:, :, r0:r1, c0:c1]
        hl, wl = value_l.shape[2], value_l.shape[3]
        value_l = value_l.contiguous().view(b, cv, -1).permute(0, 2, 1)
        query_l = qk_l.contiguous().view(b, ck, -1).permute(0, 2, 1)
        key_l = qk_l.contiguous().view(b, ck, -1)
        sim = torch.matmul(query_l, key_l) * scale
        sim = F.softmax(sim, dim=-1)
        ctx = torch.matmul(sim, value_l)
        local.append(ctx.permute(0, 2, 1).contiguous().view(b, cv, hl, wl))
    rows = [torch.cat(local[i * regions:(i + 1) * regions], 3) for i in range(regions)]
    return torch.cat(rows, 2)


_MASKS: dict = {}


def region_mask(h: int, w: int, regions: int, device) -> torch.Tensor:
    """Dense N x N boolean mask, True where query and key share a pyramid region
    (cached: building it is not timed)."""
    key = (h, w, regions, str(device))
    if key not in _MASKS:
        rid = torch.empty(h, w, dtype=torch.int64)
        for i, (r0, r1, c0, c1) in enumerate(lipfast.ops.pyramid_regions(h, w, regions)):
            rid[r0:r1, c0:c1] = i
        rid = rid.flatten()
        _MASKS[key] = (rid[:, None] == rid[None, :]).to(device)
    return _MASKS[key]


def sdpa_attention(qk: torch.Tensor, v: torch.Tensor, scale: float, regions: int = 1):
    """F.scaled_dot_product_attention with q = k, one head (B x 1 x N x d)."""
    b, ck, h, w = qk.shape
    cv = v.shape[1]
    q = qk.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
    val = v.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
    mask = region_mask(h, w, regions, qk.device) if regions > 1 else None
    out = F.scaled_dot_product_attention(q, q, val, attn_mask=mask, scale=scale)
    return out.squeeze(1).transpose(1, 2).reshape(b, cv, h, w)


def lipfast_attention(qk, v, scale, regions=1):
    return oc_attention(qk, v, scale, regions=regions)


ATTENTION = {"lipfast": lipfast_attention, "reference": eager_attention, "sdpa": sdpa_attention}


def core_flops(cfg: dict) -> float:
    """Forward attention FLOPs of a core row: 2 * n^2 * (dk + dv) per image and region."""
    total = 0
    for s in cfg["scales"]:
        for r0, r1, c0, c1 in lipfast.ops.pyramid_regions(cfg["h"], cfg["w"], s):
            n = (r1 - r0) * (c1 - c0)
            total += 2 * n * n * (cfg["dk"] + cfg["dv"])
    return float(total * cfg["batch"])


def core_bytes(cfg: dict, dtype: str) -> tuple[float, float]:
    """(forward, forward+backward) bytes of a core row: inputs read once, outputs
    written once (see the Floor section of the docstring)."""
    e = _roofline.esize(dtype)
    bn = cfg["batch"] * cfg["h"] * cfg["w"]
    dk, dv = cfg["dk"], cfg["dv"]
    fwd = e * bn * (dk + 2 * dv)
    return float(fwd), float(fwd + e * bn * (2 * dk + 3 * dv))


def _fwd_bwd(fn, cfg, **kw) -> tuple[float, float]:
    """(forward, forward+backward) of a lipfast.kernels.oc_attention FLOP counter
    summed over the row's scales; backward=True read as the backward alone when it
    is nearer 2.5 x the forward than 3.5 x."""
    n = cfg["h"] * cfg["w"]
    f = b = 0.0
    for s in cfg["scales"]:
        args = (cfg["batch"], n, cfg["dk"], cfg["dv"])
        regions = None if s == 1 else s
        f1 = float(fn(*args, regions=regions, backward=False, **kw))
        b1 = float(fn(*args, regions=regions, backward=True, **kw))
        f += f1
        b += (f1 + b1) if abs(b1 - 2.5 * f1) <= abs(b1 - 3.5 * f1) else b1
    return f, b


def kernel_flops(cfg: dict, device) -> dict:
    """FLOPs needed and executed by lipfast's kernels for a core row:
    {needed_fwd, needed_fwdbwd, executed_fwd, executed_fwdbwd, source, note}."""
    own_f = core_flops(cfg)
    res = dict(needed_fwd=own_f, needed_fwdbwd=3.5 * own_f, executed_fwd=None,
               executed_fwdbwd=None, source="formula (benchmarks/attn.py)", note="")
    try:
        from lipfast.kernels import oc_attention as kernels

        needed = getattr(kernels, "needed_flops", None)
        executed = getattr(kernels, "executed_flops", None)
    except Exception:  # noqa: BLE001 - no Triton, or the kernels module moved
        needed = executed = None
    if needed is not None:
        try:
            nf, nb = _fwd_bwd(needed, cfg)
            if abs(nf - own_f) > 1e-6 * own_f:
                res["note"] = (f"needed_flops() gives {nf:.4g} forward FLOPs, the formula "
                               f"{own_f:.4g}; the formula is used")
            else:
                res["needed_fwdbwd"] = nb
                res["source"] = "lipfast.kernels.oc_attention.needed_flops"
        except Exception as err:  # noqa: BLE001 - a different signature: formula
            res["note"] = f"needed_flops() raised {type(err).__name__}: {err}"
    if device.type != "cuda":
        res["executed_fwd"], res["executed_fwdbwd"] = res["needed_fwd"], res["needed_fwdbwd"]
        res["executed_source"] = ("CPU: ATen's flash kernel, no recomputation beyond the "
                                  "flash backward: executed = needed")
    elif executed is not None:
        try:
            res["executed_fwd"], res["executed_fwdbwd"] = _fwd_bwd(executed, cfg)
            res["executed_source"] = "lipfast.kernels.oc_attention.executed_flops"
        except Exception as err:  # noqa: BLE001
            res["executed_source"] = f"executed_flops() raised {type(err).__name__}: {err}"
    else:
        res["executed_source"] = "n/a: lipfast.kernels.oc_attention has no executed_flops"
    return res


# --------------------------------------------------------------------------- modules
#
# The reference and sdpa module variants are deep copies of the lipfast module
# (same weights, same norm layers) whose forward is OCNet's, written out below,
# with the given attention function in place of the fused op.


def _sa_block(stage, x, attn, size: int):
    """SelfAttentionBlock2D.forward (f_key computed once: q = k)."""
    h, w = x.shape[2], x.shape[3]
    if size > 1:
        x = stage.pool(x)
    value = stage.f_value(x)
    key = stage.f_key(x)
    context = attn(key, value, key.shape[1] ** -0.5, 1)
    context = stage.W(context)
    if size > 1:
        context = F.interpolate(context, size=(h, w), mode="bilinear", align_corners=True)
    return context


def _pyramid_block(stage, x, attn, size: int):
    value = stage.f_value(x)
    key = stage.f_key(x)
    return stage.W(attn(key, value, key.shape[1] ** -0.5, size))


def _oc_context(mod, x, attn, sizes):
    context = None
    for stage, size in zip(mod.stages, sizes):
        prior = _sa_block(stage, x, attn, size)
        context = prior if context is None else context + prior
    return context


def reference_forward(kind: str, kwargs: dict, mod: nn.Module, attn) -> Callable:
    if kind == "OCModule":
        sizes = list(kwargs.get("sizes", [1]))

        def fwd(x):
            return mod.conv_bn_dropout(torch.cat([_oc_context(mod, x, attn, sizes), x], 1))
    elif kind == "PyramidOCModule":
        sizes = list(kwargs.get("sizes", [1]))

        def fwd(x):
            priors = [mod.up_dr(x)] + [_pyramid_block(st, x, attn, s)
                                       for st, s in zip(mod.stages, sizes)]
            return mod.conv_bn_dropout(torch.cat(priors, 1))
    elif kind == "ASPOCModule":
        # The context branch: Conv2d 3x3 -> ABN -> BaseOC_Context_Module(sizes [2]).
        def fwd(x):
            y = mod[1](mod[0](x))
            base = mod[2]
            return base.conv_bn_dropout(_oc_context(base, y, attn, [2]))
    else:
        raise ValueError(kind)
    return fwd


def build_lipfast_module(kind: str, kwargs: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cls = getattr(lipfast, kind)
    mod = cls(**kwargs)
    # OCNet zero-initialises W: the attention would not reach the output (nor
    # get a gradient), making the check vacuous. Give every all-zero conv a random
    # init (both copies share it).
    for m in mod.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.detach().any():
            m.reset_parameters()
    # Key norm weight 3 instead of 1: a peakier softmax. With 1, attention over the
    # small CPU maps is so flat that the context is nearly constant over the map, and
    # the ASP-OC context branch (whose head batch-normalises context channels only)
    # amplifies fp32 rounding noise into the gradients: too ill-conditioned to check.
    with torch.no_grad():
        for m in mod.modules():
            f_key = getattr(m, "f_key", None)
            if isinstance(f_key, nn.Sequential) and getattr(f_key[1], "weight", None) is not None:
                f_key[1].weight.fill_(3.0)
    if kind == "ASPOCModule":
        mod = mod.context  # the benchmarked branch
    return mod.train()


def module_rows_available() -> str | None:
    missing = [n for n in ("OCModule", "PyramidOCModule", "ASPOCModule")
               if not hasattr(lipfast, n)]
    if missing:
        return (f"lipfast has no {', '.join(missing)} yet (lipfast/nn/oc.py): module rows "
                "skipped")
    return None


# --------------------------------------------------------------------------- measurement


@dataclass
class Impl:
    """One implementation of a row, ready to step."""

    name: str
    fn: Callable[[], torch.Tensor]
    grads: list  # tensors whose .grad is compared and reset
    named: list  # (name, tensor) pairs for the gradient check
    ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""
    skip_storages: set = field(default_factory=set)
    modules: list = field(default_factory=list)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(impl: Impl, gout: torch.Tensor | None, backward: bool):
    for t in impl.grads:
        t.grad = None
    with impl.ctx():
        out = impl.fn()
    if backward:
        out.backward(gout if gout.dtype == out.dtype else gout.to(out.dtype))
    return out


@contextlib.contextmanager
def count_saved(impl: Impl, seen: dict):
    """Records the unique storages saved for backward (their bytes by data pointer),
    the implementation's inputs, parameters and buffers excluded."""

    def pack(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            st = t.untyped_storage()
            if st.data_ptr() not in impl.skip_storages:
                seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


@contextlib.contextmanager
def _quiet_fd2():
    """Silences C++ writes to stderr (Kineto prints a line on every profiler start and
    stop); Python-level errors still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def memory_step(impl: Impl, gout, device) -> dict:
    """One forward+backward step measuring saved-for-backward bytes and the peak:
    CUDA: torch.cuda.max_memory_allocated above the allocation before the step;
    CPU: torch.profiler's allocator trace (every allocation and free through
    PyTorch's CPU allocator), running sum, max above the start; with the single
    largest allocation."""
    for t in impl.grads:
        t.grad = None
    seen: dict[int, int] = {}
    res = dict(saved=None, peak=None, largest=None)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with count_saved(impl, seen):
            out = run_step(impl, gout, True)
        _sync(device)
        res["peak"] = float(torch.cuda.max_memory_allocated(device) - base)
        del out
        res["saved"] = float(sum(seen.values()))
        return res
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.__enter__()
    try:
        with count_saved(impl, seen):
            out = run_step(impl, gout, True)
        del out
    finally:
        with _quiet_fd2():
            prof.__exit__(None, None, None)
    res["saved"] = float(sum(seen.values()))
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except Exception as err:  # noqa: BLE001 - private API: degrade to no peak
        warnings.warn(f"CPU peak memory unavailable ({err})")
        return res
    events.sort(key=lambda e: e.start_ns())
    cur = peak = big = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
        big = max(big, e.nbytes())
    res["peak"], res["largest"] = float(peak), float(big)
    return res


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def pick_sdpa_backend(impl: Impl, gout, device, tries: int = 3) -> dict:
    """CUDA: each SDPA backend alone on forward+backward; the fastest that runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tried = {}
    best = None
    for name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        ctx = (lambda b=backend: sdpa_kernel(b))
        trial = Impl(impl.name, impl.fn, impl.grads, impl.named, ctx=_chain(impl.ctx, ctx))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = _timing.measure({name: lambda t=trial: run_step(t, gout, True)}, device,
                                    warmup=2, max_warmup=2, min_rounds=tries,
                                    max_rounds=tries, probe=False)
                ms = m[name].median
        except Exception as err:  # noqa: BLE001 - a backend that cannot run this case
            msg = (str(err).splitlines() or [type(err).__name__])[0]
            tried[name.lower()] = f"failed: {msg[:160]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        tried[name.lower()] = round(ms, 4)
        if best is None or ms < best[1]:
            best = (name, ms, ctx)
    return dict(tried=tried, best=best)


def _chain(a, b):
    @contextlib.contextmanager
    def both():
        with a(), b():
            yield

    return both


def bf16_matmul_tflops(device, n: int = 8192, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    m = _timing.measure({"matmul": lambda: a @ b}, device, timer="events", warmup=3,
                        max_warmup=10, min_rounds=reps, probe=False)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / (m["matmul"].median * 1e-3) / 1e12


# --------------------------------------------------------------------------- checking
#
# One forward+backward of every implementation (dropout switched off for it, so
# that the modules' random masks cannot differ) and of the reference in float64
# (the ground truth). Every output and gradient is compared with the truth: an
# implementation passes a tensor when its max error is within tol * max|truth|
# or within K times the float32/bf16 reference's own error (so that quantities
# that are ill-conditioned, or zero in exact arithmetic such as the gradient of a
# conv bias in front of a batch norm, are judged against the reference's own
# rounding noise). The direct lipfast - reference difference is printed too.

CHECK_K = 4.0
GRAD_FLOOR = 1e-2


def tolerance(device, dtype: str, grad: bool) -> float:
    """Error allowed relative to max |truth|: outputs 1e-4 (CPU fp32), 1e-3 (CUDA
    fp32), 3e-2 (bf16); gradients 10x in fp32, 2x in bf16."""
    if dtype == "bf16":
        return 3e-2 * (2.0 if grad else 1.0)
    base = 1e-4 if device.type == "cpu" else 1e-3
    return base * (10.0 if grad else 1.0)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


@contextlib.contextmanager
def no_dropout(impls):
    mods = []
    for impl in impls:
        for m in impl.modules:
            for d in m.modules():
                if isinstance(d, nn.modules.dropout._DropoutNd) and d.p > 0:
                    mods.append((d, d.p))
                    d.p = 0.0
    try:
        yield
    finally:
        for d, p in mods:
            d.p = p


def _collect(impl: Impl, gout) -> dict:
    out = run_step(impl, gout, True)
    got = {"out": out.detach().clone()}
    for k, t in impl.named:
        got[k] = None if t.grad is None else t.grad.detach().clone()
    for t in impl.grads:
        t.grad = None
    return got


def check_row(impls: dict, truth: Impl, gout, device, dtype: str) -> dict:
    with no_dropout(list(impls.values()) + [truth]):
        got = {name: _collect(impl, gout) for name, impl in impls.items()}
        try:
            exact = _collect(truth, gout.double())
        except Exception as err:  # noqa: BLE001 - e.g. out of memory in float64
            print(f"    note: the float64 reference failed ({type(err).__name__}: {err}); "
                  "checking against the reference in the row's dtype, tolerance only")
            exact = None
    ref = got[REFERENCE]
    if exact is None:
        # Against the same-dtype reference: its own error is zero by construction.
        exact = ref
    # Gradients whose true value is (near) zero, e.g. the bias of a conv followed
    # by a batch-statistics norm, are pure rounding noise: judge their error
    # against the scale of the row's gradients (GRAD_FLOOR x the largest one).
    grad_scale = max((t.abs().max().item() for k, t in exact.items()
                      if k != "out" and t is not None and t.numel()), default=0.0)
    checks = {}
    for name, vals in got.items():
        if name == REFERENCE:
            continue
        per, ok, worst = {}, True, None
        for k, t_ex in exact.items():
            a, r = vals.get(k), ref.get(k)
            if t_ex is None or a is None or r is None:
                if (t_ex is None) != (a is None):
                    per[k] = dict(ok=False, missing=True)
                    ok = False
                continue
            mag = t_ex.abs().max().item()
            if k != "out":
                mag = max(mag, GRAD_FLOOR * grad_scale)
            err, err_ref = _max_err(a, t_ex), _max_err(r, t_ex)
            allowed = max(tolerance(device, dtype, k != "out") * mag, CHECK_K * err_ref)
            good = err <= allowed and bool(torch.isfinite(a).all())
            c = dict(max_err=err, ref_max_err=err_ref, truth_max_abs=mag, allowed=allowed,
                     vs_reference_max_abs=_max_err(a, r), ok=good)
            per[k] = c
            ok = ok and good
            if k != "out":
                score = err / allowed if allowed else (0.0 if err == 0 else math.inf)
                if worst is None or score > worst[1]:
                    worst = (k, score)
        checks[name] = dict(tensors=per, ok=ok, worst_grad=None if worst is None else worst[0])
    return checks


def check_summary(name: str, c: dict) -> str:
    out = c["tensors"]["out"]
    msg = (f"{name}: out max |{name} - reference| {out['vs_reference_max_abs']:.2e}; vs float64 "
           f"reference: out err {out['max_err']:.2e} (reference's {out['ref_max_err']:.2e}, "
           f"|out| <= {out['truth_max_abs']:.2g})")
    if c["worst_grad"]:
        g = c["tensors"][c["worst_grad"]]
        msg += (f", worst grad {c['worst_grad']} err {g['max_err']:.2e} (reference's "
                f"{g['ref_max_err']:.2e}, allowed {g['allowed']:.1e})")
    bad = [k for k, t in c["tensors"].items() if not t.get("ok")]
    return msg + ("  ok" if c["ok"] else f"  MISMATCH in {', '.join(bad)}")


# --------------------------------------------------------------------------- rows


@dataclass
class Result:
    row: str
    kind: str
    dtype: str
    shape: str
    method: str
    status: str = "ok"  # ok / skipped / failed
    note: str = ""
    fwd_ms: float | None = None  # medians
    fwdbwd_ms: float | None = None
    fwd_p20_ms: float | None = None
    fwd_p80_ms: float | None = None
    fwdbwd_p20_ms: float | None = None
    fwdbwd_p80_ms: float | None = None
    fwdbwd_min_ms: float | None = None
    rounds: int | None = None
    fwd_times_ms: list = field(default_factory=list)
    fwdbwd_times_ms: list = field(default_factory=list)
    fwdbwd_warmup_ms: list = field(default_factory=list)
    timing_warnings: list = field(default_factory=list)
    fwd_speedup: float | None = None
    fwdbwd_speedup: float | None = None
    saved_mb: float | None = None
    saved_ratio: float | None = None
    peak_mb: float | None = None
    peak_ratio: float | None = None
    largest_mb: float | None = None
    flops_fwd: float | None = None  # needed (core: formula; module: flop_counter)
    flops_fwdbwd: float | None = None
    exec_flops_fwd: float | None = None  # executed, recomputation counted (None: n/a)
    exec_flops_fwdbwd: float | None = None
    exec_flops_source: str = ""
    bytes_fwd: float | None = None
    bytes_fwdbwd: float | None = None
    floor_fwd: dict | None = None  # benchmarks/_roofline.py: floor, fraction, models
    floor_fwdbwd: dict | None = None
    tflops_fwd: float | None = None
    tflops_fwdbwd: float | None = None
    pct_bf16_fwd: float | None = None
    pct_bf16_fwdbwd: float | None = None
    sdpa_backend: str | None = None
    check: dict | None = None


def _core_fn(attn, qk, v, scale, scales):
    def fn():
        out = None
        for s in scales:
            o = attn(qk, v, scale, s)
            out = o if out is None else out + o
        return out

    return fn


def make_core_impls(cfg, device, dtype: str):
    """(implementations, float64 reference, grad of the output) of a core row:
    random qk, v leaves (requires_grad); pyramid rows sum one call per scale."""
    g = torch.Generator().manual_seed(cfg["batch"] * 1000 + cfg["h"])
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    b, h, w = cfg["batch"], cfg["h"], cfg["w"]
    # 0.5 * randn keeps the softmax spread over many keys (randn alone makes the
    # self-similarity sqrt(dk) dominate); timings do not depend on it.
    qk0 = 0.5 * torch.randn(b, cfg["dk"], h, w, generator=g)
    v0 = torch.randn(b, cfg["dv"], h, w, generator=g)
    gout = torch.randn(b, cfg["dv"], h, w, generator=g).to(device, tdt)
    qk = qk0.to(device, tdt).requires_grad_()
    v = v0.to(device, tdt).requires_grad_()
    scale = cfg["dk"] ** -0.5
    skip = {qk.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()}
    impls = {name: Impl(name, _core_fn(ATTENTION[name], qk, v, scale, cfg["scales"]), [qk, v],
                        [("qk", qk), ("v", v)], skip_storages=skip)
             for name in METHODS}
    # The truth: the eager reference in float64 on the same (rounded) inputs.
    qk64 = qk.detach().double().requires_grad_()
    v64 = v.detach().double().requires_grad_()
    truth = Impl("float64", _core_fn(eager_attention, qk64, v64, scale, cfg["scales"]),
                 [qk64, v64], [("qk", qk64), ("v", v64)])
    return impls, truth, gout


def make_module_impls(cfg, device, dtype: str):
    """(implementations, float64 reference, grad of the output) of a module row:
    the lipfast module, and copies of it (same weights) run by OCNet's forward with
    the eager or the SDPA attention; bf16 rows run under torch.autocast."""
    kind, kwargs = cfg["module"], cfg["kwargs"]
    base = build_lipfast_module(kind, kwargs, seed=cfg["h"]).to(device)
    g = torch.Generator().manual_seed(7 + cfg["h"])
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["h"], cfg["w"], generator=g)
    x = x.to(device).requires_grad_()
    pristine = copy.deepcopy(base)  # running statistics before any step
    with torch.no_grad():
        out_shape = base(x).shape
    gout = torch.randn(out_shape, generator=g).to(device)
    ctx = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bf16"
           else contextlib.nullcontext)

    def impl(name, mod, attn, inp, ctx):
        fwd = mod if attn is None else reference_forward(kind, kwargs, mod, attn)
        params = list(mod.parameters())
        skip = {t.untyped_storage().data_ptr() for t in params + list(mod.buffers())}
        skip.add(inp.untyped_storage().data_ptr())
        named = [("x", inp)] + list(mod.named_parameters())
        return Impl(name, (lambda: fwd(inp)), [inp] + params, named, ctx=ctx,
                    skip_storages=skip, modules=[mod])

    impls = {"lipfast": impl("lipfast", base, None, x, ctx)}
    for name in ("reference", "sdpa"):
        impls[name] = impl(name, copy.deepcopy(pristine), ATTENTION[name], x, ctx)
    x64 = x.detach().double().requires_grad_()
    truth = impl("float64", pristine.double(), eager_attention, x64, contextlib.nullcontext)
    return impls, truth, gout


def module_flops(cfg) -> float:
    """Attention-core forward FLOPs inside a module row (for the JSON only)."""
    kind, kw, b, h, w = cfg["module"], cfg["kwargs"], cfg["batch"], cfg["h"], cfg["w"]
    if kind == "OCModule":
        return core_flops(_core(b, h, w, kw["key_channels"], kw["value_channels"]))
    if kind == "PyramidOCModule":
        c = kw["in_channels"]
        return core_flops(_core(b, h, w, c // 2, c, kw["sizes"]))
    out = kw.get("out_features", 256)
    return core_flops(_core(b, h // 2, w // 2, out // 2, out))


def module_bytes(cfg, dtype: str, impl: Impl, gout) -> tuple[float, float]:
    """(forward, forward+backward) bytes of a module row: input read, output written,
    parameters read; backward: the output's gradient read, the input's and the
    parameters' gradients written (activations in between not counted)."""
    e = _roofline.esize(dtype)
    x = cfg["batch"] * cfg["channels"] * cfg["h"] * cfg["w"]
    params = sum(p.numel() * p.element_size() for m in impl.modules for p in m.parameters())
    fwd = e * (x + gout.numel()) + params
    return float(fwd), float(fwd + e * (gout.numel() + x) + params)


def row_work(spec: RowSpec, cfg: dict, dtype: str, impls: dict, gout, device) -> dict:
    """Bytes and FLOPs of a row for the floor: {method: dict(bytes_fwd, bytes_fwdbwd,
    flops_fwd, flops_fwdbwd, exec_fwd, exec_fwdbwd, exec_source)} (see the
    docstring's Floor section)."""

    def counted(impl, backward):
        with no_dropout([impl]):
            return _roofline.count_flops(lambda: run_step(impl, gout, backward))

    out = {}
    if spec.kind == "core":
        kf = kernel_flops(cfg, device)
        bf, bfb = core_bytes(cfg, dtype)
        for name, impl in impls.items():
            w = dict(bytes_fwd=bf, bytes_fwdbwd=bfb, flops_fwd=kf["needed_fwd"],
                     flops_fwdbwd=kf["needed_fwdbwd"], flops_source=kf["source"],
                     flops_note=kf["note"])
            if name == "lipfast":
                w.update(exec_fwd=kf["executed_fwd"], exec_fwdbwd=kf["executed_fwdbwd"],
                         exec_source=kf["executed_source"])
            else:
                try:
                    ef, efb = counted(impl, False), counted(impl, True)
                    src = "torch.utils.flop_counter, one step"
                    if not ef:  # an op torch's counter has no formula for (CPU flash SDPA)
                        ef = efb = None
                        src = "n/a: torch.utils.flop_counter counts 0 (no formula for the op)"
                    w.update(exec_fwd=ef, exec_fwdbwd=efb, exec_source=src)
                except Exception as err:  # noqa: BLE001 - counting is best effort
                    w.update(exec_fwd=None, exec_fwdbwd=None,
                             exec_source=f"n/a: flop_counter raised {type(err).__name__}")
            out[name] = w
        return out
    ref = impls[REFERENCE]
    try:
        ff, ffb = counted(ref, False), counted(ref, True)
        src = "torch.utils.flop_counter over the eager reference module, one step"
    except Exception as err:  # noqa: BLE001
        ff = module_flops(cfg)
        ffb = 3.5 * ff
        src = (f"attention core only (flop_counter raised {type(err).__name__}): "
               "a lower bound")
    bf, bfb = module_bytes(cfg, dtype, ref, gout)
    for name in impls:
        out[name] = dict(bytes_fwd=bf, bytes_fwdbwd=bfb, flops_fwd=ff, flops_fwdbwd=ffb,
                         flops_source=src, flops_note="", exec_fwd=None, exec_fwdbwd=None,
                         exec_source="n/a: lipfast's custom ops are not counted by "
                                     "torch.utils.flop_counter")
    if src.startswith("torch.utils.flop_counter"):
        out[REFERENCE].update(exec_fwd=ff, exec_fwdbwd=ffb, exec_source=(
            "torch.utils.flop_counter, one step (the count the row's FLOPs come from)"))
    if "sdpa" in out:
        out["sdpa"]["exec_source"] = "n/a: not counted for module rows"
    return out


def measure(impls: dict, results: dict, gout, device, settings) -> _timing.Measurement:
    """Memory (one forward+backward step each), then the timed rounds: every
    implementation's forward and forward+backward steps interleaved
    (benchmarks/_timing.py)."""
    for name, impl in impls.items():
        m = memory_step(impl, gout, device)
        r = results[name]
        r.saved_mb = m["saved"] / 2**20
        r.peak_mb = None if m["peak"] is None else m["peak"] / 2**20
        r.largest_mb = None if m["largest"] is None else m["largest"] / 2**20

    steps = {}
    for name, impl in impls.items():
        steps[f"{name} fwd"] = lambda impl=impl: run_step(impl, gout, False)
        steps[f"{name} fwd+bwd"] = lambda impl=impl: run_step(impl, gout, True)
    m = _timing.measure(steps, device, settings)
    for name in impls:
        r, f, fb = results[name], m[f"{name} fwd"], m[f"{name} fwd+bwd"]
        r.fwd_times_ms, r.fwdbwd_times_ms = list(f.times_ms), list(fb.times_ms)
        r.fwdbwd_warmup_ms = list(fb.warmup_ms)
        r.fwd_ms, r.fwd_p20_ms, r.fwd_p80_ms = f.median, f.p20, f.p80
        r.fwdbwd_ms, r.fwdbwd_p20_ms, r.fwdbwd_p80_ms = fb.median, fb.p20, fb.p80
        r.fwdbwd_min_ms = fb.min
        r.rounds = m.rounds
        r.timing_warnings = list(m.warnings)
    return m


def run_row(spec: RowSpec, cfg: dict, dtype: str, device, settings, tag: str,
            matmul_tflops: float | None, roof: "_roofline.Roofline | None" = None
            ) -> list[Result]:
    cuda = device.type == "cuda"
    shape = describe(spec, cfg)
    results = {m: Result(spec.name, spec.kind, dtype, shape, m) for m in METHODS}
    t_row = time.perf_counter()
    try:
        if spec.kind == "core":
            impls, truth, gout = make_core_impls(cfg, device, dtype)
            flops = core_flops(cfg)
        else:
            impls, truth, gout = make_module_impls(cfg, device, dtype)
            flops = module_flops(cfg)
    except Exception as err:  # noqa: BLE001 - out of memory, a module that will not build
        for r in results.values():
            r.status = "skipped"
            r.note = f"building the inputs/modules failed: {type(err).__name__}: {err}"
        print(f"{tag} {spec.name} [{dtype}]: SKIPPED, building the inputs/modules raised "
              f"{type(err).__name__}: {err}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        return list(results.values())
    for r in results.values():
        r.flops_fwd = flops

    # SDPA: which backend (CUDA: the fastest of those that run; CPU: default).
    if cuda:
        pick = pick_sdpa_backend(impls["sdpa"], gout, device)
        results["sdpa"].check = dict(backends_tried=pick["tried"])
        if pick["best"] is None:
            results["sdpa"].status = "skipped"
            results["sdpa"].note = "no SDPA backend ran: " + "; ".join(
                f"{k}: {v}" for k, v in pick["tried"].items())
            del impls["sdpa"]
        else:
            name, _, bctx = pick["best"]
            impls["sdpa"].ctx = _chain(impls["sdpa"].ctx, bctx)
            results["sdpa"].sdpa_backend = name.lower()
    else:
        results["sdpa"].sdpa_backend = "cpu-default"
    if "sdpa" in impls:
        sc = cfg.get("scales", cfg.get("kwargs", {}).get("sizes", (1,)))
        results["sdpa"].note = f"backend {results['sdpa'].sdpa_backend}" + (
            "; dense N x N block-diagonal bool mask" if max(sc) > 1 else "")

    # Correctness (also the first warm-up step).
    try:
        checks = check_row(impls, truth, gout, device, dtype)
    except Exception as err:  # noqa: BLE001 - report and go on with the next row
        for r in results.values():
            r.status, r.note = "failed", f"check raised {type(err).__name__}: {err}"
        print(f"{tag} {spec.name} [{dtype}]: ABORTED, the check raised "
              f"{type(err).__name__}: {err}", flush=True)
        return list(results.values())
    del truth
    for name, c in checks.items():
        results[name].check = {**(results[name].check or {}), **c}
    print(f"{tag} {spec.name} [{dtype}] {shape}\n    check " + "\n          ".join(
        check_summary(n, c) for n, c in checks.items()), flush=True)
    if not checks["lipfast"]["ok"]:
        for r in results.values():
            r.status = "failed"
            r.note = "lipfast does not match the reference (see check)"
        print(f"    ABORTED {spec.name} [{dtype}]: lipfast's output or gradients differ from "
              "the float64 reference beyond tolerance (and beyond the eager float "
              "reference's own error); not timed", flush=True)
        return list(results.values())
    if "sdpa" in checks and not checks["sdpa"]["ok"]:
        results["sdpa"].status = "failed"
        results["sdpa"].note += "; does not match the reference, not timed"
        del impls["sdpa"]

    try:
        work = row_work(spec, cfg, dtype, impls, gout, device)
    except Exception as err:  # noqa: BLE001 - the floor is reported, not required
        print(f"    note: counting the row's work failed ({type(err).__name__}: {err})")
        work = {}
    for name, w in work.items():
        r = results[name]
        r.flops_fwd, r.flops_fwdbwd = w["flops_fwd"], w["flops_fwdbwd"]
        r.bytes_fwd, r.bytes_fwdbwd = w["bytes_fwd"], w["bytes_fwdbwd"]
        r.exec_flops_fwd, r.exec_flops_fwdbwd = w["exec_fwd"], w["exec_fwdbwd"]
        r.exec_flops_source = w["exec_source"]
    if work.get("lipfast", {}).get("flops_note"):
        print(f"    note: {work['lipfast']['flops_note']}")

    try:
        m = measure(impls, results, gout, device, settings)
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: report, next row
        for r in results.values():
            if r.status == "ok":
                r.status = "failed"
                r.note = f"measurement raised {type(err).__name__}: {err}"
        print(f"    ABORTED {spec.name} [{dtype}] while measuring: {type(err).__name__}: "
              f"{err}", flush=True)
        del impls
        if cuda:
            torch.cuda.empty_cache()
        return list(results.values())
    ref = results[REFERENCE]
    for name in impls:
        r = results[name]
        r.fwd_speedup = ref.fwd_ms / r.fwd_ms
        r.fwdbwd_speedup = ref.fwdbwd_ms / r.fwdbwd_ms
        r.saved_ratio = ref.saved_mb / r.saved_mb if r.saved_mb else None
        r.peak_ratio = ref.peak_mb / r.peak_mb if (r.peak_mb and ref.peak_mb) else None
        if roof is not None and name in work:
            w = work[name]
            rate = "bf16" if dtype == "bf16" else _roofline.compute_dtype(
                device, "fp32", "matmul" if spec.kind == "core" else "conv")
            r.floor_fwd = roof.row(w["bytes_fwd"], w["flops_fwd"], rate, r.fwd_ms)
            r.floor_fwdbwd = roof.row(w["bytes_fwdbwd"], w["flops_fwdbwd"], rate, r.fwdbwd_ms)
        if cuda and spec.kind == "core":
            r.tflops_fwd = flops / (r.fwd_ms * 1e-3) / 1e12
            r.tflops_fwdbwd = 3.5 * flops / (r.fwdbwd_ms * 1e-3) / 1e12
            if matmul_tflops:
                r.pct_bf16_fwd = 100 * r.tflops_fwd / matmul_tflops
                r.pct_bf16_fwdbwd = 100 * r.tflops_fwdbwd / matmul_tflops
    parts = []
    for name in impls:
        r = results[name]
        parts.append(f"{name} {m[name + ' fwd'].fmt()} / {m[name + ' fwd+bwd'].fmt()} ms"
                     + ("" if name == REFERENCE else f" (x{r.fwdbwd_speedup:.2f})"))
    print(f"    fwd / fwd+bwd, median [p20-p80]: {', '.join(parts)}; {m.rounds} rounds after "
          f"{m.warmup_rounds} warm-up, row {time.perf_counter() - t_row:.1f} s", flush=True)
    lf = results["lipfast"].floor_fwdbwd
    if lf and lf.get("floor_ms") is not None:
        print(f"    floor (f+b): {_roofline.fmt_count(lf['bytes'], 'B')}, "
              f"{_roofline.fmt_count(lf['flops'], 'FLOP')} -> {_roofline.fmt_floor(lf['floor_ms'])}"
              f" ms ({lf['bound']}-bound); lipfast at {_roofline.fmt_fraction(lf['fraction'])}"
              " of it", flush=True)
    _timing.print_warnings(m)
    del impls
    if cuda:
        torch.cuda.empty_cache()
    return list(results.values())


# --------------------------------------------------------------------------- output


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def print_table(results: list[Result], cuda: bool, roof=None) -> None:
    cols = [("row", 20, "<"), ("dtype", 5, "<"), ("method", 9, "<"),
            ("fwd ms [p20-p80]", 19, ">"), ("speedup", 7, ">"),
            ("f+b ms [p20-p80]", 19, ">"), ("speedup", 7, ">"), ("rounds", 6, ">"),
            ("saved MB", 9, ">"), ("mem x", 6, ">"), ("peak MB", 9, ">"), ("mem x", 6, ">")]
    if cuda:
        cols += [("TF/s fwd", 8, ">"), ("TF/s f+b", 8, ">"), ("% bf16", 6, ">")]
    else:
        cols += [("largest MB", 10, ">")]
    if roof is not None:
        cols += [("f+b floor", 10, ">"), ("of floor", 8, ">")]
        cols += [(f"{m} floor", 11, ">") for m in roof.models]
    head = " ".join(f"{n:{a}{w}}" for n, w, a in cols) + "  notes"
    print(head)
    print("-" * len(head))
    last = None
    for r in results:
        key = (r.row, r.dtype)
        first = key != last
        last = key
        if first:
            print(f"{'':20} {r.shape}")
        vals = [r.row if first else "", r.dtype if first else "", r.method,
                _timing.fmt_spread(r.fwd_ms, r.fwd_p20_ms, r.fwd_p80_ms),
                fmt(r.fwd_speedup, ".2f"),
                _timing.fmt_spread(r.fwdbwd_ms, r.fwdbwd_p20_ms, r.fwdbwd_p80_ms),
                fmt(r.fwdbwd_speedup, ".2f"), fmt(r.rounds, "d"),
                fmt(r.saved_mb, ".1f"), fmt(r.saved_ratio, ".2f"),
                fmt(r.peak_mb, ".1f"), fmt(r.peak_ratio, ".2f")]
        if cuda:
            vals += [fmt(r.tflops_fwd, ".1f"), fmt(r.tflops_fwdbwd, ".1f"),
                     fmt(r.pct_bf16_fwdbwd, ".1f")]
        else:
            vals += [fmt(r.largest_mb, ".1f")]
        if roof is not None:
            fb = r.floor_fwdbwd
            vals += roof.cells(fb) if fb else ["-"] * (2 + len(roof.models))
        note = r.note if r.status == "ok" else f"{r.status.upper()}: {r.note}"
        print(" ".join(f"{v:{a}{w}}" for v, (n, w, a) in zip(vals, cols))
              + ("  " + note if note else ""))


def print_floor_table(results: list[Result], roof) -> None:
    """Per row and implementation: bytes, FLOPs needed and executed, the floors and the
    fractions achieved, forward and forward+backward."""
    cols = [("row", 20, "<"), ("dtype", 5, "<"), ("method", 9, "<"), ("step", 5, "<"),
            ("bytes", 9, ">"), ("FLOPs need", 11, ">"), ("FLOPs exec", 11, ">"),
            ("ms", 8, ">"), ("floor ms", 10, ">"), ("of floor", 8, ">")]
    cols += [(f"{m} floor", 11, ">") for m in roof.models]
    head = " ".join(f"{n:{a}{w}}" for n, w, a in cols)
    print(head)
    print("-" * len(head))
    for r in results:
        for step, fl, ms, ex in (("fwd", r.floor_fwd, r.fwd_ms, r.exec_flops_fwd),
                                 ("f+b", r.floor_fwdbwd, r.fwdbwd_ms, r.exec_flops_fwdbwd)):
            if fl is None:
                continue
            vals = [r.row, r.dtype, r.method, step, _roofline.fmt_count(fl["bytes"], "B"),
                    _roofline.fmt_count(fl["flops"]), _roofline.fmt_count(ex),
                    _timing.fmt_ms(ms)] + roof.cells(fl)
            print(" ".join(f"{v:{a}{w}}" for v, (n, w, a) in zip(vals, cols)))
    sources = sorted({f"{r.kind} rows, {r.method}: {r.exec_flops_source}" for r in results
                      if r.exec_flops_source})
    print("FLOPs need: the math (core rows: 2 B n^2 (dk + dv) forward, 3.5 x for f+b, the flash "
          "convention; module rows: torch.utils.flop_counter over the eager reference); FLOPs "
          "exec: what runs, recomputation counted (the eager reference keeps the softmax for "
          "its backward: 3 x forward):\n  " + "\n  ".join(sources))


def plot(results: list[Result], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); "
              "no plot written")
        return False
    groups = []
    for r in results:
        key = f"{r.row}\n{r.dtype}"
        if key not in groups:
            groups.append(key)
    methods = [m for m in METHODS if m != REFERENCE]
    colours = {"lipfast": "#1f77b4", "sdpa": "#ff7f0e"}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(groups) + 2), 8), sharex=True)
    width = 0.8 / len(methods)
    for ax, (attr, label) in zip(axes, (("fwd_speedup", "forward"),
                                        ("fwdbwd_speedup", "forward + backward"))):
        for i, m in enumerate(methods):
            xs, ys = [], []
            for gi, key in enumerate(groups):
                for r in results:
                    if f"{r.row}\n{r.dtype}" == key and r.method == m and getattr(r, attr):
                        xs.append(gi + (i - (len(methods) - 1) / 2) * width)
                        ys.append(getattr(r, attr))
            bars = ax.bar(xs, ys, width, label=m, color=colours.get(m))
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel(f"speedup vs eager reference\n({label}, higher is better)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[-1].set_xticks(range(len(groups)))
    axes[-1].set_xticklabels(groups, rotation=45, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return True


def environment(device, argv=None) -> dict:
    env = _common.environment(device, __file__, argv)
    env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return env


def _load(name: str):
    """Imports benchmarks/<name>.py by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"lipfast_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- driver

# Timing defaults (benchmarks/_timing.py): CPU rows take 10 ms to 2 s a round, so
# cheap rows get many rounds (3 s of timed steps) and dear ones at least 10.
CPU_TIMING = _timing.Settings(warmup=2, max_warmup=5, max_warmup_seconds=10.0, min_rounds=10,
                              min_seconds=3.0, max_rounds=300, max_seconds=60.0)
CUDA_TIMING = _timing.Settings(warmup=3, max_warmup=20, min_rounds=20, min_seconds=1.0,
                               max_rounds=1000, max_seconds=60.0)
QUICK_TIMING = _timing.QUICK


def timing_defaults_help() -> str:
    return _timing.defaults_help(CPU_TIMING, CUDA_TIMING, QUICK_TIMING, '',
                                 '--repeats is --min-rounds, --budget is --max-time.')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=shapes_help() + (
                                    "\n\nCPU defaults: the CPU shapes, fp32, at least 10 "
                                    "timed rounds and 3 s of timed steps per row, a few "
                                    "minutes on 2 cores. CUDA defaults: the full shapes, fp32 "
                                    "and bf16, at least 20 rounds and 1 s per row. --quick: "
                                    "the CPU shapes, 1 warm-up and 3 timed rounds, seconds "
                                    "per row (a smoke run; not for quoting)."))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the issue's full shapes (default on CUDA; very slow on CPU)")
    size.add_argument("--small", action="store_true",
                      help="the reduced CPU shapes (default on CPU; a quick smoke run on CUDA)")
    size.add_argument("--quick", action="store_true",
                      help="the reduced CPU shapes and quick timing (1 warm-up, 3 rounds): a "
                           "smoke run, figures not for quoting")
    p.add_argument("--rows", nargs="+", metavar="SUBSTR",
                   help="only rows whose name contains one of these (case-insensitive), "
                        "e.g. --rows os8 Module")
    p.add_argument("--dtype", choices=("fp32", "bf16", "both"), default=None,
                   help="fp32, bf16 (inputs in bf16; module rows under torch.autocast) or both "
                        "(default: both on CUDA, fp32 on CPU; bf16 needs CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) first (default: torch's choice, but 1 on CPU "
                        "when other processes keep half the cores or more busy at the start: "
                        "multi-threaded kernels then stall)")
    p.add_argument("--json", metavar="PATH", help="write all measurements and the environment")
    p.add_argument("--plot", metavar="PATH",
                   help="write a grouped bar chart of the speedups (PNG; needs matplotlib)")
    p.add_argument("--also-abn", action="store_true",
                   help="then run benchmarks/abn.py (In-Place ABN) with the same --device "
                        "and --full/--small/--quick; its results go into --json under 'abn'")
    _timing.add_arguments(p, timing_defaults_help())
    _roofline.add_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rows and not any(s.lower() in r.name.lower() for r in ROWS for s in args.rows):
        sys.exit(f"--rows {args.rows}: no row matches; rows: {', '.join(r.name for r in ROWS)}")
    _timing.exit_if_parse_only(args, __file__)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available (torch {torch.__version__})")
    if cuda and device.index is not None:
        torch.cuda.set_device(device)
    machine = _timing.machine_check()
    threads_note = _timing.choose_threads(args.threads, device, machine)
    dtype_arg = args.dtype or ("both" if cuda else "fp32")
    dtypes = ["fp32", "bf16"] if dtype_arg == "both" else [dtype_arg]
    if "bf16" in dtypes and not cuda:
        sys.exit("--dtype bf16 needs CUDA (lipfast's CPU In-Place ABN kernels are fp32/fp64 "
                 "only, so the module rows cannot run in bf16 on CPU)")
    full = args.full or (cuda and not (args.small or args.quick))
    settings = _timing.settings_from_args(
        args, QUICK_TIMING if args.quick else (CUDA_TIMING if cuda else CPU_TIMING))
    warnings.filterwarnings("ignore", message="InPlaceABNSync: torch.distributed is not "
                            "initialised")

    env = environment(device, argv)
    env["machine_check"] = machine
    print(f"lipfast OC attention benchmark on {device} ({env['device_name']}), torch "
          f"{torch.__version__}, triton {env['triton']}, {env['num_threads']} threads, "
          f"{'full' if full else 'CPU (reduced)'} shapes, dtype {dtype_arg}")
    _timing.print_run_header(env, settings)
    notes = _timing.print_machine_notes(machine, threads_note)

    selected = [r for r in ROWS if not args.rows
                or any(s.lower() in r.name.lower() for s in args.rows)]
    if not selected:
        sys.exit(f"--rows {args.rows}: no row matches; rows: {', '.join(r.name for r in ROWS)}")
    no_modules = module_rows_available()
    if no_modules and any(r.kind == "module" for r in selected):
        print("note: " + no_modules)
        notes.append(no_modules)
    if not full:
        small_only = [r.name for r in selected if r.cpu is None]
        if small_only:
            msg = (f"rows {', '.join(small_only)} run at full size only: skipped (--full "
                   "runs them)")
            print("note: " + msg)
            notes.append(msg)
    plan = [(r, r.full if full else r.cpu, dt) for dt in dtypes for r in selected
            if (r.full if full else r.cpu) is not None
            and not (r.kind == "module" and no_modules)]

    roof = _roofline.announce(args, device, args.quick)
    matmul_tflops = None
    if cuda:
        if roof.measured is not None and "bf16" in roof.measured.compute_GFLOPs:
            matmul_tflops = roof.measured.compute_GFLOPs["bf16"] / 1e3
        else:
            matmul_tflops = bf16_matmul_tflops(device)
        print(f"measured bf16 matmul rate (8192^3): {matmul_tflops:.1f} TFLOP/s")
    print(f"reference: eager OCNet attention; speedup and mem x are reference / this "
          f"(> 1 is better)", flush=True)

    results: list[Result] = []
    t_start = time.perf_counter()

    def result_dict(elapsed: float, failed, partial: bool) -> dict:
        return {
            "benchmark": "attn",
            "partial": partial,
            "environment": env,
            "config": dict(device=str(device), full=full, quick=args.quick, dtypes=dtypes,
                           timing=_timing.settings_summary(settings),
                           rows=sorted({r.name for r, _, _ in plan}),
                           threads=torch.get_num_threads(), threads_note=threads_note),
            "rows": {f"{spec.name}": dict(kind=spec.kind, about=spec.about,
                                          shape=describe(spec, cfg),
                                          config={k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in cfg.items()})
                     for spec, cfg, _ in plan},
            "bf16_matmul_tflops": matmul_tflops,
            "roofline": roof.summary(),
            "notes": notes,
            "results": [asdict(r) for r in results],
            "elapsed_s": elapsed,
            "aborted": [list(f) for f in failed],
        }

    def write_json(result: dict) -> None:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2, default=str)
        os.replace(tmp, args.json)

    for i, (spec, cfg, dt) in enumerate(plan):
        results += run_row(spec, cfg, dt, device, settings, f"[{i + 1}/{len(plan)}]",
                           matmul_tflops, roof)
        if args.json and i + 1 < len(plan):
            # Written after every row: a run cut off still leaves what it measured.
            write_json(result_dict(time.perf_counter() - t_start, [], True))
    elapsed = time.perf_counter() - t_start

    print()
    print_table(results, cuda, roof)
    print()
    print_floor_table(results, roof)
    for line in roof.describe():
        print(line)
    failed = sorted({(r.row, r.dtype) for r in results
                     if r.status == "failed" and r.method == "lipfast"})
    print(f"\n{len(plan)} rows in {elapsed:.1f} s on {env['device_name']}"
          + (f"; ABORTED (lipfast mismatch or error): {failed}" if failed else ""))
    print("memory: saved MB = storages saved for backward (inputs, parameters, buffers "
          "excluded); peak MB = " + ("torch.cuda.max_memory_allocated above the pre-step "
                                     "allocation" if cuda else
                                     "peak of the CPU allocator trace (torch.profiler) "
                                     "above the pre-step level; largest MB = largest single "
                                     "allocation in it") + ", one forward+backward step")
    if cuda:
        print("TF/s: attention-core TFLOP/s (core rows), forward (2 n^2 (dk + dv) per image "
              "and region) and forward+backward (3.5 x that); % bf16: forward+backward rate "
              f"as a share of the measured {matmul_tflops:.0f} TFLOP/s bf16 matmul")
    print("times: median [20th-80th percentile] of the timed rounds (benchmarks/_timing.py)")
    for n in notes:
        print("note: " + n)
    warned = sorted({(r.row, r.dtype) for r in results if r.timing_warnings})
    if warned:
        print(f"timing warnings (see each row above) in {len(warned)} row(s): "
              + ", ".join(f"{a} [{b}]" for a, b in warned))

    result = result_dict(elapsed, failed, False)
    if args.plot:
        plot(results, args.plot, f"lipfast OC attention, {env['device_name']} ({device}), "
                                 f"torch {torch.__version__}")
    if args.also_abn:
        print("\n--also-abn: benchmarks/abn.py (In-Place ABN)\n", flush=True)
        abn_argv = ["--device", str(device)] + (
            ["--full"] if full else (["--quick"] if args.quick else ["--small"]))
        abn_argv += [f"--datasheet={m}" for m in (args.datasheet or [])]
        abn_argv += ["--no-floor"] if args.no_floor else []
        abn_argv += ["--ceilings", args.ceilings] if args.ceilings else []
        result["abn"] = _load("abn").main(abn_argv)
    if args.json:
        write_json(result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    res = main(sys.argv[1:])
    sys.exit(1 if res.get("aborted") else 0)
