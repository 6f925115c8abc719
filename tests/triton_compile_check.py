"""Compiles every configuration of lipfast's Triton kernels for a GPU architecture
without a GPU (Triton's ahead-of-time path: TTIR -> TTGIR -> LLVM -> PTX -> cubin
with the bundled ptxas) and checks its resources. Run as a script, never under
TRITON_INTERPRET:

    python tests/triton_compile_check.py 90 bf16 fp16 fp32 [--jobs 2]

Each kernel is compiled with the exact signatures its launcher produces: the
launcher runs on CPU tensors of the dtypes the GPU dispatch passes it (a small
table of cases per kernel below), the kernel launch is intercepted (nothing
runs), and the arguments are specialised by Triton's own runtime rules (pointer
element types, i32/i64/fp32 scalars, integers equal to 1 as constexpr,
16-divisibility) with the constexprs the launcher picked. The first case(s) of
each kernel (marked ``all``) are compiled with every configuration of the
kernel's space that survives lipfast's pruning for this architecture
(:func:`lipfast.kernels._tuning.prune` with the limits of sm_<arch>); the other
cases with their default configuration. oc_attention's float32 cases are
compiled for both precisions its launcher picks (allow_tf32 off: ieee, on: tf32).

ptxas's report (-v) of every compile gives registers and spill stores; Triton's
metadata the shared memory. The script prints one table (kernel, case, dtype,
configuration, registers, shared memory, spill stores, warps, blocks per SM from
registers / shared memory / warps, and their minimum) and fails when a
configuration needs more shared memory than a block may have (sm_90: 232448 B,
sm_80: 166912 B), spills registers, or does not compile. Identical
specialisations compile once; ``--jobs`` processes compile in parallel (default:
the CPU count, at most 4).
"""

import contextlib
import io
import multiprocessing
import os
import re
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"
os.environ["LIPFAST_TRITON_AUTOTUNE"] = "0"  # launches take the default config (captured)
os.environ.pop("LIPFAST_TRITON_CONFIG", None)

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

import torch  # noqa: E402

from lipfast.kernels import _tuning  # noqa: E402
from lipfast.kernels import confusion_matrix as KC  # noqa: E402
from lipfast.kernels import edge as KE  # noqa: E402
from lipfast.kernels import lovasz as KL  # noqa: E402
from lipfast.kernels import oc_attention as K  # noqa: E402
from lipfast.kernels import upsample_ce as KU  # noqa: E402
from lipfast.kernels import parse_postprocess as KP  # noqa: E402
from lipfast.kernels import heatmap_loss as KH  # noqa: E402
from lipfast.kernels import pose_decode as KD  # noqa: E402

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAUNCH_KEYS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "ir_override"}


# ------------------------------------------------------------------ launch cases
# each yields (label, all_configs, launch)

def _oc_cases(dt):
    def run(dk, dv, h, w, regions):
        qk = torch.randn(2, dk, h, w).to(dt)
        v = torch.randn(2, dv, h, w).to(dt)
        out, lse = K.forward(qk, v, dk ** -0.5, regions)
        K.backward(torch.randn_like(out), qk, v, out, lse, dk ** -0.5, regions)

    yield "dk=dv=64, 32x32", True, lambda: run(64, 64, 32, 32, 0)
    yield "dk=256, dv=512, 32x32 (two value passes)", True, lambda: run(256, 512, 32, 32, 0)
    yield "dk=dv=64, 32x32, 3x3 regions", False, lambda: run(64, 64, 32, 32, 3)


def _edge_cases(dt):
    # labels are read in their own integer dtype (losses.edge accepts these four);
    # independent of the float dtype (identical cases are deduplicated)
    yield "labels int64", True, lambda: KE.generate_edge(torch.zeros(2, 64, 96,
                                                                     dtype=torch.int64), 255)
    for ldt in (torch.uint8, torch.int16, torch.int32):
        yield f"labels {ldt}", False, lambda ldt=ldt: KE.generate_edge(
            torch.zeros(2, 37, 70, dtype=ldt), 255)
    yield "labels int64 transposed (strided)", False, lambda: KE.generate_edge(
        torch.zeros(2, 70, 37, dtype=torch.int64).transpose(1, 2), 255)


def _lovasz_cases(dt):
    # exactly the GPU path: _lovasz_forward upcasts fp16/bf16 to float32 before the
    # kernel (float64 goes to PyTorch), so every input dtype gives *fp32 errors
    from lipfast.ops.lovasz import _lovasz_forward

    def run(b, h, w, per_image):
        x = torch.randn(b, 5, h, w).to(dt)
        lab = torch.randint(0, 5, (b, h, w))
        _lovasz_forward(x, lab, list(range(5)), True, per_image, 255, True, kernels=KL)

    yield "N=8192", True, lambda: run(2, 64, 64, False)
    yield "per image N=72", False, lambda: run(2, 8, 9, True)
    yield "N=1 (n == 1 constexpr)", False, lambda: run(1, 1, 1, True)


def _upsample_ce_cases(dt):
    def run(c, ldt, wdt, channels_last=False, ignore=255):
        x = torch.randn(2, c, 16, 16).to(dt)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lab = torch.randint(0, c, (2, 64, 64)).to(ldt)
        wt = None if wdt is None else torch.rand(c, dtype=wdt)
        nll, lse, _ = KU.forward(x, lab, wt, ignore, True)
        KU.backward(torch.ones(2, 64, 64), x, lab, wt, lse, ignore, True)

    yield "C=150 uint8 labels, fp32 weight", True, lambda: run(150, torch.uint8, torch.float32)
    yield "C=19 int64 labels, no weight", False, lambda: run(19, torch.int64, None)
    if dt != torch.float32:
        yield "C=3 int64 labels, weight in logits dtype, channels_last, ignore -100", False, \
            lambda: run(3, torch.int64, dt, channels_last=True, ignore=-100)


def _confusion_matrix_cases(dt):
    # lipfast.metrics.confusion_matrix's GPU path: logits in the float dtype (plain,
    # channels_last with fused resize), integer predictions, large C (atomics)
    def run(inp, lab, c, resize):
        KC.confusion_matrix(inp, lab, c, 255, resize)

    x = lambda c, h, w: torch.randn(2, c, h, w).to(dt)  # noqa: E731
    lab = lambda c, h, w, ldt: torch.randint(0, c, (2, h, w)).to(ldt)  # noqa: E731
    yield "C=20 logits 8x8 -> 33x33 channels_last, int64 labels", True, lambda: run(
        x(20, 8, 8).contiguous(memory_format=torch.channels_last),
        lab(20, 33, 33, torch.int64), 20, True)
    yield "C=20 int64 predictions, uint8 labels", True, lambda: run(
        lab(20, 33, 33, torch.int64), lab(20, 33, 33, torch.uint8), 20, False)
    yield "C=20 logits, uint8 labels", False, lambda: run(x(20, 33, 33),
                                                          lab(20, 33, 33, torch.uint8), 20, False)
    yield "C=150 logits (per-pixel atomics)", False, lambda: run(
        x(150, 9, 9), lab(150, 9, 9, torch.uint8), 150, False)


def _parse_postprocess_cases(dt):
    # the op's Triton path takes float32 logits only (float64: its PyTorch path),
    # whatever dtype the run is for (repeats compile once)
    aff = torch.tensor([[0.47, 3.0, 0.47, -2.0]], dtype=torch.float64)
    def run(maps, fg, cl=False):
        x = torch.randn(1, 20, 30, 30)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        KP.parse_postprocess(x, aff, 119, 119, 250, 190, maps, fg)
    yield "C=20 labels", True, lambda: run(0, False)
    yield "C=20 probs + fg", True, lambda: run(1, True)
    yield "C=20 logits channels_last", False, lambda: run(2, False, True)


def _heatmap_loss_cases(dt):
    # the pose loss: forward and backward over the heatmaps' dtype, float or bool
    # visibilities, contiguous and transposed heatmaps (one fixed configuration)
    def run(vdt, transposed=False):
        x = torch.rand(4, 16, 64, 48).to(dt)
        if transposed:
            x = torch.rand(4, 16, 48, 64).to(dt).transpose(2, 3)
        jt = torch.rand(4, 16, 2) * 192
        vis = (torch.rand(4, 16) > 0.2).to(vdt)
        _, weight, window, _ = KH.forward(x, jt, vis, (192, 256), 2.0)
        KH.backward(torch.tensor(1.0), x, weight, window, 2.0)

    yield "B=4 J=16 64x48, float visible", True, lambda: run(torch.float32)
    yield "bool visible, transposed heatmaps", False, lambda: run(torch.bool, True)


def _pose_decode_cases(dt):
    # the decode takes float32 heatmaps (fp16/bf16 are decoded in float32, float64
    # goes to the PyTorch path), with and without the fused flip test
    c = torch.rand(4, 2, dtype=torch.float64) * 100
    s = torch.rand(4, 2, dtype=torch.float64) + 0.5
    x = torch.rand(4, 16, 64, 48)
    yield "B=4 J=16 64x48", True, lambda: KD.pose_decode(x, None, c, s, list(range(16)))
    yield "flip test", True, lambda: KD.pose_decode(x, x.flip(3), c, s, list(range(16))[::-1])


CASES = [_oc_cases, _upsample_ce_cases, _confusion_matrix_cases, _lovasz_cases, _edge_cases,
         _parse_postprocess_cases, _heatmap_loss_cases, _pose_decode_cases]

# kernels launched with one fixed configuration (plain triton.jit, not autotuned
# through lipfast.kernels._tuning): name -> JITFunction
PLAIN_KERNELS = {"heatmap_loss.fwd": KH._fwd_kernel, "heatmap_loss.bwd": KH._bwd_kernel,
                 "pose_decode": KD._pose_decode_kernel}


class PlainSpec:
    """What collect() needs of a tuning spec, for a plain kernel: its name, its
    function and one configuration (the launch's own num_warps / constexprs)."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def keys(self):
        return []


def capture(launch):
    """[(spec, args, kwargs)] of the launches ``launch()`` makes (none executed)."""
    calls = []
    specs = list(_tuning.SPECS.values()) + [PlainSpec(n, f) for n, f in PLAIN_KERNELS.items()]
    for spec in specs:
        def run(*args, grid, warmup, _s=spec, **kwargs):
            calls.append((_s, args, kwargs))
        spec.fn.run = run  # JITFunction.__getitem__ calls self.run
    try:
        launch()
    finally:
        for spec in specs:
            del spec.fn.run
    assert calls, "the launcher launched no kernel"
    return calls


def specialize(backend, kernel, args, kwargs):
    """(signature, constexprs, attrs, options) as JITFunction.run would build them."""
    names = kernel.arg_names
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    sig, consts, attrs = {}, {}, {}
    for i, (p, name) in enumerate(zip(kernel.params, names)):
        val = bound.arguments[name]
        if p.is_constexpr:
            sig[name], consts[(i,)] = "constexpr", val
            continue
        ty, attr = native_specialize_impl(type(backend), val, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        sig[name] = ty
        if ty == "constexpr":
            consts[(i,)] = val
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    return sig, consts, attrs, options


def collect(arch: int, dtypes):
    """The compile jobs: (row info, kernel, signature, constexprs, attrs, options)."""
    limits = _tuning.LIMITS[arch]
    backend = make_backend(GPUTarget("cuda", arch, 32))
    jobs, seen = [], set()
    for dtype in dtypes:
        dt = TORCH_DTYPES[dtype]
        for cases in CASES:
            for label, every, launch in cases(dt):
                precs = [False]
                if cases is _oc_cases and dtype == "fp32":
                    precs = [False, True]
                for tf32 in precs:
                    old = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    try:
                        calls = capture(launch)
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = old
                    for spec, args, kwargs in calls:
                        if isinstance(spec, PlainSpec):   # its one configuration, as launched
                            cfg = triton.Config({}, num_warps=kwargs.get("num_warps", 4),
                                                num_stages=kwargs.get("num_stages", 3))
                            base = {k: v for k, v in kwargs.items() if k not in LAUNCH_KEYS}
                            configs = [cfg]
                        else:
                            cfg_keys = set(spec.keys()) | LAUNCH_KEYS
                            base = {k: v for k, v in kwargs.items() if k not in cfg_keys}
                            named = {**dict(zip(spec.fn.arg_names, args)), **base}
                            configs = (_tuning.prune(spec, spec.configs, named, limits) if every
                                       else [_tuning.prune(spec, spec.configs, named, limits)[0]])
                        for cfg in configs:
                            kw = {**base, **cfg.all_kwargs()}
                            sig, consts, attrs, options = specialize(backend, spec.fn, args, kw)
                            key = (spec.name, repr(sig), repr(consts), repr(attrs), repr(options))
                            if key in seen:
                                continue
                            seen.add(key)
                            prec = "/tf32" if tf32 else ""
                            sig_dt = dtype if any(v == f"*{_short(dt)}" for v in sig.values()) \
                                else "-"
                            jobs.append(dict(kernel=spec.name, case=label, dtype=sig_dt + prec,
                                             config=_tuning.describe(cfg), warps=cfg.num_warps,
                                             fn=spec.fn, sig=sig, consts=consts, attrs=attrs,
                                             options=options))
    return jobs, limits


def _short(dt):
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]


_JOBS: list = []
_ARCH = [0]


def compile_one(i):
    job = _JOBS[i]
    target = GPUTarget("cuda", _ARCH[0], 32)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    buf = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(ASTSource(job["fn"], job["sig"], job["consts"], job["attrs"]),
                                      target=target, options=job["options"])
    except Exception as err:  # reported in the table
        return dict(error=f"{type(err).__name__}: {str(err)[:2000]}", time=time.time() - t0)
    log = buf.getvalue()
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert "cubin" in compiled.asm
    return dict(regs=int(regs[-1]) if regs else -1, spills=int(spills[-1]) if spills else -1,
                smem=int(compiled.metadata.shared), time=time.time() - t0)


def main(argv):
    jobs_n = min(4, os.cpu_count() or 1)
    if "--jobs" in argv:
        i = argv.index("--jobs")
        jobs_n = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    arch = int(argv[0])
    dtypes = argv[1:] or ["bf16"]
    t0 = time.time()
    jobs, limits = collect(arch, dtypes)
    _JOBS[:] = jobs
    _ARCH[0] = arch
    if jobs_n > 1:
        with multiprocessing.get_context("fork").Pool(jobs_n) as pool:
            results = pool.map(compile_one, range(len(jobs)), chunksize=1)
    else:
        results = [compile_one(i) for i in range(len(jobs))]
    header = ("arch", "kernel", "case", "dtype", "configuration", "regs", "smem", "spills",
              "warps", "blk/SM regs", "smem", "warps", "blk/SM", "s")
    rows, failures = [], []
    for job, res in zip(jobs, results):
        if "error" in res:
            failures.append(f"{job['kernel']} [{job['case']}] {job['dtype']} {job['config']}: "
                            f"does not compile: {res['error']}")
            rows.append((f"sm_{arch}", job["kernel"], job["case"], job["dtype"], job["config"],
                         "FAILED", "", "", job["warps"], "", "", "", "", f"{res['time']:.1f}"))
            continue
        occ = _tuning.occupancy(res["regs"], res["smem"], job["warps"], limits)
        rows.append((f"sm_{arch}", job["kernel"], job["case"], job["dtype"], job["config"],
                     res["regs"], res["smem"], res["spills"], job["warps"], occ["regs"],
                     occ["smem"], occ["warps"], occ["blocks"], f"{res['time']:.1f}"))
        if res["smem"] > limits.smem_per_block:
            failures.append(f"{job['kernel']} [{job['case']}] {job['dtype']} {job['config']}: "
                            f"shared memory {res['smem']} B > {limits.smem_per_block} B")
        if res["spills"] != 0:
            failures.append(f"{job['kernel']} [{job['case']}] {job['dtype']} {job['config']}: "
                            f"spills {res['spills']} B of registers (regs {res['regs']})")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print(" | ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip(), flush=True)
    print(f"sm_{arch}: {len(rows)} compiles ({len(set((j['kernel'], j['config']) for j in jobs))} "
          f"kernel configurations) in {time.time() - t0:.1f} s with {jobs_n} processes")
    for f in failures:
        print("FAIL " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
