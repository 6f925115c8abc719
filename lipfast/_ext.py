"""Loads the compiled extension ``lipfast._C``, building it just in time if needed.

Order: the ahead-of-time build (``pip install --no-build-isolation -e .``); if it
is missing (an isolated ``pip install`` without torch in the build environment)
or no longer loads against the running torch (ABI mismatch after a torch
upgrade), the same sources are compiled with ``torch.utils.cpp_extension.load``
into a cache folder keyed by torch and Python version, with one log line.
``LIPFAST_FORCE_JIT=1`` skips the installed module (used by the tests).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from . import _build

logger = logging.getLogger("lipfast")

_module: ModuleType | None = None
_how: str = ""


def _cache_dir() -> Path:
    import torch

    base = os.environ.get("LIPFAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lipfast"
    )
    cuda = torch.version.cuda or "cpu"
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-{cuda}"
    path = Path(base) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_build(reason: str) -> ModuleType:
    import torch
    from torch.utils import cpp_extension

    root = _build.csrc_dir()
    with_cuda = _build.want_cuda(torch, cpp_extension.CUDA_HOME)
    build_dir = _cache_dir()
    logger.warning(
        "lipfast: %s; compiling the C++%s extension just in time into %s "
        "(once per torch version, about a minute)",
        reason,
        "/CUDA" if with_cuda else "",
        build_dir,
    )
    try:
        return cpp_extension.load(
            name="lipfast_jit_C",
            sources=_build.sources(root, with_cuda),
            extra_cflags=list(_build.CXX_FLAGS)
            + [f"-D{k}" for k, _ in _build.define_macros(with_cuda)],
            extra_cuda_cflags=list(_build.NVCC_FLAGS),
            extra_ldflags=list(_build.LINK_FLAGS),
            extra_include_paths=[str(root)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            verbose=False,
        )
    except Exception as err:  # compiler errors come as RuntimeError with the output
        raise RuntimeError(
            "lipfast: building the C++ extension just in time failed "
            f"(sources: {root}, build folder: {build_dir}). Compiler output:\n{err}"
        ) from err


def load() -> ModuleType:
    """Returns the extension module, loading (or building) it on first call.
    Importing it registers the ops under ``torch.ops.lipfast``."""
    global _module, _how
    if _module is not None:
        return _module
    reason = "LIPFAST_FORCE_JIT=1"
    if os.environ.get("LIPFAST_FORCE_JIT") != "1":
        try:
            if importlib.util.find_spec(f"{__package__}._C") is None:
                reason = "lipfast._C is not built (plain pip install, or a source checkout)"
            else:
                from . import _C  # type: ignore[attr-defined]

                _module, _how = _C, "installed"
                return _module
        except ImportError as err:  # typically built against another torch
            reason = f"the installed lipfast._C does not load ({err})"
    _module, _how = _jit_build(reason), "jit"
    return _module


def build_info() -> dict:
    """How the extension was obtained and what it contains."""
    mod = load()
    return {
        "source": _how,
        "path": getattr(mod, "__file__", None),
        "built_with_cuda": bool(mod.built_with_cuda()),
        "cuda_version": mod.cuda_version(),
    }
