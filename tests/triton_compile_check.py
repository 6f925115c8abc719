"""Compiles lipfast's Triton kernels for a GPU architecture without a GPU
(Triton's ahead-of-time path: TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
bundled ptxas). Run as a script, never under TRITON_INTERPRET:

    python tests/triton_compile_check.py 90 bf16 fp16 fp32

oc_attention's kernels use an explicit signature table. The kernels of
lipfast.kernels.{edge, lovasz, upsample_ce, confusion_matrix} are compiled with the exact
signatures their launchers produce: each launcher is run on CPU tensors of the
dtypes the GPU dispatch passes it (a small table of cases per kernel below), the
kernel launch is intercepted, and the arguments are specialised by Triton's own
runtime rules (pointer element types, i32/i64/fp32 scalars, integers equal to 1
as constexpr, 16-divisibility), with the constexpr values (block sizes, ACC,
HAS_W, ...) the launcher picked. Identical specialisations compile once.
"""

import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

from lipfast.kernels import confusion_matrix as KC  # noqa: E402
from lipfast.kernels import edge as KE  # noqa: E402
from lipfast.kernels import lovasz as KL  # noqa: E402
from lipfast.kernels import oc_attention as K  # noqa: E402
from lipfast.kernels import upsample_ce as KU  # noqa: E402

TENSOR_ARGS = {"QK", "V", "O", "DO", "DVo", "DX"}
STAT_ARGS = {"LSE", "DELTA"}
TABLE_ARGS = {"tiles", "regions"}

KERNELS = [
    (K._fwd_kernel, {"BLOCK_DV": 128}),
    (K._bwd_dv_kernel, {"BLOCK_DV": 128}),
    (K._bwd_dx_kernel, {"BLOCK_DO": 128}),
]


def signature(kernel, dtype, constexprs):
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in TENSOR_ARGS:
            types[name] = f"*{dtype}"
        elif name in STAT_ARGS:
            types[name] = "*fp32"
        elif name in TABLE_ARGS:
            types[name] = "*i32"
        elif name.startswith("scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def compile_all(arch: int, dtypes):
    for dtype in dtypes:
        # both precisions the launcher can pick for float32 (allow_tf32 on / off)
        for prec in (["tf32", "ieee"] if dtype == "fp32" else ["ieee"]):
            compile_dtype(arch, dtype, prec)
    compile_launched(arch, dtypes)


def compile_dtype(arch: int, dtype: str, prec: str):
    for kernel, extra in KERNELS:
        consts = dict(ACC=tl.float32, PREC=prec, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, **extra)
        src = ASTSource(
            fn=kernel,
            signature=signature(kernel, dtype, consts),
            constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()},
        )
        t0 = time.time()
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
        assert "cubin" in compiled.asm
        print(f"sm_{arch} {dtype}/{prec} {kernel.__name__}: ok in {time.time() - t0:.1f} s, "
              f"shared memory {compiled.metadata.shared} B")


# ------------------------------------------- kernels compiled as their launchers call them

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAUNCHED = [KE._edge_kernel, KL._lovasz_grad_kernel, KU._fwd_kernel, KU._bwd_kernel,
            KC._cm_kernel]


def _edge_cases(dt):
    # labels are read in their own integer dtype (losses.edge accepts these four);
    # independent of the float dtype (identical cases are deduplicated)
    for ldt in (torch.uint8, torch.int16, torch.int32, torch.int64):
        yield f"labels {ldt}", lambda ldt=ldt: KE.generate_edge(
            torch.zeros(2, 37, 70, dtype=ldt), 255)
    yield "labels int64 transposed (strided)", lambda: KE.generate_edge(
        torch.zeros(2, 70, 37, dtype=torch.int64).transpose(1, 2), 255)


def _lovasz_cases(dt):
    # exactly the GPU path: _lovasz_forward upcasts fp16/bf16 to float32 before the
    # kernel (float64 goes to PyTorch), so every input dtype gives *fp32 errors
    from lipfast.ops.lovasz import _lovasz_forward

    def run(b, h, w, per_image):
        x = torch.randn(b, 5, h, w).to(dt)
        lab = torch.randint(0, 5, (b, h, w))
        _lovasz_forward(x, lab, list(range(5)), True, per_image, 255, True, kernels=KL)

    yield "N=3200 (BLOCK 1024)", lambda: run(2, 40, 40, False)
    yield "per image N=72 (BLOCK 128)", lambda: run(2, 8, 9, True)
    yield "N=1 (BLOCK 1, n == 1 constexpr)", lambda: run(1, 1, 1, True)


def _upsample_ce_cases(dt):
    def run(c, ldt, wdt, channels_last=False, ignore=255):
        x = torch.randn(2, c, 16, 16).to(dt)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lab = torch.randint(0, c, (2, 64, 64)).to(ldt)
        wt = None if wdt is None else torch.rand(c, dtype=wdt)
        nll, lse, _ = KU.forward(x, lab, wt, ignore, True)
        KU.backward(torch.ones(2, 64, 64), x, lab, wt, lse, ignore, True)

    yield "C=19 int64 labels, no weight", lambda: run(19, torch.int64, None)
    yield "C=150 uint8 labels, fp32 weight", lambda: run(150, torch.uint8, torch.float32)
    if dt != torch.float32:
        yield "C=3 int64 labels, weight in logits dtype, channels_last, ignore -100", \
            lambda: run(3, torch.int64, dt, channels_last=True, ignore=-100)


def _confusion_matrix_cases(dt):
    # lipfast.metrics.confusion_matrix's GPU path: logits in the float dtype (plain,
    # channels_last with fused resize), integer predictions, large C (atomics)
    def run(inp, lab, c, resize):
        KC.confusion_matrix(inp, lab, c, 255, resize)

    x = lambda c, h, w: torch.randn(2, c, h, w).to(dt)  # noqa: E731
    lab = lambda c, h, w, ldt: torch.randint(0, c, (2, h, w)).to(ldt)  # noqa: E731
    yield "C=20 logits, uint8 labels", lambda: run(x(20, 33, 33), lab(20, 33, 33, torch.uint8),
                                                   20, False)
    yield "C=20 logits 8x8 -> 33x33 channels_last, int64 labels", lambda: run(
        x(20, 8, 8).contiguous(memory_format=torch.channels_last),
        lab(20, 33, 33, torch.int64), 20, True)
    yield "C=150 logits (per-pixel atomics)", lambda: run(x(150, 9, 9),
                                                          lab(150, 9, 9, torch.uint8), 150, False)
    yield "C=20 int64 predictions, uint8 labels", lambda: run(
        lab(20, 33, 33, torch.int64), lab(20, 33, 33, torch.uint8), 20, False)


CASES = [_edge_cases, _lovasz_cases, _upsample_ce_cases, _confusion_matrix_cases]


def capture(launch):
    """[(kernel, args, kwargs)] of the launches ``launch()`` makes (none executed)."""
    calls = []
    for kernel in LAUNCHED:
        def run(*args, grid, warmup, _k=kernel, **kwargs):
            calls.append((_k, args, kwargs))
        kernel.run = run  # JITFunction.__getitem__ calls self.run
    try:
        launch()
    finally:
        for kernel in LAUNCHED:
            del kernel.run
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


def compile_launched(arch: int, dtypes):
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen = set()
    for dtype in dtypes:
        dt = TORCH_DTYPES[dtype]
        for cases in CASES:
            for label, launch in cases(dt):
                for kernel, args, kwargs in capture(launch):
                    sig, consts, attrs, options = specialize(backend, kernel, args, kwargs)
                    key = (kernel.__name__, kernel.__module__, repr(sig), repr(consts),
                           repr(attrs), repr(options))
                    if key in seen:
                        continue
                    seen.add(key)
                    name = f"{kernel.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}"
                    t0 = time.time()
                    try:
                        compiled = triton.compile(ASTSource(kernel, sig, consts, attrs),
                                                  target=target, options=options)
                    except Exception:
                        print(f"sm_{arch} {dtype} {name} [{label}] FAILED\n  signature {sig}\n"
                              f"  constexprs {consts}", flush=True)
                        raise
                    assert "cubin" in compiled.asm
                    shown = {k: v for k, v in sig.items() if v != "constexpr"}
                    cx = {kernel.arg_names[k[0]]: v for k, v in consts.items()}
                    print(f"sm_{arch} {dtype} {name} [{label}]: ok in {time.time() - t0:.1f} s, "
                          f"shared memory {compiled.metadata.shared} B\n    {shown}\n    {cx}",
                          flush=True)


if __name__ == "__main__":
    compile_all(int(sys.argv[1]), sys.argv[2:] or ["bf16"])
