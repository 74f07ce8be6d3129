"""Text-generation metrics: distinct-n, corpus BLEU, generative perplexity, attribute accuracy.

* :func:`distinct_n`: Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models": distinct n-grams / total n-grams over the whole set.
* :func:`bleu`: Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine Translation":
  corpus BLEU with clipped n-gram counts pooled over the corpus.
* :func:`generative_perplexity`: perplexity of samples under a causal LM (as in Diffusion-LM / SED / MDLM
  evaluations).
* :func:`attribute_accuracy`: accuracy of a classifier on generated text for label-conditional tasks.

Imports nothing above :mod:`fastdiff.sampling` (no models, no training).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch

from . import _checks
from .errors import InputError, InputTypeError

__all__ = ["attribute_accuracy", "bleu", "distinct_n", "generative_perplexity", "ngram_counts"]


def ngram_counts(tokens: Sequence[object], n: int) -> Counter:
    """Counter of the ``n``-grams (tuples) of one token sequence."""
    return Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))


def _sequences(name: str, texts: object) -> list[list[object]]:
    if isinstance(texts, torch.Tensor):
        if texts.ndim != 2:
            raise InputError(f"{name}: a tensor must have shape (N, L), got {tuple(texts.shape)}")
        texts = list(texts)
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputTypeError(f"{name}: expected a list of strings or of token-id lists, got {type(texts).__name__}")
    if not texts:
        raise InputError(f"{name}: empty")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            out.append(t.split())
        elif isinstance(t, torch.Tensor):
            out.append(t.reshape(-1).tolist())
        elif isinstance(t, Sequence):
            out.append(list(t))
        else:
            raise InputTypeError(f"{name}[{i}]: expected a str or a sequence of token ids, got {type(t).__name__}")
    return out


def distinct_n(texts: Sequence[str] | Sequence[Sequence[int]], n: int) -> float:
    """distinct-n = |distinct n-grams| / |n-grams| over the whole set (Li et al. 2016).

    ``texts``: strings (split on whitespace), token-id lists / 1-D tensors, or one ``(N, L)`` tensor (rows).
    n-grams never cross texts. Returns 0.0 when no text has ``n`` tokens.
    """
    seqs = _sequences("texts", texts)
    _checks.positive_int("n", n)
    distinct: set[tuple[object, ...]] = set()
    total = 0
    for s in seqs:
        grams = [tuple(s[i: i + n]) for i in range(len(s) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct) / total if total else 0.0


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], max_n: int = 4,
         smooth: bool = False) -> float:
    """Corpus BLEU in [0, 100] (Papineni et al. 2002), whitespace tokenisation, case-sensitive.

    ``BLEU = BP * exp(mean_{n=1..max_n} log p_n)`` where ``p_n = sum_h sum_g min(c_h(g), max_r c_r(g)) /
    sum_h sum_g c_h(g)`` pools the clipped n-gram counts of all hypotheses, and the brevity penalty
    ``BP = 1 if c > r else exp(1 - r / c)`` compares the total hypothesis length ``c`` with ``r``, the sum of
    each hypothesis' closest reference length (the shorter on a tie). Without smoothing BLEU is 0 when some
    ``p_n`` is 0; ``smooth=True`` adds 1 to the numerator and denominator of ``p_n`` for ``n >= 2`` (Lin &
    Och 2004, "BLEU+1").

    Parameters
    ----------
    hypotheses : list of str
    references : list of str, or list of lists of str
        ``references[i]`` is the reference (a str) or the references (a list of str) of ``hypotheses[i]``.
    """
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise InputTypeError(f"hypotheses: expected a list of strings, got {type(hypotheses).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise InputTypeError("references: expected a list of strings or of lists of strings, "
                        f"got {type(references).__name__}")
    if not hypotheses:
        raise InputError("hypotheses: empty")
    if len(references) != len(hypotheses):
        raise InputError(f"references: {len(references)} entries for {len(hypotheses)} hypotheses")
    _checks.positive_int("max_n", max_n)
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if not isinstance(hyp, str):
            raise InputTypeError(f"hypotheses[{i}]: expected a str, got {type(hyp).__name__}")
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, Sequence) or not refs or not all(isinstance(r, str) for r in refs):
            raise InputTypeError(f"references[{i}]: expected a str or a non-empty list of str")
        h = hyp.split()
        rs = [r.split() for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = ngram_counts(h, n)
            best: Counter = Counter()
            for r in rs:
                best |= ngram_counts(r, n)  # elementwise max over references
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0:
        return 0.0
    log_p = 0.0
    for n in range(max_n):
        num, den = matches[n], totals[n]
        if smooth and n >= 1:
            num, den = num + 1, den + 1
        if num == 0:
            return 0.0
        log_p += math.log(num / den) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return 100.0 * bp * math.exp(log_p)


def _device_of(model: Callable) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return None


@contextlib.contextmanager
def _evaluating(model: Callable) -> Iterator[torch.device | None]:
    """An ``nn.Module`` in eval mode for the block (its mode restored after); yields its device."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield _device_of(model)
    finally:
        if was_training:
            model.train()


def _row_batches(tokens: torch.Tensor, batch_size: int, device: torch.device | None) -> Iterator[torch.Tensor]:
    """Consecutive ``batch_size``-row slices of ``tokens`` as int64 on ``device``."""
    for start in range(0, tokens.shape[0], batch_size):
        x = tokens[start: start + batch_size].long()
        yield x if device is None else x.to(device)


@torch.no_grad()
def generative_perplexity(lm: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                          pad_id: int | None = None, batch_size: int = 64) -> float:
    """Perplexity of ``tokens`` under a causal LM: ``exp(mean NLL per predicted token)``.

    ``lm(tokens (B, L)) -> logits (B, L, V)`` where ``logits[:, i]`` predicts token ``i + 1`` from tokens
    ``<= i``. Every token but the first of each row is predicted; targets equal to ``pad_id`` are excluded.
    The NLL is accumulated in float64. An ``nn.Module`` is put in eval mode for the call (and restored) and
    gets the tokens on its device.

    Parameters
    ----------
    tokens : LongTensor ``(N, L)``, ``L >= 2``
    """
    _checks.integer("tokens", tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise InputError(f"tokens: expected shape (N, L) with L >= 2, got {tuple(tokens.shape)}")
    _checks.positive_int("batch_size", batch_size)
    if pad_id is not None:
        _checks.positive_int("pad_id", pad_id, 0)
    total_nll = 0.0
    count = 0
    with _evaluating(lm) as device:
        for x in _row_batches(tokens, batch_size, device):
            logits = lm(x)
            if not isinstance(logits, torch.Tensor) or logits.shape[:2] != x.shape or logits.ndim != 3:
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise InputError(f"lm: expected logits of shape ({x.shape[0]}, {x.shape[1]}, V), got {got}")
            if int(x.max()) >= logits.shape[-1] or int(x.min()) < 0:
                raise InputError(f"tokens: ids must lie in [0, {logits.shape[-1]}) (the LM's vocabulary), got "
                                 f"[{int(x.min())}, {int(x.max())}]")
            logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            target = x[:, 1:]
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            keep = torch.ones_like(target, dtype=torch.bool) if pad_id is None else target != pad_id
            total_nll += float(nll[keep].sum())
            count += int(keep.sum())
    if count == 0:
        raise InputError("tokens: no token to predict (every target is padding)")
    return math.exp(total_nll / count)


@torch.no_grad()
def attribute_accuracy(classifier: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                       labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of rows whose ``argmax classifier(tokens)`` equals ``labels``.

    ``classifier(tokens (B, L)) -> logits (B, C)``; ``labels``: ``(N,)`` ints. An ``nn.Module`` runs in eval
    mode (restored afterwards) on its own device.
    """
    _checks.integer("tokens", tokens)
    _checks.integer("labels", labels)
    if tokens.ndim != 2:
        raise InputError(f"tokens: expected shape (N, L), got {tuple(tokens.shape)}")
    if labels.shape != tokens.shape[:1]:
        raise InputError(f"labels: expected shape ({tokens.shape[0]},) (one per row of tokens), "
                         f"got {tuple(labels.shape)}")
    if tokens.shape[0] == 0:
        raise InputError("tokens: no rows")
    _checks.positive_int("batch_size", batch_size)
    correct = done = 0
    with _evaluating(classifier) as device:
        for x in _row_batches(tokens, batch_size, device):
            logits = classifier(x)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise InputError(f"classifier: expected logits of shape ({x.shape[0]}, C), got {got}")
            pred = logits.argmax(-1).cpu()
            correct += int((pred == labels[done: done + x.shape[0]].cpu().long()).sum())
            done += x.shape[0]
    return correct / tokens.shape[0]
