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
    """The reference's body on checked arguments (``tt``, ``ss`` expanded to ``x_t.shape``)."""
    V = process.vocab_size
    logits = x0_logits.reshape(-1, V)
    xt, t1, s1 = x_t.reshape(-1), tt.reshape(-1), ss.reshape(-1)
    out = xt.clone()
    if getattr(process, "kind", None) == "absorbing":
        rows = (xt == process.mask_id).nonzero().squeeze(-1)
    else:
        rows = torch.arange(xt.shape[0], device=xt.device)
    step = rows_per_chunk(V)
    for r0 in range(0, rows.shape[0], step):
        r = rows[r0:r0 + step]
        x0p = process.x0_log_probs(logits[r].to(torch.float64), temperature).exp()
        probs = process.posterior_probs(x0p, xt[r], t1[r], s1[r]).to(torch.float64)
        probs = _keep_dead_rows(probs, xt[r])  # x_t unreachable from x0 (no weight): one-hot at x_t
        u = _random.row_uniforms(seed, offset, r, start=row_offset)
        out[r] = draw_from_weights(probs, u)
    return out.reshape(x_t.shape)


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
