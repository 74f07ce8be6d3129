"""Training data and the training loop of :class:`~fastdiff.glyph.model.GlyphDiffusion`.

* :func:`char_chunks`: the bundled corpus (or any :class:`~fastdiff.data.Document` list) as fixed-length
  character chunks, labelled by source for the attribute task (the same split and classes as
  :func:`fastdiff.data.attribute_chunks`, which cuts token chunks instead).
* :func:`shuffle_pairs`: text-to-text pairs for word-order restoration (source = a chunk's words in a seeded
  random order, target = the chunk).
* :func:`train`: Adam on :meth:`GlyphDiffusion.loss`, with checkpoints and a JSONL log.
"""

from __future__ import annotations

import json
import math
import random
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import _checks
from ..data import ATTRIBUTES, Document, split_of
from ..errors import InputError, InputTypeError
from .model import GlyphDiffusion
from .render import REPLACEMENT_CHAR, normalise

__all__ = ["char_chunks", "shuffle_pairs", "train"]


def _chunks_of(text: str, length: int) -> list[str]:
    """Whitespace-collapsed ``text`` cut into chunks of exactly ``length`` characters, each starting at a
    word (the rest of the text after a chunk is skipped up to the next word start)."""
    flat = normalise(" ".join(text.split()))
    out, i = [], 0
    while i + length <= len(flat):
        chunk = flat[i: i + length]
        if REPLACEMENT_CHAR not in chunk:
            out.append(chunk)
        nxt = flat.find(" ", i + length)
        if nxt < 0:
            break
        i = nxt + 1
    return out


def char_chunks(docs: Sequence[Document], length: int, split: str = "train", attributes: Sequence[str] = ATTRIBUTES,
                balance: bool = True, valid_fraction: float = 0.05) -> tuple[list[str], torch.Tensor]:
    """``(texts, labels)``: ``length``-character chunks of the ``split`` documents of each source, label
    ``k`` = ``attributes[k]``.

    Chunks start at a word; whitespace is collapsed to single spaces and :func:`~fastdiff.glyph.render.normalise`
    applied; chunks holding a character outside the font are dropped. ``balance``: each larger class is
    subsampled to the smallest one's size at evenly spaced indices (as :func:`fastdiff.data.attribute_chunks`).
    """
    length = _checks.positive_int("length", length)
    if isinstance(docs, (str, bytes)) or not isinstance(docs, Sequence) or not docs:
        raise InputTypeError("docs: expected a non-empty list of Documents")
    if isinstance(attributes, str) or len(set(attributes)) < 2:
        raise InputError(f"attributes: expected at least two distinct source names, got {attributes!r}")
    _checks.choice("split", split, ("train", "valid", "all"))
    per: list[list[str]] = []
    for source in attributes:
        texts: list[str] = []
        for d in docs:
            if not isinstance(d, Document):
                raise InputTypeError(f"docs: expected Documents, got {type(d).__name__}")
            if d.source == source and (split == "all" or split_of(d.name, valid_fraction) == split):
                texts.extend(_chunks_of(d.text, length))
        if not texts:
            raise InputError(f"docs: no {split!r} chunk of source {source!r}")
        per.append(texts)
    if balance:
        m = min(len(p) for p in per)
        per = [[p[math.floor(i * len(p) / m)] for i in range(m)] for p in per]
    texts = [t for p in per for t in p]
    labels = torch.cat([torch.full((len(p),), k, dtype=torch.long) for k, p in enumerate(per)])
    return texts, labels


def shuffle_pairs(texts: Sequence[str], seed: int = 0) -> list[tuple[str, str]]:
    """Word-order restoration pairs ``(source, target)`` for text-to-text GlyphDiffusion (Li et al. 2023).

    target = each text as given (e.g. a :func:`char_chunks` chunk); source = its space-separated words in
    an order drawn by ``random.Random`` seeded from ``(seed, index)``, so a pair does not depend on the
    other texts, and re-joined with single spaces (a chunk of single-spaced words keeps its length, so the
    source fits the layout the target was cut for). Unlike :func:`fastdiff.data.word_order_source`
    (sorted words, whole sentences), the order carries no hint of the answer and works on fixed-length
    chunks. Texts of one word are their own source.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputTypeError(f"texts: expected a list of str, got {type(texts).__name__}")
    seed = _checks.int64("seed", seed)
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputTypeError(f"texts: expected str items, got {type(text).__name__}")
        words = text.split()
        random.Random(f"{seed}:{i}").shuffle(words)
        out.append((" ".join(words), text))
    return out


def train(model: GlyphDiffusion, texts: Sequence[str], *, labels: torch.Tensor | None = None,
          sources: Sequence[str] | None = None, steps: int = 1000, batch_size: int = 32, lr: float = 1e-3,
          warmup: int = 100, cond_drop: float = 0.1, seed: int = 0, out_dir: str | os.PathLike | None = None,
          save_every: int = 500, log_every: int = 50, max_seconds: float | None = None,
          print_fn: Callable[[str], None] = print) -> list[dict]:
    """Train ``model`` on ``texts`` (rendered once, up front) with AdamW, linear warm-up then constant.

    ``labels``: ``(N,)`` label indices (label-conditioned model); ``sources``: N source texts (text-to-text).
    ``out_dir``: ``last.pt`` every ``save_every`` steps and at the end, ``log.jsonl``. ``max_seconds``: stop
    after this much wall time (the checkpoint is written). Returns the log rows.
    """
    steps = _checks.positive_int("steps", steps)
    batch_size = _checks.positive_int("batch_size", batch_size)
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise InputTypeError("texts: expected a non-empty list of str")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (len(texts),)):
        raise InputError(f"labels: expected a ({len(texts)},) tensor")
    if sources is not None and len(sources) != len(texts):
        raise InputError(f"sources: expected {len(texts)} texts, got {len(sources)}")
    images = model.encode(texts)
    src = model.source_ids(sources) if sources is not None else None
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, warmup)))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    model.net.train()
    start = time.perf_counter()
    running, count = 0.0, 0
    step = 0
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(texts), (batch_size,), generator=g)
        loss = model.loss(images[idx], labels=None if labels is None else labels[idx],
                          source=None if src is None else src[idx], cond_drop=cond_drop, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        count += 1
        elapsed = time.perf_counter() - start
        done = step == steps or (max_seconds is not None and elapsed >= max_seconds)
        if step % log_every == 0 or done:
            row = {"step": step, "loss": running / count, "seconds": round(elapsed, 1),
                   "steps_per_s": step / elapsed}
            rows.append(row)
            running, count = 0.0, 0
            print_fn(json.dumps(row))
            if out is not None:
                with open(out / "log.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
        if out is not None and (step % save_every == 0 or done):
            model.save(out / "last.pt", step=step)
        if done:
            break
    model.net.eval()
    return rows
