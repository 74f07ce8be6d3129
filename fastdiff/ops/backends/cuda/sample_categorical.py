"""``sample_categorical`` on the CUDA backend (``csrc/cuda/sample_categorical.cu``): temperature 0 is a
first-maximum argmax; otherwise top-k and top-p are threshold searches over order keys (a byte-wise descent
with a 256-bin histogram per level, no sort) with the reference's tie-inclusive sets, then the block-wide
inverse-CDF draw of the row's Philox uniform."""

from __future__ import annotations

import torch

from ...sample_categorical import sample_categorical_fake
from . import _C, op, use_ops
from .. import register_fake

register_fake("fastdiff_cuda::sample_categorical", sample_categorical_fake)


def sample_categorical(logits: torch.Tensor, seed: int, offset: int, temperature: float, top_k: int, top_p: float,
                       row_offset: int) -> torch.Tensor:
    """``(N,)`` int64 tokens of ``(N, V)`` logits (``FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL``)."""
    fn = op("sample_categorical") if use_ops() else _C.sample_categorical
    return fn(logits, seed, offset, temperature, top_k, top_p, row_offset)
