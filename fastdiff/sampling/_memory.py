"""Memory the sampler is about to allocate, checked before it allocates it.

:func:`available_bytes` is what the device can still give: ``MemAvailable`` from ``/proc/meminfo``
(``os.sysconf`` where there is none) on the CPU, ``torch.cuda.mem_get_info`` plus what PyTorch's caching
allocator holds unused on CUDA. :func:`check_fits` raises :class:`~fastdiff.errors.InputError` naming the
caller's argument and both figures when an estimate exceeds it, before the first large allocation, so a
``length`` or a batch that cannot fit fails at once instead of after minutes of swapping (or an
out-of-memory kill).

The estimates are lower bounds of the large buffers (network outputs, the model's own activations when
it reports them through ``forward_memory(batch_size, length)``, trajectories, outputs): a run that
passes the check may still run out of memory for other reasons, one that fails could not have run.
"""

from __future__ import annotations

import os

import torch

from ..errors import InputError

__all__ = ["available_bytes", "check_fits", "gib", "positional_capacity"]


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Bytes the device can still allocate, or None when it cannot be told."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(free) + max(0, int(idle))
        except (RuntimeError, AssertionError, ValueError):
            return None
    if device.type != "cpu":
        return None
    avail = _meminfo_available()
    if avail is not None:
        return avail
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    """``n`` bytes as a short human figure."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1024:,.1f} KiB"


def check_fits(name: str, parts: dict[str, float], device: torch.device, hint: str) -> None:
    """Raise ``InputError`` naming ``name`` when the sum of ``parts`` (what -> bytes) exceeds what
    ``device`` has available; the message gives every part, the total and the available figure."""
    need = float(sum(parts.values()))
    avail = available_bytes(device)
    if avail is None or need <= avail:
        return
    detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v > 0)
    raise InputError(f"{name}: needs about {gib(need)} of memory ({detail}), more than the {gib(avail)} "
                     f"available on {device}; {hint}")


_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl", "data2vec-text")


def positional_capacity(model: object) -> tuple[int, str] | None:
    """``(longest input, where that figure comes from)`` for a model with absolute positions, None for a
    model without a limit (relative positions, like :class:`fastdiff.models.SEDDenoiser`).

    Read from ``model.max_length`` (an int attribute any denoiser may declare) or a Hugging Face config's
    ``max_position_embeddings`` (less the padding offset of RoBERTa-style position ids).
    """
    n = getattr(model, "max_length", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n, f"{type(model).__name__}.max_length"
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return None
    n = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    if getattr(cfg, "model_type", None) in _ROBERTA_LIKE:
        pad = getattr(cfg, "pad_token_id", None)
        n -= (pad if isinstance(pad, int) else 1) + 1
    return n, "config.max_position_embeddings"
