"""``fastdiff eval``: sample from a checkpoint and score the text.

* generative perplexity under the small causal LM that ships beside the diffusion checkpoints
  (``assets/causal_lm``, trained on the same corpus and tokenizer; MDLM / SEDD report the same metric
  under GPT-2 Large — ours is far smaller, so compare figures only within fastdiff);
* distinct-n (Li et al. 2016) for diversity;
* attribute accuracy under the shipped classifier (``assets/classifier``) for label-conditioned
  checkpoints: one batch per label, accuracy = how often the classifier recovers the asked label;
* BLEU (Papineni et al. 2002) on the word-ordering task's validation pairs for text-to-text checkpoints;
* how well the model fits held-out text (:func:`model_fit`): the cross-entropy and top-1 accuracy of its
  x0 prediction at corrupted positions for several corruption rates, beside the corpus unigram's
  cross-entropy at the same positions (a model that does not beat the unigram ignores its context, and
  its samples are bags of frequent tokens whatever the sampler does), and, for discrete models, the
  NELBO bound on the per-token negative log-likelihood (D3PM's VLB, Austin et al. 2021, eq. 5, estimated
  by stratified Monte Carlo over t).

The same scores of real validation text and of uniformly random tokens are reported beside them as the
two ends of the scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import _checks, metrics
from .errors import InputError

__all__ = ["FIT_RATES", "UNIGRAM_MARGIN", "encode_texts", "evaluate", "load_scorer", "model_fit", "score_texts",
           "unigram_log_probs"]

#: corruption rates at which :func:`model_fit` measures the x0 prediction (1.0: nothing visible)
FIT_RATES = (0.15, 0.5, 0.9, 1.0)
#: a model whose x0 cross-entropy is within this many nats of the unigram's at every rate below 1 is
#: "no better than unigram"
UNIGRAM_MARGIN = 0.05


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
    result["settings"].update(temperature=gen.stats.get("temperature"), top_p=gen.stats.get("top_p"),
                              top_k=options.get("top_k"))
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


def unigram_log_probs(tokens: torch.Tensor, vocab_size: int, exclude: tuple[int, ...] = (), smoothing: float = 0.5
                      ) -> torch.Tensor:
    """``(V,)`` float64 log-probabilities of the add-``smoothing`` unigram of ``tokens`` (the ids in
    ``exclude``, e.g. PAD and MASK, get probability 0)."""
    _checks.positive_int("vocab_size", vocab_size)
    counts = torch.bincount(tokens.reshape(-1).long().cpu(), minlength=vocab_size)[:vocab_size].double() + smoothing
    if exclude:
        counts[list(exclude)] = 0.0
    return (counts / counts.sum()).log()


def _corruption(process) -> torch.Tensor:
    """``(T,)`` float64: the corruption level of steps ``1..T``: ``1 - alpha_bar[t]`` (averaged over tokens
    for a per-token schedule) where the process has a schedule, else ``P(x_t != x_0)`` for a uniform
    ``x_0`` (the mean off-diagonal mass of ``Qbar_t``, e.g. a :class:`fastdiff.discrete.Dense` process)."""
    schedule = getattr(process, "schedule", None)
    if schedule is not None and getattr(schedule, "alpha_bar", None) is not None:
        ab = schedule.alpha_bar.double()
        return 1.0 - ab.reshape(ab.shape[0], -1).mean(-1)[1:]
    V = process.vocab_size
    x0 = torch.arange(V)
    return torch.stack([1.0 - process.q_probs(x0, t).double().diagonal().mean() for t in range(1, process.T + 1)])


def _step_for_rate(levels: torch.Tensor, rate: float) -> int:
    """The step ``t >= 1`` whose corruption level (:func:`_corruption`) is closest to ``rate``."""
    return 1 + int((levels - rate).abs().argmin())


@torch.no_grad()
def model_fit(model, process, tokens: torch.Tensor, *, unigram: torch.Tensor | None = None,
              rates: tuple[float, ...] = FIT_RATES, nelbo_samples: int = 8, batch_size: int = 64, seed: int = 0,
              embedding_table: torch.Tensor | None = None, **cond) -> dict:
    """How well ``model`` predicts held-out ``tokens: (N, L)``, unconditionally (``cond`` is passed on).

    For each rate ``r`` in ``rates``, at the step ``t_r`` where a token is corrupted with probability
    ``r`` (``1 - alpha_bar[t]``; for a process without a schedule, ``P(x_t != x_0)``): ``x_t ~ q(x_t | x_0)``, and over the positions the corruption changed (discrete) or all
    positions (continuous, where every vector is noised), the cross-entropy ``-log p_θ(x_0 | x_t)`` of the
    model's x0 prediction and its top-1 accuracy; with ``unigram`` (``(V,)`` log-probabilities,
    :func:`unigram_log_probs` of training text) the unigram's cross-entropy at the same positions.
    Discrete: the x0 distribution is ``process.x0_log_probs(logits)``; continuous: the rounding
    distribution ``softmax(x̂_0 · Eᵀ)`` over ``embedding_table`` (Diffusion-LM's ``p(w | x_0)``) and the
    nearest row for accuracy.

    Discrete processes also get the NELBO bound (nats per token; ``ppl_bound = exp(nelbo)``):
    ``L_T + Σ_t L_{t-1}``, the sum over t estimated by ``nelbo_samples`` stratified steps per sequence
    (:func:`fastdiff.discrete.vlb_terms` times T) plus :func:`fastdiff.discrete.prior_kl`.

    ``no_better_than_unigram`` (discrete, with ``unigram``): at every rate below 1 the model's
    cross-entropy is above the unigram's minus :data:`UNIGRAM_MARGIN`; a corrupted discrete position shows
    nothing of its token, so only use of the context can beat the unigram there. A noised vector still
    shows its token, so continuous models get the figures but no verdict.

    Returns ``{"family", "rates": {r: {"t", "ce", "accuracy", "unigram_ce", "positions"}}, "nelbo",
    "ppl_bound", "no_better_than_unigram"}`` (the keys that apply).
    """
    from . import continuous as _continuous
    from . import discrete as _discrete
    from . import ops as _ops

    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype != torch.long:
        raise InputError("tokens: expected (N, L) int64 token ids")
    batch_size = _checks.positive_int("batch_size", batch_size)
    nelbo_samples = _checks.positive_int("nelbo_samples", nelbo_samples)
    is_cont = isinstance(process, _continuous.GaussianDiffusion)
    if is_cont and embedding_table is None:
        raise InputError("embedding_table: a continuous model's x0 prediction is rounded against its embeddings")
    device = next((p.device for p in model.parameters()), torch.device("cpu")) \
        if hasattr(model, "parameters") else torch.device("cpu")
    g = torch.Generator(device="cpu").manual_seed(seed)
    T = process.T
    out: dict = {"family": "continuous" if is_cont else "discrete", "rates": {}}
    table = embedding_table.float() if is_cont else None
    levels = _corruption(process)
    for rate in rates:
        t_r = _step_for_rate(levels, float(rate))
        ce_sum = acc_sum = uni_sum = 0.0
        count = 0
        for lo in range(0, tokens.shape[0], batch_size):
            x0 = tokens[lo:lo + batch_size].to(device)
            B = x0.shape[0]
            t = torch.full((B,), t_r, dtype=torch.long, device=device)
            if is_cont:
                e0 = model.embedding(x0)
                noise = torch.randn(e0.shape, generator=g).to(device=device, dtype=e0.dtype)
                x_t = process.q_sample(e0, t, noise=noise)
                x0_hat = process.to_x0(model(x_t, t, **cond).float(), x_t, t)
                where = torch.ones_like(x0, dtype=torch.bool)
                nll = _ops.rounding_loss(x0_hat.reshape(-1, x0_hat.shape[-1]), table, x0.reshape(-1),
                                         reduction="none").reshape(x0.shape)
                pred = _ops.nearest_embedding(x0_hat, table)[0]
            else:
                x_t = process.q_sample(x0, t, generator=g).to(device)
                where = x_t != x0
                logp = process.x0_log_probs(model(x_t, t, **cond).float())
                nll = -logp.gather(-1, x0[..., None])[..., 0]
                pred = logp.argmax(-1)
            ce_sum += float(nll[where].double().sum())
            acc_sum += float((pred == x0)[where].double().sum())
            if unigram is not None:
                uni_sum += float(-unigram.to(device)[x0[where]].double().sum())
            count += int(where.sum())
        row = {"t": t_r, "positions": count, "ce": ce_sum / max(count, 1), "accuracy": acc_sum / max(count, 1)}
        if unigram is not None:
            row["unigram_ce"] = uni_sum / max(count, 1)
        out["rates"][float(rate)] = row
    if unigram is not None and not is_cont:
        # a corrupted discrete position shows nothing of its token: only the context can beat the unigram
        # (a noised vector still shows its token, so continuous models get no such verdict)
        partial = [r for k, r in out["rates"].items() if k < 1.0 and r["positions"]] or list(out["rates"].values())
        out["no_better_than_unigram"] = all(r["ce"] > r["unigram_ce"] - UNIGRAM_MARGIN for r in partial)
    if not is_cont:
        total = 0.0
        K = nelbo_samples
        for lo in range(0, tokens.shape[0], batch_size):
            x0 = tokens[lo:lo + batch_size].to(device)
            B, L = x0.shape
            seq = _discrete.prior_kl(process, x0).double().sum(-1)  # L_T
            u = torch.rand(B, K, generator=g, dtype=torch.float64)
            strata = ((torch.arange(K, dtype=torch.float64) + u) / K * T).floor().long().clamp(0, T - 1) + 1
            for k in range(K):
                t = strata[:, k].to(device)
                x_t = process.q_sample(x0, t, generator=g).to(device)
                logits = model(x_t, t, **cond).float()
                seq = seq + (T / K) * _discrete.vlb_terms(process, x0, x_t, t, logits).double().sum(-1)
            total += float(seq.sum())
        nelbo = total / tokens.numel()
        out["nelbo"] = nelbo
        out["ppl_bound"] = math.exp(min(nelbo, 700.0))
    return out
