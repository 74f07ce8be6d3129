"""Exponential moving average of a model's parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .. import _checks
from ..errors import InputError

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a model's parameters: after each update
    ``ema ← decay·ema + (1 - decay)·θ`` (float32 copies; starts at the initial parameters)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = _checks.real("decay", decay, 0.0, 1.0, hi_open=True)
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Weights with the keys of ``model.state_dict()``: EMA values for parameters (tied aliases
        included), the model's current buffers."""
        by_id = {id(p): n for n, p in model.named_parameters()}
        out = {}
        for k, v in model.state_dict(keep_vars=True).items():
            name = by_id.get(id(v))
            out[k] = self.shadow[name].to(v.dtype) if name is not None else v.detach()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, shadow in self.shadow.items():
            if n not in tensors:
                raise InputError(f"ema: the saved EMA weights lack {n!r}")
            full = tensors[n]
            if hasattr(shadow, "device_mesh"):  # an FSDP shard: keep this rank's part of the full tensor
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(shadow.dtype).to(shadow.device), shadow.device_mesh, shadow.placements)
            shadow.copy_(full)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n])

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """A context in which ``model`` holds the EMA weights; its own come back on exit."""
        raw = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(raw[n])
