"""``nearest_embedding``: the clamping trick's snap of vectors to their nearest embedding row."""

from __future__ import annotations

import torch

from .. import _checks
from . import _dispatch, _nearest
from ._common import check_x_weight

METRICS = ("l2", "cosine")
_dispatch.register("nearest_embedding", "cpp", "nearest_embedding")
_dispatch.register("nearest_embedding", "cuda", "nearest_embedding")
_dispatch.register("nearest_embedding", "triton", "nearest_embedding")


def _check(x, weight, metric):
    check_x_weight(x, weight)
    _checks.choice("metric", metric, METRICS)
    _checks.finite("x", x)
    _checks.finite("weight", weight)


def nearest_embedding_ref(x: torch.Tensor, weight: torch.Tensor, metric: str = "l2"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of, and the row of, the nearest embedding for each vector.

    ``x: (..., D)``, ``weight: (V, D)`` -> ``indices: (...) int64``, ``snapped: (..., D)`` (weight's dtype).

    * l2: ``argmin_v |x - w_v|²``;
    * cosine: ``argmax_v x·w_v / max(|w_v|, 1e-12)``.

    The index is the arg-min of a float64 evaluation of these scores with a fixed summation order
    (l2 ``Σ_k (x_k - w_k)²``, cosine ``-Σ_k x_k ŵ_k``, ``ŵ = w / max(|w|, 1e-12)``), the lowest index among equal
    values, on every backend: identical rows tie whatever their position, and huge or tiny magnitudes
    (``1e20``, ``1e-30``) are rescaled by a power of two first instead of overflowing. A float32 (float64
    for float64 inputs) GEMM screens the rows, blocked so that no score block exceeds 2**20 elements,
    and only rows whose two best screened scores lie within rounding of each other are evaluated in
    float64 (see :mod:`fastdiff.ops._nearest`).
    """
    _check(x, weight, metric)
    return _nearest_embedding(x, weight, metric)


def _nearest_embedding(x: torch.Tensor, weight: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's body, on arguments already checked."""
    return _nearest.nearest(x, weight, metric)


def nearest_embedding(x: torch.Tensor, weight: torch.Tensor, metric: str = "l2", *,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_embedding_ref` on the fastest available backend (see :mod:`fastdiff.ops`)."""
    _check(x, weight, metric)
    fn = _dispatch.resolve("nearest_embedding", backend, x.device, _nearest_embedding)
    return fn(x, weight, metric)
