"""Training tensors from documents, the small conditional tasks, and a resumable batch iterator.

* :func:`pack` / :func:`pad`: token lists -> ``LongTensor (N, length)``.
* :func:`lm_chunks`: unconditional language-model chunks (packed, MDLM's "wrap": Sahoo et al. 2024).
* :func:`attribute_chunks`: chunks labelled by source (``ATTRIBUTES``), for label-conditional generation
  (classifier-free guidance, Ho & Salimans 2022) judged by a classifier's accuracy.
* :func:`word_order_pairs` / :func:`word_order_tensors`: word ordering (Schmaltz et al. 2016, "Word
  Ordering Without Syntax"): restore a sentence from its words in sorted order; judged by BLEU.
* :class:`Batches`: a deterministic, exactly resumable, shardable batch iterator.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .. import _checks
from .corpus import Document, split_of
from ..errors import InputError, InputTypeError

__all__ = [
    "ATTRIBUTES",
    "SPLITS",
    "Batches",
    "attribute_chunks",
    "lm_chunks",
    "pack",
    "pad",
    "sentences",
    "word_order_pairs",
    "word_order_source",
    "word_order_tensors",
]

ATTRIBUTES = ("reference", "library")
SPLITS = ("train", "valid", "all")

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ALPHA_WORD = re.compile(r"^[A-Za-z][a-z'\-]*[.,;:!?]?$")


def _token_lists(name: str, token_lists: object) -> list[list[int]]:
    if isinstance(token_lists, torch.Tensor) or not isinstance(token_lists, Sequence):
        raise InputTypeError(f"{name}: expected a list of token-id lists, got {type(token_lists).__name__}")
    return [list(map(int, t)) for t in token_lists]


def pack(token_lists: Sequence[Sequence[int]], length: int, sep_id: int) -> torch.Tensor:
    """Concatenate documents with ``sep_id`` between them and cut into full chunks (MDLM "wrap").

    ``[d0 SEP d1 SEP d2 ...]`` is cut into ``N = total // length`` rows; the incomplete tail is dropped.

    Returns
    -------
    LongTensor ``(N, length)`` (``N`` may be 0).
    """
    lists = _token_lists("token_lists", token_lists)
    _checks.positive_int("length", length)
    _checks.positive_int("sep_id", sep_id, 0)
    flat: list[int] = []
    for i, t in enumerate(lists):
        if i:
            flat.append(sep_id)
        flat.extend(t)
    n = len(flat) // length
    return torch.tensor(flat[: n * length], dtype=torch.long).reshape(n, length)


def pad(token_lists: Sequence[Sequence[int]], length: int, pad_id: int) -> torch.Tensor:
    """Each list truncated to ``length`` and right-padded with ``pad_id``: LongTensor ``(len(token_lists), length)``."""
    lists = _token_lists("token_lists", token_lists)
    _checks.positive_int("length", length)
    _checks.positive_int("pad_id", pad_id, 0)
    out = torch.full((len(lists), length), pad_id, dtype=torch.long)
    for i, t in enumerate(lists):
        t = t[:length]
        if t:
            out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return out


def _select(docs: Sequence[Document], split: str, valid_fraction: float) -> list[Document]:
    if isinstance(docs, (str, bytes)) or not isinstance(docs, Sequence):
        raise InputTypeError(f"docs: expected a list of Documents, got {type(docs).__name__}")
    if not docs:
        raise InputError("docs: empty corpus")
    for i, d in enumerate(docs):
        if not isinstance(d, Document):
            raise InputTypeError(f"docs[{i}]: expected a Document, got {type(d).__name__}")
    _checks.choice("split", split, SPLITS)
    if split == "all":
        return list(docs)
    return [d for d in docs if split_of(d.name, valid_fraction) == split]


def lm_chunks(docs: Sequence[Document], tokenizer: Any, length: int, split: str = "train",
              valid_fraction: float = 0.05) -> torch.Tensor:
    """Unconditional LM data: the ``split`` documents (see :func:`~fastdiff.data.split_of`), packed.

    Returns LongTensor ``(N, length)``; ValueError when the split is too small for one chunk.
    """
    _checks.positive_int("length", length)
    chosen = _select(docs, split, valid_fraction)
    out = pack(tokenizer.encode_batch([d.text for d in chosen]), length, tokenizer.sep_id)
    if out.shape[0] == 0:
        raise InputError(f"docs: the {split!r} split has too little text for one chunk of length {length}")
    return out


def attribute_chunks(docs: Sequence[Document], tokenizer: Any, length: int, split: str = "train",
                     balance: bool = True, valid_fraction: float = 0.05,
                     attributes: Sequence[str] = ATTRIBUTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks labelled by their source: label ``k`` = ``attributes[k]`` (default ``ATTRIBUTES``:
    ``"reference"``, ``"library"``; for users' labelled ``.jsonl`` data pass its labels).

    The ``split`` documents of each source are packed separately (:func:`pack`), so a chunk never mixes
    sources. With ``balance`` (default), every larger class is subsampled to the size ``m`` of the smallest
    one by keeping its chunks at the evenly spaced indices ``floor(i * n / m)``, ``i = 0..m-1``
    (deterministic; a classifier's chance accuracy is then ``1 / len(attributes)``). Documents of other
    sources are ignored.

    Returns
    -------
    tokens : LongTensor ``(N, length)``
        Class 0 chunks first, then class 1, ...
    labels : LongTensor ``(N,)``
    """
    _checks.positive_int("length", length)
    if isinstance(attributes, str) or not isinstance(attributes, Sequence) or len(set(attributes)) < 2 \
            or len(set(attributes)) != len(attributes):
        raise InputError(f"attributes: expected at least two distinct source names, got {attributes!r}")
    chosen = _select(docs, split, valid_fraction)
    parts = []
    for source in attributes:
        texts = [d.text for d in chosen if d.source == source]
        chunks = pack(tokenizer.encode_batch(texts), length, tokenizer.sep_id) if texts else torch.empty(0, length)
        if chunks.shape[0] == 0:
            raise InputError(f"docs: no {source!r} chunk of length {length} in the {split!r} split")
        parts.append(chunks.long())
    if balance:
        m = min(p.shape[0] for p in parts)
        parts = [p[(torch.arange(m) * p.shape[0]) // m] for p in parts]
    labels = torch.cat([torch.full((p.shape[0],), k, dtype=torch.long) for k, p in enumerate(parts)])
    return torch.cat(parts), labels


def sentences(text: str, min_words: int = 4, max_words: int = 16) -> list[str]:
    """Rule-based sentences of ``text`` fit for word ordering.

    Splits each paragraph after ``.``, ``!`` or ``?`` followed by whitespace and a capital letter, then keeps
    the sentences that start with a capital letter, end with ``.``/``!``/``?``, have ``min_words`` to
    ``max_words`` words and of which at least 80% of the words are alphabetic (optionally with one
    trailing punctuation mark).
    """
    out = []
    for para in text.split("\n\n"):
        for sent in _SENTENCE_SPLIT.split(" ".join(para.split())):
            words = sent.split()
            if not (min_words <= len(words) <= max_words) or not sent[0].isupper() or sent[-1] not in ".!?":
                continue
            if sum(bool(_ALPHA_WORD.match(w)) for w in words) >= 0.8 * len(words):
                out.append(sent)
    return out


def word_order_source(sentence: str) -> str:
    """The words of ``sentence`` sorted case-insensitively (ties: the case-sensitive string), space-joined."""
    return " ".join(sorted(sentence.split(), key=lambda w: (w.casefold(), w)))


def word_order_pairs(docs: Sequence[Document], split: str = "train", max_words: int = 16, min_words: int = 4,
                     valid_fraction: float = 0.05) -> list[tuple[str, str]]:
    """Word-ordering pairs ``(source, target)`` (Schmaltz et al. 2016).

    target = a sentence from :func:`sentences` of any document; source = :func:`word_order_source` of it.
    Each distinct sentence appears once (first occurrence, in document order). The split is decided per
    sentence, ``split_of(sentence, valid_fraction)``, not per document: docstrings repeat sentences across
    modules ("Return the value."), and a per-document split would put ~20% of the validation sentences in
    the training set as well.
    """
    _checks.positive_int("min_words", min_words)
    _checks.positive_int("max_words", max_words, min_words)
    chosen = _select(docs, "all", valid_fraction)
    _checks.choice("split", split, SPLITS)
    seen: set[str] = set()
    pairs = []
    for d in chosen:
        for sent in sentences(d.text, min_words, max_words):
            if sent not in seen:
                seen.add(sent)
                if split == "all" or split_of(sent, valid_fraction) == split:
                    pairs.append((word_order_source(sent), sent))
    return pairs


def word_order_tensors(pairs: Sequence[tuple[str, str]], tokenizer: Any, src_len: int,
                       tgt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise pairs: ``src (N, src_len)``, ``tgt (N, tgt_len)``, truncated and right-padded with PAD."""
    if not isinstance(pairs, Sequence) or not pairs:
        raise InputError("pairs: expected a non-empty list of (source, target) pairs")
    _checks.positive_int("src_len", src_len)
    _checks.positive_int("tgt_len", tgt_len)
    src = tokenizer.encode_batch([p[0] for p in pairs])
    tgt = tokenizer.encode_batch([p[1] for p in pairs])
    return pad(src, src_len, tokenizer.pad_id), pad(tgt, tgt_len, tokenizer.pad_id)


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"fastdiff.Batches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class Batches:
    """Deterministic, exactly resumable mini-batches over tensors sharing their first dimension ``N``.

    Epoch ``e`` visits the samples in the order ``torch.randperm(N)`` drawn from a ``torch.Generator``
    seeded by a hash of ``(seed, e)`` (or ``0..N-1`` without ``shuffle``); global batch ``b`` holds the
    samples ``order[b*batch_size : (b+1)*batch_size]``. With ``world_size > 1`` each rank takes every
    ``world_size``-th sample of each global batch, starting at ``rank`` (so ``batch_size`` must be a
    multiple of ``world_size``; every rank has ``batch_size // world_size`` samples, except in a final
    partial batch when ``drop_last=False``).

    The state is ``(epoch, position)``: position = global batches already taken in this epoch.
    :meth:`state_dict` / :meth:`load_state_dict` restore it, so a resumed run sees exactly the batches the
    uninterrupted run would have seen.

    Iterating yields the rest of the current epoch (then the next ``for`` loop runs the next epoch);
    :meth:`next_batch` crosses epochs by itself. A batch is a tensor when one tensor was given, else a
    tuple of tensors.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if not tensors:
            raise InputError("tensors: give at least one tensor")
        for i, t in enumerate(tensors):
            _checks.tensor(f"tensors[{i}]", t)
            if t.ndim == 0:
                raise InputError(f"tensors[{i}]: expected at least one dimension (samples), got a scalar")
            if t.shape[0] != tensors[0].shape[0]:
                raise InputError(f"tensors[{i}]: {t.shape[0]} samples, expected {tensors[0].shape[0]} (as tensors[0])")
        self.tensors = tensors
        self.n = int(tensors[0].shape[0])
        self.batch_size = _checks.positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputTypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.world_size = _checks.positive_int("world_size", world_size)
        self.rank = _checks.positive_int("rank", rank, 0)
        if rank >= world_size:
            raise InputError(f"rank: must be < world_size ({world_size}), got {rank}")
        if batch_size % world_size:
            raise InputError(f"batch_size: must be a multiple of world_size ({world_size}), got {batch_size}")
        if len(self) == 0:
            raise InputError(f"tensors: {self.n} samples make no batch of {batch_size}"
                             + (" (drop_last=True)" if self.drop_last else ""))
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        """Global batches per epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: LongTensor ``(N,)``."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                perm = torch.randperm(self.n, generator=g)
            else:
                perm = torch.arange(self.n)
            self._order = (epoch, perm)
        return self._order[1]

    def indices(self, epoch: int, position: int) -> torch.Tensor:
        """Sample indices of this rank's share of global batch ``position`` of ``epoch``."""
        start = position * self.batch_size
        return self.order(epoch)[start: start + self.batch_size][self.rank:: self.world_size]

    def next_batch(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The next batch; moves to the next epoch after the last batch of one."""
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        idx = self.indices(self.epoch, self.position)
        self.position += 1
        out = tuple(t[idx.to(t.device)] for t in self.tensors)
        return out[0] if len(out) == 1 else out

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, ...]]:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        while self.position < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | bool]:
        """JSON-able state: where the iterator is, and what it was built with (checked on load)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["epoch"], state["position"]``; ValueError when the data or settings differ."""
        if not isinstance(state, dict):
            raise InputTypeError(f"state: expected a dict, got {type(state).__name__}")
        for key in ("n", "batch_size", "seed", "shuffle", "drop_last", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise InputError(f"state: {key}={state[key]!r} but this iterator has {key}={getattr(self, key)!r}")
        for key in ("epoch", "position"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"state: {key!r} must be a non-negative int, got {v!r}")
        if state["position"] > len(self):
            raise InputError(f"state: position {state['position']} exceeds the {len(self)} batches of an epoch")
        self.epoch = state["epoch"]
        self.position = state["position"]
