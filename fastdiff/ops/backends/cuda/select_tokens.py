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
