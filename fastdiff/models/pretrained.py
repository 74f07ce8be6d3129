"""Embedding initialisation from a pretrained model in a local Hugging Face directory.

Each of our tokens is decoded to its string, tokenised by the pretrained model's tokenizer, and given the
mean of those tokens' input-embedding rows (a common vocabulary-transfer recipe). The rows are then
brought to our width — ``proj="pca"``: the top principal directions of the pretrained table (centred),
``"truncate"``: the first ``D`` coordinates (zero-padded if ours is wider) — and rescaled so their standard
deviation equals the current initialisation's. Only local files are read (``local_files_only=True``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ..errors import InputError, InputTypeError

__all__ = ["init_embeddings_from_pretrained", "pretrained_rows"]


def _load_hf(hf_dir: str | os.PathLike) -> tuple[Any, torch.Tensor]:
    path = Path(hf_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"hf_dir: {str(path)!r} is not a directory (a local Hugging Face model directory "
                                "with config.json, weights and tokenizer files)")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("init_embeddings_from_pretrained needs transformers: pip install 'fastdiff[hf]'") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"hf_dir: could not load a tokenizer and model from {str(path)!r}: {e}") from None
    return tok, model.get_input_embeddings().weight.detach().float()


def pretrained_rows(tokenizer: Any, hf_tokenizer: Any, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows (V, D_hf), found (V,) bool)``: for each of our ids, the mean pretrained row of its string's
    pieces; tokens whose string is empty (specials) or maps to nothing are not found (row 0)."""
    V = int(tokenizer.vocab_size)
    rows = torch.zeros(V, table.shape[1])
    found = torch.zeros(V, dtype=torch.bool)
    for i in range(V):
        text = tokenizer.decode([i])
        if not text or not text.strip():
            continue
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [j for j in ids if 0 <= j < table.shape[0]]
        if ids:
            rows[i] = table[ids].mean(0)
            found[i] = True
    return rows, found


def init_embeddings_from_pretrained(embedding: nn.Embedding | torch.Tensor, tokenizer: Any, hf_dir: str | os.PathLike,
                                    proj: str = "pca") -> torch.Tensor:
    """Overwrite ``embedding`` (an ``nn.Embedding`` or a ``(V, D)`` tensor, in place) with pretrained rows;
    tokens without a pretrained counterpart keep their values. Returns the ``(V,)`` bool mask of rows set."""
    if proj not in ("pca", "truncate"):
        raise InputError(f"proj: expected 'pca' or 'truncate', got {proj!r}")
    weight = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise InputTypeError("embedding: expected an nn.Embedding or a (V, D) tensor")
    if weight.shape[0] != tokenizer.vocab_size:
        raise InputError(f"embedding: has {weight.shape[0]} rows but the tokenizer has {tokenizer.vocab_size} tokens")
    hf_tok, table = _load_hf(hf_dir)
    rows, found = pretrained_rows(tokenizer, hf_tok, table)
    D = weight.shape[1]
    if proj == "pca":
        mean = table.mean(0)
        k = min(D, table.shape[1], table.shape[0])
        _, _, vh = torch.linalg.svd(table - mean, full_matrices=False)
        mapped = torch.zeros(rows.shape[0], D)
        mapped[:, :k] = (rows - mean) @ vh[:k].t()
    else:
        mapped = torch.zeros(rows.shape[0], D)
        k = min(D, rows.shape[1])
        mapped[:, :k] = rows[:, :k]
    with torch.no_grad():
        std = float(weight.float().std()) or 1.0
        sel = mapped[found]
        if sel.numel():
            sel = sel / (float(sel.std()) or 1.0) * std
            weight[found] = sel.to(weight.dtype).to(weight.device)
    return found
