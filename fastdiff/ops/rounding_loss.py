"""``rounding_loss``: Diffusion-LM's ``L_round``, cross-entropy of tokens under ``softmax(x·Wᵀ + b)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from . import _dispatch
from ._common import check_x_weight
from ..errors import InputError

REDUCTIONS = ("mean", "sum", "none")
_dispatch.register("rounding_loss", "cpp", "rounding_loss")
_dispatch.register("rounding_loss", "cuda", "rounding_loss")
_dispatch.register("rounding_loss", "triton", "rounding_loss")


def _check(x, weight, target, bias, reduction, ignore_index) -> int:
    """Returns the number of targets that are not ``ignore_index``."""
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


def _rounding_loss(x, weight, target, bias, reduction, ignore_index, count=None) -> torch.Tensor:
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


def rounding_loss(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                  bias: torch.Tensor | None = None, reduction: str = "mean", ignore_index: int = -100,
                  *, backend: str = "auto") -> torch.Tensor:
    """:func:`rounding_loss_ref` on the fastest available backend (see :mod:`fastdiff.ops`)."""
    count = _check(x, weight, target, bias, reduction, ignore_index)
    fn = _dispatch.resolve("rounding_loss", backend, x.device, None)
    if fn is None:
        return _rounding_loss(x, weight, target, bias, reduction, ignore_index, count)
    return fn(x, weight, target, bias, reduction, ignore_index)
