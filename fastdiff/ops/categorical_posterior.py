"""``categorical_posterior``: softmax of the network's x0 logits pushed through the D3PM skip posterior."""

from __future__ import annotations

import torch

from .._protocols import DiscreteProcess, Step
from . import _dispatch
from ._common import check_posterior_args, check_values_unless_kernel_does, mask_of, rows_per_chunk
from ._plan import check_lowerable, posterior_plan

KERNEL = "posterior"  # fastdiff.ops.backends.<backend>.posterior, shared with posterior_sample


def categorical_posterior_ref(process: DiscreteProcess, x0_logits: torch.Tensor, x_t: torch.Tensor, t: Step,
                              s: Step | None = None,
                              temperature: float = 1.0) -> torch.Tensor:
    """``p(x_s | x_t) ∝ Q_{t|s}[:, x_t] ⊙ (softmax(x0_logits / temperature) @ Qbar_s)``: ``(..., V)``.

    ``x0_logits: (..., V)``, ``x_t: (...)``, ``t``/``s`` ints or tensors of a leading shape of ``x_t``
    (``s`` defaults to ``t - 1``). Absorbing processes ignore the mask logit (SUBS): a masked row
    (``x_t == mask_id``) needs a finite logit besides the mask's, an unmasked row is carried over (one-hot)
    without being read. A row whose posterior has no weight at all (``x_t`` unreachable from the x0
    distribution) keeps ``x_t`` (one-hot). ``temperature``: finite, in ``[1e-30, 1e30]`` (see
    :func:`~fastdiff.ops.sample_categorical_ref`). Computed in float64 over row blocks of at most 16 MiB per
    temporary; returned as float32 (float64 for float64 logits).
    """
    x_t, tt, ss = check_posterior_args(process, x0_logits, x_t, t, s, temperature)
    return _categorical_posterior(process, x0_logits, x_t, tt, ss, temperature)


def _categorical_posterior(process: DiscreteProcess, x0_logits: torch.Tensor, x_t: torch.Tensor, tt: torch.Tensor,
                           ss: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference's body on checked arguments (``tt``, ``ss`` expanded to ``x_t.shape``)."""
    V = process.vocab_size
    out_dtype = torch.float64 if x0_logits.dtype == torch.float64 else torch.float32
    logits = x0_logits.reshape(-1, V)
    xt, t1, s1 = x_t.reshape(-1), tt.reshape(-1), ss.reshape(-1)
    out = torch.empty(logits.shape, dtype=out_dtype, device=logits.device)
    mask = mask_of(process)
    step = rows_per_chunk(V)
    for r0 in range(0, logits.shape[0], step):
        sl = slice(r0, r0 + step)
        x0p = process.x0_log_probs(logits[sl].to(torch.float64), temperature).exp()
        if mask is not None:  # carried rows (x_t != mask) never use x0: one whose only finite logit is the mask is fine
            x0p = torch.where((xt[sl] == mask).unsqueeze(-1), x0p, torch.zeros((), dtype=x0p.dtype))
        out[sl] = _keep_dead_rows(process.posterior_probs(x0p, xt[sl], t1[sl], s1[sl]), xt[sl]).to(out_dtype)
    return out.reshape(x0_logits.shape)


def _keep_dead_rows(probs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """Rows without any posterior weight (``x_t`` unreachable from the x0 distribution: the process's
    ``w / Σ w`` is 0 / 0) keep ``x_t``: one-hot, as the kernels do (see :mod:`fastdiff.ops._plan`)."""
    dead = torch.isnan(probs).any(-1)
    if bool(dead.any()):
        probs = torch.where(dead.unsqueeze(-1), torch.nn.functional.one_hot(xt, probs.shape[-1]).to(probs.dtype),
                            probs)
    return probs


def categorical_posterior(process: DiscreteProcess, x0_logits: torch.Tensor, x_t: torch.Tensor, t: Step,
                          s: Step | None = None,
                          temperature: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """:func:`categorical_posterior_ref` on the fastest available backend (see :mod:`fastdiff.ops`)."""
    xt, tt, ss = check_posterior_args(process, x0_logits, x_t, t, s, temperature, values=False)
    impl, name = _dispatch.resolve("categorical_posterior", KERNEL, backend, x0_logits.device)
    if impl is not None and not check_lowerable(process, backend, name):
        impl = None
    check_values_unless_kernel_does("x0_logits", x0_logits, impl, temperature, mask_id=mask_of(process), x_t=xt)
    if impl is None:
        return _categorical_posterior(process, x0_logits, xt, tt, ss, temperature)
    plan = posterior_plan(process, x0_logits, xt, tt, ss, temperature)
    return impl.posterior(*plan.args(sample=False)).reshape(x0_logits.shape)
