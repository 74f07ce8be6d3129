"""A run's log, ``train_log.jsonl``: one JSON record per line (``step``, the mean loss terms of the
steps since the last line, lr, grad_norm, tokens_per_s, elapsed; or the validation losses)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["LOG_FILE", "accumulate", "append_log", "progress_enabled", "read_log", "window_record"]

LOG_FILE = "train_log.jsonl"


def accumulate(window: dict[str, float], metrics: dict[str, float]) -> None:
    """Add one step's ``metrics`` to the log ``window`` (sums and a ``count``)."""
    for k, v in metrics.items():
        window[k] = window.get(k, 0.0) + v
    window["count"] = window.get("count", 0.0) + 1


def window_record(window: dict[str, float], step: int, elapsed: float) -> dict[str, Any]:
    """The log line of a ``window``: the mean of each term, ``tokens_per_s`` and ``elapsed``."""
    count = window.get("count", 0.0)
    rec: dict[str, Any] = {"step": step}
    for k, v in window.items():
        if k not in ("count", "tokens", "time_s"):
            rec[k] = v / count
    rec["tokens_per_s"] = window.get("tokens", 0.0) / window["time_s"] if window.get("time_s") else 0.0
    rec["elapsed"] = elapsed
    return rec


def append_log(out_dir: str | Path, rec: dict[str, Any]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def read_log(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """``([(line, record), ...], torn)`` of a JSONL training log. A last line without its newline that is
    not JSON (a write killed half way) is dropped and ``torn`` is True; any other line that is not a JSON
    object with an integer ``step`` is an InputError naming the file and the line."""
    data = path.read_bytes()
    chunks = data.split(b"\n")
    tail = chunks.pop()  # b"" when the file ends with a newline
    out: list[tuple[str, dict[str, Any]]] = []
    torn = False

    def parse(i: int, raw: bytes, last: bool) -> None:
        nonlocal torn
        if not raw.strip():
            return
        try:
            line = raw.decode("utf-8")
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if last:
                torn = True
                return
            raise InputError(f"corrupted log: {path}: line {i} is not JSON ({e})") from None
        step = rec.get("step", 0) if isinstance(rec, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise InputError(f"corrupted log: {path}: line {i} is not a record with an integer step: {line[:80]!r}")
        out.append((line.rstrip("\r"), rec))

    for i, raw in enumerate(chunks, 1):
        parse(i, raw, last=False)
    parse(len(chunks) + 1, tail, last=True)
    return out, torn


def progress_enabled(progress: bool) -> bool:
    """A tqdm bar only where it is drawn in place: a terminal (or a notebook widget); into a file or
    pipe its ``\\r`` frames would pile up in the log."""
    if not progress:
        return False
    from tqdm.auto import tqdm

    if getattr(tqdm, "__module__", "").startswith("tqdm.notebook"):
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False
