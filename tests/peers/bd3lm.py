"""BD3-LM's semi-autoregressive sampler with first-hitting steps (Arriola et al. 2025, "Block Diffusion:
Interpolating Between Autoregressive and Diffusion Language Models"; kuleshov-group/bd3lms), re-written
as a plain loop over a block-causal model.

Blocks of ``block_length`` after the prompt, one at a time. Inside a block, until no mask is left: one
forward of the block given the clean earlier columns (with ``cache="kv"``: the model's exact KV protocol,
``model(x_block, t, cache=, start=)`` then ``extend_cache`` once the block is clean; without a cache: the
model over ``x[:, :end]``); then first hitting: one masked position of the block, chosen uniformly at
random, gets a token drawn from p_x0 = softmax(logits / temperature) with the [MASK] logit at -inf
(SUBS); the others stay masked. The model is time-free here, so the first-hitting times do not matter.
"""

from __future__ import annotations

from typing import Any

import torch

from .llada import prepare
from .models import call_lm, logits_of


@torch.no_grad()
def bd3lm_generate(model: Any, input_ids: torch.Tensor, *, max_new_tokens: int, block_length: int,
                   mask_id: int, temperature: float = 1.0, cache: str | None = None,
                   generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Returns ``(x (B, P + N), number of forward calls)`` (prompts without padding)."""
    P = input_ids.shape[1]
    x, am = prepare(input_ids, None, max_new_tokens, mask_id)
    B = x.shape[0]
    t = torch.zeros(B, dtype=torch.long)
    kv = None
    if cache == "kv":
        kv = model.new_cache(B)
        if P:
            kv = model.extend_cache(kv, x[:, :P], 0)
    calls = 0
    for start in range(P, P + max_new_tokens, block_length):
        end = start + block_length
        while bool((x[:, start:end] == mask_id).any()):
            if kv is not None:
                logits = logits_of(model(x[:, start:end], t, cache=kv, start=start)).float()
            else:
                logits = call_lm(model, x[:, :end], am[:, :end])[:, start:end]
            calls += 1
            logits = logits.double()
            logits[..., mask_id] = float("-inf")
            p = torch.softmax(logits / temperature, dim=-1)
            for b in range(B):
                where = torch.nonzero(x[b, start:end] == mask_id)[:, 0]
                if where.numel() == 0:
                    continue
                j = int(where[torch.randint(where.numel(), (1,), generator=generator)])
                x[b, start + j] = int(torch.multinomial(p[b, j], 1, generator=generator))
        if kv is not None:
            kv = model.extend_cache(kv, x[:, start:end], start)
    return x, calls
