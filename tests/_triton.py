"""The Triton backend for the Triton test modules: compiled on a GPU, else interpreted."""

from __future__ import annotations

import os

import torch

from fastdiff import _backends


def triton_backend():
    """Generator for a module fixture: yields ``fastdiff.kernels`` with ``TRITON_INTERPRET=1`` set when
    there is no GPU (the variable must precede the import of the kernels, whose ``@triton.jit`` reads it;
    tests/conftest.py sets it early for the same reason). The probe is cached: cleared on both sides."""
    old = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    _backends.triton.cache_clear()
    be = _backends.triton()
    assert be.available, be.reason
    yield be.module
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old
    _backends.triton.cache_clear()
