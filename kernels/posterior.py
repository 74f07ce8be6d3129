"""``categorical_posterior`` and ``posterior_sample`` in Triton: one program per row of the lowered
:class:`~fastdiff.ops._plan.PosteriorPlan`, online normalisation, the reference's counter-based draw.

Per row (``KIND``: the plan's kind code, :data:`fastdiff.ops._plan.KINDS`: 0 absorbing, 1 absorbing with a
per-token schedule, 2 uniform, 3 matrix):

1. one pass over the logits in ``BLOCK`` tiles keeps the online max ``m`` of the logits and
   ``S = Σ exp((x - m) / temperature)`` (shifted before scaling, so large ``|x / T|`` loses no digits; mask
   column excluded for absorbing), plus, per-token,
   ``S1t = Σ e_i (1 - A_t(i))`` and ``S1s = Σ e_i (1 - A_s(i))`` with the same rescaling;
2. the row total ``Z = Σ_j w_j`` in closed form (absorbing ``1 - a_t`` resp. ``S1t / S``; uniform
   ``(1 - r)/V + r·f2(x_t)``, one extra load), or by a pass (matrix);
3. categorical_posterior writes ``w / Z`` tile by tile; posterior_sample scans the tiles with the
   float64 uniform ``u`` of Philox counter ``(row_offset + row, offset)`` and stops at the first tile where the
   running float64 CDF exceeds ``u·Z`` (``min{j : cumsum(w)_j > u·Z}``; if rounding leaves none, the
   last positive-weight category), so it never writes probabilities. Absorbing rows also keep the
   mass before the mask column from pass 1, so a draw that lands on the mask (the likely outcome
   early in sampling) needs no second pass at all.

``exp`` runs in float32 for 16/32-bit logits (float64 for float64 logits); every weight, sum and the
CDF are float64. A kernel draw differs from the reference only when ``u·Z`` lies within rounding of
a cumulative boundary. Absorbing rows with ``x_t ≠ mask`` keep ``x_t`` and never read their logits;
rows with ``Z = 0`` (``x_t`` unreachable from the x0 distribution) keep ``x_t`` too.

The mask shortcut (posterior_sample, absorbing with a scalar schedule and the mask the first or last
category, as the reference's ``_affine_sample`` and the C++ kernel): the mask's share ``1 - a_s`` of
``Z = 1 - a_t`` is the first (last) interval of the index-order CDF, so a masked row whose ``u·(1 - a_t)``
falls in it is decided before pass 1, with the reference's float64 operations (the same decision), and
its logits are never read; the public op has already checked their values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _common


@triton.jit
def _tile_weights(base, offs, ok, m, S, temperature, xt, mask_id, a_t, a_s, r, w_mask,
                  abt_ptr, abs_ptr, fact_ptr, q_ptr, V,
                  KIND: tl.constexpr, WDT: tl.constexpr, BLOCK_I: tl.constexpr):
    """float64 posterior weights ``w_j`` of one tile (0 outside the row), from the row's ``m``, ``S``."""
    if KIND == 3:
        q = tl.zeros_like(offs).to(tl.float64)
        for i0 in range(0, V, BLOCK_I):
            ri = i0 + tl.arange(0, BLOCK_I)
            i_ok = ri < V
            xi = tl.load(base + ri, mask=i_ok, other=float("-inf")).to(WDT)
            pi = tl.where(i_ok, tl.exp((xi - m) / temperature), 0.0).to(tl.float64) / S
            qt = tl.load(q_ptr + ri[:, None] * V + offs[None, :], mask=i_ok[:, None] & ok[None, :], other=0.0)
            q += tl.sum(pi[:, None] * qt, axis=0)
        w = tl.load(fact_ptr + offs, mask=ok, other=0.0) * q
    else:
        x = tl.load(base + offs, mask=ok, other=float("-inf")).to(WDT)
        if KIND <= 1:
            x = tl.where(offs == mask_id, float("-inf"), x)
        p = tl.where(x == float("-inf"), 0.0, tl.exp((x - m) / temperature)).to(tl.float64) / S
        if KIND == 0:
            w = tl.where(offs == mask_id, w_mask, (a_s - a_t) * p)
        elif KIND == 1:
            At = tl.load(abt_ptr + offs, mask=ok, other=0.0)
            As = tl.load(abs_ptr + offs, mask=ok, other=0.0)
            w = tl.where(offs == mask_id, w_mask, (As - At) * p)
        else:
            f1 = (1.0 - r) / V + tl.where(offs == xt, r, 0.0)
            w = f1 * (a_s * p + (1.0 - a_s) / V)
    return tl.where(ok, w, 0.0)


@triton.jit(do_not_specialize=["temperature_bits", "mask_id", "seed_lo", "seed_hi", "off_lo", "off_hi", "row_lo",
                               "row_hi"])
def _posterior_fwd_kernel(
    logits_ptr, stride_l, xt_ptr, t_ptr, s_ptr, at_ptr, as_ptr, ab_ptr, fact_ptr, qbar_ptr, pair_ptr,
    probs_ptr, tok_ptr,
    V, n_tab, mask_id, temperature_bits, seed_lo, seed_hi, off_lo, off_hi, row_lo, row_hi,
    KIND: tl.constexpr, SAMPLE: tl.constexpr, WDT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_I: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temperature = temperature_bits.to(tl.int64).to(tl.float64, bitcast=True).to(WDT)
    # Indices read from tensors address memory only after a clamp; a row with one out of range (n_tab: the
    # rows of ab_table, or of qbar for the matrix kind) is marked (token -1, NaN probabilities), as the CUDA
    # kernels do. The public ops check them all first.
    xt_raw = tl.load(xt_ptr + row)
    bad = (xt_raw < 0) | (xt_raw >= V)
    xt = tl.minimum(tl.maximum(xt_raw, 0), V - 1)
    base = logits_ptr + row * stride_l
    lanes = tl.arange(0, BLOCK)
    a_t = 0.0
    a_s = 0.0
    r = 0.0
    abt_ptr = ab_ptr
    abs_ptr = ab_ptr
    fact_row = fact_ptr
    q_ptr = qbar_ptr
    if KIND == 0 or KIND == 2:
        a_t = tl.load(at_ptr + row)
        a_s = tl.load(as_ptr + row)
    if KIND == 1:
        t_row = tl.load(t_ptr + row)
        s_row = tl.load(s_ptr + row)
        bad = bad | (t_row < 0) | (t_row >= n_tab) | (s_row < 0) | (s_row >= n_tab)
        abt_ptr = ab_ptr + tl.minimum(tl.maximum(t_row, 0), n_tab - 1) * V
        abs_ptr = ab_ptr + tl.minimum(tl.maximum(s_row, 0), n_tab - 1) * V
    if KIND == 2:
        r = tl.where(a_s > 0, a_t / a_s, 0.0)
    if KIND == 3:
        fact_row = fact_ptr + row * V
        pr = tl.load(pair_ptr + row)
        bad = bad | (pr < 0) | (pr >= n_tab)
        q_ptr = qbar_ptr + tl.minimum(tl.maximum(pr, 0), n_tab - 1) * V * V

    keep = xt < 0  # False, as a runtime scalar
    if KIND <= 1:
        keep = xt != mask_id
    u = tl.zeros((), tl.float64)
    if SAMPLE:
        u = _common.row_uniform(row + _common.join64(row_lo, row_hi), seed_lo, seed_hi, off_lo, off_hi)
    if KIND == 0 and SAMPLE:
        # The mask shortcut (the reference's _affine_sample): with the mask the last (first) category, its
        # closed-form share 1 - a_s of W = 1 - a_t is the last [a_s - a_t, W) (first [0, 1 - a_s)) of the
        # index-order CDF. A masked row whose u * W falls there, or with no weight at all, stays the mask
        # without reading its logits (the public op has checked their values): the reference's float64
        # operations, so the same decision. Only for a decreasing schedule (both shares non-negative).
        W1 = 1.0 - a_t
        t1 = u * W1
        at_end = (mask_id == V - 1) & (t1 >= a_s - a_t)
        at_start = (mask_id != V - 1) & (mask_id == 0) & (t1 < 1.0 - a_s)
        decreasing = (a_s >= a_t) & (a_s <= 1.0)
        keep = keep | (decreasing & ((W1 <= 0.0) | at_end | at_start))
    m = tl.full((), float("-inf"), WDT)
    S = tl.zeros((), tl.float64)
    S1t = tl.zeros((), tl.float64)
    S1s = tl.zeros((), tl.float64)
    Sb = tl.zeros((), tl.float64)  # absorbing: the x0 mass before the mask column (unnormalised)
    if not keep:
        # pass 1: online max and normaliser (and the per-token sums)
        for v0 in range(0, V, BLOCK):
            offs = v0 + lanes
            ok = offs < V
            x = tl.load(base + offs, mask=ok, other=float("-inf")).to(WDT)
            if KIND <= 1:
                x = tl.where(offs == mask_id, float("-inf"), x)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no NaN from -inf - -inf
            # shift before scaling: (x - max)/T keeps the digits that x/T - max(x/T) loses when |x/T| is large
            scale = tl.exp((m - m_ref) / temperature).to(tl.float64)
            e = tl.exp((x - m_ref) / temperature).to(tl.float64)
            S = S * scale + tl.sum(e, axis=0)
            if KIND == 0:
                Sb = Sb * scale + tl.sum(tl.where(offs < mask_id, e, 0.0), axis=0)
            if KIND == 1:
                At = tl.load(abt_ptr + offs, mask=ok, other=0.0)
                As = tl.load(abs_ptr + offs, mask=ok, other=0.0)
                S1t = S1t * scale + tl.sum(e * (1.0 - At), axis=0)
                S1s = S1s * scale + tl.sum(e * (1.0 - As), axis=0)
                Sb = Sb * scale + tl.sum(tl.where(offs < mask_id, e * (As - At), 0.0), axis=0)
            m = m_new
        keep = S <= 0.0
    S = tl.where(S > 0.0, S, 1.0)
    # the row total Z and the mask column's weight
    w_mask = tl.zeros((), tl.float64)
    before = tl.zeros((), tl.float64)  # absorbing: Σ_{j < mask} w_j
    Z = tl.zeros((), tl.float64) + 1.0
    if KIND == 0:
        w_mask = 1.0 - a_s
        Z = (a_s - a_t) + w_mask
        before = (a_s - a_t) * (Sb / S)
    if KIND == 1:
        w_mask = S1s / S
        Z = S1t / S
        before = Sb / S
    if KIND == 2:
        xx = tl.load(base + xt).to(WDT)
        f2x = a_s * (tl.exp((xx - m) / temperature).to(tl.float64) / S) + (1.0 - a_s) / V
        Z = (1.0 - r) / V + r * f2x
    if KIND == 3:
        Z = tl.zeros((), tl.float64)
        for v0 in range(0, V, BLOCK):
            offs = v0 + lanes
            w = _tile_weights(base, offs, offs < V, m, S, temperature, xt, mask_id, a_t, a_s, r, w_mask,
                              abt_ptr, abs_ptr, fact_row, q_ptr, V, KIND, WDT, BLOCK_I)
            Z += tl.sum(w, axis=0)
    keep = keep | (Z <= 0.0)  # no weight at all (x_t unreachable from x0): keep x_t, on every backend

    if SAMPLE:
        tok = xt
        if not keep:
            target = u * Z
            acc = tl.zeros((), tl.float64)
            found = xt * 0 - 1
            if KIND <= 1:  # the draw lands on the mask column: known from pass 1, no scan
                on_mask = (w_mask > 0.0) & (target >= before) & (target < before + w_mask)
                found = tl.where(on_mask, found * 0 + mask_id, found)
            last = xt * 0 - 1
            v0 = tl.zeros((), tl.int32)  # loop-carried: a tensor, like the others
            while (v0 < V) & (found < 0):
                offs = v0 + lanes
                ok = offs < V
                w = _tile_weights(base, offs, ok, m, S, temperature, xt, mask_id, a_t, a_s, r, w_mask,
                                  abt_ptr, abs_ptr, fact_row, q_ptr, V, KIND, WDT, BLOCK_I)
                c = acc + tl.cumsum(w, axis=0)
                first = tl.min(tl.where(ok & (c > target), offs, V), axis=0).to(tl.int64)
                found = tl.where(first < V, first, found)
                last = tl.maximum(last, tl.max(tl.where(ok & (w > 0.0), offs, -1), axis=0).to(tl.int64))
                acc = tl.max(c, axis=0)
                v0 += BLOCK
            # no crossing: the last positive-weight category (Z > 0 here, so there is one)
            tok = tl.where(found >= 0, found, tl.where(last >= 0, last, V - 1))
        tl.store(tok_ptr + row, tl.where(bad, -1, tok))
    else:
        out_row = probs_ptr + row * V
        out_dt = probs_ptr.dtype.element_ty
        for v0 in range(0, V, BLOCK):
            offs = v0 + lanes
            ok = offs < V
            if keep:
                prob = tl.where(offs == xt, 1.0, 0.0).to(tl.float64)  # both branches: one type
            else:
                w = _tile_weights(base, offs, ok, m, S, temperature, xt, mask_id, a_t, a_s, r, w_mask,
                                  abt_ptr, abs_ptr, fact_row, q_ptr, V, KIND, WDT, BLOCK_I)
                prob = w / Z
            prob = tl.where(bad, float("nan"), prob)
            tl.store(out_row + offs, prob.to(out_dt), mask=ok)
