"""Training configuration: :class:`TrainConfig` (JSON round trip, validated) and the learning-rate
schedule :func:`lr_factor` (linear warm-up, then cosine or constant)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _checks, continuous, schedules
from .process import get_kind
from ..errors import InputError, InputTypeError

__all__ = ["DATA_KEYS", "PARALLEL", "RESUMABLE_OVERRIDES", "TASKS", "TrainConfig", "load_config_dict", "lr_factor"]

TASKS = ("lm", "attribute", "word_order")
DATA_KEYS = {"lm": ("tokens",), "attribute": ("tokens", "labels"), "word_order": ("src", "tgt")}
#: fields that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE_OVERRIDES = ("max_steps", "log_every", "ckpt_every", "eval_every", "eval_batches", "out_dir",
                       "keep_checkpoints", "keep_best", "device", "amp", "grad_accum", "parallel")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Everything a training run needs besides data, tokenizer and (optionally) a model; JSON round trip
    through :meth:`to_dict` / :meth:`from_dict` (and :meth:`save` / :meth:`load` for files).

    task : "lm" (unconditional), "attribute" (``labels``, classifier-free dropout ``cond_drop``) or
        "word_order" (text to text: ``conditioning`` "concat" -> ``cond_tokens`` or "cross" -> encoder memory).
    family, kind, schedule, T, schedule_kw : the process: "continuous", or "discrete" of a kind of
        :func:`fastdiff.training.process.kinds` ("absorbing", "uniform", and the D3PM matrix processes
        "gaussian_band", "nearest_neighbor", "dense", meant for small vocabularies); ``schedule="auto"`` is
        "mutual_info" for discrete and "sqrt" for continuous; "adaptive" is re-fitted from the training loss
        every ``refit_every`` steps (SeqDiffuSeq; absorbing, uniform and continuous only).
    process_kw : the discrete kind's parameters (JSON): gaussian_band ``{"bandwidth": int}``;
        nearest_neighbor ``{"k": 8, "rate": 1.0, "embeddings": "model" | FILE}`` (the kNN graph of the
        model's token embeddings when training starts, or of a ``.safetensors`` file's); dense ``{"Q": FILE}``
        (a ``.safetensors`` file holding ``Q``, ``(T, V, V)`` or ``(V, V)``). The tensors are copied into
        every checkpoint (``process.safetensors``); a resume never reads the files again.
    arch, model : the model for :func:`fastdiff.models.build_model` (``model`` holds SED config overrides;
        ``model.block_size`` > 0 trains a block-causal model with BD3-LM's objective, see
        :mod:`fastdiff.training.objectives`).
    loss, hybrid_lambda : discrete objective, "hybrid" (``L_vlb + λ·CE``) or "mdlm".
    parameterization, lam_round, lam_anchor, embedding_layernorm, self_condition_prob : continuous.
    timestep_sampler : "uniform" or "loss-aware" (Nichol & Dhariwal 2021).
    ar_diffusion : continuous only: AR-Diffusion's token-level steps (Wu et al. 2023; a sentence-level step
        ``n ~ U{0..N+T}`` per sequence, each position at its anchor-point step, see
        :mod:`fastdiff.training.objectives`); needs parameterization "x0", uniform steps and a fixed schedule.
    lr, betas, weight_decay, warmup_steps, lr_schedule ("cosine" | "constant"), min_lr_ratio, grad_clip
        (0 = no clipping), ema_decay (0 = no EMA), amp ("auto": bf16 autocast on CUDA; "off"), device.
    seq_len, src_len : sequence lengths (0: taken from the data); label_names : attribute names.
    batch_size : sequences per micro-batch on each process; grad_accum : micro-batches per update. An
        update sees the global batch ``batch_size × world_size × grad_accum`` (``world_size`` = processes
        under torchrun), which a resumed run keeps whatever its world size (it re-derives ``batch_size``).
    parallel : under torchrun, "ddp" (DistributedDataParallel, a full replica per process) or "fsdp"
        (FSDP2 ``fully_shard``: parameters, gradients and optimizer state sharded across processes).
    log_every, ckpt_every, eval_every (0 = never), eval_batches, keep_checkpoints (0 = all), out_dir.
    keep_best : with ``eval_every``, after each validation whose ``valid_loss`` (of the EMA weights, when
        ``ema_decay > 0``) is the lowest so far, the
        checkpoint of that step is written to ``out_dir/best`` (replaced atomically; never pruned), and
        ``fastdiff train --export`` exports it instead of the last step (long runs on small corpora overfit).
    """

    task: str = "lm"
    conditioning: str = "concat"
    cond_drop: float = 0.1
    label_names: list[str] = field(default_factory=list)
    seq_len: int = 0
    src_len: int = 0
    family: str = "discrete"
    kind: str = "absorbing"
    schedule: str = "auto"
    T: int = 1000
    schedule_kw: dict[str, Any] = field(default_factory=dict)
    process_kw: dict[str, Any] = field(default_factory=dict)
    refit_every: int = 100
    timestep_sampler: str = "uniform"
    ar_diffusion: bool = False
    arch: str = "sed"
    model: dict[str, Any] = field(default_factory=dict)
    loss: str = "hybrid"
    hybrid_lambda: float = 0.01
    parameterization: str = "x0"
    lam_round: float = 1.0
    lam_anchor: float = 0.0
    embedding_layernorm: bool = False
    self_condition_prob: float = 0.5
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    amp: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    grad_accum: int = 1
    parallel: str = "ddp"
    max_steps: int = 1000
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    eval_every: int = 0
    eval_batches: int = 4
    keep_checkpoints: int = 2
    keep_best: bool = False
    out_dir: str = "runs/fastdiff"

    def __post_init__(self) -> None:
        _checks.choice("task", self.task, TASKS)
        _checks.choice("conditioning", self.conditioning, ("concat", "cross"))
        _checks.real("cond_drop", self.cond_drop, 0.0, 1.0)
        if not isinstance(self.label_names, (list, tuple)) or not all(isinstance(n, str) for n in self.label_names):
            raise InputError(f"label_names: expected a list of strings, got {self.label_names!r}")
        self.label_names = list(self.label_names)
        _checks.positive_int("seq_len", self.seq_len, 0)
        _checks.positive_int("src_len", self.src_len, 0)
        _checks.choice("family", self.family, ("discrete", "continuous"))
        kind = get_kind(self.kind)
        if self.schedule == "auto":
            self.schedule = "mutual_info" if self.family == "discrete" else "sqrt"
        _checks.choice("schedule", self.schedule, schedules.names())
        _checks.positive_int("T", self.T)
        for name in ("schedule_kw", "model", "process_kw"):
            if not isinstance(getattr(self, name), dict):
                raise InputTypeError(f"{name}: expected a dict, got {type(getattr(self, name)).__name__}")
        if self.family == "discrete":
            self._check_kind(kind)
        self._check_block_size()
        self._check_ar_diffusion()
        _checks.positive_int("refit_every", self.refit_every)
        _checks.choice("timestep_sampler", self.timestep_sampler, ("uniform", "loss-aware"))
        if not isinstance(self.arch, str) or not self.arch:
            raise InputError(f"arch: expected a model architecture name, got {self.arch!r}")
        _checks.choice("loss", self.loss, ("hybrid", "mdlm"))
        if self.loss == "mdlm" and self.family == "discrete" and self.kind != "absorbing":
            raise InputError("loss: 'mdlm' needs kind='absorbing'")
        _checks.real("hybrid_lambda", self.hybrid_lambda, 0.0)
        _checks.choice("parameterization", self.parameterization, continuous.PARAMETERIZATIONS)
        _checks.real("lam_round", self.lam_round, 0.0)
        _checks.real("lam_anchor", self.lam_anchor, 0.0)
        if not isinstance(self.embedding_layernorm, bool):
            raise InputTypeError(f"embedding_layernorm: expected a bool, got {self.embedding_layernorm!r}")
        _checks.real("self_condition_prob", self.self_condition_prob, 0.0, 1.0)
        _checks.real("lr", self.lr, 0.0, lo_open=True)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise InputError(f"betas: expected two numbers, got {self.betas!r}")
        self.betas = (_checks.real("betas", self.betas[0], 0.0, 1.0, hi_open=True),
                      _checks.real("betas", self.betas[1], 0.0, 1.0, hi_open=True))
        _checks.real("weight_decay", self.weight_decay, 0.0)
        _checks.positive_int("warmup_steps", self.warmup_steps, 0)
        _checks.choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _checks.real("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _checks.real("grad_clip", self.grad_clip, 0.0)
        _checks.real("ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        _checks.choice("amp", self.amp, ("auto", "off"))
        if not isinstance(self.device, str):
            raise InputTypeError(f"device: expected a string, got {self.device!r}")
        _checks.choice("parallel", self.parallel, PARALLEL)
        for name in ("batch_size", "grad_accum", "max_steps", "log_every"):
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("seed", self.seed, 0)
        for name in ("ckpt_every", "eval_every", "keep_checkpoints"):
            _checks.positive_int(name, getattr(self, name), 0)
        _checks.positive_int("eval_batches", self.eval_batches)
        if not isinstance(self.keep_best, bool):
            raise InputTypeError(f"keep_best: expected True or False, got {self.keep_best!r}")
        if self.keep_best and not self.eval_every:
            raise InputError("keep_best: the best checkpoint is chosen by validation; set eval_every > 0")
        if not isinstance(self.out_dir, (str, os.PathLike)):
            raise InputTypeError(f"out_dir: expected a path, got {self.out_dir!r}")
        self.out_dir = str(self.out_dir)

    def _check_block_size(self) -> None:
        """``model.block_size`` > 0 (a block-causal model, trained with BD3-LM's objective) needs an absorbing
        discrete process, uniform steps and an unconditional or attribute task."""
        bs = self.model.get("block_size", 0)
        if bs in (0, None):
            return
        _checks.positive_int("model.block_size", bs, 0)
        if self.family != "discrete" or self.kind != "absorbing":
            raise InputError("model.block_size: BD3-LM block-causal training needs family='discrete', "
                             "kind='absorbing'")
        if self.timestep_sampler != "uniform" or self.schedule == "adaptive":
            raise InputError("model.block_size: BD3-LM draws one step per block uniformly; use "
                             "timestep_sampler='uniform' and a fixed schedule")
        if self.task == "word_order":
            raise InputError("model.block_size: a block-causal model takes a label at most (task 'lm' or "
                             "'attribute')")

    def _check_ar_diffusion(self) -> None:
        """``ar_diffusion`` (AR-Diffusion's per-position steps) needs the continuous family, the x0
        parameterisation (positions at step 0 are clean), uniform sentence-level steps and a fixed schedule."""
        if not isinstance(self.ar_diffusion, bool):
            raise InputTypeError(f"ar_diffusion: expected True or False, got {self.ar_diffusion!r}")
        if not self.ar_diffusion:
            return
        if self.family != "continuous":
            raise InputError("ar_diffusion: AR-Diffusion's token-level steps are for family='continuous'")
        if self.parameterization != "x0":
            raise InputError("ar_diffusion: needs parameterization='x0' (positions at step 0 keep their x0 "
                             f"target), got {self.parameterization!r}")
        if self.timestep_sampler != "uniform" or self.schedule == "adaptive":
            raise InputError("ar_diffusion: AR-Diffusion draws its sentence-level step uniformly; use "
                             "timestep_sampler='uniform' and a fixed schedule")

    def _check_kind(self, kind: Any) -> None:
        unknown = sorted(set(self.process_kw) - set(kind.params) - set(kind.tensors))
        if unknown:
            known = sorted(set(kind.params) | set(kind.tensors))
            raise InputError(f"process_kw: unknown parameters {unknown} of a {kind.name} process; it takes "
                             f"{known or 'none'}")
        if self.schedule == "adaptive" and not kind.live_schedule:
            raise InputError(f"schedule: 'adaptive' re-fits alpha_bar during training, and a {kind.name} process "
                             "derives its matrices from the schedule once; choose another schedule")
        if self.schedule == "spindle" and not kind.per_token:
            raise InputError(f"schedule: 'spindle' is a per-token schedule, which only absorbing processes take "
                             f"(kind={kind.name!r})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**_checks.config_fields("config", cls, d))

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file atomically (a temporary file renamed onto ``path``)."""
        p = Path(path)
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        """A config file: a TrainConfig JSON object, or a checkpoint's config.json (its ``"train"``
        section). Errors name the file."""
        d = load_config_dict(path)
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise (InputTypeError if isinstance(e, TypeError) else InputError)(f"path: {path}: {e}") from None


def load_config_dict(path: str | os.PathLike, what: str = "path") -> dict[str, Any]:
    """The JSON object of a config file, not yet validated: a TrainConfig's fields (only those the file
    sets), or the ``"train"`` section of a checkpoint's config.json. FileNotFoundError / InputError
    naming ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no config file at {p}" if not p.exists() else f"{what}: {p} is not a file")
    try:
        d = json.loads(p.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what}: {p} is not valid JSON ({e})") from None
    if isinstance(d, dict) and d.get("format") == "fastdiff-checkpoint":
        if not isinstance(d.get("train"), dict):
            got = type(d.get("train")).__name__
            raise InputError(f"{what}: {p} is a checkpoint config whose \"train\" section must be a JSON object, "
                             f"got {got}")
        d = d["train"]
    if not isinstance(d, dict):
        raise InputError(f"{what}: {p} must hold a JSON object of TrainConfig fields, got {type(d).__name__}")
    return dict(d)


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str = "cosine",
              min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of the update at 0-based ``step``: linear warm-up ``(step + 1)/warmup_steps``
    for ``step < warmup_steps``, then 1 ("constant") or a cosine from 1 down to ``min_ratio`` at
    ``max_steps``: ``min_ratio + (1 - min_ratio)·(1 + cos(π·p))/2``, ``p = (step - warmup)/(max_steps - warmup)``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
