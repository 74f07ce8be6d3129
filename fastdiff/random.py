"""Counter-based random numbers shared by the reference and every kernel.

Every random draw in :mod:`fastdiff.ops` is a pure function of ``(seed, offset, counter)``, so a C++,
CUDA or Triton kernel reproduces the reference's draws bit for bit, whatever its launch geometry.

Generator
---------
Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), in the round and
key conventions of Random123 and of Triton's ``tl.philox``:

* key ``(k0, k1) = (seed & 0xffffffff, seed >> 32)`` (Triton's ``seed_lo, seed_hi``);
* counter ``(c0, c1, c2, c3) = (row & 0xffffffff, row >> 32, offset & 0xffffffff, offset >> 32)``.

For ``row < 2**32`` and ``offset == 0`` this is exactly ``tl.randint4x(seed, row)``.

Rows are global: an op's ``row_offset`` (and :func:`uniform` / :func:`randn`'s ``start``) numbers its first
row, so a slice of a larger batch draws exactly what the same rows draw in the whole batch. The sampler
uses it to key every draw by the sample's global index (sharded generation, :mod:`fastdiff.distributed`).

Uniforms
--------
Two 32-bit words ``(w0, w1)`` make one float64 uniform on the *open* interval (0, 1) with 52 random bits:
``u = ((w0 >> 6) * 2**26 + (w1 >> 6) + 0.5) * 2**-52``, every value exact in float64, from ``2**-53`` to
``1 - 2**-53``. It is never 0 or 1 (fp32 ``tl.rand`` can round to 1.0, and so would a 53-bit ``k + 0.5``),
so ``log(u)`` and ``log(1 - u)`` are always finite.

Categorical draws
-----------------
A categorical draw over a row of non-negative weights ``w`` uses one uniform per row (words 0 and 1 of
the row's Philox block) and inverts the CDF in index order::

    token = min { v : w_0 + ... + w_v > u * (w_0 + ... + w_{V-1}) }

so a zero-weight category is never drawn, and a kernel agrees with the reference except when ``u * Z``
falls within rounding of a cumulative boundary. The reference accumulates in float64; a kernel should
accumulate the CDF in float64 too (or with compensated sums), since a category of relative probability
below the accumulator's resolution (``2**-24`` in float32) would otherwise be drawn with a distorted
frequency — the same tail problem that moved LLaDA, ReMDM and DUO to float64 Gumbel noise. One uniform per row (not one per category, as Gumbel-max
needs) keeps the kernels at the cost of reading the logits.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch
from .errors import InputError, InputTypeError

__all__ = [
    "philox4x32",
    "uniform_from_words",
    "row_uniforms",
    "uniform",
    "randn",
]

_MASK32 = 0xFFFFFFFF
_M0 = 0xD2511F53  # round multiplier applied to c0 ("A" in Triton)
_M1 = 0xCD9E8D57  # round multiplier applied to c2 ("B" in Triton)
_W0 = 0x9E3779B9  # key bump (golden ratio)
_W1 = 0xBB67AE85  # key bump (sqrt(3) - 1)
N_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b < 2**32``."""
    # Split b into 16-bit halves so every partial product fits in int64.
    p_lo = b.bitwise_and(0xFFFF) * a  # < 2**48
    p_hi = b.bitwise_right_shift(16) * a  # < 2**48
    m = p_lo + p_hi.bitwise_and(0xFFFF).bitwise_left_shift(16)  # < 2**49
    lo = m.bitwise_and(_MASK32)
    hi = p_hi.bitwise_right_shift(16) + m.bitwise_right_shift(32)
    return hi, lo


def philox4x32(
    seed: int,
    c0: torch.Tensor,
    c1: torch.Tensor | int = 0,
    c2: torch.Tensor | int = 0,
    c3: torch.Tensor | int = 0,
    n_rounds: int = N_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with ``n_rounds`` rounds, elementwise over broadcast counters.

    Parameters
    ----------
    seed : int in [0, 2**64): the key, split into ``(seed_lo, seed_hi)``.
    c0, c1, c2, c3 : int64 tensors (or ints) with values in [0, 2**32): the counter words.

    Returns
    -------
    Four int64 tensors holding the uint32 output words.
    """
    seed = _check_seed(seed)
    c0 = torch.as_tensor(c0, dtype=torch.int64)
    dev = c0.device
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=dev) for c in (c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(_M1, c2)
        hi_a, lo_a = _mulhilo(_M0, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def uniform_from_words(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """float64 uniform on the open interval (0, 1) from two uint32 words (52 random bits)."""
    k = w0.bitwise_right_shift(6) * (1 << 26) + w1.bitwise_right_shift(6)  # in [0, 2**52)
    return (k.to(torch.float64) + 0.5) * (2.0**-52)


def _check_seed(seed: int) -> int:
    """An int in [0, 2**64), or a one-element integer tensor holding one; returned as a Python int."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1:
            raise InputError("seed: expected a single integer")
        if seed.dtype == torch.bool or seed.is_floating_point() or seed.is_complex():
            raise InputTypeError(f"seed: expected an integer tensor, got {seed.dtype}")
        if seed.device.type == "meta":
            raise InputError("seed: a tensor on the meta device has no value")
        seed = int(seed.item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputTypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise InputError(f"seed: must be in [0, 2**64), got {seed}")
    return seed


def _check_offset(offset: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise InputTypeError(f"offset: expected an int, got {type(offset).__name__}")
    if not 0 <= offset < 2**64:
        raise InputError(f"offset: must be in [0, 2**64), got {offset}")
    return offset


def check_row_offset(name: str, start: object, rows: int) -> int:
    """The global index of the first of ``rows`` consecutive counter rows: an int (not a bool) with
    ``0 <= start < 2**64`` and ``start + rows <= 2**64`` (every row a 64-bit counter half)."""
    if isinstance(start, bool) or not isinstance(start, int):
        raise InputTypeError(f"{name}: expected an int, got {type(start).__name__}")
    if start < 0 or start >= 2**64 or start + rows > 2**64:
        raise InputError(f"{name}: must satisfy 0 <= {name} and {name} + rows <= 2**64, got {start} "
                         f"for {rows} rows")
    return start


def _row_counter(rows: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counter words ``(c0, c1)`` of the 64-bit rows ``start + rows`` (``rows``: non-negative int64),
    added in 32-bit halves with a carry so that rows past ``2**63`` do not overflow int64."""
    lo = rows.bitwise_and(_MASK32) + (start & _MASK32)  # < 2**33
    hi = rows.bitwise_right_shift(32) + (start >> 32) + lo.bitwise_right_shift(32)
    return lo.bitwise_and(_MASK32), hi.bitwise_and(_MASK32)


def row_uniforms(
    seed: int,
    offset: int,
    rows: torch.Tensor | int,
    device: torch.device | str | None = None,
    *,
    start: int = 0,
) -> torch.Tensor:
    """The per-row uniform of a categorical draw: ``u[r]`` for the global row indices ``start + rows``.

    ``rows`` is a non-negative int64 tensor of row indices (or an int ``n`` meaning ``arange(n)``);
    ``start`` (a Python int, so rows up to ``2**64 - 1`` are reachable) is added to each. Returns float64
    uniforms on (0, 1) with the same shape, from words 0 and 1 of Philox(seed; start + row, offset).
    """
    seed = _check_seed(seed)
    offset = _check_offset(offset)
    if isinstance(rows, int):
        rows = torch.arange(rows, dtype=torch.int64, device=device)
    rows = rows.to(torch.int64)
    start = check_row_offset("start", start, 0)  # the rows' bound is the caller's (no device sync here)
    c0, c1 = _row_counter(rows, start)
    w0, w1, _, _ = philox4x32(seed, c0, c1, offset & _MASK32, (offset >> 32) & _MASK32)
    return uniform_from_words(w0, w1)


@functools.lru_cache(maxsize=None)
def _native_words():
    """``fastdiff._C.philox_words`` when the C++ extension is built (the same words, about 100x faster
    than the PyTorch rounds on CPU), else None."""
    try:
        mod = importlib.import_module("fastdiff._C")
    except ImportError:
        return None
    return getattr(mod, "philox_words", None)


def _flat_words(seed: int, offset: int, n: int, device: str | torch.device | None, start: int = 0
                ) -> tuple[torch.Tensor, ...]:
    seed = _check_seed(seed)
    offset = _check_offset(offset)
    start = check_row_offset("start", start, n)
    if device is None or torch.device(device).type == "cpu":
        native = _native_words()
        if native is not None:
            return native(seed, offset, n, start).unbind(1)
    c0, c1 = _row_counter(torch.arange(n, dtype=torch.int64, device=device), start)
    return philox4x32(seed, c0, c1, offset & _MASK32, (offset >> 32) & _MASK32)


def uniform(
    shape: tuple[int, ...] | torch.Size,
    *,
    seed: int,
    offset: int = 0,
    start: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """float64 uniforms on (0, 1) of ``shape``; element ``i`` (C order) uses the counter of row
    ``start + i`` (so ``uniform((n,), start=k) == uniform((k + n,))[k:]``)."""
    n = math.prod(shape)
    w0, w1, _, _ = _flat_words(seed, offset, n, device, start)
    return uniform_from_words(w0, w1).reshape(shape)


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    seed: int,
    offset: int = 0,
    start: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` from counter-based uniforms (Box–Muller, float64 inside).

    Element ``i`` (C order) uses all four words of Philox(seed; start + i, offset): two open-interval
    uniforms ``u1, u2`` and ``z = sqrt(-2 log u1) * cos(2 pi u2)``.
    """
    n = math.prod(shape)
    w0, w1, w2, w3 = _flat_words(seed, offset, n, device, start)
    u1 = uniform_from_words(w0, w1)
    u2 = uniform_from_words(w2, w3)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.reshape(shape).to(dtype)
