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

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _common

_FIXED = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)
_FIXED_F64 = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=8, num_warps=4, num_stages=1)
_CONFIGS = [
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64), num_warps=4, num_stages=4),
]
_NOMINAL_BLOCK_N = 128


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


_tuned: dict[str, object] = {}


def _tuned_kernel(name: str):
    if name not in _tuned:
        if name == "fwd":
            _tuned[name] = triton.autotune(configs=_CONFIGS, key=["D", "HAS_BIAS"])(_rounding_loss_fwd_kernel)
        else:
            _tuned[name] = triton.autotune(configs=_CONFIGS, key=["D", "HAS_BIAS", "NEED_DX", "NEED_DW"],
                                           reset_to_zero=["dx_ptr", "dw_ptr", "db_ptr"])(_rounding_loss_bwd_kernel)
    return _tuned[name]


def _meta(x: torch.Tensor) -> dict:
    return dict(USE_DOT=x.dtype != torch.float64, PRECISION=_common.dot_precision(x.dtype),
                UPCAST=_common.upcast_for_dot(x.dtype))


def _bias_arg(bias: torch.Tensor | None, cdt: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(1, dtype=cdt) if bias is None else bias.to(cdt).contiguous()


def _rounding_loss_fwd(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: ``x: (N, D)`` contiguous, ``weight: (V, D)`` contiguous, ``target: (N,)`` int64 ->
    ``(loss per row, (2, N) row max and log-normaliser)`` in the compute dtype (0 loss on ignored rows)."""
    N, D = x.shape
    V = weight.shape[0]
    cdt = _common.compute_dtype(x.dtype)
    if N == 0:
        return x.new_empty(0, dtype=cdt), x.new_empty((2, 0), dtype=cdt)
    tiles = triton.cdiv(N, _NOMINAL_BLOCK_N)
    want = _common._TARGET_WAVES * _common.sm_count(x.device)
    n_splits = max(1, min(triton.cdiv(want, tiles), triton.cdiv(V, 128)))
    v_per_split = triton.cdiv(V, n_splits)
    n_splits = triton.cdiv(V, v_per_split)
    m = x.new_empty((N, n_splits), dtype=cdt)
    s = x.new_empty((N, n_splits), dtype=cdt)
    zt = x.new_zeros(N, dtype=cdt)
    b = _bias_arg(bias, cdt, x)
    args = (x, weight, b, target, m, s, zt, N, V, D, v_per_split, n_splits, x.stride(0), weight.stride(0))
    meta = dict(HAS_BIAS=bias is not None, **_meta(x))
    if _common.autotune_enabled() and meta["USE_DOT"]:
        _tuned_kernel("fwd")[lambda c: (triton.cdiv(N, c["BLOCK_N"]), n_splits)](*args, **meta)
    else:
        cfg = _FIXED if meta["USE_DOT"] else _FIXED_F64
        _rounding_loss_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), n_splits)](*args, **meta, **cfg)
    top = m.max(dim=1, keepdim=True).values
    top = top.squeeze(1)
    ls = torch.log((s * torch.exp(m - top.unsqueeze(1))).sum(dim=1))
    loss = torch.where(target != ignore_index, (top - zt) + ls, torch.zeros_like(ls))
    return loss, torch.stack([top, ls])


def _rounding_loss_bwd(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
                       lse: torch.Tensor, g: torch.Tensor, need_dx: bool, need_dw: bool, need_db: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: ``g: (N,)`` per-row upstream gradient (0 on ignored rows) -> ``(dx, dW, db)`` in the
    compute dtype (``db`` is empty without a bias)."""
    N, D = x.shape
    V = weight.shape[0]
    cdt = lse.dtype
    dx = x.new_zeros((N, D), dtype=cdt)
    dw = x.new_zeros((V, D), dtype=cdt)
    db = x.new_zeros(V if bias is not None else 0, dtype=cdt)
    if N == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db
    b = _bias_arg(bias, cdt, x)
    args = (x, weight, b, target, lse, g.to(cdt).contiguous(), dx, dw, db, N, V, D, x.stride(0), weight.stride(0))
    meta = dict(HAS_BIAS=bias is not None, NEED_DX=need_dx, NEED_DW=need_dw,
                NEED_DB=need_db and bias is not None, **_meta(x))
    if _common.autotune_enabled() and meta["USE_DOT"]:
        grid = lambda c: (triton.cdiv(N, c["BLOCK_N"]), triton.cdiv(V, c["BLOCK_V"]))  # noqa: E731
        _tuned_kernel("bwd")[grid](*args, **meta)
    else:
        cfg = _FIXED if meta["USE_DOT"] else _FIXED_F64
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _rounding_loss_bwd_kernel[grid](*args, **meta, **cfg)
    return dx, dw, db


def _register_custom_ops():
    @torch.library.custom_op("fastdiff_triton::rounding_loss_fwd", mutates_args=())
    def fwd_op(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
               ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _rounding_loss_fwd(x, weight, target, bias, ignore_index)

    @fwd_op.register_fake
    def _(x, weight, target, bias, ignore_index):
        cdt = _common.compute_dtype(x.dtype)
        return x.new_empty(x.shape[0], dtype=cdt), x.new_empty((2, x.shape[0]), dtype=cdt)

    @torch.library.custom_op("fastdiff_triton::rounding_loss_bwd", mutates_args=())
    def bwd_op(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
               lse: torch.Tensor, g: torch.Tensor, need_dx: bool, need_dw: bool, need_db: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _rounding_loss_bwd(x, weight, target, bias, lse, g, need_dx, need_dw, need_db)

    @bwd_op.register_fake
    def _(x, weight, target, bias, lse, g, need_dx, need_dw, need_db):
        cdt = lse.dtype
        return (x.new_empty(x.shape, dtype=cdt), weight.new_empty(weight.shape, dtype=cdt),
                x.new_empty(weight.shape[0] if bias is not None else 0, dtype=cdt))

    return fwd_op, bwd_op


rounding_loss_fwd_op, rounding_loss_bwd_op = _register_custom_ops()


class RoundingLossFn(torch.autograd.Function):
    """Fused forward; the backward is the second tiled pass (no logits are saved, only the rows' max and
    log-normaliser)."""

    @staticmethod
    def forward(ctx, x, weight, target, bias, reduction, ignore_index):
        D = x.shape[-1]
        flat = x.detach().reshape(-1, D).contiguous()
        w = weight.detach().contiguous()
        tgt = target.reshape(-1).to(torch.int64).contiguous()
        b = None if bias is None else bias.detach()
        if _common.custom_ops_enabled():
            loss, lse = rounding_loss_fwd_op(flat, w, tgt, b, ignore_index)
        else:
            loss, lse = _rounding_loss_fwd(flat, w, tgt, b, ignore_index)
        valid = tgt != ignore_index
        ctx.save_for_backward(flat, w, tgt, b, lse)
        ctx.meta = (reduction, ignore_index, x.shape, x.dtype, weight.dtype,
                    None if bias is None else bias.dtype)
        if reduction == "none":
            return loss.reshape(target.shape)
        total = loss.sum()
        # a mean over no valid target is 0 with zero gradients (sum / max(count, 1)), as the reference's
        return total / valid.sum().clamp_min(1) if reduction == "mean" else total

    @staticmethod
    @once_differentiable  # the kernels' gradient has no graph: a second derivative must raise, not be 0
    def backward(ctx, grad):
        flat, w, tgt, b, lse = ctx.saved_tensors
        reduction, ignore_index, x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        valid = (tgt != ignore_index).to(lse.dtype)
        if reduction == "none":
            g = grad.reshape(-1).to(lse.dtype) * valid
        elif reduction == "mean":
            g = valid * (grad.to(lse.dtype) / valid.sum().clamp_min(1))
        else:
            g = valid * grad.to(lse.dtype)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = b is not None and ctx.needs_input_grad[3]
        if _common.custom_ops_enabled():
            dx, dw, db = rounding_loss_bwd_op(flat, w, tgt, b, lse, g, need_dx, need_dw, need_db)
        else:
            dx, dw, db = _rounding_loss_bwd(flat, w, tgt, b, lse, g, need_dx, need_dw, need_db)
        return (dx.reshape(x_shape).to(x_dtype) if need_dx else None,
                dw.to(w_dtype) if need_dw else None,
                None,
                db.to(b_dtype) if need_db else None,
                None, None)


def rounding_loss(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None,
                  reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Triton backend of :func:`fastdiff.ops.rounding_loss` (arguments already checked)."""
    return RoundingLossFn.apply(x, weight, target, bias, reduction, ignore_index)
