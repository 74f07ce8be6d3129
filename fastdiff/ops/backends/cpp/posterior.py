"""``posterior`` on the C++ backend: the rows of a lowered :class:`~fastdiff.ops._plan.PosteriorPlan`
(``csrc/posterior.cpp``), for ``categorical_posterior`` (``sample=False``) and ``posterior_sample``.

Rows in parallel; per row one pass over 512-category chunks (max and float32 exp-sum while the chunk is in
L1) that also checks the values (NaN, +inf, all -inf, a masked row with only the mask logit), then the
inverse-CDF draw that walks the chunk sums, then 32-category sums of the crossing chunk, and only the crossing
32 categories in float64. A masked absorbing row (scalar schedule) whose mask is the last or first category and
whose uniform falls in the mask's closed-form share (``1 - a_s`` of ``1 - a_t``) is only read for the value
check. Rows of float64 logits or V <= 2048 are computed in float64 throughout; per-token absorbing and matrix
rows use float64 weight vectors.
"""

from __future__ import annotations

import torch

from ..._plan import posterior_fake
from . import _C, ops, use_ops, value_errors
from .. import register_fake

CHECKS_VALUES = True  # the kernel checks the logits' values in its own pass (see fastdiff.ops._common)

register_fake("fastdiff_cpp::posterior", posterior_fake)


def posterior(logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, kind: int, mask_id: int,
              temperature: float, a_t: torch.Tensor | None, a_s: torch.Tensor | None, ab_table: torch.Tensor | None,
              fact1: torch.Tensor | None, qbar_s: torch.Tensor | None, pair: torch.Tensor | None, sample: bool,
              seed: int, offset: int, row_offset: int) -> torch.Tensor:
    """``(N, V)`` probabilities, or ``(N,)`` int64 tokens with ``sample`` (``FASTDIFF_SCHEMA_POSTERIOR``)."""
    fn = ops.posterior.default if use_ops() else _C.posterior
    with value_errors():
        return fn(logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1, qbar_s, pair, sample,
                  seed, offset, row_offset)
