"""``fastdiff generate`` (the main job, also plain ``fastdiff``): text from the bundled model or a checkpoint,
one line per sample, optionally a JSONL file; under torchrun every rank generates its share."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

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
    check_writable,
    finite_float,
    plan_batch,
    positive_int,
    write_atomic,
)

if TYPE_CHECKING:
    import torch

    from ..distributed import Context
    from ..pipeline import Generation

HELP = "generate text (the main job)"


def add_arguments(g: argparse.ArgumentParser) -> None:
    """The ``generate`` options on ``g``."""
    _add_sampling(g)
    g.add_argument("--num-samples", "-n", type=positive_int, default=4, help="samples to generate")
    start = g.add_mutually_exclusive_group()
    start.add_argument("--prompt", help="fixed text at the start; the rest is generated")
    start.add_argument("--template", help="infilling template: [MASK] = one generated token, [MASK*n] = n of them")
    g.add_argument("--source", help="input text of a text-to-text checkpoint")
    g.add_argument("--output", "-o", help="write the samples as JSONL (checked before the work, written atomically)")
    g.add_argument("--trajectory", action="store_true", help="print sample 0 after the denoising steps")
    g.add_argument("--stream", action="store_true", help="show sample 0 as its tokens are revealed, step by step "
                                                         "(in place on a terminal, one line per step otherwise)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a "
                                                              "terminal)")
    g.add_argument("--quiet", action="store_true", help="no header line")
    g.add_argument("--classifier-scale", type=finite_float, default=0.0,
                   help="discrete classifier guidance (first order over one-hot inputs, DiGress / TAG) by the "
                        "attribute classifier towards --label (or --classifier-label): the scale s of its gradient "
                        "(0 = off; strategy ancestral)")
    g.add_argument("--classifier", default="classifier",
                   help="the guiding classifier with --classifier-scale (bundled name or directory)")
    g.add_argument("--classifier-label",
                   help="the attribute --classifier-scale steers towards without conditioning the model on it "
                        "(default: --label)")


def command(args: argparse.Namespace) -> int:
    """Run ``fastdiff generate``; returns the exit status."""
    from .. import distributed

    from ..glyph import is_glyph_checkpoint

    if is_glyph_checkpoint(args.checkpoint):
        return _generate_glyph(args)
    latent = latent_checkpoint(args.checkpoint)
    if latent is not None:
        return _generate_latent(args, latent)
    threads = _configure_threads(args)
    device = _check_device(args.device)
    _check_backend(args.backend, _device(device))
    if args.output and distributed.rank() == 0:  # only rank 0 writes
        check_writable(args.output, "--output")
    # Under torchrun: join the group (gloo on CPU, NCCL on cuda:LOCAL_RANK); every rank generates its
    # slice of the samples, rank 0 prints and writes them all in global order. Alone: a world of one.
    with distributed.session(device) as ctx:
        return _generate_on(args, ctx, threads)


def _generate_glyph(args: argparse.Namespace) -> int:
    """``fastdiff generate -c <glyph checkpoint>``: GlyphDiffusion (``scripts/glyph_diffusion.py`` trains one),
    DDIM / DDPM steps on the CPU, images read back as text, one line per sample. ``--source``: the input of a
    text-to-text checkpoint (``train-t2t``), the same for every sample."""
    from ..glyph import GlyphDiffusion

    unsupported = [name for name, on in (("--prompt", args.prompt), ("--template", args.template),
                                         ("--trajectory", args.trajectory), ("--stream", args.stream),
                                         ("--classifier-scale", args.classifier_scale), ("--length", args.length),
                                         ("--output", args.output)) if on]
    if unsupported:
        raise InputError(f"{unsupported[0]}: not available for a glyph-diffusion checkpoint")
    strategy = args.strategy or "ddim"
    if strategy not in ("ddim", "ddpm"):
        raise InputError(f"--strategy: a glyph-diffusion checkpoint samples with ddim or ddpm, got {strategy!r}")
    _configure_threads(args)
    model = GlyphDiffusion.load(args.checkpoint)
    if args.source is not None:
        if not model.net.source_len:
            raise InputError(f"--source: {args.checkpoint} is a label-conditioned glyph checkpoint without a source "
                             "(train a text-to-text one with scripts/glyph_diffusion.py train-t2t)")
        if len(args.source) > model.net.source_len:
            raise InputError(f"--source: {len(args.source)} characters, this checkpoint reads at most "
                             f"{model.net.source_len}")
    if args.label is not None and not model.label_names:
        raise InputError(f"--label: {args.checkpoint} is a glyph checkpoint without labels")
    steps = args.steps or 50
    if not args.quiet:
        print(f"fastdiff generate: {args.checkpoint} (glyph, {model.layout.rows} x {model.layout.cols} characters, "
              f"step {getattr(model, 'extra', {}).get('step')}) | {args.num_samples} samples, {steps} steps, "
              f"{strategy}", flush=True)
    texts = model.generate(args.num_samples, steps=steps, strategy=strategy, eta=args.eta or 0.0,
                           labels=args.label, guidance=args.guidance, seed=args.seed % 2**63,
                           source=None if args.source is None else [args.source] * args.num_samples)
    for t in texts:
        print(t)
    return 0


def latent_checkpoint(checkpoint: str) -> Path | None:
    """The directory of ``-c`` when it is a latent-diffusion checkpoint (a bundled name, e.g. ``latent``, or a
    directory; :func:`fastdiff.pipeline.resolve_checkpoint`'s order), else None."""
    from ..latent import is_latent_checkpoint
    from ..pipeline import ASSETS, BUNDLED

    path = ASSETS / BUNDLED[checkpoint] if checkpoint in BUNDLED else Path(checkpoint)
    return path if is_latent_checkpoint(path) else None


def latent_unsupported(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """InputError naming the first option in ``names`` that was given (a latent-diffusion checkpoint
    samples with DDIM / DDPM on the CPU and takes only -n, --steps, --strategy, --eta, --label,
    --guidance, --seed, --threads, --quiet, -o)."""
    defaults = {"--classifier-scale": 0.0, "--backend": "auto", "--device": "cpu"}
    for name in names:
        v = getattr(args, name.lstrip("-").replace("-", "_"), None)
        if name == "--cache":  # --no-cache stores False; not given: None
            if v is False:
                raise InputError("--no-cache: not available for a latent-diffusion checkpoint")
            continue
        if v is None or v is False or (name in defaults and v == defaults[name]):
            continue
        raise InputError(f"{name}: not available for a latent-diffusion checkpoint")


#: the sampling options a latent-diffusion checkpoint refuses (``fastdiff generate`` / ``eval``)
LATENT_UNSUPPORTED = ("--length", "--batch-size", "--temperature", "--top-k", "--top-p", "--threshold",
                      "--block-size", "--micro-batch", "--cache", "--device", "--backend")


def load_latent(args: argparse.Namespace, path: Path, out: str | None, out_flag: str) -> tuple[Any, str]:
    """The checks and loading that ``generate`` and ``eval`` share for a latent checkpoint, in the CLI's order
    (options, then the output path, then the files): ``(LatentDiffusion, strategy)``."""
    from ..latent import LatentDiffusion

    strategy = args.strategy or "ddim"
    if strategy not in ("ddim", "ddpm"):
        raise InputError(f"--strategy: a latent-diffusion checkpoint samples with ddim or ddpm, got {strategy!r}")
    if out:
        check_writable(out, out_flag)
    _configure_threads(args)
    model = LatentDiffusion.load(path)
    if model.denoiser is None:
        raise InputError(f"--checkpoint: {args.checkpoint} holds only a latent autoencoder (no diffusion stage yet); "
                         "train it with fastdiff train --family latent --stage diffusion")
    return model, strategy


def _generate_latent(args: argparse.Namespace, path: Path) -> int:
    """``fastdiff generate -c <latent checkpoint>``: LD4LG (``fastdiff train --family latent`` trains one),
    DDIM / DDPM steps over the latents on the CPU, decoded greedily by the PLM's decoder, one line per
    sample."""
    latent_unsupported(args, ("--prompt", "--template", "--source", "--trajectory", "--stream",
                              "--classifier-scale", *LATENT_UNSUPPORTED))
    model, strategy = load_latent(args, path, args.output, "--output")
    if args.label is not None and not model.num_labels:
        raise InputError("--label: this latent checkpoint was trained without labels")
    label = args.label
    if label is not None and label not in model.label_names:
        raise InputError(f"--label: {label!r} is not one of {model.label_names}")
    steps = args.steps or 50
    if steps > model.diffusion.T:
        raise InputError(f"--steps: at most the checkpoint's T = {model.diffusion.T}, got {steps}")
    if not args.quiet:
        c = model.autoencoder.config
        print(f"fastdiff generate: {args.checkpoint} (latent, {c['n_latents']} x {c['d_latent']} latents -> "
              f"{model.seq_len} tokens, step {model.extra.get('diffusion_steps')}) | {args.num_samples} samples, "
              f"{steps} steps, {strategy}" + (f", label {label}" if label else "")
              + (f", guidance {args.guidance:g}" if label and args.guidance != 1.0 else ""), flush=True)
    texts = model.generate(args.num_samples, steps=steps, strategy=strategy, eta=args.eta or 0.0, labels=label,
                           guidance=args.guidance, seed=args.seed % 2**63)
    for i, t in enumerate(texts):
        print(f"[{i}] {' '.join(t.split())}")
    if args.output:
        def rows(f: IO[str]) -> None:
            for i, t in enumerate(texts):
                f.write(json.dumps({"index": i, "text": t, "label": label, "seed": args.seed,
                                    "checkpoint": str(args.checkpoint), "strategy": strategy, "steps": steps}) + "\n")

        out = write_atomic(args.output, "--output", rows)
        print(f"wrote {len(texts)} samples to {out}")
    return 0


def _classifier_guidance(td: object, args: argparse.Namespace) -> dict:
    """``classifier_grad`` / ``classifier_scale`` for ``--classifier-scale``: the attribute classifier's
    gradient with respect to the one-hot ``x_t`` (:meth:`TextClassifier.guidance_grad`), towards
    ``--classifier-label`` or ``--label``. Checked before any generation."""
    if args.classifier_scale == 0.0:
        if args.classifier_label is not None:
            raise InputError("--classifier-label: names the attribute of --classifier-scale; give a scale")
        return {}
    if td.continuous:
        raise InputError("--classifier-scale: guidance by the token classifier applies to discrete checkpoints")
    target = args.classifier_label if args.classifier_label is not None else args.label
    if target is None or not td.num_labels:
        raise InputError("--classifier-scale: needs an attribute to steer towards (--label or --classifier-label) "
                         "on a label-conditioned checkpoint")
    try:
        idx = td._label_id(target)
    except InputError as e:
        raise InputError(f"--classifier-label: {e}") from e
    from ..evaluation import load_scorer

    clf = load_scorer(args.classifier).to(td.device)
    if getattr(clf, "arch", None) != "classifier":
        raise InputError(f"--classifier: {args.classifier!r} is not a text classifier")
    if clf.config_dict()["vocab_size"] != td.tokenizer.vocab_size:
        raise InputError(f"--classifier: its vocabulary ({clf.config_dict()['vocab_size']}) is not the checkpoint's "
                         f"({td.tokenizer.vocab_size})")
    return {"classifier_grad": clf.guidance_grad(idx), "classifier_scale": args.classifier_scale}


def _backend_text(backend: str, device: str | torch.device) -> str:
    if backend != "auto":
        return backend
    from .. import _backends

    return f"auto: {_backends.summary(device)}"


def _generate_on(args: argparse.Namespace, ctx: Context, threads: int | None = None) -> int:
    from ..pipeline import TextDiffusion

    td = TextDiffusion.load(args.checkpoint, device=ctx.device, backend=args.backend)
    _check_generator(td, args.checkpoint)
    chosen = _sampling_defaults(td, args)
    length = args.length or td.seq_len
    batch = plan_batch(td, td.device, num_samples=args.num_samples, length=length, batch_size=args.batch_size,
                       steps=args.steps, trajectory=args.trajectory, guidance=args.guidance)
    info = td.describe()
    template = args.template if args.template is not None else (f"{args.prompt} [MASK]" if args.prompt else None)
    main = ctx.is_main
    if not args.quiet and main:
        ranks = f", {ctx.world_size} ranks ({ctx.backend})" if ctx.distributed else ""
        threads = f", threads {threads}" if threads is not None else ""
        print(f"fastdiff generate: {args.checkpoint} ({info['family']}, {info['task']}, "
              f"{info['params'] / 1e6:.2f} M parameters, step {info['step']}) | "
              f"{args.num_samples} samples x {length} tokens, {args.steps} steps, "
              f"{args.strategy or td.default_strategy()}"
              + (f", temperature {args.temperature:g}" if args.temperature != 1.0 else "")
              + (f", top-p {args.top_p:g}" if args.top_p is not None else "")
              + (f", classifier guidance {args.classifier_scale:g}" if args.classifier_scale else "") + chosen +
              f", device {td.device}, "
              f"backend {_backend_text(args.backend, td.device)}{threads}{ranks}", flush=True)
    gen = td.generate(args.num_samples, length=args.length, steps=args.steps, strategy=args.strategy,
                      seed=args.seed, batch_size=batch, label=args.label, guidance=args.guidance,
                      template=template, source=args.source, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, trajectory=args.trajectory,
                      progress=main and _progress(args) and not args.stream,
                      stream=_Stream(sys.stdout) if (args.stream and main) else None, **_sampling_options(args),
                      **_classifier_guidance(td, args))
    if args.stream and main:
        _Stream.end(sys.stdout)
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
        def rows(f: IO[str]) -> None:
            for i, text in enumerate(gen.texts):
                f.write(_jsonl_row(i, text, gen, args, st) + "\n")

        out = write_atomic(args.output, "--output", rows)
        print(f"wrote {len(gen.texts)} samples to {out}")
    return 0


class _Stream:
    """``--stream``: sample 0's text after every step (``_`` = still masked), rewritten in place on a
    terminal, one ``step k:`` line per step otherwise."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.tty = _isatty(out)

    def __call__(self, step: int, first: int, texts: list[str]) -> None:
        if first != 0 or not texts:
            return
        text = " ".join(texts[0].split())
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns
            line = f"step {step:>4}: {text}"
            self.out.write("\r\x1b[2K" + line[: width - 1])
        else:
            self.out.write(f"step {step:>4}: {text}\n")
        self.out.flush()

    @staticmethod
    def end(out: IO[str]) -> None:
        if _isatty(out):
            out.write("\n")
            out.flush()


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _jsonl_row(i: int, text: str, gen: Generation, args: argparse.Namespace, st: dict) -> str:
    return json.dumps({"index": i, "text": text, "tokens": gen.tokens[i].tolist(),
                       "label": gen.labels[i] if gen.labels else None, "seed": args.seed,
                       "checkpoint": str(args.checkpoint), "strategy": st["strategy"], "steps": args.steps})
