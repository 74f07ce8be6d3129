"""``nearest_embedding`` in Triton: the screen of :mod:`fastdiff.ops._nearest` as a tiled GEMM with a fused
arg-min epilogue (the shared Python code rescales the inputs, computes the per-row statistic and resolves the
near-ties in float64; the launcher is ``fastdiff/ops/backends/triton/nearest_embedding.py``).

Program ``(i, s)`` owns rows ``[i·BLOCK_N, (i+1)·BLOCK_N)`` and the vocabulary slice ``s`` (the launcher
splits V across programs only when there are too few row tiles to fill the GPU). For each
``BLOCK_V`` tile of its slice it accumulates ``x·wᵀ`` over ``BLOCK_D`` steps with ``tl.dot`` (float32
accumulator; float64 inputs use a broadcast-multiply-sum instead, since ``tl.dot`` has no float64 on
most GPUs), turns the tile into scores and folds it into a running ``(best, second, arg)`` per row:

* l2: ``score = stat - 2·x·w`` (``stat = |w|²``, from :func:`fastdiff.ops._nearest.prepare`);
* cosine: ``score = -(x·w)·stat`` (``stat = 1 / max(|w|, 1e-12)``).

A tile's minimum is taken with ``tl.argmin``, its second smallest score with the minimum's column masked
out; the ``(N, splits)`` partial results are merged on the host (the second smallest of all the splits'
best and second scores). Nothing of size ``N × V`` exists.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common  # noqa: F401  (loads only as fastdiff.kernels: see kernels/__init__.py)


@triton.jit
def _nearest_embedding_fwd_kernel(
    x_ptr, w_ptr, aux_ptr, best_ptr, second_ptr, arg_ptr,
    N, V, D, v_per_split, n_splits, stride_xn, stride_wv,
    COSINE: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    acc_dt = aux_ptr.dtype.element_ty
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    v_lo = split * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)
    best = tl.full((BLOCK_N,), float("inf"), acc_dt)
    second = tl.full((BLOCK_N,), float("inf"), acc_dt)
    arg = tl.zeros((BLOCK_N,), tl.int64)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        v_ok = rv < v_hi
        acc = tl.zeros((BLOCK_N, BLOCK_V), acc_dt)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            d_ok = rd < D
            xt = tl.load(x_ptr + rn[:, None] * stride_xn + rd[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + rv[:, None].to(tl.int64) * stride_wv + rd[None, :],
                         mask=v_ok[:, None] & d_ok[None, :], other=0.0)
            if USE_DOT:
                if UPCAST:  # the interpreter's bf16 dot is wrong; products are exact in fp32 anyway
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION, out_dtype=acc_dt)
            else:
                acc += tl.sum(xt[:, None, :].to(acc_dt) * wt[None, :, :].to(acc_dt), axis=2)
        aux = tl.load(aux_ptr + rv, mask=v_ok, other=0.0)
        if COSINE:
            score = -(acc * aux[None, :])
        else:
            score = aux[None, :] - 2.0 * acc
        score = tl.where(v_ok[None, :], score, float("inf"))
        tile_best = tl.min(score, axis=1)
        tile_arg = tl.argmin(score, axis=1, tie_break_left=True).to(tl.int64) + v0
        tile_second = tl.min(tl.where(rv[None, :] == tile_arg[:, None], float("inf"), score), axis=1)
        second = tl.minimum(tl.maximum(best, tile_best), tl.minimum(second, tile_second))
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, tile_arg, arg)
    out = rn * n_splits + split
    tl.store(best_ptr + out, best, mask=n_ok)
    tl.store(second_ptr + out, second, mask=n_ok)
    tl.store(arg_ptr + out, arg, mask=n_ok)
