"""Sampler options, their checks, the step grid and the output type."""

from __future__ import annotations

from ..errors import InputError, InputTypeError

import dataclasses
from dataclasses import dataclass, field

import torch

from .. import _checks
from ..continuous import GaussianDiffusion
from ..ops._dispatch import BACKENDS

DISCRETE_STRATEGIES = ("ancestral", "confidence", "threshold", "remask")
CONTINUOUS_STRATEGIES = ("ddpm", "ddim")
STRATEGIES = DISCRETE_STRATEGIES + CONTINUOUS_STRATEGIES


@dataclass
class SampleOutput:
    """``tokens: (B, L)`` int64; ``stats``: network calls, steps, timings, tokens/s; ``x``: the final
    continuous vectors ``(B, L, D)`` (continuous processes only); ``trajectory``: the tokens after each
    step (when asked for with ``trajectory=True``)."""

    tokens: torch.Tensor
    stats: dict
    x: torch.Tensor | None = None
    trajectory: list[torch.Tensor] | None = None


@dataclass
class Options:
    """Every sampler option with its default (see :func:`fastdiff.sampling.sample`)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cond: dict | None = None
    uncond: dict | None = None
    guidance_scale: float = 1.0
    fixed: torch.Tensor | None = None
    x_init: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    pad_id: int | None = None
    block_size: int | None = None
    block_context: str = "prefix"
    kv_cache: bool = False
    eos_id: int | None = None
    cache: bool = False
    tokens_per_step: int | None = None
    remasking: str = "low_confidence"
    threshold: float = 0.9
    eta: float = 0.0
    remask_schedule: str = "rescale"
    remask_window: tuple[float, float] | None = None
    embedding: torch.Tensor | None = None
    clamp: str = "last"
    metric: str = "l2"
    self_condition: bool = False
    self_cond_kwarg: str = "x_self_cond"
    classifier_grad: object = None
    classifier_scale: float = 1.0
    backend: str = "auto"
    cuda_graph: bool = False
    progress: bool = False
    trajectory: bool = False
    device: torch.device | str | None = None
    sample_offset: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "Options":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InputTypeError(f"sample: unknown option(s) {unknown}; valid options: {sorted(names)}")
        return cls(**kwargs)

    def replace(self, **kwargs) -> "Options":
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InputTypeError(f"sample: unknown option(s) {unknown}; valid options: {sorted(names)}")
        return dataclasses.replace(self, **kwargs)


def is_continuous(process: object) -> bool:
    return isinstance(process, GaussianDiffusion)


def check_static(process: object, strategy: str, steps: object, o: Options) -> int:
    """Checks that do not depend on the batch; returns ``steps`` as an int."""
    if not (is_continuous(process) or all(hasattr(process, a) for a in ("vocab_size", "T", "kind"))):
        raise InputTypeError(f"process: expected a fastdiff.discrete process or a GaussianDiffusion, "
                        f"got {type(process).__name__}")
    _checks.choice("strategy", strategy, STRATEGIES)
    continuous = is_continuous(process)
    if continuous and strategy not in CONTINUOUS_STRATEGIES:
        raise InputError(f"strategy: {strategy!r} is a discrete strategy; a GaussianDiffusion takes one of "
                         f"{list(CONTINUOUS_STRATEGIES)}")
    if not continuous and strategy not in DISCRETE_STRATEGIES:
        raise InputError(f"strategy: {strategy!r} is a continuous strategy; a discrete process takes one of "
                         f"{list(DISCRETE_STRATEGIES)}")
    steps = _checks.positive_int("steps", steps)
    if strategy in ("ancestral", "remask", "ddpm", "ddim") and steps > process.T:
        raise InputError(f"steps: {steps} exceeds the process's T = {process.T}")
    kind = getattr(process, "kind", None)
    if strategy in ("confidence", "threshold", "remask") and kind != "absorbing":
        raise InputError(f"strategy: {strategy!r} needs an absorbing (mask) process, got kind {kind!r}")
    if strategy == "remask" and process.schedule.per_token:
        raise InputError("strategy: 'remask' (ReMDM) needs a scalar (T+1,) schedule, not a per-token one")
    _checks.real("temperature", o.temperature, 0.0)
    if o.temperature == 0 and strategy in ("ancestral", "remask", "ddpm", "ddim"):
        raise InputError(f"temperature: must be > 0 for strategy {strategy!r} (0 means greedy, which only "
                         "'confidence' and 'threshold' use)")
    if o.top_k is not None:
        _checks.positive_int("top_k", o.top_k)
    if o.top_p is not None:
        _checks.real("top_p", o.top_p, 0.0, 1.0, lo_open=True)
    if (o.top_k is not None or o.top_p is not None) and not continuous:
        if kind != "absorbing":
            raise InputError("top_k: top-k / top-p sampling is defined here for absorbing processes "
                             "(the x0 draw is separable from the unmasking); got kind " + repr(kind))
        if strategy in ("ancestral", "remask") and process.schedule.per_token:
            raise InputError("top_k: top-k / top-p need a scalar schedule (per-token schedules mix them)")
    if continuous and (o.top_k is not None or o.top_p is not None):
        raise InputError("top_k: top-k / top-p do not apply to continuous strategies")
    _checks.real("guidance_scale", o.guidance_scale)
    if o.cond is not None and not isinstance(o.cond, dict):
        raise InputTypeError(f"cond: expected a dict of keyword arguments, got {type(o.cond).__name__}")
    if o.uncond is not None and not isinstance(o.uncond, dict):
        raise InputTypeError(f"uncond: expected a dict of keyword arguments, got {type(o.uncond).__name__}")
    if o.block_size is not None:
        _checks.positive_int("block_size", o.block_size)
    _checks.choice("block_context", o.block_context, ("prefix", "full"))
    if o.kv_cache and o.block_size is None:
        raise InputError("kv_cache: the KV-cache path needs block_size (semi-autoregressive blocks)")
    if o.kv_cache and o.cache:
        raise InputError("cache: the MDLM cache and kv_cache cannot be combined")
    if o.cuda_graph and (o.cache or o.kv_cache or o.eos_id is not None and o.block_size is not None):
        raise InputError("cuda_graph: graphs replay fixed shapes; they do not combine with cache, kv_cache or "
                         "EOS-stopping blocks (all of which change the batch between steps)")
    if o.cache and (strategy != "ancestral" or kind != "absorbing"):
        raise InputError("cache: MDLM caching applies to strategy='ancestral' with an absorbing process "
                         "(other strategies change the input or draw differently every step)")
    if o.tokens_per_step is not None:
        _checks.positive_int("tokens_per_step", o.tokens_per_step)
    _checks.choice("remasking", o.remasking, ("low_confidence", "random"))
    _checks.real("threshold", o.threshold, 0.0, 1.0)
    _checks.real("eta", o.eta, 0.0)
    _checks.choice("remask_schedule", o.remask_schedule, ("rescale", "cap"))
    if o.remask_window is not None:
        w = o.remask_window
        if not (isinstance(w, (tuple, list)) and len(w) == 2 and 0 <= w[0] <= w[1] <= 1):
            raise InputError(f"remask_window: expected (lo, hi) with 0 <= lo <= hi <= 1 (fractions of T), got {w!r}")
    _checks.choice("clamp", o.clamp, ("never", "every", "last"))
    _checks.choice("metric", o.metric, ("l2", "cosine"))
    if continuous:
        if o.embedding is None:
            raise InputError("embedding: continuous sampling needs the (V, D) embedding table to round "
                             "(and clamp) against")
        _checks.floating("embedding", o.embedding)
        if o.embedding.ndim != 2:
            raise InputError(f"embedding: expected shape (V, D), got {tuple(o.embedding.shape)}")
    if o.classifier_grad is not None:
        if not continuous:
            raise InputError("classifier_grad: classifier guidance by gradients applies to continuous processes")
        if not callable(o.classifier_grad):
            raise InputTypeError("classifier_grad: expected a callable grad(x_t, t) -> (B, L, D)")
    _checks.real("classifier_scale", o.classifier_scale)
    if not isinstance(o.backend, str) or o.backend not in BACKENDS:
        raise InputError(f"backend: expected one of {list(BACKENDS)}, got {o.backend!r}")
    if o.eos_id is not None and not continuous:
        _check_token("eos_id", o.eos_id, process.vocab_size)
    if o.pad_id is not None and not continuous:
        _check_token("pad_id", o.pad_id, process.vocab_size)
    return steps


def _check_token(name: str, v: object, V: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < V:
        raise InputError(f"{name}: expected a token id in [0, {V}), got {v!r}")
    return v


def check_shape(shape: object) -> tuple[int, int]:
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2):
        raise InputError(f"shape: expected (B, L), got {shape!r}")
    B, L = shape
    return _checks.positive_int("shape[0] (B)", B), _checks.positive_int("shape[1] (L)", L)


def step_grid(T: int, steps: int) -> list[int]:
    """A decreasing integer grid ``T = t_K > ... > t_0 = 0`` with ``steps`` transitions (evenly spaced,
    rounded; never repeats a step)."""
    grid = torch.linspace(T, 0, steps + 1, dtype=torch.float64).round().long().tolist()
    out = [grid[0]]
    for g in grid[1:]:
        if g < out[-1]:
            out.append(g)
    return out
