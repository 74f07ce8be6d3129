"""Scale-out on PyTorch's own distributed engine: processes launched by ``torchrun``, talking through
``torch.distributed`` (NCCL between GPUs, gloo on CPU). No process pool or networking of our own.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every
process; :func:`init` reads them, joins the process group (``env://`` rendezvous) and picks the device
(``cuda:LOCAL_RANK`` for NCCL). Outside torchrun everything here degrades to a world of one process, so
the same code runs unchanged on a laptop.

Generation shards by :func:`shard_range` (contiguous, balanced ranges of the global sample indices) and
gathers in rank order, so the output is in global sample order. Training (:mod:`fastdiff.training`)
wraps the model in ``DistributedDataParallel`` (or FSDP) and shards every global batch across ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from .errors import InputError, InputTypeError

__all__ = [
    "Context",
    "all_gather_objects",
    "barrier",
    "broadcast_object",
    "context",
    "destroy",
    "init",
    "launched",
    "rank",
    "session",
    "shard_range",
    "world_size",
]


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node, its
    ``device`` and the process group's ``backend`` (None when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise InputError(f"{name}: expected an integer in the environment, got {v!r}") from None


def launched() -> bool:
    """True inside a ``torchrun`` (or any env:// launcher) process: ``WORLD_SIZE`` and ``RANK`` are set."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank() -> int:
    """This process's rank: from the process group when one is initialised, else from ``RANK`` (0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes: from the process group when one is initialised, else ``WORLD_SIZE`` (1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def _pick_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        n = torch.cuda.device_count()
        if n == 0:
            raise InputError("device: cuda was asked for but no GPU is visible")
        device = torch.device("cuda", local_rank % n)
    return device


def init(device: str | torch.device | None = None, backend: str | None = None,
         timeout_s: float = 600.0) -> Context:
    """Join the process group when launched by torchrun (idempotent), and return the :class:`Context`.

    ``device``: ``"cpu"``, ``"cuda"`` (becomes ``cuda:LOCAL_RANK``), an explicit device, or None/"auto"
    (CUDA when available). ``backend``: ``"nccl"`` for CUDA and ``"gloo"`` for CPU by default. Outside
    torchrun (or with ``WORLD_SIZE=1``) no group is created and the context is a world of one.
    """
    local = _env_int("LOCAL_RANK", 0)
    dev = _pick_device(device, local)
    if not launched() or _env_int("WORLD_SIZE", 1) <= 1:
        return Context(device=dev)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo", "mpi", "ucc"):
        raise InputError(f"backend: expected nccl or gloo (or mpi, ucc), got {backend!r}")
    if backend == "nccl" and dev.type != "cuda":
        raise InputError(f"backend: nccl needs CUDA devices, the device is {dev}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kw: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev,
                   backend=dist.get_backend())


def context() -> Context:
    """The current context without joining anything (a world of one when no group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        local = _env_int("LOCAL_RANK", 0)
        backend = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                       device=dev, backend=backend)
    return Context()


def destroy() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str | torch.device | None = None, backend: str | None = None) -> Iterator[Context]:
    """``with session() as ctx:``: :func:`init` on entry, :func:`destroy` on exit if this call joined."""
    joined = not (dist.is_available() and dist.is_initialized())
    ctx = init(device, backend)
    try:
        yield ctx
    finally:
        if joined:
            destroy()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``n`` global items that ``rank`` of ``world_size`` owns:
    sizes differ by at most one, lower ranks take the extra items, every item is owned exactly once."""
    for name, v in (("n", n), ("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputTypeError(f"{name}: expected an int, got {type(v).__name__}")
    if n < 0:
        raise InputError(f"n: must be >= 0, got {n}")
    if world_size < 1:
        raise InputError(f"world_size: must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise InputError(f"rank: must lie in [0, {world_size}), got {rank}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
