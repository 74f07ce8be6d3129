"""Backend dispatch for the ops: ``backend="auto"`` falls back silently; an explicit backend that is
unavailable (or has no kernel for the op, or cannot run on the tensors' device) raises with the reason
and the install command. ``FASTDIFF_BACKEND`` replaces "auto" and counts as an explicit request.

Kernels are found by convention, not by a registry: a public op ``fastdiff/ops/<op>.py`` names its kernel
family in ``KERNEL``, and backend ``<b>`` implements it in the module ``<b's package>.<KERNEL>``
(``fastdiff.ops.backends.<b>.<KERNEL>``, see :mod:`fastdiff.ops.backends`). A backend without that module
has no kernel for the op.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import torch

from .. import _backends
from ..errors import InputError

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")

# The glue module that choose() found last for each (backend, kernel family), as the attribute
# "<backend>__<kernel>" of a module: resolve() reads it with getattr, which torch.compile follows while tracing
# (and sees the entries choose() adds during the trace, which a dict it had read before would not show).
_GLUE = types.ModuleType("fastdiff.ops._dispatch.glue")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op here."""


def _device_ok(backend: str, device: torch.device) -> str:
    if backend == "cpp" and device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {device}"
    if backend == "triton" and device.type != "cuda" and not _backends.triton_interpret():
        return f"the triton backend runs on CUDA tensors (or with TRITON_INTERPRET=1), got {device}"
    return ""


def kernel_of(op: str) -> str:
    """The kernel family of public op ``op``: its module's ``KERNEL`` (the op's own name by default)."""
    mod = sys.modules.get(f"{__package__}.{op}")
    if mod is None:
        try:
            mod = importlib.import_module(f"{__package__}.{op}")
        except ModuleNotFoundError:
            return op
    return getattr(mod, "KERNEL", op)


def _glue(package: object, kernel: str) -> object | None:
    """``package.<kernel>``: an attribute, or the submodule of that name (None if there is none)."""
    mod = getattr(package, kernel, None)
    if mod is not None or not isinstance(package, types.ModuleType):
        return mod
    name = f"{package.__name__}.{kernel}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def _try(op: str, kernel: str, backend: str, device: torch.device) -> tuple[object | None, str]:
    be = _backends.get(backend)
    if not be.available:
        return None, be.reason
    glue = _glue(be.module, kernel)
    if glue is None:
        return None, f"the {backend} backend has no kernel for {op} in this build"
    why = _device_ok(backend, device)
    if why:
        return None, why
    setattr(_GLUE, f"{backend}__{kernel}", glue)
    return glue, ""


@torch.compiler.assume_constant_result
def choose(op: str, kernel: str, backend: str, device: str) -> str:
    """The name of the backend that runs ``op`` (kernel family ``kernel``) on ``device`` when ``backend`` is
    asked for: "reference" or a kernel backend (its glue is then an attribute of ``_GLUE``). Raises for an
    unknown name and for an explicit backend that cannot run here. torch.compile calls it once while
    tracing and keeps the answer (it reads files and the environment)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("FASTDIFF_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise InputError(f"FASTDIFF_BACKEND: expected one of {list(BACKENDS)}, got {env!r}")
            backend = env
    if backend == "reference":
        return "reference"
    device = torch.device(device)
    if backend != "auto":
        glue, why = _try(op, kernel, backend, device)
        if glue is None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} is unavailable: {why}")
        return backend
    order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    for name in order:
        glue, _ = _try(op, kernel, name, device)
        if glue is not None:
            return name
    for name in order:  # a backend this install was meant to have: say so once, never silently
        _backends.warn_fallback(_backends.get(name))
    return "reference"


def resolve(op: str, kernel: str, backend: str, device: torch.device) -> tuple[object | None, str]:
    """The glue module that runs ``op`` on ``device`` for the requested ``backend`` (``None``: the
    reference), with the backend's name: ``(glue or None, name)``."""
    name = choose(op, kernel, backend, str(device))
    return (None if name == "reference" else getattr(_GLUE, f"{name}__{kernel}")), name


def explain(op: str, device: torch.device | str = "cpu") -> dict[str, str]:
    """For each backend: "ok" or why ``op`` cannot run there on ``device``."""
    device = torch.device(device)
    kernel = kernel_of(op)
    out = {"reference": "ok"}
    for name in ("cpp", "triton", "cuda"):
        glue, why = _try(op, kernel, name, device)
        out[name] = "ok" if glue is not None else why
    return out
