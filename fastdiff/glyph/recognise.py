"""Glyph image -> text: nearest-template recognition per cell.

The font is fixed-width and shipped (:mod:`fastdiff.glyph.render`), so every character sits in a known
``8 x 6`` cell. The recogniser reads each cell as the glyph of :func:`~fastdiff.glyph.render.glyph_bank`
nearest to it in L2. Under i.i.d. Gaussian pixel noise and equally likely glyphs this is the maximum
a-posteriori decision, and on a clean image it is exact (the distance to the right glyph is 0, to any other
at least the smallest Hamming distance between two glyphs, which the tests check is positive).

:func:`cell_distances` also exposes how far each cell is from its nearest glyph: on generated images that
is a measure of legibility (0 for a perfectly drawn glyph).
"""

from __future__ import annotations

import torch

from .. import _checks
from ..errors import InputError
from .render import CELL_H, CELL_W, CHARSET, glyph_bank

__all__ = ["cell_distances", "recognise", "recognise_ids"]


def _cells(images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    images = _checks.floating("images", images)
    if images.ndim not in (2, 3):
        raise InputError(f"images: expected (H, W) or (N, H, W), got {tuple(images.shape)}")
    img = images if images.ndim == 3 else images[None]
    N, H, W = img.shape
    if H % CELL_H or W % CELL_W or not H or not W:
        raise InputError(f"images: height and width must be positive multiples of the {CELL_H} x {CELL_W} "
                         f"cell, got {H} x {W}")
    R, C = H // CELL_H, W // CELL_W
    cells = img.reshape(N, R, CELL_H, C, CELL_W).permute(0, 1, 3, 2, 4).reshape(N, R, C, CELL_H * CELL_W)
    return cells, R, C


def cell_distances(images: torch.Tensor) -> torch.Tensor:
    """``(N, rows, cols, len(CHARSET))`` squared L2 distances of every cell of ``images`` ((N, H, W) or
    (H, W), 0 background / 1 ink scale) to every glyph, in float64."""
    cells, _, _ = _cells(images)
    cells = cells.double()
    bank = glyph_bank(torch.float64).to(cells.device).reshape(len(CHARSET), -1)
    d = (cells**2).sum(-1, keepdim=True) - 2 * cells @ bank.T + (bank**2).sum(-1)
    return d.clamp_min(0.0)


def recognise_ids(images: torch.Tensor) -> torch.Tensor:
    """``(N, rows, cols)`` indices into :data:`CHARSET` of the nearest glyph of every cell."""
    return cell_distances(images).argmin(-1)


def recognise(images: torch.Tensor, strip: bool = True) -> list[str] | str:
    """The text of glyph ``images`` ((N, H, W) -> list of N str; (H, W) -> one str), lines joined in order.

    ``strip`` (default) drops trailing spaces (the grid's padding). The replacement glyph reads as U+FFFD.
    """
    one = isinstance(images, torch.Tensor) and images.ndim == 2
    ids = recognise_ids(images)
    texts = ["".join(CHARSET[i] for i in row.reshape(-1).tolist()) for row in ids]
    if strip:
        texts = [t.rstrip(" ") for t in texts]
    return texts[0] if one else texts
