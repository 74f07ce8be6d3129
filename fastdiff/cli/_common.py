"""Command line (console script ``fastdiff``).

``fastdiff generate`` (the main job, also plain ``fastdiff``): text from the bundled model or a checkpoint.
``fastdiff train``: train a model (config file and/or flags; resumes). ``fastdiff eval``: generative
perplexity, distinct-n, attribute accuracy, BLEU. ``fastdiff bench``: ops and sampler, one table.
``fastdiff info``: backends, what the install was built with, what ``auto`` runs. ``fastdiff demo``: every
op timed on random weights (the pre-model main job).

Errors: a bad option, a bad path, a corrupted checkpoint or any other bad input (a
:class:`fastdiff.errors.FastdiffError`, an argparse error, an ``OSError`` about a path the user gave) ends
with one ``fastdiff: error: ...`` line and exit status 2; anything else is a bug of ours and ends with
its traceback. Numeric options are checked when the command line is parsed, output paths (``-o``,
``--json``) before any work, and the sizes of a generation against the memory there is before anything
is allocated. Output files are written to a temporary file in the same directory and renamed, so a
failed run leaves neither a partial file nor a temporary one. A closed pipe (``fastdiff info | head``)
ends quietly with status 141; Ctrl-C with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import FastdiffError, InputError

BACKEND_CHOICES = ("auto", "reference", "cpp", "triton", "cuda")
EPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


# --- parse-time types: every numeric option is checked before any model is loaded ----------------------
def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return v


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return v


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**64)."""
    v = _int(text)
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}")
    return v


def finite_float(text: str) -> float:
    """argparse type: a finite float (no NaN, no infinity)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def probability(text: str) -> float:
    """argparse type: a probability in (0, 1]."""
    v = finite_float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text!r}")
    return v


def unit_interval(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    v = finite_float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text!r}")
    return v


def device_name(text: str) -> str:
    """argparse type: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (syntax only; availability is checked
    before the work by :func:`_check_device`)."""
    import torch

    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r} (fastdiff runs on CPU "
                                         "and CUDA devices)")
    return text


class _Parser(argparse.ArgumentParser):
    """Every argparse error as one ``fastdiff: error: ...`` line pointing at ``--help``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"fastdiff: error: {message} (see: {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option whose default is a value; an option whose default is
    None or a flag's False says what happens without it in its own help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


# --- devices, backends, threads ------------------------------------------------------------------------
def _device(name: str | None) -> str:
    if name and name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(name: str | None, flag: str = "--device") -> str:
    """The device to run on; an :class:`InputError` naming ``flag`` when it is not there."""
    import torch

    dev = torch.device(_device(name))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise InputError(f"{flag}: {name} was asked for, but torch.cuda.is_available() is False ({build}); "
                             "use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise InputError(f"{flag}: {name} was asked for, but {n} CUDA device(s) are visible "
                             f"(cuda:0 .. cuda:{n - 1})")
    return str(dev) if name in (None, "auto") else name


def _check_backend(backend: str, device: str) -> None:
    """An explicit ``--backend`` (or ``FASTDIFF_BACKEND`` under ``auto``) must be able to run on ``device``."""
    import torch

    from . import _backends
    from .ops import _dispatch

    flag, name = "--backend", backend
    env = os.environ.get("FASTDIFF_BACKEND", "").strip()
    if backend == "auto" and env and env != "auto":
        flag, name = "FASTDIFF_BACKEND", env
        if name not in BACKEND_CHOICES:
            raise InputError(f"FASTDIFF_BACKEND: expected one of {list(BACKEND_CHOICES)}, got {name!r}")
    if name in ("auto", "reference"):
        return
    be = _backends.get(name)
    if not be.available:
        raise InputError(f"{flag}: {name!r} is unavailable: {be.reason}")
    why = _dispatch._device_ok(name, torch.device(device))
    if why:
        raise InputError(f"{flag}: {name!r} cannot run on device {device}: {why}")


def _configure_threads(args) -> int:
    from . import _threads

    return _threads.configure(getattr(args, "threads", None))


def _progress(args) -> bool:
    """A progress bar only for a person watching: not with --no-progress, not into a log file or pipe."""
    if getattr(args, "no_progress", False):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# --- output paths ---------------------------------------------------------------------------------------
def check_writable(path: str | os.PathLike, flag: str) -> Path:
    """Fail now, before the work, if ``path`` cannot be written: it is a directory, it lies under a
    file, or the nearest existing directory above it does not take new files. Creates nothing."""
    p = Path(path)
    if str(path) == "":
        raise InputError(f"{flag}: an empty path")
    if p.is_dir():
        raise InputError(f"{flag}: {path} is a directory; give a file path")
    anc = p.absolute().parent
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"{flag}: cannot write {path}: {anc} is not a directory")
    try:  # permissions do not tell (root, read-only mounts, /sys): try it
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".fastdiff-probe-", suffix=".tmp")
    except OSError as e:
        raise InputError(f"{flag}: cannot write {path}: {anc} does not take new files ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return p


def write_atomic(path: str | os.PathLike, flag: str, write: Callable) -> Path:
    """``write(file)`` into a temporary file beside ``path``, then rename it over ``path``. On any failure
    the temporary file is removed and ``path`` is left as it was; an ``OSError`` becomes an
    :class:`InputError` naming ``flag`` and the path."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise InputError(f"{flag}: cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an output file is an ordinary file
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"{flag}: writing {path} failed: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def _write_json(path: str, flag: str, obj) -> None:
    write_atomic(path, flag, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


# --- sizes against memory -------------------------------------------------------------------------------
def available_memory(device) -> int | None:
    """Bytes that can still be allocated on ``device`` (CPU: MemAvailable, within a cgroup limit);
    None when unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def _gb(n: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def sample_bytes(td, length: int, guidance: float = 1.0) -> int:
    """A deliberately generous estimate of the working memory one sample of ``length`` tokens needs
    during one denoising step: attention scores and their softmax (heads x L x L), logits/probabilities
    over the vocabulary (a few L x V), feed-forward activations, in float32."""
    m = td.config.get("model", {}) if isinstance(td.config, dict) else {}
    heads = int(m.get("heads") or 4)
    width = int(m.get("width") or 128)
    ff = int(m.get("ff_mult") or 4)
    vocab = int(m.get("vocab_size") or getattr(td.tokenizer, "vocab_size", 0) or 1)
    L = int(length)
    per = 4 * (2 * heads * L * L + 4 * L * vocab + 6 * L * width * ff)
    return per * (2 if guidance != 1.0 else 1)


def plan_batch(td, device, *, num_samples: int, length: int, batch_size: int | None, steps: int,
               trajectory: bool = False, guidance: float = 1.0, samples_flag: str = "--num-samples",
               memory: Callable = None) -> int:
    """The batch size to generate with, checked against the memory there is before anything is
    allocated: the results of every sample are kept (host memory), one batch works at a time (device
    memory). Without ``batch_size`` the default ``min(num_samples, 64)`` shrinks to what fits (samples do
    not depend on the batch size); a given one that does not fit, a length of which not even one sample
    fits, or more results than memory holds is an :class:`InputError`."""
    import torch

    memory = memory or available_memory
    device = torch.device(device)
    m = td.config.get("model", {}) if isinstance(td.config, dict) else {}
    max_len = m.get("max_len")
    if max_len and length > int(max_len):
        raise InputError(f"--length: {length} exceeds this model's maximum length {max_len}")
    n, L = num_samples, length
    result = n * L * 24 + (steps * n * L * 24 if trajectory else 0)  # token ids, their copy, the texts
    host = memory(torch.device("cpu"))
    if host is not None and result > 0.8 * host:
        what = f"{n:,} samples x {L:,} tokens" + (f" x {steps} steps of trajectory" if trajectory else "")
        raise InputError(f"{samples_flag}: {what} would keep about {_gb(result)} of results in memory, more than "
                         f"the {_gb(host)} available; generate fewer samples per run")
    free = (host - result if host is not None else None) if device.type == "cpu" else memory(device)
    want = min(batch_size if batch_size is not None else 64, n)
    if free is None:
        return want
    per = sample_bytes(td, L, guidance)
    budget = 0.8 * free
    if per > budget:
        raise InputError(f"--length: one sample of {L:,} tokens needs about {_gb(per)} of working memory "
                         f"(attention over {L:,} x {L:,} positions, logits over the vocabulary), more than the "
                         f"{_gb(free)} available on {device}; use a smaller --length")
    fit = int(budget // per)
    if want > fit:
        if batch_size is not None:
            raise InputError(f"--batch-size: {want} samples of {L:,} tokens need about {_gb(want * per)} of working "
                             f"memory, more than the {_gb(free)} available on {device}; at most {fit} fit")
        return fit
    return want


# --- generate -------------------------------------------------------------------------------------------
def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", default="discrete",
                   help="bundled name (discrete, continuous) or a checkpoint directory")
    p.add_argument("--strategy", help="ancestral | confidence | threshold | remask (discrete), ddpm | ddim "
                                      "(continuous); default: ancestral (discrete), ddim (continuous)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps (default: the checkpoint's recommended value, else 64)")
    p.add_argument("--batch-size", type=positive_int,
                   help="samples per sampler call (default: min(N, 64), smaller if memory needs it)")
    p.add_argument("--length", type=positive_int, help="tokens per sample (default: the training length)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed, in [0, 2**64)")
    p.add_argument("--label", help="attribute for label-conditioned checkpoints (e.g. reference, library); "
                                   "default: unconditional")
    p.add_argument("--guidance", type=finite_float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--temperature", type=nonnegative_float, default=None,
                   help="sampling temperature (0 = greedy, for confidence and threshold; default: the checkpoint's "
                        "recommended value, else 1)")
    p.add_argument("--top-k", type=positive_int, help="keep the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=probability,
                   help="nucleus sampling mass in (0, 1] (default: the checkpoint's recommended value, else 1, all)")
    p.add_argument("--eta", type=nonnegative_float, help="DDIM eta / ReMDM eta, >= 0 (default: the sampler's)")
    p.add_argument("--threshold", type=unit_interval,
                   help="confidence threshold in [0, 1] (strategy threshold; default: the sampler's)")
    p.add_argument("--block-size", type=positive_int,
                   help="semi-autoregressive blocks of this many tokens (default: one block)")
    p.add_argument("--micro-batch", type=positive_int,
                   help="call the network on exactly this many rows (sample g in row g mod M): samples then do not "
                        "depend on --batch-size or the number of processes, bit for bit (default: the batch as is; "
                        "the network's rounding can then differ between batch shapes, which flips a draw now and "
                        "then)")
    p.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                   help="call the network at every step (default: the ancestral strategy of a step-free discrete "
                        "model skips the calls of steps that unmask nothing, MDLM's cache: same samples, fewer "
                        "calls)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="ops backend")
    _add_device(p)
    _add_threads(p)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_name, default=None,
                   help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help="intra-op CPU threads (default: the automatic policy)")


def _sampling_options(args) -> dict:
    opts = {}
    for name in ("eta", "threshold", "block_size", "micro_batch", "cache"):
        v = getattr(args, name, None)
        if v is not None:
            opts[name] = v
    return opts


def _sampling_defaults(td, args) -> str:
    """Fill ``--steps``, ``--temperature``, ``--top-p`` the user left unset from the checkpoint's recommended
    sampling settings (``TextDiffusion.generation_defaults``) or the sampler's; returns a note for the
    header naming the values the checkpoint chose."""
    gen = {} if td.continuous else td.generation_defaults
    chosen = []
    for name, fallback in (("steps", 64), ("temperature", 1.0), ("top_p", None)):
        if getattr(args, name) is None:
            if name in gen:
                chosen.append(f"{name.replace('_', '-')} {gen[name]}")
            setattr(args, name, gen.get(name, fallback))
    return f" (the checkpoint's: {', '.join(chosen)})" if chosen else ""


def _check_generator(td, checkpoint: str) -> None:
    """An evaluation model (causal LM, classifier) loads as a checkpoint but cannot generate."""
    if getattr(td, "process", None) is None:
        arch = td.config.get("arch", "?") if isinstance(td.config, dict) else "?"
        raise InputError(f"--checkpoint: {checkpoint} is not a diffusion checkpoint (architecture {arch!r}, no "
                         "diffusion process); give discrete, continuous or a diffusion checkpoint directory")


def _generate(args) -> int:
    from . import distributed

    threads = _configure_threads(args)
    device = _check_device(args.device)
    _check_backend(args.backend, _device(device))
    if args.output and distributed.rank() == 0:  # only rank 0 writes
        check_writable(args.output, "--output")
    # Under torchrun: join the group (gloo on CPU, NCCL on cuda:LOCAL_RANK); every rank generates its
    # slice of the samples, rank 0 prints and writes them all in global order. Alone: a world of one.
    with distributed.session(device) as ctx:
        return _generate_on(args, ctx, threads)


def _backend_text(backend: str, device) -> str:
    if backend != "auto":
        return backend
    from . import _backends

    return f"auto: {_backends.summary(device)}"


def _generate_on(args, ctx, threads: int | None = None) -> int:
    from .pipeline import TextDiffusion

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
              + (f", top-p {args.top_p:g}" if args.top_p is not None else "") + chosen +
              f", device {td.device}, "
              f"backend {_backend_text(args.backend, td.device)}{threads}{ranks}", flush=True)
    gen = td.generate(args.num_samples, length=args.length, steps=args.steps, strategy=args.strategy,
                      seed=args.seed, batch_size=batch, label=args.label, guidance=args.guidance,
                      template=template, source=args.source, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, trajectory=args.trajectory, progress=main and _progress(args),
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
        def rows(f) -> None:
            for i, text in enumerate(gen.texts):
                f.write(_jsonl_row(i, text, gen, args, st) + "\n")

        out = write_atomic(args.output, "--output", rows)
        print(f"wrote {len(gen.texts)} samples to {out}")
    return 0


def _jsonl_row(i: int, text: str, gen, args, st: dict) -> str:
    return json.dumps({"index": i, "text": text, "tokens": gen.tokens[i].tolist(),
                       "label": gen.labels[i] if gen.labels else None, "seed": args.seed,
                       "checkpoint": str(args.checkpoint), "strategy": st["strategy"], "steps": args.steps})


# --- eval -----------------------------------------------------------------------------------------------
def _eval(args) -> int:
    from . import evaluation
    from .pipeline import TextDiffusion

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
    from .data import corpus, datasets

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


def _reference_texts(docs, td, n: int) -> list[str]:
    """``n`` validation chunks of the training length, decoded: what real text scores."""
    from .data import datasets

    chunks = datasets.lm_chunks(docs, td.tokenizer, td.seq_len, "valid")
    return [td.tokenizer.decode(row.tolist()) for row in chunks[:n]]


def _model_fit(td, docs, rows: int, seed: int) -> dict:
    """:func:`fastdiff.evaluation.model_fit` of ``td``'s model on ``rows`` held-out chunks, against the
    unigram of the training chunks (the corpus the checkpoint's figures are compared on)."""
    from . import evaluation
    from .data import datasets

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


# --- bench, train, info, demo ---------------------------------------------------------------------------
def _bench(args) -> int:
    from . import _bench as bench

    _configure_threads(args)
    device = _check_device(args.device)
    if args.json:
        check_writable(args.json, "--json")
    rows = bench.run(device=_device(device), quick=args.quick, repeat=args.repeat, sampler=not args.no_sampler)
    if args.json:
        _write_json(args.json, "--json", rows)
        print(f"wrote {args.json}")
    return 0


def _train(args) -> int:
    from . import _train_cli

    return _train_cli.run(args)


def _info(args) -> int:
    import torch

    from . import __version__, _backends

    for name, be in _backends.available().items():
        print(f"{name:<10} {'available' if be.available else 'unavailable: ' + be.reason}")
    print(f"fastdiff {__version__}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print("built: " + _build_text(_backends.build_info()))
    print(f"auto on cpu: {_backends.summary('cpu')}")
    if torch.cuda.is_available():
        print(f"auto on cuda: {_backends.summary('cuda')}")
    return 0


def _build_text(info: dict) -> str:
    """setup.py's record of the build (``_backends.build_info()``) as one line."""
    if not info:
        return ("no build record (fastdiff/_build_info.json is missing: a source tree that setup.py / pip did not "
                "build)")
    parts = [f"against torch {info['torch']}" if info.get("torch") else "torch version not recorded"]
    for key, what in (("cpp", "C++ extension"), ("cuda", "CUDA extension")):
        if key in info:
            reason = info.get(f"{key}_reason")
            if info[key]:
                parts.append(f"{what} built")
            elif info.get(f"{key}_skipped"):
                parts.append(f"{what} skipped on purpose" + (f" ({reason})" if reason else ""))
            else:
                parts.append(f"{what} not built" + (f" ({reason})" if reason else ""))
    known = {"torch", "cpp", "cuda", "cpp_reason", "cuda_reason", "cpp_skipped", "cuda_skipped"}
    parts += [f"{k} {v}" for k, v in sorted(info.items()) if k not in known]
    return ", ".join(parts)


def _demo(args) -> int:
    from . import _demo

    _configure_threads(args)
    if args.json:
        check_writable(args.json, "--json")
    results = _demo.run(seed=args.seed, quick=args.quick)
    if args.json:
        _write_json(args.json, "--json", results)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdiff", formatter_class=_Help,
                     description="Kernel-backed text diffusion: generate, train, evaluate, benchmark. Without a "
                                 "command: fastdiff generate.")
    sub = parser.add_subparsers(dest="command")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_Help)

    g = command("generate", "generate text (the main job)")
    _add_sampling(g)
    g.add_argument("--num-samples", "-n", type=positive_int, default=4, help="samples to generate")
    start = g.add_mutually_exclusive_group()
    start.add_argument("--prompt", help="fixed text at the start; the rest is generated")
    start.add_argument("--template", help="infilling template: [MASK] = one generated token, [MASK*n] = n of them")
    g.add_argument("--source", help="input text of a text-to-text checkpoint")
    g.add_argument("--output", "-o", help="write the samples as JSONL (checked before the work, written atomically)")
    g.add_argument("--trajectory", action="store_true", help="print sample 0 after the denoising steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is not a "
                                                              "terminal)")
    g.add_argument("--quiet", action="store_true", help="no header line")
    g.set_defaults(func=_generate)

    e = command("eval", "generative perplexity, distinct-n, attribute accuracy, BLEU; the model's fit to held-out "
                        "text (NELBO bound, x0 cross-entropy and accuracy against the unigram's)")
    _add_sampling(e)
    e.add_argument("--samples", type=positive_int, default=64, help="samples to generate and score")
    e.add_argument("--fit-rows", type=non_negative_int, default=256,
                   help="held-out chunks for the model-fit figures (0: skip them)")
    e.add_argument("--lm", default="causal_lm", help="scoring causal LM (bundled name or directory, or none)")
    e.add_argument("--classifier", default="classifier", help="attribute classifier (bundled, directory, none)")
    e.add_argument("--data", nargs="*", help="text files for the reference texts / pairs (default: Python docs)")
    e.add_argument("--json", help="write the scores as JSON (checked before the work, written atomically)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)

    t = command("train", "train a model (config file and/or flags; --resume continues a run)")
    from . import _train_cli

    _train_cli.add_arguments(t)
    t.set_defaults(func=_train)

    b = command("bench", "ops per backend and the sampler, one table (rows print as they are measured)")
    _add_device(b)
    b.add_argument("--quick", action="store_true", help="smaller sizes")
    b.add_argument("--repeat", type=positive_int, default=3, help="timed runs per row (the best is kept)")
    b.add_argument("--no-sampler", action="store_true", help="ops only")
    b.add_argument("--json", help="write the rows as JSON (checked before the work, written atomically)")
    _add_threads(b)
    b.set_defaults(func=_bench)

    i = command("info", "backends (and why not), what the install was built with, what auto runs")
    i.set_defaults(func=_info)

    d = command("demo", "every op timed and sampling loops on random weights")
    d.add_argument("--seed", type=seed_int, default=0, help="random seed, in [0, 2**64)")
    d.add_argument("--quick", action="store_true", help="smaller sizes")
    d.add_argument("--json", metavar="PATH", help="write the figures as JSON (checked before the work)")
    _add_threads(d)
    d.set_defaults(func=_demo)
    return parser


# --- main -----------------------------------------------------------------------------------------------
def _user_paths(args) -> list[str]:
    """Every string the user passed (any of them may be a path an OSError is about)."""
    out: list[str] = []
    for v in vars(args).values():
        if isinstance(v, (str, os.PathLike)):
            out.append(os.fspath(v))
        elif isinstance(v, (list, tuple)):
            out += [os.fspath(x) for x in v if isinstance(x, (str, os.PathLike))]
    return [p for p in out if p]


def _about_user_path(e: OSError, paths: list[str]) -> bool:
    """True when ``e`` names a path the user gave or a path inside it (a checkpoint directory's files)."""
    for name in (e.filename, e.filename2):
        if not isinstance(name, (str, bytes, os.PathLike)):
            continue
        a = os.path.abspath(os.fsdecode(name))
        for p in paths:
            b = os.path.abspath(p)
            if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
                return True
    return False


def _os_error_text(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        where = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes, os.PathLike)) else str(e.filename)
        if e.filename2 is not None:
            where += f" -> {os.fsdecode(e.filename2)}"
        return f"{where}: {e.strerror}"
    return str(e)


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _fail(message: str) -> int:
    print(f"fastdiff: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 2 bad input, 130 interrupted, 141 closed pipe)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["generate", *argv]
    args = None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse: --help (0) or a bad option (2, its message already printed)
            sys.stdout.flush()
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EPIPE_STATUS
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130
    except FastdiffError as e:
        return _fail(str(e))
    except OSError as e:
        # ours, deliberately: an OSError raised with a message only (e.g. "checkpoint: ... does not exist");
        # the user's: one about a path they gave. Anything else (a file of the install, ...) is a bug.
        if (e.errno is None and e.filename is None) or (args is not None and _about_user_path(e, _user_paths(args))):
            return _fail(_os_error_text(e))
        raise


if __name__ == "__main__":
    sys.exit(main())
