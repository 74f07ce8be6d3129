"""``select_tokens`` on the CUDA backend (``csrc/cuda/select_tokens.cu``): one block per candidate row (the
value check, the first maximum, the sums in ``sample_categorical.cu``'s order and its block-wide draw, the
score), then the selection over ``(B, L)`` with ATen in ``csrc/cuda/binding.cpp``."""

from __future__ import annotations

import torch

from ....errors import InputError
from ...select_tokens import select_tokens_fake
from . import _C, op, use_ops
from .. import register_fake

CHECKS_VALUES = True  # the kernel reports each candidate row's value status; the binding raises

register_fake("fastdiff_cuda::select_tokens", select_tokens_fake)


def select_tokens(logits: torch.Tensor, candidates: torch.Tensor, counter_rows: torch.Tensor | None,
                  k: torch.Tensor | None, uniform: torch.Tensor | None, rule: int, temperature: float, seed: int,
                  offset: int, threshold: float, mode: int, exclude: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, confidence, selected)`` (``FASTDIFF_SCHEMA_SELECT_TOKENS``)."""
    fn = op("select_tokens") if use_ops() else _C.select_tokens
    try:
        return tuple(fn(logits, candidates, counter_rows, k, uniform, rule, temperature, seed, offset, threshold,
                        mode, exclude))
    except ValueError as e:  # the binding's value check: the InputError every backend raises
        if str(e).startswith("logits: ") and not isinstance(e, InputError):
            raise InputError(str(e).split("\n")[0]) from None
        raise


def select_rows_counters(logits: torch.Tensor, counter_rows: torch.Tensor | None, rule: int, temperature: float,
                         exclude: int, seed_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-row kernel of :func:`select_tokens` on every ``(b, l)`` row of ``logits (B, L, V)``, with
    ``(seed, offset)`` read on the device from ``seed_offset`` ((2,) int64): ``(tokens int64, keys float64,
    status int32)``, all ``(B, L)`` (status 0, or 4 NaN / 3 +inf / 2 every logit -inf; such a row's token
    and key are 0). Reads no value on the host, so a CUDA graph can capture it and a replay draws with the
    counters written into ``seed_offset`` before it (:mod:`fastdiff.generation._graph`)."""
    return tuple(_C.select_rows_counters(logits, counter_rows, rule, temperature, exclude, seed_offset))
