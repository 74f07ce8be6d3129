"""What a resumable checkpoint holds besides the weights, and how a trainer gets it back.

``state.json``: the step, elapsed time, data position (and the data's size and SHA-256, so a resume on
other data is refused), the global batch and world size that wrote it, the optimizer's hyper-parameters
and scalar state, the log window, the timestep sampler's name and the best validation loss (keep_best).
``state.safetensors``: the optimizer's tensors (``optim.<index>.<name>``, full tensors even under FSDP,
keyed by the optimizer's parameter index so any parallelism can read them), the loss-aware sampler's
history (``sampler.*``) and the adaptive schedule's (``adaptive.*``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import distributed as _dist
from .. import timesteps
from . import checkpoint as ckpt
from .config import TrainConfig
from .parallel import full_tensor
from .process import sync_schedule
from ..errors import InputError

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Weights", "data_digest", "load_state", "optimizer_state", "rebatch", "save_state", "write_checkpoint"]


class _DataMismatch(Exception):
    """Resume data that are not the run's (reported as an InputError, not as a corrupted checkpoint)."""


def data_digest(data: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the training tensors (keys, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for k, v in data.items():
        v = v.detach().to("cpu").contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


# --- the optimizer, whatever the parallelism ----------------------------------------------------------
def optimizer_state(tr: Trainer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with full (unsharded) tensors: under FSDP gathered to rank 0 (other
    ranks get an empty dict) and re-keyed from parameter names to the optimizer's indices, so the
    checkpoint is the same whatever the parallelism that wrote it."""
    if not tr.parallel.fsdp:
        return tr.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(tr.model, tr.optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {n: i for i, n in enumerate(tr._opt_names)}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in osd.get("param_groups", [])]
    return {"state": {index[n]: v for n, v in osd.get("state", {}).items()}, "param_groups": groups}


def _load_optimizer_state(tr: Trainer, sd: dict[str, Any]) -> None:
    if not tr.parallel.fsdp:
        tr.optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = tr._opt_names
    full = {"state": {names[int(i)]: v for i, v in sd["state"].items()},
            "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in sd["param_groups"]]}
    # strict=False: a parameter the task never uses (no gradient yet) has no state, as in a plain
    # optimizer.state_dict()
    set_optimizer_state_dict(tr.model, tr.optimizer, optim_state_dict=full,
                             options=StateDictOptions(full_state_dict=True, strict=False))


# --- save ----------------------------------------------------------------------------------------------
def save_state(tr: Trainer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(state.json, state.safetensors)`` of the trainer now (collective under FSDP)."""
    tensors: dict[str, torch.Tensor] = {}
    opt = optimizer_state(tr)
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = v
            else:
                scalars.setdefault(str(idx), {})[name] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in opt["param_groups"]]
    if isinstance(tr.sampler, timesteps.LossAwareSampler):
        tensors["sampler.losses"] = tr.sampler._losses
        tensors["sampler.count"] = tr.sampler._count
    if tr.adaptive is not None:
        tensors["adaptive.loss"] = tr.adaptive.loss
        tensors["adaptive.alpha_bar"] = tr.adaptive.alpha_bar
    state = {"step": tr.global_step, "elapsed": tr.elapsed, "data": tr.batches.state_dict(),
             "global_batch": tr.global_batch, "world_size": tr.world,
             "optimizer": {"param_groups": groups, "scalars": scalars}, "window": dict(tr._window),
             "timestep_sampler": tr.config.timestep_sampler, "data_sha256": tr._data_digest(),
             "best": tr.best}
    return state, tensors


def write_checkpoint(tr: Trainer, target: Path, update_latest: bool) -> Path:
    """Write the trainer's checkpoint at ``target``: every rank takes part in collecting the full state
    (FSDP), rank 0 alone writes it (atomically) and gets its path; the others get ``target``."""
    state, tensors = save_state(tr)
    ema = tr.ema.state_dict(tr.model) if tr.ema is not None else None
    if ema is not None:  # FSDP: every rank takes part in gathering each sharded tensor
        ema = {k: full_tensor(v) for k, v in ema.items()}
    weights = tr.parallel.full_model_state(tr.model)
    if tr.rank != 0:
        return target
    return ckpt.save_checkpoint(target, Weights(tr.model, weights), process=tr._process_for_saving(),
                                process_tensors=tr.process_tensors, train=tr.config.to_dict(), tokenizer=tr.tokenizer,
                                step=tr.global_step, ema=ema, state=state, state_tensors=tensors,
                                update_latest=update_latest)


# --- load ----------------------------------------------------------------------------------------------
def load_state(tr: Trainer, d: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor],
               cfg: dict[str, Any]) -> None:
    """Put the state of the checkpoint ``d`` (``cfg``: its config.json) into a freshly built trainer."""
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
        _load_optimizer_state(tr, {"state": opt_state, "param_groups": groups})
        saved_n = state["data"].get("n") if isinstance(state["data"], dict) else None
        if saved_n is not None and saved_n != tr.batches.n:
            raise _DataMismatch(f"train_data: the run in {d} was trained on {saved_n} sequences, this data has "
                                f"{tr.batches.n}; a resume needs the same data (--data, --balance)")
        digest = state.get("data_sha256")
        if digest is not None and digest != tr._data_digest():
            raise _DataMismatch(f"train_data: differs from the data the run in {d} was trained on (SHA-256 of "
                                "the training tensors); a resume needs the same data (--data, --balance)")
        tr.batches.load_state_dict(state["data"])
        tr.global_step = int(state["step"])
        if tr.global_step != int(cfg["step"]):
            raise ValueError(f"step {tr.global_step}, but {d / ckpt.CONFIG_FILE} says step {cfg['step']}")
        tr.elapsed = float(state.get("elapsed", 0.0))
        tr._window = {k: float(v) for k, v in state.get("window", {}).items()}
        best = state.get("best")
        tr.best = None if best is None else {"step": int(best["step"]), "valid_loss": float(best["valid_loss"])}
    except _DataMismatch as e:
        raise InputError(str(e)) from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise InputError(f"corrupted checkpoint: {d / ckpt.STATE_JSON}: {type(e).__name__}: {e}") from None
    try:
        if isinstance(tr.sampler, timesteps.LossAwareSampler):
            tr.sampler._losses = tensors["sampler.losses"].to(torch.float64).clone()
            tr.sampler._count = tensors["sampler.count"].to(torch.int64).clone()
        if tr.adaptive is not None:
            tr.adaptive.loss = tensors["adaptive.loss"].to(torch.float64).clone()
            tr.adaptive.alpha_bar = tensors["adaptive.alpha_bar"].to(torch.float64).clone()
            sync_schedule(tr.process)
    except KeyError as e:
        raise InputError(f"corrupted checkpoint: {d / ckpt.STATE_FILE} lacks the tensor {e}") from None
    if tr.ema is not None:  # FSDP: re-sharded like the shadows
        tr.ema.load_state_dict(ckpt.load_tensors(d / ckpt.EMA_FILE, config=cfg, finite=True))


def rebatch(config: TrainConfig, state: dict[str, Any], d: Path) -> TrainConfig:
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


class Weights:
    """A model's identity (``arch``, ``config_dict``) with a given ``state_dict`` (the gathered FSDP one)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self._model, self._state = model, state
        self.arch = getattr(model, "arch", None)

    def config_dict(self) -> dict[str, Any]:
        return self._model.config_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state
