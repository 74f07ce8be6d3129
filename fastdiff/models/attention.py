"""Attention with Transformer-XL relative positions, runnable by flash-attn or PyTorch SDPA.

Transformer-XL (Dai et al. 2019, §3.3) scores a query ``i`` against a key ``j`` as::

    score(i, j) = (q_i + u)·k_j + (q_i + v)·W_r R_{i-j}

with ``R_Δ = [sin(Δ·ω), cos(Δ·ω)]`` a sinusoid of the offset and ``u``, ``v`` learned per head. Because
``sin((i-j)ω) = sin(iω)cos(jω) - cos(iω)sin(jω)`` and ``cos((i-j)ω) = cos(iω)cos(jω) + sin(iω)sin(jω)``,
the position term is a dot product of a query-side vector built from ``a_i = W_rᵀ(q_i + v)`` and
``sin/cos(iω)`` with the key-side vector ``[cos(jω), sin(jω)]``. Appending those to ``q`` and ``k`` gives
one ordinary attention call with head dim ``d + 2F`` and an explicit ``scale``, so fused kernels
(flash-attn, SDPA's efficient kernels) run the exact Transformer-XL score without an ``L × L`` bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from ..errors import InputError

__all__ = ["CrossAttention", "RelativeSelfAttention", "attention", "flash_attn_usable", "position_features"]


def flash_attn_usable(q: torch.Tensor, key_padding_mask: torch.Tensor | None) -> bool:
    """flash-attn runs when it is installed, the tensors are CUDA fp16/bf16 and there is no padding mask."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or key_padding_mask is not None:
        return False
    if q.shape[-1] > 256:
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
              key_padding_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``softmax(scale·q kᵀ [+ mask]) v`` for ``q, k: (B, H, L, d)``, ``v: (B, H, Lk, dv)``.

    ``key_padding_mask: (B, Lk)`` bool, True = a real key. ``backend``: "auto" (flash-attn when
    :func:`flash_attn_usable`, else SDPA), "sdpa", "flash" (raises when it cannot run).
    """
    if backend not in ("auto", "sdpa", "flash"):
        raise InputError(f"backend: expected 'auto', 'sdpa' or 'flash', got {backend!r}")
    use_flash = backend == "flash" or (backend == "auto" and flash_attn_usable(q, key_padding_mask))
    if use_flash:
        if not flash_attn_usable(q, key_padding_mask):
            raise RuntimeError("backend: flash-attn needs the flash_attn package, CUDA fp16/bf16 tensors and no "
                               "padding mask (pip install flash-attn)")
        from flash_attn import flash_attn_func

        d = q.shape[-1]
        vv = F.pad(v, (0, d - v.shape[-1])) if v.shape[-1] < d else v
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), vv.transpose(1, 2), softmax_scale=scale,
                              causal=causal)
        return out.transpose(1, 2)[..., : v.shape[-1]]
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
        if causal:
            Lq, Lk = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
            causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def position_features(L: int, n_freq: int, device: torch.device | str | None, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sin(i·ω_k), cos(i·ω_k)`` for ``i < L``: two ``(L, n_freq)`` tensors, ``ω_k = 10000^(-k/n_freq)``.

    The angles are computed in float32 (float64 for a float64 ``dtype``) and cast to ``dtype``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(10000.0) * torch.arange(n_freq, device=device, dtype=work) / n_freq)
    ang = torch.arange(L, device=device, dtype=work)[:, None] * freqs[None]
    return ang.sin().to(dtype), ang.cos().to(dtype)


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (see the module docstring).

    ``forward(x: (B, L, width), key_padding_mask: (B, L) bool | None) -> (B, L, width)``.
    ``rel_freqs`` = F, the number of sinusoid frequencies (the position vector has 2F entries).
    """

    def __init__(self, width: int, heads: int, rel_freqs: int = 32, causal: bool = False, backend: str = "auto"
                 ) -> None:
        super().__init__()
        if width % heads:
            raise InputError(f"width: {width} is not divisible by heads={heads}")
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.rel_freqs, self.causal, self.backend = rel_freqs, causal, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.v = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.w_r = nn.Parameter(torch.randn(heads, self.head_dim, 2 * rel_freqs) * self.head_dim**-0.5)

    def extended_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q', k')`` with ``q'·k'_j = (q_i+u)·k_j + (q_i+v)·W_r R_{i-j}``; ``q, k: (B, H, L, d)``."""
        B, H, L, _ = q.shape
        F_ = self.rel_freqs
        sin, cos = position_features(L, F_, q.device, q.dtype)  # (L, F)
        a = torch.einsum("bhld,hdf->bhlf", q + self.v[None, :, None, :].to(q.dtype), self.w_r.to(q.dtype))
        a_s, a_c = a[..., :F_], a[..., F_:]  # coefficients of sin(Δω) and cos(Δω)
        q_cos = a_s * sin + a_c * cos  # multiplies cos(jω)
        q_sin = a_c * sin - a_s * cos  # multiplies sin(jω)
        qx = torch.cat([q + self.u[None, :, None, :].to(q.dtype), q_cos, q_sin], -1)
        kx = torch.cat([k, cos.expand(B, H, L, F_), sin.expand(B, H, L, F_)], -1)
        return qx, kx

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        qx, kx = self.extended_qk(q, k)
        o = attention(qx, kx, v, scale=self.head_dim**-0.5, causal=self.causal, key_padding_mask=key_padding_mask,
                      backend=self.backend)
        return self.out(o.transpose(1, 2).reshape(B, L, self.width))


class CrossAttention(nn.Module):
    """Multi-head attention from ``x: (B, L, width)`` to ``memory: (B, Ls, width)`` (no positions: the
    memory comes from an encoder that has them)."""

    def __init__(self, width: int, heads: int, backend: str = "auto") -> None:
        super().__init__()
        if width % heads:
            raise InputError(f"width: {width} is not divisible by heads={heads}")
        self.width, self.heads, self.head_dim, self.backend = width, heads, width // heads, backend
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(memory).view(B, memory.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = attention(q, k, v, scale=self.head_dim**-0.5, key_padding_mask=memory_mask, backend=self.backend)
        return self.out(o.transpose(1, 2).reshape(B, L, self.width))
