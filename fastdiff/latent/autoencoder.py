"""The learned compression of LD4LG (Lovelace et al. 2023, "Latent Diffusion for Language Generation").

* :class:`Compressor`: a Perceiver resampler (Jaegle et al. 2021; the Flamingo form, Alayrac et al. 2022):
  ``n_latents`` learned queries cross-attend to the encoder states (and to themselves), a few layers, then
  a projection to ``d_latent`` and a LayerNorm without affine parameters, so that every latent vector has
  zero mean and unit variance over its features (the normalised latent space the diffusion runs in).
* :class:`Reconstructor`: ``length`` learned position queries cross-attend to the latents, a few layers,
  then a projection back to the encoder-state width: states the frozen decoder reads.
* :class:`LatentAutoencoder`: the two, with LD4LG's objective (the frozen decoder's teacher-forced
  cross-entropy of the original tokens given the reconstructed states, :meth:`LatentAutoencoder.loss`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _checks
from ..errors import InputError

__all__ = ["Compressor", "LatentAutoencoder", "Reconstructor"]


class _CrossBlock(nn.Module):
    """Pre-norm: queries attend to ``[memory; queries]`` (keys masked by ``memory_mask``), then an MLP."""

    def __init__(self, width: int, heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_m = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_f = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, ff_mult * width), nn.GELU(), nn.Linear(ff_mult * width, width))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        hq = self.norm_q(q)
        kv = torch.cat([self.norm_m(memory), hq], 1)
        pad = None
        if memory_mask is not None:  # key_padding_mask: True = ignore; the queries are always visible
            pad = torch.cat([~memory_mask, torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)], 1)
        q = q + self.attn(hq, kv, kv, key_padding_mask=pad, need_weights=False)[0]
        return q + self.ff(self.norm_f(q))


def _check_dims(**dims: int) -> None:
    for name, v in dims.items():
        _checks.positive_int(name, v)
    if dims["width"] % dims["heads"]:
        raise InputError(f"width: {dims['width']} is not divisible by heads={dims['heads']}")


class Compressor(nn.Module):
    """Encoder states ``(B, L, d_model)`` (+ mask) -> latents ``(B, n_latents, d_latent)`` (see the module
    docstring)."""

    def __init__(self, d_model: int, n_latents: int = 16, d_latent: int = 64, width: int = 128, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        _check_dims(d_model=d_model, n_latents=n_latents, d_latent=d_latent, width=width, layers=layers, heads=heads)
        self.d_model, self.n_latents, self.d_latent = d_model, n_latents, d_latent
        self.queries = nn.Parameter(torch.randn(n_latents, width) * width**-0.5)
        self.in_proj = nn.Linear(d_model, width)
        self.blocks = nn.ModuleList(_CrossBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, d_latent)
        self.out_norm = nn.LayerNorm(d_latent, elementwise_affine=False)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(states, torch.Tensor) or states.ndim != 3 or states.shape[-1] != self.d_model:
            got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise InputError(f"states: expected (B, L, {self.d_model}) encoder states, got {got}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != states.shape[:2]:
                raise InputError(f"mask: expected a {tuple(states.shape[:2])} bool tensor (True = real token)")
            mask = mask.to(torch.bool)
            if not bool(mask.any(1).all()):
                raise InputError("mask: every row needs at least one real token")
        m = self.in_proj(states)
        q = self.queries.expand(states.shape[0], -1, -1)
        for blk in self.blocks:
            q = blk(q, m, mask)
        return self.out_norm(self.out_proj(self.norm(q)))


class Reconstructor(nn.Module):
    """Latents ``(B, n_latents, d_latent)`` -> encoder states ``(B, length, d_model)`` (see the module
    docstring)."""

    def __init__(self, d_model: int, length: int, d_latent: int = 64, width: int = 128, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        _check_dims(d_model=d_model, length=length, d_latent=d_latent, width=width, layers=layers, heads=heads)
        self.d_model, self.length, self.d_latent = d_model, length, d_latent
        self.queries = nn.Parameter(torch.randn(length, width) * width**-0.5)
        self.in_proj = nn.Linear(d_latent, width)
        self.blocks = nn.ModuleList(_CrossBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, d_model)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 3 or latents.shape[-1] != self.d_latent:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InputError(f"latents: expected (B, n, {self.d_latent}) latents, got {got}")
        m = self.in_proj(latents)
        q = self.queries.expand(latents.shape[0], -1, -1)
        for blk in self.blocks:
            q = blk(q, m, None)
        return self.out_proj(self.norm(q))


class LatentAutoencoder(nn.Module):
    """:class:`Compressor` + :class:`Reconstructor` over a PLM of width ``d_model`` and sequences of
    ``length`` tokens. ``config`` holds the constructor's arguments (saved in checkpoints)."""

    def __init__(self, d_model: int, length: int, n_latents: int = 16, d_latent: int = 64, width: int = 128,
                 layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(d_model=d_model, length=length, n_latents=n_latents, d_latent=d_latent,
                                           width=width, layers=layers, heads=heads)
        self.compressor = Compressor(d_model, n_latents, d_latent, width, layers, heads)
        self.reconstructor = Reconstructor(d_model, length, d_latent, width, layers, heads)

    @property
    def length(self) -> int:
        return self.reconstructor.length

    def encode(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.compressor(states, mask)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.reconstructor(latents)

    def loss(self, plm: Any, ids: torch.Tensor, mask: torch.Tensor | None = None, noise: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """LD4LG's reconstruction objective: ``ids`` (``(B, length)``) through the frozen encoder, the
        compressor, Gaussian noise of std ``noise`` on the latents (robustness to the diffusion's
        imperfect samples), the reconstructor, and the frozen decoder's cross-entropy of ``ids``."""
        noise = _checks.real("noise", noise, 0.0)
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] != self.length:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise InputError(f"ids: expected (B, {self.length}) token ids, got {got}")
        states = plm.encode(ids, mask)
        z = self.encode(states, mask)
        if noise:
            z = z + noise * torch.randn(z.shape, generator=generator).to(z.device)
        return plm.reconstruction_loss(self.decode(z), ids)
