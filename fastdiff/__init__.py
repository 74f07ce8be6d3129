"""fastdiff: a kernel-backed engine for text diffusion models (discrete and continuous).

Layers, each importing only those before it (``tests/test_layers.py`` holds every module to this order,
with its few justified exceptions)::

    errors, random, _checks, _protocols, _reduce, _backends, _threads, _deprecate, distributed
    -> ops (with the backend modules _cpp, _cuda, kernels) -> schedules -> discrete / continuous
    -> timesteps -> sampling -> data, metrics, models, testing, generation, glyph, latent -> training -> pipeline, evaluation -> cli

``distributed`` is the scale-out layer on ``torch.distributed`` (torchrun): sharded generation and
DDP / FSDP training use it; outside torchrun it is a world of one process.

Every op in :mod:`fastdiff.ops` has a pure-PyTorch reference; kernels (C++, Triton, CUDA) plug in as
backends when they are built, and ``import fastdiff`` works without any of them. ``tokenizers``,
``safetensors``, ``transformers`` and ``flash_attn`` are imported only where they are used.

``import fastdiff`` itself is light: it imports no sub-package (not even torch). The sub-packages,
:class:`TextDiffusion` and :func:`available_backends` load on first use (PEP 562), so
``fastdiff.sampling.sample`` or ``from fastdiff import TextDiffusion`` work as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _deprecate

__version__ = "0.2.0"

# the public sub-packages and modules, imported on first attribute access
_SUBMODULES = ("cli", "continuous", "data", "discrete", "distributed", "errors", "evaluation", "generation", "glyph",
               "latent", "metrics", "models",
               "ops", "pipeline", "random", "sampling", "schedules", "testing", "timesteps", "training")
# name -> (module, attribute)
_ATTRIBUTES = {"TextDiffusion": ("pipeline", "TextDiffusion"), "available_backends": ("_backends", "available"),
               "generate": ("generation", "generate")}

__all__ = [
    "TextDiffusion",
    "__version__",
    "available_backends",
    "continuous",
    "data",
    "discrete",
    "distributed",
    "errors",
    "generate",
    "generation",
    "metrics",
    "models",
    "ops",
    "random",
    "sampling",
    "schedules",
    "timesteps",
    "training",
]

_deprecate.install()

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from . import (
        continuous,
        data,
        discrete,
        distributed,
        errors,
        generation,
        metrics,
        models,
        ops,
        random,
        sampling,
        schedules,
        timesteps,
        training,
    )
    from . import cli, evaluation, pipeline, testing  # noqa: F401  (lazy too, but not in __all__)
    from ._backends import available as available_backends
    from .generation import generate
    from .pipeline import TextDiffusion


def __getattr__(name: str) -> Any:
    """PEP 562: a sub-package, :class:`TextDiffusion` or :func:`available_backends`, imported on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import also binds it on this module
    if name in _ATTRIBUTES:
        module, attr = _ATTRIBUTES[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
