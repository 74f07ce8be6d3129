"""Discrete (categorical) diffusion: D3PM (Austin et al. 2021), MDLM (Sahoo et al. 2024), LLaDA.

``Q_t[i, j] = q(x_t = j | x_{t-1} = i)``, ``Qbar_t = Q_1 ⋯ Q_t`` (``Qbar_0 = I``) and the skip transition
``Q_{t|s} = Q_{s+1} ⋯ Q_t``. The reverse step from ``t`` to any ``s < t`` uses D3PM eq. 4 with a skip::

    p(x_s | x_t) ∝ Q_{t|s}[:, x_t] ⊙ (x0_probs @ Qbar_s)

With one-hot ``x0_probs`` this is exactly ``q(x_s | x_t, x_0)``; with ``s = 0`` it is the distribution of
``x_0`` given ``x_t``.

Shapes: token tensors ``x0, x_t: (...)`` (any integer dtype), distributions ``(..., V)``; a step ``t`` (or
``s``) is an int or an integer tensor whose shape is a *leading* part of the token shape (one step per
sequence: ``t: (B,)`` for ``x_t: (B, L)``).

Processes
---------
* :class:`Absorbing` and :class:`Uniform` use closed forms (never a V×V matrix), any vocabulary size.
* :class:`GaussianBand`, :class:`NearestNeighbor` and :class:`Dense` hold V×V matrices in float64 and are
  meant for small vocabularies (V up to a few thousand; each cached matrix costs ``8·V²`` bytes).

What the ops, the sampler and the trainer need from a process is the :class:`DiscreteProcess` protocol
(defined in :mod:`fastdiff._protocols`, below the ops); the classes here satisfy it, and so may a user's.

Losses
------
Per token: :func:`kl_terms`, :func:`decoder_nll`, :func:`vlb_terms`, :func:`prior_kl`, :func:`x0_nll`;
the objectives :func:`hybrid_loss` and :func:`mdlm_loss`, and :func:`losses`, the dict a training loop
uses (objective, the shared CE term, per-sequence reduction and importance weights).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import _checks
from ._protocols import DeviceLike, DiscreteProcess, MatrixDiscreteProcess, Step
from ._reduce import REDUCTIONS, check_reduction, check_weights, reduce, weighted_mean
from .schedules import Schedule
from .errors import InputError, InputTypeError

__all__ = [
    "DiscreteProcess",
    "MatrixDiscreteProcess",
    "DiscreteProcessBase",
    "Absorbing",
    "Uniform",
    "MatrixProcess",
    "GaussianBand",
    "NearestNeighbor",
    "Dense",
    "kl_terms",
    "decoder_nll",
    "vlb_terms",
    "prior_kl",
    "hybrid_loss",
    "mdlm_loss",
    "x0_nll",
    "losses",
    "OBJECTIVES",
    "REDUCTIONS",
]


def _renormalise(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(-1, keepdim=True)


def _renormalise_or_keep(w: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Rows of ``w`` normalised; a row with no weight at all (``x_t`` unreachable from the x0 distribution)
    becomes one-hot at ``x_t``, the rule every op backend follows (``fastdiff.ops.categorical_posterior``),
    instead of 0/0 = NaN."""
    total = w.sum(-1, keepdim=True)
    dead = total == 0
    out = w / torch.where(dead, torch.ones_like(total), total)
    if bool(dead.any()):
        keep = torch.nn.functional.one_hot(x_t, w.shape[-1]).to(w.dtype)
        out = torch.where(dead, keep, out)
    return out


class DiscreteProcessBase(DiscreteProcess):
    """Base class of the processes below: argument checks and defaults for the :class:`DiscreteProcess`
    protocol (a Markov chain over ``vocab_size`` categories with ``T`` steps). A process need not derive
    from it: anything with the protocol's members works with the ops, the sampler and the losses."""

    kind: str = "abstract"
    vocab_size: int
    T: int
    mask_id: int | None = None  # only absorbing processes have a mask token
    schedule: Schedule | None = None  # None: a process given by its matrices (Dense)

    # --- argument handling ---------------------------------------------------------------------
    def _tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _checks.token_ids(name, x, self.vocab_size).to(torch.int64)

    def _probs(self, name: str, p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        _checks.floating(name, p)
        if p.shape != like.shape + (self.vocab_size,):
            raise InputError(
                f"{name}: expected shape {tuple(like.shape) + (self.vocab_size,)}, got {tuple(p.shape)}"
            )
        _checks.same_device(x_t=like, **{name: p})
        _checks.no_nan(name, p)
        return p

    def _t(self, t: Step, shape: torch.Size, device: DeviceLike) -> torch.Tensor:
        tt = _checks.steps("t", t, self.T, 0, device)
        return _checks.expand_leading("t", tt, shape)

    def _ts(self, t: Step, s: Step | None, shape: torch.Size, device: DeviceLike) -> tuple[torch.Tensor, torch.Tensor]:
        tt, ss = _checks.step_pair(t, s, self.T, device)
        return _checks.expand_leading("t", tt, shape), _checks.expand_leading("s", ss, shape)

    # --- the x0 distribution a network predicts ----------------------------------------------------
    def x0_log_probs(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``log_softmax(logits / temperature)`` in at least float32 (absorbing: mask logit ignored)."""
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        return torch.log_softmax(logits / temperature, dim=-1)

    def x0_probs(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.x0_log_probs(logits, temperature).exp()

    # --- process interface -----------------------------------------------------------------------
    def q_probs(self, x0: torch.Tensor, t: Step, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``q(x_t | x_0) = Qbar_t[x0]``: ``(..., V)``."""
        raise NotImplementedError

    def q_sample(self, x0: torch.Tensor, t: Step, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``x_t ~ q(x_t | x_0)``: int64 ``(...)``."""
        raise NotImplementedError

    def posterior_probs(self, x0_probs: torch.Tensor, x_t: torch.Tensor, t: Step, s: Step | None = None
                        ) -> torch.Tensor:
        """``p(x_s | x_t) ∝ Q_{t|s}[:, x_t] ⊙ (x0_probs @ Qbar_s)``, normalised: ``(..., V)``.

        ``x0_probs: (..., V)``, ``x_t: (...)``, ``1 <= t <= T``, ``0 <= s < t`` (default ``t - 1``).
        Computed in float64; returned in ``x0_probs``'s dtype (at least float32). Differentiable in
        ``x0_probs``.
        """
        raise NotImplementedError

    def prior_probs(self, shape: tuple[int, ...] = (), device: DeviceLike = None) -> torch.Tensor:
        """The reference distribution ``p(x_T)``: ``shape + (V,)`` float64."""
        raise NotImplementedError

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: DeviceLike = None) -> torch.Tensor:
        p = self.prior_probs((), device)
        idx = torch.multinomial(p.float(), int(torch.Size(shape).numel()), replacement=True,
                                generator=generator)
        return idx.reshape(shape)

    def _out_dtype(self, p: torch.Tensor) -> torch.dtype:
        return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32

    def _posterior_args(self, x0_probs: torch.Tensor, x_t: torch.Tensor, t: Step, s: Step | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
        """Checked ``(x_t int64, x0_probs float64, t, s expanded to x_t.shape, output dtype)``."""
        x_t = self._tokens("x_t", x_t)
        x0_probs = self._probs("x0_probs", x0_probs, x_t)
        tt, ss = self._ts(t, s, x_t.shape, x_t.device)
        return x_t, x0_probs.to(torch.float64), tt, ss, self._out_dtype(x0_probs)


# ------------------------------------------------------------------------------------------------
# Absorbing ([MASK]) diffusion
# ------------------------------------------------------------------------------------------------
class Absorbing(DiscreteProcessBase):
    """Absorbing-state ("[MASK]") diffusion, D3PM-absorbing / MDLM / LLaDA.

    A token survives to step ``t`` with probability ``alpha_bar[t]`` and is otherwise the mask token:
    ``Qbar_t = alpha_bar_t · I + (1 - alpha_bar_t) · 1 e_maskᵀ``. A per-token schedule (``spindle``,
    ``alpha_bar`` of shape ``(T+1, V)``) lets each token ``w`` survive with its own ``alpha_bar_t(w)``.

    SUBS convention (MDLM): the x0 distribution puts no mass on the mask token — its logit is ignored
    and :meth:`posterior_probs` zeroes and renormalises that column — and an unmasked token is carried
    over unchanged (the formula gives exactly that).

    Closed-form posterior, for ``x_t = mask`` (``a_t = alpha_bar_t``, per token when the schedule is)::

        p(x_s = j) ∝ (a_s(j) - a_t(j)) · x0_probs[j]      (j ≠ mask)
        p(x_s = mask) ∝ Σ_i x0_probs[i] · (1 - a_s(i))

    and one-hot at ``x_t`` when ``x_t ≠ mask``.
    """

    kind = "absorbing"

    def __init__(self, vocab_size: int, mask_id: int, schedule: Schedule) -> None:
        self.vocab_size = _checks.positive_int("vocab_size", vocab_size, 2)
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < vocab_size:
            raise InputError(f"mask_id: must be an int in [0, {vocab_size}), got {mask_id!r}")
        self.mask_id = mask_id
        if not isinstance(schedule, Schedule):
            raise InputTypeError(f"schedule: expected a Schedule, got {type(schedule).__name__}")
        if schedule.per_token and schedule.alpha_bar.shape[1] != vocab_size:
            raise InputError(
                f"schedule: per-token schedule has {schedule.alpha_bar.shape[1]} tokens, vocab_size={vocab_size}"
            )
        self.schedule = schedule
        self.T = schedule.T

    def __repr__(self) -> str:
        return f"Absorbing(V={self.vocab_size}, mask_id={self.mask_id}, {self.schedule!r})"

    @property
    def per_token(self) -> bool:
        return self.schedule.per_token

    def _ab(self, t: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """alpha_bar at steps ``t`` (...): per position (...) or, per-token, (..., V) / at tokens x0."""
        ab = self.schedule.alpha_bar.to(t.device)
        if not self.per_token:
            return ab[t]
        rows = ab[t]  # (..., V)
        if x0 is None:
            return rows
        return rows.gather(-1, x0.unsqueeze(-1)).squeeze(-1)

    def x0_log_probs(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        logits = logits.clone()
        logits[..., self.mask_id] = float("-inf")
        return torch.log_softmax(logits / temperature, dim=-1)

    def q_probs(self, x0: torch.Tensor, t: Step, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        x0 = self._tokens("x0", x0)
        tt = self._t(t, x0.shape, x0.device)
        a = self._ab(tt, x0).to(dtype)
        a = torch.where(x0 == self.mask_id, torch.ones_like(a), a)
        out = F.one_hot(x0, self.vocab_size).to(dtype) * a.unsqueeze(-1)
        out[..., self.mask_id] += 1.0 - a
        return out

    def q_sample(self, x0: torch.Tensor, t: Step, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = self._tokens("x0", x0)
        tt = self._t(t, x0.shape, x0.device)
        a = self._ab(tt, x0)
        u = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        return torch.where(u < a, x0, torch.full_like(x0, self.mask_id))

    def posterior_probs(self, x0_probs: torch.Tensor, x_t: torch.Tensor, t: Step, s: Step | None = None
                        ) -> torch.Tensor:
        x_t, p, tt, ss, out_dtype = self._posterior_args(x0_probs, x_t, t, s)
        keep = torch.ones(self.vocab_size, dtype=torch.float64, device=p.device)
        keep[self.mask_id] = 0.0
        p = p * keep
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
        a_t = self._ab(tt)
        a_s = self._ab(ss)
        if not self.per_token:
            a_t, a_s = a_t.unsqueeze(-1), a_s.unsqueeze(-1)
        w = (a_s - a_t) * p  # (..., V), zero at the mask column
        w_mask = (p * (1.0 - a_s)).sum(-1)  # (...)
        w = w + w_mask.unsqueeze(-1) * (1.0 - keep)  # the mask column
        z = w.sum(-1, keepdim=True)
        # Masked rows with a defined posterior get w / z; every other row is one-hot at x_t (carry-over;
        # also the choice for the impossible case z = 0), added by a scatter rather than a one-hot.
        use_post = (x_t == self.mask_id).unsqueeze(-1) & (z > 0)
        out = torch.where(use_post, w / z.clamp_min(1e-300), torch.zeros((), dtype=torch.float64))
        out = out.scatter_add(-1, x_t.unsqueeze(-1), (~use_post).to(torch.float64))
        return out.to(out_dtype)

    def prior_probs(self, shape: tuple[int, ...] = (), device: DeviceLike = None) -> torch.Tensor:
        out = torch.zeros(tuple(shape) + (self.vocab_size,), dtype=torch.float64, device=device)
        out[..., self.mask_id] = 1.0
        return out

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: DeviceLike = None) -> torch.Tensor:
        return torch.full(tuple(shape), self.mask_id, dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------------
# Uniform diffusion
# ------------------------------------------------------------------------------------------------
class Uniform(DiscreteProcessBase):
    """Uniform-noise diffusion (D3PM-uniform; Hoogeboom et al. 2021 multinomial diffusion; DUO).

    ``Q_t = (1 - beta_t) I + beta_t/V · 11ᵀ`` so ``Qbar_t = a_t I + (1 - a_t)/V · 11ᵀ`` with ``a_t =
    alpha_bar_t``, and ``Q_{t|s} = r I + (1 - r)/V · 11ᵀ``, ``r = a_t / a_s``. The posterior::

        p(x_s = j) ∝ (r·[j = x_t] + (1 - r)/V) · (a_s · x0_probs[j] + (1 - a_s)/V)

    is computed in ``O(V)`` per position, never with a V×V matrix.
    """

    kind = "uniform"

    def __init__(self, vocab_size: int, schedule: Schedule) -> None:
        self.vocab_size = _checks.positive_int("vocab_size", vocab_size, 2)
        if not isinstance(schedule, Schedule):
            raise InputTypeError(f"schedule: expected a Schedule, got {type(schedule).__name__}")
        if schedule.per_token:
            raise InputError("schedule: per-token schedules are only defined for Absorbing")
        self.schedule = schedule
        self.T = schedule.T

    def __repr__(self) -> str:
        return f"Uniform(V={self.vocab_size}, {self.schedule!r})"

    def _ab(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.alpha_bar.to(t.device)[t]

    def q_probs(self, x0: torch.Tensor, t: Step, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        x0 = self._tokens("x0", x0)
        a = self._ab(self._t(t, x0.shape, x0.device)).to(dtype).unsqueeze(-1)
        return a * F.one_hot(x0, self.vocab_size).to(dtype) + (1.0 - a) / self.vocab_size

    def q_sample(self, x0: torch.Tensor, t: Step, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = self._tokens("x0", x0)
        a = self._ab(self._t(t, x0.shape, x0.device))
        u = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        r = torch.randint(0, self.vocab_size, x0.shape, device=x0.device, generator=generator)
        return torch.where(u < a, x0, r)

    def posterior_probs(self, x0_probs: torch.Tensor, x_t: torch.Tensor, t: Step, s: Step | None = None
                        ) -> torch.Tensor:
        x_t, p, tt, ss, out_dtype = self._posterior_args(x0_probs, x_t, t, s)
        V = self.vocab_size
        p = p / p.sum(-1, keepdim=True)
        a_t, a_s = self._ab(tt), self._ab(ss)
        r = torch.where(a_s > 0, a_t / a_s.clamp_min(1e-300), torch.zeros_like(a_s)).unsqueeze(-1)
        f2 = a_s.unsqueeze(-1) * p + (1.0 - a_s.unsqueeze(-1)) / V  # (x0_probs @ Qbar_s)
        # Q_{t|s}[:, x_t] = (1 - r)/V everywhere, plus r at x_t: add the spike by a scatter, not a one-hot.
        idx = x_t.unsqueeze(-1)
        w = torch.scatter_add((1.0 - r) / V * f2, -1, idx, r * f2.gather(-1, idx))
        return _renormalise(w).to(out_dtype)

    def prior_probs(self, shape: tuple[int, ...] = (), device: DeviceLike = None) -> torch.Tensor:
        return torch.full(tuple(shape) + (self.vocab_size,), 1.0 / self.vocab_size,
                          dtype=torch.float64, device=device)


# ------------------------------------------------------------------------------------------------
# Matrix processes (small V)
# ------------------------------------------------------------------------------------------------
class MatrixProcess(DiscreteProcessBase):
    """A process given by explicit ``(V, V)`` float64 matrices ``Q_t``; small vocabularies only.

    ``Qbar_t`` are built incrementally and cached (``8·V²`` bytes each, up to the largest ``t`` asked
    for); skip transitions ``Q_{t|s}`` are cached in a small LRU. Subclasses define :meth:`step_matrix`.
    """

    kind = "matrix"
    _LRU = 64

    def _init_cache(self) -> None:
        self._qbar: list[torch.Tensor] = [torch.eye(self.vocab_size, dtype=torch.float64)]
        self._skip: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    def step_matrix(self, t: int) -> torch.Tensor:
        """``Q_t`` for ``1 <= t <= T``: ``(V, V)`` float64, rows sum to 1."""
        raise NotImplementedError

    def qbar(self, t: int) -> torch.Tensor:
        """``Qbar_t = Q_1 ⋯ Q_t`` (``Qbar_0 = I``)."""
        while len(self._qbar) <= t:
            k = len(self._qbar)
            self._qbar.append(self._qbar[-1] @ self.step_matrix(k))
        return self._qbar[t]

    def transition(self, s: int, t: int) -> torch.Tensor:
        """``Q_{t|s} = Q_{s+1} ⋯ Q_t``: ``q(x_t | x_s)`` for ``s < t``."""
        key = (s, t)
        if key in self._skip:
            self._skip.move_to_end(key)
            return self._skip[key]
        m = torch.eye(self.vocab_size, dtype=torch.float64)
        for k in range(s + 1, t + 1):
            m = m @ self.step_matrix(k)
        self._skip[key] = m
        if len(self._skip) > self._LRU:
            self._skip.popitem(last=False)
        return m

    def q_probs(self, x0: torch.Tensor, t: Step, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        x0 = self._tokens("x0", x0)
        tt = self._t(t, x0.shape, x0.device)
        out = torch.empty(x0.shape + (self.vocab_size,), dtype=dtype, device=x0.device)
        for step in torch.unique(tt).tolist():
            sel = tt == step
            out[sel] = self.qbar(step).to(x0.device, dtype)[x0[sel]]
        return out

    def q_sample(self, x0: torch.Tensor, t: Step, generator: torch.Generator | None = None) -> torch.Tensor:
        probs = self.q_probs(x0, t)
        flat = probs.reshape(-1, self.vocab_size)
        if flat.shape[0] == 0:
            return torch.empty_like(x0, dtype=torch.int64)
        return torch.multinomial(flat, 1, generator=generator).reshape(x0.shape)

    def posterior_probs(self, x0_probs: torch.Tensor, x_t: torch.Tensor, t: Step, s: Step | None = None
                        ) -> torch.Tensor:
        x_t, p, tt, ss, out_dtype = self._posterior_args(x0_probs, x_t, t, s)
        p = p / p.sum(-1, keepdim=True)
        pairs = torch.stack([tt.reshape(-1), ss.reshape(-1)], -1)
        flat_p = p.reshape(-1, self.vocab_size)
        flat_x = x_t.reshape(-1)
        pieces = []
        index = []
        for ti, si in torch.unique(pairs, dim=0).tolist():
            sel = ((pairs[:, 0] == ti) & (pairs[:, 1] == si)).nonzero().squeeze(-1)
            dev = x_t.device
            fact1 = self.transition(si, ti).to(dev).T[flat_x[sel]]  # Q_{t|s}[:, x_t]
            fact2 = flat_p[sel] @ self.qbar(si).to(dev)
            pieces.append(_renormalise_or_keep(fact1 * fact2, flat_x[sel]))
            index.append(sel)
        if not pieces:
            return p.to(out_dtype)
        order = torch.cat(index)
        stacked = torch.cat(pieces)
        out = torch.empty_like(stacked).index_copy(0, order, stacked)
        return out.reshape(p.shape).to(out_dtype)

    def prior_probs(self, shape: tuple[int, ...] = (), device: DeviceLike = None) -> torch.Tensor:
        """Uniform for doubly stochastic processes; otherwise the mean row of ``Qbar_T``."""
        row = self.qbar(self.T).mean(0)
        return row.to(device).expand(tuple(shape) + (self.vocab_size,)).clone()


class GaussianBand(MatrixProcess):
    """D3PM discretised-Gaussian (ordinal) transitions, optionally truncated to a band.

    ``[Q_t]_{ij} = exp(-4 (i-j)² / ((V-1)² β_t)) / Σ_{n=-b}^{b} exp(-4 n² / ((V-1)² β_t))`` for
    ``0 < |i - j| <= b`` (``b = bandwidth``, default ``V - 1``) and ``1 - Σ_{j≠i}[Q_t]_{ij}`` on the
    diagonal; ``β_t = schedule.betas[t-1]`` (D3PM used linear betas 0.02 → 1). Meant for ordinal
    vocabularies (pixel values, bins) of V up to a few thousand.
    """

    def __init__(self, vocab_size: int, schedule: Schedule, bandwidth: int | None = None) -> None:
        self.vocab_size = _checks.positive_int("vocab_size", vocab_size, 2)
        if not isinstance(schedule, Schedule) or schedule.per_token:
            raise InputTypeError("schedule: expected a (T+1,) Schedule")
        self.schedule = schedule
        self.T = schedule.T
        b = vocab_size - 1 if bandwidth is None else _checks.positive_int("bandwidth", bandwidth)
        self.bandwidth = min(b, vocab_size - 1)
        self._betas = schedule.params.get("betas", schedule.betas).to(torch.float64)
        self._init_cache()

    def step_matrix(self, t: int) -> torch.Tensor:
        V, b = self.vocab_size, self.bandwidth
        beta = float(self._betas[t - 1])
        if beta <= 0:
            return torch.eye(V, dtype=torch.float64)
        n = torch.arange(-b, b + 1, dtype=torch.float64)
        vals = torch.softmax(-4.0 * n * n / ((V - 1) ** 2 * beta), 0)[b:]  # vals[k]: offset k
        i = torch.arange(V)
        dist = (i[:, None] - i[None, :]).abs()
        q = torch.where((dist > 0) & (dist <= b), vals[dist.clamp(max=b)], torch.zeros((), dtype=torch.float64))
        q = q + torch.diag(1.0 - q.sum(1))
        return q


class NearestNeighbor(MatrixProcess):
    """D3PM structured transitions over a symmetrised k-nearest-neighbour graph of token embeddings.

    ``G[i, j] = 1`` when ``j`` is among the ``k`` nearest (l2) embeddings of ``i``; ``A = (G + Gᵀ)/(2k)``;
    rate matrix ``R = A - diag(A 1)`` (zero row sums, symmetric). ``Q_t = expm(rate · β_t · R)``. All
    ``Q_t`` commute, so ``Qbar_t = expm(rate · B_t · R)`` and ``Q_{t|s} = expm(rate · (B_t - B_s) · R)``
    with ``B_t = β_1 + ... + β_t``, evaluated through one eigendecomposition of ``R``.
    """

    def __init__(self, embeddings: torch.Tensor, schedule: Schedule, k: int = 8, rate: float = 1.0) -> None:
        e = _checks.floating("embeddings", embeddings).detach().to(torch.float64).cpu()
        if e.ndim != 2 or e.shape[0] < 2:
            raise InputError(f"embeddings: expected (V, D) with V >= 2, got {tuple(e.shape)}")
        _checks.finite("embeddings", e)
        if not isinstance(schedule, Schedule) or schedule.per_token:
            raise InputTypeError("schedule: expected a (T+1,) Schedule")
        V = e.shape[0]
        self.k = _checks.positive_int("k", k)
        if self.k >= V:
            raise InputError(f"k: must be < vocab size {V}, got {k}")
        self.vocab_size = V
        self.schedule = schedule
        self.T = schedule.T
        self.rate = _checks.real("rate", rate, 0.0, lo_open=True)
        d = torch.cdist(e, e)
        d.fill_diagonal_(float("inf"))
        nn_idx = d.topk(self.k, largest=False).indices
        g = torch.zeros(V, V, dtype=torch.float64).scatter_(1, nn_idx, 1.0)
        a = (g + g.T) / (2 * self.k)
        self.rate_matrix = a - torch.diag(a.sum(1))
        self._evals, self._evecs = torch.linalg.eigh(self.rate_matrix)
        betas = schedule.params.get("betas", schedule.betas).to(torch.float64)
        self._cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(betas, 0)])
        self._init_cache()

    def _expm(self, c: float) -> torch.Tensor:
        m = (self._evecs * torch.exp(self.rate * c * self._evals)) @ self._evecs.T
        m = m.clamp_min(0.0)
        return m / m.sum(1, keepdim=True)

    def step_matrix(self, t: int) -> torch.Tensor:
        return self._expm(float(self._cum[t] - self._cum[t - 1]))

    def qbar(self, t: int) -> torch.Tensor:
        return self._expm(float(self._cum[t]))

    def transition(self, s: int, t: int) -> torch.Tensor:
        return self._expm(float(self._cum[t] - self._cum[s]))


class Dense(MatrixProcess):
    """User-given transition matrices: ``Q`` of shape ``(T, V, V)`` (``Q[t-1] = Q_t``) or ``(V, V)`` with
    ``T`` given (time-homogeneous). Rows must be probability vectors. Small V only."""

    def __init__(self, Q: torch.Tensor, T: int | None = None) -> None:
        q = _checks.floating("Q", Q).detach().to(torch.float64).cpu()
        if q.ndim == 2:
            if T is None:
                raise InputError("T: required when Q is a single (V, V) matrix")
            T = _checks.positive_int("T", T)
            q = q.unsqueeze(0).expand(T, -1, -1)
        elif q.ndim == 3:
            if T is not None and T != q.shape[0]:
                raise InputError(f"T: Q holds {q.shape[0]} steps, got T={T}")
            T = q.shape[0]
        else:
            raise InputError(f"Q: expected (T, V, V) or (V, V), got {tuple(q.shape)}")
        if q.shape[1] != q.shape[2] or q.shape[1] < 2:
            raise InputError(f"Q: matrices must be square with V >= 2, got {tuple(q.shape[1:])}")
        _checks.finite("Q", q)
        if bool((q < 0).any()) or not torch.allclose(q.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-6):
            raise InputError("Q: every row must be a probability vector (non-negative, summing to 1)")
        self.Q = q / q.sum(-1, keepdim=True)
        self.vocab_size = q.shape[1]
        self.T = T
        self._init_cache()

    def step_matrix(self, t: int) -> torch.Tensor:
        return self.Q[t - 1]


# ------------------------------------------------------------------------------------------------
# Losses (for any object of the DiscreteProcess protocol; closed forms for Absorbing)
# ------------------------------------------------------------------------------------------------
#: the training objectives of :func:`losses`
OBJECTIVES = ("hybrid", "mdlm")


def _tokens(process: DiscreteProcess, name: str, x: torch.Tensor) -> torch.Tensor:
    return _checks.token_ids(name, x, process.vocab_size).to(torch.int64)


def _dtype(x0_logits: torch.Tensor) -> torch.dtype:
    """The losses' precision: the logits', at least float32."""
    return torch.float64 if x0_logits.dtype == torch.float64 else torch.float32


def _kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ q (log q - log p) over the last dim, with 0·log 0 = 0."""
    logq = torch.log(q.clamp_min(1e-30))
    logp = torch.log(p.clamp_min(1e-30))
    return torch.where(q > 0, q * (logq - logp), torch.zeros_like(q)).sum(-1)


def _check_logits(process: DiscreteProcess, x0_logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    _checks.floating("x0_logits", x0_logits)
    if x0_logits.shape != like.shape + (process.vocab_size,):
        raise InputError(
            f"x0_logits: expected shape {tuple(like.shape) + (process.vocab_size,)}, got {tuple(x0_logits.shape)}"
        )
    _checks.no_nan("x0_logits", x0_logits)
    return x0_logits


def _nll(process: DiscreteProcess, x0: torch.Tensor, x0_logits: torch.Tensor) -> torch.Tensor:
    """:func:`x0_nll` on checked arguments."""
    logp = process.x0_log_probs(x0_logits.to(_dtype(x0_logits)))
    return -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)


def x0_nll(process: DiscreteProcess, x0: torch.Tensor, x0_logits: torch.Tensor) -> torch.Tensor:
    """``-log p̃_θ(x_0 | x_t)`` per token: the cross-entropy of the data under the network's x0
    distribution (``process.x0_log_probs``: SUBS for absorbing), ``(...)``, in the logits' precision (at
    least float32). The CE term of :func:`hybrid_loss`; :func:`mdlm_loss` weights it."""
    x0 = _tokens(process, "x0", x0)
    _check_logits(process, x0_logits, x0)
    return _nll(process, x0, x0_logits)


def kl_terms(process: DiscreteProcess, x0: torch.Tensor, x_t: torch.Tensor, t: Step, x0_logits: torch.Tensor
             ) -> torch.Tensor:
    """Per-token ``KL(q(x_{t-1} | x_t, x_0) ‖ p_θ(x_{t-1} | x_t))`` (D3PM L_{t-1}), ``t >= 1``: ``(...)``.

    ``p_θ`` is the posterior with ``x0_probs = softmax(x0_logits)`` (SUBS for absorbing). float32 or
    float64 (the logits' precision, at least float32); differentiable in ``x0_logits``.
    """
    if isinstance(process, Absorbing) and not process.per_token:
        # Closed form, O(1) per token instead of four (..., V) posteriors: under SUBS the absorbing KL is
        # (a_{t-1} - a_t)/(1 - a_t) · (-log p_θ(x_0 | x_t)) at masked positions and 0 elsewhere (MDLM eq. 10).
        return mdlm_loss(process, x0, x_t, t, x0_logits, reduction="none")
    x0 = _tokens(process, "x0", x0)
    x_t = _tokens(process, "x_t", x_t)
    _check_logits(process, x0_logits, x_t)
    dtype = _dtype(x0_logits)
    q = process.posterior_probs(F.one_hot(x0, process.vocab_size).to(dtype), x_t, t)
    p = process.posterior_probs(process.x0_log_probs(x0_logits.to(dtype)).exp(), x_t, t)
    return _kl(q, p)


def decoder_nll(process: DiscreteProcess, x0: torch.Tensor, x_1: torch.Tensor, x0_logits: torch.Tensor,
                direct: bool = False) -> torch.Tensor:
    """``-log p_θ(x_0 | x_1)`` per token (D3PM L_0): ``(...)``.

    By default ``p_θ(x_0 | x_1)`` is the posterior with ``s = 0`` (it knows ``x_1``: an unmasked absorbing
    token costs nothing); ``direct=True`` uses ``softmax(x0_logits)`` itself (:func:`x0_nll`), as D3PM's
    code does.
    """
    x0 = _tokens(process, "x0", x0)
    x_1 = _tokens(process, "x_1", x_1)
    _check_logits(process, x0_logits, x_1)
    if direct:
        return _nll(process, x0, x0_logits)
    logp = process.x0_log_probs(x0_logits.to(_dtype(x0_logits)))
    logp = torch.log(process.posterior_probs(logp.exp(), x_1, 1, 0).clamp_min(1e-30))
    return -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1)


def vlb_terms(process: DiscreteProcess, x0: torch.Tensor, x_t: torch.Tensor, t: Step, x0_logits: torch.Tensor
              ) -> torch.Tensor:
    """Per-token VLB term at step ``t``: the KL :func:`kl_terms` where ``t >= 2`` and the decoder NLL
    :func:`decoder_nll` where ``t == 1``. Sum over tokens and multiply by ``T`` (uniform ``t``) for an
    unbiased estimate of the VLB minus the prior term."""
    x_t = _tokens(process, "x_t", x_t)
    tt = _checks.expand_leading("t", _checks.steps("t", t, process.T, 1, x_t.device), x_t.shape)
    kl = kl_terms(process, x0, x_t, tt, x0_logits)
    if isinstance(process, Absorbing) and not process.per_token:
        return kl  # at t = 1 the closed form's weight is 1: it is the decoder NLL -log p_θ(x_0 | x_1) already
    if not bool((tt == 1).any()):
        return kl
    nll = decoder_nll(process, x0, x_t, x0_logits)
    return torch.where(tt == 1, nll, kl)


def prior_kl(process: DiscreteProcess, x0: torch.Tensor) -> torch.Tensor:
    """``KL(q(x_T | x_0) ‖ p(x_T))`` per token (D3PM L_T); ~0 for a well-designed schedule."""
    x0 = _tokens(process, "x0", x0)
    q = process.q_probs(x0, process.T)
    return _kl(q, process.prior_probs(x0.shape, x0.device))


def _check_mdlm(process: object) -> None:
    if not isinstance(process, Absorbing) or process.per_token:
        raise InputTypeError("process: mdlm_loss needs an Absorbing process with a (T+1,) schedule")


def _mdlm_terms(process: Absorbing, x0: torch.Tensor, x_t: torch.Tensor, t: Step, x0_logits: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: MDLM's loss and the x0 NLL it weights."""
    _check_mdlm(process)
    x0 = _tokens(process, "x0", x0)
    x_t = _tokens(process, "x_t", x_t)
    _check_logits(process, x0_logits, x_t)
    tt = process._t(_checks.steps("t", t, process.T, 1, x_t.device), x_t.shape, x_t.device)
    a_t, a_s = process._ab(tt), process._ab(tt - 1)
    dtype = _dtype(x0_logits)
    weight = ((a_s - a_t) / (1.0 - a_t).clamp_min(1e-12)).to(dtype)
    nll = _nll(process, x0, x0_logits)
    return torch.where(x_t == process.mask_id, weight * nll, torch.zeros_like(nll)), nll


def _hybrid_terms(process: DiscreteProcess, x0: torch.Tensor, x_t: torch.Tensor, t: Step, x0_logits: torch.Tensor,
                  lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the hybrid loss ``vlb + λ·CE`` and its CE term."""
    x0 = _tokens(process, "x0", x0)
    _check_logits(process, x0_logits, _tokens(process, "x_t", x_t))
    ce = _nll(process, x0, x0_logits)
    return vlb_terms(process, x0, x_t, t, x0_logits) + lam * ce, ce


def losses(process: DiscreteProcess, x0: torch.Tensor, x_t: torch.Tensor, t: Step, x0_logits: torch.Tensor, *,
           objective: str = "hybrid", lam: float = 0.01, reduction: str = "mean",
           weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The training objective of a batch and the terms a training loop needs, as a dict of tensors.

    ``objective``: "hybrid" (:func:`hybrid_loss`, D3PM's ``L_vlb + λ·CE``, any process) or "mdlm"
    (:func:`mdlm_loss`, absorbing processes with a ``(T+1,)`` schedule). Entries:

    * ``<objective>``: the objective, reduced by ``reduction``;
    * ``ce``: :func:`x0_nll` (computed once, shared with the objective), reduced by ``reduction``; it
      grows with the noise where the VLB terms do not, which an adaptive schedule fits to;
    * ``loss``: what to minimise: the objective again, or with ``weights`` the scalar
      ``mean_b(weights_b · L_b)`` with ``L_b`` the objective's mean over the tokens of sequence ``b``;
    * ``per_sequence`` (with ``weights``): the ``L_b``, what a loss-aware timestep sampler records.

    ``reduction``: "mean" | "sum" over every token, "none" (per token ``(...)``) or "sequence" (the mean
    over each sequence's tokens: ``(B,)`` for tokens ``(B, L)``). ``weights``: importance weights, one per
    sequence (``x0.shape[:-1]``), e.g. a timestep sampler's (:mod:`fastdiff.timesteps`).
    """
    _checks.choice("objective", objective, OBJECTIVES)
    check_reduction(reduction)
    lam = _checks.real("lam", lam, 0.0)
    if objective == "mdlm":
        per_token, ce = _mdlm_terms(process, x0, x_t, t, x0_logits)
    else:
        per_token, ce = _hybrid_terms(process, x0, x_t, t, x0_logits, lam)
    out = {objective: reduce(per_token, reduction), "ce": reduce(ce, reduction)}
    if weights is None:
        out["loss"] = out[objective]
        return out
    check_weights(weights, per_token.shape)
    per_seq = out[objective] if reduction == "sequence" else reduce(per_token, "sequence")
    out["loss"] = weighted_mean(per_seq, weights)
    out["per_sequence"] = per_seq
    return out


def hybrid_loss(process: DiscreteProcess, x0: torch.Tensor, x_t: torch.Tensor, t: Step, x0_logits: torch.Tensor,
                lam: float = 0.01, reduction: str = "mean", *, weights: torch.Tensor | None = None) -> torch.Tensor:
    """D3PM hybrid loss ``L_vlb + λ · CE``: :func:`vlb_terms` plus ``λ ·`` :func:`x0_nll`.

    ``reduction``: "mean" | "sum" over tokens, "none" for the per-token ``(...)`` tensor, or "sequence"
    (per sequence, ``x0.shape[:-1]``); ``weights`` (one per sequence): the importance-weighted scalar
    ``mean_b(weights_b · L_b)`` instead (see :func:`losses`).
    """
    return losses(process, x0, x_t, t, x0_logits, objective="hybrid", lam=lam, reduction=reduction,
                  weights=weights)["loss"]


def mdlm_loss(process: Absorbing, x0: torch.Tensor, x_t: torch.Tensor, t: Step, x0_logits: torch.Tensor,
              reduction: str = "mean", *,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """MDLM's discrete-time SUBS objective (Sahoo et al. 2024, eq. 10) for absorbing diffusion.

    Per token: ``(a_{t-1} - a_t)/(1 - a_t) · (-log p_θ(x_0 | x_t))`` at masked positions, 0 elsewhere —
    exactly the per-token KL term of the absorbing posterior under SUBS; summed over ``t`` it is the
    (negative) ELBO. Scalar schedules only. ``reduction`` and ``weights`` as in :func:`hybrid_loss`.
    """
    _check_mdlm(process)
    if weights is None:
        check_reduction(reduction)
        return reduce(_mdlm_terms(process, x0, x_t, t, x0_logits)[0], reduction)
    return losses(process, x0, x_t, t, x0_logits, objective="mdlm", reduction=reduction, weights=weights)["loss"]
