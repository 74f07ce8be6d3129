"""The op tests: one file per op, each test parametrised over the backends (``tests/ops/_cases.py``)."""

from __future__ import annotations

import pytest

from tests.ops import _cases as C


@pytest.fixture(scope="module", autouse=True)
def _triton_interpreted():
    """The Triton backend, compiled on a GPU or interpreted on the CPU (TRITON_INTERPRET=1, set before the
    kernels are imported; tests/conftest.py sets it early for the same reason)."""
    if C.HAVE_TRITON:
        from tests._triton import triton_backend

        yield from triton_backend()
    else:
        yield None
