"""Reductions of per-token losses, shared by the discrete and the continuous losses.

``reduction``: ``"mean"`` / ``"sum"`` over every token, ``"none"`` (per token, as computed) or
``"sequence"`` (the mean over each sequence's tokens, i.e. the last dimension of the token shape:
``(B,)`` for ``(B, L)`` tokens). ``weights``: importance weights, one per sequence, of a timestep
sampler (:mod:`fastdiff.timesteps`): ``mean_b(weights_b · L_b)``, ``L_b`` the per-sequence loss, is an
unbiased estimate of the mean loss under uniform ``t``.
"""

from __future__ import annotations

import torch

from . import _checks
from .errors import InputError

__all__ = ["REDUCTIONS", "check_reduction", "check_weights", "reduce", "weighted_mean"]

REDUCTIONS = ("mean", "sum", "none", "sequence")


def check_reduction(reduction: object) -> str:
    return _checks.choice("reduction", reduction, REDUCTIONS)


def reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """``x`` per token ``(..., L)`` reduced: a scalar ("mean", "sum"), ``(...)`` ("sequence") or ``x``."""
    if reduction == "none":
        return x
    if reduction == "sequence":
        return x.mean(-1)
    return x.sum() if reduction == "sum" else x.mean()


def check_weights(weights: object, tokens: torch.Size) -> torch.Tensor:
    """Floating weights of shape ``tokens[:-1]`` (one per sequence of the token shape ``tokens``)."""
    _checks.floating("weights", weights)
    if len(tokens) < 1 or weights.shape != tokens[:-1]:
        raise InputError(f"weights: expected one per sequence, shape {tuple(tokens[:-1])} for tokens of shape "
                         f"{tuple(tokens)}, got {tuple(weights.shape)}")
    return weights


def weighted_mean(per_sequence: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_b(weights_b · per_sequence_b)``: the importance-weighted estimate of the uniform-t mean."""
    return (weights * per_sequence).mean()
