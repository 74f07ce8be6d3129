"""``posterior_sample``: one reverse step ``x_s ~ p(x_s | x_t)`` of a discrete process, fused with the
posterior so a kernel never writes ``(N, V)`` probabilities."""

from __future__ import annotations

import torch

from .. import random as _random
from .._protocols import DiscreteProcess, Step
from . import _dispatch
from .categorical_posterior import _keep_dead_rows
from ._common import (check_finite_above, check_posterior_args, check_values_unless_kernel_does, draw_from_weights,
                      mask_of, rows_per_chunk)
from ._plan import check_lowerable, posterior_plan

KERNEL = "posterior"  # fastdiff.ops.backends.<backend>.posterior, shared with categorical_posterior


def posterior_sample_ref(process: DiscreteProcess, x0_logits: torch.Tensor, x_t: torch.Tensor, t: Step,
                         s: Step | None = None, *,
                         seed: int, offset: int = 0, temperature: float = 1.0, row_offset: int = 0) -> torch.Tensor:
    """Draw ``x_s`` from :func:`~fastdiff.ops.categorical_posterior_ref`: int64 ``(...)``.

    Row ``r`` (C order over ``x_t``) is drawn by inverting the posterior's CDF in index order with the
    float64 uniform of Philox counter ``(row_offset + r, offset)`` under ``seed`` (:mod:`fastdiff.random`),
    so the same ``(seed, offset)`` gives the same tokens on every backend, and rows ``k..`` of a batch
    give the same tokens alone with ``row_offset=k``. For absorbing processes an unmasked token is
    carried over (its posterior is one-hot) without evaluating the row. Arguments, values and the rows
    without posterior weight (``x_t`` kept) as in :func:`~fastdiff.ops.categorical_posterior_ref`.

    Absorbing (scalar schedule) and uniform processes are drawn from the closed-form posterior with a
    two-level inverse CDF (one softmax pass per row, float64 only in the block where the CDF crosses;
    a masked row whose uniform falls in the mask's share of an end-positioned mask is not read again);
    tokens equal the dense float64 computation's except within about 1e-7 of a CDF boundary on wide
    float32 rows. Other processes use their ``x0_log_probs`` / ``posterior_probs`` in float64 row blocks.
    """
    x_t, tt, ss = check_posterior_args(process, x0_logits, x_t, t, s, temperature, values=False)
    seed = _random._check_seed(seed)
    _random._check_offset(offset)
    _random.check_row_offset("row_offset", row_offset, x_t.numel())
    check_finite_above("x0_logits", x0_logits, temperature, mask_id=mask_of(process), x_t=x_t)
    return _posterior_sample(process, x0_logits, x_t, tt, ss, seed, offset, temperature, row_offset)


def _posterior_sample(process: DiscreteProcess, x0_logits: torch.Tensor, x_t: torch.Tensor, tt: torch.Tensor,
                      ss: torch.Tensor, seed: int, offset: int, temperature: float, row_offset: int = 0
                      ) -> torch.Tensor:
    """The reference's body on checked arguments (``tt``, ``ss`` expanded to ``x_t.shape``).

    Absorbing processes with a scalar schedule and uniform processes take the closed form
    (:func:`_affine_sample`); any other process goes through its own ``x0_log_probs`` / ``posterior_probs``
    (:func:`_dense_sample`)."""
    V = process.vocab_size
    logits = x0_logits.reshape(-1, V)
    xt, t1, s1 = x_t.reshape(-1), tt.reshape(-1), ss.reshape(-1)
    out = xt.clone()
    if getattr(process, "kind", None) == "absorbing":
        rows = (xt == process.mask_id).nonzero().squeeze(-1)
    else:
        rows = torch.arange(xt.shape[0], device=xt.device)
    if rows.numel():
        args = (process, logits, xt, t1, s1, rows, seed, offset, temperature, row_offset)
        out[rows] = _affine_sample(*args) if _affine_schedule(process) is not None else _dense_sample(*args)
    return out.reshape(x_t.shape)


def _dense_sample(process: DiscreteProcess, logits: torch.Tensor, xt: torch.Tensor, t1: torch.Tensor,
                  s1: torch.Tensor, rows: torch.Tensor, seed: int, offset: int, temperature: float,
                  row_offset: int) -> torch.Tensor:
    """Tokens of ``rows`` from the process's own ``posterior_probs`` of ``exp(x0_log_probs)``: float64
    ``(rows, V)`` blocks, normalised, inverted by :func:`draw_from_weights`. Any process; also the slow
    oracle the closed form is tested against, and its fallback for the rows it cannot decide."""
    out = torch.empty(rows.shape, dtype=torch.int64, device=rows.device)
    step = rows_per_chunk(process.vocab_size)
    for r0 in range(0, rows.shape[0], step):
        r = rows[r0:r0 + step]
        x0p = process.x0_log_probs(logits[r].to(torch.float64), temperature).exp()
        probs = process.posterior_probs(x0p, xt[r], t1[r], s1[r]).to(torch.float64)
        probs = _keep_dead_rows(probs, xt[r])  # x_t unreachable from x0 (no weight): one-hot at x_t
        u = _random.row_uniforms(seed, offset, r, start=row_offset)
        out[r0:r0 + step] = draw_from_weights(probs, u)
    return out


# The closed form: categories per block of the two-level inverse CDF, and the elements of one block of rows
# (8 MiB of float32: fewer, larger PyTorch calls; measured against 0.5-4 MiB on one thread).
_BLOCK = 256
_CHUNK = 1 << 21
_EXACT_V = 2048  # rows this narrow are computed in float64 throughout, as the C++ kernel does (csrc/rows.h)


def _affine_schedule(process: DiscreteProcess) -> torch.Tensor | None:
    """``alpha_bar (T+1,)`` float64 for the kinds with an affine posterior row (absorbing with a scalar schedule,
    uniform), else None."""
    kind = getattr(process, "kind", None)
    ab = getattr(getattr(process, "schedule", None), "alpha_bar", None)
    if kind not in ("absorbing", "uniform") or not isinstance(ab, torch.Tensor) or ab.ndim != 1:
        return None
    return ab.to(torch.float64)


def _affine_sample(process: DiscreteProcess, logits: torch.Tensor, xt: torch.Tensor, t1: torch.Tensor,
                   s1: torch.Tensor, rows: torch.Tensor, seed: int, offset: int, temperature: float,
                   row_offset: int) -> torch.Tensor:
    """Tokens of ``rows`` (absorbing: masked rows only) from the closed-form posterior, the same law and the
    same uniforms as :func:`_dense_sample`.

    With ``e_j = exp((x_j - M) / temperature)`` (``M`` the row's maximum; absorbing: the mask column
    ignored) and ``Z = Σ e``, every row's weights are affine in ``e`` plus one spike::

        absorbing: w_j = (a_s - a_t) e_j / Z  (j ≠ mask),   w_mask = 1 - a_s
        uniform:   w_j = (1 - r)/V · (a_s e_j / Z + (1 - a_s)/V),  plus r · (a_s e_x_t / Z + (1 - a_s)/V) at x_t

    (:mod:`fastdiff.ops._plan`'s formulas, the ones :class:`~fastdiff.discrete.Absorbing` and
    :class:`~fastdiff.discrete.Uniform` compute). The draw is the same inverse CDF in index order: block sums
    of ``e`` (one softmax pass, no float64 ``(rows, V)`` temporary) locate the block where the cumulative
    weight crosses ``u · Σ w``, and only that block's weights are computed in float64 and accumulated.
    Absorbing rows whose mask is the last (or first) category need no logits when ``u`` falls in the mask's
    closed-form share ``1 - a_s`` of ``W = 1 - a_t``. Wide float32 rows: a token can differ from the dense
    computation's only where ``u · Σ w`` lies within about 1e-7 of a CDF boundary (float64 logits and rows
    of at most 2048 categories: float64 throughout, within 1e-12). Rows the block search cannot settle
    (rounding at a block edge, ``u · Σ w`` past the last cumulative weight) are drawn by
    :func:`_dense_sample`; so is every row of a schedule that is not decreasing.
    """
    V = logits.shape[1]
    ab = _affine_schedule(process).to(rows.device)
    a_t, a_s = ab[t1[rows]], ab[s1[rows]]
    u = _random.row_uniforms(seed, offset, rows, start=row_offset)
    out = xt[rows].clone()
    absorbing = process.kind == "absorbing"
    mask = process.mask_id if absorbing else None
    todo = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    if absorbing:
        if not bool(((a_s >= a_t) & (a_s <= 1.0)).all()):  # not a decreasing schedule: no closed form
            return _dense_sample(process, logits, xt, t1, s1, rows, seed, offset, temperature, row_offset)
        W = 1.0 - a_t  # (a_s - a_t) Σ p + (1 - a_s)
        target = u * W
        todo = W > 0  # no weight at all (a_t = 1): x_t kept
        if mask == V - 1:  # the mask's share is the last [a_s - a_t, W)
            todo &= target < a_s - a_t
        elif mask == 0:  # the first [0, 1 - a_s)
            todo &= target >= 1.0 - a_s
    sel = todo.nonzero().squeeze(-1)
    if sel.numel() == 0:
        return out
    fallback = []
    step = max(1, _CHUNK // max(V, 1))
    # rows (sorted, unique) and sel both every row: blocks of rows are views of the logits, not gathers
    every_row = rows.numel() == logits.shape[0] and sel.numel() == rows.numel()
    for c0 in range(0, sel.shape[0], step):
        k = sel[c0:c0 + step]
        r = rows[k]
        x = logits[c0:c0 + step] if every_row else logits[r]
        tok, bad = _affine_rows(x, not every_row, xt[r], a_t[k], a_s[k], u[k], mask, temperature)
        out[k] = tok
        if bool(bad.any()):
            fallback.append(k[bad])
    if fallback:
        k = torch.cat(fallback)
        out[k] = _dense_sample(process, logits, xt, t1, s1, rows[k], seed, offset, temperature, row_offset)
    return out


def _affine_rows(x: torch.Tensor, owned: bool, xt: torch.Tensor, a_t: torch.Tensor, a_s: torch.Tensor,
                 u: torch.Tensor, mask: int | None, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-level inverse CDF of :func:`_affine_sample` on a block of rows ``x (n, V)`` (``owned``: a
    gathered copy this function may overwrite, else a view of the caller's logits): ``(tokens, bad)``, ``bad``
    marking the rows left to the dense computation.

    Coarse level: ``p = softmax(x / temperature)`` (one fused pass; float64 for float64 logits and rows of at
    most ``_EXACT_V`` categories, else float32) summed per block of ``_BLOCK`` categories. Fine level, the
    crossing block only: float64 ``exp`` of its logits, normalised to the block's coarse sum, so the two
    levels agree and the proportions inside the block are exact."""
    n, V = x.shape
    dev = x.device
    f64 = torch.float64
    cdt = f64 if x.dtype == f64 or V <= _EXACT_V else torch.float32
    zero = torch.zeros((), dtype=f64, device=dev)
    ar = torch.arange(n, device=dev)
    z = x.to(cdt) if temperature == 1.0 else x.to(cdt) / temperature
    if mask is not None:  # the mask logit is ignored: -inf (on a copy, never the caller's tensor)
        z = z.clone() if z is x and not owned else z
        z[:, mask] = float("-inf")
    p = torch.softmax(z, -1)
    B = min(_BLOCK, V)
    nb_full = V // B
    # block sums in p's dtype (a float32 sum is pairwise: ~1e-7 relative, as the exp's rounding), then float64
    Eb = p[:, :nb_full * B].unflatten(1, (nb_full, B)).sum(-1).to(f64)
    lens = torch.full((nb_full,), float(B), dtype=f64, device=dev)
    if nb_full * B < V:
        Eb = torch.cat([Eb, p[:, nb_full * B:].sum(-1, keepdim=True).to(f64)], 1)
        lens = torch.cat([lens, torch.tensor([float(V - nb_full * B)], dtype=f64, device=dev)])
    nb = Eb.shape[1]
    Z = Eb.sum(-1)
    if mask is not None:
        a = (a_s - a_t) / Z
        b = torch.zeros_like(a)
        spike_at = torch.full_like(xt, mask)
        spike = 1.0 - a_s
    else:
        r = torch.where(a_s > 0, a_t / a_s.clamp_min(1e-300), torch.zeros_like(a_s))
        a = (1.0 - r) / V * a_s / Z
        b = (1.0 - r) / V * (1.0 - a_s) / V
        spike_at = xt
        spike = r * (a_s * p.gather(1, xt.unsqueeze(-1)).squeeze(-1).to(f64) / Z + (1.0 - a_s) / V)
    Wb = a.unsqueeze(-1) * Eb + b.unsqueeze(-1) * lens
    Wb[ar, spike_at // B] += spike
    Cb = Wb.cumsum(-1)
    W = Cb[:, -1]
    target = u * W
    dead = ~(W > 0)  # no weight at all: x_t kept
    blk = torch.searchsorted(Cb, target.unsqueeze(-1), right=True).squeeze(-1)
    bad = (blk >= nb) & ~dead
    blk = blk.clamp_max(nb - 1)
    before = torch.where(blk > 0, Cb.gather(1, (blk - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1), zero)
    idx = blk.unsqueeze(-1) * B + torch.arange(B, device=dev)
    ragged = V % B != 0
    if ragged:  # the last block is short: its missing categories get no weight
        inside = idx < V
        idx = idx.clamp_max(V - 1)
    # the crossing block's logits / temperature in float64, as the dense computation takes them
    zb = (z if cdt == f64 else x).gather(1, idx).to(f64)
    if cdt != f64 and temperature != 1.0:
        zb = zb / temperature
    if mask is not None and cdt != f64:
        zb.masked_fill_(idx == mask, float("-inf"))
    if ragged:
        zb.masked_fill_(~inside, float("-inf"))
    e = zb.sub_(zb.amax(-1, keepdim=True).clamp_min_(torch.finfo(f64).min)).exp_()  # a block of -inf: e = 0
    se = e.sum(-1)
    eb = Eb.gather(1, blk.unsqueeze(-1)).squeeze(-1)
    w = e.mul_(torch.where(se > 0, a * eb / torch.where(se > 0, se, 1.0), zero).unsqueeze(-1))
    if mask is None:
        w.add_((b.unsqueeze(-1) * inside) if ragged else b.unsqueeze(-1))
    pos = spike_at - blk * B
    hit = (pos >= 0) & (pos < B)
    w[ar, pos.clamp(0, B - 1)] += torch.where(hit, spike, zero)
    cum = w.cumsum_(-1).add_(before.unsqueeze(-1))
    j = torch.searchsorted(cum, target.unsqueeze(-1), right=True).squeeze(-1)
    tok = blk * B + j.clamp_max(B - 1)
    bad |= ((j >= B) | (tok >= V)) & ~dead
    tok = torch.where(dead | bad, xt, tok)
    return tok, bad


def posterior_sample(process: DiscreteProcess, x0_logits: torch.Tensor, x_t: torch.Tensor, t: Step,
                     s: Step | None = None, *, seed: int,
                     offset: int = 0, temperature: float = 1.0, row_offset: int = 0,
                     backend: str = "auto") -> torch.Tensor:
    """:func:`posterior_sample_ref` on the fastest available backend (see :mod:`fastdiff.ops`)."""
    xt, tt, ss = check_posterior_args(process, x0_logits, x_t, t, s, temperature, values=False)
    seed = _random._check_seed(seed)
    _random._check_offset(offset)
    _random.check_row_offset("row_offset", row_offset, xt.numel())
    impl, name = _dispatch.resolve("posterior_sample", KERNEL, backend, x0_logits.device)
    if impl is not None and not check_lowerable(process, backend, name):
        impl = None
    check_values_unless_kernel_does("x0_logits", x0_logits, impl, temperature, mask_id=mask_of(process), x_t=xt)
    if impl is None:
        return _posterior_sample(process, x0_logits, xt, tt, ss, seed, offset, temperature, row_offset)
    plan = posterior_plan(process, x0_logits, xt, tt, ss, temperature)
    return impl.posterior(*plan.args(sample=True, seed=seed, offset=offset, row_offset=row_offset)).reshape(xt.shape)
