"""``nearest_embedding`` on the C++ backend: the screen of :mod:`fastdiff.ops._nearest`
(``csrc/nearest_embedding.cpp``) inside the shared rescaling and float64 resolution.

The screen: row blocks of ``BLOCK_ROWS`` vectors against vocabulary tiles of ``BLOCK_COLS`` rows; each tile's
scores come from one BLAS GEMM into a per-thread buffer and are reduced by one fused "score, min" pass and a
second-minimum pass, so the largest score buffer is ``threads × BLOCK_ROWS × BLOCK_COLS``. The whole entry
point (Python rescaling and resolution around the kernel) is the custom op ``fastdiff_cpp::nearest_embedding``
so that torch.compile traces it as one node.
"""

from __future__ import annotations

import torch

from ... import _nearest
from ...nearest_embedding import nearest_embedding_fake
from . import _C, ops, use_ops
from .. import python_op, register_fake

NEAREST_SCHEMA = "(Tensor x, Tensor weight, str metric) -> Tensor"

BLOCK_ROWS = 128  # vectors per row block
BLOCK_COLS = 1024  # vocabulary rows per score tile (128 × 1024 fp32 = 512 KiB)


def _screen_fake(x: torch.Tensor, weight: torch.Tensor, stat: torch.Tensor, cosine: bool, block_rows: int,
                 block_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), stat.new_empty(n), stat.new_empty(n)


register_fake("fastdiff_cpp::nearest_embedding_screen", _screen_fake)


def screen(p: _nearest.Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(arg, best, second)`` per row of the rescaled problem ``p``."""
    fn = ops.nearest_embedding_screen.default if use_ops() else _C.nearest_embedding_screen
    return fn(p.x, p.w, p.stat, p.metric == "cosine", BLOCK_ROWS, BLOCK_COLS)


def _indices(x: torch.Tensor, weight: torch.Tensor, metric: str) -> torch.Tensor:
    return _nearest.indices(x, weight, metric, screen)


nearest_embedding_op = python_op("fastdiff_cpp::nearest_embedding", _indices, NEAREST_SCHEMA, nearest_embedding_fake)


def nearest_embedding(x: torch.Tensor, weight: torch.Tensor, metric: str) -> torch.Tensor:
    """``indices (...) int64`` of the nearest rows of ``weight`` (see :func:`fastdiff.ops.nearest_embedding_ref`)."""
    if use_ops():
        return nearest_embedding_op(x, weight, metric)
    return _indices(x, weight, metric)
