"""``select_tokens`` on the C++ backend (``csrc/select_tokens.cpp``): candidate rows in parallel, each read
once (max and chunk exp-sums, which also check the values), the token as ``sample_categorical`` draws it,
the score from the cached row; then the per-batch-row selection."""

from __future__ import annotations

import torch

from ...select_tokens import select_tokens_fake
from . import _C, ops, use_ops, value_errors
from .. import register_fake

CHECKS_VALUES = True  # the kernel checks the candidate rows' values in its own pass

register_fake("fastdiff_cpp::select_tokens", select_tokens_fake)


def select_tokens(logits: torch.Tensor, candidates: torch.Tensor, counter_rows: torch.Tensor | None,
                  k: torch.Tensor | None, uniform: torch.Tensor | None, rule: int, temperature: float, seed: int,
                  offset: int, threshold: float, mode: int, exclude: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, confidence, selected)`` (``FASTDIFF_SCHEMA_SELECT_TOKENS``)."""
    fn = ops.select_tokens.default if use_ops() else _C.select_tokens
    with value_errors():
        return tuple(fn(logits, candidates, counter_rows, k, uniform, rule, temperature, seed, offset, threshold,
                        mode, exclude))
