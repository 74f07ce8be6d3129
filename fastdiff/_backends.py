"""Which kernel backends this installation has. Probed once, lazily; nothing here imports a compiler,
Triton or CUDA unless asked, so ``import fastdiff`` works on a bare CPU machine."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

REINSTALL = "pip install -e . --no-build-isolation  (from the fastdiff checkout; see README 'Building')"
BUILD_INFO = Path(__file__).resolve().parent / "_build_info.json"


class BackendFallbackWarning(RuntimeWarning):
    """``backend="auto"`` runs the reference because a kernel backend this install was meant to have
    cannot be used (not compiled at install time, built for another torch, or failing to import)."""


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What setup.py recorded when this install was built (``fastdiff/_build_info.json``): ``torch`` (the
    version the extensions were compiled against), ``cpp`` / ``cuda`` (bool: built), ``cpp_reason`` /
    ``cuda_reason`` (why not). ``{}`` for a tree that was never built (a bare checkout on ``sys.path``)."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def _public_version(v: str) -> str:
    return v.split("+", 1)[0]


def _torch_mismatch(module: str) -> str:
    built = build_info().get("torch")
    if built and _public_version(built) != _public_version(torch.__version__):
        return (f"{module} was built for torch {built}, but torch {torch.__version__} is installed (a compiled "
                f"extension only loads into the torch it was built against); rebuild it with: {REINSTALL}")
    return ""


@dataclass(frozen=True)
class Backend:
    name: str
    module: object | None
    reason: str  # why it is unavailable ("" when available)
    # True when this install was meant to have the backend (it was to be compiled, or was compiled) but
    # it cannot be used: "auto" then warns once (BackendFallbackWarning) instead of falling back silently.
    broken: bool = False

    @property
    def available(self) -> bool:
        return self.module is not None


@functools.lru_cache(maxsize=None)
def cpp() -> Backend:
    """The C++ CPU backend: ``fastdiff.ops.backends.cpp``, the glue around the extension ``fastdiff._C``
    (built by setup.py unless FASTDIFF_SKIP_EXT=1)."""
    info = build_info()
    if info.get("cpp") is False:
        why = info.get("cpp_reason") or "not built"
        # FASTDIFF_SKIP_EXT=1 is a deliberate pure-Python install: nothing is broken.
        return Backend("cpp", None, f"the C++ extension fastdiff._C was not built at install time ({why}); "
                                    f"build it with: {REINSTALL}", broken=not info.get("cpp_skipped", False))
    mismatch = _torch_mismatch("the C++ extension fastdiff._C")
    if mismatch:
        return Backend("cpp", None, mismatch, broken=True)
    try:
        mod = importlib.import_module("fastdiff.ops.backends.cpp")
    except ImportError as e:
        return Backend("cpp", None, f"the C++ extension fastdiff._C is not built or does not load ({e}); "
                                    f"build it with: {REINSTALL}", broken=bool(info.get("cpp")))
    return Backend("cpp", mod, "")


@functools.lru_cache(maxsize=None)
def cuda() -> Backend:
    """The CUDA backend: ``fastdiff.ops.backends.cuda``, the glue around the extension ``fastdiff._C_cuda``
    (built when nvcc and a CUDA build of torch are present, or with FASTDIFF_BUILD_CUDA=1)."""
    if not torch.cuda.is_available():
        return Backend("cuda", None, "no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    info = build_info()
    if info.get("cuda"):
        mismatch = _torch_mismatch("the CUDA extension fastdiff._C_cuda")
        if mismatch:
            return Backend("cuda", None, mismatch, broken=True)
    try:
        mod = importlib.import_module("fastdiff.ops.backends.cuda")
    except ImportError as e:
        return Backend("cuda", None, f"the CUDA extension fastdiff._C_cuda is not built or does not load ({e}); "
                                     f"build it with FASTDIFF_BUILD_CUDA=1 {REINSTALL}", broken=bool(info.get("cuda")))
    return Backend("cuda", mod, "")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton() -> Backend:
    """The Triton backend: ``fastdiff.ops.backends.triton``, the glue around the kernels of ``fastdiff.kernels``
    (the top-level ``kernels/``); needs ``triton`` and a GPU, or TRITON_INTERPRET=1 on CPU."""
    if importlib.util.find_spec("triton") is None:
        return Backend("triton", None, "triton is not installed; install it with: pip install 'fastdiff[triton]'")
    if not (torch.cuda.is_available() or triton_interpret()):
        return Backend("triton", None, "Triton needs a GPU (or TRITON_INTERPRET=1 to run kernels on the CPU)")
    try:
        mod = importlib.import_module("fastdiff.ops.backends.triton")
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


_warned: set[str] = set()


def warn_fallback(backend: Backend) -> None:
    """Warn once per process that ``auto`` runs the reference because ``backend`` is broken."""
    if backend.broken and backend.name not in _warned:
        _warned.add(backend.name)
        warnings.warn(f"fastdiff: backend 'auto' falls back to the PyTorch reference (slower): {backend.reason}",
                      BackendFallbackWarning, stacklevel=4)


def auto_choice(device: torch.device | str = "cpu") -> str:
    """The backend that ``backend="auto"`` runs on ``device`` for the sampling ops (``FASTDIFF_BACKEND``
    included): "cuda", "triton", "cpp" or "reference"."""
    device = torch.device(device)
    env = os.environ.get("FASTDIFF_BACKEND", "").strip()
    if env and env != "auto":
        return env
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if get(name).available:
                return name
        return "reference"
    if device.type == "cpu" and cpp().available:
        return "cpp"
    return "reference"


def summary(device: torch.device | str = "cpu") -> str:
    """One line naming what ``auto`` runs on ``device`` and, when it is the reference, why: for the
    header of ``fastdiff generate`` and for ``fastdiff info``."""
    device = torch.device(device)
    name = auto_choice(device)
    if name != "reference":
        return name
    wanted = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    reasons = "; ".join(f"{w}: {get(w).reason}" for w in wanted if get(w).reason)
    return f"reference ({reasons})" if reasons else "reference"
