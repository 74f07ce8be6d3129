"""Structural types that several layers share: what the ops, the sampler and the trainer need from a
discrete diffusion process.

This module sits below the ops (it imports nothing of fastdiff), so :mod:`fastdiff.ops` can name the
type without importing :mod:`fastdiff.discrete`, which re-exports it. Any object with these members is a
discrete process; the classes of :mod:`fastdiff.discrete` are implementations, not the definition.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["DeviceLike", "DiscreteProcess", "MatrixDiscreteProcess", "Step"]

#: a diffusion step: an int, or an integer tensor whose shape is a leading part of the token shape
Step = int | torch.Tensor
#: where a tensor goes: a device, its name (``"cpu"``, ``"cuda:1"``), or None for the default
DeviceLike = str | torch.device | None


@runtime_checkable
class DiscreteProcess(Protocol):
    """A Markov chain over ``vocab_size`` categories with ``T`` steps (see :mod:`fastdiff.discrete`).

    Token tensors are ``(...)`` integers, distributions ``(..., V)``; a step ``t`` is an int or an integer
    tensor whose shape is a leading part of the token shape.

    Attributes
    ----------
    kind : how the kernel backends lower the posterior (:mod:`fastdiff.ops._plan`): ``"absorbing"``
        (reads ``mask_id`` and ``schedule.alpha_bar``), ``"uniform"`` (reads ``schedule.alpha_bar``) or
        ``"matrix"`` (reads ``qbar`` and ``transition``, see :class:`MatrixDiscreteProcess`). A process
        of another kind runs on the reference ops (``backend="reference"``), which only call the methods.
    vocab_size : ``V``.
    T : the number of steps; ``t = 0`` is data and ``t = T`` noise.
    mask_id : the absorbing token of kind ``"absorbing"`` (SUBS: the x0 distribution ignores its logit);
        ``None`` for every other kind.
    schedule : the :class:`fastdiff.schedules.Schedule` whose ``alpha_bar`` the closed forms read, or
        ``None`` for a process given by its matrices alone (:class:`fastdiff.discrete.Dense`).

    Methods (what the ops, the sampler and the trainer call)
    -------
    ``x0_log_probs(logits, temperature=1.0) -> (..., V)``: the x0 distribution a network's logits give.
    ``q_probs(x0, t, dtype=float64) -> (..., V)``: ``q(x_t | x_0) = Qbar_t[x0]``.
    ``q_sample(x0, t, generator=None) -> (...)`` int64: a draw of ``x_t`` (training).
    ``posterior_probs(x0_probs, x_t, t, s=None) -> (..., V)``: ``p(x_s | x_t)`` (D3PM eq. 4 with a skip,
    ``s`` defaults to ``t - 1``), differentiable in ``x0_probs``.
    ``prior_probs(shape=(), device=None) -> shape + (V,)`` float64: ``p(x_T)``.
    """

    kind: str
    vocab_size: int
    T: int
    mask_id: int | None
    schedule: Any

    def x0_log_probs(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor: ...

    def q_probs(self, x0: torch.Tensor, t: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor: ...

    def q_sample(self, x0: torch.Tensor, t: Any, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def posterior_probs(self, x0_probs: torch.Tensor, x_t: torch.Tensor, t: Any, s: Any = None) -> torch.Tensor: ...

    def prior_probs(self, shape: tuple[int, ...] = (), device: Any = None) -> torch.Tensor: ...


@runtime_checkable
class MatrixDiscreteProcess(DiscreteProcess, Protocol):
    """A discrete process of kind ``"matrix"``: the kernels read its ``(V, V)`` float64 matrices.

    ``qbar(t)``: ``Qbar_t = Q_1 ⋯ Q_t`` (``Qbar_0 = I``); ``transition(s, t)``: ``Q_{t|s} = Q_{s+1} ⋯ Q_t``.
    """

    def qbar(self, t: int) -> torch.Tensor: ...

    def transition(self, s: int, t: int) -> torch.Tensor: ...
