"""Diffusion processes from JSON-able configs, as stored in a checkpoint's ``config.json``.

``{"family": "discrete", "kind": "absorbing", "schedule": "mutual_info", "T": 1000, "schedule_kw": {},
"vocab_size": 4096, "mask_id": 1}`` -> :class:`fastdiff.discrete.Absorbing`;
``{"family": "continuous", "schedule": "sqrt", "T": 2000, "parameterization": "x0"}`` ->
:class:`fastdiff.continuous.GaussianDiffusion`. An adaptive schedule (SeqDiffuSeq, Yuan et al. 2022) that
was re-fitted during training carries its fitted ``alpha_bar`` (a list of ``T + 1`` floats) so the loaded
process is the one the model was trained with last.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _checks, schedules
from ..continuous import GaussianDiffusion
from ..discrete import Absorbing, DiscreteProcess, Uniform
from ..errors import InputError, InputTypeError

__all__ = ["FAMILIES", "KINDS", "build_process", "process_config"]

FAMILIES = ("discrete", "continuous")
KINDS = ("absorbing", "uniform")
_KEYS = {"family", "kind", "schedule", "T", "schedule_kw", "parameterization", "vocab_size", "mask_id",
         "alpha_bar", "model_var"}


def process_config(family: str, *, schedule: str, T: int, vocab_size: int | None = None, kind: str = "absorbing",
                   mask_id: int = 1, parameterization: str = "x0", schedule_kw: dict | None = None) -> dict[str, Any]:
    """The JSON-able dict :func:`build_process` takes (validated by building nothing yet)."""
    family = _checks.choice("family", family, FAMILIES)
    cfg: dict[str, Any] = {"family": family, "schedule": schedule, "T": T, "schedule_kw": dict(schedule_kw or {})}
    if family == "discrete":
        cfg.update(kind=kind, vocab_size=vocab_size, mask_id=mask_id)
    else:
        cfg["parameterization"] = parameterization
    return cfg


def _schedule_kw(kw: object) -> dict[str, Any]:
    if kw is None:
        return {}
    if not isinstance(kw, dict):
        raise InputTypeError(f"process.schedule_kw: expected a dict, got {type(kw).__name__}")
    # JSON has no tensors: a list (e.g. spindle's token_info) becomes a float64 tensor.
    return {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v for k, v in kw.items()}


def build_process(cfg: dict[str, Any]) -> DiscreteProcess | GaussianDiffusion | None:
    """A diffusion process from its config dict (None for ``{"family": "none"}``: the checkpoint of a
    model without a process, e.g. the causal LM or classifier used for scoring).

    Keys: ``family`` ("discrete" | "continuous"); ``schedule`` (a :func:`fastdiff.schedules.names` entry),
    ``T``, ``schedule_kw`` (extra keyword arguments of the schedule; lists become tensors); discrete:
    ``kind`` ("absorbing" | "uniform"), ``vocab_size``, ``mask_id`` (absorbing, default 1); continuous:
    ``parameterization`` ("x0" default, "eps", "mean"), ``model_var``. Optional ``alpha_bar``: ``T + 1``
    floats replacing the schedule's values (an adaptive schedule's latest fit).
    """
    if not isinstance(cfg, dict):
        raise InputTypeError(f"cfg: expected a dict, got {type(cfg).__name__}")
    if cfg.get("family") == "none":
        return None
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise InputError(f"cfg: unknown process keys {unknown}; expected some of {sorted(_KEYS)}")
    family = _checks.choice("process.family", cfg.get("family"), FAMILIES)
    name = cfg.get("schedule")
    if name not in schedules.names():
        raise InputError(f"process.schedule: expected one of {schedules.names()}, got {name!r}")
    T = _checks.positive_int("process.T", cfg.get("T"))
    kw = _schedule_kw(cfg.get("schedule_kw"))
    try:
        schedule = schedules.get(name, T, **kw)
    except (InputError, InputTypeError):
        raise
    except TypeError as e:  # an argument the schedule does not take (or of a type it cannot use)
        raise InputTypeError(f"process.schedule_kw: {name} schedule: {e}") from None
    if cfg.get("alpha_bar") is not None:
        ab = torch.tensor(cfg["alpha_bar"], dtype=torch.float64)
        if ab.shape != schedule.alpha_bar.shape:
            raise InputError(f"process.alpha_bar: expected shape {tuple(schedule.alpha_bar.shape)}, "
                             f"got {tuple(ab.shape)}")
        if not all(math.isfinite(v) for v in ab.flatten().tolist()):
            raise InputError("process.alpha_bar: must be finite")
        schedule.alpha_bar = ab
    if family == "continuous":
        return GaussianDiffusion(schedule, parameterization=cfg.get("parameterization", "x0"),
                                 model_var=cfg.get("model_var", "fixed_small"))
    kind = _checks.choice("process.kind", cfg.get("kind", "absorbing"), KINDS)
    V = _checks.positive_int("process.vocab_size", cfg.get("vocab_size"), 2)
    if kind == "absorbing":
        return Absorbing(V, mask_id=cfg.get("mask_id", 1), schedule=schedule)
    return Uniform(V, schedule)


def sync_schedule(process: DiscreteProcess | GaussianDiffusion) -> None:
    """After an adaptive schedule's refit: Gaussian diffusion caches ``alpha_bar``, refresh it."""
    if isinstance(process, GaussianDiffusion):
        process.alpha_bar = process.schedule.alpha_bar
