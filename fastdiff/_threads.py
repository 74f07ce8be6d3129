"""Intra-op thread count for the command line (``--threads``) and the library's kernels.

``configure(threads)`` is what the CLI calls before any work: an int sets ``torch.set_num_threads``;
``None`` applies the automatic policy. The C++ kernels read ``at::get_num_threads()``, so
``torch.set_num_threads`` governs them as it governs PyTorch's own ops.
"""

from __future__ import annotations

from .errors import InputError, InputTypeError

import torch


def configure(threads: int | None) -> int:
    """Set the intra-op thread count (``None``: the automatic policy) and return the count in effect."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise InputTypeError(f"--threads: expected an int, got {type(threads).__name__}")
        if threads < 1:
            raise InputError(f"--threads: must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
