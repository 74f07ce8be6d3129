"""The Triton backend (``backend="triton"``): launchers and ``torch.library`` custom ops
(``fastdiff_triton::*``) around the ``@triton.jit`` kernels of the top-level ``kernels/`` directory
(installed as ``fastdiff.kernels``). One module per kernel family, entry points as
:mod:`fastdiff.ops.backends` describes. Kernels run on CUDA tensors, or on CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1``, set before ``triton`` is imported). Importing this package needs
``triton`` but no GPU.
"""

from __future__ import annotations

from ...._backends import _import_kernels
from ...._checks import tracing
from .. import custom_ops_enabled

_import_kernels()  # fastdiff.kernels: the installed subpackage, or a checkout's top-level kernels/

NAMESPACE = "fastdiff_triton"


def use_ops() -> bool:
    """Call the kernels through their custom ops (traceable) rather than the launchers directly
    (:func:`fastdiff.ops.backends.custom_ops_enabled`); always while torch.compile traces."""
    return custom_ops_enabled("triton") or tracing()
