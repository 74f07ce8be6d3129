"""Text corpora: the English prose that ships inside Python, and users' own files.

:func:`python_docs` needs no download. It reads

* every entry of ``pydoc_data.topics.topics`` (the language reference topics that ``help()`` shows;
  about 465 KB of text in Python 3.11), source ``"reference"``, name = the topic key, and
* the docstrings of the standard library's ``.py`` files, source ``"library"``, name = the dotted path
  (``module.Class.method``), found by parsing each file with :mod:`ast` (no stdlib module is imported),

then drops doctest and code-like lines and keeps paragraphs of at least five words. The order is
deterministic (topics in sorted key order, then files in sorted path order, definitions in source order),
and the parsed corpus is cached in memory for the life of the process.

:func:`load_texts` reads ``.txt`` (one document per blank-line separated paragraph) and ``.jsonl``
(``{"text": ..., "label"?: ..., "source"?: ...}`` per line) files.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import _checks
from ..errors import InputError, InputFileNotFoundError, InputTypeError

__all__ = ["SOURCES", "Document", "clean_text", "corpus_stats", "load_texts", "python_docs", "split_of"]

SOURCES = ("reference", "library")

# directories of the standard library that hold no user-facing prose (or not English prose about the library)
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"})
_MIN_WORDS = 5

_WORD = re.compile(r"^[(\"'`]*[A-Za-z][A-Za-z'\-]*[)\"'`]*[.,;:!?]*[)\"'`]*$")
_RULE = re.compile(r"^\s*([*=\-~^#+_])\1{2,}\s*$")  # reST underlines: ****, ====, ----
_SENTENCE_END = re.compile(r"[.!?][)\"'”’]*\s*$")
_CODE_CHARS = frozenset("()[]{}=<>;*+/\\|@#$%^&~")


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes
    ----------
    text : str
        Cleaned prose; paragraphs separated by a blank line (``"\\n\\n"``).
    source : str
        Where it comes from (``"reference"`` / ``"library"`` for :func:`python_docs`; a user label otherwise).
    name : str
        A stable identifier (topic key, dotted path, or ``file:index``); :func:`split_of` hashes it.
    """

    text: str
    source: str
    name: str


def _is_code_line(line: str) -> bool:
    s = line.strip()
    if not s:
        return False
    if s.startswith((">>>", "...", "$ ", "%", "#")) or "::=" in s or _RULE.match(s):
        return True
    symbols = sum(ch in _CODE_CHARS for ch in s)
    words = s.split()
    return symbols > max(2, 0.08 * len(s)) or (len(words) >= 2 and _prose_ratio(words) < 0.5)


def _prose_ratio(words: Sequence[str]) -> float:
    return sum(bool(_WORD.match(w)) for w in words) / max(1, len(words))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def clean_text(text: str, min_words: int = _MIN_WORDS) -> str:
    """Keep the prose of a docstring or help topic.

    Splits the text into blank-line separated blocks and drops

    * code blocks: a block indented deeper than the last block kept before it (reST literal blocks and
      examples) unless it ends like a sentence (indented prose: list items, method descriptions);
    * doctest lines (``>>>``, ``...``), reST rules and code-like lines (many symbol characters, BNF ``::=``);

    then collapses whitespace and keeps the paragraphs of at least ``min_words`` words of which at least
    60% look like words. Returns the kept paragraphs joined by ``"\\n\\n"`` (``""`` when none is left).
    """
    paragraphs: list[str] = []
    code_base: int | None = None  # indentation of the last non-code block
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [ln.expandtabs() for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        indent = min(_indent(ln) for ln in lines)
        if code_base is not None and indent > code_base and not _SENTENCE_END.search(lines[-1]):
            continue
        code_base = indent
        current: list[str] = []
        for line in lines + [">>>"]:  # the sentinel flushes the last paragraph
            if _is_code_line(line):
                words = " ".join(current).split()
                if len(words) >= min_words and _prose_ratio(words) >= 0.6:
                    paragraphs.append(" ".join(words))
                current = []
            else:
                current.append(line)
    return "\n\n".join(paragraphs)


def _stdlib_files(root: str) -> list[str]:
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(files, key=lambda p: os.path.relpath(p, root).split(os.sep))


def _module_name(path: str, root: str) -> str:
    parts = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(tree: ast.Module, module: str) -> Iterable[tuple[str, str]]:
    """(dotted name, raw docstring) for the module and every class / function inside it, in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, doc
    stack: list[tuple[str, ast.AST]] = [(module, tree)]
    while stack:
        prefix, node = stack.pop()
        children = [c for c in getattr(node, "body", []) if isinstance(c, _DEFS)]
        for child in reversed(children):  # pushed reversed so they come out in source order
            stack.append((f"{prefix}.{child.name}", child))
        if node is not tree:
            doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
            if doc:
                yield prefix, doc


def _reference_docs() -> list[Document]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = clean_text(topics[key])
        if text:
            docs.append(Document(text, "reference", key))
    return docs


def _library_docs(root: str) -> list[Document]:
    docs = []
    for path in _stdlib_files(root):
        with open(path, "rb") as fh:
            source = fh.read()
        try:
            tree = ast.parse(source, filename=path)
        except (SyntaxError, ValueError):  # a deliberately broken file; none in 3.11 outside test dirs
            continue
        for name, raw in _docstrings(tree, _module_name(path, root)):
            text = clean_text(raw)
            if text:
                docs.append(Document(text, "library", name))
    return docs


@functools.lru_cache(maxsize=4)
def _python_docs(root: str) -> tuple[Document, ...]:
    return tuple(_reference_docs() + _library_docs(root))


def python_docs(stdlib: str | os.PathLike | None = None) -> list[Document]:
    """The English prose shipped with Python: help topics then standard-library docstrings.

    Parameters
    ----------
    stdlib : path, optional
        Directory of the standard library whose docstrings to read (default
        ``sysconfig.get_paths()["stdlib"]``). The help topics always come from the running interpreter.

    Returns
    -------
    list[Document]
        Topics (source ``"reference"``) in sorted key order, then docstrings (source ``"library"``) in
        sorted file order and source order within a file. Cached per ``stdlib`` in this process (the
        first call parses ~600 files, about 2-3 s); a new list of the same frozen documents each call.
    """
    root = os.path.abspath(os.fspath(stdlib) if stdlib is not None else sysconfig.get_paths()["stdlib"])
    if not os.path.isdir(root):
        raise InputFileNotFoundError(f"stdlib: not a directory: {root}")
    return list(_python_docs(root))


def corpus_stats(docs: Sequence[Document]) -> dict[str, dict[str, int]]:
    """Documents, words (whitespace separated) and UTF-8 bytes per source and in total."""
    stats: dict[str, dict[str, int]] = {}
    for d in docs:
        for key in (d.source, "total"):
            s = stats.setdefault(key, {"documents": 0, "words": 0, "bytes": 0})
            s["documents"] += 1
            s["words"] += len(d.text.split())
            s["bytes"] += len(d.text.encode("utf-8"))
    return dict(sorted(stats.items()))


def split_of(name: str, valid_fraction: float = 0.05) -> str:
    """``"valid"`` for a stable ``valid_fraction`` of names, else ``"train"``.

    The first 8 bytes of ``sha256(name)`` as an integer ``h``: valid iff ``h / 2**64 < valid_fraction``
    (same answer in every process and Python version, unlike ``hash()``).
    """
    if not isinstance(name, str):
        raise InputTypeError(f"name: expected a str, got {type(name).__name__}")
    frac = _checks.real("valid_fraction", valid_fraction, 0.0, 1.0)
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return "valid" if h / 2.0**64 < frac else "train"


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _load_jsonl(path: Path) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                # a ValueError: the file's content is wrong, not the type of an argument
                raise InputError(f'{path}:{lineno}: expected an object with a string "text" field')  # noqa: TRY004
            label = record.get("label", record.get("source", path.stem))
            docs.append(Document(" ".join(record["text"].split()), str(label), f"{path.name}:{lineno}"))
    return docs


def load_texts(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Document]:
    """Documents from users' ``.txt`` / ``.jsonl`` files, in the order given.

    ``.txt``: one document per blank-line separated paragraph, source = the file's stem.
    ``.jsonl``: one JSON object per line with a string ``"text"``; ``"label"`` (or else ``"source"``)
    becomes the document's source (default: the file's stem). Names are ``<file name>:<index or line>``.

    Raises
    ------
    FileNotFoundError
        A path does not exist (the message gives it).
    ValueError
        No path, an unknown extension, a bad JSON line (path and line number), or no document at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Sequence) or not paths:
        raise InputError("paths: expected a path or a non-empty list of paths")
    docs: list[Document] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            raise InputFileNotFoundError(f"paths: {path} is a directory; give the .txt / .jsonl files in it")
        if not path.is_file():
            raise InputFileNotFoundError(f"paths: no such file: {path}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            docs.extend(_load_jsonl(path))
        elif suffix == ".txt":
            text = path.read_text(encoding="utf-8")
            docs.extend(Document(par, path.stem, f"{path.name}:{i}") for i, par in enumerate(_paragraphs(text)))
        else:
            raise InputError(f"paths: {path}: expected a .txt or .jsonl file, got {suffix or 'no extension'!r}")
    if not docs:
        raise InputError(f"paths: no text found in {[str(p) for p in paths]}")
    return docs
