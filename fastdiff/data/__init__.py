"""Data for fastdiff: corpora, tokenizers, training tensors and the small conditional tasks.

* :mod:`~fastdiff.data.corpus`: :func:`python_docs` (the English prose shipped with Python, no download),
  :func:`load_texts` (users' ``.txt`` / ``.jsonl``), :func:`split_of` (stable train/valid split).
* :mod:`~fastdiff.data.tokenizer`: :class:`TextTokenizer` (byte-level BPE or word level; ``[PAD]=0,
  [MASK]=1, [SEP]=2, [UNK]=3``), :func:`default_tokenizer` (the bundled 4096-id BPE).
* :mod:`~fastdiff.data.datasets`: :func:`pack`, :func:`pad`, :func:`lm_chunks`, :func:`attribute_chunks`,
  :func:`word_order_pairs`, :func:`word_order_tensors`, :class:`Batches`.

Sits above :mod:`fastdiff.sampling` and below models / training; it imports neither of those, and
``tokenizers`` only inside functions.
"""

from .corpus import SOURCES, Document, clean_text, corpus_stats, load_texts, python_docs, split_of
from .datasets import (
    ATTRIBUTES,
    SPLITS,
    Batches,
    attribute_chunks,
    lm_chunks,
    pack,
    pad,
    sentences,
    word_order_pairs,
    word_order_source,
    word_order_tensors,
)
from .tokenizer import (
    DEFAULT_TOKENIZER_PATH,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    TextTokenizer,
    default_tokenizer,
)

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_TOKENIZER_PATH",
    "MASK_ID",
    "PAD_ID",
    "SEP_ID",
    "SOURCES",
    "SPECIAL_TOKENS",
    "SPLITS",
    "UNK_ID",
    "Batches",
    "Document",
    "TextTokenizer",
    "attribute_chunks",
    "clean_text",
    "corpus_stats",
    "default_tokenizer",
    "lm_chunks",
    "load_texts",
    "pack",
    "pad",
    "python_docs",
    "sentences",
    "split_of",
    "word_order_pairs",
    "word_order_source",
    "word_order_tensors",
]
