"""``nearest_embedding`` in Triton: the screen of :mod:`fastdiff.ops._nearest` as a tiled GEMM with a fused
arg-min epilogue (the shared Python code rescales the inputs, computes the per-row statistic and
resolves the near-ties in float64).

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

import torch
import triton
import triton.language as tl

from fastdiff.ops import _nearest

from . import _common

_FIXED = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)  # interpreter, tests
_FIXED_F64 = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=8, num_warps=4, num_stages=1)
_CONFIGS = [  # GPU autotuning: a few GEMM shapes, keyed on D and the dtype
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32), num_warps=4, num_stages=4),
]
_NOMINAL_BLOCK_N = 128  # fixes the split count independently of the autotuned config


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


_autotuned = None


def _kernel():
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
    want = _common._TARGET_WAVES * _common.sm_count(flat.device)
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


def _nearest_embedding_fwd(x: torch.Tensor, weight: torch.Tensor, metric: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: (..., D)``, ``weight: (V, D)`` (checked by the public op) -> ``(indices, snapped)``."""
    return _nearest.nearest(x, weight, metric, _screen)


def _register_custom_op():
    @torch.library.custom_op("fastdiff_triton::nearest_embedding", mutates_args=())
    def nearest_embedding_op(x: torch.Tensor, weight: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _nearest_embedding_fwd(x, weight, metric)

    @nearest_embedding_op.register_fake
    def _(x, weight, metric):
        return x.new_empty(x.shape[:-1], dtype=torch.int64), weight.new_empty(x.shape)

    return nearest_embedding_op


nearest_embedding_op = _register_custom_op()


def nearest_embedding(x: torch.Tensor, weight: torch.Tensor, metric: str = "l2"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of :func:`fastdiff.ops.nearest_embedding` (arguments already checked)."""
    if _common.custom_ops_enabled():
        return nearest_embedding_op(x, weight, metric)
    return _nearest_embedding_fwd(x, weight, metric)
