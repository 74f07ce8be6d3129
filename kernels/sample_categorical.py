"""``sample_categorical`` in Triton: one program per row; temperature, tie-inclusive top-k by exact threshold
bisection, top-p by an exact 32-way threshold search, and the reference's counter-based inverse-CDF draw.

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
  the kept set is ``{w >= x*}`` with ``x*`` the smallest present weight with ``M(x*) < p``. It is found
  by a search over the bits of the non-negative double weights (:func:`_top_p_search`): each pass over
  the row splits the bracket into 32 sub-ranges and takes all their masses at once (``[tile, 32]``
  comparisons), and copies the bracket's categories, in row order, to a per-row float64 scratch of
  ``CAP`` slots (4096, or the row's length rounded up to a power of 2 if smaller). A bracket that holds
  the crossing and at most ``CAP`` categories is settled from the copy, sorted, in that same pass;
  otherwise the next bracket is the crossing sub-range's present weights (one key, or two single
  categories, left in it settle the search without another pass too). Without top-k the first bracket
  is guessed in pass 1 (:func:`_top_p_guess`: online histograms next to the online maximum, of half
  octaves and, over the octave below the maximum, of 1/64 octaves), else it is ``[2**-16, 1)`` in half
  octaves; the search's first pass checks it (and gives ``Σ w``), and the kept total comes from the
  same sums. Passes of the search, counted with the kernel's ``STATS`` output
  (``scripts/triton_top_p_passes.py``: ``TRITON_INTERPRET=1``, 4 rows each) on rows of ``2·N(0, 1)``
  logits times 1 / 0.05 / 4 (the ``normal`` / ``flat`` / ``peaked`` rows of
  ``benchmarks/benchmark_sample_categorical.py``), top-p 0.9 and 0.5, at V = 32768 and 50257: 1 on every
  row (the guessed bracket holds at most ~2900 categories there; before the copy and the fine histogram:
  2-3 / 3 / 1 and 2 / 3-4 / 1). A top-p draw (no top-k) reads the row twice plus the scan to the drawn
  token, a plain draw once plus the scan: issue 16's "at most 2x a plain draw" holds in passes over the
  row on the three rows (the two passes do more arithmetic per category than a plain draw's: ``[tile, 96]``
  and ``[tile, 32]`` comparisons, and a sort of ``CAP`` weights; not timed on a GPU). At most 14 search
  passes on any row (each divides the bracket's span of keys, at most 2**62, by 32);
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


@triton.jit
def _top_p_guess(base, V, temperature, top_p, XDT: tl.constexpr, WDT: tl.constexpr, K: tl.constexpr,
                 GBLOCK: tl.constexpr):
    """Pass 1 of top-p without top-k: the row's maximum ``m`` and a guess of the bracket of weight keys that
    holds the threshold, from the same read.

    Besides the online maximum, two histograms of the weights on absolute grids of ``z = x / temperature``,
    their top bucket the running maximum's: a coarse one of ``K`` buckets of half an octave each
    (``floor(z / (ln 2 / 2))``, 16 octaves for ``K = 32``) and a fine one of ``2 K`` buckets of 1/64 octave
    (``floor(z / (ln 2 / 64))``: the octave below the maximum, where flat rows' crossings lie). When the
    maximum moves up, the buckets shift by whole buckets (those leaving the coarse window join the mass
    below) and every mass is rescaled, as the online softmax sum is. The bucket where the mass from the top
    crosses ``p·Σ w`` is the guess, the fine window's if it crosses there, else the coarse one's, widened
    by a relative 1e-6 for rounding; a crossing below the coarse window gives the default bracket. Only a
    guess: the search's first pass checks it exactly."""
    H: tl.constexpr = 0.34657359027997264  # ln(2) / 2
    K2: tl.constexpr = 2 * K
    H2: tl.constexpr = 0.010830424696249145  # ln(2) / 64
    LIM: tl.constexpr = 1125899906842624.0  # 2**50: grid indices stay in int64
    kk = tl.arange(0, K)
    k2 = tl.arange(0, K2)
    lanes = tl.arange(0, GBLOCK)
    m = tl.full((), float("-inf"), WDT)
    G = tl.zeros((), tl.int64) - 1125899906842624
    G2 = G
    hist = tl.zeros((K,), tl.float64)
    hist2 = tl.zeros((K2,), tl.float64)
    h_below = tl.zeros((), tl.float64)
    for v0 in range(0, V, GBLOCK):
        offs = v0 + lanes
        ok = offs < V
        y = tl.load(base + offs, mask=ok, other=float("-inf")).to(XDT).to(WDT)
        m_new = tl.maximum(m, tl.max(y, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # leading tiles all -inf: no NaN
        G_new = tl.floor(tl.minimum(tl.maximum(m_new / temperature / H, -LIM), LIM)).to(tl.int64)
        G2_new = tl.floor(tl.minimum(tl.maximum(m_new / temperature / H2, -LIM), LIM)).to(tl.int64)
        d = G_new - G  # >= 0: the window moves up by d buckets
        d2 = G2_new - G2
        scale = tl.exp((m - m_ref) / temperature).to(tl.float64)
        h_below = (h_below + tl.sum(tl.where(kk < d, hist, 0.0), axis=0)) * scale
        hist = tl.sum(tl.where(kk[None, :] == kk[:, None] + d, hist[None, :], 0.0), axis=1) * scale
        if d2 != 0:  # (rare after the first tiles: the [2K, 2K] shift only then)
            hist2 = tl.sum(tl.where(k2[None, :] == k2[:, None] + d2, hist2[None, :], 0.0), axis=1)
        hist2 = hist2 * scale
        e = tl.exp((y - m_ref) / temperature).to(tl.float64)
        z = y / temperature
        i = tl.floor(tl.minimum(tl.maximum(z / H, -LIM), LIM)).to(tl.int64) - G_new + (K - 1)
        hist += tl.sum(tl.where(i[:, None] == kk[None, :], e[:, None], 0.0), axis=0)
        h_below += tl.sum(tl.where(i < 0, e, 0.0), axis=0)
        i2 = tl.floor(tl.minimum(tl.maximum(z / H2, -LIM), LIM)).to(tl.int64) - G2_new + (K2 - 1)
        hist2 += tl.sum(tl.where(i2[:, None] == k2[None, :], e[:, None], 0.0), axis=0)
        m = m_new
        G = G_new
        G2 = G2_new
    W = tl.sum(hist, axis=0) + h_below
    one_bits = tl.full((), 1.0, tl.float64).to(tl.int64, bitcast=True)
    suffix = tl.sum(tl.where(kk[None, :] >= kk[:, None], hist[None, :], 0.0), axis=1)
    j = tl.sum((suffix / W >= top_p).to(tl.int32), axis=0) - 1  # the crossing bucket, -1: below the window
    edge = (G - (K - 1) + j).to(tl.float64) * H - m / temperature  # log of its lower edge's weight
    lo = tl.maximum((tl.exp(edge) * (1.0 - 1e-6)).to(tl.int64, bitcast=True), 1)
    hi = tl.minimum((tl.exp(edge + H) * (1.0 + 1e-6)).to(tl.int64, bitcast=True), one_bits)
    use = (j >= 0) & (lo <= hi)  # (a grid clamped at 2**50 buckets can give an empty bracket: not used)
    suffix2 = tl.sum(tl.where(k2[None, :] >= k2[:, None], hist2[None, :], 0.0), axis=1)
    j2 = tl.sum((suffix2 / W >= top_p).to(tl.int32), axis=0) - 1  # -1: below the fine window
    edge2 = (G2 - (K2 - 1) + j2).to(tl.float64) * H2 - m / temperature
    lo2 = tl.maximum((tl.exp(edge2) * (1.0 - 1e-6)).to(tl.int64, bitcast=True), 1)
    hi2 = tl.minimum((tl.exp(edge2 + H2) * (1.0 + 1e-6)).to(tl.int64, bitcast=True), one_bits)
    use2 = (j2 >= 0) & (lo2 <= hi2)
    lo = tl.where(use2, lo2, tl.where(use, lo, tl.full((), 1023 - K // 2, tl.int64) << 52))
    hi = tl.where(use2, hi2, tl.where(use, hi, one_bits - 1))
    return m, lo, hi


@triton.jit
def _top_p_search(base, scratch, V, temperature, m, k_lo, top_p, lo, hi, XDT: tl.constexpr, WDT: tl.constexpr,
                  KEY: tl.constexpr, SIGN_OFF: tl.constexpr, TOPK: tl.constexpr, K: tl.constexpr,
                  SBLOCK: tl.constexpr, CAP: tl.constexpr):
    """The top-p threshold ``x*`` (the bits of the smallest kept weight), the kept total ``Σ_{w >= x*} w`` and
    the number of passes over the row it took.

    ``M(b) = Σ_{key(w) > b} w`` (``key``: the bits of the non-negative double ``w``, an order-preserving
    integer) is non-increasing, and ``x*`` is the smallest present key with ``M(x*) < p·W``. Each pass splits
    the bracket ``[lo, hi]`` of keys into ``K`` equal sub-ranges and takes, per sub-range, the mass, the count
    and the smallest and largest present key at once (``[SBLOCK, K]`` comparisons): ``M`` at every edge is
    then a suffix sum, the crossing sub-range holds ``x*``, and the next bracket is its smallest to largest
    present key (so a bracket of one key, or of two single categories, is settled without another pass).
    The first bracket ``[lo, hi]`` is a guess (:func:`_top_p_guess`, or ``[2**-(K/2), 1)`` in half octaves):
    the first pass also takes the mass, count and extreme keys above and below it, so a crossing outside
    it moves the bracket there; it also gives ``W``. Later passes carry the mass above the bracket, so
    every edge's ``M`` is a suffix sum of one pass's non-negative terms with one reduction shape: monotone,
    and the decisions agree from pass to pass.

    Compaction: each pass also copies the bracket's weights to ``scratch`` (``CAP`` float64 slots of this row;
    slot = the running count before the tile + the in-tile ``cumsum`` of the in-bracket mask: one program per
    row, no atomics). When the crossing lies in the bracket (always after the first pass; in the first, when
    neither the mass above nor the mass from the bracket's bottom decides otherwise) and the bracket holds at
    most ``CAP`` categories, the copy is sorted descending and ``c_i = M_top + cumsum(sorted)_i`` (``M_top``
    the mass above the bracket, as above) is non-decreasing: the crossing is the first ``i`` with
    ``c_i >= p·W``, ``x*`` its weight (its tie group's mass above is ``c`` before the group's first member,
    below ``p·W``; the next smaller weight's is at least ``c_i``), so ties are kept whole; the kept total is
    ``M_top`` + the sorted weights ``>= x*``. If rounding leaves no ``c_i`` at ``p·W`` (the pass's sub-range
    sums said the bracket reaches it), ``x*`` is the bracket's smallest weight."""
    BIG: tl.constexpr = 0x7FFFFFFFFFFFFFFF
    kk = tl.arange(0, K)
    lanes = tl.arange(0, SBLOCK)
    first = lo >= 0  # True, as a runtime scalar
    done = tl.zeros((), tl.int32)
    xstar = lo * 0
    Wf = tl.zeros((), tl.float64)
    W = tl.zeros((), tl.float64)
    M_top = tl.zeros((), tl.float64)  # the mass above the bracket (later passes)
    n_pass = tl.zeros((), tl.int32)
    while (done == 0) & (n_pass < 80):
        step = (hi - lo + K) // K  # ceil((hi - lo + 1) / K) >= 1
        mass = tl.zeros((K,), tl.float64)
        cnt = tl.zeros((K,), tl.int32)
        kmin = tl.full((K,), BIG, tl.int64)
        kmax = tl.full((K,), -1, tl.int64)
        m_above = tl.zeros((), tl.float64)
        m_below = tl.zeros((), tl.float64)
        b_cnt = tl.zeros((), tl.int32)
        b_min = lo * 0 + BIG
        b_max = lo * 0 - 1
        a_cnt = tl.zeros((), tl.int32)
        a_min = lo * 0 + BIG
        a_max = lo * 0 - 1
        n_in = tl.zeros((), tl.int32)  # the bracket's categories so far: the first CAP are copied to scratch
        for v0 in range(0, V, SBLOCK):
            w, ok = _tile_weights(base, v0 + lanes, V, temperature, m, k_lo, 0, XDT, WDT, KEY, SIGN_OFF, TOPK, False)
            key = w.to(tl.int64, bitcast=True)
            pos = ok & (key > 0)
            inb = pos & (key >= lo) & (key <= hi)
            slot = n_in + tl.cumsum(inb.to(tl.int32), axis=0) - 1  # in order: one program per row, no atomics
            tl.store(scratch + slot, w, mask=inb & (slot < CAP))
            n_in += tl.sum(inb.to(tl.int32), axis=0)
            idx = tl.where(inb, (tl.where(inb, key, lo) - lo) // step, -1)
            oh = idx[:, None] == kk[None, :]
            mass += tl.sum(tl.where(oh, w[:, None], 0.0), axis=0)
            cnt += tl.sum(oh.to(tl.int32), axis=0)
            kmin = tl.minimum(kmin, tl.min(tl.where(oh, key[:, None], BIG), axis=0))
            kmax = tl.maximum(kmax, tl.max(tl.where(oh, key[:, None], -1), axis=0))
            above = pos & (key > hi)
            m_above += tl.sum(tl.where(above, w, 0.0), axis=0)
            a_cnt += tl.sum(above.to(tl.int32), axis=0)
            a_min = tl.minimum(a_min, tl.min(tl.where(above, key, BIG), axis=0))
            a_max = tl.maximum(a_max, tl.max(tl.where(above, key, -1), axis=0))
            below = pos & (key < lo)
            m_below += tl.sum(tl.where(below, w, 0.0), axis=0)
            b_cnt += tl.sum(below.to(tl.int32), axis=0)
            b_min = tl.minimum(b_min, tl.min(tl.where(below, key, BIG), axis=0))
            b_max = tl.maximum(b_max, tl.max(tl.where(below, key, -1), axis=0))
        n_pass += 1
        top = tl.where(first, m_above, M_top)
        # M at the lower edge of each sub-range (incl.) and at its upper edge (excl.): suffix sums, one shape
        m_lo = top + tl.sum(tl.where(kk[None, :] >= kk[:, None], mass[None, :], 0.0), axis=1)
        m_hi = top + tl.sum(tl.where(kk[None, :] > kk[:, None], mass[None, :], 0.0), axis=1)
        M0 = tl.max(tl.where(kk == 0, m_lo, 0.0), axis=0)  # M(lo - 1)
        W = tl.where(first, M0 + m_below, W)
        # the crossing sub-range: the last whose lower edge still has M >= p·W (sub-range 0 at least)
        j = tl.sum(((kk >= 1) & (m_lo / W >= top_p)).to(tl.int32), axis=0)
        sel = kk == j
        r_min = tl.min(tl.where(sel, kmin, BIG), axis=0)
        r_max = tl.max(tl.where(sel, kmax, -1), axis=0)
        r_cnt = tl.sum(tl.where(sel, cnt, 0), axis=0)
        r_lo = tl.sum(tl.where(sel, m_lo, 0.0), axis=0)
        r_hi = tl.sum(tl.where(sel, m_hi, 0.0), axis=0)
        # first pass only: the crossing may lie below or above the guessed bracket
        at_top = first & (top / W >= top_p)
        at_bottom = first & (M0 / W < top_p)
        r_min = tl.where(at_top, a_min, tl.where(at_bottom, b_min, r_min))
        r_max = tl.where(at_top, a_max, tl.where(at_bottom, b_max, r_max))
        r_cnt = tl.where(at_top, a_cnt, tl.where(at_bottom, b_cnt, r_cnt))
        r_lo = tl.where(at_top, top, tl.where(at_bottom, W, r_lo))
        r_hi = tl.where(at_top, 0.0, tl.where(at_bottom, M0, r_hi))
        # an empty crossing sub-range (later passes, sub-range 0, by rounding against the last pass): every key
        # of the bracket is kept, x* is its smallest
        empty = r_cnt == 0
        r_min = tl.where(empty, tl.min(kmin, axis=0), r_min)
        r_max = tl.where(empty, r_min, r_max)
        # settled: one key left, or two single categories (M(smaller) = M above the pair + the larger weight)
        single = r_min == r_max
        two = (r_cnt == 2) & (r_min != r_max)
        m_min = r_hi + r_max.to(tl.float64, bitcast=True)
        take_min = single | empty | (m_min / W < top_p)
        xstar = tl.where(take_min, r_min, r_max)
        Wf = tl.where(take_min, r_lo, m_min)
        done = (single | two | empty).to(tl.int32)
        # a bracket of at most CAP categories that holds the crossing: settled from its copy, sorted (descending);
        # the crossing is the first index whose mass from the top, M_top + cumsum, reaches p·W (a monotone
        # sequence: the same comparison as above, on sums of this pass's terms), x* its weight, ties kept whole
        if (n_in <= CAP) & ((at_top | at_bottom).to(tl.int32) == 0):
            tl.debug_barrier()  # the copy, written by every thread of the program, is complete
            slots = tl.arange(0, CAP)
            s = tl.sort(tl.load(scratch + slots, mask=slots < n_in, other=0.0, volatile=True), descending=True)
            c = top + tl.cumsum(s, axis=0)
            i0 = tl.sum(((slots < n_in) & (c / W < top_p)).to(tl.int32), axis=0)
            i0 = tl.maximum(tl.minimum(i0, n_in - 1), 0)  # none crossing by rounding: the bracket's smallest
            xs = tl.sum(tl.where(slots == i0, s, 0.0), axis=0)
            xstar = xs.to(tl.int64, bitcast=True)
            Wf = top + tl.sum(tl.where(s >= xs, s, 0.0), axis=0)
            done = done * 0 + 1
        lo = r_min
        hi = r_max
        M_top = r_hi
        first = lo < 0  # False from now on
    return xstar, Wf, n_pass


@triton.jit(do_not_specialize=["temperature_bits", "top_k", "top_p_bits", "seed_lo", "seed_hi", "off_lo", "off_hi",
                               "row_lo", "row_hi"])
def _sample_categorical_fwd_kernel(
    logits_ptr, stride_l, tok_ptr, V, temperature_bits, top_k, top_p_bits, seed_lo, seed_hi, off_lo, off_hi,
    row_lo, row_hi, stats_ptr, scratch_ptr,
    GREEDY: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
    XDT: tl.constexpr, WDT: tl.constexpr, KEY: tl.constexpr, SIGN_OFF: tl.constexpr, BLOCK: tl.constexpr,
    KSPLIT: tl.constexpr = 32, SBLOCK: tl.constexpr = 128, STATS: tl.constexpr = False, CAP: tl.constexpr = 4096,
    GBLOCK: tl.constexpr = 64,
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
        p_lo0 = tl.full((), 1023 - KSPLIT // 2, tl.int64) << 52  # top-p's first bracket: [2**-(K/2), 1)
        p_hi0 = tl.full((), 1.0, tl.float64).to(tl.int64, bitcast=True) - 1
        if HAS_TOPP and not HAS_TOPK:  # pass 1 with the top-p guess
            m, p_lo0, p_hi0 = _top_p_guess(base, V, temperature, top_p, XDT, WDT, KSPLIT, GBLOCK)
        else:
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
        # top-p: the smallest x (bits of a non-negative double) with mass(w > x) < p · W, by a K-ary search
        p_lo = tl.zeros((), tl.int64)
        if HAS_TOPP:
            p_lo, Wp, n_pass = _top_p_search(base, scratch_ptr + row * CAP, V, temperature, m, k_lo, top_p, p_lo0,
                                             p_hi0, XDT, WDT, KEY, SIGN_OFF, HAS_TOPK, KSPLIT, SBLOCK, CAP)
            Wf = Wp
            if STATS:  # (passes of the search, threshold bits, kept total's bits) of each row
                tl.store(stats_ptr + row * 3, n_pass.to(tl.int64))
                tl.store(stats_ptr + row * 3 + 1, p_lo)
                tl.store(stats_ptr + row * 3 + 2, Wp.to(tl.int64, bitcast=True))
        elif HAS_TOPK:  # the kept total of the top-k set, then the scan
            for v0 in range(0, V, BLOCK):
                w, _ = _tile_weights(base, v0 + lanes, V, temperature, m, k_lo, p_lo, XDT, WDT, KEY, SIGN_OFF,
                                     HAS_TOPK, False)
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
