"""Backend dispatch for the ops: ``backend="auto"`` falls back silently; an explicit backend that is
unavailable (or has no kernel for the op, or cannot run on the tensors' device) raises with the reason
and the install command. ``FASTDIFF_BACKEND`` replaces "auto" and counts as an explicit request."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .. import _backends
from ..errors import InputError

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")

# op name -> backend -> (name of the function in the backend's module)
_KERNELS: dict[str, dict[str, str]] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op here."""


def register(op: str, backend: str, symbol: str) -> None:
    """Declare that ``backend``'s module provides ``symbol`` implementing ``op``."""
    _KERNELS.setdefault(op, {})[backend] = symbol


def _device_ok(backend: str, device: torch.device) -> str:
    if backend == "cpp" and device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got {device}"
    if backend == "triton" and device.type != "cuda" and not _backends.triton_interpret():
        return f"the triton backend runs on CUDA tensors (or with TRITON_INTERPRET=1), got {device}"
    return ""


def _try(op: str, backend: str, device: torch.device) -> tuple[Callable | None, str]:
    if backend == "reference":
        return None, ""
    be = _backends.get(backend)
    if not be.available:
        return None, be.reason
    symbol = _KERNELS.get(op, {}).get(backend)
    fn = getattr(be.module, symbol, None) if symbol else None
    if fn is None:
        return None, f"the {backend} backend has no kernel for {op} in this build"
    why = _device_ok(backend, device)
    if why:
        return None, why
    return fn, ""


def resolve(op: str, backend: str, device: torch.device, reference: Callable) -> Callable:
    """The implementation of ``op`` to run on ``device`` for the requested ``backend``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("FASTDIFF_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise InputError(f"FASTDIFF_BACKEND: expected one of {list(BACKENDS)}, got {env!r}")
            backend = env
    if backend == "reference":
        return reference
    if backend != "auto":
        fn, why = _try(op, backend, device)
        if fn is None:
            raise BackendUnavailableError(f"{op}: backend {backend!r} is unavailable: {why}")
        return fn
    order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    for name in order:
        fn, _ = _try(op, name, device)
        if fn is not None:
            return fn
    for name in order:  # a backend this install was meant to have: say so once, never silently
        _backends.warn_fallback(_backends.get(name))
    return reference


def explain(op: str, device: torch.device | str = "cpu") -> dict[str, str]:
    """For each backend: "ok" or why ``op`` cannot run there on ``device``."""
    device = torch.device(device)
    out = {"reference": "ok"}
    for name in ("cpp", "triton", "cuda"):
        fn, why = _try(op, name, device)
        out[name] = "ok" if fn is not None else why
    return out
