"""Which kernel backends this installation has. Probed once, lazily; nothing here imports a compiler,
Triton or CUDA unless asked, so ``import fastdiff`` works on a bare CPU machine."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REINSTALL = "pip install -e . --no-build-isolation  (from the fastdiff checkout; see README 'Building')"


@dataclass(frozen=True)
class Backend:
    name: str
    module: object | None
    reason: str  # why it is unavailable ("" when available)

    @property
    def available(self) -> bool:
        return self.module is not None


@functools.lru_cache(maxsize=None)
def cpp() -> Backend:
    """The C++ CPU backend: ``fastdiff._cpp``, the op wrappers around the extension ``fastdiff._C``
    (built by setup.py unless FASTDIFF_SKIP_EXT=1)."""
    try:
        mod = importlib.import_module("fastdiff._cpp")
    except ImportError as e:
        return Backend("cpp", None, f"the C++ extension fastdiff._C is not built ({e}); build it with: {REINSTALL}")
    return Backend("cpp", mod, "")


@functools.lru_cache(maxsize=None)
def cuda() -> Backend:
    """The CUDA backend: ``fastdiff._cuda``, the op wrappers around the extension ``fastdiff._C_cuda``
    (built when nvcc and a CUDA build of torch are present, or with FASTDIFF_BUILD_CUDA=1)."""
    if not torch.cuda.is_available():
        return Backend("cuda", None, "no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    try:
        mod = importlib.import_module("fastdiff._cuda")
    except ImportError as e:
        return Backend("cuda", None, f"the CUDA extension fastdiff._C_cuda is not built ({e}); build it with "
                                     f"FASTDIFF_BUILD_CUDA=1 {REINSTALL}")
    return Backend("cuda", mod, "")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton() -> Backend:
    """Triton kernels (``fastdiff.kernels``): need ``triton`` and a GPU, or TRITON_INTERPRET=1 on CPU."""
    if importlib.util.find_spec("triton") is None:
        return Backend("triton", None, "triton is not installed; install it with: pip install 'fastdiff[triton]'")
    if not (torch.cuda.is_available() or triton_interpret()):
        return Backend("triton", None, "Triton needs a GPU (or TRITON_INTERPRET=1 to run kernels on the CPU)")
    try:
        mod = _import_kernels()
    except ImportError as e:
        return Backend("triton", None, f"fastdiff.kernels failed to import: {e}")
    return Backend("triton", mod, "")


def _import_kernels():
    """``fastdiff.kernels``: installed as a subpackage, or the top-level ``kernels/`` of a checkout."""
    try:
        return importlib.import_module("fastdiff.kernels")
    except ModuleNotFoundError:
        src = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
        if not src.is_file():
            raise
        spec = importlib.util.spec_from_file_location(
            "fastdiff.kernels", src, submodule_search_locations=[str(src.parent)]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastdiff.kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


def get(name: str) -> Backend:
    if name == "reference":
        return Backend("reference", torch, "")
    return {"cpp": cpp, "cuda": cuda, "triton": triton}[name]()


def available() -> dict[str, Backend]:
    """Every backend with its availability and, if unavailable, the reason."""
    return {name: get(name) for name in ("reference", "cpp", "triton", "cuda")}
