"""Checks and pieces shared by the reference ops."""

from __future__ import annotations

from ..errors import InputError, InputTypeError

import torch

from .. import _checks

# Largest float64 temporary a reference builds at once (elements): 2**21 = 16 MiB. A block step keeps
# a handful of these alive, so a reference's high-water mark stays near 100 MiB whatever N and V are.
CHUNK_ELEMENTS = 1 << 21


def rows_per_chunk(width: int, budget: int = CHUNK_ELEMENTS) -> int:
    return max(1, budget // max(1, width))


def check_x_weight(x: object, weight: object) -> None:
    """``x: (..., D)`` and ``weight: (V, D)``, both floating, same dtype and device, V >= 1."""
    _checks.floating("x", x)
    _checks.floating("weight", weight)
    if x.ndim < 1:
        raise InputError("x: expected shape (..., D), got a scalar")
    if weight.ndim != 2:
        raise InputError(f"weight: expected shape (V, D), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise InputError("weight: empty vocabulary (V = 0)")
    if weight.shape[1] != x.shape[-1]:
        raise InputError(f"x: last dimension {x.shape[-1]} does not match weight's D = {weight.shape[1]}")
    if weight.dtype != x.dtype:
        raise InputTypeError(f"weight: dtype {weight.dtype} differs from x's {x.dtype}")
    _checks.same_device(x=x, weight=weight)


def check_logits(name: str, logits: object, vocab_size: int | None = None,
                 like: torch.Tensor | None = None, values: bool = True) -> torch.Tensor:
    """Floating ``(..., V)`` logits with no NaN or +inf (-inf masks a category). ``like``: a tensor
    whose shape must equal the leading shape and whose device must match, checked before any value.
    ``values=False`` checks everything but the values (see :func:`check_values_unless_kernel_does`)."""
    logits = _checks.floating(name, logits)
    if logits.ndim < 1:
        raise InputError(f"{name}: expected shape (..., V), got a scalar")
    V = logits.shape[-1]
    if V == 0:
        raise InputError(f"{name}: empty vocabulary (last dimension is 0)")
    if vocab_size is not None and V != vocab_size:
        raise InputError(f"{name}: last dimension {V} does not match the vocabulary size {vocab_size}")
    if like is not None:
        if logits.shape[:-1] != like.shape:
            raise InputError(
                f"{name}: leading shape {tuple(logits.shape[:-1])} does not match x_t {tuple(like.shape)}"
            )
        if logits.device != like.device:
            raise InputError(f"{name}: expected device {like.device} (as x_t), got {logits.device}")
    if values:
        check_finite_above(name, logits)
    return logits


def check_values_unless_kernel_does(name: str, logits: torch.Tensor, fn) -> None:
    """:func:`check_finite_above` before ``fn`` runs, unless ``fn`` is a kernel that makes the same
    check itself (attribute ``checks_values``): it then raises the same ValueError before returning
    anything, and the extra read pass over the logits is saved."""
    if not getattr(fn, "checks_values", False):
        check_finite_above(name, logits)


def check_finite_above(name: str, logits: torch.Tensor) -> torch.Tensor:
    """No NaN and no +inf (``-inf`` is allowed: it masks a category), in one reduction pass with no
    ``N × V`` temporary: ``amax`` propagates NaN and surfaces +inf. Also rejects rows that are all
    ``-inf``, which leave nothing to draw."""
    if logits.numel() == 0:
        return logits
    row_max = logits.amax(dim=-1)
    top = row_max.max()
    if bool(torch.isnan(top)):
        raise InputError(f"{name}: contains NaN")
    if bool(torch.isposinf(top)):
        raise InputError(f"{name}: contains +inf")
    if bool(torch.isneginf(row_max).any()):
        raise InputError(f"{name}: a row has every logit at -inf (no category can be drawn)")
    return logits


def check_temperature(temperature: object, allow_zero: bool = False) -> float:
    if allow_zero:
        return _checks.real("temperature", temperature, 0.0)
    return _checks.real("temperature", temperature, 0.0, lo_open=True)


def check_process(process: object) -> object:
    for attr in ("vocab_size", "T", "posterior_probs", "x0_log_probs", "kind"):
        if not hasattr(process, attr):
            raise InputTypeError(f"process: expected a fastdiff.discrete process, got {type(process).__name__}")
    return process


def check_posterior_args(process, x0_logits, x_t, t, s, temperature, values: bool = True):
    """Validate the common arguments of categorical_posterior / posterior_sample.

    Returns ``(x_t int64, t (...) int64, s (...) int64)`` with t and s expanded to ``x_t.shape``.
    ``values=False`` leaves the NaN / +inf check of ``x0_logits`` to the caller.
    """
    check_process(process)
    V = process.vocab_size
    check_logits("x0_logits", x0_logits, V, like=_checks.integer("x_t", x_t), values=values)
    x_t = _checks.token_ids("x_t", x_t, V).to(torch.int64)
    check_temperature(temperature)
    tt, ss = _checks.step_pair(t, s, process.T, x_t.device)
    tt = _checks.expand_leading("t", tt, x_t.shape)
    ss = _checks.expand_leading("s", ss, x_t.shape)
    return x_t, tt, ss


def draw_from_weights(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row (see :mod:`fastdiff.random`): ``min{v : cumsum(w)_v > u · sum(w)}``.

    ``w: (n, V)`` non-negative float64 with a positive sum per row; ``u: (n,)`` in (0, 1). If rounding
    leaves ``u · sum`` at or above the last cumulative value, the last positive-weight category is taken.
    """
    c = torch.cumsum(w, dim=-1)
    target = (u * c[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(c, target, right=True).squeeze(-1)
    V = w.shape[-1]
    over = idx >= V
    if bool(over.any()):
        last_pos = (V - 1) - torch.argmax(torch.flip(w[over] > 0, [-1]).to(torch.uint8), dim=-1)
        idx[over] = last_pos
    return idx
