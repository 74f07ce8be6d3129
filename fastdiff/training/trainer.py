"""Training loop for fastdiff's text diffusion models: :class:`Trainer`, an orchestrator of small parts.

* :mod:`~fastdiff.training.objectives`: the loss of one batch per family, computed by the processes' own
  maths (:func:`fastdiff.discrete.losses`, :meth:`fastdiff.continuous.GaussianDiffusion.losses`);
* :mod:`~fastdiff.training.rng`: the per-step random streams (bit-exact resume on CPU);
* :mod:`~fastdiff.training.parallel`: DDP / FSDP wrapping, gradient sync and clipping, global rows;
* :mod:`~fastdiff.training.state`: what a checkpoint holds besides the weights, and loading it back;
* :mod:`~fastdiff.training.rundir` and :mod:`~fastdiff.training.logs`: the run directory and its log;
* :mod:`~fastdiff.training.setup`: the data, model and optimizer, checked against the config.

Reproducibility: every random draw of step ``n`` comes from generators seeded by ``(seed, n)`` and the
data order from :class:`fastdiff.data.Batches`; so ``k`` steps + save + :meth:`Trainer.resume` + ``N - k``
steps gives the same parameters, optimizer state and losses as ``N`` steps in one go (bit for bit on CPU).

Scale-out (under ``torchrun``): an update sees the global batch ``batch_size × world_size × grad_accum``;
the step's randomness is drawn for the whole global batch and each rank keeps its rows, the loss is the
mean over the global batch, the timestep sampler and adaptive schedule are fed the gathered global batch
in order: a run's losses and parameters do not depend on how the global batch is split over processes and
micro-batches (up to float summation order; exactly when the model has no dropout). Rank 0 alone writes
logs and checkpoints; a checkpoint resumes on any world size with the same global batch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _checks
from .. import distributed as _dist
from . import checkpoint as ckpt
from . import rundir, setup
from . import state as _state
from .config import DATA_KEYS, TASKS, TrainConfig, lr_factor  # noqa: F401
from .ema import EMA
from .logs import LOG_FILE, accumulate, append_log, progress_enabled, read_log, window_record  # noqa: F401
from .objectives import Objective
from .parallel import Parallel, check_device  # noqa: F401
from .process import build_process, training_process
from .rng import StepRNG
from .rundir import BEST_DIR, remove_run_artefacts, run_artefacts  # noqa: F401
from .setup import batch_tokens
from ..errors import InputError, InputTypeError

__all__ = ["BEST_DIR", "DATA_KEYS", "EMA", "TASKS", "TrainConfig", "Trainer", "lr_factor"]

# importable from here as before the split (check_device, run_artefacts, read_log, ... above too)
_same_dir, _progress_enabled = rundir.same_dir, progress_enabled


class Trainer:
    """Trains a diffusion model on ``train_data`` under ``config``.

    Parameters
    ----------
    config : a :class:`TrainConfig`.
    train_data, valid_data : dicts of integer tensors with the task's keys (:data:`DATA_KEYS`):
        ``{"tokens": (N, L)}``, ``{"tokens": (N, L), "labels": (N,)}`` or ``{"src": (N, Ls), "tgt": (N, L)}``,
        iterated by :class:`fastdiff.data.Batches` (resumable).
    tokenizer : a :class:`fastdiff.data.TextTokenizer` (saved with checkpoints; gives ``vocab_size``).
    model : a model to train instead of ``build_model(config.arch, ...)``; checkpoints need ``.arch`` and
        ``.config_dict()``.
    overwrite : a fresh run refuses an ``out_dir`` that already holds a run (a log, ``latest``,
        ``step_<N>`` checkpoints: :func:`run_artefacts`) at its first write; True deletes those entries
        (only them) instead. Use :meth:`resume` to continue a run.
    process_tensors : the process's tensors (a NearestNeighbor's embeddings, a Dense Q) instead of those
        ``config.process_kw`` names; :meth:`resume` passes the checkpoint's.

    ``config.seq_len`` / ``src_len`` 0 take the data's lengths; any other value must equal them.

    :meth:`step` runs one update, :meth:`fit` runs to ``max_steps`` with logging, evaluation and
    checkpoints, :meth:`save` writes a resumable checkpoint, :meth:`resume` continues one.
    """

    def __init__(self, config: TrainConfig, train_data: dict[str, torch.Tensor],
                 valid_data: dict[str, torch.Tensor] | None = None, tokenizer: Any = None,
                 model: nn.Module | None = None, *, overwrite: bool = False,
                 process_tensors: dict[str, torch.Tensor] | None = None) -> None:
        from ..data import Batches

        if not isinstance(config, TrainConfig):
            raise InputTypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if not isinstance(overwrite, bool):
            raise InputTypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
        self.train_data = setup.check_data("train_data", train_data, config.task)
        self.valid_data = None if valid_data is None else setup.check_data("valid_data", valid_data, config.task)
        self.config = cfg = dataclasses.replace(config, **setup.data_lengths(config, self.train_data))
        self.dist = _dist.context()
        self.parallel = Parallel(self.dist, cfg.device, cfg.parallel)
        self.rank, self.world, self.device = self.parallel.rank, self.parallel.world, self.parallel.device
        self.tokenizer = tokenizer
        if model is None:
            model = setup.build_model(cfg, tokenizer, self.train_data)
        self.model = model.to(self.device).train()
        self.net = self.parallel.wrap(self.model)  # what the training forward calls: DDP, or the model
        self.model_config, self.vocab_size, self.num_labels = setup.check_model(
            model, cfg, tokenizer, {"train_data": self.train_data, "valid_data": self.valid_data or {}})
        self.continuous = cfg.family == "continuous"
        self.self_condition = self.continuous and bool(self.model_config.get("self_condition", False))
        self.process_config, self.process_tensors = training_process(
            cfg, vocab_size=self.vocab_size, mask_id=tokenizer.mask_id if tokenizer is not None else 1,
            model=self.model, tensors=process_tensors)
        self.process = build_process(self.process_config, self.process_tensors)
        self.objective = Objective.create(cfg, self.process, self.model, self.device, num_labels=self.num_labels,
                                          pad_id=tokenizer.pad_id if tokenizer is not None else 0,
                                          self_condition=self.self_condition)
        self.sampler, self.adaptive = self.objective.sampler, self.objective.adaptive
        self.rng = StepRNG(cfg.seed, self.device)
        self.optimizer, self._opt_names = setup.build_optimizer(self.model, cfg)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # every rank iterates the same global batches and keeps its rows (see step())
        self.global_batch = cfg.batch_size * self.world * cfg.grad_accum
        self.batches = Batches(*self.train_data.values(), batch_size=self.global_batch, seed=cfg.seed)
        self.global_step = 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self._window: dict[str, float] = {}
        self._overwrite = overwrite
        self._claimed = False  # out_dir checked (a fresh run) or continued (a resumed one)
        self._on_disk: tuple[int, Path] | None = None  # the checkpoint in out_dir that holds this state
        self.best: dict[str, float] | None = None  # keep_best: {"step", "valid_loss"} of out_dir/best
        self._digest: str | None = None

    # --- one step ------------------------------------------------------------------------------
    def _draws(self, gbatch: dict[str, torch.Tensor], step: int, train: bool) -> dict[str, Any]:
        """Every random draw of a step for the whole global batch (each rank keeps its rows)."""
        gens = self.rng.generators(step, "train" if train else "eval")
        return self.objective.draws(gbatch, gens, train)

    def _losses(self, gbatch: dict[str, torch.Tensor], rows: torch.Tensor, draws: dict[str, Any], train: bool
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss of the global-batch rows ``rows``: ``(terms, per_sequence_loss (b,), difficulty (b,), t (b,))``
        (:class:`~fastdiff.training.objectives.BatchLoss`); ``terms["loss"]`` is the objective."""
        return self.objective.loss(self.net if train else self.model, gbatch, rows, draws, train)

    def step(self) -> dict[str, float]:
        """One optimizer update; returns the loss terms (means over the global batch), ``lr``,
        ``grad_norm``, ``tokens`` (of the global batch) and ``time_s``."""
        cfg, n = self.config, self.global_step
        start = time.perf_counter()
        gbatch = setup.on_device(self.train_data, self.batches.next_batch(), self.device, non_blocking=True)
        lr = setup.set_lr(self.optimizer, cfg, n)
        self.model.train()
        A, b = cfg.grad_accum, cfg.batch_size
        share = self.parallel.rows(self.global_batch)
        sums: dict[str, float] = {}
        per_seq, difficulty, ts = [], [], []
        with self.rng.fork():
            draws = self._draws(gbatch, n, train=True)
            self.optimizer.zero_grad(set_to_none=True)
            for m in range(A):
                # dropout inside the model: one stream per (rank, micro-batch); "torch" alone for the first
                self.rng.seed_global(n, "torch" if (self.rank, m) == (0, 0) else f"torch:{self.rank}:{m}")
                with self.parallel.sync(self.net, last=m == A - 1):
                    terms, p, d, t = self._losses(gbatch, share[m * b:(m + 1) * b], draws, train=True)
                    loss = terms["loss"]
                    if not self.parallel.all_finite(loss):
                        raise FloatingPointError(f"step {n}: the loss is not finite ({float(loss)} on rank "
                                                 f"{self.rank})")
                    (loss / A).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / A
                per_seq.append(p), difficulty.append(d), ts.append(t)
            grad_norm = self.parallel.clip([p for p in self.model.parameters() if p.grad is not None], cfg.grad_clip)
            if not bool(torch.isfinite(grad_norm)):
                raise FloatingPointError(f"step {n}: the gradient norm is {float(grad_norm)}")
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        # the timestep sampler and the adaptive schedule see the whole global batch, in its order
        rows = self.parallel.global_rows
        self.objective.record(rows(torch.cat(ts)).cpu(), rows(torch.cat(per_seq).double()).cpu(),
                              rows(torch.cat(difficulty).double()).cpu() if self.adaptive is not None else None, n)
        self.global_step = n + 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - start
        self.elapsed += dt
        metrics = self.parallel.global_mean(sums)
        metrics.update(lr=lr, grad_norm=float(grad_norm), tokens=float(batch_tokens(gbatch)), time_s=dt)
        accumulate(self._window, metrics)
        return metrics

    # --- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, weights: str = "raw") -> dict[str, float]:
        """Mean loss terms (prefixed ``valid_``, or ``valid_ema_`` for ``weights="ema"``) over the first
        ``eval_batches`` batches of ``valid_data``, in order, with fixed per-batch seeds, uniform t, no
        condition dropout or self-conditioning. ``weights``: the trained parameters ("raw") or their EMA
        ("ema", swapped in for the evaluation and back)."""
        _checks.choice("weights", weights, ("raw", "ema"))
        if weights == "ema":
            if self.ema is None:
                raise InputError("weights: this run keeps no EMA (ema_decay=0)")
            with self.ema.swapped_in(self.model):
                return {k.replace("valid_", "valid_ema_", 1): v for k, v in self.evaluate("raw").items()}
        if self.valid_data is None:
            raise InputError("valid_data: evaluate() needs validation data")
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        count = 0
        try:
            with self.rng.fork():
                for i, batch in setup.valid_batches(self.valid_data, self.config.batch_size, self.config.eval_batches,
                                                    self.device):
                    self.rng.seed_global(i, "eval-torch")
                    rows = torch.arange(next(iter(batch.values())).shape[0], device=self.device)
                    for k, v in self._losses(batch, rows, self._draws(batch, i, train=False), train=False)[0].items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
        finally:
            self.model.train(was_training)
        return {f"valid_{k}": v / count for k, v in sums.items()}

    def _data_digest(self) -> str:
        """SHA-256 of the training tensors: a resume checks its data is the run's."""
        if self._digest is None:
            self._digest = _state.data_digest(self.train_data)
        return self._digest

    # --- loop ----------------------------------------------------------------------------------
    def _claim_out_dir(self) -> None:
        """Before the first write into ``out_dir``: see :func:`fastdiff.training.rundir.claim`."""
        if not self._claimed:
            rundir.claim(Path(self.config.out_dir), self._overwrite, self.rank)
            self._claimed = True

    def _write_log(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if self.rank == 0:  # rank 0 alone writes (every rank holds the same global means)
            append_log(self.config.out_dir, rec)

    def fit(self, progress: bool = True, steps: int | None = None) -> list[dict[str, Any]]:
        """Train until ``max_steps`` (or for at most ``steps`` more steps): a JSONL line in
        ``out_dir/train_log.jsonl`` every ``log_every`` steps (step, mean loss terms, lr, grad_norm,
        tokens_per_s, elapsed), validation every ``eval_every``, a checkpoint every ``ckpt_every`` steps and
        at the end (unless the checkpoint of this very step is already in ``out_dir``: a resumed run with
        nothing left to do only points ``latest`` at it). Returns the records logged by this call.

        A fresh trainer refuses an ``out_dir`` that already holds another run (see ``overwrite``); the
        progress bar (``progress``) is drawn only on a terminal or in a notebook."""
        from tqdm.auto import tqdm

        cfg = self.config
        stop = cfg.max_steps if steps is None else min(cfg.max_steps, self.global_step + _checks.positive_int("steps", steps, 0))
        self._claim_out_dir()
        first = len(self.history)
        last_saved = -1
        bar = tqdm(total=cfg.max_steps, initial=self.global_step,
                   disable=not progress_enabled(progress) or self.rank != 0, desc="train")
        try:
            while self.global_step < stop:
                m = self.step()
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                s = self.global_step
                if s % cfg.log_every == 0:
                    self._write_log(window_record(self._window, s, self.elapsed))
                    self._window = {}
                if cfg.eval_every and s % cfg.eval_every == 0 and self.valid_data is not None:
                    rec = self.evaluate()
                    if cfg.keep_best and self.ema is not None:  # the exported weights are the EMA's
                        rec.update(self.evaluate("ema"))
                    self._write_log({"step": s, **rec, "elapsed": self.elapsed})
                    if cfg.keep_best:
                        self._keep_if_best(rec["valid_ema_loss" if self.ema is not None else "valid_loss"])
                if cfg.ckpt_every and s % cfg.ckpt_every == 0:
                    self.save()
                    last_saved = s
        finally:
            bar.close()
        if last_saved != self.global_step:
            on_disk = self._on_disk
            if on_disk is not None and on_disk[0] == self.global_step and on_disk[1].is_dir():
                if self.rank == 0:
                    rundir.point_latest(Path(cfg.out_dir), on_disk[1])
            else:
                self.save()
        return self.history[first:]

    # --- checkpoints ---------------------------------------------------------------------------
    def _keep_if_best(self, valid_loss: float) -> None:
        """``keep_best``: write this step's checkpoint to ``out_dir/best`` when ``valid_loss`` (of the EMA
        weights when the run keeps an EMA: they are what is exported) is the lowest seen; the validation
        draws are the same at every evaluation, so losses compare across steps."""
        if self.best is not None and not valid_loss < self.best["valid_loss"]:
            return
        self.best = {"step": self.global_step, "valid_loss": float(valid_loss)}
        self.save(Path(self.config.out_dir) / BEST_DIR)

    def _process_for_saving(self) -> dict[str, Any]:
        cfg = dict(self.process_config)
        if self.adaptive is not None:
            cfg["alpha_bar"] = self.adaptive.alpha_bar.tolist()
        return cfg

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write a resumable checkpoint (default ``out_dir/step_<N>``, which also updates ``out_dir/latest``
        and keeps the newest ``keep_checkpoints``; a fresh trainer first refuses an ``out_dir`` holding
        another run, see :meth:`fit`). An explicit ``path`` must be new, empty or a checkpoint (replaced
        atomically). Under torchrun every rank must call it: the full state is collected (FSDP) and rank 0
        alone writes it, atomically; the others wait until it is complete."""
        default = path is None
        out = Path(self.config.out_dir)
        if default:
            self._claim_out_dir()
        target = out / f"step_{self.global_step:08d}" if default else Path(path)
        written = _state.write_checkpoint(self, target, update_latest=default)
        if default:
            if self.rank == 0:
                rundir.prune(out, self.config.keep_checkpoints, written)
            self._on_disk = (self.global_step, Path(written))
        _dist.barrier()
        return written

    @classmethod
    def resume(cls, path: str | os.PathLike, train_data: dict[str, torch.Tensor],
               valid_data: dict[str, torch.Tensor] | None = None, tokenizer: Any = None,
               model: nn.Module | None = None, *, overwrite: bool = False, **overrides: Any) -> Trainer:
        """Continue the run saved at ``path`` at the same step with the same optimizer, EMA, data position,
        timestep-sampler and adaptive-schedule state (and the same process: its saved tensors).

        ``path`` is a checkpoint directory, or a run directory (its ``latest``, else its newest complete
        checkpoint). The **source run directory** is ``path`` itself for a run directory and the directory
        holding the checkpoint otherwise. The resumed run writes its checkpoints and log into
        ``overrides["out_dir"]`` when given, else into the source run directory (never into the
        ``out_dir`` recorded in the checkpoint, which a copied run would share with its original):

        * the source run directory itself: log lines after the checkpoint are dropped, leftovers of
          killed saves removed, and the run goes on there;
        * another directory: the source is only read; the new directory receives the source's log up to
          the checkpoint and then the new checkpoints. It must not already hold a run (InputError) unless
          ``overwrite=True``, which deletes that run's entries first.

        ``model``: a fresh instance of a custom model (not from :func:`fastdiff.models.build_model`) to load
        the weights into. ``overrides`` may change :data:`RESUMABLE_OVERRIDES` (e.g. ``max_steps``, which
        must not be below the checkpoint's step). Every file read is verified against the checkpoint's
        checksums; weights or optimizer moments holding NaN/inf are refused."""
        r = rundir.open_resume(path, overrides, overwrite, tokenizer, model)
        trainer = cls(r.config, train_data, valid_data, tokenizer=r.tokenizer, model=r.model, overwrite=overwrite,
                      process_tensors=ckpt.load_process_tensors(r.checkpoint, r.cfg))
        rundir.resume_into(trainer, r)
        return trainer
