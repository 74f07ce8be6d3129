"""``rounding_loss``: Diffusion-LM's ``L_round``, cross-entropy of tokens under ``softmax(x·Wᵀ + b)``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _checks
from . import _dispatch
from ._common import check_x_weight
from ..errors import InputError

REDUCTIONS = ("mean", "sum", "none")
KERNEL = "rounding_loss"  # fastdiff.ops.backends.<backend>.rounding_loss


def _check(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None, reduction: str,
           ignore_index: int) -> int | None:
    """Returns the number of targets that are not ``ignore_index`` (None while torch.compile traces: the
    checks are then graph asserts and nothing is read back)."""
    check_x_weight(x, weight)
    _checks.integer("target", target)
    _checks.choice("reduction", reduction, REDUCTIONS)
    _checks.int64("ignore_index", ignore_index)
    V = weight.shape[0]
    if target.shape != x.shape[:-1]:
        raise InputError(f"target: expected shape {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
    if bias is not None:
        _checks.floating("bias", bias)
        if bias.shape != (V,):
            raise InputError(f"bias: expected shape ({V},), got {tuple(bias.shape)}")
    _checks.same_device(x=x, weight=weight, target=target, bias=bias)
    _checks.dense("target", target)
    if bias is not None:
        _checks.dense("bias", bias)
    # Compared in int64, as every kernel reads the targets: in a narrower dtype ignore_index would wrap
    # (-100 is 156 as uint8) and V would overflow (256 is 0 as uint8).
    t64 = target.to(torch.int64)
    valid = t64 != ignore_index
    bad = valid & ((t64 < 0) | (t64 >= V))
    if _checks.tracing():  # the same checks as graph asserts (see fastdiff._checks.tracing)
        _checks.graph_assert(~bad.any(), f"target: token ids must lie in [0, {V}) (or equal "
                                         f"ignore_index={ignore_index})")
        _checks.finite("x", x.detach())
        _checks.finite("weight", weight.detach())
        if bias is not None:
            _checks.finite("bias", bias.detach())
        _check_logit_range_in_graph(x.detach(), weight.detach(), None if bias is None else bias.detach())
        return None
    if bool(bad.any()):
        lo, hi = int(t64[bad].min()), int(t64[bad].max())
        raise InputError(f"target: token ids must lie in [0, {V}) (or equal ignore_index={ignore_index}), "
                         f"got values in [{lo}, {hi}]")
    _checks.finite("x", x.detach())
    _checks.finite("weight", weight.detach())
    if bias is not None:
        _checks.finite("bias", bias.detach())
    _check_logit_range(x.detach(), weight.detach(), None if bias is None else bias.detach())
    return int(valid.sum())


def _max_abs(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


def _check_logit_range(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The logits ``x·Wᵀ + b`` must stay below a quarter of the compute dtype's largest value, so that
    ``logsumexp - z[target]`` is finite (finite inputs of 1e20 overflowed float32 into a NaN loss). Bounded
    by ``D · max|x| · max|W| + max|b|``, then by Cauchy-Schwarz on the rows; only rejected when the
    second bound fails too."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    limit = torch.finfo(cdt).max / 4
    mb = 0.0 if bias is None else _max_abs(bias)
    if mb >= limit:
        raise InputError(f"bias: values up to {mb:.3g} overflow the {str(cdt).replace('torch.', '')} logits")
    D = x.shape[-1]
    if D * _max_abs(x) * _max_abs(weight) + mb < limit:
        return
    xn = float(torch.linalg.vector_norm(x.reshape(-1, D), dim=1, dtype=torch.float64).max())
    wn = float(torch.linalg.vector_norm(weight, dim=1, dtype=torch.float64).max())
    if xn * wn + mb >= limit:
        raise InputError(f"x: too large for weight: max |x_r|·|w_v| = {xn * wn:.3g} can overflow the "
                         f"{str(cdt).replace('torch.', '')} logits x·weightᵀ + bias (limit {limit:.3g})")


def _check_logit_range_in_graph(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """:func:`_check_logit_range` while torch.compile traces, as graph asserts."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    limit = torch.finfo(cdt).max / 4
    name = str(cdt).replace("torch.", "")
    mb = torch.zeros((), dtype=torch.float64, device=x.device)
    if bias is not None and bias.numel():
        mb = bias.abs().amax().to(torch.float64)
    _checks.graph_assert(mb < limit, f"bias: values overflow the {name} logits")
    if x.numel() == 0:
        return
    D = x.shape[-1]
    first = D * x.abs().amax().to(torch.float64) * weight.abs().amax().to(torch.float64) + mb
    xn = torch.linalg.vector_norm(x.reshape(-1, D), dim=1, dtype=torch.float64).max()
    wn = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float64).max()
    _checks.graph_assert((first < limit) | (xn * wn + mb < limit),
                         f"x: too large for weight: max |x_r|·|w_v| can overflow the {name} logits x·weightᵀ + bias")


def rounding_loss_ref(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                      bias: torch.Tensor | None = None, reduction: str = "mean",
                      ignore_index: int = -100) -> torch.Tensor:
    """``-log softmax(x·Wᵀ + b)[target]``: ``x: (..., D)``, ``weight: (V, D)``, ``target: (...)``.

    ``reduction``: "mean" (over targets not equal to ``ignore_index``), "sum", or "none" (``(...)``).
    A mean over zero valid targets (every target ignored, or no rows) is 0 with zero gradients on every
    backend, i.e. ``sum / max(count, 1)`` (``F.cross_entropy`` gives NaN there). ``ignore_index`` is an int
    in int64's range; targets are compared with it in int64, whatever their integer dtype.
    Computed in float32 (float64 for float64 inputs); differentiable in ``x``, ``weight`` and ``bias``.
    This reference is plain autograd and keeps the ``N × V`` float32 logits and their gradient; the
    kernel backends compute the gradient in the forward pass and keep neither.
    """
    count = _check(x, weight, target, bias, reduction, ignore_index)
    return _rounding_loss(x, weight, target, bias, reduction, ignore_index, count)


def _rounding_loss(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None,
                   reduction: str, ignore_index: int, count: int | None = None) -> torch.Tensor:
    """The reference's body, on arguments already checked (``count``: the number of valid targets)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = x.reshape(-1, x.shape[-1]).to(cdt) @ weight.to(cdt).T
    if bias is not None:
        logits = logits + bias.to(cdt)
    if reduction == "mean" and count is None:
        count = int((target.to(torch.int64) != ignore_index).sum())
    if reduction == "mean" and count == 0:
        reduction = "sum"  # 0 with zero gradients, not F.cross_entropy's 0 / 0
    loss = F.cross_entropy(logits, target.reshape(-1).to(torch.int64), ignore_index=ignore_index,
                           reduction=reduction)
    return loss.reshape(target.shape) if reduction == "none" else loss


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounding_loss_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                       ignore_index: int, row_scale: torch.Tensor, need_gx: bool, need_gw: bool, need_gb: bool,
                       chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fake (meta) kernel of the C++ and CUDA ``rounding_loss`` ops (FASTDIFF_SCHEMA_ROUNDING_LOSS): the
    per-row losses and the gradients asked for (``(0,)`` for one that is not)."""
    N, D = x.shape
    V = weight.shape[0]
    return (x.new_empty(N), x.new_empty((N, D) if need_gx else 0), x.new_empty((V, D) if need_gw else 0),
            x.new_empty(V if need_gb and bias is not None else 0))


class RoundingLossFn(torch.autograd.Function):
    """The fused linear cross-entropy of every kernel backend: one definition of the reductions,
    ``ignore_index`` and the all-ignored mean (``sum / max(count, 1)``: 0 with zero gradients).

    A backend's glue (``impl``, see :mod:`fastdiff.ops.backends`) provides two primitives on flattened
    inputs: ``rounding_loss_fwd(x, weight, bias, target, ignore_index, grad_scale, need_gx, need_gw, need_gb)
    -> (per-row losses, (gx, gw, gb), state)`` and ``rounding_loss_bwd(state, target, ignore_index, row_grad,
    need_gx, need_gw, need_gb) -> (gx, gw, gb)``, the gradients of ``Σ_r scale_r · loss_r``. A backend with
    ``GRADIENT_IN_FORWARD`` (C++, CUDA) computes the gradient while each chunk's logits are in cache, scaled
    by ``grad_scale`` (1 / max(count, 1) for "mean", 1 for "sum"), and the backward only scales it by the
    output gradient; otherwise (Triton, and "none" everywhere) the backward recomputes with the per-row
    output gradient (0 on ignored rows). Neither keeps ``N × V`` logits. The loss is the float64 sum of the
    per-row losses (divided by ``max(count, 1)`` for "mean"), in the compute dtype.
    """

    @staticmethod
    def forward(ctx: Any, impl: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, reduction: str, ignore_index: int) -> torch.Tensor:
        cdt = _compute_dtype(x.dtype)
        t1 = target.reshape(-1).to(torch.int64).contiguous()
        count = (t1 != ignore_index).sum()
        need = (ctx.needs_input_grad[1], ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[3])
        fused = impl.GRADIENT_IN_FORWARD and reduction != "none" and any(need)
        grad_scale = None
        if fused:  # 1 / max(count, 1) as a float64 division, rounded to the compute dtype
            grad_scale = (1.0 / count.clamp_min(1).to(torch.float64)).to(cdt).reshape(1) if reduction == "mean" \
                else torch.ones(1, dtype=cdt, device=x.device)
        b = None if bias is None else bias.detach()
        loss, grads, state = impl.rounding_loss_fwd(x.detach(), weight.detach(), b, t1, ignore_index, grad_scale, *need)
        ctx.impl, ctx.fused, ctx.need = impl, fused, need
        ctx.reduction, ctx.ignore_index, ctx.cdt = reduction, ignore_index, cdt
        ctx.meta = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if fused:
            ctx.save_for_backward(*grads)
        elif any(need):
            ctx.save_for_backward(t1, count, *state)
        if reduction == "none":
            return loss.reshape(target.shape)
        total = loss.sum(dtype=torch.float64)
        if reduction == "mean":
            total = total / count.clamp_min(1)
        return total.to(cdt)

    @staticmethod
    @once_differentiable  # the kernels' gradient has no graph: a second derivative must raise, not be 0
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None,
                                                       torch.Tensor | None, None, None, None]:
        x_shape, x_dtype, w_dtype, b_dtype = ctx.meta
        need_gx, need_gw, need_gb = ctx.need
        if ctx.fused:
            gx, gw, gb = ctx.saved_tensors
            g = grad.to(ctx.cdt)
            gx, gw, gb = (None if not n else t * g for t, n in ((gx, need_gx), (gw, need_gw), (gb, need_gb)))
        else:
            t1, count, *state = ctx.saved_tensors
            valid = (t1 != ctx.ignore_index).to(ctx.cdt)
            if ctx.reduction == "none":
                row_grad = grad.reshape(-1).to(ctx.cdt) * valid
            elif ctx.reduction == "mean":
                row_grad = valid * (grad.to(ctx.cdt) / count.to(ctx.cdt).clamp_min(1))
            else:
                row_grad = valid * grad.to(ctx.cdt)
            gx, gw, gb = ctx.impl.rounding_loss_bwd(tuple(state), t1, ctx.ignore_index, row_grad, *ctx.need)
        return (None,
                gx.reshape(x_shape).to(x_dtype) if need_gx else None,
                gw.to(w_dtype) if need_gw else None,
                gb.to(b_dtype) if need_gb else None,
                None, None, None)


def rounding_loss(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                  bias: torch.Tensor | None = None, reduction: str = "mean", ignore_index: int = -100,
                  *, backend: str = "auto") -> torch.Tensor:
    """:func:`rounding_loss_ref` on the fastest available backend (see :mod:`fastdiff.ops`); a kernel
    backend runs :class:`RoundingLossFn`."""
    count = _check(x, weight, target, bias, reduction, ignore_index)
    impl, _ = _dispatch.resolve("rounding_loss", KERNEL, backend, x.device)
    if impl is None:
        return _rounding_loss(x, weight, target, bias, reduction, ignore_index, count)
    return RoundingLossFn.apply(impl, x, weight, bias, target, reduction, int(ignore_index))
