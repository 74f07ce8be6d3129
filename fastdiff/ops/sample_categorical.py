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

    The top-p set is found without sorting the row (see :func:`_top_p_threshold`). ``z`` is not modified.
    """
    return _filter_weights(z, top_k, top_p, inplace=False)


def _filter_weights(z: torch.Tensor, top_k: int | None, top_p: float | None, inplace: bool,
                    work: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`filter_weights`; ``inplace=True`` reuses ``z`` (a float64 temporary the caller owns) for the
    weights, so that a row block holds one full-size float64 tensor fewer; ``work`` keeps the top-p
    scratch tensors from one row block to the next (a fresh large tensor costs its page faults, on the
    CPU about as much as a pass)."""
    V = z.shape[-1]
    if top_k is not None and top_k < V:
        # ranked on z itself, before the max is subtracted: z - max z would also tie logits that only the
        # subtraction's rounding merges (1e-73 and 0 beside a max of 0.25), which the definition keeps apart
        if not inplace:
            z, inplace = z.clone(), True
        _zero_below(z, torch.topk(z, top_k, dim=-1).values[:, -1:], float("-inf"))  # exp(-inf) = 0
    zmax = z.max(dim=-1, keepdim=True).values
    z = z.sub_(zmax) if inplace else z - zmax
    w = z.exp_()
    if top_p is not None and top_p < 1.0:
        _zero_below(w, _top_p_threshold(w, top_p, {} if work is None else work), 0.0)
    return w


def _zero_below(x: torch.Tensor, thr: torch.Tensor, fill: float) -> None:
    """``x[r, v] = fill`` where ``x[r, v] < thr[r]``, in place (``thr: (n, 1)``, -inf: nothing)."""
    if x.shape[-1] < 2048 or x.device.type != "cpu":
        x.masked_fill_(x < thr, fill)
        return
    # On the CPU a boolean mask costs about ten plain passes; threshold_ (x if x > t else fill), a row at
    # a time with t just below thr, costs one.
    below = torch.nextafter(thr[:, 0], torch.tensor(float("-inf"), dtype=thr.dtype)).tolist()
    for row, t in zip(x.unbind(0), below):
        if t != float("-inf"):
            torch.nn.functional.threshold_(row, t, fill)


# top-p without a sort: weights in [0, 1] are bucketed by the top bits of their float64 bit pattern (monotone
# in the value for w >= 0): the exponent and ``m`` mantissa bits (2**m buckets per octave) of
# ``w * 2**-(1022 - O)``: the top ``O`` octaves below 1 become the smallest normal exponents, so every smaller w
# (subnormal or zero after the exact power-of-two scaling, zeros included) falls in the lowest 2**m buckets,
# and the keys need no offset and no clamp (one pass fewer). ``O`` and ``m`` are chosen per row: ``O`` the
# octaves its weights span (at most ``_OCTAVES``), ``m`` the most bits that keep ``(O + 1) << m`` within the
# budget of buckets, so a row of nearly equal weights (a "flat" row, the nucleus most of the vocabulary) gets
# fine buckets instead of a crossing bucket of thousands of members, and a row spread over many octaves (a
# "peaked" row) no lump of most of the row in its lowest buckets (a scatter_add into one bucket is a chain of
# dependent additions, several times slower).
_OCTAVES = 128


def _bucket_budget(V: int) -> int:
    """The largest bucket key per row: 2048 (a row of float64 bucket masses fits a 32 KiB L1 data cache; a
    larger budget made the scatter_add slower than the finer buckets saved), at most ~V / 2."""
    return max(1, min(2048, V // 2))


def _scratch(work: dict[str, torch.Tensor], name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor shaped as ``like`` (row-major), kept in ``work`` for the next, no larger, block."""
    buf = work.get(name)
    if buf is None or buf.dtype != dtype or buf.device != like.device or buf.shape[1:] != like.shape[1:] \
            or buf.shape[0] < like.shape[0]:
        buf = work[name] = torch.empty(like.shape, dtype=dtype, device=like.device)
    return buf[:like.shape[0]]


def _bucket_keys(w: torch.Tensor, budget: int, out: torch.Tensor) -> torch.Tensor:
    """int64 bucket of each ``w in [0, 1]`` (rows ``(n, V)``) in ``[0, budget]``, into ``out``: per row, the bits
    of ``w * 2**-(1022 - O)`` (exact, or rounded monotonically into subnormals) >> ``(52 - m)``, with ``O`` the
    octaves of the row's smallest positive weight among every ``V // 256``-th (``2**-O <= that w``, at most
    ``_OCTAVES`` and ``budget - 1``) and ``m`` the most bits with ``(O + 1) << m <= budget`` (``w = 1``: that
    key). Any ``O`` gives monotone keys, hence the same result: the sample (not a pass over the row) only
    leaves its few smaller weights, and zeros, to the linear buckets below ``2**-O``."""
    top = min(_OCTAVES, budget - 1)
    sample = w[:, ::max(1, w.shape[1] // 256)]
    wmin = torch.where(sample > 0, sample, 1.0).amin(-1)
    octaves = torch.where(wmin > 0, 1 - torch.frexp(wmin).exponent.to(torch.int64), top).clamp_(0, top)
    scale = torch.tensor([2.0 ** (o - 1022) for o in range(top + 1)], dtype=w.dtype, device=w.device)
    shift = torch.tensor([52 - ((budget // (o + 1)).bit_length() - 1) for o in range(top + 1)], device=w.device)
    torch.mul(w, scale[octaves][:, None], out=out.view(torch.float64))
    return out.bitwise_right_shift_(shift[octaves][:, None])


def _top_p_threshold(w: torch.Tensor, top_p: float, work: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row of non-negative float64 weights ``w: (n, V)`` (a positive sum per row), the smallest kept
    weight ``t: (n, 1)`` of the tie-inclusive top-p set of ``p = w / sum(w)`` (the definition's
    probabilities; ties are equal ``p``): ``v`` is kept iff ``w_v >= t`` (``t = 0``: every category).

    A radix select in a few passes instead of a full sort (the idea of the histogram / radix selections
    of GPU top-k / top-p samplers, e.g. "RadiK", Li et al. 2024, and FlashInfer's sampling kernels): one
    per-row histogram of the weight per bucket of the weight's top bits (a ``scatter_add``; the buckets per
    row from its range, see :func:`_bucket_keys`), a cumulative sum over the buckets finds the crossing
    bucket ``b*`` (the mass above it is ``< top_p``, with it ``>= top_p``); every bucket above is kept whole,
    every bucket below dropped, and only the members of ``b*`` (found by :func:`_members`) are sorted (per
    row, padded) by their probability ``w / sum(w)`` to resolve the boundary exactly, tie groups whole, as
    the full sort of the definition does. The masses are summed in another order than a sorted cumulative
    sum, so a boundary within float64 rounding of ``top_p`` may fall the other way (as may a tie of two
    probabilities whose weights differ in the last bit and straddle a bucket edge). The kept set is upward
    closed in ``p``, hence in ``w``: a weight threshold.

    Cost (issue 16: at most 2x the reference's plain draw on the same logits): per row block, the passes
    over the ``(n, V)`` weights are the sum, the bucket keys (a multiply and a shift), the ``scatter_add``,
    one comparison for the crossing bucket's mask, and the final zeroing (:func:`_zero_below`); the rest is
    on ``(n, 2049)`` bucket masses and the few crossing members. On one thread, 2048 x 32768 float32 logits,
    ``top_p = 0.9`` (``FASTDIFF_BENCH_THREADS=1 pytest benchmarks/benchmark_sample_categorical.py -k
    "top_p_cost and reference"``, ``ratio_to_plain``; ``scripts/time_top_p_ref.py`` for a quicker look),
    a loaded 2-core machine, three runs each: "normal" logits 1.80-1.92 -> 1.75-1.84, "flat" 2.07-2.48 ->
    1.69-1.78, "peaked" 2.03-2.12 -> 1.67-1.78 (before: 64 buckets an octave over 40 octaves for every row, a
    ``nonzero`` over the whole mask, a fresh key tensor per call; top-p itself 0.59 / 0.72 / 0.66 s -> 0.55 /
    0.56 / 0.55 s). Flat rows had crossing buckets of ~900 members, peaked rows ~70% of their weights in one
    lowest bucket (a chain of dependent additions in the ``scatter_add``).
    """
    n, V = w.shape
    S = w.sum(-1, keepdim=True)  # as the definition's w.sum(-1): the same p = w / S
    # w in [0, 1] (its maximum is exp(0)): bucket keys in [0, B - 1], B - 1 the bucket of 1
    budget = _bucket_budget(V)
    key = _bucket_keys(w, budget, _scratch(work, "key", w, torch.int64))
    B = budget + 1
    hist = work.get("hist")  # (n, B) tensors reused too: fresh ones cost page faults in the loop of row blocks
    if hist is None or hist.shape != (n, B) or hist.device != w.device:
        hist = work["hist"] = torch.empty(n, B, dtype=w.dtype, device=w.device)
    hist.zero_().scatter_add_(1, key, w)
    # In place, no flip (a fresh (n, B) tensor per block cost its page faults): the mass of the buckets <= each
    # bucket; the mass from bucket c + 1 up is total - below[c] (exactly 0 over empty top buckets, whatever
    # top_p; total - top_p * S would lose a top_p below float64 rounding of 1).
    below = hist.cumsum_(-1)
    total = below[:, -1:]
    target = top_p * S
    crossing = total[:, 0] >= target[:, 0]  # else (the buckets' sum rounded below top_p * S) none: keep the row
    if not bool(crossing.any()):
        return torch.zeros_like(S)
    # the crossing bucket b: the highest whose mass from b up reaches top_p * S; that mass does not increase
    # with b, so b counts the c < B - 1 where it still does from c + 1
    b = (total - below[:, :-1] >= target).sum(-1)
    above = total[:, 0] - below.gather(1, b[:, None])[:, 0]  # the mass of the buckets above b
    flat = _members(key, torch.where(crossing, b, -1)[:, None], work)  # the crossing bucket's, row by row
    rows = torch.div(flat, V, rounding_mode="floor")
    wv = w.reshape(-1).index_select(0, flat)
    counts = torch.bincount(rows, minlength=n)
    L = int(counts.max())
    pos = torch.arange(flat.numel(), device=w.device) - (torch.cumsum(counts, 0) - counts).index_select(0, rows)
    pad = torch.zeros(n, L, dtype=w.dtype, device=w.device)
    pad.view(-1).index_copy_(0, rows * L + pos, wv)
    # order within ties is irrelevant below; non-negative float64 sort as their int64 bit patterns (faster)
    sw = pad.view(torch.int64).sort(dim=-1, descending=True).values.view(w.dtype)
    sp = sw / S  # the members' probabilities, as the definition's
    cum = sp.cumsum(-1)
    excl = torch.zeros_like(cum)
    excl[:, 1:] = cum[:, :-1]  # mass before each sorted member, within the bucket
    # Each member's tie group starts at the last index (so far) where the value changed; the mass before
    # that start (plus the buckets above) is the mass strictly greater than the value.
    idx = torch.arange(L, device=w.device).expand_as(sp)
    starts = torch.ones_like(sp, dtype=torch.bool)
    starts[:, 1:] = sp[:, 1:] != sp[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=-1).values
    keep = (((above / S[:, 0])[:, None] + excl.gather(-1, first)) < top_p) & (sp > 0)
    kept_min = torch.where(keep, sw, torch.full_like(sw, float("inf"))).amin(-1)
    return torch.where(crossing, kept_min, torch.zeros_like(kept_min))[:, None]


def _members(key: torch.Tensor, target: torch.Tensor, work: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flat (row-major) indices of the ``key: (n, V)`` entries equal to their row's ``target: (n, 1)``.

    ``nonzero`` on the CPU costs about a plain pass per element scanned, so the boolean mask (padded to
    whole 8-byte words with ``False``) is scanned as int64 words, 8x fewer elements, and only the words
    holding a match are read back as their 8 bytes."""
    total = key.numel()
    padded = -(-total // 8) * 8
    buf = work.get("sel")
    if buf is None or buf.device != key.device or buf.numel() < padded:
        buf = work["sel"] = torch.empty(padded, dtype=torch.bool, device=key.device)
    buf = buf[:padded]
    buf[total:] = False
    torch.eq(key, target, out=buf[:total].view(key.shape))
    words = buf.view(torch.int64)
    hit = words.nonzero()[:, 0]
    # the hit words' 8 bytes, in memory order (a view of int64 values as bytes keeps that order)
    word, byte = words.index_select(0, hit).view(torch.uint8).view(-1, 8).nonzero().unbind(1)
    return hit.index_select(0, word) * 8 + byte


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
    # top-p holds the weights and their int64 bucket keys at once, as the plain draw its weights and CDF.
    step = rows_per_chunk(V)
    work: dict[str, torch.Tensor] = {}
    for r0 in range(0, flat.shape[0], step):
        block = flat[r0:r0 + step]
        # x / temperature in float64, in a tensor reused from block to block (the weights overwrite it)
        z = _scratch(work, "z", block, torch.float64).copy_(block).div_(temperature)
        w = _filter_weights(z, top_k, top_p, inplace=True, work=work)
        del z
        rows = torch.arange(r0, r0 + w.shape[0], device=logits.device)
        # the top-p bucket keys' scratch is free again: the draw's cumulative sums reuse it
        cdf = work["key"][:w.shape[0]].view(torch.float64) if "key" in work else None
        out[r0:r0 + step] = draw_from_weights(w, _random.row_uniforms(seed, offset, rows, start=row_offset), cdf)
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
