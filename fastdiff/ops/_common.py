"""Checks and pieces shared by the reference ops."""

from __future__ import annotations

import torch

from .. import _checks
from .._protocols import DiscreteProcess, Step
from ..errors import InputError, InputTypeError

# Largest float64 temporary a reference builds at once (elements): 2**21 = 16 MiB. A block step keeps
# a handful of these alive, so a reference's high-water mark stays near 100 MiB whatever N and V are.
CHUNK_ELEMENTS = 1 << 21


def rows_per_chunk(width: int, budget: int = CHUNK_ELEMENTS) -> int:
    return max(1, budget // max(1, width))


# Temperatures the ops accept (besides 0, greedy, for sample_categorical): finite and in this range, so
# that no kernel's float32 temperature or 1 / temperature overflows or underflows, and x / temperature
# stays finite in float64 for any float32 / float16 / bfloat16 logit. float64 logits beyond ~1e270 are
# checked against the temperature with their values (:func:`check_finite_above`).
TEMPERATURE_MIN = 1e-30
TEMPERATURE_MAX = 1e30
_F64_MAX = torch.finfo(torch.float64).max


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
    _checks.dense("x", x)
    _checks.dense("weight", weight)


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
    _checks.dense(name, logits)
    if values:
        check_finite_above(name, logits)
    return logits


def _needs_overflow_check(logits: torch.Tensor, temperature: float | None) -> bool:
    """Only float64 logits can make ``logit / temperature`` overflow float64 within the accepted range."""
    return temperature is not None and 0.0 < temperature < 1.0 and logits.dtype == torch.float64


def check_values_unless_kernel_does(name: str, logits: torch.Tensor, impl: object | None,
                                    temperature: float | None = None,
                                    mask_id: int | None = None, x_t: torch.Tensor | None = None) -> None:
    """:func:`check_finite_above` before the kernel runs, unless the backend's glue module ``impl`` (None:
    the reference) says its kernel makes the same check itself (``CHECKS_VALUES = True``): it then raises
    the same error before returning anything, and the extra read pass over the logits is saved. The
    temperature overflow check (float64 logits, temperature < 1) is never left to a kernel."""
    if not getattr(impl, "CHECKS_VALUES", False) or _needs_overflow_check(logits, temperature):
        check_finite_above(name, logits, temperature, mask_id=mask_id, x_t=x_t)


# The value errors, in the order they are checked; the C++ kernels' in-kernel check raises the same text.
NAN_MSG = "contains NaN"
POSINF_MSG = "contains +inf"
ALL_NEGINF_MSG = "a row has every logit at -inf (no category can be drawn)"
ONLY_MASK_MSG = ("a masked row (x_t == mask_id) has every logit but the mask's at -inf (the mask logit is "
                 "ignored, so there is no x0 distribution to draw from)")
OVERFLOW_MSG = ("temperature: too small for these logits: a row's largest logit divided by temperature "
                "overflows float64")


def check_finite_above(name: str, logits: torch.Tensor, temperature: float | None = None, *,
                       mask_id: int | None = None, x_t: torch.Tensor | None = None) -> torch.Tensor:
    """No NaN and no +inf (``-inf`` is allowed: it masks a category), in one reduction pass with no
    ``N × V`` temporary: ``amax`` propagates NaN and surfaces +inf. Also rejects rows that are all
    ``-inf``, which leave nothing to draw.

    ``mask_id`` (absorbing processes, with ``x_t``): a row with ``x_t == mask_id`` must also have a
    finite logit off the mask column, since its x0 distribution ignores the mask logit. ``temperature``:
    every row's largest logit divided by it must be finite in float64."""
    if logits.numel() == 0:
        return logits
    if _checks.tracing():
        return _check_finite_above_in_graph(name, logits, temperature, mask_id, x_t)
    if mask_id is None:
        row_max = off = logits.amax(dim=-1)
    else:
        parts = [p.amax(dim=-1) for p in (logits[..., :mask_id], logits[..., mask_id + 1:]) if p.shape[-1]]
        col = logits[..., mask_id]
        off = (torch.maximum(parts[0], parts[1]) if len(parts) == 2 else parts[0]) if parts \
            else torch.full_like(col, float("-inf"))
        row_max = torch.maximum(off, col)  # propagates NaN from either side
    top = row_max.max()
    if bool(torch.isnan(top)):
        raise InputError(f"{name}: {NAN_MSG}")
    if bool(torch.isposinf(top)):
        raise InputError(f"{name}: {POSINF_MSG}")
    if bool(torch.isneginf(row_max).any()):
        raise InputError(f"{name}: {ALL_NEGINF_MSG}")
    if mask_id is not None and x_t is not None and bool((torch.isneginf(off) & (x_t == mask_id)).any()):
        raise InputError(f"{name}: {ONLY_MASK_MSG}")
    if _needs_overflow_check(logits, temperature) and float(row_max.abs().max()) > temperature * _F64_MAX:
        raise InputError(OVERFLOW_MSG)
    return logits


def _row_maxima(logits: torch.Tensor, mask_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the maximum over every column, and over the columns other than ``mask_id``."""
    if mask_id is None:
        row_max = logits.amax(dim=-1)
        return row_max, row_max
    parts = [p.amax(dim=-1) for p in (logits[..., :mask_id], logits[..., mask_id + 1:]) if p.shape[-1]]
    col = logits[..., mask_id]
    off = (torch.maximum(parts[0], parts[1]) if len(parts) == 2 else parts[0]) if parts \
        else torch.full_like(col, float("-inf"))
    return torch.maximum(off, col), off  # propagates NaN from either side


def _check_finite_above_in_graph(name: str, logits: torch.Tensor, temperature: float | None, mask_id: int | None,
                                 x_t: torch.Tensor | None) -> torch.Tensor:
    """:func:`check_finite_above` while torch.compile traces: the same checks in the same order, as
    :func:`fastdiff._checks.graph_assert` (RuntimeError with the same message at run time)."""
    row_max, off = _row_maxima(logits, mask_id)
    top = row_max.max()
    _checks.graph_assert(~torch.isnan(top), f"{name}: {NAN_MSG}")
    _checks.graph_assert(~torch.isposinf(top), f"{name}: {POSINF_MSG}")
    _checks.graph_assert(~torch.isneginf(row_max).any(), f"{name}: {ALL_NEGINF_MSG}")
    if mask_id is not None and x_t is not None:
        _checks.graph_assert(~(torch.isneginf(off) & (x_t == mask_id)).any(), f"{name}: {ONLY_MASK_MSG}")
    if _needs_overflow_check(logits, temperature):
        _checks.graph_assert(row_max.abs().max() <= temperature * _F64_MAX, OVERFLOW_MSG)
    return logits


def check_temperature(temperature: object, allow_zero: bool = False) -> float:
    """A finite temperature in ``[TEMPERATURE_MIN, TEMPERATURE_MAX]`` (or 0, greedy, with ``allow_zero``)."""
    t = _checks.real("temperature", temperature)
    if allow_zero and t == 0.0:
        return 0.0
    if not TEMPERATURE_MIN <= t <= TEMPERATURE_MAX:
        zero = "0 (greedy) or " if allow_zero else ""
        raise InputError(f"temperature: must be {zero}a finite value in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}], "
                         f"got {t!r}")
    return t


def check_process(process: object) -> object:
    for attr in ("vocab_size", "T", "posterior_probs", "x0_log_probs", "kind"):
        if not hasattr(process, attr):
            raise InputTypeError(f"process: expected a fastdiff.discrete process, got {type(process).__name__}")
    V = process.vocab_size
    if isinstance(V, bool) or not isinstance(V, int) or V < 1:
        raise InputError(f"process: vocab_size must be a positive int, got {V!r}")
    if getattr(process, "kind", None) == "absorbing":
        m = getattr(process, "mask_id", None)
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < V:
            raise InputError(f"process: mask_id must be an int in [0, {V}), got {m!r}")
    return process


def mask_of(process: DiscreteProcess) -> int | None:
    """The mask column an absorbing process's x0 distribution ignores (None for other kinds)."""
    return process.mask_id if getattr(process, "kind", None) == "absorbing" else None


def check_posterior_args(process: DiscreteProcess, x0_logits: torch.Tensor, x_t: torch.Tensor, t: Step,
                         s: Step | None, temperature: float, values: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the common arguments of categorical_posterior / posterior_sample.

    Returns ``(x_t int64, t (...) int64, s (...) int64)`` with t and s expanded to ``x_t.shape``.
    ``values=False`` leaves the value check of ``x0_logits`` (:func:`check_finite_above`, with the
    process's mask column) to the caller; otherwise it runs last.
    """
    check_process(process)
    V = process.vocab_size
    check_logits("x0_logits", x0_logits, V, like=_checks.integer("x_t", x_t), values=False)
    x_t = _checks.token_ids("x_t", x_t, V).to(torch.int64)
    temperature = check_temperature(temperature)
    tt, ss = _checks.step_pair(t, s, process.T, x_t.device)
    tt = _checks.expand_leading("t", tt, x_t.shape)
    ss = _checks.expand_leading("s", ss, x_t.shape)
    if values:
        check_finite_above("x0_logits", x0_logits, temperature, mask_id=mask_of(process), x_t=x_t)
    return x_t, tt, ss


def draw_from_weights(w: torch.Tensor, u: torch.Tensor, cdf: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF draw per row (see :mod:`fastdiff.random`): ``min{v : cumsum(w)_v > u · sum(w)}``.

    ``w: (n, V)`` non-negative float64 with a positive sum per row; ``u: (n,)`` in (0, 1). If rounding
    leaves ``u · sum`` at or above the last cumulative value, the last positive-weight category is taken.
    ``cdf``: optionally a float64 scratch tensor shaped as ``w`` (not ``w``) for the cumulative sums.
    """
    c = torch.cumsum(w, dim=-1) if cdf is None else torch.cumsum(w, dim=-1, out=cdf)
    target = (u * c[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(c, target, right=True).squeeze(-1)
    V = w.shape[-1]
    over = idx >= V
    if bool(over.any()):
        last_pos = (V - 1) - torch.argmax(torch.flip(w[over] > 0, [-1]).to(torch.uint8), dim=-1)
        idx[over] = last_pos
    return idx
