"""A run directory: ``train_log.jsonl``, ``step_<N>/`` checkpoints, ``latest``, ``best/`` — what makes a
directory a training run's, how a fresh run claims one, and where a resumed run comes from and goes to."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed as _dist
from . import checkpoint as ckpt
from .config import RESUMABLE_OVERRIDES, TrainConfig
from .logs import LOG_FILE, read_log
from .state import load_state, rebatch
from ..errors import InputError, InputTypeError

__all__ = ["BEST_DIR", "Resume", "claim", "continue_log", "open_resume", "point_latest", "prune",
           "remove_run_artefacts", "resume_into", "run_artefacts", "same_dir"]

BEST_DIR = "best"  # TrainConfig.keep_best: the checkpoint of the lowest validation loss so far


#: what makes a directory a training run's: :meth:`Trainer.fit` will not mix a fresh run into it
def run_artefacts(out_dir: str | os.PathLike) -> list[str]:
    """Names of the training-run entries in ``out_dir``: the log, ``latest``, ``step_<N>`` checkpoints,
    leftovers of killed saves, or the files of a checkpoint (when ``out_dir`` is a checkpoint directory)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    is_checkpoint = (out / ckpt.CONFIG_FILE).is_file()
    for p in sorted(out.iterdir()):
        n = p.name
        if n in (LOG_FILE, ckpt.LATEST) or (ckpt.STEP_DIR.fullmatch(n) and p.is_dir()) \
                or (n == BEST_DIR and p.is_dir() and (p / ckpt.CONFIG_FILE).is_file()) \
                or (is_checkpoint and n in ckpt.CHECKPOINT_FILES):
            found.append(n)
        elif (m := ckpt.STALE.fullmatch(n)) and ckpt._looks_like_ours(p, m["base"]):
            found.append(n)
    return found


def remove_run_artefacts(out_dir: str | os.PathLike) -> list[str]:
    """Delete what :func:`run_artefacts` lists (nothing else in ``out_dir``); returns the names."""
    out = Path(out_dir)
    names = run_artefacts(out)
    for n in names:
        p = out / n
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return names


def same_dir(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def claim(out: Path, overwrite: bool, rank: int) -> None:
    """Before a fresh run's first write into ``out``: refuse a directory that already holds a run
    (:func:`run_artefacts`) unless ``overwrite``, which deletes those entries (only them; rank 0 does)."""
    ckpt.ensure_directory_target(out, "out_dir")
    found = run_artefacts(out)
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
        raise InputError(f"out_dir: {out} already holds a training run ({shown}); continue it with "
                         f"Trainer.resume({str(out)!r}, ...) (fastdiff train --resume), choose another "
                         "out_dir, or pass overwrite=True (--overwrite) to replace it")
    if found and rank == 0:
        remove_run_artefacts(out)
    _dist.barrier()


def prune(out: Path, keep: int, written: Path) -> None:
    """Keep the newest ``keep`` ``step_<N>`` checkpoints of ``out`` (0: all; never ``written``)."""
    if not keep:
        return
    old = sorted(p for p in out.iterdir() if ckpt.STEP_DIR.fullmatch(p.name) and p.is_dir())
    for p in old[:-keep]:
        if p != written:
            shutil.rmtree(p, ignore_errors=True)


def point_latest(out: Path, checkpoint: Path) -> None:
    """``out/latest`` names ``checkpoint`` (rewritten only when it names another one)."""
    if ckpt.read_latest(out) != checkpoint.name:
        ckpt.write_latest(out, checkpoint.name)


def continue_log(out_dir: Path, source_log: Path, same: bool, step: int) -> None:
    """The resumed run's log: in its own directory, the lines written after the checkpoint (by a run
    that went on and died, or a torn last line) are dropped; into another directory, the source's
    lines up to the checkpoint are copied (the source is only read). Rank 0 alone calls it."""
    log = out_dir / LOG_FILE
    src = log if same else source_log
    if not src.is_file():
        return
    records, torn = read_log(src)
    keep = [line for line, rec in records if rec.get("step", 0) <= step]
    if same and len(keep) == len(records) and not torn:
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    ckpt._replace_file(log, "".join(line + "\n" for line in keep))


@dataclasses.dataclass
class Resume:
    """A checkpoint opened for resuming: its directory, ``config.json`` (``cfg``), resume state, the
    run's :class:`TrainConfig` with the overrides, the tokenizer, the model with the saved weights, the
    source run directory and whether the run goes on there (``same``)."""

    checkpoint: Path
    cfg: dict[str, Any]
    state: dict[str, Any]
    state_tensors: dict[str, torch.Tensor]
    config: TrainConfig
    tokenizer: Any
    model: nn.Module
    source: Path
    same: bool


def open_resume(path: str | os.PathLike, overrides: dict[str, Any], overwrite: bool, tokenizer: Any = None,
                model: nn.Module | None = None) -> Resume:
    """Everything :meth:`Trainer.resume` checks and reads before it builds the trainer (see there)."""
    bad = sorted(set(overrides) - set(RESUMABLE_OVERRIDES))
    if bad:
        raise InputError(f"overrides: {bad} cannot change on resume; allowed: {list(RESUMABLE_OVERRIDES)}")
    if not isinstance(overwrite, bool):
        raise InputTypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"path: no checkpoint at {given}")
    source = given.parent if (given / ckpt.CONFIG_FILE).is_file() else given
    overrides = dict(overrides)
    if overrides.get("out_dir") is None:
        overrides["out_dir"] = str(source)
    same = same_dir(Path(overrides["out_dir"]), source)
    if same:  # the run goes on here: first finish or remove what a killed save left
        if _dist.rank() == 0:
            ckpt.remove_stale_temporaries(source)
        _dist.barrier()
    d = ckpt.resolve_checkpoint_dir(given)
    cfg = ckpt.read_config(d)
    state, state_tensors = ckpt.load_resume_state(d)
    try:
        saved = TrainConfig.from_dict(cfg.get("train", {}))
    except (TypeError, ValueError) as e:
        raise InputError(f"path: {d} is not a resumable diffusion training checkpoint ({d / ckpt.CONFIG_FILE}: "
                         f"train: {e})") from None
    config = dataclasses.replace(saved, **overrides)
    out = Path(config.out_dir)
    if same and overwrite:
        raise InputError(f"overwrite: {out} is the run being resumed; it is continued, not replaced "
                         "(overwrite only applies to resuming into another directory)")
    step = int(cfg["step"])
    if config.max_steps < step:
        raise InputError(f"max_steps: {config.max_steps} is below the step of the checkpoint {d} ({step})")
    if not same:
        ckpt.ensure_directory_target(out, "out_dir")
        found = run_artefacts(out)
        if found and not overwrite:
            raise InputError(f"out_dir: {out} already holds a training run ({', '.join(found[:4])}); resume "
                             "into an empty or new directory, or pass overwrite=True (--overwrite) to replace it")
    config = rebatch(config, state, d)
    tok = ckpt.load_tokenizer(d, cfg, tokenizer)
    if model is None:
        from ..models import build_model

        try:
            model = build_model(cfg["arch"], cfg["model"], saved=True)
        except (TypeError, ValueError) as e:
            raise InputError(f"checkpoint: {d / ckpt.CONFIG_FILE}: cannot build the model: {e}") from None
    weights = d / ckpt.MODEL_FILE
    ckpt.load_state_dict_checked(model, ckpt.load_tensors(weights, config=cfg, finite=True), weights)
    return Resume(d, cfg, state, state_tensors, config, tok, model, source, same)


def resume_into(trainer: Any, r: Resume) -> None:
    """Give the trainer built for the resume ``r`` its saved state, and its run directory: claimed (another
    directory) or continued (its own), the log continued, the checkpoint on disk remembered."""
    trainer.resumed_from = r.checkpoint
    if r.same:
        trainer._claimed = True
    else:
        trainer._claim_out_dir()
    load_state(trainer, r.checkpoint, r.state, r.state_tensors, r.cfg)
    out = Path(trainer.config.out_dir)
    if trainer.rank == 0:  # rank 0 alone writes the log
        continue_log(out, r.source / LOG_FILE, r.same, trainer.global_step)
    if r.same and same_dir(r.checkpoint.parent, out) and ckpt.STEP_DIR.fullmatch(r.checkpoint.name):
        trainer._on_disk = (trainer.global_step, r.checkpoint)
