"""Helpers that the ``fastdiff`` subcommands share (:mod:`fastdiff.cli`): parse-time argument types, the
parser's error and help classes, the sampling options of ``generate`` and ``eval``, device / backend /
thread checks, output paths (checked before the work, written atomically), sizes against memory, and the
error handling of :func:`fastdiff.cli.main`. The public names are re-exported by :mod:`fastdiff.cli`.
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
from typing import IO, TYPE_CHECKING, Any, NoReturn

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..pipeline import TextDiffusion

BACKEND_CHOICES = ("auto", "reference", "cpp", "triton", "cuda")
EPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


# --- parse-time types: every numeric option is checked before any model is loaded ----------------------
def _int(text: str, lo: int = 0, hi: int | None = None, rule: str = "") -> int:
    """An integer in ``[lo, hi)`` (``hi=None``: no upper bound); ``rule`` is what the error says it must be."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < lo or (hi is not None and v >= hi):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int(text, 1, rule="an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int(text, 0, rule="an integer >= 0")


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**64)."""
    return _int(text, 0, 2**64, rule="an integer in [0, 2**64)")


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

    def error(self, message: str) -> NoReturn:
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

    from .. import _backends
    from ..ops import _dispatch

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


def _configure_threads(args: argparse.Namespace) -> int:
    from .. import _threads

    return _threads.configure(getattr(args, "threads", None))


def _progress(args: argparse.Namespace) -> bool:
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


def write_atomic(path: str | os.PathLike, flag: str, write: Callable[[IO[str]], object]) -> Path:
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


def _write_json(path: str, flag: str, obj: Any) -> None:
    write_atomic(path, flag, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


# --- sizes against memory -------------------------------------------------------------------------------
def available_memory(device: str | torch.device) -> int | None:
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


def sample_bytes(td: TextDiffusion, length: int, guidance: float = 1.0) -> int:
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


def plan_batch(td: TextDiffusion, device: str | torch.device, *, num_samples: int, length: int,
               batch_size: int | None, steps: int, trajectory: bool = False, guidance: float = 1.0,
               samples_flag: str = "--num-samples",
               memory: Callable[[torch.device], int | None] | None = None) -> int:
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


# --- sampling options (generate, eval) ------------------------------------------------------------------
def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", default="discrete",
                   help="bundled name (discrete, bd3, continuous, latent) or a checkpoint directory")
    p.add_argument("--strategy", help="ancestral | confidence | threshold | remask | ar_ancestral (discrete), "
                                      "ddpm | ddim | ar (continuous); default: ancestral (discrete), ddim (continuous)")
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


def _sampling_options(args: argparse.Namespace) -> dict:
    opts = {}
    for name in ("eta", "threshold", "block_size", "micro_batch", "cache"):
        v = getattr(args, name, None)
        if v is not None:
            opts[name] = v
    return opts


def _sampling_defaults(td: TextDiffusion, args: argparse.Namespace) -> str:
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
    return f" (recommended by the checkpoint: {', '.join(chosen)})" if chosen else ""


def _check_generator(td: TextDiffusion, checkpoint: str) -> None:
    """An evaluation model (causal LM, classifier) loads as a checkpoint but cannot generate."""
    if getattr(td, "process", None) is None:
        arch = td.config.get("arch", "?") if isinstance(td.config, dict) else "?"
        raise InputError(f"--checkpoint: {checkpoint} is not a diffusion checkpoint (architecture {arch!r}, no "
                         "diffusion process); give discrete, continuous or a diffusion checkpoint directory")



# --- errors (main) --------------------------------------------------------------------------------------
def _user_paths(args: argparse.Namespace) -> list[str]:
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


