"""Training for fastdiff's diffusion models: processes from configs, the trainer and checkpoints.

* :mod:`~fastdiff.training.process`: :func:`build_process` (a discrete or Gaussian process from a JSON dict).
* :mod:`~fastdiff.training.trainer`: :class:`TrainConfig`, :class:`Trainer` (hybrid / MDLM loss for discrete
  models, MSE + rounding + anchor losses for continuous ones, self-conditioning, classifier-free dropout,
  loss-aware timesteps, adaptive schedules, AdamW with warm-up, EMA, exact resume), :class:`EMA`,
  :func:`lr_factor`.
* :mod:`~fastdiff.training.checkpoint`: :func:`save_checkpoint`, :func:`load_checkpoint`,
  :func:`export_checkpoint`, :class:`Checkpoint` (atomic directory checkpoints in safetensors + JSON, every
  file's SHA-256 recorded in config.json and verified when read), :func:`verify_checkpoint`.

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
from .process import build_process, process_config
from .trainer import DATA_KEYS, EMA, TASKS, TrainConfig, Trainer, lr_factor

__all__ = [
    "DATA_KEYS",
    "EMA",
    "FORMAT",
    "TASKS",
    "VERSION",
    "Checkpoint",
    "TrainConfig",
    "Trainer",
    "build_process",
    "export_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "process_config",
    "read_config",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "verify_checkpoint",
    "write_latest",
]
