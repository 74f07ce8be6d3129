"""Extension build for fastdiff; the package metadata lives in pyproject.toml.

What gets built, and what happens when it cannot be:

* The C++ CPU module ``fastdiff._C`` (``csrc/*.cpp``: one file per kernel family and ``binding.cpp``, which
  registers the ``torch.library`` ops ``fastdiff_cpp::*``) is compiled against the torch that is installed,
  so torch must be importable at build time: install torch first, then
  ``pip install --no-build-isolation .`` (``-e`` for a checkout). Under pip's default build isolation the
  build environment has no torch; the build then **stops with an error** saying so, instead of quietly
  producing a pure-Python wheel. ``FASTDIFF_SKIP_EXT=1`` asks for the pure-Python install explicitly.
* With torch but **no working C++ compiler** (none found, or ``CC`` / ``CXX`` not able to compile a
  one-line program), the package installs as pure Python: the ops run their PyTorch references. The
  reason is printed here and recorded, and the run time says it again (``fastdiff info``, the header of
  ``fastdiff generate``, and a one-time ``BackendFallbackWarning`` from ``backend="auto"``).
* A compiler that works but fails on our sources is a bug: the build fails, loudly.
* The CUDA module ``fastdiff._C_cuda`` (``csrc/cuda/``: ``*.cu`` kernels, one file per kernel family, and
  ``binding.cpp``, which registers ``fastdiff_cuda::*``) is built with ``FASTDIFF_BUILD_CUDA=1``, or when
  nvcc and a CUDA build of torch are both found (``FASTDIFF_BUILD_CUDA=0`` turns that off).

Every build writes ``fastdiff/_build_info.json``: the torch version the extensions were compiled for,
which were built and why not. ``fastdiff._backends`` reads it, so an extension built for another torch is
refused with both versions named (and ``auto`` falls back to the reference with a warning) instead of
failing with an undefined-symbol error. Other switches: ``FASTDIFF_CUDA_ARCHS`` (default ``80;90``),
``FASTDIFF_SANITIZE=address`` (an AddressSanitizer build of the C++ module, csrc/README.md), ``MAX_JOBS``.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(HERE, "fastdiff", "_build_info.json")
PURE = "FASTDIFF_SKIP_EXT=1"
NO_ISOLATION = ("install torch first (pip install torch==<version>), then build against it: "
                "pip install --no-build-isolation <this directory or sdist>")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"fastdiff setup: {msg}", file=sys.stderr)


def _write_info(info: dict) -> None:
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")


def _compiler_problem() -> str:
    """Why no C++ compiler works here ("" when one does): the one setuptools will call (``CXX``, else
    ``CC``, else the interpreter's configured compiler), asked to compile a one-line C++ file."""
    for var in ("CXX", "CC"):
        if os.environ.get(var):
            cmd, source = shlex.split(os.environ[var]), f"{var}={os.environ[var]}"
            break
    else:
        cmd = shlex.split(sysconfig.get_config_var("CXX") or sysconfig.get_config_var("CC") or "c++")
        source = "the interpreter's compiler"
    if not cmd or shutil.which(cmd[0]) is None:
        return f"no C++ compiler found ({source}: {cmd[0] if cmd else '(empty)'} is not on PATH)"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            r = subprocess.run([*cmd, "-x", "c++", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                               capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"the C++ compiler does not run ({source}: {e})"
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip().splitlines()
            return f"the C++ compiler cannot compile a one-line program ({source}, exit {r.returncode}" + (
                f": {err[-1]}" if err else "") + ")"
    return ""


def _extensions():
    # The C++ module: one translation unit per kernel family and binding.cpp (the registration); the shared
    # headers (schema.h, rows.h, cpu_common.h, parallel.h) are included, not compiled.
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # The CUDA module: kernels in csrc/cuda/*.cu, the torch binding in csrc/cuda/binding.cpp (which also
    # includes csrc/schema.h, the schemas both modules register).
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    info = {"torch": None, "cpp": False, "cpp_reason": "", "cpp_skipped": False, "cuda": False, "cuda_reason": ""}
    if _truthy("FASTDIFF_SKIP_EXT"):
        _say(f"{PURE} set: installing pure Python (the ops run their PyTorch references)")
        info.update(cpp_reason=f"{PURE} was set at install time", cpp_skipped=True,
                    cuda_reason=f"{PURE} was set at install time")
        _write_info(info)
        return [], {}
    if not cpp_sources and not cu_sources:
        info.update(cpp_reason="no C++ sources (csrc/*.cpp) in this source tree", cuda_reason="no CUDA sources")
        _write_info(info)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        raise SystemExit(
            "fastdiff setup: error: torch is not importable in the build environment "
            f"({e}). fastdiff's C++ kernels are compiled against the torch you will run, and pip's default "
            f"build isolation hides it. Either {NO_ISOLATION}; or set {PURE} to install without the kernels "
            "(pure Python, the PyTorch reference ops)."
        ) from None
    info["torch"] = torch.__version__
    exts = []
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    problem = _compiler_problem() if (cpp_sources or cu_sources) else ""
    if problem:
        _say(f"WARNING: {problem}: installing WITHOUT the C++ kernels (pure Python, the PyTorch reference "
             "ops; `fastdiff info` will say so). Install a C++ compiler (g++ / clang++) and reinstall to get them.")
        info.update(cpp_reason=problem, cuda_reason=problem)
        _write_info(info)
        return [], {}
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
        info["cpp"] = True
    else:
        info["cpp_reason"] = "no C++ sources (csrc/*.cpp) in this source tree"
    env_cuda = os.environ.get("FASTDIFF_BUILD_CUDA")
    want_cuda = _truthy("FASTDIFF_BUILD_CUDA") or (
        env_cuda is None and bool(shutil.which("nvcc")) and bool(torch.version.cuda)
    )
    if cu_sources and want_cuda:
        if not torch.version.cuda:
            raise SystemExit("fastdiff setup: error: FASTDIFF_BUILD_CUDA=1 needs a CUDA build of torch "
                             f"(this torch {torch.__version__} is CPU-only)")
        archs = [a.strip() for a in os.environ.get("FASTDIFF_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        # No -std here: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
        exts.append(CUDAExtension(
            "fastdiff._C_cuda", [*cu_sources, os.path.join("csrc", "cuda", "binding.cpp")],
            include_dirs=[os.path.join(HERE, "csrc", "cuda"), os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},
        ))
        info["cuda"] = True
    elif not cu_sources:
        info["cuda_reason"] = "no CUDA sources (csrc/cuda/*.cu) in this source tree"
    elif env_cuda is not None and not _truthy("FASTDIFF_BUILD_CUDA"):
        info["cuda_reason"] = f"FASTDIFF_BUILD_CUDA={env_cuda} at install time"
    elif not torch.version.cuda:
        info["cuda_reason"] = f"built against a CPU-only torch ({torch.__version__})"
    else:
        info["cuda_reason"] = "nvcc was not found at install time"
    _write_info(info)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


# Only a build writes the record; metadata-only commands (egg_info, sdist, --name ...) leave it alone.
_BUILDS = {"build", "build_ext", "build_py", "bdist_wheel", "install", "develop", "editable_wheel", "bdist_egg"}
if _BUILDS & set(sys.argv[1:]):
    ext_modules, cmdclass = _extensions()
else:
    ext_modules, cmdclass = [], {}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
