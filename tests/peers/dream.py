"""Dream's diffusion sampler (Ye et al. 2025, "Dream 7B"; algorithm of HKUNLP Dream's
``generation_utils.py``: ``DreamGenerationMixin._sample`` and ``sample_tokens``), re-written as a plain loop.

``x = [prompt | N masks]``; ``timesteps = linspace(1, eps, steps + 1)`` (float32). Each of the ``steps``
steps: one forward over the whole sequence; the logits are shifted right by one (position i uses the
output at i - 1, position 0 its own: Dream is an adapted autoregressive model); then over the masked
positions, with ``t, s = timesteps[i], timesteps[i + 1]``:

* ``origin``: each masked position is revealed with probability ``1 - s / t`` (1 at the last step), its
  token drawn from softmax(logits / temperature) (argmax at temperature 0);
* ``maskgit_plus`` / ``topk_margin`` / ``entropy``: x0 and its probability from softmax(logits / T)
  (argmax at T = 0); confidence = that probability, top1 - top2 probability, or -entropy
  (``sum p log(p + 1e-10)``); the number to reveal is ``int(mean masked count per row * (1 - s / t))``
  (``int(mean count)`` at the last step) computed in float32 with the batch-mean count; then the top-k
  confidences of each row (``alg_temp`` None / 0) or ``k`` positions drawn without replacement from
  softmax(confidence / alg_temp) over the row (unmasked positions have confidence -inf).

``top_p`` / ``top_k`` filter the scaled logits before the softmax, as ``sample_tokens`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from .llada import prepare
from .models import call_lm


def filter_logits(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's nucleus filter (keep the smallest prefix of the sorted probabilities whose mass exceeds
    top_p, always the first) then top-k filter; removed entries get the dtype's lowest value."""
    low = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        srt, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        remove = torch.zeros_like(drop).scatter(-1, idx, drop)
        logits = logits.masked_fill(remove, low)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, low)
    return logits


def draw(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None,
         gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) logits -> (probs (n, V), x0 (n,)): sampled at temperature > 0, argmax at 0."""
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(filter_logits(logits, top_p, top_k), dim=-1)
    if temperature > 0 and probs.shape[0]:
        x0 = torch.multinomial(probs, 1, generator=gen)[:, 0]
    else:
        x0 = probs.argmax(-1)
    return probs, x0


@torch.no_grad()
def dream_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   max_new_tokens: int, steps: int, mask_id: int, temperature: float = 0.0,
                   top_p: float | None = None, top_k: int | None = None, alg: str = "origin",
                   alg_temp: float | None = None, eps: float = 1e-3, shift: bool = True,
                   generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Returns ``(x (B, P + N) left-padded, number of forward calls)``."""
    x, am = prepare(input_ids, attention_mask, max_new_tokens, mask_id)
    B = x.shape[0]
    ts = torch.linspace(1, eps, steps + 1)
    calls = 0
    for i in range(steps):
        masked = x == mask_id
        logits = call_lm(model, x, am)
        calls += 1
        if shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        t, s = ts[i], ts[i + 1]
        last = i == steps - 1
        ml = logits[masked]  # (n, V), row-major order of the masked positions
        if alg == "origin":
            p_move = 1.0 if last else float(1 - s / t)
            move = torch.rand(ml.shape[0], generator=generator) < p_move
            new = torch.full((ml.shape[0],), mask_id, dtype=x.dtype)
            if bool(move.any()):
                new[move] = draw(ml[move], temperature, top_p, top_k, generator)[1]
            x[masked] = new
            continue
        probs, x0 = draw(ml, temperature, top_p, top_k, generator)
        if alg == "maskgit_plus":
            conf = probs.gather(-1, x0[:, None])[:, 0]
        elif alg == "topk_margin":
            top2 = torch.sort(probs, dim=-1, descending=True).values
            conf = top2[:, 0] - top2[:, 1]
        elif alg == "entropy":
            conf = (probs * torch.log(probs + 1e-10)).sum(-1)
        else:
            raise ValueError(alg)
        mean_masked = masked.sum() / B  # float32 tensor
        k = int(mean_masked) if last else int(mean_masked * (1 - s / t))
        if k <= 0:
            continue
        full = torch.full(x.shape, float("-inf"), dtype=logits.dtype)
        full[masked] = conf
        cand = torch.full(x.shape, mask_id, dtype=x.dtype)
        cand[masked] = x0
        for b in range(B):
            if alg_temp is None or alg_temp == 0:
                idx = torch.topk(full[b], k).indices
            else:
                w = torch.softmax(full[b] / alg_temp, dim=-1)
                idx = torch.multinomial(w, k, replacement=False, generator=generator)
            x[b, idx] = cand[b, idx]
    return x, calls
