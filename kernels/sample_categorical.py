"""``sample_categorical`` in Triton: one program per row; temperature, tie-inclusive top-k / top-p by
exact threshold bisection, and the reference's counter-based inverse-CDF draw.

Per row, in ``BLOCK`` tiles (``w = exp((x - max x) / temperature)``, shifted before it is scaled):

* greedy (``temperature == 0``): one pass, ``tl.argmax`` per tile (first index) and a strict ``>``
  across tiles, i.e. the lowest index among equal maxima, as ``torch.argmax``;
* top-k keeps ``v`` iff fewer than ``k`` logits are strictly larger. The k-th largest logit is found
  by bisection over the order-preserving integer image of the float logits (``key``): the largest
  key ``τ`` with ``#{key >= τ} >= k`` *is* the k-th largest value, exactly. Each counting pass also
  finds the present keys next to the midpoint and snaps the interval to them, so the search ends
  after about ``log2(V)`` passes on spread-out logits (at most 32, 64 for float64). Kept:
  ``key >= τ``, so ties are kept whole;
* top-p keeps ``v`` iff the mass of categories strictly more probable than ``v`` is below ``p``
  (after top-k). The mass above ``x``, ``M(x) = Σ_{w > x} w / Σ w``, is non-increasing in ``x``, so
  the kept set is ``{w >= x*}`` with ``x*`` the smallest float64 (by its bit pattern) with
  ``M(x*) < p``: found by bisection over the bits of non-negative doubles, snapped to present
  weights as above (at most 62 passes);
* the draw: ``min{j : cumsum(w)_j > u·Σ w}`` over the kept weights, float64 CDF, ``u`` the float64
  uniform of Philox counter ``(row_offset + row, offset)``, stopping at the first tile that crosses; if rounding
  leaves none, the last positive-weight category.

Weights are float32 ``exp`` for 16/32-bit logits without top-p, float64 otherwise (top-p compares
masses, which should not depend on float32 rounding); sums and the CDF are always float64. The top-k
set is exact (integer keys of the logits, whose order equals the reference's float64 ``z`` order);
the top-p set and the drawn token equal the reference's except within rounding of a boundary.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common


@triton.jit
def _order_key(x, KEY: tl.constexpr, SIGN_OFF: tl.constexpr):
    """Integer with the same order as the float ``x`` (``-0.0`` mapped to ``+0.0`` first)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(KEY, bitcast=True)
    return tl.where(b < 0, b ^ SIGN_OFF, b)


@triton.jit
def _tile_weights(base, offs, V, temperature, m, k_lo, p_lo, XDT: tl.constexpr, WDT: tl.constexpr,
                  KEY: tl.constexpr, SIGN_OFF: tl.constexpr, TOPK: tl.constexpr, TOPP: tl.constexpr):
    """One tile's float64 weights ``exp((x - m) / temperature)`` (0 outside the row), with the top-k filter
    (``TOPK``: keys >= ``k_lo``) and the top-p filter (``TOPP``: weight bits >= ``p_lo``) applied."""
    ok = offs < V
    x = tl.load(base + offs, mask=ok, other=float("-inf")).to(XDT)
    w = tl.where(ok, tl.exp((x.to(WDT) - m) / temperature), 0.0).to(tl.float64)
    if TOPK:
        w = tl.where(_order_key(x, KEY, SIGN_OFF) >= k_lo, w, 0.0)
    if TOPP:
        w = tl.where(w.to(tl.int64, bitcast=True) >= p_lo, w, 0.0)
    return w, ok


@triton.jit(do_not_specialize=["temperature_bits", "top_k", "top_p_bits", "seed_lo", "seed_hi", "off_lo", "off_hi",
                               "row_lo", "row_hi"])
def _sample_categorical_fwd_kernel(
    logits_ptr, stride_l, tok_ptr, V, temperature_bits, top_k, top_p_bits, seed_lo, seed_hi, off_lo, off_hi,
    row_lo, row_hi,
    GREEDY: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
    XDT: tl.constexpr, WDT: tl.constexpr, KEY: tl.constexpr, SIGN_OFF: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    lanes = tl.arange(0, BLOCK)
    temperature = temperature_bits.to(tl.int64).to(tl.float64, bitcast=True).to(WDT)
    top_p = top_p_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if GREEDY:
        best = tl.full((), float("-inf"), XDT)
        arg = row * 0
        for v0 in range(0, V, BLOCK):
            offs = v0 + lanes
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(XDT)
            tmax = tl.max(x, axis=0)
            targ = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int64) + v0
            arg = tl.where(tmax > best, targ, arg)
            best = tl.maximum(best, tmax)
        tl.store(tok_ptr + row, arg)
    else:
        # pass 1: max of y; key range for top-k
        m = tl.full((), float("-inf"), WDT)
        k_lo = tl.full((), 0, KEY)
        k_hi = tl.full((), 0, KEY)
        if HAS_TOPK:
            k_lo = tl.full((), SIGN_OFF, KEY)
            k_hi = -k_lo - 1
        Wf = tl.zeros((), tl.float64)  # without filters: the total, kept online (no extra pass)
        for v0 in range(0, V, BLOCK):
            offs = v0 + lanes
            ok = offs < V
            x = tl.load(base + offs, mask=ok, other=float("-inf")).to(XDT)
            y = x.to(WDT)
            m_new = tl.maximum(m, tl.max(y, axis=0))  # the max logit; shifting before scaling keeps the digits
            if not (HAS_TOPK or HAS_TOPP):              # that x/T - max(x/T) loses when |x/T| is large
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # leading tiles all -inf: no NaN
                Wf = (Wf * tl.exp((m - m_ref) / temperature).to(tl.float64)
                      + tl.sum(tl.exp((y - m_ref) / temperature).to(tl.float64), axis=0))
            m = m_new
            if HAS_TOPK:
                key = _order_key(x, KEY, SIGN_OFF)
                k_lo = tl.minimum(k_lo, tl.min(tl.where(ok, key, SIGN_OFF), axis=0))
                k_hi = tl.maximum(k_hi, tl.max(tl.where(ok, key, -SIGN_OFF - 1), axis=0))
        # top-k: the largest key tau with #{key >= tau} >= k (the k-th largest logit)
        if HAS_TOPK:
            while k_lo < k_hi:
                mid = (k_lo >> 1) + (k_hi >> 1) + (k_lo & k_hi & 1) + ((k_lo ^ k_hi) & 1)
                cnt = tl.zeros((), tl.int64)
                up = k_hi  # the smallest present key >= mid
                down = k_lo  # the largest present key < mid
                for v0 in range(0, V, BLOCK):
                    offs = v0 + lanes
                    ok = offs < V
                    x = tl.load(base + offs, mask=ok, other=float("-inf")).to(XDT)
                    key = _order_key(x, KEY, SIGN_OFF)
                    ge = ok & (key >= mid)
                    cnt += tl.sum(ge.to(tl.int64), axis=0)
                    up = tl.minimum(up, tl.min(tl.where(ge, key, k_hi), axis=0))
                    down = tl.maximum(down, tl.max(tl.where(ok & (key < mid), key, k_lo), axis=0))
                # the count is constant between present keys: snap to them (ends in ~log2(V) steps)
                k_lo = tl.where(cnt >= top_k, up, k_lo)
                k_hi = tl.where(cnt >= top_k, k_hi, down)
        # top-p: the smallest x (bits of a non-negative double) with mass(w > x) < p · W
        p_lo = tl.zeros((), tl.int64)
        if HAS_TOPP:
            W = tl.zeros((), tl.float64)
            for v0 in range(0, V, BLOCK):
                w, ok = _tile_weights(base, v0 + lanes, V, temperature, m, k_lo, p_lo, XDT, WDT, KEY, SIGN_OFF,
                                      HAS_TOPK, False)
                W += tl.sum(w, axis=0)
            p_hi = tl.full((), 1.0, tl.float64).to(tl.int64, bitcast=True)  # max w = exp(0) = 1
            while p_lo < p_hi:
                mid = (p_lo >> 1) + (p_hi >> 1) + (p_lo & p_hi & 1)
                above = tl.zeros((), tl.float64)
                up = p_hi  # the smallest present key > mid
                down = p_lo  # the largest present key <= mid
                for v0 in range(0, V, BLOCK):
                    w, ok = _tile_weights(base, v0 + lanes, V, temperature, m, k_lo, p_lo, XDT, WDT, KEY,
                                          SIGN_OFF, HAS_TOPK, False)
                    key = w.to(tl.int64, bitcast=True)
                    gt = ok & (key > mid)
                    above += tl.sum(tl.where(gt, w, 0.0), axis=0)
                    up = tl.minimum(up, tl.min(tl.where(gt, key, p_hi), axis=0))
                    down = tl.maximum(down, tl.max(tl.where(ok & (key <= mid), key, p_lo), axis=0))
                # M(x) is constant between present weights: snap to them
                small = above / W < top_p
                p_hi = tl.where(small, down, p_hi)
                p_lo = tl.where(small, p_lo, up)
        # the kept total (filters only), then the scan
        if HAS_TOPK or HAS_TOPP:
            for v0 in range(0, V, BLOCK):
                w, _ = _tile_weights(base, v0 + lanes, V, temperature, m, k_lo, p_lo, XDT, WDT, KEY, SIGN_OFF,
                                     HAS_TOPK, HAS_TOPP)
                Wf += tl.sum(w, axis=0)
        target = _common.row_uniform(row + _common.join64(row_lo, row_hi), seed_lo, seed_hi, off_lo, off_hi) * Wf
        acc = tl.zeros((), tl.float64)
        found = row * 0 - 1
        last = row * 0 - 1
        v0 = tl.zeros((), tl.int32)  # loop-carried: a tensor, like the others
        while (v0 < V) & (found < 0):
            offs = v0 + lanes
            w, ok = _tile_weights(base, offs, V, temperature, m, k_lo, p_lo, XDT, WDT, KEY, SIGN_OFF,
                                  HAS_TOPK, HAS_TOPP)
            c = acc + tl.cumsum(w, axis=0)
            first = tl.min(tl.where(ok & (c > target), offs, V), axis=0).to(tl.int64)
            found = tl.where(first < V, first, found)
            last = tl.maximum(last, tl.max(tl.where(ok & (w > 0.0), offs, -1), axis=0).to(tl.int64))
            acc = tl.max(c, axis=0)
            v0 += BLOCK
        tl.store(tok_ptr + row, tl.where(found >= 0, found, tl.where(last >= 0, last, V - 1)))
