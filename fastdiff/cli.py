"""Command line (console script ``fastdiff``).

``fastdiff generate`` (the main job, also plain ``fastdiff``): text from the bundled model or a checkpoint.
``fastdiff train``: train a model (config file and/or flags; resumes). ``fastdiff eval``: generative
perplexity, distinct-n, attribute accuracy, BLEU. ``fastdiff bench``: ops and sampler, one table.
``fastdiff info``: backends. ``fastdiff demo``: every op timed on random weights (the pre-model main job).
Bad paths, corrupted checkpoints and bad options end with one ``fastdiff: error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", default="discrete",
                   help="bundled name (discrete, continuous) or a checkpoint directory (default: discrete)")
    p.add_argument("--strategy", help="ancestral | confidence | threshold | remask (discrete), ddpm | ddim (continuous)")
    p.add_argument("--steps", type=int, default=64, help="denoising steps (default 64)")
    p.add_argument("--batch-size", type=int, help="samples per sampler call (default min(N, 64))")
    p.add_argument("--length", type=int, help="tokens per sample (default: the training length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", help="attribute for label-conditioned checkpoints (e.g. reference, library)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--eta", type=float, help="DDIM eta / ReMDM eta")
    p.add_argument("--threshold", type=float, help="confidence threshold (strategy threshold)")
    p.add_argument("--block-size", type=int, help="semi-autoregressive blocks of this many tokens")
    p.add_argument("--backend", default="auto", help="ops backend: auto, reference, cpp, triton, cuda")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")


def _sampling_options(args) -> dict:
    opts = {}
    for name in ("eta", "threshold", "block_size"):
        v = getattr(args, name, None)
        if v is not None:
            opts[name] = v
    return opts


def _device(name: str | None) -> str:
    if name:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _generate(args) -> int:
    from . import distributed

    # Under torchrun: join the group (gloo on CPU, NCCL on cuda:LOCAL_RANK); every rank generates its
    # slice of the samples, rank 0 prints and writes them all in global order. Alone: a world of one.
    with distributed.session(_device(args.device)) as ctx:
        return _generate_on(args, ctx)


def _generate_on(args, ctx) -> int:
    from .pipeline import TextDiffusion

    td = TextDiffusion.load(args.checkpoint, device=ctx.device, backend=args.backend)
    info = td.describe()
    template = args.template if args.template is not None else (f"{args.prompt} [MASK]" if args.prompt else None)
    main = ctx.is_main
    if not args.quiet and main:
        ranks = f", {ctx.world_size} ranks ({ctx.backend})" if ctx.distributed else ""
        print(f"fastdiff generate: {args.checkpoint} ({info['family']}, {info['task']}, "
              f"{info['params'] / 1e6:.2f} M parameters, step {info['step']}) | "
              f"{args.num_samples} samples x {args.length or td.seq_len} tokens, {args.steps} steps, "
              f"{args.strategy or td.default_strategy()}, device {td.device}, backend {args.backend}{ranks}")
    gen = td.generate(args.num_samples, length=args.length, steps=args.steps, strategy=args.strategy,
                      seed=args.seed, batch_size=args.batch_size, label=args.label, guidance=args.guidance,
                      template=template, source=args.source, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, trajectory=args.trajectory, progress=main and not args.no_progress,
                      **_sampling_options(args))
    if not main:
        return 0
    for i, text in enumerate(gen.texts):
        print(f"[{i}] {' '.join(text.split())}")  # one line per sample; the JSONL keeps the text as generated
    if gen.trajectory:
        print("denoising trajectory of sample 0 (_ = [MASK]):")
        every = max(1, len(gen.trajectory) // 8)
        for k, step in enumerate(gen.trajectory):
            if k % every == 0 or k == len(gen.trajectory) - 1:
                print(f"  step {k + 1:>4}: {step[0]}")
    st = gen.stats
    ranks = f" on {st['ranks']} ranks" if st.get("ranks", 1) > 1 else ""
    print(f"{gen.tokens.numel()} tokens in {st['time_s']:.2f} s{ranks}: {st['tokens_per_s']:,.0f} tokens/s "
          f"({st['network_calls']} network calls)")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w") as f:
            for i, text in enumerate(gen.texts):
                f.write(json.dumps({"index": i, "text": text, "tokens": gen.tokens[i].tolist(),
                                    "label": gen.labels[i] if gen.labels else None, "seed": args.seed,
                                    "checkpoint": str(args.checkpoint), "strategy": st["strategy"],
                                    "steps": args.steps}) + "\n")
        os.replace(tmp, out)
        print(f"wrote {len(gen.texts)} samples to {out}")
    return 0


def _eval(args) -> int:
    from . import evaluation
    from .pipeline import TextDiffusion

    td = TextDiffusion.load(args.checkpoint, device=_device(args.device), backend=args.backend)
    lm = evaluation.load_scorer(args.lm) if args.lm != "none" else None
    clf = evaluation.load_scorer(args.classifier) if td.num_labels and args.classifier != "none" else None
    refs = pairs = None
    from .data import corpus, datasets

    docs = corpus.load_texts(args.data) if args.data else corpus.python_docs()
    if td.task == "word_order":
        pairs = datasets.word_order_pairs(docs, "valid")
    else:
        refs = _reference_texts(docs, td, args.samples)
    res = evaluation.evaluate(td, samples=args.samples, steps=args.steps, strategy=args.strategy, seed=args.seed,
                              guidance=args.guidance, batch_size=args.batch_size, lm=lm, classifier=clf,
                              reference_texts=refs, word_order_pairs=pairs, **_sampling_options(args))
    _print_eval(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return 0


def _reference_texts(docs, td, n: int) -> list[str]:
    """``n`` validation chunks of the training length, decoded: what real text scores."""
    from .data import datasets

    chunks = datasets.lm_chunks(docs, td.tokenizer, td.seq_len, "valid")
    return [td.tokenizer.decode(row.tolist()) for row in chunks[:n]]


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
        print(f"BLEU {res['bleu']:.2f}")
    print(f"sampling: {res['tokens_per_s']:,.0f} tokens/s")


def _bench(args) -> int:
    from . import _bench as bench

    rows = bench.run(device=_device(args.device), quick=args.quick, repeat=args.repeat, sampler=not args.no_sampler)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json}")
    return 0


def _train(args) -> int:
    from . import _train_cli

    return _train_cli.run(args)


def _info(args) -> int:
    from . import _backends

    for name, be in _backends.available().items():
        print(f"{name:<10} {'available' if be.available else 'unavailable: ' + be.reason}")
    return 0


def _demo(args) -> int:
    from . import _demo

    results = _demo.run(seed=args.seed, quick=args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description="Kernel-backed text diffusion: generate, train, "
                                     "evaluate, benchmark. Without a command: fastdiff generate.")
    sub = parser.add_subparsers(dest="command")

    g = sub.add_parser("generate", help="generate text (the main job)")
    _add_sampling(g)
    g.add_argument("--num-samples", "-n", type=int, default=4)
    g.add_argument("--prompt", help="fixed text at the start; the rest is generated")
    g.add_argument("--template", help="infilling template: [MASK] = one generated token, [MASK*n] = n of them")
    g.add_argument("--source", help="input text of a text-to-text checkpoint")
    g.add_argument("--output", "-o", help="write the samples as JSONL")
    g.add_argument("--trajectory", action="store_true", help="print sample 0 after the denoising steps")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no header line")
    g.set_defaults(func=_generate)

    e = sub.add_parser("eval", help="generative perplexity, distinct-n, attribute accuracy, BLEU")
    _add_sampling(e)
    e.add_argument("--samples", type=int, default=64)
    e.add_argument("--lm", default="causal_lm", help="scoring causal LM (bundled name or directory, or none)")
    e.add_argument("--classifier", default="classifier", help="attribute classifier (bundled, directory, none)")
    e.add_argument("--data", nargs="*", help="text files for the reference texts / pairs (default: Python docs)")
    e.add_argument("--json", help="write the scores as JSON")
    e.set_defaults(func=_eval)

    t = sub.add_parser("train", help="train a model (config file and/or flags; --resume continues a run)")
    from . import _train_cli

    _train_cli.add_arguments(t)
    t.set_defaults(func=_train)

    b = sub.add_parser("bench", help="ops per backend and the sampler, one table")
    b.add_argument("--device", default=None)
    b.add_argument("--quick", action="store_true", help="smaller sizes")
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--no-sampler", action="store_true", help="ops only")
    b.add_argument("--json", help="write the rows as JSON")
    b.set_defaults(func=_bench)

    i = sub.add_parser("info", help="which backends are available, and why not")
    i.set_defaults(func=_info)

    d = sub.add_parser("demo", help="every op timed and sampling loops on random weights")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true")
    d.add_argument("--json", metavar="PATH")
    d.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["generate", *argv]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"fastdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
