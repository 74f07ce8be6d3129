"""GlyphDiffusion (Li et al. 2023): text generated as the image of its glyphs, then read back.

* :mod:`~fastdiff.glyph.render`: the shipped 5x7 bitmap font, :class:`Layout`, :func:`render`.
* :mod:`~fastdiff.glyph.recognise`: :func:`recognise` (nearest glyph per cell; exact on clean images).
* :mod:`~fastdiff.glyph.unet`: :class:`GlyphUNet` (timestep, label and source-text conditioning).
* :mod:`~fastdiff.glyph.model`: :class:`GlyphDiffusion` (loss, DDPM / DDIM sampling, CFG, save / load).
* :mod:`~fastdiff.glyph.train`: :func:`char_chunks` (the corpus as character chunks), :func:`train`.

Sits with data / models (it uses :mod:`fastdiff.continuous`, :mod:`fastdiff.schedules` and
:mod:`fastdiff.data`); scoring the recognised text with the bundled LM lives in ``scripts/glyph_diffusion.py``.
"""

from .model import GlyphDiffusion, is_glyph_checkpoint, step_grid
from .recognise import cell_distances, recognise, recognise_ids
from .render import CHARSET, FONT, NORMALISE, REPLACEMENT_CHAR, Layout, glyph_bank, normalise, render, render_ids
from .train import char_chunks, shuffle_pairs, train
from .unet import GlyphUNet, timestep_embedding

__all__ = ["CHARSET", "FONT", "NORMALISE", "REPLACEMENT_CHAR", "GlyphDiffusion", "GlyphUNet", "Layout",
           "cell_distances", "char_chunks", "glyph_bank", "is_glyph_checkpoint", "normalise", "recognise", "recognise_ids", "render",
           "render_ids", "shuffle_pairs", "step_grid", "timestep_embedding", "train"]
