"""Sampler options: the fields, their documentation, their checks, and the output type.

Which strategy reads which option, and the rules a strategy adds, come from the table in
:mod:`fastdiff.sampling.strategies`; :func:`check_static` reads it. :data:`OPTION_DOCS` documents every
field; :func:`options_doc` renders it (with the default from the field and the strategies from the table)
into the docstrings of :class:`Options`, :class:`~fastdiff.sampling.Sampler` and
:func:`~fastdiff.sampling.sample`, so those cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Iterable
from dataclasses import InitVar, dataclass
from typing import Any

import torch

from .. import _checks
from .._protocols import DiscreteProcess
from ..continuous import GaussianDiffusion
from ..errors import InputError, InputTypeError
from ..ops._dispatch import BACKENDS
from . import strategies as _strategies
from ._engine import step_grid  # noqa: F401  (re-exported: fastdiff.sampling.step_grid)

#: What the sampler takes as ``process``: a discrete process (the :class:`~fastdiff._protocols.DiscreteProcess`
#: protocol) or a Gaussian diffusion over embeddings.
Process = DiscreteProcess | GaussianDiffusion

#: Largest ``steps`` accepted (the confidence / threshold schedules compute with int64 step counts).
MAX_STEPS = 2**62

#: The values of every option that is a choice among names (the first is the default).
CHOICES = {
    "block_context": ("full", "prefix"),
    "remasking": ("low_confidence", "random"),
    "remask_schedule": ("rescale", "cap"),
    "clamp": ("never", "every", "last"),
    "metric": ("l2", "cosine"),
}


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
    """(generated below from :data:`OPTION_DOCS` and the strategy table)"""

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
    block_context: str = "full"
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
    callback: object = None
    trajectory: bool = False
    device: torch.device | str | None = None
    sample_offset: int = 0
    micro_batch: int | None = None
    #: Deprecated and ignored: nothing ever read it. ``sample()`` / ``Sampler`` never accepted it.
    extra: InitVar[dict | None] = None

    def __post_init__(self, extra: dict | None) -> None:
        if extra is not None and extra is not _NO_EXTRA:  # (dataclasses.replace passes the property's value)
            warnings.warn("Options(extra=...) is deprecated and ignored (no sampler code ever read it); it will "
                          "be removed", DeprecationWarning, stacklevel=3)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "Options":
        _check_names(kwargs)
        return cls(**kwargs)

    def replace(self, **kwargs: Any) -> Options:
        _check_names(kwargs)
        return dataclasses.replace(self, **kwargs)


_NO_EXTRA = types.MappingProxyType({})
Options.extra = property(lambda self: _NO_EXTRA,  # type: ignore[assignment]
                         doc="Deprecated: always empty (nothing ever read it).")

#: The option names, in field order.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))


def _check_names(kwargs: dict) -> None:
    names = set(OPTION_NAMES)
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise InputTypeError(f"{', '.join(unknown)}: unknown option(s) of sample; valid options: {sorted(names)}")


def is_continuous(process: object) -> bool:
    return isinstance(process, GaussianDiffusion)


# ----------------------------------------------------------------------------------------------------
# documentation, one entry per field: (type, meaning and source). The default comes from the field and
# the strategies from the table; ``{greedy}`` etc. are filled in from the table too.
# ----------------------------------------------------------------------------------------------------
OPTION_DOCS: dict[str, tuple[str, str]] = {
    "temperature": ("float >= 0", "Temperature of every categorical draw (logits / τ). ``0`` is greedy "
                    "(argmax), which only {greedy} accept."),
    "top_k": ("int or None", "Draw x0 from the ``k`` most likely tokens only (top-k, Fan et al. 2018); a ``k`` "
              "above V keeps every token. Absorbing processes only (the x0 draw is separable from the "
              "unmasking); {two_stage} draw in two stages (unmask with the posterior's probability, then "
              "the filtered token), which needs a scalar ``(T+1,)`` schedule."),
    "top_p": ("float in (0, 1] or None", "Nucleus sampling (Holtzman et al. 2020): draw x0 from the smallest "
              "set of tokens whose probability reaches ``p``. Same conditions as ``top_k``."),
    "cond": ("dict[str, Tensor] or None", "Keyword arguments for every model call (tensors batch first, on the "
             "batch's device), e.g. ``{{'label': y}}`` or a source sequence."),
    "uncond": ("dict[str, Tensor] or None", "The same keywords holding the null condition: the "
               "unconditional half of classifier-free guidance."),
    "guidance_scale": ("float", "Classifier-free guidance (Ho & Salimans 2022): the model's output is "
                       "``uncond + s·(cond - uncond)``, both halves in one batch; ``1.0`` is off. Needs "
                       "``cond``/``uncond``, or fixed prompt positions, which the unconditional half masks "
                       "(LLaDA's unconditional pass; absorbing processes)."),
    "fixed": ("Tensor (B, L) bool or None", "Positions that hold ``x_init``'s tokens and never change "
              "(prompts, infilling; Diffusion-LM's infilling, LLaDA's prompts). Needs ``x_init``."),
    "x_init": ("Tensor (B, L) int or None", "The tokens at the ``fixed`` positions (other positions are "
               "ignored). Needs ``fixed``."),
    "lengths": ("Tensor (B,) int or None", "Variable lengths in ``[1, L]``: positions past a sequence's "
                "length are ``pad_id`` and never change; a model that accepts one gets ``attention_mask`` "
                "(so ``cond`` must not hold one)."),
    "pad_id": ("int or None", "The padding token (default: ``eos_id``) for ``lengths`` and for the positions "
               "after a sequence's EOS."),
    "block_size": ("int or None", "Semi-autoregressive decoding (SSD-LM, Han et al. 2023; LLaDA's "
                   "semi-autoregressive remasking; Block Diffusion, Arriola et al. 2025): blocks of this "
                   "many positions counted from position 0 (prompt positions included; "
                   ":func:`fastdiff.generate` counts LLaDA's blocks from the end of the prompt), left to right, "
                   "``steps`` per block, earlier blocks as clean context (see ``block_context``)."),
    "block_context": ("{{'full', 'prefix'}}", "What the model sees while a block is decoded: the whole sequence, "
                      "later blocks still noised (``'full'``, the default: LLaDA's semi-autoregressive "
                      "remasking, and what a bidirectional model was trained on), or the sequence up to the "
                      "block's end (``'prefix'``, SSD-LM's view; cheaper). A block-causal model "
                      "(``kv_cache``) sees the earlier blocks only either way."),
    "kv_cache": ("bool", "For block-causal models (:class:`BlockCausalDenoiser`, Block Diffusion): keep the "
                 "keys/values of finished blocks. Needs ``block_size``; not with guidance, ``cache`` or "
                 "``micro_batch``. The continuous loop does not use it: it calls the model as without the cache (the "
                 "protocol makes both equal)."),
    "eos_id": ("int or None", "A sequence stops at its first generated EOS: later positions become "
               "``pad_id``; with blocks, a stopped sequence is not evaluated any more. "
               "``stats['stopped_at_eos']`` counts them."),
    "cache": ("bool", "MDLM's cache (Sahoo et al. 2024): skip the network for every sequence whose input "
              "did not change since its last call. Absorbing processes; exact only for models that ignore "
              "``t`` (``as_denoiser(model, uses_time=False)``)."),
    "tokens_per_step": ("int or None", "Decode ``k`` tokens per step (the rest at the last step); the "
                        "number of steps then follows from the masked count, not ``steps``. None: "
                        "LLaDA's even split of the masked count over ``steps`` (confidence), the "
                        "threshold rule (threshold)."),
    "remasking": ("{{'low_confidence', 'random'}}", "LLaDA (Nie et al. 2025): keep the most confident "
                  "predictions of each step, or random ones."),
    "threshold": ("float in [0, 1]", "Fast-dLLM (Wu et al. 2025): keep every prediction whose probability "
                  "exceeds it; at least one per step, and enough to finish within ``steps``."),
    "eta": ("float >= 0", "remask: ReMDM's η (Wang et al. 2025), ``σ_t = η·σ_max`` under "
            "``remask_schedule='rescale'`` (then ``η <= 1``), ``min(η, σ_max)`` under ``'cap'``. ddim: DDIM's "
            "η (Song et al. 2021), ``0`` deterministic, ``1`` the DDPM posterior's variance."),
    "remask_schedule": ("{{'rescale', 'cap'}}", "ReMDM's remasking schedule ``σ_t`` (see ``eta``); "
                        "``σ_max = min(1, (1 - α_s)/α_t)``."),
    "remask_window": ("(lo, hi) or None", "ReMDM-loop: remask only while ``lo·T <= t <= hi·T`` "
                      "(``0 <= lo <= hi <= 1``); None remasks at every step."),
    "embedding": ("Tensor (V, D) float", "Required by {continuous}: the embedding table the vectors are "
                  "clamped and rounded against (Diffusion-LM, Li et al. 2022), e.g. "
                  ":meth:`TokenEmbedding.table`."),
    "clamp": ("{{'never', 'every', 'last'}}", "Diffusion-LM's clamping trick (Li et al. 2022, §4.2): snap "
              "the x0 estimate to its nearest embedding at every step, at the last step only, or never "
              "(:func:`fastdiff.ops.nearest_embedding`)."),
    "metric": ("{{'l2', 'cosine'}}", "The distance for clamping and rounding."),
    "self_condition": ("bool", "Self-conditioning (Chen et al. 2023, Analog Bits; CDCD, SED): the model "
                       "receives its previous x0 estimate (zeros at a block's first step) as "
                       "``self_cond_kwarg``."),
    "self_cond_kwarg": ("str", "The keyword under which a self-conditioned model receives its previous "
                        "estimate; needs ``self_condition=True``."),
    "classifier_grad": ("callable or None", "Classifier guidance (Dhariwal & Nichol 2021; Diffusion-LM's "
                        "plug-and-play control): ``grad(x_t, t) -> ∇ log p(y | x_t)``, called with autograd "
                        "enabled and ``t`` a ``(B,)`` tensor. Continuous: of shape ``(B, L, D)``; ddpm shifts "
                        "the mean by ``s·var·grad`` (Alg. 1), ddim shifts ε by ``-sqrt(1 - ᾱ_t)·s·grad`` "
                        "(Alg. 2); see :meth:`GaussianDiffusion.ddpm_step`. Discrete (ancestral): ``x_t`` "
                        "is the ``(B, L)`` token sequence and the gradient is with respect to its one-hot "
                        "encoding, ``(B, L, V)``; each position's posterior is tilted by ``exp(s·grad[x_s])`` "
                        "(first order, DiGress §5, Vignac et al. 2023; TAG, Nisonoff et al. 2024), e.g. "
                        ":meth:`fastdiff.models.TextClassifier.guidance_grad`; not with top-k / top-p."),
    "classifier_scale": ("float", "The scale ``s`` of ``classifier_grad``'s gradient; needs "
                         "``classifier_grad``."),
    "backend": ("{{'auto', 'reference', 'cpp', 'triton', 'cuda'}}", "The backend of every fused op "
                "(:mod:`fastdiff.ops`); ``'reference'`` is the PyTorch reference exactly, ``'auto'`` the "
                "fastest available."),
    "cuda_graph": ("bool", "CUDA graphs (CUDA only; not with ``cache``, ``kv_cache`` or EOS-stopping blocks, "
                   "which change the batch). \"ancestral\" with the posterior op on the CUDA kernel (no top-k / "
                   "top-p / classifier guidance / classifier-free guidance / ``micro_batch``; absorbing or uniform "
                   "process) captures the network's forward and the op of a step in one graph per block and "
                   "replays it every step, the Philox counters read from a device buffer "
                   "(:mod:`fastdiff.sampling._graph`); every other run replays the network's forward alone, one "
                   "graph per input shape. A model that cannot be captured raises. Same tokens as without."),
    "progress": ("bool", "A tqdm bar on stderr, drawn only when stderr is a terminal."),
    "callback": ("callable or None", "Called after every step with a ``SampleStep(step, tokens, "
                 "network_calls)`` (streaming; ``tokens`` is the sampler's working tensor: clone it to keep "
                 "it). :meth:`Sampler.iterate` is the iterator form."),
    "trajectory": ("bool", "Keep the tokens after every step in ``SampleOutput.trajectory`` (their memory is "
                   "checked before the run)."),
    "device": ("str, torch.device or None", "The batch's device. None: that of ``x_init`` / ``fixed`` / "
               "``embedding`` / ``lengths``, else of the model's parameters, else the CPU."),
    "sample_offset": ("int >= 0", "The global index of the batch's first sample: every draw is keyed by "
                      "the seed and the sample's global index, so batches and ranks "
                      "(:mod:`fastdiff.distributed`) draw what one run would."),
    "micro_batch": ("int or None", "Every network call gets exactly ``m`` rows per half (sample ``g`` in row "
                    "``g mod m``, unused rows padded), so samples are bit-identical for every batch size and "
                    "rank split (see the module docstring of :mod:`fastdiff.sampling`). Not with "
                    "``kv_cache``."),
}


def applies_to(name: str) -> tuple[str, ...]:
    """The strategies that read option ``name`` (every strategy for a common option)."""
    table = _strategies.TABLE
    listed = tuple(s.name for s in table.values() if name in s.options)
    return listed or tuple(table)


def _listing(names: Iterable[object]) -> str:
    names = [repr(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _strategy_list(names: tuple[str, ...]) -> str:
    table = _strategies.TABLE
    if names == tuple(table):
        return "all"
    for family in ("discrete", "continuous"):
        if names == _strategies.family(family):
            return f"{family} ({', '.join(names)})"
    return ", ".join(names)


def options_doc(indent: str = "") -> str:
    """The numpy-style ``name : type, default ...`` entries of every option (from :data:`OPTION_DOCS`,
    the fields' defaults and the strategy table)."""
    table = _strategies.TABLE
    fill = {
        "greedy": _listing(s.name for s in table.values() if s.greedy),
        "two_stage": _listing(s.name for s in table.values() if s.filter_scalar_schedule),
        "continuous": _listing(_strategies.family("continuous")),
    }
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    lines = []
    for name in OPTION_NAMES:
        typ, text = OPTION_DOCS[name]
        default = defaults[name]
        lines.append(f"{indent}{name} : {typ.format()}, default {default!r}")
        body = f"Strategies: {_strategy_list(applies_to(name))}. {text.format(**fill)}"
        lines += [indent + "    " + line for line in _wrap(body, 100 - len(indent))]
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, break_long_words=False, break_on_hyphens=False)


def strategies_doc(indent: str = "") -> str:
    """One numpy-style entry per strategy: its family, paper, summary and the options it reads."""
    lines = []
    for s in _strategies.TABLE.values():
        lines.append(f"{indent}{s.name!r} : {s.family}, {s.paper}")
        own = ", ".join(s.options) if s.options else "none"
        body = f"{s.summary} Options it reads besides the common ones: {own}."
        lines += [indent + "    " + line for line in _wrap(body, 100 - len(indent))]
    return "\n".join(lines)


Options.__doc__ = f"""Every option of :func:`fastdiff.sampling.sample` with its default (a :class:`Sampler` holds one).

An option that a strategy does not read must stay at its default (an error names it otherwise); which
strategies read which option comes from :data:`fastdiff.sampling.strategies.TABLE`.

Parameters
----------
{options_doc()}
"""


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------
def _flag(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise InputTypeError(f"{name}: expected True or False, got {type(v).__name__}")
    return v


def _finite(name: str, v: object, lo: float | None = None, hi: float | None = None, **kw: bool) -> float:
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


#: options by declared type: flags are checked as bools, numbers become floats after the checks
_BOOL_OPTIONS = tuple(f.name for f in dataclasses.fields(Options) if f.type == "bool")
_FLOAT_OPTIONS = tuple(f.name for f in dataclasses.fields(Options) if f.type == "float")


def resolve_strategy(process: Process, strategy: object) -> _strategies.Strategy:
    """The table entry of ``strategy`` for ``process`` (errors name ``process`` or ``strategy``)."""
    table = _strategies.TABLE
    continuous = is_continuous(process)
    if not (continuous or all(hasattr(process, a) for a in ("vocab_size", "T", "kind"))):
        raise InputTypeError(f"process: expected a fastdiff.discrete process or a GaussianDiffusion, "
                             f"got {type(process).__name__}")
    if not isinstance(strategy, str):
        raise InputTypeError(f"strategy: expected one of {list(table)}, got {type(strategy).__name__}")
    _checks.choice("strategy", strategy, tuple(table))
    spec = table[strategy]
    family = "continuous" if continuous else "discrete"
    if spec.family != family:
        article = "a GaussianDiffusion" if continuous else "a discrete process"
        raise InputError(f"strategy: {strategy!r} is a {spec.family} strategy; {article} takes one of "
                         f"{list(_strategies.family(family))}")
    return spec


def check_static(process: Process, strategy: str, steps: object, o: Options) -> int:
    """Checks that do not depend on the batch; returns ``steps`` as an int. ``o`` (the sampler's own
    :class:`Options`, never the caller's objects) gets its numbers as floats.

    The order of the checks is part of the contract (the first error found is the one raised). The
    strategy's own rules come from its :class:`~fastdiff.sampling.strategies.Strategy` entry."""
    spec = resolve_strategy(process, strategy)
    continuous = spec.family == "continuous"
    steps = _checks.positive_int("steps", steps)
    if steps > MAX_STEPS:
        raise InputError(f"steps: at most 2**62, got {steps}")
    if spec.walks_grid and not spec.per_position and steps > process.T:
        raise InputError(f"steps: {steps} exceeds the process's T = {process.T}")
    kind = getattr(process, "kind", None)
    if spec.needs_absorbing and kind != "absorbing":
        raise InputError(f"strategy: {strategy!r} needs an absorbing (mask) process, got kind {kind!r}")
    if spec.scalar_schedule and process.schedule.per_token:
        raise InputError(f"strategy: {strategy!r} ({spec.label}) needs a scalar (T+1,) schedule, not a per-token one")
    for name in _BOOL_OPTIONS:
        _flag(name, getattr(o, name))
    _finite("temperature", o.temperature, 0.0)
    if continuous and o.temperature != 1.0:
        raise InputError(f"temperature: does not apply to the continuous strategies (got {o.temperature}); "
                         "DDPM / DDIM draw their noise from the schedule (use eta with 'ddim')")
    if o.temperature == 0 and not spec.greedy:
        greedy = _listing(s.name for s in _strategies.TABLE.values() if s.greedy)
        raise InputError(f"temperature: must be > 0 for strategy {strategy!r} (0 means greedy, which only "
                         f"{greedy} use)")
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
        if spec.filter_scalar_schedule and process.schedule.per_token:
            raise InputError(f"{filt}: top-k / top-p need a scalar schedule (per-token schedules mix them)")
    _finite("guidance_scale", o.guidance_scale)
    if o.callback is not None and not callable(o.callback):
        raise InputTypeError(f"callback: expected a callable, got {type(o.callback).__name__}")
    _check_kwargs("cond", o.cond)
    _check_kwargs("uncond", o.uncond)
    if o.block_size is not None:
        _checks.positive_int("block_size", o.block_size)
    _checks.choice("block_context", o.block_context, CHOICES["block_context"])
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
    if o.cache and ("cache" not in spec.options or kind != "absorbing"):
        cached = " / ".join(f"strategy={n!r}" for n in applies_to("cache"))
        raise InputError(f"cache: MDLM caching applies to {cached} with an absorbing process "
                         "(other strategies change the input or draw differently every step)")
    if o.tokens_per_step is not None:
        _checks.positive_int("tokens_per_step", o.tokens_per_step)
    _checks.choice("remasking", o.remasking, CHOICES["remasking"])
    _checks.real("threshold", o.threshold, 0.0, 1.0)
    _finite("eta", o.eta, 0.0)
    _checks.choice("remask_schedule", o.remask_schedule, CHOICES["remask_schedule"])
    if o.remask_window is not None:
        w = o.remask_window
        ok = isinstance(w, (tuple, list)) and len(w) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in w)
        if not (ok and 0 <= w[0] <= w[1] <= 1):
            raise InputError(f"remask_window: expected (lo, hi) with 0 <= lo <= hi <= 1 (fractions of T), got {w!r}")
    _checks.choice("clamp", o.clamp, CHOICES["clamp"])
    _checks.choice("metric", o.metric, CHOICES["metric"])
    if not isinstance(o.self_cond_kwarg, str) or not o.self_cond_kwarg.isidentifier():
        raise InputTypeError(f"self_cond_kwarg: expected a keyword name, got {o.self_cond_kwarg!r}")
    V = None if continuous else process.vocab_size
    if continuous:
        V = _check_embedding(o.embedding)
    elif o.embedding is not None:
        raise InputError("embedding: applies to continuous processes (a GaussianDiffusion) only")
    if o.classifier_grad is not None and not callable(o.classifier_grad):
        shape = "(B, L, D)" if continuous else "(B, L, V)"
        raise InputTypeError(f"classifier_grad: expected a callable grad(x_t, t) -> {shape}")
    _finite("classifier_scale", o.classifier_scale)
    if o.classifier_scale != 1.0 and o.classifier_grad is None:
        raise InputError("classifier_scale: scales classifier_grad's gradient; give classifier_grad= (or leave "
                         "the scale at 1.0)")
    if o.self_cond_kwarg != "x_self_cond" and not o.self_condition:
        raise InputError("self_cond_kwarg: names the self-conditioning input; it needs self_condition=True")
    for rule in spec.rules:
        rule(o)
    _check_unread(spec, o)
    if not isinstance(o.backend, str) or o.backend not in BACKENDS:
        raise InputError(f"backend: expected one of {list(BACKENDS)}, got {o.backend!r}")
    # the numbers as floats from here on (an int temperature of 10**30 is a valid number, not an int op)
    for name in _FLOAT_OPTIONS:
        setattr(o, name, float(getattr(o, name)))
    if o.top_p is not None:
        o.top_p = float(o.top_p)
    if o.eos_id is not None:
        _check_token("eos_id", o.eos_id, V)
    if o.pad_id is not None:
        _check_token("pad_id", o.pad_id, V)
    return steps


def _check_embedding(emb: object) -> int:
    if emb is None:
        raise InputError("embedding: continuous sampling needs the (V, D) embedding table to round "
                         "(and clamp) against")
    _checks.floating("embedding", emb)
    if emb.ndim != 2 or 0 in emb.shape:
        raise InputError(f"embedding: expected a non-empty shape (V, D), got {tuple(emb.shape)}")
    if emb.device.type == "meta" or emb.layout != torch.strided:
        raise InputError("embedding: expected a dense CPU or CUDA tensor (it is rounded against)")
    if not bool(torch.isfinite(emb).all()):
        raise InputError("embedding: contains NaN or infinity")
    return emb.shape[0]


#: the options that some strategies read and others do not (the rest are common to all), in field order
STRATEGY_OPTIONS = tuple(n for n in OPTION_NAMES if any(n in s.options for s in _strategies.TABLE.values()))


def _check_unread(spec: _strategies.Strategy, o: Options) -> None:
    """A non-default value of an option the strategy does not read is an error naming it (rather than
    silently dropped)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    for name in STRATEGY_OPTIONS:
        if name in spec.options:
            continue
        v, default = getattr(o, name), defaults[name]
        if not (v is default or v == default):
            strategies = applies_to(name)
            raise InputError(f"{name}: applies to strategy {' / '.join(map(repr, strategies))} only, not "
                             f"{spec.name!r} (got {v!r}; leave it at its default {default!r})")


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
