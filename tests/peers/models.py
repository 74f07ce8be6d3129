"""Tiny deterministic test models in the LM calling convention of ``fastdiff.generate``.

``model(input_ids, attention_mask=None, position_ids=None) -> logits (B, L, V)``: a 2-layer, width-32
bidirectional transformer with rotary positions taken from ``position_ids`` (default ``arange(L)``) and a
key-padding mask from ``attention_mask`` (1 = real). Pad queries still attend to the real keys, so no row
is ever all-masked (no NaN). Weights are drawn from a seeded generator, fp32, eval mode, no dropout.

Variants: :class:`DictLM` (returns ``{"logits": ...}``), :class:`MaskedLMOutputLM` (transformers'
``MaskedLMOutput``), :class:`CachedLM` (Fast-dLLM cache protocol ``kv_forward`` / ``kv_window``) and
:class:`BlockCausalLM` (block-causal attention; exact KV protocol ``new_cache`` / ``__call__(x_block, t,
cache=, start=)`` / ``extend_cache`` as in ``fastdiff.sampling.BlockCausalDenoiser``).

:func:`call_lm` is the peers' single way to call a model (same keywords as the contract); it also counts
the calls in ``model.calls``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

Cache = list[tuple[torch.Tensor, torch.Tensor]]


def _rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x (B, H, L, d)`` at integer positions ``pos (B, L)`` (RoFormer, half split)."""
    d = x.shape[-1]
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos.to(torch.float32)[:, None, :, None] * inv  # (B, 1, L, d/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def qkv_of(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries, rotated keys and values ``(B, H, n, d)`` of hidden states ``h (B, n, D)``."""
        B, n, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, n, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return _rotate(q, pos), _rotate(k, pos), v

    def finish(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               allowed: torch.Tensor) -> torch.Tensor:
        """Attention of queries ``q`` over ``k, v`` where ``allowed (B, 1|n, Lk)`` is True, then the MLP."""
        B, n, D = h.shape
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, n, D)
        h = h + self.out(a)
        return h + self.mlp(self.ln2(h))


class TinyLM(nn.Module):
    """Bidirectional 2-layer transformer, ``model(input_ids, attention_mask=None, position_ids=None)``.

    Positions (``position_ids``, default ``arange(L)``) enter twice: a learned absolute embedding (so that
    masked positions get clearly different predictions) and rotary queries/keys.

    ``block_size`` (optional) makes attention block-causal by column: column ``i`` sees column ``j`` iff
    ``j // block_size <= i // block_size``. The mask token's output logit gets ``mask_bias`` (default
    -20: the model practically never predicts [MASK], as trained diffusion LMs do).
    """

    def __init__(self, vocab: int = 50, *, mask_id: int | None = None, width: int = 32, layers: int = 2,
                 heads: int = 2, seed: int = 0, scale: float = 2.0, mask_bias: float = -20.0,
                 block_size: int | None = None, max_len: int = 64) -> None:
        super().__init__()
        self.vocab, self.block_size = vocab, block_size
        self.mask_id = vocab - 1 if mask_id is None else mask_id
        self.config = SimpleNamespace(mask_token_id=self.mask_id, vocab_size=vocab)
        self.emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(max_len, width)
        self.layers = nn.ModuleList(_Layer(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 2:
                    fan = 1 if "emb" in name else p.shape[1]
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan))
                elif "ln" in name and name.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            self.head.weight.mul_(scale)
            self.head.bias[self.mask_id] += mask_bias
        self.calls = 0
        self.eval()

    # -- pieces ------------------------------------------------------------------------------------
    def _allowed(self, qcols: torch.Tensor, kcols: torch.Tensor, keymask: torch.Tensor | None,
                 B: int) -> torch.Tensor:
        """(B, nq, nk) bool: key padding mask and, if block-causal, the block rule on columns."""
        allowed = torch.ones(B, len(qcols), len(kcols), dtype=torch.bool)
        if keymask is not None:
            allowed = allowed & keymask[:, None, :].bool()
        if self.block_size is not None:
            bs = self.block_size
            allowed = allowed & ((kcols[None, :] // bs) <= (qcols[:, None] // bs))[None]
        return allowed

    @staticmethod
    def _pos(position_ids: torch.Tensor | None, B: int, L: int) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(L).expand(B, L)
        return position_ids

    def _full(self, x: torch.Tensor, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor | None) -> tuple[torch.Tensor, Cache]:
        B, L = x.shape
        pos = self._pos(position_ids, B, L)
        cols = torch.arange(L)
        allowed = self._allowed(cols, cols, attention_mask, B)
        h = self.emb(x) + self.pos_emb(pos)
        cache: Cache = []
        for layer in self.layers:
            q, k, v = layer.qkv_of(h, pos)
            cache.append((k, v))
            h = layer.finish(h, q, k, v, allowed)
        return self.head(self.ln(h)), cache

    # -- LM convention -----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> Any:
        self.calls += 1
        return self._wrap(self._full(input_ids, attention_mask, position_ids)[0])

    def _wrap(self, logits: torch.Tensor) -> Any:
        return logits


class DictLM(TinyLM):
    """:class:`TinyLM` that returns ``{"logits": logits}``."""

    def _wrap(self, logits: torch.Tensor) -> Any:
        return {"logits": logits}


class MaskedLMOutputLM(TinyLM):
    """:class:`TinyLM` that returns ``transformers.modeling_outputs.MaskedLMOutput``."""

    def _wrap(self, logits: torch.Tensor) -> Any:
        from transformers.modeling_outputs import MaskedLMOutput

        return MaskedLMOutput(logits=logits)


class CachedLM(TinyLM):
    """:class:`TinyLM` with the Fast-dLLM cache protocol of the generation contract.

    ``kv_forward`` is one full forward that also returns every layer's keys/values; ``kv_window`` runs the
    window tokens at columns ``[start, start + n)`` with the cache's keys/values outside the window and the
    window's own (computed now) inside it. The cache is never modified.
    """

    @torch.no_grad()
    def kv_forward(self, x: torch.Tensor, t: torch.Tensor | None = None, *,
                   attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Cache]:
        self.calls += 1
        logits, cache = self._full(x, attention_mask, position_ids)
        return logits, cache

    @torch.no_grad()
    def kv_window(self, x_win: torch.Tensor, t: torch.Tensor | None = None, *, cache: Cache, start: int,
                  attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        B, n = x_win.shape
        L = cache[0][0].shape[2]
        pos = self._pos(position_ids, B, L)[:, start:start + n]
        allowed = self._allowed(torch.arange(start, start + n), torch.arange(L), attention_mask, B)
        h = self.emb(x_win) + self.pos_emb(pos)
        for layer, (kc, vc) in zip(self.layers, cache):
            q, k, v = layer.qkv_of(h, pos)
            K, V = kc.clone(), vc.clone()
            K[:, :, start:start + n], V[:, :, start:start + n] = k, v
            h = layer.finish(h, q, K, V, allowed)
        return self.head(self.ln(h))


class BlockCausalLM(TinyLM):
    """Block-causal :class:`TinyLM` (``block_size`` required) with the exact KV protocol of BD3-LM.

    * LM convention: ``model(input_ids, attention_mask=None, position_ids=None)`` (block-causal by column);
    * ``new_cache(B)``; ``model(x_block, t, cache=cache, start=s)`` -> logits of columns ``s..s+n`` given
      the cached earlier columns; ``extend_cache(cache, x_block, s)`` appends the clean block's keys/values.
    """

    def __init__(self, vocab: int = 50, *, block_size: int, **kw: Any) -> None:
        super().__init__(vocab, block_size=block_size, **kw)

    def new_cache(self, batch_size: int) -> Cache:
        w = self.emb.weight.shape[1]
        heads = self.layers[0].heads
        e = torch.zeros(batch_size, heads, 0, w // heads)
        return [(e, e) for _ in self.layers]

    def _block(self, x_block: torch.Tensor, cache: Cache, start: int) -> tuple[torch.Tensor, Cache]:
        B, n = x_block.shape
        if cache[0][0].shape[2] != start:
            raise ValueError(f"cache holds {cache[0][0].shape[2]} columns, start={start}")
        pos = torch.arange(start, start + n).expand(B, n)
        allowed = self._allowed(torch.arange(start, start + n), torch.arange(start + n), None, B)
        h = self.emb(x_block) + self.pos_emb(pos)
        new: Cache = []
        for layer, (kc, vc) in zip(self.layers, cache):
            q, k, v = layer.qkv_of(h, pos)
            K, V = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
            new.append((K, V))
            h = layer.finish(h, q, K, V, allowed)
        return self.head(self.ln(h)), new

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, t: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: Cache | None = None, start: int | None = None) -> Any:
        self.calls += 1
        if cache is None:
            return self._full(input_ids, attention_mask, position_ids)[0]
        return self._block(input_ids, cache, int(start or 0))[0]

    @torch.no_grad()
    def extend_cache(self, cache: Cache, x_block: torch.Tensor, start: int) -> Cache:
        return self._block(x_block, cache, start)[1]


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a tuple (first item), ``.logits`` or ``["logits"]``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, tuple):
        return out[0]
    raise TypeError(f"unrecognised model output {type(out).__name__}")


def lm_inputs(attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The contract's keywords for a full-length ``attention_mask (B, L)``: the mask only when there is
    padding, and ``position_ids = cumsum(mask) - 1`` with pads at 0."""
    am = attention_mask.long()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    kw: dict[str, torch.Tensor] = {"position_ids": pos}
    if bool((am == 0).any()):
        kw["attention_mask"] = am
    return kw


def call_lm(model: Any, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``model(x, **lm_inputs(attention_mask))`` as fp32 logits ``(B, L, V)``."""
    return logits_of(model(x, **lm_inputs(attention_mask))).float()


def right_align(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts ``(B, P)`` left- or right-padded -> left-padded (prompt ends at column P) and its mask."""
    if attention_mask is None:
        return input_ids.clone(), torch.ones_like(input_ids)
    B, P = input_ids.shape
    ids = torch.full_like(input_ids, pad_id)
    am = torch.zeros_like(input_ids)
    for b in range(B):
        real = input_ids[b][attention_mask[b].bool()]
        n = real.numel()
        if n:
            ids[b, P - n:] = real
            am[b, P - n:] = 1
    return ids, am
