"""The extension's build paths: just-in-time fallback (missing or ABI-broken
lipfast._C), clear errors from a failing build, and a compile check of the CUDA
sources on this GPU-less machine."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lipfast
from lipfast import _build

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def run_python(code, env_extra, timeout=900):
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_build_info_and_registered_ops():
    info = lipfast.build_info()
    assert info["source"] in ("installed", "jit")
    assert info["built_with_cuda"] == (info["cuda_version"] != "")
    for name in ("abn_stats", "abn_forward_", "abn_backward_reduce", "abn_backward_elemt"):
        assert hasattr(torch.ops.lipfast, name)


def test_sources_are_laid_out_per_op():
    files = [Path(f).relative_to(CSRC).as_posix() for f in _build.sources(CSRC, with_cuda=True)]
    assert "lipfast.cpp" in files
    assert "ops/abn.cpp" in files and "ops/cpu/abn_kernel.cpp" in files
    assert "ops/cuda/abn_kernel.cu" in files and "ops/cuda/abn_cuda.cpp" in files
    assert not any(f.startswith("ops/cuda") for f in _build.sources(CSRC, with_cuda=False))


# The just-in-time tests compile the smallest source set that still goes through
# the real fallback: the module (lipfast.cpp) and one op family (abn: schema, CPU
# kernel). The __init__ of ``lipfast`` and of ``lipfast.ops`` would register every
# op, so the child process stands both packages up without running them and
# imports ``lipfast._ext`` and ``lipfast.ops.abn`` directly. That the full source
# list builds is shown by the ahead-of-time build, which compiles the same
# _build.sources() with the same _build flags.
JIT_SOURCES = ("lipfast.cpp", "ops/abn.h", "ops/abn.cpp", "ops/cpu/abn_kernel.cpp")

PACKAGE_WITHOUT_INIT = f"""
    import sys, types
    for name, folder in (("lipfast", {str(ROOT / "lipfast")!r}),
                         ("lipfast.ops", {str(ROOT / "lipfast" / "ops")!r})):
        pkg = types.ModuleType(name)
        pkg.__path__ = [folder]
        sys.modules[name] = pkg
"""

CHECK_OPS = PACKAGE_WITHOUT_INIT + """
    import torch, torch.nn.functional as F
    from lipfast import _ext
    from lipfast.ops import abn as ops
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64) + 0.5
    y = ops.inplace_abn(x.clone(), w, None, None, None)
    ref = F.leaky_relu(F.batch_norm(x, None, None, w.abs() + 1e-5, None, True, 0.1, 1e-5), 0.01)
    torch.testing.assert_close(y, ref)
    print("SOURCE", _ext.build_info()["source"])
"""


def reduced_sources(dest: Path) -> Path:
    for name in JIT_SOURCES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CSRC / name, dest / name)
    return dest


def test_jit_source_set_is_self_contained():
    # every file the reduced set's translation units include from csrc/ is in it
    import re

    for name in JIT_SOURCES:
        for inc in re.findall(r'#include "([^"]+)"', (CSRC / name).read_text()):
            target = ((CSRC / name).parent / inc).resolve().relative_to(CSRC).as_posix()
            assert target in JIT_SOURCES, (name, inc)


@pytest.mark.slow
def test_jit_fallback_when_installed_module_does_not_load(tmp_path):
    # Simulates an installed lipfast._C built against another torch: importing it
    # fails with an undefined-symbol ImportError, as after a torch upgrade.
    code = """
        import importlib.abc, sys
        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "lipfast._C":
                    raise ImportError("lipfast/_C.so: undefined symbol: _ZN3c1015SmallVectorBase")
        sys.meta_path.insert(0, Broken())
    """
    code = textwrap.dedent(code) + textwrap.dedent(CHECK_OPS)
    env = {"LIPFAST_CACHE_DIR": str(tmp_path / "cache"),
           "LIPFAST_CSRC_DIR": str(reduced_sources(tmp_path / "csrc"))}
    first = run_python(code, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "SOURCE jit" in first.stdout
    assert "does not load" in first.stderr and "undefined symbol" in first.stderr
    assert "compiling the C++" in first.stderr
    built = list((tmp_path / "cache").rglob("lipfast_jit_C*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    # Second use: cached, not rebuilt.
    second = run_python(textwrap.dedent(CHECK_OPS), {**env, "LIPFAST_FORCE_JIT": "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    assert "SOURCE jit" in second.stdout
    assert built[0].stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_failed_jit_build_reports_compiler_output(tmp_path):
    # a reduced copy of the sources (the module and one op) whose translation units
    # include a header that does not exist: the compiler stops at once (a fatal error)
    broken = tmp_path / "csrc"
    (broken / "ops").mkdir(parents=True)
    shutil.copy(CSRC / "ops" / "abn.h", broken / "ops")
    for name in ("lipfast.cpp", "ops/abn.cpp"):
        text = (CSRC / name).read_text()
        (broken / name).write_text('#include "lipfast_broken_marker.h"\n' + text)
    env = {"LIPFAST_FORCE_JIT": "1", "LIPFAST_CSRC_DIR": str(broken),
           "LIPFAST_CACHE_DIR": str(tmp_path / "cache")}
    res = run_python("import lipfast", env)
    assert res.returncode != 0
    assert "building the C++ extension just in time failed" in res.stderr
    assert "lipfast_broken_marker" in res.stderr  # the compiler's own message


def _nvcc():
    return _build.find_nvcc(os.environ.get("CUDA_HOME"))


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile_with_nvcc(tmp_path, arch):
    # The kernels include no torch header, so nvcc alone checks them here.
    for cu in sorted((CSRC / "ops" / "cuda").glob("*.cu")):
        res = subprocess.run(
            [_nvcc(), "-std=c++20", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}",
             "-Xptxas=-warn-spills", "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))],
            capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert "spill" not in res.stderr.lower(), res.stderr


@pytest.mark.skipif(_nvcc() is None, reason="nvcc (CUDA headers) not installed")
def test_cuda_glue_parses_against_torch_headers(tmp_path):
    # The CPU torch wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h),
    # so a stand-in defines its single macro; this checks syntax and types of the
    # torch glue, not linking.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    from torch.utils.cpp_extension import include_paths

    homes = [os.environ.get("CUDA_HOME"), Path(_nvcc()).resolve().parents[1], "/usr/local/cuda"]
    cuda_inc = next((Path(h) / "include" for h in homes
                     if h and (Path(h) / "include" / "cuda_runtime_api.h").is_file()), None)
    assert cuda_inc is not None, "nvcc found but no cuda_runtime_api.h beside it"
    import sysconfig

    incs = [f"-I{p}" for p in include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_inc}", f"-I{tmp_path / 'stub'}",
        f"-I{CSRC}"]
    for src in [CSRC / "lipfast.cpp", *sorted((CSRC / "ops" / "cuda").glob("*.cpp"))]:
        res = subprocess.run(
            ["c++", "-fsyntax-only", "-std=c++20", "-DLIPFAST_WITH_CUDA",
             "-DTORCH_EXTENSION_NAME=_C", *incs, str(src)],
            capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr


def test_gpu_paths_fall_back_without_triton():
    # lipfast.kernels.load: float64 and a missing Triton select the PyTorch path,
    # the latter with one warning per op.
    code = """
        import sys, warnings, torch
        from lipfast import kernels
        assert kernels.load("oc_attention", "op", torch.float64) is None
        assert kernels.load("oc_attention", "op", torch.float32).__name__.endswith("oc_attention")
        sys.modules["triton"] = None  # as on a machine without Triton
        for k in [m for m in sys.modules if m.startswith("lipfast.kernels.")]:
            del sys.modules[k]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert kernels.load("lovasz", "lipfast.lovasz_softmax", torch.float32) is None
            assert kernels.load("lovasz", "lipfast.lovasz_softmax", torch.float32) is None
        assert len(w) == 1 and "Triton is not available" in str(w[0].message), w
        print("OK")
    """
    res = run_python(code, {})
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
