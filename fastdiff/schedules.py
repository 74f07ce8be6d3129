"""Noise schedules: ``alpha_bar[t]`` for ``t = 0..T`` (float64), shared by both process families.

``alpha_bar[0] == 1`` and ``alpha_bar`` is non-increasing in ``t``. ``beta_t = 1 - alpha_bar[t] /
alpha_bar[t-1]`` (stored at index ``t - 1``). Per-token schedules (``spindle``) have ``alpha_bar`` of shape
``(T + 1, V)``. In a discrete process ``alpha_bar[t]`` is the probability that a token is still itself
(absorbing) or has not been resampled (uniform); in a Gaussian process it is the signal variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import _checks
from .errors import InputError, InputTypeError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "Schedule",
    "AdaptiveSchedule",
    "linear",
    "cosine",
    "sqrt",
    "mutual_info",
    "spindle",
    "adaptive",
    "token_information",
    "from_betas",
    "get",
    "names",
    "plot_schedules",
]

MAX_BETA = 0.999


@dataclass
class Schedule:
    """A noise schedule.

    Attributes
    ----------
    alpha_bar : float64 tensor ``(T + 1,)`` or ``(T + 1, V)``: cumulative signal rate, ``alpha_bar[0] = 1``.
    name : the constructor that made it.
    """

    alpha_bar: torch.Tensor
    name: str = "custom"
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ab = _checks.floating("alpha_bar", self.alpha_bar).to(torch.float64)
        if ab.ndim not in (1, 2) or ab.shape[0] < 2:
            raise InputError(f"alpha_bar: expected shape (T+1,) or (T+1, V) with T >= 1, got {tuple(ab.shape)}")
        _checks.no_nan("alpha_bar", ab)
        if not bool((ab[0] == 1).all()):
            raise InputError("alpha_bar: alpha_bar[0] must be exactly 1")
        if bool((ab < 0).any()) or bool((ab > 1).any()):
            raise InputError("alpha_bar: values must lie in [0, 1]")
        if bool((ab[1:] > ab[:-1]).any()):
            raise InputError("alpha_bar: must be non-increasing in t")
        self.alpha_bar = ab.contiguous()

    @property
    def T(self) -> int:
        return self.alpha_bar.shape[0] - 1

    @property
    def per_token(self) -> bool:
        return self.alpha_bar.ndim == 2

    @property
    def betas(self) -> torch.Tensor:
        """``beta_t = 1 - alpha_bar[t] / alpha_bar[t-1]`` at index ``t - 1``; 1 where alpha_bar hits 0."""
        ab = self.alpha_bar
        prev, cur = ab[:-1], ab[1:]
        ratio = torch.where(prev > 0, cur / prev.clamp_min(1e-300), torch.zeros_like(cur))
        return 1.0 - ratio

    def __call__(self, t: torch.Tensor | int) -> torch.Tensor:
        """``alpha_bar[t]`` (per-token schedules return the ``(..., V)`` rows)."""
        return self.alpha_bar[t]

    def to(self, device: torch.device | str) -> "Schedule":
        """A copy with ``alpha_bar`` on ``device``."""
        return self._moved(device)

    def _moved(self, device: torch.device | str) -> Schedule:  # subclasses with more state override
        return Schedule(self.alpha_bar.to(device), self.name, dict(self.params))

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.alpha_bar.shape))
        return f"Schedule({self.name}, T={self.T}, alpha_bar[{shape}], alpha_bar[T]={self.alpha_bar[-1].min().item():.3g})"


def from_betas(betas: torch.Tensor, name: str = "custom") -> Schedule:
    """A schedule from per-step betas ``(T,)`` in [0, 1]: ``alpha_bar = cumprod(1 - beta)``.

    Matrix processes (:class:`~fastdiff.discrete.GaussianBand`, ``NearestNeighbor``) read these betas
    back exactly (D3PM's Gaussian process used ``linspace(0.02, 1, T)``).
    """
    b = _checks.floating("betas", betas).to(torch.float64)
    if b.ndim != 1 or b.numel() == 0:
        raise InputError(f"betas: expected a non-empty (T,) tensor, got {tuple(b.shape)}")
    _checks.no_nan("betas", b)
    if bool((b < 0).any()) or bool((b > 1).any()):
        raise InputError("betas: values must lie in [0, 1]")
    sched = _from_betas(b, name, {})
    sched.params["betas"] = b.clone()
    return sched


def _from_betas(betas: torch.Tensor, name: str, params: dict) -> Schedule:
    betas = betas.to(torch.float64).clamp(0.0, 1.0)
    ab = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])
    return Schedule(ab, name, params)


def _check_T(T: object) -> int:
    return _checks.positive_int("T", T)


def linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM (Ho et al. 2020) linear betas; both ends scaled by ``1000 / T`` (improved-diffusion).

    ``beta_t = linspace(scale * beta_start, scale * beta_end, T)``, ``alpha_bar = cumprod(1 - beta)``.
    """
    T = _check_T(T)
    b0 = _checks.real("beta_start", beta_start, 0.0, 1.0)
    b1 = _checks.real("beta_end", beta_end, 0.0, 1.0)
    scale = 1000.0 / T
    if scale * max(b0, b1) > 1.0:
        raise InputError(
            f"T: with T={T} the scaled betas (x{scale:g}) exceed 1; use T >= {math.ceil(1000 * max(b0, b1))}"
        )
    betas = torch.linspace(scale * b0, scale * b1, T, dtype=torch.float64)
    return _from_betas(betas, "linear", {"beta_start": b0, "beta_end": b1})


def _betas_for(fn: Callable[[torch.Tensor], torch.Tensor], T: int, max_beta: float) -> torch.Tensor:
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = fn(t)
    return (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)


def cosine(T: int, s: float = 0.008) -> Schedule:
    """Nichol & Dhariwal (2021): ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos²((t/T + s)/(1 + s) · π/2)``.

    As in improved-diffusion, betas are clipped at 0.999 and ``alpha_bar = cumprod(1 - beta)``, so
    ``alpha_bar[T] = 0.001 · alpha_bar[T-1]`` rather than exactly 0.
    """
    T = _check_T(T)
    s = _checks.real("s", s, 0.0, lo_open=False)

    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return _from_betas(_betas_for(f, T, MAX_BETA), "cosine", {"s": s})


def sqrt(T: int, s: float = 1e-4, normalize: bool = False) -> Schedule:
    """Diffusion-LM (Li et al. 2022): ``alpha_bar(t) = 1 - sqrt(t/T + s)``, ``alpha_bar[0] = 1``.

    High noise from the first step (a word embedding has no neighbour in a small ball), slow growth at
    the end. ``1 - sqrt(1 + s) < 0`` at ``t = T``, so betas are clipped at 0.999 as in Diffusion-LM.
    ``normalize=True`` reproduces Diffusion-LM's code exactly, which builds betas from the ratio
    ``alpha_bar(t)/alpha_bar(t-1)`` of the formula and so divides every value by ``1 - sqrt(s)``.
    """
    T = _check_T(T)
    s = _checks.real("s", s, 0.0, 1.0, lo_open=True)

    def f(t: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.sqrt(t + s)

    if normalize:
        betas = _betas_for(f, T, MAX_BETA)
    else:
        t = torch.arange(T + 1, dtype=torch.float64) / T
        ab = f(t)
        ab[0] = 1.0
        betas = (1.0 - ab[1:] / ab[:-1]).clamp(max=MAX_BETA)
    return _from_betas(betas, "sqrt", {"s": s, "normalize": normalize})


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp_min(0)
    return -(torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(-1)


def _mutual_information(qbar: torch.Tensor, marginal: torch.Tensor) -> float:
    """I(x0; xt) in nats for ``q(xt | x0) = qbar[x0]`` and ``x0 ~ marginal``."""
    joint = marginal[:, None] * qbar
    pxt = joint.sum(0)
    return float(_entropy(pxt) - (marginal * _entropy(qbar)).sum())


def _bisect(fn: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 80) -> float:
    """Solve ``fn(x) = target`` for ``fn`` increasing on [lo, hi]."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))


def _uniform_mi(ab: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``I(x0; xt)`` for the uniform process ``Qbar = ab·I + (1 - ab)/V`` at each ``ab`` of ``(K,)``, in
    closed form in O(K·U) (no V×V matrix; U = the number of distinct values of ``m``): every row of
    ``Qbar`` holds ``ab + c`` once and ``c = (1-ab)/V`` V-1 times, so ``H(xt | x0)`` is the same for every
    ``x0``; ``p(xt) = ab·m + c``. Rows of ``(K, U)`` are processed in chunks of about 2**20 elements."""
    V = m.shape[0]
    # H(xt) sums over the vocabulary, but only over the marginal's distinct values: tokens with equal
    # probability contribute equally (a uniform marginal is one value; corpus counts a few thousand).
    vals, counts = torch.unique(m, return_counts=True)
    counts = counts.to(torch.float64)
    out = torch.empty_like(ab)
    step = max(1, (1 << 20) // vals.numel())
    for i in range(0, ab.shape[0], step):
        a = ab[i:i + step, None]
        c = (1.0 - a) / V
        h_cond = -(_xlogx(a + c) + (V - 1) * _xlogx(c))[:, 0]
        h_marg = -(_xlogx(a * vals + c) * counts).sum(-1)
        out[i:i + step] = h_marg - h_cond
    return out


def _bisect_batched(fn: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, iters: int = 80
                    ) -> torch.Tensor:
    """:func:`_bisect` for many targets at once: ``fn`` maps ``(K,)`` points to ``(K,)`` values and is
    increasing on [0, 1] elementwise."""
    lo, hi = torch.zeros_like(targets), torch.ones_like(targets)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < targets
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def mutual_info(
    T: int,
    process: str | Callable[[float], torch.Tensor] = "absorbing",
    *,
    vocab_size: int | None = None,
    marginal: torch.Tensor | None = None,
) -> Schedule:
    """D3PM (Austin et al. 2021, §4.1): betas such that ``I(x_0; x_t)`` falls linearly to 0 in ``t``.

    * ``process="absorbing"``: ``I = alpha_bar · H(x_0)`` whatever the data marginal, so
      ``beta_t = 1/(T - t + 1)`` and ``alpha_bar(t) = 1 - t/T`` exactly.
    * ``process="uniform"``: ``Qbar = alpha_bar·I + (1 - alpha_bar)/V``; each ``alpha_bar[t]`` is found by
      bisection so that ``I(alpha_bar[t]) = (1 - t/T) · H(marginal)``, with ``I`` in closed form (O(U) per
      evaluation for U distinct marginal probabilities, all t bisected at once: well under a second for
      a uniform marginal at any V, seconds for a corpus marginal with thousands of distinct counts). Needs ``vocab_size``
      (``marginal`` defaults to uniform over the vocabulary).
    * a callable ``step_matrix(beta) -> (V, V)`` one-step transition matrix (Gaussian-band, kNN...):
      ``beta_t`` is solved step by step so that ``I(x_0; x_t)`` hits the same linear targets. ``marginal``
      is required then. Cost ``O(T · 80 · V³)``: meant for V up to a few hundred.
    """
    T = _check_T(T)
    if process == "absorbing":
        t = torch.arange(T + 1, dtype=torch.float64)
        return Schedule(1.0 - t / T, "mutual_info", {"process": "absorbing"})
    if process == "uniform":
        V = _checks.positive_int("vocab_size", vocab_size, 2)
        m = _marginal(marginal, V)
        h = float(_uniform_mi(torch.ones(1, dtype=torch.float64), m)[0])
        targets = (1.0 - torch.arange(1, T, dtype=torch.float64) / T) * h
        inner = _bisect_batched(lambda ab: _uniform_mi(ab, m), targets)
        # ab[t] = min(ab[t-1], solution): the bisection's rounding can never make alpha_bar increase.
        ab = torch.cat([torch.ones(1, dtype=torch.float64), inner, torch.zeros(1, dtype=torch.float64)])
        ab = torch.cummin(ab, 0).values
        return Schedule(ab, "mutual_info", {"process": "uniform"})
    if callable(process):
        if marginal is None:
            raise InputError("marginal: required when process is a step-matrix callable")
        qbar = None
        betas: list[float] = []
        m = None
        for t in range(1, T + 1):
            if qbar is None:
                V = process(0.5).shape[0]
                m = _marginal(marginal, V)
                qbar = torch.eye(V, dtype=torch.float64)
                h = _mutual_information(qbar, m)
            target = (1.0 - t / T) * h
            prev = qbar

            def mi_neg(beta: float, prev: torch.Tensor = prev) -> float:  # increasing in -beta
                return -_mutual_information(prev @ process(beta).to(torch.float64), m)

            beta = _bisect(mi_neg, -target, 0.0, 1.0)
            qbar = prev @ process(beta).to(torch.float64)
            betas.append(beta)
        sched = _from_betas(torch.tensor(betas, dtype=torch.float64), "mutual_info", {"process": "matrix"})
        # For matrix processes alpha_bar is only bookkeeping; the betas drive Q_t.
        sched.params["betas"] = torch.tensor(betas, dtype=torch.float64)
        return sched
    raise InputError(f"process: expected 'absorbing', 'uniform' or a callable, got {process!r}")


def _marginal(marginal: torch.Tensor | None, V: int) -> torch.Tensor:
    if marginal is None:
        return torch.full((V,), 1.0 / V, dtype=torch.float64)
    m = _checks.floating("marginal", marginal).to(torch.float64)
    if m.shape != (V,) or bool((m < 0).any()) or m.sum() <= 0:
        raise InputError(f"marginal: expected ({V},) non-negative weights")
    return m / m.sum()


def token_information(counts: torch.Tensor) -> torch.Tensor:
    """DiffusionBERT-style normalised token information from corpus counts ``(V,)``.

    ``I(w) = -log p(w)`` with add-one smoothing, scaled to [0, 1] by its maximum, then centred by its
    mean under the add-one-smoothed corpus distribution ``p``, so the average token keeps the plain ``1 - t/T`` schedule,
    rare tokens (``H > 0``) are masked earlier and frequent ones (``H < 0``) later. DiffusionBERT centres
    per sentence instead; a per-token table is what a kernel can index.
    """
    c = _checks.tensor("counts", counts).to(torch.float64)
    if c.ndim != 1 or c.numel() == 0 or bool((c < 0).any()):
        raise InputError("counts: expected a non-empty (V,) tensor of non-negative counts")
    p = (c + 1.0) / (c.sum() + c.numel())
    info = -torch.log(p)
    info = info / info.max()
    return info - (p * info).sum()


def spindle(T: int, token_info: torch.Tensor, lam: float = 0.3) -> Schedule:
    """DiffusionBERT (He et al. 2023) spindle schedule, per token ``w``:

    ``alpha_bar_t(w) = 1 - t/T - lam · sin(π t / T) · H(w)``, clipped to [0, 1] and made non-increasing.

    ``token_info``: ``(V,)`` normalised information ``H(w)`` (see :func:`token_information`). Returns a
    schedule with ``alpha_bar`` of shape ``(T + 1, V)`` (use with :class:`~fastdiff.discrete.Absorbing`).
    """
    T = _check_T(T)
    lam = _checks.real("lam", lam)
    h = _checks.floating("token_info", token_info).to(torch.float64)
    if h.ndim != 1 or h.numel() == 0:
        raise InputError(f"token_info: expected a (V,) tensor, got {tuple(h.shape)}")
    _checks.finite("token_info", h)
    t = torch.arange(T + 1, dtype=torch.float64)[:, None]
    ab = 1.0 - t / T - lam * torch.sin(math.pi * t / T) * h[None, :]
    ab = ab.clamp(0.0, 1.0)
    ab[0] = 1.0
    ab[-1] = 0.0
    ab = torch.cummin(ab, dim=0).values
    return Schedule(ab, "spindle", {"lam": lam})


class AdaptiveSchedule(Schedule):
    """SeqDiffuSeq-style adaptive schedule (Yuan et al. 2022): noise re-fitted from the training loss.

    Start from a base schedule (``sqrt`` by default). During training call :meth:`record` with the
    per-example losses observed at steps ``t``; :meth:`refit` then moves ``alpha_bar`` so that the
    expected loss grows *linearly* in ``t`` between the smallest and largest observed losses: the map
    ``alpha_bar -> loss`` measured on the current schedule is made monotone and inverted at evenly spaced
    loss levels. Each step's loss is an exponential moving average (``momentum``).
    """

    def __init__(self, base: Schedule, momentum: float = 0.9) -> None:
        super().__init__(base.alpha_bar.clone(), "adaptive", {"base": base.name, "momentum": momentum})
        if base.per_token:
            raise InputError("base: the adaptive schedule needs a (T+1,) base schedule")
        self.momentum = _checks.real("momentum", momentum, 0.0, 1.0, hi_open=True)
        self.loss = torch.full((self.T + 1,), float("nan"), dtype=torch.float64)

    def _moved(self, device: torch.device | str) -> AdaptiveSchedule:
        out = AdaptiveSchedule(Schedule(self.alpha_bar.to(device), self.params["base"]), self.momentum)
        out.loss = self.loss.clone()
        return out

    def record(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Fold per-example ``losses`` observed at steps ``t`` (both ``(B,)``) into the per-step EMA."""
        t, losses = _checks.step_losses(t, losses, self.T)
        for step in torch.unique(t).tolist():
            val = float(losses[t == step].mean())
            old = float(self.loss[step])
            self.loss[step] = val if old != old else self.momentum * old + (1 - self.momentum) * val

    @property
    def ready(self) -> bool:
        return bool(torch.isfinite(self.loss[1:]).all())

    def refit(self) -> bool:
        """Re-fit ``alpha_bar`` from the recorded losses; returns False (no change) until every step has one."""
        if not self.ready:
            return False
        ab = self.alpha_bar[1:]
        loss = self.loss[1:]
        # Loss should fall as alpha_bar (signal) rises: enforce that by a running maximum from the
        # high-noise end, so the inverse map is well defined.
        order = torch.argsort(ab)  # increasing alpha_bar
        ab_sorted, loss_sorted = ab[order], loss[order]
        loss_mono = torch.flip(torch.cummax(torch.flip(loss_sorted, [0]), 0).values, [0])
        lo, hi = float(loss_mono[-1]), float(loss_mono[0])
        if not hi > lo:
            return False
        targets = torch.linspace(lo, hi, self.T, dtype=torch.float64)  # t = 1..T, loss grows with t
        xs = torch.flip(loss_mono, [0])  # increasing loss
        ys = torch.flip(ab_sorted, [0])  # alpha_bar falling as loss grows
        new = _interp(targets, xs, ys)
        new = torch.cummin(torch.cat([torch.ones(1, dtype=torch.float64), new.clamp(0, 1)]), 0).values
        self.alpha_bar = new
        # The recorded losses belong to the old steps: carry them over to the new ones through the measured
        # (alpha_bar -> loss) map, so the next refit does not mix the two schedules (which oscillates).
        self.loss[1:] = _interp(new[1:], ab_sorted, loss_mono)
        return True


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (``numpy.interp``) for increasing ``xp`` with repeated values."""
    idx = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    w = torch.where(x1 > x0, (x - x0) / (x1 - x0).clamp_min(1e-300), torch.zeros_like(x))
    return y0 + w.clamp(0, 1) * (y1 - y0)


def adaptive(T: int, base: str | Schedule = "sqrt", momentum: float = 0.9, **kw: Any) -> AdaptiveSchedule:
    """An :class:`AdaptiveSchedule` starting from ``base`` (a name for :func:`get`, or a Schedule)."""
    if isinstance(base, str):
        base = get(base, T, **kw)
    elif not isinstance(base, Schedule):
        raise InputTypeError(f"base: expected a schedule name or Schedule, got {type(base).__name__}")
    if base.T != T:
        raise InputError(f"base: has T={base.T}, expected T={T}")
    return AdaptiveSchedule(base, momentum)


_REGISTRY: dict[str, Callable[..., Schedule]] = {
    "linear": linear,
    "cosine": cosine,
    "sqrt": sqrt,
    "mutual_info": mutual_info,
    "spindle": spindle,
    "adaptive": adaptive,
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, T: int, **kw: Any) -> Schedule:
    """Build a schedule by name: ``get("cosine", 1000)``, ``get("spindle", 100, token_info=h)``."""
    if name not in _REGISTRY:
        raise InputError(f"name: unknown schedule {name!r}; expected one of {names()}")
    return _REGISTRY[name](T, **kw)


def plot_schedules(schedules: dict[str, Schedule] | list[Schedule], path: str | None = None,
                   ax: Axes | None = None) -> Axes:
    """Plot ``alpha_bar`` against ``t/T`` (per-token schedules: their min, mean and max over tokens).

    Needs matplotlib (``pip install matplotlib``). Saves to ``path`` if given; returns the Axes.
    """
    try:
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_schedules needs matplotlib: pip install matplotlib") from e
    if isinstance(schedules, dict):
        items = list(schedules.items())
    else:
        items = [(s.name, s) for s in schedules]
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    for label, sch in items:
        x = torch.arange(sch.T + 1, dtype=torch.float64) / sch.T
        ab = sch.alpha_bar.cpu()
        if sch.per_token:
            line = ax.plot(x, ab.mean(1), label=f"{label} (mean over tokens)")[0]
            ax.fill_between(x, ab.min(1).values, ab.max(1).values, alpha=0.2, color=line.get_color())
        else:
            ax.plot(x, ab, label=label)
    ax.set_xlabel("t / T")
    ax.set_ylabel("alpha_bar(t)")
    ax.legend()
    ax.grid(alpha=0.3)
    if path is not None:
        (fig or ax.figure).savefig(path, dpi=120, bbox_inches="tight")
    return ax
