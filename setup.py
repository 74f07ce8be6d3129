"""Extension build for fastdiff; the package metadata lives in pyproject.toml.

The C++ CPU module ``fastdiff._C`` is built from ``csrc/*.cpp`` when there are sources there and
``FASTDIFF_SKIP_EXT`` is not set; the CUDA module ``fastdiff._C_cuda`` from ``csrc/*.cu`` when
``FASTDIFF_BUILD_CUDA=1`` (or nvcc and a CUDA build of torch are found); ``FASTDIFF_SANITIZE=address``
builds the C++ module with AddressSanitizer (see csrc/README.md). torch must already be
installed: build with ``pip install -e . --no-build-isolation``. ``MAX_JOBS`` limits parallel compiles.
Without sources or a compiler the package installs as pure Python and falls back to the references.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _truthy("FASTDIFF_SKIP_EXT"):
        print("fastdiff: FASTDIFF_SKIP_EXT set, building pure Python", file=sys.stderr)
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # The CUDA module: kernels in csrc/cuda/*.cu, the torch binding in csrc/cuda/binding.cpp.
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources and not cu_sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
        import torch
    except ImportError:
        print("fastdiff: torch is not importable at build time (use --no-build-isolation); "
              "skipping the extensions", file=sys.stderr)
        return [], {}
    exts = []
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    if cpp_sources:
        # -fno-trapping-math / -fno-math-errno (as torch itself is built) let GCC vectorise the exp loops.
        # FASTDIFF_SANITIZE=address builds an AddressSanitizer module for csrc/README.md's check.
        san = os.environ.get("FASTDIFF_SANITIZE", "").strip()
        san_flags = [f"-fsanitize={san}", "-fno-omit-frame-pointer", "-g"] if san else ["-g0"]
        exts.append(CppExtension(
            "fastdiff._C", cpp_sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math",
                                        *san_flags, *omp]},
            extra_link_args=[*omp, *([f"-fsanitize={san}"] if san else [])],
        ))
    want_cuda = _truthy("FASTDIFF_BUILD_CUDA") or (
        os.environ.get("FASTDIFF_BUILD_CUDA") is None and shutil.which("nvcc") and torch.version.cuda
    )
    if cu_sources and want_cuda:
        if not torch.version.cuda:
            raise RuntimeError("fastdiff: FASTDIFF_BUILD_CUDA=1 needs a CUDA build of torch "
                               f"(this torch {torch.__version__} is CPU-only)")
        archs = [a.strip() for a in os.environ.get("FASTDIFF_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        # No -std here: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
        exts.append(CUDAExtension(
            "fastdiff._C_cuda", [*cu_sources, os.path.join("csrc", "cuda", "binding.cpp")],
            include_dirs=[os.path.join(HERE, "csrc", "cuda")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},
        ))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
