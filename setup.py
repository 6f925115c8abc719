"""Builds lipfast._C when torch is importable (``pip install --no-build-isolation -e .``).

C++ sources always; CUDA sources too when torch has CUDA and nvcc is found
(TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured by torch's BuildExtension).
Without torch in the build environment (plain isolated ``pip install``) no
extension is built here and lipfast compiles the same sources on first use.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_lipfast_build", ROOT / "lipfast" / "_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as lipfast/_csrc for the just-in-time build
    of non-editable installs."""

    def run(self):
        super().run()
        if not self.editable_mode:
            dest = Path(self.build_lib) / "lipfast" / "_csrc"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(ROOT / "csrc", dest)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    torch = None

if torch is not None and os.environ.get("LIPFAST_SKIP_BUILD") != "1":
    with_cuda = build.want_cuda(torch, cpp_extension.CUDA_HOME)
    ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    csrc = ROOT / "csrc"
    ext_modules.append(
        ext_cls(
            name="lipfast._C",
            sources=[os.path.relpath(s, ROOT) for s in build.sources(csrc, with_cuda)],
            include_dirs=[str(csrc)],
            define_macros=build.define_macros(with_cuda),
            extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
            extra_link_args=build.LINK_FLAGS,
        )
    )

    class BuildExtInPlace(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Keeps the object files in a folder of the checkout (``build/``, ignored
        by git) instead of the temporary one an editable install gets, so that a
        second ``pip install --no-build-isolation -e .`` lets ninja rebuild only
        what changed (usually nothing but the link step). The folder is keyed by
        Python, torch and CUDA, so another torch never reuses stale objects."""

        def finalize_options(self):
            super().finalize_options()
            if os.environ.get("LIPFAST_BUILD_TEMP") != "tmp":
                self.build_temp = str(build.build_temp_dir(ROOT, torch, with_cuda))

    cmdclass["build_ext"] = BuildExtInPlace

setup(
    packages=find_packages(include=["lipfast", "lipfast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
