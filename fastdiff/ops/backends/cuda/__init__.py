"""The CUDA backend (``backend="cuda"``): glue around the compiled ``fastdiff._C_cuda`` (``csrc/cuda/``).

Importing this package imports ``fastdiff._C_cuda``, which registers the ``torch.library`` ops
``fastdiff_cuda::*`` (CUDA kernels; the schemas every backend shares, ``csrc/schema.h``); an ImportError here
means the extension is not built (``fastdiff._backends.cuda()`` turns it into the reason and the build
command). One module per kernel family, entry points as :mod:`fastdiff.ops.backends` describes; each
registers the fake kernels of its ops. The binding re-checks shapes, dtypes and devices, and the kernels
guard every index they read from a tensor.
"""

from __future__ import annotations

import torch

from fastdiff import _C_cuda as _C  # noqa: F401  (the extension; registers the fastdiff_cuda ops)

from ...._checks import tracing
from .. import custom_ops_enabled, has_op

NAMESPACE = "fastdiff_cuda"


def use_ops() -> bool:
    """Call the kernels through ``torch.ops.fastdiff_cuda`` (traceable) rather than directly
    (:func:`fastdiff.ops.backends.custom_ops_enabled`); always while torch.compile traces. Never when the
    loaded module registered no ops (a stand-in for tests of the glue)."""
    return (custom_ops_enabled("cuda") or tracing()) and has_op("fastdiff_cuda::posterior")


def op(name: str) -> torch._ops.OpOverload:
    """The ``torch.library`` op ``fastdiff_cuda::<name>`` (its default overload)."""
    return getattr(torch.ops.fastdiff_cuda, name).default
