"""LLaDA's semi-autoregressive low-confidence remasking sampler (Nie et al. 2025, "Large Language
Diffusion Models"; algorithm of ML-GSAI/LLaDA ``generate.py``), re-written as a plain loop.

Conventions (LLaDA's): ``x = [prompt | N masks]``; blocks of ``block_length`` counted from the end of the
prompt; ``steps`` in total, ``steps // num_blocks`` per block; at each step of a block the number of
tokens to reveal is the block's initial mask count split evenly over the block's steps, the remainder
going to the first steps. A step: one forward over the whole sequence (with CFG: the same sequence with
the prompt masked as a second batch half, ``un + (w + 1)(cond - un)``), x0 = argmax of the logits with
Gumbel noise at ``temperature`` (float64), confidence = softmax(logits)[x0] (``low_confidence``) or
uniform (``random``); positions right of the block get -inf; the top-k masked positions are revealed.
"""

from __future__ import annotations

from typing import Any

import torch

from .models import call_lm, right_align


def transfer_counts(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) masked counts -> (B, steps) tokens per step: ``n // steps`` each, ``+1`` on the first
    ``n % steps`` steps."""
    base, rem = n_masked // steps, n_masked % steps
    out = base[:, None].repeat(1, steps)
    for b in range(len(n_masked)):
        out[b, : int(rem[b])] += 1
    return out


def gumbel_argmax(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """argmax of ``exp(l) / (-log u)^T`` in float64 (a draw from softmax(l / T)); plain argmax at T = 0."""
    if temperature == 0:
        return logits.argmax(-1)
    l64 = logits.double()
    u = torch.rand(l64.shape, generator=gen, dtype=torch.float64)
    return (l64.exp() / (-torch.log(u)) ** temperature).argmax(-1)


def confidence_of(logits: torch.Tensor, x0: torch.Tensor, remasking: str, gen: torch.Generator
                  ) -> torch.Tensor:
    """(B, L) float64: softmax(logits)[x0] for ``low_confidence``, U(0, 1) for ``random``."""
    if remasking == "low_confidence":
        p = torch.softmax(logits.double(), dim=-1)
        return p.gather(-1, x0[..., None])[..., 0]
    if remasking == "random":
        return torch.rand(x0.shape, generator=gen, dtype=torch.float64)
    raise ValueError(remasking)


def prepare(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
            mask_id: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, P + N)`` = right-aligned prompt then masks, and its attention mask (1 = real/mask)."""
    ids, am = right_align(input_ids, attention_mask, pad_id)
    B, _ = ids.shape
    x = torch.cat([ids, torch.full((B, max_new_tokens), mask_id, dtype=ids.dtype)], dim=1)
    full_am = torch.cat([am, torch.ones(B, max_new_tokens, dtype=am.dtype)], dim=1)
    return x, full_am


@torch.no_grad()
def llada_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   max_new_tokens: int, steps: int, block_length: int | None = None, mask_id: int,
                   temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
                   generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Returns ``(x (B, P + N) left-padded, number of forward calls)``."""
    P, N = input_ids.shape[1], max_new_tokens
    block_length = N if block_length is None else block_length
    x, am = prepare(input_ids, attention_mask, N, mask_id)
    num_blocks = N // block_length
    per_block = steps // num_blocks
    calls = 0
    for nb in range(num_blocks):
        start, end = P + nb * block_length, P + (nb + 1) * block_length
        counts = transfer_counts((x[:, start:end] == mask_id).sum(1), per_block)
        for i in range(per_block):
            masked = x == mask_id
            if cfg_scale > 0:
                un = x.clone()
                un[:, :P] = mask_id
                both = call_lm(model, torch.cat([x, un]), torch.cat([am, am]))
                cond, unc = both.chunk(2)
                logits = unc + (cfg_scale + 1) * (cond - unc)
            else:
                logits = call_lm(model, x, am)
            calls += 1
            x0 = gumbel_argmax(logits, temperature, generator)
            conf = confidence_of(logits, x0, remasking, generator)
            conf[:, end:] = float("-inf")
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            for b in range(x.shape[0]):
                k = int(counts[b, i])
                if k:
                    idx = torch.topk(conf[b], k).indices
                    x[b, idx] = x0[b, idx]
    return x, calls
