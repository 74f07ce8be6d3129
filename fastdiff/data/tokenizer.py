"""Tokenizers for fastdiff: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer``.

Every fastdiff tokenizer has the same special tokens at the same ids: ``[PAD]=0, [MASK]=1, [SEP]=2,
[UNK]=3`` (discrete models use ``discrete.Absorbing(vocab_size, mask_id=1, ...)``). Two kinds:

* ``"bpe"``: byte-level BPE (Sennrich et al. 2016 on bytes, as GPT-2): every string encodes without
  ``[UNK]`` and ``decode(encode(s)) == s``.
* ``"word"``: one id per word or punctuation run (``\\w+|[^\\w\\s]+``), unknown words map to ``[UNK]``;
  decode joins with spaces, then re-attaches closing punctuation, opening brackets and apostrophes
  (readable, not always the original spacing).

``tokenizers`` is imported inside the functions, so ``import fastdiff.data`` stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _checks
from ..errors import InputError, InputFileNotFoundError, InputTypeError

__all__ = [
    "DEFAULT_TOKENIZER_PATH",
    "MASK_ID",
    "PAD_ID",
    "SEP_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "TextTokenizer",
    "default_tokenizer",
]

SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[SEP]", "[UNK]")
PAD_ID, MASK_ID, SEP_ID, UNK_ID = 0, 1, 2, 3
KINDS = ("bpe", "word")
DEFAULT_TOKENIZER_PATH = Path(__file__).resolve().parent.parent / "assets" / "tokenizer.json"

_DETACH = re.compile(r" ([.,;:!?)\]}”]+)")  # word kind: "word ." -> "word."
_ATTACH = re.compile(r"([(\[{“]) ")  # "( word" -> "(word"
_APOSTROPHE = re.compile(r"(\w) (['’]) (\w)")  # "don ' t" -> "don't"


def _texts(name: str, texts: object) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise InputTypeError(f"{name}: expected a list of strings (or Documents), got {type(texts).__name__}")
    out = []
    for i, t in enumerate(texts):
        t = getattr(t, "text", t)
        if not isinstance(t, str):
            raise InputTypeError(f"{name}[{i}]: expected a str (or an object with .text), got {type(t).__name__}")
        out.append(t)
    return out


def _kind_of(tok: Any) -> str:
    model = json.loads(tok.to_str())["model"]["type"]
    return {"BPE": "bpe", "WordLevel": "word"}.get(model, model.lower())


class TextTokenizer:
    """A trained tokenizer with fastdiff's fixed special ids.

    Build one with :meth:`train`, :meth:`load` or :func:`default_tokenizer`; ``TextTokenizer(tok)`` wraps an
    existing ``tokenizers.Tokenizer`` whose first four ids are ``[PAD], [MASK], [SEP], [UNK]``.

    Attributes
    ----------
    vocab_size : int
        Number of ids, special tokens included.
    pad_id, mask_id, sep_id, unk_id : int
        0, 1, 2, 3.
    kind : str
        ``"bpe"`` or ``"word"``.
    """

    pad_id = PAD_ID
    mask_id = MASK_ID
    sep_id = SEP_ID
    unk_id = UNK_ID

    def __init__(self, tokenizer: Any) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            got = tokenizer.token_to_id(tok)
            if got != i:
                raise InputError(f"tokenizer: special token {tok} must have id {i}, got {got}")
        self._tok = tokenizer
        self.kind = _kind_of(tokenizer)
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, kind: str = "bpe",
              min_frequency: int = 2) -> TextTokenizer:
        """Train a tokenizer on ``texts`` (strings, or Documents: their ``.text``).

        Parameters
        ----------
        texts : iterable of str
            The training corpus (non-empty).
        vocab_size : int
            Target vocabulary size including the 4 special tokens (BPE: also the 256 byte symbols, so at
            least 260). The result may be smaller when the corpus runs out of merges / words.
        kind : {"bpe", "word"}
        min_frequency : int
            Minimum count of a merge (BPE) or a word (word level) to enter the vocabulary.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        data = _texts("texts", texts)
        if not any(t.strip() for t in data):
            raise InputError("texts: empty corpus (no non-blank text to train on)")
        _checks.choice("kind", kind, KINDS)
        _checks.positive_int("min_frequency", min_frequency)
        if kind == "bpe":
            alphabet = pre_tokenizers.ByteLevel.alphabet()
            _checks.positive_int("vocab_size", vocab_size, len(SPECIAL_TOKENS) + len(alphabet))
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                          special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                          show_progress=False)
        else:
            _checks.positive_int("vocab_size", vocab_size, len(SPECIAL_TOKENS) + 1)
            tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        tok.train_from_iterator(data, trainer=trainer, length=len(data))
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save` (or any compatible HF tokenizer file).

        Raises FileNotFoundError for a missing file and ValueError (with the path) for a file that is not a
        valid tokenizer or lacks fastdiff's special ids.
        """
        from tokenizers import Tokenizer

        p = Path(path)
        if not p.is_file():
            raise InputFileNotFoundError(f"path: no tokenizer file at {p}")
        try:
            tok = Tokenizer.from_str(p.read_text(encoding="utf-8"))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for bad JSON / schema)
            raise InputError(f"path: {p} is not a valid tokenizer.json ({type(e).__name__}: {e})") from None
        try:
            return cls(tok)
        except ValueError as e:
            raise InputError(f"path: {p}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one ``tokenizer.json`` (compact JSON; parent directories are created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self._tok.to_str(pretty=False), encoding="utf-8")

    # ------------------------------------------------------------------ use
    @property
    def backend(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()[:12]})"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added).

        The literal strings ``[PAD]``, ``[MASK]``, ``[SEP]``, ``[UNK]`` in ``text`` become their special ids,
        so a prompt can spell out masked positions: ``encode("a [MASK] b")`` contains ``mask_id``.
        """
        if not isinstance(text, str):
            raise InputTypeError(f"text: expected a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for each text (parallel in the Rust library)."""
        data = _texts("texts", texts)
        return [e.ids for e in self._tok.encode_batch(data, add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor); special tokens are dropped when ``skip_special``.

        Nothing stops at ``[SEP]`` or ``[PAD]``: they are only left out (or written, with
        ``skip_special=False``).
        """
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise InputError(f"ids: expected a 1-D tensor, got shape {tuple(ids.shape)}")
            _checks.integer("ids", ids)
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"ids: token ids must lie in [0, {self.vocab_size}), got {bad[0]}")
        if skip_special:
            ids = [i for i in ids if i >= len(SPECIAL_TOKENS)]
        text = self._tok.decode(ids, skip_special_tokens=False)
        if self.kind == "word":
            text = _APOSTROPHE.sub(r"\1\2\3", _ATTACH.sub(r"\1", _DETACH.sub(r"\1", text)))
        return text

    def decode_batch(self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special: bool = True) -> list[str]:
        """:meth:`decode` for each row of a list of id lists or a 2-D tensor."""
        return [self.decode(row, skip_special) for row in batch]

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def vocab(self) -> list[str]:
        """Tokens in id order (``vocab()[i]`` is the string of id ``i``)."""
        by_id = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return [t for t, _ in by_id]

    def fingerprint(self) -> str:
        """sha256 (hex) of the kind and the tokens in id order: equal iff two tokenizers map ids alike.

        Independent of the file's formatting and of the ``tokenizers`` version that wrote it, so a
        checkpoint can tell whether a tokenizer is the one it was trained with.
        """
        payload = json.dumps({"kind": self.kind, "vocab": self.vocab()}, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("ascii")).hexdigest()


def default_tokenizer() -> TextTokenizer:
    """The bundled tokenizer: 4096-id byte-level BPE trained on :func:`fastdiff.data.python_docs`.

    See ``fastdiff/assets/tokenizer.md`` for how it was made (``scripts/build_tokenizer.py``).
    """
    return TextTokenizer.load(DEFAULT_TOKENIZER_PATH)
