"""``fastdiff eval``: generative perplexity, distinct-n, attribute accuracy, BLEU of a checkpoint's samples
(:func:`fastdiff.evaluation.evaluate`), and the model's fit to held-out text
(:func:`fastdiff.evaluation.model_fit`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ._common import (
    _add_sampling,
    _check_backend,
    _check_device,
    _check_generator,
    _configure_threads,
    _device,
    _progress,
    _sampling_defaults,
    _sampling_options,
    _write_json,
    check_writable,
    non_negative_int,
    plan_batch,
    positive_int,
)

if TYPE_CHECKING:
    from ..data.corpus import Document
    from ..pipeline import TextDiffusion

HELP = ("generative perplexity, distinct-n, attribute accuracy, BLEU; the model's fit to held-out "
        "text (NELBO bound, x0 cross-entropy and accuracy against the unigram's)")


def add_arguments(e: argparse.ArgumentParser) -> None:
    """The ``eval`` options on ``e``."""
    _add_sampling(e)
    e.add_argument("--samples", type=positive_int, default=64, help="samples to generate and score")
    e.add_argument("--fit-rows", type=non_negative_int, default=256,
                   help="held-out chunks for the model-fit figures (0: skip them)")
    e.add_argument("--lm", default="causal_lm", help="scoring causal LM (bundled name or directory, or none)")
    e.add_argument("--classifier", default="classifier", help="attribute classifier (bundled, directory, none)")
    e.add_argument("--data", nargs="*", help="text files for the reference texts / pairs (default: Python docs)")
    e.add_argument("--json", help="write the scores as JSON (checked before the work, written atomically)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def command(args: argparse.Namespace) -> int:
    """Run ``fastdiff eval``; returns the exit status."""
    from .. import evaluation
    from ..pipeline import TextDiffusion

    from .generate import latent_checkpoint

    latent = latent_checkpoint(args.checkpoint)
    if latent is not None:
        return _eval_latent(args, latent)
    _configure_threads(args)
    device = _check_device(args.device)
    _check_backend(args.backend, _device(device))
    if args.label is not None:
        raise InputError("--label: eval scores every label of a label-conditioned checkpoint (one batch per label); "
                         "drop --label")
    if args.length is not None:
        raise InputError("--length: eval samples at the checkpoint's training length (the reference texts and the "
                         "scorers use it); drop --length")
    if args.json:
        check_writable(args.json, "--json")
    td = TextDiffusion.load(args.checkpoint, device=_device(device), backend=args.backend)
    _check_generator(td, args.checkpoint)
    _sampling_defaults(td, args)
    batch = plan_batch(td, td.device, num_samples=args.samples, length=td.seq_len, batch_size=args.batch_size,
                       steps=args.steps, guidance=args.guidance, samples_flag="--samples")
    lm = evaluation.load_scorer(args.lm) if args.lm != "none" else None
    clf = evaluation.load_scorer(args.classifier) if td.num_labels and args.classifier != "none" else None
    refs = pairs = None
    from ..data import corpus, datasets

    docs = corpus.load_texts(args.data) if args.data else corpus.python_docs()
    if td.task == "word_order":
        pairs = datasets.word_order_pairs(docs, "valid")
    else:
        refs = _reference_texts(docs, td, args.samples)
    res = evaluation.evaluate(td, samples=args.samples, steps=args.steps, strategy=args.strategy, seed=args.seed,
                              guidance=args.guidance, batch_size=batch, lm=lm, classifier=clf,
                              reference_texts=refs, word_order_pairs=pairs, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, progress=_progress(args),
                              print_fn=lambda line: None, **_sampling_options(args))
    if args.fit_rows and td.task != "word_order":
        res["fit"] = _model_fit(td, docs, args.fit_rows, args.seed)
    _print_eval(res)
    if args.json:
        _write_json(args.json, "--json", res)
        print(f"wrote {args.json}")
    return 0


def _reference_texts(docs: list[Document], td: TextDiffusion, n: int) -> list[str]:
    """``n`` validation chunks of the training length, decoded: what real text scores."""
    from ..data import datasets

    chunks = datasets.lm_chunks(docs, td.tokenizer, td.seq_len, "valid")
    return [td.tokenizer.decode(row.tolist()) for row in chunks[:n]]


def _model_fit(td: TextDiffusion, docs: list[Document], rows: int, seed: int) -> dict:
    """:func:`fastdiff.evaluation.model_fit` of ``td``'s model on ``rows`` held-out chunks, against the
    unigram of the training chunks (the corpus the checkpoint's figures are compared on)."""
    from .. import evaluation
    from ..data import datasets

    tok = td.tokenizer
    held_out = datasets.lm_chunks(docs, tok, td.seq_len, "valid")[:rows]
    train = datasets.lm_chunks(docs, tok, td.seq_len, "train")
    special = tuple(sorted({i for i in (tok.pad_id, tok.mask_id) if i is not None}))
    uni = evaluation.unigram_log_probs(train, tok.vocab_size, exclude=special)
    table = td.model.embedding_table() if td.continuous else None
    fit = evaluation.model_fit(td.model, td.process, held_out, unigram=uni, embedding_table=table, seed=seed)
    fit["rows"], fit["length"] = int(held_out.shape[0]), int(held_out.shape[1])
    return fit


def _print_fit(fit: dict) -> None:
    head = f"model fit on {fit['rows']} held-out chunks of {fit['length']} tokens"
    if "nelbo" in fit:
        head += f": NELBO {fit['nelbo']:.3f} nats/token (perplexity <= {fit['ppl_bound']:,.1f})"
    print(head)
    for rate, r in fit["rates"].items():
        uni = f", unigram {r['unigram_ce']:.3f}" if "unigram_ce" in r else ""
        level = f"1-alpha_bar {rate:.2f}" if fit.get("family") == "continuous" else f"{rate:.0%} corrupted"
        print(f"  {level} (t={r['t']}): x0 cross-entropy {r['ce']:.3f}{uni}, top-1 accuracy {r['accuracy']:.3f}")
    if fit.get("no_better_than_unigram"):
        print("warning: this model predicts corrupted tokens no better than the corpus unigram: it ignores its "
              "context, and its samples are bags of frequent tokens whatever the sampler does", file=sys.stderr)


def _print_eval(res: dict) -> None:
    s = res["samples"]
    line = " ".join(f"{k} {v:.3f}" for k, v in s.items())
    print(f"generated: {line}")
    if "reference" in res:
        print("real text: " + " ".join(f"{k} {v:.3f}" for k, v in res["reference"].items()))
    if "random_tokens" in res:
        print("random tokens: " + " ".join(f"{k} {v:.3f}" for k, v in res["random_tokens"].items()))
    if "attribute" in res:
        per = ", ".join(f"{k} {v:.3f}" for k, v in res["attribute"]["per_label"].items())
        print(f"attribute accuracy: mean {res['attribute']['mean']:.3f} ({per})")
    if "bleu" in res:
        base = res.get("bleu_source_as_output")
        print(f"BLEU {res['bleu']:.2f}"
              + (f" (the sorted source itself scores {base:.2f})" if base is not None else ""))
    print(f"sampling: {res['tokens_per_s']:,.0f} tokens/s")
    if "fit" in res:
        _print_fit(res["fit"])


def _eval_latent(args: argparse.Namespace, path: Path) -> int:
    """``fastdiff eval -c <latent checkpoint>``: the scores :func:`fastdiff.evaluation.evaluate` gives the
    other families (the generated texts re-encoded with the scorers' tokenizer, the bundled one), and, in
    place of the model fit, the autoencoder's round trip on ``--fit-rows`` held-out chunks (exact match,
    token accuracy, greedy decoding)."""
    import time

    import torch

    from .. import evaluation, metrics
    from ..data import corpus, datasets, default_tokenizer
    from ..latent import latent_data, reconstruction_scores
    from .generate import LATENT_UNSUPPORTED, latent_unsupported, load_latent

    latent_unsupported(args, LATENT_UNSUPPORTED)
    if args.label is not None:
        raise InputError("--label: eval scores every label of a label-conditioned checkpoint; drop --label")
    model, strategy = load_latent(args, path, args.json, "--json")
    steps = args.steps or 64
    if steps > model.diffusion.T:
        raise InputError(f"--steps: at most the checkpoint's T = {model.diffusion.T}, got {steps}")
    lm = evaluation.load_scorer(args.lm) if args.lm != "none" else None
    clf = evaluation.load_scorer(args.classifier) if model.num_labels and args.classifier != "none" else None
    tok = default_tokenizer()  # the scorers' tokenizer
    L = model.seq_len
    docs = corpus.load_texts(args.data) if args.data else corpus.python_docs()
    kw = dict(steps=steps, strategy=strategy, eta=args.eta or 0.0, seed=args.seed % 2**63)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("plm", model.plm.model), ("autoencoder", model.autoencoder), ("denoiser", model.denoiser))}
    res: dict = {"checkpoint": {"family": "latent", "latents": [model.autoencoder.config["n_latents"],
                                                                model.autoencoder.config["d_latent"]],
                                "seq_len": L, "params": params, "labels": model.label_names,
                                "schedule": list(model.schedule), "step": model.extra.get("diffusion_steps")},
                 "settings": {"samples": args.samples, "steps": steps, "seed": args.seed, "strategy": strategy,
                              "guidance": args.guidance, "decoding": "greedy"}}
    def score(texts: list[str]) -> dict:
        try:
            return evaluation.score_texts(texts, tok, lm=lm, length=L)
        except InputError:  # nothing the LM can score (every text empty): report the rest
            return {**evaluation.score_texts(texts, tok, length=L), "gen_ppl": None}

    start = time.perf_counter()
    texts = model.generate(args.samples, **kw)
    elapsed = time.perf_counter() - start
    res["samples"] = score(texts)
    res["tokens_per_s"] = args.samples * L / elapsed
    res["examples"] = texts[:5]
    chunks = datasets.lm_chunks(docs, tok, L, "valid")
    res["reference"] = score([tok.decode(r.tolist()) for r in chunks[:args.samples]])
    g = torch.Generator().manual_seed(args.seed % 2**63)
    noise = torch.randint(4, tok.vocab_size, (args.samples, L), generator=g)
    res["random_tokens"] = score([tok.decode(r.tolist()) for r in noise])
    if clf is not None:
        per = {}
        for idx, name in enumerate(model.label_names):
            got = model.generate(args.samples, labels=name, guidance=args.guidance, **kw)
            with torch.inference_mode():
                per[name] = metrics.attribute_accuracy(clf, evaluation.encode_texts(got, tok, L),
                                                       torch.full((len(got),), idx))
        res["attribute"] = {"per_label": per, "mean": sum(per.values()) / len(per)}
    if args.fit_rows:
        task = "attribute" if model.num_labels else "lm"
        held_out = latent_data(docs, model.plm, L, task, "valid")[0][:args.fit_rows]
        res["reconstruction"] = reconstruction_scores(model, held_out)
    print("generated: " + " ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in res["samples"].items()))
    for key, name in (("reference", "real text"), ("random_tokens", "random tokens")):
        print(f"{name}: " + " ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in res[key].items()))
    if "attribute" in res:
        per = ", ".join(f"{k} {v:.3f}" for k, v in res["attribute"]["per_label"].items())
        print(f"attribute accuracy: mean {res['attribute']['mean']:.3f} ({per})")
    print(f"sampling: {res['tokens_per_s']:,.0f} tokens/s")
    if "reconstruction" in res:
        r = res["reconstruction"]
        print(f"autoencoder round trip on {r['rows']} held-out chunks: exact match {r['exact_match']:.3f}, "
              f"token accuracy {r['token_accuracy']:.3f}")
    if args.json:
        _write_json(args.json, "--json", res)
        print(f"wrote {args.json}")
    return 0
