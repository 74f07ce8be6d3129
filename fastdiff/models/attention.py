"""Attention with Transformer-XL relative positions, runnable by flash-attn or PyTorch SDPA.

Transformer-XL (Dai et al. 2019, §3.3) scores a query ``i`` against a key ``j`` as::

    score(i, j) = (q_i + u)·k_j + (q_i + v)·W_r R_{i-j}

with ``R_Δ = [sin(Δ·ω), cos(Δ·ω)]`` a sinusoid of the offset and ``u``, ``v`` learned per head. Because
``sin((i-j)ω) = sin(iω)cos(jω) - cos(iω)sin(jω)`` and ``cos((i-j)ω) = cos(iω)cos(jω) + sin(iω)sin(jω)``,
the position term is a dot product of a query-side vector built from ``a_i = W_rᵀ(q_i + v)`` and
``sin/cos(iω)`` with the key-side vector ``[cos(jω), sin(jω)]``. Appending those to ``q`` and ``k`` gives
one ordinary attention call with head dim ``d + 2F`` and an explicit ``scale``, so fused kernels
(flash-attn, SDPA's efficient kernels) run the exact Transformer-XL score without an ``L × L`` bias.

Queries and keys may sit at any absolute positions (``q_pos``, ``k_pos``): the score depends on ``i - j``
only, so a window of queries at ``start..start+n-1`` scored against cached keys at their own positions
gets the scores the full sequence's forward gives them (the KV caches of
:class:`fastdiff.models.sed.SEDDenoiser`), and BD3-LM's training sequence (Arriola et al. 2025), whose
clean copy repeats the noisy half's positions, is one call.
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
              key_padding_mask: torch.Tensor | None = None, backend: str = "auto",
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(scale·q kᵀ [+ mask]) v`` for ``q, k: (B, H, L, d)``, ``v: (B, H, Lk, dv)``.

    ``key_padding_mask: (B, Lk)`` bool, True = a real key. ``attn_mask: (B or 1, Lq, Lk)`` bool, True = the
    query may attend to the key (a block-causal pattern), combined with the padding mask. ``backend``:
    "auto" (flash-attn when :func:`flash_attn_usable` and there is no ``attn_mask``, else SDPA), "sdpa",
    "flash" (raises when it cannot run).
    """
    if backend not in ("auto", "sdpa", "flash"):
        raise InputError(f"backend: expected 'auto', 'sdpa' or 'flash', got {backend!r}")
    usable = attn_mask is None and flash_attn_usable(q, key_padding_mask)
    use_flash = backend == "flash" or (backend == "auto" and usable)
    if use_flash:
        if not usable:
            raise RuntimeError("backend: flash-attn needs the flash_attn package, CUDA fp16/bf16 tensors and no "
                               "padding or block mask (pip install flash-attn)")
        from flash_attn import flash_attn_func

        d = q.shape[-1]
        vv = F.pad(v, (0, d - v.shape[-1])) if v.shape[-1] < d else v
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), vv.transpose(1, 2), softmax_scale=scale,
                              causal=causal)
        return out.transpose(1, 2)[..., : v.shape[-1]]
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
    if attn_mask is not None:
        am = attn_mask.to(torch.bool)[:, None]
        mask = am if mask is None else mask & am
    if mask is not None and causal:
        Lq, Lk = q.shape[-2], k.shape[-2]
        mask = mask & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def position_features(L: int, n_freq: int, device: torch.device | str | None, dtype: torch.dtype,
                      positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sin(i·ω_k), cos(i·ω_k)`` for ``i < L``: two ``(L, n_freq)`` tensors, ``ω_k = 10000^(-k/n_freq)``;
    for ``positions`` (``(L,)`` integers) ``i`` runs over them instead of ``0..L-1``.

    The angles are computed in float32 (float64 for a float64 ``dtype``) and cast to ``dtype``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(10000.0) * torch.arange(n_freq, device=device, dtype=work) / n_freq)
    pos = torch.arange(L, device=device, dtype=work) if positions is None else positions.to(device, work)
    ang = pos[:, None] * freqs[None]
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

    def extended_qk(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor | None = None,
                    k_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q', k')`` with ``q'_i·k'_j = (q_i+u)·k_j + (q_i+v)·W_r R_{p_i-p_j}``; ``q: (B, H, Lq, d)``,
        ``k: (B, H, Lk, d)``; ``q_pos: (Lq,)`` / ``k_pos: (Lk,)`` the absolute positions ``p`` (default
        ``0..L-1``)."""
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        F_ = self.rel_freqs
        if q_pos is None and k_pos is None and Lq == Lk:
            sin, cos = position_features(Lq, F_, q.device, q.dtype)  # (L, F)
            k_sin, k_cos = sin, cos
        else:
            sin, cos = position_features(Lq, F_, q.device, q.dtype, q_pos)
            k_sin, k_cos = position_features(Lk, F_, q.device, q.dtype, k_pos)
        a = torch.einsum("bhld,hdf->bhlf", q + self.v[None, :, None, :].to(q.dtype), self.w_r.to(q.dtype))
        a_s, a_c = a[..., :F_], a[..., F_:]  # coefficients of sin(Δω) and cos(Δω)
        q_cos = a_s * sin + a_c * cos  # multiplies cos(jω)
        q_sin = a_c * sin - a_s * cos  # multiplies sin(jω)
        qx = torch.cat([q + self.u[None, :, None, :].to(q.dtype), q_cos, q_sin], -1)
        kx = torch.cat([k, k_cos.expand(B, H, Lk, F_), k_sin.expand(B, H, Lk, F_)], -1)
        return qx, kx

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v``, each ``(B, H, L, head_dim)``, of ``x: (B, L, width)`` (``k`` without positions)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *,
                attn_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                context: tuple[torch.Tensor, torch.Tensor, int] | None = None, return_kv: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Self-attention of ``x: (B, L, width)``.

        ``attn_mask: (B or 1, L, Lk)`` bool (True = may attend) besides ``key_padding_mask: (B, Lk)``;
        ``positions: (L,)`` the tokens' absolute positions (default ``0..L-1``). ``context = (k, v, a)``:
        cached keys and values ``(B, H, Sk, head_dim)`` of a whole sequence with ``x`` placed at
        ``[a, a + L)``: the keys are the cache's outside that range and ``x``'s own inside it (``a`` may
        equal ``Sk``: ``x`` is appended), at positions ``0..`` and the queries at ``a..a+L-1``.
        ``return_kv=True`` also returns ``x``'s own ``(k, v)``."""
        B, L, _ = x.shape
        q, k, v = self.project(x)
        q_pos = k_pos = positions
        k_all, v_all = k, v
        if context is not None:
            ck, cv, a = context
            k_all = torch.cat([ck[:, :, :a], k.to(ck.dtype), ck[:, :, a + L:]], 2)
            v_all = torch.cat([cv[:, :, :a], v.to(cv.dtype), cv[:, :, a + L:]], 2)
            q_pos = torch.arange(a, a + L, device=x.device)
            k_pos = torch.arange(k_all.shape[2], device=x.device)
        qx, kx = self.extended_qk(q, k_all, q_pos, k_pos)
        o = attention(qx, kx, v_all, scale=self.head_dim**-0.5, causal=self.causal,
                      key_padding_mask=key_padding_mask, backend=self.backend, attn_mask=attn_mask)
        out = self.out(o.transpose(1, 2).reshape(B, L, self.width))
        return (out, (k, v)) if return_kv else out


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
