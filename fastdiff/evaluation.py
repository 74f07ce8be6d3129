"""``fastdiff eval``: sample from a checkpoint and score the text.

* generative perplexity under the small causal LM that ships beside the diffusion checkpoints
  (``assets/causal_lm``, trained on the same corpus and tokenizer; MDLM / SEDD report the same metric
  under GPT-2 Large — ours is far smaller, so compare figures only within fastdiff);
* distinct-n (Li et al. 2016) for diversity;
* attribute accuracy under the shipped classifier (``assets/classifier``) for label-conditioned
  checkpoints: one batch per label, accuracy = how often the classifier recovers the asked label;
* BLEU (Papineni et al. 2002) on the word-ordering task's validation pairs for text-to-text checkpoints.

The same scores of real validation text and of uniformly random tokens are reported beside them as the
two ends of the scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _checks, metrics
from .errors import InputError

__all__ = ["encode_texts", "evaluate", "load_scorer", "score_texts"]


def load_scorer(name_or_path: str = "causal_lm"):
    """A bundled (``causal_lm``, ``classifier``) or saved auxiliary model, in eval mode."""
    from .pipeline import resolve_checkpoint
    from .training import load_checkpoint

    return load_checkpoint(resolve_checkpoint(name_or_path)).model.eval()


def encode_texts(texts: list[str], tokenizer, length: int) -> torch.Tensor:
    """``(N, length)`` token ids, truncated or padded with PAD."""
    from .data import datasets

    return datasets.pad(tokenizer.encode_batch(list(texts)), length, tokenizer.pad_id)


def score_texts(texts: list[str], tokenizer, *, lm=None, length: int = 64) -> dict:
    """Generative perplexity (when ``lm`` is given) and distinct-1/2/3 of ``texts``."""
    out = {f"distinct_{n}": metrics.distinct_n(texts, n) for n in (1, 2, 3)}
    if lm is not None:
        toks = encode_texts(texts, tokenizer, length)
        with torch.inference_mode():
            out["gen_ppl"] = metrics.generative_perplexity(lm, toks, pad_id=tokenizer.pad_id)
    return out


def evaluate(td, *, samples: int = 64, steps: int = 64, strategy: str | None = None, seed: int = 0,
             guidance: float = 1.0, batch_size: int | None = None, lm=None, classifier=None,
             reference_texts: list[str] | None = None, word_order_pairs: list[tuple[str, str]] | None = None,
             print_fn: Callable[[str], None] = print, **options) -> dict:
    """Sample ``samples`` texts from ``td`` (a :class:`fastdiff.pipeline.TextDiffusion`) and score them.

    Returns a dict with ``samples`` (the scores of generated text), ``reference`` (the same scores of
    ``reference_texts``), and, when applicable, ``attribute`` (per-label and mean accuracy) and ``bleu``.
    """
    samples = _checks.positive_int("samples", samples)
    result: dict = {"checkpoint": td.describe(), "settings": {"samples": samples, "steps": steps, "seed": seed,
                                                             "strategy": strategy or td.default_strategy(),
                                                             "guidance": guidance}}
    L = td.seq_len
    kw = dict(steps=steps, strategy=strategy, seed=seed, batch_size=batch_size, **options)
    if td.task == "word_order":
        if not word_order_pairs:
            raise InputError("word_order_pairs: a text-to-text checkpoint is evaluated on (source, target) pairs")
        pairs = word_order_pairs[:samples]
        gen = td.generate(len(pairs), source=[s for s, _ in pairs], **kw)
        result["bleu"] = metrics.bleu(gen.texts, [t for _, t in pairs])
        result["bleu_source_as_output"] = metrics.bleu([s for s, _ in pairs], [t for _, t in pairs])
        result["samples"] = score_texts(gen.texts, td.tokenizer, lm=lm, length=L)
        result["examples"] = [{"source": s, "target": t, "output": o}
                              for (s, t), o in list(zip(pairs, gen.texts))[:5]]
        result["tokens_per_s"] = gen.stats["tokens_per_s"]
        print_fn(f"BLEU {result['bleu']:.2f} (the sorted source itself scores {result['bleu_source_as_output']:.2f})")
        return result

    gen = td.generate(samples, **kw)
    result["samples"] = score_texts(gen.texts, td.tokenizer, lm=lm, length=L)
    result["tokens_per_s"] = gen.stats["tokens_per_s"]
    result["examples"] = gen.texts[:5]
    if reference_texts:
        result["reference"] = score_texts(reference_texts[:samples], td.tokenizer, lm=lm, length=L)
    # the other end of the scale: uniformly random (non-special) tokens of the same length
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(4, td.tokenizer.vocab_size, (samples, L), generator=g)
    result["random_tokens"] = score_texts([td.tokenizer.decode(r.tolist()) for r in noise], td.tokenizer, lm=lm,
                                          length=L)
    if td.num_labels and classifier is not None:
        per: dict[str, float] = {}
        for idx, name in enumerate(td.label_names):
            g = td.generate(samples, label=name, guidance=guidance, **kw)
            toks = encode_texts(g.texts, td.tokenizer, L)
            with torch.inference_mode():
                per[name] = metrics.attribute_accuracy(classifier, toks, torch.full((len(g.texts),), idx))
        result["attribute"] = {"per_label": per, "mean": sum(per.values()) / len(per)}
    return result
