"""Text -> glyph image, with a 5x7 bitmap font written for fastdiff and shipped as this table.

GlyphDiffusion (Li et al. 2023, "Glyph Diffusion: A Text Generation Model via Image Diffusion") generates
the *image* of a text and reads it back. Here the image is a fixed-width grid: ``rows`` lines of ``cols``
characters, each character a ``CELL_H x CELL_W = 8 x 6`` cell holding its ``7 x 5`` glyph in the top-left
corner (one blank pixel row below and one blank column to the right separate neighbours). So the default
:class:`Layout` (2 lines of 32 characters) is a ``16 x 192`` image. The text fills the grid character by
character, left to right, line by line (no word wrap, so cell ``k`` holds character ``k``), and is padded
with spaces.

Pixels: ``0.0`` background, ``1.0`` ink (:func:`render`); the diffusion model works on ``2·img - 1``.

Characters: the 95 printable ASCII characters (``" "`` to ``"~"``) have their own glyph. A few common
non-ASCII ones are first mapped to one ASCII character each (:data:`NORMALISE`: curly quotes to straight,
dashes to ``-``, whitespace such as ``"\\n"`` and ``"\\t"`` to a space), so a text keeps its length; every
other character is drawn as :data:`REPLACEMENT` (a hollow box with a centre dot), which the recogniser reads
back as ``"\\ufffd"`` (U+FFFD, REPLACEMENT CHARACTER).

The font was drawn for this module (no font file, no Pillow): :data:`FONT` maps each character to seven
rows of five ``#`` (ink) / ``.`` (background) marks. :func:`glyph_bank` stacks them into a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import _checks
from ..errors import InputError, InputTypeError

__all__ = ["CELL_H", "CELL_W", "CHARSET", "FONT", "GLYPH_H", "GLYPH_W", "Layout", "NORMALISE", "REPLACEMENT",
           "REPLACEMENT_CHAR", "glyph_bank", "normalise", "render", "render_ids"]

GLYPH_H, GLYPH_W = 7, 5
CELL_H, CELL_W = 8, 6
REPLACEMENT_CHAR = "\ufffd"

_ROWS = {
    " ": ".....|.....|.....|.....|.....|.....|.....",
    "!": "..#..|..#..|..#..|..#..|.....|.....|..#..",
    '"': ".#.#.|.#.#.|.....|.....|.....|.....|.....",
    "#": ".#.#.|.#.#.|#####|.#.#.|#####|.#.#.|.#.#.",
    "$": "..#..|.####|#.#..|.###.|..#.#|####.|..#..",
    "%": "##...|##..#|...#.|..#..|.#...|#..##|...##",
    "&": ".##..|#..#.|#.#..|.#...|#.#.#|#..#.|.##.#",
    "'": "..#..|..#..|.#...|.....|.....|.....|.....",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "*": ".....|..#..|#.#.#|.###.|#.#.#|..#..|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    "/": ".....|....#|...#.|..#..|.#...|#....|.....",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    ";": ".....|.##..|.##..|.....|.##..|..#..|.#...",
    "<": "...#.|..#..|.#...|#....|.#...|..#..|...#.",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...",
    "?": ".###.|#...#|....#|...#.|..#..|.....|..#..",
    "@": ".###.|#...#|....#|.##.#|#.#.#|#.#.#|.###.",
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "###..|#..#.|#...#|#...#|#...#|#..#.|###..",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    "[": ".###.|.#...|.#...|.#...|.#...|.#...|.###.",
    "\\": ".....|#....|.#...|..#..|...#.|....#|.....",
    "]": ".###.|...#.|...#.|...#.|...#.|...#.|.###.",
    "^": "..#..|.#.#.|#...#|.....|.....|.....|.....",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "`": ".#...|..#..|...#.|.....|.....|.....|.....",
    "a": ".....|.....|.###.|....#|.####|#...#|.####",
    "b": "#....|#....|#.##.|##..#|#...#|#...#|####.",
    "c": ".....|.....|.###.|#....|#....|#...#|.###.",
    "d": "....#|....#|.##.#|#..##|#...#|#...#|.####",
    "e": ".....|.....|.###.|#...#|#####|#....|.###.",
    "f": "..##.|.#..#|.#...|###..|.#...|.#...|.#...",
    "g": ".....|.####|#...#|#...#|.####|....#|.###.",
    "h": "#....|#....|#.##.|##..#|#...#|#...#|#...#",
    "i": "..#..|.....|.##..|..#..|..#..|..#..|.###.",
    "j": "...#.|.....|..##.|...#.|...#.|#..#.|.##..",
    "k": "#....|#....|#..#.|#.#..|##...|#.#..|#..#.",
    "l": "##...|.#...|.#...|.#...|.#...|.#...|..##.",
    "m": ".....|.....|##.#.|#.#.#|#.#.#|#...#|#...#",
    "n": ".....|.....|#.##.|##..#|#...#|#...#|#...#",
    "o": ".....|.....|.###.|#...#|#...#|#...#|.###.",
    "p": ".....|.....|####.|#...#|####.|#....|#....",
    "q": ".....|.....|.##.#|#..##|.####|....#|....#",
    "r": ".....|.....|#.##.|##..#|#....|#....|#....",
    "s": ".....|.....|.###.|#....|.###.|....#|####.",
    "t": ".#...|.#...|###..|.#...|.#...|.#..#|..##.",
    "u": ".....|.....|#...#|#...#|#...#|#..##|.##.#",
    "v": ".....|.....|#...#|#...#|#...#|.#.#.|..#..",
    "w": ".....|.....|#...#|#...#|#.#.#|#.#.#|.#.#.",
    "x": ".....|.....|#...#|.#.#.|..#..|.#.#.|#...#",
    "y": ".....|.....|#...#|#...#|.####|....#|.###.",
    "z": ".....|.....|#####|...#.|..#..|.#...|#####",
    "{": "...#.|..#..|..#..|.#...|..#..|..#..|...#.",
    "|": "..#..|..#..|..#..|.....|..#..|..#..|..#..",
    "}": ".#...|..#..|..#..|...#.|..#..|..#..|.#...",
    "~": ".....|.....|.#...|#.#.#|...#.|.....|.....",
    REPLACEMENT_CHAR: "#####|#...#|#...#|#.#.#|#...#|#...#|#####",
}

#: the characters with a glyph, in the order of :func:`glyph_bank`'s rows: printable ASCII, then U+FFFD
CHARSET: str = "".join(chr(c) for c in range(32, 127)) + REPLACEMENT_CHAR
#: character -> seven rows of five "#"/"." marks
FONT: dict[str, tuple[str, ...]] = {ch: tuple(_ROWS[ch].split("|")) for ch in CHARSET}
#: the glyph drawn for characters outside the font (read back as U+FFFD)
REPLACEMENT: tuple[str, ...] = FONT[REPLACEMENT_CHAR]
#: non-ASCII (and non-printing) characters drawn as one ASCII character, so a text keeps its length
NORMALISE: dict[str, str] = {
    "\n": " ", "\t": " ", "\r": " ", "\u00a0": " ",
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u2013": "-", "\u2014": "-", "\u2212": "-",
}
_INDEX = {ch: i for i, ch in enumerate(CHARSET)}


def normalise(text: str) -> str:
    """``text`` with :data:`NORMALISE` applied and every character outside the font replaced by U+FFFD:
    what :func:`render` draws (and a clean image reads back as), character for character."""
    if not isinstance(text, str):
        raise InputTypeError(f"text: expected a str, got {type(text).__name__}")
    out = []
    for ch in text:
        ch = NORMALISE.get(ch, ch)
        out.append(ch if ch in _INDEX else REPLACEMENT_CHAR)
    return "".join(out)


def glyph_bank(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(len(CHARSET), CELL_H, CELL_W)`` cell images (0 background, 1 ink), row ``k`` = ``CHARSET[k]``."""
    bank = torch.zeros(len(CHARSET), CELL_H, CELL_W, dtype=dtype)
    for k, ch in enumerate(CHARSET):
        for r, row in enumerate(FONT[ch]):
            for c, mark in enumerate(row):
                if mark == "#":
                    bank[k, r, c] = 1.0
    return bank


@dataclass(frozen=True)
class Layout:
    """The text grid: ``rows`` lines of ``cols`` characters; the image is ``(rows·8, cols·6)``."""

    cols: int = 32
    rows: int = 2

    def __post_init__(self) -> None:
        _checks.positive_int("cols", self.cols)
        _checks.positive_int("rows", self.rows)

    @property
    def capacity(self) -> int:
        """Characters per image."""
        return self.cols * self.rows

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the image."""
        return self.rows * CELL_H, self.cols * CELL_W

    def cell_ids(self, texts: Sequence[str], overflow: str = "error") -> torch.Tensor:
        """``(N, rows, cols)`` int64 glyph indices (into :data:`CHARSET`) of ``texts`` laid out on the grid.

        overflow : "error" (a text longer than :attr:`capacity` is an InputError) or "truncate".
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InputTypeError(f"texts: expected a list of str, got {type(texts).__name__}")
        _checks.choice("overflow", overflow, ("error", "truncate"))
        ids = torch.full((len(texts), self.capacity), _INDEX[" "], dtype=torch.long)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputTypeError(f"texts[{i}]: expected a str, got {type(text).__name__}")
            if len(text) > self.capacity:
                if overflow == "error":
                    raise InputError(f"texts[{i}]: {len(text)} characters do not fit {self.rows} lines of "
                                     f"{self.cols} (capacity {self.capacity}); pass overflow='truncate'")
                text = text[: self.capacity]
            if text:
                ids[i, : len(text)] = torch.tensor([_INDEX[ch] for ch in normalise(text)], dtype=torch.long)
        return ids.reshape(len(texts), self.rows, self.cols)


def render_ids(ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(N, rows, cols)`` glyph indices -> ``(N, rows·8, cols·6)`` images (0 background, 1 ink)."""
    ids = _checks.integer("ids", ids)
    if ids.ndim != 3:
        raise InputError(f"ids: expected (N, rows, cols), got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(CHARSET)):
        raise InputError(f"ids: glyph indices must lie in [0, {len(CHARSET)})")
    N, R, C = ids.shape
    cells = glyph_bank(dtype).to(ids.device)[ids]  # (N, R, C, 8, 6)
    return cells.permute(0, 1, 3, 2, 4).reshape(N, R * CELL_H, C * CELL_W)


def render(texts: str | Sequence[str], layout: Layout | None = None, overflow: str = "error",
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Glyph images of ``texts``: ``(N, H, W)`` (or ``(H, W)`` for one str), 0 background, 1 ink.

    ``layout`` (default 2 lines of 32 characters): the grid; see :meth:`Layout.cell_ids` for ``overflow``.
    """
    layout = Layout() if layout is None else layout
    if not isinstance(layout, Layout):
        raise InputTypeError(f"layout: expected a Layout, got {type(layout).__name__}")
    one = isinstance(texts, str)
    img = render_ids(layout.cell_ids([texts] if one else texts, overflow), dtype)
    return img[0] if one else img
