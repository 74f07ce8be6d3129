"""Per-step token choice of the confidence-based decoders (LLaDA, Fast-dLLM, Dream), on candidate rows.

The decoders look at the x0 logits of *candidate* positions only (the masked positions they may decide
this step), gathered as ``(M, V)`` rows with their batch row ``rows (M,)`` and column ``cols (M,)``. Each
function here returns per-candidate values; :func:`select_top` / :func:`select_threshold` /
:func:`select_factor` turn confidences into the positions decided this step.

Randomness: every draw is keyed by the counter-based generator of :mod:`fastdiff.random` with the run's
seed, one offset per draw and counter rows numbered by batch row, so a row's draws never depend on the
other rows of the batch.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from .. import random as _random
from ..errors import InputError
from ..ops._common import ALL_NEGINF_MSG, NAN_MSG, POSINF_MSG
from ..ops.select_tokens import kernel_backend
from ..ops.sample_categorical import filter_weights


def check_values(lg: torch.Tensor) -> None:
    """NaN / +inf / an all -inf row in the candidate logits: a clear error, never a silent draw."""
    if not lg.numel():
        return
    m = lg.amax(-1)
    top = m.max()
    if bool(torch.isnan(top)) or bool(torch.isnan(lg).any()):
        raise InputError("model output: the logits contain NaN")
    if bool(torch.isposinf(top)):
        raise InputError("model output: the logits contain +inf")
    if bool(torch.isneginf(m).any()):
        raise InputError("model output: a position has every logit at -inf (no token can be drawn)")


_VALUE_MESSAGES = {
    f"logits: {NAN_MSG}": "model output: the logits contain NaN",
    f"logits: {POSINF_MSG}": "model output: the logits contain +inf",
    f"logits: {ALL_NEGINF_MSG}": "model output: a position has every logit at -inf (no token can be drawn)",
}


def fused_step(logits: torch.Tensor, cand: torch.Tensor, *, backend: str, **kw: object
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fastdiff.ops.select_tokens` on the step's window (``logits (B, W, V)``, candidates ``cand
    (B, W)``), its value errors worded as :func:`check_values` words them."""
    try:
        return ops.select_tokens(logits, cand, backend=kernel_backend(backend, logits.device), **kw)
    except InputError as e:
        if str(e) in _VALUE_MESSAGES:
            raise InputError(_VALUE_MESSAGES[str(e)]) from None
        raise


def rank_counters(cand: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, W)`` int64 Philox counter rows of :func:`draw`'s keying: the ``j``-th candidate of batch row
    ``b`` (in position order) draws with counter row ``b·width + j`` (values off candidates unused)."""
    B = cand.shape[0]
    rank = (cand.cumsum(1) - 1).clamp_min(0)
    return torch.arange(B, device=cand.device, dtype=torch.int64)[:, None] * width + rank


def row_spans(rows: torch.Tensor, B: int) -> list[tuple[int, int]]:
    """``[(lo, hi))`` of each batch row in ``rows`` (sorted, as ``nonzero`` returns them)."""
    counts = torch.bincount(rows, minlength=B).tolist()
    spans, lo = [], 0
    for c in counts:
        spans.append((lo, lo + c))
        lo += c
    return spans


def uniforms(rows: torch.Tensor, cols: torch.Tensor, width: int, seed: int, offset: int) -> torch.Tensor:
    """float64 uniforms, one per candidate, keyed by counter row ``row·width + col`` (so a candidate's
    uniform depends on its own position only)."""
    if not rows.numel():
        return torch.empty(0, dtype=torch.float64, device=rows.device)
    u = _random.uniform((int(rows.max()) + 1, width), seed=seed, offset=offset, device=rows.device)
    return u[rows, cols]


def draw(lg: torch.Tensor, rows: torch.Tensor, spans: list[tuple[int, int]], *, seed: int, offset: int,
         temperature: float, top_k: int | None, top_p: float | None, width: int, backend: str) -> torch.Tensor:
    """One token per candidate row: the argmax at ``temperature == 0`` (first index among ties), else a
    draw from ``softmax(filter(lg) / temperature)`` (:func:`fastdiff.ops.sample_categorical`), the
    candidates of batch row ``b`` drawn with counter rows from ``b·width``."""
    if temperature == 0:
        return lg.argmax(-1)
    out = torch.empty(lg.shape[0], dtype=torch.int64, device=lg.device)
    for b, (lo, hi) in enumerate(spans):
        if hi > lo:
            out[lo:hi] = ops.sample_categorical(lg[lo:hi], seed=seed, offset=offset, row_offset=b * width,
                                                temperature=temperature, top_k=top_k, top_p=top_p, backend=backend)
    return out


def log_prob_of(lg: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``log softmax(lg)[x0]`` per row, float32."""
    z = lg.float()
    return z.gather(-1, x0[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


def dream_probs(lg: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Dream's ``sample_tokens`` distribution: logits divided by the temperature (when > 0), then top-p and
    top-k filtered, softmax (float32)."""
    z = lg.float()
    if temperature > 0:
        z = z / temperature
    if top_k is not None or (top_p is not None and top_p < 1):
        w = filter_weights(z.double(), top_k, top_p if (top_p is not None and top_p < 1) else None)
        return (w / w.sum(-1, keepdim=True)).float()
    return torch.softmax(z, -1)


def dream_confidence(probs: torch.Tensor, x0: torch.Tensor, temperature: float, alg: str) -> torch.Tensor:
    """Dream's confidence of each candidate: ``maskgit_plus`` the probability of the chosen token (the
    maximum when greedy), ``topk_margin`` top-1 minus top-2 probability, ``entropy`` the negative entropy
    ``sum p log(p + 1e-10)``."""
    if alg == "topk_margin":
        top2 = probs.topk(min(2, probs.shape[-1]), -1).values
        return top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    if alg == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    return probs.gather(-1, x0[:, None]).squeeze(-1)


def dense(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, B: int, W: int,
          fill: float = float("-inf")) -> torch.Tensor:
    out = torch.full((B, W), fill, dtype=values.dtype, device=values.device)
    out[rows, cols] = values
    return out


def select_top(conf: torch.Tensor, cand: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``k[b]`` most confident candidates of each row (``conf (B, W)``, ``-inf`` off candidates); ties
    go to the lower position."""
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return cand & (rank < k[:, None])


def select_threshold(conf: torch.Tensor, cand: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM: every candidate with confidence ``>= threshold``, and always the most confident one."""
    sel = cand & (conf >= threshold)
    has = cand.any(1)
    best = conf.argmax(1)
    sel[has, best[has]] = True
    return sel


def select_factor(conf: torch.Tensor, cand: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule (``get_transfer_index_dynamic``): with the row's ``n`` candidate confidences
    sorted, ``c_0 >= c_1 >= ...``, the count is the first ``i`` with ``c_i < 1 - factor / (i + 2)`` (``c_0``
    always passes); when no candidate fails, or only the last one, the count is ``n`` (its published code
    takes every candidate then, the failing last one included)."""
    B, W = conf.shape
    n = cand.sum(1)
    c = torch.sort(conf, dim=1, descending=True).values.double()
    i = torch.arange(W, device=conf.device, dtype=torch.float64)
    th = 1.0 - factor / (i + 2.0)
    th[0] = -1.0
    fails = (c < th[None, :]) & (torch.arange(W, device=conf.device)[None, :] < n[:, None])
    any_fail = fails.any(1)
    first = torch.where(any_fail, fails.to(torch.int8).argmax(1), n - 1)
    count = torch.where((first == 0) | (first == n - 1), first + 1, first)
    count = torch.where(n > 0, count, torch.zeros_like(count))
    return select_top(conf, cand, count)


def gumbel_top(conf: torch.Tensor, cand: torch.Tensor, k: torch.Tensor, alg_temp: float, u: torch.Tensor
               ) -> torch.Tensor:
    """Dream's ``alg_temp > 0``: ``k`` positions drawn without replacement with probabilities
    ``softmax(conf / alg_temp)`` over the candidates, by Gumbel-top-k (the same law as sequential
    multinomial draws without replacement; Vieira 2014, Kool et al. 2019). ``u (B, W)`` uniforms."""
    g = -torch.log(-torch.log(u))
    keys = torch.where(cand, conf.double() / alg_temp + g, torch.full_like(g, float("-inf")))
    return select_top(keys, cand, k)


def num_transfer(n: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: ``n`` masked tokens over ``steps`` steps, the remainder to the
    first steps, ``(B, steps)`` int64."""
    base = torch.div(n, steps, rounding_mode="floor")
    rem = n - base * steps
    return base[:, None] + (torch.arange(steps, device=n.device)[None, :] < rem[:, None]).to(torch.int64)


def dream_count(mean_masked: torch.Tensor, s: torch.Tensor, t: torch.Tensor, last: bool) -> int:
    """Dream's tokens per step: ``int(mean masked count · (1 - s/t))`` in float32 (all of them at the
    last step), as its ``_sample`` computes it."""
    if last:
        return int(mean_masked)
    return int(mean_masked * (1 - s / t))


def check_finite_prob(p: float, name: str) -> None:
    if not math.isfinite(p):
        raise InputError(f"{name}: not finite")
