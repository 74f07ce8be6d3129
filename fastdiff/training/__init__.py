"""Training for fastdiff's diffusion models: processes from configs, the trainer and checkpoints.

* :mod:`~fastdiff.training.process`: :func:`build_process` (a discrete or Gaussian process from a JSON dict
  and the tensors it is built from), the registry of discrete kinds (:func:`register_kind`, :func:`kinds`).
* :mod:`~fastdiff.training.config`: :class:`TrainConfig`, :func:`lr_factor`.
* :mod:`~fastdiff.training.trainer`: :class:`Trainer` (hybrid / MDLM loss for discrete models, MSE +
  rounding + anchor losses for continuous ones, self-conditioning, classifier-free dropout, loss-aware
  timesteps, adaptive schedules, AdamW with warm-up, EMA, exact resume, DDP / FSDP), an orchestrator of
  :mod:`~fastdiff.training.objectives` (the loss of a batch, by the processes' own maths),
  :mod:`~fastdiff.training.rng`, :mod:`~fastdiff.training.parallel`, :mod:`~fastdiff.training.state`,
  :mod:`~fastdiff.training.rundir`, :mod:`~fastdiff.training.logs`, :mod:`~fastdiff.training.setup` and
  :mod:`~fastdiff.training.ema` (:class:`EMA`).
* :mod:`~fastdiff.training.checkpoint` (writes) and :mod:`~fastdiff.training.layout` (reads):
  :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`export_checkpoint`, :class:`Checkpoint` (atomic
  directory checkpoints in safetensors + JSON, every file's SHA-256 recorded in config.json and verified
  when read), :func:`verify_checkpoint`.

Sits above models and data; ``safetensors`` and ``tokenizers`` are imported only inside functions.
"""

from .checkpoint import (
    FORMAT,
    VERSION,
    Checkpoint,
    export_checkpoint,
    load_checkpoint,
    read_config,
    resolve_checkpoint_dir,
    save_checkpoint,
    verify_checkpoint,
    write_latest,
)
from .config import DATA_KEYS, TASKS, TrainConfig, lr_factor
from .ema import EMA
from .process import Kind, build_process, kinds, process_config, register_kind
from .trainer import Trainer

__all__ = [
    "DATA_KEYS",
    "EMA",
    "FORMAT",
    "TASKS",
    "VERSION",
    "Checkpoint",
    "Kind",
    "TrainConfig",
    "Trainer",
    "build_process",
    "export_checkpoint",
    "kinds",
    "load_checkpoint",
    "lr_factor",
    "process_config",
    "read_config",
    "register_kind",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "verify_checkpoint",
    "write_latest",
]
