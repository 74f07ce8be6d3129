"""Sampler options, their checks, the step grid and the output type."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .. import _checks
from ..continuous import GaussianDiffusion
from ..ops._dispatch import BACKENDS
from ..errors import InputError, InputTypeError

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
    micro_batch: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "Options":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InputTypeError(f"{', '.join(unknown)}: unknown option(s) of sample; valid options: {sorted(names)}")
        return cls(**kwargs)

    def replace(self, **kwargs) -> "Options":
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise InputTypeError(f"{', '.join(unknown)}: unknown option(s) of sample; valid options: {sorted(names)}")
        return dataclasses.replace(self, **kwargs)


def is_continuous(process: object) -> bool:
    return isinstance(process, GaussianDiffusion)


#: Options that only some strategies read, with their defaults: a non-default value for a strategy that
#: would ignore it is an error (naming the option) rather than silently dropped.
_ONLY_FOR = {
    "tokens_per_step": (None, ("confidence", "threshold")),
    "remasking": ("low_confidence", ("confidence",)),
    "threshold": (0.9, ("threshold",)),
    "eta": (0.0, ("remask", "ddim")),
    "remask_schedule": ("rescale", ("remask",)),
    "remask_window": (None, ("remask",)),
    "clamp": ("last", CONTINUOUS_STRATEGIES),
    "metric": ("l2", CONTINUOUS_STRATEGIES),
    "self_condition": (False, CONTINUOUS_STRATEGIES),
    "self_cond_kwarg": ("x_self_cond", CONTINUOUS_STRATEGIES),
    "classifier_grad": (None, CONTINUOUS_STRATEGIES),
    "classifier_scale": (1.0, CONTINUOUS_STRATEGIES),
    "cache": (False, ("ancestral",)),
}

#: Largest ``steps`` accepted (the confidence / threshold schedules compute with int64 step counts).
MAX_STEPS = 2**62


def _flag(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise InputTypeError(f"{name}: expected True or False, got {type(v).__name__}")
    return v


def _finite(name: str, v: object, lo: float | None = None, hi: float | None = None, **kw) -> float:
    v = _checks.real(name, v, lo, hi, **kw)
    if v in (float("inf"), float("-inf")):
        raise InputError(f"{name}: must be finite, got {v}")
    return v


def _check_kwargs(name: str, d: object) -> None:
    if d is None:
        return
    if not isinstance(d, dict):
        raise InputTypeError(f"{name}: expected a dict of keyword arguments, got {type(d).__name__}")
    for k in d:
        if not isinstance(k, str) or not k.isidentifier():
            raise InputTypeError(f"{name}: keys must be keyword names (str), got {k!r}")


def check_static(process: object, strategy: str, steps: object, o: Options) -> int:
    """Checks that do not depend on the batch; returns ``steps`` as an int. ``o`` (the sampler's own
    :class:`Options`, never the caller's objects) gets its numbers as floats."""
    if not (is_continuous(process) or all(hasattr(process, a) for a in ("vocab_size", "T", "kind"))):
        raise InputTypeError(f"process: expected a fastdiff.discrete process or a GaussianDiffusion, "
                        f"got {type(process).__name__}")
    if not isinstance(strategy, str):
        raise InputTypeError(f"strategy: expected one of {list(STRATEGIES)}, got {type(strategy).__name__}")
    _checks.choice("strategy", strategy, STRATEGIES)
    continuous = is_continuous(process)
    if continuous and strategy not in CONTINUOUS_STRATEGIES:
        raise InputError(f"strategy: {strategy!r} is a discrete strategy; a GaussianDiffusion takes one of "
                         f"{list(CONTINUOUS_STRATEGIES)}")
    if not continuous and strategy not in DISCRETE_STRATEGIES:
        raise InputError(f"strategy: {strategy!r} is a continuous strategy; a discrete process takes one of "
                         f"{list(DISCRETE_STRATEGIES)}")
    steps = _checks.positive_int("steps", steps)
    if steps > MAX_STEPS:
        raise InputError(f"steps: at most 2**62, got {steps}")
    if strategy in ("ancestral", "remask", "ddpm", "ddim") and steps > process.T:
        raise InputError(f"steps: {steps} exceeds the process's T = {process.T}")
    kind = getattr(process, "kind", None)
    if strategy in ("confidence", "threshold", "remask") and kind != "absorbing":
        raise InputError(f"strategy: {strategy!r} needs an absorbing (mask) process, got kind {kind!r}")
    if strategy == "remask" and process.schedule.per_token:
        raise InputError("strategy: 'remask' (ReMDM) needs a scalar (T+1,) schedule, not a per-token one")
    for name in ("kv_cache", "cache", "self_condition", "cuda_graph", "progress", "trajectory"):
        _flag(name, getattr(o, name))
    _finite("temperature", o.temperature, 0.0)
    if continuous and o.temperature != 1.0:
        raise InputError(f"temperature: does not apply to the continuous strategies (got {o.temperature}); "
                         "DDPM / DDIM draw their noise from the schedule (use eta with 'ddim')")
    if o.temperature == 0 and strategy in ("ancestral", "remask", "ddpm", "ddim"):
        raise InputError(f"temperature: must be > 0 for strategy {strategy!r} (0 means greedy, which only "
                         "'confidence' and 'threshold' use)")
    if o.top_k is not None:
        _checks.positive_int("top_k", o.top_k)
    if o.top_p is not None:
        _checks.real("top_p", o.top_p, 0.0, 1.0, lo_open=True)
    filt = "top_k" if o.top_k is not None else "top_p"
    if continuous and (o.top_k is not None or o.top_p is not None):
        raise InputError(f"{filt}: top-k / top-p do not apply to continuous strategies")
    if (o.top_k is not None or o.top_p is not None) and not continuous:
        if kind != "absorbing":
            raise InputError(f"{filt}: top-k / top-p sampling is defined here for absorbing processes "
                             "(the x0 draw is separable from the unmasking); got kind " + repr(kind))
        if strategy in ("ancestral", "remask") and process.schedule.per_token:
            raise InputError(f"{filt}: top-k / top-p need a scalar schedule (per-token schedules mix them)")
    _finite("guidance_scale", o.guidance_scale)
    _check_kwargs("cond", o.cond)
    _check_kwargs("uncond", o.uncond)
    if o.block_size is not None:
        _checks.positive_int("block_size", o.block_size)
    _checks.choice("block_context", o.block_context, ("prefix", "full"))
    if o.micro_batch is not None:
        _checks.positive_int("micro_batch", o.micro_batch)
        if o.kv_cache:
            raise InputError("micro_batch: the KV cache of a block-causal model holds the whole batch; it does "
                             "not combine with micro_batch")
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
    _finite("eta", o.eta, 0.0)
    _checks.choice("remask_schedule", o.remask_schedule, ("rescale", "cap"))
    if o.remask_window is not None:
        w = o.remask_window
        ok = isinstance(w, (tuple, list)) and len(w) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in w)
        if not (ok and 0 <= w[0] <= w[1] <= 1):
            raise InputError(f"remask_window: expected (lo, hi) with 0 <= lo <= hi <= 1 (fractions of T), got {w!r}")
    _checks.choice("clamp", o.clamp, ("never", "every", "last"))
    _checks.choice("metric", o.metric, ("l2", "cosine"))
    if not isinstance(o.self_cond_kwarg, str) or not o.self_cond_kwarg.isidentifier():
        raise InputTypeError(f"self_cond_kwarg: expected a keyword name, got {o.self_cond_kwarg!r}")
    V = None if continuous else process.vocab_size
    if continuous:
        if o.embedding is None:
            raise InputError("embedding: continuous sampling needs the (V, D) embedding table to round "
                             "(and clamp) against")
        _checks.floating("embedding", o.embedding)
        if o.embedding.ndim != 2 or 0 in o.embedding.shape:
            raise InputError(f"embedding: expected a non-empty shape (V, D), got {tuple(o.embedding.shape)}")
        if o.embedding.device.type == "meta" or o.embedding.layout != torch.strided:
            raise InputError("embedding: expected a dense CPU or CUDA tensor (it is rounded against)")
        if not bool(torch.isfinite(o.embedding).all()):
            raise InputError("embedding: contains NaN or infinity")
        V = o.embedding.shape[0]
    elif o.embedding is not None:
        raise InputError("embedding: applies to continuous processes (a GaussianDiffusion) only")
    if o.classifier_grad is not None:
        if not continuous:
            raise InputError("classifier_grad: classifier guidance by gradients applies to continuous processes")
        if not callable(o.classifier_grad):
            raise InputTypeError("classifier_grad: expected a callable grad(x_t, t) -> (B, L, D)")
    _finite("classifier_scale", o.classifier_scale)
    if o.classifier_scale != 1.0 and o.classifier_grad is None:
        raise InputError("classifier_scale: scales classifier_grad's gradient; give classifier_grad= (or leave "
                         "the scale at 1.0)")
    if o.self_cond_kwarg != "x_self_cond" and not o.self_condition:
        raise InputError("self_cond_kwarg: names the self-conditioning input; it needs self_condition=True")
    if strategy == "remask" and o.remask_schedule == "rescale" and o.eta > 1:
        raise InputError(f"eta: must be <= 1 with remask_schedule='rescale' (σ_t = η·σ_max must not exceed "
                         f"σ_max), got {o.eta}; remask_schedule='cap' takes any η >= 0")
    for name, (default, strategies) in _ONLY_FOR.items():
        v = getattr(o, name)
        if strategy not in strategies and not (v is default or v == default):
            raise InputError(f"{name}: applies to strategy {' / '.join(map(repr, strategies))} only, not "
                             f"{strategy!r} (got {v!r}; leave it at its default {default!r})")
    if not isinstance(o.backend, str) or o.backend not in BACKENDS:
        raise InputError(f"backend: expected one of {list(BACKENDS)}, got {o.backend!r}")
    # the numbers as floats from here on (an int temperature of 10**30 is a valid number, not an int op)
    for name in ("temperature", "guidance_scale", "threshold", "eta", "classifier_scale"):
        setattr(o, name, float(getattr(o, name)))
    if o.top_p is not None:
        o.top_p = float(o.top_p)
    if o.eos_id is not None:
        _check_token("eos_id", o.eos_id, V)
    if o.pad_id is not None:
        _check_token("pad_id", o.pad_id, V)
    return steps


def _check_token(name: str, v: object, V: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputTypeError(f"{name}: expected a token id (int) in [0, {V}), got {type(v).__name__}")
    if not 0 <= v < V:
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
