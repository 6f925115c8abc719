"""Where lipfast's C++/CUDA sources are and how they are compiled.

Shared by ``setup.py`` (ahead-of-time build) and :mod:`lipfast._ext` (the
just-in-time fallback), so both build the same thing. Imports nothing from
torch at module level: ``setup.py`` loads this file before torch may exist.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# -fopenmp: at::parallel_for is header code that runs serially without it.
# -fno-wrapv undoes Python's CFLAGS (signed wrap-around blocks loop vectorisation);
# -fno-trapping-math lets gcc vectorise the select-based activation loops.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-wrapv", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def csrc_dir() -> Path:
    """The folder holding the sources: the checkout's ``csrc/`` or the copy
    shipped inside an installed package (``lipfast/_csrc``)."""
    override = os.environ.get("LIPFAST_CSRC_DIR")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "_csrc"):
        if (cand / "lipfast.cpp").is_file():
            return cand
    raise FileNotFoundError(
        "lipfast: cannot find the C++ sources (looked for csrc/ beside the package and "
        "lipfast/_csrc); reinstall lipfast from a source checkout"
    )


def sources(root: Path, with_cuda: bool) -> list[str]:
    """Every translation unit: csrc/lipfast.cpp, csrc/ops/*.cpp, csrc/ops/cpu/*.cpp,
    csrc/ops/autograd/*.cpp, and with CUDA csrc/ops/cuda/*.cu and *_cuda.cpp."""
    files = [root / "lipfast.cpp"]
    files += sorted((root / "ops").glob("*.cpp"))
    files += sorted((root / "ops" / "cpu").glob("*.cpp"))
    files += sorted((root / "ops" / "autograd").glob("*.cpp"))
    if with_cuda:
        files += sorted((root / "ops" / "cuda").glob("*.cu"))
        files += sorted((root / "ops" / "cuda").glob("*.cpp"))
    return [str(f) for f in files]


def find_nvcc(cuda_home: str | None) -> str | None:
    if cuda_home:
        cand = Path(cuda_home) / "bin" / "nvcc"
        if cand.is_file():
            return str(cand)
    return shutil.which("nvcc")


def want_cuda(torch_module, cuda_home: str | None) -> bool:
    """Build the CUDA kernels when torch was built with CUDA and nvcc is found
    (a GPU need not be visible), unless LIPFAST_NO_CUDA=1."""
    if os.environ.get("LIPFAST_NO_CUDA") == "1":
        return False
    if torch_module.version.cuda is None:
        return False
    return find_nvcc(cuda_home) is not None


def define_macros(with_cuda: bool) -> list[tuple[str, str | None]]:
    return [("LIPFAST_WITH_CUDA", None)] if with_cuda else []


def build_temp_dir(root: Path, torch_module, with_cuda: bool) -> Path:
    """The persistent folder of the ahead-of-time build's object files:
    ``build/temp-<python>-<torch>-<cpu|cuda version>`` under the checkout
    (``LIPFAST_BUILD_TEMP=tmp`` keeps setuptools' temporary folder instead)."""
    import sys

    cuda = f"cuda{torch_module.version.cuda}" if with_cuda else "cpu"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch_module.__version__}-{cuda}"
    return Path(root) / "build" / ("temp-" + tag.replace("+", "_"))
