"""The small scoring models: a causal LM (generative perplexity) and a text classifier (attribute accuracy).

(Formerly ``fastdiff.models.aux``, a name Windows reserves; that import path still works, with a
:class:`DeprecationWarning`.)"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _checks
from .sed import Block
from ..errors import InputError, InputTypeError

__all__ = ["CausalLM", "TextClassifier"]


class CausalLM(nn.Module):
    """A GPT-style causal transformer with relative positions: ``forward(tokens (B, L)) -> logits (B, L, V)``,
    logits at ``i`` predict token ``i + 1`` from tokens ``<= i``. Output tied to the input embedding."""

    arch = "causal_lm"

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4, max_len: int = 128,
                 ff_mult: int = 4, rel_freqs: int = 32) -> None:
        super().__init__()
        self._cfg = {"vocab_size": _checks.positive_int("vocab_size", vocab_size),
                     "width": _checks.positive_int("width", width), "layers": _checks.positive_int("layers", layers),
                     "heads": _checks.positive_int("heads", heads), "max_len": _checks.positive_int("max_len", max_len),
                     "ff_mult": _checks.positive_int("ff_mult", ff_mult),
                     "rel_freqs": _checks.positive_int("rel_freqs", rel_freqs)}
        self.embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.embedding.weight, std=width**-0.5)
        self.blocks = nn.ModuleList(Block(width, heads, ff_mult, 0.0, rel_freqs, False, causal=True)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def config_dict(self) -> dict[str, Any]:
        return dict(self._cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.ndim != 2:
            raise InputTypeError("tokens: expected a (B, L) int64 tensor")
        _checks.token_ids("tokens", tokens, self._cfg["vocab_size"])
        h = self.embedding(tokens)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h) @ self.embedding.weight.t() + self.bias


class TextClassifier(nn.Module):
    """A small transformer classifier: ``forward(tokens (B, L), attention_mask=None) -> (B, C)`` logits, a
    masked mean over the real (non-PAD) positions. Without ``attention_mask``, PAD ids are masked."""

    arch = "classifier"

    def __init__(self, vocab_size: int, num_labels: int, width: int = 64, layers: int = 1, heads: int = 4,
                 pad_id: int = 0, ff_mult: int = 4, rel_freqs: int = 16) -> None:
        super().__init__()
        self._cfg = {"vocab_size": _checks.positive_int("vocab_size", vocab_size),
                     "num_labels": _checks.positive_int("num_labels", num_labels),
                     "width": _checks.positive_int("width", width), "layers": _checks.positive_int("layers", layers, 0),
                     "heads": _checks.positive_int("heads", heads), "pad_id": _checks.positive_int("pad_id", pad_id, 0),
                     "ff_mult": _checks.positive_int("ff_mult", ff_mult),
                     "rel_freqs": _checks.positive_int("rel_freqs", rel_freqs)}
        self.embedding = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList(Block(width, heads, ff_mult, 0.0, rel_freqs, False) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_labels)

    def config_dict(self) -> dict[str, Any]:
        return dict(self._cfg)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.ndim != 2:
            raise InputTypeError("tokens: expected a (B, L) int64 tensor")
        _checks.token_ids("tokens", tokens, self._cfg["vocab_size"])
        mask = self._mask(tokens, attention_mask)
        return self._from_embedded(self.embedding(tokens), mask)

    def _mask(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mask = tokens != self._cfg["pad_id"] if attention_mask is None else attention_mask.to(torch.bool)
        if mask.shape != tokens.shape:
            raise InputError(f"attention_mask: expected shape {tuple(tokens.shape)}, got {tuple(mask.shape)}")
        return mask | ~mask.any(1, keepdim=True)  # an all-PAD row attends to everything rather than nothing

    def onehot_grad(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``∇_{onehot(tokens)} log p(labels | tokens)``: ``(B, L, V)`` float32, the gradient of the
        classifier's log-likelihood with respect to the one-hot encoding of its input (the first-order
        term of discrete classifier guidance: DiGress, Vignac et al. 2023, §5; TAG, Nisonoff et al. 2024).

        The embedding is linear in the one-hot input (``E[x] = onehot(x) @ E``), so the gradient is the
        one with respect to the embedded input times ``Eᵀ``; computed with autograd on, also under an
        outer ``torch.inference_mode``. The model's parameters get no gradient."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.ndim != 2:
            raise InputTypeError("tokens: expected a (B, L) int64 tensor")
        _checks.token_ids("tokens", tokens, self._cfg["vocab_size"])
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.shape != tokens.shape[:1]:
            raise InputTypeError(f"labels: expected a ({tokens.shape[0]},) int64 tensor")
        if bool(((labels < 0) | (labels >= self._cfg["num_labels"])).any()):
            raise InputError(f"labels: expected label ids in [0, {self._cfg['num_labels']})")
        with torch.inference_mode(False), torch.enable_grad():
            tokens, labels = tokens.clone(), labels.clone()
            weight = self.embedding.weight.detach().clone()
            h = torch.nn.functional.embedding(tokens, weight).requires_grad_(True)
            logp = torch.log_softmax(self._from_embedded(h, self._mask(tokens, None)).float(), -1)
            (g,) = torch.autograd.grad(logp.gather(1, labels[:, None]).sum(), h)
        return (g @ weight.t()).float()

    def guidance_grad(self, label: int | torch.Tensor) -> Any:
        """The ``classifier_grad`` of :func:`fastdiff.sampling.sample` for the discrete family that steers
        towards ``label`` (an int for every row, or a ``(B,)`` tensor): ``grad(x_t, t) ->``
        :meth:`onehot_grad` ``(x_t, label)`` (``t`` unused: the classifier sees ``x_t`` as it is)."""
        def grad(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            y = label if isinstance(label, torch.Tensor) else torch.full((x_t.shape[0],), int(label), dtype=torch.long)
            return self.onehot_grad(x_t, y.to(x_t.device))

        return grad

    def _from_embedded(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            h = blk(h, mask)
        w = mask.to(h.dtype).unsqueeze(-1)
        pooled = (self.norm(h) * w).sum(1) / w.sum(1)
        return self.head(pooled)
