"""``posterior`` on the CUDA backend (``csrc/cuda/posterior.cu``): one block (256 threads) per row of a lowered
:class:`~fastdiff.ops._plan.PosteriorPlan`, float64 throughout; pass 1 the max of ``logit / temperature``,
pass 2 the exp-sum (and, per-token, the two sums of the mask weight and the total), closed-form totals where
``Σ p = 1`` makes them exact; the draw by a block-wide CDF scan in index order. The matrix kind stages the
row's ``p`` in shared memory when it fits. A masked absorbing row (scalar schedule, the mask the first or last
category) whose uniform falls in the mask's closed-form share stays the mask without either pass (the mask
shortcut of the reference's ``_affine_sample``; the public op checks the values first)."""

from __future__ import annotations

import torch

from ..._plan import posterior_fake
from . import _C, op, use_ops
from .. import register_fake

register_fake("fastdiff_cuda::posterior", posterior_fake)


def posterior(logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, kind: int, mask_id: int,
              temperature: float, a_t: torch.Tensor | None, a_s: torch.Tensor | None, ab_table: torch.Tensor | None,
              fact1: torch.Tensor | None, qbar_s: torch.Tensor | None, pair: torch.Tensor | None, sample: bool,
              seed: int, offset: int, row_offset: int) -> torch.Tensor:
    """``(N, V)`` probabilities, or ``(N,)`` int64 tokens with ``sample`` (``FASTDIFF_SCHEMA_POSTERIOR``)."""
    fn = op("posterior") if use_ops() else _C.posterior
    return fn(logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1, qbar_s, pair, sample, seed,
              offset, row_offset)


def _posterior_counters_fake(logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, kind: int,
                             mask_id: int, temperature: float, a_t: torch.Tensor | None, a_s: torch.Tensor | None,
                             ab_table: torch.Tensor | None, fact1: torch.Tensor | None, qbar_s: torch.Tensor | None,
                             pair: torch.Tensor | None, counters: torch.Tensor) -> torch.Tensor:
    return x_t.new_empty(x_t.shape, dtype=torch.int64)


register_fake("fastdiff_cuda::posterior_counters", _posterior_counters_fake)


def posterior_counters(logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, kind: int,
                       mask_id: int, temperature: float, a_t: torch.Tensor | None, a_s: torch.Tensor | None,
                       ab_table: torch.Tensor | None, fact1: torch.Tensor | None, qbar_s: torch.Tensor | None,
                       pair: torch.Tensor | None, counters: torch.Tensor) -> torch.Tensor:
    """``posterior`` with ``sample=True`` whose ``(seed, offset, row_offset)`` the kernel reads from ``counters``, a
    ``(3,)`` int64 tensor on the logits' device (the uint64 words' bits): the form a CUDA graph captures, so each
    replay draws with the counters written into that tensor before it (:mod:`fastdiff.sampling._graph`)."""
    fn = op("posterior_counters") if use_ops() else _C.posterior_counters
    return fn(logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1, qbar_s, pair, counters)
