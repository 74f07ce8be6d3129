"""Diffusion processes from JSON-able configs, as stored in a checkpoint's ``config.json`` (the tensors some
processes are built from, in its ``process.safetensors``).

``{"family": "discrete", "kind": "absorbing", "schedule": "mutual_info", "T": 1000, "schedule_kw": {},
"vocab_size": 4096, "mask_id": 1}`` -> :class:`fastdiff.discrete.Absorbing`;
``{..., "kind": "gaussian_band", "process_kw": {"bandwidth": 8}}`` -> :class:`~fastdiff.discrete.GaussianBand`;
``{..., "kind": "nearest_neighbor", "process_kw": {"k": 8}, "tensors": ["embeddings"]}`` with the
``(V, D)`` embeddings -> :class:`~fastdiff.discrete.NearestNeighbor`; ``{..., "kind": "dense", "tensors":
["Q"]}`` with ``Q`` ``(T, V, V)`` or ``(V, V)`` -> :class:`~fastdiff.discrete.Dense`;
``{"family": "continuous", "schedule": "sqrt", "T": 2000, "parameterization": "x0"}`` ->
:class:`fastdiff.continuous.GaussianDiffusion`. An adaptive schedule (SeqDiffuSeq, Yuan et al. 2022) that
was re-fitted during training carries its fitted ``alpha_bar`` (a list of ``T + 1`` floats) so the loaded
process is the one the model was trained with last.

The discrete kinds are a registry (:class:`Kind`, :func:`register_kind`): a new process is trained,
checkpointed and loaded once its kind is registered, with no change to the trainer, the checkpoint code
or the command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _checks, schedules
from ..continuous import GaussianDiffusion
from ..discrete import Absorbing, Dense, DiscreteProcess, GaussianBand, NearestNeighbor, Uniform
from ..errors import InputError, InputTypeError

__all__ = ["FAMILIES", "KINDS", "Kind", "build_process", "kinds", "process_config", "register_kind",
           "training_process"]

FAMILIES = ("discrete", "continuous")
_KEYS = {"family", "kind", "schedule", "T", "schedule_kw", "parameterization", "vocab_size", "mask_id",
         "alpha_bar", "model_var", "process_kw", "tensors"}
#: a matrix process caches up to ``T + 1`` float64 ``(V, V)`` matrices; training refuses more than this
MATRIX_BYTES_LIMIT = 8 << 30


@dataclass(frozen=True)
class Kind:
    """A discrete process kind: ``build(schedule, vocab_size, mask_id, params, tensors) -> process``.

    params : its JSON parameters (``process_kw`` entries) with their defaults.
    tensors : the tensors it is built from, saved in the checkpoint's ``process.safetensors``; for training
        each comes from ``process_kw[name]``, a ``.safetensors`` file, or from ``sources[name]`` by default
        (``"model"``: the model's token embeddings when training starts).
    live_schedule : the process reads ``schedule.alpha_bar`` at every call, so an adaptive schedule's
        refits reach it (a process that derives matrices from the schedule once does not).
    per_token : it takes a per-token schedule (spindle).
    matrix : it holds ``(V, V)`` matrices (memory ``~ (T + 1)·8·V²`` bytes, checked before training).
    """

    name: str
    build: Callable[..., DiscreteProcess]
    params: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    live_schedule: bool = False
    per_token: bool = False
    matrix: bool = False


_REGISTRY: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Make ``kind`` trainable and loadable by name (``TrainConfig.kind``, ``--kind``, checkpoints)."""
    if not isinstance(kind, Kind):
        raise InputTypeError(f"kind: expected a Kind, got {type(kind).__name__}")
    _REGISTRY[kind.name] = kind
    return kind


def kinds() -> tuple[str, ...]:
    """The names of the registered discrete kinds."""
    return tuple(_REGISTRY)


def get_kind(name: object, what: str = "kind") -> Kind:
    return _REGISTRY[_checks.choice(what, name, kinds())]


register_kind(Kind("absorbing", lambda schedule, V, mask_id, params, tensors: Absorbing(V, mask_id, schedule),
                   live_schedule=True, per_token=True))
register_kind(Kind("uniform", lambda schedule, V, mask_id, params, tensors: Uniform(V, schedule),
                   live_schedule=True))
register_kind(Kind("gaussian_band", lambda schedule, V, mask_id, params, tensors: GaussianBand(V, schedule, **params),
                   params={"bandwidth": None}, matrix=True))
register_kind(Kind("nearest_neighbor",
                   lambda schedule, V, mask_id, params, tensors: NearestNeighbor(tensors["embeddings"], schedule,
                                                                                 **params),
                   params={"k": 8, "rate": 1.0}, tensors=("embeddings",), sources={"embeddings": "model"},
                   matrix=True))
register_kind(Kind("dense", lambda schedule, V, mask_id, params, tensors: Dense(tensors["Q"], T=schedule.T),
                   tensors=("Q",), matrix=True))
#: the built-in kinds (:func:`kinds` also lists registered ones)
KINDS = kinds()


def process_config(family: str, *, schedule: str, T: int, vocab_size: int | None = None, kind: str = "absorbing",
                   mask_id: int = 1, parameterization: str = "x0", schedule_kw: dict | None = None,
                   process_kw: dict | None = None, tensors: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The JSON-able dict :func:`build_process` takes (validated by building nothing yet). ``process_kw``:
    the kind's JSON parameters; ``tensors``: the names of the tensors it is built from."""
    family = _checks.choice("family", family, FAMILIES)
    cfg: dict[str, Any] = {"family": family, "schedule": schedule, "T": T, "schedule_kw": dict(schedule_kw or {})}
    if family == "discrete":
        cfg.update(kind=kind, vocab_size=vocab_size, mask_id=mask_id)
        if process_kw:
            cfg["process_kw"] = dict(process_kw)
        if tensors:
            cfg["tensors"] = list(tensors)
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


def _params(spec: Kind, kw: object, what: str = "process.process_kw") -> dict[str, Any]:
    if kw is None:
        kw = {}
    if not isinstance(kw, dict):
        raise InputTypeError(f"{what}: expected a dict, got {type(kw).__name__}")
    unknown = sorted(set(kw) - set(spec.params))
    if unknown:
        raise InputError(f"{what}: unknown parameters {unknown} of a {spec.name} process; it takes "
                         f"{sorted(spec.params) or 'none'}")
    return {**spec.params, **kw}


def build_process(cfg: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
                  ) -> DiscreteProcess | GaussianDiffusion | None:
    """A diffusion process from its config dict (None for ``{"family": "none"}``: the checkpoint of a
    model without a process, e.g. the causal LM or classifier used for scoring).

    Keys: ``family`` ("discrete" | "continuous"); ``schedule`` (a :func:`fastdiff.schedules.names` entry),
    ``T``, ``schedule_kw`` (extra keyword arguments of the schedule; lists become tensors); discrete:
    ``kind`` (:func:`kinds`: "absorbing", "uniform", "gaussian_band", "nearest_neighbor", "dense"),
    ``vocab_size``, ``mask_id`` (absorbing, default 1), ``process_kw`` (the kind's JSON parameters),
    ``tensors`` (the names of the ``tensors`` it is built from); continuous: ``parameterization`` ("x0"
    default, "eps", "mean"), ``model_var``. Optional ``alpha_bar``: ``T + 1`` floats replacing the
    schedule's values (an adaptive schedule's latest fit).
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
    spec = get_kind(cfg.get("kind", "absorbing"), "process.kind")
    V = _checks.positive_int("process.vocab_size", cfg.get("vocab_size"), 2)
    params = _params(spec, cfg.get("process_kw"))
    tensors = dict(tensors or {})
    listed = cfg.get("tensors", [])
    if not isinstance(listed, list) or sorted(listed) != sorted(spec.tensors):
        raise InputError(f"process.tensors: a {spec.name} process is built from {list(spec.tensors)}, the config "
                         f"lists {listed!r}")
    missing = [n for n in spec.tensors if n not in tensors]
    if missing:
        raise InputError(f"process.tensors: the {spec.name} process needs the tensor(s) {missing} "
                         "(a checkpoint keeps them in process.safetensors)")
    process = spec.build(schedule, V, cfg.get("mask_id", 1), params, {n: tensors[n] for n in spec.tensors})
    if process.vocab_size != V:
        raise InputError(f"process.vocab_size: {V}, but the {spec.name} process built from its tensors has "
                         f"{process.vocab_size} categories")
    return process


def sync_schedule(process: DiscreteProcess | GaussianDiffusion) -> None:
    """After an adaptive schedule's refit: Gaussian diffusion caches ``alpha_bar``, refresh it."""
    if isinstance(process, GaussianDiffusion):
        process.alpha_bar = process.schedule.alpha_bar


# --- a training run's process ------------------------------------------------------------------------------
def model_embeddings(model: nn.Module) -> torch.Tensor:
    """The ``(V, D)`` token embeddings of ``model`` (fastdiff's models, or a Hugging Face one)."""
    for get in (lambda m: m.token_embedding.weight, lambda m: m.embedding_table(),
                lambda m: m.get_input_embeddings().weight):
        try:
            w = get(model)
        except (AttributeError, TypeError):
            continue
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            return w.detach().to("cpu", torch.float64).clone()
    raise InputError(f"process_kw.embeddings: 'model' takes the model's token embeddings, and "
                     f"{type(model).__name__} has none (token_embedding, embedding_table(), "
                     "get_input_embeddings()); give a .safetensors file instead")


def _tensor_source(name: str, source: object, model: nn.Module | None) -> torch.Tensor:
    """``process_kw[name]``: ``"model"`` (the model's token embeddings) or a ``.safetensors`` file holding a
    tensor called ``name`` (or a single tensor)."""
    if source is None:
        raise InputError(f"process_kw.{name}: this process is built from the tensor {name!r}: give the path of a "
                         ".safetensors file holding it")
    if source == "model":
        if model is None:
            raise InputError(f"process_kw.{name}: 'model' needs the model")
        return model_embeddings(model)
    if not isinstance(source, str):
        raise InputError(f"process_kw.{name}: expected the path of a .safetensors file holding {name!r}, "
                         f"got {source!r}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"process_kw.{name}: no file at {path}")
    import safetensors.torch as st

    try:
        found = st.load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"process_kw.{name}: cannot read {path} as safetensors ({type(e).__name__}: {e})") from None
    if name in found:
        return found[name]
    if len(found) == 1:
        return next(iter(found.values()))
    raise InputError(f"process_kw.{name}: {path} holds {sorted(found)}, none called {name!r}")


def training_process(config: Any, *, vocab_size: int, mask_id: int, model: nn.Module | None = None,
                     tensors: dict[str, torch.Tensor] | None = None
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The process config dict and tensors of a training run (a :class:`TrainConfig`): the tensors are
    ``tensors`` when given (a resumed run passes its checkpoint's), else read from their ``process_kw``
    sources. A matrix process whose matrices would take more than :data:`MATRIX_BYTES_LIMIT` is refused."""
    if config.family != "discrete":
        return process_config("continuous", schedule=config.schedule, T=config.T,
                              parameterization=config.parameterization, schedule_kw=config.schedule_kw), {}
    spec = get_kind(config.kind)
    kw = dict(config.process_kw)
    params = {k: v for k, v in kw.items() if k not in spec.tensors}
    _params(spec, params, "process_kw")
    if spec.matrix:
        need = (config.T + 1) * 8 * vocab_size**2
        if need > MATRIX_BYTES_LIMIT:
            raise InputError(f"kind: a {spec.name} process keeps (V, V) float64 matrices, about {need / 2**30:.1f} GiB "
                             f"for V={vocab_size} and T={config.T} (limit {MATRIX_BYTES_LIMIT / 2**30:.0f} GiB); use "
                             "a small vocabulary (--train-tokenizer N) or fewer steps (--T)")
    if tensors is None:
        tensors = {n: _tensor_source(n, kw.get(n, spec.sources.get(n)), model) for n in spec.tensors}
    cfg = process_config("discrete", schedule=config.schedule, T=config.T, vocab_size=vocab_size, kind=config.kind,
                         mask_id=mask_id, schedule_kw=config.schedule_kw, process_kw=params, tensors=spec.tensors)
    return cfg, {n: tensors[n] for n in spec.tensors if n in tensors}
