"""Rebuild fastdiff's bundled tokenizer (``fastdiff/assets/tokenizer.json``) and its note (``tokenizer.md``).

Trains a byte-level BPE (default 4096 ids, ``[PAD]=0, [MASK]=1, [SEP]=2, [UNK]=3``) on
:func:`fastdiff.data.python_docs`, the prose shipped with the running Python (no download), and writes
the tokenizer plus a Markdown note with the exact command, the Python version and the corpus figures.

Usage::

    PYTHONPATH=. python scripts/build_tokenizer.py                  # writes fastdiff/assets/tokenizer.{json,md}
    PYTHONPATH=. python scripts/build_tokenizer.py --out /tmp/tok --vocab-size 8192 --kind bpe
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from fastdiff.data import TextTokenizer, attribute_chunks, corpus_stats, lm_chunks, python_docs, word_order_pairs
from fastdiff.data.corpus import _SKIP_DIRS


def _tasks(docs: list, tok: TextTokenizer) -> str:
    """Sizes of the training sets that fastdiff.data builds from this corpus with this tokenizer."""
    lines = ["| data set | train | valid |", "| --- | ---: | ---: |"]
    for length in (64, 128):
        n = [lm_chunks(docs, tok, length, split).shape[0] for split in ("train", "valid")]
        lines.append(f"| `lm_chunks(length={length})` rows | {n[0]:,} | {n[1]:,} |")
    for length in (64,):
        for balance in (False, True):
            cells = []
            for split in ("train", "valid"):
                _, y = attribute_chunks(docs, tok, length, split, balance=balance)
                ref, lib = (int(c) for c in y.bincount(minlength=2))
                cells.append(f"{ref:,} + {lib:,}")
            lines.append(f"| `attribute_chunks(length={length}, balance={balance})` reference + library "
                         f"| {cells[0]} | {cells[1]} |")
    n = [len(word_order_pairs(docs, split)) for split in ("train", "valid")]
    lines.append(f"| `word_order_pairs(max_words=16)` pairs | {n[0]:,} | {n[1]:,} |")
    return "\n".join(lines)


def _note(tok: TextTokenizer, stats: dict[str, dict[str, int]], command: str, seconds: float, size: int,
          n_tokens: int, tasks: str) -> str:
    from pydoc_data.topics import topics

    import tokenizers

    raw = sum(len(v.encode("utf-8")) for v in topics.values())

    rows = "\n".join(f"| {k} | {v['documents']:,} | {v['words']:,} | {v['bytes']:,} |" for k, v in stats.items())
    return f"""# The bundled tokenizer

`tokenizer.json`: a {tok.kind.upper()} tokenizer with {tok.vocab_size} ids (`[PAD]=0, [MASK]=1, [SEP]=2,
[UNK]=3`, then the 256 byte symbols, then merges), byte-level pre-tokenizer and decoder, so every string
encodes without `[UNK]` and `decode(encode(s)) == s`. Fingerprint (`TextTokenizer.fingerprint()`, sha256 of
the kind and the tokens in id order):

    {tok.fingerprint()}

## How it was made

    {command}

with Python {platform.python_version()} ({platform.python_implementation()}) and tokenizers
{tokenizers.__version__}, in {seconds:.1f} s (corpus parsing included). File size: {size:,} bytes.

The corpus is `fastdiff.data.python_docs()`: every help topic of `pydoc_data.topics` (source
"reference") and the docstrings of the standard library's `.py` files parsed with `ast` (source
"library"), skipping the directories {", ".join(f"`{d}/`" for d in sorted(_SKIP_DIRS))}; doctest and
code-like lines dropped, paragraphs of at least 5 words kept (the raw `pydoc_data.topics` holds {len(topics)}
topics, {raw:,} bytes, before cleaning). The tokenizer is trained on all of it (both
splits): it only fixes the vocabulary. Another Python version ships other docs, so a rebuild there gives a
different tokenizer (and fingerprint).

| source | documents | words | bytes (UTF-8) |
| --- | ---: | ---: | ---: |
{rows}

The whole corpus encodes to {n_tokens:,} tokens ({n_tokens / stats["total"]["words"]:.2f} per word).

## The data sets built from it

Splits: `split_of(document name)` (5% valid) for the LM and attribute chunks, `split_of(sentence)` for
word ordering. The attribute task is unbalanced by nature (the library has ~4x the reference text), so
`attribute_chunks` keeps, by default, evenly spaced library chunks to match the reference count
(`balance=True`; chance accuracy 0.5):

{tasks}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "fastdiff" / "assets",
                        help="directory for tokenizer.json and tokenizer.md (default: fastdiff/assets)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--kind", choices=("bpe", "word"), default="bpe")
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    docs = python_docs()
    tok = TextTokenizer.train([d.text for d in docs], vocab_size=args.vocab_size, kind=args.kind,
                              min_frequency=args.min_frequency)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tokenizer.json"
    tok.save(path)
    assert TextTokenizer.load(path).fingerprint() == tok.fingerprint()
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["PYTHONPATH=. python scripts/build_tokenizer.py", *given])
    stats = corpus_stats(docs)
    n_tokens = sum(map(len, tok.encode_batch([d.text for d in docs])))
    note = _note(tok, stats, command, seconds, path.stat().st_size, n_tokens, _tasks(docs, tok))
    (args.out / "tokenizer.md").write_text(note, encoding="utf-8")
    print(f"{path}: {tok!r}, {path.stat().st_size:,} bytes, {seconds:.1f} s")
    for k, v in stats.items():
        print(f"  {k:>9}: {v['documents']:>6,} documents {v['words']:>9,} words {v['bytes']:>11,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
