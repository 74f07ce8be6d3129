"""``rounding_loss`` in Triton: fused linear cross-entropy, no ``N × V`` logits in either pass.

Forward (``_rounding_loss_fwd_kernel``): program ``(i, s)`` takes a tile of rows and a slice of the
vocabulary; for each ``BLOCK_V`` tile it computes ``z = x·wᵀ (+ b)`` with ``tl.dot`` (float32
accumulator; float64 by broadcast-multiply-sum) and folds it into an online log-sum-exp ``(m, s)``
per row, picking up the target's logit on the way. The ``(N, splits)`` partials are merged on the
host side of the launch (row max ``M`` and ``ls = log Σ s·exp(m - M)``, O(N·splits)); the loss is
``(M - z[target]) + ls`` and the backward's softmax ``exp((z - M) - ls)``: shifting by ``M`` first keeps
the digits that ``z - (M + ls)`` loses when ``|z|`` is large (logits of 1e20 gave p = 1 in every column).

Backward (``_rounding_loss_bwd_kernel``), a second tiled pass: program ``(i, j)`` recomputes the
``(BLOCK_N, BLOCK_V)`` logits tile, forms ``G = g·(softmax - onehot(target))`` from the saved ``(M, ls)``
(``g`` = the upstream gradient per row: ``1/count`` for "mean", 0 on ignored rows), and adds
``G·W`` into ``dx`` and ``Gᵀ·x`` into ``dW`` (and ``Σ_n G`` into ``db``) with float32 (float64)
atomics, ``BLOCK_D`` columns at a time. For 16-bit inputs ``G`` enters the two GEMMs in the input
dtype (tensor cores), as fused cross-entropy kernels usually do; the loss itself is exact float32.
Memory: the inputs, the float32 gradient buffers and O(N·splits) floats.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common  # noqa: F401  (loads only as fastdiff.kernels: see kernels/__init__.py)


@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, rn, rv, n_ok, v_ok, D, stride_xn, stride_wv, acc_dt: tl.constexpr,
                 HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """``z[n, v] = x_n·w_v (+ b_v)`` for one tile, in ``acc_dt``; masked columns are ``-inf``."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), acc_dt)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        xt = tl.load(x_ptr + rn[:, None] * stride_xn + rd[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rv[:, None] * stride_wv + rd[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        if USE_DOT:
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION, out_dtype=acc_dt)
        else:
            acc += tl.sum(xt[:, None, :].to(acc_dt) * wt[None, :, :].to(acc_dt), axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rv, mask=v_ok, other=0.0)[None, :]
    return tl.where(v_ok[None, :], acc, float("-inf"))


@triton.jit
def _rounding_loss_fwd_kernel(
    x_ptr, w_ptr, b_ptr, tgt_ptr, m_ptr, s_ptr, zt_ptr,
    N, V, D, v_per_split, n_splits, stride_xn, stride_wv,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    acc_dt: tl.constexpr = m_ptr.dtype.element_ty
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    tgt = tl.load(tgt_ptr + rn, mask=n_ok, other=-1)
    v_lo = split * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)
    m = tl.full((BLOCK_N,), float("-inf"), acc_dt)
    s = tl.zeros((BLOCK_N,), acc_dt)
    zt = tl.zeros((BLOCK_N,), acc_dt)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_ok = rv < v_hi
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rn, rv, n_ok, v_ok, D, stride_xn, stride_wv, acc_dt,
                         HAS_BIAS, USE_DOT, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(rv[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = rn * n_splits + split
    tl.store(m_ptr + out, m, mask=n_ok)
    tl.store(s_ptr + out, s, mask=n_ok)
    tl.store(zt_ptr + rn, zt, mask=n_ok & (tgt >= v_lo) & (tgt < v_hi))


@triton.jit
def _rounding_loss_bwd_kernel(
    x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dx_ptr, dw_ptr, db_ptr,
    N, V, D, stride_xn, stride_wv,
    HAS_BIAS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    acc_dt: tl.constexpr = lse_ptr.dtype.element_ty
    in_dt: tl.constexpr = x_ptr.dtype.element_ty
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rv = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    n_ok = rn < N
    v_ok = rv < V
    z = _logits_tile(x_ptr, w_ptr, b_ptr, rn, rv, n_ok, v_ok, D, stride_xn, stride_wv, acc_dt,
                     HAS_BIAS, USE_DOT, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
    m_row = tl.load(lse_ptr + rn, mask=n_ok, other=0.0)  # lse_ptr: (2, N), the row max and log-normaliser
    ls = tl.load(lse_ptr + N + rn, mask=n_ok, other=0.0)
    g = tl.load(g_ptr + rn, mask=n_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rn, mask=n_ok, other=-1)
    p = tl.exp((z - m_row[:, None]) - ls[:, None])
    G = g[:, None] * (p - tl.where(rv[None, :] == tgt[:, None], 1.0, 0.0))
    G = tl.where(n_ok[:, None] & v_ok[None, :], G, 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + rv, tl.sum(G, axis=0), mask=v_ok)
    if USE_DOT:
        Gd = G.to(in_dt)
        if UPCAST:
            Gd = Gd.to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        if NEED_DX:
            wt = tl.load(w_ptr + rv[:, None] * stride_wv + rd[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
            if USE_DOT:
                if UPCAST:
                    wt = wt.to(tl.float32)
                gx = tl.dot(Gd, wt, input_precision=PRECISION, out_dtype=acc_dt)
            else:
                gx = tl.sum(G[:, :, None] * wt[None, :, :].to(acc_dt), axis=1)
            tl.atomic_add(dx_ptr + rn[:, None] * D + rd[None, :], gx, mask=n_ok[:, None] & d_ok[None, :])
        if NEED_DW:
            xt = tl.load(x_ptr + rn[:, None] * stride_xn + rd[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if USE_DOT:
                if UPCAST:
                    xt = xt.to(tl.float32)
                gw = tl.dot(tl.trans(Gd), xt, input_precision=PRECISION, out_dtype=acc_dt)
            else:
                gw = tl.sum(G[:, :, None] * xt[:, None, :].to(acc_dt), axis=0)
            tl.atomic_add(dw_ptr + rv[:, None] * D + rd[None, :], gw, mask=v_ok[:, None] & d_ok[None, :])
