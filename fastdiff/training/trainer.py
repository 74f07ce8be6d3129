"""Training loop for fastdiff's text diffusion models: :class:`TrainConfig` and :class:`Trainer`.

Discrete (D3PM, Austin et al. 2021; MDLM, Sahoo et al. 2024): ``x_t = q_sample(x_0, t)``, the model
predicts x0 logits, loss = the hybrid loss ``L_vlb + λ·CE`` (or MDLM's) per token, averaged per sequence
and weighted by the timestep sampler's importance weights. Continuous (Diffusion-LM, Li et al. 2022;
SED, Strudel et al. 2022; Difformer, Gao et al. 2022): ``x_0 = E[w]`` with the embeddings learned
jointly, loss = MSE + ``lam_round·L_round`` + ``lam_anchor·L_anchor``; self-conditioning on half the
steps (Chen et al. 2022). Labels are dropped to the null label with probability ``cond_drop`` for
classifier-free guidance (Ho & Salimans 2022).

Reproducibility: every random draw of step ``n`` (timesteps, noise, masks, label dropout, self-condition
coin, dropout inside the model) comes from generators seeded by ``(seed, n)``, and the data order from
:class:`fastdiff.data.Batches`; so ``k`` steps + save + :meth:`Trainer.resume` + ``N - k`` steps gives
the same parameters, optimizer state and losses as ``N`` steps in one go (bit for bit on CPU).

Scale-out (under ``torchrun``, see :mod:`fastdiff.distributed`): an update sees the global batch
``batch_size × world_size × grad_accum``; rank ``r`` takes rows ``r, r + W, ...`` of it (a distributed
sampler over one shared permutation) in ``grad_accum`` micro-batches, and the model is wrapped in
``DistributedDataParallel``. The step's randomness is drawn for the whole global batch and each rank
keeps its rows, the loss is the mean over the global batch, the timestep sampler and adaptive schedule
are fed the gathered global batch in order: so a run's losses and parameters do not depend on how the
global batch is split over processes and micro-batches (up to float summation order; exactly when the
model has no dropout). Rank 0 alone writes logs and checkpoints; a checkpoint resumes on any world size
with the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _checks, continuous, discrete, schedules, timesteps
from .. import distributed as _dist
from . import checkpoint as ckpt
from .config import DATA_KEYS, RESUMABLE_OVERRIDES, TASKS, TrainConfig, lr_factor
from .process import build_process, process_config, sync_schedule
from ..errors import InputError, InputTypeError

__all__ = ["BEST_DIR", "DATA_KEYS", "EMA", "TASKS", "TrainConfig", "Trainer", "lr_factor"]

LOG_FILE = "train_log.jsonl"
BEST_DIR = "best"  # TrainConfig.keep_best: the checkpoint of the lowest validation loss so far


class EMA:
    """Exponential moving average of a model's parameters: after each update
    ``ema ← decay·ema + (1 - decay)·θ`` (float32 copies; starts at the initial parameters)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = _checks.real("decay", decay, 0.0, 1.0, hi_open=True)
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Weights with the keys of ``model.state_dict()``: EMA values for parameters (tied aliases
        included), the model's current buffers."""
        by_id = {id(p): n for n, p in model.named_parameters()}
        out = {}
        for k, v in model.state_dict(keep_vars=True).items():
            name = by_id.get(id(v))
            out[k] = self.shadow[name].to(v.dtype) if name is not None else v.detach()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, shadow in self.shadow.items():
            if n not in tensors:
                raise InputError(f"ema: the saved EMA weights lack {n!r}")
            full = tensors[n]
            if hasattr(shadow, "device_mesh"):  # an FSDP shard: keep this rank's part of the full tensor
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(shadow.dtype).to(shadow.device), shadow.device_mesh, shadow.placements)
            shadow.copy_(full)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n])


def _seed(seed: int, step: int, stream: str) -> int:
    digest = hashlib.sha256(f"fastdiff.train:{seed}:{step}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def check_device(name: object, what: str = "device") -> torch.device:
    """``name`` ("auto", "cpu", "cuda", "cuda:N", ...) as a device that exists here; InputError naming
    ``what`` otherwise (an unknown device string, CUDA where there is none, a CUDA index too large)."""
    if not isinstance(name, (str, torch.device)):
        raise InputTypeError(f"{what}: expected a device name, got {type(name).__name__}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{what}: {str(name)!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{what}: {str(name)!r}, but CUDA is not available here (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{what}: {str(name)!r}, but there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _device(name: str, ctx: _dist.Context) -> torch.device:
    dev = check_device(name)
    if dev.type == "cuda" and dev.index is None and ctx.distributed:
        dev = torch.device("cuda", ctx.local_rank % max(1, torch.cuda.device_count()))
    return dev


def _progress_enabled(progress: bool) -> bool:
    """A tqdm bar only where it is drawn in place: a terminal (or a notebook widget); into a file or
    pipe its ``\\r`` frames would pile up in the log."""
    if not progress:
        return False
    from tqdm.auto import tqdm

    if getattr(tqdm, "__module__", "").startswith("tqdm.notebook"):
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


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


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def read_log(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """``([(line, record), ...], torn)`` of a JSONL training log. A last line without its newline that is
    not JSON (a write killed half way) is dropped and ``torn`` is True; any other line that is not a JSON
    object with an integer ``step`` is an InputError naming the file and the line."""
    data = path.read_bytes()
    chunks = data.split(b"\n")
    tail = chunks.pop()  # b"" when the file ends with a newline
    out: list[tuple[str, dict[str, Any]]] = []
    torn = False

    def parse(i: int, raw: bytes, last: bool) -> None:
        nonlocal torn
        if not raw.strip():
            return
        try:
            line = raw.decode("utf-8")
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if last:
                torn = True
                return
            raise InputError(f"corrupted log: {path}: line {i} is not JSON ({e})") from None
        step = rec.get("step", 0) if isinstance(rec, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise InputError(f"corrupted log: {path}: line {i} is not a record with an integer step: {line[:80]!r}")
        out.append((line.rstrip("\r"), rec))

    for i, raw in enumerate(chunks, 1):
        parse(i, raw, last=False)
    parse(len(chunks) + 1, tail, last=True)
    return out, torn


def _data_length(field: str, value: int, data: torch.Tensor, key: str) -> int:
    """``config.<field>``: 0 takes the data's length; any other value must be the data's."""
    length = int(data.shape[1])
    if value and value != length:
        raise InputError(f"{field}: the config says {value} but train_data[{key!r}] holds sequences of {length}")
    return length


def _check_data(name: str, data: object, task: str) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict):
        raise InputTypeError(f"{name}: expected a dict of tensors, got {type(data).__name__}")
    keys = DATA_KEYS[task]
    if set(data) != set(keys):
        raise InputError(f"{name}: task {task!r} takes the keys {list(keys)}, got {sorted(data)}")
    out = {}
    for k in keys:
        v = _checks.integer(f"{name}[{k!r}]", data[k])
        if v.ndim != (1 if k == "labels" else 2):
            raise InputError(f"{name}[{k!r}]: expected {'(N,)' if k == 'labels' else '(N, L)'}, got {tuple(v.shape)}")
        if v.shape[0] != data[keys[0]].shape[0]:
            raise InputError(f"{name}[{k!r}]: {v.shape[0]} rows, expected {data[keys[0]].shape[0]}")
        out[k] = v.long()
    return out


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

    ``config.seq_len`` / ``src_len`` 0 take the data's lengths; any other value must equal them.

    :meth:`step` runs one update, :meth:`fit` runs to ``max_steps`` with logging, evaluation and
    checkpoints, :meth:`save` writes a resumable checkpoint, :meth:`resume` continues one.
    """

    def __init__(self, config: TrainConfig, train_data: dict[str, torch.Tensor],
                 valid_data: dict[str, torch.Tensor] | None = None, tokenizer: Any = None,
                 model: nn.Module | None = None, *, overwrite: bool = False):
        from ..data import Batches

        if not isinstance(config, TrainConfig):
            raise InputTypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if not isinstance(overwrite, bool):
            raise InputTypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
        self.train_data = _check_data("train_data", train_data, config.task)
        self.valid_data = None if valid_data is None else _check_data("valid_data", valid_data, config.task)
        target_key = "tgt" if config.task == "word_order" else "tokens"
        updates = {"seq_len": _data_length("seq_len", config.seq_len, self.train_data[target_key], target_key)}
        if config.task == "word_order":
            updates["src_len"] = _data_length("src_len", config.src_len, self.train_data["src"], "src")
        self.config = cfg = dataclasses.replace(config, **updates)
        self.dist = _dist.context()
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.device = _device(cfg.device, self.dist)
        if self.dist.backend == "nccl" and self.device.type != "cuda":
            raise InputError(f"device: the process group uses NCCL but the device is {self.device}")
        self.tokenizer = tokenizer
        if model is None:
            from ..models import build_model

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = build_model(cfg.arch, self._model_config())
        self.model = model.to(self.device).train()
        self.net = self._wrap()  # what the training forward calls: DDP / FSDP module, or the model
        self.model_config = dict(model.config_dict()) if hasattr(model, "config_dict") else dict(cfg.model)
        V = self.model_config.get("vocab_size")
        if V is None and tokenizer is not None:
            V = tokenizer.vocab_size
        if V is None:
            raise InputError("model: vocab_size unknown: give config.model['vocab_size'] or a tokenizer")
        self.vocab_size = int(V)
        if tokenizer is not None and tokenizer.vocab_size != self.vocab_size:
            raise InputError(f"tokenizer: has {tokenizer.vocab_size} ids but the model's vocab_size is {self.vocab_size}")
        for name, data in (("train_data", self.train_data), ("valid_data", self.valid_data or {})):
            for k in ("tokens", "tgt", "src"):
                if k in data and data[k].numel() and not 0 <= int(data[k].min()) <= int(data[k].max()) < V:
                    raise InputError(f"{name}[{k!r}]: token ids must lie in [0, {V})")
        self.num_labels = int(self.model_config.get("num_labels", 0) or 0)
        if cfg.task == "attribute":
            if self.num_labels < 1:
                raise InputError("model: the attribute task needs num_labels >= 1")
            labels = self.train_data["labels"]
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_labels:
                raise InputError(f"train_data['labels']: must lie in [0, {self.num_labels})")
        self.continuous = cfg.family == "continuous"
        if self.continuous and not callable(getattr(model, "embedding_table", None)):
            raise InputTypeError("model: continuous training needs model.embedding and model.embedding_table()")
        self.self_condition = self.continuous and bool(self.model_config.get("self_condition", False))
        mask_id = tokenizer.mask_id if tokenizer is not None else 1
        self.process_config = process_config(cfg.family, schedule=cfg.schedule, T=cfg.T, vocab_size=self.vocab_size,
                                             kind=cfg.kind, mask_id=mask_id, parameterization=cfg.parameterization,
                                             schedule_kw=cfg.schedule_kw)
        self.process = build_process(self.process_config)
        self.adaptive = self.process.schedule if isinstance(self.process.schedule, schedules.AdaptiveSchedule) else None
        self.sampler = timesteps.create(cfg.timestep_sampler, cfg.T)
        decay, no_decay = [], []
        names: tuple[list[str], list[str]] = ([], [])
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                k = 0 if p.ndim >= 2 and "embed" not in n.lower() else 1
                (decay, no_decay)[k].append(p)
                names[k].append(n)
        self._opt_names = names[0] + names[1]  # parameter names in the optimizer's index order
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)
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

    # --- configuration -------------------------------------------------------------------------
    def _model_config(self) -> dict[str, Any]:
        """SED config from ``config.model`` plus what the task and family imply (checked for conflicts)."""
        cfg, tok = self.config, self.tokenizer
        mc = dict(cfg.model)
        if tok is not None and mc.setdefault("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise InputError(f"model: vocab_size={mc['vocab_size']} but the tokenizer has {tok.vocab_size}")
        implied: dict[str, Any] = {"kind": cfg.family, "output": "logits" if cfg.family == "discrete" else "embedding"}
        if cfg.family == "continuous":
            implied["embedding_layernorm"] = cfg.embedding_layernorm
            mc.setdefault("self_condition", True)  # SED trains with self-conditioning
        elif cfg.kind == "absorbing":
            # MDLM: the x0 posterior of masked diffusion does not need the step (the masks carry it), and a
            # step-free model lets the sampler cache network calls (cache=True)
            mc.setdefault("time_conditioning", "none")
        if cfg.task == "attribute":
            labels = self.train_data["labels"]
            implied["num_labels"] = len(cfg.label_names) or int(labels.max()) + 1
        if cfg.task == "word_order" and cfg.conditioning == "cross":
            implied["cross_attention"] = True
        for k, v in implied.items():
            if mc.setdefault(k, v) != v:
                raise InputError(f"model: {k}={mc[k]!r} conflicts with the training config ({k}={v!r} implied)")
        return mc

    # --- scale-out -----------------------------------------------------------------------------
    def _wrap(self) -> nn.Module:
        """The module the training forward runs through: ``DistributedDataParallel`` (one full replica
        per rank; gradients all-reduced, averaged, during backward) or FSDP2 ``fully_shard`` (each
        transformer block and the root sharded), or the model itself in a world of one."""
        if not self.dist.distributed:
            return self.model
        if self.config.parallel == "fsdp":
            # The transformer blocks (where the parameters of a large model are) are sharded; the rest
            # (embeddings, heads) stays replicated with gradients all-reduced after backward, because the
            # trainer also uses the embeddings outside the model's forward (continuous x0 = E[w],
            # L_round), which a sharded root would not see.
            from torch.distributed.fsdp import fully_shard

            self._sharded = []
            for name in ("blocks", "encoder_blocks", "encoder"):
                sub = getattr(self.model, name, None)
                if isinstance(sub, nn.ModuleList):
                    for block in sub:
                        fully_shard(block)
                        self._sharded.append(block)
            if not self._sharded:
                raise InputError(f"parallel: fsdp shards a model's transformer blocks (.blocks), and "
                                 f"{type(self.model).__name__} has none; use parallel='ddp'")
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # A model may hold parameters a task never uses (the condition-segment embedding outside
        # text-to-text, the label table without labels): DDP must not wait for their gradients.
        return DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)

    def _sync_context(self, last: bool):
        """Gradient synchronisation only on the last micro-batch of an update."""
        if self.net is self.model and not self._fsdp:
            return contextlib.nullcontext()
        if self._fsdp:
            for block in self._sharded:
                block.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.net.no_sync()

    def _fsdp_clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """FSDP: average the replicated parameters' gradients over ranks (the sharded blocks' were
        reduce-scattered in backward), then clip by the global norm as ``clip_grad_norm_`` does."""
        plain = [p.grad for p in params if not hasattr(p.grad, "full_tensor")]
        if plain:
            flat = torch.cat([g.reshape(-1) for g in plain])
            torch.distributed.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in plain:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            n = torch.linalg.vector_norm(p.grad, 2)
            sq += (n.full_tensor() if hasattr(n, "full_tensor") else n).double() ** 2
        total = sq.sqrt().float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.device))
        return total

    @property
    def _fsdp(self) -> bool:
        return self.dist.distributed and self.config.parallel == "fsdp"

    def _all_finite(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is finite on every rank (one collective), so all ranks raise together."""
        ok = torch.isfinite(x.detach()).all().to(torch.float32).reshape(1)
        if self.dist.distributed:
            ok = ok.to(self.device)
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def _global_rows(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's per-row values (in its row order ``r, r+W, ...``) gathered into global-batch order."""
        if not self.dist.distributed:
            return local
        local = local.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(parts, local)
        return torch.stack(parts, 1).reshape(-1).cpu()  # row i*W + r comes from rank r

    def _global_mean(self, terms: dict[str, float]) -> dict[str, float]:
        if not self.dist.distributed:
            return terms
        keys = sorted(terms)
        v = torch.tensor([terms[k] for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(v)
        v = (v / self.world).tolist()
        return dict(zip(keys, v))

    # --- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.config.amp == "auto" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _rng_devices(self) -> list[int]:
        """CUDA devices whose global RNG a step reseeds (and restores afterwards)."""
        if self.device.type != "cuda":
            return []
        return [self.device.index if self.device.index is not None else torch.cuda.current_device()]

    def _generators(self, step: int, stream: str) -> tuple[torch.Generator, torch.Generator]:
        seed = self.config.seed
        cpu = torch.Generator().manual_seed(_seed(seed, step, stream + ":t"))
        if self.device.type == "cpu":
            return cpu, torch.Generator().manual_seed(_seed(seed, step, stream + ":x"))
        return cpu, torch.Generator(device=self.device).manual_seed(_seed(seed, step, stream + ":x"))

    def _cond(self, batch: dict[str, torch.Tensor], draws: dict[str, Any], rows: torch.Tensor
              ) -> dict[str, torch.Tensor]:
        cfg = self.config
        if cfg.task == "attribute":
            return {"label": draws["labels"][rows]}
        if cfg.task == "word_order":
            src = batch["src"]
            if cfg.conditioning == "concat":
                return {"cond_tokens": src}
            mask = src != (self.tokenizer.pad_id if self.tokenizer is not None else 0)
            with self._autocast():
                memory = self.model.encode(src, mask)
            return {"memory": memory, "memory_mask": mask}
        return {}

    def _draws(self, gbatch: dict[str, torch.Tensor], step: int, train: bool) -> dict[str, Any]:
        """Every random draw of a step, for the whole global batch (each rank keeps its rows): ``t``,
        importance weights ``w``, labels after condition dropout, ``x_t`` (discrete) or the Gaussian noise
        and the self-conditioning coin (continuous)."""
        cfg, T = self.config, self.config.T
        cpu_gen, gen = self._generators(step, "train" if train else "eval")
        x0 = gbatch["tgt" if cfg.task == "word_order" else "tokens"]
        G = x0.shape[0]
        if train:
            t, w = self.sampler.sample(G, generator=cpu_gen, device=self.device)
        else:
            t = torch.randint(1, T + 1, (G,), generator=cpu_gen).to(self.device)
            w = torch.ones(G, device=self.device)
        d: dict[str, Any] = {"t": t, "w": w}
        if cfg.task == "attribute":
            labels = gbatch["labels"]
            if train and cfg.cond_drop > 0:
                drop = torch.rand(labels.shape, generator=gen, device=labels.device) < cfg.cond_drop
                labels = torch.where(drop, torch.full_like(labels, self.num_labels), labels)
            d["labels"] = labels
        if not self.continuous:
            d["x_t"] = self.process.q_sample(x0, t, generator=gen)
        else:
            table = self.model.embedding_table()
            shape = (G, x0.shape[1], table.shape[1])
            d["noise"] = torch.randn(shape, generator=gen, device=self.device, dtype=table.dtype)
            if self.self_condition:
                d["coin"] = float(torch.rand((), generator=cpu_gen))  # drawn every step: a fixed RNG stream
        return d

    def _losses(self, gbatch: dict[str, torch.Tensor], rows: torch.Tensor, draws: dict[str, Any], train: bool
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss of the global-batch rows ``rows``: ``(terms, per_sequence_loss (b,), difficulty (b,), t (b,))``;
        ``terms["loss"]`` is the objective (a mean over these rows).

        ``difficulty`` is what the adaptive schedule fits to, a per-sequence loss that grows with the noise:
        the x0 cross-entropy for discrete models (the VLB terms are not monotone in t), the MSE (+ anchor)
        for continuous ones (SeqDiffuSeq fits its training loss)."""
        cfg = self.config
        net = self.net if train else self.model
        batch = {k: v[rows] for k, v in gbatch.items()}
        x0 = batch["tgt" if cfg.task == "word_order" else "tokens"]
        t, w = draws["t"][rows], draws["w"][rows]
        cond = self._cond(batch, draws, rows)
        if not self.continuous:
            x_t = draws["x_t"][rows]
            with self._autocast():
                logits = net(x_t, t, **cond)
            logits = logits.float()
            # -log p(x0 | x_t) per token: the hybrid loss's CE term, and what the adaptive schedule fits
            ce_tok = -self.process.x0_log_probs(logits).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            if cfg.loss == "mdlm":
                per_tok = discrete.mdlm_loss(self.process, x0, x_t, t, logits, reduction="none")
            else:  # discrete.hybrid_loss, sharing the CE term: L_vlb + λ·CE (D3PM)
                per_tok = discrete.vlb_terms(self.process, x0, x_t, t, logits) + cfg.hybrid_lambda * ce_tok
            per_seq = per_tok.float().mean(-1)
            ce = ce_tok.detach().float().mean(-1)
            terms = {"loss": (w * per_seq).mean(), cfg.loss: per_seq.mean().detach(), "ce": ce.mean()}
            return terms, per_seq.detach(), ce, t
        emb = self.model.embedding(x0)  # (b, L, D), learned jointly
        noise = draws["noise"][rows]
        x_t = self.process.q_sample(emb, t, noise=noise)
        extra: dict[str, torch.Tensor] = {}
        if self.self_condition:
            zeros = torch.zeros_like(x_t)
            extra["x_self_cond"] = zeros
            if train and draws["coin"] < cfg.self_condition_prob:  # Chen et al. 2022: estimate x0 once without grad
                with torch.no_grad(), self._autocast():
                    first = self.model(x_t, t, x_self_cond=zeros, **cond)
                extra["x_self_cond"] = self.process.to_x0(first.float(), x_t, t).detach()
        with self._autocast():
            out = net(x_t, t, **extra, **cond)
        out = out.float()
        table = self.model.embedding_table().float()
        mse = self.process.mse_loss(out, emb, x_t, t, noise, reduction="none").mean(-1)  # (b,)
        per_seq = mse
        terms: dict[str, torch.Tensor] = {"mse": mse.mean().detach()}
        if cfg.lam_anchor > 0:
            anchor = continuous.anchor_loss(self.process.to_x0(out, x_t, t), table, x0, reduction="none").mean(-1)
            per_seq = per_seq + cfg.lam_anchor * anchor
            terms["anchor"] = anchor.mean().detach()
        loss = (w * per_seq).mean()
        if cfg.lam_round > 0:  # L_round on x0 = E[w] does not depend on t: no importance weight
            rnd = continuous.rounding_loss(emb, table, x0)
            loss = loss + cfg.lam_round * rnd
            terms["round"] = rnd.detach()
        terms["loss"] = loss
        return terms, per_seq.detach(), per_seq.detach(), t

    def step(self) -> dict[str, float]:
        """One optimizer update; returns the loss terms (means over the global batch), ``lr``,
        ``grad_norm``, ``tokens`` (of the global batch) and ``time_s``."""
        cfg, n = self.config, self.global_step
        start = time.perf_counter()
        vals = self.batches.next_batch()
        gbatch = dict(zip(self.train_data, vals if isinstance(vals, tuple) else (vals,)))
        gbatch = {k: v.to(self.device, non_blocking=True) for k, v in gbatch.items()}
        lr = cfg.lr * lr_factor(n, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                schedule=cfg.lr_schedule, min_ratio=cfg.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        G, A, b = self.global_batch, cfg.grad_accum, cfg.batch_size
        share = torch.arange(self.rank, G, self.world, device=self.device)  # this rank's rows
        sums: dict[str, float] = {}
        per_seq_parts, diff_parts, t_parts = [], [], []
        with torch.random.fork_rng(devices=self._rng_devices()):
            draws = self._draws(gbatch, n, train=True)
            self.optimizer.zero_grad(set_to_none=True)
            for m in range(A):
                # dropout inside the model: one stream per (rank, micro-batch); "torch" alone for the first
                stream = "torch" if (self.rank, m) == (0, 0) else f"torch:{self.rank}:{m}"
                torch.manual_seed(_seed(cfg.seed, n, stream))
                rows = share[m * b:(m + 1) * b]
                with self._sync_context(last=m == A - 1):
                    terms, per_seq, difficulty, t = self._losses(gbatch, rows, draws, train=True)
                    loss = terms["loss"]
                    if not self._all_finite(loss):
                        raise FloatingPointError(f"step {n}: the loss is not finite ({float(loss)} on rank {self.rank})")
                    (loss / A).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / A
                per_seq_parts.append(per_seq)
                diff_parts.append(difficulty)
                t_parts.append(t)
            params = [p for p in self.model.parameters() if p.grad is not None]
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            if self._fsdp:
                grad_norm = self._fsdp_clip(params, max_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if not bool(torch.isfinite(grad_norm)):
                raise FloatingPointError(f"step {n}: the gradient norm is {float(grad_norm)}")
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        # the timestep sampler and the adaptive schedule see the whole global batch, in its order
        t_cpu = self._global_rows(torch.cat(t_parts)).cpu()
        per_seq_all = self._global_rows(torch.cat(per_seq_parts).double())
        self.sampler.update(t_cpu, per_seq_all.cpu())
        if self.adaptive is not None:
            self.adaptive.record(t_cpu, self._global_rows(torch.cat(diff_parts).double()).cpu())
            if (n + 1) % cfg.refit_every == 0 and self.adaptive.refit():
                sync_schedule(self.process)
        self.global_step = n + 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - start
        self.elapsed += dt
        metrics = self._global_mean(sums)
        metrics.update(lr=lr, grad_norm=float(grad_norm), tokens=float(batch_tokens(gbatch)), time_s=dt)
        for k, v in metrics.items():
            self._window[k] = self._window.get(k, 0.0) + v
        self._window["count"] = self._window.get("count", 0.0) + 1
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
            raw = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            self.ema.copy_to(self.model)
            try:
                return {k.replace("valid_", "valid_ema_", 1): v for k, v in self.evaluate("raw").items()}
            finally:
                with torch.no_grad():
                    for n, p in self.model.named_parameters():
                        p.copy_(raw[n])
        from ..data import Batches

        if self.valid_data is None:
            raise InputError("valid_data: evaluate() needs validation data")
        n = next(iter(self.valid_data.values())).shape[0]
        batches = Batches(*self.valid_data.values(), batch_size=min(self.config.batch_size, n), shuffle=False)
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        count = min(self.config.eval_batches, len(batches))
        try:
            with torch.random.fork_rng(devices=self._rng_devices()):
                for i in range(count):
                    torch.manual_seed(_seed(self.config.seed, i, "eval-torch"))
                    vals = batches.next_batch()
                    vals = vals if isinstance(vals, tuple) else (vals,)
                    batch = {k: v.to(self.device) for k, v in zip(self.valid_data, vals)}
                    rows = torch.arange(next(iter(batch.values())).shape[0], device=self.device)
                    terms = self._losses(batch, rows, self._draws(batch, i, train=False), train=False)[0]
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
        finally:
            self.model.train(was_training)
        return {f"valid_{k}": v / count for k, v in sums.items()}

    def _data_digest(self) -> str:
        """SHA-256 of the training tensors (keys, dtypes, shapes, values): a resume checks its data is the run's."""
        if getattr(self, "_digest", None) is None:
            h = hashlib.sha256()
            for k, v in self.train_data.items():
                v = v.detach().to("cpu").contiguous()
                h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
                h.update(v.numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    # --- the run directory ---------------------------------------------------------------------
    def _claim_out_dir(self) -> None:
        """Before the first write into ``out_dir``: a fresh run refuses a directory that already holds a
        run (:func:`run_artefacts`) unless ``overwrite=True``, which deletes those entries (only them)."""
        if self._claimed:
            return
        out = Path(self.config.out_dir)
        ckpt.ensure_directory_target(out, "out_dir")
        found = run_artefacts(out)
        if found and not self._overwrite:
            shown = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
            raise InputError(f"out_dir: {out} already holds a training run ({shown}); continue it with "
                             f"Trainer.resume({str(out)!r}, ...) (fastdiff train --resume), choose another "
                             "out_dir, or pass overwrite=True (--overwrite) to replace it")
        if found and self.rank == 0:
            remove_run_artefacts(out)
        _dist.barrier()
        self._claimed = True

    # --- loop ----------------------------------------------------------------------------------
    def _log_record(self) -> dict[str, Any]:
        w, count = self._window, self._window.get("count", 0.0)
        rec: dict[str, Any] = {"step": self.global_step}
        for k, v in w.items():
            if k not in ("count", "tokens", "time_s"):
                rec[k] = v / count
        rec["tokens_per_s"] = w.get("tokens", 0.0) / w["time_s"] if w.get("time_s") else 0.0
        rec["elapsed"] = self.elapsed
        self._window = {}
        return rec

    def _write_log(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if self.rank != 0:  # rank 0 alone writes (every rank holds the same global means)
            return
        out = Path(self.config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

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
                   disable=not _progress_enabled(progress) or self.rank != 0, desc="train")
        try:
            while self.global_step < stop:
                m = self.step()
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                s = self.global_step
                if s % cfg.log_every == 0:
                    self._write_log(self._log_record())
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
                out = Path(cfg.out_dir)
                if self.rank == 0 and ckpt.read_latest(out) != on_disk[1].name:
                    ckpt.write_latest(out, on_disk[1].name)
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

    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        opt = self._optimizer_state()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in opt["state"].items():
            for name, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{idx}.{name}"] = v
                else:
                    scalars.setdefault(str(idx), {})[name] = v
        groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in opt["param_groups"]]
        if isinstance(self.sampler, timesteps.LossAwareSampler):
            tensors["sampler.losses"] = self.sampler._losses
            tensors["sampler.count"] = self.sampler._count
        if self.adaptive is not None:
            tensors["adaptive.loss"] = self.adaptive.loss
            tensors["adaptive.alpha_bar"] = self.adaptive.alpha_bar
        state = {"step": self.global_step, "elapsed": self.elapsed, "data": self.batches.state_dict(),
                 "global_batch": self.global_batch, "world_size": self.world,
                 "optimizer": {"param_groups": groups, "scalars": scalars}, "window": dict(self._window),
                 "timestep_sampler": self.config.timestep_sampler, "data_sha256": self._data_digest(),
                 "best": self.best}
        return state, tensors

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
        state, tensors = self._state()
        ema = self.ema.state_dict(self.model) if self.ema is not None else None
        if ema is not None:  # FSDP: every rank takes part in gathering each sharded tensor
            ema = {k: _full_tensor(v) for k, v in ema.items()}
        weights = self._full_model_state()
        written = target
        if self.rank == 0:
            written = ckpt.save_checkpoint(target, _Weights(self.model, weights), process=self._process_for_saving(),
                                           train=self.config.to_dict(), tokenizer=self.tokenizer,
                                           step=self.global_step, ema=ema, state=state, state_tensors=tensors,
                                           update_latest=default)
            if default and self.config.keep_checkpoints:
                old = sorted(p for p in out.iterdir() if ckpt.STEP_DIR.fullmatch(p.name) and p.is_dir())
                for p in old[:-self.config.keep_checkpoints]:
                    if p != written:
                        shutil.rmtree(p, ignore_errors=True)
        if default:
            self._on_disk = (self.global_step, Path(written))
        _dist.barrier()
        return written

    def _optimizer_state(self) -> dict[str, Any]:
        """``optimizer.state_dict()`` with full (unsharded) tensors: under FSDP gathered to rank 0 (other
        ranks get an empty dict) and re-keyed from parameter names to the optimizer's indices, so the
        checkpoint is the same whatever the parallelism that wrote it."""
        if not self._fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        index = {n: i for i, n in enumerate(self._opt_names)}
        groups = [dict(g, params=[index[n] for n in g["params"]]) for g in osd.get("param_groups", [])]
        return {"state": {index[n]: v for n, v in osd.get("state", {}).items()}, "param_groups": groups}

    def _load_optimizer_state(self, sd: dict[str, Any]) -> None:
        if not self._fsdp:
            self.optimizer.load_state_dict(sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self._opt_names
        full = {"state": {names[int(i)]: v for i, v in sd["state"].items()},
                "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in sd["param_groups"]]}
        # strict=False: a parameter the task never uses (no gradient yet) has no state, as in a plain
        # optimizer.state_dict()
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=full,
                                 options=StateDictOptions(full_state_dict=True, strict=False))

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        """The model's unsharded ``state_dict`` (collective under FSDP)."""
        if not self._fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_state(self, d: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor],
                    cfg: dict[str, Any]) -> None:
        try:
            groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                      for g in state["optimizer"]["param_groups"]]
            opt_state: dict[int, dict[str, Any]] = {}
            for key, v in tensors.items():
                if key.startswith("optim."):
                    _, idx, name = key.split(".", 2)
                    opt_state.setdefault(int(idx), {})[name] = v
            for idx, vals in state["optimizer"].get("scalars", {}).items():
                opt_state.setdefault(int(idx), {}).update(vals)
            self._load_optimizer_state({"state": opt_state, "param_groups": groups})
            saved_n = state["data"].get("n") if isinstance(state["data"], dict) else None
            if saved_n is not None and saved_n != self.batches.n:
                raise _DataMismatch(f"train_data: the run in {d} was trained on {saved_n} sequences, this data has "
                                    f"{self.batches.n}; a resume needs the same data (--data, --balance)")
            digest = state.get("data_sha256")
            if digest is not None and digest != self._data_digest():
                raise _DataMismatch(f"train_data: differs from the data the run in {d} was trained on (SHA-256 of "
                                    "the training tensors); a resume needs the same data (--data, --balance)")
            self.batches.load_state_dict(state["data"])
            self.global_step = int(state["step"])
            if self.global_step != int(cfg["step"]):
                raise ValueError(f"step {self.global_step}, but {d / ckpt.CONFIG_FILE} says step {cfg['step']}")
            self.elapsed = float(state.get("elapsed", 0.0))
            self._window = {k: float(v) for k, v in state.get("window", {}).items()}
            best = state.get("best")
            self.best = None if best is None else {"step": int(best["step"]), "valid_loss": float(best["valid_loss"])}
        except _DataMismatch as e:
            raise InputError(str(e)) from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise InputError(f"corrupted checkpoint: {d / ckpt.STATE_JSON}: {type(e).__name__}: {e}") from None
        try:
            if isinstance(self.sampler, timesteps.LossAwareSampler):
                self.sampler._losses = tensors["sampler.losses"].to(torch.float64).clone()
                self.sampler._count = tensors["sampler.count"].to(torch.int64).clone()
            if self.adaptive is not None:
                self.adaptive.loss = tensors["adaptive.loss"].to(torch.float64).clone()
                self.adaptive.alpha_bar = tensors["adaptive.alpha_bar"].to(torch.float64).clone()
                sync_schedule(self.process)
        except KeyError as e:
            raise InputError(f"corrupted checkpoint: {d / ckpt.STATE_FILE} lacks the tensor {e}") from None
        if self.ema is not None:  # FSDP: re-sharded like the shadows
            self.ema.load_state_dict(ckpt.load_tensors(d / ckpt.EMA_FILE, config=cfg, finite=True))

    def _continue_log(self, source_log: Path, same: bool) -> None:
        """The resumed run's log: in its own directory, the lines written after the checkpoint (by a run
        that went on and died, or a torn last line) are dropped; into another directory, the source's
        lines up to the checkpoint are copied (the source is only read)."""
        if self.rank != 0:  # rank 0 alone writes the log
            return
        log = Path(self.config.out_dir) / LOG_FILE
        src = log if same else source_log
        if not src.is_file():
            return
        records, torn = read_log(src)
        keep = [line for line, rec in records if rec.get("step", 0) <= self.global_step]
        if same and len(keep) == len(records) and not torn:
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        ckpt._replace_file(log, "".join(line + "\n" for line in keep))

    @classmethod
    def resume(cls, path: str | os.PathLike, train_data: dict[str, torch.Tensor],
               valid_data: dict[str, torch.Tensor] | None = None, tokenizer: Any = None,
               model: nn.Module | None = None, *, overwrite: bool = False, **overrides: Any) -> Trainer:
        """Continue the run saved at ``path`` at the same step with the same optimizer, EMA, data position,
        timestep-sampler and adaptive-schedule state.

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
        bad = sorted(set(overrides) - set(RESUMABLE_OVERRIDES))
        if bad:
            raise InputError(f"overrides: {bad} cannot change on resume; allowed: {list(RESUMABLE_OVERRIDES)}")
        if not isinstance(overwrite, bool):
            raise InputTypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
        given = Path(path)
        if not given.exists():
            raise FileNotFoundError(f"path: no checkpoint at {given}")
        source_run = given.parent if (given / ckpt.CONFIG_FILE).is_file() else given
        if overrides.get("out_dir") is None:
            overrides["out_dir"] = str(source_run)
        same = _same_dir(Path(overrides["out_dir"]), source_run)
        if same:  # the run goes on here: first finish or remove what a killed save left
            if _dist.rank() == 0:
                ckpt.remove_stale_temporaries(source_run)
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
        config = _rebatch(config, state, d)
        tok = ckpt.load_tokenizer(d, cfg, tokenizer)
        if model is None:
            from ..models import build_model

            try:
                model = build_model(cfg["arch"], cfg["model"], saved=True)
            except (TypeError, ValueError) as e:
                raise InputError(f"checkpoint: {d / ckpt.CONFIG_FILE}: cannot build the model: {e}") from None
        weights = d / ckpt.MODEL_FILE
        ckpt.load_state_dict_checked(model, ckpt.load_tensors(weights, config=cfg, finite=True), weights)
        trainer = cls(config, train_data, valid_data, tokenizer=tok, model=model, overwrite=overwrite)
        trainer.resumed_from = d
        if same:
            trainer._claimed = True
        else:
            trainer._claim_out_dir()
        trainer._load_state(d, state, state_tensors, cfg)
        trainer._continue_log(source_run / LOG_FILE, same)
        if same and _same_dir(d.parent, out) and ckpt.STEP_DIR.fullmatch(d.name):
            trainer._on_disk = (trainer.global_step, d)
        return trainer


class _DataMismatch(Exception):
    """Resume data that are not the run's (reported as an InputError, not as a corrupted checkpoint)."""


def _rebatch(config: TrainConfig, state: dict[str, Any], d: Path) -> TrainConfig:
    """``config`` with the per-rank ``batch_size`` that keeps the saved run's global batch on the current
    world size and ``grad_accum`` (a run resumes on any number of processes that divides it)."""
    saved = state.get("global_batch", (state.get("data") or {}).get("batch_size"))
    if saved is None:
        return config
    world = _dist.world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    per, rem = divmod(int(saved), world * config.grad_accum)
    if rem or per < 1:
        raise InputError(f"batch_size: the run in {d} trains on a global batch of {saved} sequences, which does not "
                         f"split into {world} process(es) x grad_accum {config.grad_accum}; choose a world size and "
                         "grad_accum whose product divides it")
    return dataclasses.replace(config, batch_size=per)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP shard) gathered to a plain tensor; anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _Weights:
    """A model's identity (``arch``, ``config_dict``) with a given ``state_dict`` (the gathered FSDP one)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]):
        self._model, self._state = model, state
        self.arch = getattr(model, "arch", None)

    def config_dict(self) -> dict[str, Any]:
        return self._model.config_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens in a batch (``tokens`` or ``tgt``)."""
    x = batch.get("tokens", batch.get("tgt"))
    return int(x.numel()) if x is not None else 0

