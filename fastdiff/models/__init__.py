"""Models: the SED denoiser (discrete and continuous, label / concatenation / cross-attention conditioning),
the causal LM and classifier used for evaluation, :func:`build_model` by architecture name, and the Hugging
Face adapters of :mod:`.hf` (LLaDA / Dream style bidirectional LMs, masked LMs)."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .attention import CrossAttention, RelativeSelfAttention, attention
from .hf import DreamAdapter, HFBidirectional, HFKVCache, HFMaskedLMAdapter, unwrap_logits
from .scorers import CausalLM, TextClassifier
from .sed import SEDConfig, SEDDenoiser
from ..errors import InputError, InputTypeError

__all__ = ["ARCHS", "CausalLM", "CrossAttention", "DreamAdapter", "HFBidirectional", "HFKVCache",
           "HFMaskedLMAdapter", "RelativeSelfAttention", "SEDConfig", "SEDDenoiser", "TextClassifier", "attention",
           "build_model", "unwrap_logits"]


def __getattr__(name: str) -> Any:
    """``fastdiff.models.aux``, the old name of :mod:`.scorers` (AUX is a reserved file name on Windows):
    imported through :mod:`fastdiff._deprecate`, with a :class:`DeprecationWarning`."""
    if name == "aux":
        return importlib.import_module(f"{__name__}.aux")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ARCHS = {"sed": SEDDenoiser, "causal_lm": CausalLM, "classifier": TextClassifier}


def build_model(arch: str, config: dict[str, Any], *, saved: bool = False) -> nn.Module:
    """A model from its architecture name and config dict. ``saved=True``: ``config`` is a checkpoint's
    ``config_dict()``, written perhaps by an older fastdiff (fields it lacks keep their old meaning,
    :meth:`SEDConfig.from_dict`)."""
    if arch not in ARCHS:
        raise InputError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    if not isinstance(config, dict):
        raise InputTypeError(f"config: expected a dict, got {type(config).__name__}")
    if arch == "sed":
        return SEDDenoiser(SEDConfig.from_dict(config, saved=saved))
    return ARCHS[arch](**config)
