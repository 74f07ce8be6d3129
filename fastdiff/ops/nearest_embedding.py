"""``nearest_embedding``: the clamping trick's snap of vectors to their nearest embedding row."""

from __future__ import annotations

import torch

from .. import _checks
from . import _dispatch, _nearest
from ._common import check_x_weight

METRICS = ("l2", "cosine")
KERNEL = "nearest_embedding"  # fastdiff.ops.backends.<backend>.nearest_embedding


def _check(x: torch.Tensor, weight: torch.Tensor, metric: str) -> None:
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


def nearest_embedding_fake(x: torch.Tensor, weight: torch.Tensor, metric: str) -> torch.Tensor:
    """The fake (meta) kernel of every backend's ``nearest_embedding`` op (the indices): ``(...)`` int64."""
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


def nearest_embedding(x: torch.Tensor, weight: torch.Tensor, metric: str = "l2", *,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_embedding_ref` on the fastest available backend (see :mod:`fastdiff.ops`). A kernel
    backend returns the indices (its screen, then the shared float64 resolution of :mod:`._nearest`);
    ``snapped`` is ``weight[indices]`` on every backend (differentiable in ``weight``, as the reference's)."""
    _check(x, weight, metric)
    impl, _ = _dispatch.resolve("nearest_embedding", KERNEL, backend, x.device)
    if impl is None:
        return _nearest_embedding(x, weight, metric)
    idx = impl.nearest_embedding(x, weight, metric)
    return idx, torch.nn.functional.embedding(idx, weight)
