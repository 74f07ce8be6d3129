"""``fastdiff train``: build the data of a task from a corpus, train, checkpoint, resume, export.

Configuration comes from ``--config FILE`` (a :class:`fastdiff.training.TrainConfig` JSON, or a
checkpoint's config.json whose ``"train"`` section is used), then the flags, then ``--set KEY=VALUE``
(JSON values; ``model.width=256`` sets a model field). The data are the Python docs corpus
(:func:`fastdiff.data.python_docs`) or ``--data`` files (``.txt`` / ``.jsonl``). ``--scorer
causal_lm|classifier`` trains an evaluation model instead. ``--export DIR`` writes a small fp16
weights-only copy (what ships in ``fastdiff/assets``) with the log.

Run directories (see :data:`DESCRIPTION`, shown by ``fastdiff train --help``): a fresh run refuses a
directory that already holds a run unless ``--overwrite``; ``--resume D`` continues D's newest complete
checkpoint and writes into D (or, with ``--out O``, into O, only reading D); every path is checked before
any training work.

Under ``torchrun --nproc-per-node N`` every process joins the group (gloo on CPU, NCCL on
``cuda:LOCAL_RANK``) and trains its share of each global batch under DistributedDataParallel (``--parallel
fsdp`` for FSDP2); rank 0 alone prints, logs and writes checkpoints. ``--resume`` works on any world size
that divides the run's global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, InputTypeError

if TYPE_CHECKING:
    from ..data import TextTokenizer
    from ..data.corpus import Document
    from ..distributed import Context

_FLAG_FIELDS = {  # flag dest -> TrainConfig field
    "family": "family", "task": "task", "kind": "kind", "schedule": "schedule", "T": "T", "steps": "max_steps",
    "batch_size": "batch_size", "seq_len": "seq_len", "src_len": "src_len", "lr": "lr", "warmup": "warmup_steps",
    "seed": "seed", "out": "out_dir", "device": "device", "loss": "loss", "conditioning": "conditioning",
    "cond_drop": "cond_drop", "timestep_sampler": "timestep_sampler", "ema_decay": "ema_decay",
    "ckpt_every": "ckpt_every", "log_every": "log_every", "eval_every": "eval_every",
    "lam_anchor": "lam_anchor", "grad_accum": "grad_accum", "parallel": "parallel", "keep_best": "keep_best",
    "dropout": "model.dropout", "hybrid_lambda": "hybrid_lambda", "lr_schedule": "lr_schedule",
    "min_lr_ratio": "min_lr_ratio", "ar_diffusion": "ar_diffusion",
}
_MODEL_FLAGS = ("width", "layers", "heads", "embed_dim")
#: flags that may be given with --resume (everything else is the run's and cannot change)
_RESUME_FLAGS = ("steps", "log_every", "ckpt_every", "eval_every", "keep_best", "device", "grad_accum", "parallel")
#: the command line's own files in a run directory (besides the trainer's, see training.trainer.run_artefacts)
CLI_FILES = ("command.txt", "train_config.json", "tokenizer.json")
DEFAULT_SEQ_LEN = 64
HELP = "train a model (config file and/or flags; --resume continues a run)"

# int flag -> its minimum (floats are checked in _check_flags)
_INT_FLAGS = {"T": 1, "steps": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "src_len": 1, "warmup": 0,
              "seed": 0, "ckpt_every": 0, "log_every": 1, "eval_every": 0, "width": 1, "layers": 1, "heads": 1,
              "embed_dim": 1, "train_tokenizer": 1, "threads": 1}

DESCRIPTION = """\
Train a text diffusion model (with --scorer: an evaluation model) on the Python docs or on --data files.

Configuration: --config FILE (a TrainConfig JSON, or a checkpoint's config.json: its "train" section),
then the flags, then --set KEY=VALUE (JSON values; model.KEY=VALUE for the model). Anything not given
takes the default shown below. Every value is checked before any work: 0 or a negative number where it
makes no sense (--seq-len 0, --steps 0, ...) is an error, never replaced by a default.

Run directories:
  * A fresh run writes --out DIR (train_log.jsonl, step_<N>/ checkpoints, latest, command.txt,
    train_config.json). It refuses a DIR that already holds a run (any of those, or a checkpoint);
    --overwrite deletes those entries (nothing else in DIR) and starts afresh.
  * --resume D continues the run from D's newest complete checkpoint: D is a run directory (the
    checkpoint its `latest` names, else its newest complete, verified step_<N>/) or a checkpoint
    directory. The run goes on in the directory given - D itself, or the directory holding the
    checkpoint D - and never in the directory recorded inside the checkpoint (a copy of a run resumes
    into the copy). --out O (another directory) continues it into O instead: O receives the log up to
    the checkpoint and the new checkpoints, D is only read; O must not hold a run (unless --overwrite).
  * Only --steps (not below the checkpoint's step), --log-every, --ckpt-every, --eval-every, --device,
    --grad-accum, --parallel and --set of the resumable fields may change on --resume; any other
    training flag is refused.
  * Checkpoints are written atomically (`latest` names a complete checkpoint at every instant), with the
    SHA-256 of every file in config.json, verified whenever they are read; weights holding NaN/inf are
    refused. Leftovers of a killed save are removed by the next save or resume. A torn last line of
    train_log.jsonl (a write killed half way) is dropped on resume.
  * --export DIR must be new, empty or a checkpoint directory (it is replaced), outside the run directory.
"""


def _defaults() -> tuple[dict, dict]:
    from ..models.sed import SEDConfig
    from ..training import TrainConfig

    return ({f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING},
            {f.name: f.default for f in dataclasses.fields(SEDConfig) if f.default is not dataclasses.MISSING})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` sub-command's options (help with every default) on ``p``."""
    tc, sed = _defaults()

    def d(field: str, shown: object = None) -> str:
        return f" (default: {tc[field] if shown is None else shown})"

    base = p.formatter_class  # the command line's formatter, keeping DESCRIPTION's line breaks too
    if not issubclass(base, argparse.RawDescriptionHelpFormatter):
        p.formatter_class = type("TrainHelpFormatter", (argparse.RawDescriptionHelpFormatter, base), {})
    p.description = DESCRIPTION
    p.add_argument("--config", help="TrainConfig JSON file, or a checkpoint's config.json (its \"train\" section) "
                   "(default: none, every field at its default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (JSON value); model.KEY for the model config "
                   "(repeatable; default: none)")
    p.add_argument("--family", choices=("discrete", "continuous", "latent"),
                   help="process family; latent: LD4LG latent diffusion over a frozen encoder-decoder (--stage, "
                   "--plm; its own --set keys: fastdiff.latent.LatentConfig)" + d("family"))
    p.add_argument("--stage", choices=("plm", "ae", "diffusion", "all"),
                   help="--family latent: train the small encoder-decoder (plm), the latent autoencoder (ae), the "
                   "latent denoiser (diffusion), or all three in turn (default: all)")
    p.add_argument("--plm", metavar="HF_DIR",
                   help="--family latent: a local Hugging Face seq2seq model to use frozen instead of training one "
                   "(default: train a small one on the data)")
    p.add_argument("--task", choices=("lm", "attribute", "word_order"), help="training task" + d("task"))
    from ..training.process import kinds

    p.add_argument("--kind", choices=kinds(), help="discrete corruption; gaussian_band, nearest_neighbor and dense "
                   "are D3PM's matrix processes (small vocabularies: --train-tokenizer) with parameters "
                   "--set 'process_kw={\"bandwidth\": 4}' ({\"k\": 8, \"embeddings\": \"model\" or FILE}, "
                   "{\"Q\": FILE}: .safetensors)" + d("kind"))
    p.add_argument("--schedule", help="linear, cosine, sqrt, mutual_info, spindle, adaptive"
                   + d("schedule", "auto: mutual_info for discrete, sqrt for continuous"))
    p.add_argument("--T", type=int, help="diffusion steps of the process" + d("T"))
    p.add_argument("--steps", type=int, help="max_steps: train until this step" + d("max_steps"))
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch on each process" + d("batch_size"))
    p.add_argument("--grad-accum", type=int,
                   help="micro-batches per update (global batch = batch x processes x this)" + d("grad_accum"))
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="under torchrun: DistributedDataParallel or FSDP2" + d("parallel"))
    p.add_argument("--seq-len", type=int, help="tokens per training sequence" + d("seq_len", DEFAULT_SEQ_LEN))
    p.add_argument("--src-len", type=int, help="source length (word_order)" + d("src_len", "the sequence length"))
    p.add_argument("--lr", type=float, help="peak learning rate" + d("lr"))
    p.add_argument("--warmup", type=int, help="linear warm-up steps" + d("warmup_steps"))
    p.add_argument("--seed", type=int, help="seed of initialisation, data order and noise" + d("seed"))
    p.add_argument("--loss", choices=("hybrid", "mdlm"), help="discrete objective" + d("loss"))
    p.add_argument("--conditioning", choices=("concat", "cross"), help="word_order conditioning" + d("conditioning"))
    p.add_argument("--cond-drop", type=float, help="classifier-free guidance dropout probability" + d("cond_drop"))
    p.add_argument("--timestep-sampler", choices=("uniform", "loss-aware"), help="timestep sampling"
                   + d("timestep_sampler"))
    p.add_argument("--ar-diffusion", action="store_true", default=None,
                   help="continuous: AR-Diffusion's token-level steps (Wu et al. 2023; sample it with "
                   "--strategy ar)" + d("ar_diffusion"))
    p.add_argument("--ema-decay", type=float, help="EMA decay, 0 = no EMA" + d("ema_decay"))
    p.add_argument("--lam-anchor", type=float, help="continuous: anchor loss weight" + d("lam_anchor"))
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps, 0 = only at the end" + d("ckpt_every"))
    p.add_argument("--log-every", type=int, help="log line every N steps" + d("log_every"))
    p.add_argument("--eval-every", type=int, help="validation every N steps, 0 = never" + d("eval_every"))
    p.add_argument("--keep-best", action="store_true", default=None,
                   help="with --eval-every: keep the checkpoint of the lowest validation loss in <out>/best; "
                        "--export exports it")
    p.add_argument("--dropout", type=float, help="model dropout" + f" (default: {sed['dropout']})")
    p.add_argument("--hybrid-lambda", type=float, help="discrete hybrid loss: weight of the x0 cross-entropy"
                   + d("hybrid_lambda"))
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), help="after warm-up" + d("lr_schedule"))
    p.add_argument("--min-lr-ratio", type=float, help="cosine schedule: final lr / lr" + d("min_lr_ratio"))
    for name in _MODEL_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"model {name} (default: {sed[name]})")
    p.add_argument("--out", help="run directory (checkpoints, train_log.jsonl); with --resume: continue into it"
                   + d("out_dir", f"{tc['out_dir']}; with --resume: the run resumed"))
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its log, checkpoints, latest and command-line files)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto" + d("device", "auto; with --resume: the run's"))
    p.add_argument("--threads", type=int, metavar="N",
                   help="intra-op CPU threads per process (default: automatic)")
    p.add_argument("--data", nargs="+", help="training text: .txt / .jsonl files (default: the Python docs)")
    p.add_argument("--balance", action="store_true", help="attribute task: subsample classes to equal size")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the bundled one)")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                   help="train a BPE tokenizer of this size on the data (saved in the run directory; default: "
                   "use --tokenizer)")
    p.add_argument("--init-embeddings", metavar="HF_DIR",
                   help="initialise the token embeddings from a pretrained model in a local Hugging Face directory "
                   "(default: random initialisation)")
    p.add_argument("--init-from", metavar="CKPT_DIR",
                   help="initialise the model's weights from a checkpoint (its EMA weights; the same architecture and "
                   "tokenizer), e.g. to fine-tune a block-causal model (--set model.block_size=16) from a "
                   "bidirectional one as BD3-LM does (default: random initialisation)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue a run (its newest complete checkpoint) in DIR, or in --out (default: a fresh run)")
    p.add_argument("--scorer", choices=("causal_lm", "classifier"),
                   help="train an evaluation model instead (default: a diffusion model)")
    p.add_argument("--export", metavar="DIR",
                   help="after training, write a small fp16 copy here (with the log; default: no export)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none off a terminal)")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_flags(args: argparse.Namespace) -> None:
    """Every numeric flag in range, before any work (one-line InputErrors naming the flag)."""
    for dest, minimum in _INT_FLAGS.items():
        v = getattr(args, dest, None)
        if v is not None and v < minimum:
            raise InputError(f"{_flag(dest)}: must be >= {minimum}, got {v}")
    floats = {"lr": (0.0, None, True), "cond_drop": (0.0, 1.0, False), "ema_decay": (0.0, 1.0, False),
              "lam_anchor": (0.0, None, False), "dropout": (0.0, 1.0, False), "hybrid_lambda": (0.0, None, False),
              "min_lr_ratio": (0.0, 1.0, False)}
    hi_open = ("ema_decay", "dropout")
    for dest, (lo, hi, lo_open) in floats.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi) \
                or (dest in hi_open and v >= 1.0):
            rng = f"> {lo}" if lo_open else (f"in [{lo}, {hi}{')' if dest in hi_open else ']'}" if hi is not None
                                             else f">= {lo}")
            raise InputError(f"{_flag(dest)}: must be a finite number {rng}, got {v}")
    for item in args.set:
        if "=" not in item:
            raise InputError(f"--set: expected KEY=VALUE, got {item!r}")


def _sets(args: argparse.Namespace) -> list[tuple[str, object]]:
    out = []
    for item in args.set:
        if "=" not in item:
            raise InputError(f"--set: expected KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        out.append((key.strip(), _value(val)))
    return out


def _config_file(path: str) -> dict:
    """The raw TrainConfig dict of ``--config`` (only the keys the file sets), validated."""
    from ..training import TrainConfig
    from ..training.config import load_config_dict

    d = load_config_dict(path, what="--config")
    try:
        TrainConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise (InputTypeError if isinstance(e, TypeError) else InputError)(f"--config {path}: {e}") from None
    return d


def config_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig dict: file, then flags, then ``--set`` (only the keys given; the rest defaults)."""
    d = _config_file(args.config) if args.config else {}
    model = dict(d.get("model", {}))
    for dest, field in _FLAG_FIELDS.items():
        v = getattr(args, dest, None)
        if v is not None:
            if field.startswith("model."):
                model[field.removeprefix("model.")] = v
            else:
                d[field] = v
    for name in _MODEL_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            model[name] = v
    for key, val in _sets(args):
        if key.startswith("model."):
            model[key[len("model."):]] = val
        else:
            if key in ("seq_len", "src_len") and val == 0:
                raise InputError(f"--set {key}=0: the command line cuts the corpus into sequences of this "
                                 "length; it must be >= 1 (leave it out for the default)")
            d[key] = val
    if model:
        d["model"] = model
    return d


def _docs(args: argparse.Namespace) -> list[Document]:
    from ..data import corpus

    return corpus.load_texts(args.data) if args.data else corpus.python_docs()


def _tokenizer(args: argparse.Namespace, docs: list[Document], out_dir: Path, save: bool = True) -> TextTokenizer:
    from ..data import TextTokenizer, default_tokenizer

    if args.train_tokenizer:  # deterministic: every rank trains the same one, rank 0 saves it
        tok = TextTokenizer.train([d.text for d in docs], vocab_size=args.train_tokenizer)
        if save:
            out_dir.mkdir(parents=True, exist_ok=True)
            tok.save(out_dir / "tokenizer.json")
        return tok
    if args.tokenizer:
        return TextTokenizer.load(args.tokenizer)
    return default_tokenizer()


def task_data(task: str, docs: list[Document], tok: TextTokenizer, seq_len: int, src_len: int = 0,
              balance: bool = False, label_names: list[str] | None = None) -> tuple[dict, dict, list[str]]:
    """``(train, valid, label_names)`` tensors of a task (see :data:`fastdiff.training.DATA_KEYS`);
    ``src_len`` 0: the sequence length."""
    from ..data import datasets

    if task == "lm":
        return ({"tokens": datasets.lm_chunks(docs, tok, seq_len, "train")},
                {"tokens": datasets.lm_chunks(docs, tok, seq_len, "valid")}, [])
    if task == "attribute":
        names = list(label_names) if label_names else sorted({d.source for d in docs})
        if set(names) == set(datasets.ATTRIBUTES):
            names = list(datasets.ATTRIBUTES)
        tr = datasets.attribute_chunks(docs, tok, seq_len, "train", balance=balance, attributes=tuple(names))
        va = datasets.attribute_chunks(docs, tok, seq_len, "valid", balance=True, attributes=tuple(names))
        return {"tokens": tr[0], "labels": tr[1]}, {"tokens": va[0], "labels": va[1]}, names
    src_len = src_len if src_len > 0 else seq_len
    tr = datasets.word_order_tensors(datasets.word_order_pairs(docs, "train"), tok, src_len, seq_len)
    va = datasets.word_order_tensors(datasets.word_order_pairs(docs, "valid"), tok, src_len, seq_len)
    return {"src": tr[0], "tgt": tr[1]}, {"src": va[0], "tgt": va[1]}, []


# --- run directories -----------------------------------------------------------------------------
def _existing_run(out: Path) -> list[str]:
    from ..training.rundir import run_artefacts

    found = run_artefacts(out)
    return found + [n for n in CLI_FILES if n not in found and (out / n).is_file()]


def _refuse_existing(out: Path, flag: str, resume_hint: bool) -> None:
    found = _existing_run(out)
    if found:
        shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
        resumable = any(n == "latest" or n.startswith("step_") for n in found)
        hint = f"continue it with --resume {out}, " if resume_hint and resumable else ""
        raise InputError(f"{flag}: {out} already holds a training run ({shown}); {hint}choose another "
                         "directory, or add --overwrite to replace it")


def _remove_existing(out: Path) -> None:
    from ..training.rundir import remove_run_artefacts

    remove_run_artefacts(out)
    for n in CLI_FILES:
        (out / n).unlink(missing_ok=True)


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies under it (paths resolved; neither needs to exist)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _check_export(args: argparse.Namespace, out: Path, source: Path | None = None) -> None:
    from ..training.checkpoint import check_replaceable

    if not args.export:
        return
    dst = Path(args.export)
    for other, what in ((out, "the run directory"), (source, "the run resumed")):
        if other is not None and _inside(other, dst):  # dst is the run directory or holds it
            raise InputError(f"--export: {dst} would replace {what} {other}; export to another directory")
        if other is not None and _inside(dst, other):  # e.g. one of the run's own checkpoints
            raise InputError(f"--export: {dst} lies inside {what} {other}; export to a directory outside it")
    check_replaceable(dst, "--export")


@dataclasses.dataclass
class _Plan:
    out: Path
    out_flag: str
    fresh_config: dict | None = None  # a fresh run's TrainConfig dict
    ckpt_dir: Path | None = None  # --resume: the checkpoint
    source: Path | None = None  # --resume: the source run directory
    same: bool = True  # --resume: the run goes on in its own directory


def _plan(args: argparse.Namespace) -> _Plan:
    """Everything about paths, checked before any work (reads only)."""
    from ..training import TrainConfig, read_config, resolve_checkpoint_dir
    from ..training.checkpoint import CONFIG_FILE, ensure_directory_target
    from ..training.rundir import same_dir as _same_dir

    if args.resume:
        given = Path(args.resume)
        ckpt_dir = resolve_checkpoint_dir(given)
        source = given.parent if (given / CONFIG_FILE).is_file() else given
        step = read_config(ckpt_dir)["step"]
        if args.steps is not None and args.steps < step:
            raise InputError(f"--steps: {args.steps} is below the step of the checkpoint {ckpt_dir} ({step})")
        sets = dict(_sets(args))
        out_text = args.out if args.out is not None else sets.get("out_dir")
        if out_text is not None and not isinstance(out_text, str):
            raise InputError(f"--set out_dir: expected a path, got {out_text!r}")
        out = Path(out_text) if out_text is not None else source
        same = _same_dir(out, source)
        flag = "--out" if args.out is not None else "--set out_dir" if out_text is not None else "--resume"
        ensure_directory_target(out, flag)
        if same and args.overwrite:
            raise InputError(f"--overwrite: {out} is the run being resumed; it is continued, not replaced "
                             "(--overwrite applies to --out of another directory, or to a fresh run)")
        if not same and not args.overwrite:
            _refuse_existing(out, flag, resume_hint=False)
        _check_export(args, out, source)
        return _Plan(out=out, out_flag=flag, ckpt_dir=ckpt_dir, source=source, same=same)
    d = config_from_args(args)
    cfg = TrainConfig.from_dict(d)
    out = Path(cfg.out_dir)
    flag = "--out" if args.out is not None else "out_dir"
    ensure_directory_target(out, flag)
    if not args.overwrite:
        _refuse_existing(out, flag, resume_hint=True)
    _check_export(args, out)
    return _Plan(out=out, out_flag=flag, fresh_config=d)


def _check_resume_flags(args: argparse.Namespace) -> None:
    from ..training.config import RESUMABLE_OVERRIDES

    fixed = [dest for dest in (*_FLAG_FIELDS, *_MODEL_FLAGS) if dest not in (*_RESUME_FLAGS, "out")
             and getattr(args, dest, None) is not None]
    fixed += [dest for dest in ("config", "tokenizer", "train_tokenizer", "init_embeddings", "init_from")
              if getattr(args, dest, None) is not None]
    if fixed:
        raise InputError(f"{_flag(fixed[0])}: cannot change on --resume (the run keeps its own value); with "
                         f"--resume only {', '.join(_flag(x) for x in _RESUME_FLAGS)}, --out, --data, --export and "
                         f"--set of {', '.join(RESUMABLE_OVERRIDES)} may be given")
    for key, _ in _sets(args):
        if key not in RESUMABLE_OVERRIDES:
            raise InputError(f"--set {key}: cannot change on --resume; resumable fields: "
                             f"{', '.join(RESUMABLE_OVERRIDES)}")


def run(args: argparse.Namespace) -> int:
    from .. import _threads

    _threads.configure(args.threads)
    _check_flags(args)
    if args.family == "latent":
        return _run_latent(args)
    for flag in ("stage", "plm"):
        if getattr(args, flag, None) is not None:
            raise InputError(f"--{flag}: only for --family latent")
    if args.scorer:
        if args.resume:
            raise InputError("--resume: a scorer run (--scorer) cannot be resumed; train it again into a new --out")
        return _run_scorer(args)
    if args.resume:
        _check_resume_flags(args)
    plan = _plan(args)
    from .. import distributed

    from ..training.parallel import check_device

    device = getattr(args, "device", None)
    if device is not None:
        check_device(device, "--device")
    elif plan.ckpt_dir is not None:
        from ..training import read_config

        device = read_config(plan.ckpt_dir).get("train", {}).get("device", "auto")
        check_device(device, f"device (of the run in {plan.ckpt_dir}; choose another with --device)")
    elif plan.fresh_config is not None and "device" in plan.fresh_config:
        device = plan.fresh_config["device"]
        check_device(device, "device")
    with distributed.session(device or "auto") as ctx:
        return _run(args, ctx, plan)


def _command_line(ctx: Context) -> str:
    prefix = f"torchrun --nproc-per-node {ctx.world_size} -m fastdiff " if ctx.distributed else "fastdiff "
    return prefix + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "\n"


def _run(args: argparse.Namespace, ctx: Context, plan: _Plan) -> int:
    from .. import distributed
    from ..training import TrainConfig, Trainer, export_checkpoint, read_config
    from ..training.rundir import BEST_DIR
    from ..training.config import RESUMABLE_OVERRIDES

    progress = not args.no_progress
    main = ctx.is_main
    say = print if main else (lambda *a, **k: None)
    out_dir = plan.out
    if args.overwrite:  # checked in _plan: a fresh run, or a resume into another directory
        if main:
            _remove_existing(out_dir)
        distributed.barrier()
    if plan.ckpt_dir is not None:
        ckpt_dir = plan.ckpt_dir
        ck_cfg = read_config(ckpt_dir)
        try:
            cfg = TrainConfig.from_dict(ck_cfg.get("train", {}))
        except (TypeError, ValueError) as e:
            raise InputError(f"--resume: {ckpt_dir} is not a resumable diffusion training checkpoint "
                             f"(train: {e})") from None
        overrides = {k: v for k, v in _sets(args) if k in RESUMABLE_OVERRIDES}
        if args.steps is not None:
            overrides["max_steps"] = args.steps
        for dest in ("log_every", "ckpt_every", "eval_every", "device", "grad_accum", "parallel"):
            if getattr(args, dest, None) is not None:
                overrides[dest] = getattr(args, dest)
        overrides["out_dir"] = str(out_dir)
        docs = _docs(args)
        from ..training.checkpoint import load_tokenizer

        tok = load_tokenizer(ckpt_dir, ck_cfg)
        train, valid, _ = task_data(cfg.task, docs, tok, cfg.seq_len, cfg.src_len, args.balance, cfg.label_names)
        # the path given: a resume into its own run directory first completes or removes what a killed save
        # left there, which can change the checkpoint it resolves to (the same step)
        trainer = Trainer.resume(args.resume, train, valid, overwrite=args.overwrite, **overrides)
        if main:
            history = ""
            if plan.same and (out_dir / "command.txt").is_file():
                history = (out_dir / "command.txt").read_text(encoding="utf-8")
            elif not plan.same and plan.source is not None and (plan.source / "command.txt").is_file():
                history = (plan.source / "command.txt").read_text(encoding="utf-8")
            if history and not history.endswith("\n"):
                history += "\n"
            (out_dir / "command.txt").write_text(history + _command_line(ctx), encoding="utf-8")
            trainer.config.save(out_dir / "train_config.json")
        where = "" if plan.same else f" into {out_dir} (the source {plan.source} is left as it is)"
        say(f"resumed {trainer.resumed_from} at step {trainer.global_step} of {trainer.config.max_steps}{where}"
            + (f" on {ctx.world_size} processes, {trainer.config.batch_size} sequences per micro-batch"
               if ctx.distributed else ""))
    else:
        d = dict(plan.fresh_config or {})
        cfg = TrainConfig.from_dict(d)
        docs = _docs(args)
        tok = _tokenizer(args, docs, out_dir, save=False)  # saved with the run's files below
        seq_len = cfg.seq_len if cfg.seq_len > 0 else DEFAULT_SEQ_LEN
        src_len = cfg.src_len if cfg.src_len > 0 else seq_len
        train, valid, names = task_data(cfg.task, docs, tok, seq_len, src_len, args.balance, cfg.label_names)
        if cfg.task == "attribute":
            d["label_names"] = names
            d.setdefault("model", {})["num_labels"] = len(names)
        d["seq_len"] = seq_len
        if cfg.task == "word_order":
            d["src_len"] = src_len
        cfg = TrainConfig.from_dict(d)
        model = None
        if args.init_embeddings:  # before the trainer: its EMA and a nearest_neighbor process see them
            from ..models.pretrained import init_embeddings_from_pretrained
            from ..training.setup import build_model

            model = build_model(cfg, tok, train)  # the model the trainer would build
            table = model.embedding.embedding if getattr(model, "embedding", None) is not None \
                else model.token_embedding
            found = init_embeddings_from_pretrained(table, tok, args.init_embeddings)
            say(f"embeddings: {int(found.sum())} of {tok.vocab_size} rows from {args.init_embeddings}")
        if args.init_from:  # the weights of a checkpoint (block_size and dropout add no parameters)
            from ..training.checkpoint import load_checkpoint
            from ..training.setup import build_model

            model = model if model is not None else build_model(cfg, tok, train)
            ck = load_checkpoint(args.init_from, tokenizer=tok, model=model)
            say(f"weights: from {ck.path} (step {ck.step})")
        trainer = Trainer(cfg, train, valid, tokenizer=tok, model=model)
        if main:  # only once everything is set up: a run that fails to start leaves no files behind
            out_dir.mkdir(parents=True, exist_ok=True)
            if args.train_tokenizer:
                tok.save(out_dir / "tokenizer.json")
            (out_dir / "command.txt").write_text(_command_line(ctx), encoding="utf-8")
            cfg.save(out_dir / "train_config.json")
        n = sum(p.numel() for p in trainer.model.parameters())
        scale = (f", {ctx.world_size} processes ({ctx.backend}, {cfg.parallel}) x {cfg.batch_size} x "
                 f"{cfg.grad_accum} = global batch {trainer.global_batch}" if ctx.distributed else "")
        say(f"training {cfg.family} {cfg.arch} ({n / 1e6:.2f} M parameters) on task {cfg.task}: "
            f"{next(iter(train.values())).shape[0]} training sequences, {cfg.max_steps} steps{scale} -> {out_dir}")
    trainer.fit(progress=progress)
    out_dir = Path(trainer.config.out_dir)
    say(f"done: step {trainer.global_step}; checkpoints and train_log.jsonl in {out_dir}")
    if args.export and main:
        best = out_dir / BEST_DIR
        src = best if trainer.config.keep_best and best.is_dir() else out_dir
        dst = export_checkpoint(src, args.export)
        for name in ("train_log.jsonl", "command.txt", "train_config.json"):
            if (out_dir / name).is_file():
                shutil.copy(out_dir / name, dst / name)
        print(f"exported {dst}")
    return 0


def _run_scorer(args: argparse.Namespace) -> int:
    from ..models import build_model
    from ..training import TrainConfig, export_checkpoint
    from ..training.auxiliary import train_scorer
    from ..training.checkpoint import ensure_directory_target

    d = config_from_args(args)
    cfg = TrainConfig.from_dict(d)  # the types and ranges of every field given

    def given(field: str, default: Any) -> Any:
        return getattr(cfg, field) if field in d else default

    out_dir = Path(given("out_dir", f"runs/{args.scorer}"))
    flag = "--out" if args.out is not None else "out_dir"
    ensure_directory_target(out_dir, flag)
    if args.overwrite:
        _remove_existing(out_dir)
        if (out_dir / "final" / "config.json").is_file():  # the scorer's checkpoint
            shutil.rmtree(out_dir / "final")
    else:
        found = _existing_run(out_dir) + (["final"] if (out_dir / "final").exists() else [])
        if found:
            raise InputError(f"{flag}: {out_dir} already holds a training run ({', '.join(found[:5])}); choose "
                             "another directory, or add --overwrite to replace it")
    _check_export(args, out_dir)
    docs = _docs(args)
    tok = _tokenizer(args, docs, out_dir, save=False)
    seq_len = cfg.seq_len if cfg.seq_len > 0 else DEFAULT_SEQ_LEN
    model_cfg = dict(d.get("model", {}))
    model_cfg["vocab_size"] = tok.vocab_size
    if args.scorer == "causal_lm":
        train, valid, _ = task_data("lm", docs, tok, seq_len)
        model_cfg.setdefault("max_len", seq_len)
        tr, va = train["tokens"], valid["tokens"]
    else:
        train, valid, names = task_data("attribute", docs, tok, seq_len, balance=True)
        model_cfg["num_labels"] = len(names)
        model_cfg.setdefault("pad_id", tok.pad_id)
        tr, va = (train["tokens"], train["labels"]), (valid["tokens"], valid["labels"])
    import torch

    torch.manual_seed(cfg.seed)
    model = build_model(args.scorer, model_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.train_tokenizer:
        tok.save(out_dir / "tokenizer.json")
    (out_dir / "command.txt").write_text("fastdiff " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "\n")
    extra = {"seq_len": seq_len}
    if args.scorer == "classifier":
        extra["label_names"] = names
    path = train_scorer(args.scorer, model, tr, va, out_dir=out_dir, tokenizer=tok,
                        steps=given("max_steps", 1000), batch_size=given("batch_size", 32),
                        lr=given("lr", 1e-3), warmup=given("warmup_steps", 100),
                        seed=cfg.seed, progress=not args.no_progress, extra_config=extra)
    final = json.loads((out_dir / "train_log.jsonl").read_text().splitlines()[-1])
    print(f"done: {path} | " + " ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float)))
    if args.export:
        dst = export_checkpoint(path, args.export)
        for name in ("train_log.jsonl", "command.txt"):
            shutil.copy(out_dir / name, dst / name)
        print(f"exported {dst}")
    return 0


# --- --family latent (LD4LG) -------------------------------------------------------------------------
#: flag dest -> fastdiff.latent.LatentConfig field
_LATENT_FIELDS = {"seq_len": "seq_len", "task": "task", "seed": "seed", "batch_size": "batch_size",
                  "warmup": "warmup", "lr": "lr", "T": "T", "schedule": "schedule", "cond_drop": "cond_drop",
                  "width": "width", "layers": "layers", "heads": "heads", "dropout": "dropout",
                  "ema_decay": "ema_decay"}
#: flags --family latent reads besides those (the rest are refused, by name)
_LATENT_OTHER = ("family", "stage", "plm", "steps", "out", "overwrite", "threads", "data", "tokenizer", "config",
                 "set", "export", "log_every", "no_progress", "balance", "device")


def _run_latent(args: argparse.Namespace) -> int:
    """``fastdiff train --family latent``: :func:`fastdiff.latent.run_stages` into ``--out`` (a latent checkpoint
    directory). ``--config`` is a LatentConfig JSON, ``--set`` sets its fields; ``--steps`` the chosen stage's
    steps. A fresh run (stage plm, or all) refuses a directory holding a checkpoint unless ``--overwrite``."""
    from ..latent import LatentConfig, is_latent_checkpoint, run_stages

    for dest, v in sorted(vars(args).items()):
        if dest in _LATENT_FIELDS or dest in _LATENT_OTHER or dest in ("command", "func") or v is None \
                or v is False or v == []:
            continue
        raise InputError(f"{_flag(dest)}: not used by --family latent")
    if args.device not in (None, "cpu", "auto"):
        raise InputError(f"--device: --family latent trains on the CPU, got {args.device!r}")
    d: dict = {}
    if args.config:
        try:
            d = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"--config: cannot read {args.config!r} as JSON: {e}") from None
        if not isinstance(d, dict):
            raise InputError(f"--config: {args.config!r} is not a JSON object")
    for dest, field in _LATENT_FIELDS.items():
        if getattr(args, dest, None) is not None:
            d[field] = getattr(args, dest)
    if args.balance:
        d["balance"] = True
    d.update(dict(_sets(args)))
    try:
        cfg = LatentConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise (InputTypeError if isinstance(e, TypeError) else InputError)(f"--set/--config: {e}") from None
    stage = args.stage or "all"
    if args.steps is not None and stage == "all":
        raise InputError("--steps: with --stage all give each stage's steps (--set plm_steps=N --set ae_steps=N "
                         "--set diffusion_steps=N), or choose one --stage")
    if args.plm is not None and stage in ("plm", "diffusion"):
        raise InputError(f"--plm: used by --stage ae or all (stage {stage} "
                         + ("trains its own encoder-decoder)" if stage == "plm" else "reads the checkpoint's)"))
    out = Path(args.out or "runs/latent")
    from ..training.checkpoint import ensure_directory_target

    ensure_directory_target(out, "--out")
    fresh = stage == "plm" or (stage in ("all", "ae") and (stage == "all" or args.plm is not None))
    if fresh and is_latent_checkpoint(out) and not args.overwrite:
        raise InputError(f"--out: {out} already holds a latent checkpoint; choose another directory, or add "
                         "--overwrite to replace it")
    if args.export:
        export = Path(args.export)
        if _inside(export, out) or _inside(out, export):
            raise InputError(f"--export: {export} overlaps the run directory {out}; export elsewhere")
        if export.exists() and any(export.iterdir()) and not is_latent_checkpoint(export):
            raise InputError(f"--export: {export} is neither empty nor a latent checkpoint")
    if fresh and args.overwrite and out.is_dir():
        for name in ("latent.json", "autoencoder.safetensors", "denoiser.safetensors", "train_log.jsonl",
                     "latent_config.json", "command.txt"):
            (out / name).unlink(missing_ok=True)
        if (out / "plm").is_dir():
            shutil.rmtree(out / "plm")
    tok = None
    if args.tokenizer:
        from ..data import TextTokenizer

        tok = TextTokenizer.load(args.tokenizer)
    model = run_stages(cfg, out, stage=stage, docs=_docs(args) if args.data else None, plm=args.plm, tokenizer=tok, steps=args.steps,
                       log_every=args.log_every or 50, print_fn=lambda s: print(s, flush=True))
    with open(out / "command.txt", "a", encoding="utf-8") as f:
        f.write("fastdiff " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "\n")
    print(f"done: stage {stage}; checkpoint in {out}")
    if args.export:
        if Path(args.export).is_dir():
            shutil.rmtree(args.export)
        where = None if model.plm_path in (None, "plm") else model.plm_path
        model.save(args.export, plm=where, fp16=True)
        for name in ("train_log.jsonl", "command.txt", "latent_config.json"):
            if (out / name).is_file():
                shutil.copy(out / name, Path(args.export) / name)
        print(f"exported {args.export}")
    return 0
