"""``select_tokens`` in Triton: one program per candidate row (the op in ``fastdiff/ops/select_tokens.py``).

Per row, in ``BLOCK`` tiles, one pass over the logits (the ``exclude`` column read as ``-inf``):

* the value check (NaN, +inf, every logit -inf), written as a status code the launcher raises;
* the running maximum ``m``, the first index reaching it (``torch.argmax``'s tie rule), the largest logit
  other than that index (for the margin), and the sums ``Σ exp((x - m) / T)`` and ``Σ exp(x - m)``
  rescaled online whenever ``m`` grows (the sum at ``T`` exactly as ``kernels/sample_categorical.py``
  accumulates it, so the draws are that kernel's);
* then, from the cached row: the draw (``temperature > 0``: ``min{j : cumsum(w)_j > u·Σ w}``, float64 CDF,
  ``u`` of Philox counter ``(counter row, offset)``), and for ``entropy`` a pass summing ``p log(p + 1e-10)``.

The score is written as a float64 selection key; the selection over ``(B, L)`` is the launcher's (torch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common


@triton.jit
def _tile(base, offs, V, exclude, XDT: tl.constexpr):
    ok = offs < V
    x = tl.load(base + offs, mask=ok, other=float("-inf")).to(XDT)
    return tl.where(offs == exclude, float("-inf"), x), ok


@triton.jit(do_not_specialize=["temperature_bits", "seed_lo", "seed_hi", "off_lo", "off_hi", "exclude"])
def _select_tokens_kernel(
    logits_ptr, row_off_ptr, counter_ptr, tok_ptr, key_ptr, status_ptr, V, exclude, temperature_bits,
    seed_lo, seed_hi, off_lo, off_hi,
    GREEDY: tl.constexpr, RULE: tl.constexpr, XDT: tl.constexpr, WDT: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    base = logits_ptr + tl.load(row_off_ptr + r)
    lanes = tl.arange(0, BLOCK)
    temperature = temperature_bits.to(tl.int64).to(tl.float64, bitcast=True).to(WDT)
    tq = temperature
    if GREEDY:
        tq = tl.full((), 1.0, WDT)
    m = tl.full((), float("-inf"), WDT)
    second = tl.full((), float("-inf"), WDT)
    arg = r * 0
    Wq = tl.zeros((), tl.float64)  # Σ exp((x - m) / tq), as sample_categorical's plain path keeps it
    W1 = tl.zeros((), tl.float64)  # Σ exp(x - m)
    nan = tl.zeros((), tl.int32)
    pinf = tl.zeros((), tl.int32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + lanes
        x, ok = _tile(base, offs, V, exclude, XDT)
        nan = tl.maximum(nan, tl.max((ok & (x != x)).to(tl.int32), axis=0))
        pinf = tl.maximum(pinf, tl.max((ok & (x == float("inf"))).to(tl.int32), axis=0))
        y = x.to(WDT)
        tmax = tl.max(y, axis=0)
        targ = tl.argmax(y, axis=0, tie_break_left=True).to(tl.int64) + v0
        tsecond = tl.max(tl.where(offs == targ, float("-inf"), y), axis=0)
        second = tl.maximum(second, tl.maximum(tsecond, tl.minimum(m, tmax)))
        arg = tl.where(tmax > m, targ, arg)
        m_new = tl.maximum(m, tmax)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        Wq = Wq * tl.exp((m - m_ref) / tq).to(tl.float64) + tl.sum(tl.exp((y - m_ref) / tq).to(tl.float64), axis=0)
        if RULE == 1 or RULE == 2:
            W1 = W1 * tl.exp(m - m_ref).to(tl.float64) + tl.sum(tl.exp(y - m_ref).to(tl.float64), axis=0)
        m = m_new
    status = tl.where(nan > 0, 4, tl.where(pinf > 0, 3, tl.where(m == float("-inf"), 2, 0)))
    tl.store(status_ptr + r, status.to(tl.int32))
    tok = arg
    if not GREEDY:
        target = _common.row_uniform(tl.load(counter_ptr + r), seed_lo, seed_hi, off_lo, off_hi) * Wq
        acc = tl.zeros((), tl.float64)
        found = r * 0 - 1
        last = r * 0 - 1
        v0 = tl.zeros((), tl.int32)
        while (v0 < V) & (found < 0):
            offs = v0 + lanes
            x, ok = _tile(base, offs, V, exclude, XDT)
            w = tl.where(ok, tl.exp((x.to(WDT) - m) / temperature), 0.0).to(tl.float64)
            c = acc + tl.cumsum(w, axis=0)
            first = tl.min(tl.where(ok & (c > target), offs, V), axis=0).to(tl.int64)
            found = tl.where(first < V, first, found)
            last = tl.maximum(last, tl.max(tl.where(ok & (w > 0.0), offs, -1), axis=0).to(tl.int64))
            acc = tl.max(c, axis=0)
            v0 += BLOCK
        tok = tl.where(found >= 0, found, tl.where(last >= 0, last, V - 1))
    tl.store(tok_ptr + r, tok)
    xt = tl.load(base + tok).to(XDT).to(tl.float64)
    m64 = m.to(tl.float64)
    tq64 = tq.to(tl.float64)
    if RULE == 0:  # prob
        key = (tl.exp((xt - m64) / tq64) / Wq).to(tl.float32).to(tl.float64)
    elif RULE == 1:  # llada: exp of the float32 log-probability, in float64
        key = tl.exp(((xt - m64) - tl.log(W1)).to(tl.float32).to(tl.float64))
    elif RULE == 2:  # logprob
        key = ((xt - m64) - tl.log(W1)).to(tl.float32).to(tl.float64)
    elif RULE == 3:  # margin
        e2 = tl.where(second == float("-inf"), 0.0, tl.exp((second.to(tl.float64) - m64) / tq64))
        key = ((1.0 - e2) / Wq).to(tl.float32).to(tl.float64)
    else:  # entropy: Σ p log(p + 1e-10)
        s = tl.zeros((), tl.float64)
        for v0 in range(0, V, BLOCK):
            offs = v0 + lanes
            x, ok = _tile(base, offs, V, exclude, XDT)
            p = tl.exp((x.to(tl.float64) - m64) / tq64) / Wq
            s += tl.sum(tl.where(ok, p * tl.log(p + 1e-10), 0.0), axis=0)
        key = s.to(tl.float32).to(tl.float64)
    tl.store(key_ptr + r, key)
