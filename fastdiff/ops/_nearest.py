"""The numerics every backend of :func:`fastdiff.ops.nearest_embedding` shares.

A backend's score kernel (a GEMM with a fused arg-min) only *screens*. The answer is defined by a float64
evaluation that does not depend on where a row sits in a GEMM tile, so that equal embedding rows score
equally and ties really go to the lowest index (a BLAS computes the last column of a tile with other
instructions than the first: 1025 identical rows could otherwise give index 1024):

1. **Rescaling** (:func:`prepare`). When the inputs' magnitudes could overflow or underflow the float32
   (float64) scores, they are multiplied by a power of two, which is exact and leaves the arg-min
   unchanged: l2 scales ``x`` and ``weight`` by one factor when ``max |value|`` lies outside
   ``[2**-32, 2**32]`` (``[2**-256, 2**256]`` for float64); cosine scales every row of ``x`` and every row
   of ``weight`` by its own factor (``max |row|`` into ``[0.5, 1)``) when some row's maximum lies outside
   that window (the norm clamp is kept in each row's own scale). Ordinary inputs are not touched (no copy).
2. **Screening** (the kernel, or :func:`screen` for the reference), in float32 (float64 for float64
   inputs): ``score_v = stat_v - 2 x·w_v`` (l2, ``stat = |w|²``) or ``score_v = -(x·w_v)·stat_v`` (cosine,
   ``stat_v = 1 / max(|w_v|, 1e-12)`` in the row's scale). Per row the kernel returns the index of a
   minimum, the minimum and the second smallest score (counting equal scores twice).
3. **Resolution** (:func:`finish`). A row is decided by the screen when its second score exceeds the
   best by more than ``tol`` (:func:`tolerance`, four times a bound on the screen's rounding error plus
   the float64 evaluation's). The other rows (near-ties, duplicated rows) are resolved exactly as the
   reference: every column within ``tol`` of the row's minimum is re-scored in float64,
   l2 ``Σ_k (x_k - w_k)²`` and cosine ``-Σ_k x_k ŵ_k`` with ``ŵ = w / max(|w|, 1e-12)``, each sum a fixed pairwise
   tree of elementwise operations (so identical rows give identical values), and the lowest index among
   the minima wins.

Whatever the screen's summation order, the result is therefore the same on every backend:
``argmin_v`` of the float64 score above, lowest index on ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ._common import CHUNK_ELEMENTS

EPS = 1e-12  # cosine: norms below this are clamped to it
_LIMIT = {torch.float32: 2.0**32, torch.float64: 2.0**256}
_STEP = {torch.float32: 100, torch.float64: 1000}  # largest power-of-two step of one multiplication
_UNIT = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}  # unit roundoff of the screen's dtype
_TINY = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074}  # smallest subnormal: underflow error
_U64 = 2.0**-53
_SMALL = {torch.float32: 2.0**-50, torch.float64: 2.0**-400}  # row norms below this: recomputed in float64
_TF32 = 2.0**-10  # relative error of a product of two TF32-rounded operands


@dataclass(frozen=True)
class Problem:
    """The rescaled inputs of one call (see the module docstring)."""

    x: torch.Tensor  # (N, D), the caller's dtype, rescaled when needed (a view of x otherwise)
    w: torch.Tensor  # (V, D), the caller's dtype, rescaled when needed (weight itself otherwise)
    stat: torch.Tensor  # (V,) contiguous, compute dtype: l2 |w|², cosine 1 / max(|w_v|, 1e-12) (row scale)
    wexp: torch.Tensor | None  # cosine with rescaled rows: e_v with weight_v = 2**e_v · w_v (int64); else None
    metric: str
    cdt: torch.dtype  # float32, or float64 for float64 inputs


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _max_abs(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


def _exponent(m: float, limit: float) -> int | None:
    """``k`` with ``m · 2**k`` in ``[0.5, 1)`` when ``m`` lies outside ``[1/limit, limit]``; else None."""
    if m == 0.0 or 1.0 / limit <= m <= limit:
        return None
    return -math.frexp(m)[1]


def _times_pow2(t: torch.Tensor, k: int, cdt: torch.dtype) -> torch.Tensor:
    """``t · 2**k`` in ``t``'s dtype, exact up to underflow (in steps the dtype can hold)."""
    step = _STEP[cdt]
    while k:
        s = max(-step, min(step, k))
        t = t * (2.0**s)
        k -= s
    return t


def _row_chunks(rows: int, width: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    for r0 in range(0, rows, step):
        yield slice(r0, min(rows, r0 + step))


def _norms64(t: torch.Tensor) -> torch.Tensor:
    """float64 row norms of ``t`` (N, D), in row blocks (no N × D float64 temporary)."""
    out = torch.empty(t.shape[0], dtype=torch.float64, device=t.device)
    for sl in _row_chunks(t.shape[0], t.shape[1]):
        out[sl] = t[sl].to(torch.float64).norm(dim=1)
    return out


def _norms(t: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """Row norms of ``t`` as float64, computed in ``cdt`` (one fused pass; the inputs are within the
    rescaling window, so nothing overflows) and again in float64 for rows small enough that their squares
    may have lost digits to underflow."""
    if t.shape[0] == 0 or t.shape[1] == 0:
        return torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
    n = torch.linalg.vector_norm(t, dim=1, dtype=cdt).to(torch.float64)
    small = (n < _SMALL[cdt]).nonzero().squeeze(1)
    if small.numel():
        n[small] = _norms64(t[small])
    return n


def prepare(x: torch.Tensor, weight: torch.Tensor, metric: str) -> Problem:
    """Rescale checked inputs (``x: (..., D)``, ``weight: (V, D)``) and compute the per-row statistic."""
    D = x.shape[-1]
    cdt = compute_dtype(x.dtype)
    limit = _LIMIT[cdt]
    flat = x.reshape(-1, D)
    w = weight
    wexp = None
    V = w.shape[0]
    stat = torch.empty(V, dtype=cdt, device=w.device)
    if metric == "l2":
        k = _exponent(max(_max_abs(flat), _max_abs(w)), limit)
        if k is not None:
            flat, w = _times_pow2(flat, k, cdt), _times_pow2(w, k, cdt)
        for sl in _row_chunks(V, D):
            wc = w[sl].to(cdt)
            stat[sl] = (wc * wc).sum(1)
    else:  # the ranking of a row of x is invariant to its own positive scale: rows are rescaled one by one
        e = _row_exponents(flat, limit)
        if e is not None:
            flat = _rows_times_pow2(flat, -e)
        e = _row_exponents(w, limit)
        if e is not None:
            w, wexp = _rows_times_pow2(w, -e), e
        nrm = _norms(w, cdt)
        clamped = _clamped(nrm, wexp)
        # 1 / max(|weight_v|, 1e-12) in row v's scale: 1 / |w_v|, or 2**e_v / 1e-12 for a clamped row
        stat.copy_(torch.where(clamped, _pow2(wexp, V, w.device) / EPS, 1.0 / nrm))
    return Problem(x=flat, w=w, stat=stat, wexp=wexp, metric=metric, cdt=cdt)


def _ldexp(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``t · 2**k`` in float64, exactly (``torch.ldexp`` multiplies by ``2.0**k``, which is inf for
    k >= 1024, so 1e-310 · 2**1029 would be inf): two half steps, each factor finite."""
    k = k.to(torch.float64)
    half = torch.trunc(k / 2)
    return torch.ldexp(torch.ldexp(t, half), k - half)


def _row_exponents(t: torch.Tensor, limit: float) -> torch.Tensor | None:
    """Per row of ``t`` (n, D): ``e`` with ``max |row| = f · 2**e``, ``f`` in ``[0.5, 1)`` (0 for a zero row),
    when some row's maximum lies outside ``[1/limit, limit]``; None otherwise (nothing to rescale)."""
    if t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t, dim=1)
    rmax = torch.maximum(-lo, hi).to(torch.float64)
    if not bool(((rmax > limit) | ((rmax > 0) & (rmax < 1.0 / limit))).any()):
        return None
    return torch.frexp(rmax).exponent.to(torch.int64)


def _rows_times_pow2(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``t`` times ``2**k[i]``: exact in float64, and exact back in ``t``'s dtype since each
    row's maximum lands in [0.5, 1) (up to underflow of its smallest entries)."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    for sl in _row_chunks(t.shape[0], t.shape[1]):
        out[sl] = _ldexp(t[sl].to(torch.float64), k[sl].unsqueeze(1)).to(t.dtype)
    return out


def _pow2(wexp: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """``2**e_v`` (float64; exact, subnormal for the smallest rows), 1 without rescaled rows."""
    one = torch.ones(n, dtype=torch.float64, device=device)
    return one if wexp is None else _ldexp(one, wexp)


def _clamped(nrm: torch.Tensor, wexp: torch.Tensor | None) -> torch.Tensor:
    """Rows whose true norm ``2**e_v · nrm_v`` is below the 1e-12 clamp (computed without overflow to a
    wrong decision: a product that overflows is not clamped, one that is subnormal is compared as is)."""
    if wexp is None:
        return nrm < EPS
    return _ldexp(nrm, wexp) < EPS


def _scores(p: Problem, xb: torch.Tensor, wb: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
    """The screen's scores of rows ``xb`` against rows ``wb`` (both compute dtype) with statistic ``st``."""
    g = xb @ wb.T
    return g.mul_(-2.0).add_(st) if p.metric == "l2" else g.mul_(st).neg_()


def screen(p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's screen: ``(arg, best, second)`` per row, over blocks of rows and columns so that
    no score block exceeds ``CHUNK_ELEMENTS / 2`` elements."""
    N, V = p.x.shape[0], p.w.shape[0]
    dev = p.x.device
    arg = torch.zeros(N, dtype=torch.int64, device=dev)
    best = torch.full((N,), float("inf"), dtype=p.cdt, device=dev)
    second = torch.full((N,), float("inf"), dtype=p.cdt, device=dev)
    wc = p.w.to(p.cdt)
    budget = CHUNK_ELEMENTS // 2
    v_chunk = min(V, max(1, budget // 256))
    n_chunk = max(1, budget // v_chunk)
    for n0 in range(0, N, n_chunk):
        sl = slice(n0, n0 + n_chunk)
        xb = p.x[sl].to(p.cdt)
        b, s2, a = best[sl], second[sl], arg[sl]
        for v0 in range(0, V, v_chunk):
            v1 = min(V, v0 + v_chunk)
            score = _scores(p, xb, wc[v0:v1], p.stat[v0:v1])
            val, i = score.min(dim=1)
            sec = score.scatter_(1, i.unsqueeze(1), float("inf")).min(dim=1).values
            s2.copy_(torch.minimum(torch.maximum(b, val), torch.minimum(s2, sec)))
            a.copy_(torch.where(val < b, i + v0, a))
            b.copy_(torch.minimum(b, val))
    return arg, best, second


def tolerance(p: Problem, tf32: bool = False) -> torch.Tensor:
    """Per row (float64): four times a bound on the screen's rounding error plus the float64 score's, so
    a row whose second score exceeds its best by more than this has the same arg-min in float64.
    ``tf32``: the screen's float32 products may come from TF32-rounded operands."""
    D = p.x.shape[1]
    u = _UNIT[p.cdt] + (_TF32 if tf32 and p.cdt == torch.float32 else 0.0)
    xn = _norms(p.x, p.cdt) * (1 + (D + 2) * _UNIT[p.cdt])  # rounded up: a bound
    if p.metric == "l2":  # max |w_v| from stat = |w_v|² (float32 error <= (D + 1) u relative), rounded up
        wn = math.sqrt(float(p.stat.max()) * (1 + 2 * (D + 2) * _UNIT[p.cdt])) if p.w.shape[0] else 0.0
        return (4 * (D + 2) * u * (wn * wn + 2 * xn * wn) + 4 * (D + 2) * _U64 * (xn + wn) ** 2
                + 8 * (D + 2) * _TINY[p.cdt])
    smax = float(p.stat.max().to(torch.float64)) if p.stat.numel() else 0.0
    return 4 * (D + 4) * (u + _U64) * xn + 8 * (D + 4) * _TINY[p.cdt] * smax


def _tree_sum(t: torch.Tensor) -> torch.Tensor:
    """Row sums of ``t`` (P, D) by a fixed pairwise tree of elementwise adds (order independent of P)."""
    D = t.shape[1]
    width = 1 << max(0, (D - 1).bit_length())
    if width != D:
        t = torch.nn.functional.pad(t, (0, width - D))
    while t.shape[1] > 1:
        h = t.shape[1] // 2
        t = t[:, :h] + t[:, h:]
    return t[:, 0]


def refined(p: Problem, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The float64 score of each pair ``(x[rows[i]], w[cols[i]])`` (see the module docstring)."""
    D = p.x.shape[1]
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=p.x.device)
    width = 1 << max(0, (D - 1).bit_length())
    for sl in _row_chunks(rows.shape[0], 2 * width):
        xa = p.x[rows[sl]].to(torch.float64)
        wa = p.w[cols[sl]].to(torch.float64)
        if p.metric == "l2":
            d = xa - wa
            out[sl] = _tree_sum(d * d)
        else:  # normalised first, as the formula reads: rows of one direction give the same unit vector
            nrm = torch.sqrt(_tree_sum(wa * wa))
            e = None if p.wexp is None else p.wexp[cols[sl]]
            clamped = _clamped(nrm, e).unsqueeze(1)
            orig = wa if e is None else _ldexp(wa, e.unsqueeze(1))  # weight's own values
            unit = torch.where(clamped, orig / EPS, wa / nrm.unsqueeze(1))
            out[sl] = -_tree_sum(xa * unit)
    return out


def resolve(p: Problem, rows: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """The float64 arg-min (lowest index on ties) of ``rows`` (int64), re-screening them in PyTorch: every
    column within ``tol`` (float64, per row) of the row's minimum is a candidate."""
    V = p.w.shape[0]
    out = torch.empty(rows.shape[0], dtype=torch.int64, device=p.x.device)
    wc = p.w.to(p.cdt)
    for sl in _row_chunks(rows.shape[0], V):
        r = rows[sl]
        score = _scores(p, p.x[r].to(p.cdt), wc, p.stat)
        thr = (score.min(dim=1).values.to(torch.float64) + tol[sl]).to(p.cdt)
        thr = torch.nextafter(thr, torch.full_like(thr, float("inf")))  # rounded up: never drops a candidate
        pr, pc = (score <= thr.unsqueeze(1)).nonzero(as_tuple=True)
        val = refined(p, r[pr], pc)
        n = r.shape[0]
        low = torch.full((n,), float("inf"), dtype=torch.float64, device=val.device)
        low = low.scatter_reduce(0, pr, val, "amin")
        at_min = val == low[pr]
        first = torch.full((n,), V, dtype=torch.int64, device=val.device)
        out[sl] = first.scatter_reduce(0, pr[at_min], pc[at_min], "amin")
    return out


def finish(p: Problem, arg: torch.Tensor, best: torch.Tensor, second: torch.Tensor, tf32: bool = False
           ) -> torch.Tensor:
    """Indices ``(N,)`` from a screen's ``(arg, best, second)``: the screen's arg where it is decided,
    :func:`resolve` for the rest."""
    if arg.numel() == 0:
        return arg.to(torch.int64)
    tol = tolerance(p, tf32)
    open_rows = (second.to(torch.float64) <= best.to(torch.float64) + tol).nonzero().squeeze(1)
    idx = arg.to(torch.int64).clone()
    if open_rows.numel():
        idx[open_rows] = resolve(p, open_rows, tol[open_rows])
    return idx


def tf32_possible(x: torch.Tensor) -> bool:
    """Whether a float32 GEMM on ``x``'s device may round its operands to TF32."""
    return x.device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)


def indices(x: torch.Tensor, weight: torch.Tensor, metric: str,
            screen_fn: Callable[[Problem], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = screen) -> torch.Tensor:
    """``indices (...) int64`` of the nearest rows, with ``screen_fn`` as the screen (a backend's kernel)."""
    p = prepare(x, weight, metric)
    if p.x.shape[0] == 0:
        idx = torch.empty(0, dtype=torch.int64, device=x.device)
    else:
        arg, best, second = screen_fn(p)
        idx = finish(p, arg, best, second, tf32_possible(x))
    return idx.reshape(x.shape[:-1])


def nearest(x: torch.Tensor, weight: torch.Tensor, metric: str,
            screen_fn: Callable[[Problem], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = screen
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices (...) int64, snapped (..., D))`` with ``screen_fn`` as the screen (a backend's kernel)."""
    idx = indices(x, weight, metric, screen_fn)
    return idx, torch.nn.functional.embedding(idx, weight)
