"""``sample_categorical``: temperature / top-k / top-p sampling from logits with counter-based noise."""

from __future__ import annotations

import torch

from .. import _checks
from .. import random as _random
from . import _dispatch
from ._common import (check_finite_above, check_logits, check_temperature, check_values_unless_kernel_does,
                      draw_from_weights, rows_per_chunk)
from ._plan import int64_bits

KERNEL = "sample_categorical"  # fastdiff.ops.backends.<backend>.sample_categorical


def _check(logits: torch.Tensor, seed: int, offset: int, temperature: float, top_k: int | None, top_p: float | None,
           row_offset: int = 0) -> tuple[int, int | None]:
    """Everything but the logits' values; returns ``(seed as an int, top_k)``, ``top_k >= V`` (no filter)
    as None."""
    check_logits("logits", logits, values=False)
    seed = _random._check_seed(seed)
    _random._check_offset(offset)
    _random.check_row_offset("row_offset", row_offset, logits.numel() // max(1, logits.shape[-1]))
    check_temperature(temperature, allow_zero=True)
    if top_k is not None:
        _checks.positive_int("top_k", top_k)
        if top_k >= logits.shape[-1]:  # keeps every category: no filter (and no int64 overflow in a kernel)
            top_k = None
    if top_p is not None:
        _checks.real("top_p", top_p, 0.0, 1.0, lo_open=True)
    return seed, top_k


def filter_weights(z: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Unnormalised float64 weights ``exp(z - max z)`` restricted to the top-k / top-p set: ``(n, V)``.

    Both sets are tie-inclusive, so they do not depend on how a kernel orders equal values:

    * top-k keeps ``v`` iff fewer than ``k`` logits are strictly larger than ``z_v``;
    * top-p (on the distribution left by top-k) keeps ``v`` iff the probability mass of the categories
      strictly more probable than ``v`` is below ``p``: the smallest "nucleus" whose mass reaches ``p``,
      plus any category tied with its least probable member.
    """
    z = z - z.max(dim=-1, keepdim=True).values
    w = torch.exp(z)
    V = z.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        w = torch.where(z >= kth, w, torch.zeros_like(w))
    if top_p is not None and top_p < 1.0:
        p = w / w.sum(-1, keepdim=True)
        sp, order = torch.sort(p, dim=-1, descending=True)  # order within ties is irrelevant below
        excl = torch.cumsum(sp, -1) - sp  # mass before each sorted position
        # Each position's tie group starts at the last index (so far) where the value changed; the mass
        # before that start is the mass strictly greater than the value.
        pos = torch.arange(V, device=z.device).expand_as(sp)
        starts = torch.ones_like(sp, dtype=torch.bool)
        starts[:, 1:] = sp[:, 1:] != sp[:, :-1]
        first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=-1).values
        mass_greater = excl.gather(-1, first)
        keep_sorted = mass_greater < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        w = torch.where(keep, w, torch.zeros_like(w))
    return w


def sample_categorical_ref(logits: torch.Tensor, *, seed: int, offset: int = 0, temperature: float = 1.0,
                           top_k: int | None = None, top_p: float | None = None, row_offset: int = 0) -> torch.Tensor:
    """Draw one category per row of ``logits: (..., V)`` -> int64 ``(...)``.

    ``softmax(logits / temperature)``, then top-k, then top-p (both as in :func:`filter_weights`), then
    the inverse-CDF draw with the uniform of Philox counter ``(row_offset + row, offset)``
    (:mod:`fastdiff.random`; ``row_offset`` numbers the first row globally, for slices of a batch).
    ``temperature = 0`` is greedy (``argmax``, lowest index on ties); otherwise it must be finite and in
    ``[1e-30, 1e30]`` (so that no kernel's float32 temperature or 1 / temperature overflows), and for float64
    logits every row's largest logit divided by it must be finite in float64. ``top_k >= V`` keeps every
    category. Computed in float64 over row blocks. ``-inf`` logits are never drawn; NaN or ``+inf`` logits
    raise ``ValueError`` (:class:`~fastdiff.errors.InputError`), as every other bad argument does, with the
    same message on every backend.
    """
    seed, top_k = _check(logits, seed, offset, temperature, top_k, top_p, row_offset=row_offset)
    check_finite_above("logits", logits, temperature)
    return _sample_categorical(logits, seed=seed, offset=offset, temperature=temperature, top_k=top_k, top_p=top_p,
                               row_offset=row_offset)


def _sample_categorical(logits: torch.Tensor, *, seed: int, offset: int, temperature: float, top_k: int | None,
                        top_p: float | None, row_offset: int = 0) -> torch.Tensor:
    """The reference's body, on arguments already checked."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    if temperature == 0:
        return torch.argmax(flat, dim=-1).reshape(logits.shape[:-1])
    out = torch.empty(flat.shape[0], dtype=torch.int64, device=logits.device)
    # top-p sorts: about ten (rows, V) temporaries at once, so it takes smaller blocks.
    step = rows_per_chunk(V) if top_p is None else max(1, rows_per_chunk(V) // 4)
    for r0 in range(0, flat.shape[0], step):
        z = flat[r0:r0 + step].to(torch.float64) / temperature
        w = filter_weights(z, top_k, top_p)
        rows = torch.arange(r0, r0 + z.shape[0], device=logits.device)
        out[r0:r0 + step] = draw_from_weights(w, _random.row_uniforms(seed, offset, rows, start=row_offset))
    return out.reshape(logits.shape[:-1])


def sample_categorical_fake(logits: torch.Tensor, seed: int, offset: int, temperature: float, top_k: int,
                            top_p: float, row_offset: int) -> torch.Tensor:
    """The fake (meta) kernel of every backend's ``sample_categorical`` op: ``(N,)`` int64."""
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def sample_categorical(logits: torch.Tensor, *, seed: int, offset: int = 0, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, row_offset: int = 0,
                       backend: str = "auto") -> torch.Tensor:
    """:func:`sample_categorical_ref` on the fastest available backend (see :mod:`fastdiff.ops`)."""
    seed, top_k = _check(logits, seed, offset, temperature, top_k, top_p, row_offset=row_offset)
    impl, _ = _dispatch.resolve("sample_categorical", KERNEL, backend, logits.device)
    check_values_unless_kernel_does("logits", logits, impl, temperature)
    if impl is None:
        return _sample_categorical(logits, seed=seed, offset=offset, temperature=temperature, top_k=top_k,
                                   top_p=top_p, row_offset=row_offset)
    # The kernel ABI (FASTDIFF_SCHEMA_SAMPLE_CATEGORICAL): (N, V) rows with a unit column stride, top_k 0 and
    # top_p 1.0 for "no filter", the counter words as int64.
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    if flat.stride(-1) != 1 and V != 1:
        flat = flat.contiguous()
    out = impl.sample_categorical(flat, int64_bits(seed), int64_bits(offset), float(temperature),
                                  0 if top_k is None else int(top_k), 1.0 if top_p is None else float(top_p),
                                  int64_bits(row_offset))
    return out.reshape(logits.shape[:-1])
