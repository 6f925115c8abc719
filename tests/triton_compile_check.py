"""Compiles lipfast's Triton kernels for a GPU architecture without a GPU
(Triton's ahead-of-time path: TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
bundled ptxas). Run as a script, never under TRITON_INTERPRET:

    python tests/triton_compile_check.py 90 bf16 fp16 fp32
"""

import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lipfast.kernels import oc_attention as K  # noqa: E402

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


if __name__ == "__main__":
    compile_all(int(sys.argv[1]), sys.argv[2:] or ["bf16"])
