"""``posterior`` on the Triton backend: the launcher of ``kernels/posterior.py`` (one program per row of a
lowered :class:`~fastdiff.ops._plan.PosteriorPlan`, online normalisation, a float64 CDF and the reference's
counter-based draw) and its custom op ``fastdiff_triton::posterior`` (the schema of every backend,
``FASTDIFF_SCHEMA_POSTERIOR`` in ``csrc/schema.h``)."""

from __future__ import annotations

import torch
import triton.language as tl

from fastdiff.kernels.posterior import _posterior_fwd_kernel

from ..._plan import posterior_fake
from . import _launch as _common
from . import use_ops
from .. import python_op

SCHEMA = ("(Tensor logits, Tensor x_t, Tensor t, Tensor s, int kind, int mask_id, float temperature, Tensor? a_t, "
          "Tensor? a_s, Tensor? ab_table, Tensor? fact1, Tensor? qbar_s, Tensor? pair, bool sample, int seed, "
          "int offset, int row_offset) -> Tensor")


def _blocks(V: int, kind: int) -> tuple[int, int]:
    if kind == 3:
        return _common.next_pow2(V, 16, 128), 32
    return _common.next_pow2(V, 16, _common.INTERPRET_BLOCK if _common.interpret() else 4096), 32


def _posterior_fwd(logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, kind: int, mask_id: int,
                   temperature: float, a_t: torch.Tensor | None, a_s: torch.Tensor | None,
                   ab_table: torch.Tensor | None, fact1: torch.Tensor | None, qbar_s: torch.Tensor | None,
                   pair: torch.Tensor | None, sample: bool, seed: int, offset: int, row_offset: int) -> torch.Tensor:
    """Launcher on a lowered plan's arrays (``FASTDIFF_SCHEMA_POSTERIOR``): ``logits: (N, V)`` with unit column
    stride -> probabilities ``(N, V)`` (float32; float64 for float64 logits) or, with ``sample``, tokens
    ``(N,)`` int64. The kernel takes the 64-bit counter words as 32-bit halves."""
    N, V = logits.shape
    dev = logits.device
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = logits.new_empty((0,) if sample else (N, V), dtype=out_dtype)
    tokens = torch.empty(N if sample else 0, dtype=torch.int64, device=dev)
    if N == 0:
        return tokens if sample else probs
    k = int(kind)  # the plan's kind codes are the kernel's KIND values
    seed_lo, seed_hi = _common.split_seed(seed)
    off_lo, off_hi = _common.split_seed(offset)
    row_lo, row_hi = _common.split_seed(row_offset)
    dummy = torch.zeros(1, dtype=torch.float64, device=dev)
    BLOCK, BLOCK_I = _blocks(V, k)
    n_tab = ab_table.shape[0] if k == 1 else (qbar_s.shape[0] if k == 3 else 1)
    _posterior_fwd_kernel[(N,)](
        logits, logits.stride(0), x_t, t, s,
        a_t if a_t is not None else dummy, a_s if a_s is not None else dummy,
        ab_table if ab_table is not None else dummy, fact1 if fact1 is not None else dummy,
        qbar_s if qbar_s is not None else dummy, pair if pair is not None else x_t,
        probs if not sample else dummy, tokens if sample else x_t,
        V, n_tab, mask_id, _common.f64_bits(temperature), seed_lo, seed_hi, off_lo, off_hi, row_lo, row_hi,
        KIND=k, SAMPLE=sample, WDT=tl.float64 if logits.dtype == torch.float64 else tl.float32,
        BLOCK=BLOCK, BLOCK_I=BLOCK_I, num_warps=8 if BLOCK >= 2048 else 4,
    )
    return tokens if sample else probs


posterior_op = python_op("fastdiff_triton::posterior", _posterior_fwd, SCHEMA, posterior_fake)


def posterior(logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, kind: int, mask_id: int,
              temperature: float, a_t: torch.Tensor | None, a_s: torch.Tensor | None, ab_table: torch.Tensor | None,
              fact1: torch.Tensor | None, qbar_s: torch.Tensor | None, pair: torch.Tensor | None, sample: bool,
              seed: int, offset: int, row_offset: int) -> torch.Tensor:
    """``(N, V)`` probabilities, or ``(N,)`` int64 tokens with ``sample`` (``FASTDIFF_SCHEMA_POSTERIOR``)."""
    fn = posterior_op if use_ops() else _posterior_fwd
    return fn(logits, x_t, t, s, kind, mask_id, temperature, a_t, a_s, ab_table, fact1, qbar_s, pair, sample, seed,
              offset, row_offset)
