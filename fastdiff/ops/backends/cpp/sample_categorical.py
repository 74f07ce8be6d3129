"""``sample_categorical`` on the C++ backend (``csrc/sample_categorical.cpp``): temperature, then top-k and
top-p with the reference's tie-inclusive sets (top-k: the k-th largest ``x/temp - max/temp`` in float64 by a
size-k heap; top-p: the crossing bucket of a histogram of the weights' float32 bit patterns, split by the
next bits when large, sorted alone), then the inverse-CDF draw of the row's Philox uniform. Rows in
parallel; the row pass checks the values."""

from __future__ import annotations

import torch

from ...sample_categorical import sample_categorical_fake
from . import _C, ops, use_ops, value_errors
from .. import register_fake

CHECKS_VALUES = True  # the kernel checks the logits' values in its own pass (see fastdiff.ops._common)

register_fake("fastdiff_cpp::sample_categorical", sample_categorical_fake)


def sample_categorical(logits: torch.Tensor, seed: int, offset: int, temperature: float, top_k: int, top_p: float,
                       row_offset: int) -> torch.Tensor:
    """``(N,)`` int64 tokens of ``(N, V)`` logits (``FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL``)."""
    fn = ops.sample_categorical.default if use_ops() else _C.sample_categorical
    with value_errors():
        return fn(logits, seed, offset, temperature, top_k, top_p, row_offset)
