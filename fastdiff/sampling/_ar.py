"""AR-Diffusion (Wu et al. 2023) for the discrete family: every position walks its own step.

The continuous strategy ``"ar"`` (:func:`._continuous.run_ar`) moves each embedding by DDIM from its own
token-level step to its next. The same schedule carries over to a discrete process unchanged: at each of
the ``steps`` sentence-level transitions of :func:`fastdiff.continuous.ar_step_pairs` (the anchor-point
schedule with step skipping), position ``n`` goes from its step ``t_n`` to ``s_n <= t_n`` by the discrete
posterior ``p(x_{s_n} | x_{t_n}, x0 = the network's prediction)`` (the D3PM skip posterior, drawn by
:func:`fastdiff.ops.posterior_sample` with per-position ``t`` and ``s``); a position with ``s_n = t_n``
(not started yet, or already at 0) keeps its token. The network is called with the ``(L,)`` per-position
steps (a model that takes one step per sequence gets them as it takes ``t``: see the strategy's summary).
With an absorbing process the left positions are unmasked sooner than the right ones, and every position
is clean once its step reaches 0.
"""

from __future__ import annotations

import torch

from .. import ops
from ..continuous import ar_step_pairs
from ._engine import _Run


def ar_moves(t_tok: torch.Tensor, s_tok: torch.Tensor) -> torch.Tensor:
    """The positions that move in a transition (``s_tok < t_tok``), as column indices ``(m,)``."""
    return (s_tok < t_tok).nonzero().squeeze(1)


def ar_discrete_step(run: _Run, logits: torch.Tensor, x: torch.Tensor, t_tok: torch.Tensor,
                     s_tok: torch.Tensor) -> torch.Tensor:
    """One transition: the moving columns drawn from their posteriors, the others kept. ``logits (B, L, V)``,
    ``x (B, L)``, ``t_tok, s_tok (L,)``; returns the new ``(B, L)`` tokens (``x`` is not modified)."""
    cols = ar_moves(t_tok, s_tok)
    out = x.clone()
    if not cols.numel():
        return out
    xr = x.index_select(1, cols)
    lr = logits.index_select(1, cols)
    t = t_tok.index_select(0, cols).expand_as(xr)
    s = s_tok.index_select(0, cols).expand_as(xr)
    t0 = int(t_tok.max())
    with run.op_values(t0):
        new = ops.posterior_sample(run.process, lr, xr, t, s, seed=run.seed, offset=run.next_offset(),
                                   row_offset=run.row_offset(xr.shape), temperature=run.o.temperature,
                                   backend=run.o.backend)
    out.index_copy_(1, cols, new)
    return out


def run_ar_discrete(run: _Run) -> tuple[torch.Tensor, None]:
    """The loop: ``x_T`` from the prior, fixed positions held, then the AR-Diffusion transitions from
    ``N + T`` to 0. Returns ``(tokens, None)``."""
    from ._discrete import prior_tokens

    o = run.o
    x = prior_tokens(run)
    x = torch.where(run.fixed, run.values, x)
    pairs = ar_step_pairs(run.L, run.process.T, run.steps)
    bar = run.progress(len(pairs))
    try:
        for t_tok, s_tok in pairs:
            t_tok, s_tok = t_tok.to(run.device), s_tok.to(run.device)
            lg, _ = run.evaluate(x, t_tok)
            new = run.spec.step(run, lg, x, t_tok, s_tok)
            x = torch.where(run.fixed, run.values, new)
            run.after_step(x, bar)
    finally:
        if bar is not None:
            bar.close()
    if o.eos_id is not None:
        x = run.cut_at_eos(x)
    return x, None
