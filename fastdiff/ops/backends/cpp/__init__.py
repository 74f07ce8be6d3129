"""The C++ CPU backend (``backend="cpp"``): glue around the compiled ``fastdiff._C`` (``csrc/``).

Importing this package imports ``fastdiff._C``, which registers the ``torch.library`` ops
``fastdiff_cpp::*`` (CPU kernels; schemas in ``csrc/schema.h``); an ImportError here means the extension is
not built (``fastdiff._backends.cpp()`` turns it into the reason and the build command). One module per
kernel family, entry points as :mod:`fastdiff.ops.backends` describes; each registers the fake kernels of
its ops. The C++ functions re-check shapes, dtypes and index ranges themselves, so a direct call cannot read
out of bounds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fastdiff import _C  # noqa: F401  (the extension; registers the fastdiff_cpp ops)

from ...._checks import tracing
from ....errors import InputError
from .. import custom_ops_enabled

NAMESPACE = "fastdiff_cpp"
ops = torch.ops.fastdiff_cpp


def use_ops() -> bool:
    """Call the kernels through ``torch.ops.fastdiff_cpp`` (traceable) rather than directly
    (:func:`fastdiff.ops.backends.custom_ops_enabled`); always while torch.compile traces."""
    return custom_ops_enabled("cpp") or tracing()


@contextlib.contextmanager
def value_errors() -> Iterator[None]:
    """The kernels' in-kernel value check raises ValueError with check_finite_above's message; the public
    ops raise it as the same InputError the other backends raise."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(str(e)) from None
