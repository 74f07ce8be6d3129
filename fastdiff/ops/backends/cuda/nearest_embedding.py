"""``nearest_embedding`` on the CUDA backend: the screen of :mod:`fastdiff.ops._nearest`
(``csrc/cuda/nearest_embedding.cu``: 64-row blocks of ``x`` against 64-row tiles of ``W``, the l2 / cosine score
and the (min, second min, arg-min) fused into the GEMM's epilogue, the vocabulary split across blocks when
there are few rows; no ``N × V`` buffer) inside the shared rescaling and float64 resolution. The whole entry
point is the custom op ``fastdiff_cuda::nearest_embedding``.
"""

from __future__ import annotations

import torch

from ... import _nearest
from ...nearest_embedding import nearest_embedding_fake
from . import _C, op, use_ops
from .. import has_op, python_op, register_fake

NEAREST_SCHEMA = "(Tensor x, Tensor weight, str metric) -> Tensor"


def _screen_fake(x: torch.Tensor, weight: torch.Tensor, stat: torch.Tensor, cosine: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), stat.new_empty(n), stat.new_empty(n)


register_fake("fastdiff_cuda::nearest_embedding_screen", _screen_fake)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t.reshape(-1, width)`` with a contiguous last dimension (a copy only when it is strided)."""
    flat = t.reshape(-1, width)
    return flat if flat.stride(-1) == 1 or width == 1 else flat.contiguous()


def screen(p: _nearest.Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(arg, best, second)`` per row of the rescaled problem ``p``."""
    D = p.x.shape[1]
    flat = _rows(p.x, D)
    w = p.w if p.w.stride(-1) == 1 or D == 1 else p.w.contiguous()
    fn = op("nearest_embedding_screen") if use_ops() else _C.nearest_embedding_screen
    return fn(flat, w, p.stat, p.metric == "cosine")


def _indices(x: torch.Tensor, weight: torch.Tensor, metric: str) -> torch.Tensor:
    return _nearest.indices(x, weight, metric, screen)


# (not with a stand-in module that registered no ops: use_ops() is then False)
nearest_embedding_op = python_op("fastdiff_cuda::nearest_embedding", _indices, NEAREST_SCHEMA, nearest_embedding_fake) \
    if has_op("fastdiff_cuda::posterior") else None


def nearest_embedding(x: torch.Tensor, weight: torch.Tensor, metric: str) -> torch.Tensor:
    """``indices (...) int64`` of the nearest rows of ``weight`` (see :func:`fastdiff.ops.nearest_embedding_ref`)."""
    if use_ops():
        return nearest_embedding_op(x, weight, metric)
    return _indices(x, weight, metric)
