"""``fastdiff train``: build the data of a task from a corpus, train, checkpoint, resume, export.

Configuration comes from ``--config FILE`` (a :class:`fastdiff.training.TrainConfig` JSON), then the
flags, then ``--set KEY=VALUE`` (JSON values; ``model.width=256`` sets a model field). The data are the
Python docs corpus (:func:`fastdiff.data.python_docs`) or ``--data`` files (``.txt`` / ``.jsonl``).
``--resume RUN_DIR`` continues a run from its newest complete checkpoint (only ``max_steps``, logging and
checkpoint intervals may change). ``--scorer causal_lm|classifier`` trains an evaluation model instead.
``--export DIR`` writes a small fp16 weights-only copy (what ships in ``fastdiff/assets``) with the log.

Under ``torchrun --nproc-per-node N`` every process joins the group (gloo on CPU, NCCL on
``cuda:LOCAL_RANK``) and trains its share of each global batch under DistributedDataParallel (``--parallel
fsdp`` for FSDP2); rank 0 alone prints, logs and writes checkpoints. ``--resume`` works on any world size
that divides the run's global batch.
"""

from __future__ import annotations

from .errors import InputError

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

_FLAG_FIELDS = {  # flag dest -> TrainConfig field
    "family": "family", "task": "task", "kind": "kind", "schedule": "schedule", "T": "T", "steps": "max_steps",
    "batch_size": "batch_size", "seq_len": "seq_len", "src_len": "src_len", "lr": "lr", "warmup": "warmup_steps",
    "seed": "seed", "out": "out_dir", "device": "device", "loss": "loss", "conditioning": "conditioning",
    "cond_drop": "cond_drop", "timestep_sampler": "timestep_sampler", "ema_decay": "ema_decay",
    "ckpt_every": "ckpt_every", "log_every": "log_every", "eval_every": "eval_every",
    "lam_anchor": "lam_anchor", "grad_accum": "grad_accum", "parallel": "parallel",
}
_MODEL_FLAGS = ("width", "layers", "heads", "embed_dim")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TrainConfig JSON file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (JSON value); model.KEY for the model config")
    p.add_argument("--family", choices=("discrete", "continuous"))
    p.add_argument("--task", choices=("lm", "attribute", "word_order"))
    p.add_argument("--kind", choices=("absorbing", "uniform"))
    p.add_argument("--schedule", help="linear, cosine, sqrt, mutual_info, spindle, adaptive")
    p.add_argument("--T", type=int, help="diffusion steps of the process")
    p.add_argument("--steps", type=int, help="max_steps")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch on each process")
    p.add_argument("--grad-accum", type=int, help="micro-batches per update (global batch = batch x processes x this)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), help="under torchrun: DistributedDataParallel or FSDP2")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--src-len", type=int, help="source length (word_order)")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--loss", choices=("hybrid", "mdlm"))
    p.add_argument("--conditioning", choices=("concat", "cross"))
    p.add_argument("--cond-drop", type=float, help="classifier-free guidance dropout probability")
    p.add_argument("--timestep-sampler", choices=("uniform", "loss-aware"))
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--lam-anchor", type=float)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--eval-every", type=int)
    for name in _MODEL_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"model {name}")
    p.add_argument("--out", help="run directory (checkpoints, train_log.jsonl)")
    p.add_argument("--device", help="cpu, cuda (default: auto)")
    p.add_argument("--data", nargs="+", help="training text: .txt / .jsonl files (default: the Python docs)")
    p.add_argument("--balance", action="store_true", help="attribute task: subsample classes to equal size")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the bundled one)")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                   help="train a BPE tokenizer of this size on the data (saved in the run directory)")
    p.add_argument("--init-embeddings", metavar="HF_DIR",
                   help="initialise the token embeddings from a pretrained model in a local Hugging Face directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run (its newest complete checkpoint)")
    p.add_argument("--scorer", choices=("causal_lm", "classifier"), help="train an evaluation model instead")
    p.add_argument("--export", metavar="DIR", help="after training, write a small fp16 copy here (with the log)")
    p.add_argument("--no-progress", action="store_true")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_args(args) -> dict:
    """The TrainConfig dict: file, then flags, then ``--set``."""
    from .training import TrainConfig

    d = TrainConfig.load(args.config).to_dict() if args.config else {}
    for dest, field in _FLAG_FIELDS.items():
        v = getattr(args, dest, None)
        if v is not None:
            d[field] = v
    model = dict(d.get("model", {}))
    for name in _MODEL_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            model[name] = v
    for item in args.set:
        if "=" not in item:
            raise InputError(f"--set: expected KEY=VALUE, got {item!r}")
        key, val = item.split("=", 1)
        if key.startswith("model."):
            model[key[len("model."):]] = _value(val)
        else:
            d[key] = _value(val)
    if model:
        d["model"] = model
    return d


def _docs(args):
    from .data import corpus

    return corpus.load_texts(args.data) if args.data else corpus.python_docs()


def _tokenizer(args, docs, out_dir: Path, save: bool = True):
    from .data import TextTokenizer, default_tokenizer

    if args.train_tokenizer:  # deterministic: every rank trains the same one, rank 0 saves it
        tok = TextTokenizer.train([d.text for d in docs], vocab_size=args.train_tokenizer)
        if save:
            out_dir.mkdir(parents=True, exist_ok=True)
            tok.save(out_dir / "tokenizer.json")
        return tok
    if args.tokenizer:
        return TextTokenizer.load(args.tokenizer)
    return default_tokenizer()


def task_data(task: str, docs, tok, seq_len: int, src_len: int = 0, balance: bool = False,
              label_names: list[str] | None = None) -> tuple[dict, dict, list[str]]:
    """``(train, valid, label_names)`` tensors of a task (see :data:`fastdiff.training.DATA_KEYS`)."""
    from .data import datasets

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
    src_len = src_len or seq_len
    tr = datasets.word_order_tensors(datasets.word_order_pairs(docs, "train"), tok, src_len, seq_len)
    va = datasets.word_order_tensors(datasets.word_order_pairs(docs, "valid"), tok, src_len, seq_len)
    return {"src": tr[0], "tgt": tr[1]}, {"src": va[0], "tgt": va[1]}, []


def run(args) -> int:
    if args.scorer:
        return _run_scorer(args)
    from . import distributed

    device = getattr(args, "device", None)
    if device is None and args.resume:
        from .training import read_config, resolve_checkpoint_dir

        device = read_config(resolve_checkpoint_dir(args.resume))["train"].get("device", "auto")
    with distributed.session(device or "auto") as ctx:
        return _run(args, ctx)


def _run(args, ctx) -> int:
    from .training import TrainConfig, Trainer, export_checkpoint, read_config, resolve_checkpoint_dir

    progress = not args.no_progress
    main = ctx.is_main
    say = print if main else (lambda *a, **k: None)
    if args.resume:
        ckpt_dir = resolve_checkpoint_dir(args.resume)
        cfg = TrainConfig.from_dict(read_config(ckpt_dir)["train"])
        overrides = {}
        if args.steps is not None:
            overrides["max_steps"] = args.steps
        for dest in ("log_every", "ckpt_every", "eval_every", "device", "grad_accum", "parallel"):
            if getattr(args, dest, None) is not None:
                overrides[dest] = getattr(args, dest)
        docs = _docs(args)
        from .training.checkpoint import load_tokenizer

        tok = load_tokenizer(ckpt_dir, read_config(ckpt_dir))
        train, valid, _ = task_data(cfg.task, docs, tok, cfg.seq_len, cfg.src_len, args.balance, cfg.label_names)
        trainer = Trainer.resume(ckpt_dir, train, valid, **overrides)
        say(f"resumed {ckpt_dir} at step {trainer.global_step} of {trainer.config.max_steps}"
            + (f" on {ctx.world_size} processes, {trainer.config.batch_size} sequences per micro-batch"
               if ctx.distributed else ""))
    else:
        d = config_from_args(args)
        cfg = TrainConfig.from_dict(d)
        out_dir = Path(cfg.out_dir)
        docs = _docs(args)
        tok = _tokenizer(args, docs, out_dir, save=main)
        seq_len = cfg.seq_len or 64
        train, valid, names = task_data(cfg.task, docs, tok, seq_len, cfg.src_len, args.balance, cfg.label_names)
        if cfg.task == "attribute":
            d["label_names"] = names
            d.setdefault("model", {})["num_labels"] = len(names)
        d["seq_len"] = seq_len
        cfg = TrainConfig.from_dict(d)
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            prefix = f"torchrun --nproc-per-node {ctx.world_size} -m fastdiff " if ctx.distributed else "fastdiff "
            (out_dir / "command.txt").write_text(prefix + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "\n")
            cfg.save(out_dir / "train_config.json")
        trainer = Trainer(cfg, train, valid, tokenizer=tok)
        if args.init_embeddings:
            from .models.pretrained import init_embeddings_from_pretrained

            m = trainer.model
            table = m.embedding.embedding if getattr(m, "embedding", None) is not None else m.token_embedding
            found = init_embeddings_from_pretrained(table, tok, args.init_embeddings)
            say(f"embeddings: {int(found.sum())} of {tok.vocab_size} rows from {args.init_embeddings}")
        n = sum(p.numel() for p in trainer.model.parameters())
        scale = (f", {ctx.world_size} processes ({ctx.backend}, {cfg.parallel}) x {cfg.batch_size} x "
                 f"{cfg.grad_accum} = global batch {trainer.global_batch}" if ctx.distributed else "")
        say(f"training {cfg.family} {cfg.arch} ({n / 1e6:.2f} M parameters) on task {cfg.task}: "
            f"{next(iter(train.values())).shape[0]} training sequences, {cfg.max_steps} steps{scale} -> {out_dir}")
    trainer.fit(progress=progress)
    out_dir = Path(trainer.config.out_dir)
    say(f"done: step {trainer.global_step}; checkpoints and train_log.jsonl in {out_dir}")
    if args.export and main:
        dst = export_checkpoint(out_dir, args.export)
        for name in ("train_log.jsonl", "command.txt", "train_config.json"):
            if (out_dir / name).is_file():
                shutil.copy(out_dir / name, dst / name)
        print(f"exported {dst}")
    return 0


def _run_scorer(args) -> int:
    from .models import build_model
    from .training import export_checkpoint
    from .training.auxiliary import train_scorer

    d = config_from_args(args)
    out_dir = Path(d.get("out_dir", f"runs/{args.scorer}"))
    docs = _docs(args)
    tok = _tokenizer(args, docs, out_dir)
    seq_len = int(d.get("seq_len") or 64)
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

    torch.manual_seed(int(d.get("seed", 0)))
    model = build_model(args.scorer, model_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "command.txt").write_text("fastdiff " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "\n")
    extra = {"seq_len": seq_len}
    if args.scorer == "classifier":
        extra["label_names"] = names
    path = train_scorer(args.scorer, model, tr, va, out_dir=out_dir, tokenizer=tok,
                        steps=int(d.get("max_steps", 1000)), batch_size=int(d.get("batch_size", 32)),
                        lr=float(d.get("lr", 1e-3)), warmup=int(d.get("warmup_steps", 100)),
                        seed=int(d.get("seed", 0)), progress=not args.no_progress, extra_config=extra)
    final = json.loads((out_dir / "train_log.jsonl").read_text().splitlines()[-1])
    print(f"done: {path} | " + " ".join(f"{k} {v:.4g}" for k, v in final.items() if isinstance(v, float)))
    if args.export:
        dst = export_checkpoint(path, args.export)
        for name in ("train_log.jsonl", "command.txt"):
            shutil.copy(out_dir / name, dst / name)
        print(f"exported {dst}")
    return 0
