"""``rounding_loss`` on the Triton backend: the launchers of the two tiled passes of
``kernels/rounding_loss.py`` (the forward's online log-sum-exp, the backward's recompute with atomics) as the
primitives of :class:`fastdiff.ops.rounding_loss.RoundingLossFn`, and their custom ops
``fastdiff_triton::rounding_loss_fwd`` / ``rounding_loss_bwd``. The gradient is made in the backward pass
(``GRADIENT_IN_FORWARD = False``) from the rows' saved max and log-normaliser: no logits are kept.
"""

from __future__ import annotations

import torch
import triton
from triton.runtime import Autotuner

from fastdiff.kernels.rounding_loss import _rounding_loss_bwd_kernel, _rounding_loss_fwd_kernel

from . import _launch as _common
from . import use_ops
from .. import python_op

GRADIENT_IN_FORWARD = False

_FIXED = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)
_FIXED_F64 = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=8, num_warps=4, num_stages=1)
_CONFIGS = [
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64), num_warps=4, num_stages=4),
]
_NOMINAL_BLOCK_N = 128


_tuned: dict[str, Autotuner] = {}


def _tuned_kernel(name: str) -> Autotuner:
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
    want = _common.TARGET_WAVES * _common.sm_count(x.device)
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


def _fwd_fake(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
              ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    cdt = _common.compute_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=cdt), x.new_empty((2, x.shape[0]), dtype=cdt)


def _bwd_fake(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
              lse: torch.Tensor, g: torch.Tensor, need_dx: bool, need_dw: bool, need_db: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cdt = lse.dtype
    return (x.new_empty(x.shape, dtype=cdt), weight.new_empty(weight.shape, dtype=cdt),
            x.new_empty(weight.shape[0] if bias is not None else 0, dtype=cdt))


FWD_SCHEMA = "(Tensor x, Tensor weight, Tensor target, Tensor? bias, int ignore_index) -> (Tensor, Tensor)"
BWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor target, Tensor? bias, Tensor lse, Tensor g, bool need_dx, "
              "bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)")
rounding_loss_fwd_op = python_op("fastdiff_triton::rounding_loss_fwd", _rounding_loss_fwd, FWD_SCHEMA, _fwd_fake)
rounding_loss_bwd_op = python_op("fastdiff_triton::rounding_loss_bwd", _rounding_loss_bwd, BWD_SCHEMA, _bwd_fake)


def rounding_loss_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                      ignore_index: int, grad_scale: torch.Tensor | None, need_gx: bool, need_gw: bool, need_gb: bool
                      ) -> tuple[torch.Tensor, tuple[None, None, None],
                                 tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Per-row losses of ``x (..., D)`` (never a gradient: ``grad_scale`` is unused); state: the flattened
    inputs and the rows' ``(2, N)`` max and log-normaliser."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    w = weight.contiguous()
    fn = rounding_loss_fwd_op if use_ops() else _rounding_loss_fwd
    loss, lse = fn(flat, w, target, bias, ignore_index)
    return loss, (None, None, None), (flat, w, bias, lse)


def rounding_loss_bwd(state: tuple, target: torch.Tensor, ignore_index: int, row_grad: torch.Tensor, need_gx: bool,
                      need_gw: bool, need_gb: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``Σ_r row_grad[r]·loss_r`` (``row_grad`` 0 on ignored rows), by the second pass."""
    flat, w, b, lse = state
    fn = rounding_loss_bwd_op if use_ops() else _rounding_loss_bwd
    return fn(flat, w, target, b, lse, row_grad, need_gx, need_gw, need_gb and b is not None)
