"""fastdiff: a kernel-backed engine for text diffusion models (discrete and continuous).

Layers, each importing only those before it::

    errors, random, _checks, _protocols, _reduce, _backends, _threads, distributed -> ops -> schedules -> discrete / continuous
    -> timesteps
    -> sampling -> data, metrics, models -> training -> pipeline, evaluation -> cli

``distributed`` is the scale-out layer on ``torch.distributed`` (torchrun): sharded generation and
DDP / FSDP training use it; outside torchrun it is a world of one process.

Every op in :mod:`fastdiff.ops` has a pure-PyTorch reference; kernels (C++, Triton, CUDA) plug in as
backends when they are built, and ``import fastdiff`` works without any of them. ``tokenizers``,
``safetensors``, ``transformers`` and ``flash_attn`` are imported only where they are used.
"""

from . import (
    continuous,
    data,
    discrete,
    distributed,
    errors,
    metrics,
    models,
    ops,
    random,
    sampling,
    schedules,
    timesteps,
    training,
)
from ._backends import available as available_backends
from .pipeline import TextDiffusion

__version__ = "0.2.0"

__all__ = [
    "TextDiffusion",
    "__version__",
    "available_backends",
    "continuous",
    "data",
    "discrete",
    "distributed",
    "errors",
    "metrics",
    "models",
    "ops",
    "random",
    "sampling",
    "schedules",
    "timesteps",
    "training",
]
