"""Fast-dLLM's decoding loops for LLaDA-style models (Wu et al. 2025, "Fast-dLLM: Training-free
Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding"; algorithm of NVlabs/Fast-dLLM
``llada/generate.py``: ``generate``, ``generate_with_prefix_cache``, ``generate_with_dual_cache``,
``get_transfer_index``, ``get_transfer_index_dynamic``), re-written as plain loops.

Per block (counted from the end of the prompt), repeat until the block has no mask left (batch-wide):
one forward, x0 / confidence as in LLaDA, candidates = masked positions of the block, then reveal

* no threshold / factor: LLaDA's per-step count (``steps // num_blocks`` steps per block);
* ``threshold``: every candidate with confidence >= threshold, and always the most confident one;
* ``factor``: sort candidate confidences descending ``c_0 >= c_1 >= ...``; the first ``i >= 1`` with
  ``c_i < 1 - factor / (i + 2)`` stops it and ``i`` tokens are revealed, except when that ``i`` is the
  last candidate (then all are revealed, the reference's quirk); with no failure all are revealed; a single
  candidate is always revealed.

Caches (``cache="prefix"`` / ``"dual"``, through the model's ``kv_forward`` / ``kv_window``): the first
step of each block is a full ``kv_forward`` that also builds the cache; later steps of the block run
``kv_window`` on ``x[:, start:]`` (prefix: the window is everything from the block start on) or on
``x[:, start:end]`` (dual: the window is the block).
"""

from __future__ import annotations

from typing import Any

import torch

from .llada import confidence_of, gumbel_argmax, prepare, transfer_counts
from .models import lm_inputs, logits_of


def choose(conf: torch.Tensor, cand: torch.Tensor, *, count: int | None, threshold: float | None,
           factor: float | None) -> torch.Tensor:
    """One row: ``conf (n,)`` float64 confidences, ``cand (n,)`` bool candidates -> bool (n,) to reveal."""
    out = torch.zeros_like(cand)
    m = int(cand.sum())
    if m == 0:
        return out
    c = torch.where(cand, conf, torch.full_like(conf, float("-inf")))
    order = torch.sort(c, descending=True, stable=True).indices[:m]
    if factor is not None:
        k = m
        for i in range(1, m):
            if float(c[order[i]]) < 1 - factor / (i + 2):
                k = m if i == m - 1 else i
                break
        out[order[:k]] = True
    elif threshold is not None:
        out[order[0]] = True
        for i in range(1, m):
            if float(c[order[i]]) >= threshold:
                out[order[i]] = True
    else:
        out[torch.topk(c, int(count)).indices] = True
    return out


@torch.no_grad()
def fast_dllm_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       max_new_tokens: int, steps: int, block_length: int | None = None, mask_id: int,
                       temperature: float = 0.0, remasking: str = "low_confidence",
                       threshold: float | None = None, factor: float | None = None,
                       cache: str | None = None, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Returns ``(x (B, P + N) left-padded, number of forward calls)``."""
    P, N = input_ids.shape[1], max_new_tokens
    block_length = N if block_length is None else block_length
    x, am = prepare(input_ids, attention_mask, N, mask_id)
    B, L = x.shape
    kw = lm_inputs(am)
    t = torch.zeros(B, dtype=torch.long)
    num_blocks = N // block_length
    per_block = steps // num_blocks
    calls = 0
    for nb in range(num_blocks):
        start, end = P + nb * block_length, P + (nb + 1) * block_length
        counts = transfer_counts((x[:, start:end] == mask_id).sum(1), per_block)
        i = 0
        kv = None
        while bool((x[:, start:end] == mask_id).any()):
            if cache is None:
                logits, lo = logits_of(model(x, **kw)).float(), 0
            elif i == 0:
                logits, kv = model.kv_forward(x, t, **kw)
                logits, lo = logits.float(), 0
            else:
                lo = start
                hi = L if cache == "prefix" else end
                logits = model.kv_window(x[:, lo:hi], t, cache=kv, start=lo, **kw).float()
            calls += 1
            # positions lo .. lo + logits.shape[1] of x
            xs = x[:, lo:lo + logits.shape[1]]
            x0 = gumbel_argmax(logits, temperature, generator)
            conf = confidence_of(logits, x0, remasking, generator)
            cols = torch.arange(lo, lo + logits.shape[1])
            cand = (xs == mask_id) & ((cols >= start) & (cols < end))[None]
            for b in range(B):
                count = None if (threshold is not None or factor is not None) else int(counts[b, i])
                pick = choose(conf[b], cand[b], count=count, threshold=threshold, factor=factor)
                xs[b, pick] = x0[b, pick]
            i += 1
    return x, calls
