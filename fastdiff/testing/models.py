"""A tiny randomly initialised denoiser: the model of the sampling tests, the sampling benchmarks and
``fastdiff demo``."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["TinyDenoiser"]


class TinyDenoiser(nn.Module):
    """A 2-layer transformer encoder with a sinusoidal step embedding: tokens or vectors in, x0 out.

    Discrete: ``forward(x_t: (B, L) int64, t: (B,)) -> (B, L, V)`` logits. Continuous (``dim`` given):
    ``forward(x_t: (B, L, dim), t) -> (B, L, dim)``, an x0 estimate.
    """

    def __init__(self, vocab_size: int, width: int = 64, layers: int = 2, dim: int | None = None,
                 max_len: int = 512) -> None:
        super().__init__()
        self.width = width
        self.inp = nn.Linear(dim, width) if dim else nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, dim if dim else vocab_size)

    def step_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        ang = t.float()[:, None] * freqs[None]
        return self.time(torch.cat([ang.sin(), ang.cos()], -1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x_t) + self.pos[: x_t.shape[1]] + self.step_embedding(t)[:, None]
        return self.out(self.body(h))
