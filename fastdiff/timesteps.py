"""Training-time step samplers: uniform, and loss-aware importance sampling.

Both return ``(t, weights)``: steps in ``[1, T]`` and importance weights ``1 / (T · p(t))`` such that
``mean(weights · loss(t))`` is an unbiased estimate of the uniform-``t`` average loss.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _checks
from .errors import InputError

__all__ = ["UniformSampler", "LossAwareSampler", "create"]


class UniformSampler:
    """``t ~ Uniform{1..T}``, weights all 1."""

    def __init__(self, T: int) -> None:
        self.T = _checks.positive_int("T", T)

    def probs(self) -> torch.Tensor:
        return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``t: (B,)`` int64 in [1, T] and ``weights: (B,)`` float32."""
        _checks.positive_int("batch_size", batch_size)
        p = self.probs()
        idx = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = 1.0 / (self.T * p[idx])
        return (idx + 1).to(device), w.to(torch.float32).to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling ignores losses (kept for a common interface)."""


class LossAwareSampler(UniformSampler):
    """Importance sampling by the loss history (Nichol & Dhariwal 2021, "loss-second-moment" resampler).

    Keeps the last ``history`` losses of every step; once each step has that many, samples
    ``p(t) ∝ sqrt(E[L_t²])``, mixed with ``uniform_prob`` of the uniform distribution so every step
    keeps being visited. Until then it samples uniformly.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(T)
        self.history = _checks.positive_int("history", history)
        self.uniform_prob = _checks.real("uniform_prob", uniform_prob, 0.0, 1.0)
        self._losses = torch.zeros(self.T, self.history, dtype=torch.float64)
        self._count = torch.zeros(self.T, dtype=torch.int64)

    @property
    def warmed_up(self) -> bool:
        return bool((self._count >= self.history).all())

    def probs(self) -> torch.Tensor:
        if not self.warmed_up:
            return super().probs()
        w = torch.sqrt((self._losses**2).mean(-1))
        if not bool(w.sum() > 0):
            return super().probs()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example ``losses`` at steps ``t`` (both ``(B,)``)."""
        t, losses = _checks.step_losses(t, losses, self.T)
        for step, loss in zip(t.tolist(), losses.tolist()):
            i = step - 1
            if self._count[i] < self.history:
                self._losses[i, self._count[i]] = loss
                self._count[i] += 1
            else:
                self._losses[i] = torch.roll(self._losses[i], -1)
                self._losses[i, -1] = loss


def create(name: str, T: int, **kw: Any) -> UniformSampler:
    """``"uniform"`` or ``"loss-aware"``."""
    if name == "uniform":
        return UniformSampler(T)
    if name in ("loss-aware", "loss_aware", "importance"):
        return LossAwareSampler(T, **kw)
    raise InputError(f"name: expected 'uniform' or 'loss-aware', got {name!r}")
