"""Argument checks shared by every layer: each error names the argument it is about."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from .errors import InputError, InputTypeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tracing() -> bool:
    """True while ``torch.compile`` traces (dynamo). Checks that read tensor values (a host sync and a
    data-dependent branch, which would break the graph) then become :func:`graph_assert`: the same
    decision and message at run time, raised as a RuntimeError by the compiled graph."""
    return torch.compiler.is_compiling()


def graph_assert(ok: torch.Tensor, message: str) -> None:
    """A value check inside a traced graph: ``torch._assert_async(ok, message)`` (kept by every compiler
    backend: it has a side effect) raises ``RuntimeError(message)`` when ``ok`` (a one-element bool tensor)
    is false."""
    torch._assert_async(ok, message)


def tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def dense(name: str, x: torch.Tensor) -> torch.Tensor:
    """A strided tensor with values: the ops read their inputs' values, which a ``meta`` tensor does not
    have and a sparse / nested tensor does not lay out as rows."""
    if x.device.type == "meta":
        raise InputError(f"{name}: a tensor on the meta device has no values to compute with; expected a CPU "
                         "or CUDA tensor")
    if x.layout != torch.strided or x.is_nested:
        layout = "nested" if x.is_nested else str(x.layout).replace("torch.", "")
        raise InputError(f"{name}: expected a dense (strided) tensor, got a {layout} tensor")
    return x


def int64(name: str, v: object) -> int:
    """A Python int (not a bool) that fits in int64, as a kernel reads it."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputTypeError(f"{name}: expected an int, got {type(v).__name__}")
    if not -(2**63) <= v < 2**63:
        raise InputError(f"{name}: must fit in int64 ([-2**63, 2**63)), got {v}")
    return v


def floating(name: str, x: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    x = tensor(name, x)
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise InputTypeError(f"{name}: expected a floating tensor ({allowed}), got {x.dtype}")
    return x


def integer(name: str, x: object) -> torch.Tensor:
    x = tensor(name, x)
    if x.dtype not in INT_DTYPES:
        raise InputTypeError(f"{name}: expected an integer (token id) tensor, got {x.dtype}")
    return x


def token_ids(name: str, x: object, vocab_size: int) -> torch.Tensor:
    """An integer tensor with every value in [0, vocab_size)."""
    x = dense(name, integer(name, x))
    if tracing():
        if x.numel():
            graph_assert((x.min() >= 0) & (x.max() < vocab_size), f"{name}: token ids must lie in [0, {vocab_size})")
        return x
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise InputError(
            f"{name}: token ids must lie in [0, {vocab_size}), got range "
            f"[{int(x.min())}, {int(x.max())}]"
        )
    return x


def no_nan(name: str, x: torch.Tensor) -> torch.Tensor:
    if tracing():
        if x.is_floating_point():
            graph_assert(~torch.isnan(x).any(), f"{name}: contains NaN")
        return x
    if x.is_floating_point() and bool(torch.isnan(x).any()):
        raise InputError(f"{name}: contains NaN")
    return x


def finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """No NaN and no ±inf, from one min/max pass (NaN propagates through both; ~10x faster than
    ``isfinite(x).all()``, which writes a boolean tensor first)."""
    if tracing():
        if x.is_floating_point() and x.numel():
            graph_assert(torch.isfinite(x.detach()).all(), f"{name}: contains NaN or infinity")
        return x
    if x.is_floating_point() and x.numel():
        lo, hi = torch.aminmax(x.detach())
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise InputError(f"{name}: contains NaN or infinity")
    return x


def same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise InputError(
                f"{name}: expected device {first.device} (as {first_name}), got {t.device}"
            )


def positive_int(name: str, v: object, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputTypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < minimum:
        raise InputError(f"{name}: must be >= {minimum}, got {v}")
    return v


def real(name: str, v: object, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputTypeError(f"{name}: expected a number, got {type(v).__name__}")
    v = float(v)
    if v != v:
        raise InputError(f"{name}: is NaN")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise InputError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise InputError(f"{name}: must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def choice(name: str, v: object, options: Sequence[str]) -> str:
    if v not in options:
        raise InputError(f"{name}: expected one of {list(options)}, got {v!r}")
    return v  # type: ignore[return-value]


def expand_leading(name: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast ``t`` against ``shape`` by aligning *leading* dimensions.

    ``t`` may be a scalar or have shape ``shape[:t.ndim]`` (e.g. one step per sequence, ``(B,)``, for
    tokens ``(B, L)``); it is viewed with trailing singleton dimensions and expanded.
    """
    if t.ndim > len(shape) or tuple(t.shape) != tuple(shape[: t.ndim]):
        if t.numel() == 1:
            return t.reshape(()).expand(shape)
        raise InputError(
            f"{name}: shape {tuple(t.shape)} must be a scalar or a leading part of {tuple(shape)}"
        )
    return t.reshape(tuple(t.shape) + (1,) * (len(shape) - t.ndim)).expand(shape)


def steps(name: str, t: object, T: int, lo: int, device: torch.device | None = None) -> torch.Tensor:
    """An int64 tensor of diffusion steps, every value in [lo, T]."""
    if isinstance(t, bool):
        raise InputTypeError(f"{name}: expected an int or integer tensor, got bool")
    if isinstance(t, int):
        t = torch.tensor(t, dtype=torch.int64, device=device)
    elif isinstance(t, torch.Tensor):
        if t.dtype not in INT_DTYPES:
            raise InputTypeError(f"{name}: expected an integer tensor, got {t.dtype}")
        if device is not None and t.device != device:
            raise InputError(f"{name}: expected device {device}, got {t.device}")
        t = dense(name, t).to(torch.int64)
    else:
        raise InputTypeError(f"{name}: expected an int or integer tensor, got {type(t).__name__}")
    if tracing():
        if t.numel():
            graph_assert((t.min() >= lo) & (t.max() <= T), f"{name}: steps must lie in [{lo}, {T}]")
        return t
    if t.numel() and (int(t.min()) < lo or int(t.max()) > T):
        raise InputError(f"{name}: steps must lie in [{lo}, {T}], got [{int(t.min())}, {int(t.max())}]")
    return t


def step_losses(t: object, losses: object, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example training losses observed at steps ``t`` (both ``(B,)``), flattened on the CPU."""
    tt = steps("t", t, T, 1).reshape(-1).cpu()
    ll = floating("losses", losses).detach().reshape(-1).to(torch.float64).cpu()
    if ll.shape != tt.shape:
        raise InputError(f"losses: expected shape {tuple(tt.shape)} (one per t), got {tuple(ll.shape)}")
    finite("losses", ll)
    return tt, ll


def step_pair(t: object, s: object, T: int, device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``1 <= t <= T`` and ``0 <= s < t`` (``s=None`` means ``t - 1``)."""
    tt = steps("t", t, T, 1, device)
    if s is None:
        return tt, tt - 1
    ss = steps("s", s, T, 0, device)
    try:
        bt, bs = torch.broadcast_tensors(tt, ss)
    except RuntimeError as e:
        raise InputError(f"s: shape {tuple(ss.shape)} does not broadcast with t {tuple(tt.shape)}") from e
    if tracing():
        if bt.numel():
            graph_assert((bs < bt).all(), "s: every s must be smaller than its t (s < t)")
        return tt, ss
    if bt.numel() and bool((bs >= bt).any()):
        raise InputError("s: every s must be smaller than its t (s < t)")
    return tt, ss


def config_fields(name: str, cls: type, d: object) -> dict:
    """``d`` as keyword arguments for the dataclass ``cls``: a dict whose keys are all fields of ``cls``
    (``TypeError`` for a non-dict, ``ValueError`` naming the unknown keys)."""
    import dataclasses

    if not isinstance(d, dict):
        raise InputTypeError(f"{name}: expected a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise InputError(f"{name}: unknown {cls.__name__} fields {unknown}")
    return d
