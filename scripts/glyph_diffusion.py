"""GlyphDiffusion (Li et al. 2023) on the bundled corpus: train, sample, evaluate.

    # train (CPU, one thread): 2 lines x 32 characters, label-conditioned on the source (attribute task)
    nice -n 19 python scripts/glyph_diffusion.py train --out runs/glyph --minutes 39   # 8061 updates here
    # sample: recognised text, and the images as ASCII art
    python scripts/glyph_diffusion.py sample -c runs/glyph/last.pt -n 4 --label library --show
    # the recogniser's character accuracy vs Gaussian pixel noise
    python scripts/glyph_diffusion.py noise
    # evaluate: gen-PPL (bundled causal LM), distinct-n, real words, legibility, attribute accuracy
    python scripts/glyph_diffusion.py eval -c runs/glyph/last.pt --json benchmarks/results/eval-glyph.json
    # text-to-text (the paper's source conditioning): word-order restoration of 64-character chunks
    nice -n 10 python scripts/glyph_diffusion.py train-t2t --out runs/glyph-t2t --minutes 20 --base 8
    python scripts/glyph_diffusion.py eval-t2t -c runs/glyph-t2t/last.pt --label-checkpoint runs/glyph/last.pt \
        --json benchmarks/results/eval-glyph-t2t.json

``eval`` scores the recognised text the way ``fastdiff eval`` scores the other families (same causal LM,
classifier, tokenizer, distinct-n), beside real validation chunks and random characters of the same length.
A generated image has no ground-truth text, so there is no recognition accuracy to report for it;
``legibility`` instead says how far each generated cell is from its nearest glyph.

``train-t2t`` / ``eval-t2t``: source-conditioned GlyphDiffusion on word-order restoration
(:func:`fastdiff.glyph.shuffle_pairs`: source = a chunk's words in a seeded random order, target = the
chunk). ``eval-t2t`` reads the generated images back and scores them against the targets (character
accuracy by position, exact match, BLEU) beside baselines scored the same way: the source copied
(identity), the same model without its source, the label model's unconditional samples, random characters.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdiff import evaluation, metrics  # noqa: E402
from fastdiff.errors import InputError  # noqa: E402
from fastdiff.data import default_tokenizer, python_docs  # noqa: E402
from fastdiff.glyph import (CHARSET, GlyphDiffusion, Layout, cell_distances, char_chunks, recognise,  # noqa: E402
                            render, shuffle_pairs, train)

WORD = re.compile(r"[A-Za-z]+")


def _corpus(length: int, balance: bool) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor]:
    docs = python_docs()
    tr, trl = char_chunks(docs, length, "train", balance=balance)
    va, val = char_chunks(docs, length, "valid", balance=True)
    return tr, trl, va, val


def _build_and_train(a: argparse.Namespace, layout: Layout, texts: list[str], intro: str, **kw: object) -> None:
    """Build the model of ``a``'s options (``kw``: its conditioning, label names or source length, plus the
    training call's labels or sources), write ``command.txt`` and train it into ``a.out``."""
    build = {k: kw.pop(k) for k in ("label_names", "source_len") if k in kw}
    model = GlyphDiffusion.build(layout, schedule=a.schedule, T=a.T, parameterization=a.param, scale=a.scale,
                                 base=a.base, width=a.width, depth=a.depth, heads=a.heads, **build)
    n = sum(p.numel() for p in model.net.parameters())
    print(f"{intro}, {n} parameters", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(" ".join(sys.argv) + "\n")
    train(model, texts, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, cond_drop=a.cond_drop,
          seed=a.seed, out_dir=out, save_every=a.save_every, log_every=a.log_every, max_seconds=a.minutes * 60,
          print_fn=lambda s: print(s, flush=True), **kw)


def cmd_train(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    layout = Layout(cols=a.cols, rows=a.rows)
    tr, trl, _, _ = _corpus(layout.capacity, a.balance)
    _build_and_train(a, layout, tr, f"{len(tr)} training chunks ({trl.bincount().tolist()} per label)",
                     label_names=["reference", "library"], labels=trl)


def cmd_train_t2t(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    layout = Layout(cols=a.cols, rows=a.rows)
    tr, _, _, _ = _corpus(layout.capacity, a.balance)
    pairs = shuffle_pairs(tr, seed=a.seed)
    _build_and_train(a, layout, [t for _, t in pairs], f"{len(pairs)} training pairs; e.g. {pairs[0]!r}",
                     source_len=layout.capacity, sources=[s for s, _ in pairs])


def t2t_scores(hyps: list[str], targets: list[str]) -> dict:
    """Text-to-text figures of ``hyps`` against ``targets``: ``char_accuracy`` (same character at the same
    position, over the targets' length; a missing character counts wrong), ``exact_match`` (after stripping
    trailing spaces), ``bleu`` (:func:`fastdiff.metrics.bleu`, corpus BLEU-4, smoothed, whitespace words)
    and ``bag_of_words`` (the share of target words, as a multiset, that the hypothesis contains)."""
    right = sum(sum(a == b for a, b in zip(h, t)) for h, t in zip(hyps, targets))
    bag = sum(sum((Counter(h.split()) & Counter(t.split())).values()) for h, t in zip(hyps, targets))
    return {"char_accuracy": right / max(1, sum(map(len, targets))),
            "exact_match": sum(h.rstrip() == t.rstrip() for h, t in zip(hyps, targets)) / max(1, len(targets)),
            "bleu": metrics.bleu([h if h.strip() else "-" for h in hyps], targets, smooth=True),
            "bag_of_words": bag / max(1, sum(len(t.split()) for t in targets))}


def cmd_eval_t2t(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    model = GlyphDiffusion.load(a.checkpoint)
    if not model.net.source_len:
        raise SystemExit(f"eval-t2t: {a.checkpoint} has no source conditioning (train it with train-t2t)")
    cap = model.layout.capacity
    _, _, va, _ = _corpus(cap, True)
    va = va[:: max(1, len(va) // a.samples)][: a.samples]
    pairs = shuffle_pairs(va, seed=a.seed + 1)
    sources, targets = [s for s, _ in pairs], [t for _, t in pairs]
    settings = {"samples": len(pairs), "steps": a.steps, "strategy": a.strategy, "guidance": a.guidance,
                "snap": a.snap, "seed": a.seed, "task": "word-order restoration of valid-split chunks, "
                "source = shuffle_pairs(chunks, seed + 1)"}
    result: dict = {"checkpoint": {"family": "glyph", "path": str(a.checkpoint), "layout": [model.layout.rows,
                                   model.layout.cols], "net": model.net.config, "scale": model.scale,
                                   "schedule": list(model.schedule),
                                   "parameterization": model.diffusion.parameterization,
                                   "params": sum(p.numel() for p in model.net.parameters()),
                                   "step": getattr(model, "extra", {}).get("step")},
                    "settings": settings}
    kw = {"steps": a.steps, "strategy": a.strategy, "snap": a.snap, "seed": a.seed}
    t0 = time.perf_counter()
    out = model.decode(model.sample_images(len(pairs), source=sources, guidance=a.guidance, **kw), strip=False)
    result["chars_per_s"] = len(pairs) * cap / (time.perf_counter() - t0)
    rows = {"model": t2t_scores(out, targets), "identity_source": t2t_scores(sources, targets)}
    none = model.decode(model.sample_images(len(pairs), **kw), strip=False)
    rows["model_without_source"] = t2t_scores(none, targets)
    if a.label_checkpoint:
        lab = GlyphDiffusion.load(a.label_checkpoint)
        if lab.layout.capacity != cap:
            raise SystemExit(f"eval-t2t: --label-checkpoint has {lab.layout.capacity} characters, not {cap}")
        rows["label_model_unconditional"] = t2t_scores(lab.decode(lab.sample_images(len(pairs), **kw),
                                                                  strip=False), targets)
    g = torch.Generator().manual_seed(a.seed)
    printable = CHARSET[:-1]
    rand = ["".join(printable[i] for i in torch.randint(0, len(printable), (cap,), generator=g).tolist())
            for _ in range(len(pairs))]
    rows["random_chars"] = t2t_scores(rand, targets)
    result["scores"] = rows
    result["examples"] = [{"source": s, "target": t, "output": o, "output_without_source": n}
                          for s, t, o, n in list(zip(sources, targets, out, none))[:8]]
    print(json.dumps(result["scores"], indent=1))
    print(json.dumps(result["examples"][:4], indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


def _ascii(img: torch.Tensor) -> str:
    return "\n".join("".join("#" if v > 0.5 else "." for v in row) for row in img.tolist())


def cmd_sample(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    model = GlyphDiffusion.load(a.checkpoint)
    x = model.sample_images(a.n, steps=a.steps, strategy=a.strategy, labels=a.label, guidance=a.guidance,
                            snap=a.snap, seed=a.seed)
    for text, img in zip(model.decode(x, strip=False), model._to_img(x)):
        print(repr(text))
        if a.show:
            print(_ascii(img))


def _legibility(model: GlyphDiffusion, x: torch.Tensor) -> dict:
    """Per cell, the squared L2 distance (pixel scale 0..1; one wrong pixel = 1) to the nearest glyph."""
    d = cell_distances(model._to_img(x).clamp(0, 1)).min(-1).values.reshape(-1)
    return {"mean_sq_distance": float(d.mean()), "cells_within_1": float((d < 1.0).double().mean()),
            "cells_within_4": float((d < 4.0).double().mean())}


def text_stats(texts: list[str], vocab: set[str]) -> dict:
    """Character and word make-up. A "word" is a run of 3 or more letters (shorter runs are real words by
    chance too often: random characters would score well); it is real when it occurs (case-folded) at
    least 3 times in the corpus. ``real_word_chars``: the share of non-space characters inside real words."""
    chars = "".join(texts)
    words = [w for t in texts for w in WORD.findall(t) if len(w) >= 3]
    real = [w for w in words if w.lower() in vocab]
    ink = sum(not c.isspace() for c in chars)
    return {"letter_fraction": sum(c.isalpha() for c in chars) / max(1, len(chars)),
            "space_fraction": chars.count(" ") / max(1, len(chars)),
            "real_word_fraction": len(real) / max(1, len(words)),
            "real_word_chars": sum(map(len, real)) / max(1, ink),
            "words_per_text": len(words) / max(1, len(texts))}


def _scores(texts: list[str], tok, lm, vocab: set[str], L: int) -> dict:
    try:
        out = evaluation.score_texts(texts, tok, lm=lm, length=L)
    except InputError:  # nothing to score (every text empty or one token)
        out = {**evaluation.score_texts(texts, tok, length=L), "gen_ppl": None}
    out["empty_texts"] = sum(not t.strip() for t in texts)
    out.update(text_stats(texts, vocab))
    return out


def noise_table(texts: list[str], layout: Layout, sigmas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
                seed: int = 0) -> dict[str, float]:
    """Character accuracy of the recogniser on ``render(texts) + sigma·N(0, 1)`` (pixel scale 0..1)."""
    clean = render(texts, layout)
    want = recognise(clean, strip=False)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for sigma in sigmas:
        got = recognise(clean + sigma * torch.randn(clean.shape, generator=g), strip=False)
        out[str(sigma)] = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y)) / sum(map(len, want))
    return out


def cmd_noise(a: argparse.Namespace) -> None:
    layout = Layout()
    _, _, va, _ = _corpus(layout.capacity, True)
    g = torch.Generator().manual_seed(0)
    printable = CHARSET[:-1]
    rand = ["".join(printable[i] for i in torch.randint(0, len(printable), (64,), generator=g).tolist())
            for _ in range(300)]
    print(json.dumps({"corpus_chunks": noise_table(va[:300], layout), "random_chars": noise_table(rand, layout)},
                     indent=1))


def _other_families() -> dict:
    """The other families' figures from ``benchmarks/results/eval-*.json`` (64-token samples: their gen-PPL
    is over ~4x more tokens per text than ours, so compare each against its own ``reference`` row)."""
    out = {"note": "fastdiff eval on 64-token samples; glyph texts are 64 characters (~16 tokens): compare "
                   "each family's gen_ppl with its own reference gen_ppl"}
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    for name in ("discrete", "continuous", "continuous-retrain-5000"):
        f = root / f"eval-{name}.json"
        if f.is_file():
            d = json.loads(f.read_text())
            out[name] = {"step": d["checkpoint"].get("step"), "samples": d.get("samples"),
                         "reference_gen_ppl": d.get("reference", {}).get("gen_ppl"),
                         "attribute_mean": d.get("attribute", {}).get("mean")}
    return out


def cmd_eval(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    model = GlyphDiffusion.load(a.checkpoint)
    cap = model.layout.capacity
    docs = python_docs()
    counts = Counter(w.lower() for d in docs for w in WORD.findall(d.text))
    vocab = {w for w, c in counts.items() if c >= 3}
    _, _, va, val = _corpus(cap, True)
    tok = default_tokenizer()
    lm = evaluation.load_scorer("causal_lm")
    clf = evaluation.load_scorer("classifier")
    L = a.token_len
    settings = {"samples": a.samples, "steps": a.steps, "strategy": a.strategy, "guidance": a.guidance,
                "snap": a.snap, "seed": a.seed, "token_len": L}
    result: dict = {"checkpoint": {"family": "glyph", "path": str(a.checkpoint), "layout": [model.layout.rows,
                                   model.layout.cols], "net": model.net.config, "scale": model.scale,
                                   "schedule": list(model.schedule),
                                   "parameterization": model.diffusion.parameterization,
                                   "params": sum(p.numel() for p in model.net.parameters()),
                                   "labels": model.label_names, "step": getattr(model, "extra", {}).get("step")},
                    "settings": settings}
    t0 = time.perf_counter()
    x = model.sample_images(a.samples, steps=a.steps, strategy=a.strategy, snap=a.snap, seed=a.seed)
    secs = time.perf_counter() - t0
    texts = model.decode(x)
    result["samples"] = _scores(texts, tok, lm, vocab, L)
    result["legibility"] = _legibility(model, x)
    result["chars_per_s"] = a.samples * cap / secs
    result["examples"] = texts[:8]
    print(json.dumps(result["samples"]), json.dumps(result["legibility"]), flush=True)
    ref = va[:: max(1, len(va) // a.samples)][: a.samples]
    result["reference"] = _scores(ref, tok, lm, vocab, L)
    g = torch.Generator().manual_seed(a.seed)
    printable = CHARSET[:-1]
    rand = ["".join(printable[i] for i in torch.randint(0, len(printable), (cap,), generator=g).tolist())
            for _ in range(a.samples)]
    result["random_chars"] = _scores(rand, tok, lm, vocab, L)
    if model.label_names:
        per, ref_per, examples = {}, {}, {}
        for idx, name in enumerate(model.label_names):
            xl = model.sample_images(a.samples, steps=a.steps, strategy=a.strategy, labels=name,
                                     guidance=a.guidance, snap=a.snap, seed=a.seed + 1 + idx)
            tl = model.decode(xl)
            examples[name] = tl[:3]
            with torch.inference_mode():
                per[name] = metrics.attribute_accuracy(clf, evaluation.encode_texts(tl, tok, L),
                                                       torch.full((len(tl),), idx))
                real = [t for t, lab in zip(va, val.tolist()) if lab == idx][: a.samples]
                ref_per[name] = metrics.attribute_accuracy(clf, evaluation.encode_texts(real, tok, L),
                                                           torch.full((len(real),), idx))
        result["attribute"] = {"per_label": per, "mean": sum(per.values()) / len(per), "examples": examples,
                               "classifier_on_real_chunks": {"per_label": ref_per,
                                                             "mean": sum(ref_per.values()) / len(ref_per)}}
    result["other_families"] = _other_families()
    print(json.dumps({k: result[k] for k in ("samples", "reference", "random_chars")}, indent=1))
    if "attribute" in result:
        print(json.dumps(result["attribute"], indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


def _train_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--out", required=True)
    t.add_argument("--cols", type=int, default=32)
    t.add_argument("--rows", type=int, default=2)
    t.add_argument("--schedule", default="cosine")
    t.add_argument("--T", type=int, default=1000)
    t.add_argument("--param", default="x0", choices=("x0", "eps"))
    t.add_argument("--scale", type=float, default=0.5)
    t.add_argument("--base", type=int, default=8)
    t.add_argument("--width", type=int, default=96)
    t.add_argument("--depth", type=int, default=2)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--steps", type=int, default=100000)
    t.add_argument("--minutes", type=float, default=38.0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--cond-drop", type=float, default=0.1)
    t.add_argument("--balance", action="store_true", help="subsample the larger class to the smaller's size")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=250)
    t.add_argument("--log-every", type=int, default=50)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for t in (sub.add_parser("train"), sub.add_parser("train-t2t")):
        _train_args(t)
    for q in (sub.add_parser("sample"), sub.add_parser("eval"), sub.add_parser("eval-t2t")):
        q.add_argument("-c", "--checkpoint", required=True)
        q.add_argument("--steps", type=int, default=50)
        q.add_argument("--strategy", default="ddim", choices=("ddim", "ddpm"))
        q.add_argument("--guidance", type=float, default=1.0)
        q.add_argument("--snap", action="store_true", help="project each x0 estimate onto the font")
        q.add_argument("--seed", type=int, default=0)
    s = sub.choices["sample"]
    s.add_argument("-n", type=int, default=4)
    s.add_argument("--label", default=None)
    s.add_argument("--show", action="store_true", help="print the images as ASCII art")
    e = sub.choices["eval"]
    e.add_argument("--samples", type=int, default=64)
    e.add_argument("--token-len", type=int, default=32, help="tokens scored per text (64 characters ~ 16 tokens)")
    e.add_argument("--json", default=None)
    e2 = sub.choices["eval-t2t"]
    e2.add_argument("--samples", type=int, default=64)
    e2.add_argument("--label-checkpoint", default=None, help="a label model whose unconditional samples are a baseline")
    e2.add_argument("--json", default=None)
    sub.add_parser("noise")
    for q in sub.choices.values():
        q.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "noise": cmd_noise, "train-t2t": cmd_train_t2t,
     "eval-t2t": cmd_eval_t2t}[a.cmd](a)


if __name__ == "__main__":
    main()
