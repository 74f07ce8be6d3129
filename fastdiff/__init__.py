"""fastdiff: a kernel-backed engine for text diffusion models (discrete and continuous).

Layers, each importing only those before it::

    random, _checks, _backends -> ops -> schedules -> discrete / continuous -> timesteps -> sampling -> cli

Every op in :mod:`fastdiff.ops` has a pure-PyTorch reference; kernels (C++, Triton, CUDA) plug in as
backends when they are built, and ``import fastdiff`` works without any of them.
"""

from . import continuous, discrete, ops, random, sampling, schedules, timesteps
from ._backends import available as available_backends

__version__ = "0.1.0"

__all__ = [
    "continuous",
    "discrete",
    "ops",
    "random",
    "sampling",
    "schedules",
    "timesteps",
    "available_backends",
    "__version__",
]
