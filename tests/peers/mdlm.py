"""MDLM's ancestral sampler with the x0 cache (Sahoo et al. 2024, "Simple and Effective Masked Diffusion
Language Models"; algorithm of kuleshov-group/mdlm ``diffusion.py``: ``_sample``,
``_ddpm_caching_update``) and DUO's ancestral sampler for uniform-state diffusion (Sahoo et al. 2025,
"The Diffusion Duality"; s-sahoo/duo ``trainer_base.generate_samples`` / ``DUO_BASE._compute_posterior``),
re-written as plain loops, conditioned on a prompt that is never changed.

MDLM (log-linear schedule, mask probability = t): ``timesteps = linspace(1, eps, steps + 1)``,
``dt = (1 - eps) / steps``. A step at ``t`` (``s = t - dt``): p_x0 = softmax of the logits with the
[MASK] logit at -inf (SUBS); each masked position becomes token v with probability ``p_x0(v)(t - s)/t``
and stays masked with probability ``s / t``; unmasked positions are copied. The forward is skipped
(p_x0 reused) when the previous step changed nothing (the model is time-free). After the loop one more
forward, and every still-masked position takes the argmax of p_x0 (noise removal).

DUO (uniform prior, log-linear ``alpha_t = 1 - (1 - eps) t``): generated positions start uniform over the
vocabulary; a step
draws x_s from the exact posterior ``q(x_s | x_t, x0 = x_theta)``
``∝ alpha_t V x x[x_t]-onehot + (alpha_t / alpha_s - alpha_t) onehot(x_t) + (alpha_s - alpha_t) x
+ (1 - alpha_t / alpha_s)(1 - alpha_s) / V`` with x = softmax(logits), one forward every step (DUO's
``_ancestral_update`` drops the x0 cache); the final step is greedy noise removal (argmax of one more
forward).
"""

from __future__ import annotations

from typing import Any

import torch

from .llada import prepare
from .models import call_lm


def _categorical(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row of the non-negative weights ``w (n, V)`` (normalised here)."""
    if w.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.multinomial(w / w.sum(-1, keepdim=True), 1, generator=gen)[:, 0]


@torch.no_grad()
def mdlm_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  max_new_tokens: int, steps: int, mask_id: int, eps: float = 1e-3,
                  temperature: float = 1.0, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Returns ``(x (B, P + N) left-padded, number of forward calls)``."""
    x, am = prepare(input_ids, attention_mask, max_new_tokens, mask_id)
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    dt = (1 - eps) / steps
    calls = 0
    p_x0 = None

    def x0_probs() -> torch.Tensor:
        logits = call_lm(model, x, am).double()
        logits[..., mask_id] = float("-inf")
        return torch.softmax(logits / temperature, dim=-1)

    for i in range(steps):
        t = float(ts[i])
        s = t - dt
        if p_x0 is None:
            p_x0 = x0_probs()
            calls += 1
        masked = x == mask_id
        w = p_x0[masked] * (t - s)
        w[:, mask_id] = s
        new = x.clone()
        new[masked] = _categorical(w, generator)
        if not torch.equal(new, x):
            p_x0 = None
        x = new
    p = x0_probs()
    calls += 1
    masked = x == mask_id
    x[masked] = p[masked].argmax(-1)
    return x, calls


@torch.no_grad()
def duo_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, steps: int, eps: float = 1e-3, temperature: float = 1.0,
                 generator: torch.Generator, pad_id: int = 0) -> tuple[torch.Tensor, int]:
    """Returns ``(x (B, P + N) left-padded, number of forward calls)``."""
    P = input_ids.shape[1]
    x, am = prepare(input_ids, attention_mask, max_new_tokens, pad_id)
    B, L = x.shape
    V = int(call_lm(model, x[:1], am[:1]).shape[-1])
    x[:, P:] = torch.randint(V, (B, max_new_tokens), generator=generator)
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    calls = 0

    def x0_probs() -> torch.Tensor:
        return torch.softmax(call_lm(model, x, am).double() / temperature, dim=-1)

    for i in range(steps):
        a_t, a_s = 1 - (1 - eps) * float(ts[i]), 1 - (1 - eps) * float(ts[i + 1])
        p_x0 = x0_probs()
        calls += 1
        xg, pg = x[:, P:], p_x0[:, P:]
        onehot = torch.nn.functional.one_hot(xg, V).double()
        at_xt = pg.gather(-1, xg[..., None])
        w = (a_t * V * pg * onehot + (a_t / a_s - a_t) * onehot + (a_s - a_t) * pg
             + (1 - a_t / a_s) * (1 - a_s) / V) / (a_t * V * at_xt + 1 - a_t)
        new = x.clone()
        new[:, P:] = _categorical(w.reshape(-1, V), generator).view(B, -1)
        x = new
    x[:, P:] = x0_probs()[:, P:].argmax(-1)
    calls += 1
    return x, calls
