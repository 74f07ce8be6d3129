"""``nearest_embedding`` on the Triton backend: the launcher of the screen kernel
(``kernels/nearest_embedding.py``: a tiled ``tl.dot`` GEMM with a fused arg-min epilogue, the vocabulary split
across programs when there are few row tiles) inside the shared rescaling and float64 resolution of
:mod:`fastdiff.ops._nearest`. The entry point is the custom op ``fastdiff_triton::nearest_embedding``.
"""

from __future__ import annotations

import torch
import triton
from triton.runtime import Autotuner

from fastdiff.kernels.nearest_embedding import _nearest_embedding_fwd_kernel

from ... import _nearest
from ...nearest_embedding import nearest_embedding_fake
from . import _launch as _common
from . import use_ops
from .. import python_op

NEAREST_SCHEMA = "(Tensor x, Tensor weight, str metric) -> Tensor"

_FIXED = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)  # interpreter, tests
_FIXED_F64 = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=8, num_warps=4, num_stages=1)
_CONFIGS = [  # GPU autotuning: a few GEMM shapes, keyed on D and the dtype
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32), num_warps=4, num_stages=4),
]
_NOMINAL_BLOCK_N = 128  # fixes the split count independently of the autotuned config


_autotuned: Autotuner | None = None


def _kernel() -> Autotuner:
    global _autotuned
    if _autotuned is None:
        _autotuned = triton.autotune(configs=_CONFIGS, key=["D", "COSINE"])(_nearest_embedding_fwd_kernel)
    return _autotuned


def _screen(p: _nearest.Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher of the screen: ``(arg, best, second)`` per row of the rescaled problem ``p``."""
    flat = p.x.contiguous()
    w = p.w.contiguous()
    N, D = flat.shape
    V = w.shape[0]
    cdt = p.cdt
    use_dot = flat.dtype != torch.float64
    tiles = triton.cdiv(N, _NOMINAL_BLOCK_N)
    want = _common.TARGET_WAVES * _common.sm_count(flat.device)
    n_splits = max(1, min(triton.cdiv(want, tiles), triton.cdiv(V, 128)))
    v_per_split = triton.cdiv(V, n_splits)
    n_splits = triton.cdiv(V, v_per_split)
    best = torch.empty((N, n_splits), dtype=cdt, device=flat.device)
    second = torch.empty((N, n_splits), dtype=cdt, device=flat.device)
    arg = torch.empty((N, n_splits), dtype=torch.int64, device=flat.device)
    args = (flat, w, p.stat, best, second, arg, N, V, D, v_per_split, n_splits, flat.stride(0), w.stride(0))
    meta = dict(COSINE=p.metric == "cosine", USE_DOT=use_dot, PRECISION=_common.dot_precision(flat.dtype),
                UPCAST=_common.upcast_for_dot(flat.dtype))
    if _common.autotune_enabled() and use_dot:
        _kernel()[lambda m: (triton.cdiv(N, m["BLOCK_N"]), n_splits)](*args, **meta)
    else:
        cfg = _FIXED if use_dot else _FIXED_F64
        _nearest_embedding_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), n_splits)](*args, **meta, **cfg)
    if n_splits == 1:
        return arg[:, 0], best[:, 0], second[:, 0]
    low, at = best.min(dim=1)
    both = torch.cat([best, second], dim=1).sort(dim=1).values
    return arg.gather(1, at.unsqueeze(1)).squeeze(1), low, both[:, 1]


def _nearest_embedding_fwd(x: torch.Tensor, weight: torch.Tensor, metric: str) -> torch.Tensor:
    """``x: (..., D)``, ``weight: (V, D)`` (checked by the public op) -> ``indices (...)``."""
    return _nearest.indices(x, weight, metric, _screen)


nearest_embedding_op = python_op("fastdiff_triton::nearest_embedding", _nearest_embedding_fwd, NEAREST_SCHEMA,
                                 nearest_embedding_fake)


def nearest_embedding(x: torch.Tensor, weight: torch.Tensor, metric: str) -> torch.Tensor:
    """``indices (...) int64`` of the nearest rows of ``weight`` (see :func:`fastdiff.ops.nearest_embedding_ref`)."""
    if use_ops():
        return nearest_embedding_op(x, weight, metric)
    return _nearest_embedding_fwd(x, weight, metric)
