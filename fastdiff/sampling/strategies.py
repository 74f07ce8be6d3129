"""The sampling strategies, one table entry each: family, paper, the options it reads, its rules, its step.

Everything that differs between strategies is here; validation (:func:`._options.check_static`), the
option docs (``Options`` / ``sample``), :data:`fastdiff.sampling.STRATEGIES` and the loops read it.

Adding a strategy: write its step function (below, for the signatures), add one :class:`Strategy` to
:data:`TABLE`, and add tests. New options it reads are new fields of :class:`~._options.Options` with an
entry in :data:`~._options.OPTION_DOCS`.

Step functions, by family (the family's loop draws ``x_T``, walks the blocks and the step grid, holds
fixed positions, calls the network and counts the steps):

* discrete: ``block(run, x, a, b, logits, bar) -> None`` decodes block ``x[:, a:b]`` in place, calling
  ``logits(x, t) -> (block logits (B, b - a, V), owned)`` for the network's output and
  ``run.after_step(x, bar)`` after every step (see :mod:`._discrete`);
* continuous: ``step(run, model_output, x_t, t, s, denoised_fn) -> x_s``, one step of the process's maths
  (:meth:`GaussianDiffusion.ddpm_step` / :meth:`~GaussianDiffusion.ddim_step`) with the run's noise stream
  and classifier guidance (see :mod:`._continuous`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError
from . import _ar, _continuous, _discrete

if TYPE_CHECKING:
    from ._options import Options

FAMILIES = ("discrete", "continuous")

#: the options every discrete strategy reads (its x0 draw) and every continuous one (its embedding space)
_DRAW = ("temperature", "top_k", "top_p")
_EMBEDDING = ("embedding", "clamp", "metric", "self_condition", "self_cond_kwarg", "classifier_grad",
              "classifier_scale")


@dataclass(frozen=True)
class Strategy:
    """One sampling strategy.

    Attributes
    ----------
    name : the ``strategy=`` value.
    family : "discrete" (a :mod:`fastdiff.discrete` process) or "continuous" (a ``GaussianDiffusion``).
    label : the method's short name, for messages ("ReMDM").
    paper : the method and its source, for the docs.
    summary : what a step does, for the docs.
    step : the step function (module docstring).
    options : the options it reads beyond the common ones (every other strategy-specific option must stay
        at its default: an error names it).
    walks_grid : it takes ``steps`` transitions of :func:`step_grid` from T to 0, so ``steps <= T``; False:
        ``steps`` is a budget of decoding rounds per block (at most one round per position).
    needs_absorbing : it needs an absorbing (mask) process.
    scalar_schedule : it needs a scalar ``(T+1,)`` schedule (not a per-token one).
    filter_scalar_schedule : its top-k / top-p draw goes through the posterior (two stages), which needs a
        scalar schedule.
    greedy : ``temperature=0`` (argmax) is allowed.
    rules : further checks among its options, ``rule(options)`` raising ``InputError``; they run after every
        option's own checks and before the check of options it does not read.
    own_loop : a loop of its own instead of the family's (AR-Diffusion walks per-position steps).
    per_position : AR-Diffusion's sentence-level steps: ``steps`` transitions from ``N + T`` to 0, so
        ``steps <= N + T`` (``N`` the length) rather than ``<= T``.
    """

    name: str
    family: str
    label: str
    paper: str
    summary: str
    step: Callable
    options: tuple[str, ...] = ()
    walks_grid: bool = True
    needs_absorbing: bool = False
    scalar_schedule: bool = False
    filter_scalar_schedule: bool = False
    greedy: bool = False
    rules: tuple[Callable, ...] = ()
    own_loop: Callable | None = None
    per_position: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {FAMILIES}, got {self.family!r}")

    @property
    def loop(self) -> Callable:
        """The family's loop (or the strategy's own), ``loop(run) -> (tokens, x or None)``."""
        return self.own_loop or LOOPS[self.family]


def _remask_eta(o: Options) -> None:
    if o.remask_schedule == "rescale" and o.eta > 1:
        raise InputError(f"eta: must be <= 1 with remask_schedule='rescale' (σ_t = η·σ_max must not exceed "
                         f"σ_max), got {o.eta}; remask_schedule='cap' takes any η >= 0")


def _guided_draw(o: Options) -> None:
    if o.classifier_grad is not None and (o.top_k is not None or o.top_p is not None):
        filt = "top_k" if o.top_k is not None else "top_p"
        raise InputError(f"{filt}: does not combine with classifier_grad in the discrete family (the guided "
                         "posterior is tilted by the classifier, not drawn in two stages)")


def _ar_rules(o: Options) -> None:
    if o.block_size is not None:
        raise InputError("block_size: AR-Diffusion orders the positions itself (left to right by its timesteps); "
                         "it does not take semi-autoregressive blocks")


LOOPS = {"discrete": _discrete.run_discrete, "continuous": _continuous.run_continuous}

#: name -> Strategy, in the order the docs and messages list them.
TABLE: dict[str, Strategy] = {s.name: s for s in (
    Strategy(
        "ancestral", "discrete", "D3PM", "D3PM ancestral sampling (Austin et al. 2021)",
        "``x_s ~ p(x_s | x_t)``, the posterior of the x0 prediction, over an evenly spaced grid of ``steps`` "
        "transitions from T to 0 (the skip posterior); with ``cache=True`` the network is skipped for every "
        "sequence whose input did not change (MDLM, Sahoo et al. 2024); with ``classifier_grad`` each "
        "position's posterior is tilted by ``exp(s·g[x_s])``, ``g`` the classifier's gradient with respect "
        "to the one-hot ``x_t`` (DiGress, Vignac et al. 2023; TAG, Nisonoff et al. 2024).",
        _discrete.ancestral_block, options=_DRAW + ("cache", "classifier_grad", "classifier_scale"),
        filter_scalar_schedule=True, rules=(_guided_draw,)),
    Strategy(
        "confidence", "discrete", "LLaDA", "LLaDA low-confidence remasking (Nie et al. 2025, Alg. 5)",
        "Predict every masked token and keep the ``tokens_per_step`` most confident ones (LLaDA's even split "
        "of the masked count over ``steps`` by default); ``remasking='random'`` keeps random ones.",
        _discrete.confidence_block, options=_DRAW + ("tokens_per_step", "remasking"), walks_grid=False,
        needs_absorbing=True, greedy=True),
    Strategy(
        "threshold", "discrete", "Fast-dLLM", "Fast-dLLM parallel decoding (Wu et al. 2025)",
        "Predict every masked token and keep every prediction whose probability exceeds ``threshold`` (at "
        "least one per step, and enough to finish within ``steps``).",
        _discrete.threshold_block, options=_DRAW + ("tokens_per_step", "threshold"), walks_grid=False,
        needs_absorbing=True, greedy=True),
    Strategy(
        "remask", "discrete", "ReMDM", "ReMDM remasking (Wang et al. 2025)",
        "The ancestral step, and every decoded token remasked with probability ``σ_t`` (``eta``, "
        "``remask_schedule``, ``remask_window``), so later steps can revise it.",
        _discrete.remask_block, options=_DRAW + ("eta", "remask_schedule", "remask_window"),
        needs_absorbing=True, scalar_schedule=True, filter_scalar_schedule=True, rules=(_remask_eta,)),
    Strategy(
        "ar_ancestral", "discrete", "AR-Diffusion", "AR-Diffusion (Wu et al. 2023) carried over to discrete processes",
        "Position-dependent steps as in ``'ar'`` (the anchor-point schedule with step skipping, "
        ":func:`fastdiff.continuous.ar_step_pairs`): ``steps`` sentence-level transitions from ``N + T`` to 0; at "
        "each, every position whose own step moves is drawn from the D3PM posterior from its step to its next "
        "(:func:`fastdiff.ops.posterior_sample` with per-position ``t`` and ``s``), the others kept, so with an "
        "absorbing process the left positions are decoded sooner; the model is called with the ``(L,)`` "
        "per-position steps.",
        _ar.ar_discrete_step, options=("temperature",), rules=(_ar_rules,), own_loop=_ar.run_ar_discrete,
        per_position=True),
    Strategy(
        "ddpm", "continuous", "DDPM", "DDPM ancestral sampling (Ho et al. 2020) in embedding space "
        "(Diffusion-LM, Li et al. 2022)",
        "One :meth:`GaussianDiffusion.ddpm_step` per grid transition, the x0 estimate clamped (``clamp``), the "
        "result rounded to the nearest embedding's token.",
        _continuous.ddpm_step, options=_EMBEDDING),
    Strategy(
        "ddim", "continuous", "DDIM", "DDIM (Song et al. 2021) in embedding space",
        "One :meth:`GaussianDiffusion.ddim_step` (``eta``) per grid transition, the x0 estimate clamped "
        "(``clamp``), the result rounded to the nearest embedding's token.",
        _continuous.ddim_step, options=_EMBEDDING + ("eta",)),
    Strategy(
        "ar", "continuous", "AR-Diffusion", "AR-Diffusion (Wu et al. 2023) in embedding space",
        "Position-dependent steps: ``steps`` sentence-level transitions from ``N + T`` to 0 with the paper's "
        "anchor-point schedule (:func:`fastdiff.continuous.ar_timesteps`), left positions reaching 0 sooner; "
        "each transition moves every position by DDIM (``eta``) from its own step to its next, the model "
        "called with the ``(B, L)`` per-position steps (a model trained with per-position steps; "
        "the bundled SED denoiser takes one step per sequence, so it cannot be sampled this way).",
        _continuous.ar_step, options=_EMBEDDING[:5] + ("eta",), rules=(_ar_rules,), own_loop=_continuous.run_ar,
        per_position=True),
)}


def family(name: str) -> tuple[str, ...]:
    """The names of the strategies of a family, in table order."""
    return tuple(s.name for s in TABLE.values() if s.family == name)


def get(name: str) -> Strategy:
    """The table entry of a strategy (``KeyError`` for an unknown name; :func:`fastdiff.sampling.sample`
    checks names with a proper error)."""
    return TABLE[name]
